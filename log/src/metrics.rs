//! Counters of the log, read by `status` and (later) the Prometheus endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-partition counters at this node.
#[derive(Debug, Default)]
pub struct PartitionMetrics {
    pub batches: AtomicU64,
    pub batched_records: AtomicU64,
    pub batched_bytes: AtomicU64,
    pub batch_records_max_seen: AtomicU64,
    /// Sum over batches of microseconds from proposal to commit-and-apply.
    pub commit_us_total: AtomicU64,
}

impl PartitionMetrics {
    pub fn observe_batch(&self, records: usize, bytes: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batched_records.fetch_add(records as u64, Ordering::Relaxed);
        self.batched_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.batch_records_max_seen
            .fetch_max(records as u64, Ordering::Relaxed);
    }
}

impl PartitionMetrics {
    pub fn observe_commit(&self, us: u64) {
        self.commit_us_total.fetch_add(us, Ordering::Relaxed);
    }
}
