//! `devtables db` on the example schema.

use std::io::Write;
use std::process::Stdio;

use super::{bin, example_schema, stdout_json};

fn db(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    bin()
        .arg("db")
        .arg("--schema")
        .arg(example_schema())
        .arg("--db")
        .arg(dir.join("dev.db"))
        .args(args)
        .output()
        .expect("devtables runs")
}

#[test]
fn create_get_find_update_remove() {
    let dir = tempfile::tempdir().unwrap();
    let fault = stdout_json(&db(
        dir.path(),
        &[
            "create",
            "Fault",
            r#"{"deviceId":"d1","severity":"warn","message":"fan"}"#,
        ],
    ));
    let id = fault["id"].as_str().expect("generated id").to_string();
    assert_eq!(id.len(), 26, "a ulid");
    assert!(
        fault.get("pk").is_none(),
        "hidden key fields are not printed"
    );

    let key = format!(r#"{{"deviceId":"d1","id":"{id}"}}"#);
    let got = stdout_json(&db(dir.path(), &["get", "Fault", &key, "--hidden"]));
    assert_eq!(got["sk"], format!("fault#{id}"));

    let page = stdout_json(&db(dir.path(), &["find", "Fault", r#"{"deviceId":"d1"}"#]));
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let by_index = stdout_json(&db(
        dir.path(),
        &[
            "find",
            "Fault",
            r#"{"gs1pk":"fault#warn"}"#,
            "--index",
            "gs1",
        ],
    ));
    assert_eq!(by_index["items"][0]["id"], id.as_str());

    let patch = format!(r#"{{"deviceId":"d1","id":"{id}","severity":"critical"}}"#);
    let updated = stdout_json(&db(dir.path(), &["update", "Fault", &patch]));
    assert_eq!(updated["severity"], "critical");
    assert_eq!(updated["message"], "fan");

    stdout_json(&db(dir.path(), &["remove", "Fault", &key]));
    let missing = db(dir.path(), &["get", "Fault", &key]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}

#[test]
fn bad_input_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = db(
        dir.path(),
        &["create", "Fault", r#"{"deviceId":"d1","severity":"boom"}"#],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Fault.severity"),
        "error names model and field: {err}"
    );

    let out = db(dir.path(), &["create", "Status", r#"{"deviceId":"d1"}"#]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only in the cloud"));

    let out = db(dir.path(), &["create", "Fault", "not json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));

    let out = bin()
        .args(["db", "--schema", "/nonexistent.json5", "--db"])
        .arg(dir.path().join("x.db"))
        .args(["get", "Fault", "{}"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot load schema"));

    // Reads never create the file they are asked to read.
    let missing = dir.path().join("typo.db");
    for read in [
        &["get", "Fault", "{}"][..],
        &["find", "Fault", "{}"],
        &["export"],
    ] {
        let out = bin()
            .arg("db")
            .arg("--schema")
            .arg(super::example_schema())
            .arg("--db")
            .arg(&missing)
            .args(read)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{read:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("typo.db"), "{read:?} names the file: {err}");
        assert!(!missing.exists(), "{read:?} created {}", missing.display());
    }

    // --limit 0 is refused, as the HTTP API's limit=0 is.
    let out = db(dir.path(), &["find", "Fault", "{}", "--limit", "0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--limit"), "{err}");
}

#[test]
fn export_then_import_into_another_file() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let setting = format!(r#"{{"deviceId":"d1","name":"s{i}","value":"v{i}"}}"#);
        stdout_json(&db(dir.path(), &["create", "Setting", &setting]));
    }
    let export = db(dir.path(), &["export"]);
    assert!(export.status.success());
    assert_eq!(String::from_utf8_lossy(&export.stdout).lines().count(), 5);

    let mut child = bin()
        .arg("db")
        .arg("--schema")
        .arg(example_schema())
        .arg("--db")
        .arg(dir.path().join("copy.db"))
        .args(["import", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&export.stdout)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("imported 5 items"));
}

#[test]
fn example_configs_load() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let (schema, cloud) =
        devtables_cloud::CloudFile::load(&dir.join("cloud.json5")).expect("cloud.json5 loads");
    assert!(schema.ends_with("schema.json5"));
    assert!(matches!(
        cloud.broker,
        devtables_cloud::BrokerMode::Embedded { .. }
    ));
    let (file, agent) = devtables_agent::config::AgentFile::load(&dir.join("agent.json5"))
        .expect("agent.json5 loads");
    assert_eq!(
        (agent.account.as_str(), agent.device.as_str()),
        ("acme", "gw-1")
    );
    assert!(devtables_schema::Schema::load(&file.schema).is_ok());
}

/// `devtables db` on `dir/dev.db` with `stdin` as standard input.
fn db_stdin(dir: &std::path::Path, args: &[&str], stdin: &str) -> std::process::Output {
    db_with_schema_stdin(dir, &example_schema().to_string_lossy(), args, stdin)
}

/// The same with `--schema schema` (`-` reads it from `stdin` too).
fn db_with_schema_stdin(
    dir: &std::path::Path,
    schema: &str,
    args: &[&str],
    stdin: &str,
) -> std::process::Output {
    let mut child = bin()
        .args(["db", "--schema", schema, "--db"])
        .arg(dir.join("dev.db"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("devtables runs");
    // The command may fail before it reads its input: a closed pipe is its answer, not ours.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "command failed: {}", stderr(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_error_is_printed_once_with_the_hint_only_where_it_applies() {
    let dir = tempfile::tempdir().unwrap();
    // A validation error: its text once (it used to be repeated as its own cause).
    let out = db(dir.path(), &["create", "Fault", r#"{"bogus":1}"#]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.matches("Fault.bogus").count(), 1, "{err}");
    assert_eq!(err.matches("unknown field").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("another process"), "{err}");

    // A file another handle holds: the lock hint, once.
    let schema = std::sync::Arc::new(devtables_schema::Schema::load(&example_schema()).unwrap());
    let path = dir.path().join("dev.db");
    let held = devtables_db::Db::open(&path, schema, devtables_db::DbOptions::default()).unwrap();
    let out = db(
        dir.path(),
        &["create", "Fault", r#"{"deviceId":"d1","severity":"warn"}"#],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(
        err.matches("is another process using it?").count(),
        1,
        "{err}"
    );
    assert_eq!(err.matches("dev.db").count(), 1, "{err}");
    held.close().unwrap();

    // A path that cannot be a database is no lock: no hint.
    let out = bin()
        .arg("db")
        .arg("--schema")
        .arg(example_schema())
        .arg("--db")
        .arg(dir.path())
        .args(["create", "Fault", r#"{"deviceId":"d1","severity":"warn"}"#])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot open database file"), "{err}");
    assert!(!err.contains("another process"), "{err}");
}

#[test]
fn find_help_documents_the_filter_syntax_and_every_option() {
    let out = bin()
        .args(["db", "--schema", "s", "--db", "d", "find", "--help"])
        .output()
        .unwrap();
    let help = stdout(&out);
    for needle in [
        "between",
        "begins",
        "\"in\"",
        "<=",
        "!=",
        "--index",
        "--limit",
        "--next",
        "--reverse",
        "--hidden",
        "--output",
    ] {
        assert!(help.contains(needle), "find --help lacks {needle}: {help}");
    }
    // Every argument of every db subcommand says what it is (the short help: one line each).
    for sub in [
        "get", "find", "create", "update", "upsert", "remove", "export", "import",
    ] {
        let out = bin()
            .args(["db", "--schema", "s", "--db", "d", sub, "-h"])
            .output()
            .unwrap();
        let help = stdout(&out);
        let mut section = "";
        for line in help.lines() {
            if line.ends_with(':') && !line.starts_with(' ') {
                section = line;
                continue;
            }
            let entry = line.trim_start();
            if (section == "Arguments:" || section == "Options:")
                && (entry.starts_with('<') || entry.starts_with('-'))
            {
                // `<NAME>  text` or `--flag <V>  text`: a description after the name.
                let described = entry.split("  ").filter(|s| !s.trim().is_empty()).count() > 1;
                assert!(
                    described,
                    "{sub}: an argument without a description: {line:?}"
                );
            }
        }
    }
}

#[test]
fn a_dash_reads_standard_input_once_per_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let created: serde_json::Value = serde_json::from_str(&stdout(&db_stdin(
        d,
        &["create", "Setting", "-"],
        r#"{"deviceId":"d1","name":"mode","value":"eco"}"#,
    )))
    .unwrap();
    assert_eq!(created["value"], "eco");
    let key = r#"{"deviceId":"d1","name":"mode"}"#;
    let got: serde_json::Value =
        serde_json::from_str(&stdout(&db_stdin(d, &["get", "Setting", "-"], key))).unwrap();
    assert_eq!(got["value"], "eco");
    let updated = stdout(&db_stdin(
        d,
        &["update", "Setting", "-", "--field", "value"],
        r#"{"deviceId":"d1","name":"mode","value":"boost"}"#,
    ));
    assert_eq!(updated, "boost\n");
    let upserted = stdout(&db_stdin(
        d,
        &["upsert", "Setting", "-", "--field", "value"],
        r#"{"deviceId":"d1","name":"fan","value":"on"}"#,
    ));
    assert_eq!(upserted, "on\n");
    let page: serde_json::Value = serde_json::from_str(&stdout(&db_stdin(
        d,
        &["find", "Setting", "-"],
        r#"{"deviceId":"d1","name":{"begins":"f"}}"#,
    )))
    .unwrap();
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(page["items"][0]["name"], "fan");

    // The schema from standard input, the item inline.
    let schema = std::fs::read_to_string(example_schema()).unwrap();
    let value = stdout(&db_with_schema_stdin(
        d,
        "-",
        &["get", "Setting", key, "--field", "value"],
        &schema,
    ));
    assert_eq!(value, "boost\n");
    // Two arguments cannot both be standard input.
    let out = db_with_schema_stdin(d, "-", &["get", "Setting", "-"], &schema);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("only one argument may be `-`") && err.contains("--schema"),
        "{err}"
    );

    // Export to `-` is standard output; import from `-` reads it back.
    let export = stdout(&db_stdin(d, &["export", "--out", "-"], ""));
    assert_eq!(export.lines().count(), 2, "{export}");
    let copy = tempfile::tempdir().unwrap();
    let out = db_stdin(copy.path(), &["import", "-"], &export);
    assert!(
        stderr(&out).contains("imported 2 items"),
        "{}",
        stderr(&out)
    );
    let removed = stdout(&db_stdin(copy.path(), &["remove", "Setting", "-"], key));
    assert!(removed.contains("boost"), "{removed}");

    // `schema check -` too.
    let out = bin()
        .args(["schema", "check", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(schema.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(stdout(&out).contains("7 models"), "{}", stdout(&out));
}

#[test]
fn get_find_and_export_print_json_json_lines_or_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, value) in [("alpha", "1"), ("beta", "2"), ("gamma", "3")] {
        let setting = format!(r#"{{"deviceId":"d1","name":"{name}","value":"{value}"}}"#);
        stdout_json(&db(d, &["create", "Setting", &setting]));
    }
    let all = r#"{"deviceId":"d1"}"#;

    // json: today's page object.
    let page = stdout_json(&db(d, &["find", "Setting", all]));
    assert_eq!(page["items"].as_array().map(Vec::len), Some(3));
    assert!(page["next"].is_null());

    // jsonl: one compact item per line; the next token on stderr, not in the pipe.
    let out = db(
        d,
        &["find", "Setting", all, "--limit", "2", "--output", "jsonl"],
    );
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON item"))
        .collect();
    assert_eq!(
        lines.iter().map(|i| i["name"].clone()).collect::<Vec<_>>(),
        ["alpha", "beta"]
    );
    let err = stderr(&out);
    let token = err
        .split("--next ")
        .nth(1)
        .map(str::trim)
        .unwrap_or_else(|| panic!("no next token on stderr: {err}"));
    let rest = stdout(&db(
        d,
        &["find", "Setting", all, "--next", token, "--output", "jsonl"],
    ));
    assert_eq!(rest.lines().count(), 1, "{rest}");
    assert!(rest.contains("gamma"), "{rest}");

    // table: a header of the model's fields, one aligned row per item.
    let table = stdout(&db(
        d,
        &["find", "Setting", all, "--reverse", "--output", "table"],
    ));
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(rows[0].starts_with("deviceId  name   value"), "{table}");
    assert!(rows[1].starts_with("d1        gamma  3"), "{table}");
    assert!(rows[3].starts_with("d1        alpha  1"), "{table}");
    let key = r#"{"deviceId":"d1","name":"beta"}"#;
    let one = stdout(&db(d, &["get", "Setting", key, "--output", "table"]));
    assert_eq!(one.lines().count(), 2, "{one}");
    let line = stdout(&db(d, &["get", "Setting", key, "--output", "jsonl"]));
    assert_eq!(line.lines().count(), 1, "{line}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&line).unwrap()["value"],
        "2"
    );

    // export: JSON lines by default, or one array.
    let array: serde_json::Value =
        serde_json::from_str(&stdout(&db(d, &["export", "--output", "json"]))).unwrap();
    assert_eq!(array.as_array().map(Vec::len), Some(3), "{array}");
    assert_eq!(array[0]["pk"], "device#d1", "export keeps hidden fields");
}

#[test]
fn integers_past_64_bits_are_refused_and_the_extremes_kept_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The extremes go in and come out with the same digits.
    for extreme in ["18446744073709551615", "-9223372036854775808"] {
        let reading = format!(r#"{{"deviceId":"d1","name":"n","value":{extreme}}}"#);
        let id = stdout(&db(d, &["create", "Reading", &reading, "--field", "id"]));
        let key = format!(r#"{{"deviceId":"d1","id":"{}"}}"#, id.trim());
        let value = stdout(&db(d, &["get", "Reading", &key, "--field", "value"]));
        assert_eq!(value.trim(), extreme);
        let line = stdout(&db(d, &["get", "Reading", &key, "--output", "jsonl"]));
        assert!(line.contains(&format!("\"value\":{extreme}")), "{line}");
    }
    // One past either is refused, naming the number; nothing is written.
    for past in ["18446744073709551616", "-9223372036854775809"] {
        let reading = format!(r#"{{"deviceId":"d1","name":"n","value":{past}}}"#);
        let out = db(d, &["create", "Reading", &reading]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(past) && err.contains("64-bit") && err.contains("string"),
            "{err}"
        );
    }
    let page = stdout_json(&db(d, &["find", "Reading", r#"{"deviceId":"d1"}"#]));
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));

    // Import names the line.
    let lines = "{\"_type\":\"Setting\",\"pk\":\"device#d1\",\"sk\":\"setting#a\",\"deviceId\":\"d1\",\"name\":\"a\"}\n\
                 {\"_type\":\"Reading\",\"pk\":\"device#d1\",\"sk\":\"reading#x\",\"id\":\"x\",\"deviceId\":\"d1\",\"name\":\"n\",\"value\":99999999999999999999}\n";
    let copy = tempfile::tempdir().unwrap();
    let out = db_stdin(copy.path(), &["import", "-"], lines);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("import line 2") && err.contains("99999999999999999999"),
        "{err}"
    );
}

/// A file written under one schema and opened under an incompatible one is refused with the
/// difference named; `--schema-change` opens it and records the new schema.
#[test]
fn an_incompatible_schema_is_refused_until_schema_change_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = db(
        dir.path(),
        &[
            "create",
            "Setting",
            r#"{"deviceId":"d1","name":"speed","value":"3"}"#,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(example_schema()).unwrap();
    let changed = text.replace(
        "            value: {type: 'string'},\n        },",
        "            value: {type: 'number'},\n        },",
    );
    assert_ne!(
        changed, text,
        "the example schema changed: update this test"
    );
    let schema = dir.path().join("changed.json5");
    std::fs::write(&schema, changed).unwrap();
    let run = |extra: &[&str]| {
        bin()
            .arg("db")
            .arg("--schema")
            .arg(&schema)
            .arg("--db")
            .arg(dir.path().join("dev.db"))
            .args(extra)
            .args([
                "upsert",
                "Setting",
                r#"{"deviceId":"d1","name":"speed","value":4}"#,
            ])
            .output()
            .expect("devtables runs")
    };
    let refused = run(&[]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains("models.Setting.fields.value") && err.contains("--schema-change"),
        "{err}"
    );
    assert_eq!(
        err.matches("models.Setting.fields.value").count(),
        1,
        "{err}"
    );
    let allowed = run(&["--schema-change"]);
    assert!(allowed.status.success(), "{allowed:?}");
    // Recorded: the next open under the new schema needs no flag.
    assert!(run(&[]).status.success());
}
