//! Repair: rewriting what differs from the source's current documents, and the quarantine.

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::Collection;

use super::compare::Checker;

/// Statements by `_id` in a repair are exact: they touch the one document whose `_id` is
/// the source's, whatever either collection's collation holds equal to it.
fn exact() -> mongodb::options::Collation {
    crate::change::binary_collation()
}
use super::{cannot_run, CheckError, PairReport, RepairReport};

impl Checker {
    fn quarantine(&self) -> Collection<Document> {
        self.fol
            .client()
            .database(&self.state_db)
            .collection(crate::follower::QUARANTINE_COLLECTION)
    }

    fn ns(&self) -> String {
        format!("{}.{}", self.fol.namespace().db, self.fol.name())
    }

    /// Counts the follower's quarantine records of this collection, with samples.
    pub(super) async fn read_quarantine(&self, report: &mut PairReport) -> Result<(), CheckError> {
        let filter = doc! {"_id.ns": {"$eq": self.ns()}};
        report.quarantined = self
            .quarantine()
            .count_documents(filter.clone())
            .await
            .map_err(|e| cannot_run("follower", e))?;
        if report.quarantined > 0 {
            let docs: Vec<Document> = self
                .quarantine()
                .find(filter)
                .limit(self.args.samples as i64)
                .await
                .map_err(|e| cannot_run("follower", e))?
                .try_collect()
                .await
                .map_err(|e| cannot_run("follower", e))?;
            report.samples_quarantined = docs
                .iter()
                .map(|d| {
                    let what = match d.get("key") {
                        Some(Bson::Null) | None => format!(
                            "_id {}",
                            d.get_document("_id")
                                .ok()
                                .and_then(|i| i.get("id"))
                                .unwrap_or(&Bson::Null)
                        ),
                        Some(k) => k.to_string(),
                    };
                    format!("{what} ({})", d.get_str("error").unwrap_or("?"))
                })
                .collect();
        }
        Ok(())
    }

    /// Retries each quarantined document from the source's current version; removes the
    /// records of those that now apply (or that the source no longer has).
    pub(super) async fn repair_quarantine(&self, r: &mut RepairReport) -> Result<(), CheckError> {
        let records: Vec<Document> = self
            .quarantine()
            .find(doc! {"_id.ns": {"$eq": self.ns()}})
            .await
            .map_err(|e| cannot_run("follower", e))?
            .try_collect()
            .await
            .map_err(|e| cannot_run("follower", e))?;
        for rec in records {
            let Some(rid) = rec.get_document("_id").ok().cloned() else {
                continue;
            };
            let id = rid.get("id").cloned().unwrap_or(Bson::Null);
            let by_id = crate::change::eq("_id", &id);
            let current = self
                .src
                .find_one(by_id.clone())
                .collation(exact())
                .await
                .map_err(|e| cannot_run("source", e))?;
            let outcome = match current {
                // Gone from the source: an archive follower keeps what it has.
                None if !self.apply_deletes => Ok(()),
                None => self
                    .fol
                    .delete_one(by_id.clone())
                    .collation(exact())
                    .await
                    .map(|d| {
                        r.deleted += d.deleted_count;
                    }),
                Some(doc) => match crate::change::upsert_for(doc, &self.key, self.missing_key) {
                    Ok(Ok(crate::change::Op::Upsert {
                        key: Some(k), doc, ..
                    })) => self.write_keyed(&id, &k, doc, r).await,
                    Ok(Ok(crate::change::Op::Upsert { doc, .. })) => {
                        match self.clear_id_variants(&id).await {
                            Ok(n) => {
                                r.deleted += n;
                                self.fol
                                    .replace_one(by_id.clone(), doc)
                                    .upsert(true)
                                    .collation(exact())
                                    .await
                                    .map(|_| r.upserted += 1)
                            }
                            Err(e) => Err(e),
                        }
                    }
                    // Skipped by policy: it does not belong on the follower.
                    _ => self
                        .fol
                        .delete_one(by_id.clone())
                        .collation(exact())
                        .await
                        .map(|d| {
                            r.deleted += d.deleted_count;
                        }),
                },
            };
            match outcome {
                Ok(()) => {
                    self.quarantine()
                        .delete_one(doc! {"_id": {"$eq": rid}})
                        .await
                        .map_err(|e| cannot_run("follower", e))?;
                    r.quarantine_cleared += 1;
                }
                Err(e) => {
                    tracing::warn!(pair = %self.label, id = %id, error = %crate::source::describe(&e), "the follower still refuses this quarantined document");
                    r.quarantine_refused += 1;
                }
            }
        }
        Ok(())
    }

    /// Removes follower documents that the `_id` index holds equal to `id` without being it
    /// ("a" for "A" under a case-insensitive collection collation, which the `_id` index
    /// always has; 1.0 for 1), unless the source holds them too: a replacement by `_id` would
    /// find such a document and fail (an `_id` cannot change), and the exact statements of
    /// the repair do not see it. One the source holds stays (a follower collation looser
    /// than the source's cannot hold both; the write of `id` then fails, and is reported).
    async fn clear_id_variants(&self, id: &Bson) -> Result<u64, mongodb::error::Error> {
        let found: Vec<Document> = self
            .fol
            .find(crate::change::eq("_id", id))
            .projection(doc! {"_id": 1})
            .await?
            .try_collect()
            .await?;
        let mut deleted = 0;
        for f in found {
            match f.get("_id") {
                Some(other) if other != id => {
                    let on_source = self
                        .src
                        .find_one(crate::change::eq("_id", other))
                        .projection(doc! {"_id": 1})
                        .collation(exact())
                        .await?
                        .is_some_and(|d| d.get("_id") == Some(other));
                    if !on_source {
                        deleted += self
                            .fol
                            .delete_one(crate::change::eq("_id", other))
                            .collation(exact())
                            .await?
                            .deleted_count;
                    }
                }
                _ => {}
            }
        }
        Ok(deleted)
    }

    /// Writes `doc` under key `k`, first removing follower documents that would block it.
    async fn write_keyed(
        &self,
        id: &Bson,
        k: &Bson,
        doc: Document,
        r: &mut RepairReport,
    ) -> Result<(), mongodb::error::Error> {
        r.deleted += self.clear_id_variants(id).await?;
        let mut other_id = crate::change::key_eq(&self.key, k);
        other_id.insert("_id", doc! {"$ne": id.clone()});
        let del = self
            .fol
            .delete_many(doc! {"$or": [
                {"_id": {"$eq": id.clone()}, "$nor": [crate::change::key_eq(&self.key, k)]},
                other_id,
            ]})
            .collation(crate::change::binary_collation())
            .await?;
        r.deleted += del.deleted_count;
        self.fol
            .replace_one(crate::change::key_eq(&self.key, k), doc)
            .upsert(true)
            .collation(crate::change::binary_collation())
            .await?;
        r.upserted += 1;
        Ok(())
    }

    /// Rewrites each key on the follower from the source's current documents.
    pub(super) async fn repair(&self, keys: &[Bson]) -> Result<RepairReport, CheckError> {
        let mut r = RepairReport::default();
        for key in keys {
            // Matched by value: a key is data, never a query.
            let filter = crate::change::key_eq(&self.key, key);
            let docs: Vec<Document> = self
                .src
                .find(filter.clone())
                .collation(crate::change::binary_collation())
                .await
                .map_err(|e| cannot_run("source", e))?
                .try_collect()
                .await
                .map_err(|e| cannot_run("source", e))?;
            let ids: Vec<Bson> = docs.iter().filter_map(|d| d.get("_id").cloned()).collect();
            // Remove follower documents with this key that the source does not have (by
            // _id), unless the follower is an archive that keeps them.
            if self.apply_deletes {
                let del = self
                    .fol
                    .delete_many(doc! {"$and": [filter.clone(), {"_id": {"$nin": ids.clone()}}]})
                    .collation(crate::change::binary_collation())
                    .await
                    .map_err(|e| cannot_run("follower", e))?;
                r.deleted += del.deleted_count;
            }
            for d in docs {
                let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                // A follower document with this _id but another key would block the write.
                r.deleted += self
                    .clear_id_variants(&id)
                    .await
                    .map_err(|e| cannot_run("follower", e))?;
                let del = self
                    .fol
                    .delete_many(doc! {
                        "_id": {"$eq": id.clone()},
                        "$nor": [crate::change::key_eq(&self.key, key)],
                    })
                    .collation(crate::change::binary_collation())
                    .await
                    .map_err(|e| cannot_run("follower", e))?;
                r.deleted += del.deleted_count;
                self.fol
                    .replace_one(doc! {"_id": {"$eq": id}}, d)
                    .upsert(true)
                    .collation(exact())
                    .await
                    .map_err(|e| cannot_run("follower", e))?;
                r.upserted += 1;
            }
        }
        Ok(r)
    }
}
