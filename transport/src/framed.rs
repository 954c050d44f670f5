//! Frames on a byte stream: the header is read and checked (including the receiver's size limit)
//! before the body is allocated; the body is checked before it is decoded.

use drv_format::frame::{FRAME_HEADER_LEN, Frame, decode_body, decode_header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::TransportError;

pub struct FrameReader<R> {
    inner: R,
    limit: u32,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `limit`: the largest frame body accepted (named in configuration).
    pub fn new(inner: R, limit: u32) -> Self {
        FrameReader { inner, limit }
    }

    /// The next frame, or `None` when the stream ended between frames: the peer finished it, or
    /// its connection closed, was reset or timed out. That is how every peer leaves (an operator's
    /// tool exits after its answer; a node restarts), so it is not an error; a stream that ends
    /// inside a frame is.
    pub async fn next(&mut self) -> Result<Option<Frame>, TransportError> {
        let mut hb = [0u8; FRAME_HEADER_LEN];
        let mut got = 0;
        while got < FRAME_HEADER_LEN {
            let n = match self.inner.read(&mut hb[got..]).await {
                Ok(n) => n,
                Err(e) if got == 0 => {
                    tracing::debug!("stream ended between frames: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(TransportError::Stream(e.to_string())),
            };
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(TransportError::BadFrame(drv_format::FormatError::Truncated {
                    what: "frame header",
                    need: FRAME_HEADER_LEN,
                    have: got,
                }));
            }
            got += n;
        }
        let h = decode_header(&hb, self.limit)?;
        // Read into spare capacity (no zero fill of a buffer that is about to be overwritten).
        let need = h.body_len as usize;
        let mut body = Vec::with_capacity(need);
        while body.len() < need {
            let mut limited = (&mut self.inner).take((need - body.len()) as u64);
            let n = limited.read_buf(&mut body).await.map_err(|e| TransportError::Stream(e.to_string()))?;
            if n == 0 {
                return Err(TransportError::BadFrame(drv_format::FormatError::Truncated {
                    what: "frame body",
                    need,
                    have: body.len(),
                }));
            }
        }
        Ok(Some(decode_body(&hb, &h, bytes::Bytes::from(body))?))
    }
}

pub struct FrameWriter<W> {
    inner: W,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner }
    }

    /// Queues a frame on the stream. QUIC sends as soon as flow control allows; this does not
    /// wait for the peer (s2n-quic's `flush` waits for the peer's acknowledgement, which would
    /// cost a delayed-ACK interval per frame).
    pub async fn send(&mut self, f: &Frame) -> Result<(), TransportError> {
        self.send_raw(&f.encode()).await
    }

    /// Queues already-encoded bytes (tests use it to send malformed frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.inner.write_all(bytes).await.map_err(|e| TransportError::Stream(e.to_string()))
    }

    /// Waits until everything queued was received by the peer.
    pub async fn flush(&mut self) -> Result<(), TransportError> {
        self.inner.flush().await.map_err(|e| TransportError::Stream(e.to_string()))
    }

    pub async fn finish(&mut self) -> Result<(), TransportError> {
        self.inner.shutdown().await.map_err(|e| TransportError::Stream(e.to_string()))
    }
}

impl FrameWriter<s2n_quic::stream::SendStream> {
    /// Sends an encoded frame without copying it: s2n-quic takes ownership of the buffer.
    pub async fn send_owned(&mut self, bytes: Vec<u8>) -> Result<(), TransportError> {
        self.inner.send(bytes::Bytes::from(bytes)).await.map_err(|e| TransportError::Stream(e.to_string()))
    }

    /// Sends a frame given as chunks (e.g. from `RecordsFrameBuilder`), none of them copied.
    pub async fn send_chunks(&mut self, chunks: &mut [bytes::Bytes]) -> Result<(), TransportError> {
        self.inner.send_vectored(chunks).await.map_err(|e| TransportError::Stream(e.to_string()))
    }

    /// Encodes and sends a frame (one buffer, handed over without a copy).
    pub async fn send_frame(&mut self, f: &Frame) -> Result<(), TransportError> {
        self.send_owned(f.encode()).await
    }
}
