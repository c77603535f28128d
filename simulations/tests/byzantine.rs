//! 20% of 20 clients send sign-flipped updates scaled ×10 (real Burn training, real round
//! machines, in memory): FedAvg collapses, FedMedian, FedTrimmedAvg and Multi-Krum stay within
//! 2 points of the clean run.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use flotilla_sim::byzantine::{Options, run, table};

#[test]
fn robust_strategies_survive_sign_flipping_attackers() {
    let opts = Options::default();
    let rows = run(&opts).unwrap();
    println!("{}", table(&opts, &rows));
    let clean = rows[0].accuracy;
    let fedavg_attacked = rows[1].accuracy;
    assert!(!rows[0].attacked && rows[1].attacked);
    assert!(clean > 0.85, "clean FedAvg reached only {clean}");
    assert!(
        fedavg_attacked < clean - 0.2,
        "FedAvg under attack {fedavg_attacked} did not collapse (clean {clean})"
    );
    for r in &rows[2..] {
        if ["fedmedian", "fedtrimmedavg", "multikrum"].contains(&r.strategy.as_str()) {
            assert!(
                r.accuracy >= clean - 0.02,
                "{} under attack: {} vs clean {clean}",
                r.strategy,
                r.accuracy
            );
        }
    }
}
