//! `meta`: reading, comparing and applying collection options and index definitions,
//! against real servers.

mod common;

use common::*;
use mongo_replicator::meta::{self, MetaDiff};
use mongodb::bson::{doc, Document};
use mongodb::Database;

async fn db(s: &Server) -> Database {
    s.client().await.database("app")
}

async fn cmd(db: &Database, c: Document) {
    db.run_command(c.clone())
        .await
        .unwrap_or_else(|e| panic!("{c}: {e}"));
}

/// A follower without the collection gets it with the source's options (collation,
/// validator) and every index with its options; a simple-collation index on a collection
/// with a default collation stays simple.
#[tokio::test]
async fn a_missing_collection_is_created_with_its_options_and_indexes() {
    let (src, fol) = (Server::start().await, Server::start().await);
    let (s, f) = (db(&src).await, db(&fol).await);
    cmd(&s, doc! {"create": "c", "collation": {"locale": "fr", "strength": 2}, "validator": {"dataId": {"$exists": true}}}).await;
    cmd(&s, doc! {"createIndexes": "c", "indexes": [
        {"key": {"x": 1}, "name": "x_1"},
        {"key": {"y": 1}, "name": "y_simple", "collation": {"locale": "simple"}},
        {"key": {"u": 1}, "name": "u_partial", "unique": true, "partialFilterExpression": {"u": {"$exists": true}}},
        {"key": {"t": 1}, "name": "t_ttl", "expireAfterSeconds": 60},
        {"key": {"s": 1, "z": -1}, "name": "s_sparse", "sparse": true},
        {"key": {"h": 1}, "name": "h_hidden", "hidden": true},
    ]})
    .await;
    let source = meta::read(&s, "c").await.unwrap();
    assert!(source.exists);
    let before = meta::diff(&source, &meta::read(&f, "c").await.unwrap());
    assert_eq!(before[0], MetaDiff::MissingCollection);
    assert_eq!(before.len(), 7, "{before:?}");

    let applied = meta::apply(&source, &f, "c", "dataId", false)
        .await
        .unwrap();
    assert!(applied.unfixed.is_empty(), "{applied:?}");
    let follower = meta::read(&f, "c").await.unwrap();
    let left = meta::diff(&source, &follower);
    assert!(left.is_empty(), "{left:?}");
    assert!(follower
        .index("y_simple")
        .unwrap()
        .get("collation")
        .is_none());
    assert_eq!(
        follower
            .options
            .get_document("collation")
            .unwrap()
            .get_str("locale"),
        Ok("fr")
    );
    // Applying again changes nothing.
    let again = meta::apply(&source, &f, "c", "dataId", false)
        .await
        .unwrap();
    assert_eq!(again, meta::Applied::default());
}

/// Options that cannot change in place are left (and reported) unless `recreate`; then the
/// follower collection is made anew. A capped size changes in place.
#[tokio::test]
async fn recreate_alone_replaces_options_that_cannot_change_in_place() {
    let (src, fol) = (Server::start().await, Server::start().await);
    let (s, f) = (db(&src).await, db(&fol).await);
    cmd(&s, doc! {"create": "c", "capped": true, "size": 8192_i64}).await;
    f.collection::<Document>("c")
        .insert_many((0..5).map(|i| doc! {"dataId": i}))
        .await
        .unwrap();
    let source = meta::read(&s, "c").await.unwrap();
    let applied = meta::apply(&source, &f, "c", "dataId", false)
        .await
        .unwrap();
    let unfixed: Vec<&str> = applied.unfixed.iter().map(|d| d.name()).collect();
    assert!(unfixed.contains(&"capped"), "{applied:?}");
    let fc = f.collection::<Document>("c");
    assert_eq!(fc.count_documents(doc! {}).await.unwrap(), 5);

    let applied = meta::apply(&source, &f, "c", "dataId", true).await.unwrap();
    assert!(applied.unfixed.is_empty(), "{applied:?}");
    assert!(meta::diff(&source, &meta::read(&f, "c").await.unwrap()).is_empty());
    assert_eq!(fc.count_documents(doc! {}).await.unwrap(), 0);

    // Both capped, another size: collMod.
    cmd(&s, doc! {"collMod": "c", "cappedSize": 16384_i64}).await;
    let source = meta::read(&s, "c").await.unwrap();
    let applied = meta::apply(&source, &f, "c", "dataId", false)
        .await
        .unwrap();
    assert!(applied.unfixed.is_empty(), "{applied:?}");
    assert!(meta::diff(&source, &meta::read(&f, "c").await.unwrap()).is_empty());
}

/// The replicator's own key index is never a difference and never dropped, except for a
/// source index on exactly the same key, which takes its place.
#[tokio::test]
async fn the_replicators_key_index_gives_way_only_to_a_source_index_on_its_key() {
    let (src, fol) = (Server::start().await, Server::start().await);
    let (s, f) = (db(&src).await, db(&fol).await);
    cmd(&s, doc! {"create": "c"}).await;
    cmd(
        &f,
        doc! {"createIndexes": "c", "indexes": [
            {"key": {"dataId": 1}, "name": "mongo_replicator_dataId"},
            {"key": {"stray": 1}, "name": "stray_1"},
        ]},
    )
    .await;
    let source = meta::read(&s, "c").await.unwrap();
    let d = meta::diff(&source, &meta::read(&f, "c").await.unwrap());
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].name(), "stray_1");
    meta::apply(&source, &f, "c", "dataId", false)
        .await
        .unwrap();
    let follower = meta::read(&f, "c").await.unwrap();
    assert!(follower.index("mongo_replicator_dataId").is_some());
    assert!(follower.index("stray_1").is_none());

    cmd(
        &s,
        doc! {"createIndexes": "c", "indexes": [
            {"key": {"dataId": 1}, "name": "dataId_unique", "unique": true},
        ]},
    )
    .await;
    let source = meta::read(&s, "c").await.unwrap();
    let applied = meta::apply(&source, &f, "c", "dataId", false)
        .await
        .unwrap();
    assert!(
        applied
            .changed
            .iter()
            .any(|c| c.contains("mongo_replicator_dataId")),
        "{applied:?}"
    );
    let follower = meta::read(&f, "c").await.unwrap();
    assert!(follower.index("mongo_replicator_dataId").is_none());
    assert_eq!(
        follower.index("dataId_unique").unwrap().get_bool("unique"),
        Ok(true)
    );
    assert!(meta::diff(&source, &follower).is_empty());
}

/// `hidden` and a TTL change in place; another change to an index rebuilds it.
#[tokio::test]
async fn index_changes_apply_in_place_or_by_rebuilding() {
    let (src, fol) = (Server::start().await, Server::start().await);
    let (s, f) = (db(&src).await, db(&fol).await);
    cmd(
        &s,
        doc! {"createIndexes": "c", "indexes": [
            {"key": {"t": 1}, "name": "t", "expireAfterSeconds": 60, "hidden": true},
            {"key": {"a": 1}, "name": "a", "unique": true},
        ]},
    )
    .await;
    cmd(
        &f,
        doc! {"createIndexes": "c", "indexes": [
            {"key": {"t": 1}, "name": "t", "expireAfterSeconds": 3600},
            {"key": {"a": -1}, "name": "a"},
        ]},
    )
    .await;
    let source = meta::read(&s, "c").await.unwrap();
    let d = meta::diff(&source, &meta::read(&f, "c").await.unwrap());
    assert_eq!(d.len(), 2, "{d:?}");
    let applied = meta::apply(&source, &f, "c", "dataId", false)
        .await
        .unwrap();
    assert!(
        applied
            .changed
            .contains(&"changed index `t` in place (collMod)".to_string())
            && applied
                .changed
                .contains(&"recreated index `a` (it differed)".to_string()),
        "{applied:?}"
    );
    assert!(meta::diff(&source, &meta::read(&f, "c").await.unwrap()).is_empty());
}

/// An index the follower's data cannot take is an error naming it (with the server's
/// code); the other changes are still made.
#[tokio::test]
async fn an_index_the_follower_cannot_build_is_an_error_naming_it() {
    let (src, fol) = (Server::start().await, Server::start().await);
    let (s, f) = (db(&src).await, db(&fol).await);
    cmd(
        &s,
        doc! {"createIndexes": "c", "indexes": [
            {"key": {"u": 1}, "name": "u_unique", "unique": true},
            {"key": {"v": 1}, "name": "v_1"},
        ]},
    )
    .await;
    f.collection::<Document>("c")
        .insert_many([doc! {"u": 1}, doc! {"u": 1}])
        .await
        .unwrap();
    let source = meta::read(&s, "c").await.unwrap();
    let e = meta::apply(&source, &f, "c", "dataId", false)
        .await
        .expect_err("duplicates cannot take a unique index");
    let text = mongo_replicator::source::describe(&e);
    assert!(
        text.contains("`u_unique`") && text.contains("11000"),
        "{text}"
    );
    let follower = meta::read(&f, "c").await.unwrap();
    assert!(follower.index("v_1").is_some());
    assert!(follower.index("u_unique").is_none());
}
