//! `devtables demo`: the whole system on embedded defaults, in one command.
//!
//! Starts the cloud (SQLite, embedded broker, HTTP API) and a few real agents, each with its own
//! database file and its own MQTT connection. Devices write readings, faults and settings; the
//! cloud sends commands, changes settings and announces firmware; a status line shows data
//! flowing up and commands flowing down.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use devtables_agent::{Agent, AgentConfig};
use devtables_cloud::ops::WriteKind;
use devtables_cloud::store::sqlite::{SqliteOptions, SqliteStore};
use devtables_cloud::store::{ItemQuery, KeyScope};
use devtables_cloud::{BrokerMode, Cloud, CloudConfig};
use devtables_schema::{Item, Schema};
use devtables_sync::identity::{DeviceId, Owner};
use serde_json::json;

use crate::serve_cmd::{explain_start_error, runtime, stop_signal, StartCleanup};

/// The example schema, built in so the demo runs from any folder.
const SCHEMA: &str = include_str!("../../../examples/schema.json5");
const ACCOUNT: &str = "demo";

#[derive(Args)]
pub struct DemoArgs {
    /// How many devices to run.
    #[arg(long, default_value_t = 3)]
    devices: usize,
    /// Stop after this long (e.g. `30s`, `2m`); default: run until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Data folder (default: a new folder under the system temp dir). A folder an earlier demo
    /// used is used again: its devices get new secrets and carry on with their databases.
    #[arg(long)]
    data: Option<PathBuf>,
    /// HTTP API address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    api: SocketAddr,
    /// Embedded MQTT broker address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    mqtt: SocketAddr,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("unknown unit {unit:?}: use ms, s or m")),
    }
}

fn item(v: serde_json::Value) -> Item {
    match v {
        serde_json::Value::Object(m) => m,
        _ => Item::new(),
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.devices > 1000 {
        anyhow::bail!("--devices must be between 1 and 1000");
    }
    let data = match args.data.clone() {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("devtables-demo-{}", std::process::id())),
    };
    let schema = Arc::new(Schema::from_json5(SCHEMA).context("the built-in example schema")?);
    // A demo that cannot start (a port in use) leaves no folder or file of its own behind.
    let cleanup = StartCleanup::before(&data);
    let runtime = runtime()?;
    let started = runtime.block_on(start_cloud(&args, &data, schema.clone()));
    match started {
        Ok((cloud, key)) => runtime.block_on(demo(args, data, schema, cloud, key)),
        Err(e) => {
            cleanup.undo();
            Err(e)
        }
    }
}

/// The demo's cloud on `data/cloud`, with a new admin key of the demo account (returned).
async fn start_cloud(
    args: &DemoArgs,
    data: &Path,
    schema: Arc<Schema>,
) -> anyhow::Result<(Cloud, String)> {
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let mut config = CloudConfig::new(data.join("cloud"));
    config.api_listen = args.api;
    config.broker = BrokerMode::Embedded { listen: args.mqtt };
    // The API refuses requests without a key: the demo makes an admin key of its account in the
    // store before the cloud opens it (as `devtables keys create` does, so the cloud does not
    // warn that no key exists) and shows it once; only its hash is stored.
    let key = {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
        let mut store =
            SqliteStore::open(&config.data_dir.join("cloud.db"), SqliteOptions::default())?;
        devtables_cloud::auth::create_api_key(
            &mut store,
            ACCOUNT,
            KeyScope::Admin,
            crate::keys_cmd::now_ms(),
        )
        .context("creating the demo's API key")?
        .key
    };
    let cloud = Cloud::start(config.clone(), schema)
        .await
        .map_err(|e| explain_start_error(e, &config, None))?;
    Ok((cloud, key))
}

async fn demo(
    args: DemoArgs,
    data: PathBuf,
    schema: Arc<Schema>,
    cloud: Cloud,
    key: String,
) -> anyhow::Result<()> {
    let (host, port) = devtables_agent::config::parse_broker(&cloud.mqtt_addr)?;
    eprintln!("devtables demo: data in {}", data.display());
    eprintln!("  API key   {key}   (admin of account {ACCOUNT}; shown only now)");
    eprintln!(
        "  HTTP API  http://{}   (try: curl -H 'Authorization: Bearer {key}' http://{}/v1/devices)",
        cloud.api_addr, cloud.api_addr
    );
    eprintln!("  MQTT      {}", cloud.mqtt_addr);
    eprintln!(
        "  SQL       sqlite3 {} \"select device, model, item from items\"",
        data.join("cloud/cloud.db").display()
    );

    let mut agents = Vec::new();
    for i in 1..=args.devices {
        let name = format!("dev-{i}");
        let id = DeviceId::new(ACCOUNT, name.as_str())?;
        let secret = match cloud.register_device(&id).await {
            Ok(secret) => secret,
            // An earlier demo on this folder registered it, and only the secret's hash is
            // stored: give the device a new secret; its database carries on.
            Err(devtables_cloud::ops::OpError::Store(
                devtables_cloud::store::StoreError::DeviceExists(_),
            )) => cloud
                .rotate_device_secret(&id)
                .await
                .with_context(|| format!("a new secret for {id}, registered by an earlier demo"))?,
            Err(e) => return Err(e.into()),
        };
        let mut ac = AgentConfig::new(ACCOUNT, &name, &secret, data.join(format!("{name}.db")));
        ac.broker_host = host.clone();
        ac.broker_port = port;
        let agent = Agent::start(ac, schema.clone())?;
        let device = name.clone();
        agent.on_command(
            "ping",
            Arc::new(move |_cmd: &Item| {
                Ok(json!({"pong": device, "at": devtables_db::system_now_ms()}))
            }),
        );
        agent.on_command(
            "reboot",
            Arc::new(|_cmd: &Item| Ok(json!({"rebooting": true}))),
        );
        agents.push(agent);
    }

    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    let stop = stop_signal();
    tokio::pin!(stop);
    let mut n = 0u64;
    let mut commands_sent = 0u64;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        n += 1;
        for (i, agent) in agents.iter().enumerate() {
            let device = agent.id().device.clone();
            let value = 20.0 + ((n as f64) * 0.7 + i as f64).sin() * 5.0;
            let reading = json!({"deviceId": device, "name": "temp", "value": (value * 10.0).round() / 10.0,
                                 "status": if value > 24.0 { "warn" } else { "ok" }});
            if let Err(e) = agent.db().create("Reading", &item(reading)) {
                eprintln!("\n{device}: cannot write a reading: {e}");
            }
            if n % 7 == (i as u64) % 7 {
                let fault = json!({"deviceId": device, "severity": "warn", "message": format!("fan speed low (tick {n})")});
                let _ = agent.db().create("Fault", &item(fault));
            }
            if n.is_multiple_of(5) {
                let setting = json!({"deviceId": device, "name": "interval", "value": format!("{}s", 1 + n % 3)});
                let _ = agent.db().upsert("Setting", &item(setting));
            }
        }
        if n.is_multiple_of(3) {
            let target = &agents[(n as usize / 3) % agents.len()];
            let owner = Owner::Device(target.id().clone());
            let cmd = json!({"command": if n.is_multiple_of(12) { "reboot" } else { "ping" }, "args": {"tick": n}});
            match cloud
                .write_item(owner, "Command", item(cmd), WriteKind::Create)
                .await
            {
                Ok(_) => commands_sent += 1,
                Err(e) => eprintln!("\ncannot send a command: {e}"),
            }
        }
        if n == 4 {
            let fw = json!({"version": "1.2.0", "url": "https://updates.example/fw-1.2.0.bin"});
            if let Err(e) = cloud
                .write_item(
                    Owner::Account(ACCOUNT.into()),
                    "Firmware",
                    item(fw),
                    WriteKind::Create,
                )
                .await
            {
                eprintln!("\ncannot announce firmware: {e}");
            }
        }
        let line = status_line(&cloud, &agents, started, commands_sent).await;
        if tty {
            eprint!("\r{line}\x1b[K");
        } else if n.is_multiple_of(5) {
            eprintln!("{line}");
        }
    }
    eprintln!();
    eprintln!(
        "{}",
        status_line(&cloud, &agents, started, commands_sent).await
    );
    for agent in agents {
        agent.shutdown().await;
    }
    cloud.shutdown().await;
    eprintln!("stopped; data kept in {}", data.display());
    Ok(())
}

async fn count(cloud: &Cloud, model: &str, filters: Vec<(String, serde_json::Value)>) -> String {
    let query = ItemQuery {
        account: ACCOUNT.into(),
        model: model.into(),
        filters,
        limit: 1000,
        ..ItemQuery::default()
    };
    match cloud.store.call(move |c| c.store.query_items(&query)).await {
        Ok(Ok(page)) if page.next.is_some() => "1000+".into(),
        Ok(Ok(page)) => page.items.len().to_string(),
        _ => "?".into(),
    }
}

async fn status_line(
    cloud: &Cloud,
    agents: &[Agent],
    started: Instant,
    commands_sent: u64,
) -> String {
    let ready = agents.iter().filter(|a| a.status().ready).count();
    let pending: usize = agents.iter().map(|a| a.status().pending).sum();
    let readings = count(cloud, "Reading", Vec::new()).await;
    let faults = count(cloud, "Fault", Vec::new()).await;
    let done = count(cloud, "Command", vec![("status".into(), json!("done"))]).await;
    let firmware: usize = agents
        .iter()
        .filter(|a| {
            let props = item(json!({}));
            a.db()
                .find("Firmware", &props, &devtables_db::FindOptions::default())
                .map(|p| !p.items.is_empty())
                .unwrap_or(false)
        })
        .count();
    format!(
        "t={:>3}s devices {}/{} ready | up: {} readings, {} faults in the cloud, outbox {} | down: {} commands sent, {} done, firmware on {} devices",
        started.elapsed().as_secs(),
        ready,
        agents.len(),
        readings,
        faults,
        pending,
        commands_sent,
        done,
        firmware
    )
}
