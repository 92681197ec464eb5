//! The encrypted carrier's packet protection (issue 12, `--encryption spiffe`; the design and
//! its security argument are in docs/encryption.md).
//!
//! - [`handshake`]: two nodes agree on a session in a TLS 1.3 handshake in which each presents
//!   its node SVID and pins the peer node's registered SPIFFE ID; the session keys come from the
//!   TLS exporter (RFC 8446 §7.5), so they are bound to that authenticated handshake.
//! - [`session`]: AES-256-GCM per direction, 64-bit counter nonces, the header as associated
//!   data, and a 2048-packet replay window ([`replay`]); every refused packet is counted by
//!   reason.
//! - [`carrier`]: the data path over a TUN device ([`tun`], the crate's one `unsafe` block:
//!   the TUNSETIFF ioctl) and a UDP socket, with the receive-side checks.
#![deny(unsafe_code)]

pub mod carrier;
pub mod handshake;
pub mod replay;
pub mod session;
pub mod tun;
