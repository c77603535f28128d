//! Choosing the compute device at run time.
//!
//! Burn 0.22 has no backend type parameter: a `Device` value selects the backend. Flotilla
//! builds CPU training on burn's pure-Rust `flex` backend by default. The other CPU backends
//! burn 0.22.1 offers are features, for comparison (`cargo bench -p flotilla-client --bench
//! cpu_backends`): `burn-ndarray` (`ndarray`), LibTorch through `burn-tch` (`tch`, needs a
//! PyTorch 2.9.0 at build and run time) and CubeCL's CPU backend (`cubecl-cpu`, built
//! against LLVM/MLIR like CUDA). CUDA is the `cuda` feature. A client asked for a backend it
//! cannot use says so in one log line and trains on `flex` instead.

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
    /// LibTorch on the CPU through `burn-tch` (feature `tch`).
    Libtorch,
    /// CubeCL's CPU backend, kernels compiled through MLIR/LLVM (feature `cubecl-cpu`).
    #[serde(rename = "cubecl-cpu")]
    CubeclCpu,
}

impl BackendKind {
    /// Every backend, in the order tables list them.
    pub const ALL: [BackendKind; 5] = [
        BackendKind::Cpu,
        BackendKind::Ndarray,
        BackendKind::Libtorch,
        BackendKind::CubeclCpu,
        BackendKind::Cuda,
    ];

    /// Whether this build can run it (its feature is on; a GPU may still be missing).
    pub fn compiled(self) -> bool {
        match self {
            BackendKind::Cpu => true,
            BackendKind::Ndarray => cfg!(feature = "ndarray"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
            BackendKind::Libtorch => cfg!(feature = "tch"),
            BackendKind::CubeclCpu => cfg!(feature = "cubecl-cpu"),
        }
    }

    /// The cargo feature that builds it (`None` for the default `flex`).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            BackendKind::Cpu => None,
            BackendKind::Ndarray => Some("ndarray"),
            BackendKind::Cuda => Some("cuda"),
            BackendKind::Libtorch => Some("tch"),
            BackendKind::CubeclCpu => Some("cubecl-cpu"),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Cuda => "cuda",
            BackendKind::Libtorch => "libtorch",
            BackendKind::CubeclCpu => "cubecl-cpu",
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
            "libtorch" | "tch" => Ok(BackendKind::Libtorch),
            "cubecl-cpu" => Ok(BackendKind::CubeclCpu),
            other => Err(crate::Error::Config(format!(
                "unknown backend {other:?} (expected cpu, ndarray, libtorch, cubecl-cpu or cuda)"
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
        BackendKind::Libtorch => libtorch_device(),
        BackendKind::CubeclCpu => cubecl_cpu_device(),
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
    missing_feature(BackendKind::Ndarray)
}

#[cfg(feature = "tch")]
fn libtorch_device() -> (Device, BackendKind) {
    #[allow(deprecated)] // burn 0.22 deprecates burn-tch; kept as a feature for comparison
    (Device::libtorch(), BackendKind::Libtorch)
}

#[cfg(not(feature = "tch"))]
fn libtorch_device() -> (Device, BackendKind) {
    missing_feature(BackendKind::Libtorch)
}

#[cfg(feature = "cubecl-cpu")]
fn cubecl_cpu_device() -> (Device, BackendKind) {
    (Device::cpu(), BackendKind::CubeclCpu)
}

#[cfg(not(feature = "cubecl-cpu"))]
fn cubecl_cpu_device() -> (Device, BackendKind) {
    missing_feature(BackendKind::CubeclCpu)
}

#[allow(dead_code)] // unused when every optional CPU backend is compiled in
fn missing_feature(wanted: BackendKind) -> (Device, BackendKind) {
    tracing::warn!(
        "backend {wanted} requested but this build lacks the `{}` feature; training on the CPU (flex) instead",
        wanted.feature().unwrap_or_default()
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
        for b in BackendKind::ALL {
            assert_eq!(b.to_string().parse::<BackendKind>().unwrap(), b);
            #[derive(serde::Deserialize)]
            struct InConfig {
                backend: BackendKind,
            }
            let c: InConfig = toml::from_str(&format!("backend = \"{b}\"")).unwrap();
            assert_eq!(c.backend, b);
            // A backend this build lacks falls back to flex, which works.
            if !b.compiled() {
                let (device, used) = select_device(b);
                assert_eq!(used, BackendKind::Cpu);
                let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], &device);
                assert_eq!(t.sum().into_scalar::<f32>(), 3.0);
            }
        }
        // No GPU on the test machines: asking for CUDA must yield a usable CPU device.
        let (device, used) = select_device(BackendKind::Cuda);
        if used == BackendKind::Cpu {
            let t = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], &device);
            assert_eq!(t.sum().into_scalar::<f32>(), 3.0);
        }
    }
}
