//! Gate for tests that need root: without it they skip with a message, and under `CI=true` a
//! skip is a failure.

/// True when running as root; otherwise says why `what` is skipped and returns false, or
/// panics under `CI=true`.
pub fn can_run_as_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and {what} cannot run: it needs root"
    );
    eprintln!("skipping {what}: needs root");
    false
}
