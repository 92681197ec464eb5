//! Shared test helpers: a controllable clock, free ports, and launchers for sigil processes that wait on
//! readiness checks instead of sleeping.

pub mod agent;
pub mod clock;
pub mod netd;
pub mod process;

pub use agent::AgentProcess;
pub use clock::ManualClock;
pub use netd::NetdProcess;
pub use process::{ServerProcess, free_port, sigil_bin};
