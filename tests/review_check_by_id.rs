//! Hostile review of 1a963eb (check compares the documents without the key by `_id` under
//! `missing_key = "use_id"`), kept as regression tests: documents whose key cannot identify
//! one (an array, a regex) and a null `_id` are compared too, and a document keyed on one
//! side and keyless on the other is one difference (the keyed comparison's), not two.

mod common;

use std::time::Duration;

use common::collation::*;
use common::*;
use mongodb::bson::{doc, Bson, Regex};

const CONVERGE: Duration = Duration::from_secs(45);
const LEAD: Duration = Duration::from_secs(60);

fn first_json(out: &str) -> serde_json::Value {
    serde_json::Deserializer::from_str(&out[out.find('{').unwrap()..])
        .into_iter::<serde_json::Value>()
        .next()
        .unwrap()
        .unwrap()
}

fn use_id(src: &Server, f1: &Server) -> ConfigBuilder {
    ConfigBuilder::new(src, &[f1]).extra("[replication]\nmissing_key = \"use_id\"\n")
}

/// The replicator treats a key that cannot identify one document (an array, a regex) as
/// missing, and under `use_id` replicates the document by `_id` (`change::upsert_for`). The
/// by-`_id` comparison selects only documents whose key is missing or null, so a follower
/// that lost such a document, or holds another version of it, is called identical.
#[tokio::test]
async fn under_use_id_check_sees_a_lost_or_changed_document_whose_key_is_unusable() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    s.insert_many([
        doc! {"_id": "k", "dataId": "k1", "v": 1},
        doc! {"_id": "a1", "dataId": [1, 2], "v": 1},
        doc! {"_id": "r1", "dataId": Bson::RegularExpression(Regex { pattern: "^x".into(), options: String::new() }), "v": 1},
    ])
    .await
    .unwrap();
    let cfg = use_id(&src, &f1);
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    r.terminate().await;
    f.delete_one(doc! {"_id": "a1"}).await.unwrap();
    f.update_one(doc! {"_id": "r1"}, doc! {"$set": {"v": 999}})
        .await
        .unwrap();
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(
        code,
        1,
        "check exit {code}: follower lost \"a1\" (dataId [1,2]) and holds another version of \"r1\" (dataId /^x/), both replicated by _id: source {:?}; follower {:?}\n{out}",
        all_by_id(&s).await,
        all_by_id(&f).await
    );
}

/// A document without the key whose `_id` is null (legal; one per collection) is replicated
/// by `_id` under `use_id`, but the by-`_id` comparison's own key filter (`_id` exists and is
/// not null) leaves it out, and `absorb` subtracts it from "without the key" too: a follower
/// that lost it is called identical, and it is reported nowhere.
#[tokio::test]
async fn under_use_id_check_sees_a_lost_keyless_document_whose_id_is_null() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    s.insert_many([
        doc! {"_id": "k", "dataId": "k1", "v": 1},
        doc! {"_id": Bson::Null, "v": 1},
    ])
    .await
    .unwrap();
    let cfg = use_id(&src, &f1);
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    r.terminate().await;
    f.delete_one(doc! {"_id": Bson::Null}).await.unwrap();
    let (code, out) = run_check(&r.config_path, &["--json"]);
    assert_eq!(
        code,
        1,
        "check exit {code}: follower lost the keyless document with _id null: source {:?}; follower {:?}\n{out}",
        all_by_id(&s).await,
        all_by_id(&f).await
    );
}

/// One follower document, the keyed source document "x" (dataId "kx") held without its key:
/// the keyed pass reports key "kx" missing, and the by-`_id` pass (whose recheck reads `_id`
/// "x" without the `only` filter) reports `_id` "x" different. One document, two
/// differences; and the repair counts two upserts for it.
#[tokio::test]
async fn one_document_held_without_its_key_is_counted_once() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    s.insert_many([
        doc! {"_id": "x", "dataId": "kx", "v": 1},
        doc! {"_id": "n", "v": 1},
    ])
    .await
    .unwrap();
    let cfg = use_id(&src, &f1);
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    r.terminate().await;
    f.update_one(doc! {"_id": "x"}, doc! {"$unset": {"dataId": ""}})
        .await
        .unwrap();
    let (code, out) = run_check(&r.config_path, &["--json"]);
    assert_eq!(code, 1, "{out}");
    let json: serde_json::Value = first_json(&out);
    let p = &json["pairs"][0];
    let total = p["missing"].as_u64().unwrap()
        + p["extra"].as_u64().unwrap()
        + p["different"].as_u64().unwrap();
    assert_eq!(
        total, 1,
        "one follower document differs (\"x\" held without its key), reported as {total} differences: {p}"
    );
    let (code, out) = run_check(&r.config_path, &["--repair", "--json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(all_by_id(&f).await, all_by_id(&s).await, "{out}");
    let json: serde_json::Value = first_json(&out);
    assert_eq!(
        json["pairs"][0]["repaired"]["upserted"].as_u64(),
        Some(1),
        "one document rewritten, counted: {}",
        json["pairs"][0]["repaired"]
    );
}
