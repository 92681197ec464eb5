//! The reconciler: one thread owns the [`Daemon`] (its state and every datapath write) and
//! applies desired-state changes sent to it as commands, one at a time, in order. Readers
//! (status, endpoint and policy list/get, the monitor) use the published [`Snapshot`] and never
//! wait for it; policy compilation runs on a bounded worker outside it, so the writer only
//! spends time on kernel writes.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::daemon::{Committed, CreateEndpoint, Daemon, Snapshot, SpiffeChange};
use crate::error::NetdError;
use crate::state::EndpointRecord;
use crate::txn::{Compiled, PolicyJob, PolicyOp};

/// Commands queued for the writer before senders wait.
const QUEUE: usize = 64;

/// Compilations of one change that may go stale (an endpoint change landed meanwhile) before
/// the writer compiles it itself, so endpoint churn cannot starve a policy change.
const STALE_RETRIES: usize = 3;

type Reply<T> = oneshot::Sender<Result<T, NetdError>>;

/// A change of the cluster view for the writer (see [`crate::cluster`]).
#[derive(Debug, Clone)]
pub enum ClusterOp {
    /// A cluster identity appeared or changed (`Some`) or was collected (`None`).
    Identity(
        sigil_identity::NumericIdentity,
        Option<sigil_labels::Labels>,
    ),
    /// A remote endpoint or node address in the IPCache (`None`: removed), with the tunnel
    /// endpoint (the hosting node's underlay address) when the VXLAN carrier is on.
    Ip(std::net::IpAddr, Option<u32>, Option<std::net::Ipv4Addr>),
    /// Many [`ClusterOp::Ip`] changes at once; answers how many failed.
    Ips(Vec<(std::net::IpAddr, Option<u32>, Option<std::net::Ipv4Addr>)>),
    /// The cluster view synced: remote IPCache entries not in this set go.
    Prune(std::collections::BTreeSet<std::net::IpAddr>),
    /// Endpoints waiting at init for their cluster identity try again.
    RetryPending,
}

/// A desired-state change for the writer, with where its answer goes.
enum Command {
    Cluster(ClusterOp, Reply<usize>),
    CreateEndpoint(CreateEndpoint, Reply<EndpointRecord>),
    DeleteEndpoint(String, Reply<()>),
    SetLabels {
        name: String,
        set: Vec<String>,
        remove: Vec<String>,
        reply: Reply<EndpointRecord>,
    },
    SetSpiffe {
        name: String,
        uid: String,
        change: SpiffeChange,
        reply: Reply<Option<EndpointRecord>>,
    },
    PreparePolicy(PolicyOp, oneshot::Sender<PolicyJob>),
    /// A compiled change; with `inline`, a stale one is compiled again by the writer itself.
    CommitPolicy {
        compiled: Box<Compiled>,
        inline: bool,
        reply: Reply<Committed>,
    },
}

/// The handle API handlers and watchers use: send changes, read snapshots. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    changes: tokio::sync::watch::Receiver<u64>,
    /// One policy compilation at a time: a second import waits here, not in the writer.
    compile: Arc<Semaphore>,
}

/// Starts the writer thread with `daemon`. It stops when every [`Handle`] is dropped; join it
/// then.
pub fn spawn(daemon: Daemon) -> Result<(Handle, std::thread::JoinHandle<()>), NetdError> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let snapshot = daemon.snapshot();
    let changes = daemon.subscribe_changes();
    let thread = std::thread::Builder::new()
        .name("netd-reconciler".to_owned())
        .spawn(move || run(daemon, rx))
        .map_err(|e| NetdError::io("netd-reconciler thread", e))?;
    let handle = Handle {
        tx,
        snapshot,
        changes,
        compile: Arc::new(Semaphore::new(1)),
    };
    Ok((handle, thread))
}

fn run(mut d: Daemon, mut rx: mpsc::Receiver<Command>) {
    // A reply whose caller has gone (a cancelled request) is dropped: the change stands.
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Command::Cluster(op, reply) => {
                d.bump_generation();
                let res = match op {
                    ClusterOp::Identity(id, labels) => {
                        d.set_remote_identity(id, labels).map(|()| 0)
                    }
                    ClusterOp::Ip(ip, id, via) => d.set_remote_ip(ip, id, via).map(|()| 0),
                    ClusterOp::Ips(batch) => d.set_remote_ips(batch),
                    ClusterOp::Prune(keep) => d.prune_remote(&keep),
                    ClusterOp::RetryPending => d.retry_pending(),
                };
                let _ = reply.send(res);
            }
            Command::CreateEndpoint(req, reply) => {
                d.bump_generation();
                let _ = reply.send(d.create_endpoint(req));
            }
            Command::DeleteEndpoint(name, reply) => {
                d.bump_generation();
                let _ = reply.send(d.delete_endpoint(&name));
            }
            Command::SetLabels {
                name,
                set,
                remove,
                reply,
            } => {
                d.bump_generation();
                let _ = reply.send(d.set_labels(&name, &set, &remove));
            }
            Command::SetSpiffe {
                name,
                uid,
                change,
                reply,
            } => {
                d.bump_generation();
                let _ = reply.send(d.set_spiffe(&name, &uid, change));
            }
            Command::PreparePolicy(op, reply) => {
                let _ = reply.send(d.prepare_policy(op));
            }
            Command::CommitPolicy {
                compiled,
                inline,
                reply,
            } => {
                let res = if inline {
                    d.commit_policy(*compiled)
                        .map(|(ids, n)| Committed::Done(ids, n))
                } else {
                    d.try_commit_policy(*compiled)
                };
                let _ = reply.send(res);
            }
        }
    }
    tracing::debug!("reconciler stopped");
}

fn stopped<T>(_: T) -> NetdError {
    NetdError::Stopped { what: "reconciler" }
}

impl Handle {
    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// A receiver that sees a new value after every published change.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Records what the agent said about an endpoint's SVID (see [`Daemon::set_spiffe`]).
    pub async fn set_spiffe(
        &self,
        name: String,
        uid: String,
        change: SpiffeChange,
    ) -> Result<Option<EndpointRecord>, NetdError> {
        self.call(|reply| Command::SetSpiffe {
            name,
            uid,
            change,
            reply,
        })
        .await
    }

    /// The snapshot cell (for the monitor).
    pub fn snapshot_cell(&self) -> Arc<ArcSwap<Snapshot>> {
        Arc::clone(&self.snapshot)
    }

    async fn call<T>(&self, cmd: impl FnOnce(Reply<T>) -> Command) -> Result<T, NetdError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(cmd(tx)).await.map_err(stopped)?;
        rx.await.map_err(stopped)?
    }

    /// Applies a change of the cluster view (see [`ClusterOp`]); returns the number the
    /// operation counts (entries pruned, endpoints still waiting), else 0.
    pub async fn cluster(&self, op: ClusterOp) -> Result<usize, NetdError> {
        self.call(|r| Command::Cluster(op, r)).await
    }

    /// Creates an endpoint.
    pub async fn create_endpoint(&self, req: CreateEndpoint) -> Result<EndpointRecord, NetdError> {
        self.call(|r| Command::CreateEndpoint(req, r)).await
    }

    /// Deletes an endpoint.
    pub async fn delete_endpoint(&self, name: String) -> Result<(), NetdError> {
        self.call(|r| Command::DeleteEndpoint(name, r)).await
    }

    /// Changes an endpoint's labels.
    pub async fn set_labels(
        &self,
        name: String,
        set: Vec<String>,
        remove: Vec<String>,
    ) -> Result<EndpointRecord, NetdError> {
        self.call(|reply| Command::SetLabels {
            name,
            set,
            remove,
            reply,
        })
        .await
    }

    /// Applies a policy change whole or not at all: the writer hands out a copy of the engine,
    /// the change compiles on the worker, and the writer applies it to the kernel. A change
    /// that raced with an endpoint change compiles again (the fourth time in the writer, so
    /// endpoint churn cannot starve it). Returns the policies changed and
    /// the number of endpoints updated.
    pub async fn change_policy(&self, op: PolicyOp) -> Result<(Vec<String>, usize), NetdError> {
        let permit = self
            .compile
            .acquire()
            .await
            .map_err(|_| NetdError::Stopped { what: "compiler" })?;
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::PreparePolicy(op, tx))
            .await
            .map_err(stopped)?;
        let mut job = rx.await.map_err(stopped)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let compiled = tokio::task::spawn_blocking(move || job.compile())
                .await
                .map_err(|_| NetdError::Stopped { what: "compiler" })??;
            let inline = attempt > STALE_RETRIES;
            let commit = |reply| Command::CommitPolicy {
                compiled: Box::new(compiled),
                inline,
                reply,
            };
            match self.call(commit).await? {
                Committed::Done(ids, n) => {
                    drop(permit);
                    return Ok((ids, n));
                }
                Committed::Stale(next) => {
                    tracing::debug!("policy change raced with an endpoint change; compiling again");
                    job = *next;
                }
            }
        }
    }
}
