//! The leader lease across real replicator processes: one leader, fast failover, clean
//! hand-off, and fencing of a stale leader.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mongodb::bson::doc;

const CONVERGE: Duration = Duration::from_secs(60);
/// Test timings: ttl 3 s, renew 500 ms (see `ConfigBuilder`).
const TTL: Duration = Duration::from_secs(3);
const RENEW: Duration = Duration::from_millis(500);

async fn one_leader(nodes: &[Replicator]) -> usize {
    wait_for("exactly one leader", CONVERGE, || async {
        leaders(nodes).await.len() == 1
    })
    .await;
    leaders(nodes).await[0]
}

#[tokio::test]
async fn three_nodes_elect_exactly_one_leader() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let nodes = start_nodes(&ConfigBuilder::new(&src, &[&f1]), 3);
    let leader = one_leader(&nodes).await;
    // It stays that way over several renewals: the others stand by.
    for _ in 0..6 {
        tokio::time::sleep(RENEW).await;
        assert_eq!(leaders(&nodes).await, vec![leader]);
    }
    for (i, n) in nodes.iter().enumerate() {
        let st = n.status().await.unwrap();
        assert_eq!(
            st["lease"]["holder"],
            format!("node-{}", leader + 1),
            "node {i}: {st}"
        );
        assert!(st["term"].as_i64().unwrap() >= 1);
    }
}

#[tokio::test]
async fn killing_the_leader_under_writes_fails_over_and_loses_nothing() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let mut nodes = start_nodes(&ConfigBuilder::new(&src, &[&f1, &f2]), 3);
    let s = src.coll("data").await;
    let writer = Writer::start(s.clone(), "w", 300);
    for _ in 0..2 {
        let leader = one_leader(&nodes).await;
        let term = nodes[leader].status().await.unwrap()["term"]
            .as_i64()
            .unwrap();
        nodes[leader].kill9();
        let killed = Instant::now();
        wait_for("another node leads", CONVERGE, || async {
            let l = leaders(&nodes).await;
            l.len() == 1 && l[0] != leader
        })
        .await;
        let took = killed.elapsed();
        // Failover is bounded by ttl + renew_interval (plus polling slack on a busy machine).
        assert!(
            took < TTL + RENEW + Duration::from_secs(3),
            "failover took {took:?}"
        );
        let new = leaders(&nodes).await[0];
        let new_term = nodes[new].status().await.unwrap()["term"].as_i64().unwrap();
        assert!(new_term > term, "a new holder gets a higher term");
        nodes[leader].spawn();
    }
    let _ = writer.stop().await;
    wait_identical(
        &s,
        &[f1.coll("data").await, f2.coll("data").await],
        CONVERGE,
    )
    .await;
}

#[tokio::test]
async fn sigterm_hands_the_lease_over_at_once() {
    let (src, f1) = (Server::start().await, Server::start().await);
    // Production defaults: a 10 s ttl that a hand-off must not wait for.
    let mut cfg = ConfigBuilder::new(&src, &[&f1]);
    cfg.ttl = "10s";
    cfg.renew = "3s";
    let mut nodes = start_nodes(&cfg, 2);
    let leader = one_leader(&nodes).await;
    let started = Instant::now();
    let status = nodes[leader].terminate().await.expect("exits");
    assert!(status.success());
    wait_for("the other node leads", CONVERGE, || async {
        leaders(&nodes).await == vec![1 - leader]
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "hand-off took {took:?}, the ttl is 10s"
    );
    assert!(nodes[leader].log().contains("lease released"));
}

/// The newest value of a probe document, written through whichever node leads.
async fn set_probe(s: &mongodb::Collection<mongodb::bson::Document>, v: i64) {
    s.update_one(doc! {"dataId": "probe"}, doc! {"$set": {"v": v}})
        .upsert(true)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_paused_leader_that_wakes_after_its_lease_writes_nothing() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    let nodes = start_nodes(&ConfigBuilder::new(&src, &[&f1, &f2]), 2);
    let s = src.coll("data").await;
    let fs = [f1.coll("data").await, f2.coll("data").await];
    // Every batch a follower commits carries the writer's term in its checkpoint document;
    // record them in commit order, as the follower saw them.
    let recorders = [
        TermRecorder::start(&f1).await,
        TermRecorder::start(&f2).await,
    ];
    let writer = Writer::start(s.clone(), "w", 100);
    let mut v = 0;
    for round in 0..3 {
        // Repeated flapping: pause whoever leads, past the ttl, then resume it.
        let old = one_leader(&nodes).await;
        set_probe(&s, v).await;
        v += 1;
        nodes[old].signal(libc::SIGSTOP);
        wait_for("the other node takes over", CONVERGE, || async {
            nodes[1 - old].role().await.as_deref() == Some("leader")
        })
        .await;
        // Writes continue through the new leader, during and after the pause.
        for _ in 0..5 {
            set_probe(&s, v).await;
            v += 1;
        }
        tokio::time::sleep(TTL).await; // keep it stopped well past its ttl
        set_probe(&s, v).await;
        v += 1;
        nodes[old].signal(libc::SIGCONT);
        wait_for("the old leader answers again", CONVERGE, || async {
            nodes[old].status().await.is_some()
        })
        .await;
        for _ in 0..5 {
            set_probe(&s, v).await;
            v += 1;
        }
        for f in &fs {
            wait_for("newest probe value on the follower", CONVERGE, || async {
                f.find_one(doc! {"dataId": "probe"})
                    .await
                    .unwrap()
                    .and_then(|d| d.get_i64("v").ok())
                    == Some(v - 1)
            })
            .await;
        }
        // The old leader reports standby and applied nothing after it woke.
        wait_for("old leader is standby", CONVERGE, || async {
            nodes[old].role().await.as_deref() == Some("standby")
        })
        .await;
        for f in &fs {
            let probe = f.find_one(doc! {"dataId": "probe"}).await.unwrap().unwrap();
            assert_eq!(
                probe.get_i64("v").unwrap(),
                v - 1,
                "round {round}: newest value wins"
            );
        }
    }
    let _ = writer.stop().await;
    wait_identical(&s, &fs, CONVERGE).await;
    // Fencing: once a follower committed a batch of a newer term, it never committed one of
    // an older term again, although each stale leader woke up with writes in flight.
    for r in recorders {
        let terms = r.stop().await;
        let distinct: std::collections::BTreeSet<_> = terms.iter().collect();
        assert!(
            distinct.len() >= 3,
            "expected a term per leadership: {terms:?}"
        );
        assert!(
            terms.windows(2).all(|w| w[0] <= w[1]),
            "a stale leader wrote after a newer one: {terms:?}"
        );
    }
}

/// Collects the term of every checkpoint a follower commits, in commit order.
struct TermRecorder {
    task: tokio::task::JoinHandle<Vec<i64>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TermRecorder {
    async fn start(follower: &Server) -> TermRecorder {
        let coll = follower
            .client()
            .await
            .database("mongo_replicator")
            .collection::<mongodb::bson::Document>("checkpoints");
        let mut stream = coll
            .watch()
            .max_await_time(Duration::from_millis(200))
            .await
            .unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut terms = Vec::new();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                // next_if_any returns after each getMore (max 200 ms), so the stop flag is
                // seen without cancelling a read in flight.
                let Ok(Some(ev)) = stream.next_if_any().await else {
                    continue;
                };
                let term = ev
                    .full_document
                    .as_ref()
                    .and_then(|d| d.get_i64("term").ok())
                    .or_else(|| {
                        ev.update_description
                            .as_ref()
                            .and_then(|u| u.updated_fields.get_i64("term").ok())
                    });
                if let Some(t) = term {
                    terms.push(t);
                }
            }
            terms
        });
        TermRecorder { task, stop }
    }

    async fn stop(self) -> Vec<i64> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

#[tokio::test]
async fn a_leader_cut_off_from_the_source_steps_down_and_another_takes_over() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let proxy = Proxy::start(src.port).await;
    // node-1 reaches the source only through the proxy; node-2 directly.
    let mut via_proxy = ConfigBuilder::new(&src, &[&f1]);
    via_proxy.source = proxy.uri();
    let a = Replicator::start(&via_proxy, "node-1");
    wait_for("node-1 leads", CONVERGE, || async {
        a.role().await.as_deref() == Some("leader")
    })
    .await;
    let b = Replicator::start(&ConfigBuilder::new(&src, &[&f1]), "node-2");
    wait_for("node-2 stands by", CONVERGE, || async {
        b.role().await.as_deref() == Some("standby")
    })
    .await;

    proxy.cut();
    wait_for("node-1 steps down", CONVERGE, || async {
        a.role().await.as_deref() == Some("standby")
    })
    .await;
    wait_for("node-2 takes over", CONVERGE, || async {
        b.role().await.as_deref() == Some("leader")
    })
    .await;
    let s = src.coll("data").await;
    for i in 0..20 {
        s.insert_one(doc! {"dataId": format!("p{i}")})
            .await
            .unwrap();
    }
    wait_identical(&s, &[f1.coll("data").await], CONVERGE).await;
    assert!(a.log().contains("stepping down"), "{}", a.log());
    drop(proxy);
}
