//! One items table per model (format 3): a key still holds one item across every model. Two
//! models here produce the same keys, so every write and every lookup by key alone must look in
//! the other model's table.

use std::sync::Arc;

use devtables_db::{Db, DbError, DbOptions, FindOptions, Origin};
use devtables_schema::{ItemKey, Schema};
use serde_json::json;

use super::item;

const SHARED_KEYS: &str = r#"{
    format: 'onetable:1.1.0',
    version: '1.0.0',
    indexes: {primary: {hash: 'pk', sort: 'sk'}},
    params: {timestamps: false},
    models: {
        Alarm: {
            pk: {type: 'string', value: 'k#${id}'},
            sk: {type: 'string', value: 'k#'},
            id: {type: 'string', required: true},
            level: {type: 'number'},
        },
        Note: {
            pk: {type: 'string', value: 'k#${id}'},
            sk: {type: 'string', value: 'k#'},
            id: {type: 'string', required: true},
            text: {type: 'string'},
        },
    },
}"#;

fn open(path: &std::path::Path) -> Db {
    let schema = Arc::new(Schema::from_json5(SHARED_KEYS).unwrap());
    Db::open(path, schema, DbOptions::default()).unwrap()
}

fn all_of(db: &Db, model: &str) -> usize {
    db.find(model, &item(json!({})), &FindOptions::default())
        .unwrap()
        .items
        .len()
}

#[test]
fn a_key_holds_one_item_across_models() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("shared.db"));
    let id = item(json!({"id": "1"}));
    db.create("Alarm", &item(json!({"id": "1", "level": 3})))
        .unwrap();
    let key = ItemKey {
        pk: "k#1".into(),
        sk: "k#".into(),
    };

    let err = db
        .create("Note", &item(json!({"id": "1", "text": "x"})))
        .unwrap_err();
    assert!(matches!(err, DbError::Exists { .. }), "{err}");
    let err = db
        .update("Note", &item(json!({"id": "1", "text": "x"})))
        .unwrap_err();
    assert!(matches!(err, DbError::Exists { .. }), "{err}");
    assert_eq!(
        db.remove("Note", &id).unwrap(),
        None,
        "not Note's to remove"
    );
    assert_eq!(db.get("Note", &id).unwrap(), None);
    let (model, _) = db.read().unwrap().get_stored(&key).unwrap().unwrap();
    assert_eq!(
        model, "Alarm",
        "a lookup by key alone finds the other model's item"
    );

    // Replication may move a key to another model: the item leaves the first model's table.
    db.write(Origin::Remote, |t| {
        t.put_stored(
            "Note",
            item(json!({"_type": "Note", "id": "1", "text": "moved", "pk": "k#1", "sk": "k#"})),
        )
    })
    .unwrap();
    assert_eq!(db.get("Alarm", &id).unwrap(), None);
    assert_eq!(
        db.get("Note", &id).unwrap().unwrap()["text"],
        json!("moved")
    );
    assert_eq!((all_of(&db, "Alarm"), all_of(&db, "Note")), (0, 1));
    let keys = db
        .write(Origin::Remote, |t| {
            Ok((t.model_keys("Alarm")?, t.model_keys("Note")?))
        })
        .unwrap();
    assert_eq!(keys, (vec![], vec![key.clone()]));

    // Removed by key alone, whatever its model.
    let removed = db.write(Origin::Remote, |t| t.remove_stored(&key)).unwrap();
    assert_eq!(removed.unwrap()["_type"], json!("Note"));
    assert_eq!(db.read().unwrap().get_stored(&key).unwrap(), None);
    db.create("Note", &item(json!({"id": "1", "text": "new"})))
        .unwrap();
}
