//! Third hostile review of the collation handling, kept as regression tests. It found that
//! a stop-the-pair rule checked once at the start could not protect a follower collection
//! whose collation is looser than the source's: the source collection created later, or
//! dropped and created again with another collation, or the follower collection created
//! again while streaming, each lost "A" to "a" (the careful plan's delete by `_id` ran under
//! the follower's collation). Statements by `_id` now compare as the source does, so the
//! follower refuses "a" (quarantined) and "A" stays, whenever the difference arises; and an
//! equivalent collation spelled otherwise (`en_US` for `en`) is no longer stopped. Also kept:
//! `check --repair` brings back the source's numeric `_id` types, on an archive too.
//!
//! On SecantusDB (checked): `listCollections` gives the full collation spec with `locale`
//! as given (`en_US` stays `en_US`) and nothing for `simple`; a replacement turns `_id` 1.0
//! into 1. That is MongoDB's documented form as far as known; not run against mongod.

mod common;

use std::time::Duration;

use common::collation::*;
use common::*;
use mongodb::bson::{doc, Document};

const CONVERGE: Duration = Duration::from_secs(45);
const LEAD: Duration = Duration::from_secs(60);

/// The source writes "A" (key k1) then "a" (key k2) into a binary collection, then a marker;
/// the follower collection compares case-insensitively, so its `_id` index cannot hold both.
/// Either the pair stopped for the collation (and "a" is not there), or "A" is still there,
/// exactly the source's, and "a" was refused loudly (quarantined). Never "A" lost.
async fn write_case_pair_and_expect_no_loss(
    r: &Replicator,
    s: &mongodb::Collection<Document>,
    f: &mongodb::Collection<Document>,
) {
    s.insert_one(doc! {"_id": "A", "dataId": "k1"})
        .await
        .unwrap();
    // Either the pair stops here already, or "A" arrives.
    let ok = poll_until(CONVERGE, || async {
        stopped_for_collation(r).await || has_id(f, "A").await
    })
    .await;
    assert!(
        ok,
        "neither a stop nor \"A\" on the follower: {:?}",
        r.status().await
    );
    s.insert_one(doc! {"_id": "a", "dataId": "k2"})
        .await
        .unwrap();
    s.insert_one(doc! {"_id": "marker", "dataId": "marker"})
        .await
        .unwrap();
    let settled = poll_until(CONVERGE, || async {
        stopped_for_collation(r).await || has_id(f, "marker").await
    })
    .await;
    assert!(settled, "nothing happened: {:?}", r.status().await);
    if stopped_for_collation(r).await {
        assert!(!has_id(f, "a").await);
        return;
    }
    let want = s
        .find_one(doc! {"_id": "A"})
        .collation(binary())
        .await
        .unwrap();
    let got = f
        .find_one(doc! {"_id": "A"})
        .collation(binary())
        .await
        .unwrap();
    assert_eq!(
        got,
        want,
        "\"A\" is not the source's on the follower: source {:?}; follower {:?}",
        all_by_id(s).await,
        all_by_id(f).await
    );
    assert!(
        r.quarantined("f1").await >= 1,
        "\"a\" was neither written nor refused loudly: follower {:?}; status {:?}",
        all_by_id(f).await,
        r.status().await
    );
}

/// `indexes = false`, and the follower collection is the user's, case-insensitive (then
/// checked only at the pipeline's start), but the source collection does not exist yet
/// when the pipeline starts (it is named in the config, the app creates it later). The rule
/// runs once at pipeline start, and `meta::diff` asks nothing of a source collection that
/// does not exist, so it passes; with `indexes = false` the `create` event does nothing.
/// The source then creates the collection binary and writes "A" and "a": the follower's
/// `_id` index equates them, the careful plan deletes "A" by `_id` under the follower's
/// default collation, and writes "a" in its place. Silent loss of "A".
#[tokio::test]
async fn a_looser_follower_collation_loses_nothing_when_the_source_collection_comes_later() {
    let (src, f1) = (Server::start().await, Server::start().await);
    create_collated(&f1).await;
    // The source database exists (another collection), "data" does not.
    src.coll("other")
        .await
        .insert_one(doc! {"x": 1})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nindexes = false\n");
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    r.wait_streaming(CONVERGE).await;
    let (s, f) = (src.coll("data").await, f1.coll("data").await);
    write_case_pair_and_expect_no_loss(&r, &s, &f).await;
    drop(r);
}

/// `indexes = false`; source and follower collections are both case-insensitive (the same
/// collation: safe, it replicates). The source collection is then dropped (a resync, which
/// passes the rule: the source collection does not exist at that moment) and created again
/// by the app's next insert, binary. The pair streams on into the case-insensitive follower
/// collection, and "A" is lost to "a" as above.
#[tokio::test]
async fn a_looser_follower_collation_loses_nothing_when_the_source_is_recreated_binary() {
    let (src, f1) = (Server::start().await, Server::start().await);
    for srv in [&src, &f1] {
        create_collated(srv).await;
    }
    let (s, f) = (src.coll("data").await, f1.coll("data").await);
    s.insert_one(doc! {"_id": "x", "dataId": "kx"})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nindexes = false\n");
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let ok = poll_until(CONVERGE, || async { has_id(&f, "x").await }).await;
    assert!(
        ok,
        "the first document never arrived: {:?}",
        r.status().await
    );

    s.drop().await.unwrap();
    // The drop's resync empties the follower collection (which stays, case-insensitive).
    let ok = poll_until(CONVERGE, || async {
        !has_id(&f, "x").await && r.first_state().await.as_deref() == Some("streaming")
    })
    .await;
    assert!(ok, "the drop was not replicated: {:?}", r.status().await);
    write_case_pair_and_expect_no_loss(&r, &s, &f).await;
    drop(r);
}

/// The same drop and binary re-creation under `indexes = true` (the follower collection got
/// the source's case-insensitive collation at the copy): `sync_meta_to` runs at the first
/// write after the resync (`meta_ready` is false) and at the `create` event, and stops the
/// pair. Held; kept as the control of the test above.
#[tokio::test]
async fn under_indexes_true_a_source_recreated_binary_loses_nothing() {
    let (src, f1) = (Server::start().await, Server::start().await);
    create_collated(&src).await;
    let (s, f) = (src.coll("data").await, f1.coll("data").await);
    s.insert_one(doc! {"_id": "x", "dataId": "kx"})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]);
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let ok = poll_until(CONVERGE, || async { has_id(&f, "x").await }).await;
    assert!(
        ok,
        "the first document never arrived: {:?}",
        r.status().await
    );
    s.drop().await.unwrap();
    let ok = poll_until(CONVERGE, || async {
        !has_id(&f, "x").await && r.first_state().await.as_deref() == Some("streaming")
    })
    .await;
    assert!(ok, "the drop was not replicated: {:?}", r.status().await);
    write_case_pair_and_expect_no_loss(&r, &s, &f).await;
    drop(r);
}

/// `indexes = true`, binary source. While the pair streams, the follower collection is
/// dropped and created again case-insensitive on the follower (an operator restoring it from
/// a dump made with another collation, say). README: a follower collection that differs in
/// a collation "stops its pipeline with the reason". `sync_meta_to` runs only at pipeline
/// start, on a source DDL event, or before the first write after one; nothing on the
/// follower side runs it again, so the pair streams on into the looser collection and "A"
/// is lost to "a" until the next restart.
#[tokio::test]
async fn a_follower_collection_recreated_case_insensitive_while_streaming_loses_nothing() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let (s, f) = (src.coll("data").await, f1.coll("data").await);
    s.insert_one(doc! {"_id": "x", "dataId": "kx"})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]);
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let ok = poll_until(CONVERGE, || async { has_id(&f, "x").await }).await;
    assert!(
        ok,
        "the first document never arrived: {:?}",
        r.status().await
    );
    r.wait_streaming(CONVERGE).await;

    f.drop().await.unwrap();
    create_collated(&f1).await;
    write_case_pair_and_expect_no_loss(&r, &s, &f).await;
    drop(r);
}

/// `indexes = false`: source collection `{locale: "en_US", strength: 2}`, follower
/// collection `{locale: "en", strength: 2}`. ICU's en_US collation is en's (root) rules:
/// the two compare every pair of strings alike, so the follower's `_id` index holds apart
/// exactly what the source's does. The rule compares the listed documents, sees another
/// `locale`, and stops a pair that is safe.
#[tokio::test]
async fn an_equivalent_follower_collation_spelled_otherwise_replicates() {
    let (src, f1) = (Server::start().await, Server::start().await);
    src.client()
        .await
        .database("app")
        .run_command(doc! {"create": "data", "collation": {"locale": "en_US", "strength": 2}})
        .await
        .unwrap();
    create_collated(&f1).await;
    let (s, f) = (src.coll("data").await, f1.coll("data").await);
    s.insert_one(doc! {"_id": "A", "dataId": "Key"})
        .await
        .unwrap();
    s.insert_one(doc! {"_id": "b", "dataId": "key"})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nindexes = false\n");
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let ok = poll_until(CONVERGE, || async {
        stopped_for_collation(&r).await || all_by_id(&s).await == all_by_id(&f).await
    })
    .await;
    assert!(
        ok && !stopped_for_collation(&r).await,
        "an equivalent follower collation stopped the pair: {:?}",
        r.status().await.map(|s| s["followers"][0].to_string())
    );
    drop(r);
}

/// Follower documents whose `_id` equals the source's by value but not by type (1 vs
/// NumberLong(1) vs 1.0, -0.0 vs 0.0): `check` must see them (it compares bytes), and
/// `--repair` must bring the source's exact `_id` (through `clear_id_variants`), on an
/// ordinary follower and on an archive.
async fn numeric_id_variants_case(archive: bool) {
    let (src, f1) = (Server::start().await, Server::start().await);
    let (s, f) = (src.coll("data").await, f1.coll("data").await);
    s.insert_many([
        doc! {"_id": 1i64, "dataId": "k1", "v": 1},
        doc! {"_id": 2i32, "dataId": "k2", "v": 1},
        doc! {"_id": -0.0f64, "dataId": "k3", "v": 1},
        doc! {"_id": 4.0f64, "dataId": "k4", "v": 1},
    ])
    .await
    .unwrap();
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    if archive {
        cfg = cfg.follower_line("f1", "apply_deletes = false");
    }
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    r.terminate().await;
    // The follower's copies get another numeric type of the same value.
    for (old, new, k) in [
        (
            mongodb::bson::Bson::Int64(1),
            mongodb::bson::Bson::Int32(1),
            "k1",
        ),
        (
            mongodb::bson::Bson::Int32(2),
            mongodb::bson::Bson::Double(2.0),
            "k2",
        ),
        (
            mongodb::bson::Bson::Double(-0.0),
            mongodb::bson::Bson::Double(0.0),
            "k3",
        ),
        (
            mongodb::bson::Bson::Double(4.0),
            mongodb::bson::Bson::Int64(4),
            "k4",
        ),
    ] {
        f.delete_one(doc! {"_id": {"$eq": old}}).await.unwrap();
        f.insert_one(doc! {"_id": new, "dataId": k, "v": 1})
            .await
            .unwrap();
    }
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 1, "the type differences went unnoticed: {out}");
    let (code, out) = run_check(&r.config_path, &["--repair"]);
    assert_eq!(code, 0, "the repair did not succeed: {out}");
    let want: Vec<Vec<u8>> = all_by_id(&s).await.iter().map(bytes).collect();
    let got: Vec<Vec<u8>> = all_by_id(&f).await.iter().map(bytes).collect();
    assert_eq!(
        got,
        want,
        "the repair left other _id types: source {:?} follower {:?}: {out}",
        all_by_id(&s).await,
        all_by_id(&f).await
    );
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 0, "still different after the repair: {out}");
}

#[tokio::test]
async fn repair_brings_the_source_numeric_id_types() {
    numeric_id_variants_case(false).await;
}

#[tokio::test]
async fn repair_brings_the_source_numeric_id_types_on_an_archive() {
    numeric_id_variants_case(true).await;
}
