//! A TUN device (layer 3, no packet information header), non-blocking, driven by tokio.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;
const IFNAMSIZ: usize = 16;
/// `struct ifreq` as TUNSETIFF reads it: the name and the flags, padded to the union's size.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

// TUNSETIFF = _IOW('T', 202, int)
nix::ioctl_write_ptr_bad!(tunsetiff, nix::request_code_write!(b'T', 202, 4), IfReq);

/// An open TUN device; closing it (drop) removes the device.
pub struct Tun {
    fd: AsyncFd<OwnedFd>,
    name: String,
}

impl Tun {
    /// Creates (or attaches to) TUN device `name` in the current network namespace.
    pub fn create(name: &str) -> io::Result<Tun> {
        if name.is_empty()
            || name.len() >= IFNAMSIZ
            || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TUN device name {name:?}: 1 to 15 printable characters without '/'"),
            ));
        }
        let fd: OwnedFd = nix::fcntl::open(
            "/dev/net/tun",
            nix::fcntl::OFlag::O_RDWR
                | nix::fcntl::OFlag::O_NONBLOCK
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(io::Error::from)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `fd` is an open /dev/net/tun descriptor and `req` is a live, correctly laid out
        // `struct ifreq` prefix of the size the kernel copies (name, flags, padding to 40 bytes).
        unsafe { tunsetiff(fd.as_raw_fd(), &req) }.map_err(io::Error::from)?;
        // SAFETY: the AsyncFd owns `fd` (an OwnedFd) for its whole life, so the descriptor stays
        // open and its `as_raw_fd()` never changes while registered.
        let fd = unsafe {
            AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)
        }?;
        Ok(Tun {
            fd,
            name: name.to_owned(),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref().as_fd(), buf).map_err(io::Error::from))
            {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes one packet.
    pub async fn send(&self, packet: &[u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref(), packet).map_err(io::Error::from))
            {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}
