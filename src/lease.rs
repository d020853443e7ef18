//! The leader lease: which replicator node may write to the followers.
//!
//! The lease is one document in the source deployment (`[lease] database/collection`), keyed
//! by the replicated database. It is taken with a `findAndModify` whose plain filter matches
//! only a free or expired lease, and each new holder gets a higher `term` (`$inc`). Expiry is
//! judged by the server's clock (`hello.localTime`), never by a node's.
//!
//! A leader keeps an [`Authority`]: its term and a deadline on its own monotonic clock,
//! taken before each successful renewal was sent plus `ttl` minus a safety margin. The
//! deadline can only come before the server's expiry, so a leader that cannot renew stops
//! writing before any other node can take over. Pipelines check the deadline before every
//! write, which also covers a leader that was paused (SIGSTOP) and wakes up late: the
//! monotonic clock kept running. Followers fence by term as the last line of defence
//! (see `follower`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::{Client, Collection};

use crate::config::Config;
use crate::source::server_time;
use crate::status::LeaseView;

/// A leader's right to write: its term, valid until a local monotonic deadline.
#[derive(Clone, Debug)]
pub struct Authority {
    term: i64,
    valid_until: Arc<Mutex<Instant>>,
}

impl Authority {
    pub fn new(term: i64, valid_until: Instant) -> Authority {
        Authority {
            term,
            valid_until: Arc::new(Mutex::new(valid_until)),
        }
    }

    pub fn term(&self) -> i64 {
        self.term
    }

    pub fn is_valid(&self) -> bool {
        Instant::now() < self.deadline()
    }

    pub fn deadline(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn extend(&self, until: Instant) {
        let mut v = self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        if until > *v {
            *v = until;
        }
    }

    /// Ends the authority at once (graceful release or step-down).
    pub fn revoke(&self) {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

pub struct Lease {
    client: Client,
    coll: Collection<Document>,
    name: String,
    node_id: String,
    /// Distinguishes this process from an earlier one with the same node id.
    incarnation: String,
    ttl: Duration,
    margin: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("lease: {message}")]
pub struct LeaseError {
    message: String,
    /// Whether the source refused the replicator's user (credentials or privileges): a
    /// configuration error that retrying will not mend.
    pub refused: bool,
}

impl From<mongodb::error::Error> for LeaseError {
    fn from(e: mongodb::error::Error) -> Self {
        LeaseError {
            message: crate::source::describe(&e),
            refused: crate::source::is_refusal(&e),
        }
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    crate::source::error_code(e) == Some(11000) || e.to_string().contains("E11000")
}

impl Lease {
    pub fn new(client: Client, config: &Config) -> Lease {
        let ttl = config.lease.ttl;
        Lease {
            coll: client
                .database(&config.lease.database)
                .collection(&config.lease.collection),
            client,
            name: config.scope().to_string(),
            node_id: config.node_id().to_string(),
            incarnation: mongodb::bson::oid::ObjectId::new().to_hex(),
            ttl,
            margin: (ttl / 5).max(Duration::from_millis(200)),
        }
    }

    fn expiry(&self, now: DateTime) -> DateTime {
        DateTime::from_millis(now.timestamp_millis() + self.ttl.as_millis() as i64)
    }

    /// Takes the lease if it is free or expired. `Ok(None)` when another node holds it.
    pub async fn try_acquire(&self) -> Result<Option<Authority>, LeaseError> {
        let sent = Instant::now();
        let now = server_time(&self.client).await?;
        let res = self
            .coll
            .find_one_and_update(
                doc! {"_id": &self.name, "$or": [
                    {"expires_at": {"$lte": now}},
                    {"holder": &self.node_id, "incarnation": &self.incarnation},
                ]},
                doc! {
                    "$set": {"holder": &self.node_id, "incarnation": &self.incarnation, "expires_at": self.expiry(now)},
                    "$inc": {"term": 1_i64},
                    "$currentDate": {"acquired_at": true, "renewed_at": true},
                },
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await;
        match res {
            Ok(Some(d)) => {
                let term = d
                    .get("term")
                    .and_then(crate::follower::bson_i64)
                    .unwrap_or(0);
                Ok(Some(Authority::new(term, sent + self.ttl - self.margin)))
            }
            Ok(None) => Ok(None),
            Err(e) if is_duplicate_key(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Extends the lease. `Ok(false)` when it is no longer ours (expired and taken).
    pub async fn renew(&self, auth: &Authority) -> Result<bool, LeaseError> {
        let sent = Instant::now();
        let now = server_time(&self.client).await?;
        let res = self
            .coll
            .find_one_and_update(
                doc! {"_id": &self.name, "holder": &self.node_id, "incarnation": &self.incarnation, "term": auth.term()},
                doc! {"$set": {"expires_at": self.expiry(now)}, "$currentDate": {"renewed_at": true}},
            )
            .await?;
        if res.is_some() {
            auth.extend(sent + self.ttl - self.margin);
        }
        Ok(res.is_some())
    }

    /// Gives the lease up at once, so a standby takes over without waiting for the ttl.
    pub async fn release(&self, auth: &Authority) -> Result<(), LeaseError> {
        auth.revoke();
        self.coll
            .update_one(
                doc! {"_id": &self.name, "holder": &self.node_id, "incarnation": &self.incarnation, "term": auth.term()},
                doc! {"$set": {"expires_at": DateTime::from_millis(0), "released_by": &self.node_id}},
            )
            .await?;
        Ok(())
    }

    /// The lease as stored, for `/status`, and the highest term seen.
    pub async fn view(&self) -> Result<(LeaseView, i64), LeaseError> {
        let now = server_time(&self.client).await?;
        let d = self.coll.find_one(doc! {"_id": &self.name}).await?;
        let Some(d) = d else {
            return Ok((LeaseView::default(), 0));
        };
        let expires = d.get_datetime("expires_at").ok().copied();
        let live = expires.is_some_and(|e| e > now);
        let term = d
            .get("term")
            .and_then(crate::follower::bson_i64)
            .unwrap_or(0);
        Ok((
            LeaseView {
                holder: if live {
                    d.get_str("holder").ok().map(str::to_string)
                } else {
                    None
                },
                expires_in_ms: expires
                    .filter(|_| live)
                    .map(|e| e.timestamp_millis() - now.timestamp_millis()),
            },
            term,
        ))
    }
}
