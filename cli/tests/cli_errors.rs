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
        &["member", "add", "0", "127.0.0.1:7004"],
        &["member", "add", "4", "not-an-endpoint"],
        &["leader", "transfer", "--to", "two"],
        &["cache", "set", "k1", "v1", "--if-version", "-1"],
        &["cache", "set", "k1", "v1", "--ttl", "0s"],
        &["cache", "get", "k1", "--node", "0"],
        &["completions", "powershell"],
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

/// The subcommands a `--help` page lists under "Commands:", without `help`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim_end() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        // Entries are indented by two spaces; deeper indentation continues a description.
        .filter(|line| line.starts_with("  ") && !line.starts_with("   "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn help_shows_examples_for_every_command() {
    // Walks the whole command tree as a person would, `--help` page by page, from the top.
    let mut pending: Vec<Vec<String>> = vec![Vec::new()];
    let mut seen = Vec::new();
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let output = syncctl(&args);
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(
            help.contains("Examples:"),
            "`syncctl {}` has no Examples: section:\n{help}",
            path.join(" ")
        );
        assert!(
            help.contains("  syncctl "),
            "`syncctl {}` has no example command:\n{help}",
            path.join(" ")
        );
        for sub in subcommands(&help) {
            let mut next = path.clone();
            next.push(sub);
            pending.push(next);
        }
        seen.push(path.join(" "));
    }
    // The walk must really have gone down the tree, to the leaves of every group.
    for leaf in [
        "status",
        "dev up",
        "bench raw",
        "lock run",
        "queue publish",
        "member add",
        "member promote",
        "member remove",
        "leader transfer",
        "snapshot",
        "cache get",
        "cache set",
        "cache del",
        "cache state",
        "cache stats",
        "completions",
    ] {
        assert!(
            seen.iter().any(|s| s == leaf),
            "`{leaf}` not reached: {seen:?}"
        );
    }
}

#[test]
fn top_level_help_documents_the_exit_codes() {
    let output = syncctl(&["--help"]);
    let help = String::from_utf8_lossy(&output.stdout);
    let codes = help
        .split("Exit codes:")
        .nth(1)
        .unwrap_or_else(|| panic!("no Exit codes: section:\n{help}"));
    for code in [
        "0  ok",
        "1  error",
        "2  usage",
        "3  a lock was not acquired",
    ] {
        assert!(codes.contains(code), "exit code `{code}` missing:\n{help}");
    }
    assert!(codes.contains("--if-version"), "{help}");
}

#[test]
fn completions_for_each_shell_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let output = syncctl(&["completions", shell]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{shell}: {}",
            stderr(&output)
        );
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(!script.trim().is_empty(), "{shell}: empty script");
        for word in [
            "member",
            "leader",
            "snapshot",
            "cache",
            "queue",
            "lock",
            "--if-version",
        ] {
            assert!(
                script.contains(word),
                "{shell} script does not mention {word}"
            );
        }
    }
    // bash itself accepts the bash script.
    let script = syncctl(&["completions", "bash"]).stdout;
    let path = std::env::temp_dir().join(format!("syncctl-completion-{}.bash", std::process::id()));
    std::fs::write(&path, &script).unwrap();
    let checked = Command::new("bash").arg("-n").arg(&path).output();
    std::fs::remove_file(&path).ok();
    let checked = checked.expect("cannot run bash");
    assert!(
        checked.status.success(),
        "bash -n rejects the script: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    // An unsupported shell is a usage error.
    assert_eq!(syncctl(&["completions", "tcsh"]).status.code(), Some(2));
}

#[test]
fn a_closed_pipe_does_not_crash_completions() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncctl"))
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    assert_ne!(
        output.status.code(),
        Some(101),
        "panicked: {}",
        stderr(&output)
    );
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
}
