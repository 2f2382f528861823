//! # The cache runtime (in progress)
//!
//! - [`wire`]: the protocol's messages as protobuf, for the transport between nodes.

pub mod wire;
