//! TLS on the gRPC port, for clients and for the other nodes.
//!
//! One set of flags serves both kinds of traffic, because nodes and clients share the port:
//!
//! - `--cert-file` / `--key-file`: the node's certificate (chain) and private key. With them the
//!   port speaks only TLS, and the node connects to its peers (Raft, cache protocol, forwarded
//!   calls) over TLS too.
//! - `--trusted-ca-file`: the CA that signs the nodes' certificates. A node verifies every peer it
//!   connects to against it (so it is required with `--cert-file`), and, with
//!   `--client-cert-auth`, every client's certificate as well.
//! - `--client-cert-auth`: a caller without a certificate signed by the trusted CA is refused
//!   during the handshake. Nodes always present their own certificate to peers, so node
//!   certificates must allow both server and client authentication (extended key usages
//!   `serverAuth` and `clientAuth`).
//!
//! Everything is read and checked when the node starts ([`NodeTls::load`]), so a missing file,
//! a cert without its key or a PEM that is not one stops the node with one line naming the flag
//! and the file, instead of failing at the first handshake.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use super::config::ConfigError;

/// The TLS flags as given (paths, not yet read).
#[derive(Clone, Debug, Default)]
pub struct TlsFlags {
    /// `--cert-file`.
    pub cert_file: Option<PathBuf>,
    /// `--key-file`.
    pub key_file: Option<PathBuf>,
    /// `--trusted-ca-file`.
    pub trusted_ca_file: Option<PathBuf>,
    /// `--client-cert-auth`.
    pub client_cert_auth: bool,
}

/// The node's checked TLS material. Cloned into every connection the node opens to a peer.
#[derive(Clone)]
pub struct NodeTls {
    /// The node's certificate chain and key: served to callers, presented to peers.
    identity: Identity,
    /// The CA peers (and, with `client_cert_auth`, clients) are verified against.
    ca: Certificate,
    /// Whether callers must present a certificate signed by `ca`.
    client_cert_auth: bool,
}

impl fmt::Debug for NodeTls {
    // The key stays out of logs and panic messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("client_cert_auth", &self.client_cert_auth)
            .finish_non_exhaustive()
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Reads `path`, given as `flag`.
fn read(flag: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError(format!("cannot read {flag} {}: {e}", path.display())))
}

/// Checks that `pem` holds at least one certificate and nothing malformed.
fn check_certificates(flag: &str, path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        if let Err(e) = cert {
            return err(format!(
                "{flag} {} is not a valid PEM certificate file: {e}",
                path.display()
            ));
        }
        count += 1;
    }
    if count == 0 {
        return err(format!(
            "{flag} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(())
}

impl NodeTls {
    /// Reads and checks the TLS material; `None` when TLS is off (no TLS flag given).
    pub fn load(flags: &TlsFlags) -> Result<Option<NodeTls>, ConfigError> {
        let (cert_file, key_file) = match (&flags.cert_file, &flags.key_file) {
            (None, None) => {
                if flags.client_cert_auth {
                    return err(
                        "--client-cert-auth needs --cert-file, --key-file and --trusted-ca-file \
                         (client certificates are checked during the TLS handshake)",
                    );
                }
                if let Some(ca) = &flags.trusted_ca_file {
                    return err(format!(
                        "--trusted-ca-file {} is given without --cert-file and --key-file; TLS \
                         needs the node's certificate and key",
                        ca.display()
                    ));
                }
                return Ok(None);
            }
            (Some(cert), None) => {
                return err(format!(
                    "--cert-file {} needs --key-file (its private key)",
                    cert.display()
                ));
            }
            (None, Some(key)) => {
                return err(format!(
                    "--key-file {} needs --cert-file (the certificate of that key)",
                    key.display()
                ));
            }
            (Some(cert), Some(key)) => (cert, key),
        };
        let Some(ca_file) = &flags.trusted_ca_file else {
            return err(if flags.client_cert_auth {
                "--client-cert-auth needs --trusted-ca-file (the CA that signs client \
                 certificates)"
                    .to_string()
            } else {
                format!(
                    "--cert-file {} needs --trusted-ca-file: nodes connect to each other over TLS \
                     and verify each other's certificates against that CA",
                    cert_file.display()
                )
            });
        };
        let cert = read("--cert-file", cert_file)?;
        let key = read("--key-file", key_file)?;
        let ca = read("--trusted-ca-file", ca_file)?;
        check_certificates("--cert-file", cert_file, &cert)?;
        check_certificates("--trusted-ca-file", ca_file, &ca)?;
        if let Err(e) = PrivateKeyDer::from_pem_slice(&key) {
            return err(format!(
                "--key-file {} holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                key_file.display()
            ));
        }
        let tls = NodeTls {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
            client_cert_auth: flags.client_cert_auth,
        };
        // Building the acceptor checks what parsing alone cannot, such as a key that does not
        // belong to the certificate.
        if let Err(e) = tonic::transport::Server::builder().tls_config(tls.server_config()) {
            return err(format!(
                "--cert-file {} with --key-file {}: {}",
                cert_file.display(),
                key_file.display(),
                innermost(&e)
            ));
        }
        if let Err(e) = Endpoint::from_static("https://127.0.0.1:1").tls_config(tls.peer_config()) {
            return err(format!(
                "--trusted-ca-file {}: {}",
                ca_file.display(),
                innermost(&e)
            ));
        }
        Ok(Some(tls))
    }

    /// Whether callers must present a certificate signed by the trusted CA.
    pub fn client_cert_auth(&self) -> bool {
        self.client_cert_auth
    }

    /// The gRPC port's TLS: the node's identity, and the CA that client certificates must chain
    /// to when `--client-cert-auth` is on.
    pub fn server_config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone());
        if self.client_cert_auth {
            config.client_ca_root(self.ca.clone())
        } else {
            config
        }
    }

    /// TLS towards a peer: verify it against the trusted CA and present our own certificate
    /// (peers with `--client-cert-auth` require it; others do not ask for it).
    pub fn peer_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
    }
}

/// The deepest cause of an error, which is the one that names the problem.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut current = e;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// An endpoint for another node at `address` (`host:port`): `https` with the peer TLS settings
/// when TLS is on, plain `http` otherwise. Every connection a node opens to another node (Raft,
/// the cache protocol, forwarded calls) is made through this, so none of them can stay
/// plaintext when the port speaks TLS.
pub fn peer_endpoint(
    address: &str,
    tls: Option<&NodeTls>,
) -> Result<Endpoint, tonic::transport::Error> {
    match tls {
        None => Endpoint::from_shared(format!("http://{address}")),
        Some(tls) => {
            Endpoint::from_shared(format!("https://{address}"))?.tls_config(tls.peer_config())
        }
    }
}
