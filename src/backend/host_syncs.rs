//! A count of the calls that make the host wait for the device: reads of values back
//! (`to_vec_*`, `take_vec_f32`, `sum_squares`) and explicit synchronizes. On a GPU each one
//! drains the queue, so the hot path should make few; the CPU counts the same calls, so a
//! test can bound a training step's count without a GPU.

use std::cell::Cell;

thread_local! {
    static HOST_SYNCS: Cell<u64> = const { Cell::new(0) };
}

/// Host syncs this thread has made so far, through any backend.
pub fn host_syncs() -> u64 {
    HOST_SYNCS.with(Cell::get)
}

/// Counts one host sync on this thread.
pub(crate) fn count_host_sync() {
    HOST_SYNCS.with(|c| c.set(c.get() + 1));
}
