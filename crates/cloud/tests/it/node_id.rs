//! Each cloud process mints versions with its own node id: the versions of its API writes carry
//! `node_id_for(cloud_node_name(node_name))`, so two cloud nodes never mint equal versions.

use devtables_sync::hlc::{cloud_node_name, node_id_for};
use serde_json::json;

use super::harness::{admin_key, config, request, started, RawDevice, ACCOUNT};

/// The node of a version in its text form (`wall-counter-node`, hex).
fn node_of(version: &serde_json::Value) -> u64 {
    let text = version
        .as_str()
        .unwrap_or_else(|| panic!("a version, got {version}"));
    let node = text.rsplit('-').next().unwrap();
    u64::from_str_radix(node, 16).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// Writes one `Setting` for a fresh device through the API and returns its stored version.
async fn one_write(node_name: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.node_name = node_name.into();
    let cloud = started(c).await;
    let api = cloud.api_addr;
    let key = admin_key(&cloud).await;
    RawDevice::register_over_api(api, &key, "d1").await;
    let key = Some(key.as_str());
    let items = format!("/v1/accounts/{ACCOUNT}/devices/d1/items/Setting");
    let (code, body) = request(
        api,
        "POST",
        &items,
        key,
        Some(&json!({"name": "mode", "value": "eco"})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, page) = request(api, "GET", &items, key, None).await;
    assert_eq!(code, 200, "{page}");
    cloud.shutdown().await;
    page["items"][0]["version"].clone()
}

#[tokio::test]
async fn each_cloud_node_stamps_its_writes_with_its_own_node_id() {
    let a = one_write("eu-1").await;
    let b = one_write("eu-2").await;
    assert_eq!(node_of(&a), node_id_for(&cloud_node_name("eu-1")), "{a}");
    assert_eq!(node_of(&b), node_id_for(&cloud_node_name("eu-2")), "{b}");
    assert_ne!(node_of(&a), node_of(&b));
}
