//! `flotilla-server export` writes a model PyTorch loads as it is: the test exports the CNN
//! and the 2NN from checkpoints through the real binary, then runs `scripts/check-export.py`,
//! which builds the equivalent `nn.Module`, calls
//! `load_state_dict(safetensors.torch.load_file(...))` (strict) and compares its logits on
//! MNIST test images with Burn's. Without PyTorch the script does the same forward pass in
//! NumPy with PyTorch's layouts. Python 3 with NumPy is required (`FLOTILLA_PYTHON` picks the
//! interpreter; CI installs Debian's python3-numpy).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use flotilla_client::convert::{manifest_of, to_params};
use flotilla_client::data::{Split, bundled};
use flotilla_client::trainer::make_batch;
use flotilla_client::{Classifier, Cnn, Device, Mlp2nn, seeded};
use flotilla_protocol::coordinator::Snapshot;

fn check<M: Classifier>(model: M, name: &str, dir: &Path) {
    let device = Device::flex();
    let manifest = Arc::new(manifest_of(&model));
    let params = to_params(&model, &manifest).unwrap();
    // A checkpoint as the server writes it, exported by the binary as an operator would.
    let checkpoints = dir.join(format!("checkpoints-{name}"));
    let snapshot = Snapshot {
        round: 7,
        global: params,
        history: Vec::new(),
        strategy_state: Vec::new(),
        accountant: None,
        last_task: None,
    };
    flotilla_server::checkpoint::write(&checkpoints, &snapshot, "fedavg").unwrap();
    let out = dir.join(format!("{name}.safetensors"));
    let status = Command::new(env!("CARGO_BIN_EXE_flotilla-server"))
        .arg("export")
        .arg("--checkpoint-dir")
        .arg(&checkpoints)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());

    // Burn's logits for 16 test images.
    let test = bundled::mnist(Split::Test).unwrap();
    let idx: Vec<usize> = (0..16).collect();
    let (x, _) = make_batch(&test, &idx, &device);
    let inputs: Vec<f32> = x.clone().into_data().try_to_vec::<f32>().unwrap();
    let logits: Vec<f32> = model.forward(x).into_data().try_to_vec::<f32>().unwrap();
    let rows = |v: &[f32], w: usize| v.chunks(w).map(<[f32]>::to_vec).collect::<Vec<_>>();
    let io = serde_json::json!({
        "inputs": rows(&inputs, test.features()),
        "logits": rows(&logits, 10),
    });
    let io_path = dir.join(format!("{name}-io.json"));
    std::fs::write(&io_path, io.to_string()).unwrap();

    let python = python_with_numpy();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check-export.py");
    let result = Command::new(&python)
        .arg(&script)
        .arg(&out)
        .arg(name)
        .arg(&io_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (Python 3 with NumPy is needed): {e}"));
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(result.status.success(), "{name}: {stdout}{stderr}");
}

/// `FLOTILLA_PYTHON`, else the first of `python3` and `/usr/bin/python3` (Debian's, where
/// python3-numpy installs; a pyenv `python3` first on the PATH may lack NumPy) that has NumPy.
fn python_with_numpy() -> String {
    if let Ok(p) = std::env::var("FLOTILLA_PYTHON") {
        return p;
    }
    for p in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(p)
            .args(["-c", "import numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return p.into();
        }
    }
    panic!("no Python 3 with NumPy (apt install python3-numpy, or set FLOTILLA_PYTHON)");
}

#[test]
fn exported_models_load_in_pytorch_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    check(
        seeded(&device, 1, |d| Cnn::new(28, 10, d)),
        "cnn",
        dir.path(),
    );
    check(
        seeded(&device, 2, |d| Mlp2nn::new(784, 10, d)),
        "2nn",
        dir.path(),
    );
}
