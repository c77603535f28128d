//! The quick start: a real federation on one machine.
//!
//! A throwaway PKI in a temporary directory; the server and 10 clients in this process, each
//! client with its own certificate, its own UDP socket and QUIC connection over loopback; the
//! bundled MNIST subset (10,000 training images) split IID; 5 rounds of FedAvg training the
//! McMahan CNN; federated evaluation on the bundled 2,000 test images after every round. The
//! updates are securely aggregated (SecAgg+) unless turned off: the server sees only the sum.
//! Writes `summary.json` (and the server's checkpoints) into the output directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_client::data::{Split, bundled};
use flotilla_client::partition::{Partition, evaluation_shard};
use flotilla_client::{BackendKind, BurnTrainer, Cnn, LocalData, seeded, select_device};
use flotilla_protocol::coordinator::{Event, RoundRecord};
use flotilla_protocol::secagg::SecAggConfig;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::federation::{Gate, Gated, client_options, make_pki, server_config};

/// Settings of a quick-start run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of clients.
    pub clients: usize,
    /// Rounds of FedAvg.
    pub rounds: u64,
    /// Local epochs.
    pub epochs: u32,
    /// Local batch size.
    pub batch_size: u32,
    /// Learning rate.
    pub learning_rate: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Where to write `summary.json` and checkpoints.
    pub out: PathBuf,
    /// Show a progress bar.
    pub progress: bool,
    /// Seed for the split and the server's sampling.
    pub seed: u64,
    /// Compute backend.
    pub backend: BackendKind,
    /// Secure aggregation (on by default).
    pub secure_aggregation: bool,
}

impl Options {
    /// The defaults of the README's command, writing to `out`.
    pub fn new(out: PathBuf) -> Self {
        Self {
            clients: 10,
            rounds: 5,
            epochs: 1,
            batch_size: 10,
            learning_rate: 0.02,
            momentum: 0.9,
            out,
            progress: true,
            seed: 0,
            backend: BackendKind::Cpu,
            secure_aggregation: true,
        }
    }
}

/// One round in `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct RoundSummary {
    /// Round number.
    pub round: u64,
    /// Federated test accuracy after the round.
    pub accuracy: Option<f64>,
    /// Federated test loss after the round.
    pub loss: Option<f64>,
    /// Mean local training loss.
    pub train_loss: Option<f64>,
    /// Results aggregated.
    pub results: usize,
    /// Clients that failed.
    pub failures: usize,
    /// Seconds since the start when the round ended.
    pub elapsed_secs: f64,
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// What ran.
    pub description: String,
    /// Clients.
    pub clients: usize,
    /// Rounds completed.
    pub rounds_completed: usize,
    /// Per-round metrics.
    pub rounds: Vec<RoundSummary>,
    /// Accuracy after the last round.
    pub final_accuracy: Option<f64>,
    /// Wall time of the federation, seconds.
    pub wall_time_secs: f64,
    /// UDP bytes all clients sent (QUIC and TLS overhead included).
    pub bytes_sent: u64,
    /// UDP bytes all clients received.
    pub bytes_received: u64,
    /// Model parameters.
    pub model_parameters: usize,
    /// Backend the clients trained on.
    pub backend: String,
    /// Whether the updates were securely aggregated.
    pub secure_aggregation: bool,
}

fn round_summary(r: &RoundRecord, start: Instant) -> RoundSummary {
    RoundSummary {
        round: r.round,
        accuracy: r
            .evaluation
            .as_ref()
            .and_then(|e| e.metrics.get("accuracy").copied()),
        loss: r.evaluation.as_ref().map(|e| e.loss),
        train_loss: r.train_metrics.get("train_loss").copied(),
        results: r.results,
        failures: r.failures.len(),
        elapsed_secs: start.elapsed().as_secs_f64(),
    }
}

/// Runs the quick start and returns its summary (also written to `out/summary.json`).
pub async fn run(opts: Options) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let pki_dir = tempfile::tempdir()?;
    let (pki, ids) = make_pki(pki_dir.path(), opts.clients)?;

    let train = bundled::mnist(Split::Train)?;
    let test = bundled::mnist(Split::Test)?;
    let train_parts = Partition::Iid.split(&train.labels, 10, opts.clients, opts.seed)?;
    // Evaluation shards never limit the number of clients (see `evaluation_shard`); up to
    // the test set's size they are the plain IID split.
    let test_parts = (0..opts.clients)
        .map(|i| evaluation_shard(test.labels.len(), i, opts.clients, opts.seed + 1))
        .collect::<Result<Vec<_>, _>>()?;

    let mut config = server_config(&pki, &opts.out.join("checkpoints"));
    config.rounds.num_rounds = opts.rounds;
    config.rounds.min_available_clients = opts.clients;
    config.rounds.min_train_results = (opts.clients * 8).div_ceil(10).max(1);
    config.rounds.round_timeout_secs = 900.0;
    config.rounds.seed = opts.seed;
    config.strategy.min_train_clients = opts.clients;
    config.strategy.min_evaluate_clients = opts.clients;
    config.train.epochs = opts.epochs;
    config.train.batch_size = opts.batch_size;
    config.train.learning_rate = opts.learning_rate;
    config.train.momentum = opts.momentum;
    config.train.seed = opts.seed;
    if opts.secure_aggregation {
        config.secure_aggregation = Some(SecAggConfig::default());
    }
    // A fresh run: do not resume from an earlier run's checkpoints in the same directory.
    if config.checkpoint_dir.exists() {
        std::fs::remove_dir_all(&config.checkpoint_dir)?;
    }

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let server = flotilla_server::start(config, Some(ev_tx))?;
    let addr = server.local_addr;

    let (device, used) = select_device(opts.backend);
    // One training job at a time: Burn's flex backend already uses every core for one job.
    let gate = Gate::new(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut clients = Vec::new();
    let mut params = 0;
    for (i, id) in ids.iter().enumerate() {
        let tr = LocalData::subset(
            train.clone(),
            train_parts.get(i).cloned().unwrap_or_default(),
        )?;
        let te = LocalData::subset(test.clone(), test_parts.get(i).cloned().unwrap_or_default())?;
        let trainer = BurnTrainer::new(
            // Every client starts from the same seeded weights, so whichever one the server
            // asks for the initial model, the run is repeatable.
            seeded(&device, opts.seed, |d| Cnn::new(28, 10, d)),
            tr,
            Some(te),
        )?;
        params = trainer.manifest().numel() as usize;
        let mut o = client_options(&pki, id, addr)?;
        o.capabilities.backend = used.to_string();
        let gated = Gated {
            inner: trainer,
            gate: gate.clone(),
        };
        let rx = stop_rx.clone();
        clients.push(tokio::spawn(flotilla_client::driver::run(o, gated, rx)));
    }

    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(opts.rounds);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise} (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b.set_message("waiting for clients");
        Some(b)
    } else {
        None
    };
    let mut rounds = Vec::new();
    // Round lines go above the bar on a terminal, and to plain stdout otherwise (indicatif
    // hides the bar, and what it would print, when stdout is not a terminal).
    let report = |line: String, bar: &Option<indicatif::ProgressBar>| match bar {
        Some(b) if !b.is_hidden() => b.println(line),
        _ => println!("{line}"),
    };
    let mut server = server;
    let summary = loop {
        tokio::select! {
            ev = ev_rx.recv() => match ev {
                Some(Event::RoundStarted { round, selected }) => {
                    if let Some(b) = &bar { b.set_message(format!("round {round}: {selected} clients training")); }
                }
                Some(Event::RoundCompleted(r)) | Some(Event::RoundAborted(r)) => {
                    let s = round_summary(&r, start);
                    let line = match (&r.aborted, s.accuracy) {
                        (Some(why), _) => format!("round {}: aborted ({why})", r.round),
                        (None, Some(acc)) => format!(
                            "round {}: test accuracy {:.4}, test loss {:.4}, train loss {:.4}, {}/{} clients, {:.1}s",
                            r.round, acc, s.loss.unwrap_or(f64::NAN), s.train_loss.unwrap_or(f64::NAN),
                            r.results, r.selected, s.elapsed_secs
                        ),
                        (None, None) => format!("round {}: {} results", r.round, r.results),
                    };
                    report(line, &bar);
                    if let Some(b) = &bar { b.inc(1); }
                    rounds.push(s);
                }
                Some(_) => {}
                None => break server.join().await?,
            },
            r = server.join() => break r?,
        }
    };
    let wall = start.elapsed().as_secs_f64();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    // Clients leave on the server's "finished"; collect their traffic counts.
    let _ = stop_tx.send(true);
    let (mut sent, mut received) = (0, 0);
    for c in clients {
        match tokio::time::timeout(Duration::from_secs(30), c).await {
            Ok(Ok(Ok((_, stats)))) => {
                sent += stats.udp_bytes_sent;
                received += stats.udp_bytes_received;
            }
            Ok(Ok(Err(e))) => tracing::warn!("a client ended with an error: {e}"),
            _ => tracing::warn!("a client did not stop in time"),
        }
    }
    let final_accuracy = summary.history.iter().rev().find_map(|r| {
        r.evaluation
            .as_ref()
            .and_then(|e| e.metrics.get("accuracy").copied())
    });
    let out = Summary {
        description: format!(
            "FedAvg{}, McMahan CNN, bundled MNIST subset (10,000 train / 2,000 test) split IID over {} clients, E={}, B={}, lr={}, momentum={}, real QUIC + mTLS over loopback",
            if opts.secure_aggregation {
                " with SecAgg+"
            } else {
                ""
            },
            opts.clients,
            opts.epochs,
            opts.batch_size,
            opts.learning_rate,
            opts.momentum
        ),
        clients: opts.clients,
        rounds_completed: summary
            .history
            .iter()
            .filter(|r| r.aborted.is_none())
            .count(),
        rounds,
        final_accuracy,
        wall_time_secs: wall,
        bytes_sent: sent,
        bytes_received: received,
        model_parameters: params,
        backend: used.to_string(),
        secure_aggregation: opts.secure_aggregation,
    };
    write_summary(&opts.out, &out)?;
    Ok(out)
}

fn write_summary(dir: &Path, s: &Summary) -> anyhow::Result<PathBuf> {
    let path = dir.join("summary.json");
    let json = serde_json::to_vec_pretty(s)?;
    flotilla_crypto::fs::write_atomic(&path, &json, 0o644)?;
    Ok(path)
}
