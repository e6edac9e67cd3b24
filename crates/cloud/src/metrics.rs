//! The cloud's Prometheus metrics: the text exposition `GET /metrics` serves.
//!
//! This module exists so that operators and the simulator can scrape the cloud's numbers with
//! the tools they already run, without polling JSON. It adds no second set of counters: every
//! field of `GET /v1/status` (the one [`crate::status::SyncStatus`] snapshot plus the embedded
//! broker's refusals) is rendered from the same snapshot the status handler builds, under
//! `devtables_<field>` (counters get the `_total` suffix), so the two can never disagree and a
//! status field cannot be added without a metric: a field missing from [`STATUS_METRICS`] is
//! still rendered (type `unknown`) and fails the unit test that ties the table to the status.
//! The one metric that is not a status field is the histogram of store job latency
//! ([`StoreJobLatency`]), measured where the sync loop's store jobs run.
//!
//! The exposition is OpenMetrics text (`prometheus-client`, the Prometheus project's Rust
//! client), which Prometheus scrapes natively.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The prefix of every metric name.
pub const PREFIX: &str = "devtables";

/// What kind of number a status field is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only grows (since the start); rendered with the `_total` suffix.
    Counter,
    /// Goes up and down (a level, a size, a yes/no as 1/0).
    Gauge,
}

/// One field of `GET /v1/status` as a metric.
#[derive(Clone, Copy, Debug)]
pub struct StatusMetric {
    /// The field's name in `/v1/status`, and the metric's after the prefix.
    pub field: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

const fn counter(field: &'static str, help: &'static str) -> StatusMetric {
    StatusMetric {
        field,
        kind: Kind::Counter,
        help,
    }
}

const fn gauge(field: &'static str, help: &'static str) -> StatusMetric {
    StatusMetric {
        field,
        kind: Kind::Gauge,
        help,
    }
}

/// Every field of `GET /v1/status`, with its kind and meaning (docs/api.md has the same table).
pub const STATUS_METRICS: &[StatusMetric] = &[
    gauge(
        "broker_connected",
        "1 while every ingress MQTT connection of the service (device messages in) is up; always 1 with the embedded broker (device messages come in-process)",
    ),
    gauge(
        "egress_connected",
        "1 while every egress MQTT connection of the service (publishes to devices) is up; always 1 with the embedded broker (publishes go in-process)",
    ),
    gauge(
        "ingress_clients_up",
        "Ingress MQTT connections up, of mqtt_ingress_clients; 1 with the embedded broker",
    ),
    gauge(
        "egress_clients_up",
        "Egress MQTT connections up, of mqtt_egress_clients; 1 with the embedded broker",
    ),
    gauge(
        "subscribed",
        "1 while every device topic filter is subscribed (SUBACK granted)",
    ),
    counter(
        "subscribe_attempts",
        "Subscribe requests sent (retries included)",
    ),
    counter(
        "subscriptions_abandoned",
        "Ingress connections given up after three subscriptions refused or unanswered",
    ),
    counter(
        "probes_sent",
        "Path probes published through the external broker under the device topic filter",
    ),
    counter(
        "probes_heard",
        "Path probes that came back through the device topic subscription",
    ),
    counter(
        "probe_verdicts",
        "Times every broker connection was made again: three probes in a row did not come back",
    ),
    gauge(
        "subscriptions_held",
        "Topic filters held on the current connection",
    ),
    gauge("sessions", "Device sessions the engine tracks"),
    gauge(
        "prompts_pending",
        "Devices still to prompt after a start, a restored broker link or a broadcast",
    ),
    counter(
        "feed_wakeups_paced",
        "Feed wake-ups of a broadcast to more devices than one pacing tick, sent paced",
    ),
    counter(
        "fanout_steps",
        "Broadcast fan-out steps committed (each reaches at most fanout_batch devices)",
    ),
    counter(
        "fanout_devices",
        "Devices reached by broadcast fan-out steps (after the broadcast's own write)",
    ),
    counter(
        "fanout_errors",
        "Broadcast fan-out steps that failed (retried within 5 s)",
    ),
    gauge(
        "cluster_partitions_held",
        "Partitions of a scaled-out cloud this node holds (0 on a single node)",
    ),
    gauge(
        "cluster_live_nodes",
        "Cloud nodes seen within a lease at the last lease round",
    ),
    counter(
        "cluster_partitions_claimed",
        "Partitions this node took over (a takeover or a rebalance)",
    ),
    counter(
        "cluster_partitions_released",
        "Partitions this node gave up to rebalance",
    ),
    counter(
        "cluster_lease_rounds_failed",
        "Lease rounds that failed (the database unreachable)",
    ),
    counter(
        "cluster_leases_lost",
        "Times this node stopped serving: its leases could not be renewed in time",
    ),
    counter(
        "cluster_messages_other_nodes",
        "Device messages left to the node that serves the device",
    ),
    counter(
        "cluster_sessions_handed_over",
        "Device sessions dropped because another node serves the device now",
    ),
    counter(
        "cluster_presence_marked_offline",
        "Devices shown online in partitions taken over that answered no prompt, marked offline",
    ),
    counter(
        "cluster_wakeups_sent",
        "Feed wake-ups sent to the other nodes",
    ),
    counter(
        "cluster_wakeups_heard",
        "Feed wake-ups heard from the other nodes",
    ),
    counter(
        "cluster_wakeup_failures",
        "Failures to send or listen for feed wake-ups (retried)",
    ),
    counter(
        "cluster_wakeups_unreadable",
        "Notifications on the wake-up channel that were not wake-ups (ignored)",
    ),
    counter(
        "sessions_restarted",
        "Device sessions restarted because the broker link came back clean",
    ),
    counter(
        "publishes_queued",
        "Publishes to devices handed to the MQTT client, or to the embedded broker's device sessions in-process (messages out)",
    ),
    counter(
        "publishes_undelivered",
        "Publishes to devices the embedded broker had no live subscribed session for (the device offline or not subscribed yet; 0 with an external broker)",
    ),
    counter(
        "publishes_dropped",
        "Publishes to devices refused by the MQTT client (it is shutting down)",
    ),
    counter(
        "egress_waits",
        "Times a publish waited for room in the egress queue and device reads paused (backpressure)",
    ),
    counter(
        "store_waits",
        "Times a store job waited for a slot and device reads paused (backpressure)",
    ),
    counter(
        "broker_drops",
        "Messages the embedded broker dropped on their way to a client (queue full or client gone)",
    ),
    counter(
        "publishes_lost",
        "Publishes discarded by a dropped connection (the engine resends)",
    ),
    gauge(
        "mqtt_requests_queued",
        "Requests waiting in the egress MQTT clients' request queues, all together",
    ),
    gauge(
        "mqtt_request_queue",
        "Capacity of each MQTT client's request queue",
    ),
    gauge(
        "store_jobs_in_flight",
        "Store jobs of the sync loop queued or running",
    ),
    counter(
        "store_commits",
        "Group commits of the store thread (one flush for the jobs waiting together)",
    ),
    counter(
        "store_jobs_committed",
        "Store jobs of the sync loop made durable by group commits (divided by store_commits: the mean group size)",
    ),
    counter(
        "store_commit_failures",
        "Group commits that failed (their jobs answered as failed; devices resend the pushes)",
    ),
    counter("store_errors", "Store jobs of the sync loop that failed"),
    counter(
        "rows_skipped",
        "Stored rows skipped in a page (too large for any message, or unreadable)",
    ),
    counter(
        "foreign_messages",
        "Messages on topics the service does not serve",
    ),
    counter(
        "api_unauthorized",
        "HTTP API requests refused for want of a valid API key (401)",
    ),
    counter(
        "api_forbidden",
        "HTTP API requests whose key may not do what they asked (403)",
    ),
    counter(
        "pushes_revoked",
        "Pushes refused because their device was revoked",
    ),
    counter(
        "api_tls_handshakes_failed",
        "HTTP API connections whose TLS handshake failed or timed out",
    ),
    counter(
        "mqtt_certificates_refused",
        "CONNECTs refused by the device-certificate listener",
    ),
    counter(
        "device_messages_rate_limited",
        "Device messages not processed: over their device's message rate",
    ),
    counter(
        "device_pushes_busy",
        "Device pushes not taken: too many of the device's being applied",
    ),
    counter(
        "device_push_changes_covered",
        "Pushed changes not applied again: a copy of a change still being applied (answered by the original)",
    ),
    counter(
        "device_push_changes_reanswered",
        "Pushed changes answered applied again without the store: a late copy of a change just applied",
    ),
    counter(
        "device_pushes_covered",
        "Device pushes not taken: every change a copy of one still being applied",
    ),
    counter(
        "device_messages_refused",
        "Device messages answered with an error (undecodable, too large, ...)",
    ),
    counter(
        "device_messages_without_session",
        "Device messages from a device without a session",
    ),
    counter(
        "device_pushes_of_ended_sessions",
        "Device pushes of an earlier session (delayed past the next hello): not applied, resent",
    ),
    counter(
        "device_acks_dropped",
        "Push acknowledgements not sent: the push was taken in an earlier session (resent, answered as duplicates)",
    ),
    counter(
        "resyncs_started",
        "Full resyncs started (new devices, cursors past retention or beyond the head, restores)",
    ),
    counter(
        "restores_detected",
        "Welcomes that found the cloud holding less than the device heard (restored from a backup): the device re-pushes",
    ),
    counter(
        "changes_over_quota",
        "Pushed changes refused for a device quota or their item's size",
    ),
    counter(
        "api_rate_limited",
        "HTTP API requests refused with 429: their key was over its rate",
    ),
    counter("messages_in", "Messages received on device topics"),
    counter(
        "bytes_in",
        "Payload bytes of the messages received on device topics",
    ),
    counter(
        "bytes_out",
        "Payload bytes of the publishes queued to devices",
    ),
    counter(
        "push_changes_applied",
        "Pushed changes answered applied (resends of a stored version included)",
    ),
    counter(
        "push_changes_superseded",
        "Pushed changes answered stale: a higher version was stored",
    ),
    counter("push_changes_rejected", "Pushed changes answered rejected"),
    counter(
        "push_changes_kept_from_neighbour",
        "Pushed changes applied with fields or enum values the cloud's schema does not define \
         (the device runs a neighbouring schema version)",
    ),
    counter(
        "push_changes_deferred",
        "Pushed changes of a model the cloud's schema lacks, from a device on a newer schema \
         (kept by the device, sent again in its next session)",
    ),
    gauge(
        "feed_lag_entries",
        "Feed entries the connected devices have not acknowledged, summed",
    ),
    gauge(
        "feed_lag_max",
        "The largest feed lag of one device session, in entries",
    ),
    gauge(
        "sessions_behind",
        "Device sessions with feed entries not acknowledged",
    ),
    gauge("sessions_resyncing", "Device sessions in a full resync"),
    gauge(
        "change_log_head",
        "The change log's highest sequence number",
    ),
    gauge(
        "change_log_rows",
        "Changes the log holds over every account (counted at each retention pass)",
    ),
    gauge(
        "change_readers",
        "Change log readers waiting now (SSE streams and waiting long polls)",
    ),
    counter(
        "changes_served",
        "Changes served to change log readers (SSE events and long-poll answers)",
    ),
    counter(
        "changes_expired",
        "Change log reads answered cursor_expired: the reader missed changes retention removed",
    ),
    counter(
        "change_readers_refused",
        "Change log readers refused with 503 busy: changes_max_readers were waiting",
    ),
    gauge("webhooks", "Webhooks being delivered"),
    counter(
        "webhook_deliveries_ok",
        "Webhook deliveries the receiver acknowledged (2xx)",
    ),
    counter(
        "webhook_deliveries_failed",
        "Webhook delivery attempts that failed (another status, no answer, a timeout); retried with backoff",
    ),
    counter(
        "webhook_changes_delivered",
        "Changes carried by acknowledged webhook deliveries",
    ),
    counter(
        "webhook_gaps",
        "Webhook deliveries that told of a gap: changes retention removed before delivery",
    ),
    gauge(
        "webhook_lag_ms",
        "Age in ms of the oldest change some webhook has still to deliver (0: all caught up)",
    ),
    counter(
        "mqtt_refused_revoked",
        "CONNECTs of revoked devices the embedded broker refused",
    ),
    counter(
        "mqtt_registry_failures",
        "CONNECTs refused because the device registry could not be read",
    ),
    counter(
        "mqtt_revoked_sessions_closed",
        "Live sessions closed because their device was found revoked",
    ),
];

/// The kinds of store job the sync loop runs: the label `job` of the latency histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreJob {
    ApplyPush,
    ReadFeed,
    ReadSnapshot,
    DeviceStatus,
    SkippedRow,
    Throttled,
    /// The commit of a group of jobs (the flush to disk), not a job of its own.
    Commit,
}

impl StoreJob {
    fn label(self) -> &'static str {
        match self {
            StoreJob::ApplyPush => "apply_push",
            StoreJob::ReadFeed => "read_feed",
            StoreJob::ReadSnapshot => "read_snapshot",
            StoreJob::DeviceStatus => "device_status",
            StoreJob::SkippedRow => "skipped_row",
            StoreJob::Throttled => "throttled",
            StoreJob::Commit => "commit",
        }
    }
}

type JobLabel = [(&'static str, &'static str); 1];

/// Seconds each store job of the sync loop took on the store thread, by kind of job (the time
/// it ran, not the time it waited in the queue: `store_jobs_in_flight` shows the queue).
#[derive(Clone, Debug)]
pub struct StoreJobLatency {
    family: Family<JobLabel, Histogram, fn() -> Histogram>,
}

/// The buckets: 50 µs doubling to about 1.6 s, the range of a store job from a cached read to
/// a large push on a slow disk.
fn store_job_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Default for StoreJobLatency {
    fn default() -> Self {
        StoreJobLatency {
            family: Family::new_with_constructor(store_job_histogram),
        }
    }
}

impl StoreJobLatency {
    /// Records that one job of kind `job` ran for `took`.
    pub fn observe(&self, job: StoreJob, took: Duration) {
        self.family
            .get_or_create(&[("job", job.label())])
            .observe(took.as_secs_f64());
    }
}

/// The exposition could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode the metrics exposition: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// The status fields of one scrape, as numbers.
#[derive(Debug)]
struct StatusValues(Vec<(String, Value)>);

impl Collector for StatusValues {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (field, value) in &self.0 {
            let number = match value {
                Value::Bool(b) => u64::from(*b),
                Value::Number(n) => match n.as_u64() {
                    Some(n) => n,
                    // Every status number is a u64; anything else would not be a count.
                    None => continue,
                },
                // An absent part (the embedded broker's numbers with an external broker).
                _ => continue,
            };
            match STATUS_METRICS.iter().find(|m| m.field == field) {
                Some(m) if m.kind == Kind::Counter => {
                    let c = ConstCounter::new(number);
                    c.encode(encoder.encode_descriptor(field, m.help, None, c.metric_type())?)?;
                }
                Some(m) => {
                    // A gauge is an i64 in the exposition.
                    let g = ConstGauge::new(i64::try_from(number).unwrap_or(i64::MAX));
                    g.encode(encoder.encode_descriptor(field, m.help, None, g.metric_type())?)?;
                }
                None => {
                    // Not described yet (the unit tests fail on it), but never left out.
                    let g = ConstGauge::new(i64::try_from(number).unwrap_or(i64::MAX));
                    let help = "A field of GET /v1/status (not described yet)";
                    g.encode(encoder.encode_descriptor(field, help, None, MetricType::Unknown)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The exposition of `status` (the JSON object `GET /v1/status` answers) and of the store job
/// latency.
pub fn render(status: &Value, latency: &StoreJobLatency) -> Result<String, MetricsError> {
    let values = status
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(StatusValues(values)));
    registry.register(
        "store_job_seconds",
        "Seconds a store job of the sync loop ran on the store thread, by kind of job",
        latency.family.clone(),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;
    use crate::status::SyncStatus;

    /// The value of the sample named `name` exactly (labels included), if present.
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Every field `GET /v1/status` can show: the sync loop's snapshot and the broker's part.
    fn status_fields() -> BTreeSet<String> {
        let status = crate::api::ServiceStatus::example(SyncStatus::default().snapshot(8));
        serde_json::to_value(status)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    #[test]
    fn every_status_field_is_described_and_nothing_else() {
        let described: BTreeSet<String> =
            STATUS_METRICS.iter().map(|m| m.field.to_string()).collect();
        assert_eq!(
            described.len(),
            STATUS_METRICS.len(),
            "a field described twice"
        );
        let fields = status_fields();
        let missing: Vec<_> = fields.difference(&described).collect();
        let stale: Vec<_> = described.difference(&fields).collect();
        assert!(
            missing.is_empty(),
            "status fields without a metric: {missing:?}"
        );
        assert!(stale.is_empty(), "metrics of no status field: {stale:?}");
    }

    #[test]
    fn counters_gauges_and_the_latency_histogram_are_rendered_with_their_values() {
        let status = json!({
            "publishes_dropped": 7,
            "broker_connected": true,
            "subscribed": false,
            "sessions": 3,
            "mqtt_refused_revoked": null,
            "a_new_field": 5,
        });
        let latency = StoreJobLatency::default();
        latency.observe(StoreJob::ApplyPush, Duration::from_millis(3));
        latency.observe(StoreJob::ApplyPush, Duration::from_millis(1));
        let text = render(&status, &latency).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE devtables_publishes_dropped counter"),
            "{text}"
        );
        assert_eq!(
            sample(&text, "devtables_publishes_dropped_total"),
            Some(7.0)
        );
        assert!(text.contains("# TYPE devtables_sessions gauge"), "{text}");
        assert_eq!(sample(&text, "devtables_sessions"), Some(3.0));
        assert_eq!(sample(&text, "devtables_broker_connected"), Some(1.0));
        assert_eq!(sample(&text, "devtables_subscribed"), Some(0.0));
        // An absent part is not rendered as a zero.
        assert!(!text.contains("mqtt_refused_revoked"), "{text}");
        // A field nobody described is still there.
        assert!(
            text.contains("# TYPE devtables_a_new_field unknown"),
            "{text}"
        );
        assert_eq!(sample(&text, "devtables_a_new_field"), Some(5.0));
        let job = "{job=\"apply_push\"}";
        assert_eq!(
            sample(&text, &format!("devtables_store_job_seconds_count{job}")),
            Some(2.0)
        );
        let sum = sample(&text, &format!("devtables_store_job_seconds_sum{job}")).unwrap();
        assert!((sum - 0.004).abs() < 1e-9, "{sum}");
        // The 2 ms bucket holds the 1 ms job, not the 3 ms one.
        let le = "devtables_store_job_seconds_bucket{le=\"0.0016\",job=\"apply_push\"}";
        assert_eq!(sample(&text, le), Some(1.0), "{text}");
    }
}
