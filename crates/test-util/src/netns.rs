//! Network-namespace fixtures: a named namespace removed on drop, a closure on a thread that
//! entered a namespace, and an ICMP echo from inside one (no `ping` binary needed).

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
use sigil_netlink::{Netlink, Ns, RtNetlink, command_in_netns};

static NEXT_NETNS: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (`/run/netns/sgt<pid>n<k>-<tag>`) with `lo` up, removed on drop.
pub struct TestNetns {
    /// Namespace name.
    pub name: String,
    /// Namespace path.
    pub path: PathBuf,
}

impl TestNetns {
    /// Creates a namespace whose name ends in `tag`. Needs root.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let k = NEXT_NETNS.fetch_add(1, Ordering::Relaxed);
        let name = format!("sgt{}n{k}-{tag}", std::process::id());
        let nl = RtNetlink::new();
        let path = nl.add_netns(&name)?;
        let ns = TestNetns { name, path };
        nl.set_link_up(ns.ns(), "lo", true)?;
        Ok(ns)
    }

    /// As an operation target for [`sigil_netlink::Netlink`].
    pub fn ns(&self) -> Ns<'_> {
        Ns::Named(&self.name)
    }

    /// A `Command` running `program` inside.
    pub fn command(&self, program: &str) -> std::process::Command {
        command_in_netns(&self.path, program)
    }

    /// Runs `f` on a thread inside; see [`in_netns`].
    pub fn run<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        in_netns(&self.path, f)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Err(e) = RtNetlink::new().delete_netns(&self.name) {
            eprintln!("netns clean-up: {e}");
        }
    }
}

/// The path of the named namespace `name` (as `ip netns` names them).
pub fn named_netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// A `Command` running `program` inside the named namespace `name` (`ip netns exec` without
/// the `ip` process).
pub fn command_in_named_netns(
    name: &str,
    program: impl AsRef<std::ffi::OsStr>,
) -> std::process::Command {
    command_in_netns(&named_netns_path(name), program)
}

/// Whether `sigil netd probe` from the named namespace `netns` gets its echo back from
/// `addr:port` (UDP when `udp`, else TCP) within 400 ms.
pub fn probe_echo(netns: &str, addr: &str, port: u16, udp: bool) -> bool {
    let mut cmd = command_in_named_netns(netns, crate::process::sigil_bin());
    cmd.args([
        "netd",
        "probe",
        "--connect",
        &format!("{addr}:{port}"),
        "--timeout",
        "400ms",
    ]);
    if udp {
        cmd.arg("--udp");
    }
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// [`probe_echo`] over TCP.
pub fn probe_tcp(netns: &str, addr: &str, port: u16) -> bool {
    probe_echo(netns, addr, port, false)
}

/// Runs `f` on a thread that entered the namespace at `path`; sockets it opens stay in there.
pub fn in_netns<T: Send>(
    path: &Path,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {}", path.display()))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", path.display()))?
    })
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends ICMP echo requests to `to` from inside the namespace at `from` until one is answered
/// (true) or `wait` has passed (false). Errors only when the socket cannot be made.
pub fn ping(from: &Path, to: Ipv4Addr, wait: Duration) -> anyhow::Result<bool> {
    let sock: UdpSocket = in_netns(from, || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Icmp,
        )
        .context("raw ICMP socket")?;
        // std's UDP socket is a thin wrapper over sendto/recvfrom, all a raw socket needs.
        Ok(UdpSocket::from(fd))
    })?;
    // Raw sockets see every echo reply in their namespace: tell ours apart by id.
    static NEXT_ID: AtomicU16 = AtomicU16::new(0);
    let id = (std::process::id() as u16) ^ NEXT_ID.fetch_add(0x0101, Ordering::Relaxed);
    let start = Instant::now();
    let mut seq: u16 = 0;
    while start.elapsed() < wait {
        seq = seq.wrapping_add(1);
        let mut req = vec![8u8, 0, 0, 0];
        req.extend_from_slice(&id.to_be_bytes());
        req.extend_from_slice(&seq.to_be_bytes());
        req.extend_from_slice(b"sigil-test-ping");
        let sum = checksum(&req);
        req[2..4].copy_from_slice(&sum.to_be_bytes());
        // Unreachable right now (no neighbour yet): try again until the deadline.
        if sock.send_to(&req, (IpAddr::V4(to), 0)).is_err() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let round = Instant::now();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .context("socket timeout")?;
        let mut buf = [0u8; 1500];
        while round.elapsed() < Duration::from_millis(200) {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                break;
            };
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            let icmp = &buf[ihl.min(n)..n];
            if peer.ip() == IpAddr::V4(to)
                && icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}
