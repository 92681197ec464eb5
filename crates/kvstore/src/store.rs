//! The connection to etcd and this node's session: one lease kept alive by a task, and the keys
//! this node owns under it, written again under a new lease whenever the old one is lost.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::KvError;
use crate::keys::{Keys, validate_name};

/// How to reach etcd and who this node is.
#[derive(Debug, Clone)]
pub struct Config {
    /// etcd client URLs (`http://host:2379`).
    pub endpoints: Vec<String>,
    /// The cluster's name: every key lives under `sigil/<cluster_name>/`.
    pub cluster_name: String,
    /// The cluster ID (bits 16-23 of every identity allocated here).
    pub cluster_id: u8,
    /// This node's name.
    pub node_name: String,
    /// This node's underlay address (the tunnel endpoint other nodes send to).
    pub node_ip: IpAddr,
    /// TTL of the node's lease: a node silent for this long disappears.
    pub lease_ttl: Duration,
    /// Deadline of each etcd request.
    pub request_timeout: Duration,
    /// A lease this node held before (a restart within its TTL): taken over if still alive,
    /// so the keys it owns never lapse and its claims (node name, pod CIDR) stay its own.
    pub resume_lease: Option<i64>,
}

impl Config {
    /// A config with a 15 s lease TTL and 5 s request timeout.
    pub fn new(
        endpoints: Vec<String>,
        cluster_name: &str,
        cluster_id: u8,
        node_name: &str,
        node_ip: IpAddr,
    ) -> Self {
        Config {
            endpoints,
            cluster_name: cluster_name.to_owned(),
            cluster_id,
            node_name: node_name.to_owned(),
            node_ip,
            lease_ttl: Duration::from_secs(15),
            request_timeout: Duration::from_secs(5),
            resume_lease: None,
        }
    }

    /// Checks every field; the error names the field and the value.
    pub fn validate(&self) -> Result<(), KvError> {
        if self.endpoints.is_empty() {
            return Err(KvError::invalid(
                "endpoints",
                "",
                "at least one etcd URL is needed",
            ));
        }
        for e in &self.endpoints {
            let rest = e
                .strip_prefix("http://")
                .ok_or_else(|| KvError::invalid("endpoints", e, "must start with http://"))?;
            if rest.is_empty() || rest.contains('/') {
                return Err(KvError::invalid("endpoints", e, "must be http://host:port"));
            }
        }
        validate_name("cluster_name", &self.cluster_name)?;
        validate_name("node_name", &self.node_name)?;
        if self.node_ip.is_unspecified() || self.node_ip.is_multicast() {
            return Err(KvError::invalid(
                "node_ip",
                self.node_ip,
                "must be a unicast address",
            ));
        }
        if self.lease_ttl < Duration::from_secs(2) || self.lease_ttl > Duration::from_secs(3600) {
            return Err(KvError::invalid(
                "lease_ttl",
                format!("{:?}", self.lease_ttl),
                "must be 2 s to 1 h",
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(KvError::invalid(
                "request_timeout",
                "0s",
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// A key this node keeps under its lease, and how to write it again under a new lease.
#[derive(Debug, Clone)]
pub(crate) enum Owned {
    /// Written as is.
    Plain(Vec<u8>),
    /// An identity reference: written only while the identity (id key and labels key) still
    /// says `id` ↔ `labels`; recreated if both are gone; dropped if the number went to another
    /// label set in the meantime.
    IdentityRef {
        id: u32,
        labels: String,
        enc: String,
    },
}

/// A handle on etcd for one node; clones share the connection and the session. The keep-alive
/// task stops when the last clone is dropped (the lease then expires after its TTL) or at
/// [`KvStore::close`] (the lease is revoked at once).
#[derive(Clone)]
pub struct KvStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: Client,
    pub(crate) cfg: Config,
    pub(crate) keys: Keys,
    endpoints: String,
    lease: watch::Sender<i64>,
    owned: Mutex<BTreeMap<String, Owned>>,
    keepalive: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self
            .keepalive
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            t.abort();
        }
    }
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("endpoints", &self.inner.endpoints)
            .field("cluster", &self.inner.cfg.cluster_name)
            .field("node", &self.inner.cfg.node_name)
            .finish_non_exhaustive()
    }
}

impl KvStore {
    /// Validates `cfg`, connects, grants this node's lease and starts keeping it alive. Fails
    /// with [`KvError::Etcd`]/[`KvError::Timeout`] naming the endpoints when etcd is unreachable.
    pub async fn connect(cfg: Config) -> Result<KvStore, KvError> {
        cfg.validate()?;
        let endpoints = cfg.endpoints.join(",");
        let opts = ConnectOptions::new()
            .with_connect_timeout(cfg.request_timeout)
            .with_timeout(cfg.request_timeout)
            .with_keep_alive(Duration::from_secs(2), cfg.request_timeout)
            .with_keep_alive_while_idle(true);
        let client = Client::connect(&cfg.endpoints, Some(opts))
            .await
            .map_err(|cause| KvError::Etcd {
                op: "connect",
                endpoints: endpoints.clone(),
                cause,
            })?;
        let (lease, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            client,
            keys: Keys::new(&cfg.cluster_name),
            cfg,
            endpoints,
            lease,
            owned: Mutex::new(BTreeMap::new()),
            keepalive: Mutex::new(None),
        });
        let id = match inner.cfg.resume_lease {
            Some(old) if inner.alive(old).await? => {
                tracing::info!(lease = old, "resuming this node's etcd lease");
                old
            }
            _ => inner.grant().await?,
        };
        inner.lease.send_replace(id);
        let weak = Arc::downgrade(&inner);
        let task = tokio::spawn(keep_alive(weak));
        *inner
            .keepalive
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(KvStore { inner })
    }

    /// The config this store was built from.
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// The current lease ID of this node's session.
    pub fn lease_id(&self) -> i64 {
        *self.inner.lease.borrow()
    }

    /// Changes of the lease ID (a new one after the old was lost and everything was rewritten).
    pub fn lease_changes(&self) -> watch::Receiver<i64> {
        self.inner.lease.subscribe()
    }

    /// Stops keeping the session alive and revokes its lease: every key this node owns
    /// (node entry, identity references, IPCache entries, pod CIDR) disappears at once.
    pub async fn close(&self) -> Result<(), KvError> {
        let task = self
            .inner
            .keepalive
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = task {
            t.abort();
        }
        let id = self.lease_id();
        let mut c = self.inner.client.clone();
        self.inner.call("lease revoke", c.lease_revoke(id)).await?;
        Ok(())
    }
}

impl Inner {
    pub(crate) fn lease_id(&self) -> i64 {
        *self.lease.borrow()
    }

    /// Runs one etcd request under the request timeout, mapping its error.
    pub(crate) async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, KvError> {
        match tokio::time::timeout(self.cfg.request_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(cause)) => Err(KvError::Etcd {
                op,
                endpoints: self.endpoints.clone(),
                cause,
            }),
            Err(_) => Err(KvError::Timeout {
                op,
                endpoints: self.endpoints.clone(),
                after: self.cfg.request_timeout,
            }),
        }
    }

    async fn grant(&self) -> Result<i64, KvError> {
        let ttl = i64::try_from(self.cfg.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let mut c = self.client.clone();
        let resp = self.call("lease grant", c.lease_grant(ttl, None)).await?;
        Ok(resp.id())
    }

    /// Whether lease `id` still exists in etcd.
    async fn alive(&self, id: i64) -> Result<bool, KvError> {
        let mut c = self.client.clone();
        let resp = self
            .call("lease time-to-live", c.lease_time_to_live(id, None))
            .await?;
        Ok(resp.ttl() > 0)
    }

    fn owned(&self) -> MutexGuard<'_, BTreeMap<String, Owned>> {
        // Map updates are single inserts/removes; a poisoned lock leaves it consistent.
        self.owned.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `key` = `value` under the lease and remembers it for rewriting under a new lease.
    pub(crate) async fn put_owned(&self, key: String, value: Vec<u8>) -> Result<(), KvError> {
        let mut c = self.client.clone();
        let lease = self.lease_id();
        self.owned()
            .insert(key.clone(), Owned::Plain(value.clone()));
        let res = self
            .call(
                "put",
                c.put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await;
        if res.is_err() {
            self.owned().remove(&key);
        }
        res.map(|_| ())
    }

    /// Remembers an owned key written by the caller's own transaction.
    pub(crate) fn remember(&self, key: String, owned: Owned) {
        self.owned().insert(key, owned);
    }

    /// Forgets an owned key (the caller deletes it).
    pub(crate) fn forget(&self, key: &str) -> Option<Owned> {
        self.owned().remove(key)
    }

    /// Deletes an owned key if it still holds what this node wrote (another node may have
    /// taken it over since).
    pub(crate) async fn delete_owned(&self, key: &str) -> Result<(), KvError> {
        let Some(owned) = self.forget(key) else {
            return Ok(());
        };
        let mut c = self.client.clone();
        let txn = match &owned {
            Owned::Plain(v) => Txn::new()
                .when([Compare::value(key, CompareOp::Equal, v.clone())])
                .and_then([TxnOp::delete(key, None)]),
            Owned::IdentityRef { .. } => Txn::new().and_then([TxnOp::delete(key, None)]),
        };
        let res = self.call("txn (delete)", c.txn(txn)).await;
        if res.is_err() {
            self.owned().insert(key.to_owned(), owned);
        }
        res.map(|_| ())
    }

    /// Rewrites every owned key under `lease` (after the previous lease was lost).
    async fn republish(&self, lease: i64) -> Result<(), KvError> {
        let all: Vec<(String, Owned)> = self
            .owned()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut c = self.client.clone();
        for (key, owned) in all {
            let opts = || Some(PutOptions::new().with_lease(lease));
            match owned {
                Owned::Plain(v) => {
                    self.call("put", c.put(key.clone(), v, opts())).await?;
                }
                Owned::IdentityRef { id, labels, enc } => {
                    let id_key = self.keys.id(id);
                    let labels_key = self.keys.labels(&enc);
                    let n = id.to_string();
                    let still = Txn::new()
                        .when([
                            Compare::value(id_key.clone(), CompareOp::Equal, labels.clone()),
                            Compare::value(labels_key.clone(), CompareOp::Equal, n.clone()),
                        ])
                        .and_then([TxnOp::put(key.clone(), n.clone(), opts())]);
                    if self
                        .call("txn (reference)", c.txn(still))
                        .await?
                        .succeeded()
                    {
                        continue;
                    }
                    let recreate = Txn::new()
                        .when([
                            Compare::create_revision(id_key.clone(), CompareOp::Equal, 0),
                            Compare::create_revision(labels_key.clone(), CompareOp::Equal, 0),
                        ])
                        .and_then([
                            TxnOp::put(id_key, labels.clone(), None),
                            TxnOp::put(labels_key, n.clone(), None),
                            TxnOp::put(key.clone(), n, opts()),
                        ]);
                    if !self
                        .call("txn (recreate)", c.txn(recreate))
                        .await?
                        .succeeded()
                    {
                        tracing::error!(
                            identity = id,
                            labels = %labels,
                            "identity was garbage-collected and its number or labels taken while \
                             this node's lease was lost; the reference is dropped"
                        );
                        self.owned().remove(&key);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Keeps the lease alive; on loss grants a new one and rewrites the owned keys; on errors
/// (etcd unreachable) retries with backoff. Holds the store only weakly between requests, so
/// dropping the last [`KvStore`] ends it.
async fn keep_alive(weak: std::sync::Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let lost = match keep_alive_once(&weak).await {
            None => return,
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "etcd lease keep-alive failed; retrying");
                false
            }
        };
        let Some(this) = weak.upgrade() else { return };
        if lost {
            tracing::warn!(
                lease = this.lease_id(),
                "etcd lease lost; granting a new one and republishing"
            );
            match this.grant().await {
                Ok(new) => match this.republish(new).await {
                    Ok(()) => {
                        this.lease.send_replace(new);
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                    // The next round's keep-alive on the old lease reports it lost again.
                    Err(e) => tracing::warn!(error = %e, "republishing under a new lease failed"),
                },
                Err(e) => tracing::warn!(error = %e, "etcd lease grant failed"),
            }
        }
        drop(this);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Sends keep-alives every TTL/3 until the lease is reported gone (`Some(Ok)`), a request fails
/// (`Some(Err)`) or the store is dropped (`None`).
async fn keep_alive_once(weak: &std::sync::Weak<Inner>) -> Option<Result<(), KvError>> {
    let (lease, period) = {
        let this = weak.upgrade()?;
        (this.lease_id(), this.cfg.lease_ttl / 3)
    };
    let (mut keeper, mut stream) = {
        let this = weak.upgrade()?;
        let mut c = this.client.clone();
        match this
            .call("lease keep-alive", c.lease_keep_alive(lease))
            .await
        {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        }
    };
    loop {
        {
            let this = weak.upgrade()?;
            if let Err(e) = this.call("lease keep-alive", keeper.keep_alive()).await {
                return Some(Err(e));
            }
            match this.call("lease keep-alive", stream.message()).await {
                Ok(Some(r)) if r.ttl() > 0 => {}
                Ok(Some(_)) => return Some(Ok(())),
                Ok(None) => {
                    return Some(Err(KvError::Etcd {
                        op: "lease keep-alive",
                        endpoints: this.endpoints.clone(),
                        cause: etcd_client::Error::LeaseKeepAliveError("stream closed".into()),
                    }));
                }
                Err(e) => return Some(Err(e)),
            }
        }
        tokio::time::sleep(period).await;
    }
}
