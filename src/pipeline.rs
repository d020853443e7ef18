//! One (collection, follower) pipeline: resume point, initial sync, then the change stream,
//! batched into the follower.
//!
//! Each pair keeps its own stream and checkpoint, so one follower's outage holds back no
//! other. A reader task pulls events (and the post-batch tokens of empty batches) from the
//! change stream into a bounded channel; the batcher groups them by `batch_max_docs` and
//! `batch_max_wait`, applies each batch in one round trip per command, and only then moves
//! the checkpoint. Any failure drops the stream and reopens it from the last acknowledged
//! checkpoint after a capped exponential backoff: at-least-once delivery made exact by
//! idempotent writes.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf, Timestamp};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::options::FullDocumentType;
use mongodb::{Client, Collection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::change::{coalesce, upsert_for, Coalesced, Op, Skip};
use crate::checkpoint::{token_cluster_time, ts_key, Checkpoint, CheckpointStore};
use crate::config::{Config, InitialSync, OnHistoryLost};
use crate::follower::{ApplyError, Follower, Next, Rev, Stored, Write};
use crate::lease::Authority;
use crate::namespace::Ns;
use crate::order::after_filter;
use crate::reader::{collection_filter, event_bytes, event_time, token_time, Hub, HubItem};
use crate::source::{describe, is_history_lost};
use crate::status::{PairState, PairStats};

/// How long a getMore waits on the source for new events; bounds shutdown latency too.
const MAX_AWAIT: Duration = Duration::from_millis(500);
/// How often an idle pipeline writes its advancing checkpoint to the follower itself (the
/// token file gets every idle token).
const IDLE_FOLLOWER_CHECKPOINT: Duration = Duration::from_secs(5);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Everything one pipeline needs.
pub struct Pair {
    /// The source collection.
    pub ns: Ns,
    /// Its name in status, logs and the token file (see [`crate::namespace::Selection::label`]).
    pub label: String,
    pub follower: Arc<Follower>,
    pub source: Client,
    pub config: Arc<Config>,
    pub store: CheckpointStore,
    pub stats: Arc<PairStats>,
    pub authority: Authority,
    /// The revision of the follower's checkpoint this pipeline last read or wrote; every
    /// write swaps it, so a follower that changed underneath is noticed (see [`Follower`]).
    pub rev: std::sync::Mutex<Rev>,
    /// Events (or documents, in a copy) asked for per batch from the source
    /// (`batch_max_docs` at first, halved when a reply was too large).
    pub stream_batch: std::sync::atomic::AtomicU32,
    /// The shared reader of the source database, once this pipeline's own stream has caught
    /// up (see [`crate::reader`]).
    pub hub: Option<Arc<Hub>>,
}

/// How a pipeline ended.
#[derive(Debug)]
pub enum Exit {
    /// Asked to stop; the batch in flight was applied and checkpointed.
    Shutdown,
    /// This node may no longer write (lease lost, or a follower has seen a newer term).
    NotLeader(String),
    /// Stopped for good (history lost with `on_history_lost = "fail"`, a document without
    /// the key under `missing_key = "fail"`); the reason is in the pair's status.
    Failed(String),
}

#[derive(Debug)]
enum PairError {
    /// Retry after a backoff (follower or source unavailable, write rejected).
    Transient(String),
    HistoryLost(String),
    NotLeader(String),
    Fatal(String),
    /// Copy the follower again: requested (`POST /resync/{follower}`), or the source
    /// collection was dropped, renamed, or replaced by a rename (`$out`).
    Resync(String),
    /// The follower's checkpoint changed underneath: start again from it, at once.
    Reload(String),
    /// The source could not send an event (it would exceed the BSON size limit).
    TooLarge(String),
    /// Reopen the stream at once (after a batch read in the degraded mode).
    Reopen,
    /// The follower was paused: wait until it is resumed, then go on from the checkpoint.
    Paused,
    /// The source sent a reply too large for the driver: ask for fewer events per batch.
    ReplyTooLarge(String),
    Stopped,
}

impl From<ApplyError> for PairError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::Fenced { .. } => PairError::NotLeader(e.to_string()),
            ApplyError::Moved(_) => PairError::Reload(e.to_string()),
            ApplyError::Unfenced(_) | ApplyError::Refused(_) => PairError::Fatal(e.to_string()),
            other => PairError::Transient(other.to_string()),
        }
    }
}

fn source_err(e: mongodb::error::Error) -> PairError {
    if is_history_lost(&e) {
        PairError::HistoryLost(describe(&e))
    } else if is_too_large(&e) {
        PairError::TooLarge(describe(&e))
    } else if is_reply_too_large(&e) {
        PairError::ReplyTooLarge(describe(&e))
    } else {
        PairError::Transient(format!("source: {}", describe(&e)))
    }
}

/// The server could not build a reply: an event (document plus metadata) past the BSON size
/// limit (BSONObjectTooLarge, 10334; or the aggregation's own limit, 17419).
fn is_too_large(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), mongodb::error::ErrorKind::Command(c)
        if c.code == 10334 || c.code == 17419 || c.code_name == "BSONObjectTooLarge")
}

/// A reply past the driver's message limit (48 MB): MongoDB caps a batch at 16 MB, but a
/// server that does not (the test server) can send more events in one batch than that.
fn is_reply_too_large(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), mongodb::error::ErrorKind::InvalidResponse { message, .. }
        if message.contains("over maximum"))
}

/// A raw document from the server, decoded; one that does not decode stops the pair with
/// the reason instead of being retried forever.
fn decode(raw: &RawDocumentBuf) -> Result<Document, PairError> {
    raw.to_document().map_err(|e| {
        PairError::Fatal(format!(
            "the source sent a document that does not decode: {e}"
        ))
    })
}

impl Pair {
    fn coll(&self) -> Collection<Document> {
        self.source.database(&self.ns.db).collection(&self.ns.coll)
    }

    fn name(&self) -> &str {
        &self.follower.name
    }

    /// A call to `who` within `replication.write_timeout`: a server that hangs counts as
    /// unavailable instead of holding the pair forever.
    async fn within<T>(
        &self,
        who: &str,
        fut: impl std::future::Future<Output = Result<T, mongodb::error::Error>>,
        on_error: impl FnOnce(mongodb::error::Error) -> PairError,
    ) -> Result<T, PairError> {
        let limit = self.config.replication.write_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(res) => res.map_err(on_error),
            Err(_) => Err(PairError::Transient(format!(
                "{who} did not answer within {} (replication.write_timeout)",
                humantime::format_duration(limit)
            ))),
        }
    }

    /// A source call, within the time limit.
    async fn src<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, mongodb::error::Error>>,
    ) -> Result<T, PairError> {
        self.within("source", fut, source_err).await
    }

    /// A direct read of the follower, within the time limit.
    async fn fol<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, mongodb::error::Error>>,
    ) -> Result<T, PairError> {
        self.within("follower", fut, |e| {
            PairError::Transient(format!("follower: {}", describe(&e)))
        })
        .await
    }

    /// Runs until `stop` is cancelled, the lease is lost, or a fatal error.
    pub async fn run(self, stop: CancellationToken) -> Exit {
        let mut backoff = BACKOFF_START;
        // An error from handling the previous error (a resync that could not start),
        // handled like any other.
        let mut pending: Option<PairError> = None;
        let mut reloads = 0u32;
        // Set after the source could not send an event (too large): the next stream reads
        // one batch without documents and re-reads each by `_id`.
        let mut degraded = false;
        loop {
            if stop.is_cancelled() {
                self.stats.set_state(PairState::Stopped, None);
                return Exit::Shutdown;
            }
            let err = match pending.take() {
                Some(e) => e,
                None => match self
                    .run_once(&stop, &mut backoff, std::mem::take(&mut degraded))
                    .await
                {
                    Ok(()) => PairError::Stopped,
                    Err(e) => e,
                },
            };
            let resync = match err {
                PairError::Stopped => {
                    self.stats.set_state(PairState::Stopped, None);
                    return Exit::Shutdown;
                }
                PairError::NotLeader(msg) => {
                    tracing::warn!(follower = %self.name(), collection = %self.label, reason = %msg, "pipeline stops: this node is no longer the leader");
                    self.stats.set_state(PairState::Stopped, Some(msg.clone()));
                    return Exit::NotLeader(msg);
                }
                PairError::Fatal(msg) => {
                    tracing::error!(follower = %self.name(), collection = %self.label, reason = %msg, "pipeline stopped; it starts again on a resync (or a restart of the node)");
                    self.stats.set_state(PairState::Stopped, Some(msg.clone()));
                    if !self.wait_for_resync(&stop).await {
                        return Exit::Failed(msg);
                    }
                    backoff = BACKOFF_START;
                    "resync requested".to_string()
                }
                PairError::TooLarge(msg) => {
                    tracing::warn!(follower = %self.name(), collection = %self.label, error = %msg, "the source could not send a change event (too large); reading the next batch without documents and re-reading each by _id");
                    self.stats.skipped("event_too_large");
                    degraded = true;
                    continue;
                }
                PairError::Reopen => continue,
                PairError::Paused => {
                    if !self.wait_while_paused(&stop).await {
                        self.stats.set_state(PairState::Stopped, None);
                        return Exit::Shutdown;
                    }
                    continue;
                }
                PairError::ReplyTooLarge(msg) => {
                    let now = self.stream_batch.load(std::sync::atomic::Ordering::Relaxed);
                    let next = (now / 2).max(1);
                    self.stream_batch
                        .store(next, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(follower = %self.name(), collection = %self.label, error = %msg, batch = next, "the source's reply was too large; asking for fewer events per batch");
                    if now == 1 {
                        // Even one event per batch is too large: read it without its
                        // document and re-read that by `_id`.
                        degraded = true;
                    }
                    continue;
                }
                PairError::Reload(msg) => {
                    reloads += 1;
                    tracing::warn!(follower = %self.name(), collection = %self.label, reason = %msg, "reloading the follower's checkpoint");
                    self.stats.skipped("checkpoint_reload");
                    // A follower that keeps changing underneath (another writer) is not
                    // retried in a tight loop.
                    if reloads > 3 && sleep_or_stop(&stop, backoff).await {
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    continue;
                }
                PairError::Resync(reason) => reason,
                PairError::HistoryLost(msg) => {
                    let policy = self.config.replication.on_history_lost;
                    tracing::error!(
                        follower = %self.name(), collection = %self.label, error = %msg, ?policy,
                        "history lost: the checkpoint's resume point is no longer in the source's oplog, so changes since then cannot be streamed"
                    );
                    self.stats.skipped("history_lost");
                    if policy == OnHistoryLost::Fail {
                        let reason = format!("history lost: resume point no longer in the source's oplog ({msg}); on_history_lost = \"fail\": run `mongo-replicator resync --follower {}`", self.name());
                        self.stats
                            .set_state(PairState::Stopped, Some(reason.clone()));
                        if !self.wait_for_resync(&stop).await {
                            return Exit::Failed(reason);
                        }
                        backoff = BACKOFF_START;
                        "resync requested".to_string()
                    } else {
                        "on_history_lost = \"resync\"".to_string()
                    }
                }
                PairError::Transient(msg) => {
                    tracing::warn!(follower = %self.name(), collection = %self.label, error = %msg, retry_in = ?backoff, "pipeline interrupted; will resume from the checkpoint");
                    self.stats.set_state(PairState::Down, Some(msg));
                    if sleep_or_stop(&stop, backoff).await {
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                    continue;
                }
            };
            // Mark the follower for a copy; the next round copies it again.
            tracing::warn!(follower = %self.name(), collection = %self.label, reason = %resync, "copying this follower again");
            match self.mark_resync().await {
                Ok(()) => reloads = 0,
                // Another writer or a restore moved the checkpoint: the next round reads
                // it, and marks again if it is not a resync mark.
                Err(PairError::Reload(_)) => pending = Some(PairError::Resync(resync)),
                // A stop (the follower cannot be fenced, say) waits for a new request;
                // anything else retries the resync after its backoff.
                Err(e @ PairError::Fatal(_)) => pending = Some(e),
                Err(e) => {
                    self.stats.request_resync();
                    pending = Some(e);
                }
            }
        }
    }

    /// A paused pipeline waits here, in state `paused`, holding no stream and writing
    /// nothing, until its follower is resumed (true) or the node stops leading (false).
    async fn wait_while_paused(&self, stop: &CancellationToken) -> bool {
        self.stats.set_shared(false);
        self.stats.set_pending(0);
        self.stats.set_state(PairState::Paused, None);
        tracing::info!(follower = %self.name(), collection = %self.label, "paused; the checkpoint is kept");
        while self.stats.is_paused() {
            if !sleep_or_stop(stop, Duration::from_millis(100)).await {
                return false;
            }
        }
        tracing::info!(follower = %self.name(), collection = %self.label, "resumed; catching up from the checkpoint");
        true
    }

    /// A stopped pipeline waits here, in state `stopped`, until a resync is requested (true)
    /// or the node stops leading or shuts down (false).
    async fn wait_for_resync(&self, stop: &CancellationToken) -> bool {
        let mut polls = 0u32;
        loop {
            if self.stats.take_resync_request() {
                return true;
            }
            // `mongo-replicator resync` where no node answered marks the follower itself.
            polls += 1;
            if polls % 10 == 0 {
                if let Ok(Stored::Resync { .. }) = self.follower.load_checkpoint(&self.ns).await {
                    return true;
                }
            }
            if !sleep_or_stop(stop, Duration::from_millis(200)).await {
                return false;
            }
        }
    }

    /// Leaves a resync mark as the follower's checkpoint (fenced, swapped on its revision),
    /// so that the copy happens even across restarts and whatever `initial_sync` says.
    async fn mark_resync(&self) -> Result<(), PairError> {
        self.check_authority()?;
        let expect = match self.follower.load_checkpoint(&self.ns).await? {
            Stored::Resync { .. } => return Ok(()),
            other => other.rev(),
        };
        let applied = self
            .follower
            .apply(&Write {
                ns: &self.ns,
                ops: &[],
                next: Next::Resync,
                term: self.authority.term(),
                expect: &expect,
                clear_quarantine: false,
                reset_quarantine: false,
            })
            .await?;
        self.set_rev(applied.rev);
        self.store.reset(&self.label, self.name());
        Ok(())
    }

    fn rev(&self) -> Rev {
        self.rev.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_rev(&self, rev: Rev) {
        *self.rev.lock().unwrap_or_else(|e| e.into_inner()) = rev;
    }

    fn check_authority(&self) -> Result<(), PairError> {
        if self.authority.is_valid() {
            Ok(())
        } else {
            Err(PairError::NotLeader("the lease may have expired".into()))
        }
    }

    /// Where to resume: the follower's own checkpoint, which is the authority. The token
    /// file's entry is used instead only when it extends exactly the revision the follower
    /// holds (it is then ahead by idle post-batch tokens alone, over which nothing changed).
    async fn resume_point(&self) -> Result<Stored, PairError> {
        let stored = self.follower.load_checkpoint(&self.ns).await?;
        self.set_rev(stored.rev());
        match &stored {
            Stored::At { cp, rev } => {
                let local = self.store.get(&self.label, self.name());
                match local {
                    Some(l)
                        if l.write_id.is_some()
                            && l.write_id == rev.hex()
                            && l.copy_after.is_none()
                            && cp.copy_after.is_none()
                            && l.is_not_before(cp) =>
                    {
                        return Ok(Stored::At {
                            cp: Box::new(l),
                            rev: rev.clone(),
                        });
                    }
                    Some(l) if l != **cp => {
                        tracing::info!(follower = %self.name(), collection = %self.label, "the token file does not match the follower's checkpoint; resuming from the follower's own");
                        self.store.replace(&self.label, self.name(), (**cp).clone());
                    }
                    _ => self.store.replace(&self.label, self.name(), (**cp).clone()),
                }
            }
            Stored::Absent | Stored::Resync { .. } => {
                self.store.reset(&self.label, self.name());
            }
        }
        Ok(stored)
    }

    async fn run_once(
        &self,
        stop: &CancellationToken,
        backoff: &mut Duration,
        degraded: bool,
    ) -> Result<(), PairError> {
        self.check_authority()?;
        if self.stats.is_paused() {
            return Err(PairError::Paused);
        }
        let term = self.authority.term();
        // First end the transactions that killed or stale writers of this pipeline left
        // open (they hold its fence, and the fence write below would wait for them), then
        // fence the pipeline before reading its checkpoint: a stale writer's transaction
        // either committed before the read below, or fails.
        let aborted = self.follower.abort_stale_writers(&self.ns, term).await?;
        if aborted > 0 {
            tracing::info!(follower = %self.name(), collection = %self.label, sessions = aborted, "aborted transactions left open by earlier writers");
        }
        self.follower.claim(&self.ns, term).await?;
        self.follower.ensure_key_index(&self.ns).await?;
        self.stats
            .set_quarantined(self.follower.quarantine_count(&self.ns).await?);
        let start = match self.resume_point().await? {
            Stored::At { cp, .. } if cp.copy_after.is_some() => {
                self.initial_sync(Some(*cp), stop).await?
            }
            Stored::At { cp, .. } => *cp,
            Stored::Resync { .. } => self.initial_sync(None, stop).await?,
            Stored::Absent => match self.config.replication.initial_sync {
                InitialSync::Auto => self.initial_sync(None, stop).await?,
                InitialSync::Never => {
                    let cp = self.start_now().await?;
                    tracing::warn!(follower = %self.name(), collection = %self.label, "first start of this follower and initial_sync = \"never\": streaming from now; existing documents are not copied (a later resync copies)");
                    cp
                }
            },
        };
        self.stream(start, stop, backoff, degraded).await
    }

    /// A checkpoint at the source's present, from a fresh stream's post-batch token.
    async fn capture_now(&self) -> Result<Checkpoint, PairError> {
        let stream = self.src(self.coll().watch().into_future()).await?;
        let token = stream.resume_token().ok_or_else(|| {
            PairError::Transient("source returned no resume token for a new change stream".into())
        })?;
        Ok(Checkpoint::new(token_doc(&token)?, None))
    }

    async fn start_now(&self) -> Result<Checkpoint, PairError> {
        let cp = self.capture_now().await?;
        self.commit(Vec::new(), cp.clone(), 0, true).await?;
        Ok(cp)
    }

    /// Copies the source collection into the follower, resuming a copy that was cut short,
    /// then removes follower documents the source does not have. Returns the checkpoint to
    /// stream from: a position captured before the copy began, so that every change made
    /// during the copy is replayed afterwards (harmless, as writes are idempotent).
    async fn initial_sync(
        &self,
        resume: Option<Checkpoint>,
        stop: &CancellationToken,
    ) -> Result<Checkpoint, PairError> {
        self.stats.set_state(PairState::InitialSync, None);
        let (base, mut after) = match resume {
            Some(cp) => {
                let after = cp.copy_after.clone().unwrap_or(Bson::Null);
                (cp, after)
            }
            None => {
                // The copy's start is recorded on the follower (so a crash resumes it, and
                // its quarantine starts afresh: the copy writes every document again).
                let mut base = self.capture_now().await?;
                // The follower collection gets the source's options and indexes before any
                // document (a capped size or a collation cannot be changed afterwards).
                self.sync_meta(true).await?;
                base.copy_after = Some(Bson::Null);
                self.commit(Vec::new(), base.clone(), 0, false).await?;
                self.stats.set_quarantined(0);
                (base, Bson::Null)
            }
        };
        let filter = if after == Bson::Null {
            doc! {}
        } else {
            after_filter(&after)
        };
        let coll = self.coll();
        let total = self
            .src(coll.count_documents(filter.clone()).into_future())
            .await?;
        let bytes_total = self.source_bytes(total).await;
        self.stats.copy_started(0, total, 0, bytes_total);
        let _ended = OnDrop(|| self.stats.copy_ended());
        tracing::info!(follower = %self.name(), collection = %self.label, total, resumed = after != Bson::Null, "initial sync: copying documents");
        let mut cursor = self
            .src(
                coll.clone_with_type::<RawDocumentBuf>()
                    .find(filter)
                    .sort(doc! {"_id": 1})
                    .batch_size(
                        self.stream_batch
                            .load(std::sync::atomic::Ordering::Relaxed)
                            .clamp(1, 10_000),
                    )
                    .into_future(),
            )
            .await?;
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut done: u64 = 0;
        let mut bytes_done: u64 = 0;
        let mut ops = Vec::new();
        let mut bytes = 0usize;
        let max = self.config.replication.batch_max_docs;
        let max_bytes = self.config.replication.batch_max_bytes.as_u64() as usize;
        loop {
            let next = self.src(cursor.try_next()).await?;
            let finished = next.is_none();
            if let Some(raw) = next {
                bytes += raw.as_bytes().len();
                bytes_done += raw.as_bytes().len() as u64;
                let doc = decode(&raw)?;
                let id = doc.get("_id").cloned().unwrap_or(Bson::Null);
                if let Err(e) = self.push_upsert(doc, &mut ops) {
                    // Copy what came before the bad document, then stop at it.
                    self.commit_copied(&base, &after, &mut ops).await?;
                    return Err(e);
                }
                after = id;
                done += 1;
            }
            if ops.len() >= max || bytes >= max_bytes || finished {
                bytes = 0;
                self.commit_copied(&base, &after, &mut ops).await?;
                if stop.is_cancelled() {
                    tracing::info!(follower = %self.name(), collection = %self.label, done, "initial sync interrupted by shutdown; it resumes where it stopped");
                    return Err(PairError::Stopped);
                }
                if self.stats.is_paused() {
                    return Err(PairError::Paused);
                }
            }
            self.stats.copy_progress(done, bytes_done);
            if last_log.elapsed() >= Duration::from_secs(2) || finished {
                let secs = started.elapsed().as_secs_f64().max(0.001);
                tracing::info!(
                    follower = %self.name(), collection = %self.label,
                    done, total, rate_per_s = (done as f64 / secs) as u64,
                    "initial sync progress: {done} of {total} documents"
                );
                last_log = Instant::now();
            }
            if finished {
                break;
            }
        }
        // An archive follower keeps documents the source no longer has.
        let removed = if self.follower.applies_deletes() {
            self.remove_extras(&base, &after).await?
        } else {
            0
        };
        let mut cp = base;
        cp.copy_after = None;
        self.commit(Vec::new(), cp.clone(), 0, false).await?;
        tracing::info!(follower = %self.name(), collection = %self.label, copied = done, removed, secs = started.elapsed().as_secs_f64(), "initial sync done; streaming from the position taken before the copy");
        Ok(cp)
    }

    /// Makes the follower collection's indexes and options those of the source collection
    /// (`replication.indexes`), keeping the replicator's own key index. `recreate` (a copy
    /// is starting) lets it drop and create the follower collection anew when an option
    /// that cannot change in place (capped size, collation) differs.
    async fn sync_meta(&self, recreate: bool) -> Result<(), PairError> {
        if !self.config.replication.indexes {
            return Ok(());
        }
        self.check_authority()?;
        let src = self
            .src(crate::meta::read(
                &self.source.database(&self.ns.db),
                &self.ns.coll,
            ))
            .await?;
        if !src.exists {
            // Dropped since: its drop event follows in the stream.
            return Ok(());
        }
        let fdb = self
            .follower
            .client()
            .database(self.follower.target_db(&self.ns));
        let key_field = self.follower.key_field(&self.ns);
        let limit = self.config.replication.write_timeout;
        let applied = match tokio::time::timeout(
            limit,
            crate::meta::apply(&src, &fdb, &self.ns.coll, key_field, recreate),
        )
        .await
        {
            Ok(Ok(applied)) => applied,
            // The follower answered and refused (no privilege for collMod, a unique index
            // that its data breaks, an option it does not know): the documents still
            // replicate; the difference is logged, counted, and shown by `check`.
            Ok(Err(e)) if crate::source::error_code(&e).is_some() => {
                tracing::warn!(follower = %self.name(), collection = %self.label, error = %describe(&e), "could not bring the follower's indexes or options in line with the source; documents still replicate, and `check` shows the difference");
                self.stats.skipped("indexes_or_options");
                return Ok(());
            }
            Ok(Err(e)) => return Err(PairError::Transient(format!("follower: {}", describe(&e)))),
            Err(_) => {
                return Err(PairError::Transient(format!(
                    "follower did not answer within {} (replication.write_timeout)",
                    humantime::format_duration(limit)
                )))
            }
        };
        for change in &applied.changed {
            tracing::info!(follower = %self.name(), collection = %self.label, change = %change, "follower indexes and options brought in line with the source");
        }
        for left in &applied.unfixed {
            tracing::warn!(follower = %self.name(), collection = %self.label, difference = %left, "a collection option differs from the source's and cannot change in place; a resync of this follower recreates the collection");
        }
        self.follower.ensure_key_index(&self.ns).await?;
        Ok(())
    }

    /// The bytes of documents a copy of `remaining` documents reads, from the source's
    /// collection statistics (0 when the source does not say).
    async fn source_bytes(&self, remaining: u64) -> u64 {
        let stats = async {
            let mut cur = self
                .coll()
                .aggregate([doc! {"$collStats": {"storageStats": {}}}])
                .await?;
            cur.try_next().await
        };
        let Ok(Ok(Some(d))) = tokio::time::timeout(Duration::from_secs(5), stats).await else {
            return 0;
        };
        let s = d.get_document("storageStats").ok();
        let get = |k: &str| s.and_then(|s| s.get(k)).and_then(crate::follower::bson_i64);
        match (get("size"), get("count")) {
            (Some(size), Some(count)) if count > 0 => {
                (size.max(0) as u128 * remaining.min(count as u64) as u128 / count as u128) as u64
            }
            (Some(size), _) => size.max(0) as u64,
            _ => 0,
        }
    }

    /// Applies the copied documents in `ops` (if any), recording that the copy has reached
    /// the source `_id` `after`.
    async fn commit_copied(
        &self,
        base: &Checkpoint,
        after: &Bson,
        ops: &mut Vec<Op>,
    ) -> Result<(), PairError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut cp = base.clone();
        cp.copy_after = Some(after.clone());
        let n = ops.len() as u64;
        self.commit(std::mem::take(ops), cp, n, false).await
    }

    /// Deletes follower documents whose `_id` the source does not have, fenced and swapped
    /// like every batch, with the copy's checkpoint (so a crash here resumes at this step).
    async fn remove_extras(&self, base: &Checkpoint, after: &Bson) -> Result<u64, PairError> {
        let fcoll: Collection<Document> = self.follower.target(&self.ns);
        let mut cursor = self
            .fol(
                fcoll
                    .find(doc! {})
                    .projection(doc! {"_id": 1})
                    .sort(doc! {"_id": 1})
                    .batch_size(1000)
                    .into_future(),
            )
            .await?;
        let mut removed = 0;
        let mut chunk = Vec::new();
        loop {
            let next = self.fol(cursor.try_next()).await?;
            let finished = next.is_none();
            if let Some(d) = next {
                if let Some(id) = d.get("_id") {
                    chunk.push(id.clone());
                }
            }
            if chunk.len() >= 1000 || (finished && !chunk.is_empty()) {
                let ids = std::mem::take(&mut chunk);
                let found = self
                    .src(async {
                        self.coll()
                            .find(crate::order::in_filter("_id", &ids))
                            .projection(doc! {"_id": 1})
                            .await?
                            .try_collect::<Vec<Document>>()
                            .await
                    })
                    .await?;
                let present: Vec<Bson> = found
                    .into_iter()
                    .filter_map(|d| d.get("_id").cloned())
                    .collect();
                let mut extra: Vec<Op> = ids
                    .into_iter()
                    .filter(|i| !present.contains(i))
                    .map(|id| Op::Delete { id })
                    .collect();
                removed += extra.len() as u64;
                if !extra.is_empty() {
                    self.commit_copied(base, after, &mut extra).await?;
                }
            }
            if finished {
                return Ok(removed);
            }
        }
    }

    /// Applies `ops` with `cp` on the follower, then records the checkpoint locally.
    async fn commit(
        &self,
        ops: Vec<Op>,
        cp: Checkpoint,
        events: u64,
        caught_up: bool,
    ) -> Result<(), PairError> {
        self.check_authority()?;
        let Coalesced {
            ops,
            duplicate_keys,
        } = coalesce(ops);
        for key in &duplicate_keys {
            tracing::warn!(follower = %self.name(), collection = %self.label, key = %key, key_field = %self.follower.key_field(&self.ns), "two source documents hold this key; the follower keeps the later one (make the key field unique on the source)");
            self.stats.skipped("duplicate_key");
        }
        let started = Instant::now();
        let quarantined = self.apply_ops(&ops, &cp, events, true).await?;
        if !quarantined.is_empty() {
            self.resolve_stale_blockers(&quarantined, &cp).await?;
        }
        self.stats
            .batch_applied(events, ops.len(), started.elapsed().as_secs_f64());
        self.record(cp, caught_up);
        Ok(())
    }

    /// Applies `ops` as they are (already coalesced) with checkpoint `cp`; returns what the
    /// follower quarantined. `log` reports each quarantined document (once per document).
    async fn apply_ops(
        &self,
        ops: &[Op],
        cp: &Checkpoint,
        events: u64,
        log: bool,
    ) -> Result<Vec<crate::follower::Quarantined>, PairError> {
        let expect = self.rev();
        let applied = match self
            .follower
            .apply(&Write {
                ns: &self.ns,
                ops,
                next: Next::At(cp),
                term: self.authority.term(),
                expect: &expect,
                clear_quarantine: self.stats.quarantined() > 0,
                // Only the copy's start marker: no ops, nothing copied yet.
                reset_quarantine: ops.is_empty() && cp.copy_after == Some(Bson::Null),
            })
            .await
        {
            Ok(applied) => applied,
            Err(e) => {
                self.stats.batch_failed(events);
                return Err(e.into());
            }
        };
        self.set_rev(applied.rev);
        if log {
            for q in applied.quarantined.iter().filter(|q| q.new) {
                tracing::warn!(
                    follower = %self.name(), collection = %self.label, id = %q.id,
                    key = %q.key.clone().unwrap_or(Bson::Null), code = q.code, error = %q.error,
                    "the follower refused this document for good; it is quarantined (state_database.quarantine) and the pipeline goes on; fix it, then run `check --repair`"
                );
            }
        }
        if !applied.quarantined.is_empty() || applied.cleared > 0 {
            let added = applied.quarantined.iter().filter(|q| q.new).count() as u64;
            self.stats.quarantine_changed(added, applied.cleared);
        }
        Ok(applied.quarantined)
    }

    /// A document refused for a duplicate on another unique index of the follower is often
    /// blocked by a *stale* follower document: one whose newer source version no longer holds
    /// that value, but whose change comes later in the stream (two documents swapping a
    /// unique value). Such blockers are removed and rewritten from their current source
    /// versions, together with the refused document, in one batch. A blocker whose source
    /// version holds the same value is a true duplicate on the source: the refused document
    /// then stays quarantined.
    async fn resolve_stale_blockers(
        &self,
        quarantined: &[crate::follower::Quarantined],
        cp: &Checkpoint,
    ) -> Result<(), PairError> {
        let conflicts: Vec<&Bson> = quarantined
            .iter()
            .filter(|q| q.code == 11000)
            .map(|q| &q.id)
            .collect();
        if conflicts.is_empty() {
            return Ok(());
        }
        let fcoll: Collection<Document> = self.follower.target(&self.ns);
        let models: Vec<mongodb::IndexModel> = self
            .fol(async { fcoll.list_indexes().await?.try_collect().await })
            .await?;
        let unique: Vec<Vec<String>> = models
            .iter()
            .filter(|m| m.options.as_ref().and_then(|o| o.unique).unwrap_or(false))
            .map(|m| m.keys.keys().cloned().collect())
            .filter(|k: &Vec<String>| k != &["_id".to_string()])
            .collect();
        if unique.is_empty() {
            return Ok(());
        }
        let r = &self.config.replication;
        let mut deletes = Vec::new();
        let mut upserts = Vec::new();
        'doc: for id in conflicts {
            let by_id = crate::change::eq("_id", id);
            let Some(x) = self.src(self.coll().find_one(by_id).into_future()).await? else {
                continue;
            };
            let mut blockers = Vec::new();
            for fields in &unique {
                let mut filter = Document::new();
                for f in fields {
                    filter.insert(
                        f.as_str(),
                        doc! {"$eq": x.get(f.as_str()).cloned().unwrap_or(Bson::Null)},
                    );
                }
                filter.insert("_id", doc! {"$ne": id.clone()});
                for b in self
                    .fol(async {
                        fcoll
                            .find(filter.clone())
                            .await?
                            .try_collect::<Vec<Document>>()
                            .await
                    })
                    .await?
                {
                    let Some(bid) = b.get("_id").cloned() else {
                        continue;
                    };
                    let current = self
                        .src(
                            self.coll()
                                .find_one(crate::change::eq("_id", &bid))
                                .into_future(),
                        )
                        .await?;
                    if let Some(c) = &current {
                        if fields
                            .iter()
                            .all(|f| c.get(f.as_str()) == x.get(f.as_str()))
                        {
                            // A true duplicate on the source: nothing stale to clear.
                            continue 'doc;
                        }
                    }
                    blockers.push((bid, current));
                }
            }
            if blockers.is_empty() {
                continue;
            }
            tracing::info!(follower = %self.name(), collection = %self.label, id = %id, blockers = blockers.len(), "rewriting stale follower documents that block a unique value, from their current source versions");
            if let Ok(Ok(op)) = upsert_for(x, self.follower.key_field(&self.ns), r.missing_key) {
                upserts.push(op);
            }
            for (bid, current) in blockers {
                deletes.push(Op::Delete { id: bid.clone() });
                if let Some(Ok(Ok(op))) =
                    current.map(|c| upsert_for(c, self.follower.key_field(&self.ns), r.missing_key))
                {
                    upserts.push(op);
                }
            }
        }
        if deletes.is_empty() {
            return Ok(());
        }
        // Deletes run before upserts in one batch (see `Plan`), so a blocker is removed
        // before its value is taken, and written back afterwards.
        deletes.extend(upserts);
        self.apply_ops(&deletes, cp, 0, false).await?;
        Ok(())
    }

    /// Caches `cp` in the token file, tagged with the follower revision it extends.
    fn record(&self, mut cp: Checkpoint, caught_up: bool) {
        cp.write_id = self.rev().hex();
        let ct = cp.cluster_time.map(|t| t.time as i64 * 1000);
        if self.store.advance(&self.label, self.name(), cp) {
            self.stats.checkpoint_moved(ct, caught_up);
        }
    }

    fn push_upsert(&self, doc: Document, ops: &mut Vec<Op>) -> Result<(), PairError> {
        let r = &self.config.replication;
        let key_field = self.follower.key_field(&self.ns);
        match upsert_for(doc, key_field, r.missing_key) {
            Ok(Ok(op)) => ops.push(op),
            // A skipped document is absent from the follower: an earlier version of it that
            // had a usable key is removed (by `_id`), instead of lingering under its old key.
            Ok(Err(Skip::MissingKey { id })) => {
                tracing::warn!(follower = %self.name(), collection = %self.label, id = %id, key_field = %key_field, "skipped a document without the key field (missing_key = \"skip\")");
                self.stats.skipped("missing_key");
                ops.push(Op::Delete { id });
            }
            Ok(Err(Skip::UnusableKey { id, reason })) => {
                tracing::warn!(follower = %self.name(), collection = %self.label, id = %id, key_field = %key_field, reason, "skipped a document whose key cannot identify one follower document (missing_key = \"skip\")");
                self.stats.skipped("unusable_key");
                ops.push(Op::Delete { id });
            }
            Ok(Err(Skip::Gone { .. })) => self.stats.skipped("gone"),
            Err(e) => return Err(PairError::Fatal(e.to_string())),
        }
        Ok(())
    }

    /// Streams changes from `start` until stopped or interrupted.
    async fn stream(
        &self,
        start: Checkpoint,
        stop: &CancellationToken,
        backoff: &mut Duration,
        degraded: bool,
    ) -> Result<(), PairError> {
        let token: ResumeToken = mongodb::bson::from_document(start.token.clone())
            .map_err(|e| PairError::Fatal(format!("checkpoint token unreadable: {e}")))?;
        // Only what the replicator uses: never the update description, which can make an
        // update's event twice the document's size.
        let mut project = doc! {"updateDescription": 0};
        if degraded {
            project.insert("fullDocument", 0);
        }
        // A database stream filtered to this collection: its tokens and the shared reader's
        // resume each other (see [`crate::reader`]).
        let db = self.source.database(&self.ns.db);
        let watch = db
            .watch()
            .pipeline([collection_filter(&self.ns.coll), doc! {"$project": project}])
            .show_expanded_events(self.config.replication.indexes)
            .start_after(token)
            .batch_size(
                self.stream_batch
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .max(1),
            )
            .max_await_time(MAX_AWAIT);
        let watch = if degraded {
            watch
        } else {
            watch.full_document(FullDocumentType::UpdateLookup)
        };
        let stream = self
            .src(watch.into_future())
            .await?
            .with_type::<ChangeStreamEvent<RawDocumentBuf>>();
        self.stats.set_state(PairState::CatchingUp, None);
        let (tx, mut rx) = mpsc::channel::<Item>(self.config.replication.batch_max_docs * 2);
        // Read-ahead is bounded in bytes too: the reader takes permits (KiB) for each event
        // before it queues it, and they return when the event is taken into a batch.
        let max_bytes = self.config.replication.batch_max_bytes.as_u64() as usize;
        let budget_kib = (max_bytes / 1024).max(1) as u32;
        let budget = Arc::new(tokio::sync::Semaphore::new(budget_kib as usize));
        // A degraded read (documents re-read by `_id`) stays on its own stream.
        let hub = self.hub.clone().filter(|_| !degraded);
        let reader = tokio::spawn(read_stream(
            stream,
            tx,
            budget,
            budget_kib,
            hub,
            self.ns.coll.clone(),
            self.stats.clone(),
        ));
        let _abort = AbortOnDrop(reader);

        let max_docs = self.config.replication.batch_max_docs;
        let max_wait = self.config.replication.batch_max_wait;
        let silence = self
            .config
            .replication
            .write_timeout
            .max(MAX_AWAIT * 4 + Duration::from_secs(1));
        let mut batch = Batch::new(start);
        let mut last_follower_cp = Instant::now();
        loop {
            if self.stats.take_resync_request() {
                self.flush(&mut batch, false).await?;
                return Err(PairError::Resync("resync requested".into()));
            }
            if self.stats.is_paused() {
                // Apply and acknowledge what was read, then hold.
                self.flush(&mut batch, false).await?;
                return Err(PairError::Paused);
            }
            let item = if batch.events == 0 {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(()),
                    item = rx.recv() => item,
                    // The stream yields at least an idle token every MAX_AWAIT: silence this
                    // long means the source (or the way to it) hangs.
                    _ = tokio::time::sleep(silence) => {
                        return Err(PairError::Transient(format!(
                            "the source's change stream gave nothing for {}; reopening it",
                            humantime::format_duration(silence)
                        )));
                    }
                }
            } else {
                let deadline = batch.opened + max_wait;
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        // Finish and acknowledge the batch in flight, then stop.
                        return self.flush(&mut batch, false).await;
                    }
                    item = rx.recv() => item,
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        self.flush(&mut batch, false).await?;
                        *backoff = BACKOFF_START;
                        continue;
                    }
                }
            };
            self.stats.set_pending(rx.len() as u64 + batch.events);
            let Some(item) = item else {
                self.flush(&mut batch, false).await?;
                return Err(PairError::Transient("change stream ended".into()));
            };
            match item {
                Item::Event(ev, permit, bytes) => {
                    drop(permit);
                    batch.bytes += bytes;
                    let invalidate = ev.operation_type == OperationType::Invalidate;
                    if let Err(e) = self.add_event(&mut batch, ev, degraded).await {
                        // Apply what came before the event, then stop or resync.
                        self.flush(&mut batch, false).await?;
                        return Err(e);
                    }
                    if invalidate {
                        self.flush(&mut batch, false).await?;
                        return Err(PairError::Transient(
                            "change stream invalidated (collection dropped or renamed on the source); reopening after it".into(),
                        ));
                    }
                    if batch.events >= max_docs as u64 || batch.bytes >= max_bytes {
                        self.flush(&mut batch, false).await?;
                        *backoff = BACKOFF_START;
                        if degraded {
                            return Err(PairError::Reopen);
                        }
                    }
                }
                Item::Idle(token) => {
                    batch.token = token_doc(&token)?;
                    batch.cluster_time = token_cluster_time(&batch.token).or(batch.cluster_time);
                    if batch.events > 0 {
                        self.flush(&mut batch, true).await?;
                    } else if last_follower_cp.elapsed() >= IDLE_FOLLOWER_CHECKPOINT {
                        self.flush(&mut batch, true).await?;
                        last_follower_cp = Instant::now();
                        if self.stats.quarantined() > 0 {
                            // `check --repair` may have emptied it meanwhile.
                            self.stats
                                .set_quarantined(self.follower.quarantine_count(&self.ns).await?);
                        }
                    } else {
                        // Idle: the token file keeps every post-batch token, so a quiet
                        // collection's checkpoint never falls behind the oplog.
                        self.record(batch.checkpoint(), true);
                    }
                    *backoff = BACKOFF_START;
                    if self.stats.state().0 != PairState::Streaming {
                        self.stats.set_state(PairState::Streaming, None);
                        tracing::info!(follower = %self.name(), collection = %self.label, "caught up; streaming");
                    }
                }
                Item::Error(e) => {
                    self.flush(&mut batch, false).await?;
                    return Err(source_err(e));
                }
                Item::Detached(reason) => {
                    self.flush(&mut batch, false).await?;
                    tracing::debug!(follower = %self.name(), collection = %self.label, reason = %reason, "reading this collection's own stream again");
                    return Err(PairError::Reopen);
                }
            }
        }
    }

    /// Adds one event to the batch. On error the batch is left as it was before the event,
    /// so flushing it never checkpoints past the event that failed.
    async fn add_event(
        &self,
        batch: &mut Batch,
        ev: Arc<ChangeStreamEvent<RawDocumentBuf>>,
        degraded: bool,
    ) -> Result<(), PairError> {
        let token = token_doc(&ev.id)?;
        let cluster_time = ev
            .cluster_time
            .or_else(|| token_cluster_time(&token))
            .or(batch.cluster_time);
        match ev.operation_type {
            OperationType::Insert | OperationType::Update | OperationType::Replace => {
                let full = match ev.full_document.as_ref() {
                    Some(raw) => Some(decode(raw)?),
                    // Read without documents: the current version, by `_id` (what an
                    // update lookup returns too).
                    None if degraded => match ev.document_key.as_ref().and_then(|k| k.get("_id")) {
                        Some(id) => {
                            let doc = self
                                .src(
                                    self.coll()
                                        .find_one(crate::change::eq("_id", id))
                                        .into_future(),
                                )
                                .await?;
                            if let Some(d) = &doc {
                                batch.bytes +=
                                    mongodb::bson::to_vec(d).map(|v| v.len()).unwrap_or(0);
                            }
                            doc
                        }
                        None => None,
                    },
                    None => None,
                };
                match full {
                    Some(doc) => {
                        let id = doc.get("_id").cloned();
                        match (self.push_upsert(doc, &mut batch.ops), id) {
                            (Err(PairError::Fatal(msg)), Some(id)) => {
                                // An insert event carries the document as it was inserted;
                                // it may have been fixed on the source since. Go on with the
                                // source's current version if that one is usable.
                                match self
                                    .src(
                                        self.coll()
                                            .find_one(crate::change::eq("_id", &id))
                                            .into_future(),
                                    )
                                    .await?
                                {
                                    Some(current) => self
                                        .push_upsert(current, &mut batch.ops)
                                        .map_err(|_| PairError::Fatal(msg))?,
                                    // Deleted since: its delete follows in the stream.
                                    None => self.stats.skipped("gone"),
                                }
                            }
                            (res, _) => res?,
                        }
                    }
                    None => self.stats.skipped("gone"),
                }
            }
            OperationType::Delete if !self.follower.applies_deletes() => {
                // An archive follower keeps what the source deletes.
                self.stats.skipped("archived");
            }
            OperationType::Delete => match ev.document_key.as_ref().and_then(|k| k.get("_id")) {
                Some(id) => batch.ops.push(Op::Delete { id: id.clone() }),
                None => {
                    tracing::warn!(follower = %self.name(), collection = %self.label, "delete event without documentKey._id; skipped");
                    self.stats.skipped("no_document_key");
                }
            },
            OperationType::Drop | OperationType::Rename | OperationType::DropDatabase => {
                // The collection was dropped, renamed away, or replaced by a rename into its
                // name ($out, mapReduce): the follower must end up holding what the source
                // holds now, which is what a copy does. The batch before this event is
                // flushed first; the event itself is not checkpointed, so a crash before
                // the resync mark is written sees it again.
                let what = match ev.operation_type {
                    OperationType::Drop => "dropped",
                    OperationType::DropDatabase => "dropped with its database",
                    _ => match ev.to.as_ref() {
                        Some(to)
                            if to.db == self.ns.db
                                && to.coll.as_deref() == Some(self.ns.coll.as_str()) =>
                        {
                            "replaced by a rename into its name"
                        }
                        _ => "renamed away",
                    },
                };
                tracing::warn!(follower = %self.name(), collection = %self.label, op = ?ev.operation_type, "the source collection was {what}; copying it again so the follower holds what the source holds");
                return Err(PairError::Resync(format!("source collection {what}")));
            }
            OperationType::Other(ref op)
                if is_collection_ddl(op) && self.config.replication.indexes =>
            {
                // What came before is applied, then the source's indexes and options are
                // brought over, before the checkpoint can pass this event.
                self.flush(batch, false).await?;
                self.sync_meta(false).await?;
            }
            _ => {}
        }
        if batch.events == 0 {
            batch.opened = Instant::now();
        }
        batch.events += 1;
        batch.token = token;
        batch.cluster_time = cluster_time;
        Ok(())
    }

    /// Applies the batch (coalesced) and moves the checkpoint.
    async fn flush(&self, batch: &mut Batch, caught_up: bool) -> Result<(), PairError> {
        let ops = std::mem::take(&mut batch.ops);
        let events = std::mem::take(&mut batch.events);
        batch.bytes = 0;
        let cp = batch.checkpoint();
        self.commit(ops, cp, events, caught_up).await?;
        if caught_up {
            self.stats.set_pending(0);
        }
        Ok(())
    }
}

/// Events read but not yet acknowledged, and the position they reach.
struct Batch {
    ops: Vec<Op>,
    events: u64,
    /// Bytes of the documents in `ops`.
    bytes: usize,
    opened: Instant,
    token: Document,
    cluster_time: Option<Timestamp>,
}

impl Batch {
    fn new(start: Checkpoint) -> Batch {
        Batch {
            ops: Vec::new(),
            events: 0,
            bytes: 0,
            opened: Instant::now(),
            token: start.token,
            cluster_time: start.cluster_time,
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new(self.token.clone(), self.cluster_time)
    }
}

enum Item {
    /// An event, with the read-ahead budget it holds until it is taken into a batch, and
    /// its size (see [`event_bytes`]).
    Event(
        Arc<ChangeStreamEvent<RawDocumentBuf>>,
        tokio::sync::OwnedSemaphorePermit,
        usize,
    ),
    /// An empty batch: the stream's post-batch token, past everything read so far.
    Idle(ResumeToken),
    Error(mongodb::error::Error),
    /// The shared reader let this pipeline go (see [`crate::reader`]): everything before
    /// was delivered; reopen the pipeline's own stream from its checkpoint.
    Detached(String),
}

/// Reads the pipeline's own stream into `tx`; once it has caught up, hands over to the
/// shared reader `hub` (see [`crate::reader`] for why the handover has no gap). Ends when the
/// receiver goes away, the stream fails, or the shared reader detaches this pipeline (then
/// the pipeline reopens its own stream from its checkpoint).
async fn read_stream(
    mut stream: mongodb::change_stream::ChangeStream<ChangeStreamEvent<RawDocumentBuf>>,
    tx: mpsc::Sender<Item>,
    budget: Arc<tokio::sync::Semaphore>,
    budget_kib: u32,
    hub: Option<Arc<Hub>>,
    coll: String,
    stats: Arc<PairStats>,
) {
    let permit = |size: usize| {
        // One event larger than the whole budget takes all of it.
        let kib = ((size / 1024) as u32).clamp(1, budget_kib);
        budget.clone().acquire_many_owned(kib)
    };
    let mut last: Option<Timestamp> = None;
    let mut sub: Option<crate::reader::Subscription> = None;
    loop {
        let (item, caught_up) = match stream.next_if_any().await {
            Ok(Some(ev)) => {
                let size = event_bytes(&ev);
                let Ok(p) = permit(size).await else {
                    return;
                };
                last = event_time(&ev).or(last);
                (Item::Event(Arc::new(ev), p, size), false)
            }
            Ok(None) => match stream.resume_token() {
                Some(t) => {
                    last = token_time(&t).or(last);
                    (Item::Idle(t), true)
                }
                None => continue,
            },
            Err(e) => {
                let _ = tx.send(Item::Error(e)).await;
                return;
            }
        };
        if tx.send(item).await.is_err() {
            return;
        }
        if !stream.is_alive() {
            return;
        }
        if caught_up && sub.is_none() {
            sub = hub.as_ref().and_then(|h| h.subscribe(&coll));
        }
        // Everything up to `last` came from our own stream, and the subscription holds
        // everything after `from`: once `last` is past `from`, nothing falls between.
        if let (Some(s), Some(l)) = (&sub, last) {
            if ts_key(l) > ts_key(s.from) {
                break;
            }
        }
    }
    drop(stream);
    let (Some(mut sub), Some(last)) = (sub, last) else {
        return;
    };
    stats.set_shared(true);
    let _own_again = OnDrop(|| stats.set_shared(false));
    loop {
        let item = match sub.rx.recv().await {
            Some(HubItem::Event(ev, size)) => {
                sub.taken(size);
                // Before our own stream's last cluster time: already delivered.
                if event_time(&ev).is_some_and(|t| ts_key(t) < ts_key(last)) {
                    continue;
                }
                let Ok(p) = permit(size).await else {
                    return;
                };
                Item::Event(ev, p, size)
            }
            Some(HubItem::Idle(t)) => {
                sub.taken(0);
                if token_time(&t).is_some_and(|c| ts_key(c) < ts_key(last)) {
                    continue;
                }
                Item::Idle(t)
            }
            Some(HubItem::Detached(reason)) => Item::Detached(reason),
            None => Item::Detached("the shared reader stopped".into()),
        };
        let detached = matches!(item, Item::Detached(_));
        if tx.send(item).await.is_err() || detached {
            return;
        }
    }
}

/// Runs a closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn token_doc(token: &ResumeToken) -> Result<Document, PairError> {
    match mongodb::bson::to_bson(token) {
        Ok(Bson::Document(d)) => Ok(d),
        _ => Err(PairError::Transient(
            "resume token is not a document".into(),
        )),
    }
}

/// Change events that alter a collection's indexes or options (expanded events).
fn is_collection_ddl(op: &str) -> bool {
    matches!(op, "create" | "createIndexes" | "dropIndexes" | "modify")
}

/// Sleeps unless stopped first; returns false when stopped.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
