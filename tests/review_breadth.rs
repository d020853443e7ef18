//! Hostile review of the breadth work (shared reader, selection, meta, archive, pause):
//! each test is a scenario in which a follower should end identical to the source (or, for
//! an archive, keep what the source deleted), and states what it found when it did not.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Document};

const CONVERGE: Duration = Duration::from_secs(45);

/// A document inserted before the source collection got its validator stays on the source
/// (MongoDB validates writes, not existing documents). The copy gives the follower the
/// validator *before* any document and then inserts every document without
/// `bypassDocumentValidation`, so the follower refuses the older documents: they are
/// quarantined and the follower never holds them.
#[tokio::test]
async fn documents_that_predate_the_source_validator_are_copied() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    for i in 0..5 {
        s.insert_one(doc! {"dataId": format!("old{i}"), "n": i})
            .await
            .unwrap();
    }
    let sdb = src.client().await.database("app");
    run_cmd(
        &sdb,
        doc! {"collMod": "data", "validator": {"x": {"$exists": true}}},
    )
    .await;
    s.insert_one(doc! {"dataId": "new", "x": 1}).await.unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]);
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    drop(r);
}

/// Index and option DDL is applied from the source's *current* definitions, not those at
/// the event's position. A follower catching up over [createIndex a, insert D (no x),
/// collMod validator x] gets the later validator at the first event, before D, and then
/// refuses D.
#[tokio::test]
async fn a_validator_added_after_a_document_is_not_applied_before_that_document() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "a", "n": 1}).await.unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]);
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    // The node stops (or lags); the source goes on.
    r.terminate().await;
    let sdb = src.client().await.database("app");
    run_cmd(
        &sdb,
        doc! {"createIndexes": "data", "indexes": [{"key": {"n": 1}, "name": "n_1"}]},
    )
    .await;
    s.insert_one(doc! {"dataId": "d", "n": 2}).await.unwrap();
    run_cmd(
        &sdb,
        doc! {"collMod": "data", "validator": {"x": {"$exists": true}}},
    )
    .await;
    s.insert_one(doc! {"dataId": "e", "n": 3, "x": 1})
        .await
        .unwrap();
    r.spawn();
    r.wait_leader(Duration::from_secs(60)).await;
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    drop(r);
}

/// Review: a capped collection stalled its pair for good (writes to capped collections
/// cannot be in transactions, code 263, retried for ever), and its evictions make no change
/// events, so a follower would drift. Capped collections are out of scope: one named in the
/// config stops its pair at once with the reason, one matched by a glob is not picked up,
/// and neither holds anything else back.
#[tokio::test]
async fn a_capped_collection_is_refused_clearly_and_holds_back_nothing() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let sdb = src.client().await.database("app");
    run_cmd(
        &sdb,
        doc! {"create": "capped", "capped": true, "size": 100_000, "max": 3},
    )
    .await;
    run_cmd(
        &sdb,
        doc! {"create": "log2", "capped": true, "size": 100_000},
    )
    .await;
    src.coll("capped")
        .await
        .insert_one(doc! {"dataId": "c1"})
        .await
        .unwrap();
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "d1"}).await.unwrap();
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["data".into(), "capped".into(), "log*".into()];
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    wait_for(
        "the capped pair stopped with the reason",
        CONVERGE,
        || async {
            r.status().await.is_some_and(|st| {
                st["followers"][0]["collections"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| {
                        c["collection"] == "capped"
                            && c["state"] == "stopped"
                            && c["last_error"].as_str().is_some_and(|e| {
                                e.contains("capped collections are not replicated")
                            })
                    })
            })
        },
    )
    .await;
    s.insert_one(doc! {"dataId": "d2"}).await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    let st = r.status().await.unwrap();
    let colls: Vec<&str> = st["followers"][0]["collections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["collection"].as_str())
        .collect();
    assert!(
        !colls.contains(&"log2"),
        "a capped collection was picked up: {colls:?}"
    );
    drop(r);
}

/// An archive follower keeps what the source deletes, and its copy after a source drop
/// removes nothing (remove_extras is skipped). But when the source collection comes back
/// with another collation, the copy's `recreate` drops the archive's collection: every
/// archived document is gone.
#[tokio::test]
async fn an_archive_keeps_its_documents_when_the_source_collection_is_recreated_with_a_collation() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    for i in 0..5 {
        s.insert_one(doc! {"dataId": format!("d{i}")})
            .await
            .unwrap();
    }
    let cfg = ConfigBuilder::new(&src, &[&f1]).follower_line("f1", "apply_deletes = false");
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    s.delete_one(doc! {"dataId": "d1"}).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(f.count_documents(doc! {"dataId": "d1"}).await.unwrap(), 1);
    r.terminate().await;
    // The source collection is dropped and created again with a collation.
    s.drop().await.unwrap();
    let sdb = src.client().await.database("app");
    run_cmd(
        &sdb,
        doc! {"create": "data", "collation": {"locale": "en", "strength": 2}},
    )
    .await;
    s.insert_one(doc! {"dataId": "fresh"}).await.unwrap();
    r.spawn();
    r.wait_leader(Duration::from_secs(60)).await;
    // The follower collection cannot take the source's new collation in place, and the
    // replicator never drops a follower collection: the pair stops with the reason, and the
    // archive keeps every document it had.
    wait_for("the pair stops with the reason", CONVERGE, || async {
        r.status().await.is_some_and(|st| {
            st["followers"][0]["state"] == "stopped"
                && st["followers"][0]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("collation") && e.contains("never drops"))
        })
    })
    .await;
    let left: Vec<String> = dump(&f)
        .await
        .iter()
        .filter_map(|d| d.get_str("dataId").ok().map(str::to_string))
        .collect();
    assert!(
        left.contains(&"d1".to_string()) && left.contains(&"d0".to_string()),
        "the archive lost the documents it kept: it holds {left:?}"
    );
    drop(r);
}

/// Collections picked up by `["*"]` whose names are odd (dots, spaces, quotes, unicode, a
/// name that looks like a glob) replicate like any other; `system.*` and views do not.
#[tokio::test]
async fn oddly_named_collections_found_by_a_glob_replicate() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let sdb = src.client().await.database("app");
    sdb.collection::<Document>("seed")
        .insert_one(doc! {"dataId": "s"})
        .await
        .unwrap();
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["*".into()];
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    let names = ["a.b", "we ird", "q\"uote'", "ünï", "[x]", "*", "a..b"];
    for n in names {
        sdb.collection::<Document>(n)
            .insert_one(doc! {"dataId": format!("in {n}")})
            .await
            .unwrap_or_else(|e| panic!("{n}: {e}"));
    }
    run_cmd(&sdb, doc! {"create": "v", "viewOn": "seed", "pipeline": []}).await;
    let fdb = f1.client().await.database("app");
    for n in names {
        wait_identical(
            &sdb.collection::<Document>(n),
            &[fdb.collection::<Document>(n)],
            CONVERGE,
        )
        .await;
    }
    // More writes after the copies reach every follower collection too.
    for n in names {
        sdb.collection::<Document>(n)
            .insert_one(doc! {"dataId": format!("later {n}")})
            .await
            .unwrap();
    }
    for n in names {
        wait_identical(
            &sdb.collection::<Document>(n),
            &[fdb.collection::<Document>(n)],
            CONVERGE,
        )
        .await;
    }
    let fnames = fdb.list_collection_names().await.unwrap();
    assert!(
        !fnames.iter().any(|n| n.starts_with("system.") || n == "v"),
        "{fnames:?}"
    );
    assert!(r.status().await.is_some());
    drop(r);
}

/// The handover between a pipeline's own stream and the shared reader, under transactions
/// spanning two collections, with small batches and followers that hang (SIGSTOP) now and
/// then so that their pipelines detach and rejoin repeatedly.
#[tokio::test]
async fn transactions_across_collections_survive_repeated_detach_and_rejoin() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let mut cfg = ConfigBuilder::new(&src, &[&f1, &f2]).extra(
        "[replication]\nbatch_max_docs = 8\nbatch_max_bytes = \"1MiB\"\nwrite_timeout = \"3s\"",
    );
    cfg.collections = vec!["a".into(), "b".into()];
    let client = src.client().await;
    let (a, b) = (src.coll("a").await, src.coll("b").await);
    a.insert_one(doc! {"dataId": "seed"}).await.unwrap();
    b.insert_one(doc! {"dataId": "seed"}).await.unwrap();
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(Duration::from_secs(60)).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (client, a, b, stop) = (client.clone(), a.clone(), b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i: u64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let k = format!("k{}", i % 40);
                let mut s = client.start_session().await.unwrap();
                if s.start_transaction().await.is_err() {
                    continue;
                }
                let res = async {
                    a.update_one(doc! {"dataId": &k}, doc! {"$set": {"v": i as i64}})
                        .upsert(true)
                        .session(&mut s)
                        .await?;
                    b.update_one(doc! {"dataId": &k}, doc! {"$set": {"v": i as i64}})
                        .upsert(true)
                        .session(&mut s)
                        .await?;
                    if i % 7 == 0 {
                        let d = format!("k{}", (i / 7) % 40);
                        a.delete_one(doc! {"dataId": &d}).session(&mut s).await?;
                        b.delete_one(doc! {"dataId": &d}).session(&mut s).await?;
                    }
                    s.commit_transaction().await
                }
                .await;
                if res.is_err() {
                    let _ = s.abort_transaction().await;
                }
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    for round in 0..4 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let f = if round % 2 == 0 { &f1 } else { &f2 };
        f.pause();
        tokio::time::sleep(Duration::from_secs(2)).await;
        f.resume();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let fa = [f1.coll("a").await, f2.coll("a").await];
    let fb = [f1.coll("b").await, f2.coll("b").await];
    wait_identical(&a, &fa, Duration::from_secs(90)).await;
    wait_identical(&b, &fb, Duration::from_secs(90)).await;
    drop(r);
}
