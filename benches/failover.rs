//! Failover time, measured over repeated kills of the leader.
//!
//! `cargo bench --bench failover -- [KILLS]` (default 10). Three nodes with the default
//! lease settings (ttl 5 s, renew 1 s) replicate one source to one follower under continuous
//! writes. Each round kills the leader with SIGKILL and measures
//! - election: from the kill until another node reports `leader`;
//! - data: from the kill until a write made right after the kill is on the follower;
//!
//! then restarts the killed node. It also measures the graceful hand-off (SIGTERM). At the
//! end the follower must be identical to the source.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::doc;

fn summary(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{name:<24} n={:<3} min {:>7.0} ms   median {:>7.0} ms   max {:>7.0} ms",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    )
}

#[tokio::main]
async fn main() {
    let kills: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let (src, f1) = (Server::start().await, Server::start().await);
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.ttl = "5s";
    cfg.renew = "1s";
    let mut nodes = start_nodes(&cfg, 3);
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    let writer = Writer::start(s.clone(), "w", 500);
    let wait = Duration::from_secs(60);

    let mut election = Vec::new();
    let mut data = Vec::new();
    for round in 0..kills {
        wait_for("one leader", wait, || async {
            leaders(&nodes).await.len() == 1
        })
        .await;
        let leader = leaders(&nodes).await[0];
        // Let the new leader settle into streaming before the next kill.
        tokio::time::sleep(Duration::from_secs(2)).await;
        nodes[leader].kill9();
        let killed = Instant::now();
        let probe = format!("probe-{round}");
        s.insert_one(doc! {"dataId": &probe}).await.unwrap();
        wait_for("a new leader", wait, || async {
            let l = leaders(&nodes).await;
            l.len() == 1 && l[0] != leader
        })
        .await;
        election.push(killed.elapsed());
        wait_for("probe replicated", wait, || async {
            f.count_documents(doc! {"dataId": &probe}).await.unwrap() == 1
        })
        .await;
        data.push(killed.elapsed());
        eprintln!(
            "round {round}: election {:?}, data {:?}",
            election[round], data[round]
        );
        nodes[leader].spawn();
    }

    let mut handoff = Vec::new();
    for _ in 0..5 {
        wait_for("one leader", wait, || async {
            leaders(&nodes).await.len() == 1
        })
        .await;
        let leader = leaders(&nodes).await[0];
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = Instant::now();
        nodes[leader].terminate().await;
        wait_for("a new leader", wait, || async {
            let l = leaders(&nodes).await;
            l.len() == 1 && l[0] != leader
        })
        .await;
        handoff.push(t.elapsed());
        nodes[leader].spawn();
    }
    let _ = writer.stop().await;
    wait_identical(&s, &[f], Duration::from_secs(120)).await;

    println!("failover with ttl 5s, renew_interval 1s (defaults), 3 nodes, continuous writes:");
    println!("{}", summary("kill -9 -> new leader", election));
    println!("{}", summary("kill -9 -> write applied", data));
    println!("{}", summary("SIGTERM hand-off", handoff));
    println!("follower identical to the source after all kills: yes");
}
