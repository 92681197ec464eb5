//! Directories and sockets that must not be hijacked through a parent: every ancestor of a path is
//! checked, walking the components with lstat and following symlinks only where they are trusted.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::Metadata;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Most symlinks followed while resolving one path (Linux's own limit).
const MAX_SYMLINKS: u32 = 40;
/// Mode given to the directories created above the requested one: searchable, writable only by us.
const PARENT_MODE: u32 = 0o755;
const GROUP_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Why a directory for sockets or secrets, or a socket to connect to, cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// The path exists but is a symlink or not a directory.
    #[error("{path}: exists and is not a plain directory")]
    NotADirectory {
        /// The path.
        path: String,
    },
    /// The directory belongs to another user (someone could have planted it).
    #[error("{path}: owned by uid {owner}, not by this process (uid {me})")]
    ForeignOwner {
        /// The path.
        path: String,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// The directory is writable by group or others (a shared directory such as /tmp itself).
    #[error("{path}: writable by group or others (mode {mode:o}); use a directory of its own")]
    SharedDirectory {
        /// The path.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
    /// A directory (or symlink) on the way belongs to a user other than root and us: that user could
    /// replace everything below it.
    #[error(
        "{path}: owned by uid {owner}; every directory on the way must be owned by root or uid {me}"
    )]
    UntrustedAncestor {
        /// The directory or symlink.
        path: String,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// A directory on the way is writable by group or others without the sticky bit: anyone with that
    /// access could rename what is below it.
    #[error(
        "{path}: writable by group or others without the sticky bit (mode {mode:o}); other users could replace what is below it"
    )]
    SharedAncestor {
        /// The directory.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
    /// More than 40 symlinks, or a loop, while resolving the path.
    #[error("{path}: too many levels of symbolic links")]
    SymlinkLoop {
        /// The path being resolved.
        path: String,
    },
    /// A `..` after a component that does not exist yet.
    #[error("{path}: `..` after a missing directory")]
    DotDotInMissing {
        /// The path.
        path: String,
    },
    /// The path of a socket does not exist.
    #[error("{path}: no such socket")]
    MissingSocket {
        /// The path.
        path: String,
    },
    /// The path to connect to is not a socket (a symlink counts as not a socket).
    #[error("{path}: not a Unix socket")]
    NotASocket {
        /// The path.
        path: String,
    },
    /// The socket belongs to a user other than root and us: it may be a relay planted by that user.
    #[error(
        "{path}: socket owned by uid {owner}, neither root nor this user (uid {me}); refusing to connect"
    )]
    UntrustedSocket {
        /// The path.
        path: String,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// The process serving the connected socket runs as a user other than root and us: the socket
    /// was swapped in between the path check and `connect`.
    #[error(
        "{path}: served by a process of uid {peer}, neither root nor this user (uid {me}); refusing to use it"
    )]
    UntrustedPeer {
        /// The path.
        path: String,
        /// The peer's uid (`SO_PEERCRED`).
        peer: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// A system call failed.
    // The OS error is part of the message and deliberately not a `source`, so that a chain printed
    // with `{:#}` shows it once.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DirError + '_ {
    move |error| DirError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// The result of walking a path: the real path of its deepest existing part, and what is missing.
struct Walk {
    /// Real (symlink-free) path of the last component that exists.
    real: PathBuf,
    /// lstat of the path's last component, when every component exists.
    leaf: Option<Metadata>,
    /// Components still to be created below `real` (empty when `leaf` is set).
    missing: Vec<OsString>,
}

fn trusted_owner(uid: u32, me: u32) -> bool {
    uid == 0 || uid == me
}

/// Checks one directory on the way: owned by root or `me`, and not writable by group or others unless
/// sticky. Returns whether it is a shared (sticky) directory.
fn check_ancestor(path: &Path, m: &Metadata, me: u32) -> Result<bool, DirError> {
    let name = || path.display().to_string();
    if !m.file_type().is_dir() {
        return Err(DirError::NotADirectory { path: name() });
    }
    if !trusted_owner(m.uid(), me) {
        return Err(DirError::UntrustedAncestor {
            path: name(),
            owner: m.uid(),
            me,
        });
    }
    let shared = m.mode() & GROUP_OTHER_WRITE != 0;
    if shared && m.mode() & STICKY == 0 {
        return Err(DirError::SharedAncestor {
            path: name(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(shared)
}

/// Walks `path` from `/` with lstat. Every directory on the way must pass [`check_ancestor`]; a symlink
/// on the way is followed only if it sits in a trusted directory (and, in a sticky shared one, is
/// owned by root or us). The last component is never followed.
fn walk(path: &Path, me: u32) -> Result<Walk, DirError> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        // getcwd returns a resolved path; its components are checked like the rest.
        std::env::current_dir().map_err(io_err(path))?.join(path)
    };
    let display = abs.display().to_string();
    // Components still to resolve, last one first (a stack).
    let mut todo: Vec<OsString> = Vec::new();
    push_components(&mut todo, &abs);
    let root = PathBuf::from("/");
    let root_meta = std::fs::symlink_metadata(&root).map_err(io_err(&root))?;
    let mut cur = root;
    let mut cur_shared = check_ancestor(&cur, &root_meta, me)?;
    let mut links = 0u32;
    let mut seen = HashSet::new();
    while let Some(name) = todo.pop() {
        if name == ".." {
            // `cur` is a real path whose ancestors were all checked already.
            cur.pop();
            let m = std::fs::symlink_metadata(&cur).map_err(io_err(&cur))?;
            cur_shared = check_ancestor(&cur, &m, me)?;
            continue;
        }
        let next = cur.join(&name);
        let m = match std::fs::symlink_metadata(&next) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut missing = vec![name];
                while let Some(n) = todo.pop() {
                    if n == ".." {
                        return Err(DirError::DotDotInMissing { path: display });
                    }
                    missing.push(n);
                }
                return Ok(Walk {
                    real: cur,
                    leaf: None,
                    missing,
                });
            }
            Err(e) => return Err(io_err(&next)(e)),
        };
        let last = todo.is_empty();
        if m.file_type().is_symlink() && !last {
            // In a sticky shared directory (like /tmp) anyone may create a link: only ours count.
            if cur_shared && !trusted_owner(m.uid(), me) {
                return Err(DirError::UntrustedAncestor {
                    path: next.display().to_string(),
                    owner: m.uid(),
                    me,
                });
            }
            links += 1;
            if links > MAX_SYMLINKS || !seen.insert((next.clone(), todo.len())) {
                return Err(DirError::SymlinkLoop { path: display });
            }
            let target = std::fs::read_link(&next).map_err(io_err(&next))?;
            if target.is_absolute() {
                cur = PathBuf::from("/");
                cur_shared = check_ancestor(&cur, &root_meta, me)?;
            }
            push_components(&mut todo, &target);
            continue;
        }
        if last {
            return Ok(Walk {
                real: next,
                leaf: Some(m),
                missing: Vec::new(),
            });
        }
        cur_shared = check_ancestor(&next, &m, me)?;
        cur = next;
    }
    // The path was `/` itself (or resolved to it).
    let m = std::fs::symlink_metadata(&cur).map_err(io_err(&cur))?;
    Ok(Walk {
        real: cur,
        leaf: Some(m),
        missing: Vec::new(),
    })
}

/// Pushes the components of `p` onto the stack `todo` so that the first one is popped first.
fn push_components(todo: &mut Vec<OsString>, p: &Path) {
    let mut parts: Vec<OsString> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_os_string()),
            Component::ParentDir => parts.push(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    todo.extend(parts.into_iter().rev());
}

/// Checks a directory that must be ours and private enough to hold sockets or secrets.
fn check_leaf_dir(path: &Path, m: &Metadata, me: u32) -> Result<(), DirError> {
    let name = || path.display().to_string();
    if !m.file_type().is_dir() {
        return Err(DirError::NotADirectory { path: name() });
    }
    if m.uid() != me {
        return Err(DirError::ForeignOwner {
            path: name(),
            owner: m.uid(),
            me,
        });
    }
    if m.mode() & GROUP_OTHER_WRITE != 0 {
        return Err(DirError::SharedDirectory {
            path: name(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Makes sure `dir` is a directory of this process's user with exactly `mode`, reachable only through
/// directories that no other user can change.
///
/// Every ancestor must be owned by root or by this process's effective uid and must not be writable
/// by group or others unless it has the sticky bit (like /tmp); symlinks on the way are followed only
/// from such directories (and, in a sticky one, only if owned by root or us). Missing directories are
/// created (the ones above `dir` with mode 0755). An existing `dir` must be a real directory owned by
/// us and not writable by group or others — so a root daemon never re-permissions a shared directory
/// like /tmp, and never uses one that another user planted.
pub fn own_dir(dir: &Path, mode: u32) -> Result<(), DirError> {
    let me = nix::unistd::geteuid().as_raw();
    let w = walk(dir, me)?;
    let real = match w.leaf {
        Some(m) => {
            check_leaf_dir(dir, &m, me)?;
            w.real
        }
        None => {
            let mut cur = w.real;
            let n = w.missing.len();
            for (i, name) in w.missing.into_iter().enumerate() {
                cur.push(name);
                let is_leaf = i + 1 == n;
                let want = if is_leaf { mode } else { PARENT_MODE };
                match std::fs::DirBuilder::new().mode(want).create(&cur) {
                    Ok(()) => {}
                    // Someone else created it in between (possible only in a sticky directory):
                    // it must pass the same checks as one found by the walk.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err(&cur)(e)),
                }
                let m = std::fs::symlink_metadata(&cur).map_err(io_err(&cur))?;
                if is_leaf {
                    check_leaf_dir(&cur, &m, me)?;
                } else {
                    check_ancestor(&cur, &m, me)?;
                    // The umask may have removed search bits that workloads need on the way.
                    if m.uid() == me && m.mode() & 0o777 != PARENT_MODE {
                        std::fs::set_permissions(
                            &cur,
                            std::fs::Permissions::from_mode(PARENT_MODE),
                        )
                        .map_err(io_err(&cur))?;
                    }
                }
            }
            cur
        }
    };
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode)).map_err(io_err(&real))
}

/// Checks, before a client connects, that `socket` is a Unix socket owned by root or by this
/// process's effective uid, reached through directories that only root or this user can change (the
/// same rule as [`own_dir`]). A socket of another user could be a relay serving identities from
/// another CA.
pub fn check_socket(socket: &Path) -> Result<(), DirError> {
    let me = nix::unistd::geteuid().as_raw();
    let w = walk(socket, me)?;
    let name = || socket.display().to_string();
    let Some(m) = w.leaf else {
        return Err(DirError::MissingSocket { path: name() });
    };
    if !m.file_type().is_socket() {
        return Err(DirError::NotASocket { path: name() });
    }
    if !trusted_owner(m.uid(), me) {
        return Err(DirError::UntrustedSocket {
            path: name(),
            owner: m.uid(),
            me,
        });
    }
    Ok(())
}

/// Connects to the Unix socket at `socket` as a client that must not be served by another user: the
/// path is checked first ([`check_socket`]; a missing socket is left for `connect` to report), and
/// after connecting the server's credentials (`SO_PEERCRED`) must be root's or ours, so a socket
/// swapped in between the check and `connect` (e.g. in a sticky `/tmp`) is refused too.
pub async fn connect_trusted(socket: &Path) -> Result<tokio::net::UnixStream, DirError> {
    match check_socket(socket) {
        Ok(()) | Err(DirError::MissingSocket { .. }) => {}
        Err(e) => return Err(e),
    }
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(io_err(socket))?;
    check_peer(socket, &stream)?;
    Ok(stream)
}

/// Refuses a connected stream whose server runs as a user other than root and this process's
/// effective uid (`SO_PEERCRED`, recorded by the kernel when the server called `listen`).
pub fn check_peer(socket: &Path, stream: &tokio::net::UnixStream) -> Result<(), DirError> {
    let me = nix::unistd::geteuid().as_raw();
    let peer = stream.peer_cred().map_err(io_err(socket))?.uid();
    if !trusted_owner(peer, me) {
        return Err(DirError::UntrustedPeer {
            path: socket.display().to_string(),
            peer,
            me,
        });
    }
    Ok(())
}
