//! Fifth hostile review of the collation rule of 5f97ca9 (statements by `_id` carry the
//! collation both sides share, binary when they differ), kept as regression tests:
//! - a document without the key (`missing_key = "use_id"`) whose follower twin differs in
//!   `_id` bytes only under a shared collation was refused for good (code 66: the upsert by
//!   `_id` found the twin); the careful plan now clears the `_id` for it too;
//! - `check` reports a case twin a looser follower refused; two followers of different
//!   collations each settle their own rule (held);
//! - `check` did not compare documents without the key under `use_id`, so it called a
//!   follower that lost one identical; they are now compared by `_id` (and repaired).

mod common;

use std::time::Duration;

use common::collation::*;
use common::*;
use mongodb::bson::doc;

const CONVERGE: Duration = Duration::from_secs(45);
const LEAD: Duration = Duration::from_secs(60);

/// `missing_key = "use_id"`: documents without the key are replicated by `_id`. `check`
/// (exit 0 = identical) must not call a follower identical that lost one of them, or holds
/// another version of one.
#[tokio::test]
async fn under_use_id_check_sees_a_keyless_document_lost_or_changed_on_the_follower() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let s = src.coll("data").await;
    s.insert_many([
        doc! {"_id": "k", "dataId": "k1", "v": 1},
        doc! {"_id": "n1", "v": 1},
        doc! {"_id": "n2", "v": 1},
    ])
    .await
    .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nmissing_key = \"use_id\"\n");
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    r.terminate().await;
    // The follower loses one keyless document and holds another version of the other.
    f.delete_one(doc! {"_id": "n1"}).await.unwrap();
    f.update_one(doc! {"_id": "n2"}, doc! {"$set": {"v": 999}})
        .await
        .unwrap();
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(
        code, 1,
        "check called a follower identical that lost keyless \"n1\" and holds another version of \"n2\": source {:?}; follower {:?}\n{out}",
        all_by_id(&s).await,
        all_by_id(&f).await
    );
    assert!(
        out.contains("1 missing") && out.contains("1 different"),
        "{out}"
    );
    let (code, out) = run_check(&r.config_path, &["--repair"]);
    assert_eq!(code, 0, "the repair did not bring them back: {out}");
    assert_eq!(all_by_id(&f).await, all_by_id(&s).await, "{out}");
}

/// `use_id`, the source and follower collections sharing a case-insensitive collation
/// (`indexes = true` copies it). The follower holds a stale "a" where the source holds "A"
/// (a follower restored from an older copy, before the source replaced "a" by "A"); a
/// resync copies. The copy's upsert of "A" by `_id` under the shared collation finds "a"
/// and must replace it; expected afterwards: the follower holds exactly the source.
#[tokio::test]
async fn under_use_id_and_a_shared_case_insensitive_collation_a_resync_replaces_a_stale_case_twin()
{
    let (src, f1) = (Server::start().await, Server::start().await);
    create_collated(&src).await;
    let s = src.coll("data").await;
    s.insert_many([doc! {"_id": "x", "dataId": "kx"}, doc! {"_id": "A", "v": 2}])
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nmissing_key = \"use_id\"\n");
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let f = f1.coll("data").await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    r.wait_streaming(CONVERGE).await;
    // The follower's older state: "a" where the source now holds "A".
    f.delete_one(doc! {"_id": {"$eq": "A"}})
        .collation(binary())
        .await
        .unwrap();
    f.insert_one(doc! {"_id": "a", "v": 1}).await.unwrap();
    assert_eq!(r.post("/resync/f1").await, 202);
    let ok = poll_until(CONVERGE, || async {
        get_id(&f, "A").await == get_id(&s, "A").await && !has_id(&f, "a").await
    })
    .await;
    let (code, out) = run_check(&r.config_path, &[]);
    let (rcode, rout) = if ok {
        (0, String::new())
    } else {
        run_check(&r.config_path, &["--repair"])
    };
    let after_repair = all_by_id(&f).await;
    assert!(
        ok,
        "after the resync the follower does not hold the source's \"A\": source {:?}; follower {:?}; quarantined {}; status {:?}\ncheck exit {code}:\n{out}\ncheck --repair exit {rcode}:\n{rout}\nfollower after the repair {after_repair:?}",
        all_by_id(&s).await,
        all_by_id(&f).await,
        r.quarantined("f1").await,
        r.status().await
    );
}

/// `indexes = false`, binary source holding "A" (k1) and "a" (k2), the user's follower
/// collection case-insensitive: "a" is quarantined. `check` without `--repair` must report
/// the follower as differing (exit 1), naming the quarantine. (Holds on 5f97ca9.)
#[tokio::test]
async fn check_reports_a_case_twin_a_looser_follower_refused() {
    let (src, f1) = (Server::start().await, Server::start().await);
    create_collated(&f1).await;
    let (s, f) = (src.coll("data").await, f1.coll("data").await);
    s.insert_one(doc! {"_id": "x", "dataId": "kx"})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nindexes = false\n");
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    assert!(poll_until(CONVERGE, || async { has_id(&f, "x").await }).await);
    r.wait_streaming(CONVERGE).await;
    s.insert_one(doc! {"_id": "A", "dataId": "k1", "v": 1})
        .await
        .unwrap();
    assert!(poll_until(CONVERGE, || async { has_id(&f, "A").await }).await);
    s.insert_one(doc! {"_id": "a", "dataId": "k2", "v": 2})
        .await
        .unwrap();
    assert!(poll_until(CONVERGE, || async { r.quarantined("f1").await >= 1 }).await);
    r.terminate().await;
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("quarantined"), "{out}");
    // The source deletes "A"; "a" can now be held, but nothing writes it until a repair.
    s.delete_one(doc! {"_id": {"$eq": "A"}}).await.unwrap();
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(code, 1, "{out}");
}

/// `indexes = false`, one binary source, two followers: f1's collection case-insensitive
/// (the user's), f2's made by the replicator (binary). Each pipeline settles its own rule:
/// f2 holds "A" and "a" exactly; f1 keeps "A" and quarantines "a"; after the source deletes
/// "A", neither follower keeps it and f2 still holds "a". (Holds on 5f97ca9.)
#[tokio::test]
async fn two_followers_with_different_collations_each_settle_their_own_rule() {
    let (src, f1, f2) = (
        Server::start().await,
        Server::start().await,
        Server::start().await,
    );
    create_collated(&f1).await;
    let s = src.coll("data").await;
    let (c1, c2) = (f1.coll("data").await, f2.coll("data").await);
    s.insert_one(doc! {"_id": "x", "dataId": "kx"})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1, &f2]).extra("[replication]\nindexes = false\n");
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    r.wait_streaming(CONVERGE).await;
    s.insert_one(doc! {"_id": "A", "dataId": "k1", "v": 1})
        .await
        .unwrap();
    s.insert_one(doc! {"_id": "a", "dataId": "k2", "v": 2})
        .await
        .unwrap();
    assert!(poll_until(CONVERGE, || async { r.quarantined("f1").await >= 1 }).await);
    wait_identical(&s, std::slice::from_ref(&c2), CONVERGE).await;
    assert_eq!(get_id(&c1, "A").await, get_id(&s, "A").await);
    s.delete_one(doc! {"_id": {"$eq": "A"}}).await.unwrap();
    wait_identical(&s, std::slice::from_ref(&c2), CONVERGE).await;
    let ok = poll_until(CONVERGE, || async { !has_id(&c1, "A").await }).await;
    assert!(ok, "f1 kept \"A\": {:?}", all_by_id(&c1).await);
    assert_eq!(r.quarantined("f2").await, 0);
}
