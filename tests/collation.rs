//! A source collection with a case-insensitive default collation. With `indexes = true` the
//! follower collection gets the same collation, under which "key" equals "Key". A key is
//! data: the replicator and the check must find each key by its exact value, or the upsert
//! of one key overwrites (and the careful plan deletes) the other.

mod common;

use std::time::Duration;

use common::collation::*;
use common::*;
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};

const CONVERGE: Duration = Duration::from_secs(45);
const LEAD: Duration = Duration::from_secs(60);

/// A source whose collection `data` compares case-insensitively by default.
async fn collated_source() -> Server {
    let src = Server::start().await;
    create_collated(&src).await;
    src
}

async fn indexes(c: &mongodb::Collection<Document>) -> Vec<Document> {
    c.client()
        .database(&c.namespace().db)
        .run_cursor_command(doc! {"listIndexes": c.name()})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

fn locale(ix: &Document) -> &str {
    ix.get_document("collation")
        .ok()
        .and_then(|c| c.get_str("locale").ok())
        .unwrap_or("simple")
}

#[tokio::test]
async fn keys_that_differ_only_by_case_both_replicate_while_streaming() {
    let (src, f1) = (collated_source().await, Server::start().await);
    let s = src.coll("data").await;
    // The source's own index on the key inherits the collection's collation: it cannot serve
    // lookups of exact values, so the replicator's binary key index stays beside it.
    s.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! {"dataId": 1})
            .build(),
    )
    .await
    .unwrap();
    s.insert_one(doc! {"dataId": "Key", "n": 1}).await.unwrap();
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["data".into()];
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;

    s.insert_one(doc! {"dataId": "key", "n": 2}).await.unwrap();
    s.insert_one(doc! {"dataId": "KEY", "n": 3}).await.unwrap();
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    assert_eq!(f.count_documents(doc! {}).await.unwrap(), 3);

    // Updates and a delete of one of them touch only that one.
    s.update_one(doc! {"dataId": "key"}, doc! {"$set": {"n": 20}})
        .collation(binary())
        .await
        .unwrap();
    s.delete_one(doc! {"dataId": "KEY"})
        .collation(binary())
        .await
        .unwrap();
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    assert_eq!(f.count_documents(doc! {}).await.unwrap(), 2);

    let ix = indexes(&f).await;
    let own = ix
        .iter()
        .find(|i| i.get_str("name") == Ok("mongo_replicator_dataId"))
        .unwrap_or_else(|| panic!("no key index of the replicator: {ix:?}"));
    assert_eq!(locale(own), "simple", "{own}");
    let theirs = ix
        .iter()
        .find(|i| i.get_str("name") == Ok("dataId_1"))
        .unwrap_or_else(|| panic!("the source's index is missing: {ix:?}"));
    assert_eq!(locale(theirs), "en", "{theirs}");
    drop(r);
}

#[tokio::test]
async fn keys_that_differ_only_by_case_survive_the_copy() {
    let (src, f1) = (collated_source().await, Server::start().await);
    let s = src.coll("data").await;
    for (i, k) in ["Key", "key", "kEy", "other"].iter().enumerate() {
        s.insert_one(doc! {"dataId": *k, "n": i as i32})
            .await
            .unwrap();
    }
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["data".into()];
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    let st = r.status().await.expect("status");
    assert_eq!(
        st["followers"][0]["quarantined"].as_u64(),
        Some(0),
        "a key was refused: {st}"
    );
    drop(r);
}

/// `check` orders keys binary and `--repair` writes each key by its exact value: a repair of
/// "key" must not overwrite "Key".
#[tokio::test]
async fn check_and_repair_find_keys_by_exact_value() {
    let (src, f1) = (collated_source().await, Server::start().await);
    let s = src.coll("data").await;
    // Binary and case-insensitive orders differ here ("Banana" < "apple" binary).
    for (i, k) in ["apple", "Banana", "Key", "key", "zeta"].iter().enumerate() {
        s.insert_one(doc! {"dataId": *k, "n": i as i32})
            .await
            .unwrap();
    }
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["data".into()];
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    r.terminate().await;

    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 0, "identical copies reported as different: {out}");

    // Damage the follower: "key" gone, "Key" changed.
    f.delete_one(doc! {"dataId": "key"})
        .collation(binary())
        .await
        .unwrap();
    f.update_one(doc! {"dataId": "Key"}, doc! {"$set": {"n": -1}})
        .collation(binary())
        .await
        .unwrap();
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 1, "the damage went unnoticed: {out}");

    let (code, out) = run_check(&r.config_path, &["--repair"]);
    assert!(code == 0 || code == 1, "repair failed: {out}");
    wait_identical(&s, std::slice::from_ref(&f), Duration::from_secs(5)).await;
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 0, "still different after the repair: {out}");
}

/// A follower whose key index an earlier version built under the collection's collation
/// (it cannot serve exact lookups) gets it rebuilt binary, and both keys replicate.
#[tokio::test]
async fn a_key_index_built_under_the_collection_collation_is_rebuilt_binary() {
    let (src, f1) = (collated_source().await, Server::start().await);
    let fdb = f1.client().await.database("app");
    fdb.run_command(doc! {"create": "data", "collation": case_insensitive()})
        .await
        .unwrap();
    fdb.run_command(doc! {"createIndexes": "data", "indexes": [
        {"key": {"dataId": 1}, "name": "mongo_replicator_dataId"},
    ]})
    .await
    .unwrap();
    let f = f1.coll("data").await;
    let before = indexes(&f).await;
    assert!(
        before
            .iter()
            .any(|i| locale(i) == "en" && i.get_str("name") == Ok("mongo_replicator_dataId")),
        "the setup did not build a collated key index: {before:?}"
    );
    let s = src.coll("data").await;
    s.insert_one(doc! {"dataId": "Key", "n": 1}).await.unwrap();
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.collections = vec!["data".into()];
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    s.insert_one(doc! {"dataId": "key", "n": 2}).await.unwrap();
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    let after = indexes(&f).await;
    let own = after
        .iter()
        .find(|i| i.get_str("name") == Ok("mongo_replicator_dataId"))
        .unwrap_or_else(|| panic!("the key index is gone: {after:?}"));
    assert_eq!(locale(own), "simple", "{own}");
    drop(r);
}
