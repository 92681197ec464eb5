//! The crate's error type: every variant names what failed and carries the offending value.

use std::path::PathBuf;

/// Errors from loading, attaching, map updates, events and endpoint plumbing.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The embedded eBPF object could not be loaded into the kernel.
    #[error("loading the eBPF object with maps pinned under {pin_dir}: {cause}")]
    Load {
        /// The pin directory in use.
        pin_dir: PathBuf,
        /// aya's error.
        cause: Box<aya::EbpfError>,
    },
    /// A program from the object is missing or could not be loaded or pinned.
    #[error("eBPF program {name}: {cause}")]
    Program {
        /// Program name.
        name: &'static str,
        /// aya's error.
        cause: Box<aya::programs::ProgramError>,
    },
    /// Pinning an object in bpffs failed.
    #[error("pinning {path}: {cause}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// aya's error.
        cause: Box<aya::pin::PinError>,
    },
    /// A policy change needs more new entries than the policy map has room for; nothing was
    /// written.
    #[error(
        "eBPF map sigil_policy cannot take the change: it needs {needed} new entries and {free} of {max_entries} are free"
    )]
    PolicyMapFull {
        /// New keys the change writes (before stale keys are removed).
        needed: usize,
        /// Entries still free.
        free: usize,
        /// The map's capacity.
        max_entries: u32,
    },
    /// A policy write failed part-way; the entries already written were undone.
    #[error(
        "writing the policy map failed after {written} of {total} writes (rolled back): {cause}"
    )]
    PolicyRolledBack {
        /// Writes done before the failure.
        written: usize,
        /// Writes the change had.
        total: usize,
        /// The failed write.
        cause: Box<DatapathError>,
    },
    /// A policy write failed and undoing the earlier writes failed too: the kernel holds a mix.
    #[error("writing the policy map failed ({failed}) and the rollback failed too: {cause}")]
    PolicyRollbackFailed {
        /// The first failure.
        failed: String,
        /// The rollback failure.
        cause: Box<DatapathError>,
    },
    /// A write failure injected by a test (see [`crate::PolicyMap::fail_writes_after`]).
    #[error("injected failure of policy map write {write}")]
    InjectedFailure {
        /// The write that failed (0-based).
        write: usize,
    },
    /// A map is missing from the object or the pin directory.
    #[error("eBPF map {name} not found in {where_}")]
    MapMissing {
        /// Map name.
        name: &'static str,
        /// Where it was looked for.
        where_: String,
    },
    /// A map operation failed.
    #[error("eBPF map {name}: {op}: {cause}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What was being done.
        op: &'static str,
        /// aya's error.
        cause: Box<aya::maps::MapError>,
    },
    /// A map pinned by an earlier version has a layout this version cannot use.
    #[error(
        "pinned map {path} has type {found_type}, key size {found_key}, value size {found_value}; \
         this build needs type {want_type}, key size {want_key}, value size {want_value} \
         (remove the pin dir to start from empty maps)"
    )]
    IncompatiblePin {
        /// Pinned map path.
        path: PathBuf,
        /// Kernel map type found.
        found_type: String,
        /// Key size found.
        found_key: u32,
        /// Value size found.
        found_value: u32,
        /// Kernel map type needed.
        want_type: String,
        /// Key size needed.
        want_key: u32,
        /// Value size needed.
        want_value: u32,
    },
    /// The pin directory is not on a bpf filesystem.
    #[error(
        "pin dir {path} is not on a bpf filesystem (mount one: `mount -t bpf bpf /sys/fs/bpf`)"
    )]
    NotBpffs {
        /// The pin directory.
        path: PathBuf,
    },
    /// Attaching or detaching a TC program on an interface failed.
    #[error("TC {hook} hook on interface {interface}: {op}: {cause}")]
    Tc {
        /// Interface name.
        interface: String,
        /// `ingress` or `egress`.
        hook: &'static str,
        /// What was being done.
        op: &'static str,
        /// aya's error.
        cause: Box<aya::programs::ProgramError>,
    },
    /// Adding the clsact qdisc failed.
    #[error("adding the clsact qdisc to {interface}: {cause}")]
    Clsact {
        /// Interface name.
        interface: String,
        /// aya's error.
        cause: Box<aya::programs::tc::TcError>,
    },
    /// A field of a request is out of range or malformed.
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// The offending value.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A ring-buffer record is shorter than an event.
    #[error("ring-buffer record of {len} bytes is shorter than an event ({want} bytes)")]
    ShortEvent {
        /// Record length.
        len: usize,
        /// Expected length.
        want: usize,
    },
    /// A filesystem or socket operation failed.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done, with the path or name.
        context: String,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// A netlink, namespace or sysctl operation of the endpoint plumbing failed.
    #[error(transparent)]
    Netlink(#[from] sigil_netlink::NetlinkError),
    /// An external command failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
}

impl DatapathError {
    pub(crate) fn map(name: &'static str, op: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            name,
            op,
            cause: Box::new(source),
        }
    }

    pub(crate) fn invalid(
        field: &'static str,
        value: impl ToString,
        reason: impl ToString,
    ) -> Self {
        Self::Invalid {
            field,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn io(context: impl ToString, source: std::io::Error) -> Self {
        Self::Io {
            context: context.to_string(),
            cause: source,
        }
    }
}

/// Whether a map operation failed because the key is absent.
pub(crate) fn is_not_found(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

impl From<sigil_policy::InvalidKey> for DatapathError {
    fn from(e: sigil_policy::InvalidKey) -> Self {
        Self::Invalid {
            field: e.field,
            value: e.value,
            reason: e.reason,
        }
    }
}
