//! Bounded waiting: every wait in these tests polls with a deadline and, when the deadline
//! passes, says what it waited for and why the last check said "not yet".

use std::time::Duration;

use tokio::time::Instant;

/// How often [`eventually`] checks.
pub const POLL: Duration = Duration::from_millis(25);

/// Calls `check` every [`POLL`] until it returns `Ok`, and returns that value. An `Err` from
/// `check` means "not yet" and gives the reason. After `timeout` (including time spent inside
/// `check`, which is cut short if it runs past the deadline) the error names `what` and the last
/// reason.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("never checked");
    loop {
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(reason)) => last = format!("{reason:#}"),
            Err(_) => last = format!("the last check was still running ({last})"),
        }
        if Instant::now() + POLL >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_first_success() {
        let mut calls = 0;
        let v = eventually("three calls", Duration::from_secs(2), async || {
            calls += 1;
            if calls < 3 {
                anyhow::bail!("only {calls}")
            }
            Ok(calls)
        })
        .await
        .unwrap();
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn eventually_gives_up_with_the_last_reason() {
        let e = eventually("the impossible", Duration::from_millis(100), async || {
            anyhow::bail!("still impossible") as anyhow::Result<()>
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("the impossible") && e.contains("still impossible"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn eventually_cuts_a_hanging_check_short() {
        let started = Instant::now();
        let r = eventually("a hang", Duration::from_millis(100), async || {
            std::future::pending::<()>().await;
            Ok(())
        })
        .await;
        assert!(r.is_err());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
