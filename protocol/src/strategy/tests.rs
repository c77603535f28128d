use super::*;
use crate::wire::messages::Metrics;
use crate::wire::params::{Manifest, TensorSpec};

fn p(v: &[f32]) -> Params {
    Params::new(
        Manifest::new(vec![TensorSpec::new("x", &[v.len()])]),
        v.to_vec(),
    )
    .unwrap()
}

fn upd(i: usize, n: u64, v: &[f32], loss: f64) -> ClientUpdate {
    let mut metrics = Metrics::new();
    metrics.insert("train_loss".into(), loss);
    ClientUpdate {
        client: ClientId::new(format!("c{i}")),
        num_examples: n,
        metrics,
        params: p(v),
    }
}

fn agg(s: &mut dyn Strategy, g: &[f32], ups: &[ClientUpdate]) -> Vec<f32> {
    s.aggregate_train(1, &p(g), TrainResults::Individual(ups), &[])
        .unwrap()
        .unwrap()
        .values()
        .to_vec()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn fedavgm_momentum_by_hand() {
    // global 1, mean of clients 0.5 → g = 0.5; v1 = 0.5, new = 1 − 0.5 = 0.5.
    let mut s = FedAvgM::new(FedAvg::default());
    let ups = [upd(0, 1, &[0.5], 1.0), upd(1, 1, &[0.5], 1.0)];
    close(&agg(&mut s, &[1.0], &ups), &[0.5]);
    // Round 2 from 0.5, mean 0.25 → g = 0.25; v2 = 0.9·0.5 + 0.25 = 0.7; new = 0.5 − 0.7.
    let ups = [upd(0, 1, &[0.25], 1.0), upd(1, 1, &[0.25], 1.0)];
    close(&agg(&mut s, &[0.5], &ups), &[-0.2]);
    // State survives a checkpoint.
    let mut t = FedAvgM::new(FedAvg::default());
    t.restore_state(&s.state()).unwrap();
    assert_eq!(t.velocity, s.velocity);
}

#[test]
fn fedopt_by_hand() {
    // Δ = mean − global = 2 − 1 = 1 (weights 1 and 3: (1·1 + 3·(7/3))/4 = 2).
    let ups = [upd(0, 1, &[1.0], 1.0), upd(1, 3, &[7.0 / 3.0], 1.0)];
    // Adam: m = 0.1·1 = 0.1, v = 0.99·τ² + 0.01·1 ≈ 0.01, new = 1 + 0.1·0.1/(0.1 + 1e-9).
    let mut adam = FedOpt::new(FedAvg::default(), ServerOptimizer::Adam);
    close(&agg(&mut adam, &[1.0], &ups), &[1.1]);
    // Adagrad: m = Δ = 1, v = τ² + 1, new = 1 + 0.1·1/(1 + τ) = 1.1.
    let mut ada = FedOpt::new(FedAvg::default(), ServerOptimizer::Adagrad);
    close(&agg(&mut ada, &[1.0], &ups), &[1.1]);
    // Yogi: m = 0.1, v = τ² − 0.01·1·sign(τ² − 1) = 1e-6 + 0.01, new = 1 + 0.01·0.1/(√v + 1e-3).
    let mut yogi = FedOpt::new(FedAvg::default(), ServerOptimizer::Yogi);
    let v = 1e-6f32 + 0.01;
    close(
        &agg(&mut yogi, &[1.0], &ups),
        &[1.0 + 0.01 * 0.1 / (v.sqrt() + 1e-3)],
    );
    // A second Adam step: Δ = 2 − 1.1 = 0.9 (the same client models).
    let m = 0.9 * 0.1 + 0.1 * 0.9f32;
    let v = 0.99 * (0.99 * 1e-18 + 0.01) + 0.01 * 0.81f32;
    close(
        &agg(&mut adam, &[1.1], &ups),
        &[1.1 + 0.1 * m / (v.sqrt() + 1e-9)],
    );
    let mut back = FedOpt::new(FedAvg::default(), ServerOptimizer::Adam);
    back.restore_state(&adam.state()).unwrap();
    assert_eq!(back.moments.unwrap().m, adam.moments.unwrap().m);
}

#[test]
fn qfedavg_by_hand() {
    // q = 1, lr = 1 (L = 1); global 0; clients at 1 (loss 1) and 2 (loss 4).
    // Δw = global − w = −1, −2; F^q = 1, 4 → ΣΔ = −1 − 8 = −9.
    // h = q·F^(q−1)·Δw² + L·F^q = 1 + 1 = 2 and 4 + 4 = 8 → Σh = 10. new = 0 + 9/10.
    let mut s = QFedAvg {
        base: FedAvg::default(),
        q: 1.0,
        learning_rate: 1.0,
    };
    let ups = [upd(0, 1, &[1.0], 1.0), upd(1, 1, &[2.0], 4.0)];
    close(&agg(&mut s, &[0.0], &ups), &[0.9]);
}

#[test]
fn median_and_trimmed_mean_by_hand() {
    let ups: Vec<ClientUpdate> = [
        [1.0, 10.0],
        [2.0, 20.0],
        [3.0, 30.0],
        [100.0, -50.0],
        [4.0, 40.0],
    ]
    .iter()
    .enumerate()
    .map(|(i, v)| upd(i, 1, v, 1.0))
    .collect();
    close(
        &agg(
            &mut FedMedian {
                base: FedAvg::default(),
            },
            &[0.0, 0.0],
            &ups,
        ),
        &[3.0, 20.0],
    );
    close(
        &agg(
            &mut FedMedian {
                base: FedAvg::default(),
            },
            &[0.0, 0.0],
            &ups[..4],
        ),
        &[2.5, 15.0],
    );
    // β = 0.2 of 5 → drop 1 from each end: (2 + 3 + 4)/3 = 3, (10 + 20 + 30)/3 = 20.
    let mut t = FedTrimmedAvg {
        base: FedAvg::default(),
        beta: 0.2,
    };
    close(&agg(&mut t, &[0.0, 0.0], &ups), &[3.0, 20.0]);
    // Given only a sum, they refuse.
    let ws = WeightedSum::from_updates(&ups).unwrap();
    assert!(
        t.aggregate_train(1, &p(&[0.0, 0.0]), TrainResults::Sum(&ws), &[])
            .is_err()
    );
    assert!(t.needs_individual_updates());
}

#[test]
fn krum_multikrum_and_bulyan_by_hand() {
    // Four honest updates near 0 and one far away.
    let vals = [[0.0f32], [0.1], [-0.1], [0.2], [10.0]];
    let ups: Vec<ClientUpdate> = vals
        .iter()
        .enumerate()
        .map(|(i, v)| upd(i, 1, v, 1.0))
        .collect();
    // f = 1: each scores its n − f − 2 = 2 nearest. 0.0: 0.01 + 0.01 = 0.02; 0.1: 0.01 + 0.01
    // = 0.02 (to 0.0 and 0.2); −0.1: 0.01 + 0.04 = 0.05; 0.2: 0.01 + 0.04 = 0.05; 10: large.
    // Krum picks the first lowest (0.0).
    let mut k = Krum {
        base: FedAvg::default(),
        num_malicious: 1,
        num_to_keep: Some(1),
    };
    close(&agg(&mut k, &[0.0], &ups), &[0.0]);
    assert_eq!(k.name(), "krum");
    // Multi-Krum m = 3: 0.0, 0.1 and −0.1 (tie with 0.2 broken by position) → 0.0.
    let mut mk = Krum {
        base: FedAvg::default(),
        num_malicious: 1,
        num_to_keep: Some(3),
    };
    close(&agg(&mut mk, &[0.0], &ups), &[0.0]);
    mk.num_to_keep = None; // n − f = 4
    close(&agg(&mut mk, &[0.0], &ups), &[0.05]);
    assert_eq!(mk.name(), "multikrum");
    // Bulyan f = 1 needs 7 updates: add two more honest ones.
    let vals = [[0.0f32], [0.1], [-0.1], [0.2], [10.0], [0.05], [-0.05]];
    let ups: Vec<ClientUpdate> = vals
        .iter()
        .enumerate()
        .map(|(i, v)| upd(i, 1, v, 1.0))
        .collect();
    let mut b = Bulyan {
        base: FedAvg::default(),
        num_malicious: 1,
    };
    // θ = 5 picked by repeated Krum (scores over the n − f − 2 nearest, ties by
    // position): 0.0, 0.1, −0.05, −0.1, 0.2 — never 10 and not 0.05. Their median is 0;
    // the β = 3 values closest to it are 0, −0.05 and −0.1 (−0.1 before 0.1 on the tie).
    close(&agg(&mut b, &[0.0], &ups), &[-0.05]);
    assert!(
        b.aggregate_train(1, &p(&[0.0]), TrainResults::Individual(&ups[..6]), &[])
            .is_err()
    );
}

mod basics {
    use super::*;
    use crate::wire::params::TensorSpec;
    use rand::SeedableRng;

    fn upd(id: &str, n: u64, v: Vec<f32>) -> ClientUpdate {
        ClientUpdate {
            client: ClientId::new(id),
            num_examples: n,
            metrics: [("loss".to_string(), v[0] as f64)].into_iter().collect(),
            params: Params::new(Manifest::new(vec![TensorSpec::new("x", &[v.len()])]), v).unwrap(),
        }
    }

    #[test]
    fn fedavg_is_example_weighted_mean() {
        let ups = vec![upd("a", 1, vec![1.0, 2.0]), upd("b", 3, vec![5.0, -2.0])];
        let g = ups[0].params.clone();
        let out = FedAvg::default()
            .aggregate_train(1, &g, TrainResults::Individual(&ups), &[])
            .unwrap()
            .unwrap();
        // (1*1 + 3*5)/4 = 4, (1*2 + 3*-2)/4 = -1
        assert_eq!(out.values(), &[4.0, -1.0]);
        let m = weighted_train_metrics(&ups);
        assert_eq!(m["loss"], 4.0);
    }

    #[test]
    fn sampling_counts_and_determinism() {
        let s = Sampling {
            fraction: 0.1,
            min_clients: 2,
        };
        assert_eq!(s.count(100), 10);
        assert_eq!(s.count(5), 2);
        assert_eq!(s.count(1), 1);
        let clients: Vec<ClientInfo> = (0..100)
            .map(|i| ClientInfo {
                id: ClientId::new(format!("c{i:03}")),
                capabilities: Capabilities::default(),
            })
            .collect();
        let a = s.sample(&clients, &mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
        let b = s.sample(&clients, &mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
        let c = s.sample(&clients, &mut rand_chacha::ChaCha8Rng::seed_from_u64(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 10);
    }
}
