//! The consistency check: does every follower hold exactly what the source holds? And the
//! repair that makes it so.
//!
//! How it works (also in the README, "How the check works"):
//! 1. **Counts.** Both sides are counted first (reported, and a quick hint).
//! 2. **Range hashes.** Both sides are streamed once, in key order, as raw BSON. The source
//!    stream is cut into ranges of `--range-size` keys; the follower stream is cut at the same
//!    key boundaries. Each range is hashed (SHA-256 over the raw document bytes) on both
//!    sides. Equal hashes mean equal bytes, and the range is done; documents are never
//!    decoded on this path. Memory holds one document per side plus one hash per differing
//!    range, whatever the collection's size.
//! 3. **Descend.** Only ranges whose hashes differ are read again, bounded by their keys,
//!    and compared document by document: missing on the follower, extra on the follower, or
//!    different content (byte-exact BSON by default, so int32 vs int64 differs;
//!    `--ignore-field-order` compares with fields sorted).
//! 4. **Recheck.** A difference may be a change still in flight. Differing keys are looked
//!    up again on both sides after `--recheck-delay`, up to `--recheck-rounds` times; only
//!    differences that persist are reported.
//!
//! `--repair` then rewrites each differing key from the source's current document (or
//! deletes it), and checks again; it repeats while writes race it, a bounded number of
//! times. It never writes a source document older than the one it just read, and the final
//! check proves the result.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document, RawDocumentBuf};
use mongodb::{Client, Collection};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{redact, Config};
use crate::follower::Follower;
use crate::order::cmp_bson;

/// `mongo-replicator check` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Check only this follower.
    #[arg(long)]
    pub follower: Option<String>,
    /// Rewrite what differs on the follower from the source, then check again.
    #[arg(long)]
    pub repair: bool,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    /// Treat documents that differ only in field order as equal.
    #[arg(long)]
    pub ignore_field_order: bool,
    /// Sample keys shown per kind of difference.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Keys per hashed range.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub range_size: u32,
    /// Wait before rechecking differing keys.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub recheck_delay: Duration,
    /// Rechecks of differing keys before they are reported.
    #[arg(long, default_value_t = 5)]
    pub recheck_rounds: u32,
    /// Also write the outcome as Prometheus metrics to this file (for node_exporter's
    /// textfile collector): when the check last ran, last found the followers identical,
    /// and what differed. Checks every follower (not with --follower).
    #[arg(long)]
    pub metrics_file: Option<PathBuf>,
}

/// The exit codes of the contract.
pub const EXIT_SAME: u8 = 0;
pub const EXIT_DIFFERENT: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_CANNOT_RUN: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Missing,
    Extra,
    Different,
}

/// The result for one (collection, follower).
#[derive(Debug, Default, Serialize)]
pub struct PairReport {
    pub collection: String,
    pub follower: String,
    pub source_count: u64,
    pub follower_count: u64,
    /// Source documents compared (those with the key field).
    pub checked: u64,
    pub ranges: u64,
    pub ranges_differing: u64,
    pub missing: u64,
    pub extra: u64,
    pub different: u64,
    pub samples_missing: Vec<String>,
    pub samples_extra: Vec<String>,
    pub samples_different: Vec<String>,
    /// Keys rewritten on the source faster than the rechecks could verify them: not
    /// reported as differences (see `Checker::recheck`).
    pub unsettled: u64,
    pub samples_unsettled: Vec<String>,
    /// Documents without the key field, or with a key that cannot identify one document
    /// (a regex, an array, an operator-shaped document), which the keyed comparison leaves
    /// out.
    pub source_without_key: u64,
    pub follower_without_key: u64,
    /// Documents the follower refused for good, recorded in its quarantine by the
    /// replicator (see `replication.on_rejected`); a difference until repaired.
    pub quarantined: u64,
    /// Their keys (or `_id`s for documents without a key), with the follower's error.
    pub samples_quarantined: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<RepairReport>,
    pub seconds: f64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct RepairReport {
    pub upserted: u64,
    pub deleted: u64,
    pub rounds: u32,
    /// Quarantined documents retried that now apply (their records are removed).
    pub quarantine_cleared: u64,
    /// Quarantined documents the follower still refuses.
    pub quarantine_refused: u64,
}

impl PairReport {
    pub fn consistent(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.different == 0 && self.quarantined == 0
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub consistent: bool,
    pub pairs: Vec<PairReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    CannotRun(String),
}

fn cannot_run(what: &str, e: mongodb::error::Error) -> CheckError {
    CheckError::CannotRun(format!("{what}: {}", crate::source::describe(&e)))
}

/// The `check` subcommand.
pub async fn main(args: CheckArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    crate::service::init_logging(&config);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    if args.metrics_file.is_some() && args.follower.is_some() {
        eprintln!("error: --metrics-file records a check of every follower; it cannot be combined with --follower");
        return ExitCode::from(EXIT_USAGE);
    }
    let outcome = run(&config, &args).await;
    if let Some(path) = &args.metrics_file {
        let report = match &outcome {
            Ok(r) => Some(r),
            Err(CheckError::CannotRun(_)) => None,
            Err(CheckError::Usage(_)) => return usage_or_report(outcome, &args),
        };
        if let Err(e) = write_metrics_file(path, report) {
            eprintln!("error: cannot write --metrics-file {}: {e}", path.display());
        }
    }
    usage_or_report(outcome, &args)
}

/// Prints the outcome of a check and gives its exit code.
fn usage_or_report(outcome: Result<Report, CheckError>, args: &CheckArgs) -> ExitCode {
    match outcome {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", render(&report, args.repair));
            }
            ExitCode::from(if report.consistent {
                EXIT_SAME
            } else {
                EXIT_DIFFERENT
            })
        }
        Err(CheckError::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(CheckError::CannotRun(m)) => {
            eprintln!("error: could not run the check: {m}");
            ExitCode::from(EXIT_CANNOT_RUN)
        }
    }
}

/// Writes the check's outcome as Prometheus text to `path` (atomically): the time of this
/// run, whether it found the followers identical (`None`: it could not run), the time of the
/// last run that did (kept from the previous file when this one did not), and the
/// differences per collection, follower and kind.
pub fn write_metrics_file(path: &std::path::Path, report: Option<&Report>) -> std::io::Result<()> {
    use prometheus::{Encoder, Gauge, GaugeVec, Opts, Registry, TextEncoder};
    const LAST_SUCCESS: &str = "mongo_replicator_check_last_success_timestamp_seconds";
    let now = crate::checkpoint::now_ms() as f64 / 1000.0;
    let consistent = report.is_some_and(|r| r.consistent);
    // The last success so far: 0 (the epoch, so that the staleness alert fires) when no
    // check has ever succeeded. A previous file that cannot be read stops the write rather
    // than lose it.
    let previous_success = match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{LAST_SUCCESS} ")))
            .and_then(|v| v.trim().parse::<f64>().ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot read the previous file to keep its last success time: {e}"),
            ))
        }
    };
    let registry = Registry::new();
    let gauge = |name: &str, help: &str, value: f64| -> std::io::Result<()> {
        let g = Gauge::with_opts(Opts::new(name, help)).map_err(std::io::Error::other)?;
        g.set(value);
        registry
            .register(Box::new(g))
            .map_err(std::io::Error::other)
    };
    gauge(
        "mongo_replicator_check_last_run_timestamp_seconds",
        "When mongo-replicator check last ran (whatever it found).",
        now,
    )?;
    gauge(
        "mongo_replicator_check_last_run_consistent",
        "1 when the last check found every follower identical to the source (after repair, with --repair); 0 when it found differences or could not run.",
        if consistent { 1.0 } else { 0.0 },
    )?;
    gauge(
        LAST_SUCCESS,
        "When a check last found every follower identical to the source (0: never).",
        if consistent {
            now
        } else {
            previous_success.unwrap_or(0.0)
        },
    )?;
    let diffs = GaugeVec::new(
        Opts::new(
            "mongo_replicator_check_differences",
            "Documents that differed in the last check, per collection, follower and kind (missing, extra, different, quarantined).",
        ),
        &["collection", "follower", "kind"],
    )
    .map_err(std::io::Error::other)?;
    for p in report.map(|r| r.pairs.as_slice()).unwrap_or_default() {
        for (kind, n) in [
            ("missing", p.missing),
            ("extra", p.extra),
            ("different", p.different),
            ("quarantined", p.quarantined),
        ] {
            diffs
                .with_label_values(&[p.collection.as_str(), p.follower.as_str(), kind])
                .set(n as f64);
        }
    }
    registry
        .register(Box::new(diffs))
        .map_err(std::io::Error::other)?;
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .map_err(std::io::Error::other)?;
    // A temporary name of this process's own (two checks may overlap: the last one to
    // finish wins, and neither publishes the other's half-written file). node_exporter reads
    // only `*.prom`, so it never sees the temporary file.
    let mut tmp = path.as_os_str().to_owned();
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tmp.push(format!(".{}-{seq}.tmp", std::process::id()));
    let written = std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Checks (and repairs, with `--repair`) every selected pair.
pub async fn run(config: &Config, args: &CheckArgs) -> Result<Report, CheckError> {
    let followers: Vec<_> = match &args.follower {
        Some(name) => vec![config.follower(name).ok_or_else(|| {
            CheckError::Usage(format!("no follower named `{name}` in the config"))
        })?],
        None => config.followers.iter().collect(),
    };
    let source = crate::source::client(&config.source.uri, "source")
        .await
        .map_err(|e| CheckError::CannotRun(e.to_string()))?;
    reachable(&source, "source").await?;
    let namespaces = config.selection().resolve(&source).await.map_err(|e| {
        CheckError::CannotRun(format!(
            "listing the source's collections: {}",
            crate::source::describe(&e)
        ))
    })?;
    let mut pairs = Vec::new();
    for fcfg in followers {
        let f = Follower::new(fcfg, &config.replication, config.node_id())
            .await
            .map_err(|e| CheckError::CannotRun(e.to_string()))?;
        reachable(f.client(), &format!("follower {}", f.name)).await?;
        for ns in &namespaces {
            let coll = &config.selection().label(ns);
            let checker = Checker {
                src: source.database(&ns.db).collection(&ns.coll),
                fol: f.target(ns),
                key: f.key_field(ns).to_string(),
                missing_key: config.replication.missing_key,
                state_db: config.replication.state_database.clone(),
                args: args.clone(),
                label: format!("{coll} -> {}", f.name),
            };
            let (mut report, mut keys) = checker.check(coll, &f.name).await?;
            if args.repair && !report.consistent() {
                // Writes may race the repair (the replicator runs on); each round rewrites
                // what still differs from the source's current documents, then checks.
                let mut total = RepairReport::default();
                if report.quarantined > 0 {
                    checker.repair_quarantine(&mut total).await?;
                }
                for round in 1..=3 {
                    let r = checker.repair(&keys).await?;
                    total.upserted += r.upserted;
                    total.deleted += r.deleted;
                    total.rounds = round;
                    (report, keys) = checker.check(coll, &f.name).await?;
                    if report.consistent() {
                        break;
                    }
                }
                report.repaired = Some(total);
            }
            pairs.push(report);
        }
    }
    Ok(Report {
        consistent: pairs.iter().all(|p| p.consistent()),
        pairs,
    })
}

async fn reachable(client: &Client, what: &str) -> Result<(), CheckError> {
    client
        .database("admin")
        .run_command(doc! {"ping": 1})
        .await
        .map(|_| ())
        .map_err(|e| cannot_run(&format!("cannot reach the {what}"), e))
}

/// The outcome of rechecking one key.
enum Verdict {
    Same,
    Differs(Kind),
    Unsettled,
}

struct Checker {
    src: Collection<Document>,
    fol: Collection<Document>,
    key: String,
    missing_key: crate::config::MissingKey,
    state_db: String,
    args: CheckArgs,
    label: String,
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
fn raw_key(raw: &RawDocumentBuf, path: &str) -> Option<Bson> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut cur: Bson = raw.get(first).ok()??.to_raw_bson().try_into().ok()?;
    for p in parts {
        cur = cur.as_document()?.get(p)?.clone();
    }
    Some(cur)
}

/// A difference found by the descend step, before rechecking.
#[derive(Debug, Clone)]
struct Diff {
    kind: Kind,
    key: Bson,
}

impl Checker {
    fn keyed(&self) -> Document {
        doc! {&self.key: {"$exists": true, "$ne": Bson::Null}}
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
    async fn check(
        &self,
        coll: &str,
        follower: &str,
    ) -> Result<(PairReport, Vec<Bson>), CheckError> {
        let started = Instant::now();
        let mut report = PairReport {
            collection: coll.to_string(),
            follower: follower.to_string(),
            ..Default::default()
        };
        tracing::debug!(pair = %self.label, "counting documents");
        report.source_count = self
            .src
            .count_documents(doc! {})
            .await
            .map_err(|e| cannot_run("source", e))?;
        report.follower_count = self
            .fol
            .count_documents(doc! {})
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

    fn same(&self, a: &RawDocumentBuf, b: &RawDocumentBuf) -> bool {
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
    fn compare(&self, s: &[RawDocumentBuf], f: &[RawDocumentBuf]) -> Option<Kind> {
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
    async fn recheck(&self, keys: Vec<Bson>) -> Result<Vec<(Bson, Verdict)>, CheckError> {
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
                let Some(kind) = self.compare(a, f.get(&kb).unwrap_or(&empty)) else {
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
            .await
            .map_err(|e| cannot_run(what, e))?
            .try_collect()
            .await
            .map_err(|e| cannot_run(what, e))
    }

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
    async fn read_quarantine(&self, report: &mut PairReport) -> Result<(), CheckError> {
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
    async fn repair_quarantine(&self, r: &mut RepairReport) -> Result<(), CheckError> {
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
                .await
                .map_err(|e| cannot_run("source", e))?;
            let outcome = match current {
                None => self.fol.delete_one(by_id.clone()).await.map(|d| {
                    r.deleted += d.deleted_count;
                }),
                Some(doc) => match crate::change::upsert_for(doc, &self.key, self.missing_key) {
                    Ok(Ok(crate::change::Op::Upsert {
                        key: Some(k), doc, ..
                    })) => self.write_keyed(&id, &k, doc, r).await,
                    Ok(Ok(crate::change::Op::Upsert { doc, .. })) => self
                        .fol
                        .replace_one(by_id.clone(), doc)
                        .upsert(true)
                        .await
                        .map(|_| r.upserted += 1),
                    // Skipped by policy: it does not belong on the follower.
                    _ => self.fol.delete_one(by_id.clone()).await.map(|d| {
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

    /// Writes `doc` under key `k`, first removing follower documents that would block it.
    async fn write_keyed(
        &self,
        id: &Bson,
        k: &Bson,
        doc: Document,
        r: &mut RepairReport,
    ) -> Result<(), mongodb::error::Error> {
        let mut other_id = crate::change::key_eq(&self.key, k);
        other_id.insert("_id", doc! {"$ne": id.clone()});
        let del = self
            .fol
            .delete_many(doc! {"$or": [
                {"_id": {"$eq": id.clone()}, "$nor": [crate::change::key_eq(&self.key, k)]},
                other_id,
            ]})
            .await?;
        r.deleted += del.deleted_count;
        self.fol
            .replace_one(crate::change::key_eq(&self.key, k), doc)
            .upsert(true)
            .await?;
        r.upserted += 1;
        Ok(())
    }

    /// Rewrites each key on the follower from the source's current documents.
    async fn repair(&self, keys: &[Bson]) -> Result<RepairReport, CheckError> {
        let mut r = RepairReport::default();
        for key in keys {
            // Matched by value: a key is data, never a query.
            let filter = crate::change::key_eq(&self.key, key);
            let docs: Vec<Document> = self
                .src
                .find(filter.clone())
                .await
                .map_err(|e| cannot_run("source", e))?
                .try_collect()
                .await
                .map_err(|e| cannot_run("source", e))?;
            let ids: Vec<Bson> = docs.iter().filter_map(|d| d.get("_id").cloned()).collect();
            // Remove follower documents with this key that the source does not have (by _id).
            let del = self
                .fol
                .delete_many(doc! {"$and": [filter.clone(), {"_id": {"$nin": ids.clone()}}]})
                .await
                .map_err(|e| cannot_run("follower", e))?;
            r.deleted += del.deleted_count;
            for d in docs {
                let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                // A follower document with this _id but another key would block the write.
                let del = self
                    .fol
                    .delete_many(doc! {
                        "_id": {"$eq": id.clone()},
                        "$nor": [crate::change::key_eq(&self.key, key)],
                    })
                    .await
                    .map_err(|e| cannot_run("follower", e))?;
                r.deleted += del.deleted_count;
                self.fol
                    .replace_one(doc! {"_id": {"$eq": id}}, d)
                    .upsert(true)
                    .await
                    .map_err(|e| cannot_run("follower", e))?;
                r.upserted += 1;
            }
        }
        Ok(r)
    }
}

/// A key's encoding, usable as a map key (BSON values are not `Hash`).
fn key_bytes(k: &Bson) -> Vec<u8> {
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

/// The human summary.
pub fn render(report: &Report, repair: bool) -> String {
    let mut out = String::new();
    for p in &report.pairs {
        out.push_str(&format!(
            "{} -> {}: {} documents checked (source {}, follower {}), {} missing, {} extra, {} different ({:.1}s)\n",
            p.collection, p.follower, p.checked, p.source_count, p.follower_count,
            p.missing, p.extra, p.different, p.seconds
        ));
        for (name, s) in [
            ("missing", &p.samples_missing),
            ("extra", &p.samples_extra),
            ("different", &p.samples_different),
        ] {
            if !s.is_empty() {
                out.push_str(&format!("  {name}: {}\n", s.join(", ")));
            }
        }
        if p.unsettled > 0 {
            out.push_str(&format!(
                "  {} key(s) changing too fast to verify (not counted as differences): {}\n",
                p.unsettled,
                p.samples_unsettled.join(", ")
            ));
        }
        if p.source_without_key > 0 || p.follower_without_key > 0 {
            out.push_str(&format!(
                "  not compared (no key field, or a key that cannot identify one document): source {}, follower {}\n",
                p.source_without_key, p.follower_without_key
            ));
        }
        if p.quarantined > 0 {
            out.push_str(&format!(
                "  quarantined on the follower (refused for good; `--repair` retries them): {}: {}\n",
                p.quarantined,
                p.samples_quarantined.join(", ")
            ));
        }
        if let Some(r) = &p.repaired {
            out.push_str(&format!(
                "  repaired: {} upserted, {} deleted in {} round(s)\n",
                r.upserted, r.deleted, r.rounds
            ));
            if r.quarantine_cleared > 0 || r.quarantine_refused > 0 {
                out.push_str(&format!(
                    "  quarantine: {} now applied, {} still refused\n",
                    r.quarantine_cleared, r.quarantine_refused
                ));
            }
        }
    }
    out.push_str(if report.consistent {
        if repair {
            "result: consistent (after repair)\n"
        } else {
            "result: consistent\n"
        }
    } else {
        "result: DIFFERENCES FOUND\n"
    });
    out
}

/// A count-level comparison, quick enough to poll (`GET /sync-check`). The counts are the
/// servers' metadata counts: cheap, and exact after a clean shutdown.
#[derive(Debug, Clone, Serialize)]
pub struct CountReport {
    pub in_sync: bool,
    /// How old this result is (results are reused for a few seconds).
    pub age_ms: u64,
    pub collections: Vec<CountRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CountRow {
    pub collection: String,
    pub follower: String,
    pub source_count: Option<u64>,
    pub follower_count: Option<u64>,
    pub error: Option<String>,
}

pub async fn count_check(
    config: &Config,
    source: &Client,
    followers: &[Arc<Follower>],
) -> CountReport {
    let mut rows = Vec::new();
    let mut in_sync = true;
    let namespaces = match config.selection().resolve(source).await {
        Ok(n) => n,
        Err(_) => config.selection().literal(),
    };
    for ns in &namespaces {
        let c = &config.selection().label(ns);
        let src = estimated_count(source, &ns.db, &ns.coll).await;
        let counts = futures::future::join_all(
            followers
                .iter()
                .map(|f| estimated_count(f.client(), f.target_db(ns), &ns.coll)),
        )
        .await;
        for (f, fol) in followers.iter().zip(counts) {
            let error = match (&src, &fol) {
                (Err(e), _) => Some(format!("source: {e}")),
                (_, Err(e)) => Some(format!("follower: {e}")),
                _ => None,
            };
            let (sc, fc) = (src.as_ref().ok().copied(), fol.as_ref().ok().copied());
            if error.is_some() || sc != fc {
                in_sync = false;
            }
            rows.push(CountRow {
                collection: c.clone(),
                follower: f.name.clone(),
                source_count: sc,
                follower_count: fc,
                error,
            });
        }
    }
    CountReport {
        in_sync,
        age_ms: 0,
        collections: rows,
    }
}

/// How long one count of `/sync-check` may take.
const COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// The collection's document count from the server's metadata (no scan), bounded in time.
async fn estimated_count(client: &Client, db: &str, coll: &str) -> Result<u64, String> {
    let coll = client.database(db).collection::<Document>(coll);
    match tokio::time::timeout(COUNT_TIMEOUT, coll.estimated_document_count()).await {
        Ok(r) => r.map_err(|e| crate::config::bounded_message(&redact(&e.to_string()))),
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(COUNT_TIMEOUT)
        )),
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

    fn pair(follower: &str, extra: u64) -> PairReport {
        PairReport {
            collection: "data".into(),
            follower: follower.into(),
            extra,
            ..Default::default()
        }
    }
    fn report(pairs: Vec<PairReport>) -> Report {
        Report {
            consistent: pairs.iter().all(|p| p.consistent()),
            pairs,
        }
    }
    fn series<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(name))
    }

    /// Review R1: a check that has never succeeded (first runs fail or cannot run) writes no
    /// last-success series, so MongoReplicatorCheckStale (time() - series > 2d) can never fire.
    #[test]
    fn review_never_successful_checks_still_export_a_last_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("check.prom");
        write_metrics_file(&path, None).unwrap();
        write_metrics_file(&path, Some(&report(vec![pair("f1", 3)]))).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            series(
                &text,
                "mongo_replicator_check_last_success_timestamp_seconds"
            )
            .is_some(),
            "{text}"
        );
    }

    /// Review R1b: a previous file that cannot be read as UTF-8 text (or at all) silently drops
    /// the last success; the write should fail loudly (or keep a marker) instead.
    #[test]
    fn review_an_unreadable_previous_file_does_not_lose_the_last_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("check.prom");
        write_metrics_file(&path, Some(&report(vec![pair("f1", 0)]))).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"# \xff\n"); // one stray non-UTF-8 byte
        bytes.push(0xff);
        std::fs::write(&path, &bytes).unwrap();
        let r = write_metrics_file(&path, None);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            r.is_err()
                || series(
                    &text,
                    "mongo_replicator_check_last_success_timestamp_seconds"
                )
                .is_some(),
            "last success silently lost: {text}"
        );
    }

    /// Review R3: two checks writing the same --metrics-file (cron overlap, a manual run during
    /// the scheduled one) share the temp name `PATH.tmp`: one's rename fails (ENOENT) or
    /// publishes the other's half-written file.
    #[test]
    fn review_concurrent_writers_do_not_fail_or_tear_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("check.prom");
        let pairs: Vec<_> = (0..200).map(|i| pair(&format!("f{i}"), 1)).collect();
        let big = report(pairs);
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        (0..200)
                            .filter_map(|_| write_metrics_file(&path, Some(&big)).err())
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let errs: Vec<_> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
            assert!(
                errs.is_empty(),
                "{} failed writes, e.g. {:?}",
                errs.len(),
                errs.first()
            );
        });
    }
}
