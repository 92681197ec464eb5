//! Named network namespaces with the iproute2 convention (a bind mount of the namespace file at
//! `/run/netns/NAME`, which `ip netns exec` and `nsenter --net=` expect), and running code or a
//! command inside one.
//!
//! A namespace is created by a dedicated thread that unshares its network namespace and
//! bind-mounts `/proc/thread-self/ns/net`; the thread then ends, the mount keeps the namespace
//! alive, and the process never forks (unlike rtnetlink's `NetworkNamespace::add`).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::{NetlinkError, Ns, validate_netns_name};

/// Where named namespaces are mounted.
pub const NETNS_DIR: &str = "/run/netns";

/// Path of a named namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn errno(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Makes [`NETNS_DIR`] a shared mount point so that namespace mounts made later propagate into
/// mount namespaces created from this one (what iproute2 does).
fn share_netns_dir() -> Result<(), NetlinkError> {
    std::fs::create_dir_all(NETNS_DIR)
        .map_err(|e| NetlinkError::kernel("creating", NETNS_DIR, e))?;
    let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
    match nix::mount::mount(Some(""), NETNS_DIR, Some("none"), shared, None::<&str>) {
        Ok(()) => return Ok(()),
        // Not a mount point yet: bind it onto itself, then share it.
        Err(nix::Error::EINVAL) => {}
        Err(e) => {
            return Err(NetlinkError::kernel(
                "making a shared mount of",
                NETNS_DIR,
                errno(e),
            ));
        }
    }
    nix::mount::mount(
        Some(NETNS_DIR),
        NETNS_DIR,
        Some("none"),
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| NetlinkError::kernel("bind-mounting onto itself", NETNS_DIR, errno(e)))?;
    nix::mount::mount(Some(""), NETNS_DIR, Some("none"), shared, None::<&str>)
        .map_err(|e| NetlinkError::kernel("making a shared mount of", NETNS_DIR, errno(e)))
}

/// Creates the named namespace `name` and returns its path.
pub(crate) fn add(name: &str) -> Result<PathBuf, NetlinkError> {
    validate_netns_name(name)?;
    share_netns_dir()?;
    let path = netns_path(name);
    let object = format!("netns {name}");
    // The mount target; create_new makes a concurrent creator of the same name fail here.
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(NetlinkError::NetnsExists {
                name: name.to_owned(),
            });
        }
        Err(e) => {
            return Err(NetlinkError::kernel(
                "creating the mount point of",
                &object,
                e,
            ));
        }
    }
    let target = path.clone();
    let made = std::thread::scope(|s| {
        s.spawn(move || -> Result<(), NetlinkError> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetlinkError::kernel("unsharing the network namespace for", &object, errno(e))
            })?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| NetlinkError::kernel("bind-mounting", &object, errno(e)))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetlinkError::kernel(
                "creating",
                format!("netns {name}"),
                std::io::Error::other("worker thread panicked"),
            ))
        })
    });
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Unmounts and removes the named namespace; `false` if it did not exist.
pub(crate) fn delete(name: &str) -> Result<bool, NetlinkError> {
    validate_netns_name(name)?;
    let path = netns_path(name);
    if std::fs::symlink_metadata(&path).is_err() {
        return Ok(false);
    }
    match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not mounted (a half-made namespace); the file still goes.
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => {
            return Err(NetlinkError::kernel(
                "unmounting",
                format!("netns {name}"),
                errno(e),
            ));
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(NetlinkError::kernel("removing", path.display(), e)),
    }
}

/// Names under [`NETNS_DIR`], sorted.
pub(crate) fn list() -> Result<Vec<String>, NetlinkError> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetlinkError::kernel("reading", NETNS_DIR, e)),
    };
    let mut out: Vec<String> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    Ok(out)
}

/// Moves the calling thread into `ns`. Only for threads that end afterwards.
fn enter(ns: Ns<'_>) -> Result<(), NetlinkError> {
    let Ns::Named(name) = ns else {
        return Ok(());
    };
    validate_netns_name(name)?;
    let file = File::open(netns_path(name))
        .map_err(|e| NetlinkError::kernel("opening", format!("netns {name}"), e))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(|e| NetlinkError::kernel("entering", format!("netns {name}"), errno(e)))
}

/// Runs `f` on a dedicated thread that is in `ns`; the calling thread stays where it is.
pub(crate) fn run_in<T: Send>(
    ns: Ns<'_>,
    f: impl FnOnce() -> Result<T, NetlinkError> + Send,
) -> Result<T, NetlinkError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetlinkError::kernel(
                "running a netlink operation in",
                ns,
                std::io::Error::other("worker thread panicked"),
            ))
        })
    })
}

/// A `Command` that runs `program` inside the namespace at `path` (what `nsenter --net=PATH`
/// does, without a helper process): the child enters the namespace between fork and exec.
pub fn command_in_netns(path: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // Converted before the fork; a path with a NUL byte becomes "" and the spawn fails (ENOENT).
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default();
    // SAFETY: the closure runs in the forked child before exec and only makes the open(2),
    // setns(2) and close(2) system calls, which are async-signal-safe; it allocates nothing.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            let fd = nix::fcntl::open(
                cpath.as_c_str(),
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
        });
    }
    cmd
}
