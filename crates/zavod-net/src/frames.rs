//! Length-prefixed frames on a libp2p stream: a 4-byte big-endian length
//! (tokio-util's `LengthDelimitedCodec`) and a versioned bincode body. The
//! codec refuses a frame whose declared length is over the limit before
//! reading it, so a peer cannot make us buffer more than `max_frame_bytes`.
//!
//! Every write, flush and close is bounded in time: by the timeout the
//! caller passes, or else by the stream's write timeout
//! ([`DEFAULT_WRITE_TIMEOUT`] unless set), so a peer that stops reading
//! never holds a task.

use crate::NetError;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;

/// How long a write, flush or close may block when the caller names no
/// deadline of its own.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one write, flush or close under `timeout`.
async fn bounded<F>(what: &str, timeout: Duration, f: F) -> Result<(), NetError>
where
    F: std::future::Future<Output = Result<(), std::io::Error>>,
{
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| NetError::Timeout {
            what: what.into(),
            ms: timeout.as_millis() as u64,
        })??;
    Ok(())
}
use tokio_util::codec::{Framed, LengthDelimitedCodec, LengthDelimitedCodecError};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

pub struct FrameStream {
    inner: Framed<Compat<libp2p::Stream>, LengthDelimitedCodec>,
    limit: usize,
    write_timeout: Duration,
}

impl std::fmt::Debug for FrameStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameStream(limit {})", self.limit)
    }
}

impl FrameStream {
    pub fn new(stream: libp2p::Stream, max_frame_bytes: usize) -> Self {
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(max_frame_bytes)
            .new_codec();
        FrameStream {
            inner: Framed::new(stream.compat(), codec),
            limit: max_frame_bytes,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }

    /// Bounds writes, flushes and closes that name no deadline by `t`.
    pub fn with_write_timeout(mut self, t: Duration) -> Self {
        self.write_timeout = t;
        self
    }

    /// Sends one frame (within the stream's write timeout).
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), NetError> {
        let bytes = encode_frame(msg, self.limit)?;
        self.send_raw(bytes).await
    }

    /// Sends arbitrary bytes as one frame, unchecked: for tests that play a
    /// hostile peer.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), NetError> {
        let inner = &mut self.inner;
        bounded(
            "writing to the stream",
            self.write_timeout,
            SinkExt::<bytes::Bytes>::send(inner, bytes::Bytes::from(bytes)),
        )
        .await
    }

    /// The next frame; `Ok(None)` when the peer closed the stream cleanly.
    pub async fn recv<T: DeserializeOwned>(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<T>, NetError> {
        let next = tokio::time::timeout(timeout, self.inner.next())
            .await
            .map_err(|_| NetError::Timeout {
                what: "waiting for the next frame".into(),
                ms: timeout.as_millis() as u64,
            })?;
        decode_next(next, self.limit)
    }

    /// Splits into a writer and a reader that can be used concurrently.
    pub fn split(self) -> (FrameWriter, FrameReader) {
        let (limit, write_timeout) = (self.limit, self.write_timeout);
        let (sink, stream) = self.inner.split();
        (
            FrameWriter {
                sink,
                limit,
                write_timeout,
            },
            FrameReader {
                stream: stream.peekable(),
                limit,
            },
        )
    }

    /// Flushes and closes our side (within the stream's write timeout).
    pub async fn close(&mut self) -> Result<(), NetError> {
        let inner = &mut self.inner;
        bounded(
            "closing the stream",
            self.write_timeout,
            SinkExt::<bytes::Bytes>::close(inner),
        )
        .await
    }
}

type Inner = Framed<Compat<libp2p::Stream>, LengthDelimitedCodec>;

/// The sending half of a [`FrameStream`].
pub struct FrameWriter {
    sink: SplitSink<Inner, bytes::Bytes>,
    limit: usize,
    write_timeout: Duration,
}

impl std::fmt::Debug for FrameWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameWriter")
    }
}

impl FrameWriter {
    /// Sends one frame, giving up after `timeout` (a client that stops
    /// reading must not hold a task forever).
    pub async fn send<T: Serialize>(&mut self, msg: &T, timeout: Duration) -> Result<(), NetError> {
        self.send_all(std::slice::from_ref(msg), timeout).await
    }

    /// Sends several frames with one flush, so they leave together (one
    /// write, one wake-up of the reader) rather than one by one, giving up
    /// after `timeout` for the whole batch.
    pub async fn send_all<T: Serialize>(
        &mut self,
        msgs: &[T],
        timeout: Duration,
    ) -> Result<(), NetError> {
        let frames = msgs
            .iter()
            .map(|m| encode_frame(m, self.limit).map(bytes::Bytes::from))
            .collect::<Result<Vec<_>, _>>()?;
        let sink = &mut self.sink;
        tokio::time::timeout(timeout, async move {
            for f in frames {
                sink.feed(f).await?;
            }
            sink.flush().await
        })
        .await
        .map_err(|_| NetError::Timeout {
            what: "writing to the stream".into(),
            ms: timeout.as_millis() as u64,
        })??;
        Ok(())
    }

    /// Sends arbitrary bytes as one frame, unchecked: for tests that play a
    /// hostile peer.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), NetError> {
        let sink = &mut self.sink;
        bounded(
            "writing to the stream",
            self.write_timeout,
            sink.send(bytes::Bytes::from(bytes)),
        )
        .await
    }

    /// Flushes and closes our side, giving up after `timeout`.
    pub async fn close_within(&mut self, timeout: Duration) -> Result<(), NetError> {
        bounded("closing the stream", timeout, self.sink.close()).await
    }

    /// Flushes and closes our side (within the stream's write timeout).
    pub async fn close(&mut self) -> Result<(), NetError> {
        self.close_within(self.write_timeout).await
    }
}

/// The receiving half of a [`FrameStream`].
pub struct FrameReader {
    stream: futures::stream::Peekable<SplitStream<Inner>>,
    limit: usize,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameReader")
    }
}

impl FrameReader {
    /// The next frame, `Ok(None)` on a clean end of stream. No timeout: the
    /// caller selects this against its own deadlines.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, NetError> {
        decode_next(self.stream.next().await, self.limit)
    }

    /// Waits until the next frame has arrived whole (or the stream ended
    /// or failed) without taking it: `true` when something is there for
    /// [`Self::recv`] to read, `false` on a clean end of stream. No
    /// timeout: the caller bounds it.
    pub async fn arrived(&mut self) -> bool {
        std::pin::Pin::new(&mut self.stream).peek().await.is_some()
    }
}

/// Encodes a message and checks it against the stream's frame limit.
fn encode_frame<T: Serialize>(msg: &T, limit: usize) -> Result<Vec<u8>, NetError> {
    let bytes = zavod_proto::wire::encode(msg)?;
    if bytes.len() > limit {
        return Err(NetError::FrameTooLarge { limit });
    }
    Ok(bytes)
}

fn decode_next<T: DeserializeOwned>(
    next: Option<Result<bytes::BytesMut, std::io::Error>>,
    limit: usize,
) -> Result<Option<T>, NetError> {
    match next {
        None => Ok(None),
        Some(Ok(bytes)) => Ok(Some(zavod_proto::wire::decode(&bytes)?)),
        Some(Err(e)) => {
            let too_big = e
                .get_ref()
                .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>());
            if too_big {
                Err(NetError::FrameTooLarge { limit })
            } else {
                Err(NetError::Io(e))
            }
        }
    }
}
