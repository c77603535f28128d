//! SecAgg+ in the deterministic harness: real certificates, real signatures, real masks, every
//! message encoded and decoded, dropouts injected at each phase.
//!
//! Clients use `CryptoProvider::insecure_deterministic`, so each run is the same bit for bit and
//! the tests can recompute every client's plaintext encoded input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Duration;

use flotilla_crypto::pki::{CertificateAuthority, Identity};
use flotilla_crypto::secagg::sign::{PeerVerifier, Signer};
use flotilla_protocol::coordinator::{DropReason, EngineConfig, FedBuffConfig, StalenessWeight};
use flotilla_protocol::harness::{Action, ClientBehaviour, Direction, Harness};
use flotilla_protocol::secagg::{SecAggConfig, SecAggIdentity, encode_input};
use flotilla_protocol::strategy::{ClientInfo, Failure, Sampling, Strategy, TrainResults};
use flotilla_protocol::wire::codec;
use flotilla_protocol::wire::config::SecAggSetup;
use flotilla_protocol::wire::messages::{
    AbortReason, Capabilities, EvaluateRes, Message, Metrics, TrainConfig, TrainRes,
};
use flotilla_protocol::{
    ClientId, Coordinator, CoordinatorConfig, CryptoProvider, Error, FedAvg, InvalidMessage,
    Manifest, Params, Participant, SecAggError, TensorSpec,
};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Trains by adding seeded noise in [-0.05, 0.05] to every coordinate.
#[derive(Clone)]
struct Noisy {
    seed: u64,
    num_examples: u64,
}

impl Noisy {
    fn result(&self, round: u64, model: &Params) -> TrainRes {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(round);
        let values: Vec<f32> = model
            .values()
            .iter()
            .map(|v| v + rng.random_range(-0.05f32..0.05))
            .collect();
        let mut metrics = Metrics::new();
        metrics.insert("loss".into(), self.seed as f64);
        TrainRes {
            round,
            num_examples: self.num_examples,
            metrics,
            params: model.with_values(values).unwrap(),
        }
    }
}

impl ClientBehaviour for Noisy {
    fn initial_params(&mut self) -> Params {
        unreachable!("the tests configure an initial model")
    }
    fn train(&mut self, round: u64, _config: &TrainConfig, model: &Params) -> TrainRes {
        self.result(round, model)
    }
    fn evaluate(&mut self, round: u64, _model: &Params) -> EvaluateRes {
        EvaluateRes {
            round,
            num_examples: 1,
            loss: 0.0,
            metrics: Metrics::new(),
        }
    }
}

fn model(len: usize) -> Params {
    let a = len / 3;
    Params::new(
        Manifest::new(vec![
            TensorSpec::new("w", &[a]),
            TensorSpec::new("b", &[len - a]),
        ]),
        (0..len)
            .map(|i| (i as f32 * 0.001).sin())
            .collect::<Vec<f32>>(),
    )
    .unwrap()
}

fn id(i: usize) -> ClientId {
    ClientId::new(format!("c{i:02}"))
}

fn seed_of(i: usize) -> u64 {
    1000 + i as u64
}

fn examples_of(i: usize) -> u64 {
    100 + 37 * i as u64
}

/// What the filter saw.
#[derive(Default)]
struct Log {
    /// Setup and model of each client's `Train`, by round.
    train: BTreeMap<(u64, ClientId), (SecAggSetup, Params)>,
    /// Kinds each client sent (that the filter delivered).
    sent: BTreeMap<ClientId, Vec<&'static str>>,
    /// Kinds the server sent.
    received: BTreeMap<ClientId, Vec<&'static str>>,
    /// Masked inputs as sent.
    masked: BTreeMap<ClientId, Vec<u32>>,
    /// Clients that have "crashed".
    dead: BTreeSet<ClientId>,
}

const PHASES: [&str; 5] = [
    "AdvertiseKeys",
    "ShareKeys",
    "MaskedInput",
    "SurvivorsSigned",
    "UnmaskShares",
];

fn phase_index(kind: &str) -> Option<usize> {
    PHASES.iter().position(|p| *p == kind)
}

struct Setup {
    n: usize,
    secagg: SecAggConfig,
    len: usize,
    rounds: u64,
}

fn secure_config(s: &Setup) -> CoordinatorConfig {
    CoordinatorConfig {
        num_rounds: s.rounds,
        min_available_clients: s.n,
        min_train_results: 2,
        round_timeout: Duration::from_secs(60),
        idle_timeout: None,
        evaluate_every: 0,
        seed: 5,
        secure_aggregation: Some(s.secagg.clone()),
        ..CoordinatorConfig::default()
    }
}

fn fedavg(n: usize) -> FedAvg {
    FedAvg {
        train_sampling: Sampling {
            fraction: 1.0,
            min_clients: n,
        },
        ..FedAvg::default()
    }
}

fn identities(n: usize) -> Vec<SecAggIdentity> {
    let ca = CertificateAuthority::generate("Test CA", 1).unwrap();
    let ca_der = ca.cert_der().unwrap();
    (0..n)
        .map(|i| {
            let ident =
                Identity::from_issued(&ca.issue_client(id(i).as_str(), 1).unwrap()).unwrap();
            SecAggIdentity {
                signer: Signer::from_identity(&ident).unwrap(),
                certificate: ident.leaf().unwrap().to_vec(),
                verifier: PeerVerifier::new(std::slice::from_ref(&ca_der), Vec::new()).unwrap(),
            }
        })
        .collect()
}

fn participant(identity: SecAggIdentity, i: usize) -> Participant {
    Participant::new(Capabilities {
        backend: "sim".into(),
        num_examples: None,
        secure_aggregation: true,
        software: "test".into(),
        model: None,
    })
    .with_secure_aggregation(identity)
    .with_provider(CryptoProvider::insecure_deterministic(seed_of(i)))
}

/// A harness with `s.n` secure clients; `victims` crash (stop sending) from the given phase
/// on; `tamper` may rewrite server messages.
fn build(
    s: &Setup,
    strategy: Box<dyn Strategy>,
    victims: BTreeMap<ClientId, usize>,
    tamper: impl FnMut(&ClientId, &Message) -> Option<Message> + 'static,
) -> (Harness, Rc<RefCell<Log>>) {
    build_with(secure_config(s), s, strategy, victims, tamper)
}

/// [`build`] with another coordinator configuration.
fn build_with(
    config: CoordinatorConfig,
    s: &Setup,
    strategy: Box<dyn Strategy>,
    victims: BTreeMap<ClientId, usize>,
    mut tamper: impl FnMut(&ClientId, &Message) -> Option<Message> + 'static,
) -> (Harness, Rc<RefCell<Log>>) {
    let coordinator = Coordinator::new(config, strategy, Some(model(s.len))).unwrap();
    let mut h = Harness::new(coordinator, 11);
    let log = Rc::new(RefCell::new(Log::default()));
    let l = log.clone();
    h.set_filter(Box::new(move |env| {
        let mut log = l.borrow_mut();
        match env.direction {
            Direction::ToServer => {
                let kind = env.message.kind();
                if let (Some(&from), Some(p)) = (victims.get(env.client), phase_index(kind))
                    && p >= from
                {
                    log.dead.insert(env.client.clone());
                }
                if log.dead.contains(env.client) {
                    return Action::Drop;
                }
                log.sent.entry(env.client.clone()).or_default().push(kind);
                if let Message::MaskedInput(m) = env.message {
                    log.masked.insert(env.client.clone(), m.values.clone());
                }
                Action::Deliver
            }
            Direction::ToClient => {
                if let Message::Train(t) = env.message
                    && let Some(setup) = &t.secagg
                {
                    log.train.insert(
                        (t.round, env.client.clone()),
                        (setup.clone(), t.model.clone()),
                    );
                }
                log.received
                    .entry(env.client.clone())
                    .or_default()
                    .push(env.message.kind());
                match tamper(env.client, env.message) {
                    Some(m) => Action::Replace(codec::encode_to_vec(&m).unwrap()),
                    None => Action::Deliver,
                }
            }
        }
    }));
    for (i, identity) in identities(s.n).into_iter().enumerate() {
        h.add_participant(
            id(i),
            participant(identity, i),
            Box::new(Noisy {
                seed: seed_of(i),
                num_examples: examples_of(i),
            }),
        );
    }
    (h, log)
}

/// The plaintext sum the server must find for `round`: the encoded inputs of the clients in
/// the sum, added with wrapping `u32` arithmetic.
fn expected_sum(log: &Log, round: u64, contributors: &[ClientId]) -> Vec<u32> {
    let mut sum: Option<Vec<u32>> = None;
    for c in contributors {
        let i: usize = c.as_str()[1..].parse().unwrap();
        let (setup, global) = &log.train[&(round, c.clone())];
        let res = Noisy {
            seed: seed_of(i),
            num_examples: examples_of(i),
        }
        .result(round, global);
        let mut rng = CryptoProvider::insecure_deterministic(seed_of(i))
            .rounding_rng(round)
            .unwrap();
        let v = encode_input(setup, global, &res, &mut rng).unwrap();
        sum = Some(match sum {
            None => v,
            Some(s) => s.iter().zip(&v).map(|(a, b)| a.wrapping_add(*b)).collect(),
        });
    }
    sum.unwrap()
}

/// Compares the server's unmasked sum with the plaintext one, reporting the first difference
/// (the vectors are too long to print).
fn assert_same_sum(h: &Harness, expected: &[u32], what: &str) {
    let actual = h
        .coordinator
        .last_unmasked_sum()
        .unwrap_or_else(|| panic!("{what}: no unmasked sum"));
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: unmasked sum differs from the plaintext sum at word {i}: {} vs {}",
            actual[i], expected[i]
        );
    }
}

fn contributors(s: &Setup, failures: &[Failure]) -> Vec<ClientId> {
    (0..s.n)
        .map(id)
        .filter(|c| !failures.iter().any(|f| &f.client == c))
        .collect()
}

#[test]
fn unmasked_sum_equals_plaintext_sum_bit_for_bit_with_dropouts_at_every_phase() {
    let mut per_phase = [0usize; 6];
    for case in 0..36u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(case);
        let n = rng.random_range(4..=12usize);
        let neighbours = [0, 4, 6][rng.random_range(0..3)];
        // Often the smallest threshold (k/2 + 1, after clamping), which leaves room for
        // dropouts; sometimes a larger one.
        let threshold = rng.random_range(1..=n / 2 + 2);
        let secagg = SecAggConfig {
            neighbours,
            threshold,
            clip: 0.1,
            bits: 20,
            max_weight: 1000,
            phase_timeout_ms: 5_000,
        };
        // The effective k and t of the round, to keep dropouts within what SecAgg+ tolerates:
        // with at most k − t dropouts every client keeps t live neighbours.
        let probe = secagg.setup_for((0..n).map(id).collect(), 0).unwrap();
        let (k, t) = (probe.neighbours as usize, probe.threshold as usize);
        let phase = (case % 6) as usize; // 0: no dropouts, 1..=5: at PHASES[phase - 1]
        let d = if phase == 0 || k == t {
            0
        } else {
            rng.random_range(1..=k - t)
        };
        let mut victims = BTreeMap::new();
        while victims.len() < d {
            victims.insert(id(rng.random_range(0..n)), phase - 1);
        }
        let s = Setup {
            n,
            secagg,
            len: 1000,
            rounds: 2,
        };
        let (mut h, log) = build(&s, Box::new(fedavg(n)), victims.clone(), |_, _| None);
        // Round 1 with the dropouts; the victims stay silent in round 2 too.
        assert!(
            h.run_until(Duration::from_secs(600), |h| !h
                .completed_rounds()
                .is_empty()
                || !h.aborted_rounds().is_empty()),
            "case {case}: no round ended"
        );
        let what = format!("case {case}: n={n} k={k} t={t} phase={phase} victims={victims:?}");
        assert!(
            h.aborted_rounds().is_empty(),
            "{what}: {:?}",
            h.aborted_rounds()
        );
        let record = h.completed_rounds()[0].clone();
        let contributors = contributors(&s, &record.failures);
        let stats = record.secagg.clone().unwrap();
        assert_eq!(record.results, contributors.len(), "{what}");
        if phase >= 3 {
            // Crashed at or after the masked input: in the sum unless they died before it.
            assert_eq!(
                contributors.len(),
                n - if phase == 3 { d } else { 0 },
                "{what}"
            );
        } else {
            assert_eq!(contributors.len(), n - d, "{what}");
        }
        let expected = expected_sum(&log.borrow(), 1, &contributors);
        assert_same_sum(&h, &expected, &what);
        if phase == 3 && d > 0 {
            assert_eq!(stats.recovered_dropped, d, "{what}");
        }
        // The new model is the weighted mean within the quantization bound.
        let global = h.coordinator.global().unwrap().clone();
        let start = model(s.len);
        let total: f64 = contributors
            .iter()
            .map(|c| examples_of(c.as_str()[1..].parse().unwrap()) as f64)
            .sum();
        let bound = contributors.len() as f64 * 2.0 * 0.1 / ((1u64 << stats.bits) - 1) as f64
            * 1000.0
            / total;
        for j in (0..s.len).step_by(97) {
            let mean: f64 = contributors
                .iter()
                .map(|c| {
                    let i: usize = c.as_str()[1..].parse().unwrap();
                    let r = Noisy {
                        seed: seed_of(i),
                        num_examples: examples_of(i),
                    }
                    .result(1, &start);
                    examples_of(i) as f64 * r.params.values()[j] as f64
                })
                .sum::<f64>()
                / total;
            assert!(
                (global.values()[j] as f64 - mean).abs() <= bound + 1e-6,
                "{what}: coordinate {j}: {} vs {mean} (bound {bound})",
                global.values()[j]
            );
        }
        if d > 0 {
            per_phase[phase] += 1;
        } else {
            per_phase[0] += 1;
        }
        // Round 2 runs without the victims (who crashed for good).
        assert!(h.run_to_completion(Duration::from_secs(1200)), "{what}");
    }
    // Every phase saw dropouts in several cases.
    assert!(per_phase.iter().all(|&c| c >= 3), "{per_phase:?}");
}

#[test]
fn too_many_dropouts_abort_the_round_before_anything_is_revealed() {
    for phase in [2usize, 3] {
        // Classic SecAgg over 6 clients (k = 5), t = 4: three crashes leave 3 < 4 holders.
        let s = Setup {
            n: 6,
            secagg: SecAggConfig {
                neighbours: 0,
                threshold: 4,
                clip: 0.1,
                bits: 20,
                max_weight: 1000,
                phase_timeout_ms: 5_000,
            },
            len: 300,
            rounds: 1,
        };
        let victims = [1, 3, 4].into_iter().map(|i| (id(i), phase)).collect();
        let (mut h, log) = build(&s, Box::new(fedavg(6)), victims, |_, _| None);
        assert!(h.run_to_completion(Duration::from_secs(600)));
        let aborted = h.aborted_rounds();
        assert_eq!(aborted.len(), 1, "phase {phase}");
        match &aborted[0].aborted {
            Some(AbortReason::SecureAggregation(why)) => {
                assert!(why.contains("too many dropouts"), "{why}")
            }
            other => panic!("phase {phase}: {other:?}"),
        }
        assert!(h.coordinator.last_unmasked_sum().is_none());
        assert_eq!(h.coordinator.global().unwrap(), &model(s.len));
        let log = log.borrow();
        // No unmask request went out and no client revealed a share.
        assert!(log.received.values().flatten().all(|k| *k != "Unmask"));
        assert!(log.sent.values().flatten().all(|k| *k != "UnmaskShares"));
    }
}

#[test]
fn a_fedbuff_cohorts_unmasked_sum_equals_the_plaintext_sum_with_a_dropout() {
    // FedBuff with SecAgg+ cohorts: four clients form one cohort (k = 3, t = 2); client 1
    // crashes when it should send its masked input. The cohort is unmasked with the other
    // three, its sum enters the buffer (3 updates = buffer_size), and the model steps.
    let s = Setup {
        n: 4,
        secagg: SecAggConfig {
            neighbours: 0,
            threshold: 2,
            clip: 0.1,
            bits: 20,
            max_weight: 1000,
            phase_timeout_ms: 5_000,
        },
        len: 300,
        rounds: 1,
    };
    let config = CoordinatorConfig {
        engine: EngineConfig::FedBuff(FedBuffConfig {
            concurrency: 4,
            buffer_size: 3,
            cohort_size: 4,
            cohort_target: 0,
            max_staleness: 2,
            staleness_weight: StalenessWeight::Sqrt,
            server_learning_rate: 1.0,
        }),
        ..secure_config(&s)
    };
    let victims = [(id(1), 2)].into_iter().collect();
    let (mut h, log) = build_with(config, &s, Box::new(fedavg(4)), victims, |_, _| None);
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let done = h.completed_rounds();
    assert_eq!(done.len(), 1);
    let step = done[0].asynchronous.as_ref().unwrap();
    let who: Vec<ClientId> = [0, 2, 3].into_iter().map(id).collect();
    assert_eq!(
        step.staleness,
        who.iter().map(|c| (c.clone(), 0)).collect::<Vec<_>>()
    );
    assert!(done[0].failures.iter().any(|f| f.client == id(1)));
    // The task id of the cohort is 1: its plaintext sum, bit for bit.
    let log = log.borrow();
    assert_same_sum(&h, &expected_sum(&log, 1, &who), "fedbuff cohort");
    // Staleness 0, η = 1: the step is FedAvg's mean of the decoded sum.
    let (setup, global) = &log.train[&(1, id(0))];
    let sum = h.coordinator.last_unmasked_sum().unwrap();
    let want = flotilla_protocol::secagg::decode_sum(setup, global, sum, 3)
        .unwrap()
        .mean()
        .unwrap();
    for (a, b) in h
        .coordinator
        .global()
        .unwrap()
        .values()
        .iter()
        .zip(want.values())
    {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn a_fedbuff_cohort_is_unmasked_once_its_target_is_in_and_leaves_the_rest_out() {
    // A cohort of five (classic SecAgg, k = 4, t = 3: one dropout tolerated) unmasked once
    // four masked inputs are in: the fifth member is left out as a dropout, told so, and the
    // sum is the plaintext sum of the four, bit for bit.
    let s = Setup {
        n: 5,
        secagg: SecAggConfig {
            neighbours: 0,
            threshold: 3,
            clip: 0.1,
            bits: 20,
            max_weight: 1000,
            phase_timeout_ms: 5_000,
        },
        len: 300,
        rounds: 1,
    };
    let config = CoordinatorConfig {
        engine: EngineConfig::FedBuff(FedBuffConfig {
            concurrency: 5,
            buffer_size: 4,
            cohort_size: 5,
            cohort_target: 4,
            max_staleness: 2,
            staleness_weight: StalenessWeight::Sqrt,
            server_learning_rate: 1.0,
        }),
        ..secure_config(&s)
    };
    let (mut h, log) = build_with(config, &s, Box::new(fedavg(5)), BTreeMap::new(), |_, _| {
        None
    });
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let done = h.completed_rounds();
    assert_eq!(done.len(), 1);
    let who: Vec<ClientId> = done[0]
        .asynchronous
        .as_ref()
        .unwrap()
        .staleness
        .iter()
        .map(|(c, _)| c.clone())
        .collect();
    assert_eq!(who.len(), 4);
    assert_eq!(done[0].failures.len(), 1);
    let left_out = &done[0].failures[0].client;
    assert!(!who.contains(left_out));
    let log = log.borrow();
    assert!(log.received[left_out].contains(&"Abort"));
    assert_same_sum(&h, &expected_sum(&log, 1, &who), "cohort target");

    // A target the graph cannot tolerate is refused at start.
    let mut bad = secure_config(&s);
    bad.engine = EngineConfig::FedBuff(FedBuffConfig {
        concurrency: 5,
        buffer_size: 4,
        cohort_size: 5,
        cohort_target: 3,
        ..FedBuffConfig::default()
    });
    assert!(bad.validate().is_err());
}

#[test]
fn a_request_for_both_shares_of_one_client_is_refused() {
    let s = Setup {
        n: 5,
        secagg: SecAggConfig {
            neighbours: 0,
            threshold: 3,
            clip: 0.1,
            bits: 20,
            max_weight: 1000,
            phase_timeout_ms: 5_000,
        },
        len: 200,
        rounds: 1,
    };
    let greedy = |to: &ClientId, m: &Message| match m {
        Message::Unmask(req) if to == &id(0) => {
            let mut req = req.clone();
            // Ask c00 also for the mask key of a survivor: with both, the server could
            // strip every mask from that survivor's input.
            req.dropped.push(id(2));
            Some(Message::Unmask(req))
        }
        _ => None,
    };
    let (mut h, log) = build(&s, Box::new(fedavg(5)), BTreeMap::new(), greedy);
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let refusals = h.participant(&id(0)).unwrap().refusals().to_vec();
    assert_eq!(refusals.len(), 1);
    assert!(
        matches!(&refusals[0].1, Error::SecAgg(SecAggError::BadSurvivors(why)) if why.contains("both shares")),
        "{refusals:?}"
    );
    let log = log.borrow();
    assert!(!log.sent[&id(0)].contains(&"UnmaskShares"));
    // The other four revealed enough (t = 3) for the round to complete exactly.
    let record = h.completed_rounds()[0].clone();
    assert_eq!(record.results, 5);
    let expected = expected_sum(&log, 1, &(0..5).map(id).collect::<Vec<_>>());
    assert_same_sum(&h, &expected, "round 1");
}

#[test]
fn a_forged_advertisement_is_detected() {
    let s = Setup {
        n: 5,
        secagg: SecAggConfig {
            neighbours: 0,
            threshold: 3,
            clip: 0.1,
            bits: 20,
            max_weight: 1000,
            phase_timeout_ms: 5_000,
        },
        len: 200,
        rounds: 1,
    };
    // The server swaps in its own mask key for c01 in what it forwards to c00.
    let forge = |to: &ClientId, m: &Message| match m {
        Message::NeighbourKeys { round, adverts } if to == &id(0) => {
            let mut adverts = adverts.clone();
            let a = adverts.iter_mut().find(|a| a.client == id(1)).unwrap();
            a.s_pk[0] ^= 1;
            Some(Message::NeighbourKeys {
                round: *round,
                adverts,
            })
        }
        _ => None,
    };
    let (mut h, log) = build(&s, Box::new(fedavg(5)), BTreeMap::new(), forge);
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let refusals = h.participant(&id(0)).unwrap().refusals().to_vec();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(
        matches!(&refusals[0].1, Error::SecAgg(SecAggError::BadSignature(why)) if why.contains("c01")),
        "{refusals:?}"
    );
    // c00 shared nothing and is out of the sum; the other four complete the round.
    let log = log.borrow();
    assert!(!log.sent[&id(0)].contains(&"ShareKeys"));
    let record = h.completed_rounds()[0].clone();
    assert_eq!(record.results, 4);
    let expected = expected_sum(&log, 1, &(1..5).map(id).collect::<Vec<_>>());
    assert_same_sum(&h, &expected, "round 1");
}

#[test]
fn a_different_model_sent_to_one_client_is_detected() {
    let s = Setup {
        n: 5,
        secagg: SecAggConfig {
            neighbours: 0,
            threshold: 3,
            clip: 0.1,
            bits: 20,
            max_weight: 1000,
            phase_timeout_ms: 5_000,
        },
        len: 200,
        rounds: 1,
    };
    // Pasquini et al.'s attack: a crafted model for one client only.
    let craft = |to: &ClientId, m: &Message| match m {
        Message::Train(t) if to == &id(3) => {
            let mut t = t.clone();
            let mut v = t.model.values().to_vec();
            v[0] += 1.0;
            t.model = t.model.with_values(v).unwrap();
            Some(Message::Train(t))
        }
        _ => None,
    };
    let (mut h, log) = build(&s, Box::new(fedavg(5)), BTreeMap::new(), craft);
    assert!(h.run_to_completion(Duration::from_secs(600)));
    // Everyone notices: c03 sees four advertisements over another model, the others see
    // c03's. Nobody shares keys, the round is aborted, nothing is revealed.
    for i in 0..5 {
        let r = h.participant(&id(i)).unwrap().refusals().to_vec();
        assert_eq!(r.len(), 1, "c{i:02}: {r:?}");
        assert!(
            matches!(&r[0].1, Error::SecAgg(SecAggError::BadSignature(why)) if why.contains("another model")),
            "{r:?}"
        );
    }
    assert_eq!(h.aborted_rounds().len(), 1);
    assert!(h.coordinator.last_unmasked_sum().is_none());
    let log = log.borrow();
    assert!(log.sent.values().flatten().all(|k| *k != "ShareKeys"));
}

/// Chi-square statistic of a byte histogram against the uniform distribution.
fn chi_square(bytes: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for &b in bytes {
        counts[b as usize] += 1;
    }
    let e = bytes.len() as f64 / 256.0;
    counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum()
}

#[test]
fn one_clients_masked_input_is_indistinguishable_from_uniform() {
    let s = Setup {
        n: 3,
        secagg: SecAggConfig {
            neighbours: 0,
            threshold: 2,
            clip: 0.1,
            bits: 20,
            max_weight: 1000,
            phase_timeout_ms: 5_000,
        },
        len: 65_535,
        rounds: 1,
    };
    let (mut h, log) = build(&s, Box::new(fedavg(3)), BTreeMap::new(), |_, _| None);
    assert!(h.run_to_completion(Duration::from_secs(600)));
    assert_eq!(h.completed_rounds().len(), 1);
    let log = log.borrow();
    let masked = &log.masked[&id(0)];
    let bytes: Vec<u8> = masked.iter().flat_map(|w| w.to_le_bytes()).collect();
    // 255 degrees of freedom: P(χ² > 330.5) = 0.001 for uniform bytes.
    let chi = chi_square(&bytes);
    assert!(chi < 330.5, "masked bytes are not uniform: χ² = {chi}");
    // The same client's unmasked encoding is far from uniform (the test can tell).
    let plain = expected_sum(&log, 1, &[id(0)]);
    let plain: Vec<u8> = plain.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert!(chi_square(&plain) > 10_000.0);
}

/// A strategy that needs every update (like Krum or the median).
struct NeedsAll(FedAvg);

impl Strategy for NeedsAll {
    fn name(&self) -> &str {
        "needs-all"
    }
    fn needs_individual_updates(&self) -> bool {
        true
    }
    fn configure_train(
        &mut self,
        round: u64,
        clients: &[ClientInfo],
        rng: &mut dyn RngCore,
    ) -> Vec<(ClientId, TrainConfig)> {
        self.0.configure_train(round, clients, rng)
    }
    fn aggregate_train(
        &mut self,
        round: u64,
        global: &Params,
        results: TrainResults<'_>,
        failures: &[Failure],
    ) -> Result<Option<Params>, flotilla_protocol::Error> {
        self.0.aggregate_train(round, global, results, failures)
    }
}

#[test]
fn strategies_that_need_individual_updates_are_refused_under_secure_aggregation() {
    let s = Setup {
        n: 3,
        secagg: SecAggConfig::default(),
        len: 10,
        rounds: 1,
    };
    let err = Coordinator::new(
        secure_config(&s),
        Box::new(NeedsAll(fedavg(3))),
        Some(model(10)),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("needs each client's update"),
        "{err}"
    );
}

#[test]
fn a_plain_update_in_a_secure_round_gets_the_sender_dropped() {
    let s = Setup {
        n: 4,
        secagg: SecAggConfig {
            neighbours: 0,
            threshold: 2,
            ..SecAggConfig::default()
        },
        len: 50,
        rounds: 1,
    };
    // c00's masked input is replaced by its plaintext update.
    let (mut h, _log) = build(&s, Box::new(fedavg(4)), BTreeMap::new(), |_, _| None);
    let mut leaked = false;
    h.set_filter(Box::new(move |env| {
        if let (Direction::ToServer, Message::MaskedInput(m)) = (env.direction, env.message)
            && env.client == &id(0)
            && !leaked
        {
            leaked = true;
            let plain = Message::TrainResult(TrainRes {
                round: m.round,
                num_examples: 1,
                metrics: Metrics::new(),
                params: model(50),
            });
            return Action::Replace(codec::encode_to_vec(&plain).unwrap());
        }
        Action::Deliver
    }));
    assert!(h.run_to_completion(Duration::from_secs(600)));
    let dropped = h.dropped_clients();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].0, id(0));
    assert!(
        matches!(
            &dropped[0].1,
            DropReason::ProtocolViolation(Error::InvalidMessage(InvalidMessage::WrongMode(_)))
        ),
        "{dropped:?}"
    );
    // The other three still aggregate (c00's mask key is recovered from their shares).
    assert_eq!(h.completed_rounds()[0].results, 3);
}
