//! The applier of one (collection, follower) pair: where it resumes, its copy, its stream,
//! and the batches it applies to its follower with their checkpoint.
//!
//! Data flows `reader` -> `fanout` -> here -> `follower` + `checkpoint`:
//! - [`handover`]: the pair's own stream from its checkpoint, handed over to the shared
//!   reader of its database once caught up (and back when it falls behind);
//! - [`stream`]: the batcher: events grouped by `batch_max_docs`, `batch_max_bytes` and
//!   `batch_max_wait`, each batch applied in one transaction and only then checkpointed;
//! - [`copy`]: the initial sync (documents, then indexes and options) and its resumption;
//! - [`commit`]: applying a batch (coalesced), quarantine and stale-blocker repair, and
//!   recording the checkpoint;
//! - this file: the pair's life (errors, retries, resync, pause) and its resume point.
//!
//! Any failure drops the stream and reopens it from the last acknowledged checkpoint after a
//! capped exponential backoff: at-least-once delivery made exact by idempotent writes.

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
use crate::change::{collection_filter, event_bytes, event_time, token_time};
use crate::checkpoint::{token_cluster_time, ts_key, Checkpoint, CheckpointStore};
use crate::config::{Config, InitialSync, OnHistoryLost};
use crate::fanout::{HubItem, Subscription};
use crate::follower::{ApplyError, Follower, Next, Rev, Stored, Write};
use crate::lease::Authority;
use crate::namespace::Ns;
use crate::order::after_filter;
use crate::reader::Hub;
use crate::source::{describe, is_history_lost};
use crate::status::{PairState, PairStats};

mod commit;
mod copy;
mod handover;
mod stream;

use handover::read_stream;
use stream::Item;

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
    /// The follower collection has the source's options and indexes (see
    /// `copy::sync_meta`); until then, the first write brings them over first.
    pub meta_ready: std::sync::atomic::AtomicBool,
    /// The collation of statements by `_id` ([`crate::change::identity`]): the one the source
    /// and follower collections share, or binary. Settled when the pipeline starts; when the
    /// source collection did not exist then, by the first write. (A source collection cannot
    /// change its collation without a drop, and a drop starts the pipeline again.)
    pub id_collation: std::sync::Mutex<Option<Document>>,
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
                id_collation: &crate::change::binary(),
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
        // One read of the source collection's metadata serves the checks below.
        let src = self.source_meta().await?;
        if src.exists && copy::is_capped(&src.options) {
            return Err(PairError::Fatal(copy::CAPPED.into()));
        }
        if self.config.replication.indexes {
            // The follower collection is created with the source's options before anything
            // else can create it bare (the key index would).
            self.meta_ready
                .store(false, std::sync::atomic::Ordering::Relaxed);
            self.sync_meta_to(&src).await?;
        } else {
            self.follower.ensure_key_index(&self.ns).await?;
        }
        let fol = self.settle_identity(&src).await?;
        if let (false, Some(fol)) = (self.config.replication.indexes, &fol) {
            self.warn_of_a_looser_collation(&src, fol);
        }
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

/// Sleeps unless stopped first; returns false when stopped.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
