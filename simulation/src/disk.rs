//! A disk for the real store: redb's storage held in memory, keeping across
//! a crash only what was synced, plus (when the crash tears) a prefix of the
//! writes since the last sync, the last of them possibly cut short.
//!
//! The simulation opens `meshlog::store::Store` on a [`CrashDisk`] with
//! `Store::open_on_backend`, crashes it with [`CrashDisk::crash`] (every
//! handle from before the crash fails from then on, so the dropped database
//! cannot write behind the crash), and reopens the store on
//! [`CrashDisk::after_crash`].

use std::sync::{Arc, Mutex, MutexGuard};

use redb::StorageBackend;

/// The error type of redb's storage backends.
type BackendIoError = std::io::Error;

/// One write since the last sync.
#[derive(Clone, Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Image {
    /// What a crash keeps.
    durable: Vec<u8>,
    /// What reads see.
    current: Vec<u8>,
    /// Writes since the last sync, in order.
    pending: Vec<Pending>,
    /// Bumped by every crash: handles of an older life fail.
    life: u64,
    /// Writes, length changes and syncs so far.
    ops: u64,
    /// Operations left before the power fails (every later one fails).
    power_left: Option<u64>,
}

/// A handle on one simulated disk (cheap to clone; all clones of one life
/// share the image).
#[derive(Clone, Debug, Default)]
pub struct CrashDisk {
    image: Arc<Mutex<Image>>,
    life: u64,
}

fn crashed() -> BackendIoError {
    std::io::Error::other("the simulated disk crashed")
}

fn apply(bytes: &mut Vec<u8>, op: &Pending) {
    match op {
        Pending::Write { offset, data } => {
            let start = *offset as usize;
            let end = start + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(data);
        }
        Pending::SetLen(len) => bytes.resize(*len as usize, 0),
    }
}

impl CrashDisk {
    /// An empty disk.
    pub fn new() -> Self {
        CrashDisk::default()
    }

    fn image(&self) -> Result<MutexGuard<'_, Image>, BackendIoError> {
        let image = self.image.lock().map_err(|_| crashed())?;
        if image.life != self.life {
            return Err(crashed());
        }
        Ok(image)
    }

    /// The image, for one operation that changes it (or syncs).
    fn image_to_change(&self) -> Result<MutexGuard<'_, Image>, BackendIoError> {
        let mut image = self.image()?;
        match image.power_left {
            Some(0) => return Err(std::io::Error::other("the simulated power failed")),
            Some(left) => image.power_left = Some(left - 1),
            None => {}
        }
        image.ops += 1;
        Ok(image)
    }

    /// Writes since the last sync (what a crash may lose).
    pub fn unsynced_writes(&self) -> usize {
        self.image.lock().map_or(0, |i| i.pending.len())
    }

    /// Writes, length changes and syncs so far.
    pub fn ops(&self) -> u64 {
        self.image.lock().map_or(0, |i| i.ops)
    }

    /// The power fails after `ops` more writes, length changes or syncs:
    /// every later one fails (as in the middle of a commit), until
    /// [`Self::crash`] decides what the disk kept.
    pub fn cut_power_after(&self, ops: u64) {
        if let Ok(mut image) = self.image.lock() {
            image.power_left = Some(ops);
        }
    }

    /// The power fails: the disk keeps what was synced, then the first
    /// `kept` unsynced writes, the next one cut to `torn_bytes` bytes. Every
    /// handle from before fails from now on.
    pub fn crash(&self, kept: usize, torn_bytes: usize) {
        let Ok(mut image) = self.image.lock() else {
            return;
        };
        let mut after = image.durable.clone();
        let pending = std::mem::take(&mut image.pending);
        for op in pending.iter().take(kept) {
            apply(&mut after, op);
        }
        if let Some(Pending::Write { offset, data }) = pending.get(kept) {
            let cut = torn_bytes.min(data.len());
            let torn = Pending::Write {
                offset: *offset,
                data: data[..cut].to_vec(),
            };
            apply(&mut after, &torn);
        }
        image.durable = after.clone();
        image.current = after;
        image.life += 1;
        image.power_left = None;
    }

    /// A copy of what the disk holds durably now, as a backup (or a
    /// file-system snapshot) of a running node takes it: a disk of its own,
    /// which a crash-consistent store opens.
    pub fn backup(&self) -> CrashDisk {
        let durable = self
            .image
            .lock()
            .map_or_else(|_| Vec::new(), |i| i.durable.clone());
        CrashDisk {
            image: Arc::new(Mutex::new(Image {
                current: durable.clone(),
                durable,
                ..Image::default()
            })),
            life: 0,
        }
    }

    /// A handle on the disk as the crash left it, to reopen the store on.
    pub fn after_crash(&self) -> CrashDisk {
        let life = self.image.lock().map_or(0, |i| i.life);
        CrashDisk {
            image: self.image.clone(),
            life,
        }
    }
}

impl StorageBackend for CrashDisk {
    fn len(&self) -> Result<u64, BackendIoError> {
        Ok(self.image()?.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        let image = self.image()?;
        let start = usize::try_from(offset).map_err(|_| crashed())?;
        let bytes = image
            .current
            .get(start..start + out.len())
            .ok_or_else(|| std::io::Error::other("read past the end"))?;
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        let mut image = self.image_to_change()?;
        let op = Pending::SetLen(len);
        apply(&mut image.current, &op);
        image.pending.push(op);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        let mut image = self.image_to_change()?;
        let pending = std::mem::take(&mut image.pending);
        for op in &pending {
            apply(&mut image.durable, op);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        let mut image = self.image_to_change()?;
        let op = Pending::Write {
            offset,
            data: data.to_vec(),
        };
        apply(&mut image.current, &op);
        image.pending.push(op);
        Ok(())
    }
}
