//! Peer links: the peer protocol over one long-lived stream per peer and
//! direction.
//!
//! A node that sends a peer-protocol request to a peer opens, once, a stream
//! to it ([`LINK_PROTOCOL`], through libp2p-stream) and from then on writes
//! every request to that peer on it as a frame: a 4-byte big-endian length,
//! then a versioned postcard [`LinkRequest`] carrying an id. The peer answers
//! on the same stream with [`LinkResponse`] frames in whatever order its
//! answers complete; the id pairs them. Requests sent without waiting
//! ([`super::Mesh::send`]) ask for no answer, so replication traffic costs one
//! frame per message. Requests are handed to the node in the order they were
//! written, so one peer's messages to another keep their order.
//!
//! Frames queued while the previous ones were written go out in one flush, so
//! a burst of small messages costs one noise frame and one TCP send, not one
//! each. A request-response substream per message, as before, cost a stream
//! negotiation, a timer and two passes through the swarm's task.
//!
//! Everything is bounded: a link queues at most [`LINK_QUEUE`] requests
//! before senders wait; a peer has at most [`ANSWER_WINDOW`] of its requests
//! in the node at once before its link stops being read (the stream's flow
//! control then holds the sender back); a request unanswered for
//! [`REQUEST_TIMEOUT`] fails, and closes the link, so that the next request
//! opens a fresh one instead of writing into a dead connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tracing::debug;

use super::codec::MAX_PEER_FRAME;
use super::{Command, InboundRequest, NetError, NodeId};
use crate::protocol::{PeerRequest, PeerResponse};

/// The stream protocol that carries the peer protocol.
pub const LINK_PROTOCOL: StreamProtocol = StreamProtocol::new("/meshlog/link/1");

/// Requests a link holds before [`Links::request`] waits for room.
pub const LINK_QUEUE: usize = 1024;

/// Requests of one peer's link in the node at once, answered or not.
pub const ANSWER_WINDOW: usize = 1024;

/// How long a request waits for its answer before it fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a link looks for requests past [`REQUEST_TIMEOUT`].
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Frames written before a flush, at most; a flush also happens whenever
/// nothing more is queued.
const FRAMES_PER_FLUSH: usize = 256;

/// One request on a link.
#[derive(Debug, Serialize, Deserialize)]
pub struct LinkRequest {
    /// Chosen by the sender, unique on its link; the answer carries it back.
    pub id: u64,
    /// `false` for traffic whose answers the sender does not read.
    pub wants_answer: bool,
    /// The request.
    pub request: PeerRequest,
}

/// One answer on a link.
#[derive(Debug, Serialize, Deserialize)]
pub struct LinkResponse {
    /// The request's id.
    pub id: u64,
    /// The answer, or `None` when the node dropped the request (it was not
    /// keeping up, or chose not to answer).
    pub response: Option<PeerResponse>,
}

/// What a caller gets back: the answer or why there is none.
type AnswerSender = oneshot::Sender<Result<PeerResponse, NetError>>;

/// A request waiting in a link's queue.
struct Outgoing {
    request: PeerRequest,
    answer: Option<AnswerSender>,
}

/// The outbound links of a node, one per peer, made on first use.
pub(super) struct Links {
    /// Opens streams; cloned into each link.
    control: libp2p_stream::Control,
    /// The event loop, asked to learn a peer's gossiped addresses before a
    /// link dials it.
    commands: mpsc::Sender<Command>,
    /// Each live link's queue.
    queues: Mutex<HashMap<PeerId, mpsc::Sender<Outgoing>>>,
}

impl Links {
    pub(super) fn new(control: libp2p_stream::Control, commands: mpsc::Sender<Command>) -> Self {
        Links {
            control,
            commands,
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Queues `request` for `to`, opening a link first if there is none.
    /// With `answer`, the answer (or the failure) is sent there.
    pub(super) async fn send(
        &self,
        to: &NodeId,
        request: PeerRequest,
        answer: Option<AnswerSender>,
    ) -> Result<(), NetError> {
        let Some(peer) = super::peer_id_of_node(to) else {
            return Err(NetError::Request {
                peer: *to,
                reason: "not a peer id".into(),
            });
        };
        let mut outgoing = Outgoing { request, answer };
        // A link that ended since it was looked up is replaced once.
        for _ in 0..2 {
            let queue = self.queue_to(peer)?;
            match queue.send(outgoing).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => {
                    self.forget(peer, &queue);
                    outgoing = back;
                }
            }
        }
        Err(NetError::Request {
            peer: *to,
            reason: "the link to the peer closed".into(),
        })
    }

    fn queue_to(&self, peer: PeerId) -> Result<mpsc::Sender<Outgoing>, NetError> {
        let mut queues = self.queues.lock().map_err(|_| NetError::Closed)?;
        if let Some(queue) = queues.get(&peer).filter(|q| !q.is_closed()) {
            return Ok(queue.clone());
        }
        let (queue, pending) = mpsc::channel(LINK_QUEUE);
        queues.insert(peer, queue.clone());
        let link = OutboundLink {
            peer,
            control: self.control.clone(),
            commands: self.commands.clone(),
        };
        tokio::spawn(link.run(pending));
        Ok(queue)
    }

    fn forget(&self, peer: PeerId, dead: &mpsc::Sender<Outgoing>) {
        if let Ok(mut queues) = self.queues.lock()
            && queues.get(&peer).is_some_and(|q| q.same_channel(dead))
        {
            queues.remove(&peer);
        }
    }
}

fn frame_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(MAX_PEER_FRAME)
        .new_codec()
}

/// The sending end of one link: owns the stream it opened to `peer`.
struct OutboundLink {
    peer: PeerId,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<Command>,
}

/// A request written to the link, waiting for its answer.
struct Waiting {
    sent: Instant,
    answer: AnswerSender,
}

impl OutboundLink {
    async fn run(mut self, mut queue: mpsc::Receiver<Outgoing>) {
        let reason = match self.open().await {
            Ok(stream) => self.carry(stream, &mut queue).await,
            Err(reason) => reason,
        };
        debug!(peer = %self.peer, %reason, "link closed");
        queue.close();
        while let Ok(outgoing) = queue.try_recv() {
            self.fail(outgoing.answer, &reason);
        }
    }

    async fn open(&mut self) -> Result<libp2p::Stream, String> {
        let (done, learned) = oneshot::channel();
        self.commands
            .send(Command::LearnAddresses {
                peer: self.peer,
                done,
            })
            .await
            .map_err(|_| "the mesh is shut down".to_string())?;
        learned
            .await
            .map_err(|_| "the mesh is shut down".to_string())?;
        self.control
            .open_stream(self.peer, LINK_PROTOCOL)
            .await
            .map_err(|e| e.to_string())
    }

    /// Writes queued requests and reads answers until the stream fails, a
    /// request times out or the mesh goes away; returns why it stopped.
    async fn carry(&self, stream: libp2p::Stream, queue: &mut mpsc::Receiver<Outgoing>) -> String {
        let (read, write) = tokio::io::split(stream.compat());
        let mut frames_in = FramedRead::new(read, frame_codec());
        let mut frames_out = FramedWrite::new(write, frame_codec());
        // Shared by the three loops below, which run in this one task; the
        // lock is never held across an await.
        let waiting: Mutex<HashMap<u64, Waiting>> = Mutex::new(HashMap::new());
        let mut next_id = 0u64;

        let writing = async {
            while let Some(first) = queue.recv().await {
                let mut outgoing = Some(first);
                let mut written = 0;
                while let Some(Outgoing { request, answer }) = outgoing.take() {
                    let id = next_id;
                    next_id += 1;
                    let frame = LinkRequest {
                        id,
                        wants_answer: answer.is_some(),
                        request,
                    };
                    match encode_frame(&frame) {
                        Ok(bytes) => {
                            if let Some(answer) = answer {
                                let sent = Instant::now();
                                lock(&waiting).insert(id, Waiting { sent, answer });
                            }
                            if let Err(e) = frames_out.feed(bytes).await {
                                return format!("write failed: {e}");
                            }
                        }
                        Err(reason) => self.fail(answer, &reason),
                    }
                    written += 1;
                    if written < FRAMES_PER_FLUSH {
                        outgoing = queue.try_recv().ok();
                    }
                }
                if let Err(e) = SinkExt::<Bytes>::flush(&mut frames_out).await {
                    return format!("write failed: {e}");
                }
            }
            "the mesh is shut down".to_string()
        };
        let reading = async {
            while let Some(frame) = frames_in.next().await {
                let bytes = match frame {
                    Ok(bytes) => bytes,
                    Err(e) => return format!("read failed: {e}"),
                };
                let answer: LinkResponse = match crate::wire::decode(&bytes) {
                    Ok(answer) => answer,
                    Err(e) => return format!("malformed answer: {e}"),
                };
                let waiter = lock(&waiting).remove(&answer.id);
                if let Some(Waiting { answer: to, .. }) = waiter {
                    let result = answer.response.ok_or_else(|| NetError::Request {
                        peer: NodeId::from(self.peer),
                        reason: "the peer dropped the request".into(),
                    });
                    let _ = to.send(result);
                }
            }
            "the peer closed the link".to_string()
        };
        let sweeping = async {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tick.tick().await;
                let overdue = lock(&waiting)
                    .values()
                    .any(|w| w.sent.elapsed() > REQUEST_TIMEOUT);
                if overdue {
                    return "a request went unanswered too long".to_string();
                }
            }
        };
        let reason = tokio::select! {
            reason = writing => reason,
            reason = reading => reason,
            reason = sweeping => reason,
        };
        let waiting = waiting
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (_, waiter) in waiting {
            self.fail(Some(waiter.answer), &reason);
        }
        reason
    }

    fn fail(&self, answer: Option<AnswerSender>, reason: &str) {
        if let Some(answer) = answer {
            let _ = answer.send(Err(NetError::Request {
                peer: NodeId::from(self.peer),
                reason: reason.to_string(),
            }));
        }
    }
}

/// Locks `waiting`; a panic elsewhere cannot leave the map half-changed, so a
/// poisoned lock is taken as it is.
fn lock(
    waiting: &Mutex<HashMap<u64, Waiting>>,
) -> std::sync::MutexGuard<'_, HashMap<u64, Waiting>> {
    waiting
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn encode_frame<T: Serialize>(frame: &T) -> Result<Bytes, String> {
    let bytes = crate::wire::encode(frame).map_err(|e| e.to_string())?;
    if bytes.len() > MAX_PEER_FRAME {
        return Err(format!(
            "frame of {} bytes exceeds {MAX_PEER_FRAME}",
            bytes.len()
        ));
    }
    Ok(Bytes::from(bytes))
}

/// Accepts peers' links and serves each until it closes.
pub(super) async fn accept(
    mut incoming: libp2p_stream::IncomingStreams,
    node: mpsc::Sender<InboundRequest>,
) {
    while let Some((peer, stream)) = incoming.next().await {
        tokio::spawn(serve(peer, stream, node.clone()));
    }
}

/// An answer the node is preparing: the request's id, whether the peer wants
/// it, the node's reply and the window slot it holds.
type PendingAnswer = futures::future::BoxFuture<'static, (u64, bool, Option<PeerResponse>)>;

/// Reads `peer`'s requests from its link, hands them to the node in order,
/// and writes the answers back as they complete.
async fn serve(peer: PeerId, stream: libp2p::Stream, node: mpsc::Sender<InboundRequest>) {
    let (read, write) = tokio::io::split(stream.compat());
    let mut frames_in = FramedRead::new(read, frame_codec());
    let mut frames_out = FramedWrite::new(write, frame_codec());
    let window = Arc::new(Semaphore::new(ANSWER_WINDOW));
    let (started, mut answers_to_write) = mpsc::unbounded_channel::<PendingAnswer>();
    let from = NodeId::from(peer);

    let reading = async {
        while let Some(frame) = frames_in.next().await {
            let bytes = match frame {
                Ok(bytes) => bytes,
                Err(e) => return format!("read failed: {e}"),
            };
            let LinkRequest {
                id,
                wants_answer,
                request,
            } = match crate::wire::decode(&bytes) {
                Ok(request) => request,
                Err(e) => return format!("malformed request: {e}"),
            };
            let Ok(slot) = window.clone().acquire_owned().await else {
                return "the link is closing".to_string();
            };
            let (reply, answer) = oneshot::channel();
            let inbound = InboundRequest {
                from,
                request,
                reply,
            };
            let pending: PendingAnswer = if node.try_send(inbound).is_ok() {
                Box::pin(answer_of(id, wants_answer, answer, slot))
            } else {
                debug!(%peer, "peer request dropped: the node is not keeping up");
                Box::pin(async move {
                    drop(slot);
                    (id, wants_answer, None)
                })
            };
            if started.send(pending).is_err() {
                return "the link is closing".to_string();
            }
        }
        "the peer closed the link".to_string()
    };
    let writing = async {
        let mut answers = FuturesUnordered::new();
        loop {
            tokio::select! {
                pending = answers_to_write.recv() => match pending {
                    Some(pending) => answers.push(pending),
                    None => return "the link is closing".to_string(),
                },
                Some(first) = answers.next(), if !answers.is_empty() => {
                    let mut ready = Some(first);
                    let mut written = 0;
                    while let Some((id, wants_answer, response)) = ready.take() {
                        if wants_answer {
                            let frame = LinkResponse { id, response };
                            let bytes = match encode_frame(&frame) {
                                Ok(bytes) => bytes,
                                // Too big to send: the peer learns it was dropped.
                                Err(_) => match encode_frame(&LinkResponse { id, response: None }) {
                                    Ok(bytes) => bytes,
                                    Err(e) => return e,
                                },
                            };
                            if let Err(e) = frames_out.feed(bytes).await {
                                return format!("write failed: {e}");
                            }
                            written += 1;
                        }
                        if written < FRAMES_PER_FLUSH {
                            ready = answers.next().now_or_never().flatten();
                        }
                    }
                    if let Err(e) = SinkExt::<Bytes>::flush(&mut frames_out).await {
                        return format!("write failed: {e}");
                    }
                }
            }
        }
    };
    let reason = tokio::select! {
        reason = reading => reason,
        reason = writing => reason,
    };
    debug!(%peer, %reason, "peer's link closed");
}

async fn answer_of(
    id: u64,
    wants_answer: bool,
    answer: oneshot::Receiver<PeerResponse>,
    slot: OwnedSemaphorePermit,
) -> (u64, bool, Option<PeerResponse>) {
    let response = answer.await.ok();
    drop(slot);
    (id, wants_answer, response)
}
