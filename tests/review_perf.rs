//! Hostile review of the commits after 3a0c9d1 (handover hold, reader resize, raw batch
//! commands and slow-transaction splitting, capped/archive/recreate mends). Each test is a
//! black-box scenario on real servers; a failing test states what it found.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Document};

const CONVERGE: Duration = Duration::from_secs(60);

async fn stopped_with_reason(r: &Replicator) -> bool {
    r.status().await.is_some_and(|st| {
        st["followers"][0]["state"] == "stopped"
            && st["followers"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("never drops a follower collection"))
    })
}

async fn is_capped(f: &Server, coll: &str) -> bool {
    use futures::TryStreamExt;
    let specs: Vec<Document> = f
        .client()
        .await
        .database("app")
        .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": coll}})
        .await
        .expect("listCollections")
        .try_collect()
        .await
        .expect("collect");
    specs
        .first()
        .and_then(|d| d.get_document("options").ok())
        .is_some_and(|o| o.get_bool("capped").unwrap_or(false))
}

/// Review: a copy whose follower collection differed in an option that cannot change in
/// place (here: capped on the follower, plain on the source) dropped the follower collection
/// to create it anew. The drop is not fenced: a leader paused (SIGSTOP) between its lease
/// check and the drop woke up after another node had copied the follower, and dropped that
/// copy. The replicator now never drops a follower collection: every leader, stale or not,
/// stops the pair with the reason and leaves the collection as it is; the operator drops it,
/// resyncs, and the follower ends identical.
#[tokio::test]
async fn no_leader_ever_drops_a_follower_collection_a_difference_that_needs_it_stops_the_pair() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let docs: Vec<Document> = (0..200).map(|i| doc! {"dataId": i, "v": "x"}).collect();
    s.insert_many(docs).await.unwrap();
    let fdb = f1.client().await.database("app");
    fdb.run_command(doc! {"create": "data", "capped": true, "size": 1_048_576})
        .await
        .expect("capped follower collection");
    f1.coll("data")
        .await
        .insert_one(doc! {"dataId": "follower's own"})
        .await
        .unwrap();

    let extra = "[replication]\nindexes = true\nwrite_timeout = \"5s\"\n";
    let mut cfg_a = ConfigBuilder::new(&src, &[&f1]).extra(extra);
    cfg_a.ttl = "4s";
    let mut cfg_b = ConfigBuilder::new(&src, &[&f1]).extra(extra);
    cfg_b.ttl = "4s";
    let a = Replicator::start(&cfg_a, "node-a");
    a.wait_leader(Duration::from_secs(60)).await;
    let b = Replicator::start(&cfg_b, "node-b");
    wait_for(
        "the leader stops the pair with the reason",
        CONVERGE,
        || stopped_with_reason(&a),
    )
    .await;

    // A stale leader: paused, another takes over, the old one wakes up.
    a.signal(libc::SIGSTOP);
    b.wait_leader(Duration::from_secs(30)).await;
    wait_for("the new leader stops the pair too", CONVERGE, || {
        stopped_with_reason(&b)
    })
    .await;
    a.signal(libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Nothing dropped the follower's collection or its document.
    assert!(
        is_capped(&f1, "data").await,
        "the follower collection was recreated"
    );
    assert_eq!(
        f1.coll("data")
            .await
            .count_documents(doc! {"dataId": "follower's own"})
            .await
            .unwrap(),
        1
    );

    // The operator drops it and resyncs: the follower ends identical.
    fdb.run_command(doc! {"drop": "data"}).await.unwrap();
    let (code, out) = run_cli("resync", &b.config_path, &["--follower", "f1"], &[]);
    assert_eq!(code, 0, "{out}");
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    assert!(!is_capped(&f1, "data").await);
}

/// Item 4 (archive followers never recreate). An archive follower whose collection cannot
/// take the source's documents in a transaction (it is capped; the source's is not) used to
/// be recreated by the copy; now it is never recreated, and nothing else resolves it: every
/// batch fails with OperationNotSupportedInTransaction (263), classed transient, so the
/// pair is `down` for good, retrying, while the log promises that "a resync of this follower
/// recreates the collection" (a resync does not, for an archive). Expected: the pair either
/// replicates or stops with the reason.
#[tokio::test]
async fn an_archive_follower_whose_collection_cannot_be_recreated_stalls_for_good() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let docs: Vec<Document> = (0..20).map(|i| doc! {"dataId": i, "v": "x"}).collect();
    s.insert_many(docs).await.unwrap();
    f1.client()
        .await
        .database("app")
        .run_command(doc! {"create": "data", "capped": true, "size": 1_048_576})
        .await
        .expect("capped follower collection");
    let cfg = ConfigBuilder::new(&src, &[&f1])
        .follower_line("f1", "apply_deletes = false")
        .extra("[replication]\nindexes = true\n");
    let r = Replicator::start(&cfg, "n1");
    let fc = f1.coll("data").await;
    let settled = poll_until(Duration::from_secs(45), || async {
        let stopped = r.first_state().await.as_deref() == Some("stopped");
        let n = fc.count_documents(doc! {}).await.unwrap_or(0);
        stopped || n == 20
    })
    .await;
    let status = r.status().await;
    assert!(
        settled,
        "after 45 s the archive follower neither replicated nor stopped with a reason: {:?} / {:?}",
        status.as_ref().map(|s| s["followers"][0]["state"].clone()),
        status
            .as_ref()
            .map(|s| s["followers"][0]["last_error"].clone()),
    );
}

/// Item 3: a batch split because it outlived write_timeout (parts before the last carry no
/// checkpoint), with deletes and re-inserts of the same keys in the backlog, and the
/// replicator killed (kill -9) while it splits. The replay must leave the follower identical:
/// nothing lost, nothing resurrected.
#[tokio::test]
async fn slow_split_parts_then_kill9_replays_to_identical() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let pad = "p".repeat(100 * 1024);
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra(
        "[replication]\nwrite_timeout = \"300ms\"\nbatch_max_bytes = \"256MiB\"\nbatch_max_docs = 1000\nbatch_max_wait = \"2s\"\n",
    );
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_streaming(CONVERGE).await;
    // A backlog: inserts, then deletes of half, then re-inserts under new _ids of some.
    for chunk in (0..400).collect::<Vec<i32>>().chunks(50) {
        let docs: Vec<Document> = chunk
            .iter()
            .map(|i| doc! {"dataId": *i, "pad": &pad})
            .collect();
        s.insert_many(docs).await.unwrap();
    }
    s.delete_many(doc! {"dataId": {"$lt": 200}}).await.unwrap();
    let docs: Vec<Document> = (0..100)
        .map(|i| doc! {"dataId": i, "pad": "again"})
        .collect();
    s.insert_many(docs).await.unwrap();
    let split = poll_until(Duration::from_secs(60), || async {
        r.log()
            .contains("a batch outlived write_timeout; splitting it")
    })
    .await;
    assert!(
        split,
        "the batch never needed splitting; the test does not test anything"
    );
    r.kill9();
    // The replay runs with an ordinary time limit: 300 ms is what made the batch split, and
    // on a loaded machine it can keep every part of the replay from committing too.
    let text = std::fs::read_to_string(&r.config_path).unwrap();
    assert!(text.contains("write_timeout = \"300ms\""), "{text}");
    std::fs::write(
        &r.config_path,
        text.replace("write_timeout = \"300ms\"", "write_timeout = \"30s\""),
    )
    .unwrap();
    r.spawn();
    wait_identical(&s, &[f1.coll("data").await], Duration::from_secs(240)).await;
}

/// Item 1 (handover). On the test server a post-batch (high-water-mark) token carries the
/// latest *minted* cluster time, which may belong to a write still in flight; events at
/// earlier cluster times can still become visible after it. The handover drops every shared
/// event before its own stream's last cluster time as "already delivered", so such an event
/// (in flight while the own stream read its last, empty batch) would be lost. Writers keep
/// several writes in flight on the replicated collections and on an unreplicated one (which
/// moves the own streams on with empty batches), while the replicator restarts (kill -9)
/// every few seconds, so each of the 8 pipelines hands over again and again under load.
/// Insert-only with unique keys: a lost event is a missing document for good.
#[tokio::test]
async fn handover_under_concurrent_writes_loses_no_insert() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let colls = ["c0", "c1", "c2", "c3"];
    let mut cfg =
        ConfigBuilder::new(&src, &[&f1, &f2]).extra("[replication]\nbatch_max_docs = 50\n");
    cfg.collections = colls.iter().map(|c| c.to_string()).collect();
    for c in colls {
        src.coll(c)
            .await
            .insert_one(doc! {"dataId": -1})
            .await
            .unwrap();
    }
    let mut r = Replicator::start(&cfg, "n1");
    wait_for("all pipelines streaming", CONVERGE, || async {
        r.status().await.is_some_and(|s| {
            s["followers"]
                .as_array()
                .is_some_and(|a| !a.is_empty() && a.iter().all(|f| f["state"] == "streaming"))
        })
    })
    .await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (ci, c) in colls.iter().enumerate() {
        for w in 0..2 {
            let coll = src.coll(c).await;
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut i: i64 = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = (ci as i64) * 10_000_000 + w * 1_000_000 + i;
                    coll.insert_one(doc! {"dataId": id}).await.unwrap();
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }));
        }
    }
    noise(&src, &stop, &mut tasks).await;
    restarts(&mut r, 5, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    for c in colls {
        wait_identical(
            &src.coll(c).await,
            &[f1.coll(c).await, f2.coll(c).await],
            Duration::from_secs(90),
        )
        .await;
    }
}

/// Item 1 again, with long in-flight windows: each write to the replicated collection is an
/// `insert_many` of 200 documents (one statement minting 200 cluster times, visible only
/// when it commits) while an unreplicated collection is written in tight loops (minting later
/// cluster times meanwhile, and moving the own streams on with empty batches whose
/// high-water-mark token carries the latest minted time). The replicator restarts every
/// 3 s so that each pipeline hands over again and again.
#[tokio::test]
async fn handover_with_long_in_flight_inserts_loses_no_insert() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let colls = ["c0", "c1", "c2", "c3"];
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = colls.iter().map(|c| c.to_string()).collect();
    for c in colls {
        src.coll(c)
            .await
            .insert_one(doc! {"dataId": -1})
            .await
            .unwrap();
    }
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_streaming(CONVERGE).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (ci, c) in colls.iter().enumerate() {
        let coll = src.coll(c).await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut i: i64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let docs: Vec<Document> = (0..200)
                    .map(|k| doc! {"dataId": (ci as i64) * 10_000_000 + i * 1000 + k, "pad": "x".repeat(200)})
                    .collect();
                coll.insert_many(docs).await.unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }));
    }
    noise(&src, &stop, &mut tasks).await;
    restarts(&mut r, 8, Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    for c in colls {
        wait_identical(
            &src.coll(c).await,
            &[f1.coll(c).await],
            Duration::from_secs(90),
        )
        .await;
    }
}

/// Writers of an unreplicated collection in tight loops until `stop`: they mint later
/// cluster times meanwhile, and move the pipelines' own streams on with empty batches.
async fn noise(
    src: &Server,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    for _ in 0..4 {
        let coll = src.coll("noise").await;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                coll.insert_one(doc! {"n": 1}).await.unwrap();
            }
        }));
    }
}

/// Kills the replicator (kill -9) and starts it again, `times` times, every `every`: each
/// restart is a new handover of every pipeline.
async fn restarts(r: &mut Replicator, times: usize, every: Duration) {
    for _ in 0..times {
        tokio::time::sleep(every).await;
        r.kill9();
        r.spawn();
    }
}
