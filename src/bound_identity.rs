//! A storage node's peer id belongs to its database.
//!
//! Replica sets and votes name peers, and a peer's votes and acknowledged
//! entries live in its database. A node that keeps `node.key` but comes back
//! with a new database (deleted, lost with a disk) or an older copy of it
//! (restored from a backup) would vote again in epochs it already voted in,
//! and count for a quorum with entries it no longer holds: two leaders in an
//! epoch, or lost commits (Raft's lost-disk problem). So the database records
//! which identity claimed it and how many times it was opened; a file beside
//! it (`database.generation`) remembers the count the node last saw. When the
//! database does not carry this node's claim, or carries an older count than
//! the node saw, the node takes a new peer id: to the mesh it is a new node,
//! its old identity is a dead member, and placement gives it the old one's
//! partitions the usual way — a learner first, a voter only once caught up.

use std::path::Path;

use tracing::warn;

use crate::error::{Error, Result, StoreError};
use crate::net::{Keypair, identity};
use crate::store::Store;

/// The file beside the database with the claim count the node last saw.
pub const GENERATION_FILE: &str = "database.generation";

/// The identity a storage node in `dir` runs with, bound to `store`.
pub fn bind(dir: &Path, store: &Store) -> Result<Keypair> {
    let key_existed = dir.join(identity::IDENTITY_FILE).exists();
    let mut keypair = identity::load_or_create(dir).map_err(Error::Net)?;
    let (claimed_by, generation) = store.claimed_by()?;
    let seen = read_generation(dir)?;
    let me = identity_hash(&keypair);
    let rolled_back = seen.is_some_and(|seen| generation < seen);
    // A database written before identities were recorded (it holds a mesh
    // or topics but no claim) is taken as this node's own.
    let unclaimed_but_used = claimed_by.is_none()
        && seen.is_none()
        && (store.mesh_id()?.is_some() || !store.list_topics()?.is_empty());
    let ours = (claimed_by == Some(me) || unclaimed_but_used) && !rolled_back;
    if key_existed && !ours {
        let old = keypair.public().to_peer_id();
        let reason = if claimed_by.is_none() {
            "the database is new"
        } else if rolled_back {
            "the database is older than this node last saw it"
        } else {
            "the database belongs to another identity"
        };
        keypair = identity::replace(dir).map_err(Error::Net)?;
        warn!(
            %old,
            new = %keypair.public().to_peer_id(),
            "{reason}: this node takes a new peer id and rejoins its partitions as a new replica, voting only once it has caught up"
        );
    }
    let generation = store.claim(identity_hash(&keypair))?;
    write_generation(dir, generation)?;
    Ok(keypair)
}

/// A short, stable digest of an identity's peer id.
fn identity_hash(keypair: &Keypair) -> u64 {
    let peer = keypair.public().to_peer_id().to_bytes();
    let digest = blake3::hash(&peer);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

fn read_generation(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(GENERATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| {
            Error::Store(StoreError::Corrupt {
                path,
                detail: format!("not a generation number: {:?}", text.trim()),
            })
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Store(StoreError::Io(e))),
    }
}

fn write_generation(dir: &Path, generation: u64) -> Result<()> {
    use std::io::Write;
    let path = dir.join(GENERATION_FILE);
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(generation.to_string().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| Error::Store(StoreError::Io(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(dir: &Path, store: &Store) -> String {
        bind(dir, store).unwrap().public().to_peer_id().to_string()
    }

    #[test]
    fn the_identity_survives_restarts_and_changes_with_a_new_or_older_database() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = Store::open(dir.path(), true).unwrap();
            peer(dir.path(), &store)
        };
        let again = {
            let store = Store::open(dir.path(), true).unwrap();
            peer(dir.path(), &store)
        };
        assert_eq!(first, again, "a restart keeps the peer id");

        // An older copy of the database (taken before the last open).
        let backup = tempfile::tempdir().unwrap();
        std::fs::copy(
            dir.path().join(crate::store::DB_FILE_NAME),
            backup.path().join("copy"),
        )
        .unwrap();
        let third = {
            let store = Store::open(dir.path(), true).unwrap();
            peer(dir.path(), &store)
        };
        assert_eq!(first, third);
        std::fs::copy(
            backup.path().join("copy"),
            dir.path().join(crate::store::DB_FILE_NAME),
        )
        .unwrap();
        let restored = {
            let store = Store::open(dir.path(), true).unwrap();
            peer(dir.path(), &store)
        };
        assert_ne!(
            first, restored,
            "a rolled-back database gets a new identity"
        );

        // A lost database.
        std::fs::remove_file(dir.path().join(crate::store::DB_FILE_NAME)).unwrap();
        let fresh = {
            let store = Store::open(dir.path(), true).unwrap();
            peer(dir.path(), &store)
        };
        assert_ne!(restored, fresh, "a new database gets a new identity");
        let kept = {
            let store = Store::open(dir.path(), true).unwrap();
            peer(dir.path(), &store)
        };
        assert_eq!(fresh, kept);
    }
}
