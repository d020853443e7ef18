//! One follower deployment: applying batches, its stored checkpoints, and the fences.
//!
//! Each batch goes to the follower as one `delete` command and one `update` command (many
//! statements each), inside one transaction that also
//! - raises the pipeline's **fence** to the writer's lease term, failing if the follower has
//!   already seen a higher term for that pipeline (a newer leader exists): the transaction
//!   aborts and nothing of the batch is applied, so a stale leader writes nothing. Each
//!   (database, collection) pipeline has its own fence document, so busy collections never
//!   conflict with each other; a new leader raises each pipeline's fence before it reads
//!   that pipeline's checkpoint;
//! - replaces the pipeline's **checkpoint** in `state_database`, compared-and-swapped on its
//!   revision (`write_id`): the write succeeds only if the follower still holds the revision
//!   this writer last read or wrote. The follower's checkpoint is therefore the authority on
//!   what it holds: a follower wiped, restored from a snapshot or rolled back by a crash fails
//!   the swap, and the pipeline resumes from the follower's own checkpoint.
//!
//! Every write to a follower, the copy's removal of extra documents and a resync's reset of
//! the checkpoint included, goes through [`Follower::apply`]. A follower that cannot run
//! transactions (a standalone server) is refused unless `allow_unfenced_writes` accepts that
//! its fence, data and checkpoint become three separate writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};

use futures::TryStreamExt;

use mongodb::bson::oid::ObjectId;
use mongodb::bson::{doc, rawdoc, Bson, Document, RawArrayBuf, RawDocumentBuf};
use mongodb::{Client, ClientSession};

use crate::change::{eq, Op, Plan};
use crate::checkpoint::{now_ms, Checkpoint};
use crate::config::{FollowerConfig, OnRejected, ReplicationConfig};
use crate::namespace::Ns;

pub const FENCE_COLLECTION: &str = "fence";
pub const CHECKPOINT_COLLECTION: &str = "checkpoints";
/// Documents a follower refused for good, one record per (pipeline, source `_id`).
pub const QUARANTINE_COLLECTION: &str = "quarantine";
const WRITER_SESSIONS_COLLECTION: &str = "writer_sessions";
/// Statements are split into commands of at most this many bytes, below the 16 MiB limit.
const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;
/// Most times one batch is split because a transaction outlived `write_timeout`.
const MAX_SLOW_SPLITS: u32 = 4;
/// Most ops moved to the end of a batch after a duplicate key (a swap involves few).
const MAX_DEFERRED: usize = 8;
/// Ops per transaction after a refusal, doubling with each part that applies.
const REFUSAL_PART: usize = 8;
/// How often a transaction that failed with a TransientTransactionError (a write conflict,
/// a primary change) is retried in place before the error reaches the pipeline.
const TRANSIENT_TXN_RETRIES: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The follower has seen a higher lease term: this node is no longer the leader.
    #[error("fenced: follower has seen lease term {their_term}, ours is {our_term}")]
    Fenced { our_term: i64, their_term: i64 },
    /// The follower's checkpoint is not the revision this writer expected: it was wiped,
    /// restored, rolled back, reset for a resync, or moved by another writer.
    #[error("the follower's checkpoint for `{0}` is not the one this writer last saw (wiped, restored from a snapshot, rolled back by a crash, reset for a resync, or moved by another writer); resuming from the follower's own checkpoint")]
    Moved(String),
    /// The follower cannot run transactions and unfenced writes were not accepted.
    #[error("follower `{0}` cannot run transactions (it is not a replica set), so its writes could not be fenced or committed with their checkpoint; make it a replica set (one node is enough), or set followers[].allow_unfenced_writes = true to accept that risk")]
    Unfenced(String),
    /// A document the follower refuses for good, under `on_rejected = "stop"`.
    #[error("{0}")]
    Refused(String),
    /// A write the follower refused (not a connection problem).
    #[error("follower rejected a write: {0}")]
    Rejected(String),
    /// A transaction failed with a TransientTransactionError; it is retried in place.
    #[error("transient transaction error: {0}")]
    TransientTxn(String),
    /// The follower could not be reached or the operation failed in transit.
    #[error("{0}")]
    Unavailable(String),
}

impl From<mongodb::error::Error> for ApplyError {
    fn from(e: mongodb::error::Error) -> Self {
        // Retried in place: a transaction the server aborted (a write conflict, say). A
        // network or server-selection failure carries the same label from the driver, but is
        // an outage, handled with a backoff and shown as `down`.
        if e.contains_label(mongodb::error::TRANSIENT_TRANSACTION_ERROR)
            && matches!(*e.kind, mongodb::error::ErrorKind::Command(_))
        {
            ApplyError::TransientTxn(crate::source::describe(&e))
        } else {
            ApplyError::Unavailable(crate::source::describe(&e))
        }
    }
}

/// A write error that the careful plan resolves: a duplicate key (11000) or an attempt to
/// change `_id` (66).
fn is_conflict(code: i32) -> bool {
    code == 11000 || code == 66
}

/// One batch for [`Follower::apply`].
pub struct Write<'a> {
    pub ns: &'a Ns,
    pub ops: &'a [Op],
    /// The checkpoint the batch leaves.
    pub next: Next<'a>,
    pub term: i64,
    /// The checkpoint revision the follower must still hold.
    pub expect: &'a Rev,
    /// The pipeline has quarantined documents: remove the records of those this batch
    /// writes or deletes.
    pub clear_quarantine: bool,
    /// A copy starts: remove every quarantine record of the pipeline (the copy writes each
    /// document again, and refuses what is still refused).
    pub reset_quarantine: bool,
    /// The collation of statements by `_id` ([`crate::change::identity`]).
    pub id_collation: &'a Document,
}

/// What [`Follower::apply`] did.
#[derive(Debug)]
pub struct Applied {
    /// The follower's new checkpoint revision.
    pub rev: Rev,
    /// Documents the follower refused for good, now in its quarantine.
    pub quarantined: Vec<Quarantined>,
    /// Quarantine records removed because this batch wrote or deleted their documents.
    pub cleared: u64,
}

/// What a batch did to the quarantine.
#[derive(Debug, Default)]
struct QuarantineWrite {
    /// Records removed because the batch wrote or deleted their documents.
    cleared: u64,
    /// For each quarantined document of the batch: whether its record is new.
    inserted: Vec<bool>,
}

/// A document the follower refused for good.
#[derive(Debug, Clone)]
pub struct Quarantined {
    pub id: Bson,
    pub key: Option<Bson>,
    pub code: i32,
    pub error: String,
    /// Not in the quarantine before this batch (a document refused again only has its
    /// record updated).
    pub new: bool,
}

/// The revision of a pipeline's checkpoint on a follower.
#[derive(Debug, Clone, PartialEq)]
pub enum Rev {
    /// No checkpoint document.
    Absent,
    /// A checkpoint document written before revisions existed.
    Legacy,
    Id(ObjectId),
}

impl Rev {
    pub fn hex(&self) -> Option<String> {
        match self {
            Rev::Id(id) => Some(id.to_hex()),
            _ => None,
        }
    }
}

/// What a follower holds for one pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// Nothing: this follower was never replicated (or its state was wiped).
    Absent,
    /// A resync was requested: the follower is copied again, whatever `initial_sync` says.
    Resync { rev: Rev },
    /// A resume position (possibly of a copy still in progress).
    At { cp: Box<Checkpoint>, rev: Rev },
}

impl Stored {
    pub fn rev(&self) -> Rev {
        match self {
            Stored::Absent => Rev::Absent,
            Stored::Resync { rev } | Stored::At { rev, .. } => rev.clone(),
        }
    }
}

/// The checkpoint a write leaves on the follower.
#[derive(Debug, Clone, Copy)]
pub enum Next<'a> {
    At(&'a Checkpoint),
    /// Marks the pipeline for a copy (a requested resync, history lost, a dropped or renamed
    /// source collection).
    Resync,
}

pub struct Follower {
    pub name: String,
    client: Client,
    /// The follower database each source database is written into (`None`: the same).
    target: Option<String>,
    apply_deletes: bool,
    state_db: String,
    replication: ReplicationConfig,
    node_id: String,
    allow_unfenced: bool,
    on_rejected: OnRejected,
    /// The time limit of every call to this follower (`replication.write_timeout`).
    timeout: std::time::Duration,
    /// 0 unknown, 1 transactions, 2 no transactions.
    txn_support: AtomicU8,
    /// The state collections exist (see [`Follower::ensure_state_collections`]).
    state_ready: std::sync::atomic::AtomicBool,
    /// Distinguishes this process from earlier ones (and other nodes) in `writer_sessions`.
    incarnation: String,
    /// One session per collection, reused for every batch; its id is registered on the
    /// follower so that a later leader can abort a transaction this process left open.
    sessions: tokio::sync::Mutex<HashMap<String, ClientSession>>,
    /// Per follower database, whether the user may bypass document validation (see
    /// [`Follower::bypasses_validation`]).
    bypass: std::sync::Mutex<HashMap<String, bool>>,
    /// Per pipeline, the session of the transaction in flight (to end it on the server when
    /// the batch outlives `write_timeout`).
    inflight: std::sync::Mutex<HashMap<String, Document>>,
    /// Most ops per transaction after batches outlived `write_timeout`: halved on each, and
    /// doubled back by each batch that commits.
    slow_cap: std::sync::atomic::AtomicUsize,
}

impl Follower {
    /// Creates the client; it connects lazily, so an unreachable follower is not an error yet.
    pub async fn new(
        cfg: &FollowerConfig,
        replication: &ReplicationConfig,
        node_id: &str,
    ) -> anyhow::Result<Follower> {
        let state_db = &replication.state_database;
        let client = crate::source::client(&cfg.uri, &format!("follower {}", cfg.name)).await?;
        Ok(Follower {
            name: cfg.name.clone(),
            client,
            target: cfg.database.clone(),
            apply_deletes: cfg.apply_deletes,
            state_db: state_db.to_string(),
            replication: replication.clone(),
            node_id: node_id.to_string(),
            allow_unfenced: cfg.allow_unfenced_writes,
            timeout: replication.write_timeout,
            on_rejected: replication.on_rejected,
            txn_support: AtomicU8::new(0),
            state_ready: std::sync::atomic::AtomicBool::new(false),
            incarnation: ObjectId::new().to_hex(),
            sessions: tokio::sync::Mutex::new(HashMap::new()),
            bypass: std::sync::Mutex::new(HashMap::new()),
            inflight: std::sync::Mutex::new(HashMap::new()),
            slow_cap: std::sync::atomic::AtomicUsize::new(usize::MAX),
        })
    }

    /// Runs `fut` within the follower's time limit; past it, the follower counts as
    /// unavailable (the pipeline shows `down` and retries).
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, ApplyError>>,
    ) -> Result<T, ApplyError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(res) => res,
            Err(_) => Err(ApplyError::Unavailable(format!(
                "follower `{}` did not answer within {} ({what}; replication.write_timeout)",
                self.name,
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn supports_transactions(&self) -> Result<bool, ApplyError> {
        match self.txn_support.load(Ordering::Relaxed) {
            1 => return Ok(true),
            2 => return Ok(false),
            _ => {}
        }
        let hello = self
            .client
            .database("admin")
            .run_command(doc! {"hello": 1})
            .await?;
        let yes = hello.get_str("setName").is_ok() || hello.get_str("msg") == Ok("isdbgrid");
        if !yes && self.allow_unfenced {
            tracing::warn!(
                follower = %self.name,
                "follower is not a replica set and cannot run transactions; allow_unfenced_writes = true: its fence, data and checkpoint are separate writes, so a paused stale leader can overwrite newer data on it"
            );
        }
        self.txn_support
            .store(if yes { 1 } else { 2 }, Ordering::Relaxed);
        Ok(yes)
    }

    /// Makes sure the follower can find documents by key quickly: creates an index on the
    /// key field unless one exists (upserts matched by key would scan the collection
    /// otherwise). Not unique, so existing duplicate data on a follower cannot block it.
    pub async fn ensure_key_index(&self, ns: &Ns) -> Result<(), ApplyError> {
        self.timed("ensure key index", self.ensure_key_index_inner(ns))
            .await
    }

    async fn ensure_key_index_inner(&self, ns: &Ns) -> Result<(), ApplyError> {
        let key_field = self.key_field(ns);
        let name = key_index_name(key_field);
        // Binary, whatever the collection's default collation: the statements that find by
        // key compare binary (`change::binary`), and only an index of the same collation
        // serves them.
        let cmd = doc! {
            "createIndexes": &ns.coll,
            "indexes": [{"key": {key_field: 1}, "name": &name, "collation": crate::change::binary()}],
        };
        let db = self.target_db(ns);
        match self.command(db, cmd.clone(), None).await {
            Ok(_) => Ok(()),
            Err(ApplyError::Unavailable(m))
                if m.contains("already exists")
                    || m.contains("IndexOptionsConflict")
                    || m.contains("IndexKeySpecsConflict") =>
            {
                // Ours, built by an earlier version under the collection's own collation,
                // cannot serve binary lookups: built again. Anything else is an equivalent
                // index under another name, which serves as well.
                if self.own_index_collated(ns, &name).await? {
                    tracing::info!(follower = %self.name, collection = %ns, index = %name, "rebuilding the replicator's key index with a binary collation");
                    self.command(db, doc! {"dropIndexes": &ns.coll, "index": &name}, None)
                        .await?;
                    self.command(db, cmd, None).await?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the follower's index `name` compares under a collation other than binary.
    async fn own_index_collated(&self, ns: &Ns, name: &str) -> Result<bool, ApplyError> {
        let meta = crate::meta::read(&self.client.database(self.target_db(ns)), &ns.coll).await?;
        Ok(meta
            .index(name)
            .is_some_and(|ix| crate::change::collated(ix).is_some()))
    }

    /// Applies one coalesced batch and leaves `w.next` as the pipeline's checkpoint, fenced
    /// by `w.term`, provided the follower still holds checkpoint revision `w.expect`.
    /// Idempotent: replaying a batch leaves the same state. A document the follower refuses
    /// for good ([`is_permanent_rejection`]) is quarantined in the same transaction under
    /// `on_rejected = "quarantine"`, and the rest of the batch applies.
    pub async fn apply(&self, w: &Write<'_>) -> Result<Applied, ApplyError> {
        // Each transaction has the time limit (see `attempt`), not the batch as a whole: a
        // batch with many refused documents takes several, each bounded.
        self.apply_inner(w).await
    }

    /// A document the follower refuses for good: its quarantine record, or under
    /// `on_rejected = "stop"` the error that stops the pair.
    fn refuse(&self, bad: Op, code: i32, msg: String) -> Result<Quarantined, ApplyError> {
        if self.on_rejected == OnRejected::Stop {
            return Err(ApplyError::Refused(format!(
                "follower refused the document with _id {} for good: {msg}; on_rejected = \"stop\" (fix the document or the follower, then resync)",
                bad.id()
            )));
        }
        let key = match &bad {
            Op::Upsert { key, .. } => key.clone(),
            Op::Delete { .. } => None,
        };
        Ok(Quarantined {
            id: bad.id().clone(),
            key,
            code,
            error: msg,
            new: true,
        })
    }

    /// One transaction (or, unfenced, one sequence of writes) within the time limit.
    async fn attempt(
        &self,
        txn: bool,
        w: &Write<'_>,
        part: &[Op],
        quarantined: &[Quarantined],
        careful: bool,
        last: bool,
    ) -> Result<(Rev, QuarantineWrite), TxnErr> {
        let fut = async {
            if txn {
                self.apply_in_txn(w, part, quarantined, careful, last).await
            } else {
                self.apply_plain(w, part, quarantined, careful, last).await
            }
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(res) => {
                self.inflight_lock().remove(&w.ns.to_string());
                res
            }
            Err(_) => {
                // The abandoned transaction may still run on the server, holding the locks
                // of its documents: end it there, so the retry does not wait on it.
                if let Some(lsid) = self.inflight_lock().remove(&w.ns.to_string()) {
                    let admin = self.client.database("admin");
                    tokio::spawn(async move {
                        let kill = admin.run_command(doc! {"killSessions": [lsid]});
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), kill).await;
                    });
                }
                let msg = format!(
                    "follower `{}` did not answer within {} (batch; replication.write_timeout)",
                    self.name,
                    humantime::format_duration(self.timeout)
                );
                Err(if txn {
                    TxnErr::Slow(msg)
                } else {
                    TxnErr::Apply(ApplyError::Unavailable(msg))
                })
            }
        }
    }

    fn inflight_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Document>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn apply_inner(&self, w: &Write<'_>) -> Result<Applied, ApplyError> {
        let txn = self.supports_transactions().await?;
        if !txn && !self.allow_unfenced {
            return Err(ApplyError::Unfenced(self.name.clone()));
        }
        let mut ops: std::borrow::Cow<'_, [Op]> = std::borrow::Cow::Borrowed(w.ops);
        let mut quarantined: Vec<Quarantined> = Vec::new();
        // Ops moved to the end of the batch after a duplicate key on another unique index:
        // the document holding that value may be rewritten later in the same batch (two
        // documents swapping a unique value), and then this one applies.
        let mut deferred: Vec<Bson> = Vec::new();
        let mut careful = false;
        let mut attempt = 0;
        // Most ops per transaction: lowered when the follower finds a transaction too large
        // for its cache. The parts before the last carry no checkpoint (their replay is
        // harmless); the last part moves it.
        let mut limit = self.slow_cap.load(Ordering::Relaxed);
        let mut slow_splits = 0;
        // Quarantine records already written (by an earlier part), and records removed.
        let mut written = 0;
        let mut cleared = 0;
        let mut record_limit = usize::MAX;
        // After a refusal at op i, ops before i are applied as a part of their own first,
        // so each refusal costs one more transaction, not a retry of the whole batch.
        let mut cap: Option<usize> = None;
        loop {
            let len = ops.len().min(limit).min(cap.take().unwrap_or(usize::MAX));
            let last = len == ops.len();
            let part = &ops[..len];
            // Records of refusals not yet written go with the next transaction that
            // commits, whichever part it is; each part clears the records of its own ops.
            let res = self
                .attempt(txn, w, part, &quarantined[written..], careful, last)
                .await;
            match res {
                Ok((rev, q)) => {
                    for (rec, new) in quarantined[written..].iter_mut().zip(q.inserted) {
                        rec.new = new;
                    }
                    written = quarantined.len();
                    cleared += q.cleared;
                    if last {
                        let cap = self.slow_cap.load(Ordering::Relaxed);
                        self.slow_cap
                            .store(cap.saturating_mul(2), Ordering::Relaxed);
                        return Ok(Applied {
                            rev,
                            quarantined,
                            cleared,
                        });
                    }
                    ops.to_mut().drain(..len);
                    // Parts grow back after a refusal or a split.
                    limit = limit.saturating_mul(2);
                }
                // A transaction that outlived write_timeout on a follower that answers
                // otherwise (a large or slow batch): smaller parts, here and for the next
                // batches, instead of the same batch timing out for ever. A few times at
                // most: a follower that hangs is down.
                Err(TxnErr::Slow(msg)) if len > 1 && slow_splits < MAX_SLOW_SPLITS => {
                    slow_splits += 1;
                    limit = len / 2;
                    self.slow_cap.store(limit, Ordering::Relaxed);
                    tracing::info!(follower = %self.name, collection = %w.ns, ops = len, error = %msg, "a batch outlived write_timeout; splitting it");
                }
                Err(TxnErr::TooLarge(msg)) if len > 1 => {
                    tracing::info!(follower = %self.name, collection = %w.ns, ops = len, error = %msg, "transaction too large for the follower; splitting the batch");
                    limit = len / 2;
                }
                Err(TxnErr::TooLarge(_)) if ops.is_empty() && written < quarantined.len() => {
                    // The records alone are too many for one transaction: write them a
                    // few at a time (each without moving the checkpoint), fewer each time
                    // this happens again.
                    record_limit = (record_limit.min(quarantined.len() - written) / 2).max(1);
                    let n = record_limit;
                    let res = self
                        .attempt(
                            txn,
                            w,
                            &[],
                            &quarantined[written..written + n],
                            careful,
                            false,
                        )
                        .await;
                    match res {
                        Ok((_, q)) => {
                            for (rec, new) in
                                quarantined[written..written + n].iter_mut().zip(q.inserted)
                            {
                                rec.new = new;
                            }
                            written += n;
                            cleared += q.cleared;
                        }
                        Err(TxnErr::TooLarge(_)) if n > 1 => {}
                        Err(e) => return Err(e.into_apply()),
                    }
                }
                Err(TxnErr::TooLarge(msg)) => {
                    // One document alone does not fit in a transaction on this follower.
                    if ops.is_empty() {
                        return Err(ApplyError::Rejected(msg));
                    }
                    let bad = ops.to_mut().remove(0);
                    quarantined.push(self.refuse(bad, 388, msg)?);
                }
                Err(TxnErr::Conflict(_)) if !careful => careful = true,
                Err(TxnErr::Rejected { op, code, msg }) => {
                    let Some(bad) = ops.get(op).cloned() else {
                        return Err(ApplyError::Rejected(msg));
                    };
                    if is_conflict(code)
                        && op + 1 < ops.len()
                        && deferred.len() < MAX_DEFERRED
                        && !deferred.contains(bad.id())
                    {
                        deferred.push(bad.id().clone());
                        let moved = ops.to_mut().remove(op);
                        ops.to_mut().push(moved);
                        continue;
                    }
                    quarantined.push(self.refuse(bad, code, msg)?);
                    ops.to_mut().remove(op);
                    if op > 0 {
                        cap = Some(op);
                    }
                    // Where one document is refused, more often are (a batch of duplicates):
                    // small parts keep each further refusal cheap.
                    limit = limit.min(REFUSAL_PART);
                }
                Err(TxnErr::Apply(ApplyError::TransientTxn(msg))) => {
                    attempt += 1;
                    if attempt >= TRANSIENT_TXN_RETRIES {
                        return Err(ApplyError::Unavailable(format!(
                            "transaction failed {attempt} times with a transient error: {msg}"
                        )));
                    }
                    tracing::debug!(follower = %self.name, collection = %w.ns, attempt, error = %msg, "transient transaction error; retrying in place");
                }
                Err(e) => return Err(e.into_apply()),
            }
        }
    }

    /// One attempt in one transaction; `careful` selects the plan (see [`Plan::build`]).
    async fn apply_in_txn(
        &self,
        w: &Write<'_>,
        ops: &[Op],
        quarantined: &[Quarantined],
        careful: bool,
        last: bool,
    ) -> Result<(Rev, QuarantineWrite), TxnErr> {
        let mut session = self.session(w.ns, w.term).await?;
        self.inflight_lock()
            .insert(w.ns.to_string(), session.id().clone());
        let res = self
            .txn_in_session(&mut session, w, ops, quarantined, careful, last)
            .await;
        let reusable = matches!(
            res,
            Ok(_)
                | Err(TxnErr::Apply(ApplyError::TransientTxn(_)))
                | Err(TxnErr::Conflict(_))
                | Err(TxnErr::Rejected { .. })
                | Err(TxnErr::TooLarge(_))
        );
        if reusable {
            // Only a session whose last transaction ended (committed or aborted) is reused.
            self.sessions.lock().await.insert(w.ns.to_string(), session);
        }
        res
    }

    /// The collection's session, or a new one whose id is registered on the follower first.
    async fn session(&self, ns: &Ns, term: i64) -> Result<ClientSession, TxnErr> {
        if let Some(s) = self.sessions.lock().await.remove(&ns.to_string()) {
            return Ok(s);
        }
        let session = self.client.start_session().await.map_err(apply_err)?;
        self.client
            .database(&self.state_db)
            .collection::<Document>(WRITER_SESSIONS_COLLECTION)
            .update_one(
                eq(
                    "_id",
                    &Bson::String(format!(
                        "{}/{}/{}",
                        self.node_id,
                        self.incarnation,
                        self.pipeline_id(ns)
                    )),
                ),
                doc! {
                    "$set": {
                        "lsid": session.id().clone(),
                        "node": &self.node_id,
                        "incarnation": &self.incarnation,
                        "pipeline": self.pipeline_id(ns),
                        "term": term,
                    },
                    "$currentDate": {"at": true},
                },
            )
            .upsert(true)
            .await
            .map_err(apply_err)?;
        Ok(session)
    }

    /// Aborts transactions that earlier writers of this pipeline (a killed or stale process,
    /// on any node, with a lower lease term) left open on this follower: they hold the
    /// pipeline's fence and would make every batch of the new leader fail with a write
    /// conflict until the server expires them. Other pipelines' and other deployments'
    /// sessions are left alone.
    pub async fn abort_stale_writers(&self, ns: &Ns, term: i64) -> Result<usize, ApplyError> {
        self.timed(
            "aborting stale writers",
            self.abort_stale_writers_inner(ns, term),
        )
        .await
    }

    async fn abort_stale_writers_inner(&self, ns: &Ns, term: i64) -> Result<usize, ApplyError> {
        let coll = self
            .client
            .database(&self.state_db)
            .collection::<Document>(WRITER_SESSIONS_COLLECTION);
        let stale: Vec<Document> = coll
            .find(doc! {
                "pipeline": {"$eq": self.pipeline_id(ns)},
                "incarnation": {"$ne": &self.incarnation},
                "term": {"$lt": term},
            })
            .await?
            .try_collect()
            .await?;
        let lsids: Vec<Bson> = stale
            .iter()
            .filter_map(|d| d.get_document("lsid").ok().cloned().map(Bson::Document))
            .collect();
        if lsids.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self
            .client
            .database("admin")
            .run_command(doc! {"killSessions": lsids.clone()})
            .await
        {
            tracing::warn!(follower = %self.name, error = %crate::source::describe(&e), "could not abort transactions left open by earlier writers; they expire on the server's transaction lifetime limit");
        }
        let ids: Vec<Bson> = stale.iter().filter_map(|d| d.get("_id").cloned()).collect();
        coll.delete_many(doc! {"_id": {"$in": ids}}).await?;
        Ok(lsids.len())
    }

    #[allow(clippy::too_many_arguments)]
    async fn txn_in_session(
        &self,
        session: &mut ClientSession,
        w: &Write<'_>,
        ops: &[Op],
        quarantined: &[Quarantined],
        careful: bool,
        last: bool,
    ) -> Result<(Rev, QuarantineWrite), TxnErr> {
        session
            .start_transaction()
            .write_concern(durable(self.timeout))
            .await
            .map_err(apply_err)?;
        // Fence first, then the data and the quarantine, then the checkpoint: all or nothing.
        let body = async {
            self.raise_fence(Some(&mut *session), w.ns, w.term).await?;
            let plan = Plan::build(ops, self.key_field(w.ns), careful, w.id_collation);
            self.run_plan(Some(&mut *session), w.ns, &plan).await?;
            let cleared = self
                .record_quarantine(Some(&mut *session), w, ops, quarantined)
                .await
                .map_err(|e| classify(TxnErr::Apply(e)))?;
            if !last {
                return Ok((w.expect.clone(), cleared));
            }
            let rev = self
                .store_checkpoint(Some(&mut *session), w.ns, w.next, w.term, w.expect)
                .await
                .map_err(|e| classify(TxnErr::Apply(e)))?;
            Ok::<_, TxnErr>((rev, cleared))
        };
        let out = match body.await {
            Ok(out) => out,
            Err(e) => {
                let _ = session.abort_transaction().await;
                return Err(e);
            }
        };
        // The commit is retried once when its outcome is unknown; a commit is idempotent.
        let mut retried = false;
        loop {
            match session.commit_transaction().await {
                Ok(()) => return Ok(out),
                Err(e)
                    if !retried
                        && e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT) =>
                {
                    retried = true;
                }
                Err(e) => {
                    if let Some(fenced) = self.fenced_error(w.ns, w.term).await {
                        return Err(TxnErr::Apply(fenced));
                    }
                    return Err(classify(apply_err(e)));
                }
            }
        }
    }

    /// Fence, data, quarantine and checkpoint as separate writes, for followers without
    /// transactions whose config accepts that (`allow_unfenced_writes`).
    async fn apply_plain(
        &self,
        w: &Write<'_>,
        ops: &[Op],
        quarantined: &[Quarantined],
        careful: bool,
        last: bool,
    ) -> Result<(Rev, QuarantineWrite), TxnErr> {
        self.raise_fence(None, w.ns, w.term).await?;
        let plan = Plan::build(ops, self.key_field(w.ns), careful, w.id_collation);
        self.run_plan(None, w.ns, &plan).await?;
        let cleared = self
            .record_quarantine(None, w, ops, quarantined)
            .await
            .map_err(TxnErr::Apply)?;
        if !last {
            return Ok((w.expect.clone(), cleared));
        }
        let rev = self
            .store_checkpoint(None, w.ns, w.next, w.term, w.expect)
            .await
            .map_err(TxnErr::Apply)?;
        Ok((rev, cleared))
    }

    /// Writes the quarantine records of this batch and, when the pipeline has quarantined
    /// documents, removes the records of documents this batch did write or delete (they
    /// are in line with the source again). Returns how many records were removed.
    async fn record_quarantine(
        &self,
        mut session: Option<&mut ClientSession>,
        w: &Write<'_>,
        ops: &[Op],
        quarantined: &[Quarantined],
    ) -> Result<QuarantineWrite, ApplyError> {
        let ns = self.pipeline_id(w.ns);
        let mut cleared = 0;
        if w.reset_quarantine {
            let cmd = doc! {
                "delete": QUARANTINE_COLLECTION,
                "deletes": [{"q": {"_id.ns": {"$eq": &ns}}, "limit": 0}],
            };
            let res = self
                .command(&self.state_db, cmd, session.as_deref_mut())
                .await?;
            cleared += res.get("n").and_then(bson_i64).unwrap_or(0) as u64;
        } else if w.clear_quarantine && !ops.is_empty() {
            let ids: Vec<Bson> = ops
                .iter()
                .map(|op| Bson::Document(quarantine_id(&ns, op.id())))
                .collect();
            for chunk in ids.chunks(10_000) {
                let cmd = doc! {
                    "delete": QUARANTINE_COLLECTION,
                    "deletes": [{"q": {"_id": {"$in": chunk.to_vec()}}, "limit": 0}],
                };
                let res = self
                    .command(&self.state_db, cmd, session.as_deref_mut())
                    .await?;
                cleared += res.get("n").and_then(bson_i64).unwrap_or(0) as u64;
            }
        }
        if quarantined.is_empty() {
            return Ok(QuarantineWrite {
                cleared,
                inserted: Vec::new(),
            });
        }
        let cluster_time = match w.next {
            Next::At(cp) => cp.cluster_time.map(Bson::Timestamp),
            Next::Resync => None,
        }
        .unwrap_or(Bson::Null);
        let updates: Vec<Document> = quarantined
            .iter()
            .map(|q| {
                let id = quarantine_id(&ns, &q.id);
                doc! {
                    "q": {"_id": {"$eq": id.clone()}},
                    "u": {
                        "_id": id,
                        "collection": &w.ns.coll,
                        "key": bounded_key(q.key.as_ref()),
                        "error": &q.error,
                        "code": q.code,
                        "cluster_time": cluster_time.clone(),
                        "at": mongodb::bson::DateTime::now(),
                        "node": &self.node_id,
                        "term": w.term,
                    },
                    "upsert": true,
                }
            })
            .collect();
        // Statements that inserted a record (the others updated one already there).
        let mut inserted: Vec<usize> = Vec::new();
        for (start, chunk) in raw_chunks(&updates).map_err(TxnErr::into_apply)? {
            let mut cmd = RawDocumentBuf::new();
            cmd.append("update", QUARANTINE_COLLECTION);
            cmd.append("updates", chunk);
            let res = self
                .raw_command(&self.state_db, cmd, session.as_deref_mut())
                .await?;
            if let Some((_, code, msg)) = first_write_error(&res) {
                return Err(ApplyError::Rejected(format!(
                    "quarantine write: {msg} (code {code})"
                )));
            }
            inserted.extend(
                res.get_array("upserted")
                    .map(|a| {
                        a.iter()
                            .filter_map(|u| u.as_document()?.get("index").and_then(bson_i64))
                            .map(|i| start + i as usize)
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default(),
            );
        }
        Ok(QuarantineWrite {
            cleared,
            inserted: (0..quarantined.len())
                .map(|i| inserted.contains(&i))
                .collect(),
        })
    }

    /// How many documents of `collection` are in this follower's quarantine.
    pub async fn quarantine_count(&self, ns: &Ns) -> Result<u64, ApplyError> {
        let ns = self.pipeline_id(ns);
        self.timed("quarantine count", async {
            Ok(self
                .client
                .database(&self.state_db)
                .collection::<Document>(QUARANTINE_COLLECTION)
                .count_documents(doc! {"_id.ns": {"$eq": ns}})
                .await?)
        })
        .await
    }

    /// Runs a command, in the session when one is given.
    async fn command(
        &self,
        db: &str,
        cmd: Document,
        session: Option<&mut ClientSession>,
    ) -> Result<Document, ApplyError> {
        let db = self.client.database(db);
        let res = match session {
            // Inside a transaction the commit carries the write concern.
            Some(s) => db.run_command(cmd).session(s).await,
            None => {
                let mut cmd = cmd;
                cmd.insert(
                    "writeConcern",
                    doc! {"w": "majority", "j": true, "wtimeout": self.timeout.as_millis() as i64},
                );
                db.run_command(cmd).await
            }
        };
        Ok(res?)
    }

    /// Like [`Follower::command`], for a command already encoded: a batch's statements are
    /// encoded once, straight into it.
    async fn raw_command(
        &self,
        db: &str,
        mut cmd: RawDocumentBuf,
        session: Option<&mut ClientSession>,
    ) -> Result<Document, ApplyError> {
        let db = self.client.database(db);
        let res = match session {
            Some(s) => db.run_raw_command(cmd).session(s).await,
            None => {
                cmd.append(
                    "writeConcern",
                    rawdoc! {"w": "majority", "j": true, "wtimeout": self.timeout.as_millis() as i64},
                );
                db.run_raw_command(cmd).await
            }
        };
        Ok(res?)
    }

    /// Raises this pipeline's fence to `term` on its own, outside a batch: a new leader does
    /// this before it reads the pipeline's checkpoint, so that a stale leader's transaction
    /// either committed before that read or fails.
    pub async fn claim(&self, ns: &Ns, term: i64) -> Result<(), ApplyError> {
        self.timed("claim", self.claim_inner(ns, term)).await
    }

    async fn claim_inner(&self, ns: &Ns, term: i64) -> Result<(), ApplyError> {
        if !self.supports_transactions().await? && !self.allow_unfenced {
            return Err(ApplyError::Unfenced(self.name.clone()));
        }
        self.ensure_state_collections().await?;
        self.raise_fence(None, ns, term)
            .await
            .map_err(TxnErr::into_apply)
    }

    /// Creates the state collections up front: a transaction may create a collection
    /// implicitly, but two transactions creating the same one conflict.
    async fn ensure_state_collections(&self) -> Result<(), ApplyError> {
        if self.state_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        for name in [
            FENCE_COLLECTION,
            CHECKPOINT_COLLECTION,
            WRITER_SESSIONS_COLLECTION,
            QUARANTINE_COLLECTION,
        ] {
            match self
                .command(&self.state_db, doc! {"create": name}, None)
                .await
            {
                Ok(_) => {}
                // NamespaceExists.
                Err(ApplyError::Unavailable(m)) if m.contains("(code 48)") => {}
                Err(e) => return Err(e),
            }
        }
        self.state_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Moves the pipeline's fence up to `term`; fails with [`ApplyError::Fenced`] when the
    /// follower has already seen a higher term. The upsert on a filter that no longer matches
    /// tries to insert the fence document again, which the unique `_id` turns into a
    /// duplicate-key error.
    async fn raise_fence(
        &self,
        session: Option<&mut ClientSession>,
        ns: &Ns,
        term: i64,
    ) -> Result<(), TxnErr> {
        let cmd = doc! {
            "update": FENCE_COLLECTION,
            "updates": [{
                "q": {"_id": {"$eq": self.pipeline_id(ns)}, "term": {"$lte": term}},
                "u": {"$set": {"term": term, "node": &self.node_id}, "$currentDate": {"at": true}},
                "upsert": true,
            }],
        };
        let res = self
            .command(&self.state_db, cmd, session)
            .await
            .map_err(TxnErr::Apply)?;
        if let Some((_, code, msg)) = first_write_error(&res) {
            if code == 11000 {
                let their_term = self.fence_term(ns).await.unwrap_or(term + 1);
                return Err(TxnErr::Apply(ApplyError::Fenced {
                    our_term: term,
                    their_term,
                }));
            }
            return Err(TxnErr::Apply(ApplyError::Rejected(format!(
                "fence update: {msg}"
            ))));
        }
        Ok(())
    }

    /// The term recorded in the pipeline's fence, if any.
    pub async fn fence_term(&self, ns: &Ns) -> Option<i64> {
        let d = self
            .client
            .database(&self.state_db)
            .collection::<Document>(FENCE_COLLECTION)
            .find_one(eq("_id", &Bson::String(self.pipeline_id(ns))))
            .await
            .ok()??;
        d.get("term").and_then(bson_i64)
    }

    async fn fenced_error(&self, ns: &Ns, term: i64) -> Option<ApplyError> {
        let their = self.fence_term(ns).await?;
        (their > term).then_some(ApplyError::Fenced {
            our_term: term,
            their_term: their,
        })
    }

    async fn run_plan(
        &self,
        mut session: Option<&mut ClientSession>,
        ns: &Ns,
        plan: &Plan,
    ) -> Result<(), TxnErr> {
        for (start, chunk) in raw_chunks(&plan.deletes)? {
            let mut cmd = RawDocumentBuf::new();
            cmd.append("delete", ns.coll.clone());
            cmd.append("deletes", chunk);
            cmd.append("ordered", true);
            let res = self
                .raw_command(self.target_db(ns), cmd, session.as_deref_mut())
                .await
                .map_err(|e| classify(TxnErr::Apply(e)))?;
            check_write_result(&res, plan.careful, |i| {
                plan.delete_ops.get(start + i).copied()
            })?;
        }
        let bypass = self.bypasses_validation(ns).await;
        for (start, chunk) in raw_chunks(&plan.upserts)? {
            let mut cmd = RawDocumentBuf::new();
            cmd.append("update", ns.coll.clone());
            cmd.append("updates", chunk);
            cmd.append("ordered", true);
            if bypass {
                cmd.append("bypassDocumentValidation", true);
            }
            let res = self
                .raw_command(self.target_db(ns), cmd, session.as_deref_mut())
                .await
                .map_err(|e| classify(TxnErr::Apply(e)))?;
            check_write_result(&res, plan.careful, |i| {
                plan.upsert_ops.get(start + i).copied()
            })?;
        }
        Ok(())
    }

    /// Replaces the pipeline's checkpoint with `next` if the follower still holds revision
    /// `expect`; fails with [`ApplyError::Moved`] otherwise.
    async fn store_checkpoint(
        &self,
        session: Option<&mut ClientSession>,
        ns: &Ns,
        next: Next<'_>,
        term: i64,
        expect: &Rev,
    ) -> Result<Rev, ApplyError> {
        let write_id = ObjectId::new();
        let id = self.pipeline_id(ns);
        let mut body = doc! {
            "_id": &id,
            "write_id": write_id,
            "term": term,
            "node": &self.node_id,
        };
        match next {
            Next::At(cp) => {
                body.insert("token", cp.token.clone());
                body.insert("taken_at_ms", cp.taken_at_ms);
                if let Some(ts) = cp.cluster_time {
                    body.insert("cluster_time", ts);
                }
                if let Some(b) = &cp.copy_after {
                    body.insert("copy_after", doc! {"v": b.clone()});
                }
            }
            Next::Resync => {
                body.insert("resync", true);
                body.insert("taken_at_ms", now_ms());
            }
        }
        let cmd = match expect {
            Rev::Absent => doc! {"insert": CHECKPOINT_COLLECTION, "documents": [body]},
            Rev::Legacy | Rev::Id(_) => {
                let rev = match expect {
                    Rev::Id(old) => doc! {"$eq": *old},
                    _ => doc! {"$exists": false},
                };
                doc! {
                    "update": CHECKPOINT_COLLECTION,
                    "updates": [{"q": {"_id": {"$eq": &id}, "write_id": rev}, "u": body, "upsert": false}],
                }
            }
        };
        let res = self.command(&self.state_db, cmd, session).await?;
        if let Some((_, code, msg)) = first_write_error(&res) {
            if code == 11000 {
                return Err(ApplyError::Moved(ns.to_string()));
            }
            return Err(ApplyError::Rejected(format!("checkpoint write: {msg}")));
        }
        if res.get("n").and_then(bson_i64) != Some(1) {
            return Err(ApplyError::Moved(ns.to_string()));
        }
        Ok(Rev::Id(write_id))
    }

    /// The id of a pipeline's fence and checkpoint documents: `<database>.<collection>`.
    fn pipeline_id(&self, ns: &Ns) -> String {
        format!("{}.{}", self.target_db(ns), ns.coll)
    }

    /// What the follower holds for `collection`.
    pub async fn load_checkpoint(&self, ns: &Ns) -> Result<Stored, ApplyError> {
        self.timed("load checkpoint", self.load_checkpoint_inner(ns))
            .await
    }

    async fn load_checkpoint_inner(&self, ns: &Ns) -> Result<Stored, ApplyError> {
        let d = self
            .client
            .database(&self.state_db)
            .collection::<Document>(CHECKPOINT_COLLECTION)
            .find_one(eq("_id", &Bson::String(self.pipeline_id(ns))))
            .await?;
        let Some(d) = d else {
            return Ok(Stored::Absent);
        };
        let rev = match d.get_object_id("write_id") {
            Ok(id) => Rev::Id(id),
            Err(_) => Rev::Legacy,
        };
        let token = match d.get_document("token") {
            Ok(t) if !d.get_bool("resync").unwrap_or(false) => t.clone(),
            // A resync marker, or a document without a usable token: copy again, which is
            // always correct.
            _ => return Ok(Stored::Resync { rev }),
        };
        Ok(Stored::At {
            cp: Box::new(Checkpoint {
                token,
                cluster_time: d.get_timestamp("cluster_time").ok(),
                copy_after: d
                    .get_document("copy_after")
                    .ok()
                    .and_then(|c| c.get("v").cloned()),
                taken_at_ms: d.get("taken_at_ms").and_then(bson_i64).unwrap_or(0),
                write_id: rev.hex(),
            }),
            rev,
        })
    }

    /// Marks `collection` for a copy without a lease (the offline `resync`). A writer that
    /// is running anywhere fails its next checkpoint swap, reloads, and sees the mark.
    pub async fn mark_resync(&self, ns: &Ns) -> Result<(), ApplyError> {
        self.timed("mark resync", self.mark_resync_inner(ns)).await
    }

    async fn mark_resync_inner(&self, ns: &Ns) -> Result<(), ApplyError> {
        let id = self.pipeline_id(ns);
        self.client
            .database(&self.state_db)
            .collection::<Document>(CHECKPOINT_COLLECTION)
            .replace_one(
                eq("_id", &Bson::String(id.clone())),
                doc! {"_id": id, "write_id": ObjectId::new(), "resync": true, "node": &self.node_id, "taken_at_ms": now_ms()},
            )
            .upsert(true)
            .write_concern(durable(self.timeout))
            .await?;
        Ok(())
    }

    /// Whether writes to `ns` skip the follower's document validation. With
    /// `replication.indexes`, a follower's validator is the source's, and the source has
    /// already accepted every document it sends (documents older than its validator
    /// included, which a validator applied first would refuse), as MongoDB's own replication
    /// does. That needs the `bypassDocumentValidation` privilege (in `dbAdmin`): without it,
    /// documents are validated, and one the follower refuses is quarantined.
    async fn bypasses_validation(&self, ns: &Ns) -> bool {
        if !self.replication.indexes {
            return false;
        }
        let db = self.target_db(ns).to_string();
        if let Some(known) = self
            .bypass
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&db)
        {
            return *known;
        }
        // The privilege is checked before the command runs; this one changes nothing.
        let probe = doc! {
            "update": "mongo_replicator_probe",
            "updates": [{"q": {"_id": {"$eq": 0}}, "u": {"$set": {"probe": 1}}, "upsert": false}],
            "bypassDocumentValidation": true,
        };
        let answer =
            tokio::time::timeout(self.timeout, self.client.database(&db).run_command(probe)).await;
        let allowed = match answer {
            Ok(Ok(_)) => true,
            Ok(Err(e)) if crate::source::error_code(&e) == Some(13) => {
                tracing::warn!(follower = %self.name, database = %db, "the follower's user may not bypass document validation (grant it dbAdmin on this database): documents the source accepted before its validator changed may be refused here, and are then quarantined");
                false
            }
            // Not known yet (unreachable, say): try with it; the batch fails the same way.
            _ => return true,
        };
        self.bypass
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(db, allowed);
        allowed
    }

    /// The follower database that `ns` is written into.
    pub fn target_db<'a>(&'a self, ns: &'a Ns) -> &'a str {
        self.target.as_deref().unwrap_or(&ns.db)
    }

    /// The follower collection that `ns` is written into.
    pub fn target(&self, ns: &Ns) -> mongodb::Collection<Document> {
        self.client
            .database(self.target_db(ns))
            .collection(&ns.coll)
    }

    /// The key field of `ns`.
    pub fn key_field<'a>(&'a self, ns: &Ns) -> &'a str {
        self.replication.key_field_for(ns)
    }

    /// Whether deletes on the source are applied (false: an archive follower).
    pub fn applies_deletes(&self) -> bool {
        self.apply_deletes
    }
}

/// The name of the replicator's own index on the key field of a follower collection.
pub fn key_index_name(key_field: &str) -> String {
    format!("mongo_replicator_{key_field}")
}

/// The write concern of every follower write: acknowledged by a majority and journaled, so
/// that an acknowledged batch (and the checkpoint that moves past it) survives a crash of
/// the follower.
fn durable(timeout: std::time::Duration) -> mongodb::options::WriteConcern {
    mongodb::options::WriteConcern::builder()
        .w(mongodb::options::Acknowledgment::Majority)
        .journal(true)
        .w_timeout(timeout)
        .build()
}

fn apply_err(e: mongodb::error::Error) -> TxnErr {
    TxnErr::Apply(e.into())
}

enum TxnErr {
    /// A duplicate-key conflict that the careful plan may resolve.
    Conflict(String),
    /// The follower refused op `op` for good (see [`is_permanent_rejection`]).
    Rejected {
        op: usize,
        code: i32,
        msg: String,
    },
    /// The transaction does not fit in the follower's cache (TransactionTooLargeForCache,
    /// 388): the batch is split.
    TooLarge(String),
    /// The transaction outlived `write_timeout`: the batch is split (a few times at most).
    Slow(String),
    Apply(ApplyError),
}

impl TxnErr {
    fn into_apply(self) -> ApplyError {
        match self {
            TxnErr::Conflict(msg) => ApplyError::Rejected(format!(
                "conflict on the follower that clearing blocking documents did not resolve: {msg}"
            )),
            TxnErr::Rejected { msg, .. } | TxnErr::TooLarge(msg) => ApplyError::Rejected(msg),
            TxnErr::Slow(msg) => ApplyError::Unavailable(msg),
            TxnErr::Apply(e) => e,
        }
    }
}

/// Tells a transaction too large for the follower's cache (code 388) from other failures.
/// The test server reports it wrapped in an InternalError whose text carries the code.
fn classify(e: TxnErr) -> TxnErr {
    match e {
        TxnErr::Apply(ApplyError::Unavailable(m))
        | TxnErr::Apply(ApplyError::TransientTxn(m))
        | TxnErr::Apply(ApplyError::Rejected(m))
            if m.contains("(code 388)")
                || m.contains("code: 388")
                || m.contains("TransactionTooLargeForCache") =>
        {
            TxnErr::TooLarge(m)
        }
        other => other,
    }
}

/// The first write error of a command's reply: statement index, code, message.
fn first_write_error(res: &Document) -> Option<(usize, i32, String)> {
    let errs = res.get_array("writeErrors").ok()?;
    let e = errs.first()?.as_document()?;
    let index = e.get("index").and_then(bson_i64).unwrap_or(0).max(0) as usize;
    let code = e.get("code").and_then(bson_i64).unwrap_or(0) as i32;
    let msg = crate::config::bounded_message(e.get_str("errmsg").unwrap_or("unknown write error"));
    Some((index, code, format!("{msg} (code {code})")))
}

/// Write errors that say this document can never be written to this follower as it is, so
/// retrying the batch would stall the pipeline for good. Everything else (network errors,
/// elections, write conflicts, timeouts, `Unauthorized`, a full disk) is transient: the batch
/// is retried with a backoff and the follower shows `down`.
///
/// | code | name | typical cause |
/// |---|---|---|
/// | 2 | BadValue | a value the follower cannot store |
/// | 9 | FailedToParse | a field name older servers refuse |
/// | 14 | TypeMismatch | a field the follower's schema types otherwise |
/// | 22 | InvalidBSON | |
/// | 28 | PathNotViable | |
/// | 52 | DollarPrefixedFieldName | a top-level `$` field in a replacement |
/// | 56 | EmptyFieldName | |
/// | 121 | DocumentValidationFailure | the follower's validator |
/// | 171 | CannotIndexParallelArrays | the follower's compound index over two arrays |
/// | 10334 | BSONObjectTooLarge | |
/// | 16755 | (geo) cannot extract geo keys | the follower's 2dsphere index |
/// | 17280 | KeyTooLong | an index key too large (older servers) |
/// | 17419 | document too large after the update | |
/// | 11000, 66 | DuplicateKey, ImmutableField | only after the careful retry has removed the blocking key and `_id`: another unique index on the follower |
pub fn is_permanent_rejection(code: i32) -> bool {
    matches!(
        code,
        2 | 9 | 14 | 22 | 28 | 52 | 56 | 121 | 171 | 10334 | 16755 | 17280 | 17419
    )
}

fn check_write_result(
    res: &Document,
    careful: bool,
    op_of: impl Fn(usize) -> Option<usize>,
) -> Result<(), TxnErr> {
    if let Some((index, code, msg)) = first_write_error(res) {
        if code == 388 {
            return Err(TxnErr::TooLarge(msg));
        }
        if is_conflict(code) && !careful {
            return Err(TxnErr::Conflict(msg));
        }
        // After the careful plan removed the documents blocking the key and the `_id`, a
        // conflict left is another unique index on the follower: permanent.
        if is_permanent_rejection(code) || is_conflict(code) {
            if let Some(op) = op_of(index) {
                return Err(TxnErr::Rejected { op, code, msg });
            }
        }
        return Err(TxnErr::Apply(ApplyError::Rejected(msg)));
    }
    if let Ok(wce) = res.get_document("writeConcernError") {
        return Err(TxnErr::Apply(ApplyError::Unavailable(format!(
            "write concern error: {}",
            wce.get_str("errmsg").unwrap_or("unknown")
        ))));
    }
    Ok(())
}

/// Encodes statements into runs that fit in one command, each with the index of its first
/// statement: each statement is encoded once, and its size is that of its encoding.
fn raw_chunks(stmts: &[Document]) -> Result<Vec<(usize, RawArrayBuf)>, TxnErr> {
    let mut out: Vec<(usize, RawArrayBuf, usize, usize)> = Vec::new();
    for (i, s) in stmts.iter().enumerate() {
        let raw = RawDocumentBuf::from_document(s).map_err(|e| {
            TxnErr::Apply(ApplyError::Rejected(format!(
                "a statement could not be encoded: {e}"
            )))
        })?;
        let len = raw.as_bytes().len();
        match out.last_mut() {
            Some((_, arr, size, n)) if *size + len <= MAX_COMMAND_BYTES && *n < 100_000 => {
                arr.push(raw);
                *size += len;
                *n += 1;
            }
            _ => {
                let mut arr = RawArrayBuf::new();
                arr.push(raw);
                out.push((i, arr, len, 1));
            }
        }
    }
    Ok(out.into_iter().map(|(i, arr, _, _)| (i, arr)).collect())
}

/// A key as a quarantine record shows it: itself when small, else a note of its size and
/// type (a record must stay small: many are written with one batch).
fn bounded_key(key: Option<&Bson>) -> Bson {
    let Some(k) = key else {
        return Bson::Null;
    };
    let size = mongodb::bson::to_vec(&doc! {"k": k.clone()}).map_or(0, |v| v.len());
    if size <= 1024 {
        k.clone()
    } else {
        Bson::String(format!(
            "({size} bytes of {:?}, not recorded)",
            k.element_type()
        ))
    }
}

/// The `_id` of a quarantine record: the pipeline and the source `_id`.
fn quarantine_id(ns: &str, id: &Bson) -> Document {
    doc! {"ns": ns, "id": id.clone()}
}

pub fn bson_i64(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(v) => Some(*v as i64),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_chunks_split_by_encoded_size_and_keep_statement_indexes() {
        // Statements of ~1 MiB: eight fit under the 8 MiB command bound, the ninth starts a
        // new command; each statement is encoded once, whole.
        let big = "x".repeat(1024 * 1024 - 64);
        let stmts: Vec<Document> = (0..10)
            .map(|i| doc! {"q": {"_id": {"$eq": i}}, "u": {"_id": i, "p": big.clone()}, "upsert": true})
            .collect();
        let chunks = raw_chunks(&stmts).ok().expect("encodes");
        let starts: Vec<usize> = chunks.iter().map(|(i, _)| *i).collect();
        assert_eq!(starts, vec![0, 7]);
        let total: usize = chunks.iter().map(|(_, a)| a.into_iter().count()).sum();
        assert_eq!(total, 10);
        let first = chunks[0].1.into_iter().next().unwrap().unwrap();
        let back = Document::try_from(first.as_document().unwrap()).unwrap();
        assert_eq!(back, stmts[0]);
    }
}
