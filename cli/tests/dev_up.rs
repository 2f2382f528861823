//! `syncctl dev up` with the real `syncd`: three nodes start, elect a leader, `syncctl status`
//! sees all of them agree on it, and Ctrl-C (SIGINT) stops every node and frees every port.
//!
//! `dev up` runs the `syncd` binary found next to `syncctl` (target/debug/syncd): build it with
//! `cargo build -p syncd` (`cargo test --workspace` does).

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const NODES: u16 = 3;
/// From start to a leader: process start, then an election (syncd's default timeout is 1 s).
const LEADER_WAIT: Duration = Duration::from_secs(60);
/// From SIGINT to `dev up` exiting: at most its 10 s grace period, then SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// A base port such that the gRPC ports (base+1..) and metrics ports (base+2001..) are free,
/// all below Linux's ephemeral range (32768 and up), so no outgoing connection takes one.
fn free_base_port() -> u16 {
    let seed = std::process::id() as u16;
    for attempt in 0..200u16 {
        let base = 10_000 + (seed.wrapping_add(attempt.wrapping_mul(97)) % 18_000);
        let ports = (1..=NODES).flat_map(|i| [base + i, base + 2000 + i]);
        let listeners: Vec<_> = ports.map(|p| TcpListener::bind(("127.0.0.1", p))).collect();
        if listeners.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("no free range of ports found");
}

/// The running `dev up`; stops it (and so its nodes) if the test fails half-way.
struct DevUp {
    child: Child,
    stdout: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl DevUp {
    fn start(base: u16, data_dir: &std::path::Path) -> DevUp {
        let mut child = Command::new(env!("CARGO_BIN_EXE_syncctl"))
            .args(["dev", "up", "--nodes", &NODES.to_string()])
            .args(["--base-port", &base.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--output", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run syncctl");
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            sink.lock().unwrap().push_str(&text);
        });
        DevUp {
            child,
            stdout,
            stderr,
        }
    }

    /// The next JSON event on stdout, within `timeout`.
    fn next_event(&self, timeout: Duration) -> Value {
        match self.stdout.recv_timeout(timeout) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON event ({e}): {line}")),
            Err(RecvTimeoutError::Timeout) => panic!(
                "no event from `dev up` within {timeout:?}; stderr so far:\n{}",
                self.stderr()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                thread::sleep(Duration::from_millis(200));
                panic!("`dev up` exited early; stderr:\n{}", self.stderr())
            }
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }
}

impl Drop for DevUp {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGINT lets it stop its nodes; SIGKILL after that leaves them to the parent-death
            // signal.
            self.signal(libc::SIGINT);
            let deadline = Instant::now() + STOP_WAIT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn status_json(endpoints: &str) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_syncctl"))
        .args(["--endpoints", endpoints, "--output", "json", "status"])
        .output()
        .expect("cannot run syncctl status");
    assert!(
        output.status.success(),
        "syncctl status failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("status --output json is not JSON")
}

fn process_exists(pid: i64) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[test]
fn dev_up_starts_a_cluster_that_elects_a_leader_and_stops_on_ctrl_c() {
    let data = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let dev = DevUp::start(base, data.path());

    // The nodes as started.
    let started = dev.next_event(LEADER_WAIT);
    assert_eq!(started["event"], "started", "{started}");
    let nodes = started["nodes"].as_array().expect("nodes").clone();
    assert_eq!(nodes.len(), NODES as usize);
    let pids: Vec<i64> = nodes.iter().map(|n| n["pid"].as_i64().unwrap()).collect();
    let endpoints: Vec<String> = (1..=NODES)
        .map(|i| format!("127.0.0.1:{}", base + i))
        .collect();
    for (node, endpoint) in nodes.iter().zip(&endpoints) {
        assert_eq!(node["endpoint"], endpoint.as_str());
    }

    // The leader line.
    let leader = dev.next_event(LEADER_WAIT);
    assert_eq!(
        leader["event"],
        "leader",
        "{leader}\nstderr:\n{}",
        dev.stderr()
    );
    let leader_id = leader["id"].as_u64().unwrap();
    assert!((1..=u64::from(NODES)).contains(&leader_id), "{leader}");

    // `status` reaches every node; they converge on that leader (a follower learns of it with
    // the leader's first heartbeat, so allow a moment).
    let joined = endpoints.join(",");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = status_json(&joined);
        let agreed = status["nodes"].as_array().is_some_and(|nodes| {
            nodes.len() == NODES as usize
                && nodes
                    .iter()
                    .all(|n| n["reachable"] == true && n["leader_id"] == leader_id)
        });
        if agreed || Instant::now() > deadline {
            break status;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let reported = status["nodes"].as_array().expect("nodes");
    assert_eq!(reported.len(), NODES as usize, "{status}");
    for node in reported {
        assert_eq!(node["reachable"], true, "{node}");
        assert_eq!(node["leader_id"], leader_id, "{node}");
        assert_eq!(
            node["members"].as_array().map(Vec::len),
            Some(NODES as usize),
            "{node}"
        );
    }
    let leaders: Vec<_> = reported.iter().filter(|n| n["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "{status}");
    assert_eq!(leaders[0]["id"], leader_id);

    // Ctrl-C: `dev up` stops every node and exits cleanly.
    dev.signal(libc::SIGINT);
    let mut dev = dev;
    let deadline = Instant::now() + STOP_WAIT;
    let exit = loop {
        if let Some(exit) = dev.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "`dev up` still running {STOP_WAIT:?} after SIGINT"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let mut stopped = 0;
    while let Ok(line) = dev.stdout.recv_timeout(Duration::from_secs(1)) {
        let event: Value = serde_json::from_str(&line).unwrap();
        match event["event"].as_str() {
            Some("stopped") => stopped += 1,
            other => panic!("unexpected event {other:?}: {event}"),
        }
    }
    assert!(
        exit.success(),
        "`dev up` exited with {exit}; stderr:\n{}",
        dev.stderr()
    );
    assert_eq!(
        stopped, NODES,
        "every node reports a clean stop (none killed)"
    );

    for pid in pids {
        assert!(!process_exists(pid), "node pid {pid} still exists");
    }
    for endpoint in &endpoints {
        assert!(
            TcpStream::connect(endpoint).is_err(),
            "{endpoint} still accepts connections"
        );
    }
}
