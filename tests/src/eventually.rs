//! The one bounded wait of the tests: every loop that waits for the server to
//! reach a state goes through [`eventually`], so that a stuck server fails
//! the test with what was awaited and what was last seen, instead of hanging
//! `cargo test` (which has no timeout of its own).

use std::fmt::Display;
use std::time::Duration;

/// How long a test waits for the server to reach a state. It bounds hangs;
/// it is not a speed assertion: waits that take milliseconds on this
/// machine get a minute, so a slow CI machine never fails a correct build.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The pause between two attempts that saw "not yet".
const INTERVAL: Duration = Duration::from_millis(10);

/// What one attempt of [`eventually`] found: done with a value, or not yet,
/// with a description of what it observed (for the failure message).
pub trait Attempt {
    type Value;
    fn into_outcome(self) -> Result<Self::Value, String>;
}

/// `Some(value)`: done. `None`: not yet, with nothing more to report.
impl<T> Attempt for Option<T> {
    type Value = T;
    fn into_outcome(self) -> Result<T, String> {
        self.ok_or_else(|| "None (the attempt reports no detail)".to_owned())
    }
}

/// `Ok(value)`: done. `Err(observed)`: not yet, and `observed` is what the
/// attempt saw (a status, a count, a body).
impl<T, E: Display> Attempt for Result<T, E> {
    type Value = T;
    fn into_outcome(self) -> Result<T, String> {
        self.map_err(|observed| observed.to_string())
    }
}

/// Runs `attempt` until it reports done, pausing briefly between attempts,
/// and returns its value. Panics after `timeout` (counting an attempt that
/// is itself still pending, such as a stream that never yields) with `what`
/// and the last thing an attempt observed.
///
/// The attempt is an async closure, so it may hold on to state between
/// attempts (a stream, a client, the events seen so far):
///
/// ```text
/// let status = eventually(PATIENCE, "model 'm' READY", async || {
///     let status = srv.status("m").await;
///     if status.state == ModelState::Ready as i32 { Ok(status) } else { Err(format!("{status:?}")) }
/// })
/// .await;
/// ```
pub async fn eventually<A: Attempt>(
    timeout: Duration,
    what: &str,
    mut attempt: impl AsyncFnMut() -> A,
) -> A::Value {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("nothing (no attempt finished)");
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(outcome) => match outcome.into_outcome() {
                Ok(value) => return value,
                Err(observed) => last = observed,
            },
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what}: an attempt was still pending; last observed: {last}"
            ),
        }
        if tokio::time::Instant::now() + INTERVAL >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last observed: {last}");
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_value_of_the_first_attempt_that_is_done() {
        let mut n = 0;
        let got = eventually(PATIENCE, "the third attempt", async || {
            n += 1;
            if n == 3 {
                Ok(n)
            } else {
                Err(format!("attempt {n}"))
            }
        })
        .await;
        assert_eq!(got, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for a count of 5; last observed: count 2")]
    async fn names_what_was_awaited_and_the_last_observation() {
        let mut n = 0;
        eventually(Duration::from_millis(50), "a count of 5", async || {
            n = (n + 1).min(2);
            Err::<(), _>(format!("count {n}"))
        })
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for a stream event: an attempt was still pending")]
    async fn bounds_an_attempt_that_never_finishes() {
        eventually(Duration::from_millis(50), "a stream event", async || {
            std::future::pending::<Option<()>>().await
        })
        .await;
    }
}
