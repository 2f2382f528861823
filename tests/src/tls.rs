//! TLS material for a TLS test cluster, made with rcgen in a temporary directory: a CA, one
//! certificate for every node (valid for `127.0.0.1` and `localhost`, for both server and client
//! authentication, since nodes present it to each other), a client certificate signed by the CA,
//! and a client certificate signed by another CA that the cluster must refuse.
//!
//! The fault proxies between nodes relay bytes, so TLS between peers passes through them
//! untouched; the nodes reach each other at `127.0.0.1:<proxy port>`, which the node certificate
//! names.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The files of one TLS setup; removed when dropped.
#[derive(Debug)]
pub struct TlsMaterial {
    /// Holds the files.
    dir: tempfile::TempDir,
}

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

fn make_ca(name: &str) -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

/// Signs a leaf certificate for `names` with `usages`; returns (cert PEM, key PEM).
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    common_name: &str,
    names: &[&str],
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> anyhow::Result<(String, String)> {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl TlsMaterial {
    /// Makes a CA, a node certificate, a client certificate, and a client certificate of
    /// another CA.
    pub fn generate() -> anyhow::Result<TlsMaterial> {
        let dir = tempfile::Builder::new()
            .prefix("syncd-tls-")
            .tempdir()
            .context("cannot create the TLS material's directory")?;
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text)
                .with_context(|| format!("cannot write {name}"))
        };
        let ca = make_ca("syncd test CA")?;
        write("ca.pem", &ca.pem())?;
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let (cert, key) = leaf(
            &ca,
            "syncd node",
            &["127.0.0.1", "localhost"],
            vec![ServerAuth, ClientAuth],
        )?;
        write("node.pem", &cert)?;
        write("node-key.pem", &key)?;
        let (cert, key) = leaf(&ca, "syncd test client", &[], vec![ClientAuth])?;
        write("client.pem", &cert)?;
        write("client-key.pem", &key)?;
        let rogue = make_ca("another CA")?;
        let (cert, key) = leaf(&rogue, "client of another CA", &[], vec![ClientAuth])?;
        write("rogue.pem", &cert)?;
        write("rogue-key.pem", &key)?;
        Ok(TlsMaterial { dir })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Every node's certificate and key.
    pub fn node(&self) -> CertFiles {
        self.files("node")
    }

    /// A client certificate signed by the CA.
    pub fn client(&self) -> CertFiles {
        self.files("client")
    }

    /// A client certificate signed by another CA: refused by a cluster with
    /// `--client-cert-auth`.
    pub fn rogue_client(&self) -> CertFiles {
        self.files("rogue")
    }

    fn files(&self, name: &str) -> CertFiles {
        CertFiles {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
        }
    }

    /// The TLS flags of every node.
    pub fn node_args(&self, client_cert_auth: bool) -> Vec<String> {
        let node = self.node();
        let mut args = vec![
            format!("--cert-file={}", node.cert.display()),
            format!("--key-file={}", node.key.display()),
            format!("--trusted-ca-file={}", self.ca().display()),
        ];
        if client_cert_auth {
            args.push("--client-cert-auth".to_string());
        }
        args
    }

    /// What the harness's own clients use: the CA and the client certificate.
    pub fn client_config(&self) -> anyhow::Result<ClientTlsConfig> {
        let read =
            |p: PathBuf| std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()));
        let client = self.client();
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(self.ca())?))
            .identity(Identity::from_pem(read(client.cert)?, read(client.key)?)))
    }
}
