//! Faults of real deployments, over real QUIC and mTLS on loopback.
//!
//! * Persistence before sending: no client is ever told to train round `k + 1` before round
//!   `k`'s checkpoint is on disk (so a crash in between loses no round anyone trained on).
//!   The machine-level test, with the crash injected, is
//!   `no_round_is_announced_before_the_last_one_is_persisted` in `protocol/tests/rounds.rs`.
//! * Liveness: a client in the middle of a long, slow upload is alive, though no complete
//!   message has arrived for longer than the idle timeout.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use flotilla_protocol::wire::messages::{EvaluateRes, TrainRes};

/// A raw client that answers every round and, each time it is told to train round `r`,
/// records whether round `r - 1`'s checkpoint was already on disk.
async fn checking_client(
    ep: quinn::Endpoint,
    pki: PkiDir,
    addr: SocketAddr,
    id: &'static str,
    checkpoints: PathBuf,
) -> Vec<(u64, bool)> {
    let conn = raw_connect(&ep, &pki, addr, &identity(&pki, id), false)
        .await
        .unwrap();
    assert!(enroll(&conn).await);
    let mut seen = Vec::new();
    loop {
        let Ok(mut s) = conn.accept_uni().await else {
            return seen;
        };
        let Ok((msg, _)) = recv_message(&mut s, &Limits::default(), None).await else {
            return seen;
        };
        let reply = match msg {
            Message::Train(t) => {
                if t.round > 1 {
                    let prev = checkpoints.join(format!("round-{:06}.ckpt", t.round - 1));
                    seen.push((t.round, prev.exists()));
                }
                let v: Vec<f32> = t.model.values().iter().map(|x| x + 1.0).collect();
                Message::TrainResult(TrainRes {
                    round: t.round,
                    num_examples: 10,
                    metrics: Metrics::new(),
                    params: t.model.with_values(v).unwrap(),
                })
            }
            Message::Evaluate(e) => Message::EvaluateResult(EvaluateRes {
                round: e.round,
                num_examples: 10,
                loss: 1.0,
                metrics: Metrics::new(),
            }),
            Message::Abort { round: None, .. } => return seen,
            _ => continue,
        };
        if send_message(&conn, &reply).await.is_err() {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_trains_round_k_plus_1_before_round_k_is_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["a", "b"]);
    let mut cfg = config(&pki, tmp.path(), 100_000);
    cfg.rounds.num_rounds = 8;
    let checkpoints = cfg.checkpoint_dir.clone();
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let ep = endpoint();
    let a = tokio::spawn(checking_client(
        ep.clone(),
        pki.clone(),
        addr,
        "a",
        checkpoints.clone(),
    ));
    let b = tokio::spawn(checking_client(
        ep.clone(),
        pki.clone(),
        addr,
        "b",
        checkpoints,
    ));
    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(summary.history.len(), 8);
    for seen in [a.await.unwrap(), b.await.unwrap()] {
        assert_eq!(seen.len(), 7, "told to train rounds 2..=8: {seen:?}");
        assert!(
            seen.iter().all(|(_, on_disk)| *on_disk),
            "a round was announced before the previous checkpoint existed: {seen:?}"
        );
    }
}

/// A raw client that uploads its training result slowly: 16 KiB every 100 ms (160 KiB/s,
/// above the minimum transfer rate) for a 1 MB model, sending no heartbeat. With an idle
/// timeout of 2 s it used to be dropped as idle mid-upload; the bytes arriving now count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_uploading_slowly_is_not_dropped_as_idle() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["fast", "slow"]);
    let n = 250_000; // 1 MB of f32
    let mut cfg = config(&pki, tmp.path(), n);
    cfg.rounds.num_rounds = 1;
    cfg.rounds.evaluate_every = 0;
    cfg.rounds.idle_timeout_secs = 2.0;
    cfg.rounds.heartbeat_secs = 0.5;
    cfg.rounds.round_timeout_secs = 60.0;
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let (fast, stop) = good_client(
        &pki,
        "fast",
        addr,
        Delta {
            n,
            pause: Duration::ZERO,
        },
    );
    let ep = endpoint();
    let conn = raw_connect(&ep, &pki, addr, &identity(&pki, "slow"), false)
        .await
        .unwrap();
    assert!(enroll(&conn).await);
    let started = Instant::now();
    let train = loop {
        let mut s = conn.accept_uni().await.unwrap();
        if let (Message::Train(t), _) = recv_message(&mut s, &Limits::default(), None)
            .await
            .unwrap()
        {
            break t;
        }
    };
    let result = Message::TrainResult(TrainRes {
        round: train.round,
        num_examples: 10,
        metrics: Metrics::new(),
        params: train.model.clone(),
    });
    let enc = flotilla_protocol::wire::codec::encode(&result).unwrap();
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&enc.head).await.unwrap();
    for chunk in enc.payload_chunks(16 * 1024) {
        s.write_all(&chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.finish().unwrap();
    let upload = started.elapsed();
    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = stop.send(true);
    let _ = fast.await;
    eprintln!("slow upload took {upload:?} with a 2 s idle timeout");
    assert!(
        upload > Duration::from_secs(4),
        "the upload was not slow: {upload:?}"
    );
    let r = &summary.history[0];
    assert!(r.aborted.is_none());
    assert_eq!(
        r.results, 2,
        "the slow uploader's result counted: {:?}",
        r.failures
    );
    assert!(r.failures.is_empty(), "{:?}", r.failures);
}

/// A trainer that fails its first training (e.g. it diverged), then works.
#[derive(Clone, Debug)]
struct FailsFirst {
    inner: Delta,
    failed: bool,
}

impl flotilla_client::Trainer for FailsFirst {
    fn initial_params(&mut self) -> Result<Params, flotilla_client::Error> {
        self.inner.initial_params()
    }
    fn train(
        &mut self,
        global: &Params,
        c: &TrainConfig,
    ) -> Result<flotilla_client::LocalUpdate, flotilla_client::Error> {
        if !self.failed {
            self.failed = true;
            return Err(flotilla_client::Error::Model("training diverged".into()));
        }
        self.inner.train(global, c)
    }
    fn evaluate(
        &mut self,
        g: &Params,
    ) -> Result<flotilla_client::Evaluation, flotilla_client::Error> {
        self.inner.evaluate(g)
    }
}

/// A round that does not complete (one of the two required results is missing) writes no
/// checkpoint: only its record, in `history.jsonl`. The rounds after it checkpoint as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_did_not_complete_writes_no_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["a", "b"]);
    let cfg = config(&pki, tmp.path(), 1000);
    let checkpoints = cfg.checkpoint_dir.clone();
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let quick = Delta {
        n: 1000,
        pause: Duration::ZERO,
    };
    let (a, _sa) = good_client(&pki, "a", addr, quick.clone());
    let (stop_b, rx_b) = watch::channel(false);
    let b = tokio::spawn(run_client(
        options(&pki, "b", addr),
        FailsFirst {
            inner: quick,
            failed: false,
        },
        rx_b,
    ));
    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = stop_b.send(true);
    assert_eq!(summary.history.len(), 3);
    assert!(
        summary.history[0].aborted.is_some(),
        "{:?}",
        summary.history[0]
    );
    assert!(summary.history[1].aborted.is_none());
    assert!(summary.history[2].aborted.is_none());
    assert!(
        !checkpoint_path(&checkpoints, 1).exists(),
        "aborted round 1 was checkpointed"
    );
    assert!(checkpoint_path(&checkpoints, 2).exists());
    assert!(checkpoint_path(&checkpoints, 3).exists());
    // Its record is kept all the same.
    let lines = history_lines(tmp.path());
    assert_eq!(lines.iter().map(|r| r.round).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(lines[0].aborted.is_some());
    // The model after round 3 is two rounds of +0.5, not three.
    let (snap, _) = flotilla_server::checkpoint::read(&checkpoint_path(&checkpoints, 3)).unwrap();
    assert_eq!(snap.round, 3);
    assert!(snap.global.values().iter().all(|v| *v == 1.0));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

fn checkpoint_path(dir: &std::path::Path, round: u64) -> std::path::PathBuf {
    flotilla_server::checkpoint::path_for(dir, round)
}

/// The server's own pauses never count against its clients: aggregation that keeps the
/// round machine busy for longer than the idle timeout (Bulyan over 19 updates of 3 M
/// parameters) must not make the clients look idle when it comes back: their heartbeats
/// arrived meanwhile. (From the field: Bulyan over 90 clients took ~19 s and 81 of 90
/// clients were dropped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_busy_aggregating_drops_no_client() {
    let tmp = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..19).map(|i| format!("c{i:02}")).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let pki = pki(tmp.path(), &id_refs);
    let n = 3_000_000;
    let mut cfg = config(&pki, tmp.path(), n);
    cfg.rounds.num_rounds = 2;
    cfg.rounds.evaluate_every = 0;
    cfg.rounds.round_timeout_secs = 120.0;
    cfg.rounds.min_available_clients = ids.len();
    cfg.rounds.min_train_results = ids.len();
    cfg.strategy.name = "bulyan".into();
    cfg.strategy.num_malicious = 4;
    cfg.strategy.min_train_clients = ids.len();
    // The premise: this aggregation, on this machine and build, takes longer than the idle
    // timeout (timed here on the same strategy and updates; the timeout follows it).
    let pause = {
        let mut strategy = cfg.strategy().unwrap();
        let global = model(n, 0.0);
        let updates: Vec<flotilla_protocol::strategy::ClientUpdate> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| flotilla_protocol::strategy::ClientUpdate {
                client: flotilla_protocol::ClientId::new(id.clone()),
                num_examples: 10,
                metrics: Metrics::new(),
                params: model(n, i as f32 * 0.01),
            })
            .collect();
        let t = Instant::now();
        strategy
            .aggregate_train(
                1,
                &global,
                flotilla_protocol::strategy::TrainResults::Individual(&updates),
                &[],
            )
            .unwrap();
        t.elapsed()
    };
    let idle = (pause.as_secs_f64() / 2.0).max(0.8);
    eprintln!(
        "Bulyan over {} updates of {n} parameters: {pause:?}; idle timeout {idle:.2} s",
        ids.len()
    );
    assert!(
        pause.as_secs_f64() > 1.5 * idle,
        "the aggregation ({pause:?}) is not longer than the idle timeout ({idle} s): the \
         test would prove nothing; make the model larger"
    );
    cfg.rounds.idle_timeout_secs = idle;
    cfg.rounds.heartbeat_secs = idle / 4.0;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let server = flotilla_server::start(cfg, Some(ev_tx)).unwrap();
    let addr = server.local_addr;
    let mut clients = Vec::new();
    for id in &ids {
        clients.push(good_client(
            &pki,
            id,
            addr,
            Delta {
                n,
                pause: Duration::ZERO,
            },
        ));
    }
    let summary = tokio::time::timeout(Duration::from_secs(300), server.wait())
        .await
        .unwrap()
        .unwrap();
    let mut dropped = Vec::new();
    while let Ok(ev) = ev_rx.try_recv() {
        if let Event::ClientDropped { client, reason, .. } = ev {
            dropped.push((client, reason));
        }
    }
    for (task, stop) in clients {
        let _ = stop.send(true);
        let _ = task.await;
    }
    assert!(dropped.is_empty(), "dropped: {dropped:?}");
    assert_eq!(summary.history.len(), 2);
    for r in &summary.history {
        assert!(r.aborted.is_none(), "{r:?}");
        assert_eq!(r.results, ids.len());
        assert!(r.failures.is_empty(), "{r:?}");
    }
}

/// An in-process observer (the simulator's QUIC transport) gets every completed round's
/// model from the server itself, right after the round's record: it never reads checkpoint
/// files, which retention deletes (the simulator once failed looking for
/// `round-000001.ckpt`). Here the observer drains only after 6 rounds, when rounds 1–3's
/// checkpoints are gone, and still holds each round's model (FedAvg of global + 0.5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_observer_gets_every_rounds_model_without_reading_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["a", "b"]);
    let n = 1_000;
    let mut cfg = config(&pki, tmp.path(), n);
    cfg.rounds.num_rounds = 6;
    cfg.rounds.evaluate_every = 0;
    let checkpoints = cfg.checkpoint_dir.clone();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let server = flotilla_server::start(cfg, Some(ev_tx)).unwrap();
    let addr = server.local_addr;
    let clients: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|id| {
            good_client(
                &pki,
                id,
                addr,
                Delta {
                    n,
                    pause: Duration::ZERO,
                },
            )
        })
        .collect();
    let summary = tokio::time::timeout(Duration::from_secs(120), server.wait())
        .await
        .unwrap()
        .unwrap();
    for (task, stop) in clients {
        let _ = stop.send(true);
        let _ = task.await;
    }
    assert_eq!(summary.history.len(), 6);
    assert!(
        !checkpoint_path(&checkpoints, 1).exists(),
        "retention kept round 1"
    );
    let mut last_record = None;
    let mut models = Vec::new();
    while let Ok(ev) = ev_rx.try_recv() {
        match ev {
            Event::RoundCompleted(r) => last_record = Some(r.round),
            Event::GlobalModel { round, params } => {
                assert_eq!(last_record.take(), Some(round), "model without its record");
                models.push((round, params));
            }
            _ => {}
        }
    }
    let rounds: Vec<u64> = models.iter().map(|(r, _)| *r).collect();
    assert_eq!(rounds, vec![1, 2, 3, 4, 5, 6]);
    for (round, params) in &models {
        let want = 0.5 * *round as f32;
        assert!(
            params.values().iter().all(|v| (v - want).abs() < 1e-5),
            "round {round}: {:?}",
            &params.values()[..3]
        );
    }
}
