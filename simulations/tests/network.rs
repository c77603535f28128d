//! The platform over real QUIC on loopback with real certificates: end to end with Burn,
//! refused certificates, crash and resume, malformed and wrong-length updates, and clients
//! that vanish mid-round.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::data::{Split, bundled};
use flotilla_client::partition::iid;
use flotilla_client::{BurnTrainer, Evaluation, LocalData, LocalUpdate, Mlp2nn, Trainer};
use flotilla_crypto::pki::{CertificateAuthority, Identity, PkiDir, load_certs};
use flotilla_protocol::coordinator::{DropKind, DropReason, Event};
use flotilla_protocol::quic::{recv_message, send_message};
use flotilla_protocol::strategy::FailureReason;
use flotilla_protocol::wire::codec::{self, Limits};
use flotilla_protocol::wire::messages::{
    Capabilities, Hello, Metrics, PROTOCOL_VERSION, TrainConfig, TrainRes,
};
use flotilla_protocol::{Error, Manifest, Message, Params, TensorSpec};
use flotilla_server::checkpoint::SnapshotStore;
use flotilla_server::{RunSummary, ServerConfig};
use flotilla_sim::federation::{client_options, make_pki, server_config};
use tokio::sync::{mpsc, watch};

/// Logs to the test's output when `FLOTILLA_TEST_LOG` is set (e.g. `debug`): shown for failed
/// tests only, as the harness captures it.
fn logs() {
    if let Ok(filter) = std::env::var("FLOTILLA_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A fast, deterministic trainer: model + delta (optionally taking some time).
#[derive(Debug, Clone)]
struct Delta(f32, Duration);

fn delta(d: f32) -> Delta {
    Delta(d, Duration::ZERO)
}

fn small_params(v: f32) -> Params {
    Params::new(
        Manifest::new(vec![
            TensorSpec::new("w", &[1000]),
            TensorSpec::new("b", &[10]),
        ]),
        vec![v; 1010],
    )
    .unwrap()
}

impl Trainer for Delta {
    fn initial_params(&mut self) -> Result<Params, flotilla_client::Error> {
        Ok(small_params(0.0))
    }
    fn train(
        &mut self,
        global: &Params,
        _c: &TrainConfig,
    ) -> Result<LocalUpdate, flotilla_client::Error> {
        std::thread::sleep(self.1);
        let v: Vec<f32> = global.values().iter().map(|x| x + self.0).collect();
        Ok(LocalUpdate {
            num_examples: 10,
            metrics: Metrics::new(),
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

fn base_config(pki: &PkiDir, dir: &Path, rounds: u64, min: usize) -> ServerConfig {
    let mut c = server_config(pki, &dir.join("checkpoints"));
    c.rounds.num_rounds = rounds;
    c.rounds.min_available_clients = min;
    c.rounds.min_train_results = min;
    c.rounds.round_timeout_secs = 60.0;
    c.strategy.min_train_clients = min;
    c.strategy.min_evaluate_clients = 1;
    c
}

fn spawn_client<T: Trainer + 'static>(
    pki: &PkiDir,
    id: &str,
    addr: SocketAddr,
    trainer: T,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<
    Result<(T, flotilla_client::driver::ClientStats), flotilla_client::Error>,
> {
    let o = client_options(pki, id, addr).unwrap();
    tokio::spawn(flotilla_client::driver::run(o, trainer, stop))
}

/// A client's task, which must end soon after its server's run has: a client that missed the
/// end of the run would retry for ever, and the test would hang instead of failing.
async fn finished<T>(client: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), client)
        .await
        .expect("a client did not finish after its server")
        .unwrap()
}

async fn wait(server: flotilla_server::RunningServer) -> RunSummary {
    tokio::time::timeout(Duration::from_secs(300), server.wait())
        .await
        .expect("server did not finish in time")
        .unwrap()
}

/// A raw QUIC connection with an arbitrary client TLS config (or none).
async fn raw_connect(
    addr: SocketAddr,
    ca: &[rustls_pki_types::CertificateDer<'static>],
    identity: Option<&Identity>,
) -> quinn::Connection {
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots.add(c.clone()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(flotilla_crypto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some(id) => b
            .with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![flotilla_crypto::tls::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep.connect(addr, "localhost").unwrap().await.unwrap()
}

fn hello() -> Message {
    Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        capabilities: Capabilities::default(),
    })
}

/// Says hello and waits for the welcome; `None` if the server does not welcome us.
async fn enroll(conn: &quinn::Connection) -> Option<()> {
    send_message(conn, &hello()).await.ok()?;
    let mut s = tokio::time::timeout(Duration::from_secs(5), conn.accept_uni())
        .await
        .ok()?
        .ok()?;
    match recv_message(&mut s, &Limits::default(), None).await.ok()?.0 {
        Message::Welcome(_) => Some(()),
        _ => None,
    }
}

async fn next_message(conn: &quinn::Connection) -> Message {
    let mut s = conn.accept_uni().await.unwrap();
    recv_message(&mut s, &Limits::default(), None)
        .await
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_two_rounds_with_burn() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, ids) = make_pki(&dir.path().join("pki"), 3).unwrap();
    let mut config = base_config(&pki, dir.path(), 2, 3);
    config.train.learning_rate = 0.1;
    let server = flotilla_server::start(config, None).unwrap();
    let addr = server.local_addr;
    let train = bundled::mnist(Split::Train).unwrap().head(3000);
    let test = bundled::mnist(Split::Test).unwrap().head(600);
    let tr = iid(train.len(), 3, 1).unwrap();
    let te = iid(test.len(), 3, 2).unwrap();
    let (_stop, stop_rx) = watch::channel(false);
    let device = burn::tensor::Device::flex();
    let mut handles = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let t = BurnTrainer::new(
            Mlp2nn::new(784, 10, &device),
            LocalData::subset(train.clone(), tr[i].clone()).unwrap(),
            Some(LocalData::subset(test.clone(), te[i].clone()).unwrap()),
        )
        .unwrap();
        handles.push(spawn_client(&pki, id, addr, t, stop_rx.clone()));
    }
    let summary = wait(server).await;
    assert_eq!(summary.history.len(), 2);
    for r in &summary.history {
        assert!(r.aborted.is_none(), "{r:?}");
        assert_eq!(r.results, 3);
    }
    let acc = summary.history[1].evaluation.as_ref().unwrap().metrics["accuracy"];
    // Far above chance (0.1): the clients really trained (exact figures vary with Burn's
    // weight initialization).
    assert!(
        acc > 0.6,
        "accuracy after 2 rounds on 3,000 examples: {acc}"
    );
    for h in handles {
        let (_, stats) = finished(h).await.unwrap();
        assert_eq!(stats.rounds_trained, 2);
        assert_eq!(stats.connections, 1);
    }
    // Checkpoints were written and verify.
    let (_, snap, _) = flotilla_server::checkpoint::latest_valid(&dir.path().join("checkpoints"))
        .unwrap()
        .unwrap();
    assert_eq!(snap.round, 2);
    assert_eq!(Some(&snap.global), summary.global.as_ref());
}

/// The server keeps its snapshots and records behind the `SnapshotStore` seam: with a
/// memory store no checkpoint file is written, the store holds each round's record and the
/// last round's model, and a second server given the same store resumes after that round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_store_keeps_the_run_and_a_new_server_resumes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, ids) = make_pki(&dir.path().join("pki"), 3).unwrap();
    let mut config = base_config(&pki, dir.path(), 2, 3);
    config.initial_model = None;
    let store = Arc::new(flotilla_server::checkpoint::MemoryStore::default());
    let run = |config: ServerConfig| {
        let server = flotilla_server::start_with_store(config, store.clone(), None).unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let clients: Vec<_> = ids
            .iter()
            .map(|id| spawn_client(&pki, id, server.local_addr, delta(1.0), stop_rx.clone()))
            .collect();
        (server, clients, stop)
    };
    let (server, clients, _stop) = run(config.clone());
    let first = wait(server).await;
    for c in clients {
        finished(c).await.unwrap();
    }
    assert_eq!(first.history.len(), 2);
    let (snap, strategy) = store.latest().unwrap().unwrap();
    assert_eq!((snap.round, strategy.as_str()), (2, "fedavg"));
    assert_eq!(Some(&snap.global), first.global.as_ref());
    assert_eq!(store.records().len(), 2);
    assert!(
        !dir.path().join("checkpoints").exists(),
        "a memory store writes no files"
    );
    // A new server on the same store: one more round, after round 2.
    config.rounds.num_rounds = 3;
    let (server, clients, _stop) = run(config);
    let second = wait(server).await;
    for c in clients {
        finished(c).await.unwrap();
    }
    let last = second.history.last().unwrap();
    assert_eq!((last.round, last.results), (3, 3), "{last:?}");
    assert_eq!(store.latest().unwrap().unwrap().0.round, 3);
    assert_eq!(store.records().len(), 3);
}

/// The field report: a client configured with the wrong model (the CNN among 2NN clients)
/// with the alphabetically first id, and no initial model on the server. Its parameters must
/// not become the model: it is refused at enrollment with the reason (the client stops with
/// an error naming both models), and the 2NN clients complete every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_wrong_model_is_refused_and_the_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, ids) = make_pki(&dir.path().join("pki"), 3).unwrap();
    let mut config = base_config(&pki, dir.path(), 2, 2);
    assert!(config.initial_model.is_none());
    config.train.learning_rate = 0.1;
    let server = flotilla_server::start(config, None).unwrap();
    let addr = server.local_addr;
    let train = bundled::mnist(Split::Train).unwrap().head(600);
    let tr = iid(train.len(), 3, 1).unwrap();
    let (_stop, stop_rx) = watch::channel(false);
    let device = burn::tensor::Device::flex();
    let data = |i: usize| LocalData::subset(train.clone(), tr[i].clone()).unwrap();
    // The wrong one connects first.
    let wrong = spawn_client(
        &pki,
        &ids[0],
        addr,
        BurnTrainer::new(flotilla_client::Cnn::new(28, 10, &device), data(0), None).unwrap(),
        stop_rx.clone(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut good = Vec::new();
    for (i, id) in ids.iter().enumerate().skip(1) {
        let t = BurnTrainer::new(Mlp2nn::new(784, 10, &device), data(i), None).unwrap();
        good.push(spawn_client(&pki, id, addr, t, stop_rx.clone()));
    }
    let summary = wait(server).await;
    assert_eq!(summary.history.len(), 2);
    for r in &summary.history {
        assert!(r.aborted.is_none(), "{r:?}");
        assert_eq!(r.results, 2);
        assert!(r.failures.is_empty(), "{r:?}");
    }
    // The model is the 2NN's.
    let global = summary.global.unwrap();
    assert_eq!(global.len(), 199_210);
    let err = tokio::time::timeout(Duration::from_secs(30), wrong)
        .await
        .unwrap()
        .unwrap()
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("refused our model"), "{err}");
    assert!(err.contains("199210 parameters"), "{err}");
    assert!(err.contains("1663370 parameters"), "{err}");
    for h in good {
        let (_, stats) = finished(h).await.unwrap();
        assert_eq!(stats.rounds_trained, 2);
    }
    // No checkpoint ever held the CNN.
    for e in std::fs::read_dir(dir.path().join("checkpoints")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "ckpt") {
            let (snap, _) = flotilla_server::checkpoint::read(&p).unwrap();
            assert_eq!(snap.global.len(), 199_210, "{}", p.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_are_refused_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, ids) = make_pki(&dir.path().join("pki"), 4).unwrap();
    // Revoke one before the server starts (the server loads the CRL at start).
    pki.issue_client("revoked").unwrap();
    pki.revoke("revoked").unwrap();
    let config = base_config(&pki, dir.path(), 2, 4);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let server = flotilla_server::start(config, Some(ev_tx)).unwrap();
    let addr = server.local_addr;
    let ca = load_certs(&pki.ca_cert()).unwrap();

    // Three good clients enroll; the federation waits for a fourth, so the server is busy
    // serving them (heartbeats) while the bad ones knock.
    let (_stop, stop_rx) = watch::channel(false);
    let mut good: Vec<_> = ids[..3]
        .iter()
        .map(|id| spawn_client(&pki, id, addr, delta(1.0), stop_rx.clone()))
        .collect();
    let mut enrolled = 0;
    while enrolled < 3 {
        if let Some(Event::ClientEnrolled(_)) = ev_rx.recv().await {
            enrolled += 1;
        }
    }

    // No certificate at all.
    let conn = raw_connect(addr, &ca, None).await;
    assert!(
        enroll(&conn).await.is_none(),
        "a client without a certificate was welcomed"
    );

    // A certificate from another CA (same client id as a good one).
    let other = CertificateAuthority::generate("Other CA", 10).unwrap();
    let foreign = Identity::from_issued(&other.issue_client(&ids[0], 10).unwrap()).unwrap();
    let conn = raw_connect(addr, &ca, Some(&foreign)).await;
    assert!(
        enroll(&conn).await.is_none(),
        "a foreign certificate was welcomed"
    );

    // Revoked: through the real client driver, which must report it and not retry forever.
    let mut o = client_options(&pki, "revoked", addr).unwrap();
    o.max_attempts = Some(3);
    let (_s2, rx2) = watch::channel(false);
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        flotilla_client::driver::run(o, delta(0.0), rx2),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        err.to_string().contains("certificate") || err.to_string().contains("TLS"),
        "{err}"
    );

    // Expired.
    let t = time::OffsetDateTime::now_utc();
    let expired = pki
        .ca()
        .unwrap()
        .issue_client_between(
            "old",
            t - time::Duration::days(9),
            t - time::Duration::days(1),
        )
        .unwrap();
    let conn = raw_connect(addr, &ca, Some(&Identity::from_issued(&expired).unwrap())).await;
    assert!(
        enroll(&conn).await.is_none(),
        "an expired certificate was welcomed"
    );

    // None of them was enrolled, and the good ones are still there: the fourth completes the
    // federation, which runs normally.
    while let Ok(ev) = ev_rx.try_recv() {
        assert!(
            !matches!(ev, Event::ClientEnrolled(_)),
            "a bad client was enrolled: {ev:?}"
        );
    }
    good.push(spawn_client(
        &pki,
        &ids[3],
        addr,
        delta(1.0),
        stop_rx.clone(),
    ));
    let summary = wait(server).await;
    assert_eq!(summary.history.len(), 2);
    assert!(
        summary
            .history
            .iter()
            .all(|r| r.aborted.is_none() && r.results == 4)
    );
    for h in good {
        finished(h).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, ids) = make_pki(&dir.path().join("pki"), 3).unwrap();
    let config = base_config(&pki, dir.path(), 4, 3);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let server = flotilla_server::start(config.clone(), Some(ev_tx)).unwrap();
    let addr = server.local_addr;
    let (_stop, stop_rx) = watch::channel(false);
    let clients: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            spawn_client(
                &pki,
                id,
                addr,
                Delta(i as f32 + 1.0, Duration::from_millis(500)),
                stop_rx.clone(),
            )
        })
        .collect();
    // Kill the server right after round 2 is checkpointed.
    loop {
        match tokio::time::timeout(Duration::from_secs(60), ev_rx.recv())
            .await
            .unwrap()
        {
            Some(Event::RoundCompleted(r)) if r.round == 2 => break,
            Some(_) => {}
            None => panic!("server ended early"),
        }
    }
    let (_, before, _) = flotilla_server::checkpoint::latest_valid(&config.checkpoint_dir)
        .unwrap()
        .unwrap();
    assert_eq!(before.round, 2);
    server.kill().await;

    // Restart on the same address; the clients reconnect by themselves.
    let mut config2 = config.clone();
    config2.listen = addr;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut restarted = None;
    for _ in 0..50 {
        match flotilla_server::start(config2.clone(), Some(ev_tx.clone())) {
            Ok(s) => {
                restarted = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await, // port still held
        }
    }
    let restarted = restarted.expect("could not rebind the server's port");
    let summary = wait(restarted).await;
    // It continued at round 3, from bit-identical parameters.
    let mut first_started = None;
    while let Ok(ev) = ev_rx.try_recv() {
        if let Event::RoundStarted { round, .. } = ev {
            first_started.get_or_insert(round);
        }
    }
    assert_eq!(first_started, Some(3));
    assert_eq!(summary.history.len(), 4);
    assert_eq!(&summary.history[..2], &before.history[..]);
    // Each round adds the weighted mean delta (1+2+3)/3 = 2 exactly; after 4 rounds: 8.
    let g = summary.global.unwrap();
    assert!(
        g.values().iter().all(|&v| v == 8.0),
        "{:?}",
        &g.values()[..4]
    );
    // And the restart began from exactly the checkpointed model (round 2: 4.0 everywhere).
    assert!(
        before
            .global
            .values()
            .iter()
            .all(|&v| v.to_bits() == 4.0f32.to_bits())
    );
    for c in clients {
        let (_, stats) = finished(c).await.unwrap();
        assert!(stats.connections >= 2, "the client should have reconnected");
    }
}

/// How the evil client misbehaves once it has its training instructions.
#[derive(Clone, Copy, Debug)]
enum Evil {
    /// A frame claiming a 2 GiB control body.
    Garbage,
    /// A training result whose payload stops 400 bytes short.
    Truncated,
    /// A training result for another model.
    WrongShape,
    /// Never answers; the connection stays up.
    Silent,
    /// Closes its connection.
    Disconnect,
}

async fn misbehave(conn: &quinn::Connection, m: Message, how: Evil) {
    let Message::Train(t) = m else { unreachable!() };
    match how {
        Evil::Garbage => {
            let mut s = conn.open_uni().await.unwrap();
            let mut frame = b"FL\x00\x00\xff\xff\xff\x7fgarbage".to_vec();
            frame[2] = codec::WIRE_VERSION;
            s.write_all(&frame).await.unwrap();
            s.finish().unwrap();
        }
        Evil::Truncated => {
            let msg = Message::TrainResult(TrainRes {
                round: t.round,
                num_examples: 10,
                metrics: Metrics::new(),
                params: t.model.clone(),
            });
            let bytes = codec::encode_to_vec(&msg).unwrap();
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(&bytes[..bytes.len() - 400]).await.unwrap();
            s.finish().unwrap();
        }
        Evil::WrongShape => {
            let msg = Message::TrainResult(TrainRes {
                round: t.round,
                num_examples: 10,
                metrics: Metrics::new(),
                params: Params::new(
                    Manifest::new(vec![TensorSpec::new("w", &[7])]),
                    vec![0.0; 7],
                )
                .unwrap(),
            });
            send_message(conn, &msg).await.unwrap();
        }
        Evil::Silent => tokio::time::sleep(Duration::from_secs(3600)).await,
        Evil::Disconnect => conn.close(0u32.into(), b"gone"),
    }
}

/// A client that enrolls, waits for its training instructions, then misbehaves.
async fn evil_client(pki: PkiDir, id: String, addr: SocketAddr, how: Evil) {
    let ca = load_certs(&pki.ca_cert()).unwrap();
    let identity = Identity::load(&pki.client_cert(&id), &pki.client_key(&id)).unwrap();
    let conn = raw_connect(addr, &ca, Some(&identity)).await;
    enroll(&conn).await.expect("enroll");
    loop {
        match next_message(&conn).await {
            m @ Message::Train(_) => {
                misbehave(&conn, m, how).await;
                break;
            }
            Message::GetParams => {
                send_message(&conn, &Message::InitialParams(small_params(0.0)))
                    .await
                    .unwrap();
            }
            _ => {}
        }
    }
    // Stay connected until the server hangs up.
    let _ = tokio::time::timeout(Duration::from_secs(60), conn.closed()).await;
}

async fn run_with_evil(how: Evil, timeout_secs: f64) -> (RunSummary, Vec<(String, DropReason)>) {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (pki, ids) = make_pki(&dir.path().join("pki"), 4).unwrap();
    let mut config = base_config(&pki, dir.path(), 1, 4);
    config.rounds.min_train_results = 3;
    config.rounds.round_timeout_secs = timeout_secs;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let server = flotilla_server::start(config, Some(ev_tx)).unwrap();
    let addr = server.local_addr;
    let (_stop, stop_rx) = watch::channel(false);
    let evil = tokio::spawn(evil_client(pki.clone(), ids[3].clone(), addr, how));
    let good: Vec<_> = ids[..3]
        .iter()
        .map(|id| spawn_client(&pki, id, addr, delta(3.0), stop_rx.clone()))
        .collect();
    let summary = wait(server).await;
    let mut dropped = Vec::new();
    while let Ok(ev) = ev_rx.try_recv() {
        if let Event::ClientDropped { client, reason, .. } = ev {
            dropped.push((client.to_string(), reason));
        }
    }
    for g in good {
        finished(g).await.unwrap();
    }
    evil.abort();
    (summary, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frame_drops_the_sender_and_the_round_completes() {
    let (summary, dropped) = run_with_evil(Evil::Garbage, 30.0).await;
    let r = &summary.history[0];
    assert!(r.aborted.is_none());
    assert_eq!(r.results, 3);
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(
        matches!(dropped[0].1, DropReason::Malformed(Error::FrameTooLarge { len, .. }) if len == 0x7fff_ffff),
        "{dropped:?}"
    );
    assert!(matches!(
        r.failures[0].reason,
        FailureReason::Dropped {
            kind: DropKind::Malformed,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_length_update_drops_the_sender() {
    let (summary, dropped) = run_with_evil(Evil::Truncated, 30.0).await;
    assert_eq!(summary.history[0].results, 3);
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(
        matches!(dropped[0].1, DropReason::Malformed(Error::Truncated { .. })),
        "{dropped:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shape_update_drops_the_sender() {
    let (summary, dropped) = run_with_evil(Evil::WrongShape, 30.0).await;
    assert_eq!(summary.history[0].results, 3);
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(
        matches!(dropped[0].1.error(), Some(Error::ManifestMismatch)),
        "{dropped:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_silent_mid_training_is_cut_at_the_deadline() {
    let started = std::time::Instant::now();
    let (summary, dropped) = run_with_evil(Evil::Silent, 3.0).await;
    let r = &summary.history[0];
    assert!(r.aborted.is_none(), "{r:?}");
    assert_eq!(r.results, 3);
    assert_eq!(r.failures.len(), 1);
    assert_eq!(r.failures[0].reason, FailureReason::Timeout);
    assert!(dropped.is_empty(), "{dropped:?}");
    assert!(started.elapsed() >= Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnecting_mid_training_does_not_hold_the_round() {
    let (summary, _) = run_with_evil(Evil::Disconnect, 60.0).await;
    let r = &summary.history[0];
    assert_eq!(r.results, 3);
    assert_eq!(r.failures[0].reason, FailureReason::Disconnected);
}

/// FedBuff over real QUIC: 20 clients in two speed classes (10 answer in about 20 ms, 10 in
/// about 400 ms), 10 training at once, a step every 5 updates. The run completes, the slow
/// class's updates are counted with their staleness (more versions behind, on average, than
/// the fast class's), and the server's model is exactly what the records say: every client
/// adds 1.0, so each step adds the mean of the updates' weights 1/√(1+τ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_run_over_quic_counts_the_slow_class_with_its_staleness() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (pki, ids) = make_pki(&dir.path().join("pki"), 20).unwrap();
    let mut config = base_config(&pki, dir.path(), 12, 20);
    config.rounds.min_train_results = 1;
    config.rounds.evaluate_every = 0;
    config.strategy.min_train_clients = 1;
    config.engine.kind = "fedbuff".into();
    config.engine.concurrency = 10;
    config.engine.buffer_size = 5;
    config.engine.max_staleness = 50;
    config.engine.staleness_weight = "sqrt".into();
    let server = flotilla_server::start(config, None).unwrap();
    let (_stop, stop_rx) = watch::channel(false);
    let slow: Vec<String> = ids[10..].to_vec();
    let clients: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let time = Duration::from_millis(if i < 10 { 20 } else { 400 });
            spawn_client(
                &pki,
                id,
                server.local_addr,
                Delta(1.0, time),
                stop_rx.clone(),
            )
        })
        .collect();
    let summary = wait(server).await;
    for c in clients {
        finished(c).await.unwrap();
    }
    assert_eq!(summary.history.len(), 12);
    let (mut fast_tau, mut slow_tau) = (Vec::new(), Vec::new());
    let mut want = 0.0f64;
    for r in &summary.history {
        assert!(r.aborted.is_none(), "{r:?}");
        let step = r.asynchronous.as_ref().expect("an async step's record");
        assert_eq!(step.staleness.len(), 5);
        let mut sum = 0.0;
        for (client, tau) in &step.staleness {
            sum += 1.0 / (1.0 + *tau as f64).sqrt();
            if slow.iter().any(|s| s == client.as_str()) {
                slow_tau.push(*tau as f64);
            } else {
                fast_tau.push(*tau as f64);
            }
        }
        want += sum / 5.0;
    }
    assert!(
        !slow_tau.is_empty(),
        "no update of the slow class was counted"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    assert!(
        mean(&slow_tau) > mean(&fast_tau),
        "slow class staleness {slow_tau:?} vs fast {fast_tau:?}"
    );
    let global = summary.global.unwrap();
    for v in global.values() {
        assert!((*v as f64 - want).abs() < 1e-4, "{v} vs {want}");
    }
}
