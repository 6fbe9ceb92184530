//! The client as the chat entry sees it: where its frames go and what it
//! does next, for a client on a chat stream and for an in-process one
//! (the HTTP API).

use std::time::Duration;
use tokio::sync::mpsc;
use zavod_net::{FrameReader, FrameWriter};
use zavod_proto::chat::entry::ClientInput;
use zavod_proto::wire::{ClientFrame, ServerFrame};

/// The client as the entry sees it: where frames go, and what it does.
pub(crate) trait ClientSide: Send {
    /// Sends frames in order, together where it can (one flush); an error
    /// means the client is gone.
    fn send_all(&mut self, frames: &[ServerFrame]) -> impl Future<Output = Result<(), ()>> + Send;

    /// What the client does next; pending forever once nothing more can
    /// come.
    fn next(&mut self) -> impl Future<Output = ClientInput> + Send;
}

/// A client on a chat stream.
pub(crate) struct StreamClient<'a> {
    pub(crate) writer: &'a mut FrameWriter,
    pub(crate) reader: &'a mut FrameReader,
    pub(crate) write_timeout: Duration,
    reading: bool,
}

impl<'a> StreamClient<'a> {
    pub(crate) fn new(
        writer: &'a mut FrameWriter,
        reader: &'a mut FrameReader,
        write_timeout: Duration,
    ) -> Self {
        StreamClient {
            writer,
            reader,
            write_timeout,
            reading: true,
        }
    }
}

impl ClientSide for StreamClient<'_> {
    async fn send_all(&mut self, frames: &[ServerFrame]) -> Result<(), ()> {
        self.writer
            .send_all(frames, self.write_timeout)
            .await
            .map_err(|_| ())
    }

    async fn next(&mut self) -> ClientInput {
        if self.reading {
            match self.reader.recv::<ClientFrame>().await {
                Ok(Some(f)) => return ClientInput::Frame(f),
                Ok(None) => {
                    self.reading = false;
                    return ClientInput::HalfClosed;
                }
                Err(_) => {
                    self.reading = false;
                    return ClientInput::Gone;
                }
            }
        }
        std::future::pending().await
    }
}

/// An in-process client (the HTTP API): frames go down a channel, and it
/// has left when it drops the receiver.
pub(crate) struct ChannelClient {
    pub(crate) tx: mpsc::Sender<ServerFrame>,
    pub(crate) write_timeout: Duration,
    gone: bool,
}

impl ChannelClient {
    pub(crate) fn new(tx: mpsc::Sender<ServerFrame>, write_timeout: Duration) -> Self {
        ChannelClient {
            tx,
            write_timeout,
            gone: false,
        }
    }
}

impl ClientSide for ChannelClient {
    async fn send_all(&mut self, frames: &[ServerFrame]) -> Result<(), ()> {
        for f in frames {
            match tokio::time::timeout(self.write_timeout, self.tx.send(f.clone())).await {
                Ok(Ok(())) => {}
                _ => return Err(()),
            }
        }
        Ok(())
    }

    async fn next(&mut self) -> ClientInput {
        if !self.gone {
            self.tx.closed().await;
            self.gone = true;
            return ClientInput::Gone;
        }
        std::future::pending().await
    }
}
