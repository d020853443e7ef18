//! Robustness: nothing stalls for good. Stopped pipelines restart the documented ways,
//! servers that hang count as down, and a node stops in bounded time whatever the servers do.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::doc;

const CONVERGE: Duration = Duration::from_secs(60);

async fn post(r: &Replicator, path: &str) -> u16 {
    reqwest::Client::new()
        .post(r.url(path))
        .send()
        .await
        .map(|resp| resp.status().as_u16())
        .unwrap_or(0)
}

async fn first_state(r: &Replicator) -> Option<String> {
    r.status()
        .await
        .and_then(|s| s["followers"][0]["state"].as_str().map(str::to_string))
}

#[tokio::test]
async fn a_pipeline_stopped_by_missing_key_fail_restarts_on_resync_with_the_fixed_document() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nmissing_key = \"fail\"\n");
    let r = Replicator::start(&cfg, "n1");
    wait_for("streaming", CONVERGE, || async {
        first_state(&r).await.as_deref() == Some("streaming")
    })
    .await;
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "a"}).await.unwrap();
    s.insert_one(doc! {"_id": "bad", "other": 1}).await.unwrap();
    s.insert_one(doc! {"dataId": "b"}).await.unwrap();
    r.wait_stopped_with("no `dataId` field", CONVERGE).await;
    // Fixed on the source; then the documented remedy.
    s.update_one(doc! {"_id": "bad"}, doc! {"$set": {"dataId": "fixed"}})
        .await
        .unwrap();
    assert_eq!(post(&r, "/resync/f1").await, 202);
    s.insert_one(doc! {"dataId": "c"}).await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    wait_for("streaming again", CONVERGE, || async {
        first_state(&r).await.as_deref() == Some("streaming")
    })
    .await;
}

#[tokio::test]
async fn after_a_restart_a_document_fixed_on_the_source_goes_on_with_its_current_version() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nmissing_key = \"fail\"\n");
    let mut r = Replicator::start(&cfg, "n1");
    wait_for("streaming", CONVERGE, || async {
        first_state(&r).await.as_deref() == Some("streaming")
    })
    .await;
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "a"}).await.unwrap();
    s.insert_one(doc! {"_id": "bad", "other": 1}).await.unwrap();
    s.insert_one(doc! {"dataId": "b"}).await.unwrap();
    r.wait_stopped_with("no `dataId` field", CONVERGE).await;
    s.update_one(doc! {"_id": "bad"}, doc! {"$set": {"dataId": "fixed"}})
        .await
        .unwrap();
    // The insert event replays the original, keyless document; the pipeline goes on with
    // the source's current version instead of failing on it again.
    r.terminate().await;
    r.spawn();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
}

#[tokio::test]
async fn a_pipeline_stopped_by_history_lost_fail_restarts_on_resync() {
    if using_mongod() {
        eprintln!("skipped: needs the test server's oplog pruning command");
        return;
    }
    let src = Server::start_with(ServerOpts {
        oplog_max_entries: Some(20),
        ..Default::default()
    })
    .await;
    let f1 = Server::start().await;
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\non_history_lost = \"fail\"\n");
    let mut r = Replicator::start(&cfg, "n1");
    let s = src.coll("data").await;
    for i in 0..10 {
        s.insert_one(doc! {"dataId": format!("a{i}")})
            .await
            .unwrap();
    }
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    r.terminate().await;
    for i in 0..100 {
        s.insert_one(doc! {"dataId": format!("b{i}")})
            .await
            .unwrap();
    }
    s.delete_one(doc! {"dataId": "a3"}).await.unwrap();
    src.client()
        .await
        .database("admin")
        .run_command(doc! {"secantusAdmin.pruneOplog": 1})
        .await
        .unwrap();
    r.spawn();
    r.wait_stopped_with("history lost", CONVERGE).await;
    // The documented remedy, through the CLI, against the running node.
    let out = std::process::Command::new(bin())
        .args(["resync", "--config"])
        .arg(&r.config_path)
        .args(["--follower", "f1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
}

#[tokio::test]
async fn a_hung_follower_counts_as_down_and_shutdown_is_bounded() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let cfg =
        ConfigBuilder::new(&src, &[&f1, &f2]).extra("[replication]\nwrite_timeout = \"2s\"\n");
    let mut r = Replicator::start(&cfg, "n1");
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "before"}).await.unwrap();
    wait_identical(
        &s,
        &[f1.coll("data").await, f2.coll("data").await],
        CONVERGE,
    )
    .await;

    // f2 hangs: it neither answers nor closes its connections.
    f2.pause();
    let writer = Writer::start(s.clone(), "w", 100);
    wait_for("f2 shown down", CONVERGE, || async {
        r.status().await.is_some_and(|st| {
            st["followers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["name"] == "f2" && f["state"] == "down")
        })
    })
    .await;
    let n = writer.stop().await;
    assert!(n > 0);
    // The healthy follower is not held back.
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;

    // SIGTERM stops the node within the lease ttl plus a few seconds, though f2 hangs.
    let started = Instant::now();
    let status = r.terminate().await;
    let took = started.elapsed();
    assert!(status.is_some(), "the node did not exit");
    assert!(took < Duration::from_secs(3 + 5), "shutdown took {took:?}");

    // Back: f2 catches up from its own checkpoint.
    f2.resume();
    r.spawn();
    wait_identical(
        &s,
        &[f1.coll("data").await, f2.coll("data").await],
        CONVERGE,
    )
    .await;
}

async fn quarantined_of(r: &Replicator, follower: &str) -> u64 {
    r.status()
        .await
        .and_then(|s| {
            s["followers"]
                .as_array()?
                .iter()
                .find(|f| f["name"] == follower)
                .and_then(|f| f["quarantined"].as_u64())
        })
        .unwrap_or(u64::MAX)
}

fn check_cmd(config: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(config)
        .args(["--recheck-delay", "300ms", "--recheck-rounds", "2"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn a_document_a_follower_refuses_is_quarantined_and_the_pair_goes_on() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    // f1 has a unique index the source does not have: it refuses a second "x@example".
    f1.coll("data")
        .await
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"email": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1, &f2]);
    let r = Replicator::start(&cfg, "n1");
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "a", "email": "x@example"})
        .await
        .unwrap();
    s.insert_one(doc! {"dataId": "b", "email": "x@example"})
        .await
        .unwrap();
    s.insert_one(doc! {"dataId": "c", "email": "c@example"})
        .await
        .unwrap();
    // The healthy follower gets everything; f1 everything but b, and goes on streaming.
    wait_identical(&s, &[f2.coll("data").await], CONVERGE).await;
    let f = f1.coll("data").await;
    wait_for("c reaches f1", CONVERGE, || async {
        f.count_documents(doc! {"dataId": "c"}).await.unwrap() == 1
    })
    .await;
    assert_eq!(f.count_documents(doc! {"dataId": "b"}).await.unwrap(), 0);
    wait_for("f1 reports one quarantined document", CONVERGE, || async {
        quarantined_of(&r, "f1").await == 1
    })
    .await;
    assert_eq!(quarantined_of(&r, "f2").await, 0);
    // Not stopped, not down: streaming on.
    wait_for("f1 streaming", CONVERGE, || async {
        r.status().await.is_some_and(|st| {
            st["followers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["name"] == "f1" && f["state"] == "streaming")
        })
    })
    .await;
    // Recorded on the follower, with what an operator needs.
    let rec = f1
        .client()
        .await
        .database("mongo_replicator")
        .collection::<mongodb::bson::Document>("quarantine")
        .find_one(doc! {})
        .await
        .unwrap()
        .expect("a quarantine record");
    assert_eq!(rec.get_str("collection").unwrap(), "data");
    assert_eq!(rec.get_str("key").unwrap(), "b");
    assert!(rec.get_document("_id").unwrap().get("id").is_some());
    assert!(rec.get_str("error").unwrap().contains("11000"), "{rec}");
    assert!(rec.get_timestamp("cluster_time").is_ok(), "{rec}");
    let m = reqwest::get(r.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.lines()
            .any(|l| l.starts_with("mongo_replicator_quarantined_documents")
                && l.contains("follower=\"f1\"")
                && l.ends_with(" 1")),
        "{m}"
    );
    let log = r.log();
    assert_eq!(log.matches("it is quarantined").count(), 1, "{log}");
    // The CLI status shows it too.
    let out = std::process::Command::new(bin())
        .args(["status", "--config"])
        .arg(&r.config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("QUARANTINED"), "{text}");

    // check lists it (a difference); once the follower accepts it, --repair clears it.
    let (code, out) = check_cmd(&r.config_path, &["--follower", "f1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("quarantined") && out.contains("\"b\""),
        "{out}"
    );
    f.drop_index("email_1").await.unwrap();
    let (code, out) = check_cmd(&r.config_path, &["--follower", "f1", "--repair"]);
    assert_eq!(code, 0, "{out}");
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    let (code, out) = check_cmd(&r.config_path, &["--follower", "f1"]);
    assert_eq!(code, 0, "{out}");
    // The running node notices within its idle checkpoint interval.
    wait_for("status shows the quarantine empty", CONVERGE, || async {
        quarantined_of(&r, "f1").await == 0
    })
    .await;
}

#[tokio::test]
async fn a_quarantined_document_leaves_the_quarantine_when_a_later_version_applies() {
    let (src, f1) = (Server::start().await, Server::start().await);
    f1.coll("data")
        .await
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"email": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "a", "email": "x"})
        .await
        .unwrap();
    s.insert_one(doc! {"dataId": "b", "email": "x"})
        .await
        .unwrap();
    wait_for("b quarantined", CONVERGE, || async {
        quarantined_of(&r, "f1").await == 1
    })
    .await;
    // Fixed on the source: the next version applies and the record goes.
    s.update_one(doc! {"dataId": "b"}, doc! {"$set": {"email": "y"}})
        .await
        .unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    wait_for("quarantine empty", CONVERGE, || async {
        quarantined_of(&r, "f1").await == 0
    })
    .await;
}

#[tokio::test]
async fn under_on_rejected_stop_the_pair_stops_and_a_resync_restarts_it() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let f = f1.coll("data").await;
    f.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! {"email": 1})
            .options(
                mongodb::options::IndexOptions::builder()
                    .unique(true)
                    .build(),
            )
            .build(),
    )
    .await
    .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\non_rejected = \"stop\"\n");
    let r = Replicator::start(&cfg, "n1");
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "a", "email": "x"})
        .await
        .unwrap();
    s.insert_one(doc! {"dataId": "b", "email": "x"})
        .await
        .unwrap();
    r.wait_stopped_with("refused the document", CONVERGE).await;
    f.drop_index("email_1").await.unwrap();
    assert_eq!(post(&r, "/resync/f1").await, 202);
    wait_identical(&s, &[f], CONVERGE).await;
}

#[tokio::test]
async fn a_unique_value_swap_on_the_source_converges_without_help() {
    // Found by review: source and follower share a unique index on `email`. Swapping two
    // values on the source (three valid writes) replays on the follower as upserts of the
    // newest documents, which collide with the follower's stale copy of the other one. The
    // pair must neither stall nor leave the follower different.
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    for c in [&s, &f] {
        c.create_index(
            mongodb::IndexModel::builder()
                .keys(doc! {"email": 1})
                .options(
                    mongodb::options::IndexOptions::builder()
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .unwrap();
    }
    s.insert_one(doc! {"dataId": "a", "email": "x@example.com"})
        .await
        .unwrap();
    s.insert_one(doc! {"dataId": "b", "email": "y@example.com"})
        .await
        .unwrap();
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    for (k, email) in [
        ("a", "tmp@example.com"),
        ("b", "x@example.com"),
        ("a", "y@example.com"),
    ] {
        s.update_one(doc! {"dataId": k}, doc! {"$set": {"email": email}})
            .await
            .unwrap();
    }
    s.insert_one(doc! {"dataId": "c", "email": "z@example.com"})
        .await
        .unwrap();
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    wait_for("quarantine empty", CONVERGE, || async {
        quarantined_of(&r, "f1").await == 0
    })
    .await;
    // And with the swap split across batches: each write applied on its own.
    for (k, email) in [
        ("a", "tmp@example.com"),
        ("b", "y@example.com"),
        ("a", "x@example.com"),
    ] {
        s.update_one(doc! {"dataId": k}, doc! {"$set": {"email": email}})
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    wait_for("quarantine empty again", CONVERGE, || async {
        quarantined_of(&r, "f1").await == 0
    })
    .await;
}

/// A document of `mb` MiB whose large field is replaced: the update's event would carry the
/// document and the update description, twice the size, past the 16 MB limit on MongoDB.
async fn large_field_replaced(mb: usize) {
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nwrite_timeout = \"120s\"\n");
    let r = Replicator::start(&cfg, "n1");
    wait_for("streaming", CONVERGE, || async {
        first_state(&r).await.as_deref() == Some("streaming")
    })
    .await;
    let s = src.coll("data").await;
    let size = mb * 1024 * 1024;
    s.insert_one(doc! {"dataId": "big", "blob": "a".repeat(size)})
        .await
        .unwrap();
    s.update_one(
        doc! {"dataId": "big"},
        doc! {"$set": {"blob": "b".repeat(size)}},
    )
    .await
    .unwrap();
    s.insert_one(doc! {"dataId": "after"}).await.unwrap();
    // The pair never wedges: later writes arrive. The large document arrives too, unless
    // the follower cannot take it in a transaction at all (a small cache): then it is
    // quarantined with the reason, never silently dropped.
    let f = f1.coll("data").await;
    wait_for(
        "a later write arrives",
        Duration::from_secs(180),
        || async {
            f.count_documents(doc! {"dataId": "after"})
                .await
                .unwrap_or(0)
                == 1
        },
    )
    .await;
    let arrived = f
        .count_documents(doc! {"dataId": "big", "blob": {"$regex": "^b"}})
        .await
        .unwrap()
        == 1;
    if !arrived {
        assert_eq!(quarantined_of(&r, "f1").await, 1, "{}", r.log());
        assert!(r.log().contains("388"), "{}", r.log());
    } else {
        wait_identical(&s, &[f], CONVERGE).await;
    }
    eprintln!(
        "{mb} MiB document: {}",
        if arrived { "replicated" } else { "quarantined" }
    );
}

#[tokio::test]
async fn a_large_document_whose_large_field_is_replaced_arrives() {
    large_field_replaced(
        std::env::var("MR_LARGE_DOC_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(15),
    )
    .await;
}
