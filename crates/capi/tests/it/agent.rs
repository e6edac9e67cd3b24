//! The agent functions called as a C program calls them: a bad configuration is a code, not a
//! half-started agent; one agent per database, and no closing under it; waits time out with the
//! status; and, against the real cloud, command handlers whose reply returns to the cloud, with
//! every way a handler can go wrong (a panic, no reply, two replies, a blocking call from its
//! own thread) answered as a failed command or a refused call while the agent carries on.

use std::ffi::{c_char, c_void, CStr};
use std::path::Path;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicI32, Ordering};

use devtables_capi::*;
use serde_json::json;

use super::support::{
    cs, eventually, expect, free_port, last_error, open, take_json, write_agent_config, TestCloud,
};

fn start(db: *mut DtDb, config: &Path) -> (DtCode, *mut DtAgent) {
    let config = cs(config.to_str().unwrap());
    let mut agent = std::ptr::dangling_mut::<DtAgent>();
    // SAFETY: valid pointers.
    let code = unsafe { dt_agent_start(db, config.as_ptr(), &mut agent) };
    (code, agent)
}

fn status(agent: *mut DtAgent) -> serde_json::Value {
    let mut out = null_mut();
    // SAFETY: a live handle.
    expect(unsafe { dt_agent_status(agent, &mut out) }, DtCode::DT_OK);
    take_json(out)
}

fn stop(agent: *mut DtAgent) {
    // SAFETY: a live handle, not used afterwards.
    expect(unsafe { dt_agent_stop(agent) }, DtCode::DT_OK);
}

#[test]
fn a_bad_configuration_is_a_code_and_no_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (code, agent) = start(null_mut(), &dir.path().join("missing.json5"));
    expect(code, DtCode::DT_ERR_CONFIG);
    assert!(agent.is_null());
    assert!(last_error().contains("missing.json5"), "{}", last_error());

    // No secret and no client certificate: the broker would refuse every connection.
    let path = dir.path().join("agent.json5");
    std::fs::write(
        &path,
        json!({"account": "acme", "device": "d1", "schema": "s.json5", "db": "d1.db"}).to_string(),
    )
    .unwrap();
    let (code, agent) = start(null_mut(), &path);
    expect(code, DtCode::DT_ERR_CONFIG);
    assert!(agent.is_null());
    assert!(last_error().contains("no credentials"), "{}", last_error());

    // A schema the agent cannot load.
    std::fs::write(
        &path,
        json!({"account": "acme", "device": "d1", "secret": "s", "schema": "s.json5", "db": "d1.db"})
            .to_string(),
    )
    .unwrap();
    let (code, _) = start(null_mut(), &path);
    expect(code, DtCode::DT_ERR_SCHEMA);
    // SAFETY: NULL is accepted.
    expect(unsafe { dt_agent_stop(null_mut()) }, DtCode::DT_OK);
}

#[test]
fn one_agent_per_database_and_no_close_under_it() {
    let dir = tempfile::tempdir().unwrap();
    // Offline: nothing listens on the broker's port.
    let config = write_agent_config(dir.path(), "d1", "secret", free_port());
    let db = open(Some(&dir.path().join("mine.db")));
    let (code, agent) = start(db, &config);
    expect(code, DtCode::DT_OK);
    // SAFETY: live handles.
    unsafe {
        assert_eq!(
            dt_agent_db(agent),
            db,
            "the agent replicates the database it was given"
        );
        let (code, second) = start(db, &config);
        expect(code, DtCode::DT_ERR_STATE);
        assert!(second.is_null());
        assert!(
            last_error().contains("one agent per database"),
            "{}",
            last_error()
        );
        expect(dt_db_close(db), DtCode::DT_ERR_STATE);
        assert!(last_error().contains("dt_agent_stop"), "{}", last_error());
    }
    // The database still works, and its writes wait in the outbox while offline.
    let (model, item) = (cs("Fault"), cs(r#"{"deviceId": "d1", "severity": "info"}"#));
    // SAFETY: live handle, valid strings.
    expect(
        unsafe { dt_create(db, model.as_ptr(), item.as_ptr(), null_mut()) },
        DtCode::DT_OK,
    );
    let s = status(agent);
    assert_eq!(s["pending"], 1, "{s}");
    assert_eq!(s["ready"], false, "{s}");

    // A wait that cannot end in time says so, with the status.
    // SAFETY: a live handle.
    expect(
        unsafe { dt_agent_wait_ready(agent, 150) },
        DtCode::DT_ERR_TIMEOUT,
    );
    assert!(
        last_error().contains("timed out after 150 ms") && last_error().contains("\"ready\":false"),
        "{}",
        last_error()
    );

    stop(agent);
    // A given database stays open after the agent stops, and may be closed now.
    // SAFETY: a live handle, not used after the close.
    unsafe {
        let mut out = null_mut();
        let key = cs(r#"{"deviceId": "d1"}"#);
        expect(
            dt_find(db, model.as_ptr(), key.as_ptr(), null(), &mut out),
            DtCode::DT_OK,
        );
        assert_eq!(take_json(out)["items"].as_array().unwrap().len(), 1);
        expect(dt_db_close(db), DtCode::DT_OK);
    }
}

#[test]
fn an_agent_opens_and_closes_the_database_its_file_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_agent_config(dir.path(), "d1", "secret", free_port());
    let (code, agent) = start(null_mut(), &config);
    expect(code, DtCode::DT_OK);
    // SAFETY: live handles.
    let db = unsafe { dt_agent_db(agent) };
    assert!(!db.is_null());
    let (model, item) = (
        cs("Fault"),
        cs(r#"{"deviceId": "d1", "id": "f1", "severity": "info"}"#),
    );
    unsafe {
        expect(
            dt_create(db, model.as_ptr(), item.as_ptr(), null_mut()),
            DtCode::DT_OK,
        );
        expect(dt_db_close(db), DtCode::DT_ERR_STATE);
    }
    stop(agent);
    // dt_agent_stop closed the file: it opens again, with the item.
    let db = open(Some(&dir.path().join("d1.db")));
    let key = cs(r#"{"deviceId": "d1", "id": "f1"}"#);
    let mut out = null_mut();
    // SAFETY: live handle, valid pointers; closed once.
    unsafe {
        expect(
            dt_get(db, model.as_ptr(), key.as_ptr(), &mut out),
            DtCode::DT_OK,
        );
        assert_eq!(take_json(out)["severity"], "info");
        expect(dt_db_close(db), DtCode::DT_OK);
    }
}

/// Codes seen inside the `probe` handler: a blocking call on the agent and a second reply.
struct Probe {
    agent: *mut DtAgent,
    stop_code: AtomicI32,
    wait_code: AtomicI32,
    second_reply_code: AtomicI32,
}

unsafe extern "C-unwind" fn probe(user: *mut c_void, command: *const c_char, reply: *mut DtReply) {
    // SAFETY: `user` is the test's Probe, alive until the agent stops; the text is valid now.
    let probe = unsafe { &*(user as *const Probe) };
    let command: serde_json::Value =
        serde_json::from_str(unsafe { CStr::from_ptr(command) }.to_str().unwrap()).unwrap();
    // SAFETY: a live agent handle; these calls must refuse, not block or free it.
    unsafe {
        probe
            .stop_code
            .store(dt_agent_stop(probe.agent) as i32, Ordering::SeqCst);
        probe.wait_code.store(
            dt_agent_wait_ready(probe.agent, 10) as i32,
            Ordering::SeqCst,
        );
        let result = cs(&json!({"echo": command["args"]}).to_string());
        dt_reply_ok(reply, result.as_ptr());
        let again = cs("{}");
        probe
            .second_reply_code
            .store(dt_reply_ok(reply, again.as_ptr()) as i32, Ordering::SeqCst);
    }
}

unsafe extern "C-unwind" fn boom(
    _user: *mut c_void,
    _command: *const c_char,
    _reply: *mut DtReply,
) {
    panic!("the handler broke");
}

unsafe extern "C-unwind" fn silent(
    _user: *mut c_void,
    _command: *const c_char,
    _reply: *mut DtReply,
) {
}

unsafe extern "C-unwind" fn refuse(
    _user: *mut c_void,
    _command: *const c_char,
    reply: *mut DtReply,
) {
    let not_json = cs("{oops");
    let why = cs("the disk is full");
    // SAFETY: the reply of this call.
    unsafe {
        assert_eq!(dt_reply_ok(reply, not_json.as_ptr()), DtCode::DT_ERR_JSON);
        dt_reply_fail(reply, why.as_ptr());
    }
}

#[test]
fn command_handlers_answer_the_cloud_and_their_failures_are_contained() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = TestCloud::start(&dir.path().join("cloud"));
    let secret = cloud.register("d1");
    let config = write_agent_config(dir.path(), "d1", &secret, cloud.mqtt_port());
    let (code, agent) = start(null_mut(), &config);
    expect(code, DtCode::DT_OK);
    let probe_state = Box::new(Probe {
        agent,
        stop_code: AtomicI32::new(-1),
        wait_code: AtomicI32::new(-1),
        second_reply_code: AtomicI32::new(-1),
    });
    let handlers: [(&str, DtCommandFn, *mut c_void); 4] = [
        (
            "probe",
            Some(probe),
            &*probe_state as *const Probe as *mut c_void,
        ),
        ("boom", Some(boom), null_mut()),
        ("silent", Some(silent), null_mut()),
        ("refuse", Some(refuse), null_mut()),
    ];
    for (name, handler, user) in handlers {
        let name = cs(name);
        // SAFETY: a live handle; `user` outlives the agent.
        expect(
            unsafe { dt_on_command(agent, name.as_ptr(), handler, user) },
            DtCode::DT_OK,
        );
    }
    // SAFETY: a live handle.
    expect(unsafe { dt_agent_wait_ready(agent, 30_000) }, DtCode::DT_OK);

    let boom_id = cloud.command("d1", "boom", json!({}));
    let boomed = cloud.answered_command("d1", &boom_id);
    assert_eq!(boomed["status"], "failed", "{boomed}");
    let error = boomed["result"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("panicked") && error.contains("the handler broke"),
        "{boomed}"
    );

    // The agent survived the panic: the next commands run.
    let probe_id = cloud.command("d1", "probe", json!({"n": 7}));
    let probed = cloud.answered_command("d1", &probe_id);
    assert_eq!(probed["status"], "done", "{probed}");
    assert_eq!(probed["result"]["echo"], json!({"n": 7}));
    assert_eq!(
        probe_state.stop_code.load(Ordering::SeqCst),
        DtCode::DT_ERR_STATE as i32
    );
    assert_eq!(
        probe_state.wait_code.load(Ordering::SeqCst),
        DtCode::DT_ERR_STATE as i32
    );
    assert_eq!(
        probe_state.second_reply_code.load(Ordering::SeqCst),
        DtCode::DT_ERR_STATE as i32
    );

    let silent_id = cloud.command("d1", "silent", json!({}));
    let silent_answer = cloud.answered_command("d1", &silent_id);
    assert_eq!(silent_answer["status"], "failed");
    assert!(
        silent_answer["result"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("without dt_reply_ok"),
        "{silent_answer}"
    );

    let refuse_id = cloud.command("d1", "refuse", json!({}));
    let refused = cloud.answered_command("d1", &refuse_id);
    assert_eq!(refused["status"], "failed");
    assert_eq!(refused["result"]["error"], "the disk is full");

    // Everything the device wrote was acknowledged.
    // SAFETY: a live handle.
    expect(
        unsafe { dt_agent_wait_synced(agent, 30_000) },
        DtCode::DT_OK,
    );
    let s = eventually("the status to show acknowledgements", || {
        let s = status(agent);
        if s["acked"].as_u64().unwrap_or(0) >= 4 {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    });
    assert_eq!(s["pending"], 0, "{s}");
    stop(agent);
}
