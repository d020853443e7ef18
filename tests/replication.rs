//! Core replication against real servers: every change reaches every follower, exactly,
//! through crashes, outages and restarts.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, oid::ObjectId, spec::BinarySubtype, Binary, Bson, DateTime, Decimal128};
use std::str::FromStr;

const CONVERGE: Duration = Duration::from_secs(60);

async fn checkpoint_of(r: &Replicator, follower: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(r.token_file()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(v["checkpoints"]["data"][follower].clone()).filter(|c| !c.is_null())
}

#[tokio::test]
async fn insert_update_replace_and_delete_reach_two_followers() {
    // GIVEN a source, two followers and a running replicator
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let cfg = ConfigBuilder::new(&src, &[&f1, &f2]);
    let r = Replicator::start(&cfg, "n1");
    let s = src.coll("data").await;
    wait_for("leader", CONVERGE, || async {
        r.role().await.as_deref() == Some("leader")
    })
    .await;

    // WHEN each kind of change happens on the source
    s.insert_one(doc! {"dataId": "a", "v": 1}).await.unwrap();
    s.insert_one(doc! {"dataId": "b", "v": 1}).await.unwrap();
    s.insert_one(doc! {"dataId": "c", "v": 1}).await.unwrap();
    s.update_one(doc! {"dataId": "a"}, doc! {"$set": {"v": 2}})
        .await
        .unwrap();
    s.replace_one(doc! {"dataId": "b"}, doc! {"dataId": "b", "replaced": true})
        .await
        .unwrap();
    s.delete_one(doc! {"dataId": "c"}).await.unwrap();

    // THEN both followers hold exactly the source's documents, with the source _id
    let fs = [f1.coll("data").await, f2.coll("data").await];
    wait_identical(&s, &fs, CONVERGE).await;
    for f in &fs {
        assert_eq!(f.count_documents(doc! {}).await.unwrap(), 2);
        let b = f.find_one(doc! {"dataId": "b"}).await.unwrap().unwrap();
        assert_eq!(b.get_bool("replaced"), Ok(true));
        assert!(b.get("v").is_none(), "replace must drop old fields: {b}");
    }
    drop(r);
}

#[tokio::test]
async fn bson_types_are_preserved_exactly() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    let s = src.coll("data").await;
    let original = doc! {
        "_id": ObjectId::new(),
        "dataId": "types",
        "dec": Decimal128::from_str("1234.5678901234567890").unwrap(),
        "date": DateTime::from_millis(1_700_000_000_123),
        "bin": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 1, 2, 255] },
        "uuid": Binary { subtype: BinarySubtype::Uuid, bytes: vec![7; 16] },
        "oid": ObjectId::new(),
        "i32": 7_i32,
        "i64": 7_i64,
        "dbl": 7.5_f64,
        "nested": {"a": [1, {"b": Bson::Null}, "x"], "c": {"d": true}},
        "arr": [[1, 2], [3]],
    };
    s.insert_one(original.clone()).await.unwrap();
    let f = f1.coll("data").await;
    wait_for("document replicated", CONVERGE, || async {
        f.find_one(doc! {"dataId": "types"})
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let got = f.find_one(doc! {"dataId": "types"}).await.unwrap().unwrap();
    assert_eq!(
        bytes(&got),
        bytes(&original),
        "follower document is not byte-identical"
    );
    drop(r);
}

#[tokio::test]
async fn kill_minus_9_repeatedly_under_writes_loses_nothing() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let cfg = ConfigBuilder::new(&src, &[&f1, &f2]);
    let mut r = Replicator::start(&cfg, "n1");
    let s = src.coll("data").await;
    let writer = Writer::start(s.clone(), "k", 200);
    for round in 0..4 {
        // Let it lead and apply something, then crash it at an arbitrary point.
        wait_for("leader", CONVERGE, || async {
            r.role().await.as_deref() == Some("leader")
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300 + round * 170)).await; // vary the crash instant
        r.kill9();
        r.spawn();
    }
    let writes = writer.stop().await;
    assert!(writes > 100, "the writer made only {writes} writes");
    let fs = [f1.coll("data").await, f2.coll("data").await];
    wait_identical(&s, &fs, CONVERGE).await;
    drop(r);
}

#[tokio::test]
async fn a_dead_follower_holds_back_no_other_and_catches_up() {
    let (src, f1, mut f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1, &f2]), "n1");
    let s = src.coll("data").await;
    let (c1, c2) = (f1.coll("data").await, f2.coll("data").await);
    wait_for("leader", CONVERGE, || async {
        r.role().await.as_deref() == Some("leader")
    })
    .await;
    s.insert_one(doc! {"dataId": "before"}).await.unwrap();
    wait_identical(&s, &[c1.clone(), c2.clone()], CONVERGE).await;

    // WHEN follower 2 dies while writes go on
    f2.kill();
    let writer = Writer::start(s.clone(), "w", 50);
    // THEN follower 1 keeps streaming, and follower 2 is reported down
    for i in 0..20 {
        s.insert_one(doc! {"dataId": format!("during{i}")})
            .await
            .unwrap();
    }
    wait_for(
        "f1 has the writes made during the outage",
        CONVERGE,
        || async {
            c1.count_documents(doc! {"dataId": {"$regex": "^during"}})
                .await
                .unwrap()
                == 20
        },
    )
    .await;
    wait_for("f2 reported down", CONVERGE, || async {
        let st = r.status().await;
        st.is_some_and(|s| {
            s["followers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| f["name"] == "f2" && f["state"] == "down")
        })
    })
    .await;
    // AND when it returns it catches up on its own
    f2.restart().await;
    let _ = writer.stop().await;
    let c2 = f2.coll("data").await;
    wait_identical(&s, &[c1, c2], CONVERGE).await;
    drop(r);
}

#[tokio::test]
async fn source_restart_mid_stream_resumes() {
    let (mut src, f1) = (Server::start().await, Server::start().await);
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    let s = src.coll("data").await;
    wait_for("leader", CONVERGE, || async {
        r.role().await.as_deref() == Some("leader")
    })
    .await;
    for i in 0..50 {
        s.insert_one(doc! {"dataId": format!("a{i}")})
            .await
            .unwrap();
    }
    src.restart().await;
    let s = src.coll("data").await;
    for i in 0..50 {
        s.insert_one(doc! {"dataId": format!("b{i}")})
            .await
            .unwrap();
    }
    s.delete_one(doc! {"dataId": "a0"}).await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    drop(r);
}

#[tokio::test]
async fn an_idle_collections_checkpoint_keeps_advancing() {
    // The source writes periodic no-ops to its oplog while idle, as mongod does.
    let src = Server::start_with(ServerOpts {
        noop_heartbeat_secs: Some(1),
        ..Default::default()
    })
    .await;
    let f1 = Server::start().await;
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    wait_for("first checkpoint", CONVERGE, || async {
        checkpoint_of(&r, "f1").await.is_some()
    })
    .await;
    let first = checkpoint_of(&r, "f1").await.unwrap();
    // WHEN nothing is written to the collection
    // THEN its checkpoint still moves forward (new token and later cluster time)
    wait_for("checkpoint advances while idle", CONVERGE, || async {
        let now = checkpoint_of(&r, "f1").await.unwrap();
        now["token"] != first["token"]
            && now["cluster_time"]["t"].as_u64() > first["cluster_time"]["t"].as_u64()
    })
    .await;
    drop(r);
}

#[tokio::test]
async fn initial_sync_with_writes_during_the_copy_converges() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let s = src.coll("data").await;
    // Applications keep their key unique on the source.
    unique_index_on(&s, "dataId").await;
    let docs: Vec<_> = (0..20_000)
        .map(|i| doc! {"dataId": format!("pre{i}"), "payload": "x".repeat(100), "i": i})
        .collect();
    for chunk in docs.chunks(5000) {
        s.insert_many(chunk.to_vec()).await.unwrap();
    }
    // A follower that already has stale and foreign documents.
    let c2 = f2.coll("data").await;
    c2.insert_one(doc! {"dataId": "pre5", "stale": true})
        .await
        .unwrap();
    c2.insert_one(doc! {"dataId": "not-on-source"})
        .await
        .unwrap();

    let writer = Writer::start(s.clone(), "pre", 20_000);
    let r = Replicator::start(
        &ConfigBuilder::new(&src, &[&f1, &f2]).extra("[replication]\nbatch_max_docs = 500\n"),
        "n1",
    );
    wait_for("initial sync logged", CONVERGE, || async {
        r.log().contains("initial sync done")
    })
    .await;
    let _ = writer.stop().await;
    wait_identical(&s, &[f1.coll("data").await, c2], Duration::from_secs(120)).await;
    let log = r.log();
    assert!(log.contains("initial sync progress"), "progress is logged");
    drop(r);
}

#[tokio::test]
async fn delete_then_reinsert_of_one_key_in_a_batch_ends_in_source_order() {
    let (src, f1) = (Server::start().await, Server::start().await);
    // A long batch window, so every change below lands in one batch.
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nbatch_max_wait = \"1s\"\n");
    let r = Replicator::start(&cfg, "n1");
    let s = src.coll("data").await;
    wait_for("leader", CONVERGE, || async {
        r.role().await.as_deref() == Some("leader")
    })
    .await;
    s.insert_one(doc! {"dataId": "k", "gen": 1}).await.unwrap();
    s.delete_one(doc! {"dataId": "k"}).await.unwrap();
    s.insert_one(doc! {"dataId": "k", "gen": 2}).await.unwrap();
    s.delete_one(doc! {"dataId": "k"}).await.unwrap();
    s.insert_one(doc! {"dataId": "k", "gen": 3}).await.unwrap();
    s.update_one(doc! {"dataId": "k"}, doc! {"$set": {"final": true}})
        .await
        .unwrap();
    s.insert_one(doc! {"dataId": "gone", "gen": 1})
        .await
        .unwrap();
    s.delete_one(doc! {"dataId": "gone"}).await.unwrap();
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    let k = f.find_one(doc! {"dataId": "k"}).await.unwrap().unwrap();
    assert_eq!(k.get_i32("gen"), Ok(3));
    assert_eq!(f.count_documents(doc! {"dataId": "gone"}).await.unwrap(), 0);
    drop(r);
}

#[tokio::test]
async fn sigterm_finishes_the_batch_writes_the_checkpoint_and_exits_0() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let mut r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    let s = src.coll("data").await;
    wait_for("leader", CONVERGE, || async {
        r.role().await.as_deref() == Some("leader")
    })
    .await;
    for i in 0..100 {
        s.insert_one(doc! {"dataId": format!("t{i}")})
            .await
            .unwrap();
    }
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    let status = r.terminate().await.expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let cp = checkpoint_of(&r, "f1")
        .await
        .expect("final checkpoint written");
    assert!(cp["token"].is_object());
    // The token file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(r.token_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // And a restart resumes without copying again.
    r.spawn();
    s.insert_one(doc! {"dataId": "after"}).await.unwrap();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    assert_eq!(
        r.log().matches("initial sync: copying").count(),
        1,
        "no second initial sync"
    );
    drop(r);
}

#[tokio::test]
async fn replaying_a_batch_twice_leaves_the_same_state() {
    // Idempotence: a crash after the follower applied a batch but before the token file
    // recorded it replays the batch. Simulate by resetting the token file and the
    // follower's stored checkpoint to an early position and restarting.
    let (src, f1) = (Server::start().await, Server::start().await);
    let mut r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "n1");
    let s = src.coll("data").await;
    wait_for("first checkpoint", CONVERGE, || async {
        checkpoint_of(&r, "f1").await.is_some()
    })
    .await;
    let early = std::fs::read(r.token_file()).unwrap();
    let fclient = f1.client().await;
    let stored = fclient
        .database("mongo_replicator")
        .collection::<mongodb::bson::Document>("checkpoints")
        .find_one(doc! {})
        .await
        .unwrap()
        .unwrap();
    for i in 0..30 {
        s.insert_one(doc! {"dataId": format!("r{i}"), "i": i})
            .await
            .unwrap();
    }
    s.update_one(doc! {"dataId": "r3"}, doc! {"$set": {"i": 300}})
        .await
        .unwrap();
    s.delete_one(doc! {"dataId": "r4"}).await.unwrap();
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    let before = dump(&f).await;
    r.kill9();
    std::fs::write(r.token_file(), early).unwrap();
    fclient
        .database("mongo_replicator")
        .collection::<mongodb::bson::Document>("checkpoints")
        .replace_one(doc! {"_id": stored.get("_id").unwrap().clone()}, stored)
        .await
        .unwrap();
    r.spawn();
    wait_for("replayed", CONVERGE, || async {
        r.log().matches("became leader").count() >= 2 && r.log().matches("caught up").count() >= 2
    })
    .await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    let after = dump(&f).await;
    assert_eq!(
        after.iter().map(bytes).collect::<Vec<_>>(),
        before.iter().map(bytes).collect::<Vec<_>>()
    );
    drop(r);
}

#[tokio::test]
async fn a_follower_without_transactions_is_refused_unless_unfenced_writes_are_accepted() {
    if using_mongod() {
        eprintln!("skipped: uses the test server's --standalone mode");
        return;
    }
    // A standalone follower cannot run transactions, so its fence, data and checkpoint
    // would be three separate writes: refused by default, with the reason and the remedy.
    let src = Server::start().await;
    let f1 = Server::start_with(ServerOpts {
        standalone: true,
        ..Default::default()
    })
    .await;
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "first"}).await.unwrap();
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_stopped_with("allow_unfenced_writes", CONVERGE).await;
    let f = f1.coll("data").await;
    assert_eq!(f.count_documents(doc! {}).await.unwrap(), 0);
    // Not a fatal error for the node: it stays up and reports it.
    assert!(r.is_running());
    r.terminate().await;

    // Accepted explicitly: every change arrives, and the risk is logged.
    cfg.follower_extra = "allow_unfenced_writes = true\n".into();
    let r = Replicator::start(&cfg, "n2");
    for i in 0..20 {
        s.insert_one(doc! {"dataId": format!("s{i}"), "i": i})
            .await
            .unwrap();
    }
    s.delete_one(doc! {"dataId": "s3"}).await.unwrap();
    s.update_one(doc! {"dataId": "s4"}, doc! {"$set": {"i": 40}})
        .await
        .unwrap();
    wait_identical(&s, &[f], CONVERGE).await;
    assert!(
        r.log().contains("allow_unfenced_writes = true"),
        "{}",
        r.log()
    );
}

#[tokio::test]
async fn an_initial_sync_cut_by_kill_minus_9_resumes_where_it_stopped() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    // Mixed _id types, so resuming "after the last _id" must cross type boundaries.
    let mut docs = Vec::new();
    for i in 0..6000 {
        docs.push(match i % 3 {
            0 => doc! {"_id": i, "dataId": format!("d{i}")},
            1 => doc! {"_id": format!("s{i:05}"), "dataId": format!("d{i}")},
            _ => doc! {"dataId": format!("d{i}")},
        });
    }
    s.insert_many(docs).await.unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nbatch_max_docs = 100\n");
    let mut r = Replicator::start(&cfg, "n1");
    let f = f1.coll("data").await;
    wait_for("part of the copy done", CONVERGE, || async {
        f.count_documents(doc! {}).await.unwrap() >= 1500
    })
    .await;
    r.kill9();
    let copied = f.count_documents(doc! {}).await.unwrap();
    assert!(
        copied < 6000,
        "the copy finished before the kill; nothing to resume"
    );
    r.spawn();
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    assert!(
        r.log().contains("resumed=true"),
        "the copy resumed instead of restarting"
    );
}
