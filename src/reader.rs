//! The shared reader: one change stream per source database, read once and fanned out to
//! every pipeline (collection, follower) of that database.
//!
//! A pipeline starts on its own stream, from its own checkpoint (see
//! [`crate::applier`]). Once that stream has caught up, the pipeline subscribes here and
//! hands over without a gap: the subscription queues every event after the reader's position
//! at that moment (`from`), and the pipeline switches as soon as its own stream has passed
//! `from`, taking queued events from its own last cluster time on (an overlap at one cluster
//! time is applied twice, which idempotent writes make harmless).
//!
//! Each subscription is bounded in bytes and events. One that falls behind (its follower is
//! slow or down) is detached instead of holding the reader or the other pipelines back: it
//! goes back to its own stream from its own checkpoint, catches up, and subscribes again. So
//! the source is read once per change while the followers keep up, and memory stays bounded.
//!
//! Items carry only two kinds of resume tokens: events of the subscriber's own collection,
//! and post-batch tokens (high-water marks). Both resume any stream of the database, so a
//! pipeline's checkpoint is valid for its own stream whichever way it was reached.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::doc;
use mongodb::change_stream::event::{OperationType, ResumeToken};
use mongodb::options::FullDocumentType;
use mongodb::Client;
use tokio_util::sync::CancellationToken;

use crate::change::{event_bytes, event_time, Event};
use crate::fanout::Fanout;

/// How long a getMore waits on the source for new events.
const MAX_AWAIT: Duration = Duration::from_millis(500);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The reader of one source database.
pub struct Hub {
    db: String,
    source: Client,
    /// Expanded events (index and collection DDL) are read too.
    expanded: bool,
    batch: u32,
    /// The byte budget of the subscriptions; replies are sized to half of it.
    max_bytes: usize,
    pub fanout: Arc<Fanout>,
    started: AtomicBool,
    stop: CancellationToken,
    /// Woken when a collection is created in the database.
    pub created: tokio::sync::Notify,
    /// Events read from the source.
    events_read: prometheus::IntCounter,
}

impl Hub {
    pub fn new(
        db: &str,
        source: Client,
        config: &crate::config::Config,
        metrics: &crate::status::Metrics,
        stop: CancellationToken,
    ) -> Arc<Hub> {
        let r = &config.replication;
        let max_bytes = 2 * r.batch_max_bytes.as_u64() as usize;
        Arc::new(Hub {
            db: db.to_string(),
            source,
            expanded: r.indexes,
            batch: r.batch_max_docs as u32,
            max_bytes,
            fanout: Fanout::new(max_bytes, 64 * r.batch_max_docs),
            started: AtomicBool::new(false),
            stop,
            created: tokio::sync::Notify::new(),
            events_read: metrics.source_events.with_label_values(&[db]),
        })
    }

    /// Reads the database's stream until stopped. An interrupted stream is reopened from the
    /// reader's own last token, so its subscribers see no gap; when that is impossible
    /// (history lost, or failures past `silence`), every subscriber is detached (each goes
    /// back to its own stream from its own checkpoint) and the reader starts again at the
    /// present.
    /// Subscribes to the events of `coll` (see [`Fanout::subscribe`]); the first call
    /// starts the reader.
    pub fn subscribe(self: &Arc<Self>, coll: &str) -> Option<crate::fanout::Subscription> {
        if !self.started.swap(true, Ordering::SeqCst) {
            tokio::spawn(self.clone().run());
        }
        self.fanout.subscribe(coll)
    }

    async fn run(self: Arc<Self>) {
        let mut backoff = BACKOFF_START;
        let mut token: Option<ResumeToken> = None;
        let mut batch = self.batch;
        let mut failing_since: Option<std::time::Instant> = None;
        let mut failed_at: Option<ResumeToken> = None;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            let end = self.read(&mut token, batch).await;
            let reason = match end {
                ReadEnd::Stopped => break,
                ReadEnd::Resize(b) => {
                    tracing::debug!(database = %self.db, from = batch, to = b, "shared reader: events per reply changed to keep replies within batch_max_bytes");
                    batch = b;
                    continue;
                }
                ReadEnd::Lost(reason) => {
                    token = None;
                    reason
                }
                ReadEnd::Failed(reason) => {
                    // A read that moved on before it failed starts the count afresh.
                    if token != failed_at {
                        failing_since = None;
                        failed_at = token.clone();
                    }
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > Duration::from_secs(30) {
                        token = None;
                    }
                    reason
                }
            };
            if token.is_none() {
                failing_since = None;
                tracing::debug!(database = %self.db, error = %reason, "shared reader starts again at the present; its pipelines read their own streams until they have caught up");
                self.fanout.detach_all(&reason);
            } else {
                tracing::debug!(database = %self.db, error = %reason, "shared reader interrupted; reopening it where it stopped");
            }
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        self.fanout.detach_all("the node stops leading");
    }

    /// Reads from `token` (the present when `None`) with `batch` events per reply, moving
    /// `token` along.
    async fn read(&self, token: &mut Option<ResumeToken>, batch: u32) -> ReadEnd {
        let db = self.source.database(&self.db);
        let watch = db
            .watch()
            .pipeline([doc! {"$project": {"updateDescription": 0}}])
            .full_document(FullDocumentType::UpdateLookup)
            .show_expanded_events(self.expanded)
            .batch_size(batch)
            .max_await_time(MAX_AWAIT);
        let watch = match token.clone() {
            Some(t) => watch.start_after(t),
            None => watch,
        };
        let mut stream = tokio::select! {
            _ = self.stop.cancelled() => return ReadEnd::Stopped,
            r = tokio::time::timeout(Duration::from_secs(30), watch.into_future()) => match r {
                Ok(Ok(s)) => s.with_type::<Event>(),
                Ok(Err(e)) => return ReadEnd::from_error(&e, batch),
                Err(_) => return ReadEnd::Failed("the source did not open the change stream in time".into()),
            },
        };
        // The bytes of one reply: `batch` events of the recent average size.
        let budget = self.max_bytes as f64 / 2.0;
        let mut avg: Option<f64> = None;
        let mut since_open: u64 = 0;
        let silence = Duration::from_secs(30);
        loop {
            let next = tokio::select! {
                _ = self.stop.cancelled() => return ReadEnd::Stopped,
                r = tokio::time::timeout(silence, stream.next_if_any()) => r,
            };
            match next {
                Err(_) => {
                    return ReadEnd::Failed(
                        "the source's change stream gave nothing for 30s".into(),
                    )
                }
                Ok(Err(e)) => return ReadEnd::from_error(&e, batch),
                Ok(Ok(Some(ev))) => {
                    self.events_read.inc();
                    let Some(t) = event_time(&ev) else {
                        return ReadEnd::Lost("an event without a cluster time".into());
                    };
                    if matches!(&ev.operation_type, OperationType::Other(op) if op == "create") {
                        self.created.notify_waiters();
                    }
                    let size = event_bytes(&ev) as f64;
                    let a = avg.map_or(size, |a| 0.9 * a + 0.1 * size);
                    avg = Some(a);
                    since_open += 1;
                    let id = ev.id.clone();
                    let after = stream.resume_token();
                    self.fanout.fan_out(Arc::new(ev), t);
                    *token = Some(id.clone());
                    // A token other than the event's own is the post-batch token of an
                    // exhausted batch: a high-water mark, shared with every subscriber.
                    if let Some(tok) = after.filter(|tok| tok != &id) {
                        *token = Some(tok.clone());
                        self.fanout.idle(tok);
                    }
                    // Replies hold `batch` events: as soon as events grow, ask for fewer
                    // (reopening where it stopped), so the next reply stays within budget;
                    // when they shrink for a while, ask for more again.
                    let fit = |s: f64| ((budget / s.max(1.0)) as u32).clamp(1, self.batch);
                    if fit(a.max(size)) * 2 <= batch {
                        return ReadEnd::Resize(fit(a.max(size)));
                    }
                    if fit(a) >= batch.saturating_mul(4) && since_open >= 4 * batch as u64 {
                        return ReadEnd::Resize(fit(a));
                    }
                }
                Ok(Ok(None)) => {
                    if let Some(tok) = stream.resume_token() {
                        *token = Some(tok.clone());
                        self.fanout.idle(tok);
                    }
                }
            }
            if !stream.is_alive() {
                return ReadEnd::Failed("the change stream ended".into());
            }
        }
    }
}

/// How one read of the stream ended.
enum ReadEnd {
    Stopped,
    /// Reopen where it stopped, asking for this many events per reply.
    Resize(u32),
    /// Reopen where it stopped after a backoff.
    Failed(String),
    /// Its position cannot be resumed: start again at the present.
    Lost(String),
}

impl ReadEnd {
    fn from_error(e: &mongodb::error::Error, batch: u32) -> ReadEnd {
        let reason = crate::source::describe(e);
        if crate::source::is_history_lost(e) {
            ReadEnd::Lost(reason)
        } else if matches!(e.kind.as_ref(), mongodb::error::ErrorKind::InvalidResponse { message, .. } if message.contains("over maximum"))
            && batch > 1
        {
            // A reply past the driver's limit: fewer events per reply.
            ReadEnd::Resize(batch / 2)
        } else {
            ReadEnd::Failed(reason)
        }
    }
}

/// The readers of a leadership term, one per source database.
#[derive(Default, Clone)]
pub struct Hubs(Arc<Mutex<HashMap<String, Arc<Hub>>>>);

impl Hubs {
    pub fn get_or_start(
        &self,
        db: &str,
        source: &Client,
        config: &crate::config::Config,
        metrics: &crate::status::Metrics,
        stop: &CancellationToken,
    ) -> Arc<Hub> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(db.to_string())
            .or_insert_with(|| Hub::new(db, source.clone(), config, metrics, stop.clone()))
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<Hub>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
