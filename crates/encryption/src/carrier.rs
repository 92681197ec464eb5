//! The encrypted carrier's data path in user space: VXLAN packets the kernel routes into the
//! TUN device (addressed to a peer node's overlay address) are sealed for that peer's session
//! and sent over UDP to its underlay address; sealed packets from peers are opened, checked and
//! written back into the TUN device, where the kernel hands them to the VXLAN device.
//!
//! Checks on receive, each with its own counter: the packet must parse, name a session of ours,
//! authenticate, not be a replay, come from the underlay address the session was keyed with,
//! carry an inner IPv4 packet from that peer's overlay address to UDP 8472 (VXLAN), and carry a
//! VNI (source identity) that the peer node hosts ([`IdentityCheck`]). So a forged VNI, a
//! spoofed underlay packet or a reused IP with a stale cache gets nothing.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;

use crate::handshake::Established;
use crate::session::{DropReason, Header, OVERHEAD};
use crate::tun::Tun;

/// The carrier's UDP port (beside VXLAN's 8472).
pub const DEFAULT_UDP_PORT: u16 = 8473;
/// VXLAN's port inside the protection.
pub const VXLAN_PORT: u16 = 8472;
/// Bytes a sealed packet takes on the underlay beyond the VXLAN packet it carries: the outer
/// IPv4 and UDP headers and the carrier's header and tag. The VXLAN device's MTU must leave room
/// for them, or every full-sized packet is fragmented on the underlay.
pub const UNDERLAY_OVERHEAD: u32 = 20 + 8 + OVERHEAD as u32;
/// Largest packet read from the TUN device or the socket.
const MAX_PACKET: usize = 65_535;

/// Whether a peer node may send traffic as a source identity (the registry's view).
pub trait IdentityCheck: Send + Sync + 'static {
    /// True when the node at underlay address `node` hosts endpoints of `identity`, or
    /// `identity` is the node's own (remote-node).
    fn peer_hosts(&self, node: IpAddr, identity: u32) -> bool;
}

/// A peer's counters.
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// Packets sealed and sent.
    pub tx_packets: AtomicU64,
    /// Packets opened and delivered.
    pub rx_packets: AtomicU64,
    /// Bytes sealed and sent (the VXLAN packets, before sealing).
    pub tx_bytes: AtomicU64,
    /// Bytes opened and delivered (the VXLAN packets, after opening).
    pub rx_bytes: AtomicU64,
    /// Dropped: replayed or older than the window.
    pub replayed: AtomicU64,
    /// Dropped: failed authentication (forged, truncated, bit-flipped).
    pub unauthenticated: AtomicU64,
    /// Dropped: malformed outer or inner packet, or not VXLAN from the peer's overlay address.
    pub malformed: AtomicU64,
    /// Dropped: authentic but from another underlay address than the session's peer.
    pub wrong_source: AtomicU64,
    /// Dropped: a VNI (source identity) the peer does not host.
    pub identity_not_hosted: AtomicU64,
}

/// A snapshot of [`PeerCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// See [`PeerCounters`].
    pub tx_packets: u64,
    /// See [`PeerCounters`].
    pub rx_packets: u64,
    /// See [`PeerCounters`].
    pub tx_bytes: u64,
    /// See [`PeerCounters`].
    pub rx_bytes: u64,
    /// See [`PeerCounters`].
    pub replayed: u64,
    /// See [`PeerCounters`].
    pub unauthenticated: u64,
    /// See [`PeerCounters`].
    pub malformed: u64,
    /// See [`PeerCounters`].
    pub wrong_source: u64,
    /// See [`PeerCounters`].
    pub identity_not_hosted: u64,
}

impl PeerCounters {
    fn snapshot(&self) -> PeerStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PeerStats {
            tx_packets: g(&self.tx_packets),
            rx_packets: g(&self.rx_packets),
            tx_bytes: g(&self.tx_bytes),
            rx_bytes: g(&self.rx_bytes),
            replayed: g(&self.replayed),
            unauthenticated: g(&self.unauthenticated),
            malformed: g(&self.malformed),
            wrong_source: g(&self.wrong_source),
            identity_not_hosted: g(&self.identity_not_hosted),
        }
    }

    fn count(&self, reason: DropReason) {
        let c = match reason {
            DropReason::Replayed => &self.replayed,
            DropReason::Unauthenticated => &self.unauthenticated,
            DropReason::Malformed | DropReason::UnknownSession => &self.malformed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A peer node and its current session.
pub struct Peer {
    /// Its underlay address and carrier port.
    pub underlay: SocketAddr,
    /// Its overlay address (the VXLAN remote the kernel routes into the TUN device).
    pub overlay: Ipv4Addr,
    session: Established,
    /// Unix seconds at which the session was keyed.
    pub keyed_unix: i64,
    counters: Arc<PeerCounters>,
}

#[derive(Default, Clone)]
struct Table {
    by_overlay: HashMap<Ipv4Addr, Arc<Peer>>,
    /// Current and previous session of each peer (a rekey does not drop packets in flight).
    by_index: HashMap<u32, Arc<Peer>>,
}

/// Drops that belong to no peer.
#[derive(Debug, Default)]
pub struct CarrierCounters {
    /// Packets naming no session of ours, or too short to name one.
    pub unknown_session: AtomicU64,
    /// Packets from the TUN device to an overlay address with no peer session.
    pub no_peer: AtomicU64,
}

/// The carrier of one node.
pub struct Carrier {
    tun: Tun,
    udp: UdpSocket,
    check: Arc<dyn IdentityCheck>,
    table: ArcSwap<Table>,
    /// Drops that belong to no peer.
    pub counters: CarrierCounters,
}

impl Carrier {
    /// A carrier over `tun` (addressed and routed by the caller) and `udp` (bound to the
    /// carrier port on the underlay).
    pub fn new(tun: Tun, udp: UdpSocket, check: Arc<dyn IdentityCheck>) -> Arc<Carrier> {
        Arc::new(Carrier {
            tun,
            udp,
            check,
            table: ArcSwap::from_pointee(Table::default()),
            counters: CarrierCounters::default(),
        })
    }

    /// Installs (or rekeys) the session with the peer at `underlay` / `overlay`; the previous
    /// session of that peer keeps receiving until the next rekey.
    pub fn set_peer(
        &self,
        underlay: SocketAddr,
        overlay: Ipv4Addr,
        session: Established,
        keyed_unix: i64,
    ) {
        let mut t = Table::clone(&self.table.load());
        let counters = t
            .by_overlay
            .get(&overlay)
            .map(|p| p.counters.clone())
            .unwrap_or_default();
        let peer = Arc::new(Peer {
            underlay,
            overlay,
            session,
            keyed_unix,
            counters,
        });
        let previous = t.by_overlay.insert(overlay, peer.clone());
        // Keep exactly the current and the previous session of this peer.
        t.by_index.retain(|_, p| {
            p.overlay != overlay || previous.as_ref().is_some_and(|q| Arc::ptr_eq(p, q))
        });
        t.by_index.insert(peer.session.local_index, peer);
        self.table.store(Arc::new(t));
    }

    /// Forgets a peer and its sessions: its packets are dropped from now on.
    pub fn remove_peer(&self, overlay: Ipv4Addr) {
        let mut t = Table::clone(&self.table.load());
        t.by_overlay.remove(&overlay);
        t.by_index.retain(|_, p| p.overlay != overlay);
        self.table.store(Arc::new(t));
    }

    /// The session expiry (unix seconds) of the peer at `overlay`, if it has a session.
    pub fn peer_expiry(&self, overlay: Ipv4Addr) -> Option<i64> {
        self.table
            .load()
            .by_overlay
            .get(&overlay)
            .map(|p| p.session.expires_unix)
    }

    /// Each peer's counters and key age.
    pub fn stats(&self) -> Vec<(Ipv4Addr, SocketAddr, i64, PeerStats)> {
        let t = self.table.load();
        let mut v: Vec<_> = t
            .by_overlay
            .values()
            .map(|p| (p.overlay, p.underlay, p.keyed_unix, p.counters.snapshot()))
            .collect();
        v.sort_by_key(|e| e.0);
        v
    }

    /// Runs both directions until a socket or the device fails.
    pub async fn run(self: Arc<Self>) -> std::io::Result<()> {
        let out = tokio::spawn(self.clone().outbound());
        let inb = self.inbound().await;
        out.abort();
        inb
    }

    async fn outbound(self: Arc<Self>) -> std::io::Result<()> {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut sealed = Vec::with_capacity(MAX_PACKET + OVERHEAD);
        loop {
            let n = self.tun.recv(&mut buf).await?;
            let pkt = &buf[..n];
            let Some(dst) = ipv4_dst(pkt) else {
                continue; // IPv6 and junk never leave through the carrier.
            };
            let Some(peer) = self.table.load().by_overlay.get(&dst).cloned() else {
                self.counters.no_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if peer.session.sender.seal(pkt, &mut sealed).is_err() {
                // Used up: the owner rekeys; until then nothing is sent in the clear.
                continue;
            }
            if self.udp.send_to(&sealed, peer.underlay).await.is_ok() {
                peer.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                peer.counters
                    .tx_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }

    async fn inbound(&self) -> std::io::Result<()> {
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let (n, from) = self.udp.recv_from(&mut buf).await?;
            let pkt = &mut buf[..n];
            let Some(peer) = Header::parse(pkt).ok().and_then(|h| {
                self.table
                    .load()
                    .by_index
                    .get(&h.receiver)
                    .cloned()
                    .map(|p| (h, p))
            }) else {
                self.counters
                    .unknown_session
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (header, peer) = peer;
            let plain = match peer.session.receiver.open(header, pkt) {
                Ok(p) => p,
                Err(reason) => {
                    peer.counters.count(reason);
                    continue;
                }
            };
            if from.ip() != peer.underlay.ip() {
                peer.counters.wrong_source.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match vxlan_vni(plain, peer.overlay) {
                None => {
                    peer.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Some(vni) if !self.check.peer_hosts(peer.underlay.ip(), vni) => {
                    peer.counters
                        .identity_not_hosted
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Some(_) => {}
            }
            let len = plain.len() as u64;
            if self.tun.send(plain).await.is_ok() {
                peer.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                peer.counters.rx_bytes.fetch_add(len, Ordering::Relaxed);
            }
        }
    }
}

fn ipv4_dst(pkt: &[u8]) -> Option<Ipv4Addr> {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]))
}

/// The VNI of an IPv4/UDP/VXLAN packet from `src` to port 8472, or `None` for anything else.
pub fn vxlan_vni(pkt: &[u8], src: Ipv4Addr) -> Option<u32> {
    let first = *pkt.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*pkt.get(2)?, *pkt.get(3)?]));
    if ihl < 20 || total != pkt.len() || *pkt.get(9)? != 17 {
        return None;
    }
    if Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]) != src {
        return None;
    }
    // Fragments carry no reliable UDP/VXLAN header: refused.
    let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
    if frag & 0x3fff != 0 {
        return None;
    }
    let udp = pkt.get(ihl..)?;
    if u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]) != VXLAN_PORT {
        return None;
    }
    let vx = udp.get(8..16)?;
    if vx[0] & 0x08 == 0 {
        return None;
    }
    Some(u32::from_be_bytes([0, vx[4], vx[5], vx[6]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(src: [u8; 4], dport: u16, vni: u32, frag: u16) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 8 + 8 + 4];
        let len = p.len() as u16;
        p[0] = 0x45;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&[100, 64, 0, 2]);
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[28] = 0x08;
        p[32..35].copy_from_slice(&vni.to_be_bytes()[1..]);
        p
    }

    #[test]
    fn only_vxlan_from_the_peers_overlay_address_yields_a_vni() {
        let peer = Ipv4Addr::new(100, 64, 0, 1);
        assert_eq!(
            vxlan_vni(&packet([100, 64, 0, 1], 8472, 70_000, 0), peer),
            Some(70_000)
        );
        assert_eq!(
            vxlan_vni(&packet([100, 64, 0, 9], 8472, 70_000, 0), peer),
            None,
            "other source"
        );
        assert_eq!(
            vxlan_vni(&packet([100, 64, 0, 1], 53, 70_000, 0), peer),
            None,
            "not VXLAN"
        );
        assert_eq!(
            vxlan_vni(&packet([100, 64, 0, 1], 8472, 70_000, 0x2000), peer),
            None,
            "fragment"
        );
        let p = packet([100, 64, 0, 1], 8472, 70_000, 0);
        for n in 0..p.len() {
            assert_eq!(vxlan_vni(&p[..n], peer), None, "truncated to {n}");
        }
    }
}
