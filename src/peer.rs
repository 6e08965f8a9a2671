//! [`NodeId`]: a node's identity as plain data, for the layers that name
//! peers (the store's replica sets and votes, the peer protocol, the core's
//! drivers) without depending on the network library.
//!
//! It holds the bytes of a libp2p peer id (a multihash of the node's public
//! key), shows as the same base58 text, and serialises as the same bytes, so
//! it is interchangeable with the peer id on disk and on the wire. `net`
//! converts between the two.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest peer id in bytes: a multihash code (a varint of up to 10
/// bytes), its length (1 byte) and a digest of at most 64 bytes.
const MAX_LEN: usize = 80;

/// A peer's identity in the core, the store and on the wire: the bytes of a
/// libp2p peer id. Cheap to copy; ordered by its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId {
    len: u8,
    bytes: [u8; MAX_LEN],
}

impl NodeId {
    /// The identity with these peer-id bytes, or `None` when they are empty
    /// or longer than any peer id.
    pub fn from_bytes(bytes: &[u8]) -> Option<NodeId> {
        if bytes.is_empty() || bytes.len() > MAX_LEN {
            return None;
        }
        let mut id = NodeId {
            len: bytes.len() as u8,
            bytes: [0; MAX_LEN],
        };
        id.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(id)
    }

    /// The peer-id bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Default for NodeId {
    /// The empty identity, which no peer has.
    fn default() -> Self {
        NodeId {
            len: 0,
            bytes: [0; MAX_LEN],
        }
    }
}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NodeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.as_bytes()).into_string())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for NodeId {
    type Err = String;

    /// Parses the base58 text a peer id is shown as.
    fn from_str(text: &str) -> Result<NodeId, String> {
        let bytes = bs58::decode(text)
            .into_vec()
            .map_err(|e| format!("not a peer id: {e}"))?;
        NodeId::from_bytes(&bytes).ok_or_else(|| format!("not a peer id: {text}"))
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_bytes())
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        NodeId::from_bytes(&bytes)
            .ok_or_else(|| serde::de::Error::custom("a peer id of an impossible length"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_round_trips_through_text_and_bytes() {
        let id = NodeId::from_bytes(&[0, 36, 8, 1, 18, 32, 7, 7, 7]).expect("a valid length");
        let text = id.to_string();
        assert_eq!(text.parse::<NodeId>(), Ok(id));
        let encoded = postcard::to_stdvec(&id).expect("encode");
        assert_eq!(postcard::from_bytes::<NodeId>(&encoded).ok(), Some(id));
        assert!(NodeId::from_bytes(&[]).is_none());
        assert!(NodeId::from_bytes(&[1; MAX_LEN + 1]).is_none());
    }
}
