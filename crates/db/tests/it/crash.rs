//! Crash safety with a real SIGKILL: a child process writes in `immediate` mode from several
//! threads (so group commit is exercised) and reports each write once `create` returned; the
//! parent kills it at a random moment, reopens the file and checks every reported write is there.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devtables_db::{DbOptions, FindOptions};
use serde_json::json;

use super::{item, key, open, reading};

const CHILD_ENV: &str = "DEVTABLES_CRASH_CHILD_DB";
const WRITERS: usize = 4;

/// Entry point of the child process (does nothing unless the parent set the variable).
#[test]
fn child_process_entry() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round = std::env::var("DEVTABLES_CRASH_ROUND").unwrap_or_default();
    let db = open(std::path::Path::new(&path), DbOptions::default());
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = db.clone();
            let out = out.clone();
            let round = round.clone();
            std::thread::spawn(move || {
                for i in 0.. {
                    let id = format!("{round}-{w}-{i}");
                    db.create("Reading", &reading(&id, i as f64, "ok"))
                        .expect("child write");
                    let mut out = out.lock().unwrap();
                    let _ = writeln!(out, "ack {id}");
                    let _ = out.flush();
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// A tiny deterministic generator for kill delays (the seed is printed on failure).
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let exe = std::env::current_exe().unwrap();
    let mut seed: u64 = 0x5EED_C0FF_EE15_600D;
    let rounds = 25;
    let mut total_acked = 0;
    for round in 0..rounds {
        let delay = 30 + next(&mut seed) % 250;
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash::child_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .env("DEVTABLES_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(id) = line.strip_prefix("ack ") {
                    acked.push(id.to_string());
                }
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        // The last line may have been cut by the kill: only whole lines count, and a cut id is
        // simply a shorter id that may not exist, so drop the final one to be safe.
        let acked = &acked[..acked.len().saturating_sub(1)];
        let db = open(&path, DbOptions::default());
        for id in acked {
            assert!(
                db.get("Reading", &key(id)).unwrap().is_some(),
                "round {round} (delay {delay} ms): acknowledged write {id} lost after SIGKILL"
            );
        }
        total_acked += acked.len();
        let all = db
            .find(
                "Reading",
                &item(json!({"deviceId": "d1"})),
                &FindOptions::default(),
            )
            .unwrap();
        assert!(all.items.len() >= total_acked);
        db.close().unwrap();
    }
    eprintln!("crash test: {total_acked} acknowledged writes checked over {rounds} kills");
    assert!(total_acked > 0, "the child never acknowledged a write");
}
