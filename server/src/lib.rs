//! syncd
pub mod raft;
pub mod state;
pub mod storage;
