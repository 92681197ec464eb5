//! The watched policy directory: polled every 200 ms for a change in its YAML files' names,
//! sizes or modification times (simple and correct on every filesystem, unlike inotify on
//! bind mounts and network filesystems); a change re-imports the whole directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::daemon::{read_policy_dir, yaml_files};
use crate::error::NetdError;
use crate::reconcile::Handle;
use crate::txn::PolicyOp;

/// Polling interval.
pub const POLL: Duration = Duration::from_millis(200);

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn fingerprint(dir: &Path) -> Fingerprint {
    yaml_files(dir)
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            let mtime = meta.and_then(|m| m.modified().ok());
            (p, len, mtime)
        })
        .collect()
}

/// Polls `dir` until `stop` turns true.
pub async fn run(dir: PathBuf, handle: Handle, mut stop: watch::Receiver<bool>) {
    let mut last = fingerprint(&dir);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = fingerprint(&dir);
        if now == last {
            continue;
        }
        last = now;
        match reload(&dir, &handle).await {
            Ok(n) => {
                tracing::info!(dir = %dir.display(), endpoints_updated = n, "policy directory re-imported")
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "policy directory rejected; the previous policies stay")
            }
        }
    }
}

/// Reads the directory (off the async workers) and applies it as one change.
async fn reload(dir: &Path, handle: &Handle) -> Result<usize, NetdError> {
    let d = dir.to_path_buf();
    let (docs, files) = tokio::task::spawn_blocking(move || read_policy_dir(&d))
        .await
        .map_err(|_| NetdError::Stopped {
            what: "policy directory reader",
        })??;
    Ok(handle.change_policy(PolicyOp::Dir { docs, files }).await?.1)
}
