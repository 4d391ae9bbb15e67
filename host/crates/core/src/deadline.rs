//! Request deadlines: the `grpc-timeout` header read by the gRPC grammar,
//! and deadlines that saturate instead of overflowing.
//!
//! The grammar (gRPC over HTTP/2): `TimeoutValue TimeoutUnit`, where the
//! value is one to eight ASCII digits and the unit one of `H` (hours), `M`
//! (minutes), `S` (seconds), `m` (milliseconds), `u` (microseconds) or `n`
//! (nanoseconds). Anything else is not a timeout.

use std::time::{Duration, Instant};

use crate::error::Error;

/// The most digits a `grpc-timeout` value may have.
pub const GRPC_TIMEOUT_MAX_DIGITS: usize = 8;

/// How far ahead a deadline may lie: one that would be later (or overflow
/// `Instant`) is this far instead, which no request outlives.
pub const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A `grpc-timeout` header value as a duration; `None` when it does not
/// follow the grammar (surrounding spaces and tabs, which HTTP allows
/// around a field value, are ignored).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let value = value.trim_matches([' ', '\t']);
    // Splitting on a byte index is safe: the unit must be one ASCII byte.
    let (&unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty()
        || digits.len() > GRPC_TIMEOUT_MAX_DIGITS
        || !digits.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    // At most eight digits: fits in u64 with room for the unit's factor.
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-timeout` entry of a request's metadata (gRPC metadata is a
/// header), read by the gRPC grammar; `None` when absent or malformed.
pub fn grpc_timeout(metadata: &[(String, String)]) -> Option<Duration> {
    let (_, value) = metadata.iter().find(|(key, _)| key == "grpc-timeout")?;
    parse_grpc_timeout(value)
}

/// The `timeout` request parameter, as Triton reads it: microseconds the
/// request may wait in the model's queue. `None` when absent.
pub fn queue_timeout(value: Option<&str>) -> Result<Option<Duration>, Error> {
    let Some(text) = value else {
        return Ok(None);
    };
    match text.trim().parse::<u64>() {
        Ok(us) if us > 0 => Ok(Some(Duration::from_micros(us))),
        _ => Err(Error::InvalidArgument(format!(
            "parameter 'timeout': expected a positive number of microseconds, got {text:?}"
        ))),
    }
}

/// `now + budget`, saturated at [`FAR_FUTURE`] from now: never panics.
pub fn deadline_after(now: Instant, budget: Duration) -> Instant {
    let budget = budget.min(FAR_FUTURE);
    now.checked_add(budget)
        .or_else(|| now.checked_add(Duration::from_secs(24 * 3600)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_unit() {
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout(" 5S\t"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }

    /// The values that once panicked (a multibyte last character split
    /// inside it; a value past `Instant`'s range), and the rest of what the
    /// grammar refuses.
    #[test]
    fn refuses_what_the_grammar_does_not_allow_without_panicking() {
        for bad in [
            "",
            "S",
            "5",
            "5x",
            "-1S",
            "+1S",
            "1.5S",
            "1 S",
            "5é",
            "é",
            "5\u{1F600}",
            "123456789S",
            "18446744073709551615S",
            "0x10S",
            "５S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeout_is_read_from_the_metadata() {
        let read = |value: &str| grpc_timeout(&[("grpc-timeout".to_owned(), value.to_owned())]);
        assert_eq!(read("250m"), Some(Duration::from_millis(250)));
        assert_eq!(read("5é"), None);
        assert_eq!(grpc_timeout(&[]), None);
        assert_eq!(
            queue_timeout(Some("1500")).unwrap(),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(queue_timeout(None).unwrap(), None);
        assert!(queue_timeout(Some("0")).is_err());
    }

    #[test]
    fn deadlines_saturate() {
        let now = Instant::now();
        assert_eq!(
            deadline_after(now, Duration::from_secs(2)),
            now + Duration::from_secs(2)
        );
        assert_eq!(deadline_after(now, Duration::MAX), now + FAR_FUTURE);
        let longest = parse_grpc_timeout("99999999H").unwrap();
        assert_eq!(deadline_after(now, longest), now + FAR_FUTURE);
    }
}
