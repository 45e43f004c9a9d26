//! Client load on a real server while it is patched and unpatched: client threads send
//! requests in a loop, each reply is classified as the original or the patched
//! behaviour, and the log is checked phase by phase (before, patched, after).

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What one request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The behaviour of the unpatched program.
    Original,
    /// The behaviour the fix gives.
    Patched,
}

/// One request: when it was sent, when its reply arrived, and the reply (Err: what
/// went wrong).
pub type Sample = (Instant, Instant, Result<Reply, String>);

/// A client connection: the stream to write and a buffered reader of the same socket.
pub struct Conn {
    /// Writing side.
    pub w: TcpStream,
    /// Reading side, buffered.
    pub r: BufReader<TcpStream>,
    /// Set by a request function when the server closes the connection after its reply
    /// (e.g. `Connection: close`): the next request opens a new one.
    pub closing: bool,
}

impl Conn {
    /// Connects to 127.0.0.1:`port` with 5 s timeouts.
    pub fn open(port: u16) -> Result<Conn, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        Ok(Conn {
            w: s,
            r,
            closing: false,
        })
    }
}

/// One request on a connection, classified.
pub type Ask = fn(&mut Conn) -> Result<Reply, String>;

/// Client threads sending requests until stopped: one keeps its connection, one opens
/// a new connection per request.
pub struct Load {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Sample>>>,
    sent: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// Starts the clients on 127.0.0.1:`port`.
    pub fn start(port: u16, ask: Ask) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let threads = [false, true]
            .into_iter()
            .map(|reconnect| {
                let (stop, log, sent) = (stop.clone(), log.clone(), sent.clone());
                thread::spawn(move || client(port, reconnect, ask, stop, log, sent))
            })
            .collect();
        Load {
            stop,
            log,
            sent,
            threads,
        }
    }

    /// Waits until `n` more requests were sent (at most a minute: each phase needs 100
    /// requests, which the slowest machine manages in that time).
    pub fn wait_sent(&self, n: u64) {
        let from = self.sent.load(Ordering::Relaxed);
        let t = Instant::now();
        while self.sent.load(Ordering::Relaxed) < from + n && t.elapsed() < Duration::from_secs(60)
        {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the clients and returns every request's sample.
    pub fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// Sends requests until `stop` (or 3 minutes, or 200k requests).
fn client(
    port: u16,
    reconnect: bool,
    ask: Ask,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Sample>>>,
    sent: Arc<AtomicU64>,
) {
    let start = Instant::now();
    let mut conn: Option<Conn> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(180) && n < 200_000
    {
        n += 1;
        let at = Instant::now();
        let result = (|| {
            if conn.is_none() {
                conn = Some(Conn::open(port)?);
            }
            ask(conn.as_mut().unwrap())
        })();
        if result.is_err() || reconnect || conn.as_ref().is_some_and(|c| c.closing) {
            conn = None;
        }
        sent.fetch_add(1, Ordering::Relaxed);
        log.lock().unwrap().push((at, Instant::now(), result));
        thread::sleep(Duration::from_micros(500));
    }
}

/// When each phase of a patch cycle began and ended.
pub struct Phases {
    /// The server answered its first request.
    pub up: Instant,
    /// `patch` started.
    pub patch: Instant,
    /// `patch` returned.
    pub patched: Instant,
    /// `unpatch` started.
    pub unpatch: Instant,
    /// `unpatch` returned.
    pub unpatched: Instant,
    /// The clients were stopped.
    pub end: Instant,
}

/// Checks that no request failed and that every request of a phase (sent after it
/// began and answered before it ended; requests in flight while patch or unpatch ran
/// may get either) got that phase's reply, at least 100 per phase.
pub fn assert_phases(what: &str, log: &[Sample], ph: &Phases) {
    let failed: Vec<_> = log.iter().filter(|(_, _, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed, first: {:?}",
        failed.len(),
        log.len(),
        failed.first()
    );
    let count = |from: Instant, to: Instant, want: Reply| {
        let in_window: Vec<_> = log
            .iter()
            .filter(|(sent, got, _)| *sent >= from && *got < to)
            .collect();
        let good = in_window.iter().filter(|(_, _, r)| *r == Ok(want)).count();
        (good, in_window.len())
    };
    for (name, from, to, want) in [
        ("before the patch", ph.up, ph.patch, Reply::Original),
        ("while patched", ph.patched, ph.unpatch, Reply::Patched),
        ("after unpatch", ph.unpatched, ph.end, Reply::Original),
    ] {
        let (good, n) = count(from, to, want);
        assert!(
            n >= 100 && good == n,
            "{what} {name}: {good} of {n} replies were {want:?}"
        );
    }
}
