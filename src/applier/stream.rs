//! The batcher: events from the handover channel, grouped into batches, each applied and
//! then checkpointed; DDL events applied before the checkpoint passes them.

use super::*;

impl Pair {
    /// Streams changes from `start` until stopped or interrupted.
    pub(super) async fn stream(
        &self,
        start: Checkpoint,
        stop: &CancellationToken,
        backoff: &mut Duration,
        degraded: bool,
    ) -> Result<(), PairError> {
        let token: ResumeToken = mongodb::bson::from_document(start.token.clone())
            .map_err(|e| PairError::Fatal(format!("checkpoint token unreadable: {e}")))?;
        // Only what the replicator uses: never the update description, which can make an
        // update's event twice the document's size.
        let mut project = doc! {"updateDescription": 0};
        if degraded {
            project.insert("fullDocument", 0);
        }
        // A database stream filtered to this collection: its tokens and the shared reader's
        // resume each other (see [`crate::reader`]).
        let db = self.source.database(&self.ns.db);
        let watch = db
            .watch()
            .pipeline([collection_filter(&self.ns.coll), doc! {"$project": project}])
            .show_expanded_events(self.config.replication.indexes)
            .start_after(token)
            .batch_size(
                self.stream_batch
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .max(1),
            )
            .max_await_time(MAX_AWAIT);
        let watch = if degraded {
            watch
        } else {
            watch.full_document(FullDocumentType::UpdateLookup)
        };
        let stream = self
            .src(watch.into_future())
            .await?
            .with_type::<ChangeStreamEvent<RawDocumentBuf>>();
        self.stats.set_state(PairState::CatchingUp, None);
        let (tx, mut rx) = mpsc::channel::<Item>(self.config.replication.batch_max_docs * 2);
        // Read-ahead is bounded in bytes too: the reader takes permits (KiB) for each event
        // before it queues it, and they return when the event is taken into a batch.
        let max_bytes = self.config.replication.batch_max_bytes.as_u64() as usize;
        let budget_kib = (max_bytes / 1024).max(1) as u32;
        let budget = Arc::new(tokio::sync::Semaphore::new(budget_kib as usize));
        // A degraded read (documents re-read by `_id`) stays on its own stream.
        let hub = self.hub.clone().filter(|_| !degraded);
        let reader = tokio::spawn(read_stream(
            stream,
            tx,
            budget,
            budget_kib,
            hub,
            self.ns.coll.clone(),
            self.stats.clone(),
        ));
        let _abort = AbortOnDrop(reader);

        let max_docs = self.config.replication.batch_max_docs;
        let max_wait = self.config.replication.batch_max_wait;
        let silence = self
            .config
            .replication
            .write_timeout
            .max(MAX_AWAIT * 4 + Duration::from_secs(1));
        let mut batch = Batch::new(start);
        let mut last_follower_cp = Instant::now();
        loop {
            if self.stats.take_resync_request() {
                self.flush(&mut batch, false).await?;
                return Err(PairError::Resync("resync requested".into()));
            }
            if self.stats.is_paused() {
                // Apply and acknowledge what was read, then hold.
                self.flush(&mut batch, false).await?;
                return Err(PairError::Paused);
            }
            let item = if batch.events == 0 {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(()),
                    item = rx.recv() => item,
                    // The stream yields at least an idle token every MAX_AWAIT: silence this
                    // long means the source (or the way to it) hangs.
                    _ = tokio::time::sleep(silence) => {
                        return Err(PairError::Transient(format!(
                            "the source's change stream gave nothing for {}; reopening it",
                            humantime::format_duration(silence)
                        )));
                    }
                }
            } else {
                let deadline = batch.opened + max_wait;
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        // Finish and acknowledge the batch in flight, then stop.
                        return self.flush(&mut batch, false).await;
                    }
                    item = rx.recv() => item,
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        self.flush(&mut batch, false).await?;
                        *backoff = BACKOFF_START;
                        continue;
                    }
                }
            };
            self.stats.set_pending(rx.len() as u64 + batch.events);
            let Some(item) = item else {
                self.flush(&mut batch, false).await?;
                return Err(PairError::Transient("change stream ended".into()));
            };
            match item {
                Item::Event(ev, permit, bytes) => {
                    drop(permit);
                    batch.bytes += bytes;
                    let invalidate = ev.operation_type == OperationType::Invalidate;
                    if let Err(e) = self.add_event(&mut batch, ev, degraded).await {
                        // Apply what came before the event, then stop or resync.
                        self.flush(&mut batch, false).await?;
                        return Err(e);
                    }
                    if invalidate {
                        self.flush(&mut batch, false).await?;
                        return Err(PairError::Transient(
                            "change stream invalidated (collection dropped or renamed on the source); reopening after it".into(),
                        ));
                    }
                    if batch.events >= max_docs as u64 || batch.bytes >= max_bytes {
                        self.flush(&mut batch, false).await?;
                        *backoff = BACKOFF_START;
                        if degraded {
                            return Err(PairError::Reopen);
                        }
                    }
                }
                Item::Idle(token) => {
                    batch.token = token_doc(&token)?;
                    batch.cluster_time = token_cluster_time(&batch.token).or(batch.cluster_time);
                    if batch.events > 0 {
                        self.flush(&mut batch, true).await?;
                    } else if last_follower_cp.elapsed() >= IDLE_FOLLOWER_CHECKPOINT {
                        self.flush(&mut batch, true).await?;
                        last_follower_cp = Instant::now();
                        if self.stats.quarantined() > 0 {
                            // `check --repair` may have emptied it meanwhile.
                            self.stats
                                .set_quarantined(self.follower.quarantine_count(&self.ns).await?);
                        }
                    } else {
                        // Idle: the token file keeps every post-batch token, so a quiet
                        // collection's checkpoint never falls behind the oplog.
                        self.record(batch.checkpoint(), true);
                    }
                    *backoff = BACKOFF_START;
                    if self.stats.state().0 != PairState::Streaming {
                        self.stats.set_state(PairState::Streaming, None);
                        tracing::info!(follower = %self.name(), collection = %self.label, "caught up; streaming");
                    }
                }
                Item::Error(e) => {
                    self.flush(&mut batch, false).await?;
                    return Err(source_err(e));
                }
                Item::Detached(reason) => {
                    self.flush(&mut batch, false).await?;
                    tracing::debug!(follower = %self.name(), collection = %self.label, reason = %reason, "reading this collection's own stream again");
                    return Err(PairError::Reopen);
                }
            }
        }
    }

    /// Adds one event to the batch. On error the batch is left as it was before the event,
    /// so flushing it never checkpoints past the event that failed.
    pub(super) async fn add_event(
        &self,
        batch: &mut Batch,
        ev: Arc<ChangeStreamEvent<RawDocumentBuf>>,
        degraded: bool,
    ) -> Result<(), PairError> {
        let token = token_doc(&ev.id)?;
        let cluster_time = ev
            .cluster_time
            .or_else(|| token_cluster_time(&token))
            .or(batch.cluster_time);
        match ev.operation_type {
            OperationType::Insert | OperationType::Update | OperationType::Replace => {
                let full = match ev.full_document.as_ref() {
                    Some(raw) => Some(decode(raw)?),
                    // Read without documents: the current version, by `_id` (what an
                    // update lookup returns too).
                    None if degraded => match ev.document_key.as_ref().and_then(|k| k.get("_id")) {
                        Some(id) => {
                            let doc = self
                                .src(
                                    self.coll()
                                        .find_one(crate::change::eq("_id", id))
                                        .into_future(),
                                )
                                .await?;
                            if let Some(d) = &doc {
                                batch.bytes +=
                                    mongodb::bson::to_vec(d).map(|v| v.len()).unwrap_or(0);
                            }
                            doc
                        }
                        None => None,
                    },
                    None => None,
                };
                match full {
                    Some(doc) => {
                        let id = doc.get("_id").cloned();
                        match (self.push_upsert(doc, &mut batch.ops), id) {
                            (Err(PairError::Fatal(msg)), Some(id)) => {
                                // An insert event carries the document as it was inserted;
                                // it may have been fixed on the source since. Go on with the
                                // source's current version if that one is usable.
                                match self
                                    .src(
                                        self.coll()
                                            .find_one(crate::change::eq("_id", &id))
                                            .into_future(),
                                    )
                                    .await?
                                {
                                    Some(current) => self
                                        .push_upsert(current, &mut batch.ops)
                                        .map_err(|_| PairError::Fatal(msg))?,
                                    // Deleted since: its delete follows in the stream.
                                    None => self.stats.skipped("gone"),
                                }
                            }
                            (res, _) => res?,
                        }
                    }
                    None => self.stats.skipped("gone"),
                }
            }
            OperationType::Delete if !self.follower.applies_deletes() => {
                // An archive follower keeps what the source deletes.
                self.stats.skipped("archived");
            }
            OperationType::Delete => match ev.document_key.as_ref().and_then(|k| k.get("_id")) {
                Some(id) => batch.ops.push(Op::Delete { id: id.clone() }),
                None => {
                    tracing::warn!(follower = %self.name(), collection = %self.label, "delete event without documentKey._id; skipped");
                    self.stats.skipped("no_document_key");
                }
            },
            OperationType::Drop | OperationType::Rename | OperationType::DropDatabase => {
                // The collection was dropped, renamed away, or replaced by a rename into its
                // name ($out, mapReduce): the follower must end up holding what the source
                // holds now, which is what a copy does. The batch before this event is
                // flushed first; the event itself is not checkpointed, so a crash before
                // the resync mark is written sees it again.
                let what = match ev.operation_type {
                    OperationType::Drop => "dropped",
                    OperationType::DropDatabase => "dropped with its database",
                    _ => match ev.to.as_ref() {
                        Some(to)
                            if to.db == self.ns.db
                                && to.coll.as_deref() == Some(self.ns.coll.as_str()) =>
                        {
                            "replaced by a rename into its name"
                        }
                        _ => "renamed away",
                    },
                };
                tracing::warn!(follower = %self.name(), collection = %self.label, op = ?ev.operation_type, "the source collection was {what}; copying it again so the follower holds what the source holds");
                return Err(PairError::Resync(format!("source collection {what}")));
            }
            OperationType::Other(ref op)
                if is_collection_ddl(op) && self.config.replication.indexes =>
            {
                // What came before is applied, then the source's indexes and options are
                // brought over, before the checkpoint can pass this event.
                self.flush(batch, false).await?;
                self.sync_meta().await?;
            }
            _ => {}
        }
        if batch.events == 0 {
            batch.opened = Instant::now();
        }
        batch.events += 1;
        batch.token = token;
        batch.cluster_time = cluster_time;
        Ok(())
    }

    /// Applies the batch (coalesced) and moves the checkpoint.
    pub(super) async fn flush(&self, batch: &mut Batch, caught_up: bool) -> Result<(), PairError> {
        let ops = std::mem::take(&mut batch.ops);
        let events = std::mem::take(&mut batch.events);
        batch.bytes = 0;
        let cp = batch.checkpoint();
        self.commit(ops, cp, events, caught_up).await?;
        if caught_up {
            self.stats.set_pending(0);
        }
        Ok(())
    }
}

/// Events read but not yet acknowledged, and the position they reach.
pub(super) struct Batch {
    ops: Vec<Op>,
    events: u64,
    /// Bytes of the documents in `ops`.
    bytes: usize,
    opened: Instant,
    token: Document,
    cluster_time: Option<Timestamp>,
}

impl Batch {
    fn new(start: Checkpoint) -> Batch {
        Batch {
            ops: Vec::new(),
            events: 0,
            bytes: 0,
            opened: Instant::now(),
            token: start.token,
            cluster_time: start.cluster_time,
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new(self.token.clone(), self.cluster_time)
    }
}

pub(super) enum Item {
    /// An event, with the read-ahead budget it holds until it is taken into a batch, and
    /// its size (see [`event_bytes`]).
    Event(
        Arc<ChangeStreamEvent<RawDocumentBuf>>,
        tokio::sync::OwnedSemaphorePermit,
        usize,
    ),
    /// An empty batch: the stream's post-batch token, past everything read so far.
    Idle(ResumeToken),
    Error(mongodb::error::Error),
    /// The shared reader let this pipeline go (see [`crate::reader`]): everything before
    /// was delivered; reopen the pipeline's own stream from its checkpoint.
    Detached(String),
}

/// Change events that alter a collection's indexes or options (expanded events).
pub(super) fn is_collection_ddl(op: &str) -> bool {
    matches!(op, "create" | "createIndexes" | "dropIndexes" | "modify")
}
