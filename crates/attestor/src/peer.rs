//! `PeerIdentity`: the kernel's account of the process at the other end of a Unix socket, with a pidfd that
//! keeps referring to that process even after its PID is reused.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::kill;
use nix::sys::socket::getsockopt;
use nix::sys::socket::sockopt::{PeerCredentials, PeerPidfd};
use nix::unistd::Pid;

use crate::AttestError;
use crate::proc::ProcDir;

/// What the kernel says about the process at the other end of a Unix socket, captured at accept time.
#[derive(Debug)]
pub struct PeerIdentity {
    /// The peer's PID in this PID namespace (as of connect time; the number may since have been reused).
    pub pid: i32,
    /// The peer's effective uid when it connected (SO_PEERCRED), or from `/proc` for [`Self::from_pid`].
    pub uid: u32,
    /// The peer's effective gid when it connected (SO_PEERCRED), or from `/proc` for [`Self::from_pid`].
    pub gid: u32,
    /// A pidfd for the peer process; `None` only on kernels without pidfds (before Linux 5.3).
    pidfd: Option<OwnedFd>,
    /// The executable the peer ran when it was identified (connect/accept time), or why it could not be
    /// read; attestation refuses a peer that runs another executable by the time it calls.
    exe_at_connect: Result<ExeId, String>,
    /// The procfs the snapshot was read through (`/proc` unless a test retook it through a fake one);
    /// later checks read the same one.
    snapshot_root: PathBuf,
}

/// Which file an executable is: device and inode, from `fstat` of `/proc/<pid>/exe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExeId {
    /// Device of the file.
    pub dev: u64,
    /// Inode of the file.
    pub ino: u64,
}

/// Where the accept-time executable snapshot is read: the procfs of the agent's PID namespace.
pub(crate) const PROC_ROOT: &str = "/proc";

/// The executable `pid` runs now, read through a `/proc/<pid>` directory opened before the pidfd is
/// checked alive (see `UnixAttestor::attest` for why that order ties the read to the process).
fn exe_of(proc_root: &Path, pid: i32, pidfd: Option<&OwnedFd>) -> Result<ExeId, String> {
    use std::os::unix::fs::MetadataExt;
    let dir = ProcDir::open(proc_root, pid).map_err(|e| e.to_string())?;
    let alive = |fd: Option<&OwnedFd>| match fd {
        Some(fd) => {
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
        }
        None => false,
    };
    if !alive(pidfd) {
        return Err(format!("pid {pid}: no live pidfd for the process"));
    }
    let m = dir
        .open_file("exe")
        .and_then(|f| {
            f.metadata().map_err(|source| AttestError::Proc {
                pid,
                op: "reading",
                path: proc_root.join(pid.to_string()).join("exe"),
                cause: source,
            })
        })
        .map_err(|e| e.to_string())?;
    Ok(ExeId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

impl PeerIdentity {
    /// Reads the peer's credentials and a pidfd for it from a connected Unix socket.
    ///
    /// SO_PEERPIDFD (Linux >= 6.5) yields a pidfd for exactly the process that connected. On older kernels this
    /// falls back to `pidfd_open(pid)`, which races with PID reuse between `connect` and this call: a small
    /// window, but one the newer kernel closes.
    pub fn from_unix_stream(s: &tokio::net::UnixStream) -> Result<Self, AttestError> {
        let cred = getsockopt(s, PeerCredentials)
            .map_err(|e| AttestError::PeerCred { cause: e.into() })?;
        let pid = cred.pid();
        let pidfd = match getsockopt(s, PeerPidfd) {
            Ok(fd) => Some(fd),
            // Kernels before 6.5 do not know the option.
            Err(Errno::ENOPROTOOPT) => {
                if pid <= 0 {
                    return Err(AttestError::PidNotVisible { pid });
                }
                match pidfd_open(pid) {
                    Ok(fd) => Some(fd),
                    Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                        return Err(AttestError::ProcessExited { pid });
                    }
                    Err(cause) => return Err(AttestError::PidfdOpen { pid, cause }),
                }
            }
            Err(Errno::ESRCH) => return Err(AttestError::ProcessExited { pid }),
            Err(e) => {
                return Err(AttestError::PeerPidfd {
                    pid,
                    cause: e.into(),
                });
            }
        };
        if pid <= 0 {
            // A peer in another PID namespace has no number here, so its /proc entry cannot be found.
            return Err(AttestError::PidNotVisible { pid });
        }
        // Taken now, as close to connect as the agent gets: a process that connects and then execs another
        // binary (or hands the socket to a child and execs) is refused later instead of attested as that
        // binary. What a process runs before the agent accepts is still its own choice (see docs/agent.md).
        let exe_at_connect = exe_of(Path::new(PROC_ROOT), pid, pidfd.as_ref());
        Ok(PeerIdentity {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            pidfd,
            exe_at_connect,
            snapshot_root: PathBuf::from(PROC_ROOT),
        })
    }

    /// Identifies a process by PID (the Delegated Identity API's "by PID"): a pidfd from `pidfd_open`, and the
    /// effective uid and gid from `/proc/<pid>/status`, read while the pidfd shows the process alive.
    ///
    /// Which process the number names is the caller's claim; from here on this identity stays tied to it.
    pub fn from_pid(pid: i32) -> Result<Self, AttestError> {
        if pid <= 0 {
            return Err(AttestError::InvalidPid { pid });
        }
        let pidfd = pidfd_open(pid).map_err(|cause| AttestError::PidfdOpen { pid, cause })?;
        let exe_at_connect = exe_of(Path::new(PROC_ROOT), pid, Some(&pidfd));
        let identity = PeerIdentity {
            pid,
            uid: 0,
            gid: 0,
            pidfd: Some(pidfd),
            exe_at_connect,
            snapshot_root: PathBuf::from(PROC_ROOT),
        };
        // The same open-then-check-alive order as attestation: see `UnixAttestor::attest`.
        let status = ProcDir::open(Path::new("/proc"), pid)
            .and_then(|dir| identity.ensure_alive().map(|()| dir))
            .and_then(|dir| dir.status());
        identity.ensure_alive()?;
        let status = status?;
        Ok(PeerIdentity {
            uid: status.uids[1],
            gid: status.gids[1],
            ..identity
        })
    }

    /// Whether the process is still running (not exited, not a zombie).
    ///
    /// With a pidfd this is exact: the pidfd polls readable once the process has exited. Without one (old
    /// kernels) it is `kill(pid, 0)`, which cannot tell the process from a later one with the same PID.
    pub fn is_alive(&self) -> bool {
        let Some(pidfd) = &self.pidfd else {
            return self.pid > 0 && kill(Pid::from_raw(self.pid), None).is_ok();
        };
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(0) => return true,
                // POLLIN: exited; POLLHUP (Linux >= 6.9): reaped; either way gone.
                Ok(_) => return false,
                Err(Errno::EINTR) => continue,
                // Poll on a valid fd does not fail otherwise; if it does, do not vouch for the process.
                Err(_) => return false,
            }
        }
    }

    /// The executable the peer ran when it was identified, or why it could not be read.
    pub fn exe_at_connect(&self) -> Result<ExeId, &str> {
        self.exe_at_connect
            .as_ref()
            .copied()
            .map_err(String::as_str)
    }

    /// The procfs the executable snapshot was read through.
    pub fn snapshot_root(&self) -> &Path {
        &self.snapshot_root
    }

    /// Takes the executable snapshot again through another procfs (a test's fake one), so that an
    /// attestor reading that procfs compares like with like.
    pub fn with_exe_snapshot_through(self, proc_root: impl Into<PathBuf>) -> Self {
        let snapshot_root = proc_root.into();
        let exe_at_connect = exe_of(&snapshot_root, self.pid, self.pidfd.as_ref());
        PeerIdentity {
            exe_at_connect,
            snapshot_root,
            ..self
        }
    }

    /// Whether the peer still runs the executable it ran when it was identified: one `fstat` of
    /// `/proc/<pid>/exe`, read through a directory tied to the process by its pidfd. Streams that keep
    /// pushing SVIDs call this before each push, so a process that execs after attestation stops
    /// receiving them.
    pub fn ensure_same_exe(&self) -> Result<(), AttestError> {
        let then = self
            .exe_at_connect()
            .map_err(|reason| AttestError::ExeUnknownAtConnect {
                pid: self.pid,
                reason: reason.to_string(),
            })?;
        match exe_of(&self.snapshot_root, self.pid, self.pidfd.as_ref()) {
            Ok(now) if now == then => Ok(()),
            Ok(_) => Err(AttestError::ExeChanged { pid: self.pid }),
            Err(_) if !self.is_alive() => Err(AttestError::ProcessExited { pid: self.pid }),
            Err(reason) => Err(AttestError::ExeUnknownNow {
                pid: self.pid,
                reason,
            }),
        }
    }

    /// The pidfd for the peer process, if the kernel provided one.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_ref().map(AsFd::as_fd)
    }

    /// `Ok` if the process is alive, else [`AttestError::ProcessExited`].
    pub(crate) fn ensure_alive(&self) -> Result<(), AttestError> {
        if self.is_alive() {
            Ok(())
        } else {
            Err(AttestError::ProcessExited { pid: self.pid })
        }
    }
}

/// `pidfd_open(2)`, which nix does not wrap.
#[allow(unsafe_code)]
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers by value and returns a new fd or -1; no memory is shared.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw =
        RawFd::try_from(ret).map_err(|_| io::Error::other(format!("pidfd_open returned {ret}")))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn from_pid_reads_own_process() {
        let me = PeerIdentity::from_pid(std::process::id() as i32).unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        assert_eq!(me.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(me.gid, nix::unistd::getegid().as_raw());
        assert!(me.is_alive());
        assert!(me.pidfd().is_some());
    }

    #[test]
    fn from_pid_rejects_bad_and_unknown_pids() {
        for pid in [0, -5] {
            assert!(matches!(
                PeerIdentity::from_pid(pid),
                Err(AttestError::InvalidPid { pid: p }) if p == pid
            ));
        }
        // Above the kernel's PID_MAX_LIMIT (4194304), so no process can have it.
        let err = PeerIdentity::from_pid(i32::MAX).unwrap_err();
        assert!(
            matches!(&err, AttestError::PidfdOpen { pid, cause } if *pid == i32::MAX && cause.raw_os_error() == Some(libc::ESRCH)),
            "{err:?}"
        );
        assert!(err.to_string().contains(&i32::MAX.to_string()), "{err}");
    }
}
