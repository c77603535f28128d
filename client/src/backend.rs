//! Choosing the compute device at run time.
//!
//! Burn 0.22 has no backend type parameter: a `Device` value selects the backend. Flotilla
//! builds CPU training on burn's pure-Rust `flex` backend by default; `burn-ndarray` is
//! available behind the `ndarray` feature and CUDA behind the `cuda` feature. A client asked
//! for a backend it cannot use says so in one log line and trains on `flex` instead.

use burn::tensor::Device;

/// A compute backend, as named in configs and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's `flex` CPU backend (the default).
    #[default]
    Cpu,
    /// `burn-ndarray` (feature `ndarray`).
    Ndarray,
    /// NVIDIA GPU through `burn-cuda` (feature `cuda`).
    Cuda,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Cuda => "cuda",
        })
    }
}

impl std::str::FromStr for BackendKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(BackendKind::Cpu),
            "ndarray" => Ok(BackendKind::Ndarray),
            "cuda" | "gpu" => Ok(BackendKind::Cuda),
            other => Err(crate::Error::Config(format!(
                "unknown backend {other:?} (expected cpu, ndarray or cuda)"
            ))),
        }
    }
}

/// The device for `wanted`, or the `flex` CPU device with one warning line if `wanted` cannot
/// be used here. Returns the device (without autodiff) and the backend actually used.
pub fn select_device(wanted: BackendKind) -> (Device, BackendKind) {
    select_device_at(wanted, 0)
}

/// [`select_device`] with the index of the GPU to use (for `cuda`; ignored otherwise).
pub fn select_device_at(wanted: BackendKind, index: usize) -> (Device, BackendKind) {
    match wanted {
        BackendKind::Cpu => (Device::flex(), BackendKind::Cpu),
        BackendKind::Ndarray => ndarray_device(),
        BackendKind::Cuda => match cuda_device(index) {
            Ok(d) => (d, BackendKind::Cuda),
            Err(why) => {
                tracing::warn!(
                    "CUDA requested but not usable ({why}); training on the CPU (flex) instead"
                );
                (Device::flex(), BackendKind::Cpu)
            }
        },
    }
}

#[cfg(feature = "ndarray")]
fn ndarray_device() -> (Device, BackendKind) {
    #[allow(deprecated)] // burn 0.22 deprecates ndarray in favour of flex; we keep it on request
    (Device::ndarray(), BackendKind::Ndarray)
}

#[cfg(not(feature = "ndarray"))]
fn ndarray_device() -> (Device, BackendKind) {
    tracing::warn!(
        "backend ndarray requested but this build lacks the `ndarray` feature; training on the CPU (flex) instead"
    );
    (Device::flex(), BackendKind::Cpu)
}

/// The CUDA devices this machine has (empty without the `cuda` feature, a driver or a GPU).
pub fn cuda_devices() -> Vec<Device> {
    cuda_list().unwrap_or_default()
}

#[cfg(feature = "cuda")]
fn cuda_device(index: usize) -> Result<Device, String> {
    let devices = cuda_list()?;
    let found = devices.len();
    devices.into_iter().nth(index).ok_or_else(|| {
        if found == 0 {
            "no CUDA device found".to_string()
        } else {
            format!("CUDA device {index} asked for, {found} found (indices from 0)")
        }
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_index: usize) -> Result<Device, String> {
    cuda_list().map(|_| Device::flex())
}

#[cfg(feature = "cuda")]
fn cuda_list() -> Result<Vec<Device>, String> {
    // Creating a CUDA device where there is no GPU or driver panics inside the runtime, so the
    // devices are listed first, with the panic caught and its message kept off the terminal.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let found = std::panic::catch_unwind(|| {
        burn::tensor::Device::enumerate(burn::tensor::DeviceType::Cuda).into_vec()
    });
    std::panic::set_hook(previous);
    found.map_err(|_| "the CUDA driver or runtime is not available".to_string())
}

#[cfg(not(feature = "cuda"))]
fn cuda_list() -> Result<Vec<Device>, String> {
    Err(
        "this build lacks the `cuda` feature; rebuild with --features cuda (see the README: \
         it builds offline against Debian's LLVM)"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_cuda_falls_back_without_panicking() {
        assert_eq!("CPU".parse::<BackendKind>().unwrap(), BackendKind::Cpu);
        assert_eq!(
            "ndarray".parse::<BackendKind>().unwrap(),
            BackendKind::Ndarray
        );
        assert!("tpu".parse::<BackendKind>().is_err());
        // No GPU on the test machines: asking for CUDA must yield a usable CPU device.
        let (device, used) = select_device(BackendKind::Cuda);
        if used == BackendKind::Cpu {
            let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], &device);
            assert_eq!(t.sum().into_scalar::<f32>(), 3.0);
        }
    }
}
