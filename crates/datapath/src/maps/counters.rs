//! Per-endpoint, per-verdict packet and byte counters, summed over CPUs.

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};

use super::{MAP_COUNTERS, MAP_EV_LOST, is_not_found};
use crate::abi::{CounterKeyRaw, CounterValueRaw};
use crate::codes::Verdict;
use crate::error::DatapathError;

/// Packets and bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    /// Packet count.
    pub packets: u64,
    /// Byte count (skb length, including the Ethernet header).
    pub bytes: u64,
}

/// The `sigil_counters` per-CPU hash and the lost-event counter.
pub struct Counters {
    map: PerCpuHashMap<MapData, CounterKeyRaw, CounterValueRaw>,
    lost: PerCpuArray<MapData, u64>,
}

impl Counters {
    pub(crate) fn new(
        map: PerCpuHashMap<MapData, CounterKeyRaw, CounterValueRaw>,
        lost: PerCpuArray<MapData, u64>,
    ) -> Self {
        Self { map, lost }
    }

    /// The counter of one endpoint and verdict (zero when nothing was counted).
    pub fn get(&self, endpoint_id: u32, verdict: Verdict) -> Result<Counter, DatapathError> {
        let key = key(endpoint_id, verdict);
        match self.map.get(&key, 0) {
            Ok(per_cpu) => Ok(sum(per_cpu.iter())),
            Err(e) if is_not_found(&e) => Ok(Counter::default()),
            Err(e) => Err(DatapathError::map(MAP_COUNTERS, "lookup", e)),
        }
    }

    /// Every (endpoint, verdict, counter).
    pub fn all(&self) -> Result<Vec<(u32, Verdict, Counter)>, DatapathError> {
        let mut out = Vec::new();
        for item in self.map.iter() {
            let (k, per_cpu) = item.map_err(|e| DatapathError::map(MAP_COUNTERS, "scan", e))?;
            let Some(verdict) = Verdict::from_u8(k.verdict) else {
                continue;
            };
            out.push((k.endpoint_id, verdict, sum(per_cpu.iter())));
        }
        Ok(out)
    }

    /// Drops an endpoint's counters.
    pub fn remove_endpoint(&mut self, endpoint_id: u32) -> Result<(), DatapathError> {
        for verdict in [Verdict::Allowed, Verdict::Dropped, Verdict::AllowedReply] {
            match self.map.remove(&key(endpoint_id, verdict)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(DatapathError::map(MAP_COUNTERS, "delete", e)),
            }
        }
        Ok(())
    }

    /// Events dropped because the ring buffer was full (summed over CPUs).
    pub fn lost_events(&self) -> Result<u64, DatapathError> {
        let per_cpu = self
            .lost
            .get(&0, 0)
            .map_err(|e| DatapathError::map(MAP_EV_LOST, "lookup", e))?;
        Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
    }
}

fn key(endpoint_id: u32, verdict: Verdict) -> CounterKeyRaw {
    CounterKeyRaw {
        endpoint_id,
        verdict: verdict.as_u8(),
        pad: [0; 3],
    }
}

fn sum<'a>(values: impl Iterator<Item = &'a CounterValueRaw>) -> Counter {
    values.fold(Counter::default(), |acc, v| Counter {
        packets: acc.packets.wrapping_add(v.packets),
        bytes: acc.bytes.wrapping_add(v.bytes),
    })
}
