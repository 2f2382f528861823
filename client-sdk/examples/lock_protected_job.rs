//! A job guarded by a lock, with fencing.
//!
//! Several copies of this program may run at once (on different machines, say); the lock makes
//! sure only one does the job at a time. The lock alone is not enough: a holder can pause (GC,
//! swap, a slow disk) past its session's TTL, lose the lock, wake up and keep writing while the
//! next holder writes too. So every write carries the lock's fencing token, and the resource
//! (here `FencedStore`, standing in for a database or a storage service) refuses a write whose
//! token is older than one it has seen, or that the cluster says is no longer current
//! (`ValidateToken`).
//!
//! Run it against a local cluster (`syncctl dev up` in another terminal):
//!
//! ```text
//! cargo run -p sync-client --example lock_protected_job
//! SYNC_ENDPOINTS=10.0.0.5:7001 cargo run -p sync-client --example lock_protected_job
//! ```

use std::sync::Mutex;
use std::time::Duration;

use sync_client::{Client, Error, LockGuard};

/// The lock that serializes the job.
pub const LOCK: &str = "jobs/nightly-report";

/// A resource that accepts writes only from the current holder of `LOCK`.
struct FencedStore {
    client: Client,
    /// The highest token seen so far: older ones belong to holders that lost the lock.
    highest: Mutex<u64>,
    rows: Mutex<Vec<String>>,
}

impl FencedStore {
    async fn write(&self, token: u64, row: String) -> Result<(), String> {
        {
            let mut highest = self.highest.lock().map_err(|_| "store poisoned")?;
            if token < *highest {
                return Err(format!("token {token} is older than {highest}; refused"));
            }
            *highest = token;
        }
        // A resource that can afford a round trip asks the cluster too: this catches a holder
        // whose session expired even when no newer holder has written yet.
        match self.client.validate_token(LOCK, token).await {
            Ok(true) => {}
            Ok(false) => return Err(format!("token {token} is no longer current; refused")),
            Err(e) => return Err(format!("cannot check token {token}: {e}")),
        }
        self.rows.lock().map_err(|_| "store poisoned")?.push(row);
        Ok(())
    }
}

/// The job: a few writes, each fenced with the guard's token.
async fn run_job(guard: &LockGuard, store: &FencedStore) -> Result<(), String> {
    for step in 1..=3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        store
            .write(
                guard.token(),
                format!("step {step} by token {}", guard.token()),
            )
            .await?;
        println!("step {step} written with token {}", guard.token());
    }
    Ok(())
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The job ran under the lock: the fencing token it used and the rows it wrote.
    Done {
        /// The lock's fencing token during the job.
        token: u64,
        /// Rows the store accepted.
        rows: usize,
    },
    /// Another copy held the lock for the whole wait.
    Busy,
}

/// Takes the lock (waiting up to `wait`), runs the job with fenced writes, releases the lock.
pub async fn run(client: &Client, wait: Duration) -> Result<Outcome, Box<dyn std::error::Error>> {
    let store = FencedStore {
        client: client.clone(),
        highest: Mutex::new(0),
        rows: Mutex::new(Vec::new()),
    };

    let session = client.session(Duration::from_secs(10)).await?;
    let guard = match session.lock(LOCK).timeout(wait).acquire().await {
        Ok(guard) => guard,
        Err(Error::Timeout { .. }) => {
            println!("another copy has been running the job for {wait:?}; giving up");
            return Ok(Outcome::Busy);
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "acquired {LOCK} with token {} (session {})",
        guard.token(),
        session.id()
    );

    // Stop at once if the session is lost: the lock is gone, and the store would refuse the
    // next write anyway.
    tokio::select! {
        outcome = run_job(&guard, &store) => outcome?,
        _ = session.lost() => return Err("lost the lock's session in the middle of the job".into()),
    }
    let token = guard.token();
    guard.release().await?;
    let rows = store.rows.lock().map_err(|_| "store poisoned")?.len();
    println!("job done: {rows} rows written; lock released");
    Ok(Outcome::Done { token, rows })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoints = std::env::var("SYNC_ENDPOINTS")
        .unwrap_or_else(|_| "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".to_owned());
    let client = Client::builder(endpoints.split(','))
        .client_name(format!("nightly-report (pid {})", std::process::id()))
        .connect()
        .await?;
    run(&client, Duration::from_secs(30)).await?;
    Ok(())
}
