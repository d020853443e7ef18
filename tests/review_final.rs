//! A hostile review of the shared reader and the metadata work: collections that appear on
//! the source only while streaming, drop and recreate, stale follower documents, a follower
//! that refuses the key index, and handovers under churn and kill -9 restarts.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Document};

const CONVERGE: Duration = Duration::from_secs(45);

async fn key_index_on(f: &mongodb::Collection<Document>) -> bool {
    use futures::TryStreamExt;
    let Ok(c) = f.list_indexes().await else {
        return false;
    };
    let ix: Vec<_> = c.try_collect().await.unwrap_or_default();
    ix.iter()
        .any(|i| i.keys.keys().next().map(String::as_str) == Some("dataId"))
}

async fn created_by_insert_while_streaming(indexes: bool) {
    let (src, f1) = (Server::start().await, Server::start().await);
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["data".into()];
    let cfg = cfg.extra(&format!("[replication]\nindexes = {indexes}\n"));
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s = src.coll("data").await;
    for i in 0..20 {
        s.insert_one(doc! {"dataId": format!("d{i}"), "n": i})
            .await
            .unwrap();
    }
    s.update_one(doc! {"dataId": "d3"}, doc! {"$set": {"n": 100}})
        .await
        .unwrap();
    s.delete_one(doc! {"dataId": "d4"}).await.unwrap();
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    assert!(
        key_index_on(&f).await,
        "the follower has no key index on dataId"
    );
    // A second wave after a kill -9 restart.
    drop(r);
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    s.insert_one(doc! {"dataId": "late", "n": 1}).await.unwrap();
    s.delete_one(doc! {"dataId": "d5"}).await.unwrap();
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    drop(r);
}

#[tokio::test]
async fn a_literal_collection_created_by_insert_while_streaming_replicates_with_indexes() {
    created_by_insert_while_streaming(true).await;
}

#[tokio::test]
async fn a_literal_collection_created_by_insert_while_streaming_replicates_without_indexes() {
    created_by_insert_while_streaming(false).await;
}

/// The source collection is dropped and recreated by an insert (no explicit create), with
/// some of the same dataIds under new _ids, while streaming.
#[tokio::test]
async fn a_collection_dropped_and_recreated_by_insert_converges() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    for i in 0..10 {
        s.insert_one(doc! {"dataId": format!("d{i}"), "gen": 1})
            .await
            .unwrap();
    }
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["data".into()];
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    s.drop().await.unwrap();
    for i in 5..15 {
        s.insert_one(doc! {"dataId": format!("d{i}"), "gen": 2})
            .await
            .unwrap();
    }
    s.delete_one(doc! {"dataId": "d7"}).await.unwrap();
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    assert!(key_index_on(&f).await, "the follower lost its key index");
    drop(r);
}

/// Writes begin right at the start, before and during the handover, with delete and
/// re-insert of the same dataId (new _id), so that a replay of the shared reader's events
/// from before the pipeline's own position would show.
#[tokio::test]
async fn churn_through_the_first_handover_converges() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let o = src.coll("other").await;
    for i in 0..10 {
        s.insert_one(doc! {"dataId": format!("d{i}"), "v": 0})
            .await
            .unwrap();
        o.insert_one(doc! {"dataId": format!("o{i}"), "v": 0})
            .await
            .unwrap();
    }
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["data".into(), "other".into()];
    let r = Replicator::start(&cfg, "n1");
    let s2 = s.clone();
    let o2 = o.clone();
    let w = tokio::spawn(async move {
        for round in 1..60 {
            for i in 0..10 {
                let k = format!("d{i}");
                if (round + i) % 3 == 0 {
                    s2.delete_one(doc! {"dataId": &k}).await.unwrap();
                } else if s2.count_documents(doc! {"dataId": &k}).await.unwrap() == 0 {
                    s2.insert_one(doc! {"dataId": &k, "v": round})
                        .await
                        .unwrap();
                } else {
                    s2.update_one(doc! {"dataId": &k}, doc! {"$set": {"v": round}})
                        .await
                        .unwrap();
                }
            }
            // The other collection only moves rarely: its pipeline hands over with no own event.
            if round % 20 == 0 {
                o2.delete_one(doc! {"dataId": format!("o{}", round / 20)})
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    r.wait_leader(Duration::from_secs(60)).await;
    w.await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    wait_identical(&o, &[f1.coll("other").await], CONVERGE).await;
    drop(r);
}

/// Heavy churn on three collections (insert, update, delete, re-insert the same dataId)
/// while the replicator is killed -9 and restarted every few seconds: every restart is a
/// new handover from each pipeline's own stream to the shared reader, under load, with the
/// test server's post-batch tokens running ahead of writes not yet visible.
#[tokio::test]
async fn churn_across_kill9_restarts_and_handovers_converges() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let names = ["a", "b", "c"];
    let mut cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nbatch_max_docs = 8\n");
    cfg.collections = names.iter().map(|c| c.to_string()).collect();
    for n in names {
        src.coll(n)
            .await
            .insert_one(doc! {"dataId": "seed"})
            .await
            .unwrap();
    }
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, n) in names.iter().enumerate() {
        for lane in 0..2u64 {
            let s = src.coll(n).await;
            let stop = stop.clone();
            writers.push(tokio::spawn(async move {
                let mut i: u64 = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let k = format!("k{lane}-{}", i % 25);
                    match (i + w as u64) % 4 {
                        0 => {
                            let _ = s.delete_one(doc! {"dataId": &k}).await;
                        }
                        1 => {
                            let _ = s.insert_one(doc! {"dataId": &k, "v": i as i64}).await;
                        }
                        _ => {
                            let _ = s
                                .update_one(doc! {"dataId": &k}, doc! {"$set": {"v": i as i64}})
                                .await;
                        }
                    }
                    if i % 50 == 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
    }
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        r.kill9();
        r.spawn();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    r.wait_leader(Duration::from_secs(60)).await;
    for n in names {
        wait_identical(
            &src.coll(n).await,
            &[f1.coll(n).await],
            Duration::from_secs(90),
        )
        .await;
    }
    drop(r);
}

/// The follower holds documents from an earlier life; the source collection does not exist
/// at start and is created by an insert later. The initial sync must leave the follower
/// identical to the source (the stale documents gone), as it does when the source exists.
async fn stale_follower_docs_with_missing_source(indexes: bool) {
    let (src, f1) = (Server::start().await, Server::start().await);
    let f = f1.coll("data").await;
    for i in 0..5 {
        f.insert_one(doc! {"dataId": format!("stale{i}")})
            .await
            .unwrap();
    }
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["data".into()];
    let cfg = cfg.extra(&format!("[replication]\nindexes = {indexes}\n"));
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "new"}).await.unwrap();
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    drop(r);
}

#[tokio::test]
async fn stale_follower_documents_go_when_the_source_collection_is_missing_with_indexes() {
    stale_follower_docs_with_missing_source(true).await;
}

#[tokio::test]
async fn stale_follower_documents_go_when_the_source_collection_is_missing_without_indexes() {
    stale_follower_docs_with_missing_source(false).await;
}

/// The follower cannot take the key index (its collection already has 64 indexes). The
/// pair must either replicate anyway or stop with a reason; it must not stall silently.
#[tokio::test]
async fn a_follower_that_refuses_the_key_index_does_not_stall_silently() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let f = f1.coll("data").await;
    let fdb = f1.client().await.database("app");
    let ix: Vec<Document> = (0..63)
        .map(|i| doc! {"key": {format!("f{i}"): 1}, "name": format!("f{i}_1")})
        .collect();
    fdb.run_command(doc! {"createIndexes": "data", "indexes": ix})
        .await
        .unwrap();
    let s = src.coll("data").await;
    for i in 0..5 {
        s.insert_one(doc! {"dataId": format!("d{i}")})
            .await
            .unwrap();
    }
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["data".into()];
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    let ok = poll_until(CONVERGE, || async {
        let st = r.status().await;
        let stopped = st
            .as_ref()
            .is_some_and(|st| st["followers"][0]["state"] == "stopped");
        stopped || f.count_documents(doc! {}).await.unwrap_or(0) == 5
    })
    .await;
    let st = r.status().await;
    assert!(
        ok,
        "neither replicated nor stopped with a reason; status: {st:?}"
    );
    let _ = f;
    drop(r);
}

/// Many concurrent single inserts (each a distinct document) on one collection while the
/// replicator is killed -9 every second: a resume from a post-batch token recorded while a
/// write was assigned a time but not yet visible would lose that document for good.
#[tokio::test]
async fn concurrent_inserts_across_rapid_kill9_lose_nothing() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["a".into(), "b".into()];
    let a = src.coll("a").await;
    a.insert_one(doc! {"dataId": "seed"}).await.unwrap();
    src.coll("b")
        .await
        .insert_one(doc! {"dataId": "seed"})
        .await
        .unwrap();
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..8u64 {
        let (a, b, stop) = (src.coll("a").await, src.coll("b").await, stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let c = if t % 2 == 0 { &a } else { &b };
                c.insert_one(doc! {"dataId": format!("t{t}-{i}")})
                    .await
                    .unwrap();
                // Sparse enough that the streams go idle between writes.
                tokio::time::sleep(Duration::from_millis(30 + 7 * t)).await;
            }
        }));
    }
    for k in 0..15u64 {
        tokio::time::sleep(Duration::from_millis(700 + 97 * (k % 5))).await;
        r.kill9();
        r.spawn();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    r.wait_leader(Duration::from_secs(60)).await;
    wait_identical(&a, &[f1.coll("a").await], Duration::from_secs(60)).await;
    wait_identical(
        &src.coll("b").await,
        &[f1.coll("b").await],
        Duration::from_secs(60),
    )
    .await;
    drop(r);
}
