//! Random operation sequences against the round machines (quinn-proto's
//! `random_interaction.rs` idea): a coordinator and several participants on the harness,
//! driven by a proptest-generated list of operations — let time pass, drop / duplicate /
//! delay / corrupt messages, kill, disconnect and reconnect clients — then healed. After
//! every operation and at the end, invariants must hold:
//!
//! * the global model stays finite and keeps its manifest;
//! * the state the coordinator keeps is bounded: at most `history_window` round records,
//!   at most the clients that exist;
//! * once the network is healed, the coordinator finishes: every round from 1 to
//!   `num_rounds` ended exactly once, completed or aborted with a reason.
//!
//! The proptest seed is fixed, so CI runs the same cases every time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use flotilla_protocol::coordinator::{CoordinatorConfig, EngineConfig, Event, FedBuffConfig};
use flotilla_protocol::harness::{Action, FixedDelta, Harness};
use flotilla_protocol::strategy::{FedAvg, Sampling};
use flotilla_protocol::wire::messages::ClientId;
use flotilla_protocol::{Coordinator, Manifest, Params, TensorSpec};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

const CLIENTS: usize = 5;
const ROUNDS: u64 = 6;
const WINDOW: usize = 3;

fn model(value: f32) -> Params {
    Params::new(
        Manifest::new(vec![TensorSpec::new("w", &[8])]),
        vec![value; 8],
    )
    .unwrap()
}

fn id(i: u8) -> ClientId {
    ClientId::new(format!("client-{}", i as usize % CLIENTS))
}

fn behaviour(i: u8) -> Box<FixedDelta> {
    Box::new(FixedDelta {
        delta: 1.0 + f32::from(i % 5),
        num_examples: 10 + u64::from(i % 5),
        initial: model(0.0),
        compute: Duration::from_millis(200 + 50 * u64::from(i % 5)),
    })
}

/// What the network does to each message, in percent.
#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    drop: u8,
    duplicate: u8,
    corrupt: u8,
    delay: u8,
}

#[derive(Clone, Debug)]
enum Op {
    /// Let this many tenths of a second pass.
    Run(u16),
    Kill(u8),
    Disconnect(u8),
    Reconnect(u8),
    SetFaults(Faults),
    Heal,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u16..300).prop_map(Op::Run),
        1 => any::<u8>().prop_map(Op::Kill),
        1 => any::<u8>().prop_map(Op::Disconnect),
        2 => any::<u8>().prop_map(Op::Reconnect),
        1 => (0u8..30, 0u8..30, 0u8..30, 0u8..30).prop_map(|(drop, duplicate, corrupt, delay)| {
            Op::SetFaults(Faults { drop, duplicate, corrupt, delay })
        }),
        1 => Just(Op::Heal),
    ]
}

fn harness(seed: u64, fedbuff: bool) -> Harness {
    let engine = if fedbuff {
        EngineConfig::FedBuff(FedBuffConfig {
            concurrency: 3,
            buffer_size: 2,
            max_staleness: 2,
            ..FedBuffConfig::default()
        })
    } else {
        EngineConfig::Sync
    };
    let config = CoordinatorConfig {
        engine,
        num_rounds: ROUNDS,
        min_available_clients: 2,
        min_train_results: 2,
        round_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_secs(2),
        idle_timeout: Some(Duration::from_secs(10)),
        evaluate_every: 2,
        seed,
        history_window: WINDOW,
        straggler_backoff: Duration::from_secs(20),
        ..CoordinatorConfig::default()
    };
    let strategy = FedAvg {
        train_sampling: Sampling {
            fraction: 0.8,
            min_clients: 2,
        },
        evaluate_sampling: Sampling {
            fraction: 1.0,
            min_clients: 1,
        },
        ..FedAvg::default()
    };
    let c = Coordinator::new(config, Box::new(strategy), Some(model(0.0))).unwrap();
    let mut h = Harness::new(c, seed);
    for i in 0..CLIENTS as u8 {
        h.add_client(id(i), behaviour(i));
    }
    h
}

/// A client's new connection: the old one is seen closing first (as the real driver
/// reports a replaced connection), then the new one says hello.
fn reconnect(h: &mut Harness, i: u8) {
    h.disconnect(&id(i));
    h.add_client(id(i), behaviour(i));
}

fn check_invariants(h: &Harness) {
    let c = &h.coordinator;
    let g = c.global().expect("the initial model stays");
    assert!(g.check_finite().is_ok(), "non-finite global model");
    assert_eq!(**g.manifest(), *model(0.0).manifest().as_ref());
    assert!(
        c.history().len() <= WINDOW,
        "{} records kept",
        c.history().len()
    );
    assert!(c.clients().count() <= CLIENTS);
    assert!(c.round() <= ROUNDS);
}

fn run(seed: u64, ops: &[Op], fedbuff: bool) {
    let mut h = harness(seed, fedbuff);
    let faults = Rc::new(RefCell::new(Faults::default()));
    let f = faults.clone();
    let mut n = seed | 1;
    h.set_filter(Box::new(move |_| {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let roll = ((n >> 33) % 100) as u8;
        let f = *f.borrow();
        let mut edge = f.drop;
        if roll < edge {
            return Action::Drop;
        }
        edge = edge.saturating_add(f.duplicate);
        if roll < edge {
            return Action::Duplicate;
        }
        edge = edge.saturating_add(f.corrupt);
        if roll < edge {
            return Action::Corrupt;
        }
        edge = edge.saturating_add(f.delay);
        if roll < edge {
            return Action::Delay(Duration::from_millis(u64::from(roll) * 40));
        }
        Action::Deliver
    }));
    for op in ops {
        match op {
            Op::Run(tenths) => {
                let until = h.elapsed() + Duration::from_millis(u64::from(*tenths) * 100);
                h.run_until(until, |h| h.coordinator.is_finished());
            }
            Op::Kill(i) => h.kill(&id(*i)),
            Op::Disconnect(i) => h.disconnect(&id(*i)),
            Op::Reconnect(i) => reconnect(&mut h, *i),
            Op::SetFaults(x) => *faults.borrow_mut() = *x,
            Op::Heal => *faults.borrow_mut() = Faults::default(),
        }
        check_invariants(&h);
    }
    // Heal everything: a clean network and every client reconnected.
    *faults.borrow_mut() = Faults::default();
    for i in 0..CLIENTS as u8 {
        reconnect(&mut h, i);
    }
    let limit = h.elapsed() + Duration::from_secs(3600);
    assert!(
        h.run_until(limit, |h| h.coordinator.is_finished()),
        "the coordinator did not finish once the network was healed (round {}, phase {})",
        h.coordinator.round(),
        h.coordinator.phase_name()
    );
    check_invariants(&h);
    // Every round ended exactly once, completed or aborted with a reason.
    let mut ended: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, e) in &h.events {
        match e {
            Event::RoundCompleted(r) => *ended.entry(r.round).or_default() += 1,
            Event::RoundAborted(r) => {
                assert!(r.aborted.is_some());
                *ended.entry(r.round).or_default() += 1;
            }
            _ => {}
        }
    }
    let want: BTreeMap<u64, usize> = (1..=ROUNDS).map(|r| (r, 1)).collect();
    assert_eq!(ended, want, "rounds that ended");
}

proptest! {
    #![proptest_config(Config {
        cases: 64,
        rng_seed: RngSeed::Fixed(0x5eed_f107),
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn random_operations_keep_the_invariants(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run(seed, &ops, false);
    }

    /// The same for the buffered-asynchronous engine (each step is a round).
    #[test]
    fn random_operations_keep_the_invariants_under_fedbuff(
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run(seed, &ops, true);
    }
}

/// The same on a long, hand-picked hostile sequence (a regression anchor that does not
/// depend on what proptest generates).
#[test]
fn a_hostile_sequence_keeps_the_invariants() {
    let bad = Faults {
        drop: 20,
        duplicate: 20,
        corrupt: 20,
        delay: 20,
    };
    let ops = vec![
        Op::SetFaults(bad),
        Op::Run(50),
        Op::Kill(0),
        Op::Disconnect(1),
        Op::Run(100),
        Op::Reconnect(0),
        Op::Reconnect(1),
        Op::Run(100),
        Op::Kill(2),
        Op::Kill(3),
        Op::Kill(4),
        Op::Run(300),
        Op::Heal,
        Op::Run(100),
    ];
    run(3, &ops, false);
    run(3, &ops, true);
}
