//! The log store: one redb file per node holding every partition's log.
//!
//! - Records are stored in batches, one value per batch, keyed by
//!   (topic id, partition, base offset), so a read is a range scan.
//! - Batches are grouped into segments ([`SegmentMeta`]); retention drops whole
//!   segments, never the one being written.
//! - Each partition keeps its state ([`PartitionState`]): offsets, byte count and
//!   the partition-chain head.
//! - Idempotent producers have a state per partition ([`ProducerState`]) that turns
//!   a retried batch into its original offsets and refuses gaps.
//! - Consumer groups' committed offsets live in their own table.
//!
//! Writes go through [`Store::write`], which applies many operations in one
//! transaction (group commit) and returns only when the transaction is as durable
//! as the store's `fsync` setting promises. Reads use their own read
//! transactions and never wait for writers.
//!
//! On open the store checks each partition's head against its last stored batch
//! (recomputing that batch's chain), so a damaged file is reported, not served.

mod replica;
mod retention;
mod tables;
mod write;

use std::path::{Path, PathBuf};

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable};

use crate::chain::{self, MessageId};
use crate::error::StoreError;
use crate::record::ConsumerRecord;
use crate::wire::{self, StoredBatch};

pub use replica::{LogEnd, ReplicaLog, ReplicatedEntry, StoredEntries};
pub use tables::{EntryRow, SequenceCheck, SnapshotRow, VoteRow};
pub use tables::{
    PRODUCER_EXPIRATION_MS, PRODUCER_WINDOW_BATCHES, PartitionState, ProducerState, RecentBatch,
    SegmentMeta, TopicEntry,
};
pub(crate) use write::validate_topic_name;
pub use write::{AppendOutcome, AppendRequest, WriteOp, WriteOutcome};

use tables::*;

/// The name of the database file inside a data directory.
pub const DB_FILE_NAME: &str = "meshlog.redb";

/// META key: the digest of the peer id that last opened the database.
const CLAIMED_BY: &str = "claimed_by";
/// META key: how many times the database was opened by a storage node.
const CLAIMS: &str = "claims";

/// A node's log store. Cheap to share behind an `Arc`: reads take `&self` and run
/// concurrently; writes serialise inside redb.
pub struct Store {
    db: Database,
    path: PathBuf,
    fsync: bool,
}

/// What one read returned, and the partition's bounds at the time.
#[derive(Clone, Debug)]
pub struct ReadResult {
    /// Records from the requested offset on, in offset order.
    pub records: Vec<ConsumerRecord>,
    /// The first offset still stored.
    pub log_start_offset: u64,
    /// One past the last readable (committed) offset.
    pub high_watermark: u64,
}

/// The outcome of a full chain verification of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// The head recomputed from them (equal to the stored head).
    pub head: MessageId,
}

impl Store {
    /// Opens (or creates) the store in `dir`, creating the directory if needed,
    /// and checks every partition's chain head against its last batch. The
    /// database caches up to [`DEFAULT_CACHE_BYTES`] of its pages.
    pub fn open(dir: &Path, fsync: bool) -> Result<Store, StoreError> {
        Self::open_with_cache(dir, fsync, DEFAULT_CACHE_BYTES)
    }

    /// [`Store::open`], caching up to `cache_bytes` of the file's pages.
    pub fn open_with_cache(
        dir: &Path,
        fsync: bool,
        cache_bytes: usize,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(DB_FILE_NAME);
        let db = open_database(&path, |builder| {
            builder.set_cache_size(cache_bytes).create(&path)
        })?;
        Self::on_database(db, path, fsync)
    }

    /// A store on `backend` instead of a file (`label` names it in errors):
    /// for a simulation that decides what a crash keeps of unsynced writes.
    pub fn open_on_backend(
        backend: impl redb::StorageBackend,
        label: &str,
        fsync: bool,
    ) -> Result<Store, StoreError> {
        let path = PathBuf::from(label);
        let db = open_database(&path, |builder| {
            builder
                .set_cache_size(DEFAULT_CACHE_BYTES)
                .create_with_backend(backend)
        })?;
        Self::on_database(db, path, fsync)
    }

    fn on_database(db: Database, path: PathBuf, fsync: bool) -> Result<Store, StoreError> {
        let store = Store { db, path, fsync };
        store.init_schema()?;
        store.check_heads()?;
        Ok(store)
    }

    /// The database file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether commits are fsync'd.
    pub fn fsync(&self) -> bool {
        self.fsync
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        {
            let mut meta = txn.open_table(META)?;
            let version = meta.get("schema_version")?.map(|v| v.value());
            match version {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(self.corrupt(format!(
                        "schema version {other}, this build reads version {SCHEMA_VERSION}"
                    )));
                }
            }
            txn.open_table(TOPICS)?;
            txn.open_table(PARTITIONS)?;
            txn.open_table(BATCHES)?;
            txn.open_table(SEGMENTS)?;
            txn.open_table(PRODUCERS)?;
            txn.open_table(GROUP_OFFSETS)?;
            txn.open_table(ENTRIES)?;
            txn.open_table(VOTES)?;
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(LOG_STARTS)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn corrupt(&self, detail: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    /// Decodes a stored value, reporting damage as [`StoreError::Corrupt`].
    fn decode_value<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        wire::decode(bytes).map_err(|e| self.corrupt(format!("{what}: {e}")))
    }

    fn decode_batch(&self, key: (u32, u32, u64), bytes: &[u8]) -> Result<StoredBatch, StoreError> {
        let batch =
            wire::decode_batch(bytes).map_err(|e| self.corrupt(format!("batch {key:?}: {e}")))?;
        if batch.header.base_offset != key.2 {
            return Err(self.corrupt(format!(
                "batch {key:?} claims base offset {}",
                batch.header.base_offset
            )));
        }
        Ok(batch)
    }

    /// Checks each partition's stored head against its last batch.
    fn check_heads(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_read()?;
        let partitions = txn.open_table(PARTITIONS)?;
        let batches = txn.open_table(BATCHES)?;
        for row in partitions.iter()? {
            let (key, value) = row?;
            let (tid, p) = key.value();
            let state: PartitionState = self.decode_value("partition state", value.value())?;
            let last = batches.range((tid, p, 0)..=(tid, p, u64::MAX))?.next_back();
            match last {
                None if state.log_end_offset == state.log_start_offset
                    && state.head == state.start_prev_id => {}
                None => {
                    return Err(self.corrupt(format!(
                        "partition {tid}/{p}: state says offsets {}..{} but no batch is stored",
                        state.log_start_offset, state.log_end_offset
                    )));
                }
                Some(row) => {
                    let (k, v) = row?;
                    let batch = self.decode_batch(k.value(), v.value())?;
                    self.check_last_batch(tid, p, &state, &batch)?;
                }
            }
        }
        Ok(())
    }

    fn check_last_batch(
        &self,
        tid: u32,
        p: u32,
        state: &PartitionState,
        batch: &StoredBatch,
    ) -> Result<(), StoreError> {
        if batch.next_offset() != state.log_end_offset {
            return Err(self.corrupt(format!(
                "partition {tid}/{p}: last batch ends at {} but the log end is {}",
                batch.next_offset(),
                state.log_end_offset
            )));
        }
        chain::verify_run(
            batch.header.prev_id,
            batch.header.base_offset,
            batch.chain_entries(),
            &batch.header.last_id,
        )
        .map_err(|e| self.corrupt(format!("partition {tid}/{p}: last batch: {e}")))?;
        if batch.header.last_id != state.head {
            return Err(self.corrupt(format!(
                "partition {tid}/{p}: head {} does not match the last batch's {}",
                state.head, batch.header.last_id
            )));
        }
        Ok(())
    }

    /// The topic named `name`.
    pub fn topic(&self, name: &str) -> Result<TopicEntry, StoreError> {
        let txn = self.db.begin_read()?;
        self.topic_in(&txn, name)
    }

    fn topic_in(&self, txn: &ReadTransaction, name: &str) -> Result<TopicEntry, StoreError> {
        let topics = txn.open_table(TOPICS)?;
        let value = topics
            .get(name)?
            .ok_or_else(|| StoreError::TopicNotFound(name.to_string()))?;
        self.decode_value("topic", value.value())
    }

    /// Every topic, sorted by name.
    pub fn list_topics(&self) -> Result<Vec<TopicEntry>, StoreError> {
        let txn = self.db.begin_read()?;
        let topics = txn.open_table(TOPICS)?;
        let mut out = Vec::new();
        for row in topics.iter()? {
            let (_, value) = row?;
            out.push(self.decode_value("topic", value.value())?);
        }
        Ok(out)
    }

    /// The state of one partition.
    pub fn partition_state(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<PartitionState, StoreError> {
        let txn = self.db.begin_read()?;
        let entry = self.topic_in(&txn, topic)?;
        self.partition_state_in(&txn, &entry, partition)
    }

    fn partition_state_in(
        &self,
        txn: &ReadTransaction,
        topic: &TopicEntry,
        partition: u32,
    ) -> Result<PartitionState, StoreError> {
        let partitions = txn.open_table(PARTITIONS)?;
        let value = partitions.get((topic.id, partition))?.ok_or_else(|| {
            StoreError::PartitionNotFound {
                topic: topic.name.clone(),
                partition,
            }
        })?;
        self.decode_value("partition state", value.value())
    }

    /// The segments of one partition, oldest first.
    pub fn segments(&self, topic: &str, partition: u32) -> Result<Vec<SegmentMeta>, StoreError> {
        let txn = self.db.begin_read()?;
        let entry = self.topic_in(&txn, topic)?;
        let segments = txn.open_table(SEGMENTS)?;
        let mut out = Vec::new();
        for row in segments.range((entry.id, partition, 0)..=(entry.id, partition, u64::MAX))? {
            let (_, value) = row?;
            out.push(self.decode_value("segment", value.value())?);
        }
        Ok(out)
    }

    /// Reads committed records of one partition from `offset` on, stopping after
    /// the first batch that brings the total to `max_bytes` (at least one record
    /// is returned when any is available, as in Kafka). Reading at or past the
    /// high watermark (up to the log end) returns no records; before the log
    /// start or past its end is `OffsetOutOfRange`.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: usize,
    ) -> Result<ReadResult, StoreError> {
        self.read_committed(topic, partition, offset, max_bytes, 0)
    }

    /// As [`Store::read`], with records up to `known_committed` (one past
    /// the last record offset a replica knows committed and durable here)
    /// readable even before the stored high watermark reaches them; never
    /// past the stored log end.
    pub fn read_committed(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: usize,
        known_committed: u64,
    ) -> Result<ReadResult, StoreError> {
        let txn = self.db.begin_read()?;
        let entry = self.topic_in(&txn, topic)?;
        let state = self.partition_state_in(&txn, &entry, partition)?;
        let end = state.readable_end(known_committed);
        let mut result = ReadResult {
            records: Vec::new(),
            log_start_offset: state.log_start_offset,
            high_watermark: end,
        };
        // As Kafka: out of range only past the log end. An offset between
        // the commit point known here and the log end is one a reader saw
        // committed elsewhere (another replica, or this one before a
        // restart): nothing to read yet.
        if offset < state.log_start_offset || offset > end.max(state.log_end_offset) {
            return Err(StoreError::OffsetOutOfRange {
                topic: topic.to_string(),
                partition,
                offset,
                start: state.log_start_offset,
                end,
            });
        }
        if offset >= end {
            return Ok(result);
        }
        let batches = txn.open_table(BATCHES)?;
        let tid = entry.id;
        let first_base = match batches
            .range((tid, partition, 0)..=(tid, partition, offset))?
            .next_back()
        {
            Some(row) => row?.0.value().2,
            None => {
                return Err(self.corrupt(format!(
                    "{topic}/{partition}: no batch holds offset {offset}"
                )));
            }
        };
        let mut bytes = 0usize;
        for row in batches.range((tid, partition, first_base)..=(tid, partition, u64::MAX))? {
            let (key, value) = row?;
            if bytes >= max_bytes || key.value().2 >= end {
                break;
            }
            bytes += value.value().len();
            let batch = self.decode_batch(key.value(), value.value())?;
            push_records(&mut result.records, topic, partition, batch, offset, end);
        }
        Ok(result)
    }

    /// What the log knows of an idempotent producer in one partition, if it wrote there.
    pub fn producer_state(
        &self,
        topic: &str,
        partition: u32,
        producer: crate::chain::ProducerId,
    ) -> Result<Option<ProducerState>, StoreError> {
        let txn = self.db.begin_read()?;
        let entry = self.topic_in(&txn, topic)?;
        let producers = txn.open_table(PRODUCERS)?;
        match producers.get((entry.id, partition, producer.0))? {
            Some(value) => Ok(Some(self.decode_value("producer state", value.value())?)),
            None => Ok(None),
        }
    }

    /// The idempotent producers' states of a partition as they were before
    /// record `offset` (the log start a lagging replica restarts at), for
    /// those this log can tell: a producer whose remembered batches all come
    /// after `offset` is left out (the replica rebuilds its state from those
    /// batches as it receives them).
    pub fn producers_at(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<Vec<(crate::chain::ProducerId, ProducerState)>, StoreError> {
        let txn = self.db.begin_read()?;
        let entry = self.topic_in(&txn, topic)?;
        let producers = txn.open_table(PRODUCERS)?;
        let mut out = Vec::new();
        for row in producers.range((entry.id, partition, 0)..=(entry.id, partition, u64::MAX))? {
            let (key, value) = row?;
            let state: ProducerState = self.decode_value("producer state", value.value())?;
            if let Some(state) = state.rolled_back_to(offset) {
                out.push((crate::chain::ProducerId(key.value().2), state));
            }
        }
        Ok(out)
    }

    /// The offset `group` committed for a partition, if any.
    pub fn committed_offset(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let offsets = txn.open_table(GROUP_OFFSETS)?;
        Ok(offsets.get((group, topic, partition))?.map(|v| v.value()))
    }

    /// Every committed offset of `group`, as (topic, partition, offset), sorted.
    pub fn group_offsets(&self, group: &str) -> Result<Vec<(String, u32, u64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let offsets = txn.open_table(GROUP_OFFSETS)?;
        let mut out = Vec::new();
        for row in offsets.range((group, "", 0)..)? {
            let (key, value) = row?;
            let (g, topic, partition) = key.value();
            if g != group {
                break;
            }
            out.push((topic.to_string(), partition, value.value()));
        }
        Ok(out)
    }

    /// The mesh this node belongs to, once it founded or joined one.
    pub fn mesh_id(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(MESH_ID)?.map(|v| v.value()))
    }

    /// Which identity last claimed this database (a digest of its peer id;
    /// `None` for a new database) and how many times it was claimed.
    pub fn claimed_by(&self) -> Result<(Option<u64>, u64), StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let identity = meta.get(CLAIMED_BY)?.map(|v| v.value());
        let generation = meta.get(CLAIMS)?.map_or(0, |v| v.value());
        Ok((identity, generation))
    }

    /// Records that `identity` opens this database now; returns the new
    /// claim count. Durable before it returns.
    pub fn claim(&self, identity: u64) -> Result<u64, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        let generation = {
            let mut meta = txn.open_table(META)?;
            let generation = meta.get(CLAIMS)?.map_or(0, |v| v.value()) + 1;
            meta.insert(CLAIMED_BY, identity)?;
            meta.insert(CLAIMS, generation)?;
            generation
        };
        txn.commit()?;
        Ok(generation)
    }

    /// One past the last offset of `__meta` this store has applied.
    pub fn meta_applied(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(META_APPLIED)?.map_or(0, |v| v.value()))
    }

    /// The consumer groups that have committed offsets, sorted.
    pub fn list_groups(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let offsets = txn.open_table(GROUP_OFFSETS)?;
        let mut groups: Vec<String> = Vec::new();
        for row in offsets.iter()? {
            let (key, _) = row?;
            let group = key.value().0;
            if groups.last().map(String::as_str) != Some(group) {
                groups.push(group.to_string());
            }
        }
        Ok(groups)
    }

    /// Walks every stored batch of a partition and recomputes its chain: offsets
    /// must run on, each batch must start where the previous one ended, and the
    /// result must equal the stored head.
    pub fn verify_partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<VerifyReport, StoreError> {
        let txn = self.db.begin_read()?;
        let entry = self.topic_in(&txn, topic)?;
        let state = self.partition_state_in(&txn, &entry, partition)?;
        let batches = txn.open_table(BATCHES)?;
        let tid = entry.id;
        let mut head = state.start_prev_id;
        let mut next = state.log_start_offset;
        for row in batches.range((tid, partition, 0)..=(tid, partition, u64::MAX))? {
            let (key, value) = row?;
            let batch = self.decode_batch(key.value(), value.value())?;
            if batch.header.prev_id != head {
                return Err(self.corrupt(format!(
                    "{topic}/{partition}: batch at {} does not follow the one before it",
                    batch.header.base_offset
                )));
            }
            chain::verify_run(head, next, batch.chain_entries(), &batch.header.last_id)
                .map_err(|e| self.corrupt(format!("{topic}/{partition}: {e}")))?;
            head = batch.header.last_id;
            next = batch.next_offset();
        }
        if next != state.log_end_offset || head != state.head {
            return Err(self.corrupt(format!(
                "{topic}/{partition}: batches end at {next} with head {head}, state says {} with {}",
                state.log_end_offset, state.head
            )));
        }
        Ok(VerifyReport {
            records: next - state.log_start_offset,
            head,
        })
    }
}

/// Appends the records of `batch` at or after `from` and below `end` to `out`.
fn push_records(
    out: &mut Vec<ConsumerRecord>,
    topic: &str,
    partition: u32,
    batch: StoredBatch,
    from: u64,
    end: u64,
) {
    let ids = batch.ids();
    let stamps: Vec<_> = (0..batch.records.len()).map(|i| batch.stamp(i)).collect();
    let base = batch.header.base_offset;
    for (i, (record, id)) in batch.records.into_iter().zip(ids).enumerate() {
        let offset = base + i as u64;
        if offset < from || offset >= end {
            continue;
        }
        out.push(ConsumerRecord {
            topic: topic.to_string(),
            partition,
            offset,
            id,
            producer: stamps[i],
            record,
        });
    }
}

/// Opens the database file, turning redb's errors into ones a user can act on.
/// redb is asked to repair after an unclean shutdown; a file that is not a
/// database (or is damaged beyond repair) is reported as corrupt.
/// The page cache a store gets unless told otherwise: see `NodeConfig::cache_bytes`.
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;

fn open_database(
    path: &Path,
    open: impl FnOnce(&mut redb::Builder) -> Result<Database, redb::DatabaseError>,
) -> Result<Database, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    // redb has been seen to panic on some damaged files; a panic must not cross the API.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        open(&mut Database::builder())
    }));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(StoreError::InUse {
            path: path.to_path_buf(),
        }),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))) => {
            if e.kind() == std::io::ErrorKind::InvalidData {
                Err(corrupt(e.to_string()))
            } else {
                Err(StoreError::Io(e))
            }
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)))) => {
            Err(corrupt(detail))
        }
        Ok(Err(redb::DatabaseError::UpgradeRequired(v))) => Err(corrupt(format!(
            "written by an unsupported database file format (version {v})"
        ))),
        Ok(Err(e)) => Err(StoreError::Database(e.into())),
        Err(_) => Err(corrupt(
            "the database engine could not read the file".into(),
        )),
    }
}
