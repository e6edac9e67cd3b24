//! A cloud that holds a push past the device's retransmit timeout, played by hand behind the
//! real embedded broker: the agent sends the push's changes again, counts the timeout in its
//! status, and one answer (to the original) settles both.

use std::sync::Arc;

use devtables_agent::Agent;
use devtables_cloud::broker::{
    Authenticator, Broker, BrokerConfig, PeerCertificate, Principal, Refusal,
};
use devtables_sync::identity::DeviceId;
use devtables_sync::topics;
use devtables_sync::wire::{self, ChangeResult, ChangeStatus, DownMsg, UpMsg, WireConfig};
use serde_json::json;
use tokio::sync::mpsc;

use super::support::{agent_config, eventually, item, schema, WAIT};

/// The one device of the test, `acme/d1` with secret `s`.
struct OneDevice;

impl Authenticator for OneDevice {
    fn authenticate(
        &self,
        _client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Principal, Refusal> {
        match (username, password) {
            (Some("acme/d1"), Some(b"s")) => Ok(Principal::Device(
                DeviceId::new("acme", "d1").expect("a device id"),
            )),
            _ => Err(Refusal::BadCredentials),
        }
    }

    fn authenticate_certificate(&self, _cert: &PeerCertificate) -> Result<Principal, Refusal> {
        Err(Refusal::BadCredentials)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_held_past_its_timeout_is_sent_again_counted_and_settled_by_one_answer() {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut config = BrokerConfig::new("127.0.0.1:0".parse().unwrap());
    config.device_messages = Some(tx);
    let broker = Broker::start(config, Arc::new(OneDevice)).await.unwrap();
    let publisher = broker.publisher();
    let dir = tempfile::tempdir().unwrap();
    let mut agent_cfg = agent_config(dir.path(), "s", broker.local_addr().port());
    agent_cfg.sync.retransmit_base_ms = 300;
    let agent = Agent::start(agent_cfg, schema()).unwrap();

    let version = schema().version().to_string();
    let device = DeviceId::new("acme", "d1").unwrap();
    let down = topics::down_topic(topics::DEFAULT_PREFIX, &device);
    let answer = |msg: DownMsg| {
        let bytes = wire::encode_down(&version, &msg, &WireConfig::default()).unwrap();
        let (publisher, down) = (publisher.clone(), down.clone());
        async move { publisher.publish(down, bytes).await }
    };
    let mut next_up = async || {
        let m = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("a device message in time")
            .expect("the broker runs");
        wire::decode_up(&m.payload, &WireConfig::default())
            .expect("a well-formed message")
            .msg
    };

    // The hand cloud welcomes the device.
    let session = loop {
        if let UpMsg::Hello { session, .. } = next_up().await {
            break session;
        }
    };
    answer(DownMsg::Welcome {
        session,
        now_ms: 1_700_000_000_000,
        max_drift_ms: 60_000,
        answered: Some(0),
        repush: false,
    })
    .await;
    eventually(&agent, "welcomed", |a| a.status().ready).await;

    agent
        .db()
        .create(
            "Fault",
            &item(json!({"deviceId": "d1", "id": "f1", "severity": "info"})),
        )
        .unwrap();
    // The push, then (unanswered past its timeout) its copy under another batch id.
    let mut pushes = Vec::new();
    while pushes.len() < 2 {
        if let UpMsg::Push { batch, changes, .. } = next_up().await {
            pushes.push((batch, changes));
        }
    }
    let (first, changes) = pushes[0].clone();
    assert_ne!(pushes[1].0, first, "the copy goes out as a new batch");
    assert_eq!(pushes[1].1, changes, "with the same change");
    eventually(&agent, "the timeout counted", |a| {
        a.status().push_timeouts >= 1
    })
    .await;
    assert_eq!(
        agent.status().pending,
        1,
        "nothing left the outbox unanswered"
    );

    // The original's answer settles the change, copy included.
    let c = &changes[0];
    answer(DownMsg::PushAck {
        batch: first,
        results: vec![ChangeResult {
            model: c.model.clone(),
            key: c.key.clone(),
            version: c.version,
            kept: None,
            status: ChangeStatus::Applied,
        }],
        answered: Some(1),
        session: Some(session),
    })
    .await;
    eventually(&agent, "the change acknowledged", |a| {
        a.status().pending == 0 && a.status().acked == 1
    })
    .await;
    agent.shutdown().await;
    broker.shutdown().await;
}
