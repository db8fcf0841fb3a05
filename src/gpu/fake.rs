//! A device without a GPU, for the tests and the fault-injection build: it runs each
//! batch through the op's CPU version of its batched GPU path (`Target::Host`: the same
//! output layout),
//! reports slots done over the same kind of channel, sizes its buffers with the same
//! policy, and can fail the way a real device fails (`faults.rs`).

use std::cell::Cell;

use crossbeam_channel::{unbounded, Receiver, Sender};

use super::buffers::Held;
use super::compile::Compiled;
use super::device::{align_desc, Device, DeviceInfo, Loader, Memory, SLOTS};
use super::GpuError;
use crate::faults::KernelFault;
use crate::ops::{Layout, Target};

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Idle,
    Done,
    /// A kernel touched an illegal address before this slot's batch.
    Faulted,
    /// A kernel that never ends runs before this slot's batch.
    Hung,
}

struct Slot {
    input: Held<Vec<u8>>,
    output: Held<Vec<u8>>,
    desc_len: usize,
    out_len: usize,
    state: SlotState,
    pending: Option<KernelFault>,
}

pub struct FakeDevice {
    info: DeviceInfo,
    slots: Vec<Slot>,
    tx: Sender<usize>,
    rx: Receiver<usize>,
    pinned_limit: usize,
    /// Once a fault is seen, the whole context is gone, as on a real device (where the
    /// error shows when the stream is next looked at, not when the kernel is queued).
    poisoned: Cell<bool>,
}

impl FakeDevice {
    /// The test device standing for device `ordinal`, its contexts shared through MPS or
    /// not as `mps` says.
    pub fn new(ordinal: usize, mps: bool, pinned_limit: usize) -> FakeDevice {
        let (tx, rx) = unbounded();
        FakeDevice {
            info: DeviceInfo {
                ordinal,
                name: "fake device (fault injection)".into(),
                compute_capability: (0, 0),
                total_mem: 0,
                mps: Some(mps),
            },
            slots: (0..SLOTS)
                .map(|_| Slot {
                    input: Held::default(),
                    output: Held::default(),
                    desc_len: 0,
                    out_len: 0,
                    state: SlotState::Idle,
                    pending: None,
                })
                .collect(),
            tx,
            rx,
            pinned_limit,
            poisoned: Cell::new(false),
        }
    }

    fn lost(&self) -> GpuError {
        GpuError::Lost(
            "waiting for a batch: CUDA_ERROR_ILLEGAL_ADDRESS (injected on the fake device)".into(),
        )
    }

    fn budget(&self) -> usize {
        self.pinned_limit.saturating_sub(self.memory().pinned)
    }
}

fn over(cap: usize) -> GpuError {
    GpuError::OutOfMemory(format!(
        "staging a batch: {} MiB more pinned memory would pass gpu_pinned_limit",
        cap >> 20
    ))
}

impl Device for FakeDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn done(&self) -> &Receiver<usize> {
        &self.rx
    }

    fn stage(
        &mut self,
        slot: usize,
        desc_len: usize,
        data_len: usize,
    ) -> Result<(&mut [u8], &mut [u8]), GpuError> {
        let budget = self.budget();
        let s = &mut self.slots[slot];
        s.desc_len = align_desc(desc_len);
        let total = s.desc_len + data_len;
        let buf = s
            .input
            .ensure(total, Some(budget), over, |cap| Ok(vec![0u8; cap]))?;
        let (desc, data) = buf[..total].split_at_mut(s.desc_len);
        Ok((&mut desc[..desc_len], data))
    }

    fn launch(
        &mut self,
        slot: usize,
        layout: &Layout,
        run: &mut dyn FnMut(Target) -> Result<(), GpuError>,
    ) -> Result<(), GpuError> {
        if self.poisoned.get() {
            return Err(self.lost());
        }
        let budget = self.budget();
        let out_len = layout.out_len;
        let s = &mut self.slots[slot];
        s.out_len = out_len;
        s.output
            .ensure(out_len, Some(budget), over, |cap| Ok(vec![0u8; cap]))?;
        let input = s.input.buf.as_ref().expect("staged");
        let (desc, rest) = input.split_at(s.desc_len);
        let out = &mut s.output.buf.as_mut().expect("allocated")[..out_len];
        run(Target::Host {
            desc,
            data: &rest[..layout.data_len],
            out,
        })?;
        match s.pending.take() {
            Some(KernelFault::IllegalAddress) => {
                s.state = SlotState::Faulted;
                // A real device's callback may or may not run after a fault.
                let _ = self.tx.send(slot);
            }
            Some(KernelFault::Hang) => s.state = SlotState::Hung,
            None => {
                s.state = SlotState::Done;
                let _ = self.tx.send(slot);
            }
        }
        Ok(())
    }

    fn finished(&self, slot: usize) -> Result<bool, GpuError> {
        match self.slots[slot].state {
            _ if self.poisoned.get() => Err(self.lost()),
            SlotState::Faulted => {
                self.poisoned.set(true);
                Err(self.lost())
            }
            SlotState::Hung => Ok(false),
            SlotState::Idle | SlotState::Done => Ok(true),
        }
    }

    fn output(&self, slot: usize) -> Result<&[u8], GpuError> {
        let s = &self.slots[slot];
        Ok(s.output.buf.as_deref().map_or(&[][..], |b| &b[..s.out_len]))
    }

    fn trim(&mut self, slot: usize) -> usize {
        let s = &mut self.slots[slot];
        s.input.trim() + s.output.trim()
    }

    fn memory(&self) -> Memory {
        let pinned = self
            .slots
            .iter()
            .map(|s| s.input.capacity() + s.output.capacity())
            .sum();
        Memory { pinned, device: 0 }
    }

    fn quiesce(&self) {}

    fn loader<'a>(&'a self, _compiled: &'a Compiled) -> Loader<'a> {
        Loader::Host
    }

    fn abandon(self: Box<Self>) {
        std::mem::forget(self);
    }

    fn inject(&mut self, slot: usize, fault: KernelFault) -> Result<(), GpuError> {
        self.slots[slot].pending = Some(fault);
        Ok(())
    }
}
