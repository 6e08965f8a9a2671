//! The request-response codecs: a 4-byte big-endian length, then a versioned
//! postcard frame ([`crate::wire`]). Frames over the protocol's cap are
//! refused before they are read. Membership gossip uses it; the peer
//! protocol ([`crate::protocol`]) uses the same framing on long-lived links
//! ([`super::link`]).

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

/// Largest peer-protocol frame: a stored batch's cap plus room for the envelope.
pub const MAX_PEER_FRAME: usize = crate::wire::MAX_FRAME_BYTES + 64 * 1024;

/// Reads and writes frames of requests `Req` and responses `Resp`, at most
/// `MAX` bytes each.
pub struct FrameCodec<Req, Resp, const MAX: usize>(std::marker::PhantomData<fn() -> (Req, Resp)>);

impl<Req, Resp, const MAX: usize> Clone for FrameCodec<Req, Resp, MAX> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<Req, Resp, const MAX: usize> Default for FrameCodec<Req, Resp, MAX> {
    fn default() -> Self {
        FrameCodec(std::marker::PhantomData)
    }
}

/// Reads and writes gossip frames.
pub type GossipCodec = FrameCodec<GossipRequest, GossipResponse, MAX_GOSSIP_FRAME>;

async fn read_frame<T, M>(io: &mut T, max: usize) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: serde::de::DeserializeOwned,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    crate::wire::decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_frame<T, M>(io: &mut T, message: &M, max: usize) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: serde::Serialize,
{
    let bytes =
        crate::wire::encode(message).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if bytes.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {} bytes exceeds {max}", bytes.len()),
        ));
    }
    io.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl<Req, Resp, const MAX: usize> request_response::Codec for FrameCodec<Req, Resp, MAX>
where
    Req: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    Resp: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, MAX).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, MAX).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, MAX).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, MAX).await
    }
}

/// The encoded size of a gossip message, as counted for bandwidth figures.
pub fn encoded_len(message: &GossipRequest) -> usize {
    crate::wire::encode(message).map_or(0, |b| b.len() + 4)
}
