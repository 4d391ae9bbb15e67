//! The bound in front of the SDK's batch processor, and the counts behind
//! `plinth_trace_spans_*_total`.
//!
//! The batch processor already drops spans when its queue is full, but
//! keeps the count to itself. [`Admission`] admits a span only while fewer
//! than `max_queue` wait for the exporter (so the processor's own, larger
//! queue never fills), and [`Counted`] sees each batch the exporter is
//! handed: those spans leave the queue, and count as exported or, when the
//! collector refuses or cannot be reached in time, as dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

/// Spans since startup, by fate.
#[derive(Debug, Default)]
pub struct SpanCounts {
    ended: AtomicU64,
    exported: AtomicU64,
    dropped: AtomicU64,
    /// Admitted and not yet handed to the exporter.
    queued: AtomicUsize,
    failed_exports: AtomicU64,
}

impl SpanCounts {
    /// Spans the requests ended (sampled ones only).
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }

    /// Spans lost: the queue was full, or the collector failed their export.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Spans waiting for the exporter now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Admits ended spans into the batch processor while there is room.
#[derive(Debug)]
pub struct Admission<P> {
    inner: P,
    counts: Arc<SpanCounts>,
    max_queue: usize,
}

impl<P> Admission<P> {
    pub fn new(inner: P, counts: Arc<SpanCounts>, max_queue: usize) -> Admission<P> {
        Admission {
            inner,
            counts,
            max_queue,
        }
    }
}

impl<P: SpanProcessor> SpanProcessor for Admission<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        self.counts.ended.fetch_add(1, Ordering::Relaxed);
        if self.counts.queued.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.counts.queued.fetch_sub(1, Ordering::AcqRel);
            if self.counts.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    max_queue = self.max_queue,
                    "trace spans are being dropped: the exporter's queue is full (the collector is slow or down); plinth_trace_spans_dropped_total counts them"
                );
            }
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting what it is handed.
#[derive(Debug)]
pub struct Counted<E> {
    inner: E,
    counts: Arc<SpanCounts>,
}

impl<E> Counted<E> {
    pub fn new(inner: E, counts: Arc<SpanCounts>) -> Counted<E> {
        Counted { inner, counts }
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        self.counts.queued.fetch_sub(n, Ordering::AcqRel);
        let res = self.inner.export(batch).await;
        let n = n as u64;
        match &res {
            Ok(()) => {
                self.counts.exported.fetch_add(n, Ordering::Relaxed);
            }
            Err(err) => {
                self.counts.dropped.fetch_add(n, Ordering::Relaxed);
                // The first failure, then one in a hundred: a collector
                // that is down would otherwise write a line per batch.
                let failures = self.counts.failed_exports.fetch_add(1, Ordering::Relaxed);
                if failures.is_multiple_of(100) {
                    tracing::warn!(%err, spans = n, failures = failures + 1, "trace export failed; the spans are dropped");
                }
            }
        }
        res
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
