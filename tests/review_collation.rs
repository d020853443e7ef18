//! Hostile review of "a key matches only itself" (binary key lookups under a collection's
//! default collation), kept as regression tests: a follower collation looser than the
//! source's (refused documents are quarantined, none replaced), a repair across `_id`s that
//! differ only by case, and a collation difference hidden by an index the follower cannot
//! build.

mod common;

use std::time::Duration;

use common::collation::*;
use common::*;
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};

const CONVERGE: Duration = Duration::from_secs(45);
const LEAD: Duration = Duration::from_secs(60);

/// Waits until the follower holds exactly the source's documents, compared in binary `_id`
/// order (the harness's `wait_identical` sorts under each side's default collation).
async fn wait_same_by_id(
    s: &mongodb::Collection<Document>,
    f: &mongodb::Collection<Document>,
    timeout: Duration,
) {
    let ok = poll_until(timeout, || async {
        all_by_id(s).await == all_by_id(f).await
    })
    .await;
    assert!(
        ok,
        "the follower differs from the source after {timeout:?}:\nsource   {:?}\nfollower {:?}",
        all_by_id(s).await,
        all_by_id(f).await
    );
}

/// With `indexes = false` the follower collection is the user's, and may have been created
/// with a case-insensitive collation while the source's compares binary. The source can then
/// hold `_id`s "A" and "a"; the follower cannot hold both (its `_id` index equates them). It
/// was silent loss: the insert of "a" failed on the follower's `_id` index, the careful plan
/// deleted by `_id` "a" under the follower's default collation, which removed "A", and wrote
/// "a" in its place. Now statements by `_id` compare as the source does: "A" stays, exactly
/// the source's, and "a" is refused loudly (quarantined).
#[tokio::test]
async fn a_case_variant_id_never_deletes_another_document_under_a_different_follower_collation() {
    let (src, f1) = (Server::start().await, Server::start().await);
    // The follower's collection, the user's own under `indexes = false`.
    create_collated(&f1).await;
    let f = f1.coll("data").await;
    let s = src.coll("data").await;
    s.insert_one(doc! {"_id": "A", "dataId": "k1"})
        .await
        .unwrap();
    s.insert_one(doc! {"_id": "a", "dataId": "k2"})
        .await
        .unwrap();
    s.insert_one(doc! {"_id": "marker", "dataId": "marker"})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nindexes = false\n");
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let ok = poll_until(CONVERGE, || async {
        has_id(&f, "marker").await && r.quarantined("f1").await >= 1
    })
    .await;
    assert!(
        ok,
        "the copy did not finish with \"a\" refused: follower {:?}; status {:?}",
        all_by_id(&f).await,
        r.status().await
    );
    assert_eq!(
        get_id(&f, "A").await,
        get_id(&s, "A").await,
        "follower {:?}",
        all_by_id(&f).await
    );
    assert!(
        r.log().contains(
            "the follower collection has a default collation the source's does not share"
        ),
        "the looser follower collation was not warned about at the start"
    );
    // While streaming too: another pair of case variants.
    s.insert_one(doc! {"_id": "B", "dataId": "k3"})
        .await
        .unwrap();
    s.insert_one(doc! {"_id": "b", "dataId": "k4"})
        .await
        .unwrap();
    s.insert_one(doc! {"_id": "marker2", "dataId": "marker2"})
        .await
        .unwrap();
    let ok = poll_until(CONVERGE, || async {
        has_id(&f, "marker2").await && r.quarantined("f1").await >= 2
    })
    .await;
    assert!(
        ok,
        "follower {:?}; status {:?}",
        all_by_id(&f).await,
        r.status().await
    );
    assert_eq!(
        get_id(&f, "B").await,
        get_id(&s, "B").await,
        "follower {:?}",
        all_by_id(&f).await
    );
    drop(r);
}

/// With `indexes = false` a follower collection whose collation is binary while the
/// source's is case-insensitive is stricter than the source: nothing the source holds apart
/// is one there. It replicates.
#[tokio::test]
async fn a_binary_follower_collection_under_a_collated_source_replicates() {
    let (src, f1) = (Server::start().await, Server::start().await);
    create_collated(&src).await;
    f1.client()
        .await
        .database("app")
        .run_command(doc! {"create": "data"})
        .await
        .unwrap();
    let s = src.coll("data").await;
    s.insert_one(doc! {"_id": "A", "dataId": "Key"})
        .await
        .unwrap();
    s.insert_one(doc! {"_id": "b", "dataId": "key"})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nindexes = false\n");
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let f = f1.coll("data").await;
    wait_same_by_id(&s, &f, CONVERGE).await;
    s.delete_one(doc! {"_id": "A"}).await.unwrap();
    s.insert_one(doc! {"_id": "a", "dataId": "KEY"})
        .await
        .unwrap();
    wait_same_by_id(&s, &f, CONVERGE).await;
    drop(r);
}

/// Both collections compare case-insensitively (`indexes = true`). While the replicator is
/// stopped, the source replaces the document `_id` "a" (key "x") by `_id` "A" (key "k"): the
/// source's `_id` index equates them, so this is a delete and an insert. `check --repair`
/// must bring the follower in line. Its repair of key "k" deleted follower documents with
/// `_id` "A" and another key under the *binary* collation (which missed "a"), then replaced
/// by `_id` "A" under the collection's default (which found "a"): the server refused the
/// change of `_id` (code 66), every time. Now follower documents the `_id` index holds equal
/// to "A" without being it are removed first.
#[tokio::test]
async fn repair_replaces_a_follower_document_whose_id_differs_only_by_case() {
    let (src, f1) = (Server::start().await, Server::start().await);
    create_collated(&src).await;
    let s = src.coll("data").await;
    s.insert_one(doc! {"_id": "a", "dataId": "x"})
        .await
        .unwrap();
    s.insert_one(doc! {"_id": "b", "dataId": "y"})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]);
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let f = f1.coll("data").await;
    wait_same_by_id(&s, &f, CONVERGE).await;
    r.terminate().await;

    s.delete_one(doc! {"_id": "a"}).await.unwrap();
    s.insert_one(doc! {"_id": "A", "dataId": "k"})
        .await
        .unwrap();
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 1, "the difference went unnoticed: {out}");

    let (code, out) = run_check(&r.config_path, &["--repair"]);
    assert!(
        code == 0 || code == 1,
        "the repair failed (exit {code}): {out}"
    );
    assert_eq!(
        all_by_id(&f).await,
        all_by_id(&s).await,
        "the repair left the follower different: {out}"
    );
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 0, "still different after the repair: {out}");
}

/// README: a follower collection that differs from the source's in a collation "stops its
/// pipeline with the reason". `meta::apply` computes that difference, but returns an error
/// instead of it when anything else fails on the follower (here a source unique index that
/// the follower's existing data breaks; a collMod the follower user may not run does the
/// same), and `sync_meta_to` treats such an error as "documents still replicate". The pair
/// then streamed into a follower collection whose `_id` comparisons are case-insensitive
/// while the source's are binary. Now what stops the pair is decided before any change.
#[tokio::test]
async fn a_collation_difference_stops_the_pair_even_when_an_index_cannot_be_built() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let fdb = f1.client().await.database("app");
    fdb.run_command(doc! {"create": "data", "collation": case_insensitive()})
        .await
        .unwrap();
    // Follower data that breaks the source's unique index (left from earlier, say).
    let f = f1.coll("data").await;
    f.insert_many([
        doc! {"_id": 1, "dataId": "old1", "u": 7},
        doc! {"_id": 2, "dataId": "old2", "u": 7},
    ])
    .await
    .unwrap();
    let s = src.coll("data").await;
    s.insert_one(doc! {"_id": "A", "dataId": "k1", "u": 1})
        .await
        .unwrap();
    unique_index_on(&s, "u").await;

    let cfg = ConfigBuilder::new(&src, &[&f1]);
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let stopped = poll_until(CONVERGE, || async {
        r.status().await.is_some_and(|st| {
            st["followers"][0]["state"] == "stopped"
                && st["followers"][0]["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("collation"))
        })
    })
    .await;
    let st = r.status().await;
    let opts: Vec<Document> = fdb
        .run_cursor_command(doc! {"listCollections": 1, "filter": {"name": "data"}})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(
        stopped,
        "the pair did not stop for the collation difference; follower collection {:?}; follower {:?}; status {}",
        opts.first().and_then(|o| o.get("options")).unwrap_or(&Bson::Null),
        all_by_id(&f).await,
        st.map(|s| s["followers"][0].to_string()).unwrap_or_default()
    );
    drop(r);
}
