//! The CPU backends burn 0.22.1 offers, by numbers: McMahan et al.'s CNN trained by
//! `BurnTrainer` (one epoch, SGD) at B = 10 and 50 on every CPU backend this build has, next
//! to PyTorch on the same machine in the same run, as a ratio.
//!
//!     bash scripts/cpu-backends.sh          # sets up PyTorch 2.9.0 and builds every backend
//!     cargo bench -p flotilla-client --bench cpu_backends [--features ndarray,tch,cubecl-cpu]
//!
//! PyTorch runs `scripts/torch_cnn_bench.py` (same CNN, batches and optimizer) with the Python
//! in `FLOTILLA_TORCH_PYTHON` (default `python3`); without PyTorch its rows say so. Figures are
//! medians of `REPEATS` timed epochs over `N` bundled MNIST examples after a warm-up epoch;
//! the PyTorch pass runs before and after the Burn passes and its two medians are averaged, so
//! that a drift of this shared machine hits both sides alike. Environment: `FLOTILLA_BENCH_N`
//! (default 500), `FLOTILLA_BENCH_REPEATS` (3), `FLOTILLA_BENCH_BACKENDS` (a comma-separated
//! list of `--backend` names to run; default all built).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use flotilla_client::data::{Split, bundled};
use flotilla_client::{
    BackendKind, BurnTrainer, Cnn, LocalData, Module, Trainer, seeded, select_device,
};
use flotilla_protocol::wire::messages::{BatchSize, Optimizer, TrainConfig};

const BATCHES: [u32; 2] = [10, 50];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Samples/s of `BurnTrainer` on `backend`, or why not.
fn burn(backend: BackendKind, batch: u32, n: usize, repeats: usize) -> Result<f64, String> {
    let (device, used) = select_device(backend);
    if used != backend {
        return Err(format!("{backend} not usable here"));
    }
    let run = || -> Result<f64, String> {
        let data = bundled::mnist(Split::Train).map_err(|e| e.to_string())?;
        // The same initial weights everywhere: drawn on flex, then moved.
        let model = seeded(&select_device(BackendKind::Cpu).0, 1, |d| {
            Cnn::new(28, 10, d)
        })
        .to_device(&device);
        let mut trainer = BurnTrainer::new(model, LocalData::all(data.head(n)), None)
            .map_err(|e| e.to_string())?;
        let global = trainer.initial_params().map_err(|e| e.to_string())?;
        let config = TrainConfig {
            epochs: 1,
            batch_size: BatchSize::Fixed(batch),
            learning_rate: 0.01,
            optimizer: Optimizer::Sgd { momentum: 0.0 },
            ..TrainConfig::default()
        };
        trainer.train(&global, &config).map_err(|e| e.to_string())?;
        let mut runs = Vec::new();
        for _ in 0..repeats {
            let start = Instant::now();
            let u = trainer.train(&global, &config).map_err(|e| e.to_string())?;
            runs.push(u.num_examples as f64 / start.elapsed().as_secs_f64());
        }
        Ok(median(runs))
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(format!("{backend} panicked")))
}

/// PyTorch's samples/s per batch size, from `scripts/torch_cnn_bench.py`, or why none.
fn pytorch(n: usize, repeats: usize) -> Result<(String, BTreeMap<u32, f64>), String> {
    let python = std::env::var("FLOTILLA_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/torch_cnn_bench.py");
    let batches: Vec<String> = BATCHES.iter().map(u32::to_string).collect();
    let out = Command::new(&python)
        .args([script, "cpu", &n.to_string(), &repeats.to_string()])
        .arg(batches.join(","))
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("failed");
        return Err(format!("{python}: {last}"));
    }
    let version = text
        .lines()
        .next()
        .and_then(|l| l.split(',').next())
        .unwrap_or("torch")
        .to_string();
    // Rows: | PyTorch | cpu | f32 | B | samples/s |
    let mut found = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| PyTorch |")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let (Some(b), Some(v)) = (cells.get(4), cells.get(5))
            && let (Ok(b), Ok(v)) = (b.parse::<u32>(), v.parse::<f64>())
        {
            found.insert(b, v);
        }
    }
    Ok((version, found))
}

fn main() {
    let n = env_usize("FLOTILLA_BENCH_N", 500);
    let repeats = env_usize("FLOTILLA_BENCH_REPEATS", 3).max(1);
    // FLOTILLA_BENCH_BACKENDS=cpu,libtorch,...: only these (default: every CPU backend built).
    let only: Option<Vec<String>> = std::env::var("FLOTILLA_BENCH_BACKENDS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let before = pytorch(n, repeats);
    let mut rows = Vec::new();
    for backend in BackendKind::ALL {
        if backend == BackendKind::Cuda {
            continue;
        }
        if let Some(only) = &only
            && !only.iter().any(|b| *b == backend.to_string())
        {
            println!("{backend}: skipped (FLOTILLA_BENCH_BACKENDS)");
            continue;
        }
        if !backend.compiled() {
            println!(
                "{backend}: not in this build (feature `{}`)",
                backend.feature().unwrap_or_default()
            );
            continue;
        }
        for b in BATCHES {
            let r = burn(backend, b, n, repeats);
            match &r {
                Ok(v) => println!("{backend} B={b}: {v:.0} samples/s"),
                Err(e) => println!("{backend} B={b}: failed: {e}"),
            }
            rows.push((backend, b, r));
        }
    }
    let after = pytorch(n, repeats);
    let torch = match (&before, &after) {
        (Ok((v, a)), Ok((_, b))) => Ok((
            v.clone(),
            BATCHES
                .iter()
                .filter_map(|k| Some((*k, (a.get(k)? + b.get(k)?) / 2.0)))
                .collect::<BTreeMap<_, _>>(),
        )),
        (Err(e), _) | (_, Err(e)) => Err(e.clone()),
    };
    println!();
    println!(
        "CNN (1,663,370 parameters), one epoch of {n} examples, SGD; samples/s, median of {repeats}; threads: {}",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    println!("| backend | B | samples/s | × PyTorch |\n|---|---:|---:|---:|");
    for (backend, b, r) in &rows {
        let name = match backend {
            BackendKind::Cpu => "burn flex (default)".to_string(),
            BackendKind::Ndarray => "burn-ndarray".to_string(),
            BackendKind::Libtorch => "burn-tch (LibTorch)".to_string(),
            BackendKind::CubeclCpu => "burn-cpu (CubeCL, MLIR)".to_string(),
            other => other.to_string(),
        };
        let (value, ratio) = match (r, &torch) {
            (Ok(v), Ok((_, t))) => (
                format!("{v:.0}"),
                t.get(b).map_or("—".into(), |t| format!("{:.2}", v / t)),
            ),
            (Ok(v), Err(_)) => (format!("{v:.0}"), "—".into()),
            (Err(e), _) => (format!("failed: {e}"), "—".into()),
        };
        println!("| {name} | {b} | {value} | {ratio} |");
    }
    match &torch {
        Ok((version, t)) => {
            for (b, v) in t {
                println!("| PyTorch ({version}, CPU) | {b} | {v:.0} | 1.00 |");
            }
        }
        Err(e) => println!("| PyTorch | — | not run: {e} | — |"),
    }
}
