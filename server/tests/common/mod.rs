//! Fixtures shared by the server's integration tests: a PKI, server configs, the real
//! client driver with a trivial trainer, raw QUIC connections that write hand-made frames,
//! and the `flotilla-server` binary run as a separate process.

#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

pub use std::net::SocketAddr;
pub use std::path::{Path, PathBuf};
pub use std::process::{Child, Command, Stdio};
pub use std::sync::Arc;
pub use std::time::{Duration, Instant};

pub use flotilla_client::driver::{ClientOptions, run as run_client};
pub use flotilla_client::{Evaluation, LocalUpdate, Trainer};
pub use flotilla_crypto::pki::{Identity, PkiDir, load_certs};
pub use flotilla_protocol::coordinator::Event;
pub use flotilla_protocol::quic::{close, recv_message, send_message};
pub use flotilla_protocol::strategy::FailureReason;
pub use flotilla_protocol::wire::codec::Limits;
pub use flotilla_protocol::wire::messages::{
    AbortReason, Capabilities, Hello, Metrics, PROTOCOL_VERSION, TrainConfig, TrainRes,
};
pub use flotilla_protocol::{Manifest, Message, Params, TensorSpec};
pub use flotilla_server::ServerConfig;
pub use tokio::sync::{mpsc, watch};

// ---------------------------------------------------------------------------------------
// Fixtures

pub fn manifest(n: usize) -> Manifest {
    Manifest::new(vec![TensorSpec::new("w", &[n])])
}

pub fn model(n: usize, v: f32) -> Params {
    Params::new(manifest(n), vec![v; n]).unwrap()
}

/// A fast, deterministic trainer: global + delta, after an optional pause.
#[derive(Clone, Debug)]
pub struct Delta {
    pub n: usize,
    pub pause: Duration,
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

pub fn pki(dir: &Path, ids: &[&str]) -> PkiDir {
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
pub fn config(pki: &PkiDir, dir: &Path, n: usize) -> ServerConfig {
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

pub fn options(pki: &PkiDir, id: &str, addr: SocketAddr) -> ClientOptions {
    let identity = Identity::load(&pki.client_cert(id), &pki.client_key(id)).unwrap();
    let ca = load_certs(&pki.ca_cert()).unwrap();
    let mut o = ClientOptions::new(addr, "localhost", identity, ca);
    o.backoff_initial = Duration::from_millis(100);
    o.backoff_max = Duration::from_millis(500);
    o.secure_aggregation = false;
    o
}

pub type ClientTask = tokio::task::JoinHandle<
    Result<(Delta, flotilla_client::driver::ClientStats), flotilla_client::Error>,
>;

pub fn good_client(
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

pub fn identity(pki: &PkiDir, id: &str) -> Identity {
    Identity::load(&pki.client_cert(id), &pki.client_key(id)).unwrap()
}

/// A raw QUIC connection with the given identity; `tiny_windows` makes it grant the server
/// almost no flow-control credit (a peer that stops reading).
pub async fn raw_connect(
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
pub fn endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

pub fn hello() -> Message {
    Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        capabilities: Capabilities::default(),
    })
}

/// Says hello; `true` once the welcome arrives.
pub async fn enroll(conn: &quinn::Connection) -> bool {
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
pub async fn dropped_because(conn: &quinn::Connection) -> Option<AbortReason> {
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
pub async fn closed_with(conn: &quinn::Connection, within: Duration) -> Option<u64> {
    match tokio::time::timeout(within, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into()),
        Ok(other) => panic!("closed otherwise: {other}"),
        Err(_) => None,
    }
}

pub fn flood_metrics(n: usize) -> Metrics {
    (0..n)
        .map(|i| (format!("metric-name-{i:08}"), 1.0))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The real binary, as a separate process

pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl ServerProcess {
    pub fn spawn(mut cfg: ServerConfig, dir: &Path) -> Self {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
        Self::spawn_at(cfg, dir)
    }

    /// The binary listening on `cfg.listen` as it is.
    pub fn spawn_at(cfg: ServerConfig, dir: &Path) -> Self {
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
    pub fn rss(&self) -> u64 {
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
    pub async fn wait(mut self, within: Duration) -> std::process::ExitStatus {
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
pub async fn wait_listening(pki: &PkiDir, addr: SocketAddr) {
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

pub fn history_lines(dir: &Path) -> Vec<flotilla_protocol::coordinator::RoundRecord> {
    std::fs::read_to_string(dir.join("checkpoints").join("history.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn header_len(path: &PathBuf) -> u32 {
    let b = std::fs::read(path).unwrap();
    u32::from_le_bytes([b[8], b[9], b[10], b[11]])
}

pub const MB: u64 = 1 << 20;
