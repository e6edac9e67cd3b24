//! The cloud's embedded MQTT broker, with the device access control the protocol depends on.
//!
//! # Why embedded
//!
//! Devices and the cloud talk over MQTT, and the cloud learns who sent an `up` message from its
//! topic alone (see [`devtables_sync::topics`]): the payload is never trusted for identity. That is
//! only sound if the broker lets each device publish to its own topic and to nothing else, and
//! lets it read only its own feed. Running the broker inside the cloud process puts that rule in
//! the same code, the same configuration and the same release as the service that relies on it:
//! there is no second product to deploy, configure and keep in step, and the device credentials
//! are checked against the cloud's own store through the [`Authenticator`].
//!
//! # Why rmqtt
//!
//! `rumqttd` 0.20 offers an authentication callback (username/password at CONNECT) but no topic
//! authorization: once connected, any client may publish and subscribe anywhere, which would let
//! a device speak for another or read another's feed. `rmqtt` exposes hooks for authentication
//! (`ClientAuthenticate`), publish authorization (`MessagePublishCheckAcl`) and subscribe
//! authorization (`ClientSubscribeCheckAcl`), so the whole security model below is enforced by
//! the broker on every packet. It is used with default features off: TCP only, no plugins, no
//! cluster, no retained-message store, no shared subscriptions.
//!
//! # How the ACL maps to the protocol's topics
//!
//! With `{prefix}` the configured topic prefix (default [`topics::DEFAULT_PREFIX`]):
//!
//! | Principal | CONNECT | PUBLISH | SUBSCRIBE |
//! |---|---|---|---|
//! | refused (`authenticate` → [`Refusal::BadCredentials`]) | CONNACK "bad user name or password" | – | – |
//! | refused (`authenticate` → [`Refusal::NotAuthorized`], e.g. a revoked device) | CONNACK "not authorized" | – | – |
//! | [`Principal::Device`] `{account}/{device}` | client id must be exactly `{account}/{device}`; a will, if any, must be non-retained on its own `up` topic; otherwise CONNACK "not authorized" | only `{prefix}/{account}/{device}/up` ([`topics::up_topic`]), never retained | only `{prefix}/{account}/{device}/down` ([`topics::down_topic`]) and `{prefix}/{account}/_all/down` ([`topics::broadcast_topic`]), exact filters, no wildcards |
//! | [`Principal::Service`] | any client id | anywhere | anywhere (with an external broker the cloud subscribes to `{prefix}/+/+/up`, [`topics::up_filter`]; with this one it needs not: see below) |
//!
//! The cloud service itself opens no connection to this broker: device messages reach it from a
//! hook and its publishes go in-process ([`Broker::publisher`], [`crate::broker_publish`]). The
//! service principal remains for clients that embed the broker otherwise (and the tests).
//!
//! The service is an rmqtt *superuser*: rmqtt skips the ACL hooks for superusers, which is
//! exactly "may do anything". Every other session is a device, and the ACL hooks derive its
//! [`DeviceId`] from the session's client id, which the authentication hook has pinned to the
//! authenticated device (`client id == id.node_name()`): no per-session map is needed, so there
//! is nothing to clean up or race on when a session is taken over or ends. A non-superuser
//! session whose client id does not name a valid device is denied everything (fail closed).
//! Anonymous connections are disabled, so every CONNECT goes through the [`Authenticator`].
//!
//! # Devices with client certificates (mutual TLS)
//!
//! With [`BrokerConfig::device_certs`] the broker has a third listener that requires a client
//! certificate chaining to the device CA ([`crate::ca`]): rustls refuses the handshake of a
//! client without one, with an expired one or with one of another CA, before any MQTT. On that
//! listener the certificate is the credential: username and password are ignored, the
//! [`Authenticator::authenticate_certificate`] maps the certificate's subject to the device
//! (whose registry entry still decides: a revoked device is refused), and the same rules as
//! above follow (client id `{account}/{device}` of the certificate's device, its own will and
//! topics). The service may not connect there. Every CONNECT that listener refuses is counted
//! ([`BrokerConfig::certificate_refusals`]); its refused handshakes are not (rmqtt handles them
//! inside its listener and reports them only to its own log). The other listeners never ask
//! for a certificate, so a client that has one behaves there as without it.
//!
//! Pinning the client id also prevents session takeover: MQTT lets a new connection with the same
//! client id kick the old one, and rmqtt authenticates before it kicks, so only the device itself
//! can replace its own session.
//!
//! # Device messages in-process, and drops counted
//!
//! With [`BrokerConfig::device_messages`] (the service sets it), what a device publishes on its
//! own `up` topic, its will included, is handed to the service's sync loop over a channel from
//! rmqtt's `MessagePublish` hook, in the device connection's own task. The cloud then has no
//! MQTT session of its own to read device messages through, so there is no broker queue in
//! front of it to overflow (a session's queue drops its oldest message when full). What waits
//! there is bounded per device ([`BrokerLimits::max_device_messages_waiting`]): a device with
//! that many messages not yet taken has its hook wait, so rmqtt stops reading its socket
//! (backpressure reaches that device through TCP), while every other connection goes on
//! (answering PINGREQs: a connection frozen past its keep-alive is dropped, which a global
//! bound did to whole fleets while the sync loop waited for its store). The hook applies the
//! same rule as the publish ACL (which runs after it): anything else is not handed over. Every
//! message rmqtt drops on its way to a client (queue or in-flight window full, expired, client
//! gone) is counted in [`BrokerConfig::drops`] and warned about (rate-limited) from the
//! `MessageDropped` hook.
//! The other direction is in-process too: [`Broker::publisher`] queues the service's publishes
//! straight into the devices' sessions ([`crate::broker_publish`]), so a service built on this
//! broker has no MQTT session of its own at all.
//!
//! # What a refusal looks like on the wire
//!
//! - A denied PUBLISH is dropped and the connection stays open. QoS 1 gets a PUBACK (QoS 2 a
//!   PUBREC): for MQTT 3.1.1 it is an ordinary PUBACK (3.1.1 has no way to say "refused"); for
//!   MQTT 5 it carries reason code 0x87 *Not authorized*. QoS 0 is dropped silently. Nothing is
//!   delivered to any subscriber. The protocol above treats it as a lost message (a correct device
//!   never publishes elsewhere; the denial is logged as a warning).
//! - A denied SUBSCRIBE filter gets the failure code in the SUBACK (0x80 for 3.1.1, 0x87 *Not
//!   authorized* for 5) and no subscription is made; other filters of the same SUBSCRIBE are
//!   judged on their own.
//! - Will messages are not checked by rmqtt's publish ACL, so a device's will is checked at
//!   CONNECT instead.
//!
//! # Resource bounds
//!
//! Packets are limited to [`BrokerLimits::max_packet_bytes`], sessions (online and persistent
//! offline ones) to [`BrokerLimits::max_connections`], and each session holds at most
//! [`BrokerLimits::max_inflight`] unacknowledged plus [`BrokerLimits::max_queued_messages`]
//! queued outgoing messages; beyond that rmqtt drops messages for that session (the protocol's
//! retransmission recovers them), so a client that stops reading pins at most
//! `max_packet_bytes × (max_inflight + max_queued_messages)` bytes. rmqtt's CPU-load based
//! "busy" refusal is disabled: refusing devices during a load spike would only cause reconnect
//! storms.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use devtables_sync::identity::DeviceId;
use devtables_sync::topics;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::context::ServerContext;
use rmqtt::hook::{Handler, HookResult, Parameter, Register, ReturnType, Type};
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use rmqtt::session::Session;
use rmqtt::types::{
    AuthResult, ConnectInfo, ListenerId, Publish, PublishAclResult, Subscribe, SubscribeAclResult,
};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::broker_publish::EmbeddedPublisher;
use crate::broker_slots::DeviceSlots;
use crate::warn_limit::WarnLimiter;

/// Who a connected client is, decided at CONNECT by the authenticator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The cloud service itself: may publish and subscribe anywhere.
    Service,
    /// A device: may publish only to its own `up` topic and read only its own feeds.
    Device(DeviceId),
}

/// Decides who may connect. Called for every CONNECT with the MQTT client id, username and password.
///
/// It runs on a blocking thread (`tokio::task::spawn_blocking`), so it may consult a database.
/// A [`Refusal`] refuses the connection with the CONNACK code it names.
pub trait Authenticator: Send + Sync + 'static {
    /// The principal these credentials prove, or why they are refused.
    fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Principal, Refusal>;

    /// The principal a client certificate proves, or why it is refused: called instead of
    /// [`Authenticator::authenticate`] for every CONNECT on the device-certificate listener.
    /// The TLS handshake has already checked the certificate's chain to the device CA and its
    /// validity; this decides whether the device it names may connect now.
    fn authenticate_certificate(&self, cert: &PeerCertificate) -> Result<Principal, Refusal>;
}

/// What the broker read from the subject of a client certificate that passed the TLS
/// handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The subject's common name (`CN`): the device, `{account}/{device}`.
    pub common_name: Option<String>,
    /// The subject's organization (`O`): the credential binding ([`crate::ca`]).
    pub organization: Option<String>,
}

/// Why the authenticator refused a CONNECT; each maps to its own CONNACK code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong secret: CONNACK "bad user name or password".
    BadCredentials,
    /// Known, but may not connect (a revoked device, or the registry could not be read):
    /// CONNACK "not authorized".
    NotAuthorized,
}

/// Control over the broker's live sessions, for the service (revoking a device, rotating its
/// secret): cheap to clone, usable while the broker runs.
#[derive(Clone)]
pub struct Sessions {
    scx: ServerContext,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

impl Sessions {
    /// How often [`Sessions::disconnect`] tries a session whose entry is locked by a CONNECT in
    /// progress, and how long it waits between tries.
    const LOCK_TRIES: u32 = 50;
    const LOCK_RETRY: Duration = Duration::from_millis(20);

    /// Whether a session of `client_id` exists (connected, or kept for a persistent client).
    pub async fn exists(&self, client_id: &str) -> bool {
        self.scx.extends.shared().await.exist(client_id)
    }

    /// The client ids of every session (connected, or kept for a persistent client), in no
    /// particular order: the devices, and whoever else is connected.
    pub async fn client_ids(&self) -> Vec<String> {
        let shared = self.scx.extends.shared().await;
        shared
            .iter()
            .map(|entry| entry.id().client_id.to_string())
            .collect()
    }

    /// Closes the session of `client_id` now, if there is one, and forgets its state (its
    /// subscriptions and queued messages): rmqtt's administrator kick, as at shutdown. Returns
    /// whether a session was closed. Callers change the credentials first, so the client's
    /// reconnect meets the new ones.
    pub async fn disconnect(&self, client_id: &str) -> bool {
        for _ in 0..Self::LOCK_TRIES {
            let shared = self.scx.extends.shared().await;
            if !shared.exist(client_id) {
                return false;
            }
            // The shared state finds an entry by its client id; the rest of the id is only
            // carried into rmqtt's logs.
            let id =
                rmqtt::types::Id::new(self.scx.node.id(), 0, None, None, client_id.into(), None);
            // The lock is held while a CONNECT of the same client id is being handled.
            match shared.entry(id).try_lock().await {
                Ok(mut entry) => {
                    return match entry.kick(true, true, true).await {
                        Ok(_) => {
                            tracing::info!(
                                client = client_id,
                                "MQTT session closed by the service"
                            );
                            true
                        }
                        Err(e) => {
                            tracing::warn!(client = client_id, error = %e, "cannot close an MQTT session");
                            false
                        }
                    };
                }
                Err(_) => tokio::time::sleep(Self::LOCK_RETRY).await,
            }
        }
        tracing::warn!(
            client = client_id,
            "cannot close an MQTT session: it stayed busy"
        );
        false
    }
}

/// Default largest MQTT packet, in bytes (256 KiB).
pub const DEFAULT_MAX_PACKET_BYTES: u32 = 256 * 1024;
/// Default most sessions (connected or persistent): the sync engine's default `max_sessions`
/// (100,000 devices) plus a margin (for a client of the service's, when one embeds the broker
/// otherwise), so neither limit is reached first.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000 + 16;
/// Default most unacknowledged QoS 1/2 messages sent to one client.
pub const DEFAULT_MAX_INFLIGHT: u16 = 16;
/// Default most messages queued for one client beyond the in-flight window.
pub const DEFAULT_MAX_QUEUED_MESSAGES: usize = 1000;
/// Default most messages of one device handed over in-process and not yet taken by the sync
/// loop ([`BrokerLimits::max_device_messages_waiting`]): a device's four pushes in flight, the
/// resends of a few timeouts, acknowledgements and its `bye`.
pub const DEFAULT_MAX_DEVICE_MESSAGES_WAITING: usize = 16;

/// The embedded broker's limits: what one client, one device and the broker as a whole may
/// hold. The cloud's configuration file sets them (`embedded_broker_limits`, each key
/// optional); a value out of range is refused when the file is read, naming the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerLimits {
    /// Largest MQTT packet accepted or sent, in bytes (at least 1024). Default
    /// [`DEFAULT_MAX_PACKET_BYTES`].
    pub max_packet_bytes: u32,
    /// Most sessions, connected or persistent (rmqtt's session limit; a CONNECT beyond it gets
    /// "server unavailable"). TCP connections that never send CONNECT are dropped after a 15 s
    /// handshake timeout. Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// Most unacknowledged QoS 1/2 messages sent to one client (at least 1). Default
    /// [`DEFAULT_MAX_INFLIGHT`].
    pub max_inflight: u16,
    /// Most messages queued for one client beyond the in-flight window (at least 1); more are
    /// dropped, counted in [`BrokerConfig::drops`] and warned about. Default
    /// [`DEFAULT_MAX_QUEUED_MESSAGES`].
    pub max_queued_messages: usize,
    /// Most messages of one device handed to [`BrokerConfig::device_messages`] and not yet
    /// taken (at least 1). The channel itself has no bound: this one is per device, so the
    /// sync loop may stop taking messages while its store is behind without freezing every
    /// connection (a frozen connection answers no PINGREQ and is dropped after its
    /// keep-alive); only a device with this many messages waiting has its connection wait
    /// (stop reading its socket). What waits is bounded by connections × this × the largest
    /// packet. Default [`DEFAULT_MAX_DEVICE_MESSAGES_WAITING`].
    pub max_device_messages_waiting: usize,
}

impl Default for BrokerLimits {
    fn default() -> BrokerLimits {
        BrokerLimits {
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            max_queued_messages: DEFAULT_MAX_QUEUED_MESSAGES,
            max_device_messages_waiting: DEFAULT_MAX_DEVICE_MESSAGES_WAITING,
        }
    }
}

impl BrokerLimits {
    /// Refuses a limit out of range, naming it.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let at_least = |name: &str, value: u64, least: u64| {
            if value < least {
                Err(BrokerError::Config(format!(
                    "{name} must be at least {least}, got {value}"
                )))
            } else {
                Ok(())
            }
        };
        at_least("max_packet_bytes", self.max_packet_bytes.into(), 1024)?;
        at_least("max_connections", self.max_connections as u64, 1)?;
        at_least("max_inflight", self.max_inflight.into(), 1)?;
        at_least("max_queued_messages", self.max_queued_messages as u64, 1)?;
        at_least(
            "max_device_messages_waiting",
            self.max_device_messages_waiting as u64,
            1,
        )?;
        if isize::try_from(self.max_connections).is_err() {
            return Err(BrokerError::Config(format!(
                "max_connections is too large: {}",
                self.max_connections
            )));
        }
        Ok(())
    }
}

/// How long [`Broker::shutdown`] waits for connected sessions to be closed.
const SHUTDOWN_KICK_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the embedded broker.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Address of the clear-text listener; port 0 picks a free port ([`Broker::local_addr`]
    /// reports it).
    pub listen: SocketAddr,
    /// Serve clear-text MQTT on `listen`. Default true; false needs `tls`.
    pub plain: bool,
    /// A TLS listener, besides the clear-text one or (with `plain: false`) instead of it.
    /// Default none.
    pub tls: Option<BrokerTls>,
    /// A listener for devices with client certificates (mutual TLS), besides the others.
    /// Default none.
    pub device_certs: Option<DeviceCertListener>,
    /// Counts the CONNECTs the device-certificate listener refused (a certificate of another
    /// device than the client id, an unknown or revoked device, a bad will). Shared with whoever
    /// reports it (the service's `GET /v1/status`).
    pub certificate_refusals: Arc<AtomicU64>,
    /// Topic prefix, e.g. [`topics::DEFAULT_PREFIX`]; must match the devices' and the service's.
    pub topic_prefix: String,
    /// Packet size, sessions, and what one client or device may hold.
    pub limits: BrokerLimits,
    /// When set, what a device publishes on its own `up` topic (its will included) is handed
    /// to this channel in-process, in the device connection's own task: a device with
    /// [`BrokerLimits::max_device_messages_waiting`] messages not yet taken has that task wait,
    /// so the broker stops reading its socket (backpressure down to TCP) instead of queueing
    /// more or dropping. Nobody needs to subscribe to the device topics then (the message
    /// still goes through the ACL and routing, and meets no subscriber). Default none.
    pub device_messages: Option<mpsc::UnboundedSender<DeviceMessage>>,
    /// Counts the messages the broker dropped on their way to a client (its queue full, its
    /// in-flight window full, expired, or the client gone); each is also warned about
    /// (rate-limited). Shared with whoever reports it (`GET /v1/status`, `broker_drops`).
    pub drops: Arc<AtomicU64>,
}

/// A message a device published on its own `up` topic, handed over in-process
/// ([`BrokerConfig::device_messages`]).
#[derive(Debug)]
pub struct DeviceMessage {
    /// The topic (the device's `up` topic: the sender's identity).
    pub topic: String,
    pub payload: Vec<u8>,
    /// The device's slot this message holds until it is taken (dropped).
    slot: Option<OwnedSemaphorePermit>,
}

impl DeviceMessage {
    /// The topic and payload, freeing the device's slot.
    pub fn into_parts(self) -> (String, Vec<u8>) {
        (self.topic, self.payload)
    }
}

/// The embedded broker's TLS listener.
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerTls {
    /// Port 0 picks a free port ([`Broker::tls_addr`] reports it).
    pub listen: SocketAddr,
    /// The broker's certificate chain and key (PEM files).
    pub files: crate::tls::ServerTls,
}

/// The embedded broker's listener for devices with client certificates.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceCertListener {
    /// Port 0 picks a free port ([`Broker::device_cert_addr`] reports it).
    pub listen: SocketAddr,
    /// The broker's certificate chain and key (PEM files), as for the TLS listener.
    pub files: crate::tls::ServerTls,
    /// The CA certificate (PEM) every client certificate must chain to: the device CA.
    pub client_ca: PathBuf,
}

/// Listener ids (rmqtt keys each listener's settings by one; a port could repeat across
/// addresses).
const PLAIN_LISTENER: ListenerId = 1;
const TLS_LISTENER: ListenerId = 2;
const CERT_LISTENER: ListenerId = 3;

impl BrokerConfig {
    /// Defaults for everything but the listen address.
    pub fn new(listen: SocketAddr) -> BrokerConfig {
        BrokerConfig {
            listen,
            plain: true,
            tls: None,
            device_certs: None,
            certificate_refusals: Arc::default(),
            topic_prefix: topics::DEFAULT_PREFIX.to_string(),
            limits: BrokerLimits::default(),
            device_messages: None,
            drops: Arc::default(),
        }
    }
}

impl Default for BrokerConfig {
    /// Listens on `0.0.0.0:1883`, the standard MQTT port.
    fn default() -> BrokerConfig {
        BrokerConfig::new(SocketAddr::from(([0, 0, 0, 0], 1883)))
    }
}

/// The broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A setting is out of range.
    #[error("invalid broker configuration: {0}")]
    Config(String),
    /// The listen address could not be bound (in use, not local, no permission...).
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The TLS certificate or key cannot be used.
    #[error("embedded broker TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// rmqtt refused to start for another reason.
    #[error("cannot start the MQTT broker: {0}")]
    Start(String),
}

/// A running broker. Dropping it stops accepting connections; [`Broker::shutdown`] also closes
/// the connected ones.
pub struct Broker {
    local_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    device_cert_addr: Option<SocketAddr>,
    certificate_refusals: Arc<AtomicU64>,
    scx: ServerContext,
    task: Option<JoinHandle<()>>,
    /// Keeps the registration of the ACL hooks; they are never stopped (stopping them would
    /// let every remaining session do anything).
    _hooks: Box<dyn Register>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Bind the listen address, install the authentication and ACL hooks and start serving.
    ///
    /// The socket is bound before this returns, so clients may connect to
    /// [`Broker::local_addr`] at once. Must be called within a Tokio runtime.
    pub async fn start(
        config: BrokerConfig,
        auth: Arc<dyn Authenticator>,
    ) -> Result<Broker, BrokerError> {
        let prefix = config.topic_prefix.clone();
        if prefix.is_empty() || prefix.contains(['+', '#', '\0']) || prefix.starts_with('$') {
            return Err(BrokerError::Config(format!(
                "topic prefix {prefix:?} must be non-empty, without '+', '#' or NUL, and not start with '$'"
            )));
        }
        let limits = config.limits;
        limits.validate()?;
        let max_inflight = NonZeroU16::new(limits.max_inflight)
            .ok_or_else(|| BrokerError::Config("max_inflight must be at least 1".into()))?;
        let max_sessions = isize::try_from(limits.max_connections)
            .map_err(|_| BrokerError::Config("max_connections is too large".into()))?;

        let scx = ServerContext::new()
            .busy_check_enable(false)
            .mqtt_max_sessions(max_sessions)
            .build()
            .await;

        let acl = AclHandler {
            prefix,
            auth,
            cert_listener: config.device_certs.as_ref().map(|_| CERT_LISTENER),
            certificate_refusals: config.certificate_refusals.clone(),
            device_messages: config.device_messages.clone(),
            device_slots: Arc::new(Mutex::new(DeviceSlots::new(
                limits.max_device_messages_waiting,
            ))),
            drops: config.drops.clone(),
            drop_warn: Arc::new(Mutex::new(WarnLimiter::new(WarnLimiter::INTERVAL))),
            login_refusals: Arc::new(Mutex::new(LoginRefusals::new())),
        };
        let hooks = scx.extends.hook_mgr().register();
        hooks
            .add(Type::ClientAuthenticate, Box::new(acl.clone()))
            .await;
        hooks
            .add(Type::ClientSubscribeCheckAcl, Box::new(acl.clone()))
            .await;
        hooks
            .add(Type::MessagePublishCheckAcl, Box::new(acl.clone()))
            .await;
        hooks.add(Type::MessageDropped, Box::new(acl.clone())).await;
        if config.device_messages.is_some() {
            hooks.add(Type::MessagePublish, Box::new(acl)).await;
        }
        hooks.start().await;

        if !config.plain && config.tls.is_none() && config.device_certs.is_none() {
            return Err(BrokerError::Config(
                "the broker needs a listener: plain, TLS or device certificates".into(),
            ));
        }
        let builder = |laddr: SocketAddr| {
            Builder::new()
                .name("devtables")
                // Small protocol messages must not wait for the delayed-ACK timer (about 40 ms).
                .nodelay(true)
                .laddr(laddr)
                .reuseaddr(Some(true))
                .allow_anonymous(false)
                .max_connections(limits.max_connections)
                .max_packet_size(limits.max_packet_bytes)
                .max_inflight(max_inflight)
                .max_mqueue_len(limits.max_queued_messages)
                // A v5 client may ask for any session expiry; cap it like the v3.1.1 default.
                .max_session_expiry_interval(Duration::from_secs(2 * 60 * 60))
                .handshake_timeout(Duration::from_secs(15))
        };
        let bind = |b: Builder, addr: SocketAddr| {
            b.bind().map_err(|e| BrokerError::Bind {
                addr,
                source: into_io_error(e),
            })
        };
        let mut server = MqttServer::new(scx.clone());
        let mut plain_addr = None;
        if config.plain {
            let listener = bind(builder(config.listen), config.listen)?
                .tcp()
                .map_err(|e| BrokerError::Start(e.to_string()))?;
            let addr = listener
                .local_addr()
                .map_err(|e| BrokerError::Start(e.to_string()))?;
            tracing::warn!(
                %addr,
                "the MQTT broker's plain listener is in clear text: device secrets and items \
                 cross the network readable (configure a TLS listener)"
            );
            server = server.listener_by_id(listener, PLAIN_LISTENER);
            plain_addr = Some(addr);
        }
        let mut tls_addr = None;
        if let Some(tls) = &config.tls {
            // Loaded here first for a typed error naming the file; rmqtt loads them again.
            crate::tls::server_config(&tls.files)?;
            let b = builder(tls.listen)
                .tls_cert(Some(tls.files.cert.to_string_lossy()))
                .tls_key(Some(tls.files.key.to_string_lossy()));
            let listener = bind(b, tls.listen)?
                .tls()
                .map_err(|e| BrokerError::Start(format!("TLS listener: {e}")))?;
            let addr = listener
                .local_addr()
                .map_err(|e| BrokerError::Start(e.to_string()))?;
            tracing::info!(%addr, "MQTT broker listening with TLS");
            server = server.listener_by_id(listener, TLS_LISTENER);
            tls_addr = Some(addr);
        }
        let mut device_cert_addr = None;
        if let Some(certs) = &config.device_certs {
            // Loaded here first for typed errors naming the files; rmqtt loads them again.
            crate::tls::server_config(&certs.files)?;
            crate::tls::read_certs(&certs.client_ca)?;
            let b = builder(certs.listen)
                .tls_cert(Some(certs.files.cert.to_string_lossy()))
                .tls_key(Some(certs.files.key.to_string_lossy()))
                // Client certificates are required and must chain to this CA.
                .tls_cross_certificate(true)
                .tls_client_ca_certs(Some(certs.client_ca.to_string_lossy()))
                .collect_cert_info(true);
            let listener = bind(b, certs.listen)?
                .tls()
                .map_err(|e| BrokerError::Start(format!("device-certificate listener: {e}")))?;
            let addr = listener
                .local_addr()
                .map_err(|e| BrokerError::Start(e.to_string()))?;
            tracing::info!(%addr, "MQTT broker listening for devices with client certificates");
            server = server.listener_by_id(listener, CERT_LISTENER);
            device_cert_addr = Some(addr);
        }
        let Some(local_addr) = plain_addr.or(tls_addr).or(device_cert_addr) else {
            return Err(BrokerError::Config("no listener".into()));
        };
        let server = server.build();
        let task = tokio::spawn(async move {
            if let Err(e) = server.run().await {
                tracing::error!(error = %e, "MQTT broker stopped");
            }
        });
        tracing::info!(%local_addr, "MQTT broker listening");
        Ok(Broker {
            local_addr,
            tls_addr,
            device_cert_addr,
            certificate_refusals: config.certificate_refusals,
            scx,
            task: Some(task),
            _hooks: hooks,
        })
    }

    /// Publishes to the broker's sessions in-process, as the service (see
    /// [`crate::broker_publish`]): no MQTT client, no socket.
    pub fn publisher(&self) -> EmbeddedPublisher {
        EmbeddedPublisher::new(self.scx.clone())
    }

    /// Control over the live sessions (see [`Sessions`]).
    pub fn sessions(&self) -> Sessions {
        Sessions {
            scx: self.scx.clone(),
        }
    }

    /// The address the broker listens on (with the real port when port 0 was asked for): the
    /// clear-text listener's, or the TLS one's when it is the only one.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The TLS listener's address, when there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The device-certificate listener's address, when there is one.
    pub fn device_cert_addr(&self) -> Option<SocketAddr> {
        self.device_cert_addr
    }

    /// CONNECTs the device-certificate listener refused so far.
    pub fn certificate_refusals(&self) -> u64 {
        self.certificate_refusals.load(Ordering::Relaxed)
    }

    /// Stop accepting connections, free the port and close every session.
    ///
    /// rmqtt has no graceful stop: this aborts the accept loop (dropping the listening socket)
    /// and then kicks every known session (connected or persistent) as an administrator with a
    /// clean start, which closes its connection and forgets its state. Sessions are kicked
    /// concurrently, waiting at most 10 s in all; a connection still in its handshake when the
    /// sweep runs may survive it (best effort). rmqtt's internal worker tasks are not tracked by
    /// this handle.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let ids: Vec<rmqtt::types::Id> = {
            let shared = self.scx.extends.shared().await;
            shared.iter().map(|entry| entry.id()).collect()
        };
        let mut kicks = tokio::task::JoinSet::new();
        for id in ids {
            let scx = self.scx.clone();
            kicks.spawn(async move {
                let entry = scx.extends.shared().await.entry(id.clone());
                match entry.try_lock().await {
                    Ok(mut entry) => {
                        if let Err(e) = entry.kick(true, true, true).await {
                            tracing::debug!(client = %id.client_id, error = %e, "kick at shutdown failed");
                        }
                    }
                    Err(e) => tracing::debug!(client = %id.client_id, error = %e, "session busy at shutdown"),
                }
            });
        }
        let all = async { while kicks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_KICK_TIMEOUT, all)
            .await
            .is_err()
        {
            tracing::warn!("MQTT broker shutdown: some sessions did not close in time");
        }
        tracing::info!(local_addr = %self.local_addr, "MQTT broker stopped");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The `std::io::Error` inside an rmqtt (anyhow) error, or one carrying its message.
fn into_io_error(e: rmqtt::Error) -> std::io::Error {
    match e.downcast::<std::io::Error>() {
        Ok(io) => io,
        Err(other) => std::io::Error::other(other.to_string()),
    }
}

/// The authentication and ACL hook handler, registered for three hook types.
#[derive(Clone)]
struct AclHandler {
    prefix: String,
    auth: Arc<dyn Authenticator>,
    /// The device-certificate listener, if there is one: its CONNECTs authenticate by
    /// certificate.
    cert_listener: Option<ListenerId>,
    certificate_refusals: Arc<AtomicU64>,
    /// Where device messages go in-process, if anywhere ([`BrokerConfig::device_messages`]).
    device_messages: Option<mpsc::UnboundedSender<DeviceMessage>>,
    /// Per device (client id), its slots for messages handed over and not yet taken.
    device_slots: Arc<Mutex<DeviceSlots>>,
    drops: Arc<AtomicU64>,
    drop_warn: Arc<Mutex<WarnLimiter>>,
    /// The rate of the log lines of refused logins, per username.
    login_refusals: Arc<Mutex<LoginRefusals>>,
}

/// Refused logins are logged at info, each username's first at once and then at most one per
/// [`LoginRefusals::INTERVAL`] with how many were refused in between: a device retrying with a
/// wrong secret all day, or someone guessing, must not flood the log. The usernames tracked are
/// bounded; beyond [`LoginRefusals::MAX_USERNAMES`] (a flood of names), the refusals of names not
/// tracked are counted and said in one line per interval.
#[derive(Debug)]
struct LoginRefusals {
    /// Per username: when its last line was logged, and the refusals since not logged.
    by_user: std::collections::HashMap<String, (std::time::Instant, u64)>,
    /// Refusals of usernames beyond the bound, since the last line saying them.
    untracked: WarnLimiter,
}

/// What a refused login's log line says about the refusals before it.
#[derive(Debug, PartialEq, Eq)]
enum LoginLine {
    /// Log it; this many refusals of the same username were not logged since its last line.
    Log { suppressed: u64 },
    /// Log one line for usernames beyond the bound; this many were not logged since the last.
    Untracked { suppressed: u64 },
    /// Stay quiet (counted).
    Quiet,
}

impl LoginRefusals {
    const INTERVAL: Duration = WarnLimiter::INTERVAL;
    const MAX_USERNAMES: usize = 4096;

    fn new() -> LoginRefusals {
        LoginRefusals {
            by_user: std::collections::HashMap::new(),
            untracked: WarnLimiter::new(Self::INTERVAL),
        }
    }

    fn hit(&mut self, username: &str, now: std::time::Instant) -> LoginLine {
        if let Some((at, suppressed)) = self.by_user.get_mut(username) {
            if now.saturating_duration_since(*at) < Self::INTERVAL {
                *suppressed += 1;
                return LoginLine::Quiet;
            }
            *at = now;
            return LoginLine::Log {
                suppressed: std::mem::take(suppressed),
            };
        }
        if self.by_user.len() >= Self::MAX_USERNAMES {
            // Names quiet for a whole interval have nothing left to say.
            self.by_user
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < Self::INTERVAL);
        }
        if self.by_user.len() >= Self::MAX_USERNAMES {
            return match self.untracked.hit(now) {
                Some(suppressed) => LoginLine::Untracked { suppressed },
                None => LoginLine::Quiet,
            };
        }
        self.by_user.insert(username.to_string(), (now, 0));
        LoginLine::Log { suppressed: 0 }
    }
}

/// A name from a CONNECT as it goes into a log line: at most 100 characters (a username may be
/// 64 KiB), without control characters.
fn shown_name(name: &str) -> String {
    let mut shown: String = name
        .chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if name.chars().count() > 100 {
        shown.push_str("...");
    }
    shown
}

type HookFuture<'a> = Pin<Box<dyn Future<Output = ReturnType> + Send + 'a>>;

// `Handler` is declared with `#[async_trait]`; this is the signature that macro produces, written
// out so that this crate needs no `async-trait` dependency.
impl Handler for AclHandler {
    fn hook<'life0, 'life1, 'async_trait>(
        &'life0 self,
        param: &'life1 Parameter<'_>,
        acc: Option<HookResult>,
    ) -> HookFuture<'async_trait>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        match param {
            Parameter::ClientAuthenticate(connect_info) => {
                let request = AuthRequest::of(connect_info);
                let handler = self.clone();
                Box::pin(async move {
                    let result = handler.authenticate(request).await;
                    (false, Some(HookResult::AuthResult(result)))
                })
            }
            Parameter::ClientSubscribeCheckAcl(session, subscribe) => {
                let result = self.check_subscribe(session, subscribe);
                Box::pin(std::future::ready((
                    false,
                    Some(HookResult::SubscribeAclResult(result)),
                )))
            }
            Parameter::MessagePublishCheckAcl(session, publish) => {
                let result = self.check_publish(session, publish);
                Box::pin(std::future::ready((
                    false,
                    Some(HookResult::PublishAclResult(result)),
                )))
            }
            Parameter::MessagePublish(_, from, publish) => {
                let handover = self
                    .device_message(from, publish)
                    .map(|(tx, message)| (tx, message, self.slots_of(&from.id.client_id)));
                Box::pin(async move {
                    if let Some((tx, mut message, slots)) = handover {
                        // Waits only while this device has its most messages waiting: its
                        // connection task stops reading its socket meanwhile (backpressure
                        // to this device alone). A closed semaphore or channel means the
                        // service is stopping; the device resends after it reconnects.
                        message.slot = slots.acquire_owned().await.ok();
                        let _ = tx.send(message);
                    }
                    (true, acc)
                })
            }
            Parameter::MessageDropped(to, from, publish, reason) => {
                // Refused publishes (no recipient) are warned about by the ACL check.
                if let Some(to) = to {
                    self.drops.fetch_add(1, Ordering::Relaxed);
                    let suppressed = self
                        .drop_warn
                        .lock()
                        .ok()
                        .and_then(|mut w| w.hit(std::time::Instant::now()));
                    if let Some(suppressed) = suppressed {
                        tracing::warn!(
                            to = %to.client_id, from = %from.id.client_id, topic = %publish.topic,
                            suppressed, "the broker dropped a message on its way to a client: {reason:?} \
                            (counted in broker_drops; the protocol resends)"
                        );
                    }
                }
                Box::pin(std::future::ready((true, acc)))
            }
            _ => Box::pin(std::future::ready((true, acc))),
        }
    }
}

/// What the authentication hook needs from a CONNECT, owned so it can move to a blocking thread.
struct AuthRequest {
    client_id: String,
    username: Option<String>,
    password: Option<rmqtt::types::Password>,
    /// The will's topic and retain flag, if the client set a will.
    will: Option<(String, bool)>,
    /// The listener the client connected to.
    listener: ListenerId,
    /// The client certificate's subject (only the device-certificate listener reads it).
    cert: Option<PeerCertificate>,
    /// The client's address, for the log of a refused login.
    peer: Option<SocketAddr>,
}

impl AuthRequest {
    fn of(ci: &ConnectInfo) -> AuthRequest {
        let will = ci.last_will().map(|lw| {
            let topic = match &lw {
                rmqtt::types::LastWill::V3(w) => w.topic.to_string(),
                rmqtt::types::LastWill::V5(w) => w.topic.to_string(),
            };
            (topic, lw.retain())
        });
        AuthRequest {
            client_id: ci.client_id().to_string(),
            username: ci.username().map(|u| u.to_string()),
            password: ci.password().cloned(),
            will,
            listener: ci.id().lid(),
            cert: ci.cert().map(|c| PeerCertificate {
                common_name: c.common_name.clone(),
                organization: c.organization.clone(),
            }),
            peer: ci.ipaddress(),
        }
    }
}

impl AclHandler {
    /// Logs a refused login at info, rate-limited per name ([`LoginRefusals`]): the name it
    /// tried (`name`: a certificate's CN on the certificate listener, else the username), the
    /// client id, the peer address and why.
    fn log_refusal(&self, request: &AuthRequest, name: Option<&str>, reason: &str) {
        let name = name.or(request.username.as_deref()).unwrap_or("");
        let key = if name.is_empty() {
            format!("client id {}", request.client_id)
        } else {
            name.to_string()
        };
        let line = self
            .login_refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hit(&key, std::time::Instant::now());
        let peer = request
            .peer
            .map_or_else(|| "unknown".to_string(), |p| p.to_string());
        let (username, client) = (shown_name(name), shown_name(&request.client_id));
        match line {
            LoginLine::Log { suppressed } => tracing::info!(
                %username, %client, %peer, suppressed, "MQTT login refused: {reason}"
            ),
            LoginLine::Untracked { suppressed } => tracing::info!(
                %username, %client, %peer, suppressed,
                "MQTT login refused: {reason} (refusals of many usernames: one line per {} s \
                 for those not tracked)",
                LoginRefusals::INTERVAL.as_secs()
            ),
            LoginLine::Quiet => {}
        }
    }

    /// Run the authenticator and apply the device rules of CONNECT.
    async fn authenticate(&self, request: AuthRequest) -> AuthResult {
        if Some(request.listener) == self.cert_listener {
            let result = self.authenticate_certificate(request).await;
            if !matches!(result, AuthResult::Allow(..)) {
                self.certificate_refusals.fetch_add(1, Ordering::Relaxed);
            }
            return result;
        }
        let auth = self.auth.clone();
        let principal = {
            let client_id = request.client_id.clone();
            let username = request.username.clone();
            let password = request.password.clone();
            tokio::task::spawn_blocking(move || {
                auth.authenticate(&client_id, username.as_deref(), password.as_deref())
            })
            .await
        };
        let principal = match principal {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(client = %request.client_id, error = %e, "authenticator failed; refusing");
                return AuthResult::NotAuthorized;
            }
        };
        match principal {
            Err(Refusal::BadCredentials) => {
                self.log_refusal(
                    &request,
                    None,
                    "bad user name or password (an unknown device, a wrong secret, or none given)",
                );
                AuthResult::BadUsernameOrPassword
            }
            Err(Refusal::NotAuthorized) => {
                self.log_refusal(
                    &request,
                    None,
                    "not authorized (the device is revoked, or the device registry did not answer)",
                );
                AuthResult::NotAuthorized
            }
            Ok(Principal::Service) => AuthResult::Allow(true, None),
            Ok(Principal::Device(id)) => match self.device_connect_refusal(&id, &request) {
                None => AuthResult::Allow(false, None),
                Some(why) => {
                    self.log_refusal(&request, None, why);
                    AuthResult::NotAuthorized
                }
            },
        }
    }

    /// A CONNECT on the device-certificate listener: the certificate is the credential (the
    /// username and password are ignored), only a device may connect, and then the device rules
    /// of CONNECT apply as on the other listeners.
    async fn authenticate_certificate(&self, request: AuthRequest) -> AuthResult {
        let Some(cert) = request.cert.clone() else {
            // rustls requires a certificate on this listener; fail closed if none came through.
            self.log_refusal(&request, Some(""), "no client certificate");
            return AuthResult::NotAuthorized;
        };
        let auth = self.auth.clone();
        let subject = cert.clone();
        let principal =
            tokio::task::spawn_blocking(move || auth.authenticate_certificate(&subject)).await;
        let who = cert.common_name.as_deref().unwrap_or("(no CN)");
        match principal {
            Ok(Ok(Principal::Device(id))) => match self.device_connect_refusal(&id, &request) {
                None => AuthResult::Allow(false, None),
                Some(why) => {
                    self.log_refusal(&request, Some(who), why);
                    AuthResult::NotAuthorized
                }
            },
            Ok(Ok(Principal::Service)) => {
                self.log_refusal(
                    &request,
                    Some(who),
                    "only devices connect with certificates",
                );
                AuthResult::NotAuthorized
            }
            Ok(Err(_)) => {
                self.log_refusal(
                    &request,
                    Some(who),
                    "the certificate's device may not connect (it is revoked, or the certificate \
                     predates a rotation of its secret)",
                );
                AuthResult::NotAuthorized
            }
            Err(e) => {
                tracing::error!(client = %request.client_id, error = %e, "authenticator failed; refusing");
                AuthResult::NotAuthorized
            }
        }
    }

    /// Why a device may not connect with this CONNECT, if it may not.
    fn device_connect_refusal(&self, id: &DeviceId, request: &AuthRequest) -> Option<&'static str> {
        // The ACL hooks recover the device from the client id, so it must round-trip exactly.
        if DeviceId::new(id.account.as_str(), id.device.as_str()).as_ref() != Ok(id) {
            return Some("the authenticator returned an invalid device id");
        }
        if request.client_id != id.node_name() {
            return Some("a device must use its own \"{account}/{device}\" as client id");
        }
        if let Some((topic, retain)) = &request.will {
            if *retain || *topic != topics::up_topic(&self.prefix, id) {
                return Some("a device's will must be non-retained on its own up topic");
            }
        }
        None
    }

    /// The device a non-superuser session belongs to (its client id was pinned at CONNECT).
    fn device_of(session: &Session) -> Option<DeviceId> {
        Self::device_of_client(&session.id.client_id)
    }

    /// The device a client id names (`{account}/{device}`), if it names one.
    fn device_of_client(client_id: &str) -> Option<DeviceId> {
        let (account, device) = client_id.split_once('/')?;
        DeviceId::new(account, device).ok()
    }

    /// The publish rule of a device: only its own `up` topic, never retained.
    fn is_own_up_publish(&self, client_id: &str, publish: &Publish) -> bool {
        !publish.retain
            && Self::device_of_client(client_id)
                .is_some_and(|id| *publish.topic == topics::up_topic(&self.prefix, &id))
    }

    fn check_subscribe(&self, session: &Session, subscribe: &Subscribe) -> SubscribeAclResult {
        let filter: &str = &subscribe.topic_filter;
        let allowed = Self::device_of(session).is_some_and(|id| {
            filter == topics::down_topic(&self.prefix, &id)
                || filter == topics::broadcast_topic(&self.prefix, &id.account)
        });
        if allowed {
            SubscribeAclResult::new_success(subscribe.opts.qos(), None)
        } else {
            tracing::warn!(client = %session.id.client_id, filter, "MQTT subscription refused");
            SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
        }
    }

    /// The in-process handover of a device's message on its own `up` topic (the same rule as
    /// [`Self::check_publish`], which runs after this hook; a will was checked at CONNECT and
    /// meets the same rule), or `None` for anything else.
    fn device_message(
        &self,
        from: &rmqtt::types::From,
        publish: &Publish,
    ) -> Option<(mpsc::UnboundedSender<DeviceMessage>, DeviceMessage)> {
        let tx = self.device_messages.as_ref()?;
        let device_sent = matches!(
            from.typ(),
            rmqtt::types::FromType::Custom | rmqtt::types::FromType::LastWill
        );
        (device_sent && self.is_own_up_publish(&from.id.client_id, publish)).then(|| {
            (
                tx.clone(),
                DeviceMessage {
                    topic: publish.topic.to_string(),
                    payload: publish.payload.to_vec(),
                    slot: None,
                },
            )
        })
    }

    /// The slots of device `client_id` ([`BrokerLimits::max_device_messages_waiting`]).
    fn slots_of(&self, client_id: &str) -> Arc<Semaphore> {
        self.device_slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .of(client_id)
    }

    fn check_publish(&self, session: &Session, publish: &Publish) -> PublishAclResult {
        let topic: &str = &publish.topic;
        if self.is_own_up_publish(&session.id.client_id, publish) {
            PublishAclResult::allow()
        } else {
            tracing::warn!(client = %session.id.client_id, topic, retain = publish.retain, "MQTT publish refused");
            PublishAclResult::rejected(
                false,
                Some("a device may publish only to its own up topic, not retained".into()),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{
        AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
        Packet, QoS, SubscribeReasonCode,
    };
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    const PREFIX: &str = topics::DEFAULT_PREFIX;
    const WAIT: Duration = Duration::from_secs(10);
    const QUIET: Duration = Duration::from_millis(300);

    #[test]
    fn refused_logins_are_logged_per_username_at_a_bounded_rate() {
        let mut r = LoginRefusals::new();
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(r.hit("acme/d1", at(0)), LoginLine::Log { suppressed: 0 });
        for i in 1..100 {
            assert_eq!(r.hit("acme/d1", at(i)), LoginLine::Quiet);
        }
        // Another username is its own line.
        assert_eq!(r.hit("acme/d2", at(100)), LoginLine::Log { suppressed: 0 });
        let later = LoginRefusals::INTERVAL.as_millis() as u64;
        assert_eq!(
            r.hit("acme/d1", at(later)),
            LoginLine::Log { suppressed: 99 }
        );

        // A flood of names: the tracked ones are bounded; the rest share one line per interval.
        let mut r = LoginRefusals::new();
        for i in 0..LoginRefusals::MAX_USERNAMES {
            assert_eq!(
                r.hit(&format!("n{i}"), at(0)),
                LoginLine::Log { suppressed: 0 }
            );
        }
        assert_eq!(
            r.hit("extra1", at(1)),
            LoginLine::Untracked { suppressed: 0 }
        );
        assert_eq!(r.hit("extra2", at(2)), LoginLine::Quiet);
        assert_eq!(r.by_user.len(), LoginRefusals::MAX_USERNAMES);
        // Once the old names are quiet for an interval, new ones are tracked again.
        assert_eq!(r.hit("fresh", at(later)), LoginLine::Log { suppressed: 0 });
        assert_eq!(r.by_user.len(), 1);
        assert_eq!(shown_name(&"x\n".repeat(200)).chars().count(), 103);
    }

    struct FixedAuth;

    impl Authenticator for FixedAuth {
        fn authenticate(
            &self,
            _client_id: &str,
            username: Option<&str>,
            password: Option<&[u8]>,
        ) -> Result<Principal, Refusal> {
            match (username, password) {
                (Some("service"), Some(b"svc-secret")) => Ok(Principal::Service),
                (Some("acme/dev1"), Some(b"s1")) => Ok(Principal::Device(dev("acme", "dev1"))),
                (Some("acme/dev2"), Some(b"s2")) => Ok(Principal::Device(dev("acme", "dev2"))),
                (Some("other/dev9"), Some(b"s9")) => Ok(Principal::Device(dev("other", "dev9"))),
                _ => Err(Refusal::BadCredentials),
            }
        }

        fn authenticate_certificate(&self, cert: &PeerCertificate) -> Result<Principal, Refusal> {
            match cert.common_name.as_deref() {
                // An authenticator that (wrongly) maps a certificate to the service: the broker
                // must still refuse it on the device-certificate listener.
                Some("acme/svc") => Ok(Principal::Service),
                Some(name @ ("acme/dev1" | "acme/dev2")) => {
                    let (account, device) = name.split_once('/').unwrap();
                    Ok(Principal::Device(dev(account, device)))
                }
                _ => Err(Refusal::NotAuthorized),
            }
        }
    }

    fn dev(account: &str, device: &str) -> DeviceId {
        DeviceId::new(account, device).unwrap()
    }

    async fn broker() -> Broker {
        let config = BrokerConfig::new("127.0.0.1:0".parse().unwrap());
        Broker::start(config, Arc::new(FixedAuth)).await.unwrap()
    }

    fn options(broker: &Broker, client_id: &str, user: &str, pass: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", broker.local_addr().port());
        o.set_credentials(user, pass);
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Poll until CONNACK or the first error.
    async fn handshake(eventloop: &mut EventLoop) -> Result<(), ConnectionError> {
        timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                    return Ok(());
                }
            }
        })
        .await
        .expect("no CONNACK in time")
    }

    /// The connect error the broker answers with.
    async fn refused(options: MqttOptions) -> ConnectionError {
        let (_client, mut eventloop) = AsyncClient::new(options, 10);
        handshake(&mut eventloop)
            .await
            .expect_err("connection was accepted")
    }

    /// A connected client whose event loop runs in a task, forwarding incoming packets.
    struct Client {
        client: AsyncClient,
        incoming: mpsc::UnboundedReceiver<Packet>,
        task: JoinHandle<()>,
    }

    impl Drop for Client {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Client {
        async fn connect(options: MqttOptions) -> Client {
            let (client, mut eventloop) = AsyncClient::new(options, 100);
            handshake(&mut eventloop).await.expect("connection refused");
            let (tx, incoming) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(p)) => {
                            if tx.send(p).is_err() {
                                return;
                            }
                        }
                        Ok(Event::Outgoing(_)) => {}
                        Err(_) => return,
                    }
                }
            });
            Client {
                client,
                incoming,
                task,
            }
        }

        async fn next_packet(&mut self, wait: Duration) -> Option<Packet> {
            timeout(wait, self.incoming.recv()).await.ok().flatten()
        }

        /// The next SUBACK's return codes (one filter per SUBSCRIBE here).
        async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
            self.client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .unwrap();
            loop {
                match self.next_packet(WAIT).await.expect("no SUBACK in time") {
                    Packet::SubAck(ack) => return ack.return_codes[0],
                    _ => continue,
                }
            }
        }

        async fn subscribe_ok(&mut self, filter: &str) {
            let code = self.subscribe(filter).await;
            assert!(
                matches!(code, SubscribeReasonCode::Success(_)),
                "subscribe {filter}: {code:?}"
            );
        }

        async fn publish(&self, topic: &str, payload: &str) {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
                .await
                .unwrap();
        }

        /// The next message delivered, as (topic, payload).
        async fn recv(&mut self, wait: Duration) -> Option<(String, String)> {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match self.next_packet(left).await? {
                    Packet::Publish(p) => {
                        return Some((
                            p.topic.clone(),
                            String::from_utf8_lossy(&p.payload).into_owned(),
                        ))
                    }
                    _ => continue,
                }
            }
        }

        async fn expect(&mut self, topic: &str, payload: &str) {
            let got = self
                .recv(WAIT)
                .await
                .unwrap_or_else(|| panic!("nothing received, expected {payload:?}"));
            assert_eq!(got, (topic.to_string(), payload.to_string()));
        }

        async fn expect_quiet(&mut self) {
            if let Some(got) = self.recv(QUIET).await {
                panic!("unexpected delivery {got:?}");
            }
        }
    }

    async fn service(b: &Broker) -> Client {
        Client::connect(options(b, "cloud-service", "service", "svc-secret")).await
    }

    async fn dev1(b: &Broker) -> Client {
        Client::connect(options(b, "acme/dev1", "acme/dev1", "s1")).await
    }

    async fn dev2(b: &Broker) -> Client {
        Client::connect(options(b, "acme/dev2", "acme/dev2", "s2")).await
    }

    /// A broker with every listener: plain, TLS (secrets) and device certificates, its server
    /// certificate from a test CA, the client certificates from a device CA; all files in a
    /// temporary folder.
    struct CertBroker {
        broker: Broker,
        device_ca: crate::ca::DeviceCa,
        server_ca: std::path::PathBuf,
        dir: tempfile::TempDir,
    }

    impl CertBroker {
        async fn start() -> CertBroker {
            let dir = tempfile::tempdir().unwrap();
            let ca = devtables_tls::test_pki::TestCa::new("broker test CA");
            let server = ca.server(dir.path(), "server");
            let files = crate::tls::ServerTls {
                cert: server.cert,
                key: server.key,
            };
            let server_ca = ca.write_ca(dir.path(), "server");
            let device_ca = crate::ca::DeviceCa::open_or_create(dir.path()).unwrap();

            let local = SocketAddr::from(([127, 0, 0, 1], 0));
            let mut config = BrokerConfig::new(local);
            config.tls = Some(BrokerTls {
                listen: local,
                files: files.clone(),
            });
            config.device_certs = Some(DeviceCertListener {
                listen: local,
                files,
                client_ca: device_ca.cert_file(),
            });
            let broker = Broker::start(config, Arc::new(FixedAuth)).await.unwrap();
            CertBroker {
                broker,
                device_ca,
                server_ca,
                dir,
            }
        }

        /// A client certificate for `name` (CN) from the device CA, written to files.
        fn identity(&self, account: &str, device: &str) -> crate::tls::ClientIdentity {
            let cert = self
                .device_ca
                .issue(&dev(account, device), "h", Duration::from_secs(3600))
                .unwrap();
            let id = crate::tls::ClientIdentity {
                cert: self.dir.path().join(format!("{account}-{device}.pem")),
                key: self.dir.path().join(format!("{account}-{device}.key")),
            };
            std::fs::write(&id.cert, cert.cert_pem).unwrap();
            std::fs::write(&id.key, cert.key_pem).unwrap();
            id
        }

        /// Options for `client_id` on `port` over TLS, presenting `identity` if given.
        fn options(
            &self,
            port: u16,
            client_id: &str,
            identity: Option<crate::tls::ClientIdentity>,
        ) -> MqttOptions {
            let mut tls = crate::tls::ClientTls::new(&self.server_ca);
            tls.identity = identity;
            let config = crate::tls::client_config(&tls).unwrap();
            let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
            o.set_keep_alive(Duration::from_secs(30));
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
            ));
            o
        }

        fn cert_port(&self) -> u16 {
            self.broker.device_cert_addr().unwrap().port()
        }
    }

    #[tokio::test]
    async fn a_device_certificate_is_the_credential_on_its_listener() {
        let cb = CertBroker::start().await;
        let b = &cb.broker;
        let mut svc = service(b).await;
        svc.subscribe_ok(&topics::up_filter(PREFIX)).await;

        // No username or password: the certificate says who the device is.
        let id = cb.identity("acme", "dev1");
        let mut d1 = Client::connect(cb.options(cb.cert_port(), "acme/dev1", Some(id))).await;
        let up1 = topics::up_topic(PREFIX, &dev("acme", "dev1"));
        d1.publish(&up1, "by certificate").await;
        svc.expect(&up1, "by certificate").await;
        // The same ACL as with a secret.
        let down2 = topics::down_topic(PREFIX, &dev("acme", "dev2"));
        assert_eq!(d1.subscribe(&down2).await, SubscribeReasonCode::Failure);
        d1.publish(&topics::up_topic(PREFIX, &dev("acme", "dev2")), "spoofed")
            .await;
        svc.expect_quiet().await;
        assert_eq!(b.certificate_refusals(), 0);
        cb.broker.shutdown().await;
    }

    #[tokio::test]
    async fn a_certificate_proves_only_its_own_device_and_never_the_service() {
        let cb = CertBroker::start().await;
        let port = cb.cert_port();
        let not_authorized = |err: ConnectionError| {
            matches!(
                err,
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
            )
        };
        // dev2's certificate with dev1's client id; even with dev1's correct secret.
        let mut o = cb.options(port, "acme/dev1", Some(cb.identity("acme", "dev2")));
        o.set_credentials("acme/dev1", "s1");
        let err = refused(o).await;
        assert!(not_authorized(err), "another device's certificate");
        // A certificate naming the service (the service may not use this listener).
        let err = refused(cb.options(port, "service", Some(cb.identity("acme", "svc")))).await;
        assert!(not_authorized(err), "not a device");
        // A device's own certificate with a will on another device's topic.
        let mut o = cb.options(port, "acme/dev1", Some(cb.identity("acme", "dev1")));
        let up2 = topics::up_topic(PREFIX, &dev("acme", "dev2"));
        o.set_last_will(LastWill::new(up2, "bye", QoS::AtLeastOnce, false));
        let err = refused(o).await;
        assert!(not_authorized(err), "a will elsewhere");
        // A certificate of a device the authenticator does not know.
        let err = refused(cb.options(port, "acme/dev7", Some(cb.identity("acme", "dev7")))).await;
        assert!(not_authorized(err), "unknown device");
        assert_eq!(cb.broker.certificate_refusals(), 4, "each refusal counted");
        cb.broker.shutdown().await;
    }

    #[tokio::test]
    async fn the_secrets_listener_ignores_client_certificates() {
        let cb = CertBroker::start().await;
        let tls_port = cb.broker.tls_addr().unwrap().port();
        // A valid device certificate but no secret: refused as today.
        let o = cb.options(tls_port, "acme/dev1", Some(cb.identity("acme", "dev1")));
        let err = refused(o).await;
        assert!(
            matches!(
                err,
                ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)
            ),
            "{err:?}"
        );
        // With the secret it connects, certificate or not.
        let mut o = cb.options(tls_port, "acme/dev1", Some(cb.identity("acme", "dev1")));
        o.set_credentials("acme/dev1", "s1");
        let _d1 = Client::connect(o).await;
        assert_eq!(cb.broker.certificate_refusals(), 0);
        cb.broker.shutdown().await;
    }

    #[tokio::test]
    async fn bad_credentials_are_refused() {
        let b = broker().await;
        for (id, user, pass) in [
            ("cloud-service", "service", "wrong"),
            ("acme/dev1", "acme/dev1", "s2"),
            ("x", "nobody", "s1"),
        ] {
            let err = refused(options(&b, id, user, pass)).await;
            assert!(
                matches!(
                    err,
                    ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)
                ),
                "{user}: {err:?}"
            );
        }
        // No credentials at all: anonymous access is off.
        let anonymous = MqttOptions::new("anon", "127.0.0.1", b.local_addr().port());
        let err = refused(anonymous).await;
        assert!(
            matches!(
                err,
                ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword)
            ),
            "{err:?}"
        );
        b.shutdown().await;
    }

    #[tokio::test]
    async fn device_must_use_its_own_client_id() {
        let b = broker().await;
        let mut d2 = dev2(&b).await;
        d2.subscribe_ok(&topics::down_topic(PREFIX, &dev("acme", "dev2")))
            .await;

        // dev1's credentials with dev2's client id (a session takeover attempt), or any other id.
        for id in ["acme/dev2", "acme/dev1/x", "dev1", ""] {
            let err = refused(options(&b, id, "acme/dev1", "s1")).await;
            assert!(
                matches!(
                    err,
                    ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
                ),
                "{id}: {err:?}"
            );
        }

        // dev2's session was not kicked: it still receives its feed.
        let svc = service(&b).await;
        let down2 = topics::down_topic(PREFIX, &dev("acme", "dev2"));
        svc.publish(&down2, "still here").await;
        d2.expect(&down2, "still here").await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn service_receives_device_up_messages() {
        let b = broker().await;
        let mut svc = service(&b).await;
        svc.subscribe_ok(&topics::up_filter(PREFIX)).await;
        let d1 = dev1(&b).await;
        let up1 = topics::up_topic(PREFIX, &dev("acme", "dev1"));
        d1.publish(&up1, "hello").await;
        svc.expect(&up1, "hello").await;
        assert_eq!(
            topics::parse_up_topic(PREFIX, &up1),
            Some(dev("acme", "dev1"))
        );
        b.shutdown().await;
    }

    #[tokio::test]
    async fn a_device_with_its_most_messages_waiting_holds_up_only_itself() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut config = BrokerConfig::new("127.0.0.1:0".parse().unwrap());
        config.device_messages = Some(tx);
        config.limits.max_device_messages_waiting = 2;
        let b = Broker::start(config, Arc::new(FixedAuth)).await.unwrap();
        let (d1, d2) = (dev1(&b).await, dev2(&b).await);
        let up1 = topics::up_topic(PREFIX, &dev("acme", "dev1"));
        let up2 = topics::up_topic(PREFIX, &dev("acme", "dev2"));
        // Nobody takes the messages (a sync loop waiting for its store): dev1's first two wait
        // in the channel, its third waits in its connection.
        let mut taken = Vec::new();
        for i in 0..3 {
            d1.publish(&up1, &format!("d1-{i}")).await;
        }
        for _ in 0..2 {
            let m = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
            taken.push(m);
        }
        assert!(
            timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "dev1's third message waits for a slot"
        );
        // dev2 is not held up by dev1.
        d2.publish(&up2, "d2-0").await;
        let m = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
        assert_eq!(m.into_parts(), (up2.clone(), b"d2-0".to_vec()));
        // Taking one of dev1's frees its slot: its third comes.
        let first = taken.remove(0).into_parts();
        assert_eq!(first, (up1.clone(), b"d1-0".to_vec()));
        let m = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
        assert_eq!(m.into_parts(), (up1, b"d1-2".to_vec()));
        drop(taken);
        b.shutdown().await;
    }

    #[tokio::test]
    async fn device_cannot_publish_elsewhere() {
        let b = broker().await;
        let mut svc = service(&b).await;
        // Everything under the prefix, so that any leak would show.
        svc.subscribe_ok(&format!("{PREFIX}/#")).await;
        let d1 = dev1(&b).await;
        let up1 = topics::up_topic(PREFIX, &dev("acme", "dev1"));
        d1.publish(&topics::up_topic(PREFIX, &dev("acme", "dev2")), "spoofed")
            .await;
        d1.publish(&topics::down_topic(PREFIX, &dev("acme", "dev2")), "to dev2")
            .await;
        d1.publish(&topics::broadcast_topic(PREFIX, "acme"), "broadcast")
            .await;
        d1.publish(&format!("{PREFIX}/acme/dev1/up/x"), "sub-level")
            .await;
        d1.client
            .publish(up1.clone(), QoS::AtLeastOnce, true, b"retained".to_vec())
            .await
            .unwrap();
        // The permitted message after the forbidden ones proves the path works, and that the
        // broker kept the connection open (the client task ends on any connection error).
        d1.publish(&up1, "allowed").await;
        svc.expect(&up1, "allowed").await;
        svc.expect_quiet().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn device_cannot_read_another_device() {
        let b = broker().await;
        let mut d1 = dev1(&b).await;
        let down1 = topics::down_topic(PREFIX, &dev("acme", "dev1"));
        let down2 = topics::down_topic(PREFIX, &dev("acme", "dev2"));
        assert_eq!(d1.subscribe(&down2).await, SubscribeReasonCode::Failure);
        assert_eq!(
            d1.subscribe(&topics::up_topic(PREFIX, &dev("acme", "dev2")))
                .await,
            SubscribeReasonCode::Failure
        );
        d1.subscribe_ok(&down1).await;

        let svc = service(&b).await;
        svc.publish(&down2, "for dev2").await;
        svc.publish(&down1, "for dev1").await;
        d1.expect(&down1, "for dev1").await;
        d1.expect_quiet().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn device_wildcard_subscriptions_are_refused() {
        let b = broker().await;
        let mut d1 = dev1(&b).await;
        for filter in [
            "#".to_string(),
            format!("{PREFIX}/#"),
            format!("{PREFIX}/acme/+/down"),
            format!("{PREFIX}/acme/dev1/#"),
            format!("{PREFIX}/+/dev1/down"),
            topics::up_filter(PREFIX),
            "$SYS/#".to_string(),
        ] {
            assert_eq!(
                d1.subscribe(&filter).await,
                SubscribeReasonCode::Failure,
                "{filter}"
            );
        }
        // Still connected and able to subscribe to what it may.
        d1.subscribe_ok(&topics::down_topic(PREFIX, &dev("acme", "dev1")))
            .await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn device_receives_its_feed_and_its_account_broadcast() {
        let b = broker().await;
        let mut d1 = dev1(&b).await;
        let down1 = topics::down_topic(PREFIX, &dev("acme", "dev1"));
        let acme_all = topics::broadcast_topic(PREFIX, "acme");
        let other_all = topics::broadcast_topic(PREFIX, "other");
        d1.subscribe_ok(&down1).await;
        d1.subscribe_ok(&acme_all).await;
        assert_eq!(d1.subscribe(&other_all).await, SubscribeReasonCode::Failure);

        // Another account's device does receive its own broadcast: the message really flows.
        let mut d9 = Client::connect(options(&b, "other/dev9", "other/dev9", "s9")).await;
        d9.subscribe_ok(&other_all).await;

        let svc = service(&b).await;
        svc.publish(&other_all, "other account").await;
        svc.publish(&down1, "direct").await;
        svc.publish(&acme_all, "to acme").await;
        d9.expect(&other_all, "other account").await;
        let mut got = vec![
            d1.recv(WAIT).await.expect("first"),
            d1.recv(WAIT).await.expect("second"),
        ];
        got.sort();
        let mut want = vec![
            (down1, "direct".to_string()),
            (acme_all, "to acme".to_string()),
        ];
        want.sort();
        assert_eq!(got, want);
        d1.expect_quiet().await;
        b.shutdown().await;
    }

    /// The service's in-process publisher reaches a subscribed device at QoS 1 without any
    /// session of its own, and says when nobody is subscribed.
    #[tokio::test]
    async fn the_in_process_publisher_reaches_subscribed_devices_and_reports_the_rest() {
        use crate::broker_publish::Delivery;
        let b = broker().await;
        let mut d1 = dev1(&b).await;
        let down1 = topics::down_topic(PREFIX, &dev("acme", "dev1"));
        let down2 = topics::down_topic(PREFIX, &dev("acme", "dev2"));
        d1.subscribe_ok(&down1).await;
        let publisher = b.publisher();

        assert_eq!(
            publisher.publish(down1.clone(), b"direct".to_vec()).await,
            Delivery::Queued
        );
        let delivered = loop {
            match d1.next_packet(WAIT).await.expect("nothing delivered") {
                Packet::Publish(p) => break p,
                _ => continue,
            }
        };
        assert_eq!(delivered.topic, down1);
        assert_eq!(&delivered.payload[..], b"direct");
        assert_eq!(delivered.qos, QoS::AtLeastOnce, "QoS 1 to the device");
        assert!(!delivered.retain);

        // Nobody subscribed to dev2's topic (it is not even connected).
        assert_eq!(
            publisher.publish(down2, b"lost".to_vec()).await,
            Delivery::NoSubscriber
        );
        d1.expect_quiet().await;
        // The publisher is no session: the device is the broker's only client.
        assert_eq!(
            b.sessions().client_ids().await,
            vec!["acme/dev1".to_string()]
        );
        b.shutdown().await;
    }

    #[tokio::test]
    async fn device_will_must_be_its_own_up_topic() {
        let b = broker().await;
        let up1 = topics::up_topic(PREFIX, &dev("acme", "dev1"));
        let up2 = topics::up_topic(PREFIX, &dev("acme", "dev2"));
        for (topic, retain) in [(up2.as_str(), false), (up1.as_str(), true)] {
            let mut o = options(&b, "acme/dev1", "acme/dev1", "s1");
            o.set_last_will(LastWill::new(topic, "bye", QoS::AtLeastOnce, retain));
            let err = refused(o).await;
            assert!(
                matches!(
                    err,
                    ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
                ),
                "{topic} {retain}: {err:?}"
            );
        }
        let mut o = options(&b, "acme/dev1", "acme/dev1", "s1");
        o.set_last_will(LastWill::new(up1, "bye", QoS::AtLeastOnce, false));
        let _d1 = Client::connect(o).await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn v5_denied_publish_gets_not_authorized_puback() {
        use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, PubAckReason};
        use rumqttc::v5::mqttbytes::QoS as QoS5;
        use rumqttc::v5::{AsyncClient as Client5, Event as Event5, MqttOptions as Options5};

        let b = broker().await;
        let mut svc = service(&b).await;
        svc.subscribe_ok(&topics::up_filter(PREFIX)).await;

        let mut o = Options5::new("acme/dev1", "127.0.0.1", b.local_addr().port());
        o.set_credentials("acme/dev1", "s1");
        let (client, mut eventloop) = Client5::new(o, 10);
        let up1 = topics::up_topic(PREFIX, &dev("acme", "dev1"));
        client
            .publish(
                topics::up_topic(PREFIX, &dev("acme", "dev2")),
                QoS5::AtLeastOnce,
                false,
                "spoofed",
            )
            .await
            .unwrap();
        let reason = timeout(WAIT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event5::Incoming(Packet5::PubAck(ack))) => return Ok(ack.reason),
                    Ok(_) => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("no PUBACK in time");
        // rumqttc 0.25 reports the refusal as a PUBACK with its reason (0.24 made it an error).
        match reason {
            Ok(r) => assert_eq!(r, PubAckReason::NotAuthorized),
            Err(e) => panic!("expected a not-authorized PUBACK, got {e:?}"),
        }

        // The broker keeps the connection (see `device_cannot_publish_elsewhere`); an allowed
        // publish then goes through.
        client
            .publish(up1.clone(), QoS5::AtLeastOnce, false, "allowed")
            .await
            .unwrap();
        let acked = timeout(WAIT, async {
            loop {
                if let Event5::Incoming(Packet5::PubAck(ack)) = eventloop.poll().await.unwrap() {
                    return ack;
                }
            }
        })
        .await
        .expect("no PUBACK in time");
        assert_eq!(acked.reason, PubAckReason::Success);
        svc.expect(&up1, "allowed").await;
        svc.expect_quiet().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_frees_the_port_and_closes_sessions() {
        let b = broker().await;
        let addr = b.local_addr();
        assert_ne!(addr.port(), 0);
        let mut d1 = dev1(&b).await;
        d1.subscribe_ok(&topics::down_topic(PREFIX, &dev("acme", "dev1")))
            .await;
        b.shutdown().await;

        // The session was closed: the client's event loop ends (its task drops the sender).
        timeout(WAIT, async { while d1.incoming.recv().await.is_some() {} })
            .await
            .expect("session not closed");
        // The port is free again.
        std::net::TcpListener::bind(addr).expect("port still bound");
    }

    #[tokio::test]
    async fn start_reports_bind_and_config_errors() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = Broker::start(BrokerConfig::new(addr), Arc::new(FixedAuth))
            .await
            .unwrap_err();
        assert!(
            matches!(err, BrokerError::Bind { addr: a, .. } if a == addr),
            "{err:?}"
        );
        assert!(err.to_string().contains(&addr.to_string()), "{err}");

        let mut config = BrokerConfig::new("127.0.0.1:0".parse().unwrap());
        config.limits.max_inflight = 0;
        let err = Broker::start(config, Arc::new(FixedAuth))
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::Config(_)), "{err:?}");

        let mut config = BrokerConfig::new("127.0.0.1:0".parse().unwrap());
        config.topic_prefix = "a/+".into();
        let err = Broker::start(config, Arc::new(FixedAuth))
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::Config(_)), "{err:?}");
    }
}
