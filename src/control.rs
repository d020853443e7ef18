//! Operator controls that outlive a node and a leadership term: which followers are paused.
//!
//! They are kept in the source deployment, beside the lease (`lease.database`, collection
//! `control`), so a pause holds on every node, across failovers and restarts. Every node
//! reads them every second; the leader's pipelines of a paused follower hold (see
//! [`crate::applier`]).

use std::collections::HashSet;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::{Client, Collection};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::status::NodeStatus;

pub const CONTROL_COLLECTION: &str = "control";
/// How often every node reads the controls.
pub const REFRESH: Duration = Duration::from_secs(1);

pub struct Control {
    coll: Collection<Document>,
    /// What the controls belong to (see [`Config::scope`]).
    scope: String,
    timeout: Duration,
}

impl Control {
    pub fn new(source: &Client, config: &Config) -> Control {
        Control {
            coll: source
                .database(&config.lease.database)
                .collection(CONTROL_COLLECTION),
            scope: config.scope().to_string(),
            timeout: config
                .replication
                .write_timeout
                .min(Duration::from_secs(10)),
        }
    }

    /// Records that `follower` is paused (or not), durably, on the source.
    pub async fn set_paused(&self, follower: &str, paused: bool, node: &str) -> anyhow::Result<()> {
        let id = doc! {"scope": &self.scope, "follower": follower};
        let wc = mongodb::options::WriteConcern::builder()
            .w(mongodb::options::Acknowledgment::Majority)
            .journal(true)
            .build();
        let write = self
            .coll
            .update_one(
                doc! {"_id": {"$eq": id.clone()}},
                doc! {"$set": {"paused": paused, "by": node}, "$currentDate": {"at": true}},
            )
            .upsert(true)
            .write_concern(wc);
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!(
                "could not record it on the source: {}",
                crate::source::describe(&e)
            )),
            Err(_) => Err(anyhow::anyhow!("the source did not answer in time")),
        }
    }

    /// The followers paused now.
    pub async fn paused(&self) -> anyhow::Result<HashSet<String>> {
        let read = async {
            self.coll
                .find(doc! {"_id.scope": {"$eq": &self.scope}, "paused": true})
                .await?
                .try_collect::<Vec<Document>>()
                .await
        };
        let docs = tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| anyhow::anyhow!("the source did not answer in time"))?
            .map_err(|e| anyhow::anyhow!("{}", crate::source::describe(&e)))?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_document("_id").ok()?.get_str("follower").ok())
            .map(str::to_string)
            .collect())
    }

    /// Keeps the node's pause flags in step with the source until `stop`.
    pub async fn follow(self, config: &Config, status: &NodeStatus, stop: CancellationToken) {
        let mut warned = false;
        loop {
            match self.paused().await {
                Ok(paused) => {
                    warned = false;
                    for f in &config.followers {
                        if status.set_paused(&f.name, paused.contains(&f.name)) {
                            tracing::info!(follower = %f.name, paused = paused.contains(&f.name), "follower pause changed");
                        }
                    }
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, "cannot read the pause controls on the source; keeping the last known");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REFRESH) => {}
            }
        }
    }
}
