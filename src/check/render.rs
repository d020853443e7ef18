//! The check's outputs: the human summary and the metrics file for node_exporter.

use super::Report;

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
            "What differed in the last check, per collection, follower and kind: documents (missing, extra, different, quarantined), index definitions (index) and collection options (options).",
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
            ("index", p.index_differences),
            ("options", p.option_differences),
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
        if p.archive {
            out.push_str(
                "  archive follower: documents only on the follower are kept, not differences\n",
            );
        }
        if !p.metadata.is_empty() {
            out.push_str(&format!(
                "  {} index and {} collection option difference(s):\n",
                p.index_differences, p.option_differences
            ));
            for m in &p.metadata {
                out.push_str(&format!("    {}\n", m.difference));
            }
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
            for c in &r.metadata_changed {
                out.push_str(&format!("  repaired: {c}\n"));
            }
            for u in &r.metadata_unfixed {
                out.push_str(&format!("  not fixed: {u}\n"));
            }
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

#[cfg(test)]
mod tests {
    use super::super::PairReport;
    use super::*;

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

    /// Index and option differences show in the summary and as their own metric kinds.
    #[test]
    fn metadata_differences_are_rendered_and_exported_by_kind() {
        let mut p = pair("f1", 0);
        p.index_differences = 1;
        p.option_differences = 2;
        p.metadata = vec![super::super::MetaRow {
            kind: "index".into(),
            name: "a_1".into(),
            difference: "index `a_1` missing on the follower: { \"key\": { \"a\": 1 } }".into(),
        }];
        let r = report(vec![p]);
        assert!(!r.consistent);
        let text = render(&r, false);
        assert!(
            text.contains("1 index and 2 collection option difference(s)"),
            "{text}"
        );
        assert!(
            text.contains("    index `a_1` missing on the follower"),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("check.prom");
        write_metrics_file(&path, Some(&r)).unwrap();
        let prom = std::fs::read_to_string(&path).unwrap();
        for (kind, n) in [("index", 1), ("options", 2)] {
            let series = format!(
                "mongo_replicator_check_differences{{collection=\"data\",follower=\"f1\",kind=\"{kind}\"}} {n}"
            );
            assert!(prom.contains(&series), "{series} in {prom}");
        }
    }
}
