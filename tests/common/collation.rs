//! For the collation tests: a case-insensitive collection, and exact (binary) reads by `_id`
//! whatever a collection's default collation (the harness's `wait_identical` sorts under
//! each side's default).

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::Collation;

use super::{Replicator, Server};

/// A case-insensitive collation: "A" and "a" are equal under it.
pub fn case_insensitive() -> Document {
    doc! {"locale": "en", "strength": 2}
}

/// Binary comparison, for reads that must see each `_id` and key exactly.
pub fn binary() -> Collation {
    Collation::builder().locale("simple").build()
}

/// Creates `app.data` on `server` with the case-insensitive default collation.
pub async fn create_collated(server: &Server) {
    server
        .client()
        .await
        .database("app")
        .run_command(doc! {"create": "data", "collation": case_insensitive()})
        .await
        .unwrap();
}

/// Every document, in binary `_id` order, as exact BSON.
pub async fn all_by_id(c: &mongodb::Collection<Document>) -> Vec<Document> {
    c.find(doc! {})
        .sort(doc! {"_id": 1})
        .collation(binary())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// The document whose `_id` is exactly `id`.
pub async fn get_id(c: &mongodb::Collection<Document>, id: &str) -> Option<Document> {
    c.find_one(doc! {"_id": {"$eq": id}})
        .collation(binary())
        .await
        .unwrap()
}

pub async fn has_id(c: &mongodb::Collection<Document>, id: &str) -> bool {
    get_id(c, id).await.is_some()
}

/// The node's first pair stopped with a reason that names the collation.
pub async fn stopped_for_collation(r: &Replicator) -> bool {
    r.status().await.is_some_and(|st| {
        st["followers"][0]["state"] == "stopped"
            && st["followers"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("collation"))
    })
}
