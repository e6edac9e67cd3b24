//! Counters and gauges of the sync loop, shared with the HTTP API (`GET /ready`,
//! `GET /v1/status`, and `GET /metrics` through [`crate::metrics`]).
//!
//! This module exists so that nothing the cloud drops, refuses or skips goes unnoticed: the
//! sync loop counts it here and warns (rate-limited), and operators read the numbers without
//! reading logs. It also carries the two facts readiness depends on (broker connected, device
//! topics subscribed).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

pub(crate) use crate::warn_limit::WarnLimiter;

/// Live numbers of the sync loop. Written by the sync loop and the MQTT task, read by the API.
#[derive(Debug, Default)]
pub struct SyncStatus {
    /// The ingress MQTT connections (device messages in): how many there are and how many are
    /// up (CONNACK received, not lost since). `broker_connected` is all of them up. With the
    /// embedded broker there is no connection (device messages come in-process): one, up.
    pub(crate) ingress_links: LinkCount,
    /// The egress MQTT connections (publishes to devices), as `ingress_links`:
    /// `egress_connected` is all of them up.
    pub(crate) egress_links: LinkCount,
    /// Every device-topic filter is subscribed on every ingress connection (SUBACKs with
    /// success codes).
    pub(crate) subscribed: AtomicBool,
    /// Subscribe requests sent since start (retries included).
    pub(crate) subscribe_attempts: AtomicU64,
    /// Ingress connections given up after the broker refused or left unanswered three
    /// subscriptions in a row (the next attempt goes to the next broker address).
    pub(crate) subscriptions_abandoned: AtomicU64,
    /// Path probes published through an external broker, and those that came back through
    /// the subscription ([`crate::probe`]).
    pub(crate) probes_sent: AtomicU64,
    pub(crate) probes_heard: AtomicU64,
    /// Times every connection was made again because three probes in a row did not come back.
    pub(crate) probe_verdicts: AtomicU64,
    /// Filters held, summed over the ingress connections.
    pub(crate) subscriptions_held: AtomicU64,
    /// Device sessions the engine tracks.
    pub(crate) sessions: AtomicU64,
    /// Devices still to be prompted after a start, a restored broker link or a broadcast (paced).
    pub(crate) prompts_pending: AtomicU64,
    /// Feed wake-ups of a write that advanced more feeds than one pacing tick releases (a
    /// broadcast to a large account), sent through the paced queue.
    pub(crate) feed_wakeups_paced: AtomicU64,
    /// Broadcast fan-out steps committed (each reached at most `fanout_batch` devices).
    pub(crate) fanout_steps: AtomicU64,
    /// Devices the fan-out steps reached (beyond those each broadcast's own write reached).
    pub(crate) fanout_devices: AtomicU64,
    /// Fan-out steps that failed (retried at the next wake-up or sweep).
    pub(crate) fanout_errors: AtomicU64,
    /// Device sessions dropped because the broker link came back with a clean session (each
    /// device is prompted to say hello again).
    pub(crate) sessions_restarted: AtomicU64,
    /// Publishes handed to the MQTT client, or (embedded broker) queued to the device's
    /// broker session.
    pub(crate) publishes_queued: AtomicU64,
    /// Publishes the embedded broker could not deliver when they were handed over: no session
    /// subscribed to the device's topic (offline, not subscribed yet) or its connection gone.
    /// Counted and warned about; the engine's timers and the device's next hello recover. (An
    /// external broker says nothing of it: 0 there.)
    pub(crate) publishes_undelivered: AtomicU64,
    /// Group commits of the store thread (each made the work of one or more of the sync loop's
    /// store jobs durable at once).
    pub(crate) store_commits: AtomicU64,
    /// Store jobs made durable by those commits: `store_jobs_committed / store_commits` is the
    /// mean group size, how much group commit saves under load.
    pub(crate) store_jobs_committed: AtomicU64,
    /// Group commits that failed (every job of the group was answered as failed: pushes are
    /// not acknowledged, and the devices resend them).
    pub(crate) store_commit_failures: AtomicU64,
    /// Publishes that could not be queued (the client refused them: it is shutting down). A
    /// full request queue never drops a publish: it waits ([`Self::egress_waits`]).
    pub(crate) publishes_dropped: AtomicU64,
    /// Times a publish found the egress request queue full and the sync loop paused (it reads
    /// no device message until the publish is queued): backpressure, nothing dropped.
    pub(crate) egress_waits: AtomicU64,
    /// Times a store job found every slot taken (`sync_store_jobs` out) or the store's queue
    /// full (the API's calls share it), and the sync loop paused: it reads no device message
    /// until the job is queued, so a cloud whose store is behind does not spend the CPU the
    /// store needs on reading, decoding and refusing more pushes (receive livelock).
    /// Backpressure, nothing dropped.
    pub(crate) store_waits: AtomicU64,
    /// Messages the embedded broker dropped on their way to a client (its session's queue was
    /// full, or it had gone): counted and warned about; the protocol's retransmission and the
    /// feed recover them.
    pub(crate) broker_drops: Arc<AtomicU64>,
    /// Publishes that were queued or unacknowledged when the connection dropped: the client
    /// discards them on the new (clean) session; the engine's timers resend what matters.
    pub(crate) publishes_lost: AtomicU64,
    /// Requests waiting in the MQTT client's request queue (an exact count but for a short
    /// window after a disconnect).
    pub(crate) mqtt_requests_queued: AtomicU64,
    /// Store jobs of the sync loop queued or running.
    pub(crate) store_jobs_in_flight: AtomicU64,
    /// Store jobs of the sync loop that failed (each is logged).
    pub(crate) store_errors: AtomicU64,
    /// Stored rows skipped in a page because they can never fit a message or cannot be read
    /// (each is also recorded on its device's `last_error`).
    pub(crate) rows_skipped: AtomicU64,
    /// Messages on topics the service does not serve.
    pub(crate) foreign_messages: AtomicU64,
    /// HTTP API requests refused for want of a valid API key (401).
    pub(crate) api_unauthorized: AtomicU64,
    /// HTTP API requests whose key may not do what they asked (403).
    pub(crate) api_forbidden: AtomicU64,
    /// Pushes refused because their device was revoked before they reached the store.
    pub(crate) pushes_revoked: AtomicU64,
    /// Connections to the HTTP API whose TLS handshake failed or timed out.
    pub(crate) api_tls_handshakes_failed: AtomicU64,
    /// CONNECTs the embedded broker's device-certificate listener refused (shared with the
    /// broker, which counts them).
    pub(crate) mqtt_certificates_refused: Arc<AtomicU64>,
    /// Device messages not processed because their device was over its message rate (the
    /// engine's count; per device in `messages_rate_limited`).
    pub(crate) device_messages_rate_limited: AtomicU64,
    /// Device pushes not taken because their device had too many being applied.
    pub(crate) device_pushes_busy: AtomicU64,
    /// Pushed changes not applied again because a push of the same session still being applied
    /// carries the same key and version (the device's timer fired while the cloud held the
    /// original): the original's answer answers the copy. Not a loss: what a busy cloud saves.
    pub(crate) device_push_changes_covered: AtomicU64,
    /// Pushes not taken because every change of theirs was covered that way (or answered
    /// again from memory: no store job).
    pub(crate) device_pushes_covered: AtomicU64,
    /// Pushed changes answered `applied` again without a store job: a copy that queued behind
    /// its original (in the broker's handover, while the cloud was behind) and reached the
    /// engine after the original was answered.
    pub(crate) device_push_changes_reanswered: AtomicU64,
    /// Device messages answered with an error (undecodable, too large, another protocol
    /// version, a bad schema string, too many changes in a push).
    pub(crate) device_messages_refused: AtomicU64,
    /// Device messages from a device without a session (answered `no_session`, not processed).
    pub(crate) device_messages_without_session: AtomicU64,
    /// Pushes sent in an earlier session of their device (delayed past its next hello): not
    /// applied; the device resends their changes.
    pub(crate) device_pushes_of_ended_sessions: AtomicU64,
    /// Push acknowledgements not sent because the push was taken in an earlier session of its
    /// device: the device resends the changes, answered as duplicates.
    pub(crate) device_acks_dropped: AtomicU64,
    /// Welcomes that found the cloud holding less than the device heard from it (the cloud was
    /// restored from a backup): the device re-pushes what it holds.
    pub(crate) restores_detected: AtomicU64,
    /// Full resyncs started (new devices, cursors past retention or beyond the feed's head,
    /// restores).
    pub(crate) resyncs_started: AtomicU64,
    /// Pushed changes refused for a device quota (rows, bytes) or their item's size.
    pub(crate) changes_over_quota: AtomicU64,
    /// HTTP API requests refused with 429 because their key was over its request rate.
    pub(crate) api_rate_limited: AtomicU64,
    /// Messages received on device topics (each handed to the engine, whatever it then makes of
    /// it). Messages out are `publishes_queued`.
    pub(crate) messages_in: AtomicU64,
    /// Payload bytes of those messages.
    pub(crate) bytes_in: AtomicU64,
    /// Payload bytes of the publishes queued to devices.
    pub(crate) bytes_out: AtomicU64,
    /// Pushed changes the cloud answered `applied` (a resend of a version already stored is
    /// answered `applied` again; a device's own `changes_applied` counts only writes).
    pub(crate) push_changes_applied: AtomicU64,
    /// Pushed changes answered `stale`: a higher version was stored (superseded).
    pub(crate) push_changes_superseded: AtomicU64,
    /// Pushed changes answered `rejected` (`changes_over_quota` is a part of them).
    pub(crate) push_changes_rejected: AtomicU64,
    /// Pushed changes applied with fields or enum values the cloud's schema does not define,
    /// kept whole: the device runs a neighbouring (newer) schema version.
    pub(crate) push_changes_kept_from_neighbour: AtomicU64,
    /// Pushed changes answered `newer_schema`: the device runs a newer schema whose model the
    /// cloud lacks; the device keeps them and sends them again in its next session.
    pub(crate) push_changes_deferred: AtomicU64,
    /// Feed entries the connected devices have not acknowledged, summed over the sessions
    /// (updated at most once a second).
    pub(crate) feed_lag_entries: AtomicU64,
    /// The largest lag of one session, in feed entries.
    pub(crate) feed_lag_max: AtomicU64,
    /// Sessions with feed entries not acknowledged.
    pub(crate) sessions_behind: AtomicU64,
    /// Sessions in a full resync.
    pub(crate) sessions_resyncing: AtomicU64,
    /// How long the sync loop's store jobs take on the store thread (not in the JSON status: a
    /// histogram, shown by `GET /metrics`).
    pub(crate) store_job_latency: crate::metrics::StoreJobLatency,
    /// The change log's highest sequence number (committed work).
    pub(crate) change_log_head: AtomicU64,
    /// Entries the change log holds, over every account (as the last retention pass counted).
    pub(crate) change_log_rows: AtomicU64,
    /// Readers of the change log waiting now: SSE streams and waiting long polls.
    pub(crate) change_readers: AtomicU64,
    /// Changes served to readers (SSE events and long-poll answers).
    pub(crate) changes_served: AtomicU64,
    /// Reads answered `cursor_expired` (410, or an SSE `expired` event): the reader missed
    /// changes retention removed.
    pub(crate) changes_expired: AtomicU64,
    /// Readers refused because `changes_max_readers` were waiting (503 `busy`).
    pub(crate) change_readers_refused: AtomicU64,
    /// Webhooks being delivered.
    pub(crate) webhooks: AtomicU64,
    /// Webhook deliveries the receiver acknowledged (2xx).
    pub(crate) webhook_deliveries_ok: AtomicU64,
    /// Webhook delivery attempts that failed (another status, no answer, a timeout).
    pub(crate) webhook_deliveries_failed: AtomicU64,
    /// Changes carried by acknowledged webhook deliveries.
    pub(crate) webhook_changes_delivered: AtomicU64,
    /// Webhook deliveries that told of a gap (changes retention removed before delivery).
    pub(crate) webhook_gaps: AtomicU64,
    /// Per webhook, when the oldest change it has still to deliver was stored (absent: caught
    /// up): `webhook_lag_ms` is the age of the oldest.
    pub(crate) webhook_pending_since: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// This node's share of a scaled-out cloud.
    pub(crate) cluster: crate::cluster::ClusterCounters,
}

/// How many of one direction's MQTT connections there are, and how many are up. Each
/// connection's task counts its own ups and downs, so the count is right whatever order the
/// tasks run in; "connected" is derived from it when read, never stored.
#[derive(Debug, Default)]
pub(crate) struct LinkCount {
    up: AtomicU64,
    total: AtomicU64,
}

impl LinkCount {
    /// This many connections will be opened (none is up yet).
    pub(crate) fn expect(&self, total: usize) {
        self.total.store(total as u64, Ordering::SeqCst);
    }

    /// No connection in this direction: it is in-process, one link that is always up.
    pub(crate) fn in_process(&self) {
        self.total.store(1, Ordering::SeqCst);
        self.up.store(1, Ordering::SeqCst);
    }

    /// One connection came up.
    pub(crate) fn came_up(&self) {
        self.up.fetch_add(1, Ordering::SeqCst);
    }

    /// One connection that was up went down.
    pub(crate) fn went_down(&self) {
        let _ = self
            .up
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Connections up now.
    pub(crate) fn up(&self) -> u64 {
        self.up.load(Ordering::SeqCst)
    }

    /// Whether every connection is up (false before any is expected).
    pub(crate) fn all_up(&self) -> bool {
        let total = self.total.load(Ordering::SeqCst);
        total > 0 && self.up() >= total
    }
}

/// A copy of [`SyncStatus`] at one moment, as `GET /v1/status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct StatusSnapshot {
    pub broker_connected: bool,
    pub egress_connected: bool,
    pub ingress_clients_up: u64,
    pub egress_clients_up: u64,
    pub subscribed: bool,
    pub subscribe_attempts: u64,
    /// Ingress connections given up after three subscriptions refused or left unanswered.
    pub subscriptions_abandoned: u64,
    /// Path probes sent through an external broker, those that came back, and the times every
    /// connection was made again after three in a row did not (a deaf subscription).
    pub probes_sent: u64,
    pub probes_heard: u64,
    pub probe_verdicts: u64,
    pub subscriptions_held: u64,
    pub sessions: u64,
    pub prompts_pending: u64,
    pub feed_wakeups_paced: u64,
    pub fanout_steps: u64,
    pub fanout_devices: u64,
    pub fanout_errors: u64,
    pub sessions_restarted: u64,
    pub publishes_queued: u64,
    pub publishes_undelivered: u64,
    pub publishes_dropped: u64,
    pub publishes_lost: u64,
    pub egress_waits: u64,
    pub store_waits: u64,
    pub broker_drops: u64,
    pub mqtt_requests_queued: u64,
    pub mqtt_request_queue: u64,
    pub store_jobs_in_flight: u64,
    pub store_commits: u64,
    pub store_jobs_committed: u64,
    pub store_commit_failures: u64,
    pub store_errors: u64,
    pub rows_skipped: u64,
    pub foreign_messages: u64,
    pub api_unauthorized: u64,
    pub api_forbidden: u64,
    pub pushes_revoked: u64,
    pub api_tls_handshakes_failed: u64,
    pub mqtt_certificates_refused: u64,
    pub device_messages_rate_limited: u64,
    pub device_pushes_busy: u64,
    pub device_push_changes_covered: u64,
    pub device_pushes_covered: u64,
    pub device_push_changes_reanswered: u64,
    pub device_messages_refused: u64,
    pub device_messages_without_session: u64,
    pub device_pushes_of_ended_sessions: u64,
    pub device_acks_dropped: u64,
    pub restores_detected: u64,
    pub resyncs_started: u64,
    pub changes_over_quota: u64,
    pub api_rate_limited: u64,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub push_changes_applied: u64,
    pub push_changes_superseded: u64,
    pub push_changes_rejected: u64,
    pub push_changes_kept_from_neighbour: u64,
    pub push_changes_deferred: u64,
    pub feed_lag_entries: u64,
    pub feed_lag_max: u64,
    pub sessions_behind: u64,
    pub sessions_resyncing: u64,
    pub change_log_head: u64,
    pub change_log_rows: u64,
    pub change_readers: u64,
    pub changes_served: u64,
    pub changes_expired: u64,
    pub change_readers_refused: u64,
    pub webhooks: u64,
    pub webhook_deliveries_ok: u64,
    pub webhook_deliveries_failed: u64,
    pub webhook_changes_delivered: u64,
    pub webhook_gaps: u64,
    /// Age in ms of the oldest change some webhook has still to deliver (0: all caught up).
    pub webhook_lag_ms: u64,
    pub cluster_partitions_held: u64,
    pub cluster_live_nodes: u64,
    pub cluster_partitions_claimed: u64,
    pub cluster_partitions_released: u64,
    pub cluster_lease_rounds_failed: u64,
    pub cluster_leases_lost: u64,
    pub cluster_messages_other_nodes: u64,
    pub cluster_sessions_handed_over: u64,
    pub cluster_presence_marked_offline: u64,
    pub cluster_wakeups_sent: u64,
    pub cluster_wakeups_heard: u64,
    pub cluster_wakeup_failures: u64,
    pub cluster_wakeups_unreadable: u64,
}

impl SyncStatus {
    /// Counts one group commit of the store thread and times it (`store_job_seconds{job="commit"}`).
    pub(crate) fn observe_commit(&self, c: &crate::store_thread::GroupCommitted) {
        self.store_commits.fetch_add(1, Ordering::Relaxed);
        if c.error.is_some() {
            self.store_commit_failures.fetch_add(1, Ordering::Relaxed);
        } else {
            self.store_jobs_committed
                .fetch_add(c.jobs as u64, Ordering::Relaxed);
        }
        self.store_job_latency
            .observe(crate::metrics::StoreJob::Commit, c.took);
    }

    /// The numbers now; `request_queue` is the configured capacity, shown beside its use.
    pub fn snapshot(&self, request_queue: usize) -> StatusSnapshot {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatusSnapshot {
            broker_connected: self.ingress_links.all_up(),
            egress_connected: self.egress_links.all_up(),
            ingress_clients_up: self.ingress_links.up(),
            egress_clients_up: self.egress_links.up(),
            subscribed: self.subscribed.load(Ordering::SeqCst),
            subscribe_attempts: n(&self.subscribe_attempts),
            subscriptions_abandoned: n(&self.subscriptions_abandoned),
            probes_sent: n(&self.probes_sent),
            probes_heard: n(&self.probes_heard),
            probe_verdicts: n(&self.probe_verdicts),
            subscriptions_held: n(&self.subscriptions_held),
            sessions: n(&self.sessions),
            prompts_pending: n(&self.prompts_pending),
            feed_wakeups_paced: n(&self.feed_wakeups_paced),
            fanout_steps: n(&self.fanout_steps),
            fanout_devices: n(&self.fanout_devices),
            fanout_errors: n(&self.fanout_errors),
            sessions_restarted: n(&self.sessions_restarted),
            publishes_queued: n(&self.publishes_queued),
            publishes_undelivered: n(&self.publishes_undelivered),
            publishes_dropped: n(&self.publishes_dropped),
            publishes_lost: n(&self.publishes_lost),
            egress_waits: n(&self.egress_waits),
            store_waits: n(&self.store_waits),
            broker_drops: n(&self.broker_drops),
            mqtt_requests_queued: n(&self.mqtt_requests_queued),
            mqtt_request_queue: request_queue as u64,
            store_jobs_in_flight: n(&self.store_jobs_in_flight),
            store_commits: n(&self.store_commits),
            store_jobs_committed: n(&self.store_jobs_committed),
            store_commit_failures: n(&self.store_commit_failures),
            store_errors: n(&self.store_errors),
            rows_skipped: n(&self.rows_skipped),
            foreign_messages: n(&self.foreign_messages),
            api_unauthorized: n(&self.api_unauthorized),
            api_forbidden: n(&self.api_forbidden),
            pushes_revoked: n(&self.pushes_revoked),
            api_tls_handshakes_failed: n(&self.api_tls_handshakes_failed),
            mqtt_certificates_refused: n(&self.mqtt_certificates_refused),
            device_messages_rate_limited: n(&self.device_messages_rate_limited),
            device_pushes_busy: n(&self.device_pushes_busy),
            device_push_changes_covered: n(&self.device_push_changes_covered),
            device_pushes_covered: n(&self.device_pushes_covered),
            device_push_changes_reanswered: n(&self.device_push_changes_reanswered),
            device_messages_refused: n(&self.device_messages_refused),
            device_messages_without_session: n(&self.device_messages_without_session),
            device_pushes_of_ended_sessions: n(&self.device_pushes_of_ended_sessions),
            device_acks_dropped: n(&self.device_acks_dropped),
            restores_detected: n(&self.restores_detected),
            resyncs_started: n(&self.resyncs_started),
            changes_over_quota: n(&self.changes_over_quota),
            api_rate_limited: n(&self.api_rate_limited),
            messages_in: n(&self.messages_in),
            bytes_in: n(&self.bytes_in),
            bytes_out: n(&self.bytes_out),
            push_changes_applied: n(&self.push_changes_applied),
            push_changes_superseded: n(&self.push_changes_superseded),
            push_changes_rejected: n(&self.push_changes_rejected),
            push_changes_kept_from_neighbour: n(&self.push_changes_kept_from_neighbour),
            push_changes_deferred: n(&self.push_changes_deferred),
            feed_lag_entries: n(&self.feed_lag_entries),
            feed_lag_max: n(&self.feed_lag_max),
            sessions_behind: n(&self.sessions_behind),
            sessions_resyncing: n(&self.sessions_resyncing),
            change_log_head: n(&self.change_log_head),
            change_log_rows: n(&self.change_log_rows),
            change_readers: n(&self.change_readers),
            changes_served: n(&self.changes_served),
            changes_expired: n(&self.changes_expired),
            change_readers_refused: n(&self.change_readers_refused),
            webhooks: n(&self.webhooks),
            webhook_deliveries_ok: n(&self.webhook_deliveries_ok),
            webhook_deliveries_failed: n(&self.webhook_deliveries_failed),
            webhook_changes_delivered: n(&self.webhook_changes_delivered),
            webhook_gaps: n(&self.webhook_gaps),
            webhook_lag_ms: self.webhook_lag_ms(crate::store_thread::wall_ms()),
            cluster_partitions_held: n(&self.cluster.partitions_held),
            cluster_live_nodes: n(&self.cluster.live_nodes),
            cluster_partitions_claimed: n(&self.cluster.partitions_claimed),
            cluster_partitions_released: n(&self.cluster.partitions_released),
            cluster_lease_rounds_failed: n(&self.cluster.lease_rounds_failed),
            cluster_leases_lost: n(&self.cluster.leases_lost),
            cluster_messages_other_nodes: n(&self.cluster.messages_other_nodes),
            cluster_sessions_handed_over: n(&self.cluster.sessions_handed_over),
            cluster_presence_marked_offline: n(&self.cluster.presence_marked_offline),
            cluster_wakeups_sent: n(&self.cluster.wakeups_sent),
            cluster_wakeups_heard: n(&self.cluster.wakeups_heard),
            cluster_wakeup_failures: n(&self.cluster.wakeup_failures),
            cluster_wakeups_unreadable: n(&self.cluster.wakeups_unreadable),
        }
    }

    /// The age at `now_ms` of the oldest change some webhook has still to deliver (0: none).
    pub(crate) fn webhook_lag_ms(&self, now_ms: u64) -> u64 {
        let pending = self
            .webhook_pending_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pending
            .values()
            .min()
            .map_or(0, |oldest| now_ms.saturating_sub(*oldest))
    }

    /// Whether the MQTT side is ready: every connection up and every device topic subscribed.
    pub fn mqtt_ready(&self) -> bool {
        self.ingress_links.all_up()
            && self.egress_links.all_up()
            && self.subscribed.load(Ordering::SeqCst)
    }
}
