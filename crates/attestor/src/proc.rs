//! Reads of one process's `/proc/<pid>` directory through a directory fd, so that every read refers to the
//! process instance the directory was opened for, never to a later process that reused the PID.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open, openat, readlinkat};
use nix::sys::stat::Mode;

use crate::AttestError;

/// An open `/proc/<pid>` directory. The kernel binds this fd to the process's `struct pid`, not to the number:
/// once that process is reaped, reads through it fail (ESRCH/ENOENT) instead of showing the PID's next owner.
#[derive(Debug)]
pub(crate) struct ProcDir {
    pid: i32,
    path: PathBuf,
    fd: OwnedFd,
}

/// The fields of `/proc/<pid>/status` the attestor uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Status {
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gids: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// `status` is a few KiB; anything much larger is not procfs.
const MAX_STATUS_BYTES: u64 = 1 << 20;

impl ProcDir {
    /// Opens `<proc_root>/<pid>`.
    pub(crate) fn open(proc_root: &Path, pid: i32) -> Result<Self, AttestError> {
        let path = proc_root.join(pid.to_string());
        let fd = open(
            &path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| AttestError::Proc {
            pid,
            op: "opening",
            path: path.clone(),
            cause: e.into(),
        })?;
        Ok(ProcDir { pid, path, fd })
    }

    fn err(&self, op: &'static str, name: &str, e: impl Into<std::io::Error>) -> AttestError {
        AttestError::Proc {
            pid: self.pid,
            op,
            path: self.path.join(name),
            cause: e.into(),
        }
    }

    /// Opens a file in this directory for reading (following `exe`'s magic link to the executable itself).
    pub(crate) fn open_file(&self, name: &str) -> Result<File, AttestError> {
        let fd = openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.err("opening", name, e))?;
        Ok(File::from(fd))
    }

    /// The target of a symlink in this directory (`exe`).
    pub(crate) fn read_link(&self, name: &str) -> Result<OsString, AttestError> {
        readlinkat(&self.fd, name).map_err(|e| self.err("reading link", name, e))
    }

    /// The network namespace the process is in: device and inode of the nsfs file `ns/net`.
    pub(crate) fn netns(&self) -> Result<crate::NetnsId, AttestError> {
        use std::os::unix::fs::MetadataExt;
        let m = self
            .open_file("ns/net")?
            .metadata()
            .map_err(|e| self.err("reading", "ns/net", e))?;
        Ok(crate::NetnsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Reads and parses `status`.
    pub(crate) fn status(&self) -> Result<Status, AttestError> {
        let mut text = String::new();
        self.open_file("status")?
            .take(MAX_STATUS_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| self.err("reading", "status", e))?;
        parse_status(&text).map_err(|(field, line)| AttestError::ProcParse {
            pid: self.pid,
            path: self.path.join("status"),
            field,
            line,
        })
    }
}

/// Parses the `Uid:`, `Gid:` and `Groups:` lines; on failure, the field and the offending line.
fn parse_status(text: &str) -> Result<Status, (&'static str, String)> {
    let (mut uids, mut gids, mut groups) = (None, None, None);
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let field = match key {
            "Uid" => "Uid",
            "Gid" => "Gid",
            "Groups" => "Groups",
            _ => continue,
        };
        let bad = || (field, line.to_string());
        let numbers: Vec<u32> = rest
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        match field {
            "Uid" => uids = Some(<[u32; 4]>::try_from(numbers).map_err(|_| bad())?),
            "Gid" => gids = Some(<[u32; 4]>::try_from(numbers).map_err(|_| bad())?),
            _ => groups = Some(numbers),
        }
    }
    let missing = |field| (field, MISSING_LINE.to_string());
    Ok(Status {
        uids: uids.ok_or_else(|| missing("Uid"))?,
        gids: gids.ok_or_else(|| missing("Gid"))?,
        groups: groups.ok_or_else(|| missing("Groups"))?,
    })
}

/// Stands in for the offending line when a field's line is absent.
const MISSING_LINE: &str = "(no such line)";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_groups() {
        let text = "Name:\tx\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t10 20 \nTgid:\t9\n";
        let s = parse_status(text).unwrap();
        assert_eq!(s.uids, [1, 2, 3, 4]);
        assert_eq!(s.gids, [5, 6, 7, 8]);
        assert_eq!(s.groups, [10, 20]);
        let empty_groups = parse_status("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n").unwrap();
        assert!(empty_groups.groups.is_empty());
    }

    #[test]
    fn names_the_bad_field_and_line() {
        let bad = parse_status("Uid:\t1\tx\t3\t4\nGid:\t0\t0\t0\t0\nGroups:\n").unwrap_err();
        assert_eq!(bad, ("Uid", "Uid:\t1\tx\t3\t4".to_string()));
        let short = parse_status("Uid:\t0\t0\t0\t0\nGid:\t1\t2\nGroups:\n").unwrap_err();
        assert_eq!(short, ("Gid", "Gid:\t1\t2".to_string()));
        let groups = parse_status("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t-1\n").unwrap_err();
        assert_eq!(groups.0, "Groups");
        let missing = parse_status("Uid:\t0\t0\t0\t0\nGroups:\n").unwrap_err();
        assert_eq!(missing, ("Gid", MISSING_LINE.to_string()));
    }
}
