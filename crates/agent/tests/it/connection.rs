//! An agent that cannot connect says why in its status (`connection`): an unreachable broker
//! (nothing listens), refused credentials (a wrong secret against the cloud's embedded broker,
//! which checks them), and, once connected, nothing.

use devtables_agent::Agent;

use super::support::{agent_config, device, eventually, offline, schema, start_cloud};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_pointed_at_a_closed_port_says_the_broker_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(offline(dir.path()), schema()).unwrap();
    eventually(&agent, "the status to say the broker is unreachable", |a| {
        a.status()
            .connection
            .is_some_and(|c| c.starts_with("cannot connect: the broker is unreachable"))
    })
    .await;
    let status = agent.status();
    assert!(!status.connected, "{status:?}");
    assert!(
        status.last_error.is_some(),
        "last_error keeps the client's message: {status:?}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_said_to_be_refused_and_the_right_ones_clear_it() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = start_cloud(&dir.path().join("cloud"), 0).await;
    let secret = cloud.register_device(&device()).await.unwrap();
    let port = super::support::mqtt_port(&cloud);

    let wrong = format!("{secret}x");
    let agent = Agent::start(agent_config(dir.path(), &wrong, port), schema()).unwrap();
    eventually(
        &agent,
        "the status to say the credentials were refused",
        |a| {
            a.status().connection.is_some_and(|c| {
                c.starts_with("cannot connect: the broker refused the credentials")
                    && c.contains("BadUserNamePassword")
            })
        },
    )
    .await;
    assert!(!agent.status().ready);
    agent.shutdown().await;

    let agent = Agent::start(agent_config(dir.path(), &secret, port), schema()).unwrap();
    eventually(&agent, "ready with the right secret", |a| a.status().ready).await;
    assert_eq!(
        agent.status().connection,
        None,
        "connected: nothing to explain"
    );
    agent.shutdown().await;
    cloud.shutdown().await;
}
