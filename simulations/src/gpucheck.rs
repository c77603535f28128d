//! `flotilla-sim gpu-check`: what a GPU machine gives Flotilla, in one run of a release binary
//! (no cargo, no network; `scripts/gpu-check.sh` runs it and says how to carry it there).
//!
//! It prints:
//! 1. the CUDA devices found (or why none is usable: then only the CPU figures follow);
//! 2. CNN training throughput (samples/s, one epoch of `BurnTrainer` over the same examples,
//!    median of `repeats` timed runs after a warm-up) at B = 10, 50 and 256 on CUDA in f32,
//!    bf16 and f16, next to `flex` on this machine's CPU, with the ratio;
//! 3. the CNN IID preset's first rounds on CUDA and on the CPU from the same seed (the same
//!    initial weights, drawn on the CPU): test accuracy per round, side by side;
//! 4. the preset run on CUDA until its target accuracy (99 %): rounds and wall time.
//!
//! Steps 3 and 4 need the full MNIST (`--data`); without it they are skipped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use flotilla_client::Module;
use flotilla_client::data::{Split, bundled};
use flotilla_client::{
    BackendKind, BurnTrainer, Cnn, Device, LocalData, Precision, Trainer, cuda_devices, seeded,
    select_device,
};
use flotilla_protocol::wire::messages::{BatchSize, Optimizer, TrainConfig};

use crate::experiment::{Experiment, Summary};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The preset (an experiment file) for steps 3 and 4.
    pub preset: PathBuf,
    /// MNIST IDX directory for steps 3 and 4 (skipped without it).
    pub data: Option<PathBuf>,
    /// Where the preset runs write their outputs.
    pub out: PathBuf,
    /// Examples per timed epoch on the GPU (the CPU gets a fifth, at least 100).
    pub samples: usize,
    /// Timed runs per figure (the median is printed).
    pub repeats: usize,
    /// Rounds compared in step 3.
    pub compare_rounds: u64,
    /// Most rounds for step 4.
    pub max_rounds: u64,
    /// Batch sizes of step 2.
    pub batches: Vec<u32>,
    /// Skip steps 3 and 4.
    pub throughput_only: bool,
    /// Skip step 2.
    pub skip_throughput: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            preset: PathBuf::from("experiments/mcmahan-cnn-iid.toml"),
            data: None,
            out: PathBuf::from("out/gpu-check"),
            samples: 5000,
            repeats: 3,
            compare_rounds: 3,
            max_rounds: 60,
            batches: vec![10, 50, 256],
            throughput_only: false,
            skip_throughput: false,
        }
    }
}

/// One throughput figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Throughput {
    /// `flex` or `cuda`.
    pub backend: String,
    /// Arithmetic precision.
    pub precision: Precision,
    /// Batch size.
    pub batch: u32,
    /// Samples per second (median), or why it failed.
    pub samples_per_sec: Result<f64, String>,
}

/// What the check found.
#[derive(Clone, Debug)]
pub struct Report {
    /// CUDA devices found (their debug names), or why none.
    pub devices: Result<Vec<String>, String>,
    /// Step 2.
    pub throughput: Vec<Throughput>,
    /// Step 3: accuracy per round (round 0 = the initial model) on CUDA and on the CPU.
    pub compare: Option<(Vec<f64>, Vec<f64>)>,
    /// Step 4.
    pub to_target: Option<Summary>,
}

/// [`throughput_of`], with a panic inside the backend (a kernel that fails to compile, a
/// driver error) reported as a failed figure instead of ending the check.
fn throughput(
    device: &Device,
    precision: Precision,
    batch: u32,
    n: usize,
    repeats: usize,
) -> Result<f64, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        throughput_of(device, precision, batch, n, repeats)
    }))
    .unwrap_or_else(|p| Err(format!("panicked: {}", panic_text(&p))))
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Samples/s of one epoch of CNN training over `n` bundled MNIST examples on `device`.
fn throughput_of(
    device: &Device,
    precision: Precision,
    batch: u32,
    n: usize,
    repeats: usize,
) -> Result<f64, String> {
    let data = bundled::mnist(Split::Train).map_err(|e| e.to_string())?;
    let model = seeded(&select_device(BackendKind::Cpu).0, 1, |d| {
        Cnn::new(28, 10, d)
    });
    let trainer = BurnTrainer::new(model.to_device(device), LocalData::all(data.head(n)), None)
        .map_err(|e| e.to_string())?;
    let mut trainer = trainer
        .with_precision(precision)
        .map_err(|e| e.to_string())?;
    let global = trainer.initial_params().map_err(|e| e.to_string())?;
    let config = TrainConfig {
        epochs: 1,
        batch_size: BatchSize::Fixed(batch),
        learning_rate: 0.01,
        optimizer: Optimizer::Sgd { momentum: 0.0 },
        ..TrainConfig::default()
    };
    // Warm-up: kernels compiled and autotuned, memory pools grown.
    trainer.train(&global, &config).map_err(|e| e.to_string())?;
    let mut runs = Vec::new();
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        // The update is read back to the host as f32: the time includes the GPU finishing.
        let u = trainer.train(&global, &config).map_err(|e| e.to_string())?;
        runs.push(u.num_examples as f64 / start.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    runs.get(runs.len() / 2)
        .copied()
        .ok_or_else(|| "no run".to_string())
}

fn cuda_found() -> Result<Vec<Device>, String> {
    let (_, used) = select_device(BackendKind::Cuda);
    if used != BackendKind::Cuda {
        return Err("CUDA not usable here (the line above says why)".into());
    }
    let all = cuda_devices();
    if all.is_empty() {
        Err("no CUDA device found".into())
    } else {
        Ok(all)
    }
}

/// Runs the check, printing as it goes; returns what it printed, as data.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let gpus = cuda_found();
    let mut report = Report {
        devices: Err(String::new()),
        throughput: Vec::new(),
        compare: None,
        to_target: None,
    };
    match &gpus {
        Ok(d) => {
            println!("CUDA devices: {}", d.len());
            for (i, dev) in d.iter().enumerate() {
                println!("  [{i}] {dev:?}");
            }
        }
        Err(why) => println!("no CUDA device: {why}; CPU figures only"),
    }
    report.devices = gpus
        .as_ref()
        .map(|d| d.iter().map(|x| format!("{x:?}")).collect())
        .map_err(Clone::clone);

    println!();
    println!(
        "CNN training throughput (samples/s, median of {}; one epoch of BurnTrainer, SGD)",
        opts.repeats
    );
    println!("| backend | precision | B | samples/s | × flex |\n|---|---|---:|---:|---:|");
    let cpu = select_device(BackendKind::Cpu).0;
    let cpu_n = (opts.samples / 5).max(100);
    let batches: &[u32] = if opts.skip_throughput {
        &[]
    } else {
        &opts.batches
    };
    for &b in batches {
        let flex = throughput(&cpu, Precision::F32, b, cpu_n, opts.repeats);
        print_row("flex", Precision::F32, b, &flex, None);
        report.throughput.push(Throughput {
            backend: "flex".into(),
            precision: Precision::F32,
            batch: b,
            samples_per_sec: flex.clone(),
        });
        if let Ok(d) = &gpus
            && let Some(gpu) = d.first()
        {
            for p in [Precision::F32, Precision::Bf16, Precision::F16] {
                let r = throughput(gpu, p, b, opts.samples, opts.repeats);
                print_row("cuda", p, b, &r, flex.as_ref().ok().copied());
                report.throughput.push(Throughput {
                    backend: "cuda".into(),
                    precision: p,
                    batch: b,
                    samples_per_sec: r,
                });
            }
        }
    }

    if opts.throughput_only {
        return Ok(report);
    }
    let Some(data) = &opts.data else {
        println!("\nno --data (MNIST IDX directory): the preset runs are skipped");
        return Ok(report);
    };
    if gpus.is_err() {
        println!("\nno GPU: the preset runs are skipped");
        return Ok(report);
    }
    let mut exp = Experiment::load(&opts.preset)?;
    exp.data.dir = Some(data.clone());

    println!(
        "\n{}: the first {} rounds from the same seed on CUDA and on the CPU (test accuracy)",
        exp.name, opts.compare_rounds
    );
    let mut short = exp.clone();
    short.rounds = opts.compare_rounds;
    short.run_past_target = true;
    short.backend = BackendKind::Cuda;
    let on_gpu = timed_run(&short, &opts.out.join("compare-cuda"))?;
    short.backend = BackendKind::Cpu;
    let on_cpu = timed_run(&short, &opts.out.join("compare-cpu"))?;
    let (a, b) = (
        accuracies(&opts.out.join("compare-cuda"))?,
        accuracies(&opts.out.join("compare-cpu"))?,
    );
    println!("| round | CUDA | CPU (flex) | difference |\n|---:|---:|---:|---:|");
    for (r, (x, y)) in a.iter().zip(&b).enumerate() {
        println!("| {r} | {x:.4} | {y:.4} | {:+.4} |", x - y);
    }
    println!(
        "wall time: CUDA {:.1} s ({} workers), CPU {:.1} s ({} workers)",
        on_gpu.wall_secs, on_gpu.training_workers, on_cpu.wall_secs, on_cpu.training_workers
    );
    report.compare = Some((a, b));

    println!(
        "\n{} on CUDA until {:?} test accuracy (at most {} rounds)",
        exp.name, exp.target_accuracy, opts.max_rounds
    );
    let mut full = exp.clone();
    full.rounds = opts.max_rounds;
    full.backend = BackendKind::Cuda;
    let s = timed_run(&full, &opts.out.join("to-target-cuda"))?;
    println!(
        "{} rounds in {:.1} s ({:.2} s per round, {} workers); final accuracy {:.4}; {}",
        s.rounds,
        s.wall_secs,
        s.secs_per_round.unwrap_or(f64::NAN),
        s.training_workers,
        s.final_accuracy,
        match s.rounds_to_target {
            Some(r) => format!("target reached in {r:.1} rounds"),
            None => "target not reached".into(),
        }
    );
    report.to_target = Some(s);
    Ok(report)
}

fn print_row(backend: &str, p: Precision, b: u32, r: &Result<f64, String>, flex: Option<f64>) {
    match (r, flex) {
        (Ok(v), Some(f)) => println!("| {backend} | {p} | {b} | {v:.0} | {:.2} |", v / f),
        (Ok(v), None) => println!("| {backend} | {p} | {b} | {v:.0} | 1.00 |"),
        (Err(e), _) => println!("| {backend} | {p} | {b} | failed: {e} | |"),
    }
}

fn timed_run(exp: &Experiment, out: &Path) -> anyhow::Result<Summary> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::experiment::run(exp, out, false)
    }))
    .unwrap_or_else(|p| Err(anyhow::anyhow!("the run panicked: {}", panic_text(&p))))
}

/// Test accuracy per round from a run's `metrics.json`.
fn accuracies(out: &Path) -> anyhow::Result<Vec<f64>> {
    let text = std::fs::read_to_string(out.join("metrics.json"))?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    Ok(rows
        .iter()
        .filter_map(|r| r.get("accuracy").and_then(serde_json::Value::as_f64))
        .collect())
}
