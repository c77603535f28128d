//! Conversion between a Burn module and the flat [`Params`] the server aggregates.
//!
//! The manifest is the module's float parameters in visiting order, named by their dotted path
//! (`conv1.weight`), with Burn's shapes. Loading checks the whole manifest first, so a
//! mismatched vector is a typed error and never a panic, and then replaces each parameter's
//! tensor in place, keeping its id, device and gradient setting. The round trip is bit-exact.

use std::sync::Arc;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use flotilla_protocol::{Manifest, Params, TensorSpec};

use crate::Error;

#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn name(&self) -> String {
        self.0.join(".")
    }
}

struct ManifestVisitor {
    path: Path,
    specs: Vec<TensorSpec>,
}

impl ModuleVisitor for ManifestVisitor {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.0.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.0.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.specs.push(TensorSpec::new(
            self.path.name(),
            &param.lazy_shape().dims::<D>(),
        ));
    }
}

/// The manifest of a module (no tensor data is read).
pub fn manifest_of<M: Module>(module: &M) -> Manifest {
    let mut v = ManifestVisitor {
        path: Path::default(),
        specs: Vec::new(),
    };
    module.visit(&mut v);
    Manifest::new(v.specs)
}

struct ValuesVisitor {
    values: Vec<f32>,
    error: Option<Error>,
}

impl ModuleVisitor for ValuesVisitor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data();
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
    values: &'a [f32],
    offset: usize,
    device: Device,
}

impl ModuleMapper for LoadMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let shape = param.lazy_shape();
        let n = shape.num_elements();
        // The manifest was checked against the module before mapping, so this slice exists;
        // should it not, the parameter is left untouched rather than panicking.
        let Some(chunk) = self.values.get(self.offset..self.offset + n) else {
            return param;
        };
        self.offset += n;
        let tensor = Tensor::<D>::from_data(TensorData::new(chunk.to_vec(), shape), &self.device);
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
    use crate::models::{Cnn, Mlp2nn};

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
