//! The crate's one error type; every variant names the process and the operation or file at fault.

use std::io;
use std::path::PathBuf;

/// Why a peer could not be identified or attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// `getsockopt(SO_PEERCRED)` failed (e.g. the socket is not a connected Unix socket).
    #[error("reading the peer credentials (SO_PEERCRED) of a Unix socket: {cause}")]
    PeerCred { cause: io::Error },
    /// The peer has no PID visible in this PID namespace (SO_PEERCRED reported pid 0).
    #[error("the peer's pid is {pid}: it is not visible in this PID namespace")]
    PidNotVisible { pid: i32 },
    /// `getsockopt(SO_PEERPIDFD)` failed for a reason other than the kernel not supporting it.
    #[error("pid {pid}: getting a pidfd for the socket peer (SO_PEERPIDFD): {cause}")]
    PeerPidfd { pid: i32, cause: io::Error },
    /// `pidfd_open(pid)` failed (for a PID that does not exist: "No such process").
    #[error("pid {pid}: pidfd_open: {cause}")]
    PidfdOpen { pid: i32, cause: io::Error },
    /// A PID given by a caller is not a positive number.
    #[error("pid {pid}: not a valid process id (must be > 0)")]
    InvalidPid { pid: i32 },
    /// The kernel gave no pidfd for the peer, so its `/proc` entries cannot be tied to it.
    #[error(
        "pid {pid}: no pidfd for the process (the kernel lacks pidfd support, Linux >= 5.3), so it cannot be attested without a PID-reuse race"
    )]
    NoPidfd { pid: i32 },
    /// The process exited before attestation finished; its PID may already belong to another process.
    #[error(
        "pid {pid}: the process exited before attestation finished (its pid may now belong to another process)"
    )]
    ProcessExited { pid: i32 },
    /// Opening, reading or resolving a file under `/proc/<pid>` failed.
    #[error("pid {pid}: {op} {}: {cause}", path.display())]
    Proc {
        pid: i32,
        op: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    /// A `/proc/<pid>` file did not have the expected format.
    #[error("pid {pid}: {}: cannot parse {field} from {line:?}", path.display())]
    ProcParse {
        pid: i32,
        path: PathBuf,
        field: &'static str,
        line: String,
    },
    /// The peer's executable could not be read when it connected, so a later exec cannot be detected.
    #[error("pid {pid}: the executable at connect time is unknown ({reason}); refusing to attest")]
    ExeUnknownAtConnect { pid: i32, reason: String },
    /// The peer runs another executable than when it connected (it exec'd, or a child inherited the
    /// connection and the connecting process exec'd): its selectors would describe another binary.
    #[error(
        "pid {pid}: the process runs another executable than when it connected (exec after connect); reconnect after exec"
    )]
    ExeChanged { pid: i32 },
    /// The peer's executable cannot be read now, so it cannot be shown to be the one it connected with.
    #[error("pid {pid}: cannot read the executable the process runs now ({reason}); refusing")]
    ExeUnknownNow { pid: i32, reason: String },
    /// The executable snapshot was read through another procfs than the attestor reads, so the two
    /// cannot be compared; refused rather than the exec check skipped.
    #[error(
        "pid {pid}: the executable was recorded through {} but the attestor reads {}; cannot check for an exec after connect",
        snapshot.display(),
        attestor.display()
    )]
    ExeSnapshotElsewhere {
        pid: i32,
        snapshot: PathBuf,
        attestor: PathBuf,
    },
}
