//! The request-response codec for membership gossip: a 4-byte big-endian
//! length, then a versioned postcard frame ([`crate::wire`]). Frames over
//! [`MAX_GOSSIP_FRAME`] are refused before they are read.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;

use super::NodeId;
use crate::core::membership::GossipMessage;

/// The gossip protocol's name.
pub const GOSSIP_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshlog/membership/1");

/// Largest gossip frame accepted: 4 MiB (a full view of thousands of members).
pub const MAX_GOSSIP_FRAME: usize = 4 * 1024 * 1024;

/// A gossip request: the sender's view.
pub type GossipRequest = GossipMessage<NodeId>;

/// The answer: the receiver's whole view when the sender asked for it.
pub type GossipResponse = Option<GossipMessage<NodeId>>;

/// Reads and writes gossip frames.
#[derive(Clone, Default)]
pub struct GossipCodec;

async fn read_frame<T, M>(io: &mut T) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: serde::de::DeserializeOwned,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_GOSSIP_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("gossip frame of {len} bytes exceeds {MAX_GOSSIP_FRAME}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    crate::wire::decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_frame<T, M>(io: &mut T, message: &M) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: serde::Serialize,
{
    let bytes =
        crate::wire::encode(message).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if bytes.len() > MAX_GOSSIP_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "gossip frame too large",
        ));
    }
    io.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl request_response::Codec for GossipCodec {
    type Protocol = StreamProtocol;
    type Request = GossipRequest;
    type Response = GossipResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<GossipRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<GossipResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: GossipRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: GossipResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

/// The encoded size of a gossip message, as counted for bandwidth figures.
pub fn encoded_len(message: &GossipRequest) -> usize {
    crate::wire::encode(message).map_or(0, |b| b.len() + 4)
}
