//! The platform's own cost: a real server and 10 real clients over QUIC + mTLS on loopback,
//! the CNN's 1,663,370 parameters, and a trainer that returns at once. Prints seconds per round
//! and the UDP bytes each client sends and receives per round, next to the payload (6.35 MiB
//! each way).
//!
//!     cargo bench -p flotilla-sim --bench platform_overhead
//!
//! Per-round time is the median over the rounds after the first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use flotilla_client::{Evaluation, LocalUpdate, Trainer};
use flotilla_protocol::coordinator::Event;
use flotilla_protocol::messages::{Metrics, TrainConfig};
use flotilla_protocol::{Manifest, Params, TensorSpec};
use flotilla_sim::federation::{client_options, make_pki, server_config};
use tokio::sync::{mpsc, watch};

const CLIENTS: usize = 10;
const ROUNDS: u64 = 6;

/// Returns the global model with every value nudged, at once.
struct Instant0;

impl Trainer for Instant0 {
    fn initial_params(&mut self) -> Result<Params, flotilla_client::Error> {
        Ok(cnn_sized(0.0))
    }
    fn train(
        &mut self,
        g: &Params,
        _c: &TrainConfig,
    ) -> Result<LocalUpdate, flotilla_client::Error> {
        let v: Vec<f32> = g.values().iter().map(|x| x + 0.001).collect();
        Ok(LocalUpdate {
            num_examples: 1,
            metrics: Metrics::new(),
            params: g.with_values(v)?,
        })
    }
    fn evaluate(&mut self, _g: &Params) -> Result<Evaluation, flotilla_client::Error> {
        Ok(Evaluation {
            num_examples: 1,
            loss: 0.0,
            accuracy: 0.0,
        })
    }
}

/// The CNN's manifest shapes (burn layout), zero-filled.
fn cnn_sized(v: f32) -> Params {
    let m = Manifest::new(vec![
        TensorSpec::new("conv1.weight", &[32, 1, 5, 5]),
        TensorSpec::new("conv1.bias", &[32]),
        TensorSpec::new("conv2.weight", &[64, 32, 5, 5]),
        TensorSpec::new("conv2.bias", &[64]),
        TensorSpec::new("fc1.weight", &[3136, 512]),
        TensorSpec::new("fc1.bias", &[512]),
        TensorSpec::new("fc2.weight", &[512, 10]),
        TensorSpec::new("fc2.bias", &[10]),
    ]);
    let n = m.numel() as usize;
    Params::new(m, vec![v; n]).expect("shape")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let (pki, ids) = make_pki(&dir.path().join("pki"), CLIENTS)?;
        let model = dir.path().join("init.safetensors");
        flotilla_server::checkpoint::export_safetensors(&cnn_sized(0.0), &model)?;
        let mut config = server_config(&pki, &dir.path().join("ckpt"));
        config.initial_model = Some(model);
        config.rounds.num_rounds = ROUNDS;
        config.rounds.min_available_clients = CLIENTS;
        config.rounds.min_train_results = CLIENTS;
        config.rounds.evaluate_every = 0;
        config.strategy.min_train_clients = CLIENTS;
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let server = flotilla_server::start(config, Some(ev_tx))?;
        let addr = server.local_addr;
        let (_stop, stop_rx) = watch::channel(false);
        let clients: Vec<_> = ids
            .iter()
            .map(|id| {
                let o = client_options(&pki, id, addr).expect("options");
                tokio::spawn(flotilla_client::driver::run(o, Instant0, stop_rx.clone()))
            })
            .collect();
        let mut started = Instant::now();
        let mut per_round = Vec::new();
        while let Some(ev) = ev_rx.recv().await {
            match ev {
                Event::RoundStarted { .. } => started = Instant::now(),
                Event::RoundCompleted(r)
                    if r.round > 1 => {
                        per_round.push(started.elapsed().as_secs_f64());
                    }
                Event::Finished => break,
                _ => {}
            }
        }
        let summary = server.wait().await?;
        let (mut tx, mut rx) = (0u64, 0u64);
        for c in clients {
            if let Ok(Ok(Ok((_, s)))) = tokio::time::timeout(Duration::from_secs(30), c).await {
                tx += s.udp_bytes_sent;
                rx += s.udp_bytes_received;
            }
        }
        let payload = cnn_sized(0.0).len() as f64 * 4.0;
        let per = (CLIENTS as f64) * ROUNDS as f64;
        let mib = |b: f64| b / (1024.0 * 1024.0);
        println!(
            "{CLIENTS} clients x {} params, {ROUNDS} rounds, instant trainer: {:.3} s/round (median of rounds 2-{ROUNDS})",
            cnn_sized(0.0).len(),
            median(per_round)
        );
        println!(
            "per client per round: payload {:.2} MiB each way; UDP sent {:.2} MiB ({:.3}x), received {:.2} MiB ({:.3}x)",
            mib(payload),
            mib(tx as f64 / per),
            tx as f64 / per / payload,
            mib(rx as f64 / per),
            rx as f64 / per / payload
        );
        println!(
            "server message bytes: sent {:.2} MiB, received {:.2} MiB per client per round",
            mib(summary.bytes_sent as f64 / per),
            mib(summary.bytes_received as f64 / per)
        );
        anyhow::Ok(())
    })
}
