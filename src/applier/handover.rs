//! A pair's events: its own stream until it has caught up, then the shared reader of its
//! database, without a gap (see [`crate::reader`]).

use super::*;

/// Reads the pipeline's own stream into `tx`; once it has caught up, hands over to the
/// shared reader `hub` (see [`crate::reader`] for why the handover has no gap). Ends when the
/// receiver goes away, the stream fails, or the shared reader detaches this pipeline (then
/// the pipeline reopens its own stream from its checkpoint).
pub(super) async fn read_stream(
    mut stream: mongodb::change_stream::ChangeStream<ChangeStreamEvent<RawDocumentBuf>>,
    tx: mpsc::Sender<Item>,
    budget: Arc<tokio::sync::Semaphore>,
    budget_kib: u32,
    hub: Option<Arc<Hub>>,
    coll: String,
    stats: Arc<PairStats>,
) {
    let permit = |size: usize| {
        // One event larger than the whole budget takes all of it.
        let kib = ((size / 1024) as u32).clamp(1, budget_kib);
        budget.clone().acquire_many_owned(kib)
    };
    let mut last: Option<Timestamp> = None;
    let mut sub: Option<Subscription> = None;
    loop {
        let (item, caught_up) = match stream.next_if_any().await {
            Ok(Some(ev)) => {
                let size = event_bytes(&ev);
                let Ok(p) = permit(size).await else {
                    return;
                };
                last = event_time(&ev).or(last);
                (Item::Event(Arc::new(ev), p, size), false)
            }
            Ok(None) => match stream.resume_token() {
                Some(t) => {
                    last = token_time(&t).or(last);
                    (Item::Idle(t), true)
                }
                None => continue,
            },
            Err(e) => {
                let _ = tx.send(Item::Error(e)).await;
                return;
            }
        };
        if tx.send(item).await.is_err() {
            return;
        }
        if !stream.is_alive() {
            return;
        }
        if caught_up && sub.is_none() {
            sub = hub.as_ref().and_then(|h| h.subscribe(&coll));
        }
        // Everything up to `last` came from our own stream, and the subscription holds
        // everything after `from`: once `last` is past `from`, nothing falls between.
        if let (Some(s), Some(l)) = (&sub, last) {
            if ts_key(l) > ts_key(s.from) {
                break;
            }
        }
    }
    drop(stream);
    let (Some(mut sub), Some(last)) = (sub, last) else {
        return;
    };
    stats.set_shared(true);
    let _own_again = OnDrop(|| stats.set_shared(false));
    loop {
        let item = match sub.rx.recv().await {
            Some(HubItem::Event(ev, size)) => {
                sub.taken(size);
                // Before our own stream's last cluster time: already delivered.
                if event_time(&ev).is_some_and(|t| ts_key(t) < ts_key(last)) {
                    continue;
                }
                let Ok(p) = permit(size).await else {
                    return;
                };
                Item::Event(ev, p, size)
            }
            Some(HubItem::Idle(t)) => {
                sub.taken(0);
                if token_time(&t).is_some_and(|c| ts_key(c) < ts_key(last)) {
                    continue;
                }
                Item::Idle(t)
            }
            Some(HubItem::Detached(reason)) => Item::Detached(reason),
            None => Item::Detached("the shared reader stopped".into()),
        };
        let detached = matches!(item, Item::Detached(_));
        if tx.send(item).await.is_err() || detached {
            return;
        }
    }
}
