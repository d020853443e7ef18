//! Peak memory of a replicator catching up a backlog, for small and large documents: the
//! batches and the read-ahead are bounded in bytes (`replication.batch_max_bytes`), so the
//! peak should not grow with the backlog or the document size.
//!
//! `cargo bench --bench memory -- [SMALL_DOCS] [LARGE_DOCS]` (defaults 100000 and 200).
//! - a backlog of SMALL_DOCS documents of ~1 KB written while the node is stopped;
//! - a backlog of LARGE_DOCS documents of ~1 MB written while the node is stopped;
//! - an initial copy of those LARGE_DOCS documents to a new follower.
//!
//! Peak memory is the replicator process's `VmHWM`, read before it stops.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::{doc, Document};

async fn insert_all(c: &mongodb::Collection<Document>, docs: impl Iterator<Item = Document>) {
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for d in docs {
        bytes += mongodb::bson::to_vec(&d).map(|v| v.len()).unwrap_or(0);
        chunk.push(d);
        if chunk.len() >= 1000 || bytes >= 8 * 1024 * 1024 {
            c.insert_many(std::mem::take(&mut chunk)).await.unwrap();
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        c.insert_many(chunk).await.unwrap();
    }
}

async fn until_count(c: &mongodb::Collection<Document>, n: u64) {
    wait_for(
        "documents on the follower",
        Duration::from_secs(1200),
        || async { c.count_documents(doc! {}).await.unwrap_or(0) >= n },
    )
    .await;
}

/// As in the performance bench: the suite's 128 MB cache can stall the test server under a
/// burst of writes (tests/README).
fn big_cache() -> ServerOpts {
    ServerOpts {
        cache_size: Some("2G"),
        ..Default::default()
    }
}

/// Catches up `docs` written while the node was stopped; returns (seconds, peak MiB).
async fn backlog(n: usize, size: usize, label: &str) -> (f64, u64) {
    // The test server keeps 100,000 oplog entries by default: a backlog of that size would
    // fall off and become a copy (which the assertion below refuses).
    let (src, f1) = (
        Server::start_with(ServerOpts {
            oplog_max_entries: Some(2 * n as u64 + 100_000),
            ..big_cache()
        })
        .await,
        Server::start_with(big_cache()).await,
    );
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    let cfg = ConfigBuilder::new(&src, &[&f1]);
    let mut r = Replicator::start(&cfg, label);
    wait_for("streaming", Duration::from_secs(60), || async {
        r.status()
            .await
            .is_some_and(|st| st["followers"][0]["state"] == "streaming")
    })
    .await;
    r.terminate().await;
    let payload = "x".repeat(size);
    insert_all(
        &s,
        (0..n).map(|i| doc! {"dataId": format!("{label}{i:08}"), "payload": &payload}),
    )
    .await;
    r.spawn();
    let t = Instant::now();
    until_count(&f, n as u64).await;
    let secs = t.elapsed().as_secs_f64();
    let peak = r.peak_rss_kib().unwrap_or(0) / 1024;
    assert!(
        !r.log().contains("copying this follower again"),
        "the backlog fell off the source's oplog: the figure would be a copy, not a catch-up"
    );
    r.terminate().await;
    (secs, peak)
}

/// Copies `n` existing documents to a new follower; returns (seconds, peak MiB).
async fn copy(n: usize, size: usize) -> (f64, u64) {
    let (src, f1) = (
        Server::start_with(big_cache()).await,
        Server::start_with(big_cache()).await,
    );
    let s = src.coll("data").await;
    let payload = "x".repeat(size);
    insert_all(
        &s,
        (0..n).map(|i| doc! {"dataId": format!("c{i:08}"), "payload": &payload}),
    )
    .await;
    let t = Instant::now();
    let mut r = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "copy");
    until_count(&f1.coll("data").await, n as u64).await;
    let secs = t.elapsed().as_secs_f64();
    let peak = r.peak_rss_kib().unwrap_or(0) / 1024;
    r.terminate().await;
    (secs, peak)
}

#[tokio::main]
async fn main() {
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let small = nums.first().copied().unwrap_or(100_000);
    let large = nums.get(1).copied().unwrap_or(200);
    let (a_secs, a_peak) = backlog(small, 1000, "small").await;
    let (b_secs, b_peak) = backlog(large, 1_000_000, "large").await;
    let (c_secs, c_peak) = copy(large, 1_000_000).await;
    println!(
        "peak memory of the replicator (VmHWM), one follower, default batch_max_bytes (16 MiB):"
    );
    println!("| case | documents | seconds | peak memory |");
    println!("|---|---|---|---|");
    println!("| backlog of ~1 KB documents | {small} | {a_secs:.1} | {a_peak} MiB |");
    println!("| backlog of ~1 MB documents | {large} | {b_secs:.1} | {b_peak} MiB |");
    println!("| initial copy of ~1 MB documents | {large} | {c_secs:.1} | {c_peak} MiB |");
}
