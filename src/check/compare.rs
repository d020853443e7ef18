//! Comparing one (collection, follower): counts, hashed key ranges, then a document-by-
//! document merge of the ranges that differ.

use std::cmp::Ordering;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::Collection;
use sha2::{Digest, Sha256};

use super::{cannot_run, CheckArgs, CheckError, Kind, PairReport};
use crate::order::cmp_bson;

/// The outcome of rechecking one key.
pub(super) enum Verdict {
    Same,
    Differs(Kind),
    Unsettled,
}

pub(super) struct Checker {
    pub(super) src: Collection<Document>,
    pub(super) fol: Collection<Document>,
    pub(super) key: String,
    pub(super) missing_key: crate::config::MissingKey,
    /// False for an archive follower: documents only it has are kept, not differences.
    pub(super) apply_deletes: bool,
    pub(super) state_db: String,
    pub(super) args: CheckArgs,
    pub(super) label: String,
    /// With `key` = `_id`: compare only the documents that have no usable value in this
    /// key field, which `missing_key = "use_id"` replicates by `_id` (see
    /// [`Checker::unkeyed`]).
    pub(super) keyless_in: Option<String>,
}

/// One document of a key-ordered stream: its key, `_id` and raw bytes.
struct Item {
    key: Bson,
    raw: RawDocumentBuf,
}

type Cursor = mongodb::Cursor<RawDocumentBuf>;

/// A peekable key-ordered stream of one side.
struct Side {
    cursor: Cursor,
    peeked: Option<Item>,
    key: String,
    done: bool,
    /// Documents passed over because their key cannot identify one document (see
    /// [`crate::change::unusable_key`]); the replicator treats those as keyless.
    unusable: u64,
}

impl Side {
    async fn peek(&mut self) -> Result<Option<&Item>, mongodb::error::Error> {
        while self.peeked.is_none() && !self.done {
            match self.cursor.try_next().await? {
                Some(raw) => {
                    let key = raw_key(&raw, &self.key).unwrap_or(Bson::Null);
                    if crate::change::unusable_key(&key).is_some() {
                        self.unusable += 1;
                        continue;
                    }
                    self.peeked = Some(Item { key, raw });
                }
                None => self.done = true,
            }
        }
        Ok(self.peeked.as_ref())
    }

    async fn next(&mut self) -> Result<Option<Item>, mongodb::error::Error> {
        self.peek().await?;
        Ok(self.peeked.take())
    }
}

/// The key of a raw document (dotted paths descend into sub-documents).
pub(super) fn raw_key(raw: &RawDocumentBuf, path: &str) -> Option<Bson> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut cur: Bson = raw.get(first).ok()??.to_raw_bson().try_into().ok()?;
    for p in parts {
        cur = cur.as_document()?.get(p)?.clone();
    }
    Some(cur)
}

/// The documents with no usable value in `key`: missing, null, or one of the values that
/// cannot identify a document ([`crate::change::unusable_key`]: an array, a regex, undefined; a document
/// with `$`-prefixed names cannot be selected by a query and stays "not compared").
pub(super) fn unkeyed(key: &str) -> Document {
    doc! {"$or": [
        {key: {"$exists": false}},
        {key: Bson::Null},
        {key: {"$type": ["array", "regex", "undefined"]}},
    ]}
}

/// A difference found by the descend step, before rechecking.
#[derive(Debug, Clone)]
struct Diff {
    kind: Kind,
    key: Bson,
}

impl Checker {
    fn keyed(&self) -> Document {
        match &self.keyless_in {
            // Every document has an `_id` (null included).
            Some(key) => unkeyed(key),
            None => doc! {&self.key: {"$exists": true, "$ne": Bson::Null}},
        }
    }

    /// Whether `d` belongs to the keyed comparison although this one compares by `_id`: it
    /// has a usable key on one side, so the keyed comparison reports it (as missing, extra
    /// or different), and this one must not count it again.
    pub(super) fn keyed_elsewhere(&self, d: &RawDocumentBuf) -> bool {
        self.keyless_in.as_deref().is_some_and(|key| {
            raw_key(d, key)
                .is_some_and(|k| k != Bson::Null && crate::change::unusable_key(&k).is_none())
        })
    }

    async fn open(
        &self,
        coll: &Collection<Document>,
        filter: Document,
        what: &str,
    ) -> Result<Side, CheckError> {
        let cursor = coll
            .clone_with_type::<RawDocumentBuf>()
            .find(filter)
            // By key alone, so that an index on the key serves the sort without a blocking
            // sort of the whole collection. Documents sharing a key (the key should be
            // unique) may then come in any order; the recheck compares them by `_id`.
            .sort(doc! {&self.key: 1})
            // Binary, as `cmp_bson` orders keys, whatever the collection's default collation.
            .collation(crate::change::binary_collation())
            .allow_disk_use(true)
            .batch_size(1000)
            .await
            .map_err(|e| cannot_run(what, e))?;
        Ok(Side {
            cursor,
            peeked: None,
            key: self.key.clone(),
            done: false,
            unusable: 0,
        })
    }

    /// Checks one pair; returns the report and every key that differs persistently.
    pub(super) async fn check(
        &self,
        coll: &str,
        follower: &str,
    ) -> Result<(PairReport, Vec<Bson>), CheckError> {
        let started = Instant::now();
        let mut report = PairReport {
            collection: coll.to_string(),
            follower: follower.to_string(),
            archive: !self.apply_deletes,
            ..Default::default()
        };
        tracing::debug!(pair = %self.label, "counting documents");
        let all = match &self.keyless_in {
            Some(_) => self.keyed(),
            None => doc! {},
        };
        report.source_count = self
            .src
            .count_documents(all.clone())
            .await
            .map_err(|e| cannot_run("source", e))?;
        report.follower_count = self
            .fol
            .count_documents(all)
            .await
            .map_err(|e| cannot_run("follower", e))?;
        let unkeyed = doc! {"$or": [{&self.key: {"$exists": false}}, {&self.key: Bson::Null}]};
        report.source_without_key = self
            .src
            .count_documents(unkeyed.clone())
            .await
            .map_err(|e| cannot_run("source", e))?;
        report.follower_without_key = self
            .fol
            .count_documents(unkeyed)
            .await
            .map_err(|e| cannot_run("follower", e))?;

        // Pass 1: range hashes.
        tracing::debug!(pair = %self.label, source = report.source_count, follower = report.follower_count, "hashing ranges");
        let mut src = self.open(&self.src, self.keyed(), "source").await?;
        let mut fol = self.open(&self.fol, self.keyed(), "follower").await?;
        let mut differing: Vec<(Option<Bson>, Option<Bson>)> = Vec::new();
        let mut lo: Option<Bson> = None;
        let progress = Progress::new(&self.label);
        loop {
            let mut hs = Sha256::new();
            let mut hf = Sha256::new();
            let mut n = 0u32;
            let mut hi: Option<Bson> = None;
            while n < self.args.range_size {
                match src.next().await.map_err(|e| cannot_run("source", e))? {
                    Some(item) => {
                        hs.update(item.raw.as_bytes());
                        hi = Some(item.key);
                        n += 1;
                    }
                    None => break,
                }
            }
            report.checked += n as u64;
            let last = src.done && src.peeked.is_none();
            // The follower's documents up to the same boundary (all the rest after the last).
            let mut m = 0u64;
            loop {
                let take = match fol.peek().await.map_err(|e| cannot_run("follower", e))? {
                    None => false,
                    Some(item) => {
                        last || hi
                            .as_ref()
                            .is_some_and(|h| cmp_bson(&item.key, h) != Ordering::Greater)
                    }
                };
                if !take {
                    break;
                }
                if let Some(item) = fol.next().await.map_err(|e| cannot_run("follower", e))? {
                    hf.update(item.raw.as_bytes());
                    m += 1;
                }
            }
            if n == 0 && m == 0 {
                break;
            }
            report.ranges += 1;
            if n as u64 != m || hs.finalize() != hf.finalize() {
                report.ranges_differing += 1;
                differing.push((lo.clone(), if last { None } else { hi.clone() }));
            }
            progress.tick(report.checked);
            if last {
                break;
            }
            lo = hi;
        }
        progress.done(report.checked);
        report.source_without_key += src.unusable;
        report.follower_without_key += fol.unusable;
        self.read_quarantine(&mut report).await?;

        // Pass 2: descend into the differing ranges.
        tracing::debug!(pair = %self.label, ranges = report.ranges, differing = differing.len(), "comparing differing ranges");
        let mut diffs = Vec::new();
        for (lo, hi) in &differing {
            let bounds = crate::order::range_filter(&self.key, lo.as_ref(), hi.as_ref());
            let range = if bounds.is_empty() {
                self.keyed()
            } else {
                doc! {"$and": [self.keyed(), bounds]}
            };
            let mut s = self.open(&self.src, range.clone(), "source").await?;
            let mut f = self.open(&self.fol, range, "follower").await?;
            self.diff_streams(&mut s, &mut f, &mut diffs).await?;
        }

        // An archive follower keeps what the source deleted.
        if !self.apply_deletes {
            diffs.retain(|d| d.kind != Kind::Extra);
        }
        // Recheck what differs, to drop changes that were only in flight.
        let mut keys_seen = std::collections::HashSet::new();
        diffs.retain(|d| keys_seen.insert(key_bytes(&d.key)));
        let verdicts = self
            .recheck(diffs.iter().map(|d| d.key.clone()).collect())
            .await?;
        let mut confirmed = Vec::new();
        for (key, verdict) in verdicts {
            match verdict {
                Verdict::Same => {}
                Verdict::Differs(kind) => confirmed.push(Diff { kind, key }),
                Verdict::Unsettled => {
                    report.unsettled += 1;
                    if report.samples_unsettled.len() < self.args.samples {
                        report.samples_unsettled.push(key.to_string());
                    }
                }
            }
        }
        let diffs = confirmed;
        for d in &diffs {
            let (count, samples) = match d.kind {
                Kind::Missing => (&mut report.missing, &mut report.samples_missing),
                Kind::Extra => (&mut report.extra, &mut report.samples_extra),
                Kind::Different => (&mut report.different, &mut report.samples_different),
            };
            *count += 1;
            if samples.len() < self.args.samples {
                samples.push(d.key.to_string());
            }
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok((report, diffs.into_iter().map(|d| d.key).collect()))
    }

    /// Merge-joins two key-ordered streams, document by document.
    async fn diff_streams(
        &self,
        s: &mut Side,
        f: &mut Side,
        out: &mut Vec<Diff>,
    ) -> Result<(), CheckError> {
        loop {
            let sk = s
                .peek()
                .await
                .map_err(|e| cannot_run("source", e))?
                .map(|i| i.key.clone());
            let fk = f
                .peek()
                .await
                .map_err(|e| cannot_run("follower", e))?
                .map(|i| i.key.clone());
            match (sk, fk) {
                (None, None) => return Ok(()),
                (Some(k), None) => {
                    s.next().await.map_err(|e| cannot_run("source", e))?;
                    push_diff(out, Kind::Missing, k);
                }
                (None, Some(k)) => {
                    f.next().await.map_err(|e| cannot_run("follower", e))?;
                    push_diff(out, Kind::Extra, k);
                }
                (Some(a), Some(b)) => match cmp_bson(&a, &b) {
                    Ordering::Less => {
                        s.next().await.map_err(|e| cannot_run("source", e))?;
                        push_diff(out, Kind::Missing, a);
                    }
                    Ordering::Greater => {
                        f.next().await.map_err(|e| cannot_run("follower", e))?;
                        push_diff(out, Kind::Extra, b);
                    }
                    Ordering::Equal => {
                        let x = s.next().await.map_err(|e| cannot_run("source", e))?;
                        let y = f.next().await.map_err(|e| cannot_run("follower", e))?;
                        if let (Some(x), Some(y)) = (x, y) {
                            if !self.same(&x.raw, &y.raw) {
                                push_diff(out, Kind::Different, a);
                            }
                        }
                    }
                },
            }
        }
    }

    pub(super) fn same(&self, a: &RawDocumentBuf, b: &RawDocumentBuf) -> bool {
        if a.as_bytes() == b.as_bytes() {
            return true;
        }
        if !self.args.ignore_field_order {
            return false;
        }
        match (
            Document::try_from(a.as_ref()),
            Document::try_from(b.as_ref()),
        ) {
            (Ok(x), Ok(y)) => sorted(&Bson::Document(x)) == sorted(&Bson::Document(y)),
            _ => false,
        }
    }

    /// Compares one key on both sides now; `None` when they agree.
    pub(super) fn compare(&self, s: &[RawDocumentBuf], f: &[RawDocumentBuf]) -> Option<Kind> {
        if !self.apply_deletes {
            return self.compare_archive(s, f);
        }
        match (s.len(), f.len()) {
            (0, 0) => None,
            (_, 0) => Some(Kind::Missing),
            (0, _) => Some(Kind::Extra),
            (a, b) if a != b => Some(if a > b { Kind::Missing } else { Kind::Extra }),
            _ => {
                if s.iter().zip(f.iter()).all(|(x, y)| self.same(x, y)) {
                    None
                } else {
                    Some(Kind::Different)
                }
            }
        }
    }

    /// For an archive follower: each source document is on the follower, as it is (by
    /// `_id`); the follower's other documents of the key are ones the source deleted.
    fn compare_archive(&self, s: &[RawDocumentBuf], f: &[RawDocumentBuf]) -> Option<Kind> {
        let id = |d: &RawDocumentBuf| d.get("_id").ok().flatten().map(|v| v.to_raw_bson());
        let mut out = None;
        for x in s {
            match f.iter().find(|y| id(y) == id(x)) {
                None => return Some(Kind::Missing),
                Some(y) if !self.same(x, y) => out = Some(Kind::Different),
                Some(_) => {}
            }
        }
        out
    }
}

/// A key's encoding, usable as a map key (BSON values are not `Hash`).
pub(super) fn key_bytes(k: &Bson) -> Vec<u8> {
    mongodb::bson::to_vec(&doc! {"k": k.clone()}).unwrap_or_default()
}

fn push_diff(out: &mut Vec<Diff>, kind: Kind, key: Bson) {
    out.push(Diff { kind, key });
}

/// A value with every document's fields sorted, recursively.
fn sorted(b: &Bson) -> Bson {
    match b {
        Bson::Document(d) => {
            let mut keys: Vec<&String> = d.keys().collect();
            keys.sort();
            let mut out = Document::new();
            for k in keys {
                out.insert(k.clone(), sorted(&d[k]));
            }
            Bson::Document(out)
        }
        Bson::Array(a) => Bson::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// Progress on a terminal (a rewritten line), log lines otherwise.
struct Progress {
    label: String,
    tty: bool,
    started: Instant,
    last: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new(label: &str) -> Progress {
        Progress {
            label: label.to_string(),
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn tick(&self, n: u64) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if last.elapsed() < every {
            return;
        }
        *last = Instant::now();
        let rate = n as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        if self.tty {
            eprint!("\r{}: {n} documents checked ({rate:.0}/s)   ", self.label);
        } else {
            tracing::info!(pair = %self.label, checked = n, rate_per_s = rate as u64, "check progress");
        }
    }

    fn done(&self, n: u64) {
        if self.tty && self.started.elapsed() > Duration::from_millis(200) {
            eprintln!("\r{}: {n} documents checked            ", self.label);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_order_is_ignored_only_when_asked() {
        let a = sorted(&Bson::Document(doc! {"b": 1, "a": {"y": 1, "x": 2}}));
        let b = sorted(&Bson::Document(doc! {"a": {"x": 2, "y": 1}, "b": 1}));
        assert_eq!(a, b);
    }
}
