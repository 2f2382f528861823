//! Generates the etcd v3 client used by `syncctl bench raw|locks --compare-etcd`, from the
//! subset of etcd's API vendored under `proto/etcd/`, with the protoc binary shipped by
//! `protoc-bin-vendored` (so a fresh machine needs no system protoc). syncd's own protos come
//! compiled from the `sync-proto` crate.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let root = PathBuf::from("proto/etcd");
    let protos = [
        root.join("etcdserverpb/rpc.proto"),
        root.join("mvccpb/kv.proto"),
        root.join("v3lockpb/v3lock.proto"),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }

    tonic_prost_build::configure()
        // Only the client side: syncctl talks to etcd, it never serves etcd's API.
        .build_server(false)
        // `bytes` fields become `bytes::Bytes`, as in sync-proto, so that both benchmark targets
        // share one value buffer per run instead of copying it per request.
        .bytes(".")
        .compile_protos(&protos, &[root])?;
    Ok(())
}
