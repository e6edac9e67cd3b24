//! The phases of a simulation: the cloud (found or started), registration, a paced ramp of
//! connections, the write phase (up writers, down writes, broadcasts, commands, churn), the
//! drain, and the shutdown; a sampler reports progress every second throughout.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use devtables_agent::AgentConfig;
use devtables_db::{Background, Db, DbOptions, Durability};
use devtables_schema::Schema;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::api::{check_name, Api};
use crate::config::{DbMode, FleetConfig, Target, SCHEMA};
use crate::device::{self, Outstanding, SimDevice};
use crate::procfs::{self, ProcSample};
use crate::report::{
    CloudCounts, CloudFigures, FleetReport, Missing, Phase, Progress, ProgressSink, SimFigures,
    StormFigures,
};
use crate::spawn::{self, SpawnSettings, SpawnedCloud};
use crate::stats::{Counters, Errors, Stats};
use crate::FleetError;

/// Longest wait for the cloud's `/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Devices stopped at once at the end.
const STOP_CONCURRENCY: usize = 512;
/// How often the drain looks at what is still owed.
const DRAIN_POLL: Duration = Duration::from_millis(200);
/// Longest wait for a churned device to be welcomed again (and resynced, if long away).
const CHURN_RETURN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait, after a cloud restart, for every device to be welcomed again.
const STORM_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the storm looks at the devices (and the cloud's memory).
const STORM_POLL: Duration = Duration::from_millis(50);
/// Most devices per page of `GET /v1/devices`.
const DEVICE_PAGE: usize = 1000;

/// The counters of `GET /v1/status` reported as errors (differences over the run): everything
/// the cloud dropped, refused or lost.
const CLOUD_ERROR_COUNTERS: &[&str] = &[
    "publishes_dropped",
    "publishes_lost",
    // The embedded broker: publishes no session took (its device gone), and messages a
    // session's queue or window dropped.
    "publishes_undelivered",
    "broker_drops",
    "store_errors",
    "rows_skipped",
    "device_messages_rate_limited",
    "device_pushes_busy",
    "device_messages_refused",
    "device_messages_without_session",
    "changes_over_quota",
    "push_changes_rejected",
    "pushes_revoked",
];

/// What every task of the run shares.
struct Shared {
    config: FleetConfig,
    api: Api,
    stats: Arc<Stats>,
    devices: Vec<Arc<SimDevice>>,
    /// The devices' names (registration order).
    names: Vec<String>,
    /// The cloud's process (0: unknown); a restart changes it.
    cloud_pid: AtomicU32,
    /// The cloud the simulator started, when it did (it restarts it for a storm).
    spawned: Option<Arc<tokio::sync::Mutex<SpawnedCloud>>>,
    /// The cloud's `GET /v1/status` at the start of each of its processes' spans, and at the
    /// end of the spans that ended (a restart): the counters start again at 0 in a new
    /// process, so the run's counts are summed over the spans.
    status_spans: Mutex<Vec<(Option<Value>, Option<Value>)>>,
    started: Instant,
    phase: Mutex<Phase>,
    registered: AtomicUsize,
    /// Highest cloud RSS seen, in bytes.
    cloud_rss_peak: AtomicU64,
    sim_rss_peak: AtomicU64,
    sessions_resyncing_max: AtomicU64,
    timeline: Mutex<Vec<Progress>>,
}

impl Shared {
    fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
        tracing::info!(?phase, "fleet simulation phase");
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn proc_sample(&self, pid: Option<u32>) -> Option<ProcSample> {
        let s = procfs::sample(pid)?;
        let peak = if pid.is_some() {
            &self.cloud_rss_peak
        } else {
            &self.sim_rss_peak
        };
        peak.fetch_max(s.rss_bytes, Ordering::Relaxed);
        Some(s)
    }

    fn spans(&self) -> std::sync::MutexGuard<'_, Vec<(Option<Value>, Option<Value>)>> {
        self.status_spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn cloud_pid(&self) -> Option<u32> {
        Some(self.cloud_pid.load(Ordering::Relaxed)).filter(|pid| *pid != 0)
    }

    fn cloud_sample(&self) -> Option<ProcSample> {
        self.cloud_pid().and_then(|pid| self.proc_sample(Some(pid)))
    }
}

/// Runs one simulation on the current tokio runtime; `progress` gets a tick every second.
pub async fn run(config: FleetConfig, progress: ProgressSink) -> Result<FleetReport, FleetError> {
    config.validate()?;
    check_name("account", &config.account).map_err(FleetError::Config)?;
    let schema = Arc::new(
        Schema::from_json5(SCHEMA)
            .map_err(|e| FleetError::Config(format!("the example schema does not load: {e}")))?,
    );
    let errors = Arc::new(Errors::default());
    let stats = Arc::new(Stats::new(errors.clone()));

    let (spawned, url, key, mqtt, cloud_pid) = match &config.target {
        Target::Running {
            url,
            admin_key,
            mqtt,
            cloud_pid,
        } => (
            None,
            url.clone(),
            admin_key.clone(),
            mqtt.clone(),
            *cloud_pid,
        ),
        Target::Spawn {
            program,
            log,
            keep_dir,
            extra_config,
            cgroup,
        } => {
            let cloud = spawn::start(SpawnSettings {
                program,
                log,
                extra_config,
                cgroup: cgroup.as_deref(),
                keep_dir: *keep_dir,
                account: &config.account,
                retention: config.retention,
                purge_interval: config.purge_interval,
            })
            .await?;
            let (u, k, m, p) = (
                cloud.url.clone(),
                cloud.admin_key.clone(),
                cloud.mqtt.clone(),
                Some(cloud.pid),
            );
            (Some(cloud), u, k, m, p)
        }
    };
    let spawned = spawned.map(|c| Arc::new(tokio::sync::Mutex::new(c)));
    let result = simulate(
        config,
        schema,
        stats,
        errors,
        &url,
        &key,
        &mqtt,
        cloud_pid,
        spawned.clone(),
        progress,
    )
    .await;
    if let Some(cloud) = spawned {
        cloud.lock().await.stop().await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn simulate(
    config: FleetConfig,
    schema: Arc<Schema>,
    stats: Arc<Stats>,
    errors: Arc<Errors>,
    url: &str,
    key: &str,
    mqtt: &str,
    cloud_pid: Option<u32>,
    spawned: Option<Arc<tokio::sync::Mutex<SpawnedCloud>>>,
    progress: ProgressSink,
) -> Result<FleetReport, FleetError> {
    let api = Api::new(url, key, errors.clone()).map_err(FleetError::Config)?;
    let (broker_host, broker_port) = devtables_agent::config::parse_broker(mqtt)
        .map_err(|e| FleetError::Config(format!("--mqtt {mqtt}: {e}")))?;
    wait_ready(&api).await?;
    let status_before = cloud_status(&api).await;

    // Device names unique per run, so a running cloud can serve several simulations.
    let run_id = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()))
        & 0xff_ffff;
    let names: Vec<String> = (0..config.devices)
        .map(|i| format!("s{run_id:06x}-{i:05}"))
        .collect();
    let db_dir = match config.db {
        DbMode::Memory => None,
        DbMode::Disk => Some(
            tempfile::Builder::new()
                .prefix("devtables-sim-devices-")
                .tempdir()
                .map_err(|source| FleetError::Io {
                    what: "cannot create the devices' folder".into(),
                    source,
                })?,
        ),
    };
    let db_options = DbOptions {
        durability: Durability::Immediate,
        background: Background::Shared,
        // Only `Fault` items have a TTL and the simulation writes none: rare purges.
        ttl_purge_interval: Duration::from_secs(300),
        ..DbOptions::default()
    };
    let mut devices = Vec::with_capacity(names.len());
    for name in &names {
        let db = match &db_dir {
            None => Db::open_in_memory(schema.clone(), db_options.clone()),
            Some(dir) => Db::open(
                dir.path().join(format!("{name}.db")),
                schema.clone(),
                db_options.clone(),
            ),
        }
        .map_err(|source| FleetError::Db {
            device: name.clone(),
            source: Box::new(source),
        })?;
        devices.push(SimDevice::new(name.clone(), db, stats.clone()));
    }

    let shared = Arc::new(Shared {
        config: config.clone(),
        api,
        stats: stats.clone(),
        devices,
        names,
        cloud_pid: AtomicU32::new(cloud_pid.unwrap_or(0)),
        spawned,
        status_spans: Mutex::new(Vec::new()),
        started: Instant::now(),
        phase: Mutex::new(Phase::Starting),
        registered: AtomicUsize::new(0),
        cloud_rss_peak: AtomicU64::new(0),
        sim_rss_peak: AtomicU64::new(0),
        sessions_resyncing_max: AtomicU64::new(0),
        timeline: Mutex::new(Vec::new()),
    });
    let (stop_sampler, sampler_stopped) = watch::channel(false);
    let sampler = tokio::spawn(sampler(shared.clone(), progress.clone(), sampler_stopped));

    let outcome = phases(&shared, &broker_host, broker_port, status_before).await;

    shared.set_phase(Phase::Stopping);
    let mut stopping = JoinSet::new();
    let limit = Arc::new(Semaphore::new(STOP_CONCURRENCY));
    for device in &shared.devices {
        let (device, limit) = (device.clone(), limit.clone());
        stopping.spawn(async move {
            let _permit = limit.acquire().await;
            device.stop().await;
        });
    }
    while stopping.join_next().await.is_some() {}
    let _ = stop_sampler.send(true);
    let _ = sampler.await;
    drop(db_dir);
    outcome
}

/// What the phases measured, for the report.
struct Measured {
    connect_s: Option<f64>,
    write_s: f64,
    drain_s: f64,
    up_acked_in_writes: u64,
    down_applied_in_writes: u64,
    cloud_start: Option<ProcSample>,
    cloud_connected: Option<ProcSample>,
    cloud_write_start: Option<ProcSample>,
    cloud_write_end: Option<ProcSample>,
    sim_write_start: Option<ProcSample>,
    sim_write_end: Option<ProcSample>,
    /// After the drain: the CPU per write counts what the writes cost until all were answered.
    cloud_drain_end: Option<ProcSample>,
    sim_drain_end: Option<ProcSample>,
    storm: Option<StormFigures>,
}

async fn phases(
    shared: &Arc<Shared>,
    broker_host: &str,
    broker_port: u16,
    status_before: Option<Value>,
) -> Result<FleetReport, FleetError> {
    let config = &shared.config;
    let counters = &shared.stats.counters;
    let mut rng = SmallRng::seed_from_u64(config.seed);
    shared.spans().push((status_before, None));

    shared.set_phase(Phase::Registering);
    let secrets = register(shared).await?;
    let cloud_start = shared.cloud_sample();

    shared.set_phase(Phase::Connecting);
    let agent_config = |i: usize| {
        let mut c = AgentConfig::new(&config.account, &shared.names[i], &secrets[i], "unused");
        c.broker_host = broker_host.to_string();
        c.broker_port = broker_port;
        c
    };
    let ramp_start = Instant::now();
    let mut pace = Pacer::new(config.connect_rate, Duration::ZERO, ramp_start);
    for (i, device) in shared.devices.iter().enumerate() {
        pace.next().await;
        device
            .start(agent_config(i))
            .await
            .map_err(|source| FleetError::Agent {
                device: device.name.clone(),
                source: Box::new(source),
            })?;
    }
    let connect_deadline = ramp_start + config.connect_timeout;
    let connect_s = loop {
        let ready = shared.devices.iter().filter(|d| d.is_ready()).count();
        if ready == shared.devices.len() {
            break Some(ramp_start.elapsed().as_secs_f64());
        }
        if Instant::now() >= connect_deadline {
            let missing = (shared.devices.len() - ready) as u64;
            tracing::warn!(
                missing,
                "not every device connected in time: the writes start anyway"
            );
            shared.stats.errors.add("devices_not_connected", missing);
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cloud_connected = shared.cloud_sample();

    shared.set_phase(Phase::Writing);
    let write_start = Instant::now();
    let cloud_write_start = shared.cloud_sample();
    let sim_write_start = shared.proc_sample(None);
    let acked_before = Counters::get(&counters.up_acked);
    let applied_before = Counters::get(&counters.down_applied);
    let write_end = write_start + config.duration;
    let mut tasks = JoinSet::new();
    if config.rate_per_device > 0.0 {
        let period = Duration::from_secs_f64(1.0 / config.rate_per_device);
        for device in &shared.devices {
            let offset = period.mul_f64(rng.gen::<f64>());
            let device = device.clone();
            let rate = config.rate_per_device;
            let stats = shared.stats.clone();
            tasks.spawn(async move {
                let mut pace = Pacer::new(rate, offset, write_start);
                while pace.next_before(write_end).await {
                    device.write_up().await;
                }
                // The simulator could not keep up: writes it did not offer.
                stats.errors.add("sim_up_writes_skipped", pace.skipped);
            });
        }
    }
    let writers = Arc::new(Semaphore::new(config.api_concurrency));
    if config.down_rate > 0.0 {
        tasks.spawn(api_writes(
            shared.clone(),
            writers.clone(),
            config.down_rate,
            write_end,
            config.seed ^ 0x646f776e,
            ApiWrite::Down,
        ));
    }
    if config.command_rate > 0.0 {
        tasks.spawn(api_writes(
            shared.clone(),
            writers.clone(),
            config.command_rate,
            write_end,
            config.seed ^ 0x636d64,
            ApiWrite::Command,
        ));
    }
    if let Some(every) = config.broadcast_every {
        tasks.spawn(api_writes(
            shared.clone(),
            writers.clone(),
            1.0 / every.as_secs_f64(),
            write_end,
            config.seed,
            ApiWrite::Broadcast,
        ));
    }
    let storm_task = config
        .restart_cloud_after
        .zip(shared.spawned.clone())
        .map(|(after, cloud)| tokio::spawn(storm(shared.clone(), cloud, write_start + after)));
    let mut churn = JoinSet::new();
    for plan in churn_plan(config, &mut rng) {
        churn.spawn(churn_device(
            shared.clone(),
            plan,
            write_start,
            agent_config(plan.device),
        ));
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!("a writer task failed: {e}");
            shared.stats.errors.add("sim_task_failed", 1);
        }
    }
    let storm = match storm_task {
        Some(task) => task.await.unwrap_or_else(|e| {
            tracing::error!("the restart storm task failed: {e}");
            shared.stats.errors.add("sim_task_failed", 1);
            None
        }),
        None => None,
    };
    let write_s = write_start.elapsed().as_secs_f64();
    let cloud_write_end = shared.cloud_sample();
    let sim_write_end = shared.proc_sample(None);
    let up_acked_in_writes = Counters::get(&counters.up_acked) - acked_before;
    let down_applied_in_writes = Counters::get(&counters.down_applied) - applied_before;

    shared.set_phase(Phase::Draining);
    let drain_start = Instant::now();
    let drain_deadline = drain_start + config.drain_timeout;
    // Devices still away come back first (their pause may outlast the write phase).
    while let Some(done) = churn.join_next().await {
        if let Err(e) = done {
            tracing::error!("a churn task failed: {e}");
            shared.stats.errors.add("sim_task_failed", 1);
        }
    }
    let mut owed = outstanding(shared);
    while !owed.is_zero() && Instant::now() < drain_deadline {
        tokio::time::sleep(DRAIN_POLL).await;
        owed = outstanding(shared);
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    let cloud_drain_end = shared.cloud_sample();
    let sim_drain_end = shared.proc_sample(None);
    if !owed.is_zero() {
        tracing::warn!(?owed, "the drain ended with writes unaccounted for");
    }
    let status_after = cloud_status(&shared.api).await;
    if let Some(last) = shared.spans().last_mut() {
        last.1 = status_after;
    }
    let device_changes_applied = device_changes_applied(shared).await;

    Ok(report(
        shared,
        Measured {
            connect_s,
            write_s,
            drain_s,
            up_acked_in_writes,
            down_applied_in_writes,
            cloud_start,
            cloud_connected,
            cloud_write_start,
            cloud_write_end,
            sim_write_start,
            sim_write_end,
            cloud_drain_end,
            sim_drain_end,
            storm,
        },
        owed,
        device_changes_applied,
    ))
}

/// CPU milliseconds per event between two readings of one process: what each of `events` cost,
/// all its other work included. `None` without both readings, across a restart, or without
/// events.
fn cpu_ms_per(end: &Option<ProcSample>, start: &Option<ProcSample>, events: u64) -> Option<f64> {
    let (end, start) = (end.as_ref()?, start.as_ref()?);
    (end.pid == start.pid && events > 0)
        .then(|| (end.cpu_s - start.cpu_s).max(0.0) * 1000.0 / events as f64)
}

/// At `at`, restarts the cloud and measures the reconnect storm: how long until every device
/// that was welcomed before is welcomed again (it lost its connection, so its agent's
/// disconnect count grew, and it is ready once more), and the restarted cloud's peak memory.
/// `None` (counted as `cloud_restart_failed`) if the cloud did not come back.
async fn storm(
    shared: Arc<Shared>,
    cloud: Arc<tokio::sync::Mutex<SpawnedCloud>>,
    at: Instant,
) -> Option<StormFigures> {
    tokio::time::sleep_until(at.into()).await;
    let before: Vec<(usize, u64)> = shared
        .devices
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let v = d.view();
            v.ready.then_some((i, v.counts.disconnects))
        })
        .collect();
    let rss_before = shared.cloud_sample().map(|s| s.rss_mib());
    let end = cloud_status(&shared.api).await;
    tracing::info!(
        devices = before.len(),
        "restarting the cloud: a reconnect storm"
    );
    let stopped = Instant::now();
    let restarted = {
        let mut cloud = cloud.lock().await;
        let r = cloud.restart().await;
        shared.cloud_pid.store(cloud.pid, Ordering::Relaxed);
        r
    };
    {
        let mut spans = shared.spans();
        if let Some(last) = spans.last_mut() {
            last.1 = end;
        }
        // The new process counts from 0.
        spans.push((Some(json!({})), None));
    }
    if let Err(e) = restarted {
        tracing::error!("the cloud did not come back after its restart: {e}");
        shared.stats.errors.add("cloud_restart_failed", 1);
        return None;
    }
    let serving = Instant::now();
    let since = |t: Instant| t.duration_since(serving).as_secs_f64();
    let ready_s = wait_ready(&shared.api)
        .await
        .ok()
        .map(|()| since(Instant::now()));
    let mut peak = 0u64;
    let (mut half, mut all) = (None, None);
    let deadline = serving + STORM_TIMEOUT;
    let served = loop {
        let served = before
            .iter()
            .filter(|(i, disconnects)| {
                let v = shared.devices[*i].view();
                v.ready && v.counts.disconnects > *disconnects
            })
            .count();
        let now = Instant::now();
        if half.is_none() && served * 2 >= before.len() {
            half = Some(since(now));
        }
        if let Some(s) = shared.cloud_sample() {
            peak = peak.max(s.rss_bytes);
        }
        if served == before.len() {
            all = Some(since(now));
            break served;
        }
        if now >= deadline {
            tracing::warn!(
                missing = before.len() - served,
                "not every device came back after the cloud's restart"
            );
            shared
                .stats
                .errors
                .add("storm_devices_not_back", (before.len() - served) as u64);
            break served;
        }
        tokio::time::sleep(STORM_POLL).await;
    };
    Some(StormFigures {
        devices: before.len(),
        restart_s: serving.duration_since(stopped).as_secs_f64(),
        ready_s,
        half_served_s: half,
        all_served_s: all,
        served,
        cloud_rss_before_mib: rss_before,
        cloud_rss_peak_mib: (peak > 0).then(|| peak as f64 / (1024.0 * 1024.0)),
    })
}

/// Waits until the cloud's `/ready` answers 200.
async fn wait_ready(api: &Api) -> Result<(), FleetError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let reason = match api.probe("/ready").await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("{code} {body}"),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(FleetError::NotReady {
                url: api.url(),
                reason,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /v1/status`, or `None` (counted) when it cannot be read.
async fn cloud_status(api: &Api) -> Option<Value> {
    match api.get("/v1/status").await {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!("cannot read the cloud's status: {e}");
            None
        }
    }
}

/// Registers every device, paced at `register_rate` with up to `api_concurrency` requests in
/// flight; returns the secrets in device order.
async fn register(shared: &Arc<Shared>) -> Result<Vec<String>, FleetError> {
    let config = &shared.config;
    let limit = Arc::new(Semaphore::new(config.api_concurrency));
    let mut pace = Pacer::new(config.register_rate, Duration::ZERO, Instant::now());
    let mut tasks = JoinSet::new();
    for (i, name) in shared.names.iter().enumerate() {
        pace.next().await;
        let permit = limit.clone().acquire_owned().await;
        let shared = shared.clone();
        let name = name.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let body = json!({"account": shared.config.account, "device": name});
            let answer = shared.api.post("/v1/devices", body).await;
            shared.registered.fetch_add(1, Ordering::Relaxed);
            (i, name, answer)
        });
    }
    let mut secrets = vec![String::new(); shared.names.len()];
    while let Some(done) = tasks.join_next().await {
        let (i, name, answer) = done.map_err(|e| FleetError::Api {
            what: "a registration".into(),
            reason: e.to_string(),
        })?;
        let answer = answer.map_err(|e| FleetError::Api {
            what: format!("the registration of {name}"),
            reason: e.to_string(),
        })?;
        secrets[i] = answer["secret"]
            .as_str()
            .ok_or_else(|| FleetError::Api {
                what: format!("the registration of {name}"),
                reason: format!("no secret in the answer {answer}"),
            })?
            .to_string();
    }
    Ok(secrets)
}

#[derive(Clone, Copy, Debug)]
enum ApiWrite {
    Down,
    Command,
    Broadcast,
}

/// API writes at `rate` per second until `end`: each waits for a free slot of `limit` (the
/// rate falls rather than requests pile up) and goes to a random connected device.
async fn api_writes(
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    rate: f64,
    end: Instant,
    seed: u64,
    kind: ApiWrite,
) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut pace = Pacer::new(rate, Duration::ZERO, Instant::now());
    let next_seq = Arc::new(AtomicU64::new(0));
    let mut inflight = JoinSet::new();
    while pace.next_before(end).await {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let target = match kind {
            ApiWrite::Broadcast => None,
            ApiWrite::Down | ApiWrite::Command => {
                // A random device that is on; none (all away): this write is skipped.
                let n = shared.devices.len();
                let start = rng.gen_range(0..n);
                let found = (0..n)
                    .map(|k| (start + k) % n)
                    .find(|&i| shared.devices[i].is_ready());
                match found {
                    Some(i) => Some(i),
                    None => {
                        shared.stats.errors.add("api_write_skipped_no_device", 1);
                        continue;
                    }
                }
            }
        };
        let seq = next_seq.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        inflight.spawn(async move {
            let _permit = permit;
            api_write(&shared, kind, seq, target).await;
        });
        // Reap finished requests as we go: the set stays as small as the permits.
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
    let kind = match kind {
        ApiWrite::Down => "sim_down_writes_skipped",
        ApiWrite::Command => "sim_commands_skipped",
        ApiWrite::Broadcast => "sim_broadcasts_skipped",
    };
    shared.stats.errors.add(kind, pace.skipped);
}

async fn api_write(shared: &Shared, kind: ApiWrite, seq: u64, target: Option<usize>) {
    let config = &shared.config;
    let counters = &shared.stats.counters;
    let account = &config.account;
    match (kind, target) {
        (ApiWrite::Down, Some(i)) => {
            let name = &shared.names[i];
            let path = format!(
                "/v1/accounts/{account}/devices/{name}/items/{}",
                device::DOWN_MODEL
            );
            let body = json!({"deviceId": name, "name": device::down_name(seq), "value": format!("v{seq}")});
            if shared.api.post(&path, body).await.is_ok() {
                Counters::inc(&counters.down_written);
                shared.devices[i].down_written(seq, Instant::now());
            }
        }
        (ApiWrite::Command, Some(i)) => {
            let name = &shared.names[i];
            let path = format!(
                "/v1/accounts/{account}/devices/{name}/items/{}",
                device::COMMAND_MODEL
            );
            let body = json!({"deviceId": name, "id": device::command_id(seq), "command": device::COMMAND_NAME, "args": {"seq": seq}});
            if shared.api.post(&path, body).await.is_ok() {
                Counters::inc(&counters.commands_sent);
                shared.devices[i].command_written(seq, Instant::now());
            }
        }
        (ApiWrite::Broadcast, _) => {
            let path = format!("/v1/accounts/{account}/items/{}", device::BROADCAST_MODEL);
            let body = json!({"version": device::broadcast_version(seq), "url": format!("https://firmware.invalid/{seq}")});
            if shared.api.post(&path, body).await.is_ok() {
                Counters::inc(&counters.broadcasts_written);
                shared.stats.broadcast_written(seq, Instant::now());
            }
        }
        (ApiWrite::Down | ApiWrite::Command, None) => {}
    }
}

/// One device's time away.
#[derive(Clone, Copy, Debug)]
struct ChurnPlan {
    device: usize,
    /// After the write phase's start.
    off_at: Duration,
    pause: Duration,
    /// Away past the retention: a delete for it is made and purged meanwhile.
    long: bool,
}

/// Which devices go away, when, and for how long (from the seed).
fn churn_plan(config: &FleetConfig, rng: &mut SmallRng) -> Vec<ChurnPlan> {
    let count = (config.churn * config.devices as f64).round() as usize;
    let long = (config.churn_long * count as f64).round() as usize;
    let mut order: Vec<usize> = (0..config.devices).collect();
    order.shuffle(rng);
    order
        .into_iter()
        .take(count)
        .enumerate()
        .map(|(k, device)| {
            let long = k < long;
            let pause = if long {
                config.long_pause() + Duration::from_millis(rng.gen_range(0..1000))
            } else {
                config.churn_pause.mul_f64(rng.gen_range(0.5..1.5))
            };
            ChurnPlan {
                device,
                off_at: config.duration.mul_f64(rng.gen_range(0.1..0.6)),
                pause,
                long,
            }
        })
        .collect()
}

/// Stops a device at its time, makes a long-away device's resync due (a delete of one of its
/// items, which the cloud purges while it is away), and starts it again after the pause.
async fn churn_device(shared: Arc<Shared>, plan: ChurnPlan, start: Instant, config: AgentConfig) {
    tokio::time::sleep_until((start + plan.off_at).into()).await;
    let device = &shared.devices[plan.device];
    device.stop().await;
    if plan.long {
        let account = &shared.config.account;
        let name = &shared.names[plan.device];
        let path = format!(
            "/v1/accounts/{account}/devices/{name}/items/{}",
            device::DOWN_MODEL
        );
        let marker = json!({"deviceId": name, "name": format!("rm{}", plan.device)});
        let made = shared.api.post(&path, marker.clone()).await.is_ok()
            && shared.api.delete(&path, marker).await.is_ok();
        if !made {
            shared.stats.errors.add("churn_marker_failed", 1);
        }
    }
    tokio::time::sleep(plan.pause).await;
    if let Err(e) = device.start(config).await {
        tracing::error!(device = %device.name, "cannot start the device again: {e}");
        shared.stats.errors.add("device_restart_failed", 1);
        return;
    }
    // Back means welcomed again, and for a long-away device, resynced: the drain waits for
    // this, so the report does not end in the middle of a resync.
    let deadline = Instant::now() + CHURN_RETURN_TIMEOUT;
    loop {
        let back = device.is_ready() && (!plan.long || device.current_resyncs() > 0);
        if back {
            break;
        }
        if Instant::now() >= deadline {
            let kind = if plan.long && device.is_ready() {
                "churn_long_without_resync"
            } else {
                "churn_not_back"
            };
            tracing::warn!(device = %device.name, long = plan.long, "a churned device is not back in step");
            shared.stats.errors.add(kind, 1);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Counters::inc(&shared.stats.counters.churned);
    if plan.long {
        Counters::inc(&shared.stats.counters.churned_long);
    }
}

/// What the fleet still owes.
fn outstanding(shared: &Shared) -> Outstanding {
    let broadcasts = shared.stats.broadcast_seqs();
    let mut total = Outstanding::default();
    for d in &shared.devices {
        total.add(&d.outstanding(&broadcasts));
    }
    total
}

/// The sum of `changes_applied` of this run's devices, from the registry (`GET /v1/devices`).
async fn device_changes_applied(shared: &Shared) -> Option<u64> {
    let prefix = shared.names.first()?.split('-').next()?.to_string() + "-";
    let mut after: Option<String> = None;
    let mut sum = 0u64;
    loop {
        let mut path = format!(
            "/v1/devices?account={}&limit={DEVICE_PAGE}",
            shared.config.account
        );
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let page = match shared.api.get(&path).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot list the devices: {e}");
                return None;
            }
        };
        for d in page["devices"].as_array()? {
            if d["device"].as_str().is_some_and(|n| n.starts_with(&prefix)) {
                sum += d["changes_applied"].as_u64().unwrap_or(0);
            }
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => return Some(sum),
        }
    }
}

/// Ticks at `rate` per second from `origin + offset`. When its user falls more than a second
/// behind, the ticks missed are skipped (and counted in `skipped`) rather than caught up in a
/// burst: the load offered is then less than asked, and the report says by how much.
struct Pacer {
    period: Duration,
    next: Instant,
    skipped: u64,
}

impl Pacer {
    fn new(rate: f64, offset: Duration, origin: Instant) -> Pacer {
        Pacer {
            period: Duration::from_secs_f64(1.0 / rate.max(1e-6)),
            next: origin + offset,
            skipped: 0,
        }
    }

    async fn next(&mut self) {
        let now = Instant::now();
        if self.next > now {
            tokio::time::sleep_until(self.next.into()).await;
        } else if now - self.next > Duration::from_secs(1) {
            let behind = now - self.next;
            self.skipped += (behind.as_secs_f64() / self.period.as_secs_f64()) as u64;
            self.next = now;
        }
        self.next += self.period;
    }

    /// Waits for the next tick; false when it falls at or after `end`.
    async fn next_before(&mut self, end: Instant) -> bool {
        if self.next >= end {
            return false;
        }
        self.next().await;
        true
    }
}

/// Every second: a progress tick to the sink and the timeline.
async fn sampler(shared: Arc<Shared>, sink: ProgressSink, mut stop: watch::Receiver<bool>) {
    let counters = &shared.stats.counters;
    let mut last = Instant::now();
    let mut last_up = 0;
    let mut last_down = 0;
    let mut last_cloud = shared.cloud_sample();
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.changed() => return,
        }
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64().max(1e-3);
        last = now;
        let (up, down) = (
            Counters::get(&counters.up_acked),
            Counters::get(&counters.down_applied),
        );
        let (up_per_s, down_per_s) = ((up - last_up) as f64 / dt, (down - last_down) as f64 / dt);
        (last_up, last_down) = (up, down);
        let (up_lag_ms, up_lag_total_ms) = shared.stats.up_lag.take_interval();
        let (down_lag_ms, down_lag_total_ms) = shared.stats.down_lag.take_interval();
        let mut connected = 0;
        let mut outbox = 0;
        let mut device_errors = 0;
        for d in &shared.devices {
            let v = d.view();
            connected += usize::from(v.ready);
            outbox += v.pending;
            device_errors += v.counts.kinds().iter().map(|(_, n)| n).sum::<u64>();
        }
        let cloud = shared.cloud_sample();
        let cloud_cpu_pct = match (&cloud, &last_cloud) {
            (Some(now), Some(before)) => now.cpu_pct_since(before),
            _ => None,
        };
        let cloud_rss_mib = cloud.as_ref().map(ProcSample::rss_mib);
        last_cloud = cloud;
        shared.proc_sample(None);
        if let Some(v) = cloud_status_quiet(&shared.api, shared.phase()).await {
            let resyncing = v["sessions_resyncing"].as_u64().unwrap_or(0);
            shared
                .sessions_resyncing_max
                .fetch_max(resyncing, Ordering::Relaxed);
        }
        let p = Progress {
            phase: shared.phase(),
            t_s: shared.started.elapsed().as_secs_f64(),
            devices: shared.devices.len(),
            registered: shared.registered.load(Ordering::Relaxed),
            connected,
            up_per_s,
            down_per_s,
            up_lag_ms,
            up_lag_total_ms,
            down_lag_ms,
            down_lag_total_ms,
            outbox,
            errors: shared.stats.errors.total() + device_errors,
            cloud_cpu_pct,
            cloud_rss_mib,
        };
        sink(&p);
        shared
            .timeline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(p);
    }
}

/// The cloud's status for the sampler, once the devices exist (not while registering, where
/// it would only slow the registrations down).
async fn cloud_status_quiet(api: &Api, phase: Phase) -> Option<Value> {
    match phase {
        Phase::Starting | Phase::Registering | Phase::Stopping => None,
        _ => api.get("/v1/status").await.ok(),
    }
}

fn report(
    shared: &Shared,
    m: Measured,
    owed: Outstanding,
    device_changes_applied: Option<u64>,
) -> FleetReport {
    let config = &shared.config;
    let c = &shared.stats.counters;
    let mut errors = shared.stats.errors.snapshot();
    let mut counts = device::AgentCounts::default();
    for d in &shared.devices {
        counts.add(&d.view().counts);
    }
    for (kind, n) in counts.kinds() {
        if n > 0 {
            errors.insert(kind.to_string(), n);
        }
    }
    let spans = shared.spans().clone();
    // Summed over the cloud's processes: each started its counters at 0.
    let delta = |field: &str| -> Option<u64> {
        let mut sum = 0u64;
        for (before, after) in &spans {
            let b = before
                .as_ref()?
                .get(field)
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let a = after.as_ref()?[field].as_u64()?;
            sum += a.saturating_sub(b);
        }
        Some(sum)
    };
    for field in CLOUD_ERROR_COUNTERS {
        if let Some(n) = delta(field).filter(|n| *n > 0) {
            errors.insert(format!("cloud_{field}"), n);
        }
    }
    let up_rejected = Counters::get(&c.up_rejected);
    let mib = |s: &Option<ProcSample>| s.as_ref().map(ProcSample::rss_mib);
    let up_acked = Counters::get(&c.up_acked).saturating_sub(up_rejected);
    let up_written = Counters::get(&c.up_written);
    let cloud = CloudFigures {
        pid: shared.cloud_pid(),
        cpu_pct_avg: match (&m.cloud_write_end, &m.cloud_write_start) {
            (Some(end), Some(start)) => end.cpu_pct_since(start),
            _ => None,
        },
        cpu_ms_per_acked_push: cpu_ms_per(&m.cloud_drain_end, &m.cloud_write_start, up_acked),
        rss_start_mib: mib(&m.cloud_start),
        rss_connected_mib: mib(&m.cloud_connected),
        rss_peak_mib: shared
            .cloud_pid()
            .map(|_| shared.cloud_rss_peak.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)),
        rss_per_device_kib: match (&m.cloud_connected, &m.cloud_start) {
            (Some(conn), Some(start)) => Some(
                (conn.rss_bytes as f64 - start.rss_bytes as f64) / 1024.0 / config.devices as f64,
            ),
            _ => None,
        },
    };
    let sim = SimFigures {
        cpu_pct_avg: match (&m.sim_write_end, &m.sim_write_start) {
            (Some(end), Some(start)) => end.cpu_pct_since(start),
            _ => None,
        },
        cpu_ms_per_write: cpu_ms_per(&m.sim_drain_end, &m.sim_write_start, up_written),
        rss_peak_mib: Some(shared.sim_rss_peak.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)),
    };
    let resyncs = shared
        .devices
        .iter()
        .map(|d| d.view().counts.resyncs.saturating_sub(1))
        .sum();
    let write_s = m.write_s.max(1e-3);
    FleetReport {
        devices: config.devices,
        rate_per_device: config.rate_per_device,
        duration_s: config.duration.as_secs_f64(),
        offered_up_per_s: config.offered_up_per_s(),
        up_written,
        up_acked,
        up_acks_repeated: Counters::get(&c.up_acks_repeated),
        up_per_s: m.up_acked_in_writes as f64 / write_s,
        down_written: Counters::get(&c.down_written),
        down_applied: Counters::get(&c.down_applied),
        down_per_s: m.down_applied_in_writes as f64 / write_s,
        up_lag_ms: shared.stats.up_lag.total(),
        down_lag_ms: shared.stats.down_lag.total(),
        broadcasts_written: Counters::get(&c.broadcasts_written),
        broadcasts_applied: Counters::get(&c.broadcasts_applied),
        broadcast_lag_ms: shared.stats.broadcast_lag.total(),
        commands_sent: Counters::get(&c.commands_sent),
        commands_run: Counters::get(&c.commands_run),
        commands_done: Counters::get(&c.commands_done),
        command_lag_ms: shared.stats.command_lag.total(),
        connect_s: m.connect_s,
        drain_s: m.drain_s,
        storm: m.storm,
        errors,
        cloud,
        cloud_counts: CloudCounts {
            push_changes_applied: delta("push_changes_applied"),
            push_changes_covered: delta("device_push_changes_covered"),
            push_changes_reanswered: delta("device_push_changes_reanswered"),
            device_changes_applied,
            sessions_resyncing_max: shared.sessions_resyncing_max.load(Ordering::Relaxed),
            store_commits: delta("store_commits"),
            store_jobs_committed: delta("store_jobs_committed"),
        },
        sim,
        resyncs,
        push_timeouts: counts.push_timeouts,
        churned: Counters::get(&c.churned),
        churned_long: Counters::get(&c.churned_long),
        duplicates: Counters::get(&c.down_duplicates) + Counters::get(&c.broadcast_duplicates),
        missing: Missing {
            up: owed.ups,
            down: owed.downs,
            broadcasts: owed.broadcasts,
            commands: owed.commands,
            outbox: owed.outbox,
        },
        config: config.clone(),
        timeline: std::mem::take(
            &mut *shared
                .timeline
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ),
    }
}
