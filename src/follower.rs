//! One follower deployment: applying batches, its stored checkpoints, and the fence.
//!
//! Each batch goes to the follower as one `delete` command and one `update` command (many
//! statements each), and, when the follower is a replica set, inside one transaction that
//! also
//! - raises the follower's **fence** to the writer's lease term, failing if the follower has
//!   already seen a higher term (a newer leader exists): the transaction aborts and nothing of
//!   the batch is applied, so a stale leader writes nothing;
//! - stores the batch's checkpoint in `state_database`, so the follower's data and its resume
//!   position move together (an exactly-once effect per follower), and a new leader on another
//!   host resumes without gaps.
//!
//! A follower that cannot run transactions (a standalone server) gets the same writes in
//! sequence: fence, data, checkpoint. That is logged once; replays are harmless because every
//! statement is idempotent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};

use futures::TryStreamExt;

use mongodb::bson::{doc, Bson, Document};
use mongodb::{Client, ClientSession};

use crate::change::{Op, Plan};
use crate::checkpoint::Checkpoint;
use crate::config::FollowerConfig;

const FENCE_COLLECTION: &str = "fence";
const CHECKPOINT_COLLECTION: &str = "checkpoints";
const WRITER_SESSIONS_COLLECTION: &str = "writer_sessions";
/// Statements are split into commands of at most this many bytes, below the 16 MiB limit.
const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The follower has seen a higher lease term: this node is no longer the leader.
    #[error("fenced: follower has seen lease term {their_term}, ours is {our_term}")]
    Fenced { our_term: i64, their_term: i64 },
    /// A write the follower refused (not a connection problem).
    #[error("follower rejected a write: {0}")]
    Rejected(String),
    /// The follower could not be reached or the operation failed in transit.
    #[error("{0}")]
    Unavailable(String),
}

impl From<mongodb::error::Error> for ApplyError {
    fn from(e: mongodb::error::Error) -> Self {
        ApplyError::Unavailable(crate::source::describe(&e))
    }
}

/// A write error that the careful plan resolves: a duplicate key (11000) or an attempt to
/// change `_id` (66).
fn is_conflict(code: i32) -> bool {
    code == 11000 || code == 66
}

pub struct Follower {
    pub name: String,
    client: Client,
    data_db: String,
    state_db: String,
    key_field: String,
    node_id: String,
    /// 0 unknown, 1 transactions, 2 no transactions.
    txn_support: AtomicU8,
    /// Distinguishes this process from earlier ones (and other nodes) in `writer_sessions`.
    incarnation: String,
    /// One session per collection, reused for every batch; its id is registered on the
    /// follower so that a later leader can abort a transaction this process left open.
    sessions: tokio::sync::Mutex<HashMap<String, ClientSession>>,
}

impl Follower {
    /// Creates the client; it connects lazily, so an unreachable follower is not an error yet.
    pub async fn new(
        cfg: &FollowerConfig,
        data_db: &str,
        state_db: &str,
        key_field: &str,
        node_id: &str,
    ) -> anyhow::Result<Follower> {
        let client = crate::source::client(&cfg.uri, &format!("follower {}", cfg.name)).await?;
        Ok(Follower {
            name: cfg.name.clone(),
            client,
            data_db: data_db.to_string(),
            state_db: state_db.to_string(),
            key_field: key_field.to_string(),
            node_id: node_id.to_string(),
            txn_support: AtomicU8::new(0),
            incarnation: mongodb::bson::oid::ObjectId::new().to_hex(),
            sessions: tokio::sync::Mutex::new(HashMap::new()),
        })
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
        if !yes {
            tracing::warn!(
                follower = %self.name,
                "follower is not a replica set and cannot run transactions; its checkpoint is written after each batch instead of with it, and fencing is checked before each batch"
            );
        }
        self.txn_support
            .store(if yes { 1 } else { 2 }, Ordering::Relaxed);
        Ok(yes)
    }

    /// Makes sure the follower can find documents by key quickly: creates an index on the
    /// key field unless one exists (upserts matched by key would scan the collection
    /// otherwise). Not unique, so existing duplicate data on a follower cannot block it.
    pub async fn ensure_key_index(&self, collection: &str) -> Result<(), ApplyError> {
        let cmd = doc! {
            "createIndexes": collection,
            "indexes": [{"key": {&self.key_field: 1}, "name": format!("mongo_replicator_{}", self.key_field)}],
        };
        match self.command(&self.data_db, cmd, None).await {
            Ok(_) => Ok(()),
            // An equivalent index under another name, or other options: it serves as well.
            Err(ApplyError::Unavailable(m))
                if m.contains("already exists")
                    || m.contains("IndexOptionsConflict")
                    || m.contains("IndexKeySpecsConflict") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Applies one coalesced batch and records `checkpoint` for `collection`, fenced by `term`.
    /// Idempotent: replaying a batch leaves the same state.
    pub async fn apply(
        &self,
        collection: &str,
        ops: &[Op],
        checkpoint: &Checkpoint,
        term: i64,
    ) -> Result<(), ApplyError> {
        if self.supports_transactions().await? {
            match self
                .apply_in_txn(collection, ops, checkpoint, term, false)
                .await
            {
                Err(TxnErr::Conflict(_)) => self
                    .apply_in_txn(collection, ops, checkpoint, term, true)
                    .await
                    .map_err(TxnErr::into_apply),
                other => other.map_err(TxnErr::into_apply),
            }
        } else {
            self.apply_plain(collection, ops, checkpoint, term).await
        }
    }

    /// One attempt in one transaction; `careful` selects the plan (see [`Plan::build`]).
    async fn apply_in_txn(
        &self,
        collection: &str,
        ops: &[Op],
        checkpoint: &Checkpoint,
        term: i64,
        careful: bool,
    ) -> Result<(), TxnErr> {
        let mut session = self.session(collection).await?;
        let res = self
            .txn_in_session(&mut session, collection, ops, checkpoint, term, careful)
            .await;
        if res.is_ok() {
            // Only a session whose last transaction ended cleanly is reused.
            self.sessions
                .lock()
                .await
                .insert(collection.to_string(), session);
        }
        res
    }

    /// The collection's session, or a new one whose id is registered on the follower first.
    async fn session(&self, collection: &str) -> Result<ClientSession, TxnErr> {
        if let Some(s) = self.sessions.lock().await.remove(collection) {
            return Ok(s);
        }
        let session = self.client.start_session().await.map_err(apply_err)?;
        self.client
            .database(&self.state_db)
            .collection::<Document>(WRITER_SESSIONS_COLLECTION)
            .update_one(
                doc! {"_id": format!("{}/{}/{collection}", self.node_id, self.incarnation)},
                doc! {
                    "$set": {"lsid": session.id().clone(), "node": &self.node_id, "incarnation": &self.incarnation},
                    "$currentDate": {"at": true},
                },
            )
            .upsert(true)
            .await
            .map_err(apply_err)?;
        Ok(session)
    }

    /// Aborts transactions that earlier writers (a killed or stale process, on any node)
    /// left open on this follower: they hold locks on the fence and would make every batch
    /// of the new leader fail with a write conflict until the server expires them. Called
    /// when this node starts leading; it leads with a higher term, so those writers are
    /// stale by definition.
    pub async fn abort_stale_writers(&self) -> Result<usize, ApplyError> {
        let coll = self
            .client
            .database(&self.state_db)
            .collection::<Document>(WRITER_SESSIONS_COLLECTION);
        let stale: Vec<Document> = coll
            .find(doc! {"incarnation": {"$ne": &self.incarnation}})
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

    async fn txn_in_session(
        &self,
        session: &mut ClientSession,
        collection: &str,
        ops: &[Op],
        checkpoint: &Checkpoint,
        term: i64,
        careful: bool,
    ) -> Result<(), TxnErr> {
        session
            .start_transaction()
            .write_concern(durable())
            .await
            .map_err(apply_err)?;
        // Fence first, then the data, then the checkpoint: all or nothing.
        let body = async {
            self.raise_fence(Some(&mut *session), term).await?;
            let plan = Plan::build(ops, &self.key_field, careful);
            self.run_plan(Some(&mut *session), collection, &plan)
                .await?;
            self.store_checkpoint(Some(&mut *session), collection, checkpoint, term)
                .await
                .map_err(TxnErr::Apply)
        };
        if let Err(e) = body.await {
            let _ = session.abort_transaction().await;
            return Err(e);
        }
        // The commit is retried once when its outcome is unknown; a commit is idempotent.
        let mut retried = false;
        loop {
            match session.commit_transaction().await {
                Ok(()) => return Ok(()),
                Err(e)
                    if !retried
                        && e.contains_label(mongodb::error::UNKNOWN_TRANSACTION_COMMIT_RESULT) =>
                {
                    retried = true;
                }
                Err(e) => {
                    if let Some(fenced) = self.fenced_error(term).await {
                        return Err(TxnErr::Apply(fenced));
                    }
                    return Err(apply_err(e));
                }
            }
        }
    }

    async fn apply_plain(
        &self,
        collection: &str,
        ops: &[Op],
        checkpoint: &Checkpoint,
        term: i64,
    ) -> Result<(), ApplyError> {
        self.raise_fence(None, term)
            .await
            .map_err(TxnErr::into_apply)?;
        let plan = Plan::build(ops, &self.key_field, false);
        match self.run_plan(None, collection, &plan).await {
            Ok(()) => {}
            Err(TxnErr::Conflict(_)) => {
                let plan = Plan::build(ops, &self.key_field, true);
                self.run_plan(None, collection, &plan)
                    .await
                    .map_err(TxnErr::into_apply)?;
            }
            Err(TxnErr::Apply(e)) => return Err(e),
        }
        self.store_checkpoint(None, collection, checkpoint, term)
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
                cmd.insert("writeConcern", doc! {"w": "majority", "j": true});
                db.run_command(cmd).await
            }
        };
        Ok(res?)
    }

    /// Moves the follower's fence up to `term`; fails with [`ApplyError::Fenced`] when the
    /// follower has already seen a higher term. The upsert on a filter that no longer matches
    /// tries to insert the fence document again, which the unique `_id` turns into a
    /// duplicate-key error.
    async fn raise_fence(
        &self,
        session: Option<&mut ClientSession>,
        term: i64,
    ) -> Result<(), TxnErr> {
        let cmd = doc! {
            "update": FENCE_COLLECTION,
            "updates": [{
                "q": {"_id": "fence", "term": {"$lte": term}},
                "u": {"$set": {"term": term, "node": &self.node_id}, "$currentDate": {"at": true}},
                "upsert": true,
            }],
        };
        let res = self
            .command(&self.state_db, cmd, session)
            .await
            .map_err(TxnErr::Apply)?;
        if let Some((code, msg)) = first_write_error(&res) {
            if code == 11000 {
                let their_term = self.fence_term().await.unwrap_or(term + 1);
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

    /// The term recorded in the follower's fence, if any.
    pub async fn fence_term(&self) -> Option<i64> {
        let d = self
            .client
            .database(&self.state_db)
            .collection::<Document>(FENCE_COLLECTION)
            .find_one(doc! {"_id": "fence"})
            .await
            .ok()??;
        d.get("term").and_then(bson_i64)
    }

    async fn fenced_error(&self, term: i64) -> Option<ApplyError> {
        let their = self.fence_term().await?;
        (their > term).then_some(ApplyError::Fenced {
            our_term: term,
            their_term: their,
        })
    }

    async fn run_plan(
        &self,
        mut session: Option<&mut ClientSession>,
        collection: &str,
        plan: &Plan,
    ) -> Result<(), TxnErr> {
        for chunk in chunks(&plan.deletes) {
            let cmd = doc! {"delete": collection, "deletes": chunk, "ordered": true};
            let res = self
                .command(&self.data_db, cmd, session.as_deref_mut())
                .await
                .map_err(TxnErr::Apply)?;
            check_write_result(&res)?;
        }
        for chunk in chunks(&plan.upserts) {
            let cmd = doc! {"update": collection, "updates": chunk, "ordered": true};
            let res = self
                .command(&self.data_db, cmd, session.as_deref_mut())
                .await
                .map_err(TxnErr::Apply)?;
            check_write_result(&res)?;
        }
        Ok(())
    }

    async fn store_checkpoint(
        &self,
        session: Option<&mut ClientSession>,
        collection: &str,
        cp: &Checkpoint,
        term: i64,
    ) -> Result<(), ApplyError> {
        let mut set = doc! {
            "token": cp.token.clone(),
            "taken_at_ms": cp.taken_at_ms,
            "term": term,
            "node": &self.node_id,
        };
        if let Some(ts) = cp.cluster_time {
            set.insert("cluster_time", ts);
        }
        let mut update = doc! {"$set": set};
        match &cp.copy_after {
            Some(b) => {
                update
                    .get_document_mut("$set")
                    .map(|s| s.insert("copy_after", doc! {"v": b.clone()}))
                    .ok();
            }
            None => {
                update.insert("$unset", doc! {"copy_after": ""});
            }
        }
        let cmd = doc! {
            "update": CHECKPOINT_COLLECTION,
            "updates": [{"q": {"_id": self.checkpoint_id(collection)}, "u": update, "upsert": true}],
        };
        let res = self.command(&self.state_db, cmd, session).await?;
        if let Some((_, msg)) = first_write_error(&res) {
            return Err(ApplyError::Rejected(format!("checkpoint write: {msg}")));
        }
        Ok(())
    }

    fn checkpoint_id(&self, collection: &str) -> String {
        format!("{}.{}", self.data_db, collection)
    }

    /// The checkpoint stored on the follower for `collection`, if any.
    pub async fn load_checkpoint(
        &self,
        collection: &str,
    ) -> Result<Option<Checkpoint>, ApplyError> {
        let d = self
            .client
            .database(&self.state_db)
            .collection::<Document>(CHECKPOINT_COLLECTION)
            .find_one(doc! {"_id": self.checkpoint_id(collection)})
            .await?;
        let Some(d) = d else { return Ok(None) };
        let Ok(token) = d.get_document("token") else {
            return Ok(None);
        };
        Ok(Some(Checkpoint {
            token: token.clone(),
            cluster_time: d.get_timestamp("cluster_time").ok(),
            copy_after: d
                .get_document("copy_after")
                .ok()
                .and_then(|c| c.get("v").cloned()),
            taken_at_ms: d.get("taken_at_ms").and_then(bson_i64).unwrap_or(0),
        }))
    }

    /// Removes the stored checkpoint (before a resync), fenced like every other write.
    pub async fn clear_checkpoint(&self, collection: &str, term: i64) -> Result<(), ApplyError> {
        self.raise_fence(None, term)
            .await
            .map_err(TxnErr::into_apply)?;
        self.client
            .database(&self.state_db)
            .collection::<Document>(CHECKPOINT_COLLECTION)
            .delete_one(doc! {"_id": self.checkpoint_id(collection)})
            .await?;
        Ok(())
    }

    /// Deletes follower documents whose `_id` is not in `keep` among `ids` (used after a copy
    /// to remove documents the source no longer has). Fenced by `term`.
    pub async fn delete_ids(
        &self,
        collection: &str,
        ids: Vec<Bson>,
        term: i64,
    ) -> Result<(), ApplyError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ops: Vec<Op> = ids.into_iter().map(|id| Op::Delete { id }).collect();
        self.raise_fence(None, term)
            .await
            .map_err(TxnErr::into_apply)?;
        let plan = Plan::build(&ops, &self.key_field, false);
        self.run_plan(None, collection, &plan)
            .await
            .map_err(TxnErr::into_apply)
    }

    pub fn data_db(&self) -> &str {
        &self.data_db
    }
}

/// The write concern of every follower write: acknowledged by a majority and journaled, so
/// that an acknowledged batch (and the checkpoint that moves past it) survives a crash of
/// the follower.
fn durable() -> mongodb::options::WriteConcern {
    mongodb::options::WriteConcern::builder()
        .w(mongodb::options::Acknowledgment::Majority)
        .journal(true)
        .build()
}

fn apply_err(e: mongodb::error::Error) -> TxnErr {
    TxnErr::Apply(e.into())
}

enum TxnErr {
    /// A duplicate-key conflict that the careful plan resolves.
    Conflict(String),
    Apply(ApplyError),
}

impl TxnErr {
    fn into_apply(self) -> ApplyError {
        match self {
            TxnErr::Conflict(msg) => ApplyError::Rejected(format!(
                "conflict on the follower that clearing blocking documents did not resolve: {msg}"
            )),
            TxnErr::Apply(e) => e,
        }
    }
}

fn first_write_error(res: &Document) -> Option<(i32, String)> {
    let errs = res.get_array("writeErrors").ok()?;
    let e = errs.first()?.as_document()?;
    let code = e.get("code").and_then(bson_i64).unwrap_or(0) as i32;
    let msg = e.get_str("errmsg").unwrap_or("unknown write error");
    Some((code, format!("{msg} (code {code})")))
}

fn check_write_result(res: &Document) -> Result<(), TxnErr> {
    if let Some((code, msg)) = first_write_error(res) {
        if is_conflict(code) {
            return Err(TxnErr::Conflict(msg));
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

/// Splits statements into runs that fit in one command.
fn chunks(stmts: &[Document]) -> Vec<Vec<Document>> {
    let mut out: Vec<Vec<Document>> = Vec::new();
    let mut size = 0usize;
    for s in stmts {
        let len = mongodb::bson::to_vec(s).map(|v| v.len()).unwrap_or(0);
        if out.is_empty()
            || size + len > MAX_COMMAND_BYTES
            || out.last().is_some_and(|c| c.len() >= 100_000)
        {
            out.push(Vec::new());
            size = 0;
        }
        size += len;
        if let Some(last) = out.last_mut() {
            last.push(s.clone());
        }
    }
    out
}

pub fn bson_i64(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(v) => Some(*v as i64),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}
