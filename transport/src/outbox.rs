//! The sending half of a stream, shared: any thread or task queues frames with [`Outbox::send`],
//! and they leave in the order of the calls.
//!
//! A frame goes into the QUIC stream at once, on the caller's thread, when nothing is queued ahead
//! of it and the stream's send buffer has room (the usual case). Only otherwise is it queued for
//! the flusher task, which waits for room. So the common path has no hand-off to another task:
//! on this 2-core host each hand-off (a futex wake and a reschedule) measured 10 to 25 us on the
//! synchronous write path (agent -> staging, and staging's acknowledgement back).
//!
//! The flusher ends, and the stream is closed cleanly, once every `Outbox` clone is dropped and
//! everything queued is sent; it returns the stream's error if sending failed.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use drv_format::frame::Frame;
use s2n_quic::stream::SendStream;

/// The stream failed or was closed: the frame was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream closed: {0}")]
pub struct Closed(pub String);

struct State {
    stream: SendStream,
    queue: VecDeque<Bytes>,
    error: Option<String>,
    /// The flusher, waiting for a frame to be queued.
    flusher: Option<Waker>,
    /// Every sender is gone.
    done: bool,
}

struct Inner {
    state: Mutex<State>,
    senders: AtomicUsize,
}

/// A handle to send frames on one stream (cheap to clone).
pub struct Outbox {
    inner: Arc<Inner>,
}

impl Outbox {
    /// The outbox of `stream` and its flusher (spawn it).
    pub fn new(stream: SendStream) -> (Outbox, impl Future<Output = Result<(), Closed>> + Send + 'static) {
        let inner = Arc::new(Inner {
            state: Mutex::new(State { stream, queue: VecDeque::new(), error: None, flusher: None, done: false }),
            senders: AtomicUsize::new(1),
        });
        let flusher = flush(inner.clone());
        (Outbox { inner }, flusher)
    }

    /// Sends `f` after every frame sent before it.
    pub fn send(&self, f: Frame) -> Result<(), Closed> {
        self.send_bytes(Bytes::from(f.encode()))
    }

    /// Sends already-encoded bytes (tests use it for malformed frames).
    pub fn send_bytes(&self, bytes: Bytes) -> Result<(), Closed> {
        let mut st = self.inner.state.lock().expect("outbox");
        if let Some(e) = &st.error {
            return Err(Closed(e.clone()));
        }
        if st.queue.is_empty() {
            // Nothing ahead of it: straight into the stream if its buffer has room. A `Pending`
            // here registers a no-op waker with the stream; the frame is then queued and the
            // flusher polls again with its own waker, so no wake-up is lost.
            let mut cx = Context::from_waker(Waker::noop());
            match st.stream.poll_send_ready(&mut cx) {
                Poll::Ready(Ok(room)) if room >= bytes.len() => {
                    return match st.stream.send_data(bytes) {
                        Ok(()) => Ok(()),
                        Err(e) => Err(self.fail(st, e.to_string())),
                    };
                }
                Poll::Ready(Err(e)) => return Err(self.fail(st, e.to_string())),
                _ => {}
            }
        }
        st.queue.push_back(bytes);
        let w = st.flusher.take();
        drop(st);
        if let Some(w) = w {
            w.wake();
        }
        Ok(())
    }

    fn fail(&self, mut st: std::sync::MutexGuard<'_, State>, e: String) -> Closed {
        st.error.get_or_insert(e.clone());
        let w = st.flusher.take();
        drop(st);
        if let Some(w) = w {
            w.wake();
        }
        Closed(e)
    }
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.inner.senders.fetch_add(1, Ordering::Relaxed);
        Outbox { inner: self.inner.clone() }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.inner.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut st = self.inner.state.lock().expect("outbox");
            st.done = true;
            let w = st.flusher.take();
            drop(st);
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

/// Sends what is queued as the stream takes it; when every sender is gone and the queue is
/// empty, closes the stream (waiting until the peer has it all).
async fn flush(inner: Arc<Inner>) -> Result<(), Closed> {
    std::future::poll_fn(|cx| {
        let mut st = inner.state.lock().expect("outbox");
        loop {
            if let Some(e) = &st.error {
                return Poll::Ready(Err(Closed(e.clone())));
            }
            if st.queue.is_empty() {
                if st.done {
                    return match st.stream.poll_close(cx) {
                        Poll::Ready(r) => Poll::Ready(r.map_err(|e| Closed(e.to_string()))),
                        Poll::Pending => Poll::Pending,
                    };
                }
                st.flusher = Some(cx.waker().clone());
                return Poll::Pending;
            }
            match st.stream.poll_send_ready(cx) {
                Poll::Pending | Poll::Ready(Ok(0)) => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    st.error = Some(e.to_string());
                }
                Poll::Ready(Ok(room)) => {
                    let mut chunk = st.queue.pop_front().expect("not empty");
                    if chunk.len() > room {
                        let rest = chunk.split_off(room);
                        st.queue.push_front(rest);
                    }
                    if let Err(e) = st.stream.send_data(chunk) {
                        st.error = Some(e.to_string());
                    }
                }
            }
        }
    })
    .await
}
