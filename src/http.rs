//! The HTTP endpoints: `/healthz`, `/status`, `/metrics`, `/sync-check`, and
//! `POST /resync/{follower}`.
//!
//! Read-only endpoints are open. Mutating ones (`POST`) need `Authorization: Bearer <token>`
//! when `[http] admin_token_file` is set (401 without it), and answer 403 when the listener
//! is not on loopback and no token is configured. The server bounds what a client can hold:
//! [`MAX_CONNECTIONS`] connections, [`HEADER_READ_TIMEOUT`] to send a request's head (which
//! also closes a connection idle between requests), [`HANDLER_TIMEOUT`] per request, and
//! [`WRITE_TIMEOUT`] for a client to take what it is sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::check::CountReport;
use crate::node::Node;

/// The most connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's head, counted from when the server starts
/// waiting for it: a slow client, or a connection idle between requests, is closed after it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a request may take to answer.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a write to a client may wait: a client that stops reading (while it pipelines
/// requests, say) loses its connection instead of holding it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `/sync-check` result is reused.
pub const SYNC_CHECK_CACHE: Duration = Duration::from_secs(5);

struct HttpState {
    node: Arc<Node>,
    /// Whether mutating endpoints may answer without a token (a loopback listener).
    loopback: bool,
    /// The last `/sync-check` and when it ran; the lock makes them run one at a time.
    sync_check: tokio::sync::Mutex<Option<(Instant, CountReport)>>,
}

type AppState = Arc<HttpState>;

pub fn router(node: Arc<Node>) -> Router {
    let loopback = node
        .config
        .http
        .listen
        .parse::<SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    let state = Arc::new(HttpState {
        node,
        loopback,
        sync_check: tokio::sync::Mutex::new(None),
    });
    let admin = Router::new()
        .route("/resync/{follower}", post(resync))
        .route("/pause/{follower}", post(pause))
        .route("/resume/{follower}", post(resume))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/sync-check", get(sync_check))
        .merge(admin)
        .layer(middleware::from_fn(bounded))
        .with_state(state)
}

/// Serves `node` on `listener` until `stop`, within the limits above.
pub async fn serve(listener: tokio::net::TcpListener, node: Arc<Node>, stop: CancellationToken) {
    let app = router(node);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "http: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                limit = MAX_CONNECTIONS,
                "http: connection limit reached; closing a new connection"
            );
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut io = tokio_io_timeout::TimeoutStream::new(stream);
            io.set_write_timeout(Some(WRITE_TIMEOUT));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(Box::pin(io)), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                }
            }
        });
    }
    connections.shutdown().await;
}

/// Answers 503 for a request that takes longer than [`HANDLER_TIMEOUT`].
async fn bounded(req: Request, next: Next) -> Response {
    match tokio::time::timeout(HANDLER_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the request took too long\n",
        )
            .into_response(),
    }
}

/// Lets a mutating request through only with the admin token, or on a loopback listener
/// when no token is configured.
async fn require_admin(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    match &state.node.config.http.admin_token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            // Digests compared, so the time taken does not tell how much of a guess matched.
            if Sha256::digest(given.trim().as_bytes()) != Sha256::digest(token.expose().as_bytes())
            {
                tracing::warn!(path = %req.uri().path(), "http: refused a request without the admin token");
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "this endpoint needs `Authorization: Bearer <token>` with the token in [http] admin_token_file\n",
                )
                    .into_response();
            }
        }
        None if !state.loopback => {
            return (
                StatusCode::FORBIDDEN,
                "mutating endpoints are off: the listener is not on loopback and no [http] admin_token_file is set\n",
            )
                .into_response();
        }
        None => {}
    }
    next.run(req).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn status(State(state): State<AppState>) -> Response {
    Json(state.node.status.report()).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.node.status.metrics_text(),
    )
        .into_response()
}

/// Compares document counts (the servers' cheap metadata counts). One runs at a time; a
/// result younger than [`SYNC_CHECK_CACHE`] is served again, with its age.
async fn sync_check(State(state): State<AppState>) -> Response {
    let mut last = state.sync_check.lock().await;
    let fresh = last
        .as_ref()
        .filter(|(at, _)| at.elapsed() < SYNC_CHECK_CACHE);
    let (at, mut report) = match fresh {
        Some((at, report)) => (*at, report.clone()),
        None => {
            let node = &state.node;
            let report =
                crate::check::count_check(&node.config, &node.source, &node.followers).await;
            let at = Instant::now();
            *last = Some((at, report.clone()));
            (at, report)
        }
    };
    drop(last);
    report.age_ms = at.elapsed().as_millis() as u64;
    let code = if report.in_sync {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    (code, Json(report)).into_response()
}

/// Asks the leader to copy one follower again; its pipelines then stream as before.
async fn pause(State(state): State<AppState>, Path(follower): Path<String>) -> Response {
    set_paused(&state, &follower, true).await
}

async fn resume(State(state): State<AppState>, Path(follower): Path<String>) -> Response {
    set_paused(&state, &follower, false).await
}

/// Records the pause on the source (so it holds on every node and across failovers), then
/// applies it here at once.
async fn set_paused(state: &AppState, follower: &str, paused: bool) -> Response {
    let node = &state.node;
    if node.config.follower(follower).is_none() {
        return (
            StatusCode::NOT_FOUND,
            format!("no follower named `{follower}` in the config\n"),
        )
            .into_response();
    }
    let control = crate::control::Control::new(&node.source, &node.config);
    if let Err(e) = control
        .set_paused(follower, paused, node.config.node_id())
        .await
    {
        let what = if paused { "pause" } else { "resume" };
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("could not {what} follower `{follower}`: {e}\n"),
        )
            .into_response();
    }
    node.status.set_paused(follower, paused);
    let msg = if paused {
        tracing::warn!(follower = %follower, "follower paused over HTTP");
        format!("follower `{follower}` paused: nothing is applied to it until it is resumed; its checkpoint is kept\n")
    } else {
        tracing::info!(follower = %follower, "follower resumed over HTTP");
        format!("follower `{follower}` resumed: it catches up from its checkpoint\n")
    };
    (StatusCode::OK, msg).into_response()
}

async fn resync(State(state): State<AppState>, Path(follower): Path<String>) -> Response {
    let node = &state.node;
    if node.config.follower(&follower).is_none() {
        return (
            StatusCode::NOT_FOUND,
            format!("no follower named `{follower}` in the config\n"),
        )
            .into_response();
    }
    if !node.status.is_leader() {
        let holder = node.status.report().lease.holder;
        return (
            StatusCode::CONFLICT,
            format!(
                "this node is standby; ask the leader ({})\n",
                holder.as_deref().unwrap_or("unknown")
            ),
        )
            .into_response();
    }
    let mut n = 0;
    for p in node.status.pairs() {
        if p.follower == follower {
            p.request_resync();
            n += 1;
        }
    }
    tracing::warn!(follower = %follower, collections = n, "resync requested over HTTP");
    (
        StatusCode::ACCEPTED,
        format!("resync of follower `{follower}` started for {n} collection(s)\n"),
    )
        .into_response()
}
