use std::sync::Arc;
use devtables_db::*;
use redb::ReadableTableMetadata;
const SCHEMA: &str = r#"{
    format: 'onetable:1.1.0', version: '1.0.0',
    indexes: { primary: {hash: 'pk', sort: 'sk'}, gs1: {hash: 'gs1pk', sort: 'gs1sk'}, },
    params: {timestamps: true, isoDates: true},
    process: {Reading: {sync: 'up'}},
    models: { Reading: {
            pk: {type: 'string', value: 'dev#${deviceId}'},
            sk: {type: 'string', value: 'reading#${id}'},
            id: {type: 'string', required: true},
            deviceId: {type: 'string', required: true},
            name: {type: 'string', required: true},
            value: {type: 'number', required: true},
            status: {type: 'string', enum: ['ok', 'warn', 'fault'], default: 'ok'},
            gs1pk: {type: 'string', value: 'status#${status}'},
            gs1sk: {type: 'string', value: 'reading#${id}'},
        }, },
}"#;
fn main() {
    let n: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(100000);
    let path = std::path::Path::new("/tmp/zz.redb");
    let _ = std::fs::remove_file(path);
    let schema = Arc::new(devtables_schema::Schema::from_json5(SCHEMA).unwrap());
    let db = Db::open(path, schema, DbOptions { durability: Durability::Periodic { interval: std::time::Duration::from_secs(1) }, ..Default::default() }).unwrap();
    let t = std::time::Instant::now();
    for start in (0..n).step_by(1000) {
        db.write(Origin::Local, |tx| {
            for i in start..start + 1000 {
                let st = if i % 100 == 42 { "fault" } else if i % 10 == 3 { "warn" } else { "ok" };
                let v = serde_json::json!({"id": format!("{i:08}"), "deviceId": format!("d{:04}", i / 1000), "name": format!("sensor-{}", i % 16), "value": 20.0 + (i % 1000) as f64 * 0.125, "status": st});
                tx.create("Reading", v.as_object().unwrap())?;
            }
            Ok(())
        }).unwrap();
    }
    println!("create {:?}", t.elapsed());
    db.close().unwrap();
    println!("file {}", std::fs::metadata(path).unwrap().len() >> 20);
    let db = redb::Database::open(path).unwrap();
    let tx = db.begin_write().unwrap();
    println!("{:?}", tx.stats().unwrap());
    for name in ["items", "types", "idx:gs1"] {
        let t = tx.open_table(redb::TableDefinition::<&[u8], &[u8]>::new(name));
        match t { Ok(t) => println!("{name}: {:?}", t.stats().unwrap()), Err(_) => {
            let t = tx.open_table(redb::TableDefinition::<&[u8], ()>::new(name)).unwrap();
            println!("{name}: {:?}", t.stats().unwrap());
        }}
    }
}
