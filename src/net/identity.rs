//! The node's ed25519 identity, created once and kept in the data directory so
//! that a restarted node keeps its peer id.

use std::path::Path;

use libp2p::identity::Keypair;

use super::NetError;

/// The identity file inside a data directory.
pub const IDENTITY_FILE: &str = "node.key";

/// Loads the keypair in `dir`, or creates and saves a new one (mode 0600).
pub fn load_or_create(dir: &Path) -> Result<Keypair, NetError> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| NetError::Identity {
            path: path.clone(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .map_err(|e| NetError::Identity {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            write_private(&path, &bytes)?;
            Ok(keypair)
        }
        Err(e) => Err(NetError::Io(e)),
    }
}

/// Retires the keypair in `dir` (kept as `node.key.retired`) and creates a
/// new one: the node takes a new peer id.
pub fn replace(dir: &Path) -> Result<Keypair, NetError> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::rename(&path, path.with_extension("key.retired")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(NetError::Io(e)),
    }
    load_or_create(dir)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_survives_reload_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());
        std::fs::write(dir.path().join(IDENTITY_FILE), b"garbage").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(NetError::Identity { .. })
        ));
    }
}
