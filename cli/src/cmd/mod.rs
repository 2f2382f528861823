//! One module per command (group) that talks to a cluster or runs one; `bench` has its own
//! folder.

pub mod admin;
pub mod cache;
pub mod completions;
pub mod dev;
pub mod lock;
pub mod queue;
pub mod session;
pub mod status;
