//! Shared test helpers: a controllable clock, free ports, and launchers for sigil processes that wait on
//! readiness checks instead of sleeping.

pub mod agent;
pub mod clock;
pub mod process;

pub use agent::AgentProcess;
pub use clock::ManualClock;
pub use process::{ServerProcess, free_port, sigil_bin};
