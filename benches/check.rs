//! Consistency-check time and peak memory on large collections, identical and with 0.1%
//! drift. `cargo bench --bench check -- [SIZES]` (default 100000,1000000).
//!
//! Source and follower are loaded directly with the same documents (as a finished
//! replication leaves them), then `mongo-replicator check` runs as a child process; its peak
//! resident memory comes from the kernel (`wait4` rusage).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::{doc, oid::ObjectId, Document};

// The child is reaped with wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn run_check(config: &std::path::Path) -> (i32, Duration, u64, String) {
    let t = Instant::now();
    let child = std::process::Command::new(bin())
        .args([
            "check",
            "--json",
            "--recheck-delay",
            "200ms",
            "--recheck-rounds",
            "2",
            "--config",
        ])
        .arg(config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let mut out = child.stdout.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = t.elapsed();
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    (
        code,
        elapsed,
        usage.ru_maxrss as u64 / 1024,
        reader.join().unwrap(),
    )
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .find(|a| a.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .unwrap_or_else(|| "100000,1000000".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let mut rows = Vec::new();
    for n in sizes {
        let (src, f1) = (Server::start().await, Server::start().await);
        let (s, f) = (src.coll("data").await, f1.coll("data").await);
        for c in [&s, &f] {
            c.create_index(
                mongodb::IndexModel::builder()
                    .keys(doc! {"dataId": 1})
                    .build(),
            )
            .await
            .unwrap();
        }
        let t = Instant::now();
        for start in (0..n).step_by(10_000) {
            let chunk: Vec<Document> = (start..(start + 10_000).min(n))
                .map(|i| doc! {"_id": ObjectId::new(), "dataId": format!("k{i:08}"), "n": i as i64, "payload": "y".repeat(100)})
                .collect();
            s.insert_many(chunk.clone()).await.unwrap();
            f.insert_many(chunk).await.unwrap();
        }
        eprintln!("loaded {n} documents on both sides in {:?}", t.elapsed());
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            ConfigBuilder::new(&src, &[&f1]).render(dir.path(), free_port()),
        )
        .unwrap();

        let (code, took, rss, _) = run_check(&config);
        assert_eq!(code, 0, "identical collections must check clean");
        rows.push((n, "identical", took, rss, 0u64));

        // 0.1% drift: a third deleted, a third modified, a third extra.
        let drift = n / 1000;
        for i in 0..drift {
            let k = format!("k{:08}", i * 997 % n);
            match i % 3 {
                0 => {
                    f.delete_one(doc! {"dataId": &k}).await.unwrap();
                }
                1 => {
                    f.update_one(doc! {"dataId": &k}, doc! {"$set": {"n": -1_i64}})
                        .await
                        .unwrap();
                }
                _ => {
                    f.insert_one(doc! {"dataId": format!("extra{i:08}")})
                        .await
                        .unwrap();
                }
            }
        }
        let (code, took, rss, out) = run_check(&config);
        assert_eq!(code, 1, "drift must be found");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let p = &v["pairs"][0];
        let found = p["missing"].as_u64().unwrap()
            + p["extra"].as_u64().unwrap()
            + p["different"].as_u64().unwrap();
        assert_eq!(
            found as usize, drift,
            "every injected difference found, no more"
        );
        rows.push((n, "0.1% drift", took, rss, found));
    }
    println!("consistency check (release build), one follower:");
    println!(
        "  {:>9}  {:<11} {:>9} {:>12} {:>10} {:>6}",
        "documents", "case", "seconds", "docs/s", "peak MiB", "found"
    );
    for (n, case, took, rss, found) in rows {
        println!(
            "  {n:>9}  {case:<11} {:>9.1} {:>12.0} {:>10} {found:>6}",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64(),
            rss
        );
    }
}
