//! Feed wake-ups between cloud nodes: a write on one node (an API write, or a device's push of
//! a broadcast item) advances feeds of devices another node serves; that node must stream the
//! change now, not at the device's next contact. PostgreSQL's `NOTIFY` carries them: delivered
//! to every listening node once the notifying transaction commits, in commit order.
//!
//! - [`Wakeups::notify`] never blocks and never drops: wake-ups wait in a map (one entry per
//!   device, the highest head), which a thread of its own sends, batched into payloads under
//!   PostgreSQL's 8000-byte limit; a failed send is kept and sent again.
//! - The change log's head goes the same way on a channel of its own: readers of the change log
//!   (SSE, long polls) and webhooks on every node wait on their node's head, which a write on
//!   another node would not move otherwise. A head heard is not sent back.
//! - The listening thread hands what it hears to the sync loop, which wakes the sessions of the
//!   devices it serves. After it (re)connects it asks the sync loop to prompt the devices it
//!   serves that are behind: wake-ups sent while it was not listening are lost by `NOTIFY`'s
//!   design, and this repairs them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use devtables_sync::identity::DeviceId;
use postgres::fallible_iterator::FallibleIterator;
use tokio::sync::mpsc;

use super::leases::{connect, LeaseOptions};
use super::{Heard, WakeOthers};
use crate::status::SyncStatus;

/// Largest payload sent in one `NOTIFY` (PostgreSQL's limit is 8000 bytes).
const MAX_PAYLOAD: usize = 7_000;

/// Whether `s` may be used unquoted-safe inside double quotes as a schema name.
pub(crate) fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The notification channel of a store's schema.
fn channel(schema: &str) -> String {
    format!("devtables_feed_{schema}")
}

/// The channel of the change log's head.
fn head_channel(schema: &str) -> String {
    format!("devtables_changes_{schema}")
}

#[derive(Default)]
struct Pending {
    heads: HashMap<DeviceId, u64>,
    /// The change log's head to tell, and the highest told or heard.
    change_head: u64,
    change_head_known: u64,
    stop: bool,
}

/// The sending side, cloned into the sync loop.
#[derive(Clone)]
pub struct Wakeups {
    pending: Arc<(Mutex<Pending>, Condvar)>,
}

impl WakeOthers for Wakeups {
    /// Queues wake-ups for other nodes (coalesced per device).
    fn wake(&self, advanced: Vec<(DeviceId, u64)>) {
        let (lock, cv) = &*self.pending;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        for (device, head) in advanced {
            let h = p.heads.entry(device).or_insert(0);
            *h = (*h).max(head);
        }
        cv.notify_one();
    }

    /// Tells the other nodes the change log reached `head` (nothing if it was heard from them).
    fn change_head(&self, head: u64) {
        let (lock, cv) = &*self.pending;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        if head > p.change_head_known {
            p.change_head_known = head;
            p.change_head = head;
            cv.notify_one();
        }
    }
}

/// The two threads; [`WakeupThreads::stop`] ends them.
pub struct WakeupThreads {
    pending: Arc<(Mutex<Pending>, Condvar)>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl WakeupThreads {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let (lock, cv) = &*self.pending;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts the sender and the listener (their connections are made inside, and made again after
/// a failure). `heard` is the sync loop's input.
/// `on_change_head` is called with each change-log head heard from another node.
pub fn start(
    options: LeaseOptions,
    heard: mpsc::Sender<Heard>,
    on_change_head: Box<dyn Fn(u64) + Send>,
    status: Arc<SyncStatus>,
) -> std::io::Result<(Wakeups, WakeupThreads)> {
    let pending = Arc::new((Mutex::new(Pending::default()), Condvar::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (pending, options, status) = (pending.clone(), options.clone(), status.clone());
        std::thread::Builder::new()
            .name("devtables-wakeup-send".into())
            .spawn(move || send_loop(&options, &pending, &status))?
    };
    let listener = {
        let (stop, pending) = (stop.clone(), pending.clone());
        std::thread::Builder::new()
            .name("devtables-wakeup-listen".into())
            .spawn(move || {
                let on_head = |head: u64| {
                    let (lock, _) = &*pending;
                    let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                    p.change_head_known = p.change_head_known.max(head);
                    drop(p);
                    on_change_head(head);
                };
                listen_loop(&options, &heard, &on_head, &status, &stop)
            })?
    };
    Ok((
        Wakeups {
            pending: pending.clone(),
        },
        WakeupThreads {
            pending,
            stop,
            threads: vec![sender, listener],
        },
    ))
}

/// Encodes wake-ups as JSON payloads `[[account, device, head], ...]`, each under
/// [`MAX_PAYLOAD`] bytes.
fn payloads(heads: &HashMap<DeviceId, u64>) -> Vec<String> {
    let mut out = Vec::new();
    let mut batch: Vec<serde_json::Value> = Vec::new();
    let mut size = 2;
    for (d, head) in heads {
        let entry = serde_json::json!([d.account, d.device, head]);
        let len = entry.to_string().len() + 1;
        if size + len > MAX_PAYLOAD && !batch.is_empty() {
            out.push(serde_json::Value::Array(std::mem::take(&mut batch)).to_string());
            size = 2;
        }
        size += len;
        batch.push(entry);
    }
    if !batch.is_empty() {
        out.push(serde_json::Value::Array(batch).to_string());
    }
    out
}

/// Decodes a payload; `None` when it is not one of ours (anyone with the database's
/// credentials can `NOTIFY`: the entries are checked like any input).
fn parse(payload: &str) -> Option<Vec<(DeviceId, u64)>> {
    let entries: Vec<(String, String, u64)> = serde_json::from_str(payload).ok()?;
    entries
        .into_iter()
        .map(|(a, d, h)| DeviceId::new(&a, &d).ok().map(|id| (id, h)))
        .collect()
}

fn send_loop(options: &LeaseOptions, pending: &(Mutex<Pending>, Condvar), status: &SyncStatus) {
    let (chan, head_chan) = (channel(&options.schema), head_channel(&options.schema));
    let mut client = None;
    loop {
        let (heads, change_head) = {
            let (lock, cv) = pending;
            let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
            while p.heads.is_empty() && p.change_head == 0 && !p.stop {
                p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if p.stop {
                return;
            }
            (
                std::mem::take(&mut p.heads),
                std::mem::take(&mut p.change_head),
            )
        };
        let result = (|| -> Result<(), postgres::Error> {
            let c = match &mut client {
                Some(c) if !postgres::Client::is_closed(c) => c,
                _ => client.insert(connect(options)?),
            };
            for payload in payloads(&heads) {
                c.execute("SELECT pg_notify($1, $2)", &[&chan, &payload])?;
            }
            if change_head > 0 {
                c.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&head_chan, &change_head.to_string()],
                )?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                status
                    .cluster
                    .wakeups_sent
                    .fetch_add(heads.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                status
                    .cluster
                    .wakeup_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    devices = heads.len(),
                    "cannot send feed wake-ups to the other nodes (kept, sent again): {e}"
                );
                client = None;
                let (lock, _) = pending;
                let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                for (d, h) in heads {
                    let e = p.heads.entry(d).or_insert(0);
                    *e = (*e).max(h);
                }
                p.change_head = p.change_head.max(change_head);
                drop(p);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

fn listen_loop(
    options: &LeaseOptions,
    heard: &mpsc::Sender<Heard>,
    on_change_head: &dyn Fn(u64),
    status: &SyncStatus,
    stop: &AtomicBool,
) {
    let (chan, head_chan) = (channel(&options.schema), head_channel(&options.schema));
    while !stop.load(Ordering::SeqCst) {
        let mut client = match connect(options).and_then(|mut c| {
            c.batch_execute(&format!("LISTEN \"{chan}\"; LISTEN \"{head_chan}\""))
                .map(|()| c)
        }) {
            Ok(c) => c,
            Err(e) => {
                status
                    .cluster
                    .wakeup_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("cannot listen for feed wake-ups of the other nodes: {e}");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        if heard.blocking_send(Heard::Listening).is_err() {
            return;
        }
        while !stop.load(Ordering::SeqCst) {
            let next = {
                let mut notifications = client.notifications();
                let mut iter = notifications.timeout_iter(Duration::from_millis(200));
                iter.next()
            };
            let batch = match next {
                Ok(Some(n)) => n,
                Ok(None) => {
                    if client.is_closed() {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    status
                        .cluster
                        .wakeup_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("lost the feed wake-ups' connection (listening again): {e}");
                    break;
                }
            };
            if batch.channel() == head_chan {
                match batch.payload().parse::<u64>() {
                    Ok(head) => on_change_head(head),
                    Err(_) => {
                        status
                            .cluster
                            .wakeups_unreadable
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(channel = %head_chan, "ignored a notification that is not a change-log head");
                    }
                }
                continue;
            }
            match parse(batch.payload()) {
                Some(advanced) => {
                    status
                        .cluster
                        .wakeups_heard
                        .fetch_add(advanced.len() as u64, Ordering::Relaxed);
                    if heard.blocking_send(Heard::Advanced(advanced)).is_err() {
                        return;
                    }
                }
                None => {
                    status
                        .cluster
                        .wakeups_unreadable
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        channel = %chan,
                        "ignored a notification that is not a feed wake-up"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_limit_and_read_back() {
        let heads: HashMap<DeviceId, u64> = (0..2_000)
            .map(|i| (DeviceId::new("acme", format!("device-{i}")).unwrap(), i))
            .collect();
        let sent = payloads(&heads);
        assert!(sent.len() > 1);
        let mut back = HashMap::new();
        for p in &sent {
            assert!(p.len() <= MAX_PAYLOAD, "{}", p.len());
            back.extend(parse(p).unwrap());
        }
        assert_eq!(back, heads);
    }

    #[test]
    fn foreign_payloads_are_refused() {
        assert!(parse("hello").is_none());
        assert!(parse("[[\"acme\", \"\", 1]]").is_none());
        assert!(parse("[[\"acme\", \"d\", -1]]").is_none());
    }

    #[test]
    fn schema_names_must_be_plain() {
        assert!(is_identifier("devtables"));
        assert!(is_identifier("dt_test_01"));
        assert!(!is_identifier("Dev"));
        assert!(!is_identifier("a\"b"));
        assert!(!is_identifier(""));
    }
}
