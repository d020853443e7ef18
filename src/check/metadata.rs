//! The check of a collection's options and index definitions ([`crate::meta`]), and their
//! repair in place.

use mongodb::Database;

use super::{cannot_run, CheckError, MetaRow, PairReport, RepairReport};
use crate::meta::{self, MetaDiff};

/// One collection on the source and its counterpart on a follower.
pub(super) struct Pair<'a> {
    pub(super) source: Database,
    pub(super) follower: Database,
    pub(super) coll: &'a str,
    /// The follower's key field for this collection (its own index on it is kept).
    pub(super) key: &'a str,
}

/// Why what a repair left was left.
#[derive(Debug, Default)]
pub(super) struct NotFixed {
    /// Differences that cannot be changed in place.
    fixed_only_by_recreating: Vec<MetaDiff>,
    /// The follower's refusal (an index it cannot build, say).
    error: Option<String>,
}

impl Pair<'_> {
    /// The differences of the follower's options and indexes from the source's.
    pub(super) async fn compare(&self) -> Result<Vec<MetaDiff>, CheckError> {
        let source = meta::read(&self.source, self.coll)
            .await
            .map_err(|e| cannot_run("source", e))?;
        let follower = meta::read(&self.follower, self.coll)
            .await
            .map_err(|e| cannot_run("follower", e))?;
        Ok(meta::diff(&source, &follower))
    }

    /// Makes the follower's options and indexes match the source's, where that can be done
    /// in place; records what changed in `total`.
    pub(super) async fn repair(&self, total: &mut RepairReport) -> Result<NotFixed, CheckError> {
        let source = meta::read(&self.source, self.coll)
            .await
            .map_err(|e| cannot_run("source", e))?;
        match meta::apply(&source, &self.follower, self.coll, self.key, false).await {
            Ok(applied) => {
                total.metadata_changed.extend(applied.changed);
                Ok(NotFixed {
                    fixed_only_by_recreating: applied.unfixed,
                    error: None,
                })
            }
            Err(e) => Ok(NotFixed {
                fixed_only_by_recreating: Vec::new(),
                error: Some(crate::source::describe(&e)),
            }),
        }
    }
}

impl NotFixed {
    /// Records each difference `left` after the repair, with the reason it was left.
    pub(super) fn explain(self, total: &mut RepairReport, left: &[MetaDiff]) {
        for d in left {
            let why = if self.fixed_only_by_recreating.contains(d) {
                "cannot be changed in place; a copy of the collection into this follower (resync) recreates it"
            } else if self.error.is_some() {
                "the follower refused a change, see below"
            } else {
                "changed again while the repair ran"
            };
            total.metadata_unfixed.push(format!("{d} ({why})"));
        }
        if let Some(e) = self.error {
            total.metadata_unfixed.push(e);
        }
    }
}

/// Puts the differences into the pair's report.
pub(super) fn fill(report: &mut PairReport, diffs: &[MetaDiff]) {
    report.index_differences = diffs.iter().filter(|d| d.kind() == "index").count() as u64;
    report.option_differences = diffs.len() as u64 - report.index_differences;
    report.metadata = diffs
        .iter()
        .map(|d| MetaRow {
            kind: d.kind().to_string(),
            name: d.name().to_string(),
            difference: d.to_string(),
        })
        .collect();
}
