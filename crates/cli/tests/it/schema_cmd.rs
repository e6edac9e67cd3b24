//! `devtables schema check` and `schema show` on schema files written by the tests, in the
//! shape users of the original product bring (process extras, timestamps, generated ids).

use super::bin;

const SCHEMA: &str = r#"{
    format: 'onetable:1.1.0',
    version: '2.1.0',
    name: 'Gateway',
    indexes: {
        primary: {hash: 'pk', sort: 'sk', description: 'Primary index'},
        gs1: {hash: 'gs1pk', sort: 'gs1sk', project: 'all'},
    },
    params: {isoDates: true, timestamps: 'create'},
    process: {
        Reading: {enable: 'both', sync: 'up', show: true, mem: 100},
        Setting: {sync: 'down', notify: 'change'},
    },
    models: {
        Reading: {
            pk: {type: 'string', value: 'dev#${deviceId}'},
            sk: {type: 'string', value: 'r#${id}'},
            id: {type: 'string', generate: 'uid(12)'},
            deviceId: {type: 'string', required: true},
            tags: {type: 'array', items: {type: 'string', enum: ['a', 'b']}},
            where: {type: 'object', schema: {lat: {type: 'number'}, lon: {type: 'number'}}},
        },
        Setting: {
            pk: {type: 'string', value: 'dev#${deviceId}'},
            sk: {type: 'string', value: 's#${name}'},
            deviceId: {type: 'string', required: true},
            name: {type: 'string', required: true, unique: true},
            value: {type: 'string', default: 'off', description: 'What the device does'},
        },
    },
}"#;

/// The first line of `text` that starts (after its indentation) with `start`.
fn line_of(text: &str, start: &str) -> String {
    text.lines()
        .find(|l| l.trim_start().starts_with(start))
        .unwrap_or_else(|| panic!("no line starting with {start}:\n{text}"))
        .to_string()
}

fn schema_file(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("schema.json5");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_lists_models_replication_indexes_and_every_ignored_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = schema_file(dir.path(), SCHEMA);
    let out = bin().args(["schema", "check"]).arg(&file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("schema Gateway version 2.1.0"),
        "{stdout}"
    );
    assert!(stdout.contains("2 models, 3 warnings"), "{stdout}");
    assert!(
        stdout.contains("gs1          hash gs1pk, sort gs1sk"),
        "{stdout}"
    );
    let line = |model: &str| line_of(&stdout, model);
    assert!(line("Reading").contains("device and cloud"), "{stdout}");
    assert!(
        line("Reading").contains("dev#${deviceId} / r#${id}"),
        "{stdout}"
    );
    assert!(line("Setting").contains(" down"), "{stdout}");
    for key in [
        "process.Reading.show",
        "process.Reading.mem",
        "process.Setting.notify",
    ] {
        assert!(stdout.contains(key), "{key} warned:\n{stdout}");
    }
}

#[test]
fn show_lists_a_models_fields_with_their_rules() {
    let dir = tempfile::tempdir().unwrap();
    let file = schema_file(dir.path(), SCHEMA);
    let out = bin()
        .args(["schema", "show", "--model", "Reading"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("model Reading: lives on device and cloud, sync up"),
        "{stdout}"
    );
    let row = |name: &str| line_of(&stdout, name);
    assert!(row("id ").contains("generate uid(12)"), "{stdout}");
    assert!(row("deviceId").contains("required"), "{stdout}");
    assert!(
        row("lat").starts_with("    lat"),
        "nested fields are indented:\n{stdout}"
    );
    assert!(
        row("[items]").contains("enum [\"a\", \"b\"]"),
        "array items:\n{stdout}"
    );
    assert!(
        row("created").contains("set by devtables (created timestamp)"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("updated"),
        "timestamps: 'create' keeps no updated:\n{stdout}"
    );

    let out = bin()
        .args(["schema", "show", "--model", "Nope"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no model \"Nope\" (its models: "),
        "{stderr}"
    );
}

#[test]
fn a_refused_schema_names_the_feature_and_its_path_once_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let refused = SCHEMA.replace(
        "deviceId: {type: 'string', required: true},\n            tags",
        "deviceId: {type: 'string', required: true, encode: ['pk', '#', 1]},\n            tags",
    );
    assert_ne!(refused, SCHEMA);
    let file = schema_file(dir.path(), &refused);
    let out = bin().args(["schema", "check"]).arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(stderr.contains("models.Reading.deviceId"), "{stderr}");
    assert!(stderr.contains("encode"), "{stderr}");
    assert_eq!(
        stderr.matches("models.Reading.deviceId").count(),
        1,
        "said once:\n{stderr}"
    );
}

#[test]
fn diff_names_every_difference_and_fails_only_on_an_incompatible_one() {
    let dir = tempfile::tempdir().unwrap();
    let old = schema_file(dir.path(), SCHEMA);
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let compatible = SCHEMA
        .replace("version: '2.1.0'", "version: '2.2.0'")
        .replace(
            "value: {type: 'string', default: 'off', description: 'What the device does'},",
            "value: {type: 'string', default: 'off', description: 'What the device does'},\n            unit: {type: 'string'},",
        );
    assert_ne!(compatible, SCHEMA);
    let new = write("compatible.json5", &compatible);
    let out = bin()
        .args(["schema", "diff"])
        .arg(&old)
        .arg(&new)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("old: 2.1.0+"), "{stdout}");
    assert!(stdout.contains("new: 2.2.0+"), "{stdout}");
    assert!(
        stdout.contains("models.Setting.fields.unit") && stdout.contains("(compatible)"),
        "{stdout}"
    );
    let incompatible = SCHEMA.replace(
        "deviceId: {type: 'string', required: true},\n            tags",
        "deviceId: {type: 'number', required: true},\n            tags",
    );
    assert_ne!(incompatible, SCHEMA);
    let bad = write("incompatible.json5", &incompatible);
    let out = bin()
        .args(["schema", "diff"])
        .arg(&old)
        .arg(&bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout} {stderr}");
    assert!(
        stdout.contains("models.Reading.fields.deviceId") && stdout.contains("(incompatible)"),
        "{stdout}"
    );
    assert!(stderr.contains("--schema-change"), "{stderr}");
    // The same schema: nothing to say.
    let out = bin()
        .args(["schema", "diff"])
        .arg(&old)
        .arg(&old)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no difference"));
}
