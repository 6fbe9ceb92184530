//! Length-prefixed frames on a libp2p stream: a 4-byte big-endian length
//! (tokio-util's `LengthDelimitedCodec`) and a versioned bincode body. The
//! codec refuses a frame whose declared length is over the limit before
//! reading it, so a peer cannot make us buffer more than `max_frame_bytes`.

use crate::NetError;
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
        let bytes = zavod_proto::wire::encode(msg)?;
        if bytes.len() > self.limit {
            return Err(NetError::FrameTooLarge { limit: self.limit });
        }
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
        match next {
            None => Ok(None),
            Some(Ok(bytes)) => Ok(Some(zavod_proto::wire::decode(&bytes)?)),
            Some(Err(e)) => {
                let too_big = e
                    .get_ref()
                    .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>());
                if too_big {
                    Err(NetError::FrameTooLarge { limit: self.limit })
                } else {
                    Err(NetError::Io(e))
                }
            }
        }
    }

    /// Flushes and closes our side.
    pub async fn close(&mut self) -> Result<(), NetError> {
        SinkExt::<bytes::Bytes>::close(&mut self.inner).await?;
        Ok(())
    }
}
