//! Configuration: [`NodeConfig`], [`TopicConfig`], [`ProducerConfig`],
//! [`ConsumerConfig`]. Names and defaults follow Kafka's (in snake_case) unless a
//! field's doc says why meshlog differs. Every config has `validate()`, called by
//! the API before the config is used.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::core::group::Assignor;
use crate::error::ConfigError;
use crate::net::MeshConfig;

fn invalid(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        reason: reason.into(),
    }
}

/// The directory a node uses when none is given: `$MESHLOG_DATA_DIR`, else the
/// platform's data directory (`~/.local/share/meshlog` on Linux), else `./meshlog-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHLOG_DATA_DIR") {
        return PathBuf::from(dir);
    }
    dirs::data_dir()
        .map(|d| d.join("meshlog"))
        .unwrap_or_else(|| PathBuf::from("meshlog-data"))
}

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Where the node keeps its database. Default: [`default_data_dir`].
    pub data_dir: PathBuf,
    /// Whether each commit is fsync'd before records are acknowledged. Default
    /// `true`: an acknowledged record survives a crash of the process or the
    /// machine. With `false` an acknowledgement means "written"; the last
    /// acknowledged records may be lost on a crash.
    pub fsync: bool,
    /// Most write requests carried by one transaction (group commit). Default 4096.
    pub max_group_commit: usize,
    /// How often retention runs (Kafka's `log.retention.check.interval.ms`). Default 5 min.
    pub retention_check_interval: Duration,
    /// How long a partition's leader remembers the dedup keys of records it
    /// stored (NATS's `duplicate_window`): a record repeating one within
    /// this window is not stored again. Measured on record timestamps.
    /// Default 2 min.
    pub dedup_window: Duration,
    /// Memory the database may use to cache pages of its file, in bytes.
    /// Default 64 MiB: enough for the recent batches that followers and
    /// consumers read and for the tables' upper pages; older reads go to the
    /// file (and the OS page cache). The database engine's own default
    /// (1 GiB) would let a node's memory grow with its log up to that size.
    pub cache_bytes: usize,
    /// How the node joins the mesh: listen and bootstrap addresses, mDNS, role.
    /// Default: a storage node on every interface with mDNS on. `None` keeps
    /// the node off the network (a local log only).
    pub network: Option<MeshConfig>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            data_dir: default_data_dir(),
            fsync: true,
            max_group_commit: 4096,
            retention_check_interval: Duration::from_secs(300),
            dedup_window: Duration::from_secs(120),
            cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            network: Some(MeshConfig::default()),
        }
    }
}

impl NodeConfig {
    /// Keeps the node off the network: a mesh of one, whose topics have
    /// replication factor 1.
    pub fn without_network(mut self) -> Self {
        self.network = None;
        self
    }

    /// Joins the mesh as `mesh` says.
    pub fn with_network(mut self, mesh: MeshConfig) -> Self {
        self.network = Some(mesh);
        self
    }

    /// A default config with the given data directory.
    pub fn with_data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = dir.into();
        self
    }

    /// Sets [`NodeConfig::fsync`].
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// Sets [`NodeConfig::cache_bytes`].
    pub fn with_cache_bytes(mut self, bytes: usize) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// Checks the config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_group_commit == 0 {
            return Err(invalid("max_group_commit", "must be at least 1"));
        }
        if self.retention_check_interval.is_zero() {
            return Err(invalid("retention_check_interval", "must be positive"));
        }
        if let Some(mesh) = &self.network {
            mesh.membership.validate()?;
        }
        Ok(())
    }
}

/// How long and how much a topic keeps. Only whole segments are dropped, and
/// never the segment being written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Drop a segment once its newest record is older than this
    /// (`retention.ms`). `None` keeps records forever. Default 7 days.
    pub time: Option<Duration>,
    /// Drop the oldest segments while the partition would still hold at least
    /// this many bytes without them (`retention.bytes`). Default `None`: unlimited.
    pub bytes: Option<u64>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            time: Some(Duration::from_secs(7 * 24 * 3600)),
            bytes: None,
        }
    }
}

/// A topic's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Number of partitions (`--partitions`). Default 1.
    pub partitions: u32,
    /// Copies of each partition (`--replication-factor`). `None` means
    /// min(3, storage nodes), so one node alone runs RF 1.
    pub replication_factor: Option<u16>,
    /// Replicas that must have a record before `Acks::All` acknowledges it.
    /// `None` means a majority of the replication factor.
    pub min_insync_replicas: Option<u16>,
    /// What the topic keeps.
    pub retention: Retention,
    /// Size at which a partition starts a new segment (`segment.bytes`). Retention
    /// drops whole segments. Default 64 MiB: smaller than Kafka's 1 GiB because a
    /// segment here is a key range in one redb file, and smaller segments let
    /// retention free space in smaller steps.
    pub segment_bytes: u64,
    /// Age at which a partition starts a new segment even when it is not full
    /// (`segment.ms`), so that time-based retention also frees quiet partitions.
    /// Measured on record timestamps. Default 7 days.
    pub segment_time: Duration,
    /// Largest record accepted (`max.message.bytes`). Default 1 MiB.
    pub max_message_bytes: u32,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            replication_factor: None,
            min_insync_replicas: None,
            retention: Retention::default(),
            segment_bytes: 64 * 1024 * 1024,
            segment_time: Duration::from_secs(7 * 24 * 3600),
            max_message_bytes: 1024 * 1024,
        }
    }
}

impl TopicConfig {
    /// A default config with `partitions` partitions.
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Sets the replication factor.
    pub fn with_replication_factor(mut self, rf: u16) -> Self {
        self.replication_factor = Some(rf);
        self
    }

    /// Sets the retention.
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Sets the segment size.
    pub fn with_segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }

    /// Checks the config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.partitions == 0 || self.partitions > 100_000 {
            return Err(invalid("partitions", "must be between 1 and 100000"));
        }
        if self.replication_factor == Some(0) {
            return Err(invalid("replication_factor", "must be at least 1"));
        }
        if let (Some(rf), Some(min)) = (self.replication_factor, self.min_insync_replicas)
            && (min == 0 || min > rf)
        {
            return Err(invalid(
                "min_insync_replicas",
                format!("must be between 1 and the replication factor ({rf})"),
            ));
        }
        if self.segment_bytes < 1024 {
            return Err(invalid("segment_bytes", "must be at least 1024"));
        }
        if self.segment_time.is_zero() {
            return Err(invalid("segment_time", "must be positive"));
        }
        if self.max_message_bytes < 64 || self.max_message_bytes as usize > 16 * 1024 * 1024 {
            return Err(invalid(
                "max_message_bytes",
                "must be between 64 B and 16 MiB",
            ));
        }
        Ok(())
    }

    /// The replication factor on a mesh of `storage_nodes` nodes.
    pub fn effective_replication_factor(&self, storage_nodes: usize) -> u16 {
        self.replication_factor
            .unwrap_or_else(|| storage_nodes.clamp(1, 3) as u16)
    }
}

/// When a partition's leader acknowledges records (Kafka's `acks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Acks {
    /// At once, before anything is stored (`acks=0`): records may be lost.
    None,
    /// Once the leader has them durably (`acks=1`).
    Leader,
    /// Once a quorum of replicas (at least `min_insync_replicas`) has them
    /// durably and they are committed (`acks=all`, the default).
    #[default]
    All,
}

/// How a producer sends.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// Chain this producer's records per partition so that retries never
    /// duplicate or reorder them (`enable.idempotence`). Default `true`.
    pub enable_idempotence: bool,
    /// When records count as sent. Default [`Acks::All`].
    pub acks: Acks,
    /// How long a record may take from `send` to its acknowledgement, retries
    /// included (`delivery.timeout.ms`). Default 30 s (Kafka: 120 s).
    pub delivery_timeout: Duration,
    /// A partition's batch is sent once its records reach this many bytes
    /// (`batch.size`). Default 64 KiB (Kafka: 16 KiB; larger batches measured
    /// faster here, see the benchmark).
    pub batch_size: usize,
    /// How long a batch waits for more records before it is sent
    /// (`linger.ms`). Default 5 ms, as Kafka 4.0. [`crate::Producer::send`]
    /// and `send_batch` do not linger: they wait for the answer anyway.
    pub linger: Duration,
    /// Batches of one partition awaiting an answer at once
    /// (`max.in.flight.requests.per.connection`). Default 5. Any value keeps
    /// order and exactly-once storage with idempotence on.
    pub max_in_flight: usize,
    /// Memory of records sent and not yet answered (`buffer.memory`): each
    /// record counts its encoded bytes plus what holding it costs beyond
    /// them ([`crate::producer::RECORD_OVERHEAD`]), so a flood of tiny
    /// records is held back as a few large ones are. When full, `send` waits
    /// up to `max_block` and then fails with [`crate::Error::BufferFull`].
    /// Default 32 MiB.
    pub buffer_memory: usize,
    /// How long `send` waits for buffer memory (`max.block.ms`). Default 60 s.
    pub max_block: Duration,
    /// Attempts after the first before a batch fails (`retries`), bounded by
    /// `delivery_timeout` anyway. Default `u32::MAX`.
    pub retries: u32,
    /// Wait before resending after a failed attempt (`retry.backoff.ms`). Default 100 ms.
    pub retry_backoff: Duration,
    /// A stable identity (`transactional.id`'s role for idempotence): the same
    /// name is the same producer after a restart, and its records continue its
    /// producer chain in each partition. `None` (default): a fresh random
    /// identity per producer.
    pub producer_id: Option<String>,
    /// With `producer_id`: the records sent are the producer's stream from its
    /// first record, so that a producer restarted after a crash can send its
    /// input again. Records the log already holds (checked by the producer
    /// chain hash) are not stored again; their delivery fails with
    /// [`crate::Error::AlreadyStored`]. Default `false`.
    pub replay: bool,
    /// With `replay`: check by the producer-chain hash that the records
    /// skipped are the ones stored, which needs them identical, timestamps
    /// included (set them with `ProducerRecord::with_timestamp`); a replay
    /// that differs fails with [`crate::Error::ProducerConflict`]. Without
    /// it, records are skipped by sequence number alone. Default `true`.
    pub replay_verify: bool,
    /// Chooses the partition of records without an explicit partition.
    /// Default: [`crate::producer::partition_for_key`] for keyed records and a
    /// sticky partition per batch for keyless ones.
    pub partitioner: Option<Partitioner>,
}

/// A user's partitioner: `(key, partitions) -> partition`. A result at or
/// above `partitions` is taken modulo `partitions`.
#[derive(Clone)]
pub struct Partitioner(pub std::sync::Arc<PartitionFn>);

/// The function a [`Partitioner`] wraps.
pub type PartitionFn = dyn Fn(Option<&[u8]>, u32) -> u32 + Send + Sync;

impl std::fmt::Debug for Partitioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Partitioner(..)")
    }
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            enable_idempotence: true,
            acks: Acks::All,
            delivery_timeout: Duration::from_secs(30),
            batch_size: 64 * 1024,
            linger: Duration::from_millis(5),
            max_in_flight: 5,
            buffer_memory: 32 * 1024 * 1024,
            max_block: Duration::from_secs(60),
            retries: u32::MAX,
            retry_backoff: Duration::from_millis(100),
            producer_id: None,
            replay: false,
            replay_verify: true,
            partitioner: None,
        }
    }
}

impl ProducerConfig {
    /// Sets `acks`.
    pub fn with_acks(mut self, acks: Acks) -> Self {
        self.acks = acks;
        self
    }

    /// Sets `delivery_timeout`.
    pub fn with_delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// Sets `linger`.
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets a stable identity ([`ProducerConfig::producer_id`]).
    pub fn with_producer_id(mut self, name: impl Into<String>) -> Self {
        self.producer_id = Some(name.into());
        self
    }

    /// Sets [`ProducerConfig::replay`].
    pub fn with_replay(mut self, replay: bool) -> Self {
        self.replay = replay;
        self
    }

    /// Checks the config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.batch_size == 0 {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 16 {
            // The leader remembers each producer's last 64 stored batches
            // (a sent batch over 256 KiB is stored as several): a window of
            // at most 16 keeps a retry within that memory for batches up to
            // 1 MiB.
            return Err(invalid("max_in_flight", "must be between 1 and 16"));
        }
        if self.buffer_memory < 1024 {
            return Err(invalid("buffer_memory", "must be at least 1024 bytes"));
        }
        if self.delivery_timeout.is_zero() {
            return Err(invalid("delivery_timeout", "must be positive"));
        }
        if self.replay && self.producer_id.is_none() {
            return Err(invalid("replay", "needs a producer_id"));
        }
        if self.producer_id.is_some() && !self.enable_idempotence {
            return Err(invalid("producer_id", "needs enable_idempotence"));
        }
        Ok(())
    }
}

/// Where a consumer starts when it has no valid committed offset (`auto.offset.reset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OffsetReset {
    /// The oldest record still stored.
    Earliest,
    /// The next record written after the consumer starts (Kafka's default).
    #[default]
    Latest,
    /// No reset: `poll` fails with `Error::NoOffset`.
    None,
}

/// How a consumer reads.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// The consumer group (`group.id`): where committed offsets are kept. `None`
    /// means the consumer keeps its position itself and cannot commit.
    pub group_id: Option<String>,
    /// Where to start without a committed offset. Default `Latest`, as in Kafka.
    pub auto_offset_reset: OffsetReset,
    /// Commit, every `auto_commit_interval` at the start of `poll` and on
    /// `close`, the positions after the records earlier polls returned
    /// (`enable.auto.commit`), as Kafka's client does: a batch is committed
    /// only once the application came back for more. Default `true`.
    pub enable_auto_commit: bool,
    /// Default 5 s (`auto.commit.interval.ms`).
    pub auto_commit_interval: Duration,
    /// Most records one `poll` returns (`max.poll.records`). Default 500.
    pub max_poll_records: usize,
    /// Most bytes read from one partition per fetch (`max.partition.fetch.bytes`). Default 1 MiB.
    pub max_partition_fetch_bytes: usize,
    /// How long a replica holds a fetch open waiting for records
    /// (`fetch.max.wait.ms`). Records are answered as soon as they are
    /// committed (once `fetch_min_bytes` are there), so this bounds only the
    /// wait when nothing arrives. Default 500 ms.
    pub fetch_max_wait: Duration,
    /// A replica answers a fetch once this many bytes of records are ready,
    /// or at `fetch_max_wait` (`fetch.min.bytes`). Default 1: at once.
    pub fetch_min_bytes: usize,
    /// Read from this node's own replica of a partition when it holds one,
    /// instead of the leader (Kafka's `client.rack` with a rack-aware
    /// replica selector: the nearest replica is the local one). Saves a
    /// network hop for consumers embedded in storage nodes far from the
    /// leader; records show up there once the follower learns they are
    /// committed (the next append or heartbeat). Default false.
    pub fetch_from_nearest: bool,
    /// How partitions are shared in the group (`partition.assignment.strategy`);
    /// every member of a group must use the same. Default cooperative-sticky.
    pub assignor: Assignor,
    /// The coordinator removes a member it has not heard from for this long
    /// and gives its partitions to the others (`session.timeout.ms`). Default 45 s.
    pub session_timeout: Duration,
    /// How often the member tells the coordinator it is alive, from a
    /// background task (`heartbeat.interval.ms`). Default 3 s.
    pub heartbeat_interval: Duration,
    /// How long a rebalance waits for members to rejoin: a member that does
    /// not call `poll` for this long during a rebalance is left out of the
    /// new generation (`max.poll.interval.ms`). Unlike Kafka's client, a
    /// member that stops polling while the group is stable keeps its
    /// partitions (its heartbeats come from a background task). Default 5 min.
    pub max_poll_interval: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            group_id: None,
            auto_offset_reset: OffsetReset::Latest,
            enable_auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
            max_poll_records: 500,
            max_partition_fetch_bytes: 1024 * 1024,
            fetch_max_wait: Duration::from_millis(500),
            fetch_min_bytes: 1,
            fetch_from_nearest: false,
            assignor: Assignor::CooperativeSticky,
            session_timeout: Duration::from_secs(45),
            heartbeat_interval: Duration::from_secs(3),
            max_poll_interval: Duration::from_secs(300),
        }
    }
}

impl ConsumerConfig {
    /// Sets the group.
    pub fn with_group_id(mut self, group: impl Into<String>) -> Self {
        self.group_id = Some(group.into());
        self
    }

    /// Sets `auto_offset_reset`.
    pub fn with_auto_offset_reset(mut self, reset: OffsetReset) -> Self {
        self.auto_offset_reset = reset;
        self
    }

    /// Sets the assignor.
    pub fn with_assignor(mut self, assignor: Assignor) -> Self {
        self.assignor = assignor;
        self
    }

    /// Sets `session_timeout`, and `heartbeat_interval` to a third of it.
    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self.heartbeat_interval = timeout / 3;
        self
    }

    /// Sets `enable_auto_commit`.
    pub fn with_auto_commit(mut self, enabled: bool) -> Self {
        self.enable_auto_commit = enabled;
        self
    }

    /// Checks the config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.group_id.as_deref() == Some("") {
            return Err(invalid("group_id", "must not be empty"));
        }
        if self.max_poll_records == 0 {
            return Err(invalid("max_poll_records", "must be at least 1"));
        }
        if self.max_partition_fetch_bytes == 0 {
            return Err(invalid("max_partition_fetch_bytes", "must be at least 1"));
        }
        if self.enable_auto_commit && self.auto_commit_interval.is_zero() {
            return Err(invalid("auto_commit_interval", "must be positive"));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.session_timeout {
            return Err(invalid(
                "heartbeat_interval",
                "must be positive and below session_timeout (a third of it is usual)",
            ));
        }
        if self.max_poll_interval.is_zero() {
            return Err(invalid("max_poll_interval", "must be positive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().unwrap();
        TopicConfig::default().validate().unwrap();
        ConsumerConfig::default().validate().unwrap();
    }

    #[test]
    fn inconsistent_settings_are_refused() {
        let bad = TopicConfig {
            replication_factor: Some(2),
            min_insync_replicas: Some(3),
            ..TopicConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Invalid {
                name: "min_insync_replicas",
                ..
            })
        ));
        assert!(
            TopicConfig::default()
                .with_partitions(0)
                .validate()
                .is_err()
        );
    }
}
