//! The watched policy directory: polled every 200 ms for a change in its YAML files' names,
//! sizes or modification times (simple and correct on every filesystem, unlike inotify on
//! bind mounts and network filesystems); a change re-imports the whole directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Mutex, watch};

use crate::daemon::{Daemon, yaml_files};

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
pub async fn run(dir: PathBuf, daemon: Arc<Mutex<Daemon>>, mut stop: watch::Receiver<bool>) {
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
        let mut d = daemon.lock().await;
        match tokio::task::block_in_place(|| d.sync_policy_dir()) {
            Ok(n) => {
                tracing::info!(dir = %dir.display(), endpoints_updated = n, "policy directory re-imported")
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "policy directory rejected; the previous policies stay")
            }
        }
    }
}
