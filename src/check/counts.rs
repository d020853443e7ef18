//! The quick count comparison of `GET /sync-check`.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::Document;
use mongodb::Client;
use serde::Serialize;

use crate::config::{redact, Config};
use crate::follower::Follower;

/// A count-level comparison, quick enough to poll (`GET /sync-check`). The counts are the
/// servers' metadata counts: cheap, and exact after a clean shutdown.
#[derive(Debug, Clone, Serialize)]
pub struct CountReport {
    pub in_sync: bool,
    /// How old this result is (results are reused for a few seconds).
    pub age_ms: u64,
    pub collections: Vec<CountRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CountRow {
    pub collection: String,
    pub follower: String,
    pub source_count: Option<u64>,
    pub follower_count: Option<u64>,
    pub error: Option<String>,
}

pub async fn count_check(
    config: &Config,
    source: &Client,
    followers: &[Arc<Follower>],
) -> CountReport {
    let mut rows = Vec::new();
    let mut in_sync = true;
    let namespaces = match config.selection().resolve(source).await {
        Ok(n) => n,
        Err(_) => config.selection().literal(),
    };
    for ns in &namespaces {
        let c = &config.selection().label(ns);
        let src = estimated_count(source, &ns.db, &ns.coll).await;
        let counts = futures::future::join_all(
            followers
                .iter()
                .map(|f| estimated_count(f.client(), f.target_db(ns), &ns.coll)),
        )
        .await;
        for (f, fol) in followers.iter().zip(counts) {
            let error = match (&src, &fol) {
                (Err(e), _) => Some(format!("source: {e}")),
                (_, Err(e)) => Some(format!("follower: {e}")),
                _ => None,
            };
            let (sc, fc) = (src.as_ref().ok().copied(), fol.as_ref().ok().copied());
            if error.is_some() || sc != fc {
                in_sync = false;
            }
            rows.push(CountRow {
                collection: c.clone(),
                follower: f.name.clone(),
                source_count: sc,
                follower_count: fc,
                error,
            });
        }
    }
    CountReport {
        in_sync,
        age_ms: 0,
        collections: rows,
    }
}

/// How long one count of `/sync-check` may take.
const COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// The collection's document count from the server's metadata (no scan), bounded in time.
async fn estimated_count(client: &Client, db: &str, coll: &str) -> Result<u64, String> {
    let coll = client.database(db).collection::<Document>(coll);
    match tokio::time::timeout(COUNT_TIMEOUT, coll.estimated_document_count()).await {
        Ok(r) => r.map_err(|e| crate::config::bounded_message(&redact(&e.to_string()))),
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(COUNT_TIMEOUT)
        )),
    }
}
