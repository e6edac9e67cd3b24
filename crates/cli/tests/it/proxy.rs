//! A fault-injecting TCP proxy, so the end-to-end tests can break the real network path between
//! a real agent (or the cloud's own MQTT client) and a real broker, and check that replication
//! still converges.
//!
//! The proxy listens on 127.0.0.1 on a free port and forwards every accepted connection to one
//! target address. Faults are switched at run time ([`FaultProxy::delay`], [`FaultProxy::blackhole`],
//! [`FaultProxy::reset`], [`FaultProxy::refuse`]) or played from a seeded [`Schedule`]:
//!
//! - delay: every forwarded chunk waits a base latency plus a random jitter (order is kept);
//! - blackhole: nothing is read or written in either direction but the sockets stay open, as in
//!   a real partition: a half-open connection that only keep-alives can detect. TCP never loses
//!   bytes, so what was sent waits in the kernel buffers and flows again when the blackhole
//!   lifts, if both ends still hold the connection. A connection opened during a blackhole never
//!   reaches the target (its handshake would have been lost) and is reset when the blackhole
//!   lifts;
//! - reset: both sides of every open connection are closed with `SO_LINGER` 0, so each peer sees
//!   a TCP RST;
//! - refuse: the listener is closed, so new connections are refused (the broker is "down"), and
//!   bound again on the same port when the refusal ends;
//! - "loss" at the TCP level is one of the above: a reset, or a blackhole of the connection.
//!
//! Everything is bounded: at most [`ProxyLimits::max_connections`] connections at once (more are
//! reset at once and counted), delays and fault durations are capped, a schedule holds at most
//! [`MAX_STEPS`] steps, and the whole proxy is one OS thread running a single-threaded tokio
//! runtime with one task per connection. Dropping the proxy stops it and closes every socket.
//! Every refused, reset or dropped connection is counted in [`ProxyStats`].

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Most steps a schedule holds.
pub const MAX_STEPS: usize = 64;
/// Longest delay per chunk (base plus jitter) the proxy applies.
pub const MAX_DELAY: Duration = Duration::from_secs(2);
/// Longest single fault a schedule holds.
pub const MAX_HOLD: Duration = Duration::from_secs(30);

/// Limits of one proxy.
#[derive(Clone, Debug)]
pub struct ProxyLimits {
    /// Most connections forwarded at once; more are reset at once (default 32).
    pub max_connections: u64,
    /// How long connecting to the target may take before the client is reset (default 5 s).
    pub connect_timeout: Duration,
    /// Bytes read per forwarded chunk (default 16 KiB).
    pub chunk_bytes: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_connections: 32,
            connect_timeout: Duration::from_secs(5),
            chunk_bytes: 16 * 1024,
        }
    }
}

/// Added latency per forwarded chunk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Delay {
    pub base: Duration,
    /// Up to this much more, drawn per chunk from the proxy's seeded generator.
    pub jitter: Duration,
}

/// The faults in force; the connection tasks watch it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Faults {
    delay: Option<Delay>,
    blackhole: bool,
    refuse: bool,
    /// Bumped by every reset: a connection opened under an older epoch resets itself.
    reset_epoch: u64,
}

/// What the proxy did, for assertions and the failure report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyStats {
    /// Connections accepted (including those reset at once).
    pub accepted: u64,
    /// Connections open now.
    pub open: u64,
    /// Connections reset at once because `max_connections` were open.
    pub over_limit: u64,
    /// Connections opened during a blackhole, never forwarded, reset when it lifted (or closed
    /// when the client gave up first).
    pub held: u64,
    /// Established connections (bytes already forwarded both ways) that a blackhole stalled: an
    /// MQTT client on one of them can only notice through its keep-alive.
    pub live_stalls: u64,
    /// Connections whose target could not be reached (the client was reset).
    pub target_unreachable: u64,
    /// Connections reset by a reset fault.
    pub resets: u64,
    /// Connections one peer reset or broke (the other side was reset too).
    pub peer_errors: u64,
    /// Blackholes, refusal periods and delay periods started.
    pub blackholes: u64,
    pub refusals: u64,
    pub delays: u64,
    /// Failed attempts to bind the listener again after a refusal.
    pub rebind_failures: u64,
    /// Bytes forwarded client to target, and target to client.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl fmt::Display for ProxyStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "accepted={} open={} over_limit={} held={} live_stalls={} target_unreachable={} resets={} \
             peer_errors={} blackholes={} refusals={} delays={} rebind_failures={} bytes_up={} bytes_down={}",
            self.accepted,
            self.open,
            self.over_limit,
            self.held,
            self.live_stalls,
            self.target_unreachable,
            self.resets,
            self.peer_errors,
            self.blackholes,
            self.refusals,
            self.delays,
            self.rebind_failures,
            self.bytes_up,
            self.bytes_down
        )
    }
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    over_limit: AtomicU64,
    held: AtomicU64,
    live_stalls: AtomicU64,
    target_unreachable: AtomicU64,
    resets: AtomicU64,
    peer_errors: AtomicU64,
    blackholes: AtomicU64,
    refusals: AtomicU64,
    delays: AtomicU64,
    rebind_failures: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Shared {
    name: String,
    target: String,
    limits: ProxyLimits,
    faults: watch::Sender<Faults>,
    counters: Counters,
    seed: u64,
}

impl Shared {
    /// A warning the test output keeps even when the test passes: every dropped or refused
    /// connection leaves a line, not only a counter. Written to the stderr handle directly
    /// because the test harness captures only the print macros.
    fn warn(&self, message: &str) {
        let _ = writeln!(std::io::stderr(), "proxy {}: {message}", self.name);
    }
}

/// One fault of a schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Added latency on every chunk for the step's duration.
    Delay(Delay),
    /// Every connection, open or new, stalls for the step's duration.
    Blackhole,
    /// Every open connection is reset (instantaneous).
    Reset,
    /// The target goes "down": open connections are reset and new ones refused for the step's
    /// duration.
    Down,
}

/// A fault at an offset from the start of the schedule, held for `hold`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub at: Duration,
    pub fault: Fault,
    pub hold: Duration,
}

/// Ranges (in milliseconds) and weights a random schedule is drawn from.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Quiet time before each fault.
    pub gap_ms: (u64, u64),
    /// Base latency of a delay; its jitter is up to half the base.
    pub delay_ms: (u64, u64),
    /// How long a delay lasts.
    pub delay_for_ms: (u64, u64),
    pub blackhole_ms: (u64, u64),
    pub down_ms: (u64, u64),
    /// Relative weights of delay, blackhole, reset and down.
    pub weights: [u32; 4],
}

/// A seeded plan of faults, one after the other (they never overlap).
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub seed: u64,
    pub steps: Vec<Step>,
}

fn between(rng: &mut SmallRng, (lo, hi): (u64, u64)) -> u64 {
    if hi <= lo {
        lo
    } else {
        rng.gen_range(lo..=hi)
    }
}

impl Schedule {
    /// Draws faults from `profile` until `span` is filled (or [`MAX_STEPS`]); the same seed and
    /// profile give the same schedule.
    pub fn random(seed: u64, span: Duration, profile: &Profile) -> Schedule {
        let mut rng = SmallRng::seed_from_u64(seed);
        let total: u32 = profile.weights.iter().sum();
        let mut steps = Vec::new();
        let mut at = Duration::ZERO;
        while steps.len() < MAX_STEPS && total > 0 {
            at += Duration::from_millis(between(&mut rng, profile.gap_ms));
            let mut pick = rng.gen_range(0..total);
            let mut kind = 0;
            while pick >= profile.weights[kind] {
                pick -= profile.weights[kind];
                kind += 1;
            }
            let (fault, hold_ms) = match kind {
                0 => {
                    let base = between(&mut rng, profile.delay_ms);
                    let delay = Delay {
                        base: Duration::from_millis(base),
                        jitter: Duration::from_millis(base / 2),
                    };
                    (Fault::Delay(delay), between(&mut rng, profile.delay_for_ms))
                }
                1 => (Fault::Blackhole, between(&mut rng, profile.blackhole_ms)),
                2 => (Fault::Reset, 0),
                _ => (Fault::Down, between(&mut rng, profile.down_ms)),
            };
            let hold = Duration::from_millis(hold_ms).min(MAX_HOLD);
            if at + hold > span {
                break;
            }
            steps.push(Step { at, fault, hold });
            at += hold;
        }
        Schedule { seed, steps }
    }

    pub fn count(&self, f: impl Fn(&Fault) -> bool) -> usize {
        self.steps.iter().filter(|s| f(&s.fault)).count()
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {}:", self.seed)?;
        for s in &self.steps {
            let what = match s.fault {
                Fault::Delay(d) => format!("delay {:?}+{:?}", d.base, d.jitter),
                Fault::Blackhole => "blackhole".into(),
                Fault::Reset => "reset".into(),
                Fault::Down => "down".into(),
            };
            write!(
                f,
                " [+{:.1}s {what} {:.1}s]",
                s.at.as_secs_f64(),
                s.hold.as_secs_f64()
            )?;
        }
        Ok(())
    }
}

/// A running proxy; dropping it stops it.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    schedule: Option<tokio::task::JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy to `target` (`host:port`) with default limits; `seed` drives the delay jitter.
    pub fn start(name: &str, target: &str, seed: u64) -> FaultProxy {
        Self::start_with(name, target, seed, ProxyLimits::default())
    }

    pub fn start_with(name: &str, target: &str, seed: u64, limits: ProxyLimits) -> FaultProxy {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("the proxy binds a free port");
        let addr = std_listener.local_addr().expect("the proxy's address");
        std_listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let (faults, _) = watch::channel(Faults::default());
        let shared = Arc::new(Shared {
            name: name.to_string(),
            target: target.to_string(),
            limits,
            faults,
            counters: Counters::default(),
            seed,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the proxy's runtime");
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{name}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener)
                        .expect("the listener joins the runtime");
                    tokio::select! {
                        _ = serve(s, listener, addr) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime cancels every connection task, which closes its sockets.
            })
            .expect("the proxy thread starts");
        FaultProxy {
            addr,
            shared,
            runtime: handle,
            stop: Some(stop),
            thread: Some(thread),
            schedule: None,
        }
    }

    /// `127.0.0.1:port`, for a client's broker setting.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Adds latency to every forwarded chunk (capped at [`MAX_DELAY`]); `None` removes it.
    pub fn delay(&self, delay: Option<Delay>) {
        apply(&self.shared, |f| {
            f.delay = delay.map(cap_delay);
        });
    }

    /// Stalls every connection, open and new, until switched off.
    pub fn blackhole(&self, on: bool) {
        apply(&self.shared, |f| f.blackhole = on);
    }

    /// Resets every open connection now.
    pub fn reset(&self) {
        apply(&self.shared, |f| f.reset_epoch += 1);
    }

    /// Refuses new connections until switched off (open ones are untouched).
    pub fn refuse(&self, on: bool) {
        apply(&self.shared, |f| f.refuse = on);
    }

    /// Lifts every fault (open connections survive, stalled ones flow again).
    pub fn heal(&self) {
        apply(&self.shared, |f| {
            f.delay = None;
            f.blackhole = false;
            f.refuse = false;
        });
    }

    /// Plays `schedule` from now on, replacing one already playing.
    pub fn play(&mut self, schedule: &Schedule) {
        self.stop_faults();
        let shared = self.shared.clone();
        let steps = schedule.steps.clone();
        self.schedule = Some(self.runtime.spawn(async move {
            let start = tokio::time::Instant::now();
            for step in steps.into_iter().take(MAX_STEPS) {
                tokio::time::sleep_until(start + step.at).await;
                match step.fault {
                    Fault::Delay(d) => apply(&shared, |f| f.delay = Some(cap_delay(d))),
                    Fault::Blackhole => apply(&shared, |f| f.blackhole = true),
                    Fault::Reset => apply(&shared, |f| f.reset_epoch += 1),
                    Fault::Down => apply(&shared, |f| {
                        f.reset_epoch += 1;
                        f.refuse = true;
                    }),
                }
                tokio::time::sleep(step.hold.min(MAX_HOLD)).await;
                apply(&shared, |f| {
                    f.delay = None;
                    f.blackhole = false;
                    f.refuse = false;
                });
            }
        }));
    }

    /// Stops the schedule (if any) and lifts every fault.
    pub fn stop_faults(&mut self) {
        if let Some(s) = self.schedule.take() {
            s.abort();
        }
        self.heal();
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            accepted: get(&c.accepted),
            open: get(&c.open),
            over_limit: get(&c.over_limit),
            held: get(&c.held),
            live_stalls: get(&c.live_stalls),
            target_unreachable: get(&c.target_unreachable),
            resets: get(&c.resets),
            peer_errors: get(&c.peer_errors),
            blackholes: get(&c.blackholes),
            refusals: get(&c.refusals),
            delays: get(&c.delays),
            rebind_failures: get(&c.rebind_failures),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(s) = self.schedule.take() {
            s.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cap_delay(d: Delay) -> Delay {
    let base = d.base.min(MAX_DELAY);
    Delay {
        base,
        jitter: d.jitter.min(MAX_DELAY - base),
    }
}

/// Changes the faults in force, counting each fault that starts.
fn apply(shared: &Shared, change: impl FnOnce(&mut Faults)) {
    shared.faults.send_modify(|f| {
        let before = f.clone();
        change(f);
        let c = &shared.counters;
        if f.blackhole && !before.blackhole {
            bump(&c.blackholes);
        }
        if f.refuse && !before.refuse {
            bump(&c.refusals);
        }
        if f.delay.is_some() && before.delay.is_none() {
            bump(&c.delays);
        }
    });
}

/// The accept loop: closes the listener while connections are refused, binds it again after.
async fn serve(shared: Arc<Shared>, listener: TcpListener, addr: SocketAddr) {
    let mut faults = shared.faults.subscribe();
    let mut listener = Some(listener);
    let mut next_id = 0u64;
    loop {
        let refuse = faults.borrow_and_update().refuse;
        if refuse {
            // Closing the listener makes the kernel answer new connections with a RST
            // (ECONNREFUSED), exactly as a stopped broker does.
            listener = None;
        } else if listener.is_none() {
            match TcpListener::bind(addr).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    bump(&shared.counters.rebind_failures);
                    shared.warn(&format!("cannot listen on {addr} again: {e}; retrying"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let accepted = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            accepted = accepted => match accepted {
                Ok((stream, _)) => {
                    next_id += 1;
                    bump(&shared.counters.accepted);
                    let open = shared.counters.open.load(Ordering::Relaxed);
                    if open >= shared.limits.max_connections {
                        bump(&shared.counters.over_limit);
                        shared.warn(&format!(
                            "{open} connections open (limit {}): connection reset",
                            shared.limits.max_connections
                        ));
                        abort(stream);
                        continue;
                    }
                    shared.counters.open.fetch_add(1, Ordering::Relaxed);
                    let s = shared.clone();
                    tokio::spawn(async move {
                        connection(&s, stream, next_id).await;
                        s.counters.open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    shared.warn(&format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Closes a socket with a RST.
fn abort(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

enum End {
    Closed,
    Reset,
    PeerError,
}

async fn connection(shared: &Shared, client: TcpStream, id: u64) {
    let mut faults = shared.faults.subscribe();
    let epoch = faults.borrow().reset_epoch;
    if faults.borrow().blackhole {
        // Its handshake would not have reached the target: it never does; once the partition
        // heals the client learns that the connection is dead. What the client sends meanwhile
        // is lost with it; reading it only lets the proxy see a client that gives up first.
        bump(&shared.counters.held);
        let mut client = client;
        let mut sink = vec![0u8; 4096];
        let gave_up = async {
            loop {
                match client.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        tokio::select! {
            _ = gave_up => return,
            _ = faults.wait_for(|f| !f.blackhole || f.reset_epoch != epoch) => {}
        }
        abort(client);
        return;
    }
    let target = tokio::time::timeout(
        shared.limits.connect_timeout,
        TcpStream::connect(&shared.target),
    )
    .await;
    let mut upstream = match target {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            bump(&shared.counters.target_unreachable);
            shared.warn(&format!("target {} unreachable: {e}", shared.target));
            abort(client);
            return;
        }
        Err(_) => {
            bump(&shared.counters.target_unreachable);
            shared.warn(&format!("target {} did not answer in time", shared.target));
            abort(client);
            return;
        }
    };
    let mut client = client;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Bytes this connection forwarded each way.
    let (sent_up, sent_down) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let c = &shared.counters;
        let up = pump(
            cr,
            uw,
            shared.faults.subscribe(),
            SmallRng::seed_from_u64(shared.seed ^ (id << 1)),
            [&c.bytes_up, &sent_up],
            shared.limits.chunk_bytes,
        );
        let down = pump(
            ur,
            cw,
            shared.faults.subscribe(),
            SmallRng::seed_from_u64(shared.seed ^ (id << 1) ^ 1),
            [&c.bytes_down, &sent_down],
            shared.limits.chunk_bytes,
        );
        let stalls = count_live_stalls(shared, &sent_up, &sent_down);
        tokio::select! {
            both = async { tokio::try_join!(up, down) } => match both {
                Ok(_) => End::Closed,
                Err(_) => End::PeerError,
            },
            _ = faults.wait_for(|f| f.reset_epoch != epoch) => End::Reset,
            _ = stalls => End::Closed,
        }
    };
    match end {
        End::Closed => {}
        End::Reset => {
            bump(&shared.counters.resets);
            abort(client);
            abort(upstream);
        }
        End::PeerError => {
            // One side reset or broke the connection: the other side learns it the same way.
            bump(&shared.counters.peer_errors);
            abort(client);
            abort(upstream);
        }
    }
}

/// Counts each blackhole that starts while this connection is established (it forwarded bytes
/// both ways: for MQTT, the client has its CONNACK). Ends only when the proxy stops.
async fn count_live_stalls(shared: &Shared, up: &AtomicU64, down: &AtomicU64) {
    let mut faults = shared.faults.subscribe();
    loop {
        if faults.wait_for(|f| f.blackhole).await.is_err() {
            return std::future::pending().await;
        }
        if up.load(Ordering::Relaxed) > 0 && down.load(Ordering::Relaxed) > 0 {
            bump(&shared.counters.live_stalls);
        }
        if faults.wait_for(|f| !f.blackhole).await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Forwards one direction until end of stream, honouring blackholes and delays; counts the
/// bytes in every counter of `bytes`.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    mut faults: watch::Receiver<Faults>,
    mut rng: SmallRng,
    bytes: [&AtomicU64; 2],
    chunk: usize,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; chunk.max(1)];
    loop {
        // Stalled: neither read nor write, so the bytes wait in the kernel as in a partition.
        if faults.wait_for(|f| !f.blackhole).await.is_err() {
            return Ok(());
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => read?,
            // Reading is cancel-safe: a blackhole that starts while waiting loses nothing.
            _ = faults.wait_for(|f| f.blackhole) => continue,
        };
        if n == 0 {
            // Half-close: the peer may still send the other way.
            let _ = to.shutdown().await;
            return Ok(());
        }
        let delay = faults.borrow().delay;
        if let Some(d) = delay {
            let jitter_ms = d.jitter.as_millis() as u64;
            let extra = if jitter_ms == 0 {
                0
            } else {
                rng.gen_range(0..=jitter_ms)
            };
            tokio::time::sleep(d.base + Duration::from_millis(extra)).await;
        }
        // A blackhole that started while this chunk was delayed holds it back too.
        if faults.wait_for(|f| !f.blackhole).await.is_err() {
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        for b in bytes {
            b.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Read};
    use std::net::TcpStream as StdStream;
    use std::time::Instant;

    use crate::harness::eventually;

    /// An echo server on a free port; each connection on its own thread, ending with it.
    fn echo_server() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn connect(p: &FaultProxy) -> StdStream {
        let s = StdStream::connect(p.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn roundtrip(s: &mut StdStream, data: &[u8]) {
        s.write_all(data).unwrap();
        let mut got = vec![0u8; data.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn forwards_both_ways_in_order_even_with_delay() {
        let p = FaultProxy::start("t-fwd", &echo_server(), 1);
        let mut s = connect(&p);
        roundtrip(&mut s, b"hello");
        p.delay(Some(Delay {
            base: Duration::from_millis(2),
            jitter: Duration::from_millis(3),
        }));
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        roundtrip(&mut s, &data);
        let st = p.stats();
        assert_eq!((st.accepted, st.delays), (1, 1), "{st}");
        assert!(st.bytes_up >= data.len() as u64 + 5, "{st}");
    }

    #[test]
    fn reset_is_seen_by_the_client_as_a_reset() {
        let p = FaultProxy::start("t-reset", &echo_server(), 2);
        let mut s = connect(&p);
        roundtrip(&mut s, b"x");
        p.reset();
        let mut buf = [0u8; 8];
        let err = s
            .read(&mut buf)
            .expect_err("a reset connection cannot be read");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
        eventually("the reset counted", || {
            let st = p.stats();
            (st.resets == 1 && st.open == 0)
                .then_some(())
                .ok_or(st.to_string())
        });
        // New connections are forwarded again.
        roundtrip(&mut connect(&p), b"again");
    }

    #[test]
    fn blackhole_stops_data_keeps_the_socket_and_loses_nothing() {
        let p = FaultProxy::start("t-hole", &echo_server(), 3);
        let mut s = connect(&p);
        roundtrip(&mut s, b"before");
        p.blackhole(true);
        eventually("the blackhole in force", || {
            (p.stats().blackholes == 1).then_some(()).ok_or_default()
        });
        let up_before = p.stats().bytes_up;
        s.write_all(b"during").unwrap();
        // Nothing comes back while the blackhole holds, and the socket is not closed either (a
        // read would return 0 at end of stream): the read can only time out.
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 16];
        let err = s.read(&mut buf).expect_err("no data and no end of stream");
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );
        assert_eq!(p.stats().bytes_up, up_before, "nothing forwarded");
        eventually("the established connection counted as stalled", || {
            (p.stats().live_stalls == 1).then_some(()).ok_or_default()
        });
        // A connection opened during the blackhole is held, then reset when it lifts.
        let mut late = connect(&p);
        eventually("the late connection held", || {
            (p.stats().held == 1).then_some(()).ok_or_default()
        });
        // A held connection whose client gives up is closed (it does not take a slot forever).
        let gone = connect(&p);
        eventually("a second late connection held", || {
            (p.stats().held == 2).then_some(()).ok_or_default()
        });
        drop(gone);
        eventually("the abandoned connection closed", || {
            let st = p.stats();
            (st.open == 2).then_some(()).ok_or(st.to_string())
        });
        p.blackhole(false);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = [0u8; 6];
        s.read_exact(&mut got).unwrap();
        assert_eq!(
            &got, b"during",
            "the bytes sent during the blackhole arrive after it"
        );
        let err = late
            .read(&mut buf)
            .expect_err("the held connection is reset");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    }

    #[test]
    fn refusal_refuses_then_accepts_again() {
        let p = FaultProxy::start("t-refuse", &echo_server(), 4);
        let mut open = connect(&p);
        // Accepted by the proxy, not only queued in the kernel (closing the listener resets
        // what is still queued).
        roundtrip(&mut open, b"open");
        p.refuse(true);
        eventually("new connections refused", || {
            match StdStream::connect(p.addr()) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        roundtrip(&mut open, b"open connections survive a refusal");
        p.refuse(false);
        let mut s = eventually("connections accepted again", || {
            StdStream::connect(p.addr()).map_err(|e| e.to_string())
        });
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        roundtrip(&mut s, b"back");
        assert_eq!(p.stats().refusals, 1);
    }

    #[test]
    fn over_the_connection_limit_is_reset_and_counted() {
        let limits = ProxyLimits {
            max_connections: 1,
            ..ProxyLimits::default()
        };
        let p = FaultProxy::start_with("t-limit", &echo_server(), 5, limits);
        let mut first = connect(&p);
        roundtrip(&mut first, b"one");
        let mut second = connect(&p);
        let mut buf = [0u8; 4];
        let _ = second.write_all(b"two");
        let read = second.read(&mut buf);
        assert!(
            matches!(&read, Err(e) if e.kind() == ErrorKind::ConnectionReset)
                || matches!(read, Ok(0)),
            "the connection over the limit ends at once: {read:?}"
        );
        assert_eq!(p.stats().over_limit, 1);
    }

    #[test]
    fn schedules_replay_from_their_seed_and_stay_in_bounds() {
        let profile = Profile {
            gap_ms: (100, 900),
            delay_ms: (10, 200),
            delay_for_ms: (500, 2000),
            blackhole_ms: (1000, 5000),
            down_ms: (500, 2000),
            weights: [3, 2, 2, 2],
        };
        let span = Duration::from_secs(20);
        let a = Schedule::random(42, span, &profile);
        assert_eq!(a, Schedule::random(42, span, &profile));
        assert_ne!(a, Schedule::random(43, span, &profile));
        assert!(!a.steps.is_empty() && a.steps.len() <= MAX_STEPS);
        let mut end = Duration::ZERO;
        for s in &a.steps {
            assert!(s.at >= end, "steps never overlap: {a}");
            end = s.at + s.hold;
        }
        assert!(end <= span, "{a}");
    }

    #[test]
    fn dropping_the_proxy_closes_its_connections() {
        let p = FaultProxy::start("t-drop", &echo_server(), 6);
        let mut s = connect(&p);
        roundtrip(&mut s, b"x");
        let addr = p.addr();
        let started = Instant::now();
        drop(p);
        let mut buf = [0u8; 4];
        let n = s.read(&mut buf);
        assert!(
            matches!(n, Ok(0)) || n.is_err(),
            "the connection ends: {n:?} after {:?}",
            started.elapsed()
        );
        assert!(
            StdStream::connect(addr).is_err(),
            "nothing listens any more"
        );
    }

    trait OrDefault<T> {
        fn ok_or_default(self) -> Result<T, String>;
    }
    impl<T> OrDefault<T> for Option<T> {
        fn ok_or_default(self) -> Result<T, String> {
            self.ok_or_else(String::new)
        }
    }
}
