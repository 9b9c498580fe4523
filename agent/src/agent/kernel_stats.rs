//! Counters the probes keep in kernel maps, read at scrape time: the netlink recv latency
//! histogram and the events dropped inside the kernel.

use std::{fmt, sync::Mutex};

use aya::maps::{MapData, PerCpuArray};
use lastgasp_common::{Drop, LATENCY_BUCKETS, LatencyHistogram, NETLINK_PROTOCOLS};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter},
};

use super::netlink::protocol_name;
use crate::metrics::{ProtocolLabels, ReasonLabels};

/// Histogram bounds exported, in log2(ns): 2^10 ns (~1 µs) to 2^36 ns (~69 s), ×4 apart.
const EXPORTED_BOUNDS_LOG2: std::ops::RangeInclusive<u32> = 10..=36;

pub struct KernelStats {
    pub latency: Mutex<PerCpuArray<MapData, LatencyHistogram>>,
    pub drops: Mutex<PerCpuArray<MapData, u64>>,
}

impl fmt::Debug for KernelStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KernelStats")
    }
}

/// The kernel's per-CPU log2 buckets summed over CPUs, as cumulative Prometheus buckets.
pub fn cumulative_buckets(per_cpu: &[LatencyHistogram]) -> (Vec<(f64, u64)>, u64, f64) {
    let mut counts = [0u64; LATENCY_BUCKETS];
    let mut sum_ns = 0u64;
    for histogram in per_cpu {
        for (total, count) in counts.iter_mut().zip(histogram.buckets) {
            *total += count;
        }
        sum_ns = sum_ns.wrapping_add(histogram.sum_ns);
    }
    // Bucket b counts durations in [2^b, 2^(b+1)) ns, so it lies under any bound 2^e with e > b.
    let buckets = EXPORTED_BOUNDS_LOG2
        .step_by(2)
        .map(|exp| {
            let below: u64 = counts[..(exp as usize).min(LATENCY_BUCKETS)].iter().sum();
            ((1u64 << exp) as f64 / 1e9, below)
        })
        .chain(std::iter::once((f64::INFINITY, counts.iter().sum())))
        .collect();
    let count = counts.iter().sum();
    (buckets, count, sum_ns as f64 / 1e9)
}

impl Collector for KernelStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        {
            let latency = self.latency.lock().map_err(|_| fmt::Error)?;
            let mut family = encoder.encode_descriptor(
                "netlink_recv_duration_seconds",
                "Duration of completed netlink recvfrom/recvmsg/recvmmsg calls, measured in the kernel",
                None,
                MetricType::Histogram,
            )?;
            for protocol in 0..NETLINK_PROTOCOLS as u32 {
                let Ok(per_cpu) = latency.get(&protocol, 0) else {
                    continue;
                };
                let (buckets, count, sum) = cumulative_buckets(&per_cpu);
                if count == 0 {
                    continue;
                }
                let labels = ProtocolLabels {
                    protocol: protocol_name(protocol as i32).into(),
                };
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        let drops = self.drops.lock().map_err(|_| fmt::Error)?;
        let mut family = encoder.encode_descriptor(
            "ebpf_dropped_events",
            "Events the eBPF programs could not deliver: full ring buffers or full maps",
            None,
            MetricType::Counter,
        )?;
        for kind in Drop::ALL {
            let total: u64 = drops
                .get(&(kind as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            let labels = ReasonLabels {
                reason: drop_reason(kind).into(),
            };
            ConstCounter::new(total).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn drop_reason(kind: Drop) -> &'static str {
    match kind {
        Drop::EventsRingFull => "events_ring_full",
        Drop::KernelLogRingFull => "kernel_log_ring_full",
        Drop::RecvSlotBusy => "recv_slot_busy",
        Drop::CniCallsFull => "cni_calls_map_full",
        Drop::TerminationsRingFull => "terminations_ring_full",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_summed_over_cpus() {
        let mut cpu0 = LatencyHistogram {
            buckets: [0; LATENCY_BUCKETS],
            sum_ns: 3_000,
        };
        cpu0.buckets[10] = 2; // [1024, 2048) ns
        let mut cpu1 = cpu0;
        cpu1.buckets[10] = 1;
        cpu1.buckets[40] = 1; // ~1100 s: only +Inf
        let (buckets, count, sum) = cumulative_buckets(&[cpu0, cpu1]);
        assert_eq!(count, 4);
        assert!((sum - 6e-6).abs() < 1e-12);
        assert_eq!(buckets[0], (1024e-9, 0));
        assert_eq!(buckets[1], (4096e-9, 3));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 4)));
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1));
    }
}
