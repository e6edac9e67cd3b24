//! The C example (`examples/c/device.c`), compiled by the system C compiler against this crate's
//! shared library and the committed header, run as its own process against the real cloud
//! service: its fault reaches the cloud (read through the HTTP API), a `reboot` command written
//! through the API reaches it, its C handler runs (it says so on stdout), and the handler's
//! result is in the cloud's command item when the program exits 0.
//!
//! Without a C compiler the test prints `SKIPPED` and passes, unless `DEVTABLES_SERVICES=1`
//! (CI), where a missing compiler is a failure. `CC` chooses the compiler (default `cc`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::json;

use super::support::{eventually, write_agent_config, TestCloud, WAIT};

/// The C compiler, or `None` (after printing why) when the test must be skipped.
fn c_compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let works = Command::new(&cc)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Some(cc);
    }
    let why = format!("no C compiler ({cc:?} does not run; set CC or install gcc)");
    if std::env::var("DEVTABLES_SERVICES").as_deref() == Ok("1") {
        panic!("c_example: {why}, and DEVTABLES_SERVICES=1 requires it");
    }
    println!("SKIPPED c_example: {why}");
    None
}

/// The folder holding `libdevtables_capi.so`, which cargo built with this test (the test binary
/// is in its `deps/` subfolder).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("deps folder");
    for dir in [deps, deps.parent().expect("profile folder")] {
        if dir.join("libdevtables_capi.so").exists() {
            return dir.to_path_buf();
        }
    }
    panic!(
        "libdevtables_capi.so is not beside {} (cargo builds it with the tests)",
        exe.display()
    );
}

/// Compiles examples/c/device.c into `out`, as the README says to.
fn compile(cc: &str, out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let lib = library_dir();
    let output = Command::new(cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out)
        .arg(root.join("examples/c/device.c"))
        .arg("-I")
        .arg(root.join("crates/capi/include"))
        .arg("-L")
        .arg(&lib)
        .arg("-ldevtables_capi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .output()
        .expect("the C compiler runs");
    assert!(
        output.status.success(),
        "compiling examples/c/device.c failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_c_example_raises_a_fault_and_answers_reboot_from_the_cloud() {
    let Some(cc) = c_compiler() else { return };
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("device");
    compile(&cc, &program);

    let cloud = TestCloud::start(&dir.path().join("cloud"));
    let secret = cloud.register("gw-c");
    let config = write_agent_config(dir.path(), "gw-c", &secret, cloud.mqtt_port());
    let mut child = Command::new(&program)
        .arg(&config)
        .arg("gw-c")
        .arg(WAIT.as_secs().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example starts");
    // Its stdout, line by line, on a thread (a test must never block on a pipe).
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut output = Vec::new();

    // The fault it raised reaches the cloud.
    let fault = eventually("the example's fault in the cloud", || {
        let faults = cloud.items("gw-c", "Fault")?;
        faults
            .into_iter()
            .find(|f| f["source"] == "device.c")
            .ok_or_else(|| "no fault yet".to_string())
    });
    assert_eq!(fault["severity"], "critical");
    assert_eq!(fault["message"], "temperature above limit (C example)");

    // The cloud's reboot command runs the C handler, whose reply comes back.
    let id = cloud.command("gw-c", "reboot", json!({"delay_s": 0}));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        output.extend(lines.try_iter());
        if let Some(status) = child.try_wait().expect("the example's status") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the example did not exit; its output:\n{}",
            output.join("\n")
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    output.extend(lines.iter());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let shown = format!("stdout:\n{}\nstderr:\n{stderr}", output.join("\n"));
    assert!(status.success(), "the example failed ({status}); {shown}");

    let handled = output
        .iter()
        .find_map(|l| l.strip_prefix("reboot requested: "))
        .unwrap_or_else(|| panic!("the C handler did not run; {shown}"));
    let handled: serde_json::Value = serde_json::from_str(handled).unwrap();
    assert_eq!(handled["id"], id.as_str(), "{shown}");
    assert_eq!(handled["args"], json!({"delay_s": 0}));
    assert!(
        output
            .iter()
            .any(|l| l.starts_with("change: ") && l.contains("\"origin\":\"remote\"")),
        "the change callback saw the command arrive; {shown}"
    );
    assert_eq!(
        output.last().map(String::as_str),
        Some("rebooting"),
        "{shown}"
    );

    let command = cloud.answered_command("gw-c", &id);
    assert_eq!(command["status"], "done", "{command}");
    assert_eq!(
        command["result"],
        json!({"rebooting": true, "by": "examples/c/device.c"})
    );
}
