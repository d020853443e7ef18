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
    // The token of the last item, when it was an event (not a post-batch token).
    let mut last_event: Option<ResumeToken>;
    // The cluster time of the last event our own stream delivered. A post-batch token's
    // time is not used to skip the shared reader's events: on the test server it can be
    // the latest time the server assigned, ahead of writes not yet visible (review).
    let mut last_ev: Option<Timestamp> = None;
    let mut sub: Option<Subscription> = None;
    loop {
        let (item, caught_up) = match stream.next_if_any().await {
            Ok(Some(ev)) => {
                let size = event_bytes(&ev);
                let Ok(p) = permit(size).await else {
                    return;
                };
                last = event_time(&ev).or(last);
                last_ev = event_time(&ev).or(last_ev);
                last_event = Some(ev.id.clone());
                (Item::Event(Arc::new(ev), p, size), false)
            }
            Ok(None) => match stream.resume_token() {
                Some(t) => {
                    last = token_time(&t).or(last);
                    last_event = None;
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
    let (Some(mut sub), Some(_)) = (sub, last) else {
        return;
    };
    // Events before `last` came from our own stream; with no own event yet, nothing is
    // skipped (everything the subscription holds is applied, a harmless replay).
    let last = last_ev.unwrap_or(Timestamp {
        time: 0,
        increment: 0,
    });
    stats.set_shared(true);
    let _own_again = OnDrop(|| stats.set_shared(false));
    // Events of the shared reader at `last` itself may have come from our own stream
    // already (a transaction's events share one cluster time). When our last item was an
    // event, those up to it are held back until it shows up (then dropped: delivered), so
    // the checkpoint never steps back; if it never shows up, they are delivered after all.
    let mut seeking = last_event;
    let mut held: Vec<(Arc<crate::change::Event>, usize)> = Vec::new();
    loop {
        let mut out = Vec::new();
        match sub.rx.recv().await {
            Some(HubItem::Event(ev, size)) => {
                sub.taken(size);
                let t = event_time(&ev);
                let at = |c: Option<Timestamp>| c.map(|c| ts_key(c).cmp(&ts_key(last)));
                match at(t) {
                    // Before our own stream's last cluster time: already delivered.
                    Some(std::cmp::Ordering::Less) => continue,
                    Some(std::cmp::Ordering::Equal) if seeking.is_some() => {
                        if seeking.as_ref() == Some(&ev.id) {
                            seeking = None;
                            held.clear();
                        } else {
                            held.push((ev, size));
                        }
                        continue;
                    }
                    _ => {
                        seeking = None;
                        out.append(&mut held);
                        out.push((ev, size));
                    }
                }
            }
            Some(HubItem::Idle(t)) => {
                sub.taken(0);
                let c = token_time(&t);
                if c.is_some_and(|c| ts_key(c) <= ts_key(last)) && seeking.is_some()
                    || c.is_some_and(|c| ts_key(c) < ts_key(last))
                {
                    continue;
                }
                seeking = None;
                for (ev, size) in held.drain(..) {
                    let Ok(p) = permit(size).await else {
                        return;
                    };
                    if tx.send(Item::Event(ev, p, size)).await.is_err() {
                        return;
                    }
                }
                if tx.send(Item::Idle(t)).await.is_err() {
                    return;
                }
                continue;
            }
            Some(HubItem::Detached(reason)) => {
                let _ = tx.send(Item::Detached(reason)).await;
                return;
            }
            None => {
                let _ = tx
                    .send(Item::Detached("the shared reader stopped".into()))
                    .await;
                return;
            }
        }
        for (ev, size) in out {
            let Ok(p) = permit(size).await else {
                return;
            };
            if tx.send(Item::Event(ev, p, size)).await.is_err() {
                return;
            }
        }
    }
}
