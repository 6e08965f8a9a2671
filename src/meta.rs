//! The mesh's metadata log: topic creations and deletions are records of the
//! internal, replicated partition `__meta/0`, so the log orders them.
//!
//! A node that creates or deletes a topic appends a [`MetaCommand`] to
//! `__meta` with `Acks::All`; every storage node holds `__meta` (up to five
//! as voters, the others as learners) and applies its committed records in
//! offset order to its own topic table. So two nodes that create one name at
//! once get one answer: the first record in the log creates the topic, and
//! the second finds it there (a no-op with the same config, `TopicExists`
//! with another). A node that joins later receives the whole log and applies
//! it from the start.

use serde::{Deserialize, Serialize};

use crate::config::TopicConfig;
use crate::net::NodeId;

/// The internal topic that holds the metadata log.
pub const META_TOPIC: &str = "__meta";

/// Voters of `__meta`: up to this many storage nodes; the others learn it.
pub const META_VOTERS: usize = 5;

/// One change to the mesh's topics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Create a topic, unless one of that name exists.
    CreateTopic {
        /// Its name.
        name: String,
        /// Its settings.
        config: TopicConfig,
        /// Each partition's first replica set.
        replicas: Vec<Vec<NodeId>>,
    },
    /// Delete a topic, if it exists.
    DeleteTopic {
        /// Its name.
        name: String,
    },
}

/// Whether `name` is an internal topic (its name starts with `__`).
pub fn is_internal(name: &str) -> bool {
    name.starts_with("__")
}
