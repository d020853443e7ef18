//! Robustness: nothing stalls for good. Stopped pipelines restart the documented ways,
//! servers that hang count as down, and a node stops in bounded time whatever the servers do.

mod common;

/// Tests that give a follower a unique index of its own (the source has none) to make it
/// refuse documents: with `indexes = false` a follower's indexes are its own to manage (with
/// the default, the replicator makes them the source's).
const OWN_INDEXES: &str = "[replication]\nindexes = false\n";

use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::{doc, Document};

const CONVERGE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_pipeline_stopped_by_missing_key_fail_restarts_on_resync_with_the_fixed_document() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nmissing_key = \"fail\"\n");
    let r = Replicator::start(&cfg, "n1");
    r.wait_streaming(CONVERGE).await;
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "a"}).await.unwrap();
    s.insert_one(doc! {"_id": "bad", "other": 1}).await.unwrap();
    s.insert_one(doc! {"dataId": "b"}).await.unwrap();
    r.wait_stopped_with("no `dataId` field", CONVERGE).await;
    // Fixed on the source; then the documented remedy.
    s.update_one(doc! {"_id": "bad"}, doc! {"$set": {"dataId": "fixed"}})
        .await
        .unwrap();
    assert_eq!(r.post("/resync/f1").await, 202);
    s.insert_one(doc! {"dataId": "c"}).await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    wait_for("streaming again", CONVERGE, || async {
        r.first_state().await.as_deref() == Some("streaming")
    })
    .await;
}

#[tokio::test]
async fn after_a_restart_a_document_fixed_on_the_source_goes_on_with_its_current_version() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nmissing_key = \"fail\"\n");
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_streaming(CONVERGE).await;
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
    let Some((src, f1, r)) = history_lost_case("on_history_lost = \"fail\"").await else {
        return;
    };
    let s = src.coll("data").await;
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

#[tokio::test]
async fn a_document_a_follower_refuses_is_quarantined_and_the_pair_goes_on() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    // f1 has a unique index the source does not have: it refuses a second "x@example".
    f1.unique_index("email").await;
    let cfg = ConfigBuilder::new(&src, &[&f1, &f2]).extra(OWN_INDEXES);
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
        r.quarantined("f1").await == 1
    })
    .await;
    assert_eq!(r.quarantined("f2").await, 0);
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
        .quarantine_records()
        .await
        .into_iter()
        .next()
        .expect("a quarantine record");
    assert_eq!(rec.get_str("collection").unwrap(), "data");
    assert_eq!(rec.get_str("key").unwrap(), "b");
    assert!(rec.get_document("_id").unwrap().get("id").is_some());
    assert!(rec.get_str("error").unwrap().contains("11000"), "{rec}");
    assert!(rec.get_timestamp("cluster_time").is_ok(), "{rec}");
    let m = r.metrics_text().await;
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
    let (code, out) = run_check(&r.config_path, &["--follower", "f1"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("quarantined") && out.contains("\"b\""),
        "{out}"
    );
    f.drop_index("email_1").await.unwrap();
    let (code, out) = run_check(&r.config_path, &["--follower", "f1", "--repair"]);
    assert_eq!(code, 0, "{out}");
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    let (code, out) = run_check(&r.config_path, &["--follower", "f1"]);
    assert_eq!(code, 0, "{out}");
    // The running node notices within its idle checkpoint interval.
    wait_for("status shows the quarantine empty", CONVERGE, || async {
        r.quarantined("f1").await == 0
    })
    .await;
}

/// A follower with a unique index on `email` that the source lacks, and a node that has
/// quarantined `b` there (it holds the same email as `a`).
async fn one_quarantined() -> (Server, Server, Replicator) {
    let (src, f1) = (Server::start().await, Server::start().await);
    f1.unique_index("email").await;
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]).extra(OWN_INDEXES), "n1");
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "a", "email": "x"})
        .await
        .unwrap();
    s.insert_one(doc! {"dataId": "b", "email": "x"})
        .await
        .unwrap();
    wait_for("b quarantined", CONVERGE, || async {
        r.quarantined("f1").await == 1
    })
    .await;
    (src, f1, r)
}

#[tokio::test]
async fn a_quarantined_document_leaves_the_quarantine_when_a_later_version_applies() {
    let (src, f1, r) = one_quarantined().await;
    let s = src.coll("data").await;
    // Fixed on the source: the next version applies and the record goes.
    s.update_one(doc! {"dataId": "b"}, doc! {"$set": {"email": "y"}})
        .await
        .unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    wait_for("quarantine empty", CONVERGE, || async {
        r.quarantined("f1").await == 0
    })
    .await;
}

#[tokio::test]
async fn under_on_rejected_stop_the_pair_stops_and_a_resync_restarts_it() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let f = f1.coll("data").await;
    f1.unique_index("email").await;
    let cfg = ConfigBuilder::new(&src, &[&f1])
        .extra("[replication]\non_rejected = \"stop\"\nindexes = false\n");
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
    assert_eq!(r.post("/resync/f1").await, 202);
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
    // Source and follower share the unique index, as an app's own database would.
    src.unique_index("email").await;
    f1.unique_index("email").await;
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
        r.quarantined("f1").await == 0
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
        r.quarantined("f1").await == 0
    })
    .await;
}

/// A document of `mb` MiB whose large field is replaced: the update's event would carry the
/// document and the update description, twice the size, past the 16 MB limit on MongoDB.
async fn large_field_replaced(mb: usize) {
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nwrite_timeout = \"120s\"\n");
    let r = Replicator::start(&cfg, "n1");
    r.wait_streaming(CONVERGE).await;
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
        assert_eq!(r.quarantined("f1").await, 1, "{}", r.log());
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

#[tokio::test]
async fn a_backlog_larger_than_one_reply_is_caught_up() {
    // Found by the memory benchmark: a server that does not cap a change-stream batch at
    // 16 MB (the test server) sent a backlog as one reply past the driver's 48 MB limit, and
    // the pair retried the same read forever. The stream asks for fewer events per batch.
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nbatch_max_docs = 100000\n");
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_streaming(CONVERGE).await;
    r.terminate().await;
    let s = src.coll("data").await;
    // 52 MB in all, past the driver's limit for one reply.
    let payload = "x".repeat(2000);
    for chunk in 0..26 {
        let docs: Vec<mongodb::bson::Document> = (0..1000)
            .map(|i| doc! {"dataId": format!("k{chunk}-{i}"), "payload": &payload})
            .collect();
        s.insert_many(docs).await.unwrap();
    }
    r.spawn();
    wait_identical(&s, &[f1.coll("data").await], Duration::from_secs(240)).await;
}

// Regression tests from the second review: each failed before its fix.

/// Found by review: one batch with many documents the follower refuses for good (a unique
/// index the source lacks). Each refusal used to cost a retry of the whole rest of the
/// batch, all within one `write_timeout`, so the batch never completed. Now each refusal
/// costs one transaction, each with its own time limit, and later writes arrive.
#[tokio::test]
async fn many_refused_documents_in_one_batch_are_quarantined_in_bounded_time() {
    let (src, f1) = (Server::start().await, Server::start().await);
    f1.unique_index("email").await;
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]).extra(OWN_INDEXES), "n1");
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "first", "email": "same"})
        .await
        .unwrap();
    let f = f1.coll("data").await;
    wait_for("first arrives", CONVERGE, || async {
        f.count_documents(doc! {"dataId": "first"}).await.unwrap() == 1
    })
    .await;
    let n: usize = std::env::var("MR_REFUSED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let docs: Vec<_> = (0..n)
        .map(|i| doc! {"dataId": format!("dup{i:05}"), "email": "same"})
        .collect();
    s.insert_many(docs).await.unwrap();
    s.insert_one(doc! {"dataId": "after", "email": "other"})
        .await
        .unwrap();
    let started = Instant::now();
    let arrived = poll_until(Duration::from_secs(150), || async {
        f.count_documents(doc! {"dataId": "after"})
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    let log = r.log();
    let timeouts = log.matches("did not answer within").count();
    eprintln!(
        "arrived={arrived} after {:?}; batch timeouts in log: {timeouts}; quarantined={}",
        started.elapsed(),
        r.quarantined("f1").await
    );
    assert!(
        arrived,
        "a write after {n} refused documents never reached the follower in 150s (the pair is stuck retrying one batch); {timeouts} timeouts; state: {:?}",
        r.status().await.map(|s| s["followers"][0].clone())
    );
}

/// Found by review: a pipeline stopped for an unfenced (standalone) follower, asked to
/// resync, spun: every failed mark re-requested a resync, taken at once. It must wait.
#[tokio::test]
async fn a_resync_of_a_pipeline_stopped_for_an_unfenced_follower_does_not_spin() {
    let src = Server::start().await;
    let f1 = Server::start_with(ServerOpts {
        standalone: true,
        ..Default::default()
    })
    .await;
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    r.wait_stopped_with("cannot run transactions", CONVERGE)
        .await;
    let before = r.log().matches("pipeline stopped").count();
    assert_eq!(r.post("/resync/f1").await, 202);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = r.log().matches("pipeline stopped").count();
    let log_len = r.log().len();
    eprintln!("'pipeline stopped' lines: {before} before the resync request, {after} 5s after; log {log_len} bytes");
    assert!(
        after - before < 20,
        "the stopped pipeline looped {} times in 5 s after one resync request",
        after - before
    );
}

/// Found by review: `mongo-replicator resync` run where no node answers marks the follower,
/// and says the running leader copies it; a pipeline the leader held stopped never looked
/// at the mark. It must.
#[tokio::test]
async fn an_offline_resync_restarts_a_pipeline_the_running_leader_holds_stopped() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nmissing_key = \"fail\"\n");
    let mut nodes = start_nodes(&cfg, 2);
    let leader = loop {
        let l = leaders(&nodes).await;
        if l.len() == 1 {
            break l[0];
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let other = 1 - leader;
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "a"}).await.unwrap();
    s.insert_one(doc! {"_id": "bad", "other": 1}).await.unwrap();
    nodes[leader]
        .wait_stopped_with("no `dataId` field", CONVERGE)
        .await;
    // Fixed on the source; the standby's host is down; the operator runs the CLI there.
    s.update_one(doc! {"_id": "bad"}, doc! {"$set": {"dataId": "fixed"}})
        .await
        .unwrap();
    nodes[other].kill9();
    let out = std::process::Command::new(bin())
        .args(["resync", "--config"])
        .arg(&nodes[other].config_path)
        .args(["--follower", "f1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("resync CLI: {:?} {text}", out.status);
    assert!(out.status.success());
    s.insert_one(doc! {"dataId": "c"}).await.unwrap();
    let ok = poll_until(Duration::from_secs(40), || async {
        f1.coll("data")
            .await
            .count_documents(doc! {"dataId": "c"})
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    assert!(
        ok,
        "the leader's pipeline stayed stopped after `resync` said it would copy: {:?}",
        nodes[leader]
            .status()
            .await
            .map(|s| s["followers"][0].clone())
    );
}

/// Found by review: read-ahead and batches counted the bytes of documents only, so deletes
/// of documents with large `_id`s piled up in memory while the follower was slow. Their
/// keys count now: memory stays near batch_max_bytes (1 MiB here).
#[tokio::test]
async fn deletes_of_large_ids_are_bounded_in_bytes() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1])
        .extra("[replication]\nbatch_max_bytes = \"1MiB\"\nwrite_timeout = \"120s\"\n");
    let s = src.coll("data").await;
    let n: usize = std::env::var("MR_BIGIDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1100);
    let id_kib: usize = 40;
    let r = Replicator::start(&cfg, "n1");
    let f = f1.coll("data").await;
    for i in 0..n {
        let id = format!("{i:06}{}", "x".repeat(id_kib * 1024));
        s.insert_one(doc! {"_id": id, "dataId": format!("k{i}")})
            .await
            .unwrap();
        if i % 50 == 49 {
            // Keep the source's getMore replies small (the test server does not cap them).
            wait_for("follower keeps up", Duration::from_secs(120), || async {
                f.count_documents(doc! {}).await.unwrap_or(0) == (i + 1) as u64
            })
            .await;
        }
    }
    wait_for("copied", Duration::from_secs(120), || async {
        f.count_documents(doc! {}).await.unwrap_or(0) == n as u64
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = r.peak_rss_kib().unwrap();
    // The follower is slow for a while: changes queue up in the replicator, as designed,
    // but only up to the byte budget... except deletes.
    f1.pause();
    let ids: Vec<String> = (0..n)
        .map(|i| format!("{i:06}{}", "x".repeat(id_kib * 1024)))
        .collect();
    for id in &ids {
        s.delete_one(doc! {"_id": id}).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak = r.peak_rss_kib().unwrap();
    f1.resume();
    eprintln!("peak RSS after inserts {base} KiB, with {n} deletes queued {peak} KiB");
    wait_for("deleted", Duration::from_secs(180), || async {
        f.count_documents(doc! {}).await.unwrap_or(1) == 0
    })
    .await;
    assert!(
        peak < base + 24 * 1024,
        "{n} queued deletes of {id_kib} KiB _ids raised peak memory from {} MiB to {} MiB with batch_max_bytes = 1MiB",
        base / 1024,
        peak / 1024
    );
}

/// Found by review: a quarantined document deleted on the source while the node was down,
/// then the follower re-copied: its record stayed for ever, and check reported a difference
/// on a follower identical to the source. A copy now starts the quarantine afresh.
#[tokio::test]
async fn a_resync_starts_the_quarantine_afresh() {
    let (src, f1, mut r) = one_quarantined().await;
    let s = src.coll("data").await;
    r.terminate().await;
    s.delete_one(doc! {"dataId": "b"}).await.unwrap();
    let out = std::process::Command::new(bin())
        .args(["resync", "--config"])
        .arg(&r.config_path)
        .args(["--follower", "f1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    r.spawn();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    s.insert_one(doc! {"dataId": "c", "email": "c"})
        .await
        .unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let q = r.quarantined("f1").await;
    let (code, text) = run_check(&r.config_path, &[]);
    assert!(
        q == 0 && code == 0,
        "follower identical to the source, yet quarantined={q} and check exits {code}: {text}"
    );
}

/// Found by review: a transaction too large for the follower's cache (388) reported as a
/// statement's write error (not a command error) was retried whole, for ever. It is split.
#[tokio::test]
async fn a_batch_too_large_for_the_cache_reported_as_a_write_error_is_split() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    let n = 1100usize;
    for i in 0..n {
        let id = format!("{i:06}{}", "x".repeat(40 * 1024));
        s.insert_one(doc! {"_id": id, "dataId": format!("k{i}")})
            .await
            .unwrap();
        if i % 50 == 49 {
            wait_for("follower keeps up", Duration::from_secs(120), || async {
                f.count_documents(doc! {}).await.unwrap_or(0) == (i + 1) as u64
            })
            .await;
        }
    }
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    s.delete_many(doc! {}).await.unwrap();
    s.insert_one(doc! {"dataId": "after"}).await.unwrap();
    let ok = poll_until(Duration::from_secs(120), || async {
        f.count_documents(doc! {"dataId": "after"})
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    let log = r.log();
    eprintln!(
        "388 retries in log: {}; 'splitting' lines: {}",
        log.matches("(code 388) retry_in").count(),
        log.matches("splitting the batch").count()
    );
    assert!(
        ok,
        "a write after one large delete batch never arrived in 120s; follower holds {} of the deleted documents",
        f.count_documents(doc! {"dataId": {"$ne": "after"}}).await.unwrap()
    );
}

/// Found by the third review: one batch of documents the follower refuses (a unique index the source lacks), each
/// well below any size limit, whose keys are large: all their quarantine records are
/// written in the batch's last transaction, in one command. The pair must go on.
#[tokio::test]
async fn refused_documents_with_large_keys_do_not_stall_the_pair() {
    let (src, f1) = (Server::start().await, Server::start().await);
    f1.unique_index("email").await;
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra(OWN_INDEXES);
    let mut r = Replicator::start(&cfg, "n1");
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    s.insert_one(doc! {"dataId": "first", "email": "same"})
        .await
        .unwrap();
    wait_for("first arrives", CONVERGE, || async {
        f.count_documents(doc! {"dataId": "first"}).await.unwrap() == 1
    })
    .await;
    r.terminate().await;
    let n: usize = std::env::var("MR_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let kib: usize = std::env::var("MR_KIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    for i in 0..n {
        s.insert_one(
            doc! {"dataId": format!("dup{i:03}{}", "k".repeat(kib * 1024)), "email": "same"},
        )
        .await
        .unwrap();
    }
    s.insert_one(doc! {"dataId": "after", "email": "other"})
        .await
        .unwrap();
    r.spawn();
    let arrived = poll_until(Duration::from_secs(120), || async {
        f.count_documents(doc! {"dataId": "after"})
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    let log = r.log();
    let tail: String = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("splitting"))
        .map(|l| l.chars().take(400).collect::<String>())
        .collect::<Vec<_>>()
        .iter()
        .rev()
        .take(6)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!(
        "arrived={arrived}; status: {:?}\nlast warnings:\n{tail}",
        r.status().await.map(|s| s["followers"][0].clone())
    );
    assert!(
        arrived,
        "{n} refused documents with {kib} KiB keys stalled the pair for good"
    );
}

/// Found by the third review: a quarantined document whose fixed version applies in a part of a split batch (not the
/// last) keeps its quarantine record: the README says a later version that applies clears it.
#[tokio::test]
async fn a_fixed_document_applied_in_an_early_part_leaves_the_quarantine() {
    let (src, f1, mut r) = one_quarantined().await;
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    r.terminate().await;
    // b is fixed on the source; then, in the same batch, 20 new duplicates, then a fix of them.
    s.update_one(doc! {"dataId": "b"}, doc! {"$set": {"email": "y"}})
        .await
        .unwrap();
    for i in 0..20 {
        s.insert_one(doc! {"dataId": format!("d{i:02}"), "email": "x"})
            .await
            .unwrap();
    }
    r.spawn();
    wait_for("b arrives fixed", CONVERGE, || async {
        f.count_documents(doc! {"dataId": "b", "email": "y"})
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    // The duplicates are deleted on the source: the follower is then identical.
    s.delete_many(doc! {"dataId": {"$regex": "^d"}})
        .await
        .unwrap();
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let recs = f1.quarantine_records().await;
    let keys: Vec<String> = recs
        .iter()
        .map(|d| d.get("key").map(|k| k.to_string()).unwrap_or_default())
        .collect();
    let (code, text) = run_check(&r.config_path, &[]);
    assert!(
        !keys.iter().any(|k| k.contains("\"b\"")),
        "b applied in its fixed version, identical on the follower, yet still quarantined: {keys:?}; check exits {code}: {text}"
    );
}

#[tokio::test]
async fn a_hung_source_holds_nothing_and_shutdown_is_bounded() {
    // Every source call has a time limit too: with the source hanging (SIGSTOP), the leader
    // cannot renew and steps down, its pipelines stop, and SIGTERM still ends the node within
    // the lease ttl plus a few seconds. When the source returns, replication goes on.
    let (src, f1) = (Server::start().await, Server::start().await);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nwrite_timeout = \"2s\"\n");
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_streaming(CONVERGE).await;
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "before"}).await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;

    src.pause();
    wait_for("the leader steps down", CONVERGE, || async {
        r.role().await.as_deref() == Some("standby")
    })
    .await;
    let started = Instant::now();
    let status = r.terminate().await;
    let took = started.elapsed();
    assert!(status.is_some(), "the node did not exit");
    assert!(took < Duration::from_secs(3 + 5), "shutdown took {took:?}");

    src.resume();
    r.spawn();
    s.insert_one(doc! {"dataId": "after"}).await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
}

/// Found by the fourth review: the server's duplicate-key message quotes the whole duplicate
/// value, and quarantine records kept it whole (over a megabyte each), so their writes timed
/// out or did not fit, and the pair stalled. Messages are bounded now; every refused
/// document is quarantined, and later writes arrive.
#[tokio::test]
async fn refused_documents_with_a_large_duplicate_value_are_quarantined_compactly() {
    let (src, f1) = (Server::start().await, Server::start().await);
    f1.unique_index("email").await;
    let mut r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]).extra(OWN_INDEXES), "n1");
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    let big = "e".repeat(1200 * 1024);
    s.insert_one(doc! {"dataId": "first", "email": &big})
        .await
        .unwrap();
    wait_for("first arrives", CONVERGE, || async {
        f.count_documents(doc! {"dataId": "first"}).await.unwrap() == 1
    })
    .await;
    r.terminate().await;
    for i in 0..12 {
        s.insert_one(doc! {"dataId": format!("dup{i:03}"), "email": &big})
            .await
            .unwrap();
    }
    s.insert_one(doc! {"dataId": "after", "email": "other"})
        .await
        .unwrap();
    r.spawn();
    wait_for(
        "a later write arrives",
        Duration::from_secs(120),
        || async {
            f.count_documents(doc! {"dataId": "after"})
                .await
                .unwrap_or(0)
                == 1
        },
    )
    .await;
    // The batch goes on after "after" (refused documents move to its end): wait for it.
    wait_for("status counts every refused document", CONVERGE, || async {
        r.quarantined("f1").await == 12
    })
    .await;
    let records = f1.quarantine_records().await;
    let on_follower = f
        .count_documents(doc! {"dataId": {"$regex": "^dup"}})
        .await
        .unwrap();
    assert_eq!(
        records.len(),
        12,
        "every refused document is quarantined ({on_follower} dups on the follower)"
    );
    for rec in &records {
        assert!(
            rec.get_str("error").unwrap().len() < 2000,
            "{}",
            rec.get_str("error").unwrap().len()
        );
        assert_eq!(rec.get_i32("code").unwrap(), 11000);
    }
    assert_eq!(r.log().matches("it is quarantined").count(), 12);
}

/// Prompted by the performance bench, where one batch's transaction outlived
/// `write_timeout` on every retry (the follower ran the update 30 s, then failed it): a
/// batch that outlives `write_timeout` on a follower that otherwise answers is split (here
/// and for the batches after it), and its abandoned transaction is ended on the server. The
/// split is required to happen here, and the follower to end identical.
#[tokio::test]
async fn a_batch_that_outlives_write_timeout_is_split_and_the_follower_converges() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let pad = "p".repeat(100 * 1024);
    let docs: Vec<Document> = (0..400).map(|i| doc! {"dataId": i, "pad": &pad}).collect();
    for chunk in docs.chunks(50) {
        s.insert_many(chunk.to_vec()).await.unwrap();
    }
    // One copy batch holds all 400 documents (40 MB), more than the follower commits
    // within 300 ms.
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra(
        "[replication]\nwrite_timeout = \"300ms\"\nbatch_max_bytes = \"256MiB\"\nbatch_max_docs = 1000\n",
    );
    let r = Replicator::start(&cfg, "n1");
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    assert!(
        r.log()
            .contains("a batch outlived write_timeout; splitting it"),
        "the batch never needed splitting; the test does not test anything"
    );
}
