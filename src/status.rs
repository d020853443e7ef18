//! What the node reports about itself: per-pair state and counters, the lease role, and the
//! Prometheus metrics. Each observable event is recorded in one place here, which both counts
//! it and (where it matters) logs it.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use serde::{Deserialize, Serialize};

use crate::checkpoint::now_ms;

/// The state of one (collection, follower) pipeline, as `/status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairState {
    InitialSync,
    Streaming,
    CatchingUp,
    /// Paused by `POST /pause/{follower}`: nothing is applied, the checkpoint is kept.
    Paused,
    Down,
    Stopped,
}

impl PairState {
    /// Higher is worse; a follower reports the worst state of its collections.
    fn severity(self) -> u8 {
        match self {
            PairState::Streaming => 0,
            PairState::CatchingUp => 1,
            PairState::InitialSync => 2,
            PairState::Paused => 3,
            PairState::Down => 4,
            PairState::Stopped => 5,
        }
    }
}

/// Live statistics of one (collection, follower) pipeline.
pub struct PairStats {
    pub collection: String,
    pub follower: String,
    state: Mutex<(PairState, Option<String>)>,
    applied: AtomicU64,
    /// Wall time (ms) when the checkpoint last moved; 0 when never.
    checkpoint_ms: AtomicI64,
    /// Cluster time (ms) of the checkpoint, i.e. of the last acknowledged change; 0 when
    /// unknown.
    checkpoint_ct_ms: AtomicI64,
    /// True when the stream had nothing more to read at the last checkpoint.
    caught_up: AtomicBool,
    /// Set by `POST /resync/{follower}`; the pipeline copies the follower again.
    resync: AtomicBool,
    /// Source oplog window minus the checkpoint's age, in ms; `i64::MIN` when unknown.
    headroom_ms: AtomicI64,
    /// Changes read from the source and not yet acknowledged by the follower.
    pending: AtomicU64,
    /// Documents of this collection quarantined on this follower (see `follower`).
    quarantined: AtomicU64,
    /// Shared by the pairs of one follower: set while the follower is paused.
    paused: Arc<AtomicBool>,
    /// True while the pipeline takes its events from the shared reader of its database.
    shared: AtomicBool,
    /// The running copy, if one runs.
    copy: Mutex<Option<Copy>>,
    metrics: Arc<Metrics>,
}

/// Progress of a running initial sync.
#[derive(Debug, Clone)]
struct Copy {
    done: u64,
    total: u64,
    bytes_done: u64,
    bytes_total: u64,
    started: std::time::Instant,
}

/// Progress of an initial sync, as `/status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CopyReport {
    /// Documents copied, and to copy (the source's count when the copy began).
    pub done: u64,
    pub total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Documents per second since the copy began.
    pub rate: f64,
    /// Estimated milliseconds left; `None` until a rate is known.
    pub eta_ms: Option<i64>,
}

impl CopyReport {
    fn add(&mut self, o: &CopyReport) {
        self.done += o.done;
        self.total += o.total;
        self.bytes_done += o.bytes_done;
        self.bytes_total += o.bytes_total;
        self.rate += o.rate;
        self.eta_ms = match (self.eta_ms, o.eta_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

impl PairStats {
    /// Whether the follower is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Whether the pipeline reads from the shared reader now.
    pub fn set_shared(&self, shared: bool) {
        self.shared.store(shared, Ordering::Relaxed);
        self.metrics
            .shared
            .with_label_values(&[self.follower.as_str(), self.collection.as_str()])
            .set(shared as i64);
    }

    pub fn is_shared(&self) -> bool {
        self.shared.load(Ordering::Relaxed)
    }

    /// A copy begins: `total` documents of `bytes_total` bytes (the source's figures now).
    pub fn copy_started(&self, done: u64, total: u64, bytes_done: u64, bytes_total: u64) {
        *self.copy.lock().unwrap_or_else(|e| e.into_inner()) = Some(Copy {
            done,
            total,
            bytes_done,
            bytes_total,
            started: std::time::Instant::now(),
        });
        self.copy_gauges(done, total, bytes_done, bytes_total);
    }

    /// The copy ended (finished or interrupted).
    pub fn copy_ended(&self) {
        *self.copy.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let labels = [self.follower.as_str(), self.collection.as_str()];
        let _ = self.metrics.copy_eta.remove_label_values(&labels);
    }

    fn copy_gauges(&self, done: u64, total: u64, bytes_done: u64, bytes_total: u64) {
        let labels = [self.follower.as_str(), self.collection.as_str()];
        let m = &self.metrics;
        m.copy_done.with_label_values(&labels).set(done as i64);
        m.copy_total.with_label_values(&labels).set(total as i64);
        m.copy_bytes_done
            .with_label_values(&labels)
            .set(bytes_done as i64);
        m.copy_bytes_total
            .with_label_values(&labels)
            .set(bytes_total as i64);
    }

    /// The running copy's progress, with its rate and estimated time left.
    pub fn copy_report(&self) -> Option<CopyReport> {
        let c = self
            .copy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let secs = c.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            c.done as f64 / secs
        } else {
            0.0
        };
        let eta_ms = (rate > 0.0)
            .then(|| (c.total.saturating_sub(c.done) as f64 / rate * 1000.0).round() as i64);
        Some(CopyReport {
            done: c.done,
            total: c.total.max(c.done),
            bytes_done: c.bytes_done,
            bytes_total: c.bytes_total.max(c.bytes_done),
            rate: (rate * 10.0).round() / 10.0,
            eta_ms,
        })
    }

    pub fn set_state(&self, state: PairState, error: Option<String>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // A plain stop keeps the reason it had (a fatal error stays visible); any other
        // state shows the error it is given, or none.
        let err = if error.is_none() && state == PairState::Stopped {
            s.1.take()
        } else {
            error
        };
        *s = (state, err);
        let (f, c) = (self.follower.as_str(), self.collection.as_str());
        self.metrics
            .initial_sync
            .with_label_values(&[f, c])
            .set((state == PairState::InitialSync) as i64);
        self.metrics
            .up
            .with_label_values(&[f, c])
            .set((state != PairState::Down && state != PairState::Stopped) as i64);
        if state == PairState::Down || state == PairState::Stopped {
            self.caught_up.store(false, Ordering::Relaxed);
        }
    }

    pub fn state(&self) -> (PairState, Option<String>) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A batch was acknowledged by the follower.
    pub fn batch_applied(&self, events: u64, ops: usize, seconds: f64) {
        self.applied.fetch_add(events, Ordering::Relaxed);
        let (f, c) = (self.follower.as_str(), self.collection.as_str());
        self.metrics
            .applied
            .with_label_values(&[f, c])
            .inc_by(events);
        self.metrics
            .batch_size
            .with_label_values(&[f])
            .observe(ops as f64);
        self.metrics
            .apply_latency
            .with_label_values(&[f])
            .observe(seconds);
    }

    /// A batch could not be applied; its events will be read again.
    pub fn batch_failed(&self, events: u64) {
        self.metrics
            .failed
            .with_label_values(&[self.follower.as_str(), self.collection.as_str()])
            .inc_by(events);
    }

    /// A change that produced no write (see `change::Skip`).
    pub fn skipped(&self, reason: &str) {
        self.metrics
            .skipped
            .with_label_values(&[self.follower.as_str(), self.collection.as_str(), reason])
            .inc();
    }

    /// Progress of an initial sync: `done` documents and `bytes_done` bytes copied.
    pub fn copy_progress(&self, done: u64, bytes_done: u64) {
        let mut g = self.copy.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = g.as_mut() else { return };
        c.done = done;
        c.bytes_done = bytes_done;
        let (total, bytes_total) = (c.total.max(done), c.bytes_total.max(bytes_done));
        drop(g);
        self.copy_gauges(done, total, bytes_done, bytes_total);
        if let Some(eta) = self.copy_report().and_then(|r| r.eta_ms) {
            self.metrics
                .copy_eta
                .with_label_values(&[self.follower.as_str(), self.collection.as_str()])
                .set(eta as f64 / 1000.0);
        }
    }

    /// The number of quarantined documents, as read from the follower.
    pub fn set_quarantined(&self, n: u64) {
        self.quarantined.store(n, Ordering::Relaxed);
        self.metrics
            .quarantined
            .with_label_values(&[self.follower.as_str(), self.collection.as_str()])
            .set(n as i64);
    }

    /// `added` documents were quarantined and `cleared` left the quarantine.
    pub fn quarantine_changed(&self, added: u64, cleared: u64) {
        let n = self
            .quarantined
            .load(Ordering::Relaxed)
            .saturating_add(added)
            .saturating_sub(cleared);
        self.set_quarantined(n);
        if added > 0 {
            self.metrics
                .quarantined_total
                .with_label_values(&[self.follower.as_str(), self.collection.as_str()])
                .inc_by(added);
        }
    }

    pub fn quarantined(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// The checkpoint moved to a change with cluster time `ct_ms`; `caught_up` when nothing
    /// more was waiting on the source.
    pub fn checkpoint_moved(&self, ct_ms: Option<i64>, caught_up: bool) {
        self.checkpoint_ms.store(now_ms(), Ordering::Relaxed);
        if let Some(ct) = ct_ms {
            self.checkpoint_ct_ms.store(ct, Ordering::Relaxed);
        }
        self.caught_up.store(caught_up, Ordering::Relaxed);
    }

    pub fn request_resync(&self) {
        self.resync.store(true, Ordering::SeqCst);
    }

    /// True once after a resync was requested.
    pub fn take_resync_request(&self) -> bool {
        self.resync.swap(false, Ordering::SeqCst)
    }

    /// Records how close the checkpoint is to falling off the source's oplog.
    pub fn set_headroom_ms(&self, ms: Option<i64>) {
        self.headroom_ms
            .store(ms.unwrap_or(i64::MIN), Ordering::Relaxed);
        let labels = [self.follower.as_str(), self.collection.as_str()];
        match ms {
            Some(v) => self
                .metrics
                .oplog_headroom
                .with_label_values(&labels)
                .set(v as f64 / 1000.0),
            None => {
                let _ = self.metrics.oplog_headroom.remove_label_values(&labels);
            }
        }
    }

    pub fn headroom_ms(&self) -> Option<i64> {
        match self.headroom_ms.load(Ordering::Relaxed) {
            i64::MIN => None,
            v => Some(v),
        }
    }

    /// How many changes are read but not yet acknowledged (the lag in events, where known:
    /// changes the source has not yet sent are not counted).
    pub fn set_pending(&self, n: u64) {
        self.pending.store(n, Ordering::Relaxed);
        self.metrics
            .pending
            .with_label_values(&[self.follower.as_str(), self.collection.as_str()])
            .set(n as i64);
    }

    pub fn applied_events(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    /// Milliseconds the follower is behind the source: 0 when caught up, else the age of the
    /// last acknowledged change.
    pub fn lag_ms(&self) -> Option<i64> {
        if self.caught_up.load(Ordering::Relaxed) {
            return Some(0);
        }
        match self.checkpoint_ct_ms.load(Ordering::Relaxed) {
            0 => None,
            ct => Some((now_ms() - ct).max(0)),
        }
    }

    pub fn checkpoint_age_ms(&self) -> Option<i64> {
        match self.checkpoint_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some((now_ms() - t).max(0)),
        }
    }

    /// Cluster time (ms) of the checkpoint, when known.
    pub fn checkpoint_cluster_ms(&self) -> Option<i64> {
        match self.checkpoint_ct_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }
}

/// The Prometheus metrics of one node.
pub struct Metrics {
    pub registry: Registry,
    applied: IntCounterVec,
    failed: IntCounterVec,
    skipped: IntCounterVec,
    batch_size: HistogramVec,
    apply_latency: HistogramVec,
    lag: GaugeVec,
    checkpoint_age: GaugeVec,
    initial_sync: IntGaugeVec,
    up: IntGaugeVec,
    pub oplog_headroom: GaugeVec,
    pending: IntGaugeVec,
    quarantined: IntGaugeVec,
    quarantined_total: IntCounterVec,
    copy_done: IntGaugeVec,
    copy_total: IntGaugeVec,
    copy_bytes_done: IntGaugeVec,
    copy_bytes_total: IntGaugeVec,
    copy_eta: GaugeVec,
    shared: IntGaugeVec,
    paused: IntGaugeVec,
    /// Events the shared readers took from the source, per database.
    pub source_events: IntCounterVec,
    role: IntGauge,
    term: IntGauge,
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let fc = &["follower", "collection"];
        let applied = IntCounterVec::new(
            Opts::new(
                "mongo_replicator_applied_events_total",
                "Changes acknowledged by the follower",
            ),
            fc,
        )
        .expect("metric");
        let failed = IntCounterVec::new(
            Opts::new(
                "mongo_replicator_failed_events_total",
                "Changes in batches the follower did not acknowledge (retried)",
            ),
            fc,
        )
        .expect("metric");
        let skipped = IntCounterVec::new(
            Opts::new(
                "mongo_replicator_skipped_events_total",
                "Changes that produced no write, by reason",
            ),
            &["follower", "collection", "reason"],
        )
        .expect("metric");
        let batch_size = HistogramVec::new(
            HistogramOpts::new(
                "mongo_replicator_batch_size",
                "Operations per applied batch",
            )
            .buckets(vec![1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0]),
            &["follower"],
        )
        .expect("metric");
        let apply_latency = HistogramVec::new(
            HistogramOpts::new(
                "mongo_replicator_apply_latency_seconds",
                "Time to apply one batch on a follower",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["follower"],
        )
        .expect("metric");
        let lag = GaugeVec::new(
            Opts::new(
                "mongo_replicator_lag_seconds",
                "How far the follower is behind the source",
            ),
            fc,
        )
        .expect("metric");
        let checkpoint_age = GaugeVec::new(
            Opts::new(
                "mongo_replicator_checkpoint_age_seconds",
                "Time since the checkpoint last moved",
            ),
            fc,
        )
        .expect("metric");
        let initial_sync = IntGaugeVec::new(
            Opts::new(
                "mongo_replicator_initial_sync_running",
                "1 while an initial sync copies",
            ),
            fc,
        )
        .expect("metric");
        let up = IntGaugeVec::new(
            Opts::new(
                "mongo_replicator_follower_up",
                "1 while the pipeline is not down or stopped",
            ),
            fc,
        )
        .expect("metric");
        let oplog_headroom = GaugeVec::new(
            Opts::new(
                "mongo_replicator_oplog_headroom_seconds",
                "Source oplog window minus the checkpoint's age",
            ),
            fc,
        )
        .expect("metric");
        let pending = IntGaugeVec::new(
            Opts::new(
                "mongo_replicator_lag_events",
                "Changes read from the source and not yet acknowledged by the follower",
            ),
            fc,
        )
        .expect("metric");
        let quarantined = IntGaugeVec::new(
            Opts::new(
                "mongo_replicator_quarantined_documents",
                "Documents the follower refused for good, recorded in its quarantine",
            ),
            fc,
        )
        .expect("metric");
        let quarantined_total = IntCounterVec::new(
            Opts::new(
                "mongo_replicator_quarantined_total",
                "Documents put in quarantine since the node started",
            ),
            fc,
        )
        .expect("metric");
        let copy_done = IntGaugeVec::new(
            Opts::new(
                "mongo_replicator_initial_sync_done_documents",
                "Documents copied so far by the running (or last) initial sync",
            ),
            fc,
        )
        .expect("metric");
        let copy_total = IntGaugeVec::new(
            Opts::new(
                "mongo_replicator_initial_sync_total_documents",
                "Documents the running (or last) initial sync has to copy",
            ),
            fc,
        )
        .expect("metric");
        let copy_bytes_done = IntGaugeVec::new(
            Opts::new(
                "mongo_replicator_initial_sync_done_bytes",
                "Bytes of documents copied so far by the running (or last) initial sync",
            ),
            fc,
        )
        .expect("metric");
        let copy_bytes_total = IntGaugeVec::new(
            Opts::new(
                "mongo_replicator_initial_sync_total_bytes",
                "Bytes of documents the running (or last) initial sync has to copy",
            ),
            fc,
        )
        .expect("metric");
        let copy_eta = GaugeVec::new(
            Opts::new(
                "mongo_replicator_initial_sync_eta_seconds",
                "Estimated time left of the running initial sync",
            ),
            fc,
        )
        .expect("metric");
        let shared = IntGaugeVec::new(
            Opts::new(
                "mongo_replicator_shared_reader",
                "1 while the pipeline takes its events from the shared reader of its database (0: its own stream, catching up)",
            ),
            fc,
        )
        .expect("metric");
        let paused = IntGaugeVec::new(
            Opts::new(
                "mongo_replicator_follower_paused",
                "1 while the follower is paused",
            ),
            &["follower"],
        )
        .expect("metric");
        let source_events = IntCounterVec::new(
            Opts::new(
                "mongo_replicator_source_events_read_total",
                "Change events the shared readers read from the source, per database (each read once, whatever the number of followers)",
            ),
            &["database"],
        )
        .expect("metric");
        let role = IntGauge::new(
            "mongo_replicator_leader",
            "1 when this node holds the lease",
        )
        .expect("metric");
        let term =
            IntGauge::new("mongo_replicator_term", "Lease term held or last seen").expect("metric");
        for c in [
            Box::new(applied.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failed.clone()),
            Box::new(skipped.clone()),
            Box::new(batch_size.clone()),
            Box::new(apply_latency.clone()),
            Box::new(lag.clone()),
            Box::new(checkpoint_age.clone()),
            Box::new(initial_sync.clone()),
            Box::new(up.clone()),
            Box::new(oplog_headroom.clone()),
            Box::new(pending.clone()),
            Box::new(quarantined.clone()),
            Box::new(quarantined_total.clone()),
            Box::new(copy_done.clone()),
            Box::new(copy_total.clone()),
            Box::new(copy_bytes_done.clone()),
            Box::new(copy_bytes_total.clone()),
            Box::new(copy_eta.clone()),
            Box::new(shared.clone()),
            Box::new(paused.clone()),
            Box::new(source_events.clone()),
            Box::new(role.clone()),
            Box::new(term.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Metrics {
            registry,
            applied,
            failed,
            skipped,
            batch_size,
            apply_latency,
            lag,
            checkpoint_age,
            initial_sync,
            up,
            oplog_headroom,
            pending,
            quarantined,
            quarantined_total,
            copy_done,
            copy_total,
            copy_bytes_done,
            copy_bytes_total,
            copy_eta,
            shared,
            paused,
            source_events,
            role,
            term,
        }
    }
}

/// The lease as this node last saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LeaseView {
    pub holder: Option<String>,
    /// Milliseconds until the lease expires, by the server's clock at the last look.
    pub expires_in_ms: Option<i64>,
}

/// Everything `/status` and `/metrics` show.
pub struct NodeStatus {
    pub node_id: String,
    leader: AtomicBool,
    term: AtomicI64,
    lease: Mutex<LeaseView>,
    pairs: Mutex<Vec<Arc<PairStats>>>,
    /// Per follower, whether it is paused (shared with its pairs).
    paused: Mutex<std::collections::HashMap<String, Arc<AtomicBool>>>,
    pub metrics: Arc<Metrics>,
}

#[derive(Serialize, Deserialize)]
pub struct FollowerReport {
    pub name: String,
    pub state: PairState,
    pub applied_events: u64,
    pub lag_ms: Option<i64>,
    pub lag_events: u64,
    pub checkpoint_age_ms: Option<i64>,
    /// The smallest headroom of its collections.
    pub oplog_headroom_ms: Option<i64>,
    pub last_error: Option<String>,
    /// Documents this follower refused for good (see `replication.on_rejected`).
    pub quarantined: u64,
    /// Set while the follower is paused (`POST /pause/{follower}`).
    pub paused: bool,
    /// During a copy: its progress, summed over the collections being copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_sync: Option<CopyReport>,
    pub collections: Vec<CollectionReport>,
}

#[derive(Serialize, Deserialize)]
pub struct CollectionReport {
    pub collection: String,
    pub state: PairState,
    pub applied_events: u64,
    pub lag_ms: Option<i64>,
    /// Changes read and not yet acknowledged.
    pub lag_events: u64,
    pub checkpoint_age_ms: Option<i64>,
    /// Source oplog window minus the checkpoint's age, when the source lets us read it.
    pub oplog_headroom_ms: Option<i64>,
    pub last_error: Option<String>,
    pub quarantined: u64,
    /// `shared` while the pipeline takes its events from its database's shared reader,
    /// `own` while it reads its own stream (catching up).
    #[serde(default)]
    pub reader: String,
    /// During a copy: documents and bytes done and to do, the rate, and an estimate of the
    /// time left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_sync: Option<CopyReport>,
}

#[derive(Serialize, Deserialize)]
pub struct StatusReport {
    pub node_id: String,
    pub role: String,
    pub term: i64,
    pub lease: LeaseView,
    pub followers: Vec<FollowerReport>,
}

impl NodeStatus {
    pub fn new(node_id: &str) -> Arc<NodeStatus> {
        Arc::new(NodeStatus {
            node_id: node_id.to_string(),
            leader: AtomicBool::new(false),
            term: AtomicI64::new(0),
            lease: Mutex::new(LeaseView::default()),
            pairs: Mutex::new(Vec::new()),
            paused: Mutex::new(Default::default()),
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// Registers a (collection, follower) pair; its stats live as long as the node.
    pub fn pair(&self, collection: &str, follower: &str) -> Arc<PairStats> {
        let mut pairs = self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pairs
            .iter()
            .find(|p| p.collection == collection && p.follower == follower)
        {
            return p.clone();
        }
        let p = Arc::new(PairStats {
            collection: collection.to_string(),
            follower: follower.to_string(),
            state: Mutex::new((PairState::Stopped, None)),
            applied: AtomicU64::new(0),
            checkpoint_ms: AtomicI64::new(0),
            checkpoint_ct_ms: AtomicI64::new(0),
            caught_up: AtomicBool::new(false),
            resync: AtomicBool::new(false),
            headroom_ms: AtomicI64::new(i64::MIN),
            pending: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            paused: self.paused_flag(follower),
            shared: AtomicBool::new(false),
            copy: Mutex::new(None),
            metrics: self.metrics.clone(),
        });
        p.set_state(
            PairState::Stopped,
            Some("standby: this node does not hold the lease".into()),
        );
        // Every series of the pair exists from the start (at zero), so that dashboards and
        // `increase()` in alert rules see them before the first event.
        let labels = [follower, collection];
        let m = &self.metrics;
        m.applied.with_label_values(&labels);
        m.failed.with_label_values(&labels);
        m.quarantined.with_label_values(&labels);
        m.quarantined_total.with_label_values(&labels);
        m.pending.with_label_values(&labels);
        m.copy_done.with_label_values(&labels);
        m.copy_total.with_label_values(&labels);
        m.copy_bytes_done.with_label_values(&labels);
        m.copy_bytes_total.with_label_values(&labels);
        m.shared.with_label_values(&labels);
        for reason in ["missing_key", "unusable_key", "duplicate_key", "gone"] {
            m.skipped.with_label_values(&[follower, collection, reason]);
        }
        pairs.push(p.clone());
        p
    }

    fn paused_flag(&self, follower: &str) -> Arc<AtomicBool> {
        self.paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(follower.to_string())
            .or_insert_with(|| {
                self.metrics.paused.with_label_values(&[follower]).set(0);
                Arc::new(AtomicBool::new(false))
            })
            .clone()
    }

    /// Pauses or resumes a follower; returns whether that changed anything.
    pub fn set_paused(&self, follower: &str, paused: bool) -> bool {
        let before = self.paused_flag(follower).swap(paused, Ordering::SeqCst);
        self.metrics
            .paused
            .with_label_values(&[follower])
            .set(paused as i64);
        before != paused
    }

    pub fn is_paused(&self, follower: &str) -> bool {
        self.paused_flag(follower).load(Ordering::SeqCst)
    }

    pub fn pairs(&self) -> Vec<Arc<PairStats>> {
        self.pairs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_role(&self, leader: bool, term: i64) {
        self.leader.store(leader, Ordering::Relaxed);
        self.term.store(term, Ordering::Relaxed);
        self.metrics.role.set(leader as i64);
        self.metrics.term.set(term);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    pub fn set_lease(&self, view: LeaseView) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = view;
    }

    pub fn report(&self) -> StatusReport {
        let mut followers: Vec<FollowerReport> = Vec::new();
        for p in self.pairs() {
            let (state, last_error) = p.state();
            let c = CollectionReport {
                collection: p.collection.clone(),
                state,
                applied_events: p.applied_events(),
                lag_ms: p.lag_ms(),
                lag_events: p.pending.load(Ordering::Relaxed),
                checkpoint_age_ms: p.checkpoint_age_ms(),
                oplog_headroom_ms: p.headroom_ms(),
                last_error,
                quarantined: p.quarantined(),
                reader: if p.is_shared() { "shared" } else { "own" }.to_string(),
                initial_sync: p.copy_report(),
            };
            let f = match followers.iter_mut().find(|f| f.name == p.follower) {
                Some(f) => f,
                None => {
                    followers.push(FollowerReport {
                        name: p.follower.clone(),
                        state: PairState::Streaming,
                        applied_events: 0,
                        lag_ms: Some(0),
                        lag_events: 0,
                        checkpoint_age_ms: Some(0),
                        oplog_headroom_ms: c.oplog_headroom_ms,
                        last_error: None,
                        quarantined: 0,
                        paused: p.is_paused(),
                        initial_sync: None,
                        collections: Vec::new(),
                    });
                    followers.last_mut().expect("just pushed")
                }
            };
            if c.state.severity() >= f.state.severity() {
                f.state = c.state;
            }
            f.applied_events += c.applied_events;
            f.quarantined += c.quarantined;
            if let Some(r) = &c.initial_sync {
                f.initial_sync
                    .get_or_insert_with(CopyReport::default)
                    .add(r);
            }
            f.lag_events += c.lag_events;
            f.lag_ms = max_opt(f.lag_ms, c.lag_ms);
            f.checkpoint_age_ms = max_opt(f.checkpoint_age_ms, c.checkpoint_age_ms);
            f.oplog_headroom_ms = match (f.oplog_headroom_ms, c.oplog_headroom_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if f.last_error.is_none() {
                f.last_error = c.last_error.clone();
            }
            f.collections.push(c);
        }
        StatusReport {
            node_id: self.node_id.clone(),
            role: if self.is_leader() {
                "leader"
            } else {
                "standby"
            }
            .to_string(),
            term: self.term.load(Ordering::Relaxed),
            lease: self.lease.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            followers,
        }
    }

    /// The Prometheus text exposition, with the time-derived gauges brought up to date.
    pub fn metrics_text(&self) -> String {
        for p in self.pairs() {
            let labels = [p.follower.as_str(), p.collection.as_str()];
            match p.lag_ms() {
                Some(l) => self
                    .metrics
                    .lag
                    .with_label_values(&labels)
                    .set(l as f64 / 1000.0),
                None => {
                    let _ = self.metrics.lag.remove_label_values(&labels);
                }
            }
            match p.checkpoint_age_ms() {
                Some(a) => self
                    .metrics
                    .checkpoint_age
                    .with_label_values(&labels)
                    .set(a as f64 / 1000.0),
                None => {
                    let _ = self.metrics.checkpoint_age.remove_label_values(&labels);
                }
            }
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.metrics.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The larger of two optional values; a missing one (unknown) wins, since unknown is worse.
fn max_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follower_reports_the_worst_state_and_summed_counts() {
        let node = NodeStatus::new("n1");
        let a = node.pair("a", "f1");
        let b = node.pair("b", "f1");
        a.set_state(PairState::Streaming, None);
        b.set_state(PairState::Down, Some("connection refused".into()));
        a.batch_applied(3, 3, 0.01);
        b.batch_applied(2, 2, 0.01);
        a.checkpoint_moved(Some(now_ms()), true);
        let r = node.report();
        assert_eq!(r.followers.len(), 1);
        assert_eq!(r.followers[0].state, PairState::Down);
        assert_eq!(r.followers[0].applied_events, 5);
        assert_eq!(
            r.followers[0].last_error.as_deref(),
            Some("connection refused")
        );
        assert_eq!(r.role, "standby");
    }

    #[test]
    fn lag_is_zero_when_caught_up_and_grows_otherwise() {
        let node = NodeStatus::new("n1");
        let p = node.pair("a", "f1");
        assert_eq!(p.lag_ms(), None);
        p.checkpoint_moved(Some(now_ms() - 5_000), false);
        assert!(p.lag_ms().unwrap() >= 5_000);
        p.checkpoint_moved(Some(now_ms()), true);
        assert_eq!(p.lag_ms(), Some(0));
    }
}
