//! The fan-out: each pipeline's subscription to its database's shared reader, with a queue
//! bounded in bytes and events. A subscriber that falls behind is detached (it goes back to
//! its own stream) instead of holding the reader or the other subscribers back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use mongodb::bson::Timestamp;
use mongodb::change_stream::event::ResumeToken;
use tokio::sync::mpsc;

use crate::change::{concerns, event_bytes, token_time, Event};
use crate::checkpoint::ts_key;

/// What a subscription receives.
#[derive(Debug)]
pub enum HubItem {
    /// An event of the subscriber's collection (or of the whole database), with its size.
    Event(Arc<Event>, usize),
    /// A post-batch token: everything up to it was delivered.
    Idle(ResumeToken),
    /// The subscription ended (the reader failed, or the subscriber fell behind): go back to
    /// the pipeline's own stream.
    Detached(String),
}

struct Sub {
    id: u64,
    coll: String,
    tx: mpsc::UnboundedSender<HubItem>,
    queued: Arc<Queued>,
}

/// A subscription's queue depth.
#[derive(Default)]
pub struct Queued {
    bytes: AtomicUsize,
    events: AtomicUsize,
}

/// The subscribers of one shared reader, and its position.
pub struct Fanout {
    inner: Mutex<Inner>,
    /// A subscription holding more than this many bytes (or `max_events` events) is
    /// detached.
    max_bytes: usize,
    max_events: usize,
}

struct Inner {
    /// The cluster time of the last item fanned out; `None` until the stream is open.
    position: Option<Timestamp>,
    subs: Vec<Sub>,
    next_id: u64,
}

/// A pipeline's subscription; dropping it unsubscribes.
pub struct Subscription {
    pub rx: mpsc::UnboundedReceiver<HubItem>,
    /// The reader's position when the subscription began: every later item is queued.
    pub from: Timestamp,
    queued: Arc<Queued>,
    fanout: Weak<Fanout>,
    id: u64,
}

impl Subscription {
    /// Marks an item as taken off the queue.
    pub fn taken(&self, bytes: usize) {
        self.queued.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.queued.events.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(f) = self.fanout.upgrade() {
            f.lock().subs.retain(|s| s.id != self.id);
        }
    }
}

impl Fanout {
    pub fn new(max_bytes: usize, max_events: usize) -> Arc<Fanout> {
        Arc::new(Fanout {
            inner: Mutex::new(Inner {
                position: None,
                subs: Vec::new(),
                next_id: 0,
            }),
            max_bytes,
            max_events,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to the events of `coll`; `None` while the reader has no position yet.
    pub fn subscribe(self: &Arc<Self>, coll: &str) -> Option<Subscription> {
        let mut inner = self.lock();
        let from = inner.position?;
        let (tx, rx) = mpsc::unbounded_channel();
        let id = inner.next_id;
        inner.next_id += 1;
        let queued = Arc::new(Queued::default());
        inner.subs.push(Sub {
            id,
            coll: coll.to_string(),
            tx,
            queued: queued.clone(),
        });
        Some(Subscription {
            rx,
            from,
            queued,
            fanout: Arc::downgrade(self),
            id,
        })
    }

    /// Ends every subscription (each goes back to its own stream) and forgets the position.
    pub fn detach_all(&self, reason: &str) {
        let mut inner = self.lock();
        inner.position = None;
        for s in inner.subs.drain(..) {
            let _ = s.tx.send(HubItem::Detached(reason.to_string()));
        }
    }

    /// Queues an event at cluster time `t` for the subscribers it concerns; one whose queue
    /// is past its bound is detached instead.
    pub fn fan_out(&self, ev: Arc<Event>, t: Timestamp) {
        let size = event_bytes(&ev);
        let mut inner = self.lock();
        let (max_bytes, max_events) = (self.max_bytes, self.max_events);
        inner.subs.retain(|s| {
            if !concerns(&ev, &s.coll) {
                return true;
            }
            let bytes = s.queued.bytes.fetch_add(size, Ordering::Relaxed) + size;
            let events = s.queued.events.fetch_add(1, Ordering::Relaxed) + 1;
            if bytes > max_bytes && events > 1 || events > max_events {
                let _ = s.tx.send(HubItem::Detached(format!(
                    "fell behind the shared reader ({events} events, {bytes} bytes queued)"
                )));
                return false;
            }
            s.tx.send(HubItem::Event(ev.clone(), size)).is_ok()
        });
        inner.position = Some(max_ts(inner.position, t));
    }

    /// Queues a post-batch token for every subscriber.
    pub fn idle(&self, token: ResumeToken) {
        let t = token_time(&token);
        let mut inner = self.lock();
        inner.subs.retain(|s| {
            s.queued.events.fetch_add(1, Ordering::Relaxed);
            s.tx.send(HubItem::Idle(token.clone())).is_ok()
        });
        if let Some(t) = t {
            inner.position = Some(max_ts(inner.position, t));
        }
    }
}

fn max_ts(a: Option<Timestamp>, b: Timestamp) -> Timestamp {
    match a {
        Some(a) if ts_key(a) > ts_key(b) => a,
        _ => b,
    }
}
