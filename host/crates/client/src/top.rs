//! `plinth top`: a live view of a running server, from its metrics text
//! (`ComputeService/GetMetrics`, the same text as `/metrics`), read every
//! `--interval` over the client's connection. Rates and quantiles are taken
//! between two reads: requests per second from the request counters, p50
//! and p99 from the request-duration histogram's buckets.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::pb;
use crate::{CliResult, Client, Output, fail, table};

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Seconds between refreshes (and, with --once, between the two reads
    /// the rates are taken over).
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Print one frame and exit (for scripts).
    #[arg(long)]
    pub once: bool,
}

/// One sample of the exposition text: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of Prometheus text (comments skipped; a line that does not
/// parse is skipped too: a plugin's text is not ours to judge).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series.trim(), BTreeMap::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}')?;
            let mut labels = BTreeMap::new();
            let mut rest = body;
            while !rest.is_empty() {
                let (key, after) = rest.split_once("=\"")?;
                // A value ends at the first quote not escaped.
                let mut end = None;
                let mut escaped = false;
                for (i, c) in after.char_indices() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => {
                            end = Some(i);
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                let end = end?;
                labels.insert(
                    key.trim_start_matches(',').to_owned(),
                    after[..end].replace("\\\"", "\"").replace("\\\\", "\\"),
                );
                rest = after[end + 1..].trim_start_matches(',');
            }
            (name, labels)
        }
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// What one read says, summed per model (over versions) and per plugin.
#[derive(Debug, Default, Clone)]
struct Reading {
    at: Option<Instant>,
    /// model -> (requests, failures)
    requests: BTreeMap<String, (f64, f64)>,
    /// model -> upper bound -> cumulative count
    buckets: BTreeMap<String, BTreeMap<OrderedBound, f64>>,
    queued: BTreeMap<String, f64>,
    in_flight: BTreeMap<String, f64>,
    memory: BTreeMap<String, f64>,
    /// plugin -> (calls, failures, traps)
    plugins: BTreeMap<String, (f64, f64, f64)>,
}

/// A histogram bucket's `le`, ordered (`+Inf` last).
#[derive(Debug, Clone, Copy)]
struct OrderedBound(f64);
impl PartialEq for OrderedBound {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for OrderedBound {}
impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Reading {
    fn from_text(text: &str, at: Instant) -> Reading {
        let mut reading = Reading {
            at: Some(at),
            ..Reading::default()
        };
        for sample in parse(text) {
            let model = sample.labels.get("model").cloned().unwrap_or_default();
            match sample.name.as_str() {
                "plinth_model_requests_total" => {
                    let entry = reading.requests.entry(model).or_default();
                    entry.0 += sample.value;
                    if sample.labels.get("status").map(String::as_str) == Some("failure") {
                        entry.1 += sample.value;
                    }
                }
                "plinth_model_request_duration_seconds_bucket" => {
                    let le = match sample.labels.get("le").map(String::as_str) {
                        Some("+Inf") => f64::INFINITY,
                        Some(le) => match le.parse() {
                            Ok(le) => le,
                            Err(_) => continue,
                        },
                        None => continue,
                    };
                    *reading
                        .buckets
                        .entry(model)
                        .or_default()
                        .entry(OrderedBound(le))
                        .or_default() += sample.value;
                }
                "plinth_model_queue_requests" => {
                    *reading.queued.entry(model).or_default() += sample.value;
                }
                "plinth_model_inflight_requests" => {
                    *reading.in_flight.entry(model).or_default() += sample.value;
                }
                "plinth_model_memory_bytes" => {
                    *reading.memory.entry(model).or_default() += sample.value;
                }
                "plinth_plugin_calls_total" | "plinth_plugin_errors_total" => {
                    let Some(plugin) = sample.labels.get("plugin") else {
                        continue;
                    };
                    let entry = reading.plugins.entry(plugin.clone()).or_default();
                    if sample.name == "plinth_plugin_calls_total" {
                        entry.0 += sample.value;
                    } else {
                        entry.1 += sample.value;
                    }
                }
                "plinth_plugin_failures_total" => {
                    let (Some(plugin), Some("trap")) = (
                        sample.labels.get("plugin"),
                        sample.labels.get("cause").map(String::as_str),
                    ) else {
                        continue;
                    };
                    reading.plugins.entry(plugin.clone()).or_default().2 += sample.value;
                }
                _ => {}
            }
        }
        reading
    }
}

/// The `q` quantile of the observations between two cumulative bucket
/// sets, interpolated linearly within its bucket as Prometheus's
/// `histogram_quantile` does; `None` with no observation between them.
fn quantile(
    q: f64,
    before: Option<&BTreeMap<OrderedBound, f64>>,
    after: &BTreeMap<OrderedBound, f64>,
) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, count)| {
            let old = before.and_then(|b| b.get(le)).copied().unwrap_or(0.0);
            (le.0, (count - old).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for (le, cumulative) in delta {
        if cumulative >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let in_bucket = cumulative - below;
            let fraction = if in_bucket > 0.0 {
                (rank - below) / in_bucket
            } else {
                1.0
            };
            return Some(lower + (le - lower) * fraction);
        }
        lower = le;
        below = cumulative;
    }
    Some(lower)
}

/// One frame: per model and per plugin, between two readings.
#[derive(Debug, Clone, PartialEq)]
struct Frame {
    models: Vec<ModelRow>,
    plugins: Vec<PluginRow>,
}

#[derive(Debug, Clone, PartialEq)]
struct ModelRow {
    model: String,
    rps: f64,
    failed_per_s: f64,
    p50_s: Option<f64>,
    p99_s: Option<f64>,
    queued: f64,
    in_flight: f64,
    memory_bytes: f64,
}

#[derive(Debug, Clone, PartialEq)]
struct PluginRow {
    plugin: String,
    calls_per_s: f64,
    calls: f64,
    failures: f64,
    traps: f64,
}

fn frame(before: &Reading, after: &Reading) -> Frame {
    let seconds = match (before.at, after.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-6),
        _ => 1.0,
    };
    let mut names: Vec<&String> = after
        .requests
        .keys()
        .chain(after.queued.keys())
        .chain(after.memory.keys())
        .collect();
    names.sort();
    names.dedup();
    let models = names
        .into_iter()
        .filter(|name| !name.is_empty())
        .map(|name| {
            let (requests, failures) = after.requests.get(name).copied().unwrap_or_default();
            let (old_requests, old_failures) =
                before.requests.get(name).copied().unwrap_or_default();
            let buckets = after.buckets.get(name);
            let old = before.buckets.get(name);
            ModelRow {
                model: name.clone(),
                rps: (requests - old_requests).max(0.0) / seconds,
                failed_per_s: (failures - old_failures).max(0.0) / seconds,
                p50_s: buckets.and_then(|b| quantile(0.5, old, b)),
                p99_s: buckets.and_then(|b| quantile(0.99, old, b)),
                queued: after.queued.get(name).copied().unwrap_or_default(),
                in_flight: after.in_flight.get(name).copied().unwrap_or_default(),
                memory_bytes: after.memory.get(name).copied().unwrap_or_default(),
            }
        })
        .collect();
    let plugins = after
        .plugins
        .iter()
        .map(|(plugin, (calls, failures, traps))| {
            let old_calls = before.plugins.get(plugin).map_or(0.0, |p| p.0);
            PluginRow {
                plugin: plugin.clone(),
                calls_per_s: (calls - old_calls).max(0.0) / seconds,
                calls: *calls,
                failures: *failures,
                traps: *traps,
            }
        })
        .collect();
    Frame { models, plugins }
}

fn millis(seconds: Option<f64>) -> String {
    seconds.map_or("-".to_owned(), |s| format!("{:.2}", s * 1e3))
}

fn bytes(n: f64) -> String {
    if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else if n >= 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else {
        format!("{n:.0} B")
    }
}

fn render(frame: &Frame, server: &str, interval: f64) -> String {
    let mut models = table(&[
        "MODEL",
        "REQ/S",
        "FAILED/S",
        "P50 MS",
        "P99 MS",
        "QUEUED",
        "IN FLIGHT",
        "MEMORY",
    ]);
    for m in &frame.models {
        models.add_row(vec![
            m.model.clone(),
            format!("{:.1}", m.rps),
            format!("{:.1}", m.failed_per_s),
            millis(m.p50_s),
            millis(m.p99_s),
            format!("{:.0}", m.queued),
            format!("{:.0}", m.in_flight),
            bytes(m.memory_bytes),
        ]);
    }
    let mut plugins = table(&["PLUGIN", "CALLS/S", "CALLS", "FAILURES", "TRAPS"]);
    for p in &frame.plugins {
        plugins.add_row(vec![
            p.plugin.clone(),
            format!("{:.1}", p.calls_per_s),
            format!("{:.0}", p.calls),
            format!("{:.0}", p.failures),
            format!("{:.0}", p.traps),
        ]);
    }
    format!(
        "plinth top: {server}, every {interval} s (latency: router, processors, queue and forward)\n\n{models}\n\n{plugins}\n"
    )
}

fn frame_json(frame: &Frame) -> serde_json::Value {
    json!({
        "models": frame.models.iter().map(|m| json!({
            "model": m.model,
            "requests_per_second": m.rps,
            "failures_per_second": m.failed_per_s,
            "p50_seconds": m.p50_s,
            "p99_seconds": m.p99_s,
            "queued": m.queued,
            "in_flight": m.in_flight,
            "memory_bytes": m.memory_bytes,
        })).collect::<Vec<_>>(),
        "plugins": frame.plugins.iter().map(|p| json!({
            "plugin": p.plugin,
            "calls_per_second": p.calls_per_s,
            "calls": p.calls,
            "failures": p.failures,
            "traps": p.traps,
        })).collect::<Vec<_>>(),
    })
}

async fn read(client: &Client) -> CliResult<Reading> {
    let text = client
        .compute()
        .get_metrics(client.request(pb::GetMetricsRequest {}))
        .await?
        .into_inner()
        .text;
    Ok(Reading::from_text(&text, Instant::now()))
}

pub async fn top(client: &Client, args: TopArgs) -> CliResult {
    if !(args.interval.is_finite() && args.interval > 0.0) {
        return fail(format!(
            "--interval: expected a positive number of seconds, got {}",
            args.interval
        ));
    }
    let interval = Duration::from_secs_f64(args.interval);
    let mut before = read(client).await?;
    loop {
        tokio::time::sleep(interval).await;
        let after = read(client).await?;
        let frame = frame(&before, &after);
        match client.output {
            Output::Json => println!("{}", frame_json(&frame)),
            Output::Table => {
                let text = render(&frame, &client.server, args.interval);
                if args.once {
                    print!("{text}");
                } else {
                    // Clear the screen and home the cursor, then the frame.
                    print!("\x1b[2J\x1b[H{text}");
                }
                let _ = std::io::stdout().flush();
            }
        }
        if args.once {
            return Ok(());
        }
        before = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP plinth_model_requests Requests.
# TYPE plinth_model_requests counter
plinth_model_requests_total{model="a",version="1",status="failure"} 1
plinth_model_requests_total{model="a",version="1",status="success"} 9
plinth_model_requests_total{model="a",version="2",status="success"} 10
plinth_model_request_duration_seconds_bucket{le="0.001",model="a",version="1"} 5
plinth_model_request_duration_seconds_bucket{le="0.002",model="a",version="1"} 10
plinth_model_request_duration_seconds_bucket{le="+Inf",model="a",version="1"} 10
plinth_model_request_duration_seconds_bucket{le="0.001",model="a",version="2"} 5
plinth_model_request_duration_seconds_bucket{le="0.002",model="a",version="2"} 10
plinth_model_request_duration_seconds_bucket{le="+Inf",model="a",version="2"} 10
plinth_model_queue_requests{model="a",version="1"} 2
plinth_model_queue_requests{model="a",version="2"} 1
plinth_model_inflight_requests{model="a"} 4
plinth_model_memory_bytes{model="a",device="cpu"} 2048
plinth_plugin_calls_total{plugin="norm \"x\""} 30
plinth_plugin_errors_total{plugin="norm \"x\""} 2
plinth_plugin_failures_total{plugin="norm \"x\"",cause="trap"} 1
plinth_plugin_failures_total{plugin="norm \"x\"",cause="timeout"} 1
"#;

    #[test]
    fn a_frame_sums_versions_and_takes_rates_and_quantiles_between_reads() {
        let start = Instant::now();
        let before = Reading {
            at: Some(start),
            ..Reading::default()
        };
        let after = Reading::from_text(TEXT, start + Duration::from_secs(2));
        let frame = frame(&before, &after);
        assert_eq!(frame.models.len(), 1);
        let a = &frame.models[0];
        assert_eq!((a.rps, a.failed_per_s), (10.0, 0.5));
        assert_eq!((a.queued, a.in_flight, a.memory_bytes), (3.0, 4.0, 2048.0));
        // 20 observations, 10 up to 1 ms and 10 in (1, 2] ms.
        assert_eq!(a.p50_s, Some(0.001));
        let p99 = a.p99_s.unwrap();
        assert!((p99 - 0.00198).abs() < 1e-9, "{p99}");
        assert_eq!(
            frame.plugins,
            [PluginRow {
                plugin: "norm \"x\"".into(),
                calls_per_s: 15.0,
                calls: 30.0,
                failures: 2.0,
                traps: 1.0
            }]
        );
        // Nothing between two equal reads: no rate, no quantile.
        let same = super::frame(&after, &after);
        assert_eq!((same.models[0].rps, same.models[0].p50_s), (0.0, None));
    }

    #[test]
    fn lines_that_are_not_samples_are_skipped() {
        assert!(parse("# comment\n\nnot a sample\nx{a=\"1\" 2\n").is_empty());
        assert_eq!(
            parse("x 1.5\n"),
            [Sample {
                name: "x".into(),
                labels: BTreeMap::new(),
                value: 1.5
            }]
        );
    }
}
