//! Performance against the machine's ceiling (issue 11), measured black-box in one process
//! run: the replicator is a child process (the optimised binary that `cargo bench` builds),
//! watched through `/status`, `/proc` and the databases. Every figure comes from servers this
//! run starts itself, side by side, so ratios hold on a noisy shared machine where absolute
//! rates do not.
//!
//! `cargo bench --bench perf -- [--runs R] [--docs N] [--backlog B] [--smoke] [--out PATH]`
//! (`scripts/bench.sh` runs it). Each run measures, on fresh servers per measurement:
//! - ceiling (bare driver code, no replicator): (a) the drain rate of a change stream with
//!   update lookup over a backlog of N inserted ~1 KB documents; (b) the follower's rate of
//!   keyed replace-upserts, 1000 statements per `update` command, each command in a majority
//!   and journaled transaction, into a collection indexed on `dataId`. Ceiling = min(a, b);
//! - streaming inserts with 1, 2 and 3 followers, and with 3 collections (N documents in
//!   all), from the first write until every follower holds them all; the source's and the
//!   replicator's CPU seconds over that window and the replicator's peak memory;
//! - the initial copy of N existing documents (from the replicator's start);
//! - mixed writes on those documents: N changes of inserts, updates of 100 hot keys, updates
//!   and deletes of other keys, until the follower holds the source's final state;
//! - catch-up of a backlog of B inserts written while the replicator was stopped;
//! - lag from the source's acknowledgement to the follower's commit (seen by a change stream
//!   on the follower) under a paced writer at half the ceiling;
//! - a naive baseline: bare driver code applying one `replace_one` upsert per change, on
//!   N / 5 streamed inserts.
//!
//! A timed window ends when every follower has acknowledged the events (`applied_events` in
//! `/status`; the initial copy: when the follower streams). The follower's documents are not
//! read until then.
//! After every measurement each follower is compared with the source, byte for byte, and
//! the replicator's failed batches ("pipeline interrupted" in its log) are counted.
//! `--smoke` runs tiny sizes (a few seconds) and asserts nothing about speed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, oid::ObjectId, Bson, Document, RawDocumentBuf};
use mongodb::change_stream::event::OperationType;
use mongodb::options::{Acknowledgment, FullDocumentType, WriteConcern};
use mongodb::Collection;
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "mongo-replicator performance against the machine's ceiling")]
struct Args {
    /// Repetitions of the whole set of measurements (default 3; 1 with --smoke).
    #[arg(long)]
    runs: Option<usize>,
    /// Documents per measurement: ceilings, streaming, initial copy, mixed changes.
    #[arg(long)]
    docs: Option<usize>,
    /// Changes written while the replicator is stopped, for the catch-up.
    #[arg(long)]
    backlog: Option<usize>,
    /// Seconds of paced writing for the lag measurement.
    #[arg(long)]
    lag_secs: Option<f64>,
    /// Tiny sizes, for CI: every measurement completes, no speed is asserted.
    #[arg(long)]
    smoke: bool,
    /// Also write the table and the raw figures as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The sizes of one invocation.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    runs: usize,
    docs: usize,
    backlog: usize,
    naive_docs: usize,
    lag: Duration,
}

/// Everything is bounded: a measurement that does not finish fails the run.
const DEADLINE: Duration = Duration::from_secs(900);

/// Servers with a cache that holds a measurement's writes. With the test suite's 128M (many
/// servers side by side), the mixed writes stalled for good on the follower: its dirty
/// bytes passed the storage engine's eviction trigger, eviction made no progress, and
/// every operation (the replicator's checkpoint update, the server's own oplog pruner)
/// waited in WiredTiger's eviction worker, as a debugger showed.
fn big_cache() -> ServerOpts {
    ServerOpts {
        cache_size: Some("2G"),
        ..Default::default()
    }
}
const CHUNK: usize = 1000;
const HOT_KEYS: u64 = 100;
/// Source clients writing the mixed changes side by side, so that the source accepts them
/// faster than a follower can apply them.
const MIXED_WRITERS: usize = 4;

/// The figures of one run, in the order they were taken: (name, unit, value).
#[derive(Default)]
struct Figures(Vec<(String, &'static str, f64)>);

impl Figures {
    fn add(&mut self, name: &str, unit: &'static str, value: f64) {
        eprintln!("  {name}: {value:.3} {unit}");
        self.0.push((name.to_string(), unit, value));
    }
    fn get(&self, name: &str) -> f64 {
        self.0
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|f| f.2)
            .unwrap_or(f64::NAN)
    }
}

// ---------------------------------------------------------------- documents and writes

/// About 1 KB of BSON: a key, a few scalars, a nested document and a text payload that
/// differs from document to document.
fn make_doc(prefix: &str, i: u64) -> Document {
    doc! {
        "dataId": key(prefix, i),
        "n": i as i64,
        "at": mongodb::bson::DateTime::now(),
        "tags": ["alpha", "beta", "gamma"],
        "meta": {"source": "bench", "version": 1_i32, "ratio": i as f64 / 7.0},
        "payload": payload(i),
    }
}

fn key(prefix: &str, i: u64) -> String {
    format!("{prefix}{i:09}")
}

fn payload(seed: u64) -> String {
    let word = format!("{seed:x}-lorem-ipsum-dolor-sit-amet-");
    word.repeat(880 / word.len() + 1)[..880].to_string()
}

/// Inserts documents `range` with keys `prefix..` in `insert_many` calls of [`CHUNK`].
async fn insert_range(c: &Collection<Document>, prefix: &str, range: std::ops::Range<u64>) {
    let mut i = range.start;
    while i < range.end {
        let end = (i + CHUNK as u64).min(range.end);
        c.insert_many((i..end).map(|j| make_doc(prefix, j)))
            .await
            .expect("insert on the source");
        i = end;
    }
}

/// A number in a command's reply, whatever its BSON type (-1 when absent).
fn num(reply: &Document, field: &str) -> i64 {
    match reply.get(field) {
        Some(Bson::Int32(v)) => *v as i64,
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Double(v)) => *v as i64,
        _ => -1,
    }
}

async fn count(c: &Collection<Document>) -> u64 {
    c.estimated_document_count().await.unwrap_or(0)
}

async fn wait_counts(what: &str, colls: &[Collection<Document>], n: u64) {
    wait_for(what, DEADLINE, || async {
        for c in colls {
            if count(c).await < n {
                return false;
            }
        }
        true
    })
    .await;
}

async fn index_key(c: &Collection<Document>) {
    c.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! {"dataId": 1})
            .build(),
    )
    .await
    .expect("index on dataId");
}

/// Asserts that `follower` holds exactly the documents of `source` (byte-exact BSON, in
/// `_id` order), streaming both sides; retries until the deadline, as the last batch may
/// still be committing.
async fn assert_identical(
    what: &str,
    source: &Collection<Document>,
    follower: &Collection<Document>,
) {
    let (s, f) = (
        source.clone_with_type::<RawDocumentBuf>(),
        follower.clone_with_type::<RawDocumentBuf>(),
    );
    let why = std::cell::RefCell::new(String::new());
    let why_ref = &why;
    let same = poll_until(Duration::from_secs(120), move || {
        let (s, f) = (s.clone(), f.clone());
        async move {
            let mut a = s.find(doc! {}).sort(doc! {"_id": 1}).await.expect("find");
            let mut b = f.find(doc! {}).sort(doc! {"_id": 1}).await.expect("find");
            let mut n = 0u64;
            loop {
                let (x, y) = (
                    a.try_next().await.expect("read"),
                    b.try_next().await.expect("read"),
                );
                match (x, y) {
                    (None, None) => return true,
                    (Some(x), Some(y)) if x.as_bytes() == y.as_bytes() => n += 1,
                    (x, y) => {
                        *why_ref.borrow_mut() = format!(
                            "first difference after {n} equal documents: source {:?}, follower {:?}",
                            x.map(|d| d.get("dataId").ok().flatten().map(|v| format!("{v:?}"))),
                            y.map(|d| d.get("dataId").ok().flatten().map(|v| format!("{v:?}")))
                        );
                        return false;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        same,
        "{what}: the follower differs from the source: {}",
        why.borrow()
    );
}

// ---------------------------------------------------------------- processes

/// CPU seconds (user + system) the process has used so far, from `/proc/PID/stat`.
fn cpu_secs(pid: Option<u32>) -> f64 {
    let pid = pid.expect("process is running");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command name (which may hold spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

async fn servers(n: usize) -> Vec<Server> {
    futures::future::join_all((0..n).map(|_| Server::start_with(big_cache()))).await
}

fn start_replicator(src: &Server, followers: &[&Server], collections: &[String]) -> Replicator {
    let mut cfg = ConfigBuilder::new(src, followers);
    cfg.collections = collections.to_vec();
    // Info level: the harness's debug default would cost the replicator CPU of its own.
    Replicator::start_with_env(&cfg, "bench", &[("RUST_LOG", "info")])
}

/// Waits until the node leads and every follower streams.
async fn wait_streaming(r: &Replicator) {
    wait_for("every follower streaming", DEADLINE, || async {
        r.status().await.is_some_and(|s| {
            s["followers"]
                .as_array()
                .is_some_and(|f| !f.is_empty() && f.iter().all(|f| f["state"] == "streaming"))
        })
    })
    .await;
}

/// Events each follower has acknowledged (`applied_events` in `/status`, summed over its
/// collections), in config order.
async fn applied(r: &Replicator) -> Option<Vec<u64>> {
    let s = r.status().await?;
    s["followers"]
        .as_array()?
        .iter()
        .map(|f| f["applied_events"].as_u64())
        .collect()
}

/// Waits until every follower has acknowledged `n` more events than `base`. The end of a
/// timed window is read from `/status`, not from the follower, so that the bench adds no
/// reads to the follower while batches commit.
async fn wait_applied(r: &Replicator, base: &[u64], n: u64) {
    wait_for(
        "events acknowledged by every follower",
        DEADLINE,
        || async {
            applied(r).await.is_some_and(|now| {
                now.len() == base.len() && now.iter().zip(base).all(|(a, b)| *a >= b + n)
            })
        },
    )
    .await;
}

/// Pipeline interruptions (a batch that failed, typically on `write_timeout`) seen in the
/// replicator logs of the current run.
static INTERRUPTIONS: AtomicU64 = AtomicU64::new(0);

/// Counts the node's pipeline interruptions, then stops it (SIGTERM).
async fn finish(r: &mut Replicator) {
    let n = r.log().matches("pipeline interrupted").count() as u64;
    if n > 0 {
        eprintln!("  ({n} pipeline interruption(s) in this measurement)");
    }
    INTERRUPTIONS.fetch_add(n, Ordering::SeqCst);
    r.terminate().await;
}

// ---------------------------------------------------------------- ceiling

/// Ceiling (a): events per second a change stream with update lookup delivers over a
/// backlog of `n` inserts. Also returns the source's insert rate.
async fn ceiling_drain(n: usize) -> (f64, f64) {
    let src = Server::start_with(big_cache()).await;
    let c = src.coll("data").await;
    // Opened before the inserts and not read until they are all acknowledged: the stream
    // starts before the backlog.
    let mut stream = c
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .expect("open change stream");
    let t = Instant::now();
    insert_range(&c, "d", 0..n as u64).await;
    let write_rate = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut seen = 0;
    while seen < n {
        let ev = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("change stream drained in time")
            .expect("stream open")
            .expect("change event");
        if ev.operation_type == OperationType::Insert {
            assert!(
                ev.full_document.is_some(),
                "insert event without its document"
            );
            seen += 1;
        }
    }
    (n as f64 / t.elapsed().as_secs_f64(), write_rate)
}

fn durable() -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .build()
}

/// Ceiling (b): keyed replace-upserts per second on a follower, `CHUNK` statements per
/// `update` command, each command its own majority and journaled transaction.
async fn ceiling_upsert(n: usize) -> f64 {
    let f = Server::start_with(big_cache()).await;
    let client = f.client().await;
    let db = client.database("app");
    index_key(&db.collection("data")).await;
    let docs: Vec<Document> = (0..n as u64)
        .map(|i| {
            let mut d = doc! {"_id": ObjectId::new()};
            d.extend(make_doc("u", i));
            d
        })
        .collect();
    let mut session = client.start_session().await.expect("session");
    let t = Instant::now();
    for chunk in docs.chunks(CHUNK) {
        let updates: Vec<Document> = chunk
            .iter()
            .map(|d| {
                doc! {"q": {"dataId": {"$eq": d.get_str("dataId").expect("key")}}, "u": d, "upsert": true}
            })
            .collect();
        session
            .start_transaction()
            .write_concern(durable())
            .await
            .expect("start transaction");
        let res = db
            .run_command(doc! {"update": "data", "updates": updates, "ordered": true})
            .session(&mut session)
            .await
            .expect("update command");
        assert!(!res.contains_key("writeErrors"), "{res}");
        session.commit_transaction().await.expect("commit");
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(count(&db.collection("data")).await, n as u64);
    rate
}

// ---------------------------------------------------------------- replicator workloads

struct Streamed {
    rate: f64,
    source_write_rate: f64,
    source_cpu: f64,
    replicator_cpu: f64,
    peak_rss_mib: f64,
    /// CPU of the source, the followers and the replicator together, over the wall time and
    /// the machine's CPUs: 1.0 is every CPU busy.
    busy: f64,
}

/// Streaming inserts: `n` documents spread over `colls` collections while the replicator
/// streams to `nf` followers; timed from the first write until every follower holds all.
async fn streaming(nf: usize, colls: usize, n: usize) -> Streamed {
    let all = servers(1 + nf).await;
    let (src, fs) = (&all[0], all[1..].iter().collect::<Vec<_>>());
    let names: Vec<String> = (0..colls)
        .map(|i| {
            if i == 0 {
                "data".into()
            } else {
                format!("data{}", i + 1)
            }
        })
        .collect();
    let mut r = start_replicator(src, &fs, &names);
    wait_streaming(&r).await;
    let per = (n / colls) as u64;
    let sc: Vec<_> = futures::future::join_all(names.iter().map(|c| src.coll(c))).await;
    let mut targets = Vec::new();
    for f in &fs {
        for c in &names {
            targets.push(f.coll(c).await);
        }
    }
    let base = applied(&r).await.expect("status");
    let (cpu_s, cpu_r) = (cpu_secs(src.pid()), cpu_secs(r.pid()));
    let cpu_f: f64 = fs.iter().map(|f| cpu_secs(f.pid())).sum();
    let t = Instant::now();
    // Round robin over the collections, one insert_many each.
    let mut i = 0;
    while i < per {
        let end = (i + CHUNK as u64).min(per);
        for c in &sc {
            insert_range(c, "s", i..end).await;
        }
        i = end;
    }
    let source_write_rate = (per * colls as u64) as f64 / t.elapsed().as_secs_f64();
    wait_applied(&r, &base, per * colls as u64).await;
    let secs = t.elapsed().as_secs_f64();
    let (src_cpu, repl_cpu) = (cpu_secs(src.pid()) - cpu_s, cpu_secs(r.pid()) - cpu_r);
    let fol_cpu = fs.iter().map(|f| cpu_secs(f.pid())).sum::<f64>() - cpu_f;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let out = Streamed {
        rate: (per * colls as u64) as f64 / secs,
        source_write_rate,
        source_cpu: src_cpu,
        replicator_cpu: repl_cpu,
        peak_rss_mib: r.peak_rss_kib().unwrap_or(0) as f64 / 1024.0,
        busy: (src_cpu + fol_cpu + repl_cpu) / (secs * cpus),
    };
    wait_counts("streamed inserts on every follower", &targets, per).await;
    for f in &fs {
        for (c, s) in names.iter().zip(&sc) {
            assert_identical("streaming", s, &f.coll(c).await).await;
        }
    }
    finish(&mut r).await;
    out
}

/// Runs one `command` per group of statements, side by side (groups hold disjoint keys);
/// returns the sum of `field` over the replies.
async fn in_parallel(
    db: &mongodb::Database,
    command: &str,
    list: &str,
    groups: Vec<Vec<Document>>,
    field: &str,
) -> i64 {
    let replies =
        futures::future::join_all(groups.into_iter().filter(|g| !g.is_empty()).map(|g| {
            db.run_command(doc! {command: "data", list: g})
                .into_future()
        }))
        .await;
    replies
        .into_iter()
        .map(|r| {
            let r = r.expect("mixed write");
            assert!(!r.contains_key("writeErrors"), "{r}");
            num(&r, field)
        })
        .sum()
}

/// Initial copy of `n` existing documents, then `n` mixed changes on top of them.
/// Returns (copy docs/s, mixed events/s, source's mixed write rate in changes/s).
async fn copy_then_mixed(n: usize, seed: u64) -> (f64, f64, f64) {
    // The source acknowledges before its log is synced: with a sync per statement it takes
    // multi-statement updates and deletes at a few hundred per second, far below what a
    // follower applies, and the figure would measure the source. The follower syncs every
    // commit as always.
    let src = &Server::start_with(ServerOpts {
        no_sync: true,
        ..big_cache()
    })
    .await;
    let f1 = &Server::start_with(big_cache()).await;
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    index_key(&s).await;
    insert_range(&s, "m", 0..n as u64).await;

    let t = Instant::now();
    let mut r = start_replicator(src, &[f1], &["data".into()]);
    // The copy ends when the follower streams (copied, and caught up with the changes
    // since the copy began: none here).
    wait_streaming(&r).await;
    let copy = n as f64 / t.elapsed().as_secs_f64();
    wait_counts(
        "initial copy on the follower",
        std::slice::from_ref(&f),
        n as u64,
    )
    .await;
    assert_identical("initial copy", &s, &f).await;

    // Mixed: rounds of CHUNK changes; every change matches a document, so each is one event.
    // Per round: 30% inserts of new keys, 30% updates of the hot keys (each several times),
    // 25% updates of other live keys (a new payload), 15% deletes of other live keys.
    let base = applied(&r).await.expect("status");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut live: Vec<u64> = (HOT_KEYS..n as u64).collect();
    let mut next = n as u64;
    let db = src.client().await.database("app");
    let t = Instant::now();
    let mut done = 0usize;
    let mut round = 0u64;
    while done < n {
        let size = CHUNK.min(n - done);
        let (ins, hot, upd) = (size * 30 / 100, size * 30 / 100, size * 25 / 100);
        let del = size - ins - hot - upd;
        // Deletes first take their keys out of the live set, so that the updates, the
        // deletes and the inserts of a round touch disjoint keys and run side by side.
        let mut deletes = vec![Vec::new(); MIXED_WRITERS];
        for _ in 0..del {
            let k = live.swap_remove(rng.random_range(0..live.len()));
            deletes[k as usize % MIXED_WRITERS]
                .push(doc! {"q": {"dataId": key("m", k)}, "limit": 1});
        }
        let mut updates = vec![Vec::new(); MIXED_WRITERS];
        for j in 0..hot as u64 {
            let k = j % HOT_KEYS.min(n as u64);
            updates[k as usize % MIXED_WRITERS].push(doc! {"q": {"dataId": key("m", k)}, "u": {"$inc": {"writes": 1}, "$set": {"round": round as i64}}});
        }
        for _ in 0..upd {
            let k = live[rng.random_range(0..live.len())];
            updates[k as usize % MIXED_WRITERS].push(
                doc! {"q": {"dataId": key("m", k)}, "u": {"$set": {"payload": payload(rng.random())}}},
            );
        }
        let (inserted, modified, deleted) = tokio::join!(
            s.insert_many((next..next + ins as u64).map(|i| make_doc("m", i)))
                .into_future(),
            in_parallel(&db, "update", "updates", updates, "nModified"),
            in_parallel(&db, "delete", "deletes", deletes, "n"),
        );
        assert_eq!(inserted.expect("mixed inserts").inserted_ids.len(), ins);
        assert_eq!(modified, (hot + upd) as i64);
        assert_eq!(deleted, del as i64);
        live.extend(next..next + ins as u64);
        next += ins as u64;
        done += size;
        round += 1;
    }
    let source_rate = n as f64 / t.elapsed().as_secs_f64();
    // Every change is one event; the follower then holds the final state (checked byte for
    // byte below, untimed). A follower that hangs (as the test server did with a small
    // cache, see `big_cache`) is reported as stalled, and the run goes on to the other
    // measurements.
    let bound =
        Duration::from_secs_f64((n as f64 / 500.0).max(60.0) + 2.0 * t.elapsed().as_secs_f64());
    let reached = poll_until(bound, || async {
        applied(&r)
            .await
            .is_some_and(|now| now[0] >= base[0] + n as u64)
    })
    .await;
    if !reached {
        eprintln!(
            "  mixed writes STALLED: the follower acknowledged {:?} of {n} events in {bound:?}; \
             last lines of the replicator's log:\n{}",
            applied(&r).await.map(|a| a[0] - base[0]),
            r.log().lines().rev().take(3).collect::<Vec<_>>().join("\n")
        );
        finish(&mut r).await;
        return (copy, f64::NAN, source_rate);
    }
    let mixed = n as f64 / t.elapsed().as_secs_f64();
    let want = count(&s).await;
    wait_for("mixed changes on the follower", DEADLINE, || async {
        count(&f).await == want
    })
    .await;
    assert_identical("mixed", &s, &f).await;
    finish(&mut r).await;
    (copy, mixed, source_rate)
}

/// Catch-up of `b` inserts written while the node was stopped: (docs/s from the node's
/// start, replicator CPU s, peak MiB).
async fn catch_up(b: usize) -> (f64, f64, f64) {
    // The test server keeps 100,000 oplog entries by default: a backlog of that size would
    // fall off and become a copy (which the assertion below refuses).
    let src = &Server::start_with(ServerOpts {
        oplog_max_entries: Some(2 * b as u64 + 100_000),
        ..big_cache()
    })
    .await;
    let f1 = &Server::start_with(big_cache()).await;
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    let mut r = start_replicator(src, &[f1], &["data".into()]);
    wait_streaming(&r).await;
    r.terminate().await;
    insert_range(&s, "c", 0..b as u64).await;
    let t = Instant::now();
    r.spawn();
    let cpu0 = cpu_secs(r.pid());
    // The restarted process counts from zero.
    wait_applied(&r, &[0], b as u64).await;
    let rate = b as f64 / t.elapsed().as_secs_f64();
    let cpu = cpu_secs(r.pid()) - cpu0;
    let rss = r.peak_rss_kib().unwrap_or(0) as f64 / 1024.0;
    wait_counts(
        "backlog on the follower",
        std::slice::from_ref(&f),
        b as u64,
    )
    .await;
    assert!(
        !r.log().contains("copying this follower again"),
        "the backlog fell off the source's oplog: the figure would be a copy, not a catch-up"
    );
    assert_identical("catch-up", &s, &f).await;
    finish(&mut r).await;
    (rate, cpu, rss)
}

/// Lag under a paced writer at `rate` docs/s for `dur`: (p50, p99, max in ms, achieved
/// write rate).
async fn lag(rate: f64, dur: Duration) -> (f64, f64, f64, f64) {
    let all = servers(2).await;
    let (src, f1) = (&all[0], &all[1]);
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    let mut r = start_replicator(src, &[f1], &["data".into()]);
    wait_streaming(&r).await;

    // The observer: a change stream on the follower notes when each document arrives.
    // Documents carry `_id: i`, so the event's key says which write it was.
    let mut stream = f.watch().await.expect("follower change stream");
    let total = Arc::new(AtomicU64::new(u64::MAX));
    let observer = {
        let total = total.clone();
        tokio::spawn(async move {
            let mut arrived: std::collections::HashMap<u64, Instant> = Default::default();
            let deadline = Instant::now() + DEADLINE;
            while (arrived.len() as u64) < total.load(Ordering::SeqCst) && Instant::now() < deadline
            {
                let ev = match tokio::time::timeout(Duration::from_millis(200), stream.next()).await
                {
                    Ok(Some(ev)) => ev.expect("follower change event"),
                    Ok(None) => break,
                    Err(_) => continue,
                };
                let id = ev.document_key.as_ref().and_then(|k| k.get_i64("_id").ok());
                if let Some(id) = id {
                    if matches!(
                        ev.operation_type,
                        OperationType::Insert | OperationType::Replace | OperationType::Update
                    ) {
                        arrived.entry(id as u64).or_insert_with(Instant::now);
                    }
                }
            }
            arrived
        })
    };

    // The paced writer: every 5 ms, writes what the rate asks for by now (one insert_many),
    // and notes the acknowledgement time of each document.
    let mut acked: Vec<Instant> = Vec::new();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while start.elapsed() < dur {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(acked.len() + CHUNK);
        if due <= acked.len() {
            continue;
        }
        let from = acked.len() as u64;
        s.insert_many((from..due as u64).map(|i| {
            let mut d = doc! {"_id": i as i64};
            d.extend(make_doc("l", i));
            d
        }))
        .await
        .expect("paced insert");
        let now = Instant::now();
        acked.resize(due, now);
    }
    let achieved = acked.len() as f64 / start.elapsed().as_secs_f64();
    total.store(acked.len() as u64, Ordering::SeqCst);
    let arrived = observer.await.expect("observer");
    assert_eq!(
        arrived.len(),
        acked.len(),
        "every paced write arrives on the follower"
    );
    let mut lags: Vec<f64> = arrived
        .iter()
        .map(|(i, at)| {
            at.saturating_duration_since(acked[*i as usize])
                .as_secs_f64()
                * 1000.0
        })
        .collect();
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| lags[((lags.len() as f64 * p).ceil() as usize).clamp(1, lags.len()) - 1];
    let out = (pct(0.50), pct(0.99), *lags.last().expect("lags"), achieved);
    assert_identical("lag", &s, &f).await;
    finish(&mut r).await;
    out
}

/// The naive baseline: bare driver code that tails the source and applies each change to
/// the follower with one `replace_one` upsert (or `delete_one`), no batching. Docs/s.
async fn naive(n: usize) -> f64 {
    let all = servers(2).await;
    let (src, f1) = (&all[0], &all[1]);
    let s = src.coll("data").await;
    let f = f1.coll("data").await;
    index_key(&f).await;
    let mut stream = s
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .expect("source change stream");
    let applier = {
        let f = f.clone();
        tokio::spawn(async move {
            let mut applied = 0;
            while applied < n {
                let ev = stream
                    .next()
                    .await
                    .expect("stream open")
                    .expect("change event");
                let id = ev
                    .document_key
                    .as_ref()
                    .and_then(|k| k.get("_id").cloned())
                    .unwrap_or(Bson::Null);
                match (ev.operation_type, ev.full_document) {
                    (OperationType::Delete, _) => {
                        f.delete_one(doc! {"_id": {"$eq": id}})
                            .await
                            .expect("naive delete");
                    }
                    (_, Some(d)) => {
                        let k = d.get("dataId").cloned().unwrap_or(Bson::Null);
                        f.replace_one(doc! {"dataId": {"$eq": k}}, d)
                            .upsert(true)
                            .await
                            .expect("naive upsert");
                    }
                    _ => {}
                }
                applied += 1;
            }
        })
    };
    let t = Instant::now();
    insert_range(&s, "n", 0..n as u64).await;
    tokio::time::timeout(DEADLINE, applier)
        .await
        .expect("naive applier finished in time")
        .expect("naive applier");
    let rate = n as f64 / t.elapsed().as_secs_f64();
    assert_identical("naive", &s, &f).await;
    rate
}

// ---------------------------------------------------------------- one run

async fn run(sz: Sizes, seed: u64) -> Figures {
    let mut fig = Figures::default();
    let n = sz.docs;
    INTERRUPTIONS.store(0, Ordering::SeqCst);

    let (drain, src_ins) = ceiling_drain(n).await;
    fig.add(
        "ceiling (a): change-stream drain with update lookup",
        "events/s",
        drain,
    );
    fig.add("source insert_many rate (for reference)", "docs/s", src_ins);
    let upsert = ceiling_upsert(n).await;
    fig.add(
        "ceiling (b): follower keyed replace-upserts, 1000/txn",
        "docs/s",
        upsert,
    );
    let ceiling = drain.min(upsert);
    fig.add("ceiling = min(a, b)", "docs/s", ceiling);

    let mut one = None;
    for nf in 1..=3 {
        let st = streaming(nf, 1, n).await;
        fig.add(
            &format!("streaming inserts, {nf} follower(s)"),
            "docs/s",
            st.rate,
        );
        if nf == 1 {
            fig.add("streaming inserts / ceiling", "ratio", st.rate / ceiling);
            fig.add("streaming: source accepted", "docs/s", st.source_write_rate);
            fig.add(
                "replicator CPU per 100k events, streaming",
                "CPU s",
                st.replicator_cpu / n as f64 * 100_000.0,
            );
        }
        fig.add(
            &format!("source CPU, streaming, {nf} follower(s)"),
            "CPU s",
            st.source_cpu,
        );
        fig.add(
            &format!("machine CPU busy (servers + replicator), streaming, {nf} follower(s)"),
            "ratio",
            st.busy,
        );
        fig.add(
            &format!("replicator peak RSS, streaming, {nf} follower(s)"),
            "MiB",
            st.peak_rss_mib,
        );
        if nf == 3 {
            let one: &Streamed = one.as_ref().expect("one follower measured first");
            fig.add(
                "source CPU 3 followers / 1 follower",
                "ratio",
                st.source_cpu / one.source_cpu,
            );
        }
        if nf == 1 {
            one = Some(st);
        }
    }
    let three = streaming(1, 3, n).await;
    fig.add(
        "streaming inserts, 3 collections, 1 follower",
        "docs/s",
        three.rate,
    );

    let (copy, mixed, mixed_src) = copy_then_mixed(n, seed).await;
    fig.add("initial copy", "docs/s", copy);
    fig.add("initial copy / ceiling", "ratio", copy / ceiling);
    fig.add(
        "mixed writes (hot keys, updates, deletes)",
        "events/s",
        mixed,
    );
    fig.add("mixed writes / ceiling", "ratio", mixed / ceiling);
    fig.add("mixed: source accepted", "changes/s", mixed_src);

    let (cu, cu_cpu, cu_rss) = catch_up(sz.backlog).await;
    fig.add("catch-up of a backlog", "docs/s", cu);
    fig.add("catch-up / ceiling", "ratio", cu / ceiling);
    fig.add(
        "replicator CPU per 100k events, catch-up",
        "CPU s",
        cu_cpu / sz.backlog as f64 * 100_000.0,
    );
    fig.add("replicator peak RSS, catch-up", "MiB", cu_rss);

    let (p50, p99, max, achieved) = lag(ceiling / 2.0, sz.lag).await;
    fig.add("lag: paced write rate achieved", "docs/s", achieved);
    fig.add("lag p50", "ms", p50);
    fig.add("lag p99", "ms", p99);
    fig.add("lag max", "ms", max);

    let nv = naive(sz.naive_docs).await;
    fig.add("naive baseline: one upsert per change", "docs/s", nv);
    fig.add(
        "replicator streaming inserts / naive",
        "ratio",
        fig.get("streaming inserts, 1 follower(s)") / nv,
    );
    fig.add(
        "pipeline interruptions (failed batches), all measurements",
        "count",
        INTERRUPTIONS.load(Ordering::SeqCst) as f64,
    );
    fig
}

// ---------------------------------------------------------------- report

fn machine() -> BTreeMap<&'static str, String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    BTreeMap::from([
        ("cpus", cpus.to_string()),
        ("cpu_model", model),
        (
            "memory",
            format!("{:.1} GiB", mem_kib as f64 / 1024.0 / 1024.0),
        ),
    ])
}

/// Min, median and max of the runs that produced the figure (NaN when none did).
fn stats(v: Vec<f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = v.into_iter().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    let median = if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    };
    (v[0], median, v[v.len() - 1])
}

fn fmt(v: f64, unit: &str) -> String {
    if v.is_nan() {
        return "stalled".into();
    }
    match unit {
        "ratio" => format!("{v:.2}"),
        "ms" | "CPU s" | "MiB" => format!("{v:.1}"),
        _ => {
            // Thousands separators for rates.
            let s = format!("{:.0}", v);
            let (sign, digits) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
            let mut out = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(c);
            }
            format!("{sign}{out}")
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let smoke = args.smoke;
    let docs = args.docs.unwrap_or(if smoke { 2_000 } else { 50_000 });
    let sz = Sizes {
        runs: args.runs.unwrap_or(if smoke { 1 } else { 3 }).max(1),
        docs,
        backlog: args.backlog.unwrap_or(if smoke { 2_000 } else { 100_000 }),
        naive_docs: (docs / 5).max(100),
        lag: Duration::from_secs_f64(args.lag_secs.unwrap_or(if smoke { 1.0 } else { 15.0 })),
    };
    let bin = std::path::Path::new(bin());
    let profile = bin
        .parent()
        .and_then(|p| p.file_name())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if profile != "release" {
        eprintln!(
            "warning: the replicator is a `{profile}` build, not an optimised one: its figures \
             mean nothing (fine for --smoke; scripts/bench.sh runs the optimised build)"
        );
    }
    let doc_bytes = mongodb::bson::to_vec(&make_doc("s", 1))
        .map(|v| v.len())
        .unwrap_or(0);

    let started = Instant::now();
    let mut all: Vec<Figures> = Vec::new();
    for i in 0..sz.runs {
        eprintln!("== run {} of {}", i + 1, sz.runs);
        let t = Instant::now();
        all.push(run(sz, 0x5eed + i as u64).await);
        eprintln!("   run took {:.0} s", t.elapsed().as_secs_f64());
    }
    let elapsed = started.elapsed().as_secs_f64();

    let m = machine();
    let params = serde_json::json!({
        "runs": sz.runs,
        "docs": sz.docs,
        "backlog": sz.backlog,
        "naive_docs": sz.naive_docs,
        "lag_secs": sz.lag.as_secs_f64(),
        "doc_bytes": doc_bytes,
        "batch_max_docs": CHUNK,
        "hot_keys": HOT_KEYS,
        "smoke": smoke,
        "replicator_build": profile,
    });
    println!(
        "## mongo-replicator performance ({} run(s), {:.0} s in all)\n",
        sz.runs, elapsed
    );
    println!(
        "Machine: {} CPU(s), {}, {}. Test server: SecantusDB, one per role, fresh for each \
         measurement; replicator: `{profile}` build, default settings (batch_max_docs 1000, \
         batch_max_wait 20ms), log level info.\n",
        m["cpus"], m["memory"], m["cpu_model"]
    );
    println!(
        "Workload: documents of {doc_bytes} bytes (BSON); {} documents per measurement \
         (ceilings, streaming, initial copy, mixed changes: 30% inserts, 30% updates of {HOT_KEYS} \
         hot keys, 25% other updates, 15% deletes); a catch-up backlog of {} inserts; lag \
         under a paced writer at half the ceiling for {:.0} s; naive baseline on {} inserts.\n",
        sz.docs,
        sz.backlog,
        sz.lag.as_secs_f64(),
        sz.naive_docs
    );
    println!("| figure | unit | min | median | max |");
    println!("|---|---|---|---|---|");
    let mut table = Vec::new();
    for (name, unit, _) in &all[0].0 {
        let vals: Vec<f64> = all.iter().map(|f| f.get(name)).collect();
        let (lo, med, hi) = stats(vals.clone());
        let stalled = vals.iter().filter(|v| v.is_nan()).count();
        let name = if stalled > 0 {
            format!("{name} (stalled in {stalled} of {} runs)", vals.len())
        } else {
            name.clone()
        };
        println!(
            "| {name} | {unit} | {} | {} | {} |",
            fmt(lo, unit),
            fmt(med, unit),
            fmt(hi, unit)
        );
        table.push(serde_json::json!({
            "figure": name, "unit": unit, "min": lo, "median": med, "max": hi, "runs": vals,
        }));
    }
    println!(
        "\nEvery follower was identical to its source after every measurement that did not stall."
    );
    if let Some(path) = &args.out {
        let json = serde_json::json!({
            "machine": m,
            "parameters": params,
            "seconds": elapsed,
            "table": table,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json).expect("json"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}
