//! What the pager did: counters, an install-latency histogram, and a JSON snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Who touched the page a fault was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOrigin {
    /// A thread registered as a vCPU.
    Vcpu,
    /// Any other thread (the VMM itself, a device, a benchmark thread).
    OtherThread,
}

/// Live counters, updated by the fault and background threads.
#[derive(Debug)]
pub struct Counters {
    pub faults_vcpu: AtomicU64,
    pub faults_other: AtomicU64,
    /// Faults for a page that was already present or being installed (joined, not refetched).
    pub faults_joined: AtomicU64,
    pub pages_installed_urgent: AtomicU64,
    pub pages_installed_background: AtomicU64,
    pub zero_pages: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub install_ioctls: AtomicU64,
    pub eexist: AtomicU64,
    pub eagain: AtomicU64,
    pub pages_removed: AtomicU64,
    pub source_errors: AtomicU64,
    pub pages_poisoned: AtomicU64,
    pub max_event_batch: AtomicU64,
    pub background_pending_pages: AtomicU64,
    /// Pages queued ahead of touchers by the predictor.
    pub pages_predicted: AtomicU64,
    latency_us: LatencyRecorder,
}

/// Durations (recorded in whole microseconds, at least 1) from any thread, and their summary.
#[derive(Debug)]
pub(crate) struct LatencyRecorder(Mutex<Histogram<u64>>);

impl LatencyRecorder {
    /// A recorder of durations up to `max_us` (longer ones count as that).
    pub(crate) fn new(max_us: u64) -> Self {
        LatencyRecorder(Mutex::new(
            Histogram::new_with_bounds(1, max_us, 3).expect("valid bounds"),
        ))
    }

    pub(crate) fn record(&self, took: Duration) {
        let us = (took.as_nanos() as u64).div_ceil(1000).max(1);
        self.histogram().saturating_record(us);
    }

    /// Forgets what was recorded.
    pub(crate) fn reset(&self) {
        self.histogram().reset();
    }

    /// What was recorded: count, p50, p90, p99, max (all 0 when nothing was).
    pub(crate) fn summary(&self) -> Latency {
        let hist = self.histogram();
        let q = |quantile: f64| {
            if hist.is_empty() {
                0
            } else {
                hist.value_at_quantile(quantile)
            }
        };
        Latency {
            samples: hist.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: hist.max(),
        }
    }

    fn histogram(&self) -> std::sync::MutexGuard<'_, Histogram<u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            faults_vcpu: AtomicU64::new(0),
            faults_other: AtomicU64::new(0),
            faults_joined: AtomicU64::new(0),
            pages_installed_urgent: AtomicU64::new(0),
            pages_installed_background: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            install_ioctls: AtomicU64::new(0),
            eexist: AtomicU64::new(0),
            eagain: AtomicU64::new(0),
            pages_removed: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            pages_poisoned: AtomicU64::new(0),
            max_event_batch: AtomicU64::new(0),
            background_pending_pages: AtomicU64::new(0),
            pages_predicted: AtomicU64::new(0),
            latency_us: LatencyRecorder::new(60_000_000),
        }
    }
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn record_fault(&self, origin: FaultOrigin, service: Duration) {
        match origin {
            FaultOrigin::Vcpu => Self::add(&self.faults_vcpu, 1),
            FaultOrigin::OtherThread => Self::add(&self.faults_other, 1),
        }
        self.latency_us.record(service);
    }

    pub(crate) fn note_batch(&self, size: u64) {
        self.max_event_batch.fetch_max(size, Ordering::Relaxed);
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self, regions: Vec<RegionStats>) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let guest_bytes: u64 = regions.iter().map(|r| r.bytes).sum();
        let map_bytes: u64 = regions.iter().map(|r| r.presence_map_bytes).sum();
        Stats {
            faults_vcpu: get(&self.faults_vcpu),
            faults_other: get(&self.faults_other),
            faults_joined: get(&self.faults_joined),
            pages_installed_urgent: get(&self.pages_installed_urgent),
            pages_installed_background: get(&self.pages_installed_background),
            zero_pages: get(&self.zero_pages),
            bytes_copied: get(&self.bytes_copied),
            install_ioctls: get(&self.install_ioctls),
            eexist: get(&self.eexist),
            eagain: get(&self.eagain),
            pages_removed: get(&self.pages_removed),
            source_errors: get(&self.source_errors),
            pages_poisoned: get(&self.pages_poisoned),
            max_event_batch: get(&self.max_event_batch),
            background_pending_pages: get(&self.background_pending_pages),
            pages_predicted: get(&self.pages_predicted),
            install_latency_us: self.latency_us.summary(),
            presence_map_bytes_per_gib: (map_bytes * (1 << 30))
                .checked_div(guest_bytes)
                .unwrap_or(0),
            regions,
        }
    }
}

/// Fault-service latency, in microseconds: from reading the fault to the page being installed.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

/// Per-region facts.
#[derive(Debug, Clone, Serialize)]
pub struct RegionStats {
    pub start: u64,
    pub bytes: u64,
    pub source: String,
    pub pages: u64,
    pub pages_present: u64,
    pub presence_map_bytes: u64,
}

/// A snapshot of the pager's counters, serialisable as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub faults_vcpu: u64,
    pub faults_other: u64,
    pub faults_joined: u64,
    pub pages_installed_urgent: u64,
    pub pages_installed_background: u64,
    pub zero_pages: u64,
    pub bytes_copied: u64,
    pub install_ioctls: u64,
    pub eexist: u64,
    pub eagain: u64,
    pub pages_removed: u64,
    pub source_errors: u64,
    pub pages_poisoned: u64,
    pub max_event_batch: u64,
    pub background_pending_pages: u64,
    /// Pages queued ahead of touchers by the predictor.
    pub pages_predicted: u64,
    pub install_latency_us: Latency,
    /// Memory the presence map (present, in-flight and discarded bits) takes per GiB of RAM.
    pub presence_map_bytes_per_gib: u64,
    pub regions: Vec<RegionStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_counts_and_quantiles() {
        let counters = Counters::default();
        for us in [10, 20, 30, 40, 1000] {
            counters.record_fault(FaultOrigin::Vcpu, Duration::from_micros(us));
        }
        counters.record_fault(FaultOrigin::OtherThread, Duration::from_micros(15));
        counters.note_batch(3);
        counters.note_batch(2);
        let region = RegionStats {
            start: 0,
            bytes: 1 << 30,
            source: "zero".into(),
            pages: 262_144,
            pages_present: 0,
            presence_map_bytes: 98_304,
        };
        let stats = counters.snapshot(vec![region]);
        assert_eq!((stats.faults_vcpu, stats.faults_other), (5, 1));
        assert_eq!(stats.install_latency_us.samples, 6);
        assert_eq!(stats.install_latency_us.p50, 20);
        assert!(stats.install_latency_us.max >= 1000);
        assert_eq!(stats.max_event_batch, 3);
        assert_eq!(stats.presence_map_bytes_per_gib, 98_304);
    }
}
