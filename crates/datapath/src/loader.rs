//! Loading the programs with pinned maps, pinning the programs, and attaching them to an
//! endpoint's host veth so that they outlive the process.
//!
//! Attachment uses cls_bpf filters on the clsact qdisc (netlink), not TCX links: a filter
//! belongs to the interface and stays in place when the loader exits or is killed, with no
//! link pin to keep, and `tc filter show dev lxc... ingress` shows it. Our filters sit at a
//! fixed priority and handle, so attaching again replaces the program in place (cls_bpf swaps
//! it atomically): a restarted daemon re-attaches its freshly loaded programs without a moment
//! where the interface is unfiltered.

use std::path::{Path, PathBuf};

use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{Link as _, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::error::DatapathError;
use crate::maps::{MAP_SPECS, Maps, check_pins};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath.o"));

/// Program at the host veth's ingress hook: packets leaving the endpoint (its egress).
pub const PROG_FROM_ENDPOINT: &str = "sigil_from_ep";
/// Program at the host veth's egress hook: packets entering the endpoint (its ingress).
pub const PROG_TO_ENDPOINT: &str = "sigil_to_ep";
/// Program at the VXLAN device's ingress hook: packets from other nodes.
pub const PROG_FROM_TUNNEL: &str = "sigil_from_tunnel";
/// Program at the VXLAN device's egress hook: the host's own packets to other nodes.
pub const PROG_TO_TUNNEL: &str = "sigil_to_tunnel";
/// Program at the underlay device's ingress hook when the programs encapsulate themselves
/// ([`crate::tunnel::TunnelConfig::underlay`]): VXLAN packets for local endpoints.
pub const PROG_FROM_UNDERLAY: &str = "sigil_from_underlay";

/// Filter priority of our programs on the clsact hooks (lower runs first).
pub const TC_PRIORITY: u16 = 1;
/// Filter handle of our programs.
pub const TC_HANDLE: u32 = 0x5347;

type Hook = (&'static str, TcAttachType, &'static str);

const HOOKS: [Hook; 2] = [
    (PROG_FROM_ENDPOINT, TcAttachType::Ingress, "ingress"),
    (PROG_TO_ENDPOINT, TcAttachType::Egress, "egress"),
];

/// The programs of the tunnel device.
pub(crate) const TUNNEL_HOOKS: [Hook; 2] = [
    (PROG_FROM_TUNNEL, TcAttachType::Ingress, "ingress"),
    (PROG_TO_TUNNEL, TcAttachType::Egress, "egress"),
];

/// The program of the underlay device (ingress only: what leaves is sent by the endpoints'
/// programs).
pub(crate) const UNDERLAY_HOOKS: [Hook; 1] =
    [(PROG_FROM_UNDERLAY, TcAttachType::Ingress, "ingress")];

/// Loaded programs plus the maps, all pinned under one bpffs directory.
pub struct Datapath {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    maps: Maps,
    /// The tunnel device [`Datapath::setup_tunnel`] set up.
    pub(crate) tunnel_device: Option<String>,
    /// The underlay device it attached [`PROG_FROM_UNDERLAY`] to.
    pub(crate) underlay_device: Option<String>,
}

impl Datapath {
    /// Loads the programs, creating the maps under `pin_dir` or adopting the ones already
    /// pinned there (their entries are kept), and pins the programs there too.
    ///
    /// `pin_dir` must be on a bpf filesystem; it is created if missing.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        Self::load_with(pin_dir, None)
    }

    /// [`Datapath::load`], with the policy map created with `policy_max_entries` entries
    /// instead of the object's 1 048 576 (a map already pinned keeps its size).
    pub fn load_with(
        pin_dir: &Path,
        policy_max_entries: Option<u32>,
    ) -> Result<Self, DatapathError> {
        std::fs::create_dir_all(pin_dir)
            .map_err(|e| DatapathError::io(format!("creating pin dir {}", pin_dir.display()), e))?;
        if !is_bpffs(pin_dir)? {
            return Err(DatapathError::NotBpffs {
                path: pin_dir.to_path_buf(),
            });
        }
        check_pins(pin_dir)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        if let Some(n) = policy_max_entries {
            loader.map_max_entries(crate::maps::MAP_POLICY, n);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| DatapathError::Load {
            pin_dir: pin_dir.to_path_buf(),
            cause: Box::new(e),
        })?;
        for (name, _, _) in HOOKS.iter().chain(&TUNNEL_HOOKS).chain(&UNDERLAY_HOOKS) {
            let name = *name;
            let prog = program(&mut ebpf, name)?;
            prog.load().map_err(|e| prog_err(name, e))?;
            // Pin under a temporary name, then rename over the old pin: readers of the pin
            // always find a program.
            // (bpffs refuses names with dots.)
            let tmp = pin_dir.join(format!("new_{name}"));
            let _ = std::fs::remove_file(&tmp);
            prog.pin(&tmp).map_err(|e| DatapathError::Pin {
                path: tmp.clone(),
                cause: Box::new(e),
            })?;
            let path = pin_dir.join(name);
            std::fs::rename(&tmp, &path).map_err(|e| {
                DatapathError::io(
                    format!("moving pin {} to {}", tmp.display(), path.display()),
                    e,
                )
            })?;
        }
        let maps = Maps::from_maps(&mut |name| {
            ebpf.take_map(name)
                .ok_or_else(|| DatapathError::MapMissing {
                    name,
                    where_: "the eBPF object".to_owned(),
                })
        })?;
        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            ebpf,
            maps,
            tunnel_device: None,
            underlay_device: None,
        })
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The maps.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The maps, for updates.
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Attaches both programs to a host-side veth (adding the clsact qdisc if needed).
    ///
    /// Idempotent: an existing sigil filter on the interface gets this load's program, in
    /// place. The attachment stays when this `Datapath` is dropped or the process exits;
    /// remove it with [`Datapath::detach`] (deleting the interface removes it too).
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.attach_hooks(interface, &HOOKS)
    }

    pub(crate) fn attach_hooks(
        &mut self,
        interface: &str,
        hooks: &[Hook],
    ) -> Result<(), DatapathError> {
        if let Err(e) = tc::qdisc_add_clsact(interface) {
            let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(nix::libc::EEXIST))
                || matches!(&e, tc::TcError::AlreadyAttached);
            if !exists {
                return Err(DatapathError::Clsact {
                    interface: interface.to_owned(),
                    cause: Box::new(e),
                });
            }
        }
        for &(name, attach_type, hook) in hooks {
            let prog = program(&mut self.ebpf, name)?;
            let created = prog.attach_with_options(
                interface,
                attach_type,
                TcAttachOptions::Netlink(NlOptions {
                    priority: TC_PRIORITY,
                    handle: TcHandle::from(TC_HANDLE),
                    classid: None,
                }),
            );
            let link_id = match created {
                Ok(id) => id,
                Err(create_err) => {
                    // Most likely our filter is already there (earlier run): replace its program.
                    let existing = SchedClassifierLink::attached(
                        interface,
                        attach_type,
                        TC_PRIORITY,
                        TcHandle::from(TC_HANDLE),
                        None,
                    )
                    .map_err(|e| {
                        DatapathError::io(format!("looking up interface {interface}"), e)
                    })?;
                    prog.attach_to_link(existing)
                        .map_err(|_| DatapathError::Tc {
                            interface: interface.to_owned(),
                            hook,
                            op: "attach",
                            cause: Box::new(create_err),
                        })?
                }
            };
            let link = prog.take_link(link_id).map_err(|e| DatapathError::Tc {
                interface: interface.to_owned(),
                hook,
                op: "take link",
                cause: Box::new(e),
            })?;
            // Dropping the link would delete the filter; the point is that it outlives us.
            std::mem::forget(link);
        }
        Ok(())
    }

    /// Removes sigil's filters from an interface (no loaded programs needed).
    pub fn detach(interface: &str) -> Result<(), DatapathError> {
        Self::detach_hooks(interface, &HOOKS)
    }

    pub(crate) fn detach_hooks(interface: &str, hooks: &[Hook]) -> Result<(), DatapathError> {
        for &(_, attach_type, hook) in hooks {
            let link = SchedClassifierLink::attached(
                interface,
                attach_type,
                TC_PRIORITY,
                TcHandle::from(TC_HANDLE),
                None,
            )
            .map_err(|e| DatapathError::io(format!("looking up interface {interface}"), e))?;
            if let Err(e) = link.detach() {
                // No filter (ENOENT), or no clsact qdisc for one to be on (EINVAL, "Parent
                // Qdisc doesn't exists"): nothing to detach.
                let gone = matches!(&e, aya::programs::ProgramError::NetlinkError(n)
                    if matches!(n.raw_os_error(), Some(nix::libc::ENOENT | nix::libc::EINVAL)));
                if !gone {
                    return Err(DatapathError::Tc {
                        interface: interface.to_owned(),
                        hook,
                        op: "detach",
                        cause: Box::new(e),
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes the pinned maps and programs under `pin_dir` (and the directory if empty).
    ///
    /// Attached filters keep their programs and maps alive until they are detached.
    pub fn unpin(pin_dir: &Path) -> Result<(), DatapathError> {
        let names = MAP_SPECS.iter().map(|(n, ..)| *n).chain(
            HOOKS
                .iter()
                .chain(&TUNNEL_HOOKS)
                .chain(&UNDERLAY_HOOKS)
                .map(|(n, ..)| *n),
        );
        for name in names {
            let path = pin_dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(DatapathError::io(
                        format!("removing pin {}", path.display()),
                        e,
                    ));
                }
            }
        }
        match std::fs::remove_dir(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            // Someone else's files are in there: leave the directory.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => Ok(()),
            Err(e) => Err(DatapathError::io(
                format!("removing pin dir {}", pin_dir.display()),
                e,
            )),
        }
    }
}

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool, DatapathError> {
    let fs = nix::sys::statfs::statfs(path)
        .map_err(|e| DatapathError::io(format!("statfs {}", path.display()), e.into()))?;
    Ok(fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Mounts a bpf filesystem at `mountpoint` (usually /sys/fs/bpf) unless one is there.
pub fn ensure_bpffs(mountpoint: &Path) -> Result<(), DatapathError> {
    std::fs::create_dir_all(mountpoint)
        .map_err(|e| DatapathError::io(format!("creating {}", mountpoint.display()), e))?;
    if is_bpffs(mountpoint)? {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        mountpoint,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        DatapathError::io(
            format!("mounting bpffs at {}", mountpoint.display()),
            e.into(),
        )
    })
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::Program {
            name,
            cause: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
        })?;
    prog.try_into().map_err(|e| prog_err(name, e))
}

fn prog_err(name: &'static str, e: aya::programs::ProgramError) -> DatapathError {
    DatapathError::Program {
        name,
        cause: Box::new(e),
    }
}
