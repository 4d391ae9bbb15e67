//! The byte format of `save-state`, so counters survive a hot reload.
//!
//! All integers are little-endian; a string is a `u32` byte length followed
//! by UTF-8 bytes.
//!
//! ```text
//! magic      b"PLPM"
//! format     u16 = 2 (1: without the last three sections)
//! bounds     u32 count, then u64 microseconds each   (latency buckets)
//! requests   u32 count, then (string model, string version, string status, u64 count) each
//! durations  u32 count, then (string model, string version, string stage, histogram) each
//! batches    u32 count, then (string model, string version, histogram) each
//! mirrored   u32 count, then (string primary, string model, string status, u64 count) each
//! agreement  u32 count, then (string primary, string model, string result, u64 count) each
//! nested     u32 count, then (string parent, string model, string status, u64 count) each
//! histogram  u32 bucket count, then u64 each; u64 sum; u64 count
//! ```
//!
//! A later format bumps `format`; `decode` refuses formats it does not know,
//! and the host then keeps the fresh, empty state.

use std::collections::BTreeMap;
use std::fmt;

use crate::{BATCH_BUCKETS, BatchKey, CounterKey, DurationKey, Histogram, PrometheusMetrics};

const MAGIC: &[u8; 4] = b"PLPM";
const FORMAT: u16 = 2;

/// What `decode` reads back.
pub(crate) struct Saved {
    pub(crate) bounds_us: Vec<u64>,
    pub(crate) requests: BTreeMap<CounterKey, u64>,
    pub(crate) durations: BTreeMap<DurationKey, Histogram>,
    pub(crate) batch_sizes: BTreeMap<BatchKey, Histogram>,
    pub(crate) mirrored: BTreeMap<CounterKey, u64>,
    pub(crate) agreement: BTreeMap<CounterKey, u64>,
    pub(crate) nested: BTreeMap<CounterKey, u64>,
}

/// Why a state cannot be decoded.
#[derive(Debug, PartialEq)]
pub(crate) struct DecodeError(String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn encode(metrics: &PrometheusMetrics) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    put_len(&mut out, metrics.bounds_us.len());
    for bound in &metrics.bounds_us {
        put_u64(&mut out, *bound);
    }
    put_len(&mut out, metrics.requests.len());
    for ((model, version, status), count) in &metrics.requests {
        put_str(&mut out, model);
        put_str(&mut out, version);
        put_str(&mut out, status);
        put_u64(&mut out, *count);
    }
    put_len(&mut out, metrics.durations.len());
    for ((model, version, stage), histogram) in &metrics.durations {
        put_str(&mut out, model);
        put_str(&mut out, version);
        put_str(&mut out, stage);
        put_histogram(&mut out, histogram);
    }
    put_len(&mut out, metrics.batch_sizes.len());
    for ((model, version), histogram) in &metrics.batch_sizes {
        put_str(&mut out, model);
        put_str(&mut out, version);
        put_histogram(&mut out, histogram);
    }
    for counters in [&metrics.mirrored, &metrics.agreement, &metrics.nested] {
        put_len(&mut out, counters.len());
        for ((a, b, c), count) in counters {
            put_str(&mut out, a);
            put_str(&mut out, b);
            put_str(&mut out, c);
            put_u64(&mut out, *count);
        }
    }
    out
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Saved, DecodeError> {
    let mut reader = Reader { rest: bytes };
    if reader.take(4)? != MAGIC {
        return Err(DecodeError(
            "not a prometheus-metrics state (bad magic)".to_owned(),
        ));
    }
    let format = u16::from_le_bytes(reader.array()?);
    if format != FORMAT && format != 1 {
        return Err(DecodeError(format!(
            "state format {format} is not supported (this version reads 1 and {FORMAT})"
        )));
    }
    let n_bounds = reader.len()?;
    let bounds_us = (0..n_bounds)
        .map(|_| reader.u64())
        .collect::<Result<Vec<_>, _>>()?;

    let mut requests = BTreeMap::new();
    for _ in 0..reader.len()? {
        let key = (reader.string()?, reader.string()?, reader.string()?);
        requests.insert(key, reader.u64()?);
    }
    let mut durations = BTreeMap::new();
    for _ in 0..reader.len()? {
        let key = (reader.string()?, reader.string()?, reader.string()?);
        durations.insert(key, reader.histogram(n_bounds + 1)?);
    }
    let mut batch_sizes = BTreeMap::new();
    for _ in 0..reader.len()? {
        let key = (reader.string()?, reader.string()?);
        batch_sizes.insert(key, reader.histogram(BATCH_BUCKETS.len() + 1)?);
    }
    let mut mirrored = BTreeMap::new();
    let mut agreement = BTreeMap::new();
    let mut nested = BTreeMap::new();
    if format >= 2 {
        for counters in [&mut mirrored, &mut agreement, &mut nested] {
            for _ in 0..reader.len()? {
                let key = (reader.string()?, reader.string()?, reader.string()?);
                counters.insert(key, reader.u64()?);
            }
        }
    }
    if !reader.rest.is_empty() {
        return Err(DecodeError(format!(
            "{} unexpected bytes after the state",
            reader.rest.len()
        )));
    }
    Ok(Saved {
        bounds_us,
        requests,
        durations,
        batch_sizes,
        mirrored,
        agreement,
        nested,
    })
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Lengths come from strings and maps far below 4 GiB in a 32-bit guest.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, value: &str) {
    put_len(out, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn put_histogram(out: &mut Vec<u8>, histogram: &Histogram) {
    put_len(out, histogram.counts.len());
    for count in &histogram.counts {
        put_u64(out, *count);
    }
    put_u64(out, histogram.sum);
    put_u64(out, histogram.count);
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError(format!(
                "truncated: needed {n} more bytes, {} left",
                self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N)?;
        let mut array = [0; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self) -> Result<usize, DecodeError> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        // Every item takes at least one byte, so a longer count is garbage;
        // checking here keeps a corrupt count from driving a huge loop.
        if len > self.rest.len() {
            return Err(DecodeError(format!(
                "count {len} exceeds the {} bytes left",
                self.rest.len()
            )));
        }
        Ok(len)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.len()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|err| DecodeError(format!("a label is not UTF-8: {err}")))
    }

    fn histogram(&mut self, expected_buckets: usize) -> Result<Histogram, DecodeError> {
        let n_buckets = self.len()?;
        if n_buckets != expected_buckets {
            return Err(DecodeError(format!(
                "a histogram has {n_buckets} buckets, expected {expected_buckets}"
            )));
        }
        let counts = (0..n_buckets)
            .map(|_| self.u64())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Histogram {
            counts,
            sum: self.u64()?,
            count: self.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use plinth_plugin_sdk::prelude::*;

    use super::*;
    use crate::tests::{event, plugin};

    #[test]
    fn mirror_counters_survive_a_reload_and_format_1_still_reads() {
        let mut old = plugin(&[]);
        let mirrored = |agree| MirrorEvent {
            primary_model: "m".into(),
            primary_version: Some("1".into()),
            model: "shadow".into(),
            version: Some("1".into()),
            status: RequestStatus::Ok,
            latency_us: 10,
            primary_latency_us: 12,
            agree: Some(agree),
        };
        old.record_mirrors(vec![mirrored(true), mirrored(true), mirrored(false)]);
        let text = old.render();
        assert!(
            text.contains("plinth_mirror_requests_total{primary=\"m\",model=\"shadow\",status=\"ok\"} 3\n")
                && text.contains("plinth_mirror_agreement_total{primary=\"m\",model=\"shadow\",result=\"agree\"} 2\n")
                && text.contains("plinth_mirror_agreement_total{primary=\"m\",model=\"shadow\",result=\"disagree\"} 1\n"),
            "{text}"
        );
        let mut new = plugin(&[]);
        new.restore_state(&old.save_state()).unwrap();
        assert_eq!(new.render(), text);
        // A state saved by the previous version (format 1) has no mirror
        // sections: it restores with none.
        let mut v1 = plugin(&[]);
        v1.record(vec![event(Some("1"), RequestStatus::Ok, 700)]);
        let mut bytes = v1.save_state();
        bytes[4..6].copy_from_slice(&1u16.to_le_bytes());
        bytes.truncate(bytes.len() - 12);
        let mut restored = plugin(&[]);
        restored.restore_state(&bytes).unwrap();
        assert_eq!(restored.render(), v1.render());
    }

    #[test]
    fn state_round_trips_through_a_reload() {
        let mut old = plugin(&[]);
        old.record(vec![
            event(Some("1"), RequestStatus::Ok, 700),
            event(Some("2"), RequestStatus::Unavailable, 3),
        ]);
        let state = old.save_state();
        let mut new = plugin(&[]);
        new.restore_state(&state).unwrap();
        assert_eq!(new.render(), old.render());
        new.record(vec![event(Some("1"), RequestStatus::Ok, 700)]);
        assert!(new.render().contains("status=\"ok\"} 2\n"));
    }

    #[test]
    fn changed_buckets_keep_counters_only() {
        let mut old = plugin(&[]);
        old.record(vec![event(Some("1"), RequestStatus::Ok, 700)]);
        let mut new = plugin(&[("buckets", "1")]);
        new.restore_state(&old.save_state()).unwrap();
        assert_eq!(new.requests, old.requests);
        assert_eq!(new.batch_sizes, old.batch_sizes);
        assert!(new.durations.is_empty());
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let mut metrics = plugin(&[]);
        let err = metrics.restore_state(b"nope").unwrap_err();
        assert_eq!(
            err.message(),
            "cannot restore metrics state: not a prometheus-metrics state (bad magic)"
        );
        let mut good = plugin(&[]);
        good.record(vec![event(Some("1"), RequestStatus::Ok, 700)]);
        let state = good.save_state();
        for cut in 0..state.len() {
            assert!(
                decode(&state[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let mut future = state.clone();
        future[4] = 9;
        assert_eq!(
            decode(&future).err().unwrap().to_string(),
            "state format 9 is not supported (this version reads 1 and 2)"
        );
        let mut huge_count = state;
        huge_count[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge_count).is_err());
    }
}
