//! # sync-tests
//!
//! Cluster-level tests of syncd against real `syncd` processes: a harness that starts nodes on
//! free ports with temporary data directories, kills, pauses and restarts them, and cuts links.
//! The engine-level guarantees are tested in `server/` (unit tests, scenario tests and the
//! deterministic simulator); this crate holds the tests that need real processes and sockets,
//! which arrive with the node runtime.
