//! Policy-required mutual authentication (issue 12): the auth manager, the one owner of the
//! datapath's auth map, and the handshake server on `--mutual-auth-port`.
//!
//! The manager computes the pairs the installed policy requires — (local identity hosted
//! here, remote identity, the node hosting it) from the allow entries with `auth_required`,
//! this node's endpoints and the cluster IPCache — and authenticates each ahead of time with
//! the node that hosts the peer (as the `sigil-mutual-auth` client), so established workloads
//! see no drop. It re-authenticates before expiry and when a local SVID rotates, reacts to
//! drop-189 events at once, and revokes an entry as soon as its pair stops being required
//! (policy, endpoint, identity or node gone): the datapath checks the auth map on every packet
//! of the opening direction, so the connections that needed it are cut at their next packet.
//!
//! Keys stay in memory ([`Keys`]): the SVIDs of the identities this node hosts, as the agent
//! delivers them for its endpoints; nothing else.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use sigil_datapath::{AuthKey, AuthMap, boot_time_ns};
use sigil_identity::NumericIdentity;
use sigil_mutual_auth::{AuthContext, Pair};
use sigil_spiffe::SpiffeId;
use sigil_spiffe::bundle::{Bundle, BundleSet};
use sigil_spiffe::id::TrustDomain;
use sigil_tls::SharedBundles;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::daemon::Snapshot;

/// The label that carries an identity's SPIFFE ID.
const SPIFFE_ID_LABEL: &str = "spiffe:spiffe.io/spiffe-id=";
/// A failed handshake is retried after this (sooner when a drop asks for the pair).
const RETRY: Duration = Duration::from_millis(500);
/// A reverse pair the peer did not record is asked again after this.
const RETRY_UNRECORDED: Duration = Duration::from_secs(5);
/// How often expiries are looked at.
const TICK: Duration = Duration::from_secs(1);

/// One held SVID.
struct Held {
    identity: u32,
    spiffe_id: String,
    key: Arc<CertifiedKey>,
}

/// The SVIDs of the identities this node hosts (by endpoint), and the trust bundles, in memory
/// only. Written by the SPIFFE subscriptions, read by the handshakes.
pub struct Keys {
    by_endpoint: RwLock<HashMap<String, Held>>,
    bundles: SharedBundles,
    /// Bumped on every SVID change (rotation re-authenticates the identity's pairs).
    changed: watch::Sender<u64>,
}

impl Default for Keys {
    fn default() -> Self {
        Self {
            by_endpoint: RwLock::new(HashMap::new()),
            bundles: Arc::new(ArcSwap::from_pointee(BundleSet::new())),
            changed: watch::channel(0).0,
        }
    }
}

impl Keys {
    /// Records the SVID the agent delivered for `endpoint` (holding `identity`).
    pub fn set(&self, endpoint: &str, identity: u32, svid: &sigil_delegated_client::X509Svid) {
        let chain: Vec<rustls_pki_types::CertificateDer<'static>> = svid
            .cert_chain
            .iter()
            .map(|c| rustls_pki_types::CertificateDer::from(c.clone()))
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(svid.key.pkcs8_der().to_vec().into());
        let key = match sigil_tls::certified_key(chain, &key) {
            Ok(k) => Arc::new(k),
            Err(e) => {
                tracing::warn!(endpoint, error = %e, "the endpoint's SVID cannot be used for mutual authentication");
                self.remove(endpoint);
                return;
            }
        };
        if let Ok(mut m) = self.by_endpoint.write() {
            m.insert(
                endpoint.to_owned(),
                Held {
                    identity,
                    spiffe_id: svid.spiffe_id.to_string(),
                    key,
                },
            );
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// Forgets an endpoint's SVID (it went, or has none).
    pub fn remove(&self, endpoint: &str) {
        let gone = self
            .by_endpoint
            .write()
            .map(|mut m| m.remove(endpoint).is_some())
            .unwrap_or(false);
        if gone {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Keeps only the SVIDs of `endpoints`.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut gone = false;
        if let Ok(mut m) = self.by_endpoint.write() {
            let before = m.len();
            m.retain(|name, _| keep(name));
            gone = m.len() != before;
        }
        if gone {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Replaces the trust bundles with the agent's (trust domain ID → concatenated DER).
    pub fn set_bundles(&self, bundles: &sigil_delegated_client::Bundles) {
        let mut set = BundleSet::new();
        for (td, der) in bundles {
            let name = td.strip_prefix("spiffe://").unwrap_or(td);
            let Ok(td) = TrustDomain::parse(name) else {
                tracing::warn!(trust_domain = %td, "a bundle with an invalid trust domain is ignored");
                continue;
            };
            let mut b = Bundle::new(td);
            match sigil_spiffe::der::split_certificates(der) {
                Ok(certs) => b.x509_authorities.extend(
                    certs
                        .into_iter()
                        .map(rustls_pki_types::CertificateDer::from),
                ),
                Err(e) => {
                    tracing::warn!(trust_domain = %name, error = %e, "a bundle that does not parse is ignored");
                    continue;
                }
            }
            set.insert(b);
        }
        self.bundles.store(Arc::new(set));
    }

    /// A receiver that sees every SVID change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The SVID held for `identity` by an endpoint that `snap` says holds that identity now,
    /// whose SPIFFE ID is the identity's.
    fn svid_for(&self, snap: &Snapshot, identity: u32) -> Option<Arc<CertifiedKey>> {
        let want = spiffe_id_of(snap, identity)?;
        let m = self.by_endpoint.read().ok()?;
        snap.endpoints.iter().find_map(|(name, (rec, _))| {
            let h = m.get(name)?;
            (rec.identity == identity && h.identity == identity && h.spiffe_id == want.as_str())
                .then(|| Arc::clone(&h.key))
        })
    }
}

/// The SPIFFE ID an identity's labels carry.
fn spiffe_id_of(snap: &Snapshot, identity: u32) -> Option<SpiffeId> {
    snap.identities
        .get(&identity)?
        .iter()
        .find_map(|l| l.strip_prefix(SPIFFE_ID_LABEL))
        .and_then(|id| SpiffeId::parse(id).ok())
}

/// A pair this node authenticated as the server, and where to say whether it was recorded.
pub type Served = (sigil_mutual_auth::Authenticated, oneshot::Sender<bool>);

/// The handshake's view of this node: its published state and its keys.
pub struct NetdAuth {
    snapshot: Arc<ArcSwap<Snapshot>>,
    keys: Arc<Keys>,
    /// The server's: where served pairs go to be recorded (the manager).
    recorder: Option<mpsc::UnboundedSender<Served>>,
}

impl NetdAuth {
    /// A context over netd's snapshot and keys.
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, keys: Arc<Keys>) -> Self {
        Self {
            snapshot,
            keys,
            recorder: None,
        }
    }

    /// For the server: pairs it authenticated are handed to the manager (`Manager::served`)
    /// to record before the client is confirmed.
    pub fn with_recorder(self, recorder: mpsc::UnboundedSender<Served>) -> Self {
        Self {
            recorder: Some(recorder),
            ..self
        }
    }
}

impl AuthContext for NetdAuth {
    fn local_svid(&self, identity: NumericIdentity) -> Option<Arc<CertifiedKey>> {
        self.keys.svid_for(&self.snapshot.load(), identity.get())
    }

    fn spiffe_id_of(&self, identity: NumericIdentity) -> Option<SpiffeId> {
        spiffe_id_of(&self.snapshot.load(), identity.get())
    }

    fn node_hosts(&self, node: IpAddr, identity: NumericIdentity) -> bool {
        let IpAddr::V4(node) = node else {
            return false;
        };
        node_hosts(&self.snapshot.load(), node, identity.get())
    }

    fn bundles(&self) -> SharedBundles {
        Arc::clone(&self.keys.bundles)
    }

    fn is_node(&self, node: IpAddr) -> bool {
        self.snapshot.load().remote_ips.get(&node) == Some(&NumericIdentity::REMOTE_NODE.get())
    }

    fn record(&self, a: &sigil_mutual_auth::Authenticated) -> Option<oneshot::Receiver<bool>> {
        let (tx, rx) = oneshot::channel();
        self.recorder.as_ref()?.send((a.clone(), tx)).ok()?;
        Some(rx)
    }
}

/// Whether the cluster IPCache places an endpoint of `identity` on `node`.
fn node_hosts(snap: &Snapshot, node: Ipv4Addr, identity: u32) -> bool {
    snap.remote_ips
        .iter()
        .any(|(ip, id)| *id == identity && snap.remote_via.get(ip) == Some(&node))
}

/// Whether an identity can be authenticated at all: a cluster identity (not reserved, not a
/// node-local CIDR identity).
fn authenticatable(id: u32) -> bool {
    let n = NumericIdentity::new(id);
    !n.is_reserved() && id != 0 && id & NumericIdentity::LOCAL_CIDR_FLAG == 0
}

/// The identities of this node's endpoints that hold their identity (not pending).
fn local_identities(snap: &Snapshot) -> BTreeSet<u32> {
    snap.endpoints
        .values()
        .filter(|(r, _)| !r.is_pending())
        .map(|(r, _)| r.identity)
        .collect()
}

/// (identity, hosting node) of every remote endpoint the cluster IPCache places on a node.
fn remote_hosted(snap: &Snapshot) -> BTreeSet<(u32, Ipv4Addr)> {
    snap.remote_ips
        .iter()
        .filter_map(|(ip, id)| Some((*id, *snap.remote_via.get(ip)?)))
        .collect()
}

/// The pairs the installed policy requires: (local, remote, node hosting remote; `None` = here).
pub fn required(snap: &Snapshot) -> BTreeSet<(u32, u32, Option<Ipv4Addr>)> {
    let mut out = BTreeSet::new();
    if snap.auth_rules.is_empty() {
        return out;
    }
    let local_ids = local_identities(snap);
    let remote = remote_hosted(snap);
    for &(local, want) in &snap.auth_rules {
        if !local_ids.contains(&local) || !authenticatable(local) {
            continue;
        }
        for &(id, node) in &remote {
            if (want == 0 || want == id) && authenticatable(id) {
                out.insert((local, id, Some(node)));
            }
        }
        for &id in &local_ids {
            if (want == 0 || want == id) && authenticatable(id) {
                out.insert((local, id, None));
            }
        }
    }
    out
}

/// The pairs other nodes' policy requires of this node's endpoints: (local identity here,
/// remote identity whose rule requires authentication from it, the node hosting that remote
/// identity), minus those [`required`] already has. This node runs their handshakes too (as
/// the client; the peer records the pair before it confirms), so a new endpoint is
/// authenticated with every peer that requires it before its first packet, rather than
/// after a peer's watch has seen it and a first packet has been dropped.
pub fn reverse(snap: &Snapshot) -> BTreeSet<(u32, u32, Option<Ipv4Addr>)> {
    let mut out = BTreeSet::new();
    if snap.auth_rules.is_empty() {
        return out;
    }
    let mut local_ids = local_identities(snap);
    local_ids.retain(|id| authenticatable(*id));
    let remote = remote_hosted(snap);
    for &(id, node) in &remote {
        if !authenticatable(id) {
            continue;
        }
        for &local in &local_ids {
            if snap.auth_rules.contains(&(id, local)) || snap.auth_rules.contains(&(id, 0)) {
                out.insert((local, id, Some(node)));
            }
        }
    }
    let forward = required(snap);
    out.retain(|w| !forward.contains(w));
    out
}

/// One auth-map entry as `sigil auth list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The identity on this node.
    pub local: u32,
    /// The peer's identity.
    pub remote: u32,
    /// The peer's node (`None`: this node).
    pub node: Option<Ipv4Addr>,
    /// Unix seconds at which it ends.
    pub expires_unix: i64,
}

/// The granted entries, published for the API.
pub type AuthView = Arc<ArcSwap<Vec<Entry>>>;

struct Grant {
    expires_unix: i64,
    granted_unix: i64,
    /// The local SVID generation it was made with (a rotation re-authenticates).
    keys_gen: u64,
}

/// What the manager is configured with.
pub struct Manager {
    /// The auth map (opened from the pins).
    pub map: AuthMap,
    /// Netd's published state.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Netd's keys.
    pub keys: Arc<Keys>,
    /// The port peers' handshake servers listen on.
    pub port: u16,
    /// Woken by the monitor on a drop with reason 189.
    pub kick: Arc<Notify>,
    /// Where the granted entries are published.
    pub view: AuthView,
    /// Sees every published change of the snapshot.
    pub changes: watch::Receiver<u64>,
    /// Counts this node's handshakes as a client by outcome.
    pub handshakes: crate::metrics::AuthHandshakes,
    /// Pairs the handshake server authenticated, to record before it confirms.
    pub served: mpsc::UnboundedReceiver<Served>,
    /// The pairs ([`required`] and [`reverse`]) that have had their answer: granted,
    /// confirmed by the peer, or failed (and being retried). `endpoint create` waits on it.
    pub settled: watch::Sender<BTreeSet<Want>>,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// CLOCK_BOOTTIME ns of a Unix time in seconds.
fn boot_ns_of(unix: i64) -> u64 {
    let left = u64::try_from(unix.saturating_sub(unix_now())).unwrap_or(0);
    boot_time_ns().saturating_add(left.saturating_mul(1_000_000_000))
}

fn key_of(local: u32, remote: u32, node: Option<Ipv4Addr>) -> AuthKey {
    AuthKey {
        local_identity: local,
        remote_identity: remote,
        remote_node: node.map_or(0, AuthKey::node),
    }
}

/// A pair: (identity here, peer identity, the peer's node; `None` = here).
pub type Want = (u32, u32, Option<Ipv4Addr>);
/// A handshake's answer: (pair, SVID generation, expiry and whether the peer recorded it).
type Outcome = (Want, u64, Result<(i64, bool), String>);

/// Runs the manager until `stop`.
pub async fn run(mut m: Manager, mut stop: watch::Receiver<bool>) {
    let mut changes = m.changes.clone();
    let mut keys_rx = m.keys.subscribe();
    let mut granted: BTreeMap<Want, Grant> = BTreeMap::new();
    // Reverse pairs the peer confirmed, with the SVID generation they were made with.
    let mut confirmed: BTreeMap<Want, u64> = BTreeMap::new();
    let mut inflight: BTreeSet<Want> = BTreeSet::new();
    let mut retry_at: BTreeMap<Want, tokio::time::Instant> = BTreeMap::new();
    // Pairs whose last handshake failed: logged once at warn, then at debug until one works.
    let mut failing: BTreeSet<Want> = BTreeSet::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let mut tick = tokio::time::interval(TICK);
    let ctx = Arc::new(NetdAuth::new(Arc::clone(&m.snapshot), Arc::clone(&m.keys)));
    // Entries left from a previous run are not trusted: every pair authenticates again.
    match m.map.entries() {
        Ok(old) => {
            for (k, _) in old {
                let _ = m.map.revoke(k);
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing old auth entries failed"),
    }
    loop {
        let mut kicked = false;
        tokio::select! {
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
            r = changes.changed() => if r.is_err() { break },
            // New SVIDs may let a pair that failed for want of one go at once.
            r = keys_rx.changed() => { if r.is_err() { break } kicked = true; }
            () = m.kick.notified() => kicked = true,
            _ = tick.tick() => {}
            Some((a, recorded)) = m.served.recv() => {
                // A peer authenticated a pair with us as the server: recorded here if this
                // node's policy requires it (as if this node had asked), then confirmed.
                let snap = m.snapshot.load();
                let mut done = false;
                if let IpAddr::V4(node) = a.peer_node {
                    let want = (a.pair.local.get(), a.pair.remote.get(), Some(node));
                    if required(&snap).contains(&want) {
                        let (l, r, _) = want;
                        match m.map.grant_until(key_of(l, r, want.2), boot_ns_of(a.expires_unix)) {
                            Ok(()) => {
                                tracing::info!(local = l, remote = r, node = ?want.2, expires = a.expires_unix, "mutual auth: pair authenticated (asked by the peer)");
                                let made_with = *keys_rx.borrow();
                                granted.insert(want, Grant { expires_unix: a.expires_unix, granted_unix: unix_now(), keys_gen: made_with });
                                retry_at.remove(&want);
                                failing.remove(&want);
                                done = true;
                            }
                            Err(e) => tracing::error!(local = l, remote = r, error = %e, "writing an auth entry failed"),
                        }
                    }
                }
                let _ = recorded.send(done);
            }
            Some((want, made_with, res)) = rx.recv() => {
                inflight.remove(&want);
                match &res {
                    Ok(_) => m.handshakes.success(),
                    Err(_) => m.handshakes.failure(),
                }
                let snap = m.snapshot.load();
                match res {
                    Ok((expires, _)) if required(&snap).contains(&want) => {
                        let (l, r, node) = want;
                        match m.map.grant_until(key_of(l, r, node), boot_ns_of(expires)) {
                            Ok(()) => {
                                let renewed = granted.contains_key(&want);
                                tracing::info!(local = l, remote = r, node = ?node, expires, renewed, "mutual auth: pair authenticated");
                                granted.insert(want, Grant { expires_unix: expires, granted_unix: unix_now(), keys_gen: made_with });
                                retry_at.remove(&want);
                                failing.remove(&want);
                            }
                            Err(e) => tracing::error!(local = l, remote = r, error = %e, "writing an auth entry failed"),
                        }
                    }
                    Ok((_, true)) if reverse(&snap).contains(&want) => {
                        // The peer recorded it before confirming: nothing to write here.
                        let (l, r, node) = want;
                        tracing::debug!(local = l, remote = r, node = ?node, "mutual auth: pair authenticated for the peer's policy");
                        confirmed.insert(want, made_with);
                        retry_at.remove(&want);
                        failing.remove(&want);
                    }
                    Ok((_, false)) if reverse(&snap).contains(&want) => {
                        // The peer's policy does not (yet) require it: asked again later, in
                        // case its view was behind; settled meanwhile.
                        let (l, r, node) = want;
                        tracing::debug!(local = l, remote = r, node = ?node, "mutual auth: the peer did not record the pair; asking again later");
                        failing.insert(want);
                        retry_at.insert(want, tokio::time::Instant::now() + RETRY_UNRECORDED);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let (l, r, node) = want;
                        if failing.insert(want) {
                            tracing::warn!(local = l, remote = r, node = ?node, error = %e, "mutual auth: handshake failed; retrying");
                        } else {
                            tracing::debug!(local = l, remote = r, node = ?node, error = %e, "mutual auth: handshake failed again");
                        }
                        retry_at.insert(want, tokio::time::Instant::now() + RETRY);
                    }
                }
            }
        }
        let snap = m.snapshot.load_full();
        let need = required(&snap);
        let keys_gen = *keys_rx.borrow_and_update();
        // Revocations first: a pair no longer required loses its entry now.
        let gone: Vec<Want> = granted
            .keys()
            .filter(|w| !need.contains(*w))
            .copied()
            .collect();
        for w in gone {
            let (l, r, node) = w;
            match m.map.revoke(key_of(l, r, node)) {
                Ok(()) => {
                    granted.remove(&w);
                    tracing::info!(local = l, remote = r, node = ?node, "mutual auth: pair revoked (no longer required)");
                }
                Err(e) => {
                    tracing::error!(local = l, remote = r, error = %e, "revoking an auth entry failed")
                }
            }
        }
        let back = reverse(&snap);
        confirmed.retain(|w, _| back.contains(w));
        retry_at.retain(|w, _| need.contains(w) || back.contains(w));
        failing.retain(|w| need.contains(w) || back.contains(w));
        let now = unix_now();
        let clock = tokio::time::Instant::now();
        for &w in &need {
            if inflight.contains(&w) {
                continue;
            }
            let due = match granted.get(&w) {
                None => true,
                Some(g) => {
                    let lifetime = (g.expires_unix - g.granted_unix).max(3);
                    g.expires_unix - now <= lifetime / 3 || g.keys_gen != keys_gen
                }
            };
            if !due
                || (!kicked && retry_at.get(&w).is_some_and(|t| *t > clock))
                || svid_on_its_way(&snap, &ctx, w.0)
            {
                continue;
            }
            inflight.insert(w);
            spawn_handshake(&ctx, &tx, m.port, w, keys_gen);
        }
        // Reverse pairs: once, and again after a local SVID rotation (the peer renews its
        // own entry before it expires).
        for &w in &back {
            if inflight.contains(&w)
                || confirmed.get(&w) == Some(&keys_gen)
                || (!kicked && retry_at.get(&w).is_some_and(|t| *t > clock))
                || svid_on_its_way(&snap, &ctx, w.0)
            {
                continue;
            }
            inflight.insert(w);
            spawn_handshake(&ctx, &tx, m.port, w, keys_gen);
        }
        m.settled.send_if_modified(|s| {
            let now: BTreeSet<Want> = granted
                .keys()
                .chain(confirmed.keys())
                .chain(failing.iter())
                .copied()
                .collect();
            let changed = *s != now;
            if changed {
                *s = now;
            }
            changed
        });
        let mut list: Vec<Entry> = granted
            .iter()
            .map(|(&(local, remote, node), g)| Entry {
                local,
                remote,
                node,
                expires_unix: g.expires_unix,
            })
            .collect();
        list.sort_by_key(|e| (e.local, e.remote, e.node));
        if **m.view.load() != list {
            m.view.store(Arc::new(list));
        }
    }
    for (l, r, node) in granted.keys() {
        let _ = m.map.revoke(key_of(*l, *r, *node));
    }
}

/// Whether an endpoint here holds `identity` from an SVID (registered) whose key has not reached
/// [`Keys`] yet (it follows the registration by a moment): its pairs wait for it (the key's
/// arrival wakes the manager) rather than fail and count as answered.
fn svid_on_its_way(snap: &Snapshot, ctx: &NetdAuth, identity: u32) -> bool {
    snap.endpoints.values().any(|(r, _)| {
        r.identity == identity && r.spiffe_source == crate::state::SpiffeSource::Registered
    }) && ctx.local_svid(NumericIdentity::new(identity)).is_none()
}

/// Runs one pair's handshake in its own task; the outcome comes back on `tx`.
fn spawn_handshake(
    ctx: &Arc<NetdAuth>,
    tx: &mpsc::UnboundedSender<Outcome>,
    port: u16,
    w: Want,
    keys_gen: u64,
) {
    let (ctx, tx) = (Arc::clone(ctx), tx.clone());
    tokio::spawn(async move {
        let res = authenticate(&ctx, w, port).await;
        let _ = tx.send((w, keys_gen, res));
    });
}

/// Authenticates one pair: with the peer's node, or locally when both ends are here.
async fn authenticate(
    ctx: &NetdAuth,
    (local, remote, node): Want,
    port: u16,
) -> Result<(i64, bool), String> {
    let (l, r) = (NumericIdentity::new(local), NumericIdentity::new(remote));
    match node {
        Some(node) => sigil_mutual_auth::authenticate(
            ctx,
            SocketAddr::new(IpAddr::V4(node), port),
            Pair {
                local: l,
                remote: r,
            },
        )
        .await
        .map(|a| (a.expires_unix, a.peer_recorded))
        .map_err(|e| e.to_string()),
        None => {
            // Both ends are on this node: it holds both SVIDs; the pair lasts as long as both.
            let a = ctx
                .local_svid(l)
                .ok_or_else(|| format!("this node holds no SVID for identity {local}"))?;
            let b = ctx
                .local_svid(r)
                .ok_or_else(|| format!("this node holds no SVID for identity {remote}"))?;
            let end = |k: &CertifiedKey, id: u32| {
                let leaf = k
                    .cert
                    .first()
                    .ok_or_else(|| format!("identity {id}: no certificate"))?;
                sigil_spiffe::x509::leaf_not_after(leaf).map_err(|e| format!("identity {id}: {e}"))
            };
            Ok((end(&a, local)?.min(end(&b, remote)?), true))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;
    use std::path::PathBuf;

    use super::*;
    use crate::state::EndpointRecord;

    fn ep(name: &str, identity: u32) -> EndpointRecord {
        EndpointRecord {
            name: name.into(),
            namespace: "default".into(),
            pod_labels: vec![],
            spiffe_id: None,
            service_account: "default".into(),
            uid: format!("uid-{name}"),
            spiffe_source: Default::default(),
            svid_expires_at: None,
            classic_identity: None,
            identity,
            cluster_pending: false,
            ipv4: Ipv4Addr::new(10, 0, 0, 2),
            ipv6: Ipv6Addr::LOCALHOST,
            host_index: 2,
            endpoint_id: 7,
            host_interface: "lxc0".into(),
            netns_name: "n".into(),
            netns_path: PathBuf::from("/run/netns/n"),
            interface: "eth0".into(),
        }
    }

    const FE: u32 = 70_000;
    const BE: u32 = 70_001;
    const OTHER: u32 = 70_002;

    fn snap() -> Snapshot {
        let mut s = Snapshot::default();
        s.endpoints.insert("fe".into(), (ep("fe", FE), vec![]));
        let (b, c) = (Ipv4Addr::new(192, 168, 0, 2), Ipv4Addr::new(192, 168, 0, 3));
        for (ip, id, via) in [
            ("10.2.0.2", BE, Some(b)),
            ("10.3.0.2", BE, Some(c)),
            ("10.3.0.3", OTHER, Some(c)),
            // A node address (remote-node) and an entry without a tunnel endpoint.
            ("192.168.0.2", 6, Some(b)),
            ("10.9.0.2", BE, None),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            s.remote_ips.insert(ip, id);
            if let Some(v) = via {
                s.remote_via.insert(ip, v);
            }
        }
        s
    }

    #[test]
    fn required_pairs_follow_the_auth_rules_endpoints_and_hosting_nodes() {
        let mut s = snap();
        assert!(required(&s).is_empty(), "no auth rule, nothing required");
        let (b, c) = (Ipv4Addr::new(192, 168, 0, 2), Ipv4Addr::new(192, 168, 0, 3));
        s.auth_rules.insert((FE, BE));
        assert_eq!(
            required(&s),
            BTreeSet::from([(FE, BE, Some(b)), (FE, BE, Some(c))]),
            "one pair per node hosting the remote identity"
        );
        // An identity not hosted here is never a local end.
        s.auth_rules.insert((OTHER, BE));
        assert_eq!(required(&s).len(), 2);
        // "Any" covers every authenticatable remote identity (not remote-node), local ones too.
        s.auth_rules.insert((FE, 0));
        s.endpoints.insert("be".into(), (ep("be", BE), vec![]));
        assert_eq!(
            required(&s),
            BTreeSet::from([
                (FE, BE, Some(b)),
                (FE, BE, Some(c)),
                (FE, OTHER, Some(c)),
                (FE, BE, None),
                (FE, FE, None),
            ])
        );
        assert!(node_hosts(&s, c, OTHER) && !node_hosts(&s, b, OTHER));
        // A pending endpoint holds no identity yet.
        s.endpoints.get_mut("fe").unwrap().0.cluster_pending = true;
        assert!(required(&s).iter().all(|(l, _, _)| *l != FE));
    }

    #[test]
    fn reverse_pairs_are_what_other_nodes_policy_requires_of_local_endpoints() {
        let mut s = snap();
        let (b, c) = (Ipv4Addr::new(192, 168, 0, 2), Ipv4Addr::new(192, 168, 0, 3));
        assert!(reverse(&s).is_empty(), "no auth rule, nothing asked");
        // BE (on b and c) requires authentication from FE (here): FE's node asks both.
        s.auth_rules.insert((BE, FE));
        assert_eq!(
            reverse(&s),
            BTreeSet::from([(FE, BE, Some(b)), (FE, BE, Some(c))])
        );
        // A rule of OTHER's for another identity asks nothing of FE; one for any does.
        s.auth_rules.insert((OTHER, BE));
        assert_eq!(reverse(&s).len(), 2);
        s.auth_rules.insert((OTHER, 0));
        assert!(reverse(&s).contains(&(FE, OTHER, Some(c))));
        // What this node's own policy requires is not asked twice.
        s.auth_rules.insert((FE, BE));
        assert!(!reverse(&s).iter().any(|(_, r, _)| *r == BE));
        // A pending endpoint asks nothing.
        s.endpoints.get_mut("fe").unwrap().0.cluster_pending = true;
        assert!(reverse(&s).is_empty());
    }

    #[test]
    fn spiffe_ids_come_from_the_identitys_label() {
        let mut s = Snapshot::default();
        s.identities.insert(
            FE,
            vec![
                "k8s:app=fe".into(),
                "spiffe:spiffe.io/spiffe-id=spiffe://cluster.test/fe".into(),
            ],
        );
        s.identities.insert(BE, vec!["k8s:app=be".into()]);
        assert_eq!(
            spiffe_id_of(&s, FE).map(|i| i.to_string()).as_deref(),
            Some("spiffe://cluster.test/fe")
        );
        assert_eq!(spiffe_id_of(&s, BE), None, "no SPIFFE ID: fail closed");
        assert_eq!(spiffe_id_of(&s, OTHER), None);
    }
}
