//! Webhook delivery: each webhook of the store has one task that posts the account's changes
//! after its cursor to its URL, signed, in order, and moves the cursor only after a 2xx answer.
//!
//! This module exists so a backend learns of changes without holding a connection open: the
//! cloud calls it. Nothing is queued apart from the change log itself: a webhook's durable
//! cursor is its queue, so a receiver that is down for an hour gets everything afterwards (as
//! long as the log's retention still holds it; otherwise the next delivery tells of the `gap`),
//! and a cloud restart resumes every webhook where its cursor stands.
//!
//! Delivery is at least once: a batch the receiver acknowledged may be posted again if the cloud
//! stops between the 2xx and recording it. Receivers deduplicate by (key, version) (or by the
//! `X-Devtables-Delivery` id of a whole batch). While the receiver answers 2xx, every change is
//! posted exactly once, in sequence order, one batch at a time per webhook.
//!
//! Each post carries `X-Devtables-Timestamp` (Unix seconds, fresh at every attempt) and
//! `X-Devtables-Signature: sha256=<hex HMAC-SHA256 of "{timestamp}.{body}" keyed with the
//! webhook's secret>` ([`sign`]); a receiver checks both and refuses old timestamps, so a
//! captured request cannot be replayed later. docs/api.md shows the check in Python.
//!
//! Failed attempts wait with exponential backoff and jitter (`webhook_retry_min` doubling to
//! `webhook_retry_max`), and at most `webhook_in_flight` posts run at once over all webhooks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use ring::hmac;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use tokio::sync::{watch, OnceCell, Semaphore};
use tokio::task::JoinSet;

use crate::config::ChangesConfig;
use crate::status::SyncStatus;
use crate::store::{
    ChangeEvent, ChangeQuery, ChangeRead, StoreError, WebhookAttempt, WebhookRecord,
};
use crate::store_thread::{wall_ms, StoreGone, StoreHandle};

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-devtables-signature";
/// The header carrying the signing time, in Unix seconds.
pub const TIMESTAMP_HEADER: &str = "x-devtables-timestamp";
/// The header naming the webhook.
pub const WEBHOOK_HEADER: &str = "x-devtables-webhook";
/// The header naming the batch: `{webhook}-{after}-{through}`, the same on every retry.
pub const DELIVERY_HEADER: &str = "x-devtables-delivery";

/// Longest URL a webhook may have.
pub const MAX_URL_BYTES: usize = 2048;
/// Most bytes of an answer's body read (and quoted, cut, in `last_error`); a longer answer's
/// connection is not reused.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How much of a failed answer's body `last_error` quotes.
const ERROR_QUOTE_CHARS: usize = 200;
/// How often a webhook whose filter left out everything since its cursor records the cursor it
/// moved to (a restart re-examines at most this much).
const SKIP_RECORD_EVERY: Duration = Duration::from_secs(5);

/// The signature of a delivery: `sha256=` and the hex HMAC-SHA256, keyed with the secret's
/// bytes, of the timestamp (decimal Unix seconds), a dot, and the body.
pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("sha256={}", hex::encode(ctx.sign().as_ref()))
}

/// A fresh webhook secret: `whsec_` and 32 random bytes in hex.
pub(crate) fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut bytes);
    format!("whsec_{}", hex::encode(bytes))
}

/// Where a webhook posts, checked once at creation and again at each start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    https: bool,
    /// Without IPv6 brackets.
    host: String,
    port: u16,
    /// `Host:` as the URL gives it.
    authority: String,
    /// Path and query (`/` when the URL has none).
    path: String,
}

impl Target {
    /// Deliveries cross the network readable.
    pub(crate) fn is_clear_text(&self) -> bool {
        !self.https
    }
}

/// Reads a webhook URL: `http://` or `https://`, a host, an optional port, path and query; no
/// user info, no fragment.
pub(crate) fn parse_url(url: &str) -> Result<Target, String> {
    if url.len() > MAX_URL_BYTES {
        return Err(format!("the URL is longer than {MAX_URL_BYTES} bytes"));
    }
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{url:?} names no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "{url:?} holds user information: the signature authenticates the cloud, put no \
             credentials in the URL"
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    Ok(Target {
        https,
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        authority: authority.as_str().to_string(),
        path: uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string()),
    })
}

/// A gap in a delivery: changes after `after`, up to and including `through`, were removed by
/// retention before they could be delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub after: u64,
    pub through: u64,
}

/// The body of one delivery.
#[derive(Serialize)]
struct Delivery<'a> {
    webhook: &'a str,
    account: &'a str,
    changes: &'a [ChangeEvent],
    #[serde(skip_serializing_if = "Option::is_none")]
    gap: Option<Gap>,
}

/// One batch to deliver, kept whole across retries.
struct Batch {
    after: u64,
    /// The cursor once it is delivered.
    through: u64,
    changes: Vec<ChangeEvent>,
    gap: Option<Gap>,
    body: Bytes,
}

/// The service's webhooks: starts, stops and awaits their delivery tasks.
#[derive(Clone)]
pub(crate) struct Webhooks {
    shared: Arc<Shared>,
}

struct Shared {
    store: StoreHandle,
    config: ChangesConfig,
    status: Arc<SyncStatus>,
    shutdown: watch::Receiver<bool>,
    /// At most `webhook_in_flight` posts at once.
    in_flight: Semaphore,
    /// The stop signal of each running webhook's task.
    running: Mutex<HashMap<String, watch::Sender<bool>>>,
    tasks: Mutex<JoinSet<()>>,
    /// The TLS settings of `https` receivers, made on first use (reading the system's CAs).
    https: OnceCell<Result<Arc<rustls::ClientConfig>, String>>,
    /// Whether this node leads (a scaled-out cloud delivers each webhook from one node).
    serving: watch::Receiver<crate::cluster::Serving>,
}

impl Webhooks {
    pub(crate) fn new(
        store: StoreHandle,
        config: ChangesConfig,
        status: Arc<SyncStatus>,
        shutdown: watch::Receiver<bool>,
        serving: watch::Receiver<crate::cluster::Serving>,
    ) -> Webhooks {
        Webhooks {
            shared: Arc::new(Shared {
                store,
                in_flight: Semaphore::new(config.webhook_in_flight),
                config,
                status,
                shutdown,
                running: Mutex::new(HashMap::new()),
                tasks: Mutex::new(JoinSet::new()),
                https: OnceCell::new(),
                serving,
            }),
        }
    }

    /// Starts delivering every webhook of the store (at service start).
    pub(crate) async fn resume_all(&self) -> Result<usize, StoreError> {
        let hooks = match self.shared.store.call(|c| c.store.webhooks(None)).await {
            Ok(hooks) => hooks?,
            Err(StoreGone) => return Ok(0),
        };
        let n = hooks.len();
        for hook in hooks {
            self.start(hook);
        }
        Ok(n)
    }

    /// Starts delivering `hook` (nothing when it already runs).
    pub(crate) fn start(&self, hook: WebhookRecord) {
        let (stop_tx, stop) = watch::channel(false);
        {
            let mut running = self
                .shared
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if running.contains_key(&hook.id) {
                return;
            }
            running.insert(hook.id.clone(), stop_tx);
        }
        self.shared
            .status
            .webhooks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shared = self.shared.clone();
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .spawn(async move {
                let id = hook.id.clone();
                deliver(&shared, hook, stop).await;
                shared
                    .running
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                shared
                    .status
                    .webhook_pending_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                shared
                    .status
                    .webhooks
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            });
    }

    /// Stops delivering webhook `id` (deleted): an attempt in flight is abandoned.
    pub(crate) fn stop(&self, id: &str) {
        let stop = self
            .shared
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(stop) = stop {
            let _ = stop.send(true);
        }
    }

    /// Waits for every delivery task to end (they end on the service's shutdown signal).
    pub(crate) async fn join(&self) {
        let mut tasks = std::mem::take(
            &mut *self
                .shared
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        while tasks.join_next().await.is_some() {}
    }
}

/// What ends a webhook's task: its own stop (deleted) or the service's shutdown.
struct Stop {
    own: watch::Receiver<bool>,
    service: watch::Receiver<bool>,
}

impl Stop {
    /// Completes once either signal is given (or its sender is gone).
    async fn wait(&mut self) {
        tokio::select! {
            _ = self.own.wait_for(|stop| *stop) => {}
            _ = self.service.wait_for(|stop| *stop) => {}
        }
    }
}

/// The wait before attempt `failures + 1`: `min` doubling with each failure up to `max`, then
/// a uniform draw from its upper half (jitter, so receivers that come back are not hit by
/// every webhook at once).
fn backoff(failures: u64, min: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let doublings = failures.saturating_sub(1).min(32) as u32;
    let full = min.saturating_mul(2u32.saturating_pow(doublings)).min(max);
    let half = full / 2;
    half + Duration::from_nanos(rng.gen_range(0..=(full - half).as_nanos() as u64))
}

/// The delivery task of one webhook, until it is deleted or the service stops.
async fn deliver(shared: &Shared, hook: WebhookRecord, stop: watch::Receiver<bool>) {
    let mut stop = Stop {
        own: stop,
        service: shared.shutdown.clone(),
    };
    let target = match parse_url(&hook.url) {
        Ok(t) => t,
        Err(e) => {
            // Checked at creation: only a store edited by hand gets here.
            tracing::error!(webhook = %hook.id, "webhook not delivered: {e}");
            return;
        }
    };
    let mut changes = shared.store.changes();
    let mut cursor = hook.cursor;
    let mut recorded_cursor = hook.cursor;
    let mut skip_recorded = Instant::now();
    let mut failures = hook.failures;
    let mut connection: Option<SendRequest<Full<Bytes>>> = None;
    let mut last_read: Option<Instant> = None;
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut serving = shared.serving.clone();
    loop {
        // In a scaled-out cloud only the leading node delivers; the cursor is in the store, so
        // the node that leads next goes on from it (a batch in flight at a hand-over may be
        // delivered twice: deliveries are at least once).
        let mut waited = false;
        while !serving.borrow_and_update().leads() {
            connection = None;
            waited = true;
            tokio::select! {
                changed = serving.changed() => if changed.is_err() { break },
                _ = stop.wait() => return,
            }
        }
        if waited {
            // Another node delivered meanwhile: go on from the cursor it recorded.
            let id = hook.id.clone();
            match shared.store.call(move |c| c.store.webhook(&id)).await {
                Ok(Ok(Some(stored))) => {
                    cursor = cursor.max(stored.cursor);
                    recorded_cursor = recorded_cursor.max(stored.cursor);
                    failures = stored.failures;
                }
                // Deleted meanwhile, or the service is stopping.
                Ok(Ok(None)) | Err(StoreGone) => return,
                Ok(Err(e)) => {
                    tracing::warn!(webhook = %hook.id, "cannot read the webhook's cursor: {e}");
                }
            }
        }
        // A busy store wakes this task at most every `read_interval`.
        if let Some(at) = last_read {
            let next = at + shared.config.read_interval;
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = stop.wait() => return,
            }
        }
        changes.borrow_and_update();
        last_read = Some(Instant::now());
        let batch = match next_batch(shared, &hook, cursor).await {
            Ok(Next::Batch(batch)) => batch,
            Ok(Next::Nothing { next, caught_up }) => {
                // Nothing to deliver up to `next`: the filter left those entries out.
                cursor = cursor.max(next);
                if cursor > recorded_cursor && skip_recorded.elapsed() >= SKIP_RECORD_EVERY {
                    let skipped = WebhookAttempt::Skipped { cursor };
                    match record(shared, &hook.id, skipped).await {
                        Some(true) => {
                            recorded_cursor = cursor;
                            skip_recorded = Instant::now();
                        }
                        Some(false) | None => return,
                    }
                }
                if caught_up {
                    set_pending(shared, &hook.id, None);
                    tokio::select! {
                        changed = changes.changed() => if changed.is_err() { return },
                        _ = stop.wait() => return,
                    }
                } else {
                    // More entries to examine: at once.
                    last_read = None;
                }
                continue;
            }
            Err(ReadFailed::Gone) => return,
            Err(ReadFailed::Store(e)) => {
                tracing::warn!(webhook = %hook.id, "cannot read the change log for a webhook: {e}");
                failures += 1;
                let wait = backoff(
                    failures,
                    shared.config.webhook_retry_min,
                    shared.config.webhook_retry_max,
                    &mut rng,
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait() => return,
                }
                continue;
            }
        };
        let pending_since = batch.changes.first().map_or(wall_ms(), |c| c.at_ms);
        set_pending(shared, &hook.id, Some(pending_since));
        // The batch, until the receiver takes it.
        loop {
            let attempt = tokio::select! {
                permit = shared.in_flight.acquire() => {
                    let Ok(_permit) = permit else { return };
                    post(shared, &target, &hook, &batch, &mut connection).await
                }
                _ = stop.wait() => return,
            };
            let outcome = match attempt {
                Ok(status) if (200..300).contains(&status) => WebhookAttempt::Delivered {
                    status,
                    cursor: batch.through,
                    changes: batch.changes.len() as u64,
                    gap: batch.gap.is_some(),
                },
                Ok(status) => WebhookAttempt::Failed {
                    status: Some(status),
                    error: format!("the receiver answered HTTP {status}"),
                },
                Err(error) => WebhookAttempt::Failed {
                    status: None,
                    error,
                },
            };
            let ok = matches!(outcome, WebhookAttempt::Delivered { .. });
            count(shared, &outcome);
            if let WebhookAttempt::Failed { error, .. } = &outcome {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(webhook = %hook.id, url = %hook.url, "webhook delivery failed; retrying with backoff: {error}");
                }
            } else if failures > 0 {
                tracing::info!(webhook = %hook.id, failures, "webhook delivered again after failures");
                failures = 0;
            }
            match record(shared, &hook.id, outcome).await {
                Some(true) => {}
                // Deleted meanwhile, or the store stopped.
                Some(false) | None => return,
            }
            if ok {
                cursor = batch.through;
                recorded_cursor = cursor;
                break;
            }
            let wait = backoff(
                failures,
                shared.config.webhook_retry_min,
                shared.config.webhook_retry_max,
                &mut rng,
            );
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait() => return,
            }
        }
        // Delivered: read on at once.
        last_read = None;
    }
}

enum ReadFailed {
    Gone,
    Store(StoreError),
}

/// What a read of the log after a webhook's cursor found.
enum Next {
    /// Changes to deliver (cut to the body limit), or a gap when retention removed changes
    /// after the cursor.
    Batch(Batch),
    /// Nothing to deliver up to `next`; `caught_up` when that is the account's head (else more
    /// entries remain to examine).
    Nothing { next: u64, caught_up: bool },
}

/// Reads the log after `cursor` for `hook`.
async fn next_batch(
    shared: &Shared,
    hook: &WebhookRecord,
    cursor: u64,
) -> Result<Next, ReadFailed> {
    let query = ChangeQuery {
        account: hook.account.clone(),
        after: cursor,
        model: hook.model.clone(),
        device: None,
        limit: shared.config.webhook_batch,
        scan: shared.config.max_scan,
    };
    let read = shared
        .store
        .call(move |c| c.store.read_changes(&query))
        .await
        .map_err(|StoreGone| ReadFailed::Gone)?
        .map_err(ReadFailed::Store)?;
    let (changes, through, gap) = match read {
        ChangeRead::Expired { floor, .. } => (
            Vec::new(),
            floor,
            Some(Gap {
                after: cursor,
                through: floor,
            }),
        ),
        ChangeRead::Page(page) if page.changes.is_empty() => {
            return Ok(Next::Nothing {
                next: page.next,
                caught_up: page.next >= page.head,
            })
        }
        ChangeRead::Page(page) => {
            let mut changes = page.changes;
            let mut through = page.next;
            // Cut before the change that would pass the body limit (one change always goes).
            let mut size = 0;
            let mut keep = changes.len();
            for (i, c) in changes.iter().enumerate() {
                size += serde_json::to_vec(c).map_or(0, |v| v.len()) + 1;
                if i > 0 && size > shared.config.webhook_max_body_bytes {
                    keep = i;
                    break;
                }
            }
            if keep < changes.len() {
                changes.truncate(keep);
                through = changes[keep - 1].seq;
            }
            (changes, through, None)
        }
    };
    let body = serde_json::to_vec(&Delivery {
        webhook: &hook.id,
        account: &hook.account,
        changes: &changes,
        gap,
    })
    .map_err(|e| ReadFailed::Store(StoreError::Database(format!("encoding a delivery: {e}"))))?;
    Ok(Next::Batch(Batch {
        after: cursor,
        through,
        changes,
        gap,
        body: Bytes::from(body),
    }))
}

/// Records an attempt; `Some(false)` when the webhook was deleted, `None` when the store stopped.
async fn record(shared: &Shared, id: &str, attempt: WebhookAttempt) -> Option<bool> {
    let id = id.to_string();
    match shared
        .store
        .call(move |c| c.store.record_webhook_attempt(&id, &attempt, wall_ms()))
        .await
    {
        Ok(Ok(exists)) => Some(exists),
        Ok(Err(e)) => {
            // The attempt happened; only its record is lost (the cursor then trails, and a
            // restart delivers the batch again: at least once).
            tracing::warn!("cannot record a webhook delivery: {e}");
            Some(true)
        }
        Err(StoreGone) => None,
    }
}

fn count(shared: &Shared, attempt: &WebhookAttempt) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &shared.status;
    match attempt {
        WebhookAttempt::Delivered { changes, gap, .. } => {
            s.webhook_deliveries_ok.fetch_add(1, Relaxed);
            s.webhook_changes_delivered.fetch_add(*changes, Relaxed);
            if *gap {
                s.webhook_gaps.fetch_add(1, Relaxed);
            }
        }
        WebhookAttempt::Failed { .. } => {
            s.webhook_deliveries_failed.fetch_add(1, Relaxed);
        }
        WebhookAttempt::Skipped { .. } => {}
    }
}

fn set_pending(shared: &Shared, id: &str, since: Option<u64>) {
    let mut pending = shared
        .status
        .webhook_pending_since
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    match since {
        Some(at) => {
            pending.insert(id.to_string(), at);
        }
        None => {
            pending.remove(id);
        }
    }
}

/// One attempt: the batch posted, signed now, on the webhook's kept-alive connection (made
/// anew when it is gone); the answer's status, or why there was none.
async fn post(
    shared: &Shared,
    target: &Target,
    hook: &WebhookRecord,
    batch: &Batch,
    connection: &mut Option<SendRequest<Full<Bytes>>>,
) -> Result<u16, String> {
    let attempt = async {
        let sender = match connection.take() {
            Some(s) if !s.is_closed() => s,
            _ => connect(shared, target).await?,
        };
        let mut sender = sender;
        sender
            .ready()
            .await
            .map_err(|e| format!("the connection to the receiver failed: {e}"))?;
        let timestamp = wall_ms() / 1000;
        let request = hyper::Request::post(&target.path)
            .header(hyper::header::HOST, &target.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, "devtables-webhook/1")
            .header(WEBHOOK_HEADER, &hook.id)
            .header(
                DELIVERY_HEADER,
                format!("{}-{}-{}", hook.id, batch.after, batch.through),
            )
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, sign(&hook.secret, timestamp, &batch.body))
            .body(Full::new(batch.body.clone()))
            .map_err(|e| format!("building the request: {e}"))?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| format!("the receiver did not answer: {e}"))?;
        let status = answer.status().as_u16();
        // Read the answer (bounded) so the connection can carry the next delivery.
        // Too long or cut: the connection is not reused.
        if let Ok(body) = Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
        {
            *connection = Some(sender);
            if !(200..300).contains(&status) {
                let text = String::from_utf8_lossy(&body.to_bytes())
                    .chars()
                    .take(ERROR_QUOTE_CHARS)
                    .collect::<String>();
                if !text.trim().is_empty() {
                    tracing::debug!(webhook = %hook.id, status, "receiver said: {text}");
                }
            }
        }
        Ok(status)
    };
    match tokio::time::timeout(shared.config.webhook_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => {
            *connection = None;
            Err(format!(
                "no answer within {:?} (webhook_timeout_secs)",
                shared.config.webhook_timeout
            ))
        }
    }
}

async fn connect(shared: &Shared, target: &Target) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", target.authority))?;
    let _ = tcp.set_nodelay(true);
    if !target.https {
        return handshake(TokioIo::new(tcp)).await;
    }
    let config = shared
        .https
        .get_or_init(|| async {
            let ca = shared.config.webhook_ca.clone();
            tokio::task::spawn_blocking(move || https_config(ca.as_deref()))
                .await
                .unwrap_or_else(|e| Err(format!("loading the CA certificates failed: {e}")))
        })
        .await
        .clone()?;
    let name = ServerName::try_from(target.host.clone())
        .map_err(|e| format!("{} is not a valid TLS server name: {e}", target.host))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {} failed: {e}", target.authority))?;
    handshake(TokioIo::new(tls)).await
}

async fn handshake<T>(io: TokioIo<T>) -> Result<SendRequest<Full<Bytes>>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP/1.1 with the receiver failed: {e}"))?;
    // The connection's own task; it ends with the connection (the sender dropped or the peer
    // gone).
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// The TLS settings for `https` receivers: the system's CAs and `webhook_ca`, ring provider.
fn https_config(extra_ca: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read webhook_ca {}: {e}", path.display()))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| format!("cannot read webhook_ca {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("webhook_ca {}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no CA certificate to check an https receiver with: the system has none and \
             webhook_ca is not set"
                .into(),
        );
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS settings: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_signature_is_the_hmac_of_timestamp_dot_body() {
        // RFC 4231 test case 2 checks ring; this checks what is signed: "{ts}.{body}".
        let a = sign("whsec_k", 1_700_000_000, b"{\"changes\":[]}");
        let b = sign("whsec_k", 1_700_000_000, b"{\"changes\":[]} ");
        let c = sign("whsec_k", 1_700_000_001, b"{\"changes\":[]}");
        let d = sign("whsec_x", 1_700_000_000, b"{\"changes\":[]}");
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64, "{a}");
        assert!(a != b && a != c && a != d, "body, time and key all count");
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"whsec_k");
        let expected = hmac::sign(&key, b"1700000000.{\"changes\":[]}");
        assert_eq!(a, format!("sha256={}", hex::encode(expected.as_ref())));
        // A known vector (computed independently with Python's hmac module).
        assert_eq!(
            sign("key", 1, b"body"),
            "sha256=91b5374b153842ad05b2c4eab9349b8321b14703165bd3fb8b034dfb8be98ae5"
        );
    }

    #[test]
    fn webhook_urls_are_http_or_https_with_a_host_and_no_credentials() {
        let t = parse_url("https://hooks.example.com/devtables?x=1").unwrap();
        assert_eq!(
            t,
            Target {
                https: true,
                host: "hooks.example.com".into(),
                port: 443,
                authority: "hooks.example.com".into(),
                path: "/devtables?x=1".into(),
            }
        );
        let t = parse_url("http://[::1]:8081").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 8081, "/")
        );
        for bad in [
            "ftp://x/y",
            "hooks.example.com/x",
            "http://user:pw@x/y",
            "http:///path",
            "not a url",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(parse_url(&format!("http://x/{}", "a".repeat(MAX_URL_BYTES))).is_err());
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for failures in 1..=12u64 {
            let full = (min * 2u32.pow((failures - 1).min(20) as u32)).min(max);
            for _ in 0..50 {
                let d = backoff(failures, min, max, &mut rng);
                assert!(d >= full / 2 && d <= full, "{failures}: {d:?} vs {full:?}");
            }
        }
        assert!(backoff(1000, min, max, &mut rng) <= max);
    }
}
