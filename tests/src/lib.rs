//! End-to-end tests across sigil processes; see `tests/` beside this file. The library part holds the
//! minimal in-tree test agent that speaks the agent API over real TLS.
