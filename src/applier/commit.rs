//! Applying a batch to the follower with its checkpoint, and what the follower refuses.

use super::*;

impl Pair {
    /// Applies `ops` with `cp` on the follower, then records the checkpoint locally.
    pub(super) async fn commit(
        &self,
        ops: Vec<Op>,
        cp: Checkpoint,
        events: u64,
        caught_up: bool,
    ) -> Result<(), PairError> {
        self.check_authority()?;
        if !ops.is_empty()
            && self.config.replication.indexes
            && !self.meta_ready.load(std::sync::atomic::Ordering::Relaxed)
        {
            self.sync_meta().await?;
        }
        if !ops.is_empty() && self.identity().is_none() {
            let src = self.source_meta().await?;
            self.settle_identity(&src).await?;
        }
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

    /// The source's `_id` collation, when known (see [`Pair::id_collation`]).
    pub(super) fn identity(&self) -> Option<Document> {
        self.id_collation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Settles the collation of statements by `_id` from the source collection's metadata
    /// and the follower collection's: the collation they share, or binary (see
    /// [`crate::change::identity`]). Unknown while the source collection does not exist (a
    /// write then settles it again; one that finds it still missing, its events being from
    /// before a drop, is exact). Returns the follower collection's metadata it read.
    pub(super) async fn settle_identity(
        &self,
        src: &crate::meta::CollMeta,
    ) -> Result<Option<crate::meta::CollMeta>, PairError> {
        if !src.exists {
            *self.id_collation.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(None);
        }
        let fol = self.follower_meta().await?;
        let shared = fol.exists && crate::meta::collation_diff(src, &fol).is_none();
        *self.id_collation.lock().unwrap_or_else(|e| e.into_inner()) = Some(if shared {
            crate::change::identity(&src.options)
        } else {
            crate::change::binary()
        });
        Ok(Some(fol))
    }

    /// Applies `ops` as they are (already coalesced) with checkpoint `cp`; returns what the
    /// follower quarantined. `log` reports each quarantined document (once per document).
    pub(super) async fn apply_ops(
        &self,
        ops: &[Op],
        cp: &Checkpoint,
        events: u64,
        log: bool,
    ) -> Result<Vec<crate::follower::Quarantined>, PairError> {
        let expect = self.rev();
        let id_collation = self.identity().unwrap_or_else(crate::change::binary);
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
                id_collation: &id_collation,
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
    pub(super) async fn resolve_stale_blockers(
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
    pub(super) fn record(&self, mut cp: Checkpoint, caught_up: bool) {
        cp.write_id = self.rev().hex();
        let ct = cp.cluster_time.map(|t| t.time as i64 * 1000);
        if self.store.advance(&self.label, self.name(), cp) {
            self.stats.checkpoint_moved(ct, caught_up);
        }
    }

    pub(super) fn push_upsert(&self, doc: Document, ops: &mut Vec<Op>) -> Result<(), PairError> {
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
}
