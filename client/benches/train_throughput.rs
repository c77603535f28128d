//! Training throughput of `BurnTrainer` next to a bare Burn loop on the same model, batches and
//! optimizer, for McMahan et al.'s 2NN and CNN at B = 10 and 50; and the cost of converting the
//! CNN to and from flat `Params`.
//!
//!     cargo bench -p flotilla-client --bench train_throughput
//!     cargo bench -p flotilla-client --bench train_throughput --features ndarray
//!
//! Each figure is the median of 5 timed runs over the same examples (after a warm-up run).
//! Uses the bundled MNIST subset, so it needs no external data.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::Device;
use flotilla_client::convert::{load_params, manifest_of, to_params};
use flotilla_client::data::{Split, bundled};
use flotilla_client::trainer::make_batch;
use flotilla_client::{
    BackendKind, BurnTrainer, Classifier, Cnn, LocalData, Mlp2nn, Trainer, select_device,
};
use flotilla_protocol::wire::messages::{BatchSize, Optimizer, TrainConfig};

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The bare loop: what a Burn user writes by hand.
fn bare<M: Classifier>(model: M, data: &LocalData, batch: usize, device: &Device) -> f64 {
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let mut optim = SgdConfig::new().init();
    let mut model = model;
    let start = Instant::now();
    for idx in data.indices.chunks(batch) {
        let (x, y) = make_batch(&data.data, idx, device);
        let loss = loss_fn.forward(model.forward(x), y);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(0.01, model, grads);
    }
    let _ = to_params(&model, &Arc::new(manifest_of(&model)));
    data.len() as f64 / start.elapsed().as_secs_f64()
}

fn ours<M: Classifier>(trainer: &mut BurnTrainer<M>, batch: u32) -> f64 {
    let global = trainer.initial_params().unwrap();
    let config = TrainConfig {
        epochs: 1,
        batch_size: BatchSize::Fixed(batch),
        learning_rate: 0.01,
        optimizer: Optimizer::Sgd { momentum: 0.0 },
        ..TrainConfig::default()
    };
    let start = Instant::now();
    let u = trainer.train(&global, &config).unwrap();
    let secs = start.elapsed().as_secs_f64();
    u.num_examples as f64 / secs
}

fn compare<M: Classifier>(
    name: &str,
    make: impl Fn(&Device) -> M,
    n: usize,
    batches: &[u32],
    backend: BackendKind,
) {
    let (device, used) = select_device(backend);
    let device = device.autodiff();
    let data = bundled::mnist(Split::Train).unwrap().head(n);
    let local = LocalData::all(data);
    for &b in batches {
        let mut trainer = BurnTrainer::new(make(&device), local.clone(), None).unwrap();
        // Warm-up, then interleave the two so that machine noise hits both alike.
        bare(make(&device), &local, b as usize, &device);
        ours(&mut trainer, b);
        let (mut a, mut o) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            a.push(bare(make(&device), &local, b as usize, &device));
            o.push(ours(&mut trainer, b));
        }
        let (a, o) = (median(a), median(o));
        println!(
            "{used:<8} {name:<4} B={b:<3} n={n:<5} bare {a:>8.0} samples/s   BurnTrainer {o:>8.0} samples/s   ratio {:.3}",
            o / a
        );
    }
}

fn conversion() {
    let device = Device::flex().autodiff();
    let model = Cnn::new(28, 10, &device);
    let manifest = Arc::new(manifest_of(&model));
    let p = to_params(&model, &manifest).unwrap();
    let mut to = Vec::new();
    let mut from = Vec::new();
    let mut model = Some(model);
    for _ in 0..(RUNS * 4) {
        let m = model.take().unwrap();
        let t = Instant::now();
        let q = to_params(&m, &manifest).unwrap();
        to.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let m = load_params(m, &manifest, &q).unwrap();
        from.push(t.elapsed().as_secs_f64() * 1e3);
        model = Some(m);
    }
    println!(
        "CNN ({} params) to Params {:.2} ms, from Params {:.2} ms (median of {})",
        p.len(),
        median(to),
        median(from),
        RUNS * 4
    );
    let _ = model.map(|m| m.num_params());
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let backends: &[BackendKind] = if cfg!(feature = "ndarray") {
        &[BackendKind::Cpu, BackendKind::Ndarray]
    } else {
        &[BackendKind::Cpu]
    };
    for &backend in backends {
        compare("2NN", |d| Mlp2nn::new(784, 10, d), 6000, &[10, 50], backend);
        let n = if backend == BackendKind::Ndarray {
            200
        } else {
            1000
        };
        compare("CNN", |d| Cnn::new(28, 10, d), n, &[10, 50], backend);
    }
    conversion();
}
