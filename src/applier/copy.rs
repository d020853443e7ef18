//! The initial sync: the follower collection gets the source's options and indexes, then
//! every document in `_id` order (resumable), then loses what the source does not have.

use super::*;

impl Pair {
    /// A checkpoint at the source's present, from a fresh stream's post-batch token.
    pub(super) async fn capture_now(&self) -> Result<Checkpoint, PairError> {
        let stream = self.src(self.coll().watch().into_future()).await?;
        let token = stream.resume_token().ok_or_else(|| {
            PairError::Transient("source returned no resume token for a new change stream".into())
        })?;
        Ok(Checkpoint::new(token_doc(&token)?, None))
    }

    pub(super) async fn start_now(&self) -> Result<Checkpoint, PairError> {
        let cp = self.capture_now().await?;
        self.commit(Vec::new(), cp.clone(), 0, true).await?;
        Ok(cp)
    }

    /// Copies the source collection into the follower, resuming a copy that was cut short,
    /// then removes follower documents the source does not have. Returns the checkpoint to
    /// stream from: a position captured before the copy began, so that every change made
    /// during the copy is replayed afterwards (harmless, as writes are idempotent).
    pub(super) async fn initial_sync(
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
                // (The follower collection got the source's options and indexes when the
                // pipeline started, before any document: a collation cannot change later.)
                let mut base = self.capture_now().await?;
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

    /// The source collection's options and indexes.
    pub(super) async fn source_meta(&self) -> Result<crate::meta::CollMeta, PairError> {
        self.src(crate::meta::read(
            &self.source.database(&self.ns.db),
            &self.ns.coll,
        ))
        .await
    }

    /// [`Pair::sync_meta_to`] the source collection as it is now.
    pub(super) async fn sync_meta(&self) -> Result<(), PairError> {
        let src = self.source_meta().await?;
        self.sync_meta_to(&src).await
    }

    /// Makes the follower collection's indexes and options those of the source collection
    /// (`replication.indexes`), keeping the replicator's own key index. It never drops the
    /// follower collection: an option that cannot change in place and changes what writes do
    /// (capped, collation) stops the pair with the reason.
    pub(super) async fn sync_meta_to(&self, src: &crate::meta::CollMeta) -> Result<(), PairError> {
        if !self.config.replication.indexes {
            return Ok(());
        }
        self.check_authority()?;
        if !src.exists {
            // Not there (yet, or dropped since): nothing is created on the follower, so that
            // the collection is created with the source's options once the source has it
            // (its `create` event, or the first write, brings them).
            return Ok(());
        }
        if is_capped(&src.options) {
            return Err(PairError::Fatal(CAPPED.into()));
        }
        // A follower collection is never dropped here, not even to create it anew with an
        // option that cannot change in place: a drop cannot be part of a fenced
        // transaction, so a stale leader that woke up late could drop the collection a newer
        // leader has just copied (review). Such a difference stops the pair instead (below).
        let fdb = self
            .follower
            .client()
            .database(self.follower.target_db(&self.ns));
        // What stops the pair is decided before any change: a refused index or collMod
        // below must not hide it.
        let before = self.follower_meta().await?;
        if before.exists {
            if let Some(d) = crate::meta::diff(src, &before)
                .iter()
                .find(|d| blocks_writes(d))
            {
                return Err(self.cannot_change_in_place(d));
            }
        }
        let key_field = self.follower.key_field(&self.ns);
        let limit = self.config.replication.write_timeout;
        let applied = match tokio::time::timeout(
            limit,
            crate::meta::apply(src, &fdb, &self.ns.coll, key_field, false),
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
                self.follower.ensure_key_index(&self.ns).await?;
                self.meta_ready
                    .store(true, std::sync::atomic::Ordering::Relaxed);
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
        if let Some(left) = applied.unfixed.iter().find(|d| blocks_writes(d)) {
            return Err(self.cannot_change_in_place(left));
        }
        for left in &applied.unfixed {
            tracing::warn!(follower = %self.name(), collection = %self.label, difference = %left, "a collection option differs from the source's and cannot change in place; `check` reports it");
        }
        self.follower.ensure_key_index(&self.ns).await?;
        self.meta_ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn cannot_change_in_place(&self, d: &crate::meta::MetaDiff) -> PairError {
        PairError::Fatal(format!(
            "the follower collection differs from the source's in an option that cannot change in place ({d}); the replicator never drops a follower collection (a drop cannot be fenced, so a stale leader could drop a newer leader's copy): drop it on the follower yourself, then run `mongo-replicator resync --follower {}` (the copy creates it with the source's options)",
            self.name()
        ))
    }

    /// The follower collection's options and indexes as they are now.
    pub(super) async fn follower_meta(&self) -> Result<crate::meta::CollMeta, PairError> {
        let fdb = self
            .follower
            .client()
            .database(self.follower.target_db(&self.ns));
        self.fol(crate::meta::read(&fdb, &self.ns.coll)).await
    }

    /// Under `indexes = false` the follower collection's options are the user's. One whose
    /// default collation is not binary and not the source's may hold two documents the source
    /// holds apart ("A" and "a" under a binary source) as one: the replicator never lets one
    /// replace the other (statements by `_id` are then exact), so the follower refuses the
    /// second and it is quarantined; and on MongoDB its `_id` index cannot serve those exact
    /// statements for string `_id`s (each scans the collection). Said once, at the start.
    pub(super) fn warn_of_a_looser_collation(
        &self,
        src: &crate::meta::CollMeta,
        fol: &crate::meta::CollMeta,
    ) {
        if !src.exists || !fol.exists || crate::change::collated(&fol.options).is_none() {
            return;
        }
        if let Some(d) = crate::meta::collation_diff(src, fol) {
            tracing::warn!(follower = %self.name(), collection = %self.label, difference = %d, "the follower collection has a default collation the source's does not share: documents the source holds apart may be one there, and the follower then refuses the second (it is quarantined), and its _id index cannot serve exact writes by string _id (each scans the collection); create the follower collection with the source's collation (or none), then resync");
        }
    }

    /// The bytes of documents a copy of `remaining` documents reads, from the source's
    /// collection statistics (0 when the source does not say).
    pub(super) async fn source_bytes(&self, remaining: u64) -> u64 {
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
    pub(super) async fn commit_copied(
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
    pub(super) async fn remove_extras(
        &self,
        base: &Checkpoint,
        after: &Bson,
    ) -> Result<u64, PairError> {
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
}

/// Why a capped collection is not replicated.
pub(super) const CAPPED: &str = "the source collection is capped, and capped collections are not replicated: writes to them cannot be part of the transactions that fence every follower write and commit it with its checkpoint, and their evictions make no change events, so a follower would drift; replicate a plain collection, or leave this one out (source.exclude)";

pub(super) fn is_capped(options: &mongodb::bson::Document) -> bool {
    options.get_bool("capped").unwrap_or(false)
}

/// Differences that change what the replicator's writes do on the follower: a capped
/// collection refuses writes in transactions, and a collation changes which documents a
/// key matches. Others (say, a clustered index) only report.
fn blocks_writes(d: &crate::meta::MetaDiff) -> bool {
    matches!(d, crate::meta::MetaDiff::DifferentOption { name, .. }
        if matches!(name.as_str(), "capped" | "size" | "max" | "collation" | "timeseries"))
}
