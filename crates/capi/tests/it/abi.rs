//! The database functions called as a C program calls them: every misuse a C caller can make
//! (NULL, bytes that are not UTF-8, text that is not JSON or of the wrong shape) is a code and a
//! message, never a crash; the item operations answer with the codes a caller branches on;
//! `dt_find` pages; a batch commits whole or not at all; change callbacks see every commit, stop
//! at `dt_unsubscribe`, and a panicking one is contained.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::Mutex;

use devtables_capi::*;
use serde_json::{json, Value};

use super::support::{cs, expect, last_error, open, schema_path, take_json};

fn create(db: *mut DtDb, model: &str, item: Value) -> (DtCode, Option<Value>) {
    let (model, item) = (cs(model), cs(&item.to_string()));
    let mut out = null_mut();
    // SAFETY: valid handle, strings and out pointer.
    let code = unsafe { dt_create(db, model.as_ptr(), item.as_ptr(), &mut out) };
    (code, (!out.is_null()).then(|| take_json(out)))
}

fn get(db: *mut DtDb, model: &str, key: Value) -> (DtCode, Option<Value>) {
    let (model, key) = (cs(model), cs(&key.to_string()));
    // A stale pointer the call must clear.
    let mut out = std::ptr::dangling_mut::<c_char>();
    // SAFETY: valid handle, strings and out pointer.
    let code = unsafe { dt_get(db, model.as_ptr(), key.as_ptr(), &mut out) };
    (code, (!out.is_null()).then(|| take_json(out)))
}

fn find(db: *mut DtDb, model: &str, props: Value, options: Value) -> (DtCode, Option<Value>) {
    let (model, props, options) = (cs(model), cs(&props.to_string()), cs(&options.to_string()));
    let mut out = null_mut();
    // SAFETY: valid handle, strings and out pointer.
    let code = unsafe {
        dt_find(
            db,
            model.as_ptr(),
            props.as_ptr(),
            options.as_ptr(),
            &mut out,
        )
    };
    (code, (!out.is_null()).then(|| take_json(out)))
}

fn batch(db: *mut DtDb, ops: Value) -> (DtCode, Option<Value>) {
    let ops = cs(&ops.to_string());
    let mut out = null_mut();
    // SAFETY: valid handle, string and out pointer.
    let code = unsafe { dt_batch(db, ops.as_ptr(), &mut out) };
    (code, (!out.is_null()).then(|| take_json(out)))
}

fn fault(id: &str) -> Value {
    json!({"deviceId": "d1", "id": id, "severity": "warn", "message": format!("fault {id}")})
}

fn close(db: *mut DtDb) {
    // SAFETY: a live handle, not used afterwards.
    expect(unsafe { dt_db_close(db) }, DtCode::DT_OK);
}

#[test]
fn null_pointers_are_refused_with_the_argument_named() {
    let db = open(None);
    let model = cs("Fault");
    let item = cs(&fault("f1").to_string());
    let mut out = null_mut();
    // SAFETY: every pointer is valid or NULL.
    unsafe {
        expect(
            dt_create(null_mut(), model.as_ptr(), item.as_ptr(), &mut out),
            DtCode::DT_ERR_ARGUMENT,
        );
        assert_eq!(last_error(), "argument db is NULL");
        expect(
            dt_create(db, null(), item.as_ptr(), &mut out),
            DtCode::DT_ERR_ARGUMENT,
        );
        assert_eq!(last_error(), "argument model is NULL");
        expect(
            dt_create(db, model.as_ptr(), null(), &mut out),
            DtCode::DT_ERR_ARGUMENT,
        );
        assert_eq!(last_error(), "argument item_json is NULL");
        // dt_get needs somewhere to put its answer.
        expect(
            dt_get(db, model.as_ptr(), item.as_ptr(), null_mut()),
            DtCode::DT_ERR_ARGUMENT,
        );
        assert_eq!(last_error(), "argument out_json is NULL");
        expect(
            dt_db_open(null(), null(), &mut null_mut()),
            DtCode::DT_ERR_ARGUMENT,
        );
        let schema = cs(schema_path().to_str().unwrap());
        expect(
            dt_db_open(schema.as_ptr(), null(), null_mut()),
            DtCode::DT_ERR_ARGUMENT,
        );
        expect(
            dt_subscribe(db, None, null_mut(), null_mut()),
            DtCode::DT_ERR_ARGUMENT,
        );
        // Freeing and closing nothing is allowed, as free(NULL) is.
        dt_free(null_mut());
        expect(dt_db_close(null_mut()), DtCode::DT_OK);
    }
    assert!(out.is_null());
    // The output is optional for writes.
    // SAFETY: as above.
    let code = unsafe { dt_create(db, model.as_ptr(), item.as_ptr(), null_mut()) };
    expect(code, DtCode::DT_OK);
    assert_eq!(last_error(), "", "a success clears the message");
    close(db);
}

#[test]
fn text_that_is_not_utf8_or_not_json_is_a_code_and_a_message() {
    let db = open(None);
    let not_utf8 = [0x46u8, 0xff, 0xfe, 0];
    let item = cs(&fault("f1").to_string());
    let mut out = std::ptr::dangling_mut::<c_char>();
    // SAFETY: NUL-terminated bytes and valid pointers.
    let code = unsafe { dt_create(db, not_utf8.as_ptr().cast(), item.as_ptr(), &mut out) };
    expect(code, DtCode::DT_ERR_ARGUMENT);
    assert!(out.is_null(), "a failed call leaves no stale output");
    assert!(
        last_error().starts_with("argument model is not UTF-8 text"),
        "{}",
        last_error()
    );

    let (code, out) = create(db, "Fault", json!([1, 2]));
    assert_eq!((code, out), (DtCode::DT_ERR_JSON, None));
    assert_eq!(last_error(), "argument item_json must be a JSON object");

    let model = cs("Fault");
    let broken = cs("{\"deviceId\": ");
    // SAFETY: valid pointers.
    let code = unsafe { dt_create(db, model.as_ptr(), broken.as_ptr(), null_mut()) };
    expect(code, DtCode::DT_ERR_JSON);
    assert!(
        last_error().starts_with("argument item_json is not valid JSON"),
        "{}",
        last_error()
    );

    let (code, _) = find(db, "Fault", json!({}), json!({"limit": 1, "pageSize": 2}));
    expect(code, DtCode::DT_ERR_JSON);
    assert!(last_error().contains("pageSize"), "{}", last_error());
    let (code, _) = batch(db, json!({"op": "create"}));
    expect(code, DtCode::DT_ERR_JSON);
    let (code, _) = batch(db, json!([{"op": "replace", "model": "Fault", "item": {}}]));
    expect(code, DtCode::DT_ERR_JSON);
    assert!(last_error().contains("replace"), "{}", last_error());
    close(db);
}

#[test]
fn item_operations_answer_with_the_codes_a_caller_branches_on() {
    let db = open(None);
    let (code, created) = create(db, "Fault", fault("f1"));
    expect(code, DtCode::DT_OK);
    let created = created.unwrap();
    assert_eq!(created["message"], "fault f1");
    assert!(created.get("pk").is_none(), "hidden fields are left out");

    let (code, _) = create(db, "Fault", fault("f1"));
    expect(code, DtCode::DT_ERR_CONFLICT);
    assert!(last_error().contains("already exists"), "{}", last_error());

    let key = json!({"deviceId": "d1", "id": "f1"});
    let (code, got) = get(db, "Fault", key.clone());
    expect(code, DtCode::DT_OK);
    assert_eq!(got.unwrap(), created);

    let model = cs("Fault");
    let patch = cs(&json!({"deviceId": "d1", "id": "f1", "severity": "critical"}).to_string());
    let mut out = null_mut();
    // SAFETY: valid pointers.
    expect(
        unsafe { dt_update(db, model.as_ptr(), patch.as_ptr(), &mut out) },
        DtCode::DT_OK,
    );
    let updated = take_json(out);
    assert_eq!(updated["severity"], "critical");
    assert_eq!(updated["message"], "fault f1", "fields not given stay");

    let missing = cs(&json!({"deviceId": "d1", "id": "nope", "severity": "info"}).to_string());
    // SAFETY: valid pointers.
    expect(
        unsafe { dt_update(db, model.as_ptr(), missing.as_ptr(), null_mut()) },
        DtCode::DT_NOT_FOUND,
    );
    // SAFETY: valid pointers.
    expect(
        unsafe { dt_upsert(db, model.as_ptr(), missing.as_ptr(), null_mut()) },
        DtCode::DT_OK,
    );

    let (code, _) = create(db, "Fault", json!({"deviceId": "d1", "severity": "bogus"}));
    expect(code, DtCode::DT_ERR_INVALID);
    assert!(last_error().contains("severity"), "{}", last_error());
    let (code, _) = create(db, "Nope", json!({}));
    expect(code, DtCode::DT_ERR_INVALID);
    // Status lives only in the cloud; Firmware is written only there.
    let (code, _) = create(db, "Status", json!({"deviceId": "d1"}));
    expect(code, DtCode::DT_ERR_REFUSED);
    let (code, _) = create(db, "Firmware", json!({"version": "1", "url": "u"}));
    expect(code, DtCode::DT_ERR_REFUSED);

    let key_text = cs(&key.to_string());
    let mut removed = null_mut();
    // SAFETY: valid pointers.
    expect(
        unsafe { dt_remove(db, model.as_ptr(), key_text.as_ptr(), &mut removed) },
        DtCode::DT_OK,
    );
    assert_eq!(take_json(removed)["id"], "f1");
    // SAFETY: valid pointers.
    expect(
        unsafe { dt_remove(db, model.as_ptr(), key_text.as_ptr(), null_mut()) },
        DtCode::DT_NOT_FOUND,
    );
    let (code, got) = get(db, "Fault", key);
    assert_eq!((code, got), (DtCode::DT_NOT_FOUND, None));
    assert!(last_error().contains("no Fault item"), "{}", last_error());
    close(db);
}

#[test]
fn find_pages_through_every_item_once() {
    let db = open(None);
    for i in 0..5 {
        expect(
            create(db, "Fault", fault(&format!("f{i}"))).0,
            DtCode::DT_OK,
        );
    }
    let mut seen = Vec::new();
    let mut next = Value::Null;
    let mut pages = 0;
    loop {
        let mut options = json!({"limit": 2});
        if !next.is_null() {
            options["next"] = next.clone();
        }
        let (code, page) = find(db, "Fault", json!({"deviceId": "d1"}), options);
        expect(code, DtCode::DT_OK);
        let page = page.unwrap();
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_string());
        }
        next = page["next"].clone();
        if next.is_null() {
            break;
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(seen, ["f0", "f1", "f2", "f3", "f4"]);
    assert_eq!(pages, 3);

    // NULL props and options: every item of the model, hidden fields on request.
    let model = cs("Fault");
    let mut out = null_mut();
    // SAFETY: valid pointers.
    expect(
        unsafe { dt_find(db, model.as_ptr(), null(), null(), &mut out) },
        DtCode::DT_OK,
    );
    assert_eq!(take_json(out)["items"].as_array().unwrap().len(), 5);
    let (code, page) = find(
        db,
        "Fault",
        json!({"severity": "warn"}),
        json!({"hidden": true, "limit": 1}),
    );
    expect(code, DtCode::DT_OK);
    assert!(page.unwrap()["items"][0]["pk"].is_string());

    let (code, _) = find(db, "Fault", json!({}), json!({"next": "garbage"}));
    expect(code, DtCode::DT_ERR_INVALID);
    close(db);
}

#[test]
fn a_batch_commits_whole_or_not_at_all() {
    let db = open(None);
    expect(create(db, "Fault", fault("old")).0, DtCode::DT_OK);
    let op = |op: &str, item: Value| json!({"op": op, "model": "Fault", "item": item});
    // The third operation fails: nothing of the batch is written.
    let (code, out) = batch(
        db,
        json!([
            op("create", fault("a")),
            op("remove", json!({"deviceId": "d1", "id": "old"})),
            op("create", fault("a")),
        ]),
    );
    assert_eq!((code, out), (DtCode::DT_ERR_CONFLICT, None));
    assert_eq!(
        get(db, "Fault", json!({"deviceId": "d1", "id": "a"})).0,
        DtCode::DT_NOT_FOUND
    );
    assert_eq!(
        get(db, "Fault", json!({"deviceId": "d1", "id": "old"})).0,
        DtCode::DT_OK
    );

    let (code, out) = batch(
        db,
        json!([
            op("create", fault("a")),
            op(
                "upsert",
                json!({"deviceId": "d1", "id": "b", "severity": "info"})
            ),
            op(
                "update",
                json!({"deviceId": "d1", "id": "a", "severity": "critical"})
            ),
            op("remove", json!({"deviceId": "d1", "id": "old"})),
            op("remove", json!({"deviceId": "d1", "id": "never"})),
        ]),
    );
    expect(code, DtCode::DT_OK);
    let results = out.unwrap();
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 5);
    assert_eq!(results[2]["severity"], "critical");
    assert_eq!(results[3]["id"], "old");
    assert!(results[4].is_null(), "a remove of nothing answers null");
    let (_, page) = find(db, "Fault", json!({"deviceId": "d1"}), json!({}));
    let ids: Vec<Value> = page.unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].clone())
        .collect();
    assert_eq!(ids, [json!("a"), json!("b")]);
    close(db);
}

/// What a recording change callback saw.
#[derive(Default)]
struct Seen(Mutex<Vec<Value>>);

unsafe extern "C-unwind" fn record(user: *mut c_void, change: *const c_char) {
    // SAFETY: `user` is the `Seen` the test passed; the text is valid during the call.
    let seen = unsafe { &*(user as *const Seen) };
    let text = unsafe { CStr::from_ptr(change) }.to_str().unwrap();
    seen.0
        .lock()
        .unwrap()
        .push(serde_json::from_str(text).unwrap());
}

unsafe extern "C-unwind" fn explode(_user: *mut c_void, _change: *const c_char) {
    panic!("a change callback that panics");
}

#[test]
fn change_callbacks_see_each_commit_until_unsubscribed() {
    let db = open(None);
    let seen = Seen::default();
    let mut id = 0u64;
    // SAFETY: `seen` outlives the subscription (unsubscribed below).
    expect(
        unsafe {
            dt_subscribe(
                db,
                Some(record),
                &seen as *const Seen as *mut c_void,
                &mut id,
            )
        },
        DtCode::DT_OK,
    );
    expect(create(db, "Fault", fault("f1")).0, DtCode::DT_OK);
    let (code, _) = batch(
        db,
        json!([
            {"op": "update", "model": "Fault", "item": {"deviceId": "d1", "id": "f1", "severity": "info"}},
            {"op": "create", "model": "Setting", "item": {"deviceId": "d1", "name": "mode", "value": "eco"}},
        ]),
    );
    expect(code, DtCode::DT_OK);
    {
        let changes = seen.0.lock().unwrap();
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert_eq!(changes[0]["op"], "create");
        assert_eq!(changes[0]["origin"], "local");
        assert_eq!(changes[0]["model"], "Fault");
        assert!(changes[0]["old"].is_null());
        assert_eq!(changes[0]["new"]["id"], "f1");
        assert!(changes[0]["key"]["pk"].is_string());
        assert_eq!(changes[1]["op"], "update");
        assert_eq!(changes[1]["old"]["severity"], "warn");
        assert_eq!(changes[1]["new"]["severity"], "info");
        assert_eq!(changes[2]["model"], "Setting");
    }
    // SAFETY: a live handle.
    expect(unsafe { dt_unsubscribe(db, id) }, DtCode::DT_OK);
    expect(create(db, "Fault", fault("f2")).0, DtCode::DT_OK);
    assert_eq!(
        seen.0.lock().unwrap().len(),
        3,
        "no call after dt_unsubscribe"
    );
    // SAFETY: as above.
    expect(unsafe { dt_unsubscribe(db, id) }, DtCode::DT_NOT_FOUND);
    close(db);
}

#[test]
fn a_panicking_change_callback_is_contained_and_others_still_run() {
    let db = open(None);
    let seen = Seen::default();
    // SAFETY: `seen` outlives the database (closed below, which unsubscribes).
    unsafe {
        expect(
            dt_subscribe(db, Some(explode), null_mut(), null_mut()),
            DtCode::DT_OK,
        );
        expect(
            dt_subscribe(
                db,
                Some(record),
                &seen as *const Seen as *mut c_void,
                null_mut(),
            ),
            DtCode::DT_OK,
        );
    }
    // The write succeeds: it was committed before the callbacks ran.
    expect(create(db, "Fault", fault("f1")).0, DtCode::DT_OK);
    expect(create(db, "Fault", fault("f2")).0, DtCode::DT_OK);
    assert_eq!(
        seen.0.lock().unwrap().len(),
        2,
        "later changes are still delivered"
    );
    close(db);
}

#[test]
fn a_file_database_keeps_its_items_across_close_and_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("device.db");
    let db = open(Some(&path));
    expect(create(db, "Fault", fault("f1")).0, DtCode::DT_OK);
    close(db);
    let db = open(Some(&path));
    assert_eq!(
        get(db, "Fault", json!({"deviceId": "d1", "id": "f1"})).0,
        DtCode::DT_OK
    );
    close(db);

    // Opening fails with the code of its cause.
    let mut out = null_mut();
    let missing_schema = cs(dir.path().join("none.json5").to_str().unwrap());
    // SAFETY: valid pointers.
    expect(
        unsafe { dt_db_open(missing_schema.as_ptr(), null(), &mut out) },
        DtCode::DT_ERR_SCHEMA,
    );
    assert!(out.is_null());
    let schema = cs(schema_path().to_str().unwrap());
    let no_folder = cs(dir.path().join("no/such/folder.db").to_str().unwrap());
    // SAFETY: valid pointers.
    expect(
        unsafe { dt_db_open(schema.as_ptr(), no_folder.as_ptr(), &mut out) },
        DtCode::DT_ERR_STORAGE,
    );
    assert!(last_error().contains("folder.db"), "{}", last_error());
}

#[test]
fn every_code_has_its_header_name_and_the_version_is_the_crate_version() {
    for code in DtCode::all() {
        // SAFETY: static strings.
        let name = unsafe { CStr::from_ptr(dt_code_name(code as c_int)) };
        assert_eq!(name, code.name());
        assert!(name.to_str().unwrap().starts_with("DT_"));
    }
    // SAFETY: as above.
    assert_eq!(unsafe { CStr::from_ptr(dt_code_name(99)) }, c"DT_UNKNOWN");
    assert_eq!(unsafe { CStr::from_ptr(dt_code_name(-1)) }, c"DT_UNKNOWN");
    let version = unsafe { CStr::from_ptr(dt_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}
