//! What is replicated and how, end to end on real servers: the shared reader (one read of
//! the source per change), collections chosen by patterns and picked up while running,
//! namespaces across databases, mapped databases, archive followers, per-collection keys,
//! pause and resume, and initial-sync progress.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Document};
use mongodb::Collection;

const CONVERGE: Duration = Duration::from_secs(90);

async fn insert_n(c: &Collection<Document>, prefix: &str, n: usize) {
    let docs: Vec<Document> = (0..n)
        .map(|i| doc! {"dataId": format!("{prefix}{i:06}"), "n": i as i64})
        .collect();
    for chunk in docs.chunks(500) {
        c.insert_many(chunk.to_vec()).await.unwrap();
    }
}

/// The `reader` of every (collection, follower) in `/status`.
async fn readers(r: &Replicator) -> Vec<(String, String, String)> {
    let Some(st) = r.status().await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for f in st["followers"].as_array().into_iter().flatten() {
        for c in f["collections"].as_array().into_iter().flatten() {
            out.push((
                f["name"].as_str().unwrap_or("").to_string(),
                c["collection"].as_str().unwrap_or("").to_string(),
                c["reader"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn one_read_of_the_source_serves_every_follower_and_a_slow_one_detaches() {
    // GIVEN three followers, small batches (so a follower's queue bound is small), and a
    // replicator that has caught up: every pipeline reads from the shared reader
    let (src, f1, f2, f3) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let s = src.coll("data").await;
    insert_n(&s, "pre", 50).await;
    let cfg = ConfigBuilder::new(&src, &[&f1, &f2, &f3])
        .extra("[replication]\nbatch_max_docs = 50\nwrite_timeout = \"3s\"");
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(CONVERGE).await;
    let fs = [
        f1.coll("data").await,
        f2.coll("data").await,
        f3.coll("data").await,
    ];
    wait_identical(&s, &fs, CONVERGE).await;
    s.insert_one(doc! {"dataId": "nudge"}).await.unwrap();
    wait_for("every pipeline on the shared reader", CONVERGE, || async {
        let rs = readers(&r).await;
        rs.len() == 3 && rs.iter().all(|(_, _, x)| x == "shared")
    })
    .await;

    // WHEN 1000 documents are written: the source is read once for all three followers
    let before = metric(
        &r.metrics_text().await,
        "mongo_replicator_source_events_read_total",
        "database=\"app\"",
    );
    insert_n(&s, "a", 1000).await;
    wait_identical(&s, &fs, CONVERGE).await;
    let read = metric(
        &r.metrics_text().await,
        "mongo_replicator_source_events_read_total",
        "database=\"app\"",
    ) - before;
    assert!(
        (1000.0..1100.0).contains(&read),
        "the shared reader read {read} events for 1000 changes and three followers"
    );

    // WHEN one follower hangs (SIGSTOP) while 1000 more are written
    f2.pause();
    insert_n(&s, "b", 1000).await;

    // THEN the others get everything, and the hung one's pipeline left the shared reader
    // (its queue is bounded) instead of holding anything back
    wait_identical(&s, &[fs[0].clone(), fs[2].clone()], CONVERGE).await;
    wait_for("the hung follower detached", CONVERGE, || async {
        readers(&r)
            .await
            .iter()
            .any(|(f, _, x)| f == "f2" && x == "own")
    })
    .await;

    // WHEN it comes back THEN it catches up on its own stream and rejoins the shared reader
    f2.resume();
    wait_identical(&s, &fs, CONVERGE).await;
    s.insert_one(doc! {"dataId": "nudge2"}).await.unwrap();
    wait_for("all back on the shared reader", CONVERGE, || async {
        let rs = readers(&r).await;
        rs.len() == 3 && rs.iter().all(|(_, _, x)| x == "shared")
    })
    .await;
    wait_identical(&s, &fs, CONVERGE).await;
}

#[tokio::test]
async fn collections_matching_a_pattern_are_picked_up_while_running_and_exclusions_are_not() {
    // GIVEN `collections = ["*"]` less `tmp_*`, with one collection there before the start
    let (src, f1) = (Server::start().await, Server::start().await);
    let db = src.client().await.database("app");
    let fdb = f1.client().await.database("app");
    let old: Collection<Document> = db.collection("old");
    insert_n(&old, "o", 300).await;
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["*".into()];
    cfg.source_extra = "exclude = [\"tmp_*\"]".into();
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(CONVERGE).await;
    wait_identical(&old, &[fdb.collection("old")], CONVERGE).await;

    // WHEN a matching collection is created later, with documents already in it when the
    // replicator first sees it, and more afterwards; and an excluded one too
    let fresh: Collection<Document> = db.collection("fresh");
    insert_n(&fresh, "f", 200).await;
    let tmp: Collection<Document> = db.collection("tmp_scratch");
    insert_n(&tmp, "t", 10).await;
    wait_for("the new collection replicated", CONVERGE, || async {
        fdb.collection::<Document>("fresh")
            .count_documents(doc! {})
            .await
            .unwrap_or(0)
            >= 200
    })
    .await;
    fresh
        .update_one(doc! {"dataId": "f000001"}, doc! {"$set": {"later": true}})
        .await
        .unwrap();
    fresh.delete_one(doc! {"dataId": "f000002"}).await.unwrap();

    // THEN it is copied, then streamed; the excluded one never reaches the follower
    wait_identical(&fresh, &[fdb.collection("fresh")], CONVERGE).await;
    let names = fdb.list_collection_names().await.unwrap();
    assert!(
        !names.iter().any(|n| n.starts_with("tmp_")),
        "an excluded collection was replicated: {names:?}"
    );
    let st = r.status().await.unwrap();
    let colls: Vec<&str> = st["followers"][0]["collections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["collection"].as_str())
        .collect();
    assert!(
        colls.contains(&"fresh") && colls.contains(&"old"),
        "{colls:?}"
    );
    assert!(!colls.iter().any(|c| c.starts_with("tmp_")), "{colls:?}");
}

#[tokio::test]
async fn namespaces_span_databases_under_one_lease() {
    // GIVEN `namespaces = ["app.*", "billing.invoices"]`
    let (src, f1) = (Server::start().await, Server::start().await);
    let client = src.client().await;
    let fclient = f1.client().await;
    let a: Collection<Document> = client.database("app").collection("users");
    let inv: Collection<Document> = client.database("billing").collection("invoices");
    let other: Collection<Document> = client.database("billing").collection("drafts");
    insert_n(&a, "u", 50).await;
    insert_n(&inv, "i", 50).await;
    insert_n(&other, "d", 5).await;
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec![];
    cfg.source_extra = "namespaces = [\"app.*\", \"billing.invoices\"]".into();
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(CONVERGE).await;

    // WHEN both databases change while it runs
    insert_n(&a, "u2_", 30).await;
    inv.delete_one(doc! {"dataId": "i000003"}).await.unwrap();

    // THEN both are replicated into their own databases, and nothing else is
    wait_identical(&a, &[fclient.database("app").collection("users")], CONVERGE).await;
    wait_identical(
        &inv,
        &[fclient.database("billing").collection("invoices")],
        CONVERGE,
    )
    .await;
    let billing = fclient
        .database("billing")
        .list_collection_names()
        .await
        .unwrap();
    assert!(!billing.contains(&"drafts".to_string()), "{billing:?}");
    let st = r.status().await.unwrap();
    let colls: Vec<&str> = st["followers"][0]["collections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["collection"].as_str())
        .collect();
    assert!(
        colls.contains(&"app.users") && colls.contains(&"billing.invoices"),
        "{colls:?}"
    );
    // One lease for the deployment.
    let leases: Vec<Document> = {
        use futures::TryStreamExt;
        client
            .database("mongo_replicator")
            .collection::<Document>("leases")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    assert_eq!(leases.len(), 1, "{leases:?}");
}

#[tokio::test]
async fn a_mapped_database_an_archive_follower_and_a_per_collection_key() {
    // GIVEN f1 writes `app` into `mirror` and keeps deleted documents (archive); f2 is a
    // plain follower; collection `orders` is keyed by `orderId`
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let mut cfg = ConfigBuilder::new(&src, &[&f1, &f2])
        .follower_line("f1", "database = \"mirror\"\napply_deletes = false")
        .extra("[replication]\nkey_fields = { orders = \"orderId\" }");
    cfg.collections = vec!["data".into(), "orders".into()];
    let s = src.coll("data").await;
    let orders = src.coll("orders").await;
    insert_n(&s, "d", 20).await;
    // A follower document with the same orderId under another _id (written by hand before
    // replication began) is replaced by the source's, as the key says.
    f2.coll("orders")
        .await
        .insert_one(doc! {"orderId": 7, "stale": true})
        .await
        .unwrap();
    orders
        .insert_one(doc! {"orderId": 7, "total": 70})
        .await
        .unwrap();
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(CONVERGE).await;
    let mirror = f1.client().await.database("mirror");
    wait_for("the archive copied", CONVERGE, || async {
        mirror
            .collection::<Document>("data")
            .count_documents(doc! {})
            .await
            .unwrap_or(0)
            == 20
    })
    .await;

    // WHEN documents change and some are deleted on the source
    orders
        .insert_one(doc! {"orderId": 8, "total": 80})
        .await
        .unwrap();
    orders
        .update_one(doc! {"orderId": 7}, doc! {"$set": {"total": 71}})
        .await
        .unwrap();
    s.delete_many(doc! {"dataId": {"$in": ["d000001", "d000002"]}})
        .await
        .unwrap();
    orders.delete_one(doc! {"orderId": 8}).await.unwrap();

    // THEN f2 holds exactly the source, f2's stale order is gone
    let f2_orders = f2.coll("orders").await;
    wait_identical(&s, &[f2.coll("data").await], CONVERGE).await;
    wait_identical(&orders, std::slice::from_ref(&f2_orders), CONVERGE).await;
    // AND f1 holds everything in `mirror`, deleted documents included, nothing in `app`
    wait_for("archive holds every document", CONVERGE, || async {
        let d = mirror.collection::<Document>("data");
        let o = mirror.collection::<Document>("orders");
        d.count_documents(doc! {}).await.unwrap_or(0) == 20
            && o.count_documents(doc! {}).await.unwrap_or(0) == 2
            && o.count_documents(doc! {"orderId": 7, "total": 71})
                .await
                .unwrap_or(0)
                == 1
    })
    .await;
    let app_names = f1
        .client()
        .await
        .database("app")
        .list_collection_names()
        .await
        .unwrap();
    assert!(app_names.is_empty(), "f1 wrote into `app`: {app_names:?}");
    // The key index is on orderId for orders.
    let idx = f2_orders.list_index_names().await.unwrap();
    assert!(
        idx.contains(&"mongo_replicator_orderId".to_string()),
        "{idx:?}"
    );
}

#[tokio::test]
async fn a_paused_follower_keeps_its_checkpoint_stays_paused_across_a_restart_and_catches_up() {
    // GIVEN two followers streaming
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let cfg = ConfigBuilder::new(&src, &[&f1, &f2]);
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(CONVERGE).await;
    let s = src.coll("data").await;
    insert_n(&s, "a", 100).await;
    let (c1, c2) = (f1.coll("data").await, f2.coll("data").await);
    wait_identical(&s, &[c1.clone(), c2.clone()], CONVERGE).await;

    // WHEN f1 is paused with the CLI and documents are written
    let (code, out) = run_cli("pause", &r.config_path, &["--follower", "f1"], &[]);
    assert_eq!(code, 0, "{out}");
    wait_for("paused in status", CONVERGE, || async {
        r.status().await.is_some_and(|st| {
            st["followers"][0]["state"] == "paused" && st["followers"][0]["paused"] == true
        })
    })
    .await;
    insert_n(&s, "b", 100).await;

    // THEN f2 gets them and f1 does not
    wait_identical(&s, std::slice::from_ref(&c2), CONVERGE).await;
    assert_eq!(c1.count_documents(doc! {}).await.unwrap(), 100);
    let m = r.metrics_text().await;
    assert_eq!(
        metric(&m, "mongo_replicator_follower_paused", "follower=\"f1\""),
        1.0
    );

    // WHEN the node restarts while f1 is paused THEN it stays paused
    r.terminate().await;
    r.spawn();
    r.wait_leader(CONVERGE).await;
    insert_n(&s, "c", 10).await;
    wait_identical(&s, std::slice::from_ref(&c2), CONVERGE).await;
    assert_eq!(r.status().await.unwrap()["followers"][0]["state"], "paused");
    assert_eq!(c1.count_documents(doc! {}).await.unwrap(), 100);

    // WHEN it is resumed over HTTP THEN it catches up from its checkpoint
    assert_eq!(r.post("/resume/f1").await, 200);
    wait_identical(&s, &[c1, c2], CONVERGE).await;
    assert_ne!(r.status().await.unwrap()["followers"][0]["state"], "paused");
    assert_eq!(r.post("/pause/nobody").await, 404);
}

#[tokio::test]
async fn initial_sync_progress_is_reported_while_copying() {
    // GIVEN 30,000 documents on the source and a follower behind a slow link
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let docs: Vec<Document> = (0..30_000)
        .map(|i| doc! {"dataId": i, "pad": "x".repeat(200)})
        .collect();
    for chunk in docs.chunks(5000) {
        s.insert_many(chunk.to_vec()).await.unwrap();
    }
    let proxy = Proxy::start(f1.port).await;
    proxy.delay(Duration::from_millis(150));
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.followers[0].1 = proxy.uri();
    let cfg = cfg.extra("[replication]\nbatch_max_docs = 500");
    let r = Replicator::start(&cfg, "n1");

    // THEN during the copy, /status shows documents and bytes done and to do, a rate and
    // an ETA, for the follower and its collection; /metrics and `status` show them too
    let seen = std::sync::Mutex::new(None);
    let found = poll_until(CONVERGE, || async {
        let Some(st) = r.status().await else {
            return false;
        };
        let c = &st["followers"][0]["collections"][0]["initial_sync"];
        let f = &st["followers"][0]["initial_sync"];
        if c["done"].as_u64().unwrap_or(0) > 0 && c["eta_ms"].is_i64() {
            *seen.lock().unwrap() = Some((c.clone(), f.clone()));
            true
        } else {
            false
        }
    })
    .await;
    assert!(found, "no progress seen in /status");
    let (c, f) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(c["total"], 30_000, "{c}");
    assert!(c["done"].as_u64().unwrap() < 30_000, "{c}");
    assert!(c["bytes_total"].as_u64().unwrap() > 30_000 * 200, "{c}");
    assert!(c["bytes_done"].as_u64().unwrap() > 0, "{c}");
    assert!(c["rate"].as_f64().unwrap() > 0.0, "{c}");
    assert_eq!(f["total"], 30_000, "{f}");
    let m = r.metrics_text().await;
    assert!(metric(&m, "mongo_replicator_initial_sync_total_bytes", "f1") > 0.0);
    assert!(metric(&m, "mongo_replicator_initial_sync_done_documents", "f1") > 0.0);
    let (code, out) = run_cli("status", &r.config_path, &[], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("initial sync [") || out.contains("streaming"),
        "{out}"
    );

    // AND when it is done, the progress goes away and the follower is identical
    proxy.restore();
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    wait_for("progress cleared", CONVERGE, || async {
        r.status()
            .await
            .is_some_and(|st| st["followers"][0]["initial_sync"].is_null())
    })
    .await;
}

/// What differs between the source's and the follower's indexes and options.
async fn meta_diff(src: &Server, f: &Server, coll: &str) -> Vec<String> {
    use mongo_replicator::meta;
    let s = meta::read(&src.client().await.database("app"), coll)
        .await
        .unwrap();
    let fo = meta::read(&f.client().await.database("app"), coll)
        .await
        .unwrap();
    meta::diff(&s, &fo).iter().map(|d| d.to_string()).collect()
}

#[tokio::test]
async fn indexes_and_collection_options_follow_the_source_at_the_copy_and_while_streaming() {
    // GIVEN a source collection with a collation, a validator, and indexes with options
    let (src, f1) = (Server::start().await, Server::start().await);
    let sdb = src.client().await.database("app");
    run_cmd(
        &sdb,
        doc! {"create": "data", "collation": {"locale": "fr", "strength": 2},
        "validator": {"dataId": {"$exists": true}}},
    )
    .await;
    run_cmd(
        &sdb,
        doc! {"createIndexes": "data", "indexes": [
            {"key": {"email": 1}, "name": "email_unique", "unique": true,
             "partialFilterExpression": {"email": {"$exists": true}}},
            {"key": {"seen": 1}, "name": "seen_ttl", "expireAfterSeconds": 3600, "sparse": true},
            {"key": {"h": 1}, "name": "h_hidden", "hidden": true},
        ]},
    )
    .await;
    let s = src.coll("data").await;
    insert_n(&s, "a", 100).await;

    // WHEN the replicator copies it
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["*".into()];
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(CONVERGE).await;
    let fcoll = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&fcoll), CONVERGE).await;

    // THEN the follower has the same options and indexes, beside the replicator's own
    assert_eq!(meta_diff(&src, &f1, "data").await, Vec::<String>::new());
    let names = fcoll.list_index_names().await.unwrap();
    assert!(
        names.contains(&"mongo_replicator_dataId".to_string()),
        "{names:?}"
    );

    // WHEN indexes and the validator change on the source while streaming, and a new
    // collection is created with options
    run_cmd(
        &sdb,
        doc! {"createIndexes": "data", "indexes": [{"key": {"n": -1, "dataId": 1}, "name": "n_compound"}]},
    )
    .await;
    run_cmd(&sdb, doc! {"dropIndexes": "data", "index": "h_hidden"}).await;
    run_cmd(
        &sdb,
        doc! {"collMod": "data", "validator": {"n": {"$type": "long"}}, "validationLevel": "moderate"},
    )
    .await;
    run_cmd(
        &sdb,
        doc! {"create": "later", "collation": {"locale": "de"}, "validator": {"k": {"$exists": true}}},
    )
    .await;
    run_cmd(
        &sdb,
        doc! {"createIndexes": "later", "indexes": [{"key": {"k": 1}, "name": "k_unique", "unique": true}]},
    )
    .await;
    s.insert_one(doc! {"dataId": "after", "n": 1_i64})
        .await
        .unwrap();
    src.coll("later")
        .await
        .insert_one(doc! {"dataId": "l1", "k": 1})
        .await
        .unwrap();

    // THEN the follower follows, and `check` finds nothing to report
    wait_identical(&s, std::slice::from_ref(&fcoll), CONVERGE).await;
    wait_for("indexes and options follow", CONVERGE, || async {
        meta_diff(&src, &f1, "data").await.is_empty()
            && meta_diff(&src, &f1, "later").await.is_empty()
    })
    .await;
    wait_identical(
        &src.coll("later").await,
        &[f1.coll("later").await],
        CONVERGE,
    )
    .await;
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 0, "{out}");

    // AND a difference made on the follower behind the replicator's back is found by
    // `check` and repaired
    run_cmd(
        &f1.client().await.database("app"),
        doc! {"dropIndexes": "data", "index": "email_unique"},
    )
    .await;
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("email_unique"), "{out}");
    let (code, out) = run_check(&r.config_path, &["--repair"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(meta_diff(&src, &f1, "data").await, Vec::<String>::new());
}
