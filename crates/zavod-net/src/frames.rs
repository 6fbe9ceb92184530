//! Length-prefixed frames on a libp2p stream: a 4-byte big-endian length
//! (tokio-util's `LengthDelimitedCodec`) and a versioned bincode body. The
//! codec refuses a frame whose declared length is over the limit before
//! reading it, so a peer cannot make us buffer more than `max_frame_bytes`.

use crate::NetError;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;
use tokio_util::codec::{Framed, LengthDelimitedCodec, LengthDelimitedCodecError};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

pub struct FrameStream {
    inner: Framed<Compat<libp2p::Stream>, LengthDelimitedCodec>,
    limit: usize,
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
        }
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), NetError> {
        let bytes = encode_frame(msg, self.limit)?;
        SinkExt::<bytes::Bytes>::send(&mut self.inner, bytes::Bytes::from(bytes)).await?;
        Ok(())
    }

    /// Sends arbitrary bytes as one frame, unchecked: for tests that play a
    /// hostile peer.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), NetError> {
        SinkExt::<bytes::Bytes>::send(&mut self.inner, bytes::Bytes::from(bytes)).await?;
        Ok(())
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
        let limit = self.limit;
        let (sink, stream) = self.inner.split();
        (FrameWriter { sink, limit }, FrameReader { stream, limit })
    }

    /// Flushes and closes our side.
    pub async fn close(&mut self) -> Result<(), NetError> {
        SinkExt::<bytes::Bytes>::close(&mut self.inner).await?;
        Ok(())
    }
}

type Inner = Framed<Compat<libp2p::Stream>, LengthDelimitedCodec>;

/// The sending half of a [`FrameStream`].
pub struct FrameWriter {
    sink: SplitSink<Inner, bytes::Bytes>,
    limit: usize,
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
        self.sink.send(bytes::Bytes::from(bytes)).await?;
        Ok(())
    }

    pub async fn close(&mut self) -> Result<(), NetError> {
        self.sink.close().await?;
        Ok(())
    }
}

/// The receiving half of a [`FrameStream`].
pub struct FrameReader {
    stream: SplitStream<Inner>,
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
