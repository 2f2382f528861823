//! A real `redis-server` for the bench tests: started on a free port with no persistence
//! (`--save '' --appendonly no`), so it writes nothing to disk, and killed when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a started server gets to answer PING; generous for a loaded machine.
const READY_WITHIN: Duration = Duration::from_secs(30);

pub struct RedisServer {
    child: Child,
    port: u16,
    /// Its working directory (where it would put files, if it wrote any).
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` and waits until it answers PING.
    pub fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = tempfile::tempdir()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (apt-get install redis-server)")?;
        let mut server = RedisServer {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if server.ping() {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("redis-server on port {port} exited at start: {status}");
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {port} did not answer PING within {READY_WITHIN:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// One command in RESP inline form; its raw answer.
    pub fn command(&self, line: &str) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(format!("{line}\r\n").as_bytes())?;
        let mut buffer = [0u8; 4096];
        let n = stream.read(&mut buffer)?;
        Ok(String::from_utf8_lossy(&buffer[..n]).into_owned())
    }

    fn ping(&self) -> bool {
        self.command("PING")
            .is_ok_and(|answer| answer.starts_with("+PONG"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
