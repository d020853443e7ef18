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
//! 5. **Metadata.** The collection's options and index definitions are compared too
//!    ([`crate::meta`]); the replicator's own key index on the follower is not a difference.
//!    Not with `replication.indexes = false`: the followers' indexes are then their own.
//!
//! `--repair` then rewrites each differing key from the source's current document (or
//! deletes it), and checks again; it repeats while writes race it, a bounded number of
//! times. It never writes a source document older than the one it just read, and the final
//! check proves the result. Options and indexes are repaired in place (`collMod`, index
//! builds); what cannot change in place (capped, collation, ...) is reported as not fixed.
//!
//! An archive follower (`apply_deletes = false`) keeps documents the source deleted: for
//! it, documents only the follower has are not differences, and repair never deletes them.
//!
//! Layout: this file has the entry points and the report types; `compare` the hashed
//! ranges and the merge; `recheck` the recheck of differing keys; `repair` the rewrites and
//! the quarantine; `render` the text summary and the metrics file; `counts` the quick
//! count comparison of `/sync-check`.

mod compare;
mod counts;
mod metadata;
mod recheck;
mod render;
mod repair;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use mongodb::bson::doc;
use mongodb::Client;
use serde::Serialize;

use crate::config::Config;
use crate::follower::Follower;

use compare::Checker;
pub use counts::{count_check, CountReport, CountRow};
pub use render::{render, write_metrics_file};

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
    /// An archive follower (`apply_deletes = false`): documents only it has are not
    /// differences (they are not counted in `extra`).
    pub archive: bool,
    /// Index definitions that differ: missing, extra or different on the follower (the
    /// replicator's own key index aside).
    pub index_differences: u64,
    /// Collection options that differ, or the collection missing on the follower.
    pub option_differences: u64,
    /// Each index or option difference.
    pub metadata: Vec<MetaRow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<RepairReport>,
    pub seconds: f64,
}

/// One difference of indexes or collection options.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetaRow {
    /// `index` or `options`.
    pub kind: String,
    /// The index's or option's name (empty for the collection itself).
    pub name: String,
    /// What differs, one line.
    pub difference: String,
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
    /// Index and option changes made on the follower.
    pub metadata_changed: Vec<String>,
    /// Index and option differences left, with the reason (cannot change in place, or the
    /// follower's error, say a unique index over duplicate follower data).
    pub metadata_unfixed: Vec<String>,
}

impl PairReport {
    pub fn consistent(&self) -> bool {
        self.documents_consistent() && self.index_differences == 0 && self.option_differences == 0
    }

    /// The documents agree (whatever the indexes and options).
    pub fn documents_consistent(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.different == 0 && self.quarantined == 0
    }

    /// Adds the differences `by_id` found among the documents without the key (compared by
    /// `_id`, see [`unkeyed_by_id`]); those documents are no longer "not compared".
    fn absorb(&mut self, by_id: &PairReport, samples: usize) {
        self.checked += by_id.checked;
        self.ranges += by_id.ranges;
        self.ranges_differing += by_id.ranges_differing;
        self.missing += by_id.missing;
        self.extra += by_id.extra;
        self.different += by_id.different;
        self.unsettled += by_id.unsettled;
        for (to, from) in [
            (&mut self.samples_missing, &by_id.samples_missing),
            (&mut self.samples_extra, &by_id.samples_extra),
            (&mut self.samples_different, &by_id.samples_different),
            (&mut self.samples_unsettled, &by_id.samples_unsettled),
        ] {
            to.extend(from.iter().map(|s| format!("_id {s}")));
            to.truncate(samples);
        }
        self.source_without_key = self.source_without_key.saturating_sub(by_id.source_count);
        self.follower_without_key = self
            .follower_without_key
            .saturating_sub(by_id.follower_count);
    }
}

/// Under `missing_key = "use_id"` the documents without the key are replicated by `_id`:
/// a second comparison checks them by `_id` (the keyed one leaves them out).
fn unkeyed_by_id(keyed: &Checker) -> Checker {
    let key = &keyed.key;
    Checker {
        src: keyed.src.clone(),
        fol: keyed.fol.clone(),
        key: "_id".into(),
        missing_key: keyed.missing_key,
        apply_deletes: keyed.apply_deletes,
        state_db: keyed.state_db.clone(),
        args: keyed.args.clone(),
        label: format!("{} (without the key, by _id)", keyed.label),
        keyless_in: Some(key.clone()),
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

pub(crate) fn cannot_run(what: &str, e: mongodb::error::Error) -> CheckError {
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
    crate::logging::init_logging(&config);
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
                apply_deletes: f.applies_deletes(),
                state_db: config.replication.state_database.clone(),
                args: args.clone(),
                label: format!("{coll} -> {}", f.name),
                keyless_in: None,
            };
            let by_id = (config.replication.missing_key == crate::config::MissingKey::UseId)
                .then(|| unkeyed_by_id(&checker));
            let meta = metadata::Pair {
                source: source.database(&ns.db),
                follower: f.client().database(f.target_db(ns)),
                coll: &ns.coll,
                key: f.key_field(ns),
            };
            let (mut report, mut keys) = checker.check(coll, &f.name).await?;
            let mut ids = Vec::new();
            if let Some(c) = &by_id {
                let (r, k) = c.check(coll, &f.name).await?;
                report.absorb(&r, args.samples);
                ids = k;
            }
            // With `replication.indexes = false` the followers' indexes and options are
            // their own business, not the source's.
            let meta_diffs = if config.replication.indexes {
                meta.compare().await?
            } else {
                Vec::new()
            };
            if args.repair && (!report.documents_consistent() || !meta_diffs.is_empty()) {
                // Writes may race the repair (the replicator runs on); each round rewrites
                // what still differs from the source's current documents, then checks.
                let mut total = RepairReport::default();
                // Options before documents (a follower's stricter validator would refuse
                // the source's documents), and indexes again after them (a unique index
                // over duplicates builds once the documents are the source's).
                let mut not_fixed = metadata::NotFixed::default();
                if !meta_diffs.is_empty() {
                    not_fixed = meta.repair(&mut total).await?;
                }
                if report.quarantined > 0 {
                    checker.repair_quarantine(&mut total).await?;
                }
                if !report.documents_consistent() {
                    for round in 1..=3 {
                        let r = checker.repair(&keys).await?;
                        total.upserted += r.upserted;
                        total.deleted += r.deleted;
                        if let Some(c) = &by_id {
                            let r = c.repair(&ids).await?;
                            total.upserted += r.upserted;
                            total.deleted += r.deleted;
                        }
                        total.rounds = round;
                        (report, keys) = checker.check(coll, &f.name).await?;
                        if let Some(c) = &by_id {
                            let (r, k) = c.check(coll, &f.name).await?;
                            report.absorb(&r, args.samples);
                            ids = k;
                        }
                        if report.documents_consistent() {
                            break;
                        }
                    }
                }
                let mut left = Vec::new();
                if !meta_diffs.is_empty() {
                    left = meta.compare().await?;
                }
                if !left.is_empty() {
                    not_fixed = meta.repair(&mut total).await?;
                    left = meta.compare().await?;
                }
                not_fixed.explain(&mut total, &left);
                metadata::fill(&mut report, &left);
                report.repaired = Some(total);
            } else {
                metadata::fill(&mut report, &meta_diffs);
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
