//! The running cloud service: it wires the store thread ([`crate::store_thread`]), the MQTT
//! connections to an external broker ([`crate::mqtt_link`]), the sync loop around the sans-IO `CloudEngine`
//! ([`crate::sync_loop`]), the embedded broker (unless an external one is configured), the HTTP
//! API, the webhooks' deliveries ([`crate::webhooks`]) and the retention timer, with an explicit
//! graceful shutdown.
//!
//! This module exists to own start-up order and shutdown; the parts themselves live in their
//! own modules, which do not depend on this one.

use std::net::SocketAddr;
use std::sync::Arc;

use devtables_schema::{Item, Schema};
use devtables_sync::cloud::CloudEngine;
use devtables_sync::hlc::{cloud_node_name, node_id_for, HlcClock};
use devtables_sync::identity::{DeviceId, Owner};
use devtables_sync::wire::Change;
use rumqttc::{AsyncClient, MqttOptions};
use tokio::sync::{mpsc, watch};

use crate::auth::Credentials;
use crate::broker::{Broker, BrokerConfig, DeviceCertListener};
use crate::ca::{DeviceCa, DeviceCertificate};
use crate::cluster::{Heard, Serving, WakeOthers};
use crate::config::{BrokerMode, CloudConfig, DatabaseChoice};
use crate::mqtt_link::{self, Hop, RequestGauge};
use crate::ops::{self, OpError, WriteKind};
use crate::status::{StatusSnapshot, SyncStatus};
use crate::store::{CloudStore, DeviceRecord, StoreError};
use crate::store_thread::wall_ms;
pub use crate::store_thread::{StoreCtx, StoreGone, StoreHandle};
use crate::subscription::{SubscribeTiming, Subscription};
pub use crate::sync_loop::SyncInput;
use crate::sync_loop::{ClientLink, Egress, Ingress, SyncLoop, SyncParts};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
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
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot start a service thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("device certificates: {0}")]
    Ca(#[from] crate::ca::CaError),
}

/// Why a device certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum DeviceCertError {
    #[error("this cloud issues no device certificates: configure device_certificates")]
    NotConfigured,
    #[error("device {0} is not registered: register it first")]
    NotRegistered(DeviceId),
    #[error("device {0} is revoked: rotate its secret to make it usable again, then issue")]
    Revoked(DeviceId),
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gone(#[from] StoreGone),
}

/// A running cloud service.
pub struct Cloud {
    pub api_addr: SocketAddr,
    /// The HTTP API is served over TLS (HTTPS).
    pub api_tls: bool,
    /// The MQTT address devices connect to (the embedded broker's, or the external one's): the
    /// clear-text listener's, or the TLS one's when it is the only one.
    pub mqtt_addr: String,
    /// The embedded broker's TLS listener, when it has one.
    pub mqtt_tls_addr: Option<SocketAddr>,
    /// The embedded broker's listener for devices with client certificates, when it has one.
    pub mqtt_cert_addr: Option<SocketAddr>,
    pub store: StoreHandle,
    pub credentials: Option<Arc<Credentials>>,
    broker_control: ops::BrokerControl,
    sync: mpsc::Sender<SyncInput>,
    status: Arc<SyncStatus>,
    request_queue: usize,
    max_message_bytes: usize,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The webhooks' delivery tasks (awaited at shutdown).
    webhooks: crate::webhooks::Webhooks,
    broker: Option<Broker>,
    /// The device CA and the validity of what it issues, with `device_certificates`.
    device_ca: Option<(Arc<DeviceCa>, std::time::Duration)>,
    /// A scaled-out cloud's lease and wake-up threads.
    cluster: ClusterThreads,
}

/// The threads of a cluster node (none on a single node).
#[derive(Default)]
struct ClusterThreads {
    #[cfg(feature = "postgres")]
    leases: Option<crate::cluster::leases::LeaseThread>,
    #[cfg(feature = "postgres")]
    wakeups: Option<crate::cluster::wakeups::WakeupThreads>,
}

impl ClusterThreads {
    /// Releases the partitions (a graceful stop hands them over at once) and ends the threads.
    fn stop(self) {
        #[cfg(feature = "postgres")]
        {
            if let Some(l) = self.leases {
                l.stop();
            }
            if let Some(w) = self.wakeups {
                w.stop();
            }
        }
    }
}

impl Cloud {
    /// Starts every part of the service on the current tokio runtime.
    pub async fn start(config: CloudConfig, schema: Arc<Schema>) -> Result<Cloud, StartError> {
        config.validate().map_err(StartError::Config)?;
        if let Some(problem) = devtables_sync::wire::schema_tag_problem(schema.tag()) {
            return Err(StartError::Config(problem));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        // The store is opened and read off the async runtime: the PostgreSQL client is
        // synchronous (it runs its own small runtime), like the store thread that owns it after.
        let cluster = matches!(config.database, DatabaseChoice::Postgres { .. })
            && matches!(config.broker, BrokerMode::External { .. });
        let node_name = node_name(&config)?;
        let opening = config.clone();
        let PreparedStore {
            store,
            live_api_keys,
            behind,
            last_version,
            changes_kept,
        } = off_runtime("devtables-store-open", move || {
            prepare_store(&opening, cluster)
        })
        .await??;

        // Shared with the broker, which counts its certificate refusals there.
        let status = Arc::new(SyncStatus::default());
        // The device CA, made in the data folder on first use, and the broker listener that
        // accepts its certificates (with the TLS listener's server certificate).
        let mut device_ca = None;
        let mut device_certs = None;
        if let (Some(certs), Some(tls)) = (&config.device_certificates, &config.broker_tls) {
            let ca = Arc::new(DeviceCa::open_or_create(&config.data_dir)?);
            device_certs = Some(DeviceCertListener {
                listen: certs.listen,
                files: tls.files.clone(),
                client_ca: ca.cert_file(),
            });
            let validity = crate::ca::validity_days(u64::from(certs.validity_days))?;
            device_ca = Some((ca, validity));
        }

        // Credentials for the embedded broker: the devices' only, read from the store (through a
        // short-lived cache) once the store thread runs, below. The service has no login on it.
        // How the service's own clients reach an external broker: TLS when it is configured so.
        let mut client_tls = None;
        // With the embedded broker, device messages come in-process (see `broker`), and
        // publishes go in-process (see `broker_publish`): the service connects no MQTT client.
        let mut device_messages = None;
        let (broker, credentials, mqtt_host, mqtt_port, username, password) = match &config.broker {
            BrokerMode::Embedded { listen } => {
                // Unbounded here, bounded per device by the broker (its connection waits).
                let (messages_tx, messages_rx) = mpsc::unbounded_channel();
                device_messages = Some(messages_rx);
                let creds = Arc::new(Credentials::devices_only(
                    config.credentials_ttl,
                    config.credentials_cache,
                ));
                let broker = Broker::start(
                    BrokerConfig {
                        listen: *listen,
                        plain: config.broker_plain,
                        tls: config.broker_tls.clone(),
                        device_certs: device_certs.clone(),
                        certificate_refusals: status.mqtt_certificates_refused.clone(),
                        topic_prefix: config.topic_prefix.clone(),
                        limits: config.broker_limits,
                        device_messages: Some(messages_tx),
                        drops: status.broker_drops.clone(),
                    },
                    creds.clone(),
                )
                .await?;
                let mut addr = broker.local_addr();
                if let (false, Some(_)) = (config.broker_plain, &config.broker_tls) {
                    // The address the service reports (the TLS listener's) names this host
                    // rather than "any".
                    if addr.ip().is_unspecified() {
                        addr.set_ip(if addr.is_ipv4() {
                            std::net::Ipv4Addr::LOCALHOST.into()
                        } else {
                            std::net::Ipv6Addr::LOCALHOST.into()
                        });
                    }
                }
                // No client of the service's logs in, and the broker knows no service login.
                (
                    Some(broker),
                    Some(creds),
                    addr.ip().to_string(),
                    addr.port(),
                    None,
                    None,
                )
            }
            BrokerMode::External {
                host,
                port,
                username,
                password,
            } => {
                match &config.external_tls {
                    Some(tls) => client_tls = Some(crate::tls::client_config(tls)?),
                    None => tracing::warn!(
                        "MQTT to the external broker {host}:{port} is in clear text (no \
                         external_broker_tls): the service's credentials and every item cross \
                         the network readable"
                    ),
                }
                (
                    None,
                    None,
                    host.clone(),
                    *port,
                    username.clone(),
                    password.clone(),
                )
            }
        };
        let mqtt_tls_addr = broker.as_ref().and_then(Broker::tls_addr);
        let mqtt_cert_addr = broker.as_ref().and_then(Broker::device_cert_addr);

        // Each cloud process mints versions with its own node id, resuming after the highest
        // version stored (the wall clock may have gone back across the restart).
        let node = node_id_for(&cloud_node_name(&node_name));
        let clock = match last_version {
            Some(last) => HlcClock::restore(node, last),
            None => HlcClock::new(node),
        };
        tracing::info!(node = %node_name, "cloud node");
        // The change log's retention once at start (by the one node that leads, in a cluster):
        // its size is known from the first moment.
        if let Some(kept) = changes_kept {
            status
                .change_log_rows
                .store(kept, std::sync::atomic::Ordering::Relaxed);
        }
        let fanout_wake = Arc::new(tokio::sync::Notify::new());
        let ctx = StoreCtx::new(store, clock, schema.clone()).wake_fanout(fanout_wake.clone());
        let committed = status.clone();
        let store = StoreHandle::spawn(
            ctx,
            config.store_group_max,
            Box::new(move |c| committed.observe_commit(&c)),
        )?;
        if let Some(creds) = &credentials {
            creds.attach_store(store.clone());
        }
        let broker_control = ops::BrokerControl {
            credentials: credentials.clone(),
            sessions: broker.as_ref().map(Broker::sessions),
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (sync_tx, sync_rx) = mpsc::channel(1024);
        // The change log's head as the store thread tells it, for the metrics.
        let mut heads = store.changes();
        let head_status = status.clone();
        let mut heads_shutdown = shutdown_rx.clone();
        let head_task = tokio::spawn(async move {
            loop {
                let head = *heads.borrow_and_update();
                head_status
                    .change_log_head
                    .store(head, std::sync::atomic::Ordering::Relaxed);
                tokio::select! {
                    changed = heads.changed() => if changed.is_err() { return },
                    _ = heads_shutdown.wait_for(|stop| *stop) => return,
                }
            }
        });
        // What this node serves: every device on a single node; a cluster node's leases set it
        // (below). Webhooks deliver only on the node that leads.
        let (serving_tx, serving_rx) = watch::channel(Serving::All);
        let webhooks = crate::webhooks::Webhooks::new(
            store.clone(),
            config.changes.clone(),
            status.clone(),
            shutdown_rx.clone(),
            serving_rx.clone(),
        );

        // With an external broker, connections of two kinds (see `mqtt_link`): ingress
        // subscribes to the device topics, egress publishes to devices; `mqtt.ingress_clients`
        // and `mqtt.egress_clients` of them, all of a direction sending their events into one
        // channel, tagged with their index. With the embedded broker, none.
        let client = |hop: Hop, index: usize, count: usize, link_tx| {
            let suffix = hop.client_suffix(index, count);
            let mut options = MqttOptions::new(
                format!("devtables-cloud-{node_name}-{suffix}"),
                mqtt_host.clone(),
                mqtt_port,
            );
            options.set_keep_alive(config.mqtt.keep_alive);
            options.set_clean_session(true);
            if hop == Hop::Egress {
                options.set_inflight(config.mqtt.egress_inflight);
            }
            let user = match (hop, &config.mqtt.egress_username, &config.broker) {
                (Hop::Egress, Some(egress), BrokerMode::External { .. }) => Some(egress),
                _ => username.as_ref(),
            };
            if let Some(user) = user {
                options.set_credentials(user.clone(), password.clone().unwrap_or_default());
            }
            let max_packet = config.sync.wire.max_message_bytes + 4096;
            options.set_max_packet_size(max_packet, max_packet);
            if let Some(tls) = &client_tls {
                options.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(Arc::new(tls.clone())),
                ));
            }
            let (client, mut eventloop) = AsyncClient::new(options, config.mqtt.request_queue);
            // Small protocol messages must not wait for the delayed-ACK timer (about 40 ms).
            let mut network = rumqttc::NetworkOptions::new();
            network.set_tcp_nodelay(true);
            eventloop.set_network_options(network);
            let gauge = Arc::new(RequestGauge::new(config.mqtt.request_queue));
            let (abandon, abandon_rx) = mpsc::channel(1);
            let task = tokio::spawn(mqtt_link::run(
                hop,
                index,
                eventloop,
                link_tx,
                gauge.clone(),
                status.clone(),
                config.mqtt.clone(),
                shutdown_rx.clone(),
                abandon_rx,
            ));
            (
                ClientLink {
                    client,
                    gauge,
                    abandon,
                },
                task,
            )
        };
        let clients = |hop: Hop, count: usize| {
            let (link_tx, link_rx) = mpsc::channel(config.mqtt.event_queue);
            let mut links = Vec::with_capacity(count);
            let mut tasks = Vec::with_capacity(count);
            for index in 0..count {
                let (link, task) = client(hop, index, count, link_tx.clone());
                links.push(link);
                tasks.push(task);
            }
            (links, link_rx, tasks)
        };
        let mut tasks = vec![head_task];
        let egress = match &broker {
            // Publishes go straight into the embedded broker's device sessions.
            Some(broker) => Egress::Embedded {
                publisher: broker.publisher(),
            },
            None => {
                let (links, events, started) = clients(Hop::Egress, config.mqtt.egress_clients);
                tasks.extend(started);
                Egress::Clients { links, events }
            }
        };
        let ingress = match device_messages {
            // The embedded broker hands device messages over in-process.
            Some(messages) => Ingress::Embedded { messages },
            None => {
                let (links, events, started) = clients(Hop::Ingress, config.mqtt.ingress_clients);
                tasks.extend(started);
                Ingress::Clients { links, events }
            }
        };

        // A scaled-out cloud: this node serves the partitions it leases, and tells the others of
        // feeds it advanced for their devices (see `cluster`).
        #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
        let mut wake_others: Option<Box<dyn WakeOthers>> = None;
        #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
        let mut heard: Option<mpsc::Receiver<Heard>> = None;
        #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
        let mut cluster_threads = ClusterThreads::default();
        #[cfg(feature = "postgres")]
        if let (true, DatabaseChoice::Postgres { url, schema }) = (cluster, &config.database) {
            let options = crate::cluster::leases::LeaseOptions {
                url: url.clone(),
                schema: schema.clone(),
                node: node_name.clone(),
                partitions: config.cluster.partitions,
                lease: config.cluster.lease,
                connect_timeout: std::time::Duration::from_secs(10),
                tls: crate::store::postgres_tls(&config)?,
            };
            serving_tx.send_replace(Serving::nothing(config.cluster.partitions));
            let (heard_tx, heard_rx) = mpsc::channel(256);
            let (lease_options, lease_status, wake_status) =
                (options.clone(), status.clone(), status.clone());
            let remote_heads = store.clone();
            let started = off_runtime("devtables-cluster-start", move || {
                let leases = crate::cluster::leases::LeaseThread::start(
                    lease_options,
                    serving_tx,
                    lease_status,
                )
                .map_err(|e| StartError::Config(e.to_string()))?;
                let (wakeups, threads) = crate::cluster::wakeups::start(
                    options,
                    heard_tx,
                    Box::new(move |head| remote_heads.observe_change_head(head)),
                    wake_status,
                )?;
                Ok::<_, StartError>((leases, wakeups, threads))
            })
            .await??;
            let (leases, wakeups, threads) = started;
            tracing::info!(
                node = %node_name,
                partitions = config.cluster.partitions,
                lease_ms = config.cluster.lease.as_millis() as u64,
                "scaled-out cloud: serving the devices of the partitions this node leases"
            );
            // The change log's head as this node commits it, told to the others (a head heard
            // from them is not sent back).
            let mut heads = store.changes();
            let mut heads_stop = shutdown_rx.clone();
            let tell = wakeups.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let head = *heads.borrow_and_update();
                    tell.change_head(head);
                    tokio::select! {
                        changed = heads.changed() => if changed.is_err() { return },
                        _ = heads_stop.wait_for(|stop| *stop) => return,
                    }
                }
            }));
            wake_others = Some(Box::new(wakeups));
            heard = Some(heard_rx);
            cluster_threads = ClusterThreads {
                leases: Some(leases),
                wakeups: Some(threads),
            };
        }
        #[cfg(not(feature = "postgres"))]
        drop(serving_tx);
        let leading = serving_rx.clone();

        let mut sync_config = config.sync.clone();
        sync_config.schema_version = schema.tag().to_string();
        if sync_config.seed == 0 {
            sync_config.seed = wall_ms();
        }
        // Sessions live in memory: after a restart the devices with unacknowledged changes
        // waiting are prompted to say hello, or an idle device would never get them. The sync
        // loop paces these prompts, after subscribing.
        // Several ingress clients share one subscription; a single one subscribes plainly (as
        // on a broker without shared subscriptions).
        let share_group = (matches!(ingress, Ingress::Clients { .. })
            && config.mqtt.ingress_clients > 1)
            .then(|| share_group(&node_name));
        let sync = SyncLoop::new(SyncParts {
            max_drift_ms: sync_config.max_drift_ms,
            engine: CloudEngine::new(sync_config),
            store: store.clone(),
            ingress,
            egress,
            status: status.clone(),
            prefix: config.topic_prefix.clone(),
            inputs: sync_rx,
            shutdown: shutdown_rx.clone(),
            subscription: Subscription::new(SubscribeTiming {
                retry_min: config.mqtt.subscribe_retry_min,
                retry_max: config.mqtt.subscribe_retry_max,
                suback_timeout: config.mqtt.suback_timeout,
                give_up_after: config.mqtt.subscribe_give_up,
            }),
            share_group,
            behind,
            pace: config.startup_prompts.clone(),
            presence_check: config.cluster.presence_check,
            node_name: node_name.clone(),
            probe_interval: config.mqtt.probe_interval,
            max_store_jobs: config.sync_store_jobs,
            serving: serving_rx,
            wake_others,
            heard,
        });
        tasks.push(tokio::spawn(sync.run()));

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
        // The API tells devices where to connect: the listener's real address (port 0 asked
        // for any).
        let mut api_config = config.clone();
        if let (Some(certs), Some(addr)) = (&mut api_config.device_certificates, mqtt_cert_addr) {
            certs.listen = addr;
        }
        let state = crate::api::ApiState {
            store: store.clone(),
            sync: sync_tx.clone(),
            schema,
            broker: broker_control.clone(),
            status: status.clone(),
            mqtt_addr: format!("{mqtt_host}:{mqtt_port}"),
            config: Arc::new(api_config),
            refusals: Arc::new(std::sync::Mutex::new(crate::status::WarnLimiter::new(
                crate::status::WarnLimiter::INTERVAL,
            ))),
            rate: Arc::new(crate::rate_limit::ApiRateLimiter::new(
                config.api_rate,
                config.api_rate_keys,
            )),
            readers: Arc::new(tokio::sync::Semaphore::new(config.changes.max_readers)),
            webhooks: webhooks.clone(),
            shutdown: shutdown_rx.clone(),
        };
        if config.insecure_no_auth {
            tracing::warn!(
                "INSECURE: insecure_no_auth is set, so the HTTP API on {api_addr} takes no API key: \
                 anyone who reaches it can register devices and read and write every account"
            );
        } else if live_api_keys == 0 {
            let store = match &config.database {
                DatabaseChoice::Sqlite => format!("--data {}", config.data_dir.display()),
                DatabaseChoice::Postgres { schema, .. } => {
                    format!("--database URL --database-schema {schema}")
                }
            };
            tracing::warn!(
                "no API key exists, so the HTTP API on {api_addr} refuses every request: create the \
                 first one with `devtables keys create {store} --account ACCOUNT --scope admin`"
            );
        }
        if config.metrics_open && !config.insecure_no_auth {
            tracing::warn!(
                "metrics_open is set, so GET /metrics on {api_addr} is served without an API key: \
                 anyone who reaches it reads the service's counters; keep the API on a private network"
            );
        }
        let app = crate::api::router(state);
        let mut api_shutdown = shutdown_rx.clone();
        let stopped = async move {
            let _ = api_shutdown.wait_for(|stop| *stop).await;
        };
        match &config.api_tls {
            Some(tls) => {
                let listener = crate::tls::TlsListener::new(
                    listener,
                    crate::tls::server_config(tls)?,
                    status.clone(),
                )
                .map_err(|source| StartError::Api {
                    addr: config.api_listen,
                    source,
                })?;
                tracing::info!(%api_addr, "HTTP API listening with TLS");
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await
                    {
                        tracing::error!("HTTP API stopped: {e}");
                    }
                }));
            }
            None => {
                tracing::warn!(
                    "the HTTP API on {api_addr} is plain HTTP (no api_tls): API keys and items \
                     cross the network readable"
                );
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await
                    {
                        tracing::error!("HTTP API stopped: {e}");
                    }
                }));
            }
        }

        // Devices revoked by another process on the store: their reconnects are refused once the
        // credentials cache expires; their live sessions are closed by this sweep, as often.
        if broker_control.sessions.is_some() {
            let (sweep_store, sweep_broker) = (store.clone(), broker_control.clone());
            let every = config
                .credentials_ttl
                .max(std::time::Duration::from_millis(100));
            let mut sweep_shutdown = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = sweep_shutdown.wait_for(|stop| *stop) => return,
                    }
                    match ops::sweep_revoked(&sweep_store, &sweep_broker).await {
                        Ok(_) => {}
                        Err(OpError::Gone(_)) => return,
                        Err(e) => tracing::warn!("cannot sweep revoked devices: {e}"),
                    }
                }
            }));
        }

        match webhooks.resume_all().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(webhooks = n, "webhook deliveries resumed"),
            Err(e) => tracing::error!("cannot read the webhooks to deliver: {e}"),
        }
        // In a cluster a webhook may be created on any node, and only the leading node
        // delivers: the leader reads the list again when it starts to lead and every lease.
        if cluster {
            let (hooks, mut serving) = (webhooks.clone(), leading.clone());
            let mut stop = shutdown_rx.clone();
            let every = config.cluster.lease;
            tasks.push(tokio::spawn(async move {
                loop {
                    if serving.borrow_and_update().leads() {
                        if let Err(e) = hooks.resume_all().await {
                            tracing::warn!("cannot read the webhooks to deliver: {e}");
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        changed = serving.changed() => if changed.is_err() { return },
                        _ = stop.wait_for(|stop| *stop) => return,
                    }
                }
            }));
        }

        tasks.push(tokio::spawn(
            crate::fanout::FanoutTask {
                store: store.clone(),
                sync: sync_tx.clone(),
                wake: fanout_wake,
                status: status.clone(),
                shutdown: shutdown_rx.clone(),
            }
            .run(),
        ));
        tasks.push(tokio::spawn(
            crate::retention::RetentionTask {
                store: store.clone(),
                retention: config.retention,
                changes: config.changes.retention,
                interval: config.purge_interval,
                status: status.clone(),
                leading,
                shutdown: shutdown_rx,
            }
            .run(),
        ));

        Ok(Cloud {
            api_addr,
            api_tls: config.api_tls.is_some(),
            mqtt_addr: format!("{mqtt_host}:{mqtt_port}"),
            mqtt_tls_addr,
            mqtt_cert_addr,
            store,
            credentials,
            broker_control,
            sync: sync_tx,
            status,
            request_queue: config.mqtt.request_queue,
            max_message_bytes: config.sync.wire.max_message_bytes,
            shutdown,
            tasks,
            webhooks,
            broker,
            device_ca,
            cluster: cluster_threads,
        })
    }

    /// Registers a device; returns its secret (shown once, stored hashed).
    pub async fn register_device(&self, id: &DeviceId) -> Result<String, OpError> {
        ops::register_device(&self.store, self.credentials.as_ref(), id).await
    }

    /// Revokes a device (as `DELETE /v1/devices/{account}/{device}` does): its session is closed
    /// at once, its reconnects are refused; with `delete_items` its rows and feed go too.
    pub async fn revoke_device(&self, id: &DeviceId, delete_items: bool) -> Result<(), OpError> {
        ops::revoke_device(&self.store, &self.broker_control, id, delete_items).await
    }

    /// Gives a device a new secret (as `POST /v1/devices/{account}/{device}/secret` does) and
    /// returns it; the old secret stops working and its session is closed.
    pub async fn rotate_device_secret(&self, id: &DeviceId) -> Result<String, OpError> {
        ops::rotate_secret(&self.store, &self.broker_control, id).await
    }

    /// Issues a client certificate for a registered device (as `devtables devices cert` does),
    /// for the device-certificate listener: bound to the device's current secret, so rotating
    /// the secret cuts it off. The answer holds its private key, which is not kept.
    pub async fn issue_device_certificate(
        &self,
        id: &DeviceId,
    ) -> Result<DeviceCertificate, DeviceCertError> {
        let Some((ca, validity)) = &self.device_ca else {
            return Err(DeviceCertError::NotConfigured);
        };
        let who = id.clone();
        let record = self.store.call(move |c| c.store.device(&who)).await??;
        let Some(record) = record else {
            return Err(DeviceCertError::NotRegistered(id.clone()));
        };
        if record.secret_hash == crate::store::REVOKED_SECRET_HASH {
            return Err(DeviceCertError::Revoked(id.clone()));
        }
        Ok(ca.issue(id, &record.secret_hash, *validity)?)
    }

    /// Creates an API key of `account` (as `POST /v1/accounts/{account}/keys` does); the answer
    /// holds the full key, shown only now.
    pub async fn create_api_key(
        &self,
        account: &str,
        scope: crate::store::KeyScope,
    ) -> Result<crate::auth::NewApiKey, OpError> {
        ops::create_api_key(&self.store, account, scope).await
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

    /// The client ids of the embedded broker's sessions (its devices, and any other client
    /// connected to it); `None` with an external broker.
    pub async fn broker_client_ids(&self) -> Option<Vec<String>> {
        match &self.broker_control.sessions {
            Some(sessions) => Some(sessions.client_ids().await),
            None => None,
        }
    }

    /// The sync loop's counters and readiness facts, as `GET /v1/status` shows them.
    pub fn status(&self) -> StatusSnapshot {
        self.status.snapshot(self.request_queue)
    }

    /// Stops the API, the sync loop and the broker, and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let cluster = self.cluster;
        let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
        for task in self.tasks {
            let _ = task.await;
        }
        self.webhooks.join().await;
        if let Some(broker) = self.broker {
            broker.shutdown().await;
        }
    }
}

/// Runs blocking `f` on a thread of its own and waits for it without blocking the runtime: the
/// synchronous PostgreSQL client refuses to run on a runtime's threads, the blocking pool's
/// included.
async fn off_runtime<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StartError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| StartError::Config(format!("the {name} thread panicked")))
}

/// The store, opened and read before the service starts.
struct PreparedStore {
    store: Box<dyn CloudStore>,
    live_api_keys: u64,
    /// The devices with changes waiting for them (prompted once the sync loop runs); none in
    /// a cluster, where each node finds those of the partitions it takes.
    behind: Vec<(DeviceId, u64)>,
    /// The highest version stored: the clock resumes after it.
    last_version: Option<devtables_sync::hlc::Hlc>,
    /// Rows the change log kept after its retention at start (`None` in a cluster: the
    /// leading node's timer applies it).
    changes_kept: Option<u64>,
}

/// Opens the configured store and reads what the start needs. Blocking (see `Cloud::start`).
fn prepare_store(config: &CloudConfig, cluster: bool) -> Result<PreparedStore, StoreError> {
    let mut store = crate::store::open_configured(config)?;
    let live_api_keys = store.live_api_keys()?;
    // The devices to prompt once the sync loop runs: those with changes waiting, and, with an
    // external broker, those that were online when the service stopped. They stayed connected
    // to that broker and, idle, would say hello only at their next write: the hello is where a
    // device that holds data this store lost (restored from a backup) is found and gives it
    // back. (The embedded broker restarts with the service, so its devices reconnect and say
    // hello anyway.)
    let external = matches!(config.broker, BrokerMode::External { .. });
    let mut behind = Vec::new();
    if !cluster {
        for_each_device(store.as_mut(), |id, d| {
            if d.feed_head > d.cursor_acked || (external && d.online) {
                behind.push((id, d.feed_head));
            }
        })?;
        // Nobody is connected to a single node that starts; in a cluster the other nodes'
        // devices are, and each node records its own devices' comings and goings.
        store.reset_online()?;
    }
    let last_version = store.max_version()?;
    let changes_kept = if cluster {
        None
    } else {
        Some(crate::retention::purge_changes_at_start(
            store.as_mut(),
            &config.changes.retention,
        )?)
    };
    Ok(PreparedStore {
        store,
        live_api_keys,
        behind,
        last_version,
        changes_kept,
    })
}

/// This node's name: the configured one, else the one generated at its first start and kept in
/// the data folder (`node-name`), so its versions' node id and its MQTT client ids stay the same
/// across restarts and differ between nodes (a PID does not: it is 1 in every container).
fn node_name(config: &CloudConfig) -> Result<String, StartError> {
    if !config.node_name.is_empty() {
        return Ok(config.node_name.clone());
    }
    let path = config.data_dir.join("node-name");
    match std::fs::read_to_string(&path) {
        Ok(name) if !name.trim().is_empty() => return Ok(name.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(StartError::DataDir { path, source }),
    }
    let name = format!("node-{:016x}", rand::random::<u64>());
    std::fs::write(&path, format!("{name}\n")).map_err(|source| StartError::DataDir {
        path: path.clone(),
        source,
    })?;
    Ok(name)
}

/// The shared-subscription group of this node's ingress connections: one per node, so that in
/// a scaled-out cloud every node still receives every device message (each keeps those of the
/// partitions it serves), while the connections of one node share them out. A topic level may
/// not hold `/`, `+` or `#`; a node name with them has them replaced.
fn share_group(node_name: &str) -> String {
    let level: String = node_name
        .chars()
        .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
        .collect();
    format!("devtables-{level}")
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
