//! Differential privacy in the round machines: client-side clipping and noise, the privacy
//! report in every round record, and the budget that stops a run before it is exceeded.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use flotilla_crypto::dp::RdpAccountant;
use flotilla_protocol::CryptoProvider;
use flotilla_protocol::coordinator::Event;
use flotilla_protocol::dp::{DpConfig, DpMode};
use flotilla_protocol::harness::{FixedDelta, Harness};
use flotilla_protocol::strategy::Sampling;
use flotilla_protocol::wire::messages::Capabilities;
use flotilla_protocol::{
    ClientId, Coordinator, CoordinatorConfig, FedAvg, Manifest, Params, Participant, TensorSpec,
};

const LEN: usize = 100;

fn model() -> Params {
    Params::new(
        Manifest::new(vec![TensorSpec::new("w", &[LEN])]),
        vec![0.0; LEN],
    )
    .unwrap()
}

fn run(dp: DpConfig, rounds: u64, fraction: f64) -> Harness {
    let config = CoordinatorConfig {
        num_rounds: rounds,
        min_available_clients: 10,
        min_train_results: 2,
        round_timeout: Duration::from_secs(60),
        idle_timeout: None,
        evaluate_every: 0,
        dp: Some(dp),
        ..CoordinatorConfig::default()
    };
    let strategy = FedAvg {
        train_sampling: Sampling {
            fraction,
            min_clients: 2,
        },
        ..FedAvg::default()
    };
    let mut h = Harness::new(
        Coordinator::new(config, Box::new(strategy), Some(model())).unwrap(),
        3,
    );
    for i in 0..10u64 {
        let p = Participant::new(Capabilities::default())
            .with_provider(CryptoProvider::insecure_deterministic(i));
        h.add_participant(
            ClientId::new(format!("c{i}")),
            p,
            Box::new(FixedDelta {
                // δ = 1 on every coordinate: norm 10, clipped to 1 → 0.1 per coordinate.
                delta: 1.0,
                num_examples: 100 * (i + 1),
                initial: model(),
                compute: Duration::from_millis(10),
            }),
        );
    }
    assert!(h.run_to_completion(Duration::from_secs(3600)));
    h
}

#[test]
fn client_side_dp_clips_noises_and_reports_epsilon() {
    let dp = DpConfig {
        mode: DpMode::Client,
        clip: Some(1.0),
        noise_multiplier: 0.5,
        ..DpConfig::default()
    };
    let h = run(dp, 3, 0.5);
    let rounds = h.completed_rounds();
    assert_eq!(rounds.len(), 3);
    // Equal weights (the example counts differ), clipped to norm 1, plus noise whose mean over
    // the 5 clients has std σC/m = 0.1 per coordinate: the average coordinate moved 0.1 per
    // round; over 3 rounds and 100 coordinates the noise on that average has std
    // √3 · 0.1 / 10 ≈ 0.017, so it is within 0.06 (3.5 std) of 0.3.
    let g = h.coordinator.global().unwrap();
    let mean = g.values().iter().map(|&v| v as f64).sum::<f64>() / LEN as f64;
    assert!((mean - 0.3).abs() < 0.06, "mean coordinate {mean}");
    // Not the unclipped 1.0 per round, and not the same on every coordinate (noise).
    assert!(g.values().iter().any(|&v| (v as f64 - mean).abs() > 0.01));
    // ε grows every round, as the accountant says for q = 0.5, σ = 0.5.
    let mut acc = RdpAccountant::new();
    for r in &rounds {
        let p = r.privacy.clone().unwrap();
        assert_eq!((p.sampling_rate, p.noise_multiplier), (0.5, 0.5));
        acc.compose(0.5, 0.5, 1);
        assert_eq!(p.epsilon, acc.epsilon(1e-5));
    }
}

#[test]
fn the_privacy_budget_stops_the_run_before_it_is_exceeded() {
    let budget = 6.0;
    let dp = DpConfig {
        mode: DpMode::Client,
        clip: Some(1.0),
        noise_multiplier: 1.5,
        privacy_budget: Some(budget),
        ..DpConfig::default()
    };
    // How many rounds fit: q = 1 (all 10 sampled).
    let mut acc = RdpAccountant::new();
    let mut fit = 0;
    while acc.epsilon_after(1.0, 1.5, 1e-5) <= budget {
        acc.compose(1.0, 1.5, 1);
        fit += 1;
    }
    assert!((1..50).contains(&fit), "{fit}");
    let h = run(dp, 50, 1.0);
    assert!(h.coordinator.is_finished());
    let rounds = h.completed_rounds();
    assert_eq!(rounds.len(), fit);
    let last = rounds.last().unwrap().privacy.clone().unwrap();
    assert!(last.epsilon <= budget);
    let reached = h.events.iter().find_map(|(_, e)| match e {
        Event::PrivacyBudgetReached {
            spent,
            next,
            budget,
        } => Some((*spent, *next, *budget)),
        _ => None,
    });
    let (spent, next, b) = reached.expect("no budget event");
    assert_eq!(spent, last.epsilon);
    assert!(next > b && b == budget);
}
