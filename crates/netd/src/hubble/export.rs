//! Hubble's flow exporter: every flow that passes the allowlist/denylist (Hubble's `FlowFilter`s)
//! and every lost-event notice, as one JSON line in Hubble's exporter shape
//! (`{"flow":{...},"node_name":"...","time":"..."}`) appended to a file, rotated by size with a
//! bounded number of backups (`PATH.1` newest … `PATH.N`).
//!
//! Never blocks the datapath reader and never loses silently: events go through a bounded queue to
//! a writer thread; an event that finds the queue full is counted in `dropped`, one the file
//! refuses in `write_errors` ([`ExportCounters`], plain atomics for a metrics registry to read).
//! The file is created 0600 and opened without following a symlink, in a directory that only its
//! owner (root or this user) can write, whose ancestors no other user can change.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use sigil_proto::flow as fpb;
use sigil_proto::observer as opb;

use super::filter::Filters;

/// Hubble's default size at which the export file is rotated.
pub const DEFAULT_MAX_SIZE_MB: f64 = 10.0;
/// Hubble's default number of rotated files kept.
pub const DEFAULT_MAX_BACKUPS: u32 = 5;
/// Default bound on events waiting for the writer.
pub const DEFAULT_QUEUE: usize = 65_536;
/// Most events the writer takes from the queue before it flushes.
const BATCH: usize = 1024;

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The path cannot be used (a symlink, a shared directory, ...).
    #[error("hubble_export_file_path: invalid value {path:?}: {reason}")]
    Path {
        /// The configured path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A filesystem operation failed.
    #[error("hubble_export_file_path: {op} {path:?}: {cause}")]
    Io {
        /// What was done.
        op: &'static str,
        /// On which path.
        path: String,
        /// The error.
        cause: std::io::Error,
    },
}

/// What the exporter did, as plain counters (a metrics registry can read them).
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// Events written to the file.
    pub exported: AtomicU64,
    /// Events lost because the queue to the writer was full.
    pub dropped: AtomicU64,
    /// Events lost because writing them failed.
    pub write_errors: AtomicU64,
    /// Flows left out by the allowlist/denylist (not a loss).
    pub filtered_out: AtomicU64,
    /// Rotations done.
    pub rotations: AtomicU64,
}

/// The exporter's settings (validated at start-up).
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The file.
    pub path: PathBuf,
    /// Size in bytes past which the file is rotated.
    pub max_size_bytes: u64,
    /// Rotated files kept.
    pub max_backups: u32,
    /// Hubble allowlist: if any, a flow must match one.
    pub allowlist: Vec<fpb::FlowFilter>,
    /// Hubble denylist: a flow matching one is left out.
    pub denylist: Vec<fpb::FlowFilter>,
    /// Bound on events waiting for the writer.
    pub queue: usize,
}

/// Parses Hubble's `--hubble-export-allowlist/denylist` value: JSON `FlowFilter` objects one
/// after the other (as Hubble reads them) or a JSON array of them. An error names `flag`.
pub fn parse_filter_list(flag: &str, text: &str) -> Result<Vec<fpb::FlowFilter>, String> {
    let mut out = Vec::new();
    let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    for (i, v) in stream.enumerate() {
        let v = v.map_err(|e| format!("{flag}: invalid value {text:?}: not JSON: {e}"))?;
        let items = match v {
            serde_json::Value::Array(a) => a,
            other => vec![other],
        };
        for (j, item) in items.into_iter().enumerate() {
            if !item.is_object() {
                return Err(format!(
                    "{flag}[{}]: invalid value {item}: a FlowFilter is a JSON object",
                    i + j
                ));
            }
            let f: fpb::FlowFilter =
                sigil_proto::json::from_json("flow.FlowFilter", &item.to_string())
                    .map_err(|e| format!("{flag}[{}]: invalid value {item}: {e}", i + j))?;
            out.push(f);
        }
    }
    Ok(out)
}

/// The sending side, held by the recorder.
#[derive(Clone)]
pub struct Exporter {
    tx: SyncSender<opb::GetFlowsResponse>,
    filters: Arc<Filters>,
    counters: Arc<ExportCounters>,
}

/// Checks that `path` can be the export file: an absolute path whose directory is writable only
/// by its owner (root or this user), reached through directories no other user can change; the
/// returned path has no symlinks in its directory part.
pub fn check_path(path: &Path) -> Result<PathBuf, ExportError> {
    let bad = |reason: String| ExportError::Path {
        path: path.display().to_string(),
        reason,
    };
    if !path.is_absolute() {
        return Err(bad("must be an absolute path".into()));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(bad("must name a file in a directory".into()));
    };
    let dir = std::fs::canonicalize(dir).map_err(|e| bad(format!("its directory: {e}")))?;
    let me = nix::unistd::geteuid().as_raw();
    let mut cur = Some(dir.as_path());
    let mut leaf = true;
    while let Some(d) = cur {
        let m = std::fs::symlink_metadata(d).map_err(|e| bad(format!("{}: {e}", d.display())))?;
        if m.uid() != 0 && m.uid() != me {
            return Err(bad(format!(
                "directory {} belongs to uid {}, not root or this user",
                d.display(),
                m.uid()
            )));
        }
        let shared = m.mode() & 0o022 != 0;
        let sticky = m.mode() & 0o1000 != 0;
        // The file's own directory must be private to its owner (others could plant the rotated
        // names); an ancestor may be shared if it is sticky (like /tmp).
        if shared && (leaf || !sticky) {
            return Err(bad(format!(
                "directory {} is writable by group or others (mode {:o})",
                d.display(),
                m.mode() & 0o7777
            )));
        }
        leaf = false;
        cur = d.parent();
    }
    let full = dir.join(name);
    match std::fs::symlink_metadata(&full) {
        Ok(m) if m.file_type().is_symlink() => Err(bad("is a symlink".into())),
        Ok(m) if !m.file_type().is_file() => Err(bad("exists and is not a regular file".into())),
        Ok(m) if m.uid() != me => Err(bad(format!(
            "exists and belongs to uid {}, not this user",
            m.uid()
        ))),
        Ok(m) if m.nlink() > 1 => Err(bad("exists with other hard links".into())),
        Ok(_) => Ok(full),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(full),
        Err(e) => Err(bad(e.to_string())),
    }
}

fn open(path: &Path) -> Result<(File, u64), ExportError> {
    let io = |op| {
        move |cause| ExportError::Io {
            op,
            path: path.display().to_string(),
            cause,
        }
    };
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc_flags())
        .open(path)
        .map_err(io("opening"))?;
    let m = f.metadata().map_err(io("reading the metadata of"))?;
    if !m.file_type().is_file() || m.nlink() > 1 {
        return Err(ExportError::Path {
            path: path.display().to_string(),
            reason: "not a plain file with one link".into(),
        });
    }
    if m.mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io("restricting the mode of"))?;
    }
    Ok((f, m.len()))
}

/// `O_NOFOLLOW | O_CLOEXEC`: a symlink swapped in is refused, not followed.
fn libc_flags() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits()
}

fn backup(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

struct Writer {
    path: PathBuf,
    max_size: u64,
    max_backups: u32,
    out: BufWriter<File>,
    size: u64,
    counters: Arc<ExportCounters>,
    node_name: Arc<str>,
}

impl Writer {
    fn rotate(&mut self) -> Result<(), ExportError> {
        self.out.flush().map_err(|cause| ExportError::Io {
            op: "flushing",
            path: self.path.display().to_string(),
            cause,
        })?;
        let io = |op, p: &Path| {
            let p = p.display().to_string();
            move |cause| ExportError::Io { op, path: p, cause }
        };
        if self.max_backups == 0 {
            std::fs::remove_file(&self.path).map_err(io("removing", &self.path))?;
        } else {
            let oldest = backup(&self.path, self.max_backups);
            match std::fs::remove_file(&oldest) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing", &oldest)(e)),
            }
            for i in (1..self.max_backups).rev() {
                let from = backup(&self.path, i);
                match std::fs::rename(&from, backup(&self.path, i + 1)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("renaming", &from)(e)),
                }
            }
            std::fs::rename(&self.path, backup(&self.path, 1))
                .map_err(io("renaming", &self.path))?;
        }
        let (f, size) = open(&self.path)?;
        self.out = BufWriter::with_capacity(256 * 1024, f);
        self.size = size;
        self.counters.rotations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn write(&mut self, mut resp: opb::GetFlowsResponse) -> Result<(), String> {
        if resp.node_name.is_empty() {
            resp.node_name = self.node_name.to_string();
        }
        let mut line = sigil_proto::json::to_json("observer.GetFlowsResponse", &resp)
            .map_err(|e| e.to_string())?;
        line.push('\n');
        let len = line.len() as u64;
        if self.size > 0 && self.size + len > self.max_size {
            self.rotate().map_err(|e| e.to_string())?;
        }
        self.out
            .write_all(line.as_bytes())
            .map_err(|e| format!("writing {}: {e}", self.path.display()))?;
        self.size += len;
        Ok(())
    }

    fn run(mut self, rx: Receiver<opb::GetFlowsResponse>) {
        let mut errors_logged = 0u64;
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            let mut failed = 0u64;
            for r in batch {
                if let Err(e) = self.write(r) {
                    failed += 1;
                    // Rate-limited: the counter has the exact number.
                    if errors_logged < 10 || errors_logged.is_power_of_two() {
                        tracing::warn!(error = %e, "flow export: event lost");
                    }
                    errors_logged += 1;
                }
            }
            if let Err(e) = self.out.flush() {
                tracing::warn!(error = %e, path = %self.path.display(), "flow export: flush failed");
            }
            self.counters
                .exported
                .fetch_add(n - failed, Ordering::Relaxed);
            self.counters
                .write_errors
                .fetch_add(failed, Ordering::Relaxed);
        }
        let _ = self.out.flush();
    }
}

impl Exporter {
    /// Checks the path, opens the file and starts the writer thread (it ends when every
    /// [`Exporter`] clone is dropped, after writing what was queued).
    pub fn start(
        cfg: &ExportConfig,
        node_name: &str,
    ) -> Result<(Exporter, std::thread::JoinHandle<()>), ExportError> {
        let filters =
            Filters::new(&cfg.allowlist, &cfg.denylist).map_err(|e| ExportError::Path {
                path: cfg.path.display().to_string(),
                reason: format!("allowlist/denylist: {e}"),
            })?;
        let path = check_path(&cfg.path)?;
        let (f, size) = open(&path)?;
        let counters = Arc::new(ExportCounters::default());
        let (tx, rx) = sync_channel(cfg.queue.max(1));
        let writer = Writer {
            path,
            max_size: cfg.max_size_bytes.max(1),
            max_backups: cfg.max_backups,
            out: BufWriter::with_capacity(256 * 1024, f),
            size,
            counters: Arc::clone(&counters),
            node_name: Arc::from(node_name),
        };
        let handle = std::thread::Builder::new()
            .name("flow-export".into())
            .spawn(move || writer.run(rx))
            .map_err(|cause| ExportError::Io {
                op: "starting the writer thread for",
                path: cfg.path.display().to_string(),
                cause,
            })?;
        Ok((
            Exporter {
                tx,
                filters: Arc::new(filters),
                counters,
            },
            handle,
        ))
    }

    /// The counters.
    pub fn counters(&self) -> &Arc<ExportCounters> {
        &self.counters
    }

    /// Offers a flow: filtered, then queued (or counted as dropped when the queue is full).
    pub fn flow(&self, flow: &fpb::Flow, time: Option<prost_types::Timestamp>) {
        if !self.filters.matches(flow) {
            self.counters.filtered_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.send(opb::GetFlowsResponse {
            node_name: flow.node_name.clone(),
            time,
            response_types: Some(opb::get_flows_response::ResponseTypes::Flow(flow.clone())),
        });
    }

    /// Offers a lost-event notice (never filtered: a gap in the export must show).
    pub fn lost(&self, lost: fpb::LostEvent, time: Option<prost_types::Timestamp>) {
        self.send(opb::GetFlowsResponse {
            node_name: String::new(),
            time,
            response_types: Some(opb::get_flows_response::ResponseTypes::LostEvents(lost)),
        });
    }

    fn send(&self, r: opb::GetFlowsResponse) {
        match self.tx.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests;
