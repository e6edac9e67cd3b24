//! Two devices in two accounts, over real TLS: whatever device A tries with its own credentials,
//! it reaches nothing of device B's. Written once ([`two_devices_are_isolated`]) and run against
//! the embedded broker's TLS listener (here) and against Mosquitto on the configuration
//! `devtables broker-config mosquitto` writes (`broker_config.rs`).
//!
//! A may not: subscribe to B's topics or to `#` (refused, or nothing delivered), publish on B's
//! up topic (the cloud applies nothing), use B's client id (refused, or bound to A's own
//! identity without touching B's session), touch B's rows by naming B in a payload (refused
//! `ownership`), or read B's rows through the API with a key of A's account (403). Each check
//! has a positive control, so a check that passes because nothing happened at all fails.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use devtables_schema::Schema;
use devtables_sync::hlc::Hlc;
use devtables_sync::wire::{self, Change, Op, UpMsg, WireConfig};
use rumqttc::{
    Client, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use serde_json::{json, Value};

use super::example_schema;
use super::harness::{
    create_key, eventually, unique_prefix, AgentProc, AgentSpec, ApiClient, BrokerChoice,
    CloudProc, KEY_ACCOUNT, WAIT,
};

/// Device A's account (the harness's key account) and B's.
const ACCOUNT_A: &str = KEY_ACCOUNT;
const ACCOUNT_B: &str = "globex";
const DEVICE_A: &str = "a1";
const DEVICE_B: &str = "b1";

/// Which broker the checks run against: where the brokers legitimately differ (Mosquitto grants
/// a subscription and filters each delivery; it binds a client id to the username rather than
/// refusing a mismatch), the checks expect each one's behaviour and the same outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    Embedded,
    Mosquitto,
}

/// A cloud and the TLS broker its devices use.
pub struct Deployment<'a> {
    pub kind: BrokerKind,
    pub cloud: &'a CloudProc,
    /// `host:port` of the broker's TLS listener.
    pub mqtt: String,
    /// The CA the broker's certificate chains to.
    pub ca: PathBuf,
    pub prefix: String,
    /// Called after devices were registered: brings the broker's view of the registry up to date
    /// (nothing for the embedded broker, which reads the registry itself).
    pub registry_changed: &'a dyn Fn(),
}

impl Deployment<'_> {
    fn topic(&self, account: &str, device: &str, dir: &str) -> String {
        format!("{}/{account}/{device}/{dir}", self.prefix)
    }
}

/// A raw MQTT client over TLS (no agent), its events read on their own thread (rumqttc's poll is
/// not cancel-safe, so the test waits on the channel instead). Every PUBLISH it receives is kept.
pub struct RawMqtt {
    client: Client,
    events: mpsc::Receiver<Result<Event, ConnectionError>>,
    /// (topic, payload) of every PUBLISH received so far.
    pub received: Vec<(String, Vec<u8>)>,
    closed: Option<String>,
}

impl RawMqtt {
    pub fn connect(
        mqtt: &str,
        ca: &Path,
        client_id: &str,
        username: &str,
        secret: &str,
    ) -> RawMqtt {
        let (host, port) = mqtt.rsplit_once(':').expect("host:port");
        let mut options = MqttOptions::new(client_id, host, port.parse().expect("a port"));
        options.set_credentials(username, secret);
        options.set_keep_alive(Duration::from_secs(30));
        let tls = devtables_agent::tls::client_config(&devtables_agent::tls::ClientTls {
            ca_file: ca.to_path_buf(),
            server_name: None,
            identity: None,
        })
        .expect("a TLS client configuration");
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
        ));
        let (client, mut connection) = Client::new(options, 16);
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                let stop = event.is_err();
                if tx.send(event).is_err() || stop {
                    break;
                }
            }
        });
        RawMqtt {
            client,
            events,
            received: Vec::new(),
            closed: None,
        }
    }

    /// The next packet from the broker; `Err` with the reason once the connection is closed.
    fn next_packet(&mut self, what: &str) -> Result<Packet, String> {
        if let Some(reason) = &self.closed {
            return Err(reason.clone());
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Ok(Event::Incoming(packet))) => {
                    if let Packet::Publish(p) = &packet {
                        self.received.push((p.topic.clone(), p.payload.to_vec()));
                    }
                    return Ok(packet);
                }
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => {
                    let reason = match e {
                        ConnectionError::ConnectionRefused(code) => format!("refused: {code:?}"),
                        other => other.to_string(),
                    };
                    self.closed = Some(reason.clone());
                    return Err(reason);
                }
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    /// Waits for the CONNACK: `Ok`, or the refusal code (`None`: the connection failed otherwise).
    pub fn connack(&mut self) -> Result<(), Option<ConnectReturnCode>> {
        loop {
            match self.next_packet("a CONNACK") {
                Ok(Packet::ConnAck(_)) => return Ok(()),
                Ok(_) => {}
                Err(_) => {
                    return Err(match self.closed.as_deref() {
                        Some(r) if r.starts_with("refused") => {
                            Some(refusal_code(r).unwrap_or(ConnectReturnCode::NotAuthorized))
                        }
                        _ => None,
                    })
                }
            }
        }
    }

    /// Subscribes to `filters` and waits for the SUBACK: its return codes, or `Err` when the
    /// broker closed the connection instead.
    pub fn subscribe(&mut self, filters: &[String]) -> Result<Vec<SubscribeReasonCode>, String> {
        let filters = filters
            .iter()
            .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        self.client
            .subscribe_many(filters)
            .map_err(|e| e.to_string())?;
        loop {
            if let Packet::SubAck(ack) = self.next_packet("a SUBACK")? {
                return Ok(ack.return_codes);
            }
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK (`Err` when the broker closed the connection
    /// instead).
    pub fn publish(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|e| e.to_string())?;
        loop {
            if let Packet::PubAck(_) = self.next_packet("a PUBACK")? {
                return Ok(());
            }
        }
    }

    /// A barrier: a SUBSCRIBE answered after everything the broker sent this connection before
    /// it (one TCP stream, in order), so [`RawMqtt::received`] then holds every delivery routed
    /// to it so far. `false` when the connection is closed (nothing more can arrive).
    pub fn barrier(&mut self, own_topic: &str) -> bool {
        self.subscribe(&[own_topic.to_string()]).is_ok()
    }

    /// Waits until the broker closes the connection; the reason.
    pub fn wait_closed(&mut self) -> String {
        loop {
            if let Err(reason) = self.next_packet("the broker to close the connection") {
                return reason;
            }
        }
    }

    /// Topics of the PUBLISHes received under `prefix`.
    pub fn received_under(&self, prefix: &str) -> Vec<String> {
        self.received
            .iter()
            .filter(|(t, _)| t.starts_with(prefix))
            .map(|(t, _)| t.clone())
            .collect()
    }
}

/// The code rumqttc's `ConnectionRefused({code:?})` text names.
fn refusal_code(reason: &str) -> Option<ConnectReturnCode> {
    use ConnectReturnCode::*;
    [
        RefusedProtocolVersion,
        BadClientId,
        ServiceUnavailable,
        BadUserNamePassword,
        NotAuthorized,
    ]
    .into_iter()
    .find(|c| reason.ends_with(&format!("{c:?}")))
}

/// A push of one Fault of `device` (named in its payload) as an agent would send it, built
/// through the schema like the agent builds it: what a forged message on `device`'s up topic
/// would carry.
fn push_of_fault(device: &str, id: &str) -> Vec<u8> {
    let schema = schema();
    let model = schema.model("Fault").expect("a Fault model");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let input = json!({"deviceId": device, "id": id, "severity": "critical", "message": "forged"});
    let item = model
        .prepare_create(input.as_object().unwrap(), now as i64)
        .expect("a valid Fault");
    let key = model.primary_key(&item).expect("a key");
    let change = Change {
        model: "Fault".into(),
        key,
        op: Op::Put,
        item: Some(item),
        version: Hlc {
            wall_ms: now,
            counter: 0,
            node: 7,
        },
        base: None,
    };
    let msg = UpMsg::Push {
        batch: 1,
        changes: vec![change],
        session: None,
    };
    wire::encode_up(schema.version(), &msg, &WireConfig::default()).expect("encodes")
}

fn schema() -> Schema {
    Schema::load(&example_schema()).expect("the example schema")
}

/// A device record through the API, with a key allowed to read it.
fn record(api: &ApiClient, account: &str, device: &str) -> Value {
    api.get(&format!("/v1/devices/{account}/{device}"))
        .unwrap_or_else(|e| panic!("device record of {account}/{device}: {e}"))
}

fn counter(api: &ApiClient, account: &str, device: &str, name: &str) -> u64 {
    record(api, account, device)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in the record of {account}/{device}"))
}

fn faults(api: &ApiClient, account: &str, device: &str) -> Vec<Value> {
    let page = api
        .get(&format!(
            "/v1/accounts/{account}/devices/{device}/items/Fault?limit=1000"
        ))
        .unwrap_or_else(|e| panic!("Faults of {account}/{device}: {e}"));
    page["items"].as_array().cloned().unwrap_or_default()
}

fn fault_ids(faults: &[Value]) -> Vec<String> {
    faults
        .iter()
        .map(|f| f["item"]["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A status code of `GET path` with `key`.
fn get_status(api: &ApiClient, key: &str, path: &str) -> u16 {
    match ureq::get(&api.url(path))
        .set("authorization", &format!("Bearer {key}"))
        .call()
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("GET {path}: {e}"),
    }
}

/// Writes a Setting for `account/device` through the API and waits until the device's agent
/// holds it: proof that the cloud published on that device's down topic.
fn setting_reaches(
    api: &ApiClient,
    agent: &mut AgentProc,
    account: &str,
    device: &str,
    name: &str,
) {
    let (status, body) = api.send(
        "POST",
        &format!("/v1/accounts/{account}/devices/{device}/items/Setting"),
        json!({"name": name, "value": "v"}),
    );
    assert_eq!(status, 201, "{body}");
    eventually(&format!("setting {name} on {account}/{device}"), || {
        let got = agent.op(json!({"op": "find", "model": "Setting", "item": {"deviceId": device}}));
        got.as_array()
            .is_some_and(|items| items.iter().any(|i| i["name"] == name))
            .then_some(())
            .ok_or(got.to_string())
    });
}

/// Every isolation check between device A (account `acme`) and device B (account `globex`).
pub fn two_devices_are_isolated(d: &Deployment<'_>) {
    let data = d.cloud.dir.join("cloud-data");
    let api_a = d.cloud.client();
    let api_b = ApiClient {
        addr: d.cloud.api.clone(),
        key: create_key(&data, ACCOUNT_B, "admin"),
    };
    let secret_a = api_a.register(ACCOUNT_A, DEVICE_A);
    let secret_b = api_b.register(ACCOUNT_B, DEVICE_B);
    (d.registry_changed)();
    let name_a = format!("{ACCOUNT_A}/{DEVICE_A}");
    let name_b = format!("{ACCOUNT_B}/{DEVICE_B}");
    eventually("both devices accepted by the broker over TLS", || {
        for (name, secret) in [(&name_a, &secret_a), (&name_b, &secret_b)] {
            RawMqtt::connect(&d.mqtt, &d.ca, name, name, secret)
                .connack()
                .map_err(|e| format!("{name}: {e:?}"))?;
        }
        Ok(())
    });

    let broker = format!("mqtts://{}", d.mqtt);
    let tls = format!("tls: {{ca: '{}'}},", d.ca.display());
    let spec = |name: &'static str, account: &'static str, secret: &str| {
        AgentProc::start_with(
            &AgentSpec {
                dir: &d.cloud.dir,
                name,
                account,
                device: name,
                secret,
                mqtt: &broker,
                prefix: &d.prefix,
                schema: None,
            },
            &tls,
        )
    };
    let mut a = spec(DEVICE_A, ACCOUNT_A, &secret_a);
    let mut b = spec(DEVICE_B, ACCOUNT_B, &secret_b);
    a.wait_synced();
    b.wait_synced();

    // 1. A names B in its payload: refused as `ownership`; nothing stored for B (nor for A).
    a.op(json!({"op": "create", "model": "Fault",
        "item": {"deviceId": DEVICE_B, "severity": "warn", "message": "names b1"}}));
    let status = eventually("A's push naming B refused", || {
        let st = a.status();
        (st["rejected"] == 1 && st["pending"] == 0)
            .then_some(st.clone())
            .ok_or(st.to_string())
    });
    let reason = status["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("belongs to another device"),
        "refused for ownership: {status}"
    );
    assert_eq!(counter(&api_a, ACCOUNT_A, DEVICE_A, "changes_rejected"), 1);
    assert!(
        faults(&api_b, ACCOUNT_B, DEVICE_B).is_empty(),
        "nothing stored for B"
    );
    assert!(faults(&api_a, ACCOUNT_A, DEVICE_A).is_empty(), "nor for A");
    // Control: A's own Fault goes through.
    a.op(json!({"op": "create", "model": "Fault",
        "item": {"deviceId": DEVICE_A, "id": "own", "severity": "info", "message": "mine"}}));
    eventually("A's own fault in the cloud", || {
        let f = faults(&api_a, ACCOUNT_A, DEVICE_A);
        (fault_ids(&f) == ["own"])
            .then_some(())
            .ok_or(format!("{f:?}"))
    });
    a.stop();

    // 2. A subscribes to B's topics and to everything: refused, or nothing of B's delivered,
    //    while B does receive what the cloud sends it.
    let down_a = d.topic(ACCOUNT_A, DEVICE_A, "down");
    let b_prefix = format!("{}/{ACCOUNT_B}/", d.prefix);
    let mut spy = RawMqtt::connect(&d.mqtt, &d.ca, &name_a, &name_a, &secret_a);
    spy.connack().expect("A connects with its own credentials");
    let stolen = [
        d.topic(ACCOUNT_B, DEVICE_B, "down"),
        d.topic(ACCOUNT_B, "_all", "down"),
        d.topic(ACCOUNT_B, DEVICE_B, "up"),
        "#".to_string(),
        format!("{}/#", d.prefix),
        format!("{}/+/+/down", d.prefix),
    ];
    let codes = spy.subscribe(&stolen);
    if d.kind == BrokerKind::Embedded {
        let codes = codes.as_ref().expect("a SUBACK");
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, SubscribeReasonCode::Failure)),
            "the embedded broker refuses each of A's subscriptions to B's topics: {codes:?}"
        );
    }
    setting_reaches(&api_b, &mut b, ACCOUNT_B, DEVICE_B, "spied_on");
    spy.barrier(&down_a);
    assert_eq!(
        spy.received_under(&b_prefix),
        Vec::<String>::new(),
        "A received B's messages (SUBACK codes {codes:?})"
    );
    drop(spy);

    // 3. A publishes a push on B's up topic, while B has a live session (the cloud would apply
    //    it if it arrived). Control first: the same kind of message on A's own topic, after a
    //    hello, is applied, so the forged one fails for the right reason only.
    let mut raw_a = RawMqtt::connect(&d.mqtt, &d.ca, &name_a, &name_a, &secret_a);
    raw_a.connack().expect("A connects");
    raw_a
        .subscribe(std::slice::from_ref(&down_a))
        .expect("A's own down topic");
    let up_a = d.topic(ACCOUNT_A, DEVICE_A, "up");
    let hello = wire::encode_up(
        schema().version(),
        &UpMsg::Hello {
            session: 99,
            cursor: 0,
            pending: 0,
            mark: None,
        },
        &WireConfig::default(),
    )
    .unwrap();
    raw_a.publish(&up_a, hello).expect("A's hello");
    while !raw_a.received.iter().any(|(t, _)| *t == down_a) {
        raw_a
            .next_packet("the cloud's welcome to A")
            .expect("A stays connected");
    }
    raw_a
        .publish(&up_a, push_of_fault(DEVICE_A, "control"))
        .expect("A's own push");
    eventually("A's control push applied", || {
        let f = faults(&api_a, ACCOUNT_A, DEVICE_A);
        let mut ids = fault_ids(&f);
        ids.sort();
        (ids == ["control", "own"])
            .then_some(())
            .ok_or(format!("{ids:?}"))
    });
    let applied_b = counter(&api_b, ACCOUNT_B, DEVICE_B, "changes_applied");
    let rejected_b = counter(&api_b, ACCOUNT_B, DEVICE_B, "changes_rejected");
    let forged = raw_a.publish(
        &d.topic(ACCOUNT_B, DEVICE_B, "up"),
        push_of_fault(DEVICE_B, "forged"),
    );
    // Mosquitto acknowledges and drops it; the embedded broker may close the connection.
    eprintln!("A's publish on B's up topic: {forged:?}");
    drop(raw_a);
    // B's own write after it: once the cloud applied this, it had handled anything before it.
    b.op(json!({"op": "create", "model": "Fault",
        "item": {"deviceId": DEVICE_B, "id": "legit", "severity": "info", "message": "mine"}}));
    eventually("B's own fault in the cloud", || {
        let f = faults(&api_b, ACCOUNT_B, DEVICE_B);
        (!f.is_empty()).then_some(()).ok_or("none yet".to_string())
    });
    assert_eq!(
        fault_ids(&faults(&api_b, ACCOUNT_B, DEVICE_B)),
        ["legit"],
        "the forged push was not applied"
    );
    assert_eq!(
        (
            counter(&api_b, ACCOUNT_B, DEVICE_B, "changes_applied"),
            counter(&api_b, ACCOUNT_B, DEVICE_B, "changes_rejected")
        ),
        (applied_b + 1, rejected_b),
        "the cloud applied (and refused) nothing but B's own change"
    );

    // 4. A connects with B's client id: refused (embedded), or bound to A's own identity
    //    (Mosquitto's use_username_as_clientid); either way B's session is untouched and the
    //    impostor hears nothing of B's.
    let lost_before = b.logs.matching("MQTT connection lost").len();
    let mut impostor = RawMqtt::connect(&d.mqtt, &d.ca, &name_b, &name_a, &secret_a);
    let outcome = impostor.connack();
    match d.kind {
        BrokerKind::Embedded => assert!(
            matches!(outcome, Err(Some(_))),
            "the embedded broker refuses A's credentials under B's client id: {outcome:?}"
        ),
        BrokerKind::Mosquitto => {
            outcome.expect("Mosquitto accepts A's credentials, as A's own client id");
            let codes = impostor.subscribe(&[d.topic(ACCOUNT_B, DEVICE_B, "down")]);
            eprintln!("impostor's SUBACK on B's down topic: {codes:?}");
        }
    }
    setting_reaches(&api_b, &mut b, ACCOUNT_B, DEVICE_B, "after_impostor");
    if outcome.is_ok() {
        impostor.barrier(&down_a);
    }
    assert_eq!(
        impostor.received_under(&b_prefix),
        Vec::<String>::new(),
        "the impostor received B's messages"
    );
    assert_eq!(
        b.logs.matching("MQTT connection lost").len(),
        lost_before,
        "B's session was not taken over"
    );
    assert_eq!(b.status()["ready"], true);
    drop(impostor);

    // 5. The API with keys of A's account reaches none of B's rows (and does reach A's).
    let read_a = create_key(&data, ACCOUNT_A, "read");
    for key in [&read_a, &api_a.key] {
        for path in [
            format!("/v1/accounts/{ACCOUNT_B}/devices/{DEVICE_B}/items/Fault"),
            format!("/v1/accounts/{ACCOUNT_B}/devices/{DEVICE_B}/items/Setting"),
            format!("/v1/accounts/{ACCOUNT_B}/items/Fault"),
            format!("/v1/devices/{ACCOUNT_B}/{DEVICE_B}"),
            format!("/v1/accounts/{ACCOUNT_B}/conflicts"),
        ] {
            assert_eq!(get_status(&api_a, key, &path), 403, "GET {path}");
        }
    }
    assert_eq!(
        get_status(
            &api_a,
            &read_a,
            &format!("/v1/accounts/{ACCOUNT_A}/devices/{DEVICE_A}/items/Fault")
        ),
        200,
        "the read key does read its own account"
    );
    b.stop();
}

/// A CA and a server certificate it signed for 127.0.0.1 and localhost, written to `dir`:
/// (the CA file, server.pem, server.key).
fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca = devtables_tls::test_pki::TestCa::new("isolation test CA");
    let server = ca.server(dir, "server");
    (ca.write_ca(dir, "isolation"), server.cert, server.key)
}

/// The embedded broker with only its TLS listener.
#[test]
fn embedded_broker_over_tls_passes_the_isolation_checks() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(dir.path());
    let prefix = unique_prefix();
    let cloud = CloudProc::start(
        dir.path(),
        &prefix,
        BrokerChoice::Configured(format!(
            "embedded_broker_tls: {{listen: '127.0.0.1:0', cert: '{}', key: '{}'}},",
            cert.display(),
            key.display()
        )),
    );
    let mqtt = cloud.mqtt.clone();
    two_devices_are_isolated(&Deployment {
        kind: BrokerKind::Embedded,
        cloud: &cloud,
        mqtt,
        ca,
        prefix,
        registry_changed: &|| {},
    });
    // A client that does not speak TLS is refused at the handshake, and the refusal is in the
    // cloud's log: the embedded broker reports it through the `log` crate, which the binary
    // forwards to its own log.
    {
        use std::io::Write;
        let mut plain = std::net::TcpStream::connect(&cloud.mqtt).unwrap();
        // An MQTT 3.1.1 CONNECT in clear text.
        let _ = plain.write_all(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04plain");
        cloud
            .logs
            .wait_for("the refused TLS handshake in the cloud's log", |l| {
                l.contains("TLS accept error")
            });
    }
}
