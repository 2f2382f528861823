//! TLS configuration mistakes stop a real `syncd` process at start, with exit code 2 and one
//! line that names the flag and the file: a certificate without its key, a file that is not
//! PEM, a key that is not a key, a missing file, `--client-cert-auth` without a CA. (The TLS
//! cluster itself is tested end to end, SDK and syncctl included, in `cli/tests/tls.rs`.)

use std::process::Command;

use sync_tests::TlsMaterial;

#[test]
fn bad_tls_configurations_exit_non_zero_with_one_line_naming_the_flag_and_file() {
    let syncd = sync_tests::syncd_binary().expect("a syncd binary");
    let material = TlsMaterial::generate().expect("TLS material");
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-pem.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let node = material.node();
    let ca = material.ca();
    let flag = |name: &str, path: &std::path::Path| format!("--{name}={}", path.display());
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            vec![flag("cert-file", &node.cert), flag("trusted-ca-file", &ca)],
            vec![
                "--cert-file".into(),
                node.cert.display().to_string(),
                "--key-file".into(),
            ],
        ),
        (
            vec![
                flag("cert-file", &not_pem),
                flag("key-file", &node.key),
                flag("trusted-ca-file", &ca),
            ],
            vec![
                "--cert-file".into(),
                not_pem.display().to_string(),
                "PEM".into(),
            ],
        ),
        (
            vec![
                flag("cert-file", &node.cert),
                flag("key-file", &not_pem),
                flag("trusted-ca-file", &ca),
            ],
            vec![
                "--key-file".into(),
                not_pem.display().to_string(),
                "private key".into(),
            ],
        ),
        (
            vec![
                flag("cert-file", &node.cert),
                flag("key-file", &node.key),
                flag("trusted-ca-file", &missing),
            ],
            vec!["--trusted-ca-file".into(), missing.display().to_string()],
        ),
        (
            vec![
                flag("cert-file", &node.cert),
                flag("key-file", &node.key),
                "--client-cert-auth".into(),
            ],
            vec!["--client-cert-auth".into(), "--trusted-ca-file".into()],
        ),
    ];
    for (i, (tls_args, expected)) in cases.into_iter().enumerate() {
        let out = Command::new(&syncd)
            .args([
                "--id=1",
                "--initial-cluster=1=127.0.0.1:1",
                &format!(
                    "--data-dir={}",
                    dir.path().join(format!("data-{i}")).display()
                ),
            ])
            .args(&tls_args)
            .env_remove("SYNCD_CERT_FILE")
            .env_remove("SYNCD_KEY_FILE")
            .env_remove("SYNCD_TRUSTED_CA_FILE")
            .env_remove("SYNCD_CLIENT_CERT_AUTH")
            .output()
            .expect("syncd runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{tls_args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{tls_args:?}: one line: {stderr:?}"
        );
        for word in &expected {
            assert!(
                stderr.contains(word.as_str()),
                "{tls_args:?}: {stderr:?} should name {word:?}"
            );
        }
    }
}
