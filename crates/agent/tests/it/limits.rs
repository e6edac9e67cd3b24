//! A change no sync message can carry is refused by the local write itself, with a typed error
//! the application can act on, instead of being accepted and then dropped from the outbox.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

use devtables_agent::{Agent, AgentConfig, ChangeTooLarge};
use devtables_db::DbError;
use devtables_schema::{Item, Schema};
use serde_json::json;

fn schema() -> Arc<Schema> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/schema.json5");
    Arc::new(Schema::load(Path::new(path)).unwrap())
}

fn item(v: serde_json::Value) -> Item {
    v.as_object().cloned().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_too_large_for_any_message_is_refused_by_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = AgentConfig::new("acme", "d1", "secret", dir.path().join("d1.db"));
    config.broker_port = port;
    let agent = Agent::start(config, schema()).unwrap();
    let db = agent.db().clone();

    // 200 KB of arguments: more than one 64 KiB push (and the 128 KiB wire limit) can carry.
    let args = json!({"blob": "x".repeat(200_000)});
    let err = db
        .create(
            "Command",
            &item(json!({"deviceId": "d1", "command": "ship", "args": args, "status": "done"})),
        )
        .unwrap_err();
    let DbError::Refused(inner) = &err else {
        panic!("expected a refusal, got {err}")
    };
    let too_large = inner
        .downcast_ref::<ChangeTooLarge>()
        .unwrap_or_else(|| panic!("expected ChangeTooLarge, got {inner}"));
    assert_eq!(too_large.model, "Command");
    assert!(too_large.size > too_large.max, "{too_large}");
    assert!(
        err.to_string().contains("could never reach the cloud"),
        "{err}"
    );

    // Nothing was written half-way: no item, no outbox entry.
    let found = db
        .find(
            "Command",
            &item(json!({"deviceId": "d1"})),
            &Default::default(),
        )
        .unwrap();
    assert!(found.items.is_empty(), "{:?}", found.items);
    assert_eq!(agent.status().pending, 0);

    // A change that fits still goes through.
    db.create(
        "Command",
        &item(json!({"deviceId": "d1", "command": "ship", "args": {"n": 1}, "status": "done"})),
    )
    .unwrap();
    agent.shutdown().await;
}
