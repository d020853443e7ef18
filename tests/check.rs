//! The consistency check and repair, against real servers.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::Collection;

const CONVERGE: Duration = Duration::from_secs(60);

struct Run {
    code: i32,
    json: serde_json::Value,
    stdout: String,
    stderr: String,
}

fn check(config: &std::path::Path, extra: &[&str]) -> Run {
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(config)
        .args([
            "--json",
            "--recheck-delay",
            "300ms",
            "--recheck-rounds",
            "3",
        ])
        .args(extra)
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    Run {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

fn counts(r: &Run) -> (u64, u64, u64) {
    let p = &r.json["pairs"][0];
    (
        p["missing"].as_u64().unwrap(),
        p["extra"].as_u64().unwrap(),
        p["different"].as_u64().unwrap(),
    )
}

/// A source and follower replicated to identity, then the replicator stopped.
async fn synced(n: usize) -> (Server, Server, Replicator) {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let docs: Vec<Document> = (0..n)
        .map(|i| doc! {"dataId": format!("k{i:05}"), "n": i as i32, "tag": "t", "nested": {"a": 1, "b": 2}})
        .collect();
    s.insert_many(docs).await.unwrap();
    let mut r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    r.terminate().await;
    (src, f1, r)
}

#[tokio::test]
async fn check_finds_exactly_the_injected_drift_and_repair_fixes_it() {
    let (_src, f1, r) = synced(3000).await;
    let cfg = r.config_path.clone();
    assert_eq!(check(&cfg, &[]).code, 0, "identical to start with");

    // Inject drift on the follower.
    let f = f1.coll("data").await;
    for k in ["k00010", "k01500", "k02999"] {
        f.delete_one(doc! {"dataId": k}).await.unwrap(); // 3 missing
    }
    f.update_one(doc! {"dataId": "k00020"}, doc! {"$set": {"tag": "changed"}})
        .await
        .unwrap();
    f.update_one(doc! {"dataId": "k00021"}, doc! {"$unset": {"tag": ""}})
        .await
        .unwrap();
    f.insert_one(doc! {"dataId": "zzz-extra"}).await.unwrap(); // 1 extra
    f.update_one(doc! {"dataId": "k00030"}, doc! {"$set": {"n": 30_i64}})
        .await
        .unwrap(); // int32 -> int64
    let mut reordered = f
        .find_one(doc! {"dataId": "k00040"})
        .await
        .unwrap()
        .unwrap();
    let nested = reordered.remove("nested").unwrap();
    let mut d = doc! {"_id": reordered.remove("_id").unwrap(), "nested": nested};
    d.extend(reordered);
    f.replace_one(doc! {"dataId": "k00040"}, d).await.unwrap(); // same fields, other order

    let run = check(&cfg, &[]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_eq!(counts(&run), (3, 1, 4), "{}", run.stdout);
    let p = &run.json["pairs"][0];
    let samples = |k: &str| -> Vec<String> {
        p[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        samples("samples_missing"),
        ["\"k00010\"", "\"k01500\"", "\"k02999\""]
    );
    assert_eq!(samples("samples_extra"), ["\"zzz-extra\""]);
    assert_eq!(
        samples("samples_different"),
        ["\"k00020\"", "\"k00021\"", "\"k00030\"", "\"k00040\""]
    );
    assert_eq!(p["checked"], 3000);

    // Field order can be ignored on request.
    let run = check(&cfg, &["--ignore-field-order"]);
    assert_eq!(counts(&run), (3, 1, 3), "{}", run.stdout);

    // Repair fixes everything, and a second check agrees.
    let run = check(&cfg, &["--repair"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.json["pairs"][0]["repaired"]["upserted"]
            .as_u64()
            .unwrap()
            >= 7
    );
    let run = check(&cfg, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(counts(&run), (0, 0, 0));
}

#[tokio::test]
async fn the_human_summary_names_counts_and_samples() {
    let (_src, f1, r) = synced(500).await;
    let f = f1.coll("data").await;
    f.delete_one(doc! {"dataId": "k00007"}).await.unwrap();
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&r.config_path)
        .args(["--recheck-delay", "100ms", "--recheck-rounds", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("500 documents checked"), "{text}");
    assert!(text.contains("1 missing, 0 extra, 0 different"), "{text}");
    assert!(text.contains("missing: \"k00007\""), "{text}");
    assert!(text.contains("DIFFERENCES FOUND"), "{text}");
}

#[tokio::test]
async fn a_check_during_continuous_replication_reports_no_false_differences() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let s = src.coll("data").await;
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1, &f2]), "n1");
    let writer = Writer::start(s.clone(), "w", 200);
    wait_for("some data replicated", CONVERGE, || async {
        f1.coll("data")
            .await
            .count_documents(doc! {})
            .await
            .unwrap()
            > 100
    })
    .await;
    for _ in 0..3 {
        let out = Command::new(bin())
            .args(["check", "--config"])
            .arg(&r.config_path)
            .args(["--json", "--range-size", "50"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "false differences under live writes: {text}"
        );
    }
    let _ = writer.stop().await;
    wait_identical(
        &s,
        &[f1.coll("data").await, f2.coll("data").await],
        CONVERGE,
    )
    .await;
    drop(r);
}

#[tokio::test]
async fn repair_while_the_replicator_runs_keeps_the_newest_values() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    for i in 0..200 {
        s.insert_one(doc! {"dataId": format!("k{i:03}"), "v": 0})
            .await
            .unwrap();
    }
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    // Drift on the follower, then the source keeps changing the same keys while repair runs.
    for i in 0..50 {
        f.update_one(
            doc! {"dataId": format!("k{i:03}")},
            doc! {"$set": {"v": -1}},
        )
        .await
        .unwrap();
    }
    let writer = Writer::start(s.clone(), "k0", 50);
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&r.config_path)
        .args(["--repair", "--json"])
        .output()
        .unwrap();
    let _ = writer.stop().await;
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Whatever raced, the follower ends with the source's newest documents.
    wait_identical(&s, &[f], CONVERGE).await;
    drop(r);
}

#[test]
fn a_bad_config_exits_2_and_an_unreachable_follower_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[source]\nuri = 1\n").unwrap();
    let run = check(&path, &[]);
    assert_eq!(run.code, 2);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("source.uri"), "{}", run.stderr);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let src = rt.block_on(Server::start());
    let text = format!(
        "[source]\nuri = \"{}\"\ndatabase = \"app\"\ncollections = [\"data\"]\n\n[[followers]]\nname = \"gone\"\nuri = \"mongodb://127.0.0.1:{}/?directConnection=true\"\n",
        src.uri(),
        1 // nothing listens on port 1: refused at once
    );
    std::fs::write(&path, text).unwrap();
    let run = check(&path, &[]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("follower gone"), "{}", run.stderr);
    // And --follower with an unknown name is a usage error.
    let run = check(&path, &["--follower", "nope"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    drop(src);
}

#[tokio::test]
async fn the_consistency_check_script_runs_check() {
    let (_src, _f1, r) = synced(10).await;
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/consistency-check.sh"
    ))
    .args(["--config"])
    .arg(&r.config_path)
    .env("MONGO_REPLICATOR_BIN", bin())
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("result: consistent"));
}

#[tokio::test]
async fn keys_of_mixed_types_are_compared_across_type_boundaries() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let mut docs: Vec<Document> = (0..15).map(|i| doc! {"dataId": i, "v": 1}).collect();
    docs.extend((0..15).map(|i| doc! {"dataId": format!("s{i:02}"), "v": 1}));
    s.insert_many(docs).await.unwrap();
    let mut r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    r.terminate().await;
    // Ranges of 10 keys: the second range runs from the int 9 to the string "s04".
    f.delete_one(doc! {"dataId": "s01"}).await.unwrap();
    f.update_one(doc! {"dataId": 12}, doc! {"$set": {"v": 2}})
        .await
        .unwrap();
    let run = check(&r.config_path, &["--range-size", "10"]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(counts(&run), (1, 0, 1), "{}", run.stdout);
}

/// `--metrics-file` writes the outcome for node_exporter's textfile collector: the run's
/// time, whether it found the followers identical, the time of the last run that did (kept
/// across a run that finds differences, or cannot run), and the differences.
#[tokio::test]
async fn the_metrics_file_keeps_the_last_success_across_failed_checks() {
    let (src, f1, r) = synced(20).await;
    let file = r.dir.path().join("check.prom");
    let arg = file.to_str().unwrap().to_string();
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
    };
    let run = check(&r.config_path, &["--metrics-file", &arg]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let first = std::fs::read_to_string(&file).unwrap();
    let success = value(
        &first,
        "mongo_replicator_check_last_success_timestamp_seconds ",
    )
    .expect("a success time");
    assert_eq!(
        value(&first, "mongo_replicator_check_last_run_consistent "),
        Some(1.0)
    );

    // A difference: the run fails, the last success is kept, the difference is counted.
    f1.coll("data")
        .await
        .insert_one(doc! {"dataId": "stray"})
        .await
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let run = check(&r.config_path, &["--metrics-file", &arg]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let second = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        value(&second, "mongo_replicator_check_last_run_consistent "),
        Some(0.0)
    );
    assert_eq!(
        value(
            &second,
            "mongo_replicator_check_last_success_timestamp_seconds "
        ),
        Some(success),
        "{second}"
    );
    assert!(
        value(
            &second,
            "mongo_replicator_check_last_run_timestamp_seconds "
        )
        .unwrap()
            > success,
        "{second}"
    );
    assert_eq!(
        value(
            &second,
            "mongo_replicator_check_differences{collection=\"data\",follower=\"f1\",kind=\"extra\"} "
        ),
        Some(1.0),
        "{second}"
    );

    // A check that cannot run (the source is gone) still records its run, and keeps the
    // last success.
    drop(src);
    let run = check(&r.config_path, &["--metrics-file", &arg]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    let third = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        value(
            &third,
            "mongo_replicator_check_last_success_timestamp_seconds "
        ),
        Some(success),
        "{third}"
    );
    assert_eq!(
        value(&third, "mongo_replicator_check_last_run_consistent "),
        Some(0.0)
    );
}

/// Review: a check of one follower must not record a success (or clear the differences) for
/// every follower, so `--metrics-file` refuses `--follower`.
#[test]
fn the_metrics_file_refuses_a_check_of_one_follower() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[source]\nuri = \"mongodb://127.0.0.1:1/\"\ndatabase = \"app\"\ncollections = [\"data\"]\n\n[[followers]]\nname = \"f1\"\nuri = \"mongodb://127.0.0.1:2/\"\n",
    )
    .unwrap();
    let file = dir.path().join("check.prom");
    let run = check(
        &path,
        &["--follower", "f1", "--metrics-file", file.to_str().unwrap()],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("--follower"), "{}", run.stderr);
    assert!(!file.exists());
}

/// A config for `check` alone (no replicator runs): source `app.data` against `followers`,
/// with `follower_extra` in every `[[followers]]` table and `extra` at the end.
fn check_config(
    src: &Server,
    followers: &[&Server],
    follower_extra: &str,
    extra: &str,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ConfigBuilder::new(src, followers).extra(extra);
    cfg.follower_extra = follower_extra.to_string();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, cfg.render(dir.path(), free_port())).unwrap();
    (dir, path)
}

/// Copies every document of `from` into `to` as it is (same `_id`s, same bytes).
async fn copy_documents(from: &Collection<Document>, to: &Collection<Document>) {
    let docs = dump(from).await;
    if !docs.is_empty() {
        to.insert_many(docs).await.unwrap();
    }
}

/// The follower's indexes by name.
async fn indexes(coll: &Collection<Document>) -> std::collections::HashMap<String, Document> {
    let db = coll.client().database(&coll.namespace().db);
    let listed: Vec<Document> = db
        .run_cursor_command(doc! {"listIndexes": coll.name()})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    listed
        .into_iter()
        .map(|i| (i.get_str("name").unwrap().to_string(), i))
        .collect()
}

async fn options(coll: &Collection<Document>) -> Document {
    let db = coll.client().database(&coll.namespace().db);
    let listed: Vec<Document> = db
        .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": coll.name()}})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    listed[0].get_document("options").unwrap().clone()
}

fn num(b: Option<&mongodb::bson::Bson>) -> Option<i64> {
    b.and_then(|b| match b {
        mongodb::bson::Bson::Int32(i) => Some(*i as i64),
        mongodb::bson::Bson::Int64(i) => Some(*i),
        mongodb::bson::Bson::Double(d) => Some(*d as i64),
        _ => None,
    })
}

fn lines(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.to_string()).collect())
        .unwrap_or_default()
}

/// Indexes created on the source after the follower was replicated are differences named
/// in the reports and the metrics file; repair creates them on the follower with their
/// options; the replicator's own key index is never a difference and survives the repair.
#[tokio::test]
async fn indexes_missing_on_the_follower_are_found_and_repaired_with_their_options() {
    let (src, f1, r) = synced(50).await;
    let cfg = r.config_path.clone();
    let f = f1.coll("data").await;
    assert!(
        indexes(&f).await.contains_key("mongo_replicator_dataId"),
        "the replicator made its key index (else this test proves nothing about it)"
    );
    let run = check(&cfg, &[]);
    assert_eq!(
        run.code, 0,
        "its own key index is no difference: {}",
        run.stdout
    );
    assert_eq!(run.json["pairs"][0]["index_differences"], 0);

    let s = src.coll("data").await;
    let db = s.client().database("app");
    db.run_command(doc! {"createIndexes": "data", "indexes": [
        {"key": {"n": 1}, "name": "n_unique", "unique": true, "partialFilterExpression": {"n": {"$gt": 5}}},
        {"key": {"t": 1}, "name": "t_ttl", "expireAfterSeconds": 3600},
        {"key": {"tag": 1, "n": -1}, "name": "tag_sparse", "sparse": true},
    ]})
    .await
    .unwrap();

    let run = check(&cfg, &[]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let p = &run.json["pairs"][0];
    assert_eq!(p["index_differences"], 3, "{}", run.stdout);
    assert_eq!(p["option_differences"], 0, "{}", run.stdout);
    assert_eq!(counts(&run), (0, 0, 0), "documents still agree");
    let names: Vec<&str> = p["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["n_unique", "t_ttl", "tag_sparse"], "{}", run.stdout);
    assert!(!run.stdout.contains("mongo_replicator_"), "{}", run.stdout);
    // The text report names them too.
    let (code, text) = run_check(&cfg, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("3 index and 0 collection option difference(s)")
            && text.contains("index `n_unique` missing on the follower"),
        "{text}"
    );
    // And the metrics file counts them under kind="index".
    let prom = r.dir.path().join("check.prom");
    let run = check(&cfg, &["--metrics-file", prom.to_str().unwrap()]);
    assert_eq!(run.code, 1);
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(
        text.contains(
            "mongo_replicator_check_differences{collection=\"data\",follower=\"f1\",kind=\"index\"} 3"
        ),
        "{text}"
    );

    // Under `replication.indexes = false` the follower's indexes are its own.
    let (_dir, own) = check_config(&src, &[&f1], "", "[replication]\nindexes = false");
    let run = check(&own, &[]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);

    let run = check(&cfg, &["--repair"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let changed = lines(&run.json["pairs"][0]["repaired"]["metadata_changed"]);
    assert_eq!(changed.len(), 3, "{changed:?}");
    let got = indexes(&f).await;
    let n = &got["n_unique"];
    assert_eq!(n.get_bool("unique"), Ok(true), "{n}");
    assert_eq!(
        n.get_document("partialFilterExpression").unwrap(),
        &doc! {"n": {"$gt": 5}}
    );
    assert_eq!(num(got["t_ttl"].get("expireAfterSeconds")), Some(3600));
    assert_eq!(got["tag_sparse"].get_bool("sparse"), Ok(true));
    assert_eq!(
        got["tag_sparse"].get_document("key").unwrap(),
        &doc! {"tag": 1, "n": -1}
    );
    assert!(got.contains_key("mongo_replicator_dataId"), "{got:?}");
    let run = check(&cfg, &[]);
    assert_eq!(run.code, 0, "{}", run.stdout);

    // An index only the follower has is a difference too, and repair drops it.
    f.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! {"extra": 1})
            .build(),
    )
    .await
    .unwrap();
    let run = check(&cfg, &[]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(run.json["pairs"][0]["metadata"][0]["name"], "extra_1");
    assert_eq!(check(&cfg, &["--repair"]).code, 0);
    assert!(!indexes(&f).await.contains_key("extra_1"));
}

/// A validator that differs is found and repaired in place (collMod), documents untouched.
#[tokio::test]
async fn a_validator_that_differs_is_found_and_repaired_by_coll_mod() {
    let (src, f1, r) = synced(20).await;
    let cfg = r.config_path.clone();
    let s = src.coll("data").await;
    s.client()
        .database("app")
        .run_command(doc! {
            "collMod": "data",
            "validator": {"$jsonSchema": {"required": ["dataId"]}},
            "validationLevel": "moderate",
        })
        .await
        .unwrap();
    let run = check(&cfg, &[]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let p = &run.json["pairs"][0];
    assert_eq!(p["option_differences"], 2, "{}", run.stdout);
    assert_eq!(p["index_differences"], 0, "{}", run.stdout);
    assert_eq!(p["metadata"][0]["kind"], "options");
    assert_eq!(p["metadata"][0]["name"], "validator");

    let run = check(&cfg, &["--repair"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let changed = lines(&run.json["pairs"][0]["repaired"]["metadata_changed"]);
    assert!(changed.iter().any(|c| c.contains("collMod")), "{changed:?}");
    let f = f1.coll("data").await;
    let o = options(&f).await;
    assert_eq!(
        o.get_document("validator").unwrap(),
        &doc! {"$jsonSchema": {"required": ["dataId"]}}
    );
    assert_eq!(o.get_str("validationLevel"), Ok("moderate"));
    assert_eq!(f.count_documents(doc! {}).await.unwrap(), 20);
    assert_eq!(check(&cfg, &[]).code, 0);
}

/// Options that cannot change in place (a collation) are differences that repair reports
/// as not fixed, leaving the follower's documents alone: exit 1.
#[tokio::test]
async fn an_option_that_cannot_change_in_place_is_reported_not_fixed() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let sdb = src.client().await.database("app");
    sdb.run_command(doc! {"create": "data", "collation": {"locale": "fr", "strength": 2}})
        .await
        .unwrap();
    let s = sdb.collection::<Document>("data");
    s.insert_many((0..10).map(|i| doc! {"dataId": format!("k{i}"), "v": i}))
        .await
        .unwrap();
    let f = f1.coll("data").await;
    copy_documents(&s, &f).await;
    let (_dir, cfg) = check_config(&src, &[&f1], "", "");

    let run = check(&cfg, &[]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.json["pairs"][0]["metadata"][0]["name"], "collation");
    let run = check(&cfg, &["--repair"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let unfixed = lines(&run.json["pairs"][0]["repaired"]["metadata_unfixed"]);
    assert!(
        unfixed
            .iter()
            .any(|u| u.contains("collation") && u.contains("cannot be changed in place")),
        "{unfixed:?}"
    );
    assert_eq!(f.count_documents(doc! {}).await.unwrap(), 10);
    assert!(options(&f).await.get("collation").is_none());
}

/// An archive follower (`apply_deletes = false`) keeps what the source deleted: those
/// documents are not differences and repair leaves them. Missing and different documents
/// still are, and get repaired. A unique index the archive's kept documents violate cannot
/// be built: repair says so, naming the index, and exits 1.
#[tokio::test]
async fn an_archive_follower_keeps_documents_the_source_deleted() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    s.insert_many((0..30).map(|i| doc! {"dataId": format!("k{i:02}"), "u": i}))
        .await
        .unwrap();
    let f = f1.coll("data").await;
    copy_documents(&s, &f).await;
    // Deleted on the source since; the archive keeps them.
    s.delete_many(doc! {"dataId": {"$in": ["k03", "k17", "k29"]}})
        .await
        .unwrap();
    let (_dir, cfg) = check_config(&src, &[&f1], "apply_deletes = false", "");
    let run = check(&cfg, &[]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.json["pairs"][0]["archive"], true);
    assert_eq!(counts(&run), (0, 0, 0));
    assert_eq!(run.json["pairs"][0]["follower_count"], 30);
    // The same follower as an ordinary one: three extra.
    let (_dir2, plain) = check_config(&src, &[&f1], "", "");
    assert_eq!(counts(&check(&plain, &[])), (0, 3, 0));

    // A missing and a different document are still found, and repair keeps the archive,
    // even an old document under a key the source has again (under a new `_id`).
    let old_k10 = f.find_one(doc! {"dataId": "k10"}).await.unwrap().unwrap();
    s.delete_one(doc! {"dataId": "k10"}).await.unwrap();
    s.insert_one(doc! {"dataId": "k10", "u": 10}).await.unwrap();
    f.delete_one(doc! {"dataId": "k05"}).await.unwrap();
    f.update_one(doc! {"dataId": "k06"}, doc! {"$set": {"u": -6}})
        .await
        .unwrap();
    let run = check(&cfg, &[]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(counts(&run), (2, 0, 1), "{}", run.stdout);
    let run = check(&cfg, &["--repair"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.json["pairs"][0]["repaired"]["deleted"], 0);
    assert_eq!(f.count_documents(doc! {}).await.unwrap(), 31);
    assert!(
        f.find_one(doc! {"_id": old_k10.get("_id").unwrap().clone()})
            .await
            .unwrap()
            .is_some(),
        "repair deleted an archived document"
    );
    assert_eq!(
        f.count_documents(doc! {"dataId": {"$in": ["k03", "k17", "k29"]}})
            .await
            .unwrap(),
        3
    );

    // The source gets a unique index that a kept document violates.
    s.insert_one(doc! {"dataId": "new", "u": 3}).await.unwrap();
    f.insert_one(doc! {"_id": s.find_one(doc! {"dataId": "new"}).await.unwrap().unwrap().get("_id").unwrap().clone(), "dataId": "new", "u": 3}).await.unwrap();
    unique_index_on(&s, "u").await;
    let run = check(&cfg, &["--repair"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let unfixed = lines(&run.json["pairs"][0]["repaired"]["metadata_unfixed"]);
    assert!(
        unfixed
            .iter()
            .any(|u| u.contains("`u_1`") && u.contains("11000")),
        "{unfixed:?}"
    );
    assert_eq!(f.count_documents(doc! {}).await.unwrap(), 32);
}
