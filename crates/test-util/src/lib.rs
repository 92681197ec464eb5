//! Shared test helpers: a controllable clock, certificate fixtures, free ports, launchers for sigil processes that wait on
//! readiness checks instead of sleeping, network-namespace helpers and a multi-node topology.
#![forbid(unsafe_code)]

pub mod agent;
pub mod certs;
pub mod clock;
pub mod cluster;
pub mod etcd;
pub mod metrics;
pub mod netd;
pub mod netns;
pub mod process;
pub mod root;
pub mod topology;

pub use agent::AgentProcess;
pub use certs::TestCa;
pub use clock::ManualClock;
pub use cluster::{ClusterNode, TestCluster, wait_for};
pub use etcd::{EtcdServer, can_run_etcd};
pub use netd::NetdProcess;
pub use netns::TestNetns;
pub use process::{Children, ServerProcess, free_port, sigil_bin};
#[cfg(feature = "bpf")]
pub use root::can_run_with_bpffs;
pub use root::{can_run_as_root, can_run_as_root_and, skip_unless};
pub use topology::{Endpoint, Node, Topology};
