//! Generated gRPC types and stubs for `metald.v1`, shared by the daemon and its clients, and
//! [`connect`], which dials a metald endpoint (`unix:PATH` or `tcp:HOST:PORT`).

/// The `metald.v1` package: VM lifecycle messages and the `VmService` client and server.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("metald.v1");
}

/// The encoded `FileDescriptorSet` of `metald.v1` and what it imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/metald_descriptor.bin"));

/// The service's full name, as the gRPC health service and reflection know it.
pub const SERVICE_NAME: &str = "metald.v1.VmService";

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// A client of `metald.v1.VmService`.
pub type Client = v1::vm_service_client::VmServiceClient<Channel>;

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint is neither `unix:PATH` nor `tcp:HOST:PORT`.
    #[error("endpoint {0:?} must be unix:PATH or tcp:HOST:PORT")]
    BadEndpoint(String),
    /// Dialing failed.
    #[error("connecting to {endpoint}: {source}")]
    Transport {
        /// The endpoint.
        endpoint: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Connects to metald at `unix:PATH` (its default) or `tcp:HOST:PORT`.
pub async fn connect(endpoint: &str) -> Result<Client, ConnectError> {
    connect_with(endpoint, |e| e).await
}

/// Like [`connect`], with the connection's settings changed by `tune` first (its HTTP/2
/// windows, say, as a test or benchmark of a slow reader needs).
pub async fn connect_with(
    endpoint: &str,
    tune: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Client, ConnectError> {
    let transport = |source| ConnectError::Transport {
        endpoint: endpoint.to_string(),
        source,
    };
    let channel = if let Some(path) = endpoint.strip_prefix("unix:") {
        let path = std::path::PathBuf::from(path);
        // tonic wants a URI; the connector below ignores it and dials the socket.
        tune(Endpoint::from_static("http://metald.invalid"))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(transport)?
    } else if let Some(addr) = endpoint.strip_prefix("tcp:") {
        tune(Endpoint::from_shared(format!("http://{addr}")).map_err(transport)?)
            .connect()
            .await
            .map_err(transport)?
    } else {
        return Err(ConnectError::BadEndpoint(endpoint.to_string()));
    };
    Ok(v1::vm_service_client::VmServiceClient::new(channel))
}
