//! Damaged database files: truncated and byte-flipped copies of a real log give the typed
//! `Damaged` error naming the file, or open as a database holding a prefix of the commits (a
//! torn tail is cut off), never a panic; the undamaged file still opens. A damaged redb file
//! of an earlier version gives `Damaged` too. Outcomes are counted and printed (run with
//! `--nocapture` to see them).

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use devtables_db::{Db, DbError, DbOptions, FindOptions, OpenError};
use serde_json::json;

use super::{item, key, reading, schema};

const ITEMS: usize = 300;
/// Items per transaction of [`pristine`]: each is one record of the log.
const CHUNK: usize = 50;

/// A closed database file with `ITEMS` readings written in transactions of `CHUNK`, as bytes.
fn pristine() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pristine.db");
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
    for chunk in ops.chunks(CHUNK) {
        db.transaction(chunk).unwrap();
    }
    db.close().unwrap();
    std::fs::read(&path).unwrap()
}

/// Where each record of the log in `bytes` ends (the file format of `devtables-logstore`:
/// a 16-byte header, then records of a u32 LE payload length, a u32 CRC, a u64 durable-point
/// claim and the payload).
fn record_ends(bytes: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut at = 16;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 16 + len;
        assert!(at <= bytes.len(), "the pristine log is whole");
        ends.push(at);
    }
    ends
}

/// What one damaged copy did.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Opened, and every operation answered; it holds every commit.
    Worked,
    /// Opened, and every operation answered; it holds the first commits only (a tail that
    /// looked torn was cut off).
    WorkedPrefix,
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
    let expected_lines: Vec<&[u8]> = expected.split_inclusive(|b| *b == b'\n').collect();
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
    let note = |r: Result<(), DbError>| -> Result<(), String> {
        if let Err(e) = r {
            if check_db_error(case, path, &e)? {
                damaged.set(damaged.get() + 1);
            }
        }
        Ok(())
    };
    // What it holds, before the writes below change it.
    let mut exported = Vec::new();
    note(db.export(&mut exported).map(drop))?;
    for i in [0, ITEMS / 2, ITEMS - 1] {
        note(db.get("Reading", &key(&format!("r{i:04}"))).map(drop))?;
        note(db.get_view("Reading", &key(&format!("r{i:04}"))).map(drop))?;
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
    note(db.create("Reading", &reading("new", 1.0, "ok")).map(drop))?;
    note(
        db.update(
            "Reading",
            &item(json!({"id": "r0001", "deviceId": "d1", "value": 9})),
        )
        .map(drop),
    )?;
    note(db.remove("Reading", &key("r0002")).map(drop))?;
    note(db.close())?;
    if damaged.get() > 0 {
        return Ok(Outcome::RefusedLater);
    }
    if exported == expected {
        return Ok(Outcome::Worked);
    }
    // Commits are whole transactions of `CHUNK` items written in key order: a database holding
    // the first commits exports the first lines, a multiple of `CHUNK` of them.
    let lines: Vec<&[u8]> = exported.split_inclusive(|b| *b == b'\n').collect();
    if lines.len().is_multiple_of(CHUNK) && expected_lines.starts_with(&lines) {
        return Ok(Outcome::WorkedPrefix);
    }
    Err(wrong(
        case,
        format!(
            "opened holding {} items that are not the first commits' (undetected damage)",
            lines.len()
        ),
    ))
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
    let path: PathBuf = dir.join(format!("case-{n}.db"));
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
    worked_prefix: usize,
    refused_later: usize,
    refused_at_open: usize,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, r: Result<Outcome, String>) {
        match r {
            Ok(Outcome::Worked) => self.worked += 1,
            Ok(Outcome::WorkedPrefix) => self.worked_prefix += 1,
            Ok(Outcome::RefusedLater) => self.refused_later += 1,
            Ok(Outcome::RefusedAtOpen) => self.refused_at_open += 1,
            Err(e) => self.failures.push(e),
        }
    }

    fn report(&self, what: &str) {
        println!(
            "{what}: {} opened whole, {} opened with the first commits (torn tail cut), {} opened then refused (Damaged), {} refused at open (Damaged), {} wrong",
            self.worked,
            self.worked_prefix,
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

/// The lengths a truncated copy is cut to: nothing, inside the header, every record
/// boundary, and inside every record (its length field, its checksum, its payload).
fn truncation_lengths(bytes: &[u8]) -> Vec<usize> {
    let mut lengths = vec![0, 1, 7, 8, 15, 16];
    let mut start = 16;
    for end in record_ends(bytes) {
        lengths.extend([start + 2, start + 6, (start + end) / 2, end - 1, end]);
        start = end;
    }
    lengths.retain(|l| *l <= bytes.len());
    lengths.sort_unstable();
    lengths.dedup();
    lengths
}

#[test]
fn truncated_files_open_with_the_first_commits_or_give_the_damaged_error() {
    let bytes = pristine();
    let expected = export_of(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let mut tally = Tally::default();
    let lengths = truncation_lengths(&bytes);
    assert!(
        record_ends(&bytes).len() >= ITEMS / CHUNK,
        "one record per transaction"
    );
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
        "an empty file is refused by open_existing"
    );
    assert!(
        tally.worked_prefix >= ITEMS / CHUNK,
        "a cut inside or at the end of each record opens with the commits before it"
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
    // Half the flips anywhere in the file, half in its header and first records (the format
    // record, the tables' definitions).
    let hot = bytes.len().min(1024);
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
    assert!(
        tally.refused_at_open > FLIPS / 2,
        "a flip in a record before the last is damage, refused ({} refused)",
        tally.refused_at_open
    );
    assert_pristine_opens(&bytes);
}

/// The export of the database in `bytes`, read without changing them.
fn export_of(bytes: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.db");
    std::fs::write(&path, bytes).unwrap();
    let db = Db::open_read_only(&path, schema(), DbOptions::default()).unwrap();
    let mut out = Vec::new();
    db.export(&mut out).unwrap();
    out
}

fn assert_pristine_opens(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.db");
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
    let path = dir.path().join("absent.db");
    for result in [
        Db::open_existing(&path, schema(), DbOptions::default()),
        Db::open_read_only(&path, schema(), DbOptions::default()),
    ] {
        match result {
            Err(e @ OpenError::Missing { .. }) => {
                assert!(e.to_string().contains("absent.db"), "{e}")
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
    let live = dir.path().join("live.db");
    let db = Db::open(&live, schema(), DbOptions::default()).unwrap();
    db.create("Reading", &reading("a", 1.0, "ok")).unwrap();
    // A copy taken while the database is open, with the first half of a next commit after it,
    // is what a crash in the middle of a write leaves: a torn tail, which a writable open cuts
    // off and the read-only open ignores.
    db.create("Reading", &reading("b", 2.0, "ok")).unwrap();
    let whole = std::fs::read(&live).unwrap();
    let last = *record_ends(&whole).last().unwrap();
    let before_last = record_ends(&whole)[record_ends(&whole).len() - 2];
    let crashed = dir.path().join("crashed.db");
    std::fs::write(&crashed, &whole[..(before_last + last) / 2]).unwrap();
    drop(db);
    let before = std::fs::read(&crashed).unwrap();
    let ro = Db::open_read_only(&crashed, schema(), DbOptions::default()).unwrap();
    assert_eq!(
        ro.get("Reading", &key("a")).unwrap().unwrap()["value"],
        json!(1.0)
    );
    assert_eq!(
        ro.get("Reading", &key("b")).unwrap(),
        None,
        "the torn commit"
    );
    match ro.create("Reading", &reading("c", 2.0, "ok")) {
        Err(e @ DbError::ReadOnly { .. }) => assert!(e.to_string().contains("crashed.db"), "{e}"),
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
    match Db::open_existing(&crashed, schema(), DbOptions::default()) {
        Err(e @ OpenError::Storage { .. }) => {
            assert!(e.to_string().contains("already open"), "{e}")
        }
        other => panic!("expected the already-open error, got {:?}", other.err()),
    }
    drop((r1, r2));
    // The writable open cuts the torn tail off, and the file works on.
    let db = Db::open_existing(&crashed, schema(), DbOptions::default()).unwrap();
    db.create("Reading", &reading("d", 4.0, "ok")).unwrap();
    drop(db);
    let db = Db::open_existing(&crashed, schema(), DbOptions::default()).unwrap();
    assert!(db.get("Reading", &key("d")).unwrap().is_some());
    assert!(db.get("Reading", &key("a")).unwrap().is_some());
}

#[test]
fn a_file_the_process_may_not_write_is_read_read_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.db");
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
                text.contains("locked.db") && text.contains("open_read_only"),
                "{text}"
            );
        }
        other => panic!("expected Permission, got {:?}", other.err()),
    }
}

/// A redb file of format 3 (what earlier versions wrote) holding [`pristine`]'s items.
fn pristine_redb(dir: &Path) -> Vec<u8> {
    let log = dir.join("pristine-source.db");
    std::fs::write(&log, pristine()).unwrap();
    let path = dir.join("pristine.redb");
    devtables_db::legacy::write_fixture(&log, &path).unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn a_damaged_redb_file_of_an_earlier_version_gives_the_damaged_error_and_stays_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = pristine_redb(dir.path());
    let mut rng = Rng(FLIP_SEED);
    let mut cases: Vec<(String, Vec<u8>)> = [bytes.len() / 3, bytes.len() / 2, bytes.len() - 1]
        .iter()
        .map(|len| (format!("redb truncated to {len}"), bytes[..*len].to_vec()))
        .collect();
    for n in 0..24 {
        let offset = (rng.next() % bytes.len() as u64) as usize;
        let mut copy = bytes.clone();
        copy[offset] ^= 0xff;
        cases.push((format!("redb flip {n}: byte {offset}"), copy));
    }
    let mut refused = 0;
    for (n, (case, copy)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("legacy-{n}.redb"));
        std::fs::write(&path, copy).unwrap();
        let opened = panic::catch_unwind(AssertUnwindSafe(|| {
            Db::open_existing(&path, schema(), DbOptions::default()).map(drop)
        }))
        .unwrap_or_else(|_| panic!("{case}: a panic escaped"));
        match opened {
            Ok(()) => {}
            Err(OpenError::Damaged { path: p, detail }) => {
                assert_eq!(p, path, "{case}");
                assert!(!detail.is_empty(), "{case}");
                assert_eq!(
                    &std::fs::read(&path).unwrap(),
                    copy,
                    "{case}: left as it was"
                );
                refused += 1;
            }
            Err(other) => panic!("{case}: untyped failure: {other:?}"),
        }
        assert!(!dir
            .path()
            .join(format!("legacy-{n}.redb.converting"))
            .exists());
    }
    println!(
        "{} damaged redb files: {refused} refused as damaged",
        cases.len()
    );
    assert!(refused >= 1, "a truncated redb file is damage");
}
