//! A guest's stdout and stderr, line by line into the host log, tagged with
//! the plugin and the instance, and rate-limited: a guest cannot flood the
//! log, and it needs no capability, since it can read nothing through it.
//! The last lines of stderr are kept, so a trap's report can carry what
//! the guest said before it (a Python traceback, say).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Lines per second one instance may log; more are counted and dropped.
const LINES_PER_SECOND: u32 = 50;
/// A line longer than this is logged in pieces.
const MAX_LINE: usize = 8 << 10;
/// Lines of stderr kept for a trap's report.
const TAIL: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Stdout,
    Stderr,
}

/// What one instance's two streams share.
#[derive(Debug)]
pub(crate) struct GuestOutput {
    plugin: Arc<str>,
    instance: u64,
    state: Mutex<Limit>,
    /// The last lines written to stderr.
    tail: Mutex<VecDeque<String>>,
}

#[derive(Debug)]
struct Limit {
    window: Instant,
    lines: u32,
    dropped: u64,
}

impl GuestOutput {
    pub(crate) fn new(plugin: Arc<str>, instance: u64) -> Arc<GuestOutput> {
        Arc::new(GuestOutput {
            plugin,
            instance,
            state: Mutex::new(Limit {
                window: Instant::now(),
                lines: 0,
                dropped: 0,
            }),
            tail: Mutex::new(VecDeque::new()),
        })
    }

    pub(crate) fn stream(self: &Arc<Self>, which: Which) -> GuestStream {
        GuestStream {
            output: Arc::clone(self),
            which,
        }
    }

    /// The last stderr lines, oldest first, and forgets them.
    pub(crate) fn take_tail(&self) -> Vec<String> {
        self.tail.lock().drain(..).collect()
    }

    fn emit(&self, which: Which, line: &str) {
        if which == Which::Stderr {
            let mut tail = self.tail.lock();
            if tail.len() == TAIL {
                tail.pop_front();
            }
            tail.push_back(line.to_owned());
        }
        {
            let mut limit = self.state.lock();
            if limit.window.elapsed() >= Duration::from_secs(1) {
                if limit.dropped > 0 {
                    tracing::warn!(
                        plugin = %self.plugin,
                        instance = self.instance,
                        dropped = limit.dropped,
                        "guest output over {LINES_PER_SECOND} lines a second: lines dropped"
                    );
                }
                *limit = Limit {
                    window: Instant::now(),
                    lines: 0,
                    dropped: 0,
                };
            }
            if limit.lines >= LINES_PER_SECOND {
                limit.dropped += 1;
                return;
            }
            limit.lines += 1;
        }
        let (plugin, instance) = (&*self.plugin, self.instance);
        match which {
            Which::Stdout => tracing::info!(plugin, instance, stream = "stdout", "{line}"),
            Which::Stderr => tracing::warn!(plugin, instance, stream = "stderr", "{line}"),
        }
    }
}

/// One stream of one instance, as WASI hands it to the guest.
pub(crate) struct GuestStream {
    output: Arc<GuestOutput>,
    which: Which,
}

impl IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.writer())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.writer())
    }
}

impl GuestStream {
    fn writer(&self) -> LineWriter {
        LineWriter {
            output: Arc::clone(&self.output),
            which: self.which,
            partial: Vec::new(),
        }
    }
}

/// Splits what is written into lines; a partial line waits for its end
/// (or for the writer to go away).
pub(crate) struct LineWriter {
    output: Arc<GuestOutput>,
    which: Which,
    partial: Vec<u8>,
}

impl LineWriter {
    fn push(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.line(&line[..line.len() - 1]);
        }
        while self.partial.len() > MAX_LINE {
            let piece: Vec<u8> = self.partial.drain(..MAX_LINE).collect();
            self.line(&piece);
        }
    }

    fn line(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches('\r');
        self.output.emit(self.which, text);
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.line(&rest);
        }
    }
}

impl OutputStream for LineWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineWriter {
    async fn ready(&mut self) {}
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_kept_for_the_tail_and_limited() {
        let output = GuestOutput::new("p".into(), 7);
        let mut w = output.stream(Which::Stderr).writer();
        w.push(b"Traceback (most recent call last):\n  File \"app.py\"");
        w.push(b", line 3\nValueError: bad\npartial");
        drop(w);
        assert_eq!(
            output.take_tail(),
            [
                "Traceback (most recent call last):",
                "  File \"app.py\", line 3",
                "ValueError: bad",
                "partial"
            ]
        );
        let mut w = output.stream(Which::Stdout).writer();
        for i in 0..200 {
            w.push(format!("line {i}\n").as_bytes());
        }
        let dropped = output.state.lock().dropped;
        assert!(dropped >= 100, "the limit drops the excess: {dropped}");
        assert!(output.take_tail().is_empty(), "stdout is not kept");
    }
}
