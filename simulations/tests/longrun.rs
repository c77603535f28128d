//! The long-run check (issue: growth over long runs): a server and 50 clients over real QUIC
//! and mutual TLS in one process, the shape of `flotilla-sim run` with `transport = "quic"`,
//! for 2,000 rounds of FedAvg on a 2NN-sized model (199,210 parameters; the clients add a
//! constant, so the rounds are fast and the memory is the platform's, not Burn's).
//!
//! It asserts that the resident memory after round 2,000 is within 10 % of that after round
//! 200, and so is the newest checkpoint's size. Too long for every CI run, so `#[ignore]`:
//!
//!     cargo test --release -p flotilla-sim --test longrun -- --ignored --nocapture
//!
//! `FLOTILLA_LONGRUN_ROUNDS` and `FLOTILLA_LONGRUN_CLIENTS` change the size.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use flotilla_client::{Evaluation, LocalUpdate, Trainer};
use flotilla_protocol::coordinator::Event;
use flotilla_protocol::wire::messages::{Metrics, TrainConfig};
use flotilla_protocol::{Manifest, Params, TensorSpec};
use flotilla_sim::experiment::rss_bytes;
use flotilla_sim::federation::{client_options, make_pki, server_config};
use tokio::sync::{mpsc, watch};

fn params() -> usize {
    env("FLOTILLA_LONGRUN_PARAMS", 199_210) as usize
}

/// The system allocator, counting live bytes (stats_alloc): resident memory that grows while
/// the live heap does not is the allocator's (fragmentation), not ours.
#[global_allocator]
static GLOBAL: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;

fn live_bytes() -> isize {
    let s = GLOBAL.stats();
    // Growth by realloc is already in bytes_allocated (and shrinking in bytes_deallocated).
    s.bytes_allocated as isize - s.bytes_deallocated as isize
}

#[derive(Clone, Debug)]
struct Add;

impl Trainer for Add {
    fn initial_params(&mut self) -> Result<Params, flotilla_client::Error> {
        Ok(Params::new(
            Manifest::new(vec![TensorSpec::new("w", &[params()])]),
            vec![0.0; params()],
        )?)
    }
    fn train(
        &mut self,
        global: &Params,
        _c: &TrainConfig,
    ) -> Result<LocalUpdate, flotilla_client::Error> {
        let v: Vec<f32> = global.values().iter().map(|x| x + 1e-3).collect();
        let mut metrics = Metrics::new();
        metrics.insert("train_loss".into(), 1.0);
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

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn newest_checkpoint_size(dir: &std::path::Path) -> u64 {
    let newest = flotilla_server::checkpoint::list(dir).unwrap();
    std::fs::metadata(newest.first().unwrap()).unwrap().len()
}

#[test]
#[ignore = "long: 2,000 rounds (about 5 minutes in release); run with --ignored"]
fn memory_and_checkpoints_stay_flat_over_2000_rounds() {
    let rounds = env("FLOTILLA_LONGRUN_ROUNDS", 2000);
    let clients = env("FLOTILLA_LONGRUN_CLIENTS", 50) as usize;
    let warm = rounds / 10;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (pki, ids) = make_pki(&dir.path().join("pki"), clients).unwrap();
    let checkpoints = dir.path().join("checkpoints");
    let mut config = server_config(&pki, &checkpoints);
    config.rounds.num_rounds = rounds;
    config.rounds.min_available_clients = clients;
    config.rounds.min_train_results = clients;
    config.rounds.round_timeout_secs = 60.0;
    config.strategy.min_train_clients = clients;
    config.strategy.min_evaluate_clients = clients;
    config.strategy.fraction_train = 1.0;
    config.rounds.evaluate_every = env("FLOTILLA_LONGRUN_EVALUATE_EVERY", 1);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let server = rt
        .block_on(async { flotilla_server::start(config, Some(ev_tx)) })
        .unwrap();
    let addr = server.local_addr;
    let (_stop, stop_rx) = watch::channel(false);
    let mut handles = Vec::new();
    for id in &ids {
        let mut o = client_options(&pki, id, addr).unwrap();
        o.secure_aggregation = false;
        handles.push(rt.spawn(flotilla_client::driver::run(o, Add, stop_rx.clone())));
    }
    let start = Instant::now();
    let mut at_warm = None;
    let mut samples = Vec::new();
    while let Some(ev) = rt.block_on(ev_rx.recv()) {
        match ev {
            Event::RoundCompleted(r) => {
                if r.round % (rounds / 20).max(1) == 0 || r.round == warm || r.round == rounds {
                    let rss = rss_bytes().unwrap_or(0);
                    let ckpt = newest_checkpoint_size(&checkpoints);
                    println!(
                        "round {:5}: {:6.1} s, resident {:6.1} MB (live heap {:6.1} MB), \
                         newest checkpoint {} bytes",
                        r.round,
                        start.elapsed().as_secs_f64(),
                        rss as f64 / 1e6,
                        live_bytes() as f64 / 1e6,
                        ckpt
                    );
                    samples.push((r.round, rss, ckpt));
                    if r.round == warm {
                        at_warm = Some((rss, ckpt));
                    }
                }
            }
            Event::RoundAborted(r) => panic!("round {} aborted: {:?}", r.round, r.aborted),
            Event::Finished => {
                if std::env::var_os("FLOTILLA_LONGRUN_EXIT_AT_END").is_some() {
                    // For a heap profiler: everything still allocated shows as "leaked",
                    // with the call site that allocated it.
                    std::process::exit(0);
                }
                break;
            }
            _ => {}
        }
    }
    let summary = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), server.wait()).await })
        .unwrap()
        .unwrap();
    // Every round really trained: the model moved by 1e-3 a round (f32 sums: approximately).
    let v = f64::from(summary.global.unwrap().values()[0]);
    assert!(
        (v - rounds as f64 * 1e-3).abs() < 1e-2 * rounds as f64 * 1e-3 + 1e-3,
        "{v}"
    );
    let (rss_warm, ckpt_warm) = at_warm.unwrap();
    let &(_, rss_end, ckpt_end) = samples.last().unwrap();
    let growth = rss_end as f64 / rss_warm as f64;
    let ckpt_growth = ckpt_end as f64 / ckpt_warm as f64;
    println!(
        "resident memory after round {rounds} / after round {warm}: {growth:.3}; \
         checkpoint size: {ckpt_growth:.3}"
    );
    assert!(
        growth <= 1.10,
        "resident memory grew {growth:.3}x: {samples:?}"
    );
    assert!(
        (0.9..=1.1).contains(&ckpt_growth),
        "checkpoint grew {ckpt_growth:.3}x"
    );
    for h in handles {
        let _ = rt.block_on(h);
    }
}
