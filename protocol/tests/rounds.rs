//! Round-machine tests on the deterministic harness: simulated clock, in-memory queues,
//! injected faults. All seeded; none depends on wall-clock time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use flotilla_protocol::coordinator::{CoordinatorConfig, DropKind, DropReason, Event};
use flotilla_protocol::harness::{Action, Direction, FixedDelta, Harness};
use flotilla_protocol::strategy::{FailureReason, FedAvg, Sampling};
use flotilla_protocol::wire::messages::{AbortReason, ClientId, Message, TrainRes};
use flotilla_protocol::{Coordinator, Error, Manifest, Params, TensorSpec};

const TIMEOUT: Duration = Duration::from_secs(30);

fn model(n: usize, value: f32) -> Params {
    Params::new(
        Manifest::new(vec![TensorSpec::new("w", &[n])]),
        vec![value; n],
    )
    .unwrap()
}

fn id(i: usize) -> ClientId {
    ClientId::new(format!("client-{i:05}"))
}

fn config(rounds: u64, min: usize) -> CoordinatorConfig {
    CoordinatorConfig {
        num_rounds: rounds,
        min_available_clients: min,
        min_train_results: min,
        round_timeout: TIMEOUT,
        heartbeat_interval: Duration::from_secs(5),
        idle_timeout: Some(Duration::from_secs(60)),
        evaluate_every: 1,
        seed: 42,
        ..CoordinatorConfig::default()
    }
}

fn fedavg(fraction: f64, min_clients: usize) -> Box<FedAvg> {
    Box::new(FedAvg {
        train_sampling: Sampling {
            fraction,
            min_clients,
        },
        evaluate_sampling: Sampling {
            fraction,
            min_clients,
        },
        ..FedAvg::default()
    })
}

/// n clients; client i adds (i+1) and reports (i+1)*10 examples.
fn harness(n: usize, cfg: CoordinatorConfig, initial: Option<Params>) -> Harness {
    let c = Coordinator::new(cfg, fedavg(1.0, 1), initial).unwrap();
    let mut h = Harness::new(c, 7);
    for i in 0..n {
        h.add_client(
            id(i),
            Box::new(FixedDelta {
                delta: (i + 1) as f32,
                num_examples: (i as u64 + 1) * 10,
                initial: model(4, 0.5),
                compute: Duration::from_millis(100 + i as u64),
            }),
        );
    }
    h
}

/// Example-weighted mean of the deltas of the given clients.
fn expected_delta(clients: &[usize]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for &i in clients {
        let w = (i + 1) as f64 * 10.0;
        num += w * (i + 1) as f64;
        den += w;
    }
    num / den
}

fn run_full(n: usize, rounds: u64) -> Harness {
    let mut h = harness(n, config(rounds, n), Some(model(4, 0.0)));
    assert!(
        h.run_to_completion(Duration::from_secs(3600)),
        "did not finish"
    );
    h
}

#[test]
fn three_participants_three_rounds() {
    let h = run_full(3, 3);
    let done = h.completed_rounds();
    assert_eq!(done.len(), 3);
    assert!(h.aborted_rounds().is_empty());
    for r in &done {
        assert_eq!(r.results, 3);
        assert!(r.failures.is_empty());
        assert!(r.evaluation.is_some());
    }
    // Hand-computed: weights 10, 20, 30 and deltas 1, 2, 3 → (10+40+90)/60 = 7/3 per round.
    let per_round = 7.0 / 3.0;
    for v in h.coordinator.global().unwrap().values() {
        assert!((*v as f64 - 3.0 * per_round).abs() < 1e-5, "{v}");
    }
}

#[test]
fn ten_participants() {
    let h = run_full(10, 2);
    assert_eq!(h.completed_rounds().len(), 2);
    let all: Vec<usize> = (0..10).collect();
    let want = 2.0 * expected_delta(&all);
    for v in h.coordinator.global().unwrap().values() {
        assert!((*v as f64 - want).abs() < 1e-4);
    }
}

#[test]
fn thousand_participants() {
    let h = run_full(1000, 2);
    let done = h.completed_rounds();
    assert_eq!(done.len(), 2);
    assert_eq!(done[0].results, 1000);
    let all: Vec<usize> = (0..1000).collect();
    let want = 2.0 * expected_delta(&all);
    let got = h.coordinator.global().unwrap().values()[0] as f64;
    assert!((got - want).abs() / want < 1e-5, "{got} vs {want}");
}

#[test]
fn aggregate_equals_hand_computed_weighted_mean() {
    // Three clients, initial model 0.5; deltas 1, 2, 3 with weights 10, 20, 30.
    // New model = 0.5 + (1*10 + 2*20 + 3*30) / 60 = 0.5 + 140/60.
    let mut h = harness(3, config(1, 3), Some(model(4, 0.5)));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let want = 0.5f32 + 140.0 / 60.0;
    assert_eq!(h.coordinator.global().unwrap().values(), &[want; 4]);
}

#[test]
fn initial_params_are_taken_from_a_client() {
    let mut h = harness(3, config(1, 3), None);
    assert!(h.run_to_completion(Duration::from_secs(600)));
    assert!(h.events.iter().any(|(_, e)| *e == Event::ModelInitialized));
    // Client 0 (first by id) offers 0.5 everywhere; one round adds 140/60.
    let want = 0.5f32 + 140.0 / 60.0;
    assert_eq!(h.coordinator.global().unwrap().values(), &[want; 4]);
}

/// A client whose model is not the others' (another architecture: 3 tensors of other
/// shapes), with the alphabetically first id, as in the field report.
fn wrong_model() -> Params {
    Params::new(
        Manifest::new(vec![
            TensorSpec::new("fc1.weight", &[2, 3]),
            TensorSpec::new("fc1.bias", &[3]),
            TensorSpec::new("fc2.weight", &[3, 1]),
        ]),
        vec![9.0; 12],
    )
    .unwrap()
}

fn fixed(delta: f32, initial: Params) -> Box<FixedDelta> {
    Box::new(FixedDelta {
        delta,
        num_examples: 10,
        initial,
        compute: Duration::from_millis(100),
    })
}

fn refusals(h: &Harness) -> Vec<(ClientId, String)> {
    h.events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::ClientRefused { client, reason } => Some((client.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_client_with_another_model_cannot_become_the_federations_model() {
    // "client-00000" trains another model and sorts first; two clients agree on the right
    // one. The model is taken from the agreeing pair, the odd one is refused with the reason
    // (both sides), and every round completes.
    let c = Coordinator::new(config(3, 2), fedavg(1.0, 1), None).unwrap();
    let mut h = Harness::new(c, 7);
    h.add_client(id(0), fixed(5.0, wrong_model()));
    h.add_client(id(1), fixed(1.0, model(4, 0.5)));
    // Two enrolled, but they disagree: no model is taken, nothing is burnt.
    h.run_until(Duration::from_secs(120), |_| false);
    assert!(h.coordinator.global().is_none());
    assert!(h.completed_rounds().is_empty() && h.aborted_rounds().is_empty());
    assert!(h.events.iter().any(|(_, e)| matches!(
        e,
        Event::WaitingForModel {
            agreeing: 1,
            required: 2,
            undeclared: 0
        }
    )));
    // A second client with the right model arrives: the pair agrees.
    h.add_client(id(2), fixed(1.0, model(4, 0.5)));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    assert_eq!(h.completed_rounds().len(), 3);
    assert!(h.aborted_rounds().is_empty());
    let global = h.coordinator.global().unwrap();
    assert_eq!(global.manifest(), model(4, 0.5).manifest());
    // 0.5 + 1.0 per round, three rounds.
    assert_eq!(global.values(), &[3.5; 4]);
    let refused = refusals(&h);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, id(0));
    assert!(refused[0].1.contains("wrong model"), "{}", refused[0].1);
    assert!(
        refused[0].1.contains("3 tensors, 12 parameters"),
        "{}",
        refused[0].1
    );
    // The refused client was told, and closed its session.
    let p = h.participant(&id(0)).unwrap();
    assert!(p.is_closed());
    // It never took part in a round.
    for r in h.completed_rounds() {
        assert_eq!(r.selected, 2);
    }
}

#[test]
fn a_client_with_another_model_is_refused_at_enrollment_once_there_is_a_model() {
    let c = Coordinator::new(config(2, 2), fedavg(1.0, 1), Some(model(4, 0.0))).unwrap();
    let mut h = Harness::new(c, 7);
    h.add_client(id(0), fixed(5.0, wrong_model()));
    h.add_client(id(1), fixed(1.0, model(4, 0.5)));
    h.add_client(id(2), fixed(1.0, model(4, 0.5)));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    assert_eq!(h.completed_rounds().len(), 2);
    assert_eq!(h.coordinator.global().unwrap().values(), &[2.0; 4]);
    let refused = refusals(&h);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0, id(0));
    assert!(h.participant(&id(0)).unwrap().is_closed());
    // Refused at its hello: it never counted as enrolled.
    assert!(
        !h.events
            .iter()
            .any(|(_, e)| *e == Event::ClientEnrolled(id(0)))
    );
}

#[test]
fn one_client_cannot_set_the_model_when_two_must_agree() {
    // min_available_clients 3, quorum 2 (default): with one client per model nothing starts.
    let c = Coordinator::new(config(1, 3), fedavg(1.0, 1), None).unwrap();
    let mut h = Harness::new(c, 7);
    h.add_client(id(0), fixed(1.0, wrong_model()));
    h.add_client(id(1), fixed(1.0, model(4, 0.5)));
    h.add_client(id(2), fixed(1.0, model(3, 0.5)));
    h.run_until(Duration::from_secs(300), |_| false);
    assert!(h.coordinator.global().is_none());
    assert!(h.completed_rounds().is_empty() && h.aborted_rounds().is_empty());
    assert!(refusals(&h).is_empty());
}

#[test]
fn killed_participants_round_completes_if_enough_remain() {
    let mut cfg = config(1, 10);
    cfg.min_train_results = 8;
    let mut h = harness(10, cfg, Some(model(4, 0.0)));
    // Let the round start, then crash two clients silently while they train.
    assert!(h.run_until(TIMEOUT, |h| h.coordinator.phase_name() == "Train"));
    h.kill(&id(3));
    h.kill(&id(7));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let done = h.completed_rounds();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].results, 8);
    let mut failed: Vec<_> = done[0].failures.iter().map(|f| f.client.clone()).collect();
    failed.sort();
    assert_eq!(failed, vec![id(3), id(7)]);
    assert!(
        done[0]
            .failures
            .iter()
            .all(|f| f.reason == FailureReason::Timeout)
    );
    // The survivors' weighted mean, exactly.
    let alive: Vec<usize> = (0..10).filter(|i| *i != 3 && *i != 7).collect();
    let got = h.coordinator.global().unwrap().values()[0] as f64;
    assert!((got - expected_delta(&alive)).abs() < 1e-5);
    // Crashed silently: the round waited for the deadline.
    let (t, _) = h
        .events
        .iter()
        .find(|(_, e)| matches!(e, Event::RoundCompleted(_)))
        .unwrap();
    assert!(*t >= TIMEOUT);
    // ...but only once: the two that timed out in training were not asked to evaluate, so
    // the evaluation did not wait for them too (it used to end at twice the deadline).
    assert!(
        *t < TIMEOUT + Duration::from_secs(5),
        "round ended at {t:?}"
    );
    let eval = done[0].evaluation.as_ref().unwrap();
    let alive_examples: u64 = alive.iter().map(|i| (*i as u64 + 1) * 10).sum();
    assert_eq!(eval.num_examples, alive_examples);
}

#[test]
fn disconnected_participants_do_not_hold_the_round() {
    let mut cfg = config(1, 10);
    cfg.min_train_results = 8;
    let mut h = harness(10, cfg, Some(model(4, 0.0)));
    assert!(h.run_until(TIMEOUT, |h| h.coordinator.phase_name() == "Train"));
    h.disconnect(&id(1));
    h.disconnect(&id(2));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let done = h.completed_rounds();
    assert_eq!(done[0].results, 8);
    assert!(
        done[0]
            .failures
            .iter()
            .all(|f| f.reason == FailureReason::Disconnected)
    );
    // The server heard the connections close, so it did not wait for the deadline.
    let (t, _) = h
        .events
        .iter()
        .find(|(_, e)| matches!(e, Event::RoundCompleted(_)))
        .unwrap();
    assert!(*t < Duration::from_secs(1), "{t:?}");
}

#[test]
fn too_many_killed_aborts_with_reason() {
    let mut cfg = config(1, 10);
    cfg.min_train_results = 8;
    let mut h = harness(10, cfg, Some(model(4, 0.25)));
    assert!(h.run_until(TIMEOUT, |h| h.coordinator.phase_name() == "Train"));
    for i in [0, 2, 4] {
        h.disconnect(&id(i));
    }
    assert!(h.run_to_completion(Duration::from_secs(600)));
    assert!(h.completed_rounds().is_empty());
    let aborted = h.aborted_rounds();
    assert_eq!(aborted.len(), 1);
    // It aborts as soon as 8 results became impossible (the third disconnect).
    match &aborted[0].aborted {
        Some(AbortReason::TooFewClients {
            available,
            required: 8,
        }) => assert!(*available < 8),
        other => panic!("unexpected {other:?}"),
    }
    // Nothing was aggregated: the model is unchanged.
    assert_eq!(h.coordinator.global().unwrap().values(), &[0.25; 4]);
}

#[test]
fn garbage_from_a_participant_drops_it_and_the_round_goes_on() {
    let mut h = harness(
        5,
        {
            let mut c = config(1, 5);
            c.min_train_results = 3;
            c
        },
        Some(model(4, 0.0)),
    );
    let victim = id(2);
    let v = victim.clone();
    h.set_filter(Box::new(move |e| {
        if e.client == &v && matches!(e.message, Message::TrainResult(_)) {
            Action::Replace(b"\x00\xffnot a flotilla frame at all".to_vec())
        } else {
            Action::Deliver
        }
    }));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let dropped = h.dropped_clients();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].0, victim);
    assert!(
        matches!(dropped[0].1, DropReason::Malformed(Error::BadMagic(_))),
        "{:?}",
        dropped[0].1
    );
    let done = h.completed_rounds();
    assert_eq!(done[0].results, 4);
    assert!(matches!(
        done[0].failures[0].reason,
        FailureReason::Dropped {
            kind: DropKind::Malformed,
            ..
        }
    ));
    // The dropped client learns why.
    assert!(h.participant(&victim).unwrap().is_closed());
}

#[test]
fn nan_or_wrong_shape_updates_drop_the_sender() {
    let mut h = harness(
        4,
        {
            let mut c = config(1, 4);
            c.min_train_results = 2;
            c
        },
        Some(model(4, 0.0)),
    );
    h.set_filter(Box::new(|e| {
        if let Message::TrainResult(r) = e.message {
            let bad = if e.client == &id(0) {
                let mut v = r.params.values().to_vec();
                v[1] = f32::NAN;
                r.params.with_values(v).unwrap()
            } else if e.client == &id(1) {
                model(5, 0.0) // another manifest
            } else {
                return Action::Deliver;
            };
            let msg = Message::TrainResult(TrainRes {
                params: bad,
                ..r.clone()
            });
            return Action::Replace(flotilla_protocol::wire::codec::encode_to_vec(&msg).unwrap());
        }
        Action::Deliver
    }));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let dropped = h.dropped_clients();
    assert_eq!(dropped.len(), 2);
    assert!(
        dropped
            .iter()
            .any(|(c, r)| c == &id(0) && matches!(r.error(), Some(Error::NonFinite { .. })))
    );
    assert!(
        dropped
            .iter()
            .any(|(c, r)| c == &id(1) && matches!(r.error(), Some(Error::ManifestMismatch)))
    );
    let done = h.completed_rounds();
    assert_eq!(done[0].results, 2);
    assert!(h.coordinator.global().unwrap().check_finite().is_ok());
}

#[test]
fn an_example_count_over_the_cap_drops_the_sender() {
    // Client 0 claims u64::MAX examples (it would own the FedAvg mean), client 1 floods its
    // result with metric names: both are dropped with typed reasons, the others' round
    // completes, and the round record keeps no foreign metric names.
    let mut h = harness(
        4,
        {
            let mut c = config(1, 4);
            c.min_train_results = 2;
            c
        },
        Some(model(4, 0.0)),
    );
    h.set_filter(Box::new(|e| {
        if let Message::TrainResult(r) = e.message {
            let mut r = r.clone();
            if e.client == &id(0) {
                r.num_examples = u64::MAX;
            } else if e.client == &id(1) {
                for i in 0..1000 {
                    r.metrics.insert(format!("m{i}"), 1.0);
                }
            } else {
                return Action::Deliver;
            }
            return Action::Replace(
                flotilla_protocol::wire::codec::encode_to_vec(&Message::TrainResult(r)).unwrap(),
            );
        }
        Action::Deliver
    }));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let dropped = h.dropped_clients();
    assert_eq!(dropped.len(), 2, "{dropped:?}");
    assert!(dropped.iter().any(|(c, r)| c == &id(0)
        && r.error()
            == Some(&Error::LimitExceeded {
                what: "example count",
                len: u64::MAX,
                max: 100_000_000
            })));
    assert!(dropped.iter().any(|(c, r)| c == &id(1)
        && r.error()
            == Some(&Error::LimitExceeded {
                what: "metric count",
                len: 1001,
                max: 32
            })));
    let done = h.completed_rounds();
    assert_eq!(done[0].results, 2);
    assert!(done[0].train_metrics.keys().all(|k| !k.starts_with('m')));
    // The mean is the two honest clients' weighted mean, not client 0's.
    let g = h.coordinator.global().unwrap();
    assert!((f64::from(g.values()[0]) - expected_delta(&[2, 3])).abs() < 1e-5);
}

#[test]
fn late_update_after_the_deadline_is_ignored() {
    let mut cfg = config(2, 3);
    cfg.min_train_results = 2;
    let mut h = harness(3, cfg, Some(model(4, 0.0)));
    let straggler = id(2);
    let s = straggler.clone();
    h.set_filter(Box::new(move |e| match e.message {
        // Arrives just after the deadline, while round 1 is being evaluated.
        Message::TrainResult(r) if e.client == &s && r.round == 1 => Action::Delay(TIMEOUT),
        _ => Action::Deliver,
    }));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let done = h.completed_rounds();
    assert_eq!(done.len(), 2);
    assert_eq!(done[0].results, 2);
    assert_eq!(done[0].failures[0].client, straggler);
    assert_eq!(done[0].failures[0].reason, FailureReason::Timeout);
    assert_eq!(
        done[1].results, 3,
        "the straggler is still in the federation"
    );
    assert!(h.events.iter().any(
        |(_, e)| matches!(e, Event::LateMessage { client, round: 1 } if client == &straggler)
    ));
    assert!(h.dropped_clients().is_empty());
    // Round 1 used clients 0 and 1 only; round 2 all three.
    let want = expected_delta(&[0, 1]) + expected_delta(&[0, 1, 2]);
    let got = h.coordinator.global().unwrap().values()[0] as f64;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn duplicated_messages_change_nothing() {
    let clean = run_full(5, 2);
    let mut h = harness(5, config(2, 5), Some(model(4, 0.0)));
    h.set_filter(Box::new(|_| Action::Duplicate));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    assert_eq!(h.coordinator.global(), clean.coordinator.global());
    assert!(h.dropped_clients().is_empty());
}

#[test]
fn dropped_server_messages_are_cut_at_the_deadline() {
    let mut cfg = config(1, 4);
    cfg.min_train_results = 3;
    let mut h = harness(4, cfg, Some(model(4, 0.0)));
    h.set_filter(Box::new(|e| match e.message {
        Message::Train(_) if e.client == &id(3) && e.direction == Direction::ToClient => {
            Action::Drop
        }
        _ => Action::Deliver,
    }));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let done = h.completed_rounds();
    assert_eq!(done[0].results, 3);
    assert_eq!(done[0].failures[0].client, id(3));
}

#[test]
fn random_corruption_never_breaks_the_server() {
    // Corrupt 20% of all messages both ways, for several seeds: the coordinator must finish
    // every round (completed or aborted) and its model must stay finite.
    for seed in 0..8u64 {
        let mut cfg = config(3, 6);
        cfg.min_available_clients = 2;
        cfg.min_train_results = 1;
        let c = Coordinator::new(cfg, fedavg(1.0, 1), Some(model(16, 0.0))).unwrap();
        let mut h = Harness::new(c, seed);
        for i in 0..6 {
            h.add_client(
                id(i),
                Box::new(FixedDelta {
                    delta: 1.0,
                    num_examples: 10,
                    initial: model(16, 0.0),
                    compute: Duration::from_millis(50),
                }),
            );
        }
        let mut n = seed;
        h.set_filter(Box::new(move |_| {
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (n >> 33) % 5 == 0 {
                Action::Corrupt
            } else {
                Action::Deliver
            }
        }));
        h.run_until(Duration::from_secs(3600), |h| h.coordinator.is_finished());
        let g = h.coordinator.global().unwrap();
        assert!(g.check_finite().is_ok(), "seed {seed}");
        assert!(h.coordinator.history().len() <= 3);
    }
}

#[test]
fn same_seed_same_history() {
    let run = || {
        // 20 enrolled, 30% (6) sampled, 2 results needed. (It used to require 20 results of
        // 6, so every round was burnt as too few; such rounds no longer start.)
        let mut cfg = config(3, 20);
        cfg.min_train_results = 2;
        let c = Coordinator::new(cfg, fedavg(0.3, 2), Some(model(4, 0.0))).unwrap();
        let mut h = Harness::new(c, 99);
        for i in 0..20 {
            h.add_client(
                id(i),
                Box::new(FixedDelta {
                    delta: i as f32,
                    num_examples: 1 + i as u64,
                    initial: model(4, 0.0),
                    compute: Duration::from_millis(10 * i as u64),
                }),
            );
        }
        assert!(h.run_to_completion(Duration::from_secs(3600)));
        (
            h.coordinator.history().to_vec(),
            h.coordinator.global().cloned(),
            h.stats,
        )
    };
    let a = run();
    let b = run();
    assert_eq!(a, b);
    // Sampling 30% of 20 picks 6 clients per round.
    assert_eq!(a.0.len(), 3);
    assert!(a.0.iter().all(|r| r.selected == 6 && r.aborted.is_none()));
}

#[test]
fn idle_clients_are_dropped_and_heartbeats_keep_them() {
    // The round timeout is long; one client stops (silently) between rounds. Heartbeats keep
    // the others, the idle timeout removes the dead one, and the next round goes on without it.
    let mut cfg = config(2, 3);
    cfg.min_available_clients = 2;
    cfg.min_train_results = 2;
    let mut h = harness(3, cfg, Some(model(4, 0.0)));
    h.set_filter(Box::new(|_| Action::Deliver));
    assert!(h.run_until(Duration::from_secs(600), |h| {
        !h.completed_rounds().is_empty()
    }));
    h.kill(&id(1));
    assert!(h.run_to_completion(Duration::from_secs(3600)));
    let done = h.completed_rounds();
    assert_eq!(done.len(), 2);
    // Round 2 started right away with all three and lost the dead one at the deadline or by
    // idleness, whichever came first; either way it completed with 2.
    assert_eq!(done[1].results, 2);
}

#[test]
fn without_an_idle_timeout_no_heartbeats_are_sent() {
    // Nothing on the server reads heartbeats when it times no client out: it asks for none
    // (`heartbeat_ms = 0`), and a waiting client sends none. With an idle timeout the same
    // run counts some.
    let heartbeats = |idle: Option<Duration>| {
        let mut cfg = config(2, 3);
        cfg.idle_timeout = idle;
        cfg.round_timeout = Duration::from_secs(600);
        let c = Coordinator::new(cfg, fedavg(1.0, 1), Some(model(4, 0.0))).unwrap();
        let mut h = Harness::new(c, 7);
        for i in 0..3 {
            h.add_client(
                id(i),
                Box::new(FixedDelta {
                    delta: 1.0,
                    num_examples: 10,
                    initial: model(4, 0.5),
                    compute: Duration::from_secs(30),
                }),
            );
        }
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        h.set_filter(Box::new(move |env| {
            if matches!(env.message, Message::Heartbeat { .. }) {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Action::Deliver
        }));
        // Rounds last long enough (the 5 s heartbeat, 30 s of simulated compute) for
        // heartbeats to be due.
        assert!(h.run_to_completion(Duration::from_secs(3600)));
        assert_eq!(h.completed_rounds().len(), 2);
        seen.load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(heartbeats(None), 0);
    assert!(heartbeats(Some(Duration::from_secs(60))) > 0);
}

#[test]
fn snapshot_is_the_state_at_the_end_of_the_round() {
    // The next round starts as soon as one ends; the snapshot must still describe the round
    // that ended (a checkpoint labelled with a later round would skip a round on resume).
    let mut h = harness(3, config(3, 3), Some(model(4, 0.0)));
    assert!(
        h.run_until(Duration::from_secs(600), |h| h.completed_rounds().len()
            == 1)
    );
    assert_eq!(h.coordinator.round(), 2, "round 2 has started");
    let snap = h.coordinator.snapshot().unwrap();
    assert_eq!(snap.round, 1);
    assert_eq!(snap.history.len(), 1);
    assert_eq!(Some(&snap.global), h.coordinator.global());
    // Resuming from it runs rounds 2 and 3 and ends where an uninterrupted run ends.
    let resumed = Coordinator::resume(config(3, 3), fedavg(1.0, 1), snap).unwrap();
    let mut h2 = Harness::new(resumed, 7);
    for i in 0..3 {
        h2.add_client(
            id(i),
            Box::new(FixedDelta {
                delta: (i + 1) as f32,
                num_examples: (i as u64 + 1) * 10,
                initial: model(4, 0.5),
                compute: Duration::from_millis(100),
            }),
        );
    }
    assert!(h2.run_to_completion(Duration::from_secs(600)));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    assert_eq!(h2.coordinator.history().len(), 3);
    assert_eq!(h2.coordinator.global(), h.coordinator.global());
}

#[test]
fn no_round_is_announced_before_the_last_one_is_persisted() {
    // A crash between the end of round 1 and its checkpoint: with the driver not (yet)
    // acknowledging persistence, round 2 is never announced, so resuming from the last
    // checkpoint loses nothing any client trained on.
    let mut h = harness(3, config(3, 3), Some(model(4, 0.0)));
    h.auto_persist = false;
    assert!(h.run_until(Duration::from_secs(600), |h| {
        !h.completed_rounds().is_empty()
    }));
    h.run_until(Duration::from_secs(3600), |_| false);
    assert_eq!(h.coordinator.round(), 1);
    assert_eq!(h.coordinator.awaiting_persistence(), Some(1));
    assert!(
        !h.events
            .iter()
            .any(|(_, e)| matches!(e, Event::RoundStarted { round: 2, .. })),
        "round 2 was announced before round 1 was durable"
    );
    // Once it is durable, the run goes on to the end.
    h.auto_persist = true;
    h.persisted();
    assert!(h.run_to_completion(Duration::from_secs(7200)));
    assert_eq!(h.completed_rounds().len(), 3);
}

#[test]
fn rounds_that_cannot_start_are_not_burnt_and_do_not_recurse() {
    // A secure federation whose enrolled clients cannot do secure aggregation: 10,000
    // rounds configured, none can start. Nothing is burnt (no round ends), nothing
    // recurses (this overflowed the stack), and the reason is reported.
    let mut cfg = config(10_000, 2);
    cfg.secure_aggregation = Some(flotilla_protocol::secagg::SecAggConfig::default());
    let mut h = harness(2, cfg, Some(model(4, 0.0)));
    h.run_until(Duration::from_secs(3600), |_| false);
    assert_eq!(h.coordinator.round(), 0);
    assert!(h.completed_rounds().is_empty() && h.aborted_rounds().is_empty());
    let waiting: Vec<_> = h
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::WaitingForClients {
                enrolled,
                eligible,
                required,
                without_secure_aggregation,
            } => Some((*enrolled, *eligible, *required, *without_secure_aggregation)),
            _ => None,
        })
        .collect();
    assert_eq!(waiting.last(), Some(&(2, 0, 2, 2)), "{waiting:?}");
}

#[test]
fn an_impossible_minimum_waits_then_completes_when_clients_arrive() {
    let mut h = harness(1, config(50, 2), Some(model(4, 0.0)));
    h.run_until(Duration::from_secs(3600), |_| false);
    assert_eq!(h.coordinator.round(), 0);
    assert!(h.events.iter().any(|(_, e)| matches!(
        e,
        Event::WaitingForClients {
            enrolled: 1,
            required: 2,
            ..
        }
    )));
    h.add_client(
        id(1),
        Box::new(FixedDelta {
            delta: 2.0,
            num_examples: 20,
            initial: model(4, 0.5),
            compute: Duration::from_millis(100),
        }),
    );
    assert!(h.run_to_completion(Duration::from_secs(100_000)));
    assert_eq!(h.completed_rounds().len(), 50);
}

#[test]
fn a_diverging_client_fails_its_round_and_stays_enrolled() {
    // Client 0's training diverges (NaN): its participant reports a failed round instead of
    // sending the update, so it is not dropped, stays enrolled, and every round is recorded.
    let cfg = {
        let mut c = config(3, 3);
        c.min_train_results = 2;
        c
    };
    let c = Coordinator::new(cfg, fedavg(1.0, 1), Some(model(4, 0.0))).unwrap();
    let mut h = Harness::new(c, 5);
    for i in 0..3 {
        h.add_client(
            id(i),
            Box::new(FixedDelta {
                delta: if i == 0 { f32::NAN } else { 1.0 },
                num_examples: 10,
                initial: model(4, 0.0),
                compute: Duration::from_millis(100),
            }),
        );
    }
    assert!(h.run_to_completion(Duration::from_secs(3600)));
    assert!(h.dropped_clients().is_empty(), "{:?}", h.dropped_clients());
    assert_eq!(h.coordinator.clients().count(), 3, "still enrolled");
    let done = h.completed_rounds();
    assert_eq!(done.len(), 3);
    for r in &done {
        assert_eq!(r.results, 2);
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].client, id(0));
        assert!(
            matches!(&r.failures[0].reason, FailureReason::Aborted(AbortReason::Other(s)) if s.contains("training failed: training diverged")),
            "{:?}",
            r.failures[0]
        );
    }
    assert!(h.coordinator.global().unwrap().check_finite().is_ok());
}

#[test]
fn contradictory_secure_aggregation_settings_are_refused_at_start() {
    // max_weight × min_train_results must fit the 32-bit sum, or every secure round aborts.
    let mut cfg = config(1, 4);
    cfg.secure_aggregation = Some(flotilla_protocol::secagg::SecAggConfig {
        max_weight: 2_000_000_000,
        ..Default::default()
    });
    let err = Coordinator::new(cfg, fedavg(1.0, 1), Some(model(4, 0.0)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("overflows the 32-bit sum"), "{err}");
}

#[test]
fn a_servers_heartbeat_interval_is_bounded() {
    // The interval comes from the server: u64::MAX milliseconds would overflow `now + every`
    // (a panic); it is held to one hour. Too small is held to 100 ms, 0 means none.
    use flotilla_protocol::Participant;
    use flotilla_protocol::wire::messages::{Capabilities, Welcome};
    let now = std::time::Instant::now();
    for (asked, every) in [
        (u64::MAX, Some(Duration::from_secs(3600))),
        (1, Some(Duration::from_millis(100))),
        (0, None),
    ] {
        let mut p = Participant::new(Capabilities::default());
        p.connect(now);
        p.handle_message(
            now,
            Message::Welcome(Welcome {
                client_id: id(0),
                heartbeat_ms: asked,
            }),
        )
        .unwrap();
        assert_eq!(
            p.poll_timeout(),
            every.map(|e| now + e),
            "heartbeat_ms = {asked}"
        );
    }
}
