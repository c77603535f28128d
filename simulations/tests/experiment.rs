//! `flotilla-sim run`: experiments on the in-memory transport with real Burn training.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use flotilla_sim::experiment::{Experiment, rounds_to_target, run};

fn small(name: &str) -> Experiment {
    toml::from_str(&format!(
        r#"
name = "{name}"
clients = 20
fraction = 0.25
model = "2nn"
rounds = 3
target_accuracy = 0.99
seed = 4

[data]
name = "bundled"

[partition]
kind = "dirichlet"
alpha = 0.5

[train]
epochs = 1
batch_size = 10
learning_rate = 0.1

[faults]
dropout = 0.2
straggler_fraction = 0.3
straggler_factor = 4.0
"#
    ))
    .unwrap()
}

#[test]
fn rounds_to_target_interpolates_the_best_so_far_curve() {
    // Best so far: 0.5, 0.9, 0.9, 0.96, 0.98 → 0.97 crossed between rounds 3 (0.96) and 4.
    let acc = [0.5, 0.9, 0.85, 0.96, 0.98];
    let r = rounds_to_target(&acc, 0.97).unwrap();
    assert!((r - 3.5).abs() < 1e-9, "{r}");
    assert_eq!(rounds_to_target(&acc, 0.99), None);
    assert_eq!(rounds_to_target(&[0.995], 0.99), Some(0.0));
}

#[test]
fn an_experiment_is_reproducible_from_its_seed_and_writes_its_reports() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a = run(&small("a"), a_dir.path(), false).unwrap();
    let b = run(&small("a"), b_dir.path(), false).unwrap();
    assert_eq!(a.rounds, 3);
    assert_eq!(a.final_accuracy, b.final_accuracy);
    assert!(a.final_accuracy > 0.5, "{}", a.final_accuracy);
    // Same seed → same per-round metrics, byte for byte.
    let csv = |d: &std::path::Path| {
        std::fs::read_to_string(d.join("metrics.csv"))
            .unwrap()
            .lines()
            .map(|l| l.rsplit_once(',').unwrap().0.to_string()) // drop the wall-clock column
            .collect::<Vec<_>>()
    };
    assert_eq!(csv(a_dir.path()), csv(b_dir.path()));
    // Faults were injected: some sampled clients' results were lost.
    let lines = csv(a_dir.path());
    let failures: usize = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(5).unwrap().parse::<usize>().unwrap())
        .sum();
    assert!(failures > 0, "{lines:?}");
    for f in [
        "metrics.json",
        "summary.json",
        "accuracy.svg",
        "accuracy.png",
        "loss.svg",
        "loss.png",
    ] {
        let len = std::fs::metadata(a_dir.path().join(f)).unwrap().len();
        assert!(len > 100, "{f}: {len} bytes");
    }
    // Another seed, another run.
    let mut other = small("a");
    other.seed = 5;
    let c_dir = tempfile::tempdir().unwrap();
    run(&other, c_dir.path(), false).unwrap();
    assert_ne!(csv(a_dir.path()), csv(c_dir.path()));
}
