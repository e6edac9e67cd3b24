//! Row identity over HTTP: a row is (owner, pk, sk) with its model as an attribute, so two models
//! whose key templates can produce the same key meet at one row. An API write under model M may
//! only touch a row of model M (a create over another model's row: 409 `wrong_model`; an update
//! or delete finds no item of M there, even at a key M's templates cannot produce: 404); none
//! of them writes anything.

use std::sync::Arc;

use devtables_schema::Schema;
use serde_json::json;

use super::harness::{admin_key, config, request, RawDevice, ACCOUNT};

/// `Note` and `Memo` produce the same keys; `Tag`'s keys (`t#...`) only `Tag` produces.
const SCHEMA: &str = r#"{
    format: 'onetable:1.1.0',
    version: '1',
    indexes: {primary: {hash: 'pk', sort: 'sk'}},
    process: {Note: {sync: 'down'}, Memo: {sync: 'down'}, Tag: {sync: 'down'}},
    models: {
        Note: {
            pk: {type: 'string', value: 'd#${deviceId}'},
            sk: {type: 'string', value: 'x#${name}'},
            deviceId: {type: 'string', required: true},
            name: {type: 'string', required: true},
            text: {type: 'string'},
        },
        Memo: {
            pk: {type: 'string', value: 'd#${deviceId}'},
            sk: {type: 'string', value: 'x#${name}'},
            deviceId: {type: 'string', required: true},
            name: {type: 'string', required: true},
            text: {type: 'string'},
        },
        Tag: {
            pk: {type: 'string', value: 'd#${deviceId}'},
            sk: {type: 'string', value: 't#${name}'},
            deviceId: {type: 'string', required: true},
            name: {type: 'string', required: true},
        },
    },
}"#;

#[tokio::test]
async fn api_writes_cannot_touch_a_row_of_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let schema = Arc::new(Schema::from_json5(SCHEMA).unwrap());
    let cloud = devtables_cloud::Cloud::start(config(dir.path()), schema)
        .await
        .expect("the cloud starts");
    let api = cloud.api_addr;
    let key = admin_key(&cloud).await;
    RawDevice::register_over_api(api, &key, "d1").await;
    let key = Some(key.as_str());
    let items = |model: &str| format!("/v1/accounts/{ACCOUNT}/devices/d1/items/{model}");

    let (code, body) = request(
        api,
        "POST",
        &items("Note"),
        key,
        Some(&json!({"name": "a", "text": "the note"})),
    )
    .await;
    assert_eq!(code, 201, "{body}");

    // Memo's template produces the Note's key: a create is refused as another model's row; an
    // update or a delete finds no Memo there (the row is a Note's).
    for (method, body, code, kind) in [
        (
            "POST",
            json!({"name": "a", "text": "a memo"}),
            409,
            "wrong_model",
        ),
        (
            "PATCH",
            json!({"name": "a", "text": "a memo"}),
            404,
            "not_found",
        ),
        ("DELETE", json!({"name": "a"}), 404, "not_found"),
    ] {
        let (got, answer) = request(api, method, &items("Memo"), key, Some(&body)).await;
        assert_eq!(got, code, "{method} Memo over a Note: {answer}");
        assert_eq!(answer["kind"], kind, "{method}: {answer}");
    }
    // A delete under Tag of a key only Note and Memo produce: Tag's template makes `t#...`.
    let (code, answer) = request(
        api,
        "DELETE",
        &items("Tag"),
        key,
        Some(&json!({"pk": "d#d1", "sk": "x#a"})),
    )
    .await;
    assert_eq!(code, 404, "a Tag delete of a Note key: {answer}");
    assert_eq!(answer["kind"], "not_found", "{answer}");

    // Nothing was written: the Note is whole, and no Memo or Tag exists.
    let (code, page) = request(api, "GET", &items("Note"), key, None).await;
    assert_eq!(code, 200, "{page}");
    let notes = page["items"].as_array().expect("items").clone();
    assert_eq!(notes.len(), 1, "{page}");
    assert_eq!(notes[0]["model"], "Note", "{page}");
    assert_eq!(notes[0]["item"]["text"], "the note", "{page}");
    for model in ["Memo", "Tag"] {
        let (code, page) = request(api, "GET", &items(model), key, None).await;
        assert_eq!(code, 200, "{page}");
        assert_eq!(
            page["items"].as_array().map(Vec::len),
            Some(0),
            "{model}: {page}"
        );
    }
    cloud.shutdown().await;
}
