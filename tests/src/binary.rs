//! Finding (and building) the `syncd` binary the tests run.
//!
//! The tests are `cargo test` binaries at `<target>/<profile>/deps/<test>-<hash>`; the server
//! binary belongs next to them at `<target>/<profile>/syncd`. Cargo builds the binaries of a
//! package only for that package's own integration tests, so `cargo test -p sync-tests` alone
//! would run whatever `syncd` was built last, possibly from older sources. The harness therefore
//! asks cargo once per test process to bring `syncd` up to date in the same target directory and
//! profile (a no-op taking a fraction of a second when it is fresh). Cargo's own lock on the
//! target directory serializes test processes that do this at the same time; a `OnceLock`
//! serializes the tests of one process.
//!
//! `SYNCD_BIN=/path/to/syncd` skips all of this and runs that binary as it is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The path of an up-to-date `syncd`, or one message saying why there is none.
pub fn syncd() -> Result<PathBuf, String> {
    static SYNCD: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    SYNCD.get_or_init(locate_or_build).clone()
}

fn locate_or_build() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("SYNCD_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("SYNCD_BIN={} is not a file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the test binary: {e}"))?;
    let (target_dir, profile_dir) = dirs_of(&exe).ok_or_else(|| {
        format!(
            "the test binary {} is not in <target>/<profile>/deps/; set SYNCD_BIN to a syncd \
             binary",
            exe.display()
        )
    })?;
    let binary = profile_dir.join(format!("syncd{}", std::env::consts::EXE_SUFFIX));
    build(&target_dir, &profile_dir)?;
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "cargo built syncd, but {} does not exist",
            binary.display()
        ))
    }
}

/// `(<target>, <target>/<profile>)` from `<target>/<profile>/deps/<test>`.
fn dirs_of(exe: &Path) -> Option<(PathBuf, PathBuf)> {
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    let profile_dir = deps.parent()?;
    let target_dir = profile_dir.parent()?;
    Some((target_dir.to_path_buf(), profile_dir.to_path_buf()))
}

/// Runs `cargo build -p syncd --bin syncd` into `target_dir` with the profile whose output
/// directory is `profile_dir`.
fn build(target_dir: &Path, profile_dir: &Path) -> Result<(), String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .args(["build", "--quiet", "-p", "syncd", "--bin", "syncd"])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    // `debug` is the output directory of the `dev` profile; every other profile's directory
    // bears its name.
    match profile_dir.file_name().and_then(|p| p.to_str()) {
        Some("debug") | None => {}
        Some(profile) => {
            command.args(["--profile", profile]);
        }
    }
    // `cargo test` runs each test binary with its package's CARGO_MANIFEST_DIR, CARGO_PKG_*
    // and friends set. ring's build script watches CARGO_MANIFEST_DIR, so a nested build that
    // inherited them saw ring "changed" and rebuilt ring, rustls, tonic and syncd once per test
    // package, each time the value differed from the previous build's. The nested build gets
    // the environment of a build started from a shell.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || matches!(
                name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_BIN_NAME"
            )
        {
            command.env_remove(name);
        }
    }
    let shown = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building syncd failed ({}), so no cluster test can run.\ncommand: {shown}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_and_profile_come_from_the_test_binary_path() {
        let (target, profile) = dirs_of(Path::new("/w/target/debug/deps/partition-0123")).unwrap();
        assert_eq!(target, Path::new("/w/target"));
        assert_eq!(profile, Path::new("/w/target/debug"));
        assert!(dirs_of(Path::new("/usr/bin/partition")).is_none());
    }
}
