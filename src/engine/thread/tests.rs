//! The GPU thread without a GPU: on the CPU path (batching, pieces, cancellation,
//! fallback), and on the test device of `gpu/fake.rs`, which runs every batch through the
//! op's CPU version of its GPU output and fails on purpose (`faults.rs`): panics, transient
//! CUDA failures, a lost device, a hung batch, a device that opens late. The same logic runs
//! on a real GPU in src/gpu/tests.rs.

use super::*;
use crate::engine::job::Batching;
use crate::faults::Plan;
use crate::testing::{
    collect, completions, job, log_lines, ops, reference, run_mixed, wait_done, Op, Rng,
};

fn config(batch_bytes: u64) -> Config {
    Config::new(ops(), batch_bytes, Duration::ZERO, 1 << 30)
}

fn cpu_thread(batch_bytes: u64) -> GpuThread {
    GpuThread::spawn(config(batch_bytes), Kernels::Unavailable("test".into())).unwrap()
}

/// A thread on the test device, with `faults` planned; unless the plan delays the device,
/// returns once the device is open.
fn fake_thread(mut config: Config, faults: &str) -> GpuThread {
    config.faults = Plan::parse(faults).unwrap();
    let late = config.faults.open_failures > 0 || !config.faults.open_delay.is_zero();
    let t = GpuThread::spawn(config, Kernels::Fake).unwrap();
    if !late {
        let events = collect(&t, Duration::from_secs(5), |e| {
            log_lines(e).iter().any(|m| m.contains("gpu: using"))
        });
        assert!(
            log_lines(&events).iter().any(|m| m.contains("gpu: using")),
            "{events:?}"
        );
    }
    t
}

fn batching(size: usize, delay_ms: u64) -> Batching {
    Batching {
        size,
        delay: Duration::from_millis(delay_ms),
    }
}

/// Awkward sizes around the byte bound of 64 KiB (the smallest): pieces of 64 KiB.
fn awkward_inputs(rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut sizes = vec![
        0,
        1,
        3,
        63,
        64,
        65,
        1023,
        1024,
        1025,
        2049,
        65535,
        65536,
        65537,
        3 * 65536 + 333,
    ];
    for _ in 0..60 {
        sizes.push(rng.below(200_000) as usize);
    }
    sizes.iter().map(|&n| rng.bytes(n)).collect()
}

/// Submits `jobs` one at a time (batches of one), each after the last was answered, and
/// returns their completions in order; every other event goes to `others`.
fn one_by_one_seeing(t: &GpuThread, jobs: Vec<Job>, others: &mut Vec<Event>) -> Vec<Completion> {
    let mut done = Vec::new();
    for j in jobs {
        t.submit(j).unwrap();
        let events = collect(t, Duration::from_secs(10), |e| !completions(e).is_empty());
        let mut got = 0;
        for e in events {
            match e {
                Event::Done(c) => {
                    done.push(c);
                    got += 1;
                }
                other => others.push(other),
            }
        }
        assert_eq!(got, 1, "answers for job {}", done.len());
    }
    done
}

fn one_by_one(t: &GpuThread, jobs: Vec<Job>) -> Vec<Completion> {
    one_by_one_seeing(t, jobs, &mut Vec::new())
}

fn restarts(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Restart(_)))
        .count()
}

fn echo_jobs(n: u64, fallback: Fallback) -> Vec<Job> {
    (1..=n)
        .map(|id| {
            let mut j = job(id, Op::Echo, &[id as u8; 100], Batching::default());
            j.fallback = fallback;
            j
        })
        .collect()
}

#[test]
fn every_request_gets_its_own_answer_under_concurrency() {
    let mut rng = Rng::fresh();
    let inputs = awkward_inputs(&mut rng);
    let t = cpu_thread(64 * 1024);
    let max = run_mixed(&t, &inputs, batching(16, 2), Ran::Cpu, |_| false);
    assert!(
        max > 1,
        "a 2 ms delay with 74 queued requests formed no batch over 1"
    );
}

#[test]
fn cancelled_requests_inside_batches_harm_no_one_else() {
    let mut rng = Rng::fresh();
    let inputs = awkward_inputs(&mut rng);
    let t = cpu_thread(64 * 1024);
    run_mixed(&t, &inputs, batching(8, 5), Ran::Cpu, |id| id % 3 == 1);
}

#[test]
fn the_test_device_answers_every_request_like_the_cpu_path() {
    // Batches on the test device go through staging, the op's batched output layout and
    // the cutting of results, as on a GPU.
    let mut rng = Rng::fresh();
    let inputs = awkward_inputs(&mut rng);
    let t = fake_thread(config(64 * 1024), "");
    let max = run_mixed(&t, &inputs, batching(16, 2), Ran::Gpu(0), |id| id % 5 == 4);
    assert!(max > 1);
}

/// CPU time (user + system, in clock ticks) the thread `tid` of this process has used.
fn cpu_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // Fields after the command name (in parentheses): state is the 3rd field of the
    // line, utime and stime the 14th and 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn spinning_on_the_device_answers_lone_requests_and_stops_when_idle() {
    // gpu_poll: the thread spins on its batch and, after it, for the next request; lone
    // requests one after another get their own answers, and a worker left idle stops
    // spinning (a thread that kept spinning would use most of the second below, or its
    // share of a busy machine's cores: far over 5 ticks of 10 ms).
    let mut c = config(64 * 1024);
    c.poll = Duration::from_millis(2);
    let t = fake_thread(c, "");
    let mut rng = Rng::fresh();
    let inputs: Vec<Vec<u8>> = [0, 1, 1023, 1024, 1025, 65537]
        .iter()
        .map(|&n| {
            let extra = rng.below(3) as usize;
            rng.bytes(n + extra)
        })
        .collect();
    for (i, data) in inputs.iter().enumerate() {
        let op = if i % 2 == 0 { Op::Echo } else { Op::Blake3 };
        let done = one_by_one(&t, vec![job(i as u64, op, data, Batching::default())]);
        assert_eq!(done[0].device, Ran::Gpu(0), "request {i}");
        assert_eq!(
            done[0].result.as_ref().unwrap().body,
            reference(op, data),
            "request {i} of {} bytes",
            data.len()
        );
    }
    std::thread::sleep(Duration::from_millis(50));
    let tid = t.stats().tid.load(Ordering::Relaxed);
    let before = cpu_ticks(tid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(tid) - before;
    assert!(
        used <= 5,
        "the idle GPU thread used {used} ticks of CPU in 1 s"
    );
}

#[test]
fn delay_waits_for_a_fuller_batch() {
    let t = cpu_thread(1 << 20);
    for id in 0..5 {
        t.submit(job(id, Op::Echo, &[id as u8; 10], batching(5, 2000)))
            .unwrap();
    }
    let done = wait_done(&t, 5, Duration::from_secs(5));
    assert_eq!(done.len(), 5);
    assert!(
        done.iter().all(|c| c.batch_size == 5),
        "{:?}",
        done.iter().map(|c| c.batch_size).collect::<Vec<_>>()
    );
    // Full before the delay ran out: it went at once.
    assert!(done
        .iter()
        .all(|c| c.queue_time < Duration::from_millis(1500)));
}

#[test]
fn delay_lets_a_partial_batch_go_when_the_oldest_has_waited() {
    let t = cpu_thread(1 << 20);
    let start = Instant::now();
    for id in 0..3 {
        t.submit(job(id, Op::Blake3, b"abc", batching(10, 150)))
            .unwrap();
    }
    let done = wait_done(&t, 3, Duration::from_secs(5));
    assert_eq!(done.len(), 3);
    assert!(start.elapsed() >= Duration::from_millis(150));
    assert!(done.iter().all(|c| c.batch_size == 3));
    assert!(
        done.iter()
            .all(|c| c.queue_time >= Duration::from_millis(140)),
        "{:?}",
        done[0].queue_time
    );
    assert!(done
        .iter()
        .all(|c| c.result.as_ref().unwrap().body == reference(Op::Blake3, b"abc")));
}

/// A state driven by hand (no thread), on the test device or the CPU path.
fn manual_state(config: Config, kernels: Kernels) -> (State, Receiver<Event>) {
    let (tx, rx) = unbounded();
    let out = Outbox {
        tx,
        notifier: Arc::new(Notifier::new().unwrap()),
    };
    let mut st = State::new(out, config, Arc::default(), kernels);
    // Open the device as the thread's first step would, and wait for it.
    st.start_open(1);
    if let Opener::Opening { attempt, result } = &st.opener {
        let (attempt, opened) = (*attempt, result.recv().unwrap());
        st.opened(attempt, opened);
    }
    (st, rx)
}

fn done_of(rx: &Receiver<Event>) -> Vec<Completion> {
    rx.try_iter()
        .filter_map(|e| match e {
            Event::Done(c) => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn a_huge_body_does_not_hold_up_small_ones_behind_it() {
    // Driven without the thread, so that both requests are queued before any batch.
    let mut rng = Rng::fresh();
    let big = rng.bytes(64 * 65536 + 5);
    let (mut st, rx) = manual_state(config(64 * 1024), Kernels::Unavailable("test".into()));
    st.arrive(job(1, Op::Blake3, &big, batching(64, 0)));
    st.arrive(job(2, Op::Blake3, b"small", batching(64, 0)));
    st.dispatch();
    let done = done_of(&rx);
    assert_eq!(done.len(), 2);
    // The small one is answered after the big body's first piece, not after its last.
    assert_eq!(done[0].id, 2);
    assert_eq!(
        done[0].result.as_ref().unwrap().body,
        reference(Op::Blake3, b"small")
    );
    assert_eq!(
        done[1].result.as_ref().unwrap().body,
        reference(Op::Blake3, &big)
    );
}

#[test]
fn fallback_off_without_gpu_is_unavailable() {
    let t = cpu_thread(1 << 20);
    let mut j = job(7, Op::Echo, b"x", Batching::default());
    j.fallback = Fallback::Off;
    t.submit(j).unwrap();
    let done = wait_done(&t, 1, Duration::from_secs(5));
    assert!(matches!(done[0].result, Err(JobError::Unavailable(_))));
    assert_eq!(done[0].device, Ran::None);
}

#[test]
fn cancelled_jobs_are_skipped_and_others_still_answered() {
    let t = cpu_thread(1 << 20);
    let a = job(1, Op::Echo, b"a", Batching::default());
    a.cancelled.store(true, Ordering::Release);
    t.submit(a).unwrap();
    t.submit(job(2, Op::Echo, b"b", Batching::default()))
        .unwrap();
    let done = wait_done(&t, 2, Duration::from_millis(300));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, 2);
}

#[test]
fn the_start_line_says_why_there_is_no_gpu() {
    let t = GpuThread::spawn(
        config(1 << 20),
        Kernels::Unavailable("libnvrtc not found".into()),
    )
    .unwrap();
    let events = collect(&t, Duration::from_secs(5), |e| !log_lines(e).is_empty());
    let logs = log_lines(&events);
    assert!(
        logs.iter()
            .any(|m| m.contains("no usable GPU") && m.contains("libnvrtc")),
        "{logs:?}"
    );
}

/// The thread and the CUDA driver threads it starts must not take nginx's signals
/// (SIGHUP reload, SIGQUIT, SIGTERM, SIGCHLD, ...): nginx handles them on its own thread.
#[test]
fn the_gpu_thread_blocks_nginx_signals() {
    let t = cpu_thread(1 << 20);
    // This thread's GPU thread by its id: other tests' GPU threads may be exiting, and
    // glibc blocks every signal in a thread on its way out.
    let mut blocked = None;
    for _ in 0..100 {
        let tid = t.stats().tid.load(Ordering::Relaxed);
        if tid != 0 {
            let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"));
            let status = status.expect("the GPU thread is listed in /proc/self/task");
            assert!(status.contains("Name:\tnginx-gpu\n"), "{status}");
            blocked = status
                .lines()
                .find_map(|l| l.strip_prefix("SigBlk:"))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mask = blocked.expect("the GPU thread records its thread id");
    for (name, sig) in [
        ("SIGHUP", libc::SIGHUP),
        ("SIGINT", libc::SIGINT),
        ("SIGQUIT", libc::SIGQUIT),
        ("SIGTERM", libc::SIGTERM),
        ("SIGUSR1", libc::SIGUSR1),
        ("SIGUSR2", libc::SIGUSR2),
        ("SIGCHLD", libc::SIGCHLD),
        ("SIGALRM", libc::SIGALRM),
        ("SIGIO", libc::SIGIO),
        ("SIGWINCH", libc::SIGWINCH),
        ("SIGPIPE", libc::SIGPIPE),
    ] {
        assert!(
            mask & (1 << (sig - 1)) != 0,
            "{name} is not blocked: SigBlk {mask:x}"
        );
    }
    assert!(
        mask & (1 << (libc::SIGSEGV - 1)) == 0,
        "SIGSEGV must stay deliverable"
    );
    drop(t);
}

#[test]
fn a_panic_while_packing_is_answered_and_the_thread_carries_on() {
    let t = fake_thread(config(1 << 20), "panic@2");
    let done = one_by_one(&t, echo_jobs(4, Fallback::Cpu));
    let devices: Vec<Ran> = done.iter().map(|c| c.device).collect();
    assert_eq!(devices, [Ran::Gpu(0), Ran::Cpu, Ran::Gpu(0), Ran::Gpu(0)]);
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.result.as_ref().unwrap().body, vec![i as u8 + 1; 100]);
    }
    assert_eq!(t.stats().panics.load(Ordering::Relaxed), 1);
    assert!(t.alive());
}

#[test]
fn a_panic_with_fallback_off_answers_500_not_a_hang() {
    let t = fake_thread(config(1 << 20), "panic@1");
    let done = one_by_one(&t, echo_jobs(2, Fallback::Off));
    assert!(
        matches!(&done[0].result, Err(JobError::Internal(m)) if m.contains("GPU thread failed"))
    );
    assert_eq!(done[1].device, Ran::Gpu(0));
}

#[test]
fn a_panic_with_a_batch_in_flight_leaves_the_slot_to_finish() {
    let t = fake_thread(config(1 << 20), "panic-in-flight@1,panic-in-flight@3");
    let done = one_by_one(&t, echo_jobs(6, Fallback::Cpu));
    let devices: Vec<Ran> = done.iter().map(|c| c.device).collect();
    assert_eq!(
        devices,
        [
            Ran::Cpu,
            Ran::Gpu(0),
            Ran::Cpu,
            Ran::Gpu(0),
            Ran::Gpu(0),
            Ran::Gpu(0)
        ]
    );
    for (i, c) in done.iter().enumerate() {
        assert_eq!(
            c.result.as_ref().unwrap().body,
            vec![i as u8 + 1; 100],
            "job {i}"
        );
    }
    assert_eq!(t.stats().panics.load(Ordering::Relaxed), 2);
}

#[test]
fn repeated_panics_ask_for_a_fresh_worker() {
    let t = fake_thread(config(1 << 20), "panic@1+");
    let mut events = Vec::new();
    one_by_one_seeing(&t, echo_jobs(2, Fallback::Cpu), &mut events);
    assert_eq!(restarts(&events), 0, "two panics are not yet a pattern");
    one_by_one_seeing(&t, echo_jobs(1, Fallback::Cpu), &mut events);
    events.extend(t.drain());
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Restart(why) if why.contains("panicked 3 times"))),
        "{events:?}"
    );
}

#[test]
fn transient_failures_fail_only_their_batch_and_keep_the_device() {
    for fault in ["oom@2", "bad-launch@2"] {
        let t = fake_thread(config(1 << 20), fault);
        let mut events = Vec::new();
        let done = one_by_one_seeing(&t, echo_jobs(4, Fallback::Cpu), &mut events);
        let devices: Vec<Ran> = done.iter().map(|c| c.device).collect();
        assert_eq!(
            devices,
            [Ran::Gpu(0), Ran::Cpu, Ran::Gpu(0), Ran::Gpu(0)],
            "{fault}"
        );
        events.extend(t.drain());
        assert_eq!(restarts(&events), 0, "{fault}: {events:?}");
        assert!(
            log_lines(&events)
                .iter()
                .any(|m| m.contains("the GPU stays in use")),
            "{fault}: {events:?}"
        );
        // With gpu_fallback off the failed batch gets 503, the next ones the GPU.
        let t = fake_thread(config(1 << 20), fault);
        let done = one_by_one(&t, echo_jobs(3, Fallback::Off));
        assert!(
            matches!(done[1].result, Err(JobError::Unavailable(_))),
            "{fault}"
        );
        assert_eq!(done[2].device, Ran::Gpu(0), "{fault}");
    }
}

#[test]
fn a_lost_device_fails_its_batches_in_flight_and_asks_for_a_fresh_worker() {
    for fault in ["trap@2", "lost@2"] {
        let t = fake_thread(config(1 << 20), fault);
        let mut events = Vec::new();
        let done = one_by_one_seeing(&t, echo_jobs(4, Fallback::Cpu), &mut events);
        let devices: Vec<Ran> = done.iter().map(|c| c.device).collect();
        // From the loss on, this worker has no GPU: the fallback serves until it exits.
        assert_eq!(
            devices,
            [Ran::Gpu(0), Ran::Cpu, Ran::Cpu, Ran::Cpu],
            "{fault}"
        );
        for (i, c) in done.iter().enumerate() {
            assert_eq!(c.result.as_ref().unwrap().body, vec![i as u8 + 1; 100]);
        }
        events.extend(t.drain());
        assert_eq!(restarts(&events), 1, "{fault}: {events:?}");
        let t = fake_thread(config(1 << 20), fault);
        let done = one_by_one(&t, echo_jobs(3, Fallback::Off));
        assert!(
            matches!(done[1].result, Err(JobError::Unavailable(_))),
            "{fault}"
        );
        assert!(
            matches!(done[2].result, Err(JobError::Unavailable(_))),
            "{fault}"
        );
    }
}

#[test]
fn a_hung_batch_is_caught_by_its_deadline_and_exit_does_not_wait_for_it() {
    let t = fake_thread(config(1 << 20), "hang@1");
    let mut j = job(1, Op::Blake3, b"stuck", Batching::default());
    j.timeout = Duration::from_millis(50);
    let start = Instant::now();
    t.submit(j).unwrap();
    let events = collect(&t, Duration::from_secs(10), |e| !completions(e).is_empty());
    let waited = start.elapsed();
    let done = completions(&events);
    assert_eq!(
        done[0].device,
        Ran::Cpu,
        "the hung batch's request falls back"
    );
    assert_eq!(
        done[0].result.as_ref().unwrap().body,
        reference(Op::Blake3, b"stuck")
    );
    // Its own gpu_timeout was 50 ms; a batch is not "hung" before MIN_DEADLINE.
    assert!(
        waited >= MIN_DEADLINE && waited < MIN_DEADLINE * 3,
        "{waited:?}"
    );
    let logs = log_lines(&events);
    assert!(
        logs.iter().any(|m| m.contains("has not finished")),
        "{logs:?}"
    );
    let mut events = events;
    events.extend(t.drain());
    assert_eq!(restarts(&events), 1);
    let mut t = t;
    let start = Instant::now();
    t.stop();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "exit waited for a hung stream"
    );
}

#[test]
fn exit_with_a_batch_still_running_waits_a_little_then_abandons_it() {
    let mut c = config(1 << 20);
    c.exit_wait = Duration::from_millis(300);
    let mut t = fake_thread(c, "hang@1");
    t.submit(job(1, Op::Echo, b"x", Batching::default()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    t.stop();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

/// After a GPU loss, the spin loop must not index a slot that went with the device.
#[test]
fn a_device_lost_while_spinning_over_two_slots_is_survived() {
    let mut c = config(1 << 20);
    c.poll = Duration::from_micros(500);
    c.faults = Plan::parse("trap@1").unwrap();
    let (mut st, rx) = manual_state(c, Kernels::Fake);
    st.arrive(job(1, Op::Echo, b"one", Batching::default()));
    st.arrive(job(2, Op::Echo, b"two", Batching::default()));
    st.dispatch();
    assert!(
        st.in_flight.iter().all(Option::is_some),
        "two batches in flight"
    );
    let (_tx, jobs) = unbounded::<Job>();
    assert!(st.spin(&jobs));
    assert!(st.device.is_none());
    let done = done_of(&rx);
    assert_eq!(done.len(), 2);
    for c in done {
        assert_eq!(c.device, Ran::Cpu);
    }
}

#[test]
fn opening_the_device_is_retried_with_backoff() {
    let t = fake_thread(config(1 << 20), "open-fail:2");
    // Meanwhile the fallback serves.
    let done = one_by_one(&t, echo_jobs(1, Fallback::Cpu));
    assert_eq!(done[0].device, Ran::Cpu);
    let mut off = job(9, Op::Echo, b"x", Batching::default());
    off.fallback = Fallback::Off;
    let done = one_by_one(&t, vec![off]);
    assert!(matches!(done[0].result, Err(JobError::Unavailable(_))));
    // Attempts at 0 s, 1 s, then 3 s.
    let events = collect(&t, Duration::from_secs(6), |e| {
        log_lines(e).iter().any(|m| m.contains("gpu: using"))
    });
    let logs = log_lines(&events);
    assert!(
        logs.iter()
            .any(|m| m.contains("gpu: using") && m.contains("(attempt 3)")),
        "{logs:?}"
    );
    assert_eq!(t.stats().opens.load(Ordering::Relaxed), 3);
    let done = one_by_one(&t, echo_jobs(1, Fallback::Off));
    assert_eq!(done[0].device, Ran::Gpu(0));
}

#[test]
fn while_the_device_opens_requests_take_the_cpu_path_and_off_requests_wait_for_it() {
    let t = fake_thread(config(1 << 20), "open-slow:400");
    let start = Instant::now();
    let mut off = job(2, Op::Echo, b"off", Batching::default());
    off.fallback = Fallback::Off;
    t.submit(off).unwrap();
    t.submit(job(1, Op::Echo, b"cpu", Batching::default()))
        .unwrap();
    let events = collect(&t, Duration::from_secs(5), |e| completions(e).len() == 2);
    let done = completions(&events);
    assert_eq!(done.len(), 2);
    // The CPU request did not wait for the device; the `off` one was served by it.
    assert_eq!((done[0].id, done[0].device), (1, Ran::Cpu));
    assert!(
        done[0].queue_time < Duration::from_millis(200),
        "{:?}",
        done[0].queue_time
    );
    assert_eq!((done[1].id, done[1].device), (2, Ran::Gpu(0)));
    assert_eq!(done[1].result.as_ref().unwrap().body, b"off");
    assert!(start.elapsed() >= Duration::from_millis(400));
}

#[test]
fn while_the_device_opens_requests_without_a_cpu_path_wait_for_it() {
    let t = fake_thread(config(1 << 20), "open-slow:400");
    let start = Instant::now();
    t.submit(job(1, Op::Kernel, b"k", Batching::default()))
        .unwrap();
    let events = collect(&t, Duration::from_secs(5), |e| !completions(e).is_empty());
    let done = completions(&events);
    // Held until the device opened; the test device does not run user kernels, so then
    // the answer is the op's own 503.
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    assert!(
        matches!(&done[0].result, Err(JobError::Unavailable(m)) if m.contains("runs on a GPU only")),
        "{:?}",
        done[0].result
    );
}

#[test]
fn buffers_are_sized_to_what_batches_need_and_shrink_when_quiet() {
    let mut c = config(16 << 20);
    c.trim_after = Duration::from_millis(150);
    let t = fake_thread(c, "");
    let big = Rng::fresh().bytes((5 << 20) + 1);
    let done = one_by_one(&t, vec![job(1, Op::Echo, &big, Batching::default())]);
    assert!(done[0].result.as_ref().unwrap().body == big);
    // 5 MiB + 1 in and out: 6 MiB each, not the next power of two (8 MiB each).
    let pinned = t.stats().pinned.load(Ordering::Relaxed) as usize;
    assert_eq!(pinned, 12 << 20);
    // Only small batches for a while: the big buffers go.
    let start = Instant::now();
    while t.stats().pinned.load(Ordering::Relaxed) as usize > 2 << 20 {
        one_by_one(&t, echo_jobs(1, Fallback::Cpu));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "buffers never shrank"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(t.stats().trimmed.load(Ordering::Relaxed) >= 10 << 20);
}

#[test]
fn batches_never_take_more_pinned_memory_than_the_limit() {
    let mut c = config(16 << 20);
    c.pinned_limit = 8 << 20;
    let t = fake_thread(c, "");
    let big = Rng::fresh().bytes(5 << 20);
    // In and out would take 5 + 5 MiB: over the limit, so this batch falls back.
    let done = one_by_one(&t, vec![job(1, Op::Echo, &big, Batching::default())]);
    assert_eq!(done[0].device, Ran::Cpu);
    assert!(done[0].result.as_ref().unwrap().body == big);
    assert!(t.stats().pinned.load(Ordering::Relaxed) as usize <= 8 << 20);
    // Small batches still run on the device.
    let done = one_by_one(&t, echo_jobs(1, Fallback::Cpu));
    assert_eq!(done[0].device, Ran::Gpu(0));
    let events = t.drain();
    assert_eq!(restarts(&events), 0);
}

/// A thread on the test device standing for `visible` devices, as worker `worker` of
/// `workers` with `gpu_devices` `devices`; returns it and the log lines until it said
/// which device it uses (or that it has none).
fn placed_thread(
    devices: &str,
    worker: usize,
    workers: usize,
    faults: &str,
) -> (GpuThread, Vec<String>) {
    let mut c = config(1 << 20);
    c.placement = Placement {
        devices: crate::engine::devices::DeviceList::parse(devices).unwrap(),
        worker,
        workers,
    };
    c.faults = Plan::parse(faults).unwrap();
    let t = GpuThread::spawn(c, Kernels::Fake).unwrap();
    let events = collect(&t, Duration::from_secs(5), |e| {
        log_lines(e)
            .iter()
            .any(|m| m.contains("gpu: using") || m.contains("no usable GPU"))
    });
    // The MPS warning follows the start line in the same wake-up, or just after it.
    let mut events = events;
    events.extend(collect(&t, Duration::from_millis(100), |_| false));
    let lines = log_lines(&events).iter().map(|s| s.to_string()).collect();
    (t, lines)
}

#[test]
fn each_worker_opens_its_device_and_its_answers_say_which() {
    // 5 workers over 3 devices: worker 4 takes the second one.
    let (t, lines) = placed_thread("all", 4, 5, "fake-devices:3");
    assert!(
        lines.iter().any(|m| m.starts_with(
            "gpu: using gpu1 \"fake device (fault injection)\", compute capability 0.0, 0 MiB, MPS: off"
        )),
        "{lines:?}"
    );
    // Not the lowest worker of gpu1 (worker 1 is): no MPS warning from this one, and
    // only worker 0 tells the spread.
    assert!(
        !lines.iter().any(|m| m.contains("without MPS")),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|m| m.contains("workers per device")),
        "{lines:?}"
    );
    let done = one_by_one(&t, echo_jobs(2, Fallback::Off));
    assert!(done.iter().all(|c| c.device == Ran::Gpu(1)), "{done:?}");
    // A listed device: worker 1 of "2,0" takes gpu0.
    let (t, lines) = placed_thread("2,0", 1, 2, "fake-devices:3,fake-mps");
    assert!(
        lines
            .iter()
            .any(|m| m.starts_with("gpu: using gpu0 ") && m.ends_with(", MPS: on")),
        "{lines:?}"
    );
    let done = one_by_one(&t, echo_jobs(1, Fallback::Off));
    assert_eq!(done[0].device, Ran::Gpu(0));
}

#[test]
fn the_lowest_worker_of_a_shared_device_warns_once_without_mps() {
    let (_t, lines) = placed_thread("all", 0, 4, "fake-devices:2");
    let using = lines.iter().position(|m| m.starts_with("gpu: using gpu0 "));
    let warn: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("gpu: 2 workers share gpu0 without MPS"))
        .collect();
    assert_eq!(warn.len(), 1, "{lines:?}");
    assert!(using.is_some_and(|u| u < warn[0]), "{lines:?}");
    assert!(
        lines.iter().any(|m| m
            == "gpu: 4 workers over \"gpu_devices all\", workers per device: gpu0: 2, gpu1: 2"),
        "{lines:?}"
    );
    // With MPS on, nothing to warn about.
    let (_t, lines) = placed_thread("all", 0, 4, "fake-devices:2,fake-mps");
    assert!(
        !lines.iter().any(|m| m.contains("without MPS")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|m| m.ends_with("MPS: on")), "{lines:?}");
}

#[test]
fn a_worker_given_a_missing_device_says_so_once_and_falls_back() {
    // "1,7" on 2 devices: worker 1 (and 3, 5 ...) gets gpu7, which is not there.
    let (t, lines) = placed_thread("1,7", 1, 2, "fake-devices:2");
    let said: Vec<&String> = lines
        .iter()
        .filter(|m| m.contains("no usable GPU in this worker"))
        .collect();
    assert_eq!(said.len(), 1, "{lines:?}");
    assert!(
        said[0].contains(
            "\"gpu_devices 1,7\" gives this worker (worker 1) gpu7, but CUDA shows 2 devices"
        ),
        "{lines:?}"
    );
    // It serves on the CPU path, or 503 with gpu_fallback off; never tries again.
    let done = one_by_one(&t, echo_jobs(1, Fallback::Cpu));
    assert_eq!(done[0].device, Ran::Cpu);
    let done = one_by_one(&t, echo_jobs(1, Fallback::Off));
    assert!(matches!(done[0].result, Err(JobError::Unavailable(_))));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!log_lines(&t.drain())
        .iter()
        .any(|m| m.contains("no usable GPU")));
    assert_eq!(t.stats().opens.load(Ordering::Relaxed), 1);
    // Worker 0 of the same list serves on gpu1 and tells the missing one.
    let (t, lines) = placed_thread("1,7", 0, 2, "fake-devices:2");
    assert!(
        lines.iter().any(|m| m.starts_with("gpu: using gpu1 ")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|m| m.contains("lists gpu7, which CUDA does not show")),
        "{lines:?}"
    );
    let done = one_by_one(&t, echo_jobs(1, Fallback::Off));
    assert_eq!(done[0].device, Ran::Gpu(1));
}

/// An op on the test device that allows `limit` batches in flight.
struct Limited(Box<dyn OpOnDevice>, usize);

impl OpOnDevice for Limited {
    fn layout(&self, items: &[Item]) -> Layout {
        self.0.layout(items)
    }
    fn pack(
        &self,
        items: &[Item],
        layout: &Layout,
        desc: &mut [u8],
        data: &mut [u8],
    ) -> Vec<(usize, JobError)> {
        self.0.pack(items, layout, desc, data)
    }
    fn launch(&self, layout: &Layout, target: crate::ops::Target) -> Result<(), GpuError> {
        self.0.launch(layout, target)
    }
    fn result<'o>(
        &self,
        layout: &Layout,
        i: usize,
        out: &'o [u8],
    ) -> Result<std::borrow::Cow<'o, [u8]>, JobError> {
        self.0.result(layout, i, out)
    }
    fn max_in_flight(&self) -> usize {
        self.1
    }
}

/// An op at its in-flight limit keeps its requests queued, to go together in its next
/// batch once one is done; another op still gets the free slot.
#[test]
fn an_op_at_its_in_flight_limit_waits_and_its_requests_join_one_batch() {
    let (mut st, rx) = manual_state(config(1 << 20), Kernels::Fake);
    let open = st.device.as_mut().unwrap();
    assert!(open.device().slots() >= 2);
    let ops = open.ops.as_mut().unwrap();
    let echo = ops.remove(&Op::Echo.key()).unwrap();
    ops.insert(Op::Echo.key(), Box::new(Limited(echo, 1)));
    let b = batching(64, 0);
    st.arrive(job(1, Op::Echo, b"one", b));
    st.dispatch();
    let first: Vec<usize> = (0..st.in_flight.len())
        .filter(|&s| st.in_flight[s].is_some())
        .collect();
    assert_eq!(first.len(), 1, "the first batch in flight");
    for id in 2..=5u64 {
        st.arrive(job(id, Op::Echo, &[id as u8; 7], b));
    }
    st.dispatch();
    assert_eq!(
        st.in_flight.iter().flatten().count(),
        1,
        "echo's second batch waits for its first"
    );
    // Nothing is due for echo, so the thread would not wake for it before a batch is done.
    assert_eq!(st.queue.next_due(|op| st.held(op)), None);
    // Blake3 has no limit: it takes the free slot meanwhile.
    st.arrive(job(6, Op::Blake3, b"six", b));
    st.dispatch();
    assert_eq!(st.in_flight.iter().flatten().count(), 2);
    st.retire(first[0]);
    st.dispatch();
    let echo_batches: Vec<usize> = st
        .in_flight
        .iter()
        .flatten()
        .filter(|fl| fl.batch.op == Op::Echo.key())
        .map(|fl| fl.batch.pieces.len())
        .collect();
    assert_eq!(
        echo_batches,
        vec![4],
        "the four waiting requests in one batch"
    );
    for s in 0..st.in_flight.len() {
        st.retire(s);
    }
    let mut done = done_of(&rx);
    done.sort_by_key(|c| c.id);
    assert_eq!(done.len(), 6);
    for c in &done {
        let want = match c.id {
            1 => reference(Op::Echo, b"one"),
            6 => reference(Op::Blake3, b"six"),
            id => reference(Op::Echo, &[id as u8; 7]),
        };
        assert_eq!(c.result.as_ref().unwrap().body, want, "job {}", c.id);
        assert_eq!(c.device, Ran::Gpu(0));
    }
}
