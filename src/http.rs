//! The HTTP endpoints: `/healthz`, `/status`, `/metrics`, `/sync-check`, and
//! `POST /resync/{follower}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::service::Node;

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/sync-check", get(sync_check))
        .route("/resync/{follower}", post(resync))
        .with_state(node)
}

pub async fn serve(listener: tokio::net::TcpListener, node: Arc<Node>, stop: CancellationToken) {
    let app = router(node);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "http server failed");
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn status(State(node): State<Arc<Node>>) -> Response {
    Json(node.status.report()).into_response()
}

async fn metrics(State(node): State<Arc<Node>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.status.metrics_text(),
    )
        .into_response()
}

async fn sync_check(State(node): State<Arc<Node>>) -> Response {
    let report = crate::check::count_check(&node.config, &node.source, &node.followers).await;
    let code = if report.in_sync {
        StatusCode::OK
    } else {
        StatusCode::CONFLICT
    };
    (code, Json(report)).into_response()
}

/// Asks the leader to copy one follower again; its pipelines then stream as before.
async fn resync(State(node): State<Arc<Node>>, Path(follower): Path<String>) -> Response {
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
