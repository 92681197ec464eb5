//! One node pair's session: two AES-256-GCM keys (one per direction) with counter nonces, and
//! the packet format the carrier sends over UDP.
//!
//! ```text
//! 0      1      4              8                      16
//! | type | zero | receiver idx | counter (big endian) | ciphertext … | tag (16) |
//! ```
//!
//! The 16-byte header is the AEAD's associated data; the nonce is 4 zero bytes and the counter.
//! Each key is used by one sender only, with a counter that never repeats, so no nonce repeats
//! under a key; the receiver index names the receiver's session, so a new session after rekey
//! and the old one can run side by side.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroize;

use crate::replay::ReplayWindow;

/// Packet type of a data packet.
pub const TYPE_DATA: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 16;
/// Tag length.
pub const TAG_LEN: usize = 16;
/// Bytes the carrier adds to each packet.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// A session stops sending (and must be rekeyed) after this many packets; far below the
/// AES-GCM limit for one key.
pub const MAX_PACKETS: u64 = 1 << 48;
/// Key material a session needs from the handshake: two 32-byte keys.
pub const KEY_MATERIAL_LEN: usize = 64;

/// Why a received packet was dropped (each has its own counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum DropReason {
    /// Too short, wrong type or non-zero reserved bytes.
    #[error("malformed packet")]
    Malformed,
    /// The receiver index names no session of ours.
    #[error("no session for the receiver index")]
    UnknownSession,
    /// The tag did not verify (forged, truncated, bit-flipped, wrong key).
    #[error("packet failed authentication")]
    Unauthenticated,
    /// The counter was seen before or is older than the replay window.
    #[error("replayed packet")]
    Replayed,
}

/// The parsed header of a data packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The receiver's session index.
    pub receiver: u32,
    /// The sender's packet counter.
    pub counter: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = TYPE_DATA;
        h[4..8].copy_from_slice(&self.receiver.to_be_bytes());
        h[8..16].copy_from_slice(&self.counter.to_be_bytes());
        h
    }

    /// Parses the header of `packet`, refusing anything that is not a well-formed data packet.
    pub fn parse(packet: &[u8]) -> Result<Header, DropReason> {
        if packet.len() < OVERHEAD || packet[0] != TYPE_DATA || packet[1..4] != [0, 0, 0] {
            return Err(DropReason::Malformed);
        }
        let mut r = [0u8; 4];
        r.copy_from_slice(&packet[4..8]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&packet[8..16]);
        Ok(Header {
            receiver: u32::from_be_bytes(r),
            counter: u64::from_be_bytes(c),
        })
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn key(bytes: &[u8]) -> LessSafeKey {
    // 32 bytes always: the caller slices the key material.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).unwrap_or_else(|_| unreachable!()))
}

/// Which end of the handshake this node was (decides which half of the key material sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The node that connected.
    Initiator,
    /// The node that accepted.
    Responder,
}

/// The sending half of a session.
pub struct Sender {
    key: LessSafeKey,
    /// The peer's receiver index for this session.
    peer_index: u32,
    counter: AtomicU64,
}

/// The receiving half of a session.
pub struct Receiver {
    key: LessSafeKey,
    window: Mutex<ReplayWindow>,
}

/// Splits 64 bytes of handshake key material (the TLS exporter's output) into this node's
/// sender and receiver; `material` is wiped.
pub fn session(
    material: &mut [u8; KEY_MATERIAL_LEN],
    role: Role,
    peer_index: u32,
) -> (Sender, Receiver) {
    let (i2r, r2i) = material.split_at(32);
    let (send, recv) = match role {
        Role::Initiator => (i2r, r2i),
        Role::Responder => (r2i, i2r),
    };
    let pair = (
        Sender {
            key: key(send),
            peer_index,
            counter: AtomicU64::new(0),
        },
        Receiver {
            key: key(recv),
            window: Mutex::new(ReplayWindow::new()),
        },
    );
    material.zeroize();
    pair
}

/// Sealing failed: the session is used up and must be rekeyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the session sent {MAX_PACKETS} packets and must be rekeyed")]
pub struct Exhausted;

impl Sender {
    /// Packets sent so far.
    pub fn sent(&self) -> u64 {
        self.counter.load(Ordering::Relaxed)
    }

    /// Seals `payload` into `out` (cleared first): header, ciphertext, tag.
    pub fn seal(&self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Exhausted> {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        if counter >= MAX_PACKETS {
            return Err(Exhausted);
        }
        let header = Header {
            receiver: self.peer_index,
            counter,
        }
        .encode();
        out.clear();
        out.reserve(payload.len() + OVERHEAD);
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::from(header), &mut out[HEADER_LEN..])
            .map_err(|_| Exhausted)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

impl Receiver {
    /// Opens `packet` in place and returns the payload; checks the replay window before the
    /// (costly) decryption and records the counter only after the packet authenticated.
    pub fn open<'a>(&self, header: Header, packet: &'a mut [u8]) -> Result<&'a [u8], DropReason> {
        if !self
            .window
            .lock()
            .map_err(|_| DropReason::Replayed)?
            .check(header.counter)
        {
            return Err(DropReason::Replayed);
        }
        let mut aad = [0u8; HEADER_LEN];
        aad.copy_from_slice(packet.get(..HEADER_LEN).ok_or(DropReason::Malformed)?);
        let body = &mut packet[HEADER_LEN..];
        let plain = self
            .key
            .open_in_place(nonce(header.counter), Aad::from(aad), body)
            .map_err(|_| DropReason::Unauthenticated)?;
        // Two copies of one packet decrypting at once: only the first one counts.
        if !self
            .window
            .lock()
            .map_err(|_| DropReason::Replayed)?
            .accept(header.counter)
        {
            return Err(DropReason::Replayed);
        }
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> ((Sender, Receiver), (Sender, Receiver)) {
        let mut m = [7u8; KEY_MATERIAL_LEN];
        m[40] = 9;
        let mut m2 = m;
        (
            session(&mut m, Role::Initiator, 11),
            session(&mut m2, Role::Responder, 22),
        )
    }

    fn open(r: &Receiver, mut p: Vec<u8>) -> Result<Vec<u8>, DropReason> {
        let h = Header::parse(&p)?;
        r.open(h, &mut p).map(<[u8]>::to_vec)
    }

    #[test]
    fn both_directions_round_trip_and_tampering_is_caught() {
        let ((is, ir), (rs, rr)) = pair();
        let mut p = Vec::new();
        is.seal(b"to the responder", &mut p).unwrap();
        assert_eq!(Header::parse(&p).unwrap().receiver, 11);
        assert!(
            !p.windows(6).any(|w| w == b"respon"),
            "plaintext on the wire"
        );
        assert_eq!(open(&rr, p.clone()).unwrap(), b"to the responder");
        // Replayed.
        assert_eq!(open(&rr, p.clone()), Err(DropReason::Replayed));
        // The initiator's own receiver cannot open it (other direction's key).
        assert_eq!(open(&ir, p.clone()), Err(DropReason::Unauthenticated));
        rs.seal(b"back", &mut p).unwrap();
        assert_eq!(open(&ir, p.clone()).unwrap(), b"back");
        // Every single-bit flip (header included) and every truncation is refused.
        is.seal(b"flip me", &mut p).unwrap();
        for i in 0..p.len() * 8 {
            let mut q = p.clone();
            q[i / 8] ^= 1 << (i % 8);
            assert!(open(&rr, q).is_err(), "bit {i}");
        }
        for n in 0..p.len() {
            assert!(open(&rr, p[..n].to_vec()).is_err(), "truncated to {n}");
        }
        // Untouched, it still opens (the failures did not move the window).
        assert_eq!(open(&rr, p).unwrap(), b"flip me");
    }
}
