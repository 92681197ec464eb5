//! A prefix watch that survives etcd going away: it lists the prefix, watches from the listed
//! revision, and after any error (etcd down, history compacted) lists again and reports only the
//! difference, so a consumer sees one consistent stream of puts and deletes.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::KvError;
use crate::store::Inner;

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawEvent {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
        prev: Vec<u8>,
    },
    /// The consumer has seen the whole prefix as of now (after the first list, and again after
    /// each resync).
    Synced,
}

/// A stream of events of one watch; the watching task stops when this is dropped.
#[derive(Debug)]
pub struct Watch<T> {
    rx: mpsc::UnboundedReceiver<T>,
    task: JoinHandle<()>,
}

impl<T> Watch<T> {
    /// The next event; `None` once the store is gone.
    pub async fn next(&mut self) -> Option<T> {
        self.rx.recv().await
    }

    /// An event if one is ready now.
    pub fn try_next(&mut self) -> Option<T> {
        self.rx.try_recv().ok()
    }
}

impl<T> Drop for Watch<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching `prefix`; `map` turns raw events into the consumer's (or drops them).
pub(crate) fn spawn<T, F>(inner: Weak<Inner>, prefix: String, mut map: F) -> Watch<T>
where
    T: Send + 'static,
    F: FnMut(RawEvent) -> Option<T> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut state: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut backoff = Duration::from_millis(50);
        let mut emit = |ev: RawEvent| match map(ev) {
            Some(t) => tx.send(t).is_ok(),
            None => !tx.is_closed(),
        };
        loop {
            match run(&inner, &prefix, &mut state, &mut emit, &mut backoff).await {
                Ok(false) => return,
                Ok(true) => {}
                Err(e) => {
                    tracing::warn!(prefix = %prefix, error = %e, "etcd watch failed; resyncing")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    });
    Watch { rx, task }
}

/// One list + watch round. Ok(false): stop (consumer or store gone); Ok(true): resync.
async fn run(
    inner: &Weak<Inner>,
    prefix: &str,
    state: &mut BTreeMap<String, Vec<u8>>,
    emit: &mut impl FnMut(RawEvent) -> bool,
    backoff: &mut Duration,
) -> Result<bool, KvError> {
    let mut stream = {
        let Some(this) = inner.upgrade() else {
            return Ok(false);
        };
        let mut c = this.client.clone();
        let mut resp = this
            .call(
                "get (watch list)",
                c.get(prefix, Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let mut listed = BTreeMap::new();
        for kv in resp.take_kvs() {
            let Ok(key) = String::from_utf8(kv.key().to_vec()) else {
                continue;
            };
            listed.insert(key, kv.value().to_vec());
        }
        let gone: Vec<String> = state
            .keys()
            .filter(|k| !listed.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(prev) = state.remove(&key)
                && !emit(RawEvent::Delete { key, prev })
            {
                return Ok(false);
            }
        }
        for (key, value) in listed {
            if state.get(&key) != Some(&value) {
                state.insert(key.clone(), value.clone());
                if !emit(RawEvent::Put { key, value }) {
                    return Ok(false);
                }
            }
        }
        if !emit(RawEvent::Synced) {
            return Ok(false);
        }
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        let mut c = this.client.clone();
        this.call("watch", c.watch(prefix, Some(opts))).await?
    };
    *backoff = Duration::from_millis(50);
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            () = closed(inner) => return Ok(false),
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(true),
            Err(e) => {
                tracing::warn!(prefix, error = %e, "etcd watch stream broke; resyncing");
                return Ok(true);
            }
        };
        if resp.canceled() || resp.compact_revision() > 0 {
            tracing::warn!(
                prefix,
                reason = resp.cancel_reason(),
                "etcd watch cancelled; resyncing"
            );
            return Ok(true);
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = String::from_utf8(kv.key().to_vec()) else {
                continue;
            };
            let ok = match ev.event_type() {
                EventType::Put => {
                    let value = kv.value().to_vec();
                    state.insert(key.clone(), value.clone());
                    emit(RawEvent::Put { key, value })
                }
                EventType::Delete => match state.remove(&key) {
                    Some(prev) => emit(RawEvent::Delete { key, prev }),
                    None => true,
                },
            };
            if !ok {
                return Ok(false);
            }
        }
    }
}

/// Resolves when the store is dropped (checked once a second).
async fn closed(inner: &Weak<Inner>) {
    while inner.strong_count() > 0 {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
