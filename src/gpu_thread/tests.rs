//! The GPU thread on the CPU path (no GPU needed): batching, pieces, cancellation,
//! fallback. The same logic runs on the GPU path in src/gpu/tests.rs.

use super::*;
use crate::job::Batching;
use crate::ops::Op;
use crate::testing::{job, reference, run_mixed, wait_done, Rng};

fn cpu_thread(queue_size: usize, batch_bytes: u64) -> GpuThread {
    GpuThread::spawn(
        Config {
            queue_size,
            batch_bytes,
            poll: Duration::ZERO,
        },
        Kernels::Unavailable("test".into()),
    )
    .unwrap()
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

#[test]
fn every_request_gets_its_own_answer_under_concurrency() {
    let mut rng = Rng::fresh();
    let inputs = awkward_inputs(&mut rng);
    let t = cpu_thread(1024, 64 * 1024);
    let max = run_mixed(&t, &inputs, batching(16, 2), Device::Cpu, |_| false);
    assert!(
        max > 1,
        "a 2 ms delay with 74 queued requests formed no batch over 1"
    );
}

#[test]
fn cancelled_requests_inside_batches_harm_no_one_else() {
    let mut rng = Rng::fresh();
    let inputs = awkward_inputs(&mut rng);
    let t = cpu_thread(1024, 64 * 1024);
    run_mixed(&t, &inputs, batching(8, 5), Device::Cpu, |id| id % 3 == 1);
}

#[test]
fn delay_waits_for_a_fuller_batch() {
    let t = cpu_thread(64, 1 << 20);
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
    let t = cpu_thread(64, 1 << 20);
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

#[test]
fn a_huge_body_does_not_hold_up_small_ones_behind_it() {
    // Driven without the thread, so that both requests are queued before any batch.
    let mut rng = Rng::fresh();
    let big = rng.bytes(64 * 65536 + 5);
    let (tx, rx) = unbounded();
    let out = Outbox {
        tx,
        notifier: Arc::new(Notifier::new().unwrap()),
    };
    let mut st = State::new(
        None,
        out,
        Config {
            queue_size: 64,
            batch_bytes: 64 * 1024,
            poll: Duration::ZERO,
        },
        Arc::default(),
    );
    st.arrive(job(1, Op::Blake3, &big, batching(64, 0)));
    st.arrive(job(2, Op::Blake3, b"small", batching(64, 0)));
    st.dispatch();
    let done: Vec<Completion> = rx
        .try_iter()
        .filter_map(|e| {
            if let Event::Done(c) = e {
                Some(c)
            } else {
                None
            }
        })
        .collect();
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
    let t = cpu_thread(4, 1 << 20);
    let mut j = job(7, Op::Echo, b"x", Batching::default());
    j.fallback = Fallback::Off;
    t.submit(j).unwrap();
    let done = wait_done(&t, 1, Duration::from_secs(5));
    assert!(matches!(done[0].result, Err(JobError::Unavailable(_))));
    assert_eq!(done[0].device, Device::None);
}

#[test]
fn cancelled_jobs_are_skipped_and_others_still_answered() {
    let t = cpu_thread(8, 1 << 20);
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
        Config {
            queue_size: 1,
            batch_bytes: 1 << 20,
            poll: Duration::ZERO,
        },
        Kernels::Unavailable("libnvrtc not found".into()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let logs: Vec<String> = t
        .drain()
        .into_iter()
        .filter_map(|e| {
            if let Event::Log(_, m) = e {
                Some(m)
            } else {
                None
            }
        })
        .collect();
    assert!(
        logs.iter()
            .any(|m| m.contains("no usable GPU") && m.contains("libnvrtc")),
        "{logs:?}"
    );
}

#[test]
fn a_full_queue_hands_the_job_back() {
    let (tx, _rx) = bounded::<Job>(1);
    let t = GpuThread {
        jobs: Some(tx),
        events: unbounded().1,
        notifier: Arc::new(Notifier::new().unwrap()),
        stop: Arc::default(),
        stats: Arc::default(),
        handle: None,
    };
    t.submit(job(1, Op::Echo, b"", Batching::default()))
        .unwrap();
    assert!(matches!(
        t.submit(job(2, Op::Echo, b"", Batching::default())),
        Err(TrySendError::Full(_))
    ));
}
