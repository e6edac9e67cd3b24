//! The running cloud service: the store thread, the sync loop around the sans-IO
//! [`CloudEngine`], the embedded broker (unless an external one is configured), the HTTP API and
//! the retention timer, with an explicit graceful shutdown.
//!
//! The store runs on one thread of its own ([`StoreHandle`]): the store is synchronous, and one
//! writer is what the per-device feed sequence needs. The cloud's HLC lives there too, so every
//! versioned write (device pushes and API writes alike) ticks the same clock in store order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devtables_schema::{Item, Schema};
use devtables_sync::cloud::{CloudAction, CloudEngine};
use devtables_sync::hlc::{cloud_node_name, node_id_for, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::topics;
use devtables_sync::wire::{Change, ChangeStatus};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot, watch};

use crate::auth::{self, Credentials};
use crate::broker::{Broker, BrokerConfig};
use crate::config::{BrokerMode, CloudConfig};
use crate::ops::{self, OpError, WriteKind};
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::store::{Advanced, CloudStore, DeviceRecord, StatusUpdate, StoreError};

/// Everything the store thread owns.
pub struct StoreCtx {
    pub store: Box<dyn CloudStore>,
    /// The cloud's hybrid logical clock.
    pub clock: HlcClock,
    pub schema: Arc<Schema>,
}

type Job = Box<dyn FnOnce(&mut StoreCtx) + Send>;

/// The store thread went away (the service is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the cloud store has stopped")]
pub struct StoreGone;

/// Runs closures on the store thread, one at a time, in arrival order.
#[derive(Clone)]
pub struct StoreHandle {
    jobs: mpsc::Sender<Job>,
}

impl StoreHandle {
    /// Most jobs waiting for the store; callers wait (asynchronously) beyond it.
    const QUEUE: usize = 1024;

    pub fn spawn(mut ctx: StoreCtx) -> std::io::Result<StoreHandle> {
        let (jobs, mut rx) = mpsc::channel::<Job>(Self::QUEUE);
        std::thread::Builder::new()
            .name("devtables-store".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job(&mut ctx);
                }
            })?;
        Ok(StoreHandle { jobs })
    }

    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut StoreCtx) -> R + Send + 'static,
    ) -> Result<R, StoreGone> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |ctx| {
            let _ = tx.send(f(ctx));
        });
        self.jobs.send(job).await.map_err(|_| StoreGone)?;
        rx.await.map_err(|_| StoreGone)
    }
}

/// Inputs of the sync loop from the rest of the service.
pub enum SyncInput {
    /// An API write advanced these feeds.
    FeedAdvanced(Advanced),
}

/// Wall-clock milliseconds (for HLC physical time and records).
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create data folder {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the cloud store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot start the embedded MQTT broker: {0}")]
    Broker(#[from] crate::broker::BrokerError),
    #[error("cannot listen for the HTTP API on {addr}: {source}")]
    Api {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a service thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// A running cloud service.
pub struct Cloud {
    pub api_addr: SocketAddr,
    /// The MQTT address devices connect to (the embedded broker's, or the external one's).
    pub mqtt_addr: String,
    pub store: StoreHandle,
    pub credentials: Option<Arc<Credentials>>,
    sync: mpsc::Sender<SyncInput>,
    max_message_bytes: usize,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    broker: Option<Broker>,
}

impl Cloud {
    /// Starts every part of the service on the current tokio runtime.
    pub async fn start(config: CloudConfig, schema: Arc<Schema>) -> Result<Cloud, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let mut store = SqliteStore::open(
            &config.data_dir.join("cloud.db"),
            SqliteOptions {
                synchronous_full: config.sqlite_full_sync,
                ..SqliteOptions::default()
            },
        )?;
        store.reset_online()?;

        // One pass over the registry: credentials for the embedded broker, and the devices with
        // changes waiting for them (prompted once the sync loop runs).
        let mut registered = Vec::new();
        let mut behind = Vec::new();
        for_each_device(&mut store, |id, d| {
            if d.feed_head > d.cursor_acked {
                behind.push((id.clone(), d.feed_head));
            }
            registered.push((id, d.secret_hash.clone()));
        })?;

        // Credentials for the embedded broker: every registered device, and the service.
        let service_secret = auth::generate_secret();
        let (broker, credentials, mqtt_host, mqtt_port, username, password) = match &config.broker {
            BrokerMode::Embedded { listen } => {
                let creds = Arc::new(Credentials::new(&service_secret));
                for (id, hash) in registered {
                    creds.add_device(id, hash);
                }
                let broker = Broker::start(
                    BrokerConfig {
                        listen: *listen,
                        topic_prefix: config.topic_prefix.clone(),
                        ..BrokerConfig::default()
                    },
                    creds.clone(),
                )
                .await?;
                let addr = broker.local_addr();
                (
                    Some(broker),
                    Some(creds),
                    addr.ip().to_string(),
                    addr.port(),
                    Some(auth::SERVICE_USERNAME.to_string()),
                    Some(service_secret),
                )
            }
            BrokerMode::External {
                host,
                port,
                username,
                password,
            } => (
                None,
                None,
                host.clone(),
                *port,
                username.clone(),
                password.clone(),
            ),
        };

        // Each cloud process mints versions with its own node id, resuming after the highest
        // version stored (the wall clock may have gone back across the restart).
        let node_name = if config.node_name.is_empty() {
            format!("{:016x}", wall_ms() ^ (u64::from(std::process::id()) << 40))
        } else {
            config.node_name.clone()
        };
        let node = node_id_for(&cloud_node_name(&node_name));
        let mut store = store;
        let clock = match store.max_version()? {
            Some(last) => HlcClock::restore(node, last),
            None => HlcClock::new(node),
        };
        tracing::info!(node = %node_name, "cloud node");
        let ctx = StoreCtx {
            store: Box::new(store),
            clock,
            schema: schema.clone(),
        };
        let store = StoreHandle::spawn(ctx)?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (sync_tx, sync_rx) = mpsc::channel(1024);
        let mqtt_connected = Arc::new(AtomicBool::new(false));

        let mut options = MqttOptions::new(
            format!("devtables-cloud-{}", std::process::id()),
            mqtt_host.clone(),
            mqtt_port,
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        if let Some(user) = &username {
            options.set_credentials(user.clone(), password.clone().unwrap_or_default());
        }
        let max_packet = config.sync.wire.max_message_bytes + 4096;
        options.set_max_packet_size(max_packet, max_packet);
        let (client, mut eventloop) = AsyncClient::new(options, 4096);
        // Small protocol messages must not wait for the delayed-ACK timer (about 40 ms).
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);

        let mut sync_config = config.sync.clone();
        sync_config.schema_version = schema.version().to_string();
        if sync_config.seed == 0 {
            sync_config.seed = wall_ms();
        }
        let sync = SyncLoop {
            max_drift_ms: sync_config.max_drift_ms,
            engine: CloudEngine::new(sync_config),
            store: store.clone(),
            client,
            eventloop,
            prefix: config.topic_prefix.clone(),
            inputs: sync_rx,
            shutdown: shutdown_rx.clone(),
            started: Instant::now(),
            connected: mqtt_connected.clone(),
        };
        let mut tasks = vec![tokio::spawn(sync.run())];
        // Sessions live in memory: after a restart, prompt every device that has unacknowledged
        // changes waiting, or an idle device would never say hello again and never get them.
        if !behind.is_empty() {
            let _ = sync_tx.send(SyncInput::FeedAdvanced(behind)).await;
        }

        let listener = tokio::net::TcpListener::bind(config.api_listen)
            .await
            .map_err(|source| StartError::Api {
                addr: config.api_listen,
                source,
            })?;
        let api_addr = listener.local_addr().map_err(|source| StartError::Api {
            addr: config.api_listen,
            source,
        })?;
        let state = crate::api::ApiState {
            store: store.clone(),
            sync: sync_tx.clone(),
            schema,
            credentials: credentials.clone(),
            mqtt_connected,
            mqtt_addr: format!("{mqtt_host}:{mqtt_port}"),
            config: Arc::new(config.clone()),
        };
        let app = crate::api::router(state);
        let mut api_shutdown = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = api_shutdown.wait_for(|stop| *stop).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!("HTTP API stopped: {e}");
            }
        }));

        let purge_store = store.clone();
        let retention = config.retention;
        let interval = config.purge_interval;
        let mut purge_shutdown = shutdown_rx;
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = purge_shutdown.wait_for(|stop| *stop) => return,
                }
                let now = wall_ms();
                match purge_store
                    .call(move |c| c.store.purge(now, &retention))
                    .await
                {
                    Ok(Ok(stats)) => tracing::info!(?stats, "retention applied"),
                    Ok(Err(e)) => tracing::error!("retention failed: {e}"),
                    Err(StoreGone) => return,
                }
            }
        }));

        Ok(Cloud {
            api_addr,
            mqtt_addr: format!("{mqtt_host}:{mqtt_port}"),
            store,
            credentials,
            sync: sync_tx,
            max_message_bytes: config.sync.wire.max_message_bytes,
            shutdown,
            tasks,
            broker,
        })
    }

    /// Registers a device; returns its secret (shown once, stored hashed).
    pub async fn register_device(&self, id: &DeviceId) -> Result<String, OpError> {
        ops::register_device(&self.store, self.credentials.as_ref(), id).await
    }

    /// Writes an item through the cloud (as the HTTP API does).
    pub async fn write_item(
        &self,
        owner: Owner,
        model: &str,
        input: Item,
        kind: WriteKind,
    ) -> Result<Change, OpError> {
        let max = self.max_message_bytes;
        ops::write_item(&self.store, &self.sync, max, owner, model, input, kind).await
    }

    /// Stops the API, the sync loop and the broker, and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(broker) = self.broker {
            broker.shutdown().await;
        }
    }
}

/// Calls `f` for every registered device, a page at a time.
fn for_each_device(
    store: &mut dyn CloudStore,
    mut f: impl FnMut(DeviceId, &DeviceRecord),
) -> Result<(), StoreError> {
    const PAGE: usize = 1000;
    let mut after: Option<DeviceId> = None;
    loop {
        let page = store.devices(None, after.as_ref(), PAGE)?;
        for d in &page {
            if let Ok(id) = DeviceId::new(d.account.clone(), d.device.clone()) {
                f(id, d);
            }
        }
        match page.last() {
            Some(d) if page.len() == PAGE => {
                after = DeviceId::new(d.account.clone(), d.device.clone()).ok();
            }
            _ => return Ok(()),
        }
    }
}

/// The sync loop: MQTT in, engine, store, MQTT out.
struct SyncLoop {
    engine: CloudEngine,
    /// How far past the cloud's time a pushed version may be (from the engine's config).
    max_drift_ms: u64,
    store: StoreHandle,
    client: AsyncClient,
    eventloop: EventLoop,
    prefix: String,
    inputs: mpsc::Receiver<SyncInput>,
    shutdown: watch::Receiver<bool>,
    /// Monotonic origin of the engine's clock.
    started: Instant,
    /// Read by the readiness probe.
    connected: Arc<AtomicBool>,
}

impl SyncLoop {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(mut self) {
        loop {
            let deadline = self.engine.poll_timeout().map(|at| {
                tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(self.now()))
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
                        self.connected.store(true, Ordering::SeqCst);
                        let filter = topics::up_filter(&self.prefix);
                        if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
                            tracing::error!("cannot subscribe to device topics: {e}");
                        }
                        tracing::info!("cloud sync connected to the broker");
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = self.now();
                        match topics::parse_up_topic(&self.prefix, &p.topic) {
                            Some(device) => self.engine.handle_message(now, wall_ms(), &device, &p.payload),
                            None => tracing::debug!(topic = %p.topic, "ignored a message on a foreign topic"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if self.connected.swap(false, Ordering::SeqCst) {
                            tracing::warn!("cloud sync lost the broker: {e}");
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = self.shutdown.changed() => {}
                        }
                    }
                },
                input = self.inputs.recv() => {
                    if let Some(SyncInput::FeedAdvanced(advanced)) = input {
                        let now = self.now();
                        for (device, head) in advanced {
                            self.engine.handle_feed_advanced(now, &device, head);
                        }
                    }
                }
                _ = sleep => {
                    let now = self.now();
                    self.engine.handle_timeout(now);
                }
                _ = self.shutdown.changed() => {}
            }
            if *self.shutdown.borrow() {
                let _ = self.client.try_disconnect();
                return;
            }
            if let Err(StoreGone) = self.drain().await {
                return;
            }
        }
    }

    async fn drain(&mut self) -> Result<(), StoreGone> {
        while let Some(action) = self.engine.poll_action() {
            match action {
                CloudAction::ApplyPush {
                    device,
                    batch,
                    changes,
                } => {
                    let from = device.clone();
                    let wall = wall_ms();
                    let max_drift_ms = self.max_drift_ms;
                    let result = self
                        .store
                        .call(move |c| {
                            c.store
                                .apply_push(&c.schema, &mut c.clock, wall, max_drift_ms, &from, &changes)
                        })
                        .await?;
                    let now = self.now();
                    match result {
                        Ok((results, advanced)) => {
                            // The device's status shows the last change the cloud refused.
                            let refused = results.iter().rev().find_map(|r| match &r.status {
                                ChangeStatus::Rejected { reason } => Some(format!(
                                    "{} {:?}/{:?} rejected: {reason}",
                                    r.model, r.key.pk, r.key.sk
                                )),
                                _ => None,
                            });
                            if let Some(message) = refused {
                                let who = device.clone();
                                let update = StatusUpdate {
                                    last_error: Some(Some(message)),
                                    ..StatusUpdate::default()
                                };
                                let stored = self
                                    .store
                                    .call(move |c| c.store.update_status(&who, &update))
                                    .await?;
                                if let Err(e) = stored {
                                    tracing::warn!(%device, "cannot record the last error: {e}");
                                }
                            }
                            self.engine
                                .handle_push_applied(now, &device, batch, results);
                            for (d, head) in advanced {
                                self.engine.handle_feed_advanced(now, &d, head);
                            }
                        }
                        Err(e) => {
                            // Nothing was applied; the device resends the batch.
                            tracing::error!(%device, "cannot apply a push: {e}");
                            self.engine
                                .handle_push_applied(now, &device, batch, Vec::new());
                        }
                    }
                }
                CloudAction::ReadFeed {
                    device,
                    after,
                    limit,
                } => {
                    let who = device.clone();
                    let page = self
                        .store
                        .call(move |c| c.store.read_feed(&who, after, limit))
                        .await?;
                    match page {
                        Ok(page) => {
                            let now = self.now();
                            self.engine.handle_feed_page(now, &device, page);
                        }
                        Err(e) => tracing::error!(%device, "cannot read the feed: {e}"),
                    }
                }
                CloudAction::ReadSnapshot {
                    device,
                    resync,
                    from,
                    limit,
                } => {
                    let who = device.clone();
                    let page = self
                        .store
                        .call(move |c| {
                            c.store
                                .read_snapshot(&c.schema, &who, resync, from.as_ref(), limit)
                        })
                        .await?;
                    match page {
                        Ok(page) => {
                            let now = self.now();
                            self.engine.handle_snapshot_page(now, &device, page);
                        }
                        Err(e) => tracing::error!(%device, "cannot read a snapshot page: {e}"),
                    }
                }
                CloudAction::Transmit { device, bytes } => {
                    let topic = topics::down_topic(&self.prefix, &device);
                    if let Err(e) = self
                        .client
                        .try_publish(topic, QoS::AtLeastOnce, false, bytes)
                    {
                        tracing::debug!(%device, "publish not queued: {e}");
                    }
                }
                CloudAction::DeviceStatus {
                    device,
                    online,
                    schema_version,
                    cursor_acked,
                    pending,
                    last_seen_ms,
                } => {
                    let _ = last_seen_ms; // engine time; records use wall time
                    let update = StatusUpdate {
                        online: Some(online),
                        last_seen_ms: Some(wall_ms()),
                        schema_version: Some(schema_version),
                        pending,
                        ..StatusUpdate::default()
                    };
                    let who = device.clone();
                    let result = self
                        .store
                        .call(move |c| {
                            c.store.update_status(&who, &update)?;
                            if let Some(cursor) = cursor_acked {
                                c.store.ack_cursor(&who, cursor)?;
                            }
                            Ok::<(), StoreError>(())
                        })
                        .await?;
                    if let Err(e) = result {
                        tracing::warn!(%device, "cannot record device status: {e}");
                    }
                }
                CloudAction::Unsendable {
                    device,
                    model,
                    key,
                    reason,
                } => {
                    tracing::warn!(%device, %model, pk = %key.pk, sk = %key.sk, "row skipped in a page: {reason}");
                    let update = StatusUpdate {
                        last_error: Some(Some(format!(
                            "{model} ({}, {}) skipped in a page: {reason}",
                            key.pk, key.sk
                        ))),
                        ..StatusUpdate::default()
                    };
                    let who = device.clone();
                    let result = self
                        .store
                        .call(move |c| c.store.update_status(&who, &update))
                        .await?;
                    if let Err(e) = result {
                        tracing::warn!(%device, "cannot record device status: {e}");
                    }
                }
            }
        }
        Ok(())
    }
}
