//! Telling real differences from changes still in flight.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::Collection;

use super::compare::{key_bytes, raw_key, Checker, Verdict};
use super::{cannot_run, CheckError, Kind};

impl Checker {
    /// Decides, for keys that differed, which are real differences and which were changes
    /// in flight.
    ///
    /// Each round reads the source's documents for the pending keys and the source's
    /// operation time T, waits (up to `--recheck-delay`) until the replicator's checkpoint on
    /// the follower has passed T, then reads the follower and the source again. Equal: it
    /// was in flight. Still different, with the follower past T and the source unchanged
    /// since: a real difference. When the follower's checkpoint does not move at all (no
    /// replicator running), a difference that persists through every round is real. A key
    /// rewritten faster than the rounds can pin down is `Unsettled`, never reported as a
    /// difference.
    pub(super) async fn recheck(
        &self,
        keys: Vec<Bson>,
    ) -> Result<Vec<(Bson, Verdict)>, CheckError> {
        let mut done = Vec::new();
        let mut pending: Vec<(Bson, Option<(Kind, bool)>)> =
            keys.into_iter().map(|k| (k, None)).collect();
        let mut follower_moved = false;
        for _ in 0..self.args.recheck_rounds.max(1) {
            if pending.is_empty() {
                break;
            }
            let mut session = self
                .src
                .client()
                .start_session()
                .await
                .map_err(|e| cannot_run("source", e))?;
            let wanted: Vec<Bson> = pending.iter().map(|(k, _)| k.clone()).collect();
            let s1 = self
                .fetch_keys(&self.src, &wanted, Some(&mut session), "source")
                .await?;
            let t = session.operation_time();
            let start_cp = self.follower_checkpoint().await;
            let deadline = Instant::now() + self.args.recheck_delay;
            let mut passed = false;
            loop {
                let cp = self.follower_checkpoint().await;
                follower_moved |= cp != start_cp;
                if let (Some(cp), Some(t)) = (cp, t) {
                    if (cp.time, cp.increment) >= (t.time, t.increment) {
                        passed = true;
                        break;
                    }
                }
                if Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let f = self
                .fetch_keys(&self.fol, &wanted, None, "follower")
                .await?;
            let s2 = self.fetch_keys(&self.src, &wanted, None, "source").await?;
            let empty = Vec::new();
            let mut still = Vec::new();
            for (key, _) in pending {
                let kb = key_bytes(&key);
                let a = s1.get(&kb).unwrap_or(&empty);
                let fd = f.get(&kb).unwrap_or(&empty);
                if a.iter().chain(fd).any(|d| self.keyed_elsewhere(d)) {
                    done.push((key, Verdict::Same));
                    continue;
                }
                let Some(kind) = self.compare(a, fd) else {
                    done.push((key, Verdict::Same));
                    continue;
                };
                let b = s2.get(&kb).unwrap_or(&empty);
                let unchanged = a.len() == b.len()
                    && a.iter().zip(b).all(|(x, y)| x.as_bytes() == y.as_bytes());
                if passed && unchanged {
                    done.push((key, Verdict::Differs(kind)));
                } else {
                    still.push((key, Some((kind, unchanged))));
                }
            }
            pending = still;
        }
        for (key, last) in pending {
            done.push((
                key,
                match last {
                    Some((kind, true)) if !follower_moved => Verdict::Differs(kind),
                    Some(_) => Verdict::Unsettled,
                    None => Verdict::Same,
                },
            ));
        }
        Ok(done)
    }

    /// The documents of each key, grouped by key, read in chunks.
    async fn fetch_keys(
        &self,
        coll: &Collection<Document>,
        keys: &[Bson],
        mut session: Option<&mut mongodb::ClientSession>,
        what: &str,
    ) -> Result<HashMap<Vec<u8>, Vec<RawDocumentBuf>>, CheckError> {
        let mut out: HashMap<Vec<u8>, Vec<RawDocumentBuf>> = HashMap::new();
        for chunk in keys.chunks(1000) {
            let filter = crate::change::key_in(&self.key, chunk);
            for d in self
                .fetch_in(coll, filter, session.as_deref_mut(), what)
                .await?
            {
                let k = raw_key(&d, &self.key).unwrap_or(Bson::Null);
                out.entry(key_bytes(&k)).or_default().push(d);
            }
        }
        Ok(out)
    }

    /// The cluster time of the replicator's checkpoint on the follower for this collection.
    async fn follower_checkpoint(&self) -> Option<mongodb::bson::Timestamp> {
        let id = format!("{}.{}", self.fol.namespace().db, self.fol.name());
        self.fol
            .client()
            .database(&self.state_db)
            .collection::<Document>("checkpoints")
            .find_one(doc! {"_id": {"$eq": id}})
            .await
            .ok()??
            .get_timestamp("cluster_time")
            .ok()
    }

    async fn fetch_in(
        &self,
        coll: &Collection<Document>,
        filter: Document,
        session: Option<&mut mongodb::ClientSession>,
        what: &str,
    ) -> Result<Vec<RawDocumentBuf>, CheckError> {
        let coll = coll.clone_with_type::<RawDocumentBuf>();
        match session {
            Some(s) => {
                let mut cursor = coll
                    .find(filter)
                    .sort(doc! {"_id": 1})
                    .collation(crate::change::binary_collation())
                    .session(&mut *s)
                    .await
                    .map_err(|e| cannot_run(what, e))?;
                let mut out = Vec::new();
                while let Some(d) = cursor.next(&mut *s).await {
                    out.push(d.map_err(|e| cannot_run(what, e))?);
                }
                Ok(out)
            }
            None => self.fetch(&coll.clone_with_type(), filter, what).await,
        }
    }

    async fn fetch(
        &self,
        coll: &Collection<Document>,
        filter: Document,
        what: &str,
    ) -> Result<Vec<RawDocumentBuf>, CheckError> {
        coll.clone_with_type::<RawDocumentBuf>()
            .find(filter)
            .sort(doc! {"_id": 1})
            .collation(crate::change::binary_collation())
            .await
            .map_err(|e| cannot_run(what, e))?
            .try_collect()
            .await
            .map_err(|e| cannot_run(what, e))
    }
}
