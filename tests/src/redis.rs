//! A real `redis-server` for the cache's Redis backend: started on a free loopback port in a
//! temporary directory, with every write fsynced before it is acknowledged (`--appendonly yes
//! --appendfsync always`, no RDB snapshots), so that a restart loses nothing acknowledged.
//! [`RedisServer::stop`] and [`RedisServer::start_again`] keep the port and the directory; the
//! process is killed on drop (and with the test process, see `die_with_parent`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::harness::{die_with_parent, free_port};
use crate::wait::eventually;

/// How long a starting redis-server may take to answer PING (it replays its append-only file).
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// One redis-server process (or its stopped remains: port and data).
pub struct RedisServer {
    /// Where it listens; the same across restarts so that nodes reconnect to it.
    addr: SocketAddr,
    /// Its working directory: the append-only file and its log.
    dir: tempfile::TempDir,
    /// The process, while it runs.
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a redis-server on a free port and waits until it answers.
    pub async fn start() -> anyhow::Result<RedisServer> {
        let mut server = RedisServer::stopped()?;
        server.start_again().await?;
        Ok(server)
    }

    /// A server that has not started yet: its port and directory are chosen, so nodes can be
    /// pointed at it before it runs.
    pub fn stopped() -> anyhow::Result<RedisServer> {
        Ok(RedisServer {
            addr: free_port()?,
            dir: tempfile::Builder::new()
                .prefix("syncd-redis-")
                .tempdir()
                .context("cannot create a temp dir for redis-server")?,
            child: None,
        })
    }

    /// `redis://127.0.0.1:PORT`, for `--cache-backend`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Starts the process (again) on the same port and directory and waits until it answers
    /// PING, its append-only file replayed.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("redis-server on {} is already running", self.addr);
        }
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.addr.port().to_string())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                "--dir",
            ])
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        let child = command
            .spawn()
            .context("cannot start redis-server (install the Debian package redis-server)")?;
        self.child = Some(child);
        let what = format!("redis-server on {} to answer PING", self.addr);
        eventually(&what, START_TIMEOUT, async || {
            let pong = self.cli(&["PING"]).await?;
            if pong != "PONG" {
                bail!("answered {pong:?}");
            }
            Ok(())
        })
        .await
    }

    /// Stops the process with SIGTERM and waits for it to exit. Every acknowledged write is in
    /// the append-only file (fsynced before the reply), so a SIGKILL would lose nothing either.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on a pid we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let exited = tokio::task::spawn_blocking(move || child.wait())
            .await
            .context("waiting for redis-server")?
            .context("waiting for redis-server")?;
        if !exited.success() {
            bail!("redis-server exited with {exited}");
        }
        Ok(())
    }

    /// Runs `redis-cli` against the server and returns its trimmed output (raw mode: values as
    /// stored, one per line).
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.addr.port().to_string())
            .arg("--raw")
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .context("cannot run redis-cli")?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || text.starts_with("Could not connect") {
            bail!(
                "redis-cli {args:?}: {text} {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(text)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
