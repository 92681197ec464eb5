//! Verdict and drop events from the `sigil_events` ring buffer, parsed and read asynchronously.
//!
//! The datapath emits one event per dropped packet, one for the first packet of each allowed
//! connection, and one for its first reply; established traffic emits nothing. A flood of
//! denied packets therefore produces one event each: when the reader falls behind, the ring
//! buffer (1 MiB, about 14 000 events) fills and further events are counted as lost
//! ([`crate::Counters::lost_events`]) instead of slowing the datapath.

use std::mem::size_of;
use std::net::IpAddr;
use std::path::Path;

use aya::maps::{Map, MapData, RingBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::abi::{EVENT_F_TUNNEL, EventRaw, read_record};
use crate::codes::{
    DROP_AUTH_REQUIRED, DROP_ENCAP_PROHIBITED, DROP_FRAG_NOT_FOUND, DROP_INVALID,
    DROP_INVALID_EXTHDR, DROP_INVALID_IDENTITY, DROP_INVALID_SIP, DROP_NO_LOCAL_ENDPOINT,
    DROP_NO_TUNNEL, DROP_NO_TUNNEL_KEY, DROP_POLICY_DENIED, DROP_POLICY_DENY, DROP_UNKNOWN_SENDER,
    Direction, Verdict, addr_from,
};
use crate::error::DatapathError;
use crate::maps::MAP_EVENTS;

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
        DROP_NO_TUNNEL_KEY => "error retrieving tunnel key",
        DROP_NO_LOCAL_ENDPOINT => "no matching local endpoint",
        DROP_NO_TUNNEL => "no tunnel endpoint",
        DROP_ENCAP_PROHIBITED => "encapsulation prohibited",
        DROP_INVALID_IDENTITY => "invalid identity",
        DROP_UNKNOWN_SENDER => "unknown sender",
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
    /// The drop reason (see [`drop_reason_name`]) when dropped, else 0.
    pub drop_reason: u32,
    /// Cookie of the deciding policy entry (0 when none matched).
    pub rule_cookie: u32,
    /// The packet came from another node through the tunnel (`src_identity` is then its
    /// VNI), or leaves through it (`src_identity` goes into the VNI). `endpoint_id` is the
    /// tunnel device's ifindex for drops at the tunnel device itself.
    pub via_tunnel: bool,
    /// The packet's TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, URG 0x20,
    /// ECE 0x40, CWR 0x80); 0 for other protocols.
    pub tcp_flags: u8,
    /// Whether the deciding allow entry requires authentication.
    pub auth_required: bool,
}

impl Event {
    /// Parses a ring-buffer record (`struct event` of `bpf/sigil.h`).
    pub fn parse(b: &[u8]) -> Result<Self, DatapathError> {
        let raw: EventRaw = read_record(b).ok_or(DatapathError::ShortEvent {
            len: b.len(),
            want: size_of::<EventRaw>(),
        })?;
        let direction = Direction::from_u8(raw.direction).ok_or_else(|| {
            DatapathError::invalid("event direction", raw.direction, "must be 0 or 1")
        })?;
        let verdict = Verdict::from_u8(raw.verdict).ok_or_else(|| {
            DatapathError::invalid("event verdict", raw.verdict, "must be 0, 1 or 2")
        })?;
        Ok(Self {
            ts_ns: raw.ts_ns,
            endpoint_id: raw.endpoint_id,
            src_identity: raw.src_identity,
            dst_identity: raw.dst_identity,
            protocol: raw.protocol,
            direction,
            verdict,
            sport: raw.sport,
            dport: raw.dport,
            saddr: addr_from(raw.family, &raw.saddr),
            daddr: addr_from(raw.family, &raw.daddr),
            drop_reason: raw.drop_reason,
            rule_cookie: raw.rule_cookie,
            via_tunnel: raw.flags & EVENT_F_TUNNEL != 0,
            tcp_flags: raw.tcp_flags,
            auth_required: raw.auth_required != 0,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::c;
    use crate::codes::PROTO_TCP;

    /// Writes `value` where clang put C field `name` of `struct event`.
    fn put(b: &mut [u8], name: &str, value: &[u8]) {
        let f = c::EVENT.field(name).expect("struct event field");
        assert_eq!(f.size, value.len(), "{name}");
        b[f.offset..f.offset + f.size].copy_from_slice(value);
    }

    /// A record laid out by the C header's offsets (not the Rust mirror's) decodes to the
    /// values written.
    #[test]
    fn events_parse_from_the_c_layout() {
        let mut b = vec![0u8; c::EVENT.size];
        put(&mut b, "ts_ns", &123u64.to_ne_bytes());
        put(&mut b, "endpoint_id", &7u32.to_ne_bytes());
        put(&mut b, "src_identity", &1001u32.to_ne_bytes());
        put(&mut b, "dst_identity", &1002u32.to_ne_bytes());
        put(&mut b, "family", &[4]);
        put(&mut b, "protocol", &[PROTO_TCP]);
        put(&mut b, "direction", &[1]);
        put(&mut b, "verdict", &[1]);
        put(&mut b, "sport", &40000u16.to_ne_bytes());
        put(&mut b, "dport", &8080u16.to_ne_bytes());
        put(
            &mut b,
            "saddr",
            &[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        put(
            &mut b,
            "daddr",
            &[10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        put(&mut b, "drop_reason", &DROP_POLICY_DENIED.to_ne_bytes());
        put(&mut b, "rule_cookie", &9u32.to_ne_bytes());
        put(&mut b, "tcp_flags", &[0x12]);
        put(&mut b, "auth_required", &[1]);
        let ev = Event::parse(&b).expect("parse");
        assert!(!ev.via_tunnel);
        put(&mut b, "flags", &1u32.to_ne_bytes());
        let ev = Event::parse(&b).expect("parse");
        assert!(ev.via_tunnel);
        assert_eq!(
            (ev.ts_ns, ev.endpoint_id, ev.src_identity, ev.dst_identity),
            (123, 7, 1001, 1002)
        );
        assert_eq!(ev.protocol, PROTO_TCP);
        assert_eq!(
            (ev.direction, ev.verdict),
            (Direction::Egress, Verdict::Dropped)
        );
        assert_eq!(
            (ev.sport, ev.dport, ev.drop_reason, ev.rule_cookie),
            (40000, 8080, 133, 9)
        );
        assert_eq!((ev.tcp_flags, ev.auth_required), (0x12, true));
        assert_eq!(ev.saddr.to_string(), "10.0.0.1");
        assert_eq!(ev.daddr.to_string(), "10.0.0.2");

        put(&mut b, "family", &[6]);
        let ev = Event::parse(&b).expect("parse v6");
        assert_eq!(ev.saddr.to_string(), "a00:1::");

        let err = Event::parse(&b[..40]).expect_err("short");
        assert!(err.to_string().contains("40 bytes"), "{err}");
        put(&mut b, "verdict", &[9]);
        let err = Event::parse(&b).expect_err("bad verdict");
        assert!(err.to_string().contains("verdict"), "{err}");
        put(&mut b, "verdict", &[1]);
        put(&mut b, "direction", &[2]);
        let err = Event::parse(&b).expect_err("bad direction");
        assert!(err.to_string().contains("direction"), "{err}");
    }
}
