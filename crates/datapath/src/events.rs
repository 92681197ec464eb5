//! Verdict and drop events from the `sigil_events` ring buffer, parsed and read asynchronously.
//!
//! The datapath emits one event per dropped packet, one for the first packet of each allowed
//! connection, and one for its first reply; established traffic emits nothing. A flood of
//! denied packets therefore produces one event each: when the reader falls behind, the ring
//! buffer (1 MiB, about 14 000 events) fills and further events are counted as lost
//! ([`crate::Counters::lost_events`]) instead of slowing the datapath.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use aya::maps::{Map, MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::abi::EVENT_SIZE;
use crate::error::DatapathError;
use crate::maps::MAP_EVENTS;
use crate::policy::{
    DROP_AUTH_REQUIRED, DROP_FRAG_NOT_FOUND, DROP_INVALID, DROP_INVALID_EXTHDR, DROP_INVALID_SIP,
    DROP_POLICY_DENIED, DROP_POLICY_DENY, Direction,
};

/// The datapath's verdict on a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Allowed by policy (original direction).
    Allowed,
    /// Dropped.
    Dropped,
    /// Allowed as a reply of a tracked connection.
    AllowedReply,
}

impl Verdict {
    /// The byte the datapath uses.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Allowed => 0,
            Self::Dropped => 1,
            Self::AllowedReply => 2,
        }
    }

    /// Parses the datapath's byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Allowed),
            1 => Some(Self::Dropped),
            2 => Some(Self::AllowedReply),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Dropped => "dropped",
            Self::AllowedReply => "allowed-reply",
        }
    }
}

/// Cilium's name of a drop reason code.
pub fn drop_reason_name(code: u32) -> &'static str {
    match code {
        0 => "",
        DROP_INVALID_SIP => "invalid source ip",
        DROP_INVALID => "invalid packet",
        DROP_INVALID_EXTHDR => "invalid ipv6 extension header",
        DROP_FRAG_NOT_FOUND => "fragment not found",
        DROP_POLICY_DENIED => "policy denied",
        DROP_POLICY_DENY => "policy deny",
        DROP_AUTH_REQUIRED => "auth required",
        _ => "unknown",
    }
}

/// One event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_BOOTTIME nanoseconds.
    pub ts_ns: u64,
    /// Endpoint (host veth ifindex).
    pub endpoint_id: u32,
    /// Identity of the source address.
    pub src_identity: u32,
    /// Identity of the destination address.
    pub dst_identity: u32,
    /// IP protocol.
    pub protocol: u8,
    /// Direction relative to the endpoint.
    pub direction: Direction,
    /// Verdict.
    pub verdict: Verdict,
    /// Source address.
    pub saddr: IpAddr,
    /// Destination address.
    pub daddr: IpAddr,
    /// Source port (0 without ports).
    pub sport: u16,
    /// Destination port (0 without ports).
    pub dport: u16,
    /// The drop reason (132, 133, 134, 156, 175, 181 or 189) when dropped, else 0.
    pub drop_reason: u32,
    /// Cookie of the deciding policy entry (0 when none matched).
    pub rule_cookie: u32,
}

impl Event {
    /// Parses a ring-buffer record.
    pub fn parse(b: &[u8]) -> Result<Self, DatapathError> {
        if b.len() < EVENT_SIZE {
            return Err(DatapathError::ShortEvent {
                len: b.len(),
                want: EVENT_SIZE,
            });
        }
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[0..8]);
        let family = b[20];
        let direction = Direction::from_u8(b[22])
            .ok_or_else(|| DatapathError::invalid("event direction", b[22], "must be 0 or 1"))?;
        let verdict = Verdict::from_u8(b[23])
            .ok_or_else(|| DatapathError::invalid("event verdict", b[23], "must be 0, 1 or 2"))?;
        let mut saddr = [0u8; 16];
        saddr.copy_from_slice(&b[28..44]);
        let mut daddr = [0u8; 16];
        daddr.copy_from_slice(&b[44..60]);
        Ok(Self {
            ts_ns: u64::from_ne_bytes(ts),
            endpoint_id: u32_at(8),
            src_identity: u32_at(12),
            dst_identity: u32_at(16),
            protocol: b[21],
            direction,
            verdict,
            sport: u16_at(24),
            dport: u16_at(26),
            saddr: addr_from(family, &saddr),
            daddr: addr_from(family, &daddr),
            drop_reason: u32_at(60),
            rule_cookie: u32_at(64),
        })
    }
}

pub(crate) fn addr_from(family: u8, b: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*b))
    }
}

/// Reads events from the pinned ring buffer.
///
/// A ring buffer has one consumer position: two readers on the same pin split the events
/// between them, so run one reader and fan out in user space.
pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    /// Opens `sigil_events` under `pin_dir`; must be called inside a tokio runtime.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let path = pin_dir.join(MAP_EVENTS);
        let data =
            MapData::from_pin(&path).map_err(|e| DatapathError::map(MAP_EVENTS, "open pin", e))?;
        let map =
            Map::from_map_data(data).map_err(|e| DatapathError::map(MAP_EVENTS, "open pin", e))?;
        let ring = RingBuf::try_from(map).map_err(|e| DatapathError::map(MAP_EVENTS, "open", e))?;
        let context = format!("registering {} with tokio", path.display());
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(DatapathError::io(
                context,
                std::io::Error::other("no tokio runtime is running"),
            ));
        }
        // SAFETY: the RingBuf owns its map fd (in MapData) for its whole life and as_raw_fd
        // always returns that fd; the AsyncFd owns the RingBuf, so the fd outlives the
        // registration.
        #[allow(unsafe_code)]
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| DatapathError::io(context, e.into()))?;
        Ok(Self { ring })
    }

    /// The next event, waiting for one.
    pub async fn next(&mut self) -> Result<Event, DatapathError> {
        loop {
            if let Some(ev) = self.try_next()? {
                return Ok(ev);
            }
            let mut guard = self
                .ring
                .readable_mut()
                .await
                .map_err(|e| DatapathError::io("waiting on the event ring buffer", e))?;
            // Re-check before sleeping again: an event may have landed between the empty read
            // and the readiness registration.
            if let Some(item) = guard.get_inner_mut().next() {
                return Event::parse(&item);
            }
            guard.clear_ready();
        }
    }

    /// The next event if one is queued, without waiting.
    pub fn try_next(&mut self) -> Result<Option<Event>, DatapathError> {
        match self.ring.get_mut().next() {
            Some(item) => Event::parse(&item).map(Some),
            None => Ok(None),
        }
    }
}
