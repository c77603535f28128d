//! `BurnTrainer` options on real data (the bundled MNIST subset), small and fast: Adam and
//! momentum SGD learn, FedProx keeps the local model closer to the global one, full batch is
//! one step per epoch, the same seed gives the same result, and bad inputs are typed errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use burn::tensor::Device;
use flotilla_client::data::{Split, bundled};
use flotilla_client::{BurnTrainer, LocalData, Mlp2nn, Trainer};
use flotilla_protocol::wire::messages::{BatchSize, Optimizer, TrainConfig};
use flotilla_protocol::{Manifest, Params, TensorSpec};

fn trainer(n: usize) -> BurnTrainer<Mlp2nn> {
    let d = Device::flex();
    let train = bundled::mnist(Split::Train).unwrap().head(n);
    let test = bundled::mnist(Split::Test).unwrap().head(500);
    BurnTrainer::new(
        Mlp2nn::new(784, 10, &d),
        LocalData::all(train),
        Some(LocalData::all(test)),
    )
    .unwrap()
}

fn config(optimizer: Optimizer, lr: f64) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch_size: BatchSize::Fixed(20),
        learning_rate: lr,
        optimizer,
        seed: 3,
        ..TrainConfig::default()
    }
}

fn distance(a: &Params, b: &Params) -> f64 {
    a.values()
        .iter()
        .zip(b.values())
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[test]
fn adam_and_momentum_learn() {
    for opt in [
        Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
        },
        Optimizer::Sgd { momentum: 0.9 },
    ] {
        let mut t = trainer(2000);
        let init = t.initial_params().unwrap();
        let before = t.evaluate(&init).unwrap();
        let lr = if matches!(opt, Optimizer::Adam { .. }) {
            1e-3
        } else {
            0.02
        };
        let u = t.train(&init, &config(opt, lr)).unwrap();
        let after = t.evaluate(&u.params).unwrap();
        // Far above chance after one epoch on 2,000 examples.
        assert!(
            after.accuracy > 0.6 && after.accuracy > before.accuracy + 0.4,
            "{opt:?}: {before:?} -> {after:?}"
        );
        assert_eq!(u.num_examples, 2000);
        assert!(u.metrics["train_loss"] > 0.0);
    }
}

#[test]
fn fedprox_keeps_the_model_near_the_global_one() {
    let mut t = trainer(1000);
    let global = t.initial_params().unwrap();
    let plain = t
        .train(&global, &config(Optimizer::Sgd { momentum: 0.0 }, 0.1))
        .unwrap();
    let prox = t
        .train(
            &global,
            &TrainConfig {
                proximal_mu: 1.0,
                ..config(Optimizer::Sgd { momentum: 0.0 }, 0.1)
            },
        )
        .unwrap();
    let (d_plain, d_prox) = (
        distance(&plain.params, &global),
        distance(&prox.params, &global),
    );
    assert!(
        d_prox < 0.9 * d_plain,
        "FedProx moved {d_prox}, plain SGD {d_plain}"
    );
}

#[test]
fn full_batch_and_seeded_shuffling() {
    let mut t = trainer(300);
    let g = t.initial_params().unwrap();
    let full = TrainConfig {
        batch_size: BatchSize::Full,
        epochs: 2,
        ..config(Optimizer::Sgd { momentum: 0.0 }, 0.1)
    };
    let a = t.train(&g, &full).unwrap();
    // Full batch: the same gradient whatever the order, up to float summation order.
    let b = t
        .train(
            &g,
            &TrainConfig {
                seed: 99,
                ..full.clone()
            },
        )
        .unwrap();
    assert!(
        distance(&a.params, &b.params) < 1e-4,
        "{}",
        distance(&a.params, &b.params)
    );
    // Mini-batches: same seed, same model bit for bit; another seed, a visibly other model.
    let c = config(Optimizer::Sgd { momentum: 0.0 }, 0.1);
    let x = t.train(&g, &c).unwrap();
    let y = t.train(&g, &c).unwrap();
    let z = t.train(&g, &TrainConfig { seed: 4, ..c }).unwrap();
    assert!(x.params == y.params, "same seed gave different models");
    assert!(
        distance(&x.params, &z.params) > 1e-2,
        "{}",
        distance(&x.params, &z.params)
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let mut t = trainer(100);
    let g = t.initial_params().unwrap();
    let wrong = Params::new(
        Manifest::new(vec![TensorSpec::new("w", &[3])]),
        vec![0.0; 3],
    )
    .unwrap();
    assert!(matches!(
        t.train(&wrong, &config(Optimizer::default(), 0.1)),
        Err(flotilla_client::Error::Model(_))
    ));
    assert!(matches!(
        t.evaluate(&wrong),
        Err(flotilla_client::Error::Model(_))
    ));
    assert!(matches!(
        t.train(&g, &config(Optimizer::default(), -1.0)),
        Err(flotilla_client::Error::Config(_))
    ));
    // A learning rate that blows up is reported, not returned as NaN parameters.
    let r = t.train(&g, &config(Optimizer::Sgd { momentum: 0.9 }, 1e6));
    assert!(
        matches!(r, Err(flotilla_client::Error::Training(_))),
        "{r:?}"
    );
    // The trainer is still usable afterwards.
    t.train(&g, &config(Optimizer::default(), 0.1)).unwrap();
}

/// Mixed precision: where the device computes in bf16 (flex does, on the CPU), a bf16-trained
/// model learns like the f32 one from the same start, its parameters stay f32 master weights
/// (the update sent is f32, finite, and not rounded to bf16's 8-bit mantissa), and the two
/// differ (the arithmetic really was bf16). Where it cannot, the trainer refuses with the
/// reason.
#[test]
fn mixed_precision_trains_with_f32_master_weights() {
    use flotilla_client::Precision;
    let sgd = TrainConfig {
        epochs: 3,
        ..config(Optimizer::Sgd { momentum: 0.9 }, 0.05)
    };
    let mut full = trainer(1000);
    let start = full.initial_params().unwrap();
    let d = Device::flex();
    if !d.supports_dtype(burn::tensor::FloatDType::BF16) {
        let err = trainer(100).with_precision(Precision::Bf16).unwrap_err();
        assert!(err.to_string().contains("bf16"), "{err}");
        return;
    }
    let mut half = trainer(1000).with_precision(Precision::Bf16).unwrap();
    assert_eq!(half.precision(), Precision::Bf16);
    let a = full.train(&start, &sgd).unwrap();
    let b = half.train(&start, &sgd).unwrap();
    b.params.check_finite().unwrap();
    // Both learn: the mean training loss of the epoch is below ln(10) = 2.30 (chance).
    let (la, lb) = (a.metrics["train_loss"], b.metrics["train_loss"]);
    assert!(la < 2.0 && lb < 2.0, "f32 {la}, bf16 {lb}");
    assert!((la - lb).abs() < 0.1, "f32 {la}, bf16 {lb}");
    // Different arithmetic, same trajectory: close, not equal.
    let moved = distance(&start, &a.params);
    let apart = distance(&a.params, &b.params);
    assert!(apart > 0.0);
    assert!(apart < 0.5 * moved, "apart {apart}, moved {moved}");
    // f32 master weights: the updated values are not all representable in bf16.
    let not_bf16 = b
        .params
        .values()
        .iter()
        .filter(|v| v.to_bits() & 0xFFFF != 0)
        .count();
    assert!(
        not_bf16 > b.params.len() / 2,
        "{not_bf16} of {}",
        b.params.len()
    );
    // Evaluation still works on the f32 model.
    let e = half.evaluate(&b.params).unwrap();
    assert!(e.accuracy > 0.6, "{}", e.accuracy);
}
