//! SPIFFE identities of endpoints (identity mode `spiffe`): one Delegated Identity API
//! subscription per endpoint with its selectors, one bundle subscription for the node, and the
//! pending → registered / classic-fallback moves they cause, sent to the reconciler.
//!
//! A new endpoint starts `pending` (reserved `init` identity, drop-all policy). Its first SVID
//! makes it `registered` (the SVID's SPIFFE ID becomes its `spiffe:spiffe.io/spiffe-id` label);
//! with no SVID after the fallback wait (agent unreachable, or no entry) it falls back to its
//! classic labels. A registered endpoint whose SVID goes from the stream (entry deleted) falls
//! back at once; a broken stream keeps every identity as it is while the watch reconnects.

use std::collections::HashMap;
use std::time::Duration;

use sigil_delegated_client::{Bundles, Client, Error as AgentError, Update};
use sigil_registry::Selector;
use tokio::sync::watch;
use tokio::time::Instant;

use std::sync::Arc;

use crate::auth::Keys;
use crate::daemon::SpiffeChange;
use crate::reconcile::Handle;
use crate::registrar::derived_id;
use crate::spiffe_id::Deriver;
use crate::state::SpiffeSource;

/// One endpoint's subscription; dropping it stops the task.
struct Subscription {
    uid: String,
    selectors: Vec<Selector>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps one subscription per subscribed endpoint of the published state until `stop`.
pub async fn run(
    handle: Handle,
    client: Client,
    node_name: String,
    fallback_wait: Duration,
    deriver: Option<Deriver>,
    keys: Arc<Keys>,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = handle.changes();
    let mut subs: HashMap<String, Subscription> = HashMap::new();
    let mut bundles_watch = client.watch_x509_bundles();
    // The node's trust bundles, in memory only (for the endpoints' peers' SVIDs).
    let mut bundles: Bundles = Bundles::new();
    let mut bundle_error = false;
    loop {
        sync(
            &handle,
            &client,
            &node_name,
            fallback_wait,
            deriver.as_ref(),
            &keys,
            &mut subs,
        );
        keys.retain(|name| subs.contains_key(name));
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = changes.changed() => if r.is_err() { break },
            u = bundles_watch.next() => match u {
                Some(Update::Current(b)) => {
                    if b != bundles {
                        tracing::debug!(trust_domains = b.len(), "X.509 bundles from the agent");
                        keys.set_bundles(&b);
                        bundles = b;
                    }
                    bundle_error = false;
                }
                Some(Update::Error(e)) => {
                    if !bundle_error {
                        tracing::warn!(error = %e, "bundle stream from the agent failed; retrying");
                    }
                    bundle_error = true;
                }
                None => break,
            },
        }
    }
    subs.clear();
}

/// Starts subscriptions for new endpoints (or changed selectors) and stops those of endpoints
/// that went.
fn sync(
    handle: &Handle,
    client: &Client,
    node_name: &str,
    fallback_wait: Duration,
    deriver: Option<&Deriver>,
    keys: &Arc<Keys>,
    subs: &mut HashMap<String, Subscription>,
) {
    let snap = handle.snapshot();
    subs.retain(|name, s| {
        snap.endpoints
            .get(name)
            .is_some_and(|(r, _)| r.uid == s.uid && r.spiffe_source.subscribed())
    });
    for (name, (rec, _)) in &snap.endpoints {
        if !rec.spiffe_source.subscribed() {
            continue;
        }
        let selectors = match rec.selectors(node_name) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(endpoint = %name, error = %e, "endpoint has no valid selectors; not asking the agent");
                subs.remove(name);
                continue;
            }
        };
        if subs.get(name).is_some_and(|s| s.selectors == selectors) {
            continue;
        }
        let task = tokio::spawn(follow(
            handle.clone(),
            client.watch_x509_svids(selectors.clone()),
            name.clone(),
            rec.uid.clone(),
            rec.spiffe_source,
            fallback_wait,
            deriver.cloned(),
            Arc::clone(keys),
        ));
        subs.insert(
            name.clone(),
            Subscription {
                uid: rec.uid.clone(),
                selectors,
                task,
            },
        );
    }
}

/// Follows one endpoint's SVID stream and tells the reconciler what changes.
// One task's whole context, passed once at spawn.
#[allow(clippy::too_many_arguments)]
async fn follow(
    handle: Handle,
    mut svids: sigil_delegated_client::Watch<Vec<sigil_delegated_client::X509Svid>>,
    name: String,
    uid: String,
    source: SpiffeSource,
    fallback_wait: Duration,
    deriver: Option<Deriver>,
    keys: Arc<Keys>,
) {
    // Only a pending endpoint waits: one that was registered or fell back has had its answer.
    let mut deadline = (source == SpiffeSource::Pending).then(|| Instant::now() + fallback_wait);
    let mut failing = false;
    loop {
        let mut svid = None;
        let change = tokio::select! {
            u = svids.next() => match u {
                None => return,
                Some(Update::Current(list)) => {
                    failing = false;
                    // In a derived mode the endpoint's identity is the SVID of its derived ID
                    // (an opaque endpoint may also match a smaller identity's entry); until the
                    // agent has it, the endpoint has no SVID.
                    let derived = deriver
                        .as_ref()
                        .and_then(|d| derived_id(&handle.snapshot(), d, &name));
                    let chosen = match &derived {
                        Some(id) => list.iter().find(|s| s.spiffe_id.to_string() == *id),
                        None if deriver.is_some() => None,
                        None => list.first(),
                    };
                    match chosen {
                        Some(first) => {
                            if deriver.is_none() && list.len() > 1 {
                                let others: Vec<String> =
                                    list[1..].iter().map(|s| s.spiffe_id.to_string()).collect();
                                tracing::info!(endpoint = %name, chosen = %first.spiffe_id, ?others,
                                    "several SVIDs match the endpoint; the first is its identity");
                            }
                            deadline = None;
                            svid = Some(first.clone());
                            SpiffeChange::Registered {
                                spiffe_id: first.spiffe_id.to_string(),
                                expires_at: first.expires_at,
                                derived: derived.is_some(),
                            }
                        }
                        // Pending: the agent may not know the entry yet; wait for the deadline.
                        None if deadline.is_some() => continue,
                        None => SpiffeChange::Fallback,
                    }
                }
                Some(Update::Error(e)) => {
                    report(&name, &e, &mut failing);
                    continue;
                }
            },
            _ = sleep_until(deadline) => {
                deadline = None;
                tracing::warn!(endpoint = %name, wait = ?fallback_wait,
                    "no SVID from the agent in time");
                SpiffeChange::Fallback
            }
        };
        let registered = matches!(change, SpiffeChange::Registered { .. });
        match handle.set_spiffe(name.clone(), uid.clone(), change).await {
            // The SVID's key stays in memory for the handshakes of the endpoint's identity.
            Ok(Some(rec)) => match &svid {
                Some(s) => keys.set(&name, rec.identity, s),
                None => keys.remove(&name),
            },
            // The endpoint went (or was recreated): its subscription is being stopped.
            Ok(None) => {
                keys.remove(&name);
                return;
            }
            Err(crate::NetdError::Stopped { .. }) => return,
            Err(e) => {
                keys.remove(&name);
                tracing::error!(endpoint = %name, error = %e, "applying the endpoint's SPIFFE identity");
                // An SVID that cannot be the endpoint's label (an ID the label syntax refuses)
                // is no SVID: classic labels rather than pending for ever.
                if registered {
                    let _ = handle
                        .set_spiffe(name.clone(), uid.clone(), SpiffeChange::Fallback)
                        .await;
                }
            }
        }
    }
}

fn report(name: &str, e: &AgentError, failing: &mut bool) {
    if matches!(e, AgentError::PermissionDenied { .. }) {
        tracing::error!(endpoint = %name, error = %e, "the agent refuses netd; identities kept, retrying");
    } else if !*failing {
        tracing::warn!(endpoint = %name, error = %e, "SVID stream from the agent failed; identity kept, retrying");
    } else {
        tracing::debug!(endpoint = %name, error = %e, "SVID stream from the agent still failing");
    }
    *failing = true;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The start-up check of spiffe mode: a refusal by the agent stops netd; an unreachable agent
/// does not (endpoints fall back after the wait and are upgraded when it comes).
pub async fn check_agent(client: &Client) -> anyhow::Result<()> {
    match tokio::time::timeout(Duration::from_secs(5), client.check()).await {
        Ok(Ok(())) => {
            tracing::info!(agent_socket = %client.socket().display(), "the agent serves netd as a delegate");
            Ok(())
        }
        Ok(Err(AgentError::PermissionDenied { message, .. })) => anyhow::bail!(
            "sigil-netd is not an authorized delegate of the agent at {}: register an entry for it and add its SPIFFE ID to the agent's authorized_delegates ({message})",
            client.socket().display()
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the agent is not available; new endpoints fall back to their classic labels after the wait");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(agent_socket = %client.socket().display(), "the agent did not answer within 5s; new endpoints fall back to their classic labels after the wait");
            Ok(())
        }
    }
}
