//! Conversion between a Burn module and the flat [`Params`] the server aggregates.
//!
//! The manifest is the module's float parameters in visiting order, named by their dotted path
//! (`conv1.weight`). Names and layouts are **PyTorch's**, the field's common format, so that a
//! federation's model (a checkpoint, an export, another framework's client) is read without
//! conversion: a `Linear` weight, `[in, out]` in Burn, is `[out, in]` in the flat vector, and
//! normalization layers' `gamma`/`beta` are `weight`/`bias` (the rules of burn-store's
//! `BurnToPyTorchAdapter`). Convolutions already share PyTorch's `[out, in, kh, kw]`.
//!
//! Loading checks the whole manifest first, so a mismatched vector is a typed error and never
//! a panic, and then replaces each parameter's tensor in place, keeping its id, device and
//! gradient setting. The round trip is bit-exact.

use std::sync::Arc;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use flotilla_protocol::{Manifest, Params, TensorSpec};

use crate::Error;

/// Where a visitor is in the module tree: each level's field name and the type of the module
/// that holds it (burn passes `("fc1", "Struct:Cnn")`, then `("weight", "Struct:Linear")`).
#[derive(Default)]
struct Path {
    names: Vec<String>,
    containers: Vec<String>,
}

/// How a parameter is stored in the flat vector, relative to Burn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// As in Burn.
    Same,
    /// The last two dimensions swapped (a `Linear` weight: Burn `[in, out]`, PyTorch
    /// `[out, in]`).
    Transposed,
}

impl Path {
    fn enter(&mut self, name: &str, container: &str) {
        self.names.push(name.to_string());
        self.containers.push(container.to_string());
    }

    fn exit(&mut self) {
        self.names.pop();
        self.containers.pop();
    }

    /// The module type holding the current parameter (collection wrappers looked past).
    fn module_type(&self) -> Option<&str> {
        self.containers
            .iter()
            .rev()
            .find(|c| c.starts_with("Struct:") || c.starts_with("Enum:"))
            .map(String::as_str)
    }

    /// The current parameter's PyTorch name and layout.
    fn pytorch(&self, rank: usize) -> (String, Layout) {
        let module = self.module_type().unwrap_or_default();
        let leaf = self.names.last().map(String::as_str).unwrap_or_default();
        let norm = matches!(
            module,
            "Struct:BatchNorm" | "Struct:LayerNorm" | "Struct:GroupNorm" | "Struct:RmsNorm"
        );
        let renamed = match (norm, leaf) {
            (true, "gamma") => Some("weight"),
            (true, "beta") => Some("bias"),
            _ => None,
        };
        let name = match renamed {
            Some(r) => {
                let mut n = self.names.clone();
                if let Some(last) = n.last_mut() {
                    *last = r.to_string();
                }
                n.join(".")
            }
            None => self.names.join("."),
        };
        let layout = if module == "Struct:Linear" && leaf == "weight" && rank == 2 {
            Layout::Transposed
        } else {
            Layout::Same
        };
        (name, layout)
    }
}

/// `dims` as stored in the flat vector.
fn stored_dims<const D: usize>(mut dims: [usize; D], layout: Layout) -> [usize; D] {
    if layout == Layout::Transposed && D >= 2 {
        dims.swap(D - 2, D - 1);
    }
    dims
}

struct ManifestVisitor {
    path: Path,
    specs: Vec<TensorSpec>,
}

impl ModuleVisitor for ManifestVisitor {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let (name, layout) = self.path.pytorch(D);
        self.specs.push(TensorSpec::new(
            name,
            &stored_dims(param.lazy_shape().dims::<D>(), layout),
        ));
    }
}

/// The manifest of a module (no tensor data is read): PyTorch's names and shapes.
pub fn manifest_of<M: Module>(module: &M) -> Manifest {
    let mut v = ManifestVisitor {
        path: Path::default(),
        specs: Vec::new(),
    };
    module.visit(&mut v);
    Manifest::new(v.specs)
}

struct FlatVisitor {
    path: Path,
    tensors: Vec<Tensor<1>>,
}

impl ModuleVisitor for FlatVisitor {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = match self.path.pytorch(D).1 {
            Layout::Same => param.val(),
            Layout::Transposed => param.val().transpose(),
        };
        let n = t.shape().num_elements();
        self.tensors.push(t.reshape([n]));
    }
}

/// The module's parameters as flat tensors in the federation's layout, in manifest order,
/// still on the module's device and in its autodiff graph (so that a loss may be computed
/// against a flat [`Params`], as FedProx's proximal term is).
pub fn flat_tensors<M: Module>(module: &M) -> Vec<Tensor<1>> {
    let mut v = FlatVisitor {
        path: Path::default(),
        tensors: Vec::new(),
    };
    module.visit(&mut v);
    v.tensors
}

struct ValuesVisitor {
    path: Path,
    values: Vec<f32>,
    error: Option<Error>,
}

impl ModuleVisitor for ValuesVisitor {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = match self.path.pytorch(D).1 {
            Layout::Same => param.val().into_data(),
            Layout::Transposed => param.val().transpose().into_data(),
        };
        match data.as_slice::<f32>() {
            Ok(s) => self.values.extend_from_slice(s),
            Err(e) => {
                // A non-f32 parameter (e.g. f16): convert.
                match data.convert::<f32>().as_slice::<f32>() {
                    Ok(s) => self.values.extend_from_slice(s),
                    Err(_) => {
                        self.error =
                            Some(Error::Model(format!("cannot read parameter as f32: {e:?}")))
                    }
                }
            }
        }
    }
}

/// Reads a module's parameters into flat [`Params`] with the given manifest (from
/// [`manifest_of`], cached by the caller).
pub fn to_params<M: Module>(module: &M, manifest: &Arc<Manifest>) -> Result<Params, Error> {
    let mut v = ValuesVisitor {
        path: Path::default(),
        values: Vec::with_capacity(manifest.numel() as usize),
        error: None,
    };
    module.visit(&mut v);
    if let Some(e) = v.error {
        return Err(e);
    }
    Ok(Params::new(manifest.clone(), v.values)?)
}

struct LoadMapper<'a> {
    path: Path,
    values: &'a [f32],
    offset: usize,
    device: Device,
}

impl ModuleMapper for LoadMapper<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.path.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dims = param.lazy_shape().dims::<D>();
        let n: usize = dims.iter().product();
        // The manifest was checked against the module before mapping, so this slice exists;
        // should it not, the parameter is left untouched rather than panicking.
        let Some(chunk) = self.values.get(self.offset..self.offset + n) else {
            return param;
        };
        self.offset += n;
        let layout = self.path.pytorch(D).1;
        let stored = TensorData::new(chunk.to_vec(), stored_dims(dims, layout));
        let tensor = match layout {
            Layout::Same => Tensor::<D>::from_data(stored, &self.device),
            Layout::Transposed => Tensor::<D>::from_data(stored, &self.device).transpose(),
        };
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Loads `params` into `module`. Errors (leaving nothing half-loaded) if the manifest is not
/// the module's own (`expected`, from [`manifest_of`]).
pub fn load_params<M: Module>(module: M, expected: &Manifest, params: &Params) -> Result<M, Error> {
    check_manifest(expected, params)?;
    let device = module
        .devices()
        .first()
        .cloned()
        .ok_or_else(|| Error::Model("module has no device".into()))?;
    let mut m = LoadMapper {
        path: Path::default(),
        values: params.values(),
        offset: 0,
        device,
    };
    let module = module.map(&mut m);
    if m.offset != params.len() {
        return Err(Error::Model(format!(
            "loaded {} of {} values",
            m.offset,
            params.len()
        )));
    }
    Ok(module)
}

/// Errors (saying how they differ) unless `params` has exactly the `expected` manifest.
/// Callers that must not give up their module on a mismatch check this before
/// [`load_params`].
pub fn check_manifest(expected: &Manifest, params: &Params) -> Result<(), Error> {
    if **params.manifest() == *expected {
        Ok(())
    } else {
        Err(Error::Model(describe_mismatch(expected, params.manifest())))
    }
}

fn describe_mismatch(want: &Manifest, got: &Manifest) -> String {
    if want.tensors.len() != got.tensors.len() {
        return format!(
            "parameters have {} tensors, the model has {}",
            got.tensors.len(),
            want.tensors.len()
        );
    }
    for (w, g) in want.tensors.iter().zip(&got.tensors) {
        if w != g {
            return format!(
                "parameter tensor {:?} {:?} does not match the model's {:?} {:?}",
                g.name, g.shape, w.name, w.shape
            );
        }
    }
    "manifest mismatch".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Classifier, Cnn, Mlp2nn};

    /// `y = x Wᵀ + b` with `W` as PyTorch stores a Linear weight (`[out, in]`, row-major).
    fn torch_linear(x: &[f32], w: &[f32], b: &[f32], inputs: usize) -> Vec<f32> {
        b.iter()
            .enumerate()
            .map(|(o, bias)| {
                let row = &w[o * inputs..(o + 1) * inputs];
                bias + row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>()
            })
            .collect()
    }

    #[test]
    fn the_flat_vector_is_pytorchs_layout() {
        // The 2NN's forward pass computed from the flat vector with PyTorch's semantics
        // (nn.Linear: weight [out, in]) equals Burn's own forward pass.
        let d = Device::flex();
        let model = Mlp2nn::new(784, 10, &d);
        let manifest = Arc::new(manifest_of(&model));
        let shapes: Vec<(&str, &[u64])> = manifest
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        assert_eq!(
            shapes,
            [
                ("fc1.weight", &[200u64, 784][..]),
                ("fc1.bias", &[200][..]),
                ("fc2.weight", &[200, 200][..]),
                ("fc2.bias", &[200][..]),
                ("fc3.weight", &[10, 200][..]),
                ("fc3.bias", &[10][..]),
            ]
        );
        let p = to_params(&model, &manifest).unwrap();
        let t: Vec<&[f32]> = p.tensors().map(|(_, v)| v).collect();
        let x: Vec<f32> = (0..784).map(|i| ((i * 37) % 101) as f32 / 101.0).collect();
        let relu = |v: Vec<f32>| v.into_iter().map(|a| a.max(0.0)).collect::<Vec<f32>>();
        let h = relu(torch_linear(&x, t[0], t[1], 784));
        let h = relu(torch_linear(&h, t[2], t[3], 200));
        let ours = torch_linear(&h, t[4], t[5], 200);
        let input = Tensor::<2>::from_data(TensorData::new(x, [1, 784]), &d);
        let burn: Vec<f32> = model
            .forward(input)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        for (a, b) in ours.iter().zip(&burn) {
            assert!((a - b).abs() < 1e-4, "{ours:?} vs {burn:?}");
        }
    }

    #[test]
    fn manifest_names_and_round_trip_is_bit_exact() {
        let d = Device::flex().autodiff();
        let model = Cnn::new(28, 10, &d);
        let manifest = Arc::new(manifest_of(&model));
        let names: Vec<&str> = manifest.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv1.weight",
                "conv1.bias",
                "conv2.weight",
                "conv2.bias",
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias"
            ]
        );
        assert_eq!(manifest.numel(), 1_663_370);
        let p = to_params(&model, &manifest).unwrap();
        // Load into a differently initialized model: must become identical, bit for bit.
        let other = Cnn::new(28, 10, &d);
        assert_ne!(to_params(&other, &manifest).unwrap().values(), p.values());
        let loaded = load_params(other, &manifest, &p).unwrap();
        let back = to_params(&loaded, &manifest).unwrap();
        assert!(
            p.values()
                .iter()
                .zip(back.values())
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        // Still trainable: gradients reach every loaded parameter.
        use crate::models::Classifier;
        let x = Tensor::<2>::ones([2, 784], &d);
        let grads = loaded.forward(x).sum().backward();
        let grads = burn::optim::GradientsParams::from_grads(grads, &loaded);
        assert_eq!(grads.len(), manifest.tensors.len());
    }

    #[test]
    fn mismatched_params_are_a_typed_error() {
        let d = Device::flex();
        let cnn = Cnn::new(28, 10, &d);
        let mlp = Mlp2nn::new(784, 10, &d);
        let mlp_manifest = Arc::new(manifest_of(&mlp));
        let p = to_params(&mlp, &mlp_manifest).unwrap();
        let cnn_manifest = manifest_of(&cnn);
        match load_params(cnn, &cnn_manifest, &p) {
            Err(Error::Model(msg)) => {
                assert!(msg.contains("tensors") || msg.contains("match"), "{msg}")
            }
            other => panic!("expected a model error, got {other:?}"),
        }
    }
}
