//! The built `syncctl` binary fails the way a person can act on: one line naming the cause and
//! what to do, exit code 1 for errors and 2 for usage mistakes; and its help shows examples.

use std::process::{Command, Output};

fn syncctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_syncctl"))
        .args(args)
        // The caller's environment must not change the endpoints under test.
        .env_remove("SYNC_ENDPOINTS")
        .output()
        .expect("cannot run syncctl")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn an_unreachable_cluster_is_one_line_with_a_hint_and_exit_code_1() {
    let output = syncctl(&["status", "--endpoints", "127.0.0.1:1"]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "stderr: {err}");
    assert!(output.stdout.is_empty(), "nothing on stdout on failure");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.ends_with('\n'));
    assert!(
        err.starts_with("error: no member reachable at 127.0.0.1:1: connection refused;"),
        "{err}"
    );
    assert!(err.contains("syncctl dev up"), "no hint: {err}");
}

#[test]
fn json_output_does_not_change_the_error() {
    let output = syncctl(&["status", "--endpoints", "127.0.0.1:1", "--output", "json"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr(&output).lines().count(), 1);
}

#[test]
fn bench_against_an_unreachable_cluster_fails_fast() {
    let output = syncctl(&[
        "bench",
        "raw",
        "--endpoints",
        "127.0.0.1:1",
        "--duration",
        "1s",
    ]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.contains("no member reachable at 127.0.0.1:1"), "{err}");
}

#[test]
fn usage_mistakes_exit_with_2() {
    for args in [
        &["status", "--endpoints", "not-an-endpoint"][..],
        &["no-such-command"],
        &["bench", "raw", "--clients", "0"],
        &["dev", "up", "--base-port", "65000"],
    ] {
        let output = syncctl(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn help_shows_examples_for_every_command() {
    for args in [
        &["--help"][..],
        &["status", "--help"],
        &["dev", "--help"],
        &["dev", "up", "--help"],
        &["bench", "--help"],
        &["bench", "raw", "--help"],
    ] {
        let output = syncctl(args);
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            help.contains("Examples:"),
            "{args:?} has no examples:\n{help}"
        );
        assert!(
            help.contains("  syncctl "),
            "{args:?} has no example command:\n{help}"
        );
    }
}
