//! Fourth hostile review of the collation handling (commit 5a85ae4: statements by `_id`
//! carried the source collection's collation). Reproductions kept as regression tests; each
//! failed then. Statements by `_id` now carry the collation the source and follower share,
//! and are exact (binary) when they differ; `check --repair` is exact by `_id` and keeps a
//! follower document the source holds too.

mod common;

use std::time::Duration;

use common::collation::*;
use common::*;
use mongodb::bson::{doc, Document};

const CONVERGE: Duration = Duration::from_secs(45);
const LEAD: Duration = Duration::from_secs(60);

/// `indexes = false`, binary source, the user's follower collection case-insensitive: the
/// source writes "A" (k1) and "a" (k2); the replicator keeps "A" and quarantines "a" (the
/// rule of 5a85ae4). Returns once both have happened.
async fn case_twins_quarantined(
    src: &Server,
    f1: &Server,
) -> (
    Replicator,
    mongodb::Collection<Document>,
    mongodb::Collection<Document>,
) {
    create_collated(f1).await;
    let (s, f) = (src.coll("data").await, f1.coll("data").await);
    s.insert_one(doc! {"_id": "x", "dataId": "kx"})
        .await
        .unwrap();
    let cfg = ConfigBuilder::new(src, &[f1]).extra("[replication]\nindexes = false\n");
    let r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    let ok = poll_until(CONVERGE, || async { has_id(&f, "x").await }).await;
    assert!(
        ok,
        "the first document never arrived: {:?}",
        r.status().await
    );
    r.wait_streaming(CONVERGE).await;
    s.insert_one(doc! {"_id": "A", "dataId": "k1", "v": 1})
        .await
        .unwrap();
    let ok = poll_until(CONVERGE, || async { has_id(&f, "A").await }).await;
    assert!(ok, "\"A\" never arrived: {:?}", r.status().await);
    s.insert_one(doc! {"_id": "a", "dataId": "k2", "v": 2})
        .await
        .unwrap();
    let ok = poll_until(CONVERGE, || async { r.quarantined("f1").await >= 1 }).await;
    assert!(
        ok,
        "\"a\" was not quarantined: follower {:?}; status {:?}",
        all_by_id(&f).await,
        r.status().await
    );
    assert_eq!(get_id(&f, "A").await, get_id(&s, "A").await);
    (r, s, f)
}

/// The rule keeps "A" and quarantines "a" on a follower that cannot hold both. The README
/// says of a quarantined document: "fix it, then run `check --repair`". `repair_quarantine`
/// retries "a" through `write_keyed`, whose `clear_id_variants` finds follower documents by
/// `_id` under the follower collection's default collation and deletes every one that is
/// not exactly "a": it deletes "A", which the source holds apart, and writes "a" in its
/// place. The repair reports success; "A" is gone.
#[tokio::test]
async fn repair_of_a_quarantined_case_twin_keeps_the_other() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let (mut r, s, f) = case_twins_quarantined(&src, &f1).await;
    r.terminate().await;
    let want_a = get_id(&s, "A").await;
    let (_code, out) = run_check(&r.config_path, &["--repair"]);
    assert_eq!(
        get_id(&f, "A").await,
        want_a,
        "check --repair replaced \"A\" (which the source holds apart from \"a\") by \"a\": follower {:?}\n{out}",
        all_by_id(&f).await
    );
}

/// `indexes = false` and a follower collection the replicator created itself (binary, the
/// normal case). The source collection is binary and holds "A" (k1) and "a" (k2); both
/// replicate. While the replicator is stopped, the source collection is dropped and created
/// again case-insensitive, with "A" (k1) only. On start, `run_once` learns the identity
/// from the *new* collection (case-insensitive); the drop event then resyncs, and the copy's
/// `remove_extras` deletes the extra "a" by `_id` under that identity with `limit: 1`, on a
/// binary follower holding both: the statement matches "A" first. Expected afterwards: the
/// follower holds exactly the source ({"A"}); got: "A" deleted, "a" kept.
#[tokio::test]
async fn a_source_recreated_case_insensitive_resyncs_to_exactly_the_source() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let (s, f) = (src.coll("data").await, f1.coll("data").await);
    s.insert_many([
        doc! {"_id": "A", "dataId": "k1", "v": 1},
        doc! {"_id": "a", "dataId": "k2", "v": 1},
    ])
    .await
    .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1]).extra("[replication]\nindexes = false\n");
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    r.wait_streaming(CONVERGE).await;
    r.terminate().await;

    s.drop().await.unwrap();
    create_collated(&src).await;
    s.insert_one(doc! {"_id": "A", "dataId": "k1", "v": 2})
        .await
        .unwrap();

    r.spawn();
    r.wait_leader(LEAD).await;
    let want = all_by_id(&s).await;
    let ok = poll_until(CONVERGE, || async {
        r.first_state().await.as_deref() == Some("streaming") && all_by_id(&f).await == want
    })
    .await;
    assert!(
        ok,
        "the follower does not hold what the source holds after the resync: source {:?}; follower {:?}; status {:?}",
        want,
        all_by_id(&f).await,
        r.status().await.map(|s| s["followers"][0].to_string())
    );
}

/// An archive follower (`apply_deletes = false`), `indexes = false`, follower created by the
/// replicator (binary). The source collection, binary, holds "A" (k1) and "a" (k2); both
/// replicate. While the replicator is stopped, "a" changes its key (k2 -> k3), then the
/// source collection is dropped and created again case-insensitive with another document.
/// On start, `run_once` learns the identity from the new collection; the pre-drop update of
/// "a" conflicts on `_id` ("a" holds k2), so the careful plan deletes `{_id: "a"}` with
/// `limit: 1` under the case-insensitive identity, on a binary follower holding both: it
/// deletes "A", then the upsert of "a" meets the old "a" (11000) and the transaction is
/// retried without it: "A" survives (held), but "a" is quarantined instead of written, the
/// resync's copy wipes the quarantine record, and the archive keeps the stale "a" (k2)
/// silently, where it should keep the source's last version (k3).
#[tokio::test]
async fn an_archive_keeps_the_last_version_across_a_source_recreated_case_insensitive() {
    let (src, f1) = (Server::start().await, Server::start().await);
    let (s, f) = (src.coll("data").await, f1.coll("data").await);
    s.insert_many([
        doc! {"_id": "A", "dataId": "k1", "v": 1},
        doc! {"_id": "a", "dataId": "k2", "v": 1},
    ])
    .await
    .unwrap();
    let cfg = ConfigBuilder::new(&src, &[&f1])
        .extra("[replication]\nindexes = false\n")
        .follower_line("f1", "apply_deletes = false");
    let mut r = Replicator::start(&cfg, "n1");
    r.wait_leader(LEAD).await;
    wait_identical(&s, std::slice::from_ref(&f), CONVERGE).await;
    r.wait_streaming(CONVERGE).await;
    r.terminate().await;
    let want_a = get_id(&s, "A").await;

    // A replacement (its event carries the document; an update's lookup would find the
    // collection dropped by the time the replicator reads it).
    s.replace_one(doc! {"_id": "a"}, doc! {"dataId": "k3", "v": 2})
        .collation(binary())
        .await
        .unwrap();
    s.drop().await.unwrap();
    create_collated(&src).await;
    s.insert_one(doc! {"_id": "z", "dataId": "kz", "v": 1})
        .await
        .unwrap();

    r.spawn();
    r.wait_leader(LEAD).await;
    let ok = poll_until(CONVERGE, || async {
        r.first_state().await.as_deref() == Some("streaming") && has_id(&f, "z").await
    })
    .await;
    assert!(
        ok,
        "the new collection was not copied: {:?}",
        r.status().await
    );
    assert_eq!(
        get_id(&f, "A").await,
        want_a,
        "the archive lost \"A\" (the source never deleted it, it dropped it): follower {:?}",
        all_by_id(&f).await
    );
    // The archive keeps the last version the source had of "a" (k3). The careful plan's
    // `_id` delete under the new collection's case-insensitive collation hit "A" on this
    // binary follower, the upsert of "a" then met the old "a" (11000) and "a" was
    // quarantined; the resync's copy then wiped the quarantine record (reset_quarantine),
    // and `check` ignores an archive's extra documents: the stale "a" stayed, unreported.
    let a = get_id(&f, "a").await;
    assert_eq!(
        a.as_ref().and_then(|d| d.get_str("dataId").ok()),
        Some("k3"),
        "the archive holds a stale \"a\" (not the source's last version, k3): follower {:?}; quarantined {}",
        all_by_id(&f).await,
        r.quarantined("f1").await
    );
    let (code, out) = run_check(&r.config_path, &[]);
    assert_eq!(
        code, 0,
        "the archive holds the source's last versions: {out}"
    );
}
