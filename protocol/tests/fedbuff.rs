//! The buffered-asynchronous engine (FedBuff) on the deterministic harness: staleness
//! weights and the max-staleness refusal against hand-computed models, reproducibility,
//! and resuming from a snapshot.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use flotilla_protocol::coordinator::{
    CoordinatorConfig, EngineConfig, Event, FedBuffConfig, StalenessWeight,
};
use flotilla_protocol::harness::{FixedDelta, Harness};
use flotilla_protocol::strategy::{FedAvg, Sampling};
use flotilla_protocol::wire::messages::ClientId;
use flotilla_protocol::{Coordinator, Manifest, Params, Snapshot, TensorSpec};

fn model(value: f32) -> Params {
    Params::new(
        Manifest::new(vec![TensorSpec::new("w", &[4])]),
        vec![value; 4],
    )
    .unwrap()
}

fn id(i: usize) -> ClientId {
    ClientId::new(format!("client-{i:05}"))
}

fn config(steps: u64, fb: FedBuffConfig) -> CoordinatorConfig {
    CoordinatorConfig {
        num_rounds: steps,
        min_available_clients: 2,
        min_train_results: 1,
        round_timeout: Duration::from_secs(30),
        heartbeat_interval: Duration::from_secs(5),
        idle_timeout: Some(Duration::from_secs(60)),
        evaluate_every: 0,
        seed: 42,
        engine: EngineConfig::FedBuff(fb),
        ..CoordinatorConfig::default()
    }
}

fn fedavg() -> Box<FedAvg> {
    Box::new(FedAvg {
        train_sampling: Sampling {
            fraction: 1.0,
            min_clients: 1,
        },
        evaluate_sampling: Sampling {
            fraction: 1.0,
            min_clients: 1,
        },
        ..FedAvg::default()
    })
}

/// Client 0 is fast (adds 1.0 in 100 ms), client 1 slow (adds 2.0 in 250 ms); 10 examples
/// each. The harness latency is 5 ms each way.
fn add_two_speeds(h: &mut Harness) {
    for (i, delta, ms) in [(0, 1.0, 100), (1, 2.0, 250)] {
        h.add_client(
            id(i),
            Box::new(FixedDelta {
                delta,
                num_examples: 10,
                initial: model(0.0),
                compute: Duration::from_millis(ms),
            }),
        );
    }
}

fn run(steps: u64, fb: FedBuffConfig) -> Harness {
    let c = Coordinator::new(config(steps, fb), fedavg(), Some(model(0.0))).unwrap();
    let mut h = Harness::new(c, 7);
    add_two_speeds(&mut h);
    assert!(
        h.run_to_completion(Duration::from_secs(3600)),
        "did not finish"
    );
    h
}

fn buffer_of_one(max_staleness: u64) -> FedBuffConfig {
    FedBuffConfig {
        concurrency: 2,
        buffer_size: 1,
        max_staleness,
        staleness_weight: StalenessWeight::Sqrt,
        server_learning_rate: 1.0,
        cohort_size: 2,
        cohort_target: 0,
    }
}

/// Each step's (client, staleness), in order.
fn steps(h: &Harness) -> Vec<(ClientId, u64)> {
    h.completed_rounds()
        .iter()
        .flat_map(|r| r.asynchronous.as_ref().unwrap().staleness.clone())
        .collect()
}

#[test]
fn stale_updates_are_weighted_by_one_over_sqrt_one_plus_staleness() {
    // Both start on version 0. The fast client's result arrives at 120 ms (step 1, τ = 0),
    // it trains again on version 1 and arrives at 230 ms (step 2, τ = 0); the slow one
    // arrives at 270 ms, trained on version 0 with the model at 2 (step 3, τ = 2); the fast
    // one, sent version 2 at 230 ms, arrives at 340 ms with the model at 3 (step 4, τ = 1).
    let h = run(4, buffer_of_one(10));
    assert_eq!(
        steps(&h),
        vec![(id(0), 0), (id(0), 0), (id(1), 2), (id(0), 1)]
    );
    // Deltas are fixed per client, so the model is the sum of the weighted deltas:
    // 1 + 1 + 2/√3 + 1/√2.
    let want = 1.0 + 1.0 + 2.0 / 3f64.sqrt() + 1.0 / 2f64.sqrt();
    for v in h.coordinator.global().unwrap().values() {
        assert!((*v as f64 - want).abs() < 1e-5, "{v} vs {want}");
    }
    assert_eq!(h.coordinator.round(), 4);
    assert!(h.aborted_rounds().is_empty());
}

#[test]
fn constant_weighting_and_the_server_learning_rate_scale_the_step() {
    let fb = FedBuffConfig {
        staleness_weight: StalenessWeight::Constant,
        server_learning_rate: 0.5,
        ..buffer_of_one(10)
    };
    let h = run(4, fb);
    assert_eq!(
        steps(&h),
        vec![(id(0), 0), (id(0), 0), (id(1), 2), (id(0), 1)]
    );
    // η = 0.5, s = 1: 0.5 · (1 + 1 + 2 + 1).
    for v in h.coordinator.global().unwrap().values() {
        assert!((*v as f64 - 2.5).abs() < 1e-6, "{v}");
    }
}

#[test]
fn a_buffer_step_is_the_mean_of_its_weighted_updates() {
    // Buffer 2. The fast client fills the first buffer on its own (120 ms and 230 ms, both
    // on version 0): version 1 = mean(1, 1) = 1. The slow client arrives at 270 ms (trained
    // on version 0, τ = 1) and the fast one at 340 ms (sent version 1 at 230 ms, τ = 0):
    // with s(τ) = 1/(1+τ), version 2 = 1 + mean(2/2, 1) = 2.
    let fb = FedBuffConfig {
        concurrency: 2,
        buffer_size: 2,
        max_staleness: 10,
        staleness_weight: StalenessWeight::Poly(1.0),
        server_learning_rate: 1.0,
        cohort_size: 2,
        cohort_target: 0,
    };
    let h = run(2, fb);
    let records = h.completed_rounds();
    let staleness: Vec<_> = records
        .iter()
        .map(|r| r.asynchronous.as_ref().unwrap().staleness.clone())
        .collect();
    assert_eq!(
        staleness,
        vec![vec![(id(0), 0), (id(0), 0)], vec![(id(1), 1), (id(0), 0)]]
    );
    for v in h.coordinator.global().unwrap().values() {
        assert!((*v - 2.0).abs() < 1e-6, "{v}");
    }
}

#[test]
fn updates_past_max_staleness_are_refused_and_their_tasks_called_off() {
    // With max_staleness 1 the slow client's first task (version 0) is hopeless once the
    // model reaches version 2: it is called off and counted as discarded, and the slow
    // client gets a new task; the fast client makes every step.
    let h = run(4, buffer_of_one(1));
    assert!(steps(&h).iter().all(|(c, tau)| *c == id(0) && *tau == 0));
    let discarded: u64 = h
        .completed_rounds()
        .iter()
        .map(|r| r.asynchronous.as_ref().unwrap().discarded)
        .sum();
    assert_eq!(discarded, 1);
    for v in h.coordinator.global().unwrap().values() {
        assert!((*v - 4.0).abs() < 1e-6, "{v}");
    }
}

#[test]
fn the_same_seed_gives_the_same_history() {
    let a = run(6, buffer_of_one(3));
    let b = run(6, buffer_of_one(3));
    assert_eq!(a.coordinator.history(), b.coordinator.history());
    assert_eq!(a.coordinator.global(), b.coordinator.global());
}

#[test]
fn an_async_run_resumes_from_its_snapshot_with_new_task_ids() {
    let fb = buffer_of_one(10);
    let c = Coordinator::new(config(6, fb.clone()), fedavg(), Some(model(0.0))).unwrap();
    let mut h = Harness::new(c, 7);
    add_two_speeds(&mut h);
    assert!(h.run_until(Duration::from_secs(3600), |h| h.coordinator.round() >= 3));
    let snapshot: Snapshot = h.coordinator.snapshot().unwrap();
    assert_eq!(snapshot.round, 3);
    let last_task = snapshot
        .last_task
        .expect("an async snapshot keeps its last task");
    assert!(last_task >= 3, "{last_task}");

    // The server restarts: in-flight tasks are gone, the clients reconnect.
    let c = Coordinator::resume(config(6, fb), fedavg(), snapshot.clone()).unwrap();
    assert_eq!(c.round(), 3);
    let mut h = Harness::new(c, 8);
    add_two_speeds(&mut h);
    assert!(h.run_to_completion(Duration::from_secs(3600)));
    assert_eq!(h.coordinator.round(), 6);
    let first_task = h
        .events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Dispatched { task, version, .. } => Some((*task, *version)),
            _ => None,
        })
        .unwrap();
    assert_eq!(first_task, (last_task + 1, 3));
    let rounds: Vec<u64> = h.completed_rounds().iter().map(|r| r.round).collect();
    assert_eq!(rounds, vec![4, 5, 6]);
    // Each step adds a positive weighted delta to the resumed model.
    let before = snapshot.global.values()[0];
    assert!(h.coordinator.global().unwrap().values()[0] > before + 1.0);
}

#[test]
fn fedbuff_settings_are_checked() {
    let mut cfg = config(1, FedBuffConfig::default());
    cfg.secure_aggregation = Some(Default::default());
    assert!(cfg.validate().is_ok());
    for cohort_size in [1, 11] {
        let mut cfg = config(
            1,
            FedBuffConfig {
                cohort_size,
                ..FedBuffConfig::default()
            },
        );
        cfg.secure_aggregation = Some(Default::default());
        assert!(cfg.validate().is_err(), "cohort size {cohort_size}");
    }
    for bad in [
        FedBuffConfig {
            concurrency: 0,
            ..FedBuffConfig::default()
        },
        FedBuffConfig {
            buffer_size: 0,
            ..FedBuffConfig::default()
        },
        FedBuffConfig {
            max_staleness: 1_000_000,
            ..FedBuffConfig::default()
        },
        FedBuffConfig {
            server_learning_rate: f64::NAN,
            ..FedBuffConfig::default()
        },
    ] {
        assert!(config(1, bad).validate().is_err());
    }
    assert!("poly:0.5".parse::<StalenessWeight>().is_ok());
    assert!("poly:-1".parse::<StalenessWeight>().is_err());
    assert!("cubic".parse::<StalenessWeight>().is_err());
}

#[test]
fn server_optimizers_step_on_the_buffered_mean() {
    use flotilla_protocol::strategy::{FedAvgM, FedOpt, ServerOptimizer, Strategy};
    // FedAvgM (β = 0.9, η = 1) on FedBuff's steps: the buffered means are 1, 1, 2/√3, 1/√2
    // (as in the first test); v ← β·v + Δ̄, x ← x + v.
    let run_with = |strategy: Box<dyn Strategy>| {
        let c = Coordinator::new(config(4, buffer_of_one(10)), strategy, Some(model(0.0))).unwrap();
        let mut h = Harness::new(c, 7);
        add_two_speeds(&mut h);
        assert!(h.run_to_completion(Duration::from_secs(3600)));
        assert!(h.aborted_rounds().is_empty());
        h
    };
    let h = run_with(Box::new(FedAvgM::new(*fedavg())));
    let (mut v, mut x) = (0.0f64, 0.0f64);
    for mean in [1.0, 1.0, 2.0 / 3f64.sqrt(), 1.0 / 2f64.sqrt()] {
        v = 0.9 * v + mean;
        x += v;
    }
    for got in h.coordinator.global().unwrap().values() {
        assert!((*got as f64 - x).abs() < 1e-4, "{got} vs {x}");
    }
    // The adaptive server optimizers run on the same inputs and move the model the way the
    // updates point.
    for opt in [
        ServerOptimizer::Adagrad,
        ServerOptimizer::Adam,
        ServerOptimizer::Yogi,
    ] {
        let h = run_with(Box::new(FedOpt::new(*fedavg(), opt)));
        assert_eq!(h.coordinator.round(), 4);
        for got in h.coordinator.global().unwrap().values() {
            assert!(got.is_finite() && *got > 0.0, "{opt:?}: {got}");
        }
    }
}

#[test]
fn a_device_that_goes_away_mid_task_fails_it_and_comes_back_with_a_new_session() {
    // Client 1 is online in [0, 50 ms) and from 2 s on. It leaves while training its first
    // task (the step records it as disconnected), comes back at 2 s with a new hello, and
    // contributes again; while it is away the run waits (two clients must be enrolled).
    let c = Coordinator::new(config(8, buffer_of_one(10)), fedavg(), Some(model(0.0))).unwrap();
    let mut h = Harness::new(c, 7);
    for i in 0..2 {
        h.add_client(
            id(i),
            Box::new(FixedDelta {
                delta: 1.0,
                num_examples: 10,
                initial: model(0.0),
                compute: Duration::from_millis(100),
            }),
        );
    }
    h.set_availability(
        &id(1),
        &[
            (Duration::ZERO, Duration::from_millis(50)),
            (Duration::from_secs(2), Duration::from_secs(3600)),
        ],
    );
    assert!(h.run_to_completion(Duration::from_secs(3600)));
    let enrolled = h
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::ClientEnrolled(c) if *c == id(1)))
        .count();
    assert_eq!(enrolled, 2, "enrolled once, then again after coming back");
    let records = h.completed_rounds();
    assert_eq!(records.len(), 8);
    assert!(records[0].failures.iter().any(|f| f.client == id(1)
        && f.reason == flotilla_protocol::strategy::FailureReason::Disconnected));
    let mut after = 0;
    for (at, e) in &h.events {
        if let Event::RoundCompleted(r) = e
            && r.asynchronous
                .as_ref()
                .unwrap()
                .staleness
                .iter()
                .any(|(c, _)| *c == id(1))
        {
            assert!(*at >= Duration::from_secs(2), "client 1 counted at {at:?}");
            after += 1;
        }
    }
    assert!(after > 0, "client 1 never contributed after coming back");
    // Every step added one unweighted or staleness-weighted 1.0: the model moved by 8 steps
    // of at most 1 each, at least 1/√(1+10) each.
    let v = h.coordinator.global().unwrap().values()[0];
    assert!(v > 8.0 / 11f32.sqrt() && v <= 8.0 + 1e-5, "{v}");
}
