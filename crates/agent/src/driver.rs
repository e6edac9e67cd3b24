//! The agent's event loop: the thin driver around [`DeviceEngine`].
//!
//! One task owns the engine and feeds it a closed set of inputs (MQTT events, committed local
//! changes, commands to run, timer expiry, shutdown); after each input it drains the engine's
//! outputs in the documented order: storage actions, transmits, events, then the next timeout.
//! It makes no protocol decision of its own.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use devtables_db::{Db, Origin};
use devtables_schema::{Item, ItemKey, Schema};
use devtables_sync::apply::device_apply;
use devtables_sync::device::{DeviceAction, DeviceEngine, DeviceEvent};
use devtables_sync::hlc::HlcClock;
use devtables_sync::identity::DeviceId;
use devtables_sync::topics;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::sync::{mpsc, watch};

use crate::state::{self, AgentTxn};
use crate::{AgentStatus, CommandHandler, Handlers};

/// Inputs from outside the event loop.
pub(crate) enum Input {
    /// A local write of a synced model committed; its outbox entry is ready.
    LocalChange(ItemKey),
    /// A command item arrived from the cloud with status `pending`.
    Command(String, Item),
}

pub(crate) struct Driver {
    pub(crate) id: DeviceId,
    pub(crate) db: Db,
    pub(crate) schema: Arc<Schema>,
    pub(crate) engine: DeviceEngine,
    pub(crate) clock: Arc<Mutex<HlcClock>>,
    /// Cloud time minus this device's clock (ms), shared with the outbox recorder.
    pub(crate) cloud_offset_ms: Arc<AtomicI64>,
    pub(crate) client: AsyncClient,
    pub(crate) eventloop: EventLoop,
    pub(crate) prefix: String,
    pub(crate) inputs: mpsc::UnboundedReceiver<Input>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) status: watch::Sender<AgentStatus>,
    pub(crate) handlers: Handlers,
    pub(crate) command_model: String,
    pub(crate) reconnect_delay: Duration,
    /// Monotonic origin of the engine's clock (ms since the agent started).
    pub(crate) started: Instant,
    /// The encoded `Bye` (also the MQTT last will), sent before a clean disconnect.
    pub(crate) bye: Vec<u8>,
}

impl Driver {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The time versions are stamped with: this device's clock corrected by the cloud's.
    fn stamp_ms(&self) -> u64 {
        devtables_db::system_now_ms()
            .saturating_add(self.cloud_offset_ms.load(Ordering::Relaxed))
            .max(0) as u64
    }

    pub(crate) async fn run(mut self) {
        let mut connected = false;
        loop {
            let deadline = self.engine.poll_timeout().map(|at| {
                let wait = at.saturating_sub(self.now());
                tokio::time::Instant::now() + Duration::from_millis(wait)
            });
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = self.eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        self.subscribe();
                        let now = self.now();
                        self.engine.handle_connected(now);
                        self.set_status(|s| s.connected = true);
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let now = self.now();
                        self.engine.handle_message(now, &publish.payload);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if connected {
                            tracing::warn!(device = %self.id, "MQTT connection lost: {e}");
                            connected = false;
                            let now = self.now();
                            self.engine.handle_disconnected(now);
                            self.set_status(|s| {
                                s.connected = false;
                                s.ready = false;
                                s.last_error = Some(e.to_string());
                            });
                        } else {
                            tracing::debug!(device = %self.id, "MQTT connect failed: {e}");
                            self.set_status(|s| s.last_error = Some(e.to_string()));
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(self.reconnect_delay) => {}
                            _ = self.shutdown.changed() => {}
                        }
                    }
                },
                input = self.inputs.recv() => match input {
                    Some(input) => self.handle_input(input),
                    None => break,
                },
                _ = sleep => {
                    let now = self.now();
                    self.engine.handle_timeout(now);
                }
                _ = self.shutdown.changed() => {}
            }
            if *self.shutdown.borrow() {
                break;
            }
            self.drain_outputs().await;
        }
        if connected {
            // A clean disconnect suppresses the last will: say goodbye first, and give the
            // event loop a moment to send both.
            let topic = topics::up_topic(&self.prefix, &self.id);
            let _ = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, self.bye.clone());
            let _ = self.client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match self.eventloop.poll().await {
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
        if let Err(e) = self.db.flush() {
            tracing::error!(device = %self.id, "final flush failed: {e}");
        }
    }

    fn subscribe(&self) {
        let own = topics::down_topic(&self.prefix, &self.id);
        let broadcast = topics::broadcast_topic(&self.prefix, &self.id.account);
        for topic in [own, broadcast] {
            if let Err(e) = self.client.try_subscribe(topic, QoS::AtLeastOnce) {
                tracing::error!(device = %self.id, "cannot subscribe: {e}");
            }
        }
    }

    fn handle_input(&mut self, first: Input) {
        // Drain what is queued too: many local commits become one engine update each, read
        // from the committed outbox (the source of truth), deduplicated by key.
        let mut keys = BTreeSet::new();
        let mut commands = Vec::new();
        let mut next = Some(first);
        while let Some(input) = next {
            match input {
                Input::LocalChange(key) => {
                    keys.insert(key);
                }
                Input::Command(name, item) => commands.push((name, item)),
            }
            next = self.inputs.try_recv().ok();
        }
        let now = self.now();
        for key in keys {
            match state::outbox_entry(&self.db, &key) {
                Ok(Some(change)) => self.engine.handle_local_change(now, change),
                Ok(None) => {} // already acknowledged or superseded
                Err(e) => tracing::error!(device = %self.id, "cannot read the outbox: {e}"),
            }
        }
        for (name, item) in commands {
            self.run_command(&name, item);
        }
        // A full outbox may have dropped lossy changes in those commits: keep the count visible.
        if let Ok(dropped) = state::dropped(&self.db) {
            self.set_status(|s| s.dropped = dropped);
        }
    }

    /// Runs the application's handler and writes the outcome back (it replicates up).
    fn run_command(&self, name: &str, item: Item) {
        let handler: Option<CommandHandler> = self
            .handlers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .commands
            .get(name)
            .cloned();
        let (status, result) = match handler {
            Some(h) => match h(&item) {
                Ok(value) => ("done", value),
                Err(message) => ("failed", serde_json::json!({ "error": message })),
            },
            None => (
                "failed",
                serde_json::json!({ "error": format!("no handler for command {name:?} on this device") }),
            ),
        };
        let result = match result {
            serde_json::Value::Object(_) => result,
            other => serde_json::json!({ "value": other }),
        };
        let mut patch = Item::new();
        for field in ["pk", "sk"] {
            if let Some(v) = item.get(field) {
                patch.insert(field.into(), v.clone());
            }
        }
        patch.insert("status".into(), status.into());
        patch.insert("result".into(), result);
        if let Err(e) = self.db.update(&self.command_model, &patch) {
            tracing::error!(device = %self.id, command = name, "cannot record the command result: {e}");
        }
    }

    async fn drain_outputs(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(action) = self.engine.poll_action() {
                progressed = true;
                self.perform(action).await;
            }
            while let Some(bytes) = self.engine.poll_transmit() {
                progressed = true;
                let topic = topics::up_topic(&self.prefix, &self.id);
                let len = bytes.len() as u64;
                match self
                    .client
                    .try_publish(topic, QoS::AtLeastOnce, false, bytes)
                {
                    Ok(()) => self.set_status(|s| {
                        s.messages_up += 1;
                        s.bytes_up += len;
                    }),
                    // The engine retransmits unacknowledged batches on its own timer.
                    Err(e) => tracing::debug!(device = %self.id, "publish not queued: {e}"),
                }
            }
            while let Some(event) = self.engine.poll_event() {
                progressed = true;
                self.on_event(event);
            }
            if !progressed {
                break;
            }
        }
        let (cursor, pending, in_flight, ready) = (
            self.engine.cursor(),
            self.engine.pending(),
            self.engine.in_flight(),
            self.engine.is_ready(),
        );
        self.set_status(|s| {
            s.cursor = cursor;
            s.pending = pending;
            s.in_flight = in_flight;
            s.ready = ready;
        });
    }

    async fn perform(&mut self, action: DeviceAction) {
        let db = self.db.clone();
        let schema = self.schema.clone();
        let clock = self.clock.clone();
        match action {
            DeviceAction::Apply(page) => {
                let result = tokio::task::spawn_blocking(move || {
                    db.write(Origin::Remote, |txn| {
                        let mut clock = clock.lock().unwrap_or_else(PoisonError::into_inner);
                        let now = devtables_db::system_now_ms().max(0) as u64;
                        let mut t = AgentTxn {
                            txn,
                            schema: &schema,
                        };
                        device_apply(&mut t, &schema, &mut clock, now, &page).map_err(|e| match e {
                            devtables_sync::apply::ApplyError::Store(e) => e,
                        })
                    })
                })
                .await;
                let now = self.now();
                match result {
                    Ok(Ok(outcome)) => self.engine.handle_applied(now, outcome),
                    Ok(Err(e)) => {
                        tracing::error!(device = %self.id, "cannot apply changes from the cloud: {e}");
                        self.set_status(|s| s.last_error = Some(e.to_string()));
                        self.engine.handle_apply_failed(now);
                    }
                    Err(e) => {
                        tracing::error!(device = %self.id, "apply task failed: {e}");
                        self.engine.handle_apply_failed(now);
                    }
                }
            }
            DeviceAction::Restamp {
                model,
                key,
                version,
                cloud_ms,
            } => {
                let stamp = self.stamp_ms();
                let k = key.clone();
                let result = tokio::task::spawn_blocking(move || {
                    db.write(Origin::Remote, |txn| {
                        state::restamp(txn, &clock, stamp, &k, version, cloud_ms)
                    })
                })
                .await;
                let now = self.now();
                match result {
                    Ok(Ok(Some(change))) => self.engine.handle_restamped(now, version, change),
                    Ok(Ok(None)) => {} // a newer local write replaced the entry
                    Ok(Err(e)) => {
                        tracing::error!(device = %self.id, %model, "cannot re-stamp a change: {e}");
                        self.set_status(|s| s.last_error = Some(e.to_string()));
                        self.engine.handle_restamp_failed(now, &model, &key);
                    }
                    Err(e) => {
                        tracing::error!(device = %self.id, "re-stamp task failed: {e}");
                        self.engine.handle_restamp_failed(now, &model, &key);
                    }
                }
            }
            DeviceAction::OutboxRemove(acked) => {
                let result = tokio::task::spawn_blocking(move || {
                    db.write(Origin::Remote, |txn| state::outbox_remove(txn, &acked))
                })
                .await;
                match result {
                    Ok(Ok(_)) => {}
                    // The entries stay; they are resent and acknowledged again (idempotent).
                    Ok(Err(e)) => tracing::error!(device = %self.id, "cannot trim the outbox: {e}"),
                    Err(e) => tracing::error!(device = %self.id, "outbox task failed: {e}"),
                }
            }
        }
    }

    fn on_event(&mut self, event: DeviceEvent) {
        match event {
            DeviceEvent::Connected => tracing::info!(device = %self.id, "connected"),
            DeviceEvent::Ready => tracing::info!(device = %self.id, "sync ready"),
            DeviceEvent::Rejected { change, reason } => {
                tracing::warn!(device = %self.id, model = %change.model, key = ?change.key, "change rejected by the cloud: {reason}");
                let message = format!("{} {:?}: {reason}", change.model, change.key);
                self.set_status(|s| {
                    s.rejected += 1;
                    s.last_error = Some(message.clone());
                });
                let callbacks = self
                    .handlers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .rejected
                    .clone();
                for cb in callbacks {
                    cb(&change.model, &change.key, &reason.to_string());
                }
                // The engine already asked for the durable entry's removal (OutboxRemove):
                // a rejected change is never retried.
            }
            DeviceEvent::CloudError { code, message } => {
                tracing::error!(device = %self.id, ?code, "cloud error: {message}");
                self.set_status(|s| s.last_error = Some(message.clone()));
            }
            DeviceEvent::Malformed(e) => {
                tracing::warn!(device = %self.id, "malformed message from the cloud: {e}")
            }
            DeviceEvent::ApplySkipped(skipped) => {
                tracing::warn!(device = %self.id, model = %skipped.model, "item from the cloud skipped: {}", skipped.reason)
            }
            DeviceEvent::ApplyFailed => {}
            DeviceEvent::Resynced { cursor, swept } => {
                tracing::info!(device = %self.id, cursor, swept, "full resync finished");
                self.set_status(|s| s.cursor = cursor);
            }
            DeviceEvent::CloudTime { cloud_ms, .. } => {
                let offset = cloud_ms as i64 - devtables_db::system_now_ms();
                self.cloud_offset_ms.store(offset, Ordering::Relaxed);
                if offset.abs() > 60_000 {
                    tracing::warn!(device = %self.id, offset_ms = offset, "the device clock is off the cloud's; versions are stamped on the cloud's time");
                }
                self.set_status(|s| s.clock_offset_ms = offset);
            }
            DeviceEvent::Superseded { change, winner } => {
                tracing::warn!(device = %self.id, model = %change.model, key = ?change.key, version = %change.version, %winner, "local change superseded by a newer version in the cloud");
                let message = format!(
                    "{} {:?}: superseded by {winner} in the cloud",
                    change.model, change.key
                );
                self.set_status(|s| {
                    s.superseded += 1;
                    s.last_error = Some(message);
                });
            }
            DeviceEvent::Restamped {
                model,
                key,
                from,
                to,
            } => {
                tracing::info!(device = %self.id, %model, ?key, %from, %to, "change re-stamped on the cloud's time");
                self.set_status(|s| s.restamped += 1);
            }
            DeviceEvent::Swept { model, key } => {
                tracing::warn!(device = %self.id, %model, ?key, "resync deleted a local item the cloud does not hold");
                let message =
                    format!("{model} {key:?}: deleted by a resync (the cloud does not hold it)");
                self.set_status(|s| {
                    s.swept += 1;
                    s.last_error = Some(message);
                });
            }
            DeviceEvent::OutboxHigh { pending } => {
                tracing::warn!(device = %self.id, pending, "the outbox is filling up")
            }
        }
        if let Ok(dropped) = state::dropped(&self.db) {
            self.set_status(|s| s.dropped = dropped);
        }
    }

    fn set_status(&self, f: impl FnOnce(&mut AgentStatus)) {
        self.status.send_modify(f);
    }
}
