//! The one gate for tests that need root (or anything else the machine may lack): without it
//! they skip with a message, and under `CI=true` a skip is a failure.

/// True when `missing` is `None`; otherwise says why `what` is skipped and returns false, or
/// panics under `CI=true`.
pub fn skip_unless(what: &str, missing: Option<String>) -> bool {
    let Some(reason) = missing else {
        return true;
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and {what} cannot run: {reason}"
    );
    eprintln!("skipping {what}: {reason}");
    false
}

/// True when running as root; otherwise says why `what` is skipped and returns false, or
/// panics under `CI=true`.
pub fn can_run_as_root(what: &str) -> bool {
    can_run_as_root_and(what, || None)
}

/// As [`can_run_as_root`], and then `also` names anything else `what` lacks (checked only as
/// root), such as a bpffs or a tool.
pub fn can_run_as_root_and(what: &str, also: impl FnOnce() -> Option<String>) -> bool {
    let missing = if nix::unistd::geteuid().is_root() {
        also()
    } else {
        Some("needs root".to_owned())
    };
    skip_unless(what, missing)
}

/// As [`can_run_as_root`], with a bpffs at `/sys/fs/bpf` (mounted if missing), for tests that
/// load the eBPF datapath.
#[cfg(feature = "bpf")]
pub fn can_run_with_bpffs(what: &str) -> bool {
    can_run_as_root_and(what, || {
        sigil_datapath::ensure_bpffs(std::path::Path::new("/sys/fs/bpf"))
            .err()
            .map(|e| format!("no bpffs: {e}"))
    })
}
