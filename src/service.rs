//! `mongo-replicator run`: the service. Opens the token file and the source, serves HTTP,
//! and runs the lease loop: as a standby it polls for the lease; as the leader it runs one
//! pipeline per (collection, follower), renews the lease, and steps down when it cannot.
//!
//! Shutdown order (SIGTERM/SIGINT): stop reading, let each pipeline apply and acknowledge
//! its batch in flight, flush the token file, release the lease, stop HTTP.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::applier::{Exit, Pair};
use crate::checkpoint::CheckpointStore;
use crate::config::Config;
use crate::follower::Follower;
use crate::lease::{Authority, Lease};
use crate::namespace::Ns;
pub use crate::node::Node;
use crate::reader::Hubs;
use crate::status::{LeaseView, NodeStatus};

/// How long a shutting-down leader waits for the source to take its lease back.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the token file is written when checkpoints move.
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Runs the service until `shutdown` completes. Errors are fatal start-up problems
/// (unusable token file, unreachable or unsuitable source, HTTP address in use).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let store = CheckpointStore::open(&config.checkpoint.token_file, config.scope())?;
    let source = crate::source::client(&config.source.uri, "source").await?;
    crate::source::check_source(&source, &config.source.uri).await?;

    let status = NodeStatus::new(config.node_id());
    let mut followers = Vec::new();
    for f in &config.followers {
        followers.push(Arc::new(
            Follower::new(f, &config.replication, config.node_id()).await?,
        ));
        for ns in config.selection().literal() {
            status.pair(&config.selection().label(&ns), &f.name);
        }
    }
    // A follower that answers but refuses the credentials is a configuration error, not an
    // outage: stop now with the reason rather than retry it for ever.
    let first_db = config.selection().databases().remove(0);
    crate::source::verify_access(
        &source,
        "the source".into(),
        &config.source.uri,
        &first_db,
        crate::source::SERVER_SELECTION_TIMEOUT,
    )
    .await?;
    futures::future::try_join_all(followers.iter().zip(&config.followers).map(|(f, cfg)| {
        crate::source::verify_access(
            f.client(),
            format!("follower `{}`", cfg.name),
            &cfg.uri,
            cfg.target_db(&first_db),
            crate::source::SERVER_SELECTION_TIMEOUT,
        )
    }))
    .await?;
    let node = Arc::new(Node {
        config: config.clone(),
        status: status.clone(),
        source: source.clone(),
        followers,
        store: store.clone(),
    });

    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("cannot listen on http.listen {}", config.http.listen))?;
    tracing::info!(node_id = %config.node_id(), listen = %config.http.listen, "mongo-replicator started");

    let stop = CancellationToken::new();
    let http_stop = CancellationToken::new();
    let mut http = tokio::spawn(crate::http::serve(
        listener,
        node.clone(),
        http_stop.clone(),
    ));
    let flush_stop = CancellationToken::new();
    let flusher = {
        let store = store.clone();
        let s = flush_stop.clone();
        tokio::spawn(async move { store.flush_every(FLUSH_INTERVAL, s).await })
    };
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutdown requested");
            stop.cancel();
        });
    }

    // Pauses in force are known before this node may lead.
    match crate::control::Control::new(&source, &config)
        .paused()
        .await
    {
        Ok(paused) => {
            for f in &paused {
                status.set_paused(f, true);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the pause controls on the source yet"),
    }
    let headroom = tokio::spawn(watch_headroom(node.clone(), stop.clone()));
    let controls = {
        let node = node.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::control::Control::new(&node.source, &node.config)
                .follow(&node.config, &node.status, stop)
                .await
        })
    };
    let result = lease_loop(&node, &stop).await;
    headroom.abort();
    controls.abort();

    flush_stop.cancel();
    let _ = flusher.await;
    store.flush().await?;
    http_stop.cancel();
    // Open keep-alive connections must not hold the exit.
    if tokio::time::timeout(Duration::from_secs(2), &mut http)
        .await
        .is_err()
    {
        http.abort();
    }
    tracing::info!("mongo-replicator stopped");
    result
}

enum Outcome {
    Shutdown,
    StepDown(String),
}

async fn lease_loop(node: &Arc<Node>, stop: &CancellationToken) -> anyhow::Result<()> {
    let cfg = &node.config;
    let lease = Lease::new(node.source.clone(), cfg);
    let poll = cfg.lease.renew_interval.min(Duration::from_secs(1));
    loop {
        // Standby: poll until the lease is ours.
        let auth = loop {
            let attempt = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = tokio::time::timeout(cfg.lease.ttl, lease.try_acquire()) => r,
            };
            match attempt {
                Ok(Ok(Some(a))) => break a,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    // A source that refuses the user will not change its mind: stop, saying why.
                    if e.refused {
                        return Err(anyhow::anyhow!(
                            "the source ({}) refuses the replicator's user the lease in `{}.{}`: {e}; give the URI a user with the roles in docs/operations.md (\"Least-privilege roles\")",
                            cfg.source.uri, cfg.lease.database, cfg.lease.collection
                        ));
                    }
                    tracing::warn!(error = %e, "cannot reach the lease; staying standby")
                }
                Err(_) => tracing::warn!(
                    "the source did not answer the lease request in time; staying standby"
                ),
            }
            if let Ok(Ok((view, term))) = tokio::time::timeout(poll, lease.view()).await {
                node.status.set_lease(view);
                node.status.set_role(false, term);
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(poll) => {}
            }
        };
        tracing::info!(term = auth.term(), "became leader");
        node.status.set_role(true, auth.term());
        set_own_lease_view(node, &auth);

        let pipes_stop = CancellationToken::new();
        let mut pipes = Pipes {
            set: JoinSet::new(),
            running: std::collections::HashSet::new(),
            hubs: Hubs::default(),
            stop: pipes_stop.clone(),
            auth: auth.clone(),
        };
        pipes.spawn_missing(node, node.config.selection().literal());

        let outcome = lead(node, &lease, &auth, &mut pipes, stop).await;
        let mut pipes = pipes.set;
        if let Outcome::StepDown(reason) = &outcome {
            // Someone else may already lead: write nothing more.
            auth.revoke();
            tracing::warn!(term = auth.term(), reason = %reason, "stepping down to standby");
        }
        pipes_stop.cancel();
        // Each pipeline applies and acknowledges its batch in flight, within the lease ttl
        // (the same bound as a crash); one stuck on a hung server is abandoned: its checkpoint
        // did not move, so the next leader replays that batch.
        let drained = tokio::time::timeout(cfg.lease.ttl, async {
            while pipes.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                pipelines = pipes.len(),
                "pipelines did not finish their batch within the lease ttl; abandoning them (their checkpoints did not move, nothing is lost)"
            );
            pipes.abort_all();
            while pipes.join_next().await.is_some() {}
        }
        if let Err(e) = node.store.flush().await {
            tracing::error!(error = %e, "checkpoint flush failed");
        }
        node.status.set_role(false, auth.term());
        match outcome {
            Outcome::Shutdown => {
                match tokio::time::timeout(RELEASE_TIMEOUT, lease.release(&auth)).await {
                    Ok(Ok(())) => tracing::info!(term = auth.term(), "lease released"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not release the lease; it expires after its ttl")
                    }
                    Err(_) => {
                        tracing::warn!("the source did not answer the lease release in time; the lease expires after its ttl")
                    }
                }
                return Ok(());
            }
            Outcome::StepDown(_) => {
                // Give the new leader a moment before competing again.
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        }
    }
}

/// How often the source's collections are listed, when the selection has patterns.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);

/// The pipelines of one leadership term.
struct Pipes {
    set: JoinSet<Exit>,
    /// (collection, follower) pairs started.
    running: std::collections::HashSet<(Ns, String)>,
    hubs: Hubs,
    stop: CancellationToken,
    auth: Authority,
}

impl Pipes {
    /// Starts a pipeline for every (collection, follower) pair not yet running.
    fn spawn_missing(&mut self, node: &Arc<Node>, namespaces: Vec<Ns>) {
        let cfg = &node.config;
        for ns in namespaces {
            for f in &node.followers {
                if !self.running.insert((ns.clone(), f.name.clone())) {
                    continue;
                }
                let label = cfg.selection().label(&ns);
                let hub = self.hubs.get_or_start(
                    &ns.db,
                    &node.source,
                    cfg,
                    &node.status.metrics,
                    &self.stop,
                );
                let pair = Pair {
                    stats: node.status.pair(&label, &f.name),
                    ns: ns.clone(),
                    label,
                    follower: f.clone(),
                    source: node.source.clone(),
                    config: node.config.clone(),
                    store: node.store.clone(),
                    authority: self.auth.clone(),
                    rev: std::sync::Mutex::new(crate::follower::Rev::Absent),
                    stream_batch: std::sync::atomic::AtomicU32::new(
                        cfg.replication.batch_max_docs as u32,
                    ),
                    hub: Some(hub),
                    meta_ready: std::sync::atomic::AtomicBool::new(false),
                    id_collation: std::sync::Mutex::new(None),
                };
                self.set.spawn(pair.run(self.stop.clone()));
            }
        }
    }

    /// Lists the source's collections and starts pipelines for new matches.
    async fn discover(&mut self, node: &Arc<Node>) {
        match tokio::time::timeout(
            DISCOVERY_INTERVAL,
            node.config.selection().resolve(&node.source),
        )
        .await
        {
            Ok(Ok(namespaces)) => {
                let before = self.running.len();
                self.spawn_missing(node, namespaces);
                if self.running.len() > before {
                    tracing::info!(
                        pipelines = self.running.len(),
                        "new collections on the source match the selection; replicating them"
                    );
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::source::describe(&e), "cannot list the source's collections; will retry")
            }
            Err(_) => tracing::warn!("listing the source's collections timed out; will retry"),
        }
    }
}

/// As leader: renew every `renew_interval` until shutdown or until the lease is lost.
async fn lead(
    node: &Arc<Node>,
    lease: &Lease,
    auth: &Authority,
    pipes: &mut Pipes,
    stop: &CancellationToken,
) -> Outcome {
    let renew_every = node.config.lease.renew_interval;
    let mut next_renew = tokio::time::Instant::now() + renew_every;
    // Collections created later that match the selection are picked up: on the source's
    // `create` events (when a reader runs), and by listing every few seconds.
    let mut discover = tokio::time::interval(DISCOVERY_INTERVAL);
    discover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let literal = node.config.selection().is_literal();
    loop {
        let hubs = pipes.hubs.all();
        let created = async move {
            if hubs.is_empty() || literal {
                return futures::future::pending().await;
            }
            futures::future::select_all(hubs.iter().map(|h| Box::pin(h.created.notified()))).await;
        };
        tokio::select! {
            _ = discover.tick(), if !literal => pipes.discover(node).await,
            _ = created => pipes.discover(node).await,
            _ = stop.cancelled() => return Outcome::Shutdown,
            _ = tokio::time::sleep_until(auth.deadline().into()) => {
                return Outcome::StepDown("could not renew the lease before it could expire".into());
            }
            _ = tokio::time::sleep_until(next_renew) => {
                next_renew = tokio::time::Instant::now() + renew_every;
                match tokio::time::timeout(renew_every, lease.renew(auth)).await {
                    Ok(Ok(true)) => set_own_lease_view(node, auth),
                    Ok(Ok(false)) => return Outcome::StepDown("the lease was taken by another node".into()),
                    Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed; will retry"),
                    Err(_) => tracing::warn!("lease renewal timed out; will retry"),
                }
            }
            Some(res) = pipes.set.join_next() => match res {
                Ok(Exit::NotLeader(msg)) => return Outcome::StepDown(msg),
                Ok(Exit::Failed(_)) | Ok(Exit::Shutdown) => {}
                Err(e) => tracing::error!(error = %e, "pipeline task ended abnormally"),
            },
        }
    }
}

fn set_own_lease_view(node: &Node, auth: &Authority) {
    let left = auth
        .deadline()
        .saturating_duration_since(std::time::Instant::now());
    node.status.set_lease(LeaseView {
        holder: Some(node.config.node_id().to_string()),
        expires_in_ms: Some(left.as_millis() as i64),
    });
}

/// How often the oplog headroom is measured.
const HEADROOM_INTERVAL: Duration = Duration::from_secs(5);

/// Measures, for each pair, how close its checkpoint is to falling off the source's oplog:
/// the oplog window minus the checkpoint's age, i.e. the checkpoint's cluster time minus the
/// oldest entry's. Warns when it runs low (under an hour or a fifth of the window). Sources
/// that do not let us read `local.oplog.rs` (permissions, sharded clusters) report nothing.
async fn watch_headroom(node: Arc<Node>, stop: CancellationToken) {
    let oplog = node
        .source
        .database("local")
        .collection::<mongodb::bson::Document>("oplog.rs");
    let mut told = false;
    loop {
        // Only the leader's checkpoints move; a standby reads nothing.
        let oldest = if node.status.is_leader() {
            let first = oplog
                .find_one(mongodb::bson::doc! {})
                .sort(mongodb::bson::doc! {"$natural": 1})
                .projection(mongodb::bson::doc! {"ts": 1})
                .await;
            if let Err(e) = &first {
                if crate::source::error_code(e) == Some(13) && !told {
                    told = true;
                    tracing::warn!(
                        error = %crate::source::describe(e),
                        "oplog headroom is not measured: the source user may not read local.oplog.rs; grant it {{role: \"read\", db: \"local\"}} to get the headroom metric and its alert"
                    );
                }
            }
            first
                .ok()
                .flatten()
                .and_then(|d| d.get_timestamp("ts").ok())
        } else {
            None
        };
        let now_s = crate::checkpoint::now_ms() / 1000;
        for p in node.status.pairs() {
            let headroom = match (oldest, p.checkpoint_cluster_ms()) {
                (Some(o), Some(cp)) => Some(cp - o.time as i64 * 1000),
                _ => None,
            };
            p.set_headroom_ms(headroom);
            if let (Some(h), Some(o)) = (headroom, oldest) {
                let window_ms = (now_s - o.time as i64).max(0) * 1000;
                if h < 3_600_000 && h < window_ms / 5 {
                    tracing::warn!(
                        follower = %p.follower, collection = %p.collection,
                        headroom_s = h / 1000, oplog_window_s = window_ms / 1000,
                        "oplog headroom is low: the checkpoint will fall off the source's oplog if the follower stays behind; enlarge the oplog or fix the follower"
                    );
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEADROOM_INTERVAL) => {}
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
