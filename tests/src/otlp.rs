//! An OTLP trace collector in the test process: a real gRPC server (the
//! `opentelemetry-proto` service types) on a loopback port, keeping every
//! span it receives, flattened for assertions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// One received span, ids in lower-case hex as in `traceparent`.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP's `SpanKind` number (2 = server, 1 = internal).
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
    /// OTLP's status code (0 unset, 1 ok, 2 error) and message.
    pub status: (i32, String),
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// The resource's attributes (`service.name`, …).
    pub resource: BTreeMap<String, String>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
    /// Spans received, kept or not.
    count: Arc<AtomicU64>,
    /// Only count (benchmarks send millions).
    count_only: bool,
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(pairs: &[KeyValue]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

impl Collector {
    fn ingest(&self, request: ExportTraceServiceRequest) {
        if self.count_only {
            let n: usize = request
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.count.fetch_add(n as u64, Ordering::Relaxed);
            return;
        }
        let mut received = Vec::new();
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .as_ref()
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(Span {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: span.kind,
                        attributes: attributes(&span.attributes),
                        links: span
                            .links
                            .iter()
                            .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                            .collect(),
                        status: span
                            .status
                            .as_ref()
                            .map(|s| (s.code, s.message.clone()))
                            .unwrap_or_default(),
                        start_unix_nano: span.start_time_unix_nano,
                        end_unix_nano: span.end_time_unix_nano,
                        resource: resource.clone(),
                    });
                }
            }
        }
        self.count
            .fetch_add(received.len() as u64, Ordering::Relaxed);
        self.spans.lock().unwrap().extend(received);
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.ingest(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// OTLP/HTTP with protobuf bodies: `POST /v1/traces`.
async fn http_export(
    axum::extract::State(collector): axum::extract::State<Collector>,
    body: axum::body::Bytes,
) -> Result<([(&'static str, &'static str); 1], Vec<u8>), (axum::http::StatusCode, String)> {
    use prost::Message;
    let request = ExportTraceServiceRequest::decode(body)
        .map_err(|err| (axum::http::StatusCode::BAD_REQUEST, err.to_string()))?;
    collector.ingest(request);
    let answer = ExportTraceServiceResponse {
        partial_success: None,
    };
    Ok((
        [("content-type", "application/x-protobuf")],
        answer.encode_to_vec(),
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running collector; it stops when dropped.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    count: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        OtlpReceiver::start_grpc(false).await
    }

    /// A gRPC collector that decodes every export and only counts the spans
    /// ([`OtlpReceiver::received`]), for benchmarks.
    pub async fn start_counting() -> OtlpReceiver {
        OtlpReceiver::start_grpc(true).await
    }

    async fn start_grpc(count_only: bool) -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let collector = Collector {
            count_only,
            ..Collector::default()
        };
        let spans = Arc::clone(&collector.spans);
        let count = Arc::clone(&collector.count);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        OtlpReceiver {
            addr,
            spans,
            count,
            task,
        }
    }

    /// Spans received since the start.
    pub fn received(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// A collector for OTLP over HTTP (protobuf bodies) at
    /// `http://127.0.0.1:port/v1/traces`.
    pub async fn start_http() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let collector = Collector::default();
        let spans = Arc::clone(&collector.spans);
        let count = Arc::clone(&collector.count);
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(http_export))
            .with_state(collector);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        OtlpReceiver {
            addr,
            spans,
            count,
            task,
        }
    }

    /// `http://127.0.0.1:port`, the base of either protocol's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans()
            .into_iter()
            .filter(|span| span.trace_id == trace_id)
            .collect()
    }

    /// Waits (within [`crate::PATIENCE`]) until `trace_id` has `n` spans.
    pub async fn wait_trace(&self, trace_id: &str, n: usize) -> Vec<Span> {
        crate::eventually(
            crate::PATIENCE,
            &format!("{n} spans of trace {trace_id}"),
            async || {
                let spans = self.trace(trace_id);
                if spans.len() >= n {
                    Ok(())
                } else {
                    Err(format!("{} so far: {spans:#?}", spans.len()))
                }
            },
        )
        .await;
        self.trace(trace_id)
    }
}

/// A tracer configuration sending to `receiver` often (every 50 ms), so that
/// tests do not wait for the SDK's default five seconds.
pub fn tracing_to(receiver: &OtlpReceiver) -> plinth::telemetry::TracingConfig {
    plinth::telemetry::TracingConfig {
        schedule_delay: std::time::Duration::from_millis(50),
        ..plinth::telemetry::TracingConfig::grpc(receiver.endpoint())
    }
}

/// An export whose spans are not decoded: prost skips the field.
#[derive(Clone, PartialEq, prost::Message)]
struct Skipped {}

/// A gRPC collector that accepts every export without decoding its spans
/// (what a collector on another machine costs this one: nothing), for
/// benchmarks that measure the sender alone.
#[derive(Clone, Default)]
struct Sink;

impl tonic::server::NamedService for Sink {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl tonic::server::UnaryService<Skipped> for Sink {
    type Response = ExportTraceServiceResponse;
    type Future = std::future::Ready<Result<tonic::Response<Self::Response>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<Skipped>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        })))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Sink {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<ExportTraceServiceResponse, Skipped>::default();
            Ok(tonic::server::Grpc::new(codec).unary(Sink, request).await)
        })
    }
}

impl OtlpReceiver {
    /// A gRPC collector that answers every export without decoding it
    /// ([`Sink`]); it keeps and counts nothing.
    pub async fn start_sink() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(Sink)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        OtlpReceiver {
            addr,
            spans: Arc::default(),
            count: Arc::default(),
            task,
        }
    }
}
