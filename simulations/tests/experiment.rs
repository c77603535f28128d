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

/// The lines of a run's `metrics.csv` without the wall-clock column.
fn metrics_csv(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string())
        .collect()
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
    let csv = metrics_csv;
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

#[test]
fn experiments_run_with_secure_aggregation_and_differential_privacy() {
    let mut e = small("secure");
    e.clients = 10;
    e.fraction = 0.6;
    e.rounds = 2;
    e.faults = Default::default();
    e.secure_aggregation = Some(toml::from_str("neighbours = 4\nthreshold = 3").unwrap());
    // Little noise (σ = 0.01): with 6 clients a meaningful σ would drown a 199,210-parameter
    // model; this checks that clipping, noise, masking and accounting work together.
    e.dp = Some(toml::from_str("mode = \"client\"\nclip = 1.0\nnoise_multiplier = 0.01").unwrap());
    let dir = tempfile::tempdir().unwrap();
    let s = run(&e, dir.path(), false).unwrap();
    assert_eq!(s.rounds, 2);
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("metrics.json")).unwrap())
            .unwrap();
    for r in rows.as_array().unwrap().iter().skip(1) {
        assert_eq!(r["results"], 6, "{r}");
        assert_eq!(r["aborted"], false);
        assert!(r["epsilon"].as_f64().unwrap() > 0.0);
    }
    assert!(s.final_accuracy > 0.3, "{}", s.final_accuracy);
}

#[test]
fn results_do_not_depend_on_the_number_of_training_workers() {
    // The pool trains the sampled clients in parallel; a job's result depends only on its
    // inputs, so one worker and three give the same rounds, bit for bit.
    let metrics = |workers: usize| {
        let mut e = small("workers");
        e.workers = Some(workers);
        let dir = tempfile::tempdir().unwrap();
        let s = run(&e, dir.path(), false).unwrap();
        assert_eq!(s.training_workers, workers);
        metrics_csv(dir.path())
    };
    assert_eq!(metrics(1), metrics(3));
}

#[test]
fn per_phase_dropouts_under_secure_aggregation_are_survived_reproducibly() {
    let mut e = small("phases");
    e.clients = 12;
    e.fraction = 1.0;
    e.rounds = 3;
    e.faults = toml::from_str(
        "[dropout_at]\nadvertise_keys = 0.05\nshare_keys = 0.05\nmasked_input = 0.1\nunmask = 0.05",
    )
    .unwrap();
    e.round_timeout_secs = 60.0;
    e.secure_aggregation =
        Some(toml::from_str("neighbours = 11\nthreshold = 5\nphase_timeout_ms = 5000").unwrap());
    let go = || {
        let dir = tempfile::tempdir().unwrap();
        run(&e, dir.path(), false).unwrap();
        let rows: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("metrics.json")).unwrap(),
        )
        .unwrap();
        rows.as_array().unwrap().clone()
    };
    let a = go();
    let b = go();
    let strip = |rows: &[serde_json::Value]| {
        rows.iter()
            .map(|r| {
                let mut r = r.clone();
                r.as_object_mut().unwrap().remove("wall_secs");
                r
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&a), strip(&b), "same seed, same rounds");
    let rounds = &a[1..];
    assert_eq!(rounds.len(), 3);
    // Clients dropped at some phase, and the rounds still completed with the survivors.
    let failures: u64 = rounds.iter().map(|r| r["failures"].as_u64().unwrap()).sum();
    assert!(failures > 0, "{rounds:?}");
    for r in rounds {
        assert_eq!(r["aborted"], false, "{r}");
        let results = r["results"].as_u64().unwrap();
        assert!((5..=12).contains(&results), "{r}");
    }
    assert!(a.last().unwrap()["accuracy"].as_f64().unwrap() > 0.5);
}

#[test]
fn an_experiment_runs_over_real_quic_with_a_certificate_per_client() {
    let mut e = small("quic");
    e.transport = flotilla_sim::experiment::Transport::Quic;
    e.clients = 8;
    e.fraction = 0.5;
    e.rounds = 2;
    e.faults = Default::default();
    e.round_timeout_secs = 120.0;
    let dir = tempfile::tempdir().unwrap();
    let s = run(&e, dir.path(), false).unwrap();
    assert_eq!(s.rounds, 2);
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("metrics.json")).unwrap())
            .unwrap();
    let rows = rows.as_array().unwrap();
    for r in &rows[1..] {
        assert_eq!(r["results"], 4, "{r}");
        assert_eq!(r["aborted"], false, "{r}");
    }
    // The model learned: the same 2NN and data as the in-memory test reach > 0.3 in 2 rounds
    // from about 0.1.
    assert!(rows[0]["accuracy"].as_f64().unwrap() < 0.3);
    assert!(s.final_accuracy > 0.3, "{}", s.final_accuracy);
    // Whole models crossed the wire: 4 clients × 2 rounds × (down + up) × 199,210 × 4 bytes.
    assert!(
        s.bytes_delivered > 4 * 2 * 2 * 199_210 * 4,
        "{}",
        s.bytes_delivered
    );
}

#[test]
fn slow_speed_profiles_miss_the_round_deadline() {
    // Half the clients take 10× as long (10 simulated seconds) as the others; with a 5 s round
    // deadline only the fast half's results count.
    let mut e = small("profiles");
    e.clients = 20;
    e.fraction = 1.0;
    e.rounds = 2;
    e.faults = toml::from_str(
        "compute_secs = 1.0\n[[speed_profiles]]\nshare = 1.0\nfactor = 1.0\n[[speed_profiles]]\nshare = 1.0\nfactor = 10.0",
    )
    .unwrap();
    e.round_timeout_secs = 5.0;
    let dir = tempfile::tempdir().unwrap();
    run(&e, dir.path(), false).unwrap();
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("metrics.json")).unwrap())
            .unwrap();
    for r in &rows.as_array().unwrap()[1..] {
        let results = r["results"].as_u64().unwrap();
        let failures = r["failures"].as_u64().unwrap();
        assert_eq!(results + failures, 20, "{r}");
        // Seeded draw of 20 clients from two equal profiles: neither all fast nor all slow.
        assert!((4..=16).contains(&results), "{r}");
        assert_eq!(r["aborted"], false, "{r}");
    }
}

#[test]
fn every_shipped_experiment_file_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let e = flotilla_sim::experiment::Experiment::load(&path)
                .unwrap_or_else(|err| panic!("{}: {err:#}", path.display()));
            // The strategy and the server-side settings the file names must build too.
            flotilla_sim::experiment::validate(&e)
                .unwrap_or_else(|err| panic!("{}: {err:#}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 7, "{n} experiment files");
}

#[test]
fn heavy_tailed_speeds_are_seeded_and_a_trace_file_is_checked() {
    use flotilla_sim::experiment::{Faults, read_speed_trace};
    let f = Faults {
        speed_lognormal_sigma: 1.0,
        ..Faults::default()
    };
    let a = f.slowdowns(10_000, 3).unwrap();
    assert_eq!(a, f.slowdowns(10_000, 3).unwrap());
    assert_ne!(a, f.slowdowns(10_000, 4).unwrap());
    // Log-normal with median 1 and σ = 1: median ≈ 1, about 16 % above e¹.
    let mut sorted = a.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[5_000];
    assert!((median - 1.0).abs() < 0.05, "{median}");
    let above = a.iter().filter(|&&x| x > 1f64.exp()).count() as f64 / 1e4;
    assert!((above - 0.1587).abs() < 0.015, "{above}");
    // Off: everyone at speed 1.
    assert!(
        Faults::default()
            .slowdowns(5, 3)
            .unwrap()
            .iter()
            .all(|&x| x == 1.0)
    );

    let dir = tempfile::tempdir().unwrap();
    let write = |text: &str| {
        let p = dir.path().join("trace.csv");
        std::fs::write(&p, text).unwrap();
        p
    };
    let p = write("client,speed_factor\n0,1.0\n1,2.5\n# slow\n2,10\n");
    assert_eq!(read_speed_trace(&p).unwrap(), vec![1.0, 2.5, 10.0]);
    let traced = Faults {
        speed_trace: Some(p),
        speed_lognormal_sigma: 1.0,
        ..Faults::default()
    };
    assert_eq!(
        traced.slowdowns(5, 0).unwrap(),
        vec![1.0, 2.5, 10.0, 1.0, 2.5]
    );
    for bad in [
        "0,1\n2,1\n",      // a gap
        "0,1\n0,2\n",      // a client twice
        "0,0\n",           // not positive
        "0,NaN\n",         // not finite
        "0,1e9\n",         // too slow to be a device
        "0,1,3\n",         // a third column
        "x,1\n0,1\n1,y\n", // a bad line after the header
        "client,speed\n",  // no client
    ] {
        assert!(read_speed_trace(&write(bad)).is_err(), "{bad:?}");
    }
}

#[test]
fn devices_that_come_and_go_run_reproducibly_in_memory_and_are_refused_over_quic() {
    use flotilla_sim::experiment::{Faults, Transport, read_availability_trace};
    // Diurnal availability: each client online for half of every simulated hour, a local
    // epoch taking a minute.
    let mut e = small("diurnal");
    e.faults = Faults {
        compute_secs: 60.0,
        diurnal_period_secs: 3600.0,
        diurnal_online_fraction: 0.5,
        ..Faults::default()
    };
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a = run(&e, a_dir.path(), false).unwrap();
    let b = run(&e, b_dir.path(), false).unwrap();
    assert_eq!(a.rounds, 3);
    assert_eq!(a.sim_secs, b.sim_secs);
    assert_eq!(metrics_csv(a_dir.path()), metrics_csv(b_dir.path()));
    assert!(a.sim_secs > 180.0, "{}", a.sim_secs);
    // Half of the clients are away at any time: each has windows of 1,800 s per 3,600 s.
    let w = e.faults.availability(4, e.seed, 7200.0).unwrap();
    for windows in w.iter().flatten() {
        let online: f64 = windows
            .iter()
            .map(|(s, t)| t.min(7200.0) - s.min(7200.0))
            .sum();
        assert!((online - 3600.0).abs() < 1e-6, "{windows:?}");
    }
    let mut q = e.clone();
    q.transport = Transport::Quic;
    assert!(flotilla_sim::experiment::validate(&q).is_err());
    let mut bad = e.clone();
    bad.faults.diurnal_period_secs = 1.0;
    assert!(flotilla_sim::experiment::validate(&bad).is_err());

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("availability.csv");
    std::fs::write(&p, "client,start,end\n0,0,10\n0,20,30\n2,5,6\n").unwrap();
    let t = read_availability_trace(&p).unwrap();
    assert_eq!(t[&0], vec![(0.0, 10.0), (20.0, 30.0)]);
    assert_eq!(t[&2], vec![(5.0, 6.0)]);
    for bad in [
        "0,0,10\n0,5,15\n",
        "0,10,5\n",
        "0,-1,5\n",
        "0,0,inf\n",
        "0,1\n",
    ] {
        std::fs::write(&p, bad).unwrap();
        assert!(read_availability_trace(&p).is_err(), "{bad:?}");
    }
}
