//! Runs several experiment files and compares them on the federation's clock: time to the
//! target accuracy (simulated seconds in memory), rounds or model steps, bytes, and one chart
//! of accuracy against time. Made for synchronous rounds against FedBuff under one device
//! trace (`experiments/async-2nn-*.toml`).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::experiment::{Experiment, Summary, run};

/// One run of a comparison.
#[derive(Debug)]
pub struct Compared {
    /// The experiment's name.
    pub name: String,
    /// `sync` or `fedbuff`.
    pub engine: String,
    /// Secure aggregation on.
    pub secure: bool,
    /// Its summary.
    pub summary: Summary,
    /// (simulated hours, accuracy) after each round.
    pub curve: Vec<(f64, f64)>,
}

/// Runs every file into `out/<name>`, prints the table (each run's time to target as a
/// ratio to the synchronous run with the same secure-aggregation setting), and writes
/// `out/accuracy-vs-time.{svg,png}`.
pub fn compare(files: &[PathBuf], out: &Path) -> anyhow::Result<Vec<Compared>> {
    anyhow::ensure!(!files.is_empty(), "no experiment files");
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut runs = Vec::new();
    let mut target = None;
    for f in files {
        let exp = Experiment::load(f)?;
        target = target.or(exp.target_accuracy);
        println!("running {} …", exp.name);
        let dir = out.join(&exp.name);
        let summary = run(&exp, &dir, false)?;
        let rows = std::fs::read_to_string(dir.join("metrics.csv"))?;
        let mut lines = rows.lines();
        let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (Some(a), Some(t)) = (col("accuracy"), col("sim_secs")) else {
            anyhow::bail!("{}: no accuracy or sim_secs column", dir.display());
        };
        let curve = lines
            .filter_map(|l| {
                let cols: Vec<&str> = l.split(',').collect();
                let acc = cols.get(a)?.parse::<f64>().ok()?;
                let secs = cols.get(t)?.parse::<f64>().ok()?;
                Some((secs / 3600.0, acc))
            })
            .collect();
        runs.push(Compared {
            name: exp.name.clone(),
            engine: exp.engine.kind.clone(),
            secure: exp.secure_aggregation.is_some(),
            summary,
            curve,
        });
    }
    println!(
        "\n{:<28} {:>8} {:>7} {:>8} {:>10} {:>12} {:>9} {:>9} {:>8}",
        "run", "engine", "secure", "rounds", "to target", "time (h)", "vs sync", "accuracy", "GB"
    );
    for r in &runs {
        let s = &r.summary;
        let base = runs
            .iter()
            .find(|b| b.engine == "sync" && b.secure == r.secure)
            .and_then(|b| b.summary.time_to_target_secs);
        let ratio = match (base, s.time_to_target_secs) {
            (Some(b), Some(t)) if t > 0.0 => format!("{:.2}×", b / t),
            _ => "-".into(),
        };
        println!(
            "{:<28} {:>8} {:>7} {:>8} {:>10} {:>12} {:>9} {:>9.4} {:>8.2}",
            r.name,
            r.engine,
            if r.secure { "SecAgg+" } else { "plain" },
            s.rounds,
            s.rounds_to_target
                .map(|x| format!("{x:.1}"))
                .unwrap_or_else(|| "-".into()),
            s.time_to_target_secs
                .map(|x| format!("{:.2}", x / 3600.0))
                .unwrap_or_else(|| "-".into()),
            ratio,
            s.final_accuracy,
            s.bytes_delivered as f64 / 1e9
        );
    }
    let series: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|r| (r.name.clone(), r.curve.clone()))
        .collect();
    crate::plot::accuracy_vs_time(
        &out.join("accuracy-vs-time"),
        "test accuracy against simulated time",
        &series,
        target,
    )?;
    println!("\nchart: {}", out.join("accuracy-vs-time.svg").display());
    Ok(runs)
}
