//! TLS towards the cluster: the CA that signed the nodes' certificates, an optional client
//! certificate (for nodes started with `--client-cert-auth`), and an optional server name.
//!
//! The PEM material is checked when the client connects ([`ClientBuilder::connect`]), so bad
//! PEM is an [`Error::Tls`] naming what is wrong, never a panic or a failure at the first call.
//!
//! [`ClientBuilder::connect`]: crate::ClientBuilder::connect

use std::fmt;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result, innermost};

/// TLS settings for [`ClientBuilder::tls`](crate::ClientBuilder::tls).
///
/// With them every connection the client opens (to the given endpoints and to the members it
/// discovers) uses `https` and verifies the node's certificate against the CA, with the address
/// it connects to (host name or IP) as the expected name unless
/// [`domain_name`](TlsOptions::domain_name) overrides it.
///
/// ```no_run
/// # async fn demo() -> sync_client::Result<()> {
/// use sync_client::{Client, TlsOptions};
///
/// let tls = TlsOptions::from_ca_file("certs/ca.pem")?
///     // Only for nodes started with --client-cert-auth:
///     .identity_files("certs/client.pem", "certs/client-key.pem")?;
/// let client = Client::builder(["10.0.0.5:7001", "10.0.0.6:7001", "10.0.0.7:7001"])
///     .tls(tls)
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsOptions {
    /// PEM of the CA certificate(s) the nodes' certificates must chain to.
    ca: Vec<u8>,
    /// PEM of the client certificate (chain) and its private key.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name expected in the nodes' certificates, instead of the host of each address.
    domain: Option<String>,
}

impl fmt::Debug for TlsOptions {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsOptions")
            .field("client_identity", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Tls {
        reason: format!("cannot read the {what} {}: {e}", path.display()),
    })
}

/// Checks that `pem` holds at least one certificate and nothing malformed.
fn check_certificates(what: &str, pem: &[u8]) -> Result<()> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| Error::Tls {
            reason: format!("the {what} is not valid PEM: {e}"),
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::Tls {
            reason: format!("the {what} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        });
    }
    Ok(())
}

impl TlsOptions {
    /// Trust the nodes whose certificates chain to this CA certificate (PEM; several may be
    /// concatenated).
    pub fn from_ca_pem(pem: impl Into<Vec<u8>>) -> TlsOptions {
        TlsOptions {
            ca: pem.into(),
            identity: None,
            domain: None,
        }
    }

    /// [`from_ca_pem`](TlsOptions::from_ca_pem) with the PEM read from a file. Fails with
    /// [`Error::Tls`] if the file cannot be read.
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<TlsOptions> {
        Ok(TlsOptions::from_ca_pem(read(
            "CA certificate file",
            path.as_ref(),
        )?))
    }

    /// Present this client certificate (PEM, leaf first) and private key (PEM: PKCS#8, PKCS#1
    /// or SEC1). Nodes started with `--client-cert-auth` refuse clients without one.
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> TlsOptions {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// [`identity_pem`](TlsOptions::identity_pem) with both read from files.
    pub fn identity_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<TlsOptions> {
        let cert = read("client certificate file", cert.as_ref())?;
        let key = read("client key file", key.as_ref())?;
        Ok(self.identity_pem(cert, key))
    }

    /// Expect this name in every node's certificate instead of the host (or IP) of the address
    /// connected to: for nodes reached through addresses their certificates do not name.
    pub fn domain_name(mut self, name: impl Into<String>) -> TlsOptions {
        self.domain = Some(name.into());
        self
    }

    /// Whether a client certificate is presented ([`identity_pem`](TlsOptions::identity_pem)).
    pub fn presents_certificate(&self) -> bool {
        self.identity.is_some()
    }

    /// A tonic endpoint for the node at `address` (`host:port`) with these settings, for tools
    /// that call the generated clients ([`crate::api`]) directly. Checks the PEM material each
    /// time; fails with [`Error::Tls`] if it is unusable.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint> {
        self.build()?.endpoint(address)
    }

    /// Checks the PEM material and builds tonic's settings from it.
    pub(crate) fn build(&self) -> Result<ClientTls> {
        check_certificates("CA certificate", &self.ca)?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca));
        if let Some((cert, key)) = &self.identity {
            check_certificates("client certificate", cert)?;
            PrivateKeyDer::from_pem_slice(key).map_err(|e| Error::Tls {
                reason: format!(
                    "the client key holds no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
                ),
            })?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        let tls = ClientTls {
            config,
            presents_certificate: self.identity.is_some(),
        };
        // Building a connector once checks what parsing alone cannot.
        tls.endpoint("127.0.0.1:1")?;
        Ok(tls)
    }
}

/// Checked TLS settings, ready for every connection the client opens.
#[derive(Clone)]
pub(crate) struct ClientTls {
    config: ClientTlsConfig,
    /// Whether `config` holds a client certificate: without one, a closed connection most
    /// likely means the server requires one ([`crate::error::describe_tls_cause`]).
    pub(crate) presents_certificate: bool,
}

impl fmt::Debug for ClientTls {
    // tonic's own Debug would print the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// An `https` endpoint for `address` (`host:port`).
    fn endpoint(&self, address: &str) -> Result<Endpoint> {
        let endpoint = Endpoint::from_shared(format!("https://{address}")).map_err(|e| {
            Error::InvalidEndpoint {
                endpoint: address.to_owned(),
                reason: e.to_string(),
            }
        })?;
        endpoint
            .tls_config(self.config.clone())
            .map_err(|e| Error::Tls {
                reason: innermost(&e),
            })
    }
}

/// The endpoint for a member at `address` (`host:port`): `https` with `tls`, else `http`.
pub(crate) fn endpoint(address: &str, tls: Option<&ClientTls>) -> Result<Endpoint> {
    match tls {
        Some(tls) => tls.endpoint(address),
        None => {
            Endpoint::from_shared(format!("http://{address}")).map_err(|e| Error::InvalidEndpoint {
                endpoint: address.to_owned(),
                reason: e.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_a_typed_error_naming_the_part() {
        let e = TlsOptions::from_ca_pem("not a certificate")
            .build()
            .unwrap_err();
        assert!(matches!(e, Error::Tls { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("CA certificate holds no PEM certificate"),
            "{e}"
        );
        let garbled = "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n";
        let e = TlsOptions::from_ca_pem(garbled).build().unwrap_err();
        assert!(e.to_string().contains("not valid PEM"), "{e}");
        let e = TlsOptions::from_ca_file("/nonexistent/ca.pem").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
