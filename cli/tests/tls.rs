//! TLS end to end, against one real 3-node cluster started with `--cert-file`, `--key-file`,
//! `--trusted-ca-file` and `--client-cert-auth` (certificates made by rcgen, see
//! `sync_tests::tls`): the nodes elect a leader over mutual TLS (through the fault proxies, which
//! pass the TLS bytes through); a follower forwards a write to the leader over TLS; the SDK with
//! the CA and a client certificate writes and reads; the SDK without a certificate, with one of
//! another CA, or in plaintext is refused with an error that says why; syncctl with
//! `--cacert --cert --cert-key` works and without `--cacert` fails with one line and exit code 1.
//!
//! The SDK's checks live here rather than in `client-sdk/tests` so that one cluster serves both
//! clients (each start costs seconds).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use sync_client::{Client, Error, TlsOptions};
use sync_tests::api::Consistency;
use sync_tests::{Cluster, Options, TlsMaterial, scenario};

mod common;

use common::{fails, run};

const LIMIT: Duration = Duration::from_secs(60);

/// An SDK client of the cluster with `tls`, short timeouts (a refused handshake is not retried
/// into a long wait).
async fn sdk(c: &Cluster, tls: Option<TlsOptions>) -> sync_client::Result<Client> {
    let addresses: Vec<String> = c
        .ids()
        .iter()
        .map(|&id| c.address(id).to_string())
        .collect();
    let builder = Client::builder(addresses)
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(2))
        .deadline(Duration::from_secs(3));
    match tls {
        Some(tls) => builder.tls(tls),
        None => builder,
    }
    .connect()
    .await
}

/// The refusal of a client the cluster does not accept: `Unavailable`, with a reason that
/// contains `expected`.
fn refused(result: sync_client::Result<Client>, expected: &str) -> anyhow::Result<String> {
    match result {
        Ok(_) => anyhow::bail!("the client connected; expected a refusal ({expected})"),
        Err(e @ Error::Unavailable { .. }) => {
            let text = e.to_string();
            ensure!(text.contains(expected), "{text:?} should say {expected:?}");
            ensure!(!text.contains('\n'), "one line: {text:?}");
            Ok(text)
        }
        Err(e) => anyhow::bail!("expected Unavailable ({expected}), got {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutual_tls_cluster_serves_the_sdk_and_syncctl_with_certificates_and_refuses_the_rest() {
    let material = Arc::new(TlsMaterial::generate().expect("TLS material"));
    let options = Options::default().with_tls(material.clone(), true);
    scenario(3, options, LIMIT, async |c| {
        // The harness's own clients speak TLS with the client certificate: the nodes answered
        // Cluster.Status to start at all. Electing a leader needs the peers' mutual TLS.
        let leader = c.wait_for_leader(Duration::from_secs(10)).await?;
        let follower = c
            .ids()
            .into_iter()
            .find(|&id| id != leader.id)
            .context("a follower")?;

        // A follower forwards a write to the leader over TLS, presenting its own certificate.
        c.client(follower)
            .put(None, "forwarded", "over-tls")
            .await
            .context("a write through a follower")?;
        let read = c
            .client(leader.id)
            .get("forwarded", Consistency::Linearizable)
            .await?;
        ensure!(read.value.as_ref() == b"over-tls", "{read:?}");

        // The SDK with the CA and a client certificate signed by it.
        let client = material.client();
        let tls =
            TlsOptions::from_ca_file(material.ca())?.identity_files(&client.cert, &client.key)?;
        let sdk_client = sdk(c, Some(tls)).await.context("SDK over mutual TLS")?;
        let session = sdk_client.session(Duration::from_secs(20)).await?;
        let guard = session.lock("tls/lock").exclusive().acquire().await?;
        let state = sdk_client.get_lock("tls/lock").await?;
        ensure!(
            state.holders.iter().any(|h| h.session_id == session.id()),
            "{state:?}"
        );

        // Refused: no client certificate, a certificate of another CA, plaintext.
        let ca_only = TlsOptions::from_ca_file(material.ca())?;
        let text = refused(sdk(c, Some(ca_only)).await, "requires a client certificate")?;
        eprintln!("without a client certificate: {text}");
        let rogue = material.rogue_client();
        let rogue =
            TlsOptions::from_ca_file(material.ca())?.identity_files(&rogue.cert, &rogue.key)?;
        let text = refused(sdk(c, Some(rogue)).await, "TLS: ")?;
        eprintln!("with another CA's certificate: {text}");
        let text = refused(sdk(c, None).await, "TLS")?;
        eprintln!("plaintext: {text}");
        // Bad PEM is a typed error before any connection.
        let bad = TlsOptions::from_ca_pem("garbage");
        match sdk(c, Some(bad)).await {
            Err(Error::Tls { reason }) => ensure!(reason.contains("CA certificate"), "{reason}"),
            other => anyhow::bail!("expected Error::Tls, got {other:?}"),
        }

        // syncctl with --cacert, --cert and --cert-key works.
        let ca = material.ca().display().to_string();
        let cert = client.cert.display().to_string();
        let key = client.key.display().to_string();
        let tls_args = ["--cacert", &ca, "--cert", &cert, "--cert-key", &key];
        let mut status_args = vec!["status", "--output", "json"];
        status_args.extend(tls_args);
        let out = run(c, &status_args).await?;
        ensure!(
            out.status.success(),
            "syncctl status over TLS: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        ensure!(status.to_string().contains("leader"), "{status}");
        let mut get_args = vec!["lock", "get", "tls/lock", "--output", "json"];
        get_args.extend(tls_args);
        let out = run(c, &get_args).await?;
        let session_id = session.id().to_string();
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&session_id),
            "syncctl lock get over TLS: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The environment works as the flags do.
        let out = common::syncctl(c, &["lock", "get", "tls/lock"])
            .env("SYNC_CACERT", &ca)
            .env("SYNC_CERT", &cert)
            .env("SYNC_CERT_KEY", &key)
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "syncctl with SYNC_CACERT/SYNC_CERT/SYNC_CERT_KEY: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Without --cacert (plaintext to a TLS port) and without a client certificate: one
        // line, exit code 1, naming the cause.
        for args in [
            vec!["status"],
            vec!["lock", "get", "tls/lock"],
            vec!["lock", "get", "tls/lock", "--cacert", &ca],
        ] {
            let err = fails(c, &args, 1).await?;
            eprintln!("syncctl {args:?}: {err}");
            ensure!(
                err.contains("TLS") || err.contains("certificate"),
                "syncctl {args:?} should name TLS or the certificate: {err}"
            );
            // With the CA but no certificate, whichever way the refusal reaches the client (the
            // alert, or the closed socket first), the line says what is missing.
            if args.contains(&"--cacert") {
                ensure!(
                    err.contains("requires a client certificate"),
                    "syncctl {args:?} should say a client certificate is required: {err}"
                );
            }
        }
        guard.release().await?;
        Ok(())
    })
    .await;
}
