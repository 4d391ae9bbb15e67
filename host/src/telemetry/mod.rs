//! OpenTelemetry traces of requests: the configuration (the standard
//! `OTEL_*` variables, or `plinth serve`'s matching flags), the exporter,
//! and the spans the pipeline makes.
//!
//! Off unless an OTLP endpoint is configured: then [`Traces`] is `None`
//! everywhere and a request makes no span at all. On, every request asks
//! the sampler once, at its root span; a request that is not sampled makes
//! nothing else (no child spans, no log span).
//!
//! Spans leave through the SDK's batch processor, on a thread of its own,
//! behind a bound of ours ([`export`]): a request never waits for the
//! collector, and what does not fit, or what a failing collector refuses, is
//! counted as dropped (`plinth_trace_spans_dropped_total`).
//!
//! The pipeline uses the OpenTelemetry API directly rather than through
//! `tracing` spans: the queue wait and the batched forward happen on the
//! executor's thread and are recorded after the fact, with their own start
//! and end times, and the forward span links requests of other traces.
//! Log lines of a traced request still carry its ids: the pipeline enters a
//! `tracing` span holding `trace_id` and `span_id` around it.

mod export;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Link, Span as _, SpanBuilder, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

pub use export::SpanCounts;

/// How spans reach the collector (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Which requests are traced (`OTEL_TRACES_SAMPLER` and its argument).
#[derive(Debug, Clone, PartialEq)]
pub enum SamplerChoice {
    AlwaysOn,
    AlwaysOff,
    /// This fraction of new traces, by trace id.
    Ratio(f64),
    /// A request that carries a `traceparent` follows its sampled flag;
    /// one without it asks the inner sampler.
    ParentBased(Box<SamplerChoice>),
}

impl SamplerChoice {
    fn sampler(&self) -> Sampler {
        match self {
            SamplerChoice::AlwaysOn => Sampler::AlwaysOn,
            SamplerChoice::AlwaysOff => Sampler::AlwaysOff,
            SamplerChoice::Ratio(ratio) => Sampler::TraceIdRatioBased(*ratio),
            SamplerChoice::ParentBased(root) => Sampler::ParentBased(Box::new(root.sampler())),
        }
    }

    /// Reads the standard names: `always_on`, `always_off`,
    /// `traceidratio`, and each with a `parentbased_` prefix.
    pub fn parse(name: &str, arg: Option<&str>) -> Result<SamplerChoice, String> {
        let ratio = || -> Result<f64, String> {
            let Some(arg) = arg else {
                return Ok(1.0);
            };
            arg.trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    format!(
                        "OTEL_TRACES_SAMPLER_ARG: expected a ratio between 0 and 1 for sampler '{name}', got '{arg}'"
                    )
                })
        };
        Ok(match name.trim() {
            "always_on" => SamplerChoice::AlwaysOn,
            "always_off" => SamplerChoice::AlwaysOff,
            "traceidratio" => SamplerChoice::Ratio(ratio()?),
            "parentbased_always_on" => {
                SamplerChoice::ParentBased(Box::new(SamplerChoice::AlwaysOn))
            }
            "parentbased_always_off" => {
                SamplerChoice::ParentBased(Box::new(SamplerChoice::AlwaysOff))
            }
            "parentbased_traceidratio" => {
                SamplerChoice::ParentBased(Box::new(SamplerChoice::Ratio(ratio()?)))
            }
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER: expected one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio; got '{other}'"
                ));
            }
        })
    }
}

/// What the tracer is told at startup.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// Where spans go: for gRPC the collector's address
    /// (`http://host:4317`), for HTTP the full URL (`…/v1/traces`). Plain
    /// HTTP only: `from_vars` refuses `https://`.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES`, as pairs.
    pub resource: Vec<(String, String)>,
    pub sampler: SamplerChoice,
    /// The longest one export may take; past it the batch is dropped and
    /// counted.
    pub export_timeout: Duration,
    /// Spans waiting for the exporter; more are dropped and counted.
    pub max_queue: usize,
    /// How often the batch processor sends what it holds.
    pub schedule_delay: Duration,
}

impl TracingConfig {
    /// A configuration for `endpoint` with the defaults: OTLP over gRPC,
    /// every request sampled unless its `traceparent` says otherwise.
    pub fn grpc(endpoint: impl Into<String>) -> TracingConfig {
        TracingConfig {
            endpoint: endpoint.into(),
            protocol: OtlpProtocol::Grpc,
            service_name: "plinth".into(),
            resource: Vec::new(),
            sampler: SamplerChoice::ParentBased(Box::new(SamplerChoice::AlwaysOn)),
            export_timeout: Duration::from_secs(10),
            max_queue: 2048,
            schedule_delay: Duration::from_secs(5),
        }
    }

    /// Reads the standard variables through `var`, the flags having been
    /// merged in by the caller. `Ok(None)`: tracing is off (no endpoint, or
    /// `OTEL_SDK_DISABLED=true`, or `OTEL_TRACES_EXPORTER=none`).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<TracingConfig>, String> {
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match var("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_EXPORTER: plinth exports traces over OTLP only; expected 'otlp' or 'none', got '{other}'"
                ));
            }
        }
        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .as_deref()
            .map(str::trim)
        {
            // The specification's default.
            None | Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
            Some("grpc") => OtlpProtocol::Grpc,
            Some(other) => {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL: expected 'grpc' or 'http/protobuf', got '{other}'"
                ));
            }
        };
        let (name, raw) = match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some(endpoint) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint),
            None => match var("OTEL_EXPORTER_OTLP_ENDPOINT") {
                Some(base) => ("OTEL_EXPORTER_OTLP_ENDPOINT", base),
                None => return Ok(None),
            },
        };
        let raw = raw.trim();
        if raw.starts_with("https://") {
            // Neither exporter is built with TLS here: refused rather than
            // sent in the clear or failed batch by batch.
            return Err(format!(
                "{name}: TLS to the collector is not supported yet; use an http:// endpoint (a collector beside the server), got '{raw}'"
            ));
        }
        if !raw.starts_with("http://") {
            return Err(format!("{name}: expected an http:// URL, got '{raw}'"));
        }
        let endpoint = match (name, protocol) {
            // The generic endpoint is a base the signal's path joins.
            ("OTEL_EXPORTER_OTLP_ENDPOINT", OtlpProtocol::HttpProtobuf) => {
                format!("{}/v1/traces", raw.trim_end_matches('/'))
            }
            _ => raw.to_owned(),
        };
        let sampler = match var("OTEL_TRACES_SAMPLER") {
            Some(name) => SamplerChoice::parse(&name, var("OTEL_TRACES_SAMPLER_ARG").as_deref())?,
            None => SamplerChoice::ParentBased(Box::new(SamplerChoice::AlwaysOn)),
        };
        let resource = match var("OTEL_RESOURCE_ATTRIBUTES") {
            Some(text) => parse_resource(&text)?,
            None => Vec::new(),
        };
        let millis = |name: &str, default: u64| -> Result<u64, String> {
            match var(name) {
                None => Ok(default),
                Some(text) => text.trim().parse::<u64>().map_err(|_| {
                    format!("{name}: expected a whole number of milliseconds, got '{text}'")
                }),
            }
        };
        let timeout = match var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") {
            Some(_) => millis("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 10_000)?,
            None => millis("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000)?,
        };
        let max_queue = match var("OTEL_BSP_MAX_QUEUE_SIZE") {
            None => 2048,
            Some(text) => text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    format!("OTEL_BSP_MAX_QUEUE_SIZE: expected a positive number, got '{text}'")
                })?,
        };
        Ok(Some(TracingConfig {
            endpoint,
            protocol,
            service_name: var("OTEL_SERVICE_NAME")
                .map(|name| name.trim().to_owned())
                // OTEL_RESOURCE_ATTRIBUTES may name the service too.
                .or_else(|| {
                    resource
                        .iter()
                        .find(|(key, _)| key == "service.name")
                        .map(|(_, value)| value.clone())
                })
                .unwrap_or_else(|| "plinth".into()),
            resource,
            sampler,
            export_timeout: Duration::from_millis(timeout.max(1)),
            max_queue,
            schedule_delay: Duration::from_millis(millis("OTEL_BSP_SCHEDULE_DELAY", 5_000)?),
        }))
    }
}

/// `key=value,key=value`, values percent-decoded (W3C baggage octets).
fn parse_resource(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for item in text.split(',').filter(|item| !item.trim().is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!(
                "OTEL_RESOURCE_ATTRIBUTES: expected key=value pairs separated by commas, got '{item}'"
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!(
                "OTEL_RESOURCE_ATTRIBUTES: an attribute has an empty key in '{item}'"
            ));
        }
        pairs.push((key.to_owned(), percent_decode(value.trim())));
    }
    Ok(pairs)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Spans per OTLP export (the SDK's default): fewer, larger exports cost
/// the collector's connection less per span.
const EXPORT_BATCH: usize = 512;

/// The tracer of a running server.
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    counts: Arc<SpanCounts>,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces").finish_non_exhaustive()
    }
}

/// Where a request's trace comes from.
#[derive(Debug, Clone, Default)]
pub enum Origin {
    /// The client's `traceparent` and `tracestate`, read from the request's
    /// headers; a new trace without them.
    #[default]
    Metadata,
    /// A call an orchestrator made: a child of its span.
    ChildOf(Context),
    /// A mirrored run: a trace of its own, linked to the primary's span.
    LinkedTo(SpanContext),
    /// Nothing: the request that made this one was not sampled.
    Untraced,
}

impl Traces {
    /// Builds the exporter and the tracer. Call it inside the server's
    /// Tokio runtime: the gRPC exporter's connection lives there.
    pub fn start(config: &TracingConfig) -> anyhow::Result<Traces> {
        use opentelemetry_otlp::WithExportConfig;
        let counts = Arc::new(SpanCounts::default());
        let exporter = match config.protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(config.endpoint.clone())
                .with_timeout(config.export_timeout)
                .build(),
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(config.endpoint.clone())
                .with_timeout(config.export_timeout)
                .build(),
        }
        .map_err(|err| {
            anyhow::anyhow!(
                "OTLP exporter for '{}' could not be built: {err}",
                config.endpoint
            )
        })?;
        let exporter = export::Counted::new(exporter, Arc::clone(&counts));
        let batch = BatchConfigBuilder::default()
            // Our bound (`export::Admission`) keeps it from filling: the
            // SDK's own drops are not counted anywhere we can read.
            .with_max_queue_size(config.max_queue + EXPORT_BATCH)
            .with_max_export_batch_size(EXPORT_BATCH.min(config.max_queue))
            .with_scheduled_delay(config.schedule_delay)
            .build();
        let processor = export::Admission::new(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
            Arc::clone(&counts),
            config.max_queue,
        );
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_attributes(
                config
                    .resource
                    .iter()
                    .map(|(key, value)| KeyValue::new(key.clone(), value.clone())),
            )
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(config.sampler.sampler())
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("plinth");
        Ok(Traces {
            provider,
            tracer,
            counts,
        })
    }

    /// Spans ended, exported and dropped since startup.
    pub fn counts(&self) -> &SpanCounts {
        &self.counts
    }

    /// Sends what is queued, within `timeout`, and stops the exporter.
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(err) = self.provider.shutdown_with_timeout(timeout) {
            tracing::warn!(%err, "trace exporter did not shut down cleanly");
        }
    }

    /// The request's own span, if the sampler takes it: its parent is the
    /// client's `traceparent` (from `metadata`), the orchestrator's call,
    /// or nothing. `attributes` are made only for a span the sampler took
    /// (our samplers never look at them), so an unsampled request
    /// allocates nothing for them.
    pub fn request(
        &self,
        origin: &Origin,
        metadata: &[(String, String)],
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<SpanScope> {
        let (parent, links) = match origin {
            Origin::Untraced => return None,
            Origin::Metadata => {
                let parent = if metadata.iter().any(|(key, _)| key == "traceparent") {
                    TraceContextPropagator::new().extract(&Headers(metadata))
                } else {
                    Context::new()
                };
                (parent, Vec::new())
            }
            Origin::ChildOf(parent) => (parent.clone(), Vec::new()),
            Origin::LinkedTo(primary) => {
                (Context::new(), vec![Link::with_context(primary.clone())])
            }
        };
        let mut span = self.tracer.build_with_context(
            SpanBuilder::from_name("infer")
                .with_kind(if matches!(origin, Origin::Metadata) {
                    SpanKind::Server
                } else {
                    SpanKind::Internal
                })
                .with_links(links),
            &parent,
        );
        if !span.is_recording() {
            return None;
        }
        span.set_attributes(attributes());
        Some(SpanScope {
            tracer: self.tracer.clone(),
            cx: parent.with_span(span),
        })
    }
}

/// One recording span, and the way to make its children.
#[derive(Clone)]
pub struct SpanScope {
    tracer: SdkTracer,
    cx: Context,
}

impl std::fmt::Debug for SpanScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let span = self.cx.span();
        let context = span.span_context();
        f.debug_struct("SpanScope")
            .field("trace_id", &context.trace_id())
            .field("span_id", &context.span_id())
            .finish()
    }
}

impl SpanScope {
    /// A child span, starting now.
    pub fn child(&self, name: &'static str, attributes: Vec<KeyValue>) -> SpanScope {
        let span = self.tracer.build_with_context(
            SpanBuilder::from_name(name).with_attributes(attributes),
            &self.cx,
        );
        SpanScope {
            tracer: self.tracer.clone(),
            cx: self.cx.with_span(span),
        }
    }

    /// A child span that already happened, from `start` to `end`.
    pub fn record(
        &self,
        name: &'static str,
        start: SystemTime,
        end: SystemTime,
        attributes: Vec<KeyValue>,
        links: Vec<Link>,
    ) {
        let mut span = self.tracer.build_with_context(
            SpanBuilder::from_name(name)
                .with_start_time(start)
                .with_attributes(attributes)
                .with_links(links),
            &self.cx,
        );
        span.end_with_timestamp(end);
    }

    pub fn set_attribute(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    /// Marks the span failed with `message`.
    pub fn fail(&self, message: String) {
        self.cx.span().set_status(Status::error(message));
    }

    pub fn end(&self) {
        self.cx.span().end();
    }

    /// Ends the span, failed if `res` is an error.
    pub fn end_with<T, E: std::fmt::Display>(&self, res: &Result<T, E>) {
        if let Err(err) = res {
            self.fail(err.to_string());
        }
        self.end();
    }

    /// The span's identity, for links and for the log span.
    pub fn span_context(&self) -> SpanContext {
        self.cx.span().span_context().clone()
    }

    /// The context a child made elsewhere (an orchestrator's call) starts from.
    pub fn context(&self) -> Context {
        self.cx.clone()
    }

    /// A link to this span.
    pub fn link(&self) -> Link {
        Link::with_context(self.span_context())
    }

    /// The `tracing` span that puts this span's ids on every log line
    /// written while the request runs.
    pub fn log_span(&self) -> tracing::Span {
        let context = self.span_context();
        tracing::info_span!(
            "request",
            trace_id = %context.trace_id(),
            span_id = %context.span_id()
        )
    }
}

/// When an `Instant` of this process was, on the wall clock.
pub fn wall_time(at: Instant) -> SystemTime {
    let now = Instant::now();
    if at <= now {
        SystemTime::now() - now.duration_since(at)
    } else {
        SystemTime::now() + at.duration_since(now)
    }
}

/// Request metadata as W3C trace context headers (keys are lower case
/// in both gRPC metadata and HTTP/2 headers as they reach the pipeline).
struct Headers<'a>(&'a [(String, String)]);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn tracing_is_off_without_an_endpoint_or_when_disabled() {
        assert!(TracingConfig::from_vars(vars(&[])).unwrap().is_none());
        assert!(
            TracingConfig::from_vars(vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "true")
            ]))
            .unwrap()
            .is_none()
        );
        assert!(
            TracingConfig::from_vars(vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_TRACES_EXPORTER", "none")
            ]))
            .unwrap()
            .is_none()
        );
    }

    #[test]
    fn the_standard_variables_configure_the_exporter() {
        let config = TracingConfig::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_SERVICE_NAME", "edge-7"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod,team=ml%20infra",
            ),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(config.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(config.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(config.service_name, "edge-7");
        assert_eq!(
            config.sampler,
            SamplerChoice::ParentBased(Box::new(SamplerChoice::Ratio(0.25)))
        );
        assert_eq!(
            config.resource,
            vec![
                ("deployment.environment".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "ml infra".to_owned())
            ]
        );
        let grpc = TracingConfig::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(grpc.protocol, OtlpProtocol::Grpc);
        assert_eq!(grpc.endpoint, "http://collector:4317");
        let signal = TracingConfig::from_vars(vars(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:9999/traces"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(signal.endpoint, "http://b:9999/traces");
    }

    #[test]
    fn bad_values_are_refused_naming_the_variable_and_the_value() {
        let err = |pairs: &[(&str, &str)]| {
            let mut all = vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")];
            all.extend_from_slice(pairs);
            TracingConfig::from_vars(vars(&all)).unwrap_err()
        };
        assert_eq!(
            err(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
            "OTEL_EXPORTER_OTLP_PROTOCOL: expected 'grpc' or 'http/protobuf', got 'http/json'"
        );
        assert_eq!(
            err(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "1.5")
            ]),
            "OTEL_TRACES_SAMPLER_ARG: expected a ratio between 0 and 1 for sampler 'traceidratio', got '1.5'"
        );
        assert!(err(&[("OTEL_TRACES_SAMPLER", "sometimes")]).contains("got 'sometimes'"));
        assert!(err(&[("OTEL_RESOURCE_ATTRIBUTES", "a=1,b")]).contains("got 'b'"));
        assert!(err(&[("OTEL_TRACES_EXPORTER", "zipkin")]).contains("got 'zipkin'"));
        assert!(
            TracingConfig::from_vars(vars(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://collector:4318/v1/traces"
            )]))
            .unwrap_err()
            .starts_with(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: TLS to the collector is not supported yet"
            )
        );
        assert_eq!(
            TracingConfig::from_vars(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]))
                .unwrap_err(),
            "OTEL_EXPORTER_OTLP_ENDPOINT: expected an http:// URL, got 'collector:4317'"
        );
    }

    #[test]
    fn a_traceparent_header_is_the_parent_of_the_request_span() {
        let metadata = vec![
            (
                "traceparent".to_owned(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
            ),
            ("tracestate".to_owned(), "vendor=x".to_owned()),
        ];
        let parent = TraceContextPropagator::new().extract(&Headers(&metadata));
        let span = parent.span();
        let context = span.span_context();
        assert_eq!(
            context.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(context.span_id().to_string(), "b7ad6b7169203331");
        assert!(context.is_sampled());
        assert_eq!(context.trace_state().get("vendor"), Some("x"));
    }
}
