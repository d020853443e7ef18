//! Replication throughput, reported as ratios against the follower's own write speed,
//! measured side by side in one run (these machines are shared and noisy; absolute numbers
//! are indicative only).
//!
//! `cargo bench --bench throughput -- [DOCS]` (default 50000).
//! - baseline: `insert_many` of DOCS documents straight into the follower (1000 per call);
//! - initial sync: DOCS pre-existing documents copied to the follower;
//! - streaming inserts: DOCS inserted on the source (1000 per `insert_many`) while the
//!   replicator runs, timed until the last is on the follower;
//! - streaming updates: DOCS single-document updates on the source, timed likewise.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::{doc, Document};

fn docs(prefix: &str, n: usize) -> Vec<Document> {
    (0..n)
        .map(|i| doc! {"dataId": format!("{prefix}{i:08}"), "n": i as i64, "payload": "x".repeat(200), "tags": ["a", "b"]})
        .collect()
}

async fn insert_all(c: &mongodb::Collection<Document>, d: Vec<Document>) {
    for chunk in d.chunks(1000) {
        c.insert_many(chunk.to_vec()).await.unwrap();
    }
}

async fn until_count(c: &mongodb::Collection<Document>, filter: Document, n: u64) {
    wait_for(
        "documents on the follower",
        Duration::from_secs(600),
        || async { c.count_documents(filter.clone()).await.unwrap() >= n },
    )
    .await;
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50_000);
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    let unique = mongodb::IndexModel::builder()
        .keys(doc! {"dataId": 1})
        .options(
            mongodb::options::IndexOptions::builder()
                .unique(true)
                .build(),
        )
        .build();
    s.create_index(unique.clone()).await.unwrap();

    // Baseline: how fast the follower takes these documents directly, with an index on the
    // key as the replicator's follower has.
    let scratch = f1
        .client()
        .await
        .database("scratch")
        .collection::<Document>("data");
    scratch.create_index(unique).await.unwrap();
    let t = Instant::now();
    insert_all(&scratch, docs("b", n)).await;
    let baseline = n as f64 / t.elapsed().as_secs_f64();

    // Initial sync.
    insert_all(&s, docs("pre", n)).await;
    let t = Instant::now();
    let r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "bench");
    until_count(&f, doc! {}, n as u64).await;
    let initial = n as f64 / t.elapsed().as_secs_f64();
    wait_for("streaming", Duration::from_secs(60), || async {
        r.status()
            .await
            .is_some_and(|st| st["followers"][0]["state"] == "streaming")
    })
    .await;

    // Streaming inserts.
    let t = Instant::now();
    insert_all(&s, docs("ins", n)).await;
    let source_rate = n as f64 / t.elapsed().as_secs_f64();
    until_count(&f, doc! {"dataId": {"$regex": "^ins"}}, n as u64).await;
    let inserts = n as f64 / t.elapsed().as_secs_f64();

    // Streaming updates, one document per update.
    let t = Instant::now();
    for i in 0..n {
        s.update_one(
            doc! {"dataId": format!("pre{i:08}")},
            doc! {"$set": {"u": 1}},
        )
        .await
        .unwrap();
    }
    let source_updates = n as f64 / t.elapsed().as_secs_f64();
    until_count(&f, doc! {"u": 1}, n as u64).await;
    let updates = n as f64 / t.elapsed().as_secs_f64();
    wait_identical(&s, &[f], Duration::from_secs(300)).await;
    drop(r);

    println!(
        "throughput, {n} documents of ~250 bytes, one follower (docs/s; ratio to the baseline):"
    );
    println!("  baseline: insert_many into the follower   {baseline:>9.0}   1.00");
    println!(
        "  initial sync                              {initial:>9.0}   {:.2}",
        initial / baseline
    );
    println!(
        "  streaming inserts (source wrote {source_rate:.0}/s) {inserts:>9.0}   {:.2}",
        inserts / baseline
    );
    println!(
        "  streaming single-document updates (the source took {source_updates:.0}/s from one client) {updates:>9.0}   {:.2}",
        updates / baseline
    );
    println!("follower identical to the source: yes");
}
