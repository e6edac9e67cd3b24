//! Damaged database files: truncated and byte-flipped copies of a real file give the typed
//! `Damaged` error naming the file (or open and work), never a panic; the undamaged file still
//! opens. Outcomes are counted and printed (run with `--nocapture` to see them).

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use devtables_db::{Db, DbError, DbOptions, FindOptions, OpenError};
use serde_json::json;

use super::{item, key, reading, schema};

const ITEMS: usize = 300;
const PAGE: usize = 4096;

/// A closed database file with `ITEMS` readings spread over many pages, as bytes.
fn pristine() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pristine.redb");
    let db = Db::open(&path, schema(), DbOptions::default()).unwrap();
    let ops: Vec<_> = (0..ITEMS)
        .map(|i| {
            let mut r = reading(&format!("r{i:04}"), i as f64, ["ok", "warn"][i % 2]);
            r.insert("note".into(), json!("n".repeat(60 + i % 40)));
            devtables_db::TxnOp::Create {
                model: "Reading".into(),
                item: r,
            }
        })
        .collect();
    for chunk in ops.chunks(50) {
        db.transaction(chunk).unwrap();
    }
    db.close().unwrap();
    std::fs::read(&path).unwrap()
}

/// What one damaged copy did.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Opened, and every operation answered (the damage hit nothing the operations read).
    Worked,
    /// Opened and every operation answered, but the export differs from the undamaged file's:
    /// damage the engine did not detect.
    WorkedChanged,
    /// Opened; at least one operation answered `Damaged`.
    RefusedLater,
    /// Refused at open with `Damaged`.
    RefusedAtOpen,
}

/// A failure that is not the typed error naming the file.
fn wrong(case: &str, what: String) -> String {
    format!("{case}: {what}")
}

fn check_db_error(case: &str, path: &Path, e: &DbError) -> Result<bool, String> {
    match e {
        DbError::Damaged { path: p, detail } if p == path => {
            let text = e.to_string();
            if !text.contains(&path.display().to_string()) || !text.contains("backup") {
                return Err(wrong(case, format!("message lacks file or advice: {text}")));
            }
            if detail.chars().count() > 400 {
                return Err(wrong(
                    case,
                    format!("detail not cut: {} chars", detail.len()),
                ));
            }
            Ok(true)
        }
        // A flip inside a stored value can change a key or a field the operation reads: the
        // database answers as for any other content.
        DbError::NotFound { .. } | DbError::Exists { .. } | DbError::Invalid(_) => Ok(false),
        other => Err(wrong(case, format!("untyped failure: {other:?}"))),
    }
}

/// Opens the file at `path` and runs every kind of operation; Err names what was wrong.
fn exercise(case: &str, path: &Path, open: Open, expected: &[u8]) -> Result<Outcome, String> {
    let opened = match open {
        Open::Plain => Db::open(path, schema(), DbOptions::default()),
        Open::Existing => Db::open_existing(path, schema(), DbOptions::default()),
    };
    let db = match opened {
        Ok(db) => db,
        Err(OpenError::Damaged { path: p, detail }) if p == path => {
            if detail.is_empty() {
                return Err(wrong(case, "empty detail".into()));
            }
            return Ok(Outcome::RefusedAtOpen);
        }
        Err(other) => return Err(wrong(case, format!("open: untyped failure: {other:?}"))),
    };
    let damaged = std::cell::Cell::new(0);
    let latched = std::cell::RefCell::new(None::<String>);
    let note = |r: Result<(), DbError>| -> Result<(), String> {
        if let Err(e) = r {
            if check_db_error(case, path, &e)? {
                damaged.set(damaged.get() + 1);
                if let DbError::Damaged { detail, .. } = &e {
                    if detail.contains("panicked") {
                        latched.borrow_mut().get_or_insert(detail.clone());
                    }
                }
            }
        }
        Ok(())
    };
    for i in [0, ITEMS / 2, ITEMS - 1] {
        note(db.get("Reading", &key(&format!("r{i:04}"))).map(drop))?;
    }
    note(
        db.find(
            "Reading",
            &item(json!({"deviceId": "d1"})),
            &FindOptions::default(),
        )
        .map(drop),
    )?;
    note(
        db.find(
            "Reading",
            &item(json!({"status": "warn"})),
            &FindOptions {
                index: Some("gs1".into()),
                ..FindOptions::default()
            },
        )
        .map(drop),
    )?;
    let mut exported = Vec::new();
    note(db.export(&mut exported).map(drop))?;
    note(db.create("Reading", &reading("new", 1.0, "ok")).map(drop))?;
    note(
        db.update(
            "Reading",
            &item(json!({"id": "r0001", "deviceId": "d1", "value": 9})),
        )
        .map(drop),
    )?;
    note(db.remove("Reading", &key("r0002")).map(drop))?;
    // After a caught panic, the handle answers every call with the same error, never a second
    // panic (nor a write blocked on the writer slot the panic left taken).
    if let Some(first) = latched.borrow().clone() {
        for again in [
            db.get("Reading", &key("r0000")).map(drop),
            db.create("Reading", &reading("after", 1.0, "ok")).map(drop),
        ] {
            match again {
                Err(DbError::Damaged { detail, .. }) if detail == first => {}
                other => return Err(wrong(case, format!("after a panic: {other:?}"))),
            }
        }
    }
    note(db.close())?;
    Ok(if damaged.get() > 0 {
        Outcome::RefusedLater
    } else if exported != expected {
        Outcome::WorkedChanged
    } else {
        Outcome::Worked
    })
}

/// How a damaged copy is opened.
#[derive(Clone, Copy, Debug)]
enum Open {
    /// `Db::open`, which makes a new database in an empty file.
    Plain,
    Existing,
}

/// Writes `bytes` to a fresh file and exercises it; a panic escaping is an error too.
fn run_case(
    dir: &Path,
    n: usize,
    case: &str,
    bytes: &[u8],
    open: Open,
    expected: &[u8],
) -> Result<Outcome, String> {
    let path: PathBuf = dir.join(format!("case-{n}.redb"));
    std::fs::write(&path, bytes).unwrap();
    let case = format!("{case} ({open:?})");
    let result = panic::catch_unwind(AssertUnwindSafe(|| exercise(&case, &path, open, expected)))
        .unwrap_or_else(|_| Err(wrong(&case, "a panic escaped".into())));
    let _ = std::fs::remove_file(&path);
    result
}

#[derive(Default, Debug)]
struct Tally {
    worked: usize,
    worked_changed: usize,
    refused_later: usize,
    refused_at_open: usize,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, r: Result<Outcome, String>) {
        match r {
            Ok(Outcome::Worked) => self.worked += 1,
            Ok(Outcome::WorkedChanged) => self.worked_changed += 1,
            Ok(Outcome::RefusedLater) => self.refused_later += 1,
            Ok(Outcome::RefusedAtOpen) => self.refused_at_open += 1,
            Err(e) => self.failures.push(e),
        }
    }

    fn report(&self, what: &str) {
        println!(
            "{what}: {} opened and worked, {} worked with changed data (undetected), {} opened then refused (Damaged), {} refused at open (Damaged), {} wrong",
            self.worked,
            self.worked_changed,
            self.refused_later,
            self.refused_at_open,
            self.failures.len()
        );
        assert!(
            self.failures.is_empty(),
            "{what}: {} cases failed, first ones:\n{}",
            self.failures.len(),
            self.failures[..self.failures.len().min(10)].join("\n")
        );
    }
}

/// The lengths a truncated copy is cut to: nothing, a few bytes, every page boundary up to
/// the data's end, half, one byte short.
fn truncation_lengths(len: usize) -> Vec<usize> {
    let mut lengths = vec![0, 1, 7, 64, 511, 512, 4095];
    lengths.extend((1..).map(|p| p * PAGE).take_while(|l| *l < len));
    lengths.extend([len / 2, len - 1]);
    lengths.sort_unstable();
    lengths.dedup();
    lengths
}

#[test]
fn truncated_files_give_the_damaged_error_naming_the_file() {
    let bytes = pristine();
    let expected = export_of(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let mut tally = Tally::default();
    let lengths = truncation_lengths(bytes.len());
    for (n, len) in lengths.iter().enumerate() {
        for open in [Open::Existing, Open::Plain] {
            tally.add(run_case(
                dir.path(),
                n,
                &format!("truncated to {len} of {} bytes", bytes.len()),
                &bytes[..*len],
                open,
                &expected,
            ));
        }
    }
    tally.report(&format!(
        "{} truncations, each opened both ways",
        lengths.len()
    ));
    assert!(
        tally.refused_at_open >= 1,
        "a truncated file is refused at open (an empty one at least)"
    );
    assert_pristine_opens(&bytes);
}

/// A deterministic generator for spread offsets (xorshift64*), so a failing case replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

const FLIP_SEED: u64 = 0x5eed_0014;
const FLIPS: usize = 256;

#[test]
fn flipped_bytes_give_the_damaged_error_or_a_working_database() {
    let bytes = pristine();
    let expected = export_of(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(FLIP_SEED);
    let mut tally = Tally::default();
    // Half the flips anywhere in the file, half in its first pages (header, tables' roots),
    // where most of the structure lives.
    let hot = bytes.len().min(8 * PAGE);
    for n in 0..FLIPS {
        let span = if n % 2 == 0 { bytes.len() } else { hot };
        let offset = (rng.next() % span as u64) as usize;
        let mask = (rng.next() % 255 + 1) as u8;
        let mut copy = bytes.clone();
        copy[offset] ^= mask;
        tally.add(run_case(
            dir.path(),
            n,
            &format!("seed {FLIP_SEED:#x} flip {n}: byte {offset} ^= {mask:#04x}"),
            &copy,
            [Open::Existing, Open::Plain][n % 2],
            &expected,
        ));
    }
    tally.report(&format!("{FLIPS} single-byte flips (seed {FLIP_SEED:#x})"));
    assert_pristine_opens(&bytes);
}

/// The export of the database in `bytes`, read without changing them.
fn export_of(bytes: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.redb");
    std::fs::write(&path, bytes).unwrap();
    let db = Db::open_read_only(&path, schema(), DbOptions::default()).unwrap();
    let mut out = Vec::new();
    db.export(&mut out).unwrap();
    out
}

fn assert_pristine_opens(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.redb");
    std::fs::write(&path, bytes).unwrap();
    let db = Db::open_existing(&path, schema(), DbOptions::default()).unwrap();
    let page = db
        .find(
            "Reading",
            &item(json!({"deviceId": "d1"})),
            &FindOptions::default(),
        )
        .unwrap();
    assert_eq!(
        page.items.len(),
        ITEMS,
        "the undamaged copy holds every item"
    );
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Any single-byte change anywhere in the file: a typed answer, never a panic.
        #[test]
        fn any_flip_is_answered_typed(at in 0.0f64..1.0, mask in 1u8..=255) {
            let (bytes, expected) = PRISTINE.with(|b| b.clone());
            let offset = ((bytes.len() as f64 * at) as usize).min(bytes.len() - 1);
            let mut copy = bytes;
            copy[offset] ^= mask;
            let dir = tempfile::tempdir().unwrap();
            let r = run_case(dir.path(), 0, &format!("byte {offset} ^= {mask:#04x}"), &copy, Open::Existing, &expected);
            prop_assert!(r.is_ok(), "{}", r.unwrap_err());
        }
    }

    thread_local! {
        static PRISTINE: (Vec<u8>, Vec<u8>) = {
            let bytes = pristine();
            let expected = export_of(&bytes);
            (bytes, expected)
        };
    }
}

#[test]
fn open_existing_and_read_only_refuse_a_missing_file_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.redb");
    for result in [
        Db::open_existing(&path, schema(), DbOptions::default()),
        Db::open_read_only(&path, schema(), DbOptions::default()),
    ] {
        match result {
            Err(e @ OpenError::Missing { .. }) => {
                assert!(e.to_string().contains("absent.redb"), "{e}")
            }
            Err(other) => panic!("expected Missing, got {other:?}"),
            Ok(_) => panic!("a missing file opened"),
        }
    }
    assert!(!path.exists(), "no file was created");
    // An empty file is no database either.
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(
        Db::open_existing(&path, schema(), DbOptions::default()),
        Err(OpenError::Damaged { .. })
    ));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "left empty");
}

#[test]
fn read_only_reads_a_file_not_closed_cleanly_without_changing_it() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.redb");
    let db = Db::open(&live, schema(), DbOptions::default()).unwrap();
    db.create("Reading", &reading("a", 1.0, "ok")).unwrap();
    // A copy taken while the database is open is what a crash leaves: redb must repair it on
    // open, which the read-only open does in memory only.
    let crashed = dir.path().join("crashed.redb");
    std::fs::copy(&live, &crashed).unwrap();
    drop(db);
    let before = std::fs::read(&crashed).unwrap();
    let ro = Db::open_read_only(&crashed, schema(), DbOptions::default()).unwrap();
    assert_eq!(
        ro.get("Reading", &key("a")).unwrap().unwrap()["value"],
        json!(1.0)
    );
    match ro.create("Reading", &reading("b", 2.0, "ok")) {
        Err(e @ DbError::ReadOnly { .. }) => assert!(e.to_string().contains("crashed.redb"), "{e}"),
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    let mut out = Vec::new();
    assert_eq!(ro.export(&mut out).unwrap(), 1);
    ro.close().unwrap();
    assert_eq!(
        std::fs::read(&crashed).unwrap(),
        before,
        "the file is unchanged"
    );
    // A read-only handle shares the file with other readers, not with a writer.
    let r1 = Db::open_read_only(&crashed, schema(), DbOptions::default()).unwrap();
    let r2 = Db::open_read_only(&crashed, schema(), DbOptions::default()).unwrap();
    assert!(matches!(
        Db::open_existing(&crashed, schema(), DbOptions::default()),
        Err(OpenError::Storage { .. })
    ));
    drop((r1, r2));
    Db::open_existing(&crashed, schema(), DbOptions::default()).unwrap();
}

#[test]
fn a_file_the_process_may_not_write_is_read_read_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.redb");
    std::fs::write(&path, pristine()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let ro = Db::open_read_only(&path, schema(), DbOptions::default()).unwrap();
    assert!(ro.get("Reading", &key("r0003")).unwrap().is_some());
    drop(ro);
    if std::fs::OpenOptions::new().write(true).open(&path).is_ok() {
        println!("SKIPPED permission refusal: this process may write any file (root)");
        return;
    }
    match Db::open_existing(&path, schema(), DbOptions::default()) {
        Err(e @ OpenError::Permission { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("locked.redb") && text.contains("open_read_only"),
                "{text}"
            );
        }
        other => panic!("expected Permission, got {:?}", other.err()),
    }
}

#[test]
fn a_panic_inside_the_engine_latches_the_handle_and_releases_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latched.redb");
    let db = Db::open(&path, schema(), DbOptions::default()).unwrap();
    db.create("Reading", &reading("a", 1.0, "ok")).unwrap();
    // A panic inside a write transaction leaves redb's writer slot taken (redb does not abort a
    // transaction dropped while panicking): without the latch the next write would block.
    let first = match db.write(devtables_db::Origin::Local, |t| -> Result<(), DbError> {
        t.create("Reading", &reading("b", 2.0, "ok"))?;
        panic!("engine assertion stand-in")
    }) {
        Err(DbError::Damaged { path: p, detail }) => {
            assert_eq!(p, path);
            assert!(detail.contains("engine assertion stand-in"), "{detail}");
            detail
        }
        other => panic!("expected Damaged, got {other:?}"),
    };
    let again = [
        db.get("Reading", &key("a")).map(drop),
        db.create("Reading", &reading("c", 3.0, "ok")).map(drop),
        db.find(
            "Reading",
            &item(json!({"deviceId": "d1"})),
            &FindOptions::default(),
        )
        .map(drop),
        db.export(&mut Vec::new()).map(drop),
        db.side_len("outbox").map(drop),
        db.flush(),
    ];
    for result in again {
        match result {
            Err(DbError::Damaged { detail, .. }) => assert_eq!(detail, first),
            other => panic!("expected the same Damaged error, got {other:?}"),
        }
    }
    // The file was closed with its lock: the same process opens it again, and the committed
    // write is there while the rolled-back one is not.
    let reopened = Db::open_existing(&path, schema(), DbOptions::default()).unwrap();
    assert!(reopened.get("Reading", &key("a")).unwrap().is_some());
    assert!(reopened.get("Reading", &key("b")).unwrap().is_none());
    drop(db);
    reopened
        .create("Reading", &reading("d", 4.0, "ok"))
        .unwrap();
}
