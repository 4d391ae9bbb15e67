//! `wasi:io/streams` and `wasi:io/poll` for guests called on a tokio worker.
//!
//! Plugin calls run inline on the request's tokio worker: they take
//! microseconds, and a hop to another thread would cost more than the call.
//! wasmtime-wasi's synchronous bindings run each blocking WASI function
//! (`blocking-write-and-flush`, dropping a stream, `poll`) through
//! `Handle::block_on`, which panics on a runtime thread. Every guest that
//! prints — `println!` in Rust, `print` in Python — makes those calls.
//!
//! These bindings shadow the two interfaces with the same semantics, run
//! differently: the operation is polled once, and nearly always finishes
//! there (the guest's stdout and stderr are in-memory line splitters that
//! are always ready). Only a stream that really has to wait, such as a file
//! in a preopened directory, blocks, and it does so in the way the thread
//! it runs on allows: `block_in_place` on a multi-threaded runtime's
//! worker, a plain `block_on` elsewhere.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::p2::bindings::sync::io::{poll, streams};
use wasmtime_wasi::p2::{StreamError, StreamResult};
use wasmtime_wasi_io::bindings::wasi::io::poll as async_poll;
use wasmtime_wasi_io::bindings::wasi::io::streams::{
    HostInputStream as AsyncInput, HostOutputStream as AsyncOutput,
};
use wasmtime_wasi_io::poll::DynPollable;

/// Replaces the `wasi:io/poll` and `wasi:io/streams` functions that
/// `add_to_linker_sync` defined with ones that never panic on a worker.
pub(crate) fn shadow<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    poll::add_to_linker::<T, Io>(linker, |t| SyncIo(t.ctx().table))?;
    streams::add_to_linker::<T, Io>(linker, |t| SyncIo(t.ctx().table))?;
    linker.allow_shadowing(false);
    Ok(())
}

struct Io;

impl HasData for Io {
    type Data<'a> = SyncIo<'a>;
}

/// The store's resource table, seen through these bindings.
pub(crate) struct SyncIo<'a>(&'a mut ResourceTable);

/// Runs `future` to completion on whatever thread this is.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    if let Poll::Ready(out) = future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        return out;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            // On a worker, `block_in_place` hands the worker's other tasks
            // to a new thread first; on a blocking-pool thread it just runs.
            tokio::task::block_in_place(|| handle.block_on(future))
        }
        // A current-thread runtime's thread cannot be blocked in place;
        // futures' executor waits without entering the runtime. The streams
        // a plugin is given complete without this thread's reactor.
        Ok(_) => futures::executor::block_on(future),
        Err(_) => wasmtime_wasi::runtime::in_tokio(future),
    }
}

impl poll::Host for SyncIo<'_> {
    fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        block_on(async_poll::Host::poll(self.0, pollables))
    }
}

impl poll::HostPollable for SyncIo<'_> {
    fn ready(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<bool> {
        block_on(async_poll::HostPollable::ready(self.0, pollable))
    }

    fn block(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        block_on(async_poll::HostPollable::block(self.0, pollable))
    }

    fn drop(&mut self, pollable: Resource<DynPollable>) -> wasmtime::Result<()> {
        async_poll::HostPollable::drop(self.0, pollable)
    }
}

impl streams::Host for SyncIo<'_> {
    fn convert_stream_error(&mut self, err: StreamError) -> wasmtime::Result<streams::StreamError> {
        streams::Host::convert_stream_error(self.0, err)
    }
}

impl streams::HostOutputStream for SyncIo<'_> {
    fn drop(&mut self, stream: Resource<streams::OutputStream>) -> wasmtime::Result<()> {
        block_on(AsyncOutput::drop(self.0, stream))
    }

    fn check_write(&mut self, stream: Resource<streams::OutputStream>) -> StreamResult<u64> {
        AsyncOutput::check_write(self.0, stream)
    }

    fn write(
        &mut self,
        stream: Resource<streams::OutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        AsyncOutput::write(self.0, stream, bytes)
    }

    fn blocking_write_and_flush(
        &mut self,
        stream: Resource<streams::OutputStream>,
        bytes: Vec<u8>,
    ) -> StreamResult<()> {
        block_on(AsyncOutput::blocking_write_and_flush(self.0, stream, bytes))
    }

    fn blocking_write_zeroes_and_flush(
        &mut self,
        stream: Resource<streams::OutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        block_on(AsyncOutput::blocking_write_zeroes_and_flush(
            self.0, stream, len,
        ))
    }

    fn subscribe(
        &mut self,
        stream: Resource<streams::OutputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncOutput::subscribe(self.0, stream)
    }

    fn write_zeroes(
        &mut self,
        stream: Resource<streams::OutputStream>,
        len: u64,
    ) -> StreamResult<()> {
        AsyncOutput::write_zeroes(self.0, stream, len)
    }

    fn flush(&mut self, stream: Resource<streams::OutputStream>) -> StreamResult<()> {
        AsyncOutput::flush(self.0, stream)
    }

    fn blocking_flush(&mut self, stream: Resource<streams::OutputStream>) -> StreamResult<()> {
        block_on(AsyncOutput::blocking_flush(self.0, stream))
    }

    fn splice(
        &mut self,
        dst: Resource<streams::OutputStream>,
        src: Resource<streams::InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        AsyncOutput::splice(self.0, dst, src, len)
    }

    fn blocking_splice(
        &mut self,
        dst: Resource<streams::OutputStream>,
        src: Resource<streams::InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        block_on(AsyncOutput::blocking_splice(self.0, dst, src, len))
    }
}

impl streams::HostInputStream for SyncIo<'_> {
    fn drop(&mut self, stream: Resource<streams::InputStream>) -> wasmtime::Result<()> {
        block_on(AsyncInput::drop(self.0, stream))
    }

    fn read(&mut self, stream: Resource<streams::InputStream>, len: u64) -> StreamResult<Vec<u8>> {
        AsyncInput::read(self.0, stream, len)
    }

    fn blocking_read(
        &mut self,
        stream: Resource<streams::InputStream>,
        len: u64,
    ) -> StreamResult<Vec<u8>> {
        block_on(AsyncInput::blocking_read(self.0, stream, len))
    }

    fn skip(&mut self, stream: Resource<streams::InputStream>, len: u64) -> StreamResult<u64> {
        AsyncInput::skip(self.0, stream, len)
    }

    fn blocking_skip(
        &mut self,
        stream: Resource<streams::InputStream>,
        len: u64,
    ) -> StreamResult<u64> {
        block_on(AsyncInput::blocking_skip(self.0, stream, len))
    }

    fn subscribe(
        &mut self,
        stream: Resource<streams::InputStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        AsyncInput::subscribe(self.0, stream)
    }
}
