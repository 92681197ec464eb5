//! The cluster's shared state in etcd: identities, nodes, IPCache.
//!
//! Everything lives under `sigil/<cluster>/`. Each node holds one lease, kept alive by a task;
//! the keys it owns (its node entry, identity references, IPCache entries, pod CIDR) are bound
//! to it, so a node that dies loses them within the lease TTL. Watches list, then watch from the
//! listed revision, and list again after etcd comes back.
#![forbid(unsafe_code)]

pub mod error;
pub mod identity;
pub mod ipcache;
mod keys;
pub mod nodes;
pub mod store;
pub mod watch;

pub use error::KvError;
pub use identity::{ClusterAllocator, GcReport, IdentityEvent};
pub use ipcache::{IpCacheEntry, IpCacheEvent};
pub use nodes::{Cidr, NodeEvent, NodeInfo};
pub use store::{Config, KvStore};
pub use watch::Watch;
