//! `flotilla-sim gpu-check` on a machine without a GPU (CI, this build without `cuda`): it
//! says so and still measures the CPU; the preset runs are skipped, not failed.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use flotilla_client::Precision;
use flotilla_sim::gpucheck::{Options, run};

#[test]
fn without_a_gpu_the_check_reports_the_cpu_only() {
    let opts = Options {
        samples: 100,
        repeats: 1,
        batches: vec![10, 50],
        data: Some("../../shared/data/mnist".into()),
        out: tempfile::tempdir().unwrap().path().to_path_buf(),
        ..Options::default()
    };
    let report = run(&opts).unwrap();
    let why = report.devices.unwrap_err();
    assert!(!why.is_empty());
    assert_eq!(report.throughput.len(), 2, "{:?}", report.throughput);
    for (t, b) in report.throughput.iter().zip([10, 50]) {
        assert_eq!(t.backend, "flex");
        assert_eq!(t.precision, Precision::F32);
        assert_eq!(t.batch, b);
        let v = *t.samples_per_sec.as_ref().unwrap();
        assert!(v.is_finite() && v > 0.0, "{v}");
    }
    assert!(report.compare.is_none() && report.to_target.is_none());
}
