//! Request events for the metrics plugins: sent with `try_send` on a
//! bounded channel (a request never waits on metrics; events that do not
//! fit are counted), and handed over in batches by one task, off the
//! request path. Nested calls' events carry a tag for the plugins that take
//! `metrics-context`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use super::types::{NestedTag, Pipeline};
use crate::plugin::{NestedEvent, PluginHost, RequestEvent, kind};

const EVENT_BATCH: usize = 512;
/// How long a batch of events may wait to fill up. Metrics are scraped
/// seconds apart; handing them over one by one would cost a thread hop and a
/// guest call per request.
const EVENT_FLUSH: Duration = Duration::from_millis(50);

impl Pipeline {
    pub(super) fn send_event(&self, event: RequestEvent, tag: Option<NestedTag>) {
        if self.inner.events.try_send((event, tag)).is_err() {
            self.inner.dropped_events.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Pipeline {
    /// Hands events to every metrics plugin in batches, off the request path;
    /// nested calls' tags also to those that take `metrics-context`.
    pub(super) async fn feed_metrics(
        plugins: Arc<PluginHost>,
        mut rx: mpsc::Receiver<(RequestEvent, Option<NestedTag>)>,
    ) {
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        while rx.recv_many(&mut batch, EVENT_BATCH).await > 0 {
            let flush = tokio::time::sleep(EVENT_FLUSH);
            tokio::pin!(flush);
            while batch.len() < EVENT_BATCH {
                let room = EVENT_BATCH - batch.len();
                tokio::select! {
                    () = &mut flush => break,
                    n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                }
            }
            let sinks = plugins.of_kind::<kind::Metrics>();
            if sinks.is_empty() {
                batch.clear();
                continue;
            }
            let mut nested = Vec::new();
            let events: Vec<RequestEvent> = batch
                .drain(..)
                .map(|(event, tag)| {
                    if let Some((parent_id, parent_model, depth)) = tag {
                        nested.push(NestedEvent {
                            parent_id,
                            parent_model,
                            depth,
                            event: event.clone(),
                        });
                    }
                    event
                })
                .collect();
            let _ = tokio::task::spawn_blocking(move || {
                for plugin in sinks {
                    // A failing metrics plugin is counted by its own stats; the
                    // others still get the events.
                    let _ = plugin.record(&events);
                    if !nested.is_empty() {
                        let _ = plugin.record_nested(&nested);
                    }
                }
            })
            .await;
        }
    }
}
