//! Hostile peers against the real server over real QUIC and mutual TLS on loopback.
//!
//! Attackers are raw quinn connections with good (enrolled) certificates that write
//! hand-made frames; the good clients are the real client driver. Memory bounds are measured
//! on the real `flotilla-server` binary run as a separate process (its resident set from
//! `/proc`), the rest on a server in this process. Each test asserts the bound the threat
//! model promises (see `docs/threat-model.md`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_client::driver::{ClientOptions, run as run_client};
use flotilla_client::{Evaluation, LocalUpdate, Trainer};
use flotilla_crypto::pki::{Identity, PkiDir, load_certs};
use flotilla_protocol::codec::Limits;
use flotilla_protocol::coordinator::Event;
use flotilla_protocol::messages::{
    AbortReason, Capabilities, Hello, Metrics, PROTOCOL_VERSION, TrainConfig, TrainRes,
};
use flotilla_protocol::quic::{close, recv_message, send_message};
use flotilla_protocol::strategy::FailureReason;
use flotilla_protocol::{Manifest, Message, Params, TensorSpec};
use flotilla_server::ServerConfig;
use tokio::sync::{mpsc, watch};

// ---------------------------------------------------------------------------------------
// Fixtures

fn manifest(n: usize) -> Manifest {
    Manifest::new(vec![TensorSpec::new("w", &[n])])
}

fn model(n: usize, v: f32) -> Params {
    Params::new(manifest(n), vec![v; n]).unwrap()
}

/// A fast, deterministic trainer: global + delta, after an optional pause.
#[derive(Clone, Debug)]
struct Delta {
    n: usize,
    pause: Duration,
}

impl Trainer for Delta {
    fn initial_params(&mut self) -> Result<Params, flotilla_client::Error> {
        Ok(model(self.n, 0.0))
    }
    fn train(
        &mut self,
        global: &Params,
        _c: &TrainConfig,
    ) -> Result<LocalUpdate, flotilla_client::Error> {
        std::thread::sleep(self.pause);
        let v: Vec<f32> = global.values().iter().map(|x| x + 0.5).collect();
        let mut metrics = Metrics::new();
        metrics.insert("loss".into(), 1.0);
        Ok(LocalUpdate {
            num_examples: 10,
            metrics,
            params: global.with_values(v)?,
        })
    }
    fn evaluate(&mut self, _g: &Params) -> Result<Evaluation, flotilla_client::Error> {
        Ok(Evaluation {
            num_examples: 10,
            loss: 1.0,
            accuracy: 0.5,
        })
    }
}

fn pki(dir: &Path, ids: &[&str]) -> PkiDir {
    let pki = PkiDir::new(dir.join("pki"));
    pki.init("hostile test CA").unwrap();
    pki.issue_server(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    for id in ids.iter().chain(&["probe"]) {
        pki.issue_client(id).unwrap();
    }
    pki
}

/// A server config on loopback with an operator-supplied initial model of `n` parameters.
fn config(pki: &PkiDir, dir: &Path, n: usize) -> ServerConfig {
    let mut c = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        checkpoint_dir: dir.join("checkpoints"),
        ..ServerConfig::default()
    };
    c.tls.ca = pki.ca_cert();
    c.tls.cert = pki.server_cert();
    c.tls.key = pki.server_key();
    c.tls.crl = Some(pki.crl());
    let init = dir.join("initial.safetensors");
    flotilla_server::checkpoint::export_safetensors(&model(n, 0.0), &init).unwrap();
    c.initial_model = Some(init);
    c.rounds.num_rounds = 3;
    c.rounds.min_available_clients = 2;
    c.rounds.min_train_results = 2;
    c.rounds.round_timeout_secs = 20.0;
    c.strategy.min_train_clients = 2;
    c.strategy.min_evaluate_clients = 1;
    c
}

fn options(pki: &PkiDir, id: &str, addr: SocketAddr) -> ClientOptions {
    let identity = Identity::load(&pki.client_cert(id), &pki.client_key(id)).unwrap();
    let ca = load_certs(&pki.ca_cert()).unwrap();
    let mut o = ClientOptions::new(addr, "localhost", identity, ca);
    o.backoff_initial = Duration::from_millis(100);
    o.backoff_max = Duration::from_millis(500);
    o.secure_aggregation = false;
    o
}

type ClientTask = tokio::task::JoinHandle<
    Result<(Delta, flotilla_client::driver::ClientStats), flotilla_client::Error>,
>;

fn good_client(
    pki: &PkiDir,
    id: &str,
    addr: SocketAddr,
    t: Delta,
) -> (ClientTask, watch::Sender<bool>) {
    let (stop, rx) = watch::channel(false);
    (
        tokio::spawn(run_client(options(pki, id, addr), t, rx)),
        stop,
    )
}

fn identity(pki: &PkiDir, id: &str) -> Identity {
    Identity::load(&pki.client_cert(id), &pki.client_key(id)).unwrap()
}

/// A raw QUIC connection with the given identity; `tiny_windows` makes it grant the server
/// almost no flow-control credit (a peer that stops reading).
async fn raw_connect(
    ep: &quinn::Endpoint,
    pki: &PkiDir,
    addr: SocketAddr,
    id: &Identity,
    tiny_windows: bool,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let ca = load_certs(&pki.ca_cert()).unwrap();
    let mut tls = flotilla_crypto::tls::client_config(id, &ca).unwrap();
    tls.alpn_protocols = vec![flotilla_crypto::tls::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = flotilla_protocol::quic::transport_config();
    if tiny_windows {
        t.stream_receive_window(1024u32.into());
        t.receive_window(2048u32.into());
    }
    cc.transport_config(Arc::new(t));
    ep.connect_with(cc, addr, "localhost").unwrap().await
}

/// One client endpoint for a test's raw connections. It outlives them, so that closing a
/// connection actually sends the close (a dropped endpoint may not).
fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

fn hello() -> Message {
    Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        capabilities: Capabilities::default(),
    })
}

/// Says hello; `true` once the welcome arrives.
async fn enroll(conn: &quinn::Connection) -> bool {
    if send_message(conn, &hello()).await.is_err() {
        return false;
    }
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(5), conn.accept_uni()).await
    else {
        return false;
    };
    matches!(
        recv_message(&mut s, &Limits::default(), None).await,
        Ok((Message::Welcome(_), _))
    )
}

/// Reads the server's next message; the reason if it is a session Abort (we were dropped).
async fn dropped_because(conn: &quinn::Connection) -> Option<AbortReason> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), conn.accept_uni())
        .await
        .ok()?
        .ok()?;
    match recv_message(&mut s, &Limits::default(), None).await.ok()?.0 {
        Message::Abort {
            round: None,
            reason,
        } => Some(reason),
        _ => None,
    }
}

/// The application close code the server closed `conn` with, waiting up to `within`.
async fn closed_with(conn: &quinn::Connection, within: Duration) -> Option<u64> {
    match tokio::time::timeout(within, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into()),
        Ok(other) => panic!("closed otherwise: {other}"),
        Err(_) => None,
    }
}

fn flood_metrics(n: usize) -> Metrics {
    (0..n)
        .map(|i| (format!("metric-name-{i:08}"), 1.0))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The real binary, as a separate process

struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    fn spawn(mut cfg: ServerConfig, dir: &Path) -> Self {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
        let path = dir.join("server.toml");
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla-server"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("HOSTILE_SERVER_LOG").unwrap_or_else(|_| "info,quinn=warn".into()),
            )
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Self {
            child,
            addr: cfg.listen,
            log: dir.join("server.log"),
        }
    }

    /// Resident memory, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }

    /// Waits for the process to exit on its own (all rounds done).
    async fn wait(mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                panic!("server process did not finish within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The server's side of a failure.
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- server log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Waits until a connection to `addr` completes (the process is listening). Uses its own
/// identity: early attempts may hold a connection slot until the Hello deadline.
async fn wait_listening(pki: &PkiDir, addr: SocketAddr) {
    let id = identity(pki, "probe");
    for _ in 0..100 {
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_millis(500),
            raw_connect(&endpoint(), pki, addr, &id, false),
        )
        .await
        {
            c.close(0u32.into(), b"probe");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server at {addr} never listened");
}

fn history_lines(dir: &Path) -> Vec<flotilla_protocol::coordinator::RoundRecord> {
    std::fs::read_to_string(dir.join("checkpoints").join("history.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn header_len(path: &PathBuf) -> u32 {
    let b = std::fs::read(path).unwrap();
    u32::from_le_bytes([b[8], b[9], b[10], b[11]])
}

const MB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------
// 1. Unbounded state from one enrolled client

/// An enrolled client sends, again and again, results with 10,000 distinct metric names and
/// aborts with a 1 MB reason. Each is refused at decode (LimitExceeded) and the sender is
/// dropped; the server's memory grows by less than 100 MB; the rounds complete with the good
/// clients; checkpoints keep `history_window` records whatever the number of rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_flood_is_refused_and_state_stays_bounded() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["good-0", "good-1", "evil"]);
    let mut cfg = config(&pki, tmp.path(), 10_000);
    cfg.rounds.num_rounds = 12;
    cfg.rounds.history_window = 3;
    cfg.rounds.round_timeout_secs = 5.0;
    let server = ServerProcess::spawn(cfg, tmp.path());
    let addr = server.addr;
    wait_listening(&pki, addr).await;
    // Rounds of about a second, so that the attack overlaps several of them.
    let trainer = Delta {
        n: 10_000,
        pause: Duration::from_secs(1),
    };
    let (g0, s0) = good_client(&pki, "good-0", addr, trainer.clone());
    let (g1, s1) = good_client(&pki, "good-1", addr, trainer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss();
    // Header sizes of the checkpoints as they appear (only the last three stay on disk).
    let ckpt = tmp.path().join("checkpoints");
    let headers = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let watcher = {
        let (ckpt, headers) = (ckpt.clone(), headers.clone());
        tokio::spawn(async move {
            loop {
                for round in 1..=12u64 {
                    let p = ckpt.join(format!("round-{round:06}.ckpt"));
                    let mut h = headers.lock().unwrap();
                    // (A file can be pruned between two looks: read it once, fallibly.)
                    if !h.contains_key(&round)
                        && let Ok(b) = std::fs::read(&p)
                        && b.len() >= 12
                    {
                        h.insert(round, u32::from_le_bytes([b[8], b[9], b[10], b[11]]));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // The attacker: enroll, flood, get dropped, reconnect.
    let evil = identity(&pki, "evil");
    let mut refused = 0;
    let attack_until = Instant::now() + Duration::from_secs(8);
    let mut i = 0u64;
    while Instant::now() < attack_until {
        let Ok(conn) = raw_connect(&ep, &pki, addr, &evil, false).await else {
            continue;
        };
        if !enroll(&conn).await {
            continue;
        }
        // Mostly floods of metric names; every fourth time a 512 KB abort reason (our own
        // encoder would cut it, so it is written by hand).
        let sent = if i % 4 == 3 {
            send_raw_abort(&conn, 512 * 1024).await
        } else {
            let msg = Message::TrainResult(TrainRes {
                round: 1,
                num_examples: 10,
                metrics: flood_metrics(10_000),
                params: model(10_000, 0.0),
            });
            send_message(&conn, &msg).await.is_ok()
        };
        i += 1;
        if sent && let Some(reason) = dropped_because(&conn).await {
            let text = reason.to_string();
            assert!(text.contains("over the limit"), "{text}");
            refused += 1;
        }
        conn.close(0u32.into(), b"again");
    }
    let after = server.rss();
    eprintln!(
        "metric flood: {refused} floods refused in 8 s; server resident {} MB before, {} MB after",
        before / MB,
        after / MB
    );
    assert!(
        refused >= 10,
        "only {refused} floods went through the test loop"
    );
    assert!(
        after < before + 100 * MB,
        "server resident memory grew from {} MB to {} MB under the metric flood",
        before / MB,
        after / MB
    );

    let status = server.wait(Duration::from_secs(240)).await;
    watcher.abort();
    assert!(status.success());
    let _ = (s0.send(true), s1.send(true));
    let _ = (g0.await, g1.await);
    let records = history_lines(tmp.path());
    assert_eq!(records.len(), 12, "one history line per round");
    assert!(records.iter().all(|r| r.aborted.is_none()), "{records:?}");
    for r in &records {
        assert!(
            r.train_metrics.len() <= 32,
            "round {} kept {} metrics",
            r.round,
            r.train_metrics.len()
        );
    }
    let (snapshot, _) = flotilla_server::checkpoint::read(&ckpt.join("round-000012.ckpt")).unwrap();
    assert_eq!(snapshot.history.len(), 3, "the checkpoint keeps the window");
    let late = header_len(&ckpt.join("round-000012.ckpt"));
    let early = *headers
        .lock()
        .unwrap()
        .get(&4)
        .expect("saw round 4's checkpoint");
    eprintln!("checkpoint header: {early} bytes after round 4, {late} bytes after round 12");
    assert!(
        late <= 2 * early && late < 64 * 1024,
        "checkpoint header grew from {early} bytes at round 4 to {late} at round 12"
    );
}

/// Writes an Abort frame with a reason of `len` bytes by hand (our encoder refuses it).
async fn send_raw_abort(conn: &quinn::Connection, len: usize) -> bool {
    // postcard: variant tag of Control::Abort (8), Option<u64> None (0), AbortReason::Other
    // (4), varint length, bytes.
    let mut body = vec![8u8, 0, 4];
    let mut n = len;
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            body.push(b);
            break;
        }
        body.push(b | 0x80);
    }
    body.extend(std::iter::repeat_n(b'x', len));
    let mut frame = vec![b'F', b'L', flotilla_protocol::codec::WIRE_VERSION, 0];
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    let Ok(mut s) = conn.open_uni().await else {
        return false;
    };
    s.write_all(&frame).await.is_ok() && s.finish().is_ok()
}

// ---------------------------------------------------------------------------------------
// 2. Allocation before the first model

/// Before any model exists, enrolled clients that were not asked for one declare 4 GiB
/// models, and unenrolled connections send payloads before their Hello. Nothing is
/// allocated: the server's memory grows by less than 100 MB, every such sender is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_payload_is_read_before_hello_or_before_the_model() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["evil-0", "evil-1"]);
    let mut cfg = config(&pki, tmp.path(), 10);
    cfg.initial_model = None; // no model: clients would be asked, once enough are enrolled
    cfg.rounds.min_available_clients = 5;
    cfg.rounds.min_train_results = 2;
    // This loop reconnects within a millisecond of closing, faster than the server notices
    // the close: the per-identity cap (its own defence) would refuse some attempts.
    cfg.limits.max_connections_per_identity = 8;
    let server = ServerProcess::spawn(cfg, tmp.path());
    let addr = server.addr;
    wait_listening(&pki, addr).await;
    let before = server.rss();
    let mut closed = 0;
    for i in 0..40 {
        let id = identity(&pki, if i % 2 == 0 { "evil-0" } else { "evil-1" });
        let conn = raw_connect(&ep, &pki, addr, &id, false).await.unwrap();
        let hello_first = i % 4 < 2;
        if hello_first {
            assert!(enroll(&conn).await);
        }
        // InitialParams declaring 2^30 f32 values (4 GiB), then a little of the payload.
        assert!(send_declared_model(&conn, 1 << 30).await);
        if hello_first {
            // Enrolled, not asked for a model: dropped with a typed reason.
            let reason = dropped_because(&conn).await.expect("dropped").to_string();
            assert!(reason.contains("payload"), "{reason}");
            closed += 1;
        } else {
            assert_eq!(
                closed_with(&conn, Duration::from_secs(5)).await,
                Some(u64::from(close::PROTOCOL_VIOLATION))
            );
            closed += 1;
        }
        conn.close(0u32.into(), b"again");
    }
    let after = server.rss();
    eprintln!(
        "pre-model payloads: 40 senders of 4 GiB models closed; server resident {} MB before, {} MB after",
        before / MB,
        after / MB
    );
    assert_eq!(closed, 40, "every sender was closed");
    // Their connection slots were all released: both identities can still enroll.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in ["evil-0", "evil-1"] {
        let conn = raw_connect(&ep, &pki, addr, &identity(&pki, id), false)
            .await
            .unwrap();
        assert!(enroll(&conn).await, "{id} can still connect");
    }
    assert!(
        after < before + 100 * MB,
        "server resident memory grew from {} MB to {} MB",
        before / MB,
        after / MB
    );
}

/// An InitialParams frame whose manifest declares `numel` values, followed by 64 KiB of them.
async fn send_declared_model(conn: &quinn::Connection, numel: u64) -> bool {
    let control = flotilla_protocol::codec::Control::InitialParams {
        manifest: manifest(numel as usize),
    };
    let body = postcard::to_stdvec(&control).unwrap();
    let mut frame = vec![b'F', b'L', flotilla_protocol::codec::WIRE_VERSION, 0];
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame.extend(std::iter::repeat_n(0u8, 64 * 1024));
    let mut s = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("open_uni: {e}");
            return false;
        }
    };
    let _ = s.write_all(&frame).await;
    true
}

// ---------------------------------------------------------------------------------------
// 3. Zombie connections

/// A client that enrolls and then grants no flow-control credit blocks the server's send
/// of its Train message: the send misses its deadline and the server closes the connection
/// (TOO_SLOW) within it; the round completes without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_closed_within_the_send_deadline() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["good-0", "good-1", "zombie"]);
    let mut cfg = config(&pki, tmp.path(), 200_000); // 800 KB model
    // One round: it needs all three enrolled, and the zombie will not be back.
    cfg.rounds.num_rounds = 1;
    cfg.rounds.min_available_clients = 3;
    cfg.limits.io_timeout_secs = 1.0;
    cfg.limits.min_transfer_rate = 1 << 20; // deadline: 1 s + 0.8 s
    let (etx, mut events) = mpsc::unbounded_channel();
    let server = flotilla_server::start(cfg, Some(etx)).unwrap();
    let addr = server.local_addr;
    let zombie = raw_connect(&ep, &pki, addr, &identity(&pki, "zombie"), true)
        .await
        .unwrap();
    assert!(enroll(&zombie).await);
    let t = Delta {
        n: 200_000,
        pause: Duration::ZERO,
    };
    let (g0, s0) = good_client(&pki, "good-0", addr, t.clone());
    let (g1, s1) = good_client(&pki, "good-1", addr, t);
    // The round starts when the third client enrolls; the zombie's Train send then blocks.
    let started = loop {
        match events.recv().await.unwrap() {
            Event::RoundStarted { .. } => break Instant::now(),
            _ => continue,
        }
    };
    let code = closed_with(&zombie, Duration::from_secs(10)).await;
    let waited = started.elapsed();
    assert_eq!(code, Some(u64::from(close::TOO_SLOW)), "closed as too slow");
    assert!(waited < Duration::from_secs(6), "closed after {waited:?}");
    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = (s0.send(true), s1.send(true));
    let _ = (g0.await, g1.await);
    assert_eq!(summary.history.len(), 1);
    assert!(summary.history[0].aborted.is_none());
    assert_eq!(summary.history[0].results, 2);
    assert!(
        summary.history[0]
            .failures
            .iter()
            .any(|f| f.client.as_str() == "zombie")
    );
}

/// A connection that went silent is replaced by a new one with its identity, and the
/// server closes the old one itself (REPLACED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_connection_is_replaced_and_closed() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["a"]);
    let mut cfg = config(&pki, tmp.path(), 10);
    cfg.limits.live_connection_secs = 0.5;
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let id = identity(&pki, "a");
    let old = raw_connect(&ep, &pki, addr, &id, false).await.unwrap();
    assert!(enroll(&old).await);
    tokio::time::sleep(Duration::from_millis(800)).await; // silent: stale
    let new = raw_connect(&ep, &pki, addr, &id, false).await.unwrap();
    assert!(enroll(&new).await, "the newcomer is welcomed");
    assert_eq!(
        closed_with(&old, Duration::from_secs(5)).await,
        Some(u64::from(close::REPLACED))
    );
    assert!(new.close_reason().is_none());
    server.shutdown();
    let _ = server.wait().await;
}

/// A connection that never says Hello is closed after the Hello deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_hello_is_closed() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["mute"]);
    let mut cfg = config(&pki, tmp.path(), 10);
    cfg.limits.hello_timeout_secs = 0.5;
    let server = flotilla_server::start(cfg, None).unwrap();
    let conn = raw_connect(&ep, &pki, server.local_addr, &identity(&pki, "mute"), false)
        .await
        .unwrap();
    assert_eq!(
        closed_with(&conn, Duration::from_secs(5)).await,
        Some(u64::from(close::NO_HELLO))
    );
    server.shutdown();
    let _ = server.wait().await;
}

// ---------------------------------------------------------------------------------------
// 5. Slow clients

/// A client that heartbeats but never finishes training misses its first two deadlines,
/// then sits out: later rounds sample only the others and end without waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_excluded_after_missing_its_deadlines() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["fast-0", "fast-1", "slow"]);
    let mut cfg = config(&pki, tmp.path(), 100);
    cfg.rounds.num_rounds = 6;
    cfg.rounds.min_available_clients = 3; // all three enrolled before round 1
    cfg.rounds.round_timeout_secs = 1.0;
    cfg.rounds.max_missed_deadlines = 2;
    cfg.rounds.evaluate_every = 0;
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let fast = Delta {
        n: 100,
        pause: Duration::ZERO,
    };
    // Slower than the deadline; not so slow that the test's runtime waits long for its
    // blocking thread at the end.
    let slow = Delta {
        n: 100,
        pause: Duration::from_secs(4),
    };
    let (a, sa) = good_client(&pki, "fast-0", addr, fast.clone());
    let (b, sb) = good_client(&pki, "fast-1", addr, fast);
    let (c, _sc) = good_client(&pki, "slow", addr, slow);
    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = (sa.send(true), sb.send(true));
    let _ = (a.await, b.await);
    c.abort();
    let h = &summary.history;
    assert_eq!(h.len(), 6);
    for r in &h[..2] {
        assert_eq!(r.selected, 3, "round {}", r.round);
        assert_eq!(r.failures.len(), 1, "round {}: {:?}", r.round, r.failures);
        assert_eq!(r.failures[0].reason, FailureReason::Timeout);
        assert_eq!(r.failures[0].client.as_str(), "slow");
    }
    for r in &h[2..] {
        assert_eq!(r.selected, 2, "round {}: the straggler sits out", r.round);
        assert!(r.failures.is_empty(), "round {}: {:?}", r.round, r.failures);
        assert!(r.aborted.is_none());
    }
}

/// With over-selection, training closes as soon as the strategy's number of results is in:
/// a slow client among four does not hold any round, and is not recorded as failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_selection_closes_a_round_without_the_slowest() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["c0", "c1", "c2", "slow"]);
    let mut cfg = config(&pki, tmp.path(), 100);
    cfg.rounds.num_rounds = 3;
    cfg.rounds.min_available_clients = 4;
    cfg.rounds.round_timeout_secs = 600.0; // a round that waited for the slow one would hang
    cfg.rounds.evaluate_every = 0;
    cfg.rounds.over_selection = 0.5;
    cfg.strategy.fraction_train = 0.5; // 2 of 4, plus 1 over-selected
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let fast = Delta {
        n: 100,
        pause: Duration::ZERO,
    };
    let mut tasks = Vec::new();
    for id in ["c0", "c1", "c2"] {
        tasks.push(good_client(&pki, id, addr, fast.clone()));
    }
    let slow = good_client(
        &pki,
        "slow",
        addr,
        Delta {
            n: 100,
            pause: Duration::from_secs(4),
        },
    );
    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .expect("no round waited for the slow client")
        .unwrap();
    for (t, s) in tasks {
        let _ = s.send(true);
        let _ = t.await;
    }
    slow.0.abort();
    for r in &summary.history {
        assert_eq!(r.selected, 3, "round {}", r.round);
        assert_eq!(r.results, 2, "round {}", r.round);
        assert!(r.failures.is_empty(), "round {}: {:?}", r.round, r.failures);
    }
}

// ---------------------------------------------------------------------------------------
// 6. Copied certificate

/// A second device with a copy of a client's certificate connects again and again during
/// the run: each attempt is refused (IDENTITY_IN_USE), the owner takes part in every round,
/// and a real client driver with the copy says "another device is using this identity".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_certificate_cannot_evict_its_owner() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["owner", "other"]);
    let mut cfg = config(&pki, tmp.path(), 100);
    cfg.rounds.num_rounds = 6;
    cfg.rounds.evaluate_every = 0;
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let t = Delta {
        n: 100,
        pause: Duration::from_secs(1),
    };
    let (o, so) = good_client(&pki, "owner", addr, t.clone());
    let (x, sx) = good_client(&pki, "other", addr, t.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let copy = identity(&pki, "owner");
    let mut refused = 0;
    for _ in 0..5 {
        let conn = raw_connect(&ep, &pki, addr, &copy, false).await.unwrap();
        let _ = send_message(&conn, &hello()).await;
        if closed_with(&conn, Duration::from_secs(5)).await
            == Some(u64::from(close::IDENTITY_IN_USE))
        {
            refused += 1;
        }
    }
    assert_eq!(refused, 5);
    // The real client with the copy reports it, rather than retrying silently.
    let mut opts = options(&pki, "owner", addr);
    opts.max_attempts = Some(1);
    let (_stop, rx) = watch::channel(false);
    let err = run_client(opts, t, rx).await.unwrap_err().to_string();
    assert!(
        err.contains("another device is using this identity"),
        "{err}"
    );

    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = (so.send(true), sx.send(true));
    let _ = (o.await, x.await);
    assert_eq!(summary.history.len(), 6);
    for r in &summary.history {
        assert_eq!(r.results, 2, "round {}: the owner took part", r.round);
        assert!(r.failures.is_empty(), "round {}: {:?}", r.round, r.failures);
    }
}

// ---------------------------------------------------------------------------------------
// 7. Revocation without a restart

/// `revoke` on a running server: the CRL file changes, the server re-reads it, closes the
/// revoked client's live connection (its driver stops with "revoked"), refuses its
/// reconnection at the handshake, and finishes the run with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_takes_effect_without_a_restart() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["a", "b", "c"]);
    let mut cfg = config(&pki, tmp.path(), 100);
    cfg.rounds.num_rounds = 30;
    cfg.rounds.evaluate_every = 0;
    cfg.limits.crl_reload_secs = 0.2;
    let (etx, mut events) = mpsc::unbounded_channel();
    let server = flotilla_server::start(cfg, Some(etx)).unwrap();
    let addr = server.local_addr;
    let t = Delta {
        n: 100,
        pause: Duration::from_millis(50),
    };
    let (a, sa) = good_client(&pki, "a", addr, t.clone());
    let (b, sb) = good_client(&pki, "b", addr, t.clone());
    let (c, _sc) = good_client(&pki, "c", addr, t);
    loop {
        if let Event::RoundCompleted(_) = events.recv().await.unwrap() {
            break;
        }
    }
    pki.revoke("c").unwrap();
    let revoked_at = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), c)
        .await
        .expect("the revoked client was closed")
        .unwrap();
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    let err = end.unwrap_err().to_string();
    assert!(err.contains("revoked"), "{err}");
    // Its reconnection is refused at the handshake (the new CRL is in force).
    let conn = raw_connect(&ep, &pki, addr, &identity(&pki, "c"), false).await;
    let refused = match conn {
        Err(_) => true,
        Ok(conn) => {
            let _ = send_message(&conn, &hello()).await;
            tokio::time::timeout(Duration::from_secs(5), conn.closed())
                .await
                .is_ok()
        }
    };
    assert!(refused, "the revoked certificate still connects");
    let summary = tokio::time::timeout(Duration::from_secs(120), server.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = (sa.send(true), sb.send(true));
    let _ = (a.await, b.await);
    assert_eq!(summary.history.len(), 30);
    assert!(summary.history.iter().all(|r| r.aborted.is_none()));
}

// ---------------------------------------------------------------------------------------
// 4. Handshake flood without a certificate

/// The first datagram a real quinn client sends: a QUIC Initial with a TLS ClientHello.
async fn capture_initial(pki: &PkiDir) -> Vec<u8> {
    let trap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = trap.local_addr().unwrap();
    let ep = endpoint();
    let id = identity(pki, "probe");
    let pki2 = pki.clone();
    let attempt = tokio::spawn(async move {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            raw_connect(&ep, &pki2, to, &id, false),
        )
        .await;
    });
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), trap.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    attempt.abort();
    buf.truncate(n);
    buf
}

/// 6,000 Initial packets from 200 source ports that never complete a handshake: the server
/// keeps at most a bounded number of half-open connections (address validation with Retry
/// above `retry_above_handshakes`, a cap, a short handshake timeout), so its memory grows by
/// less than 100 MB, it sends back less than it receives (no amplification), and the good
/// clients complete their rounds meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_is_bounded_and_good_clients_keep_training() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["good-0", "good-1"]);
    let mut cfg = config(&pki, tmp.path(), 1000);
    cfg.rounds.num_rounds = 6;
    cfg.rounds.evaluate_every = 0;
    let server = ServerProcess::spawn(cfg, tmp.path());
    let addr = server.addr;
    wait_listening(&pki, addr).await;
    let initial = capture_initial(&pki).await;
    assert!(initial.len() >= 1200, "an Initial is padded to 1200 bytes");
    assert_eq!(initial[0] & 0xf0, 0xc0, "a long-header Initial packet");
    let t = Delta {
        n: 1000,
        pause: Duration::from_millis(500),
    };
    let (g0, s0) = good_client(&pki, "good-0", addr, t.clone());
    let (g1, s1) = good_client(&pki, "good-1", addr, t);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss();

    let mut sockets = Vec::new();
    for _ in 0..200 {
        sockets.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    let mut sent = 0u64;
    for _burst in 0..30 {
        for s in &sockets {
            if s.send_to(&initial, addr).await.is_ok() {
                sent += initial.len() as u64;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What came back (drain every socket for a moment).
    let mut back = 0u64;
    let drain_until = Instant::now() + Duration::from_secs(1);
    let mut buf = vec![0u8; 2048];
    while Instant::now() < drain_until {
        let mut got = false;
        for s in &sockets {
            while let Ok((n, _)) = s.try_recv_from(&mut buf) {
                back += n as u64;
                got = true;
            }
        }
        if !got {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let after = server.rss();
    eprintln!(
        "handshake flood: sent {} KB of Initials from 200 ports, got {} KB back ({:.2}x); \
         server resident {} MB before, {} MB after",
        sent / 1024,
        back / 1024,
        back as f64 / sent as f64,
        before / MB,
        after / MB
    );
    assert!(
        after < before + 100 * MB,
        "server resident memory grew from {} MB to {} MB",
        before / MB,
        after / MB
    );
    assert!(
        back < sent,
        "amplification: {back} bytes back for {sent} sent"
    );

    let status = server.wait(Duration::from_secs(120)).await;
    assert!(status.success());
    let _ = (s0.send(true), s1.send(true));
    let _ = (g0.await, g1.await);
    let records = history_lines(tmp.path());
    assert_eq!(records.len(), 6);
    assert!(
        records
            .iter()
            .all(|r| r.aborted.is_none() && r.results == 2)
    );
}
