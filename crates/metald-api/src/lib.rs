//! Generated gRPC types and stubs for `metald.v1`, shared by the daemon and its clients.

/// The `metald.v1` package: VM lifecycle messages and the `VmService` client and server.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("metald.v1");
}
