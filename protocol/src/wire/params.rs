//! Model parameters as the server sees them: a flat `f32` vector plus a manifest.
//!
//! The server is model-agnostic. A model is an ordered list of named tensors (the
//! [`Manifest`]) and one contiguous `f32` buffer holding all of them back to back, in manifest
//! order, row-major. Only the client knows how to turn that into a Burn module.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::wire::Error;

/// Longest tensor name accepted in a manifest.
pub const MAX_NAME_LEN: usize = 256;
/// Most tensors a manifest may list.
pub const MAX_TENSORS: usize = 65_536;
/// Most dimensions one tensor may have.
pub const MAX_RANK: usize = 8;

/// Name and shape of one tensor in a model.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Dotted path of the tensor in the model, e.g. `conv1.weight`.
    pub name: String,
    /// Shape, outermost dimension first.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// A tensor spec; shape given as `usize` for convenience.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            shape: shape.iter().map(|&d| d as u64).collect(),
        }
    }

    /// Number of elements, or `None` on overflow.
    pub fn numel(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// The ordered list of tensors that make up a model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Manifest {
    /// Tensors in the order their values appear in the flat vector.
    pub tensors: Vec<TensorSpec>,
}

impl Manifest {
    /// A manifest from tensor specs. Call [`Manifest::validate`] before trusting it.
    pub fn new(tensors: Vec<TensorSpec>) -> Self {
        Self { tensors }
    }

    /// Checks names (non-empty, unique, bounded), ranks and sizes, and returns the total
    /// number of `f32` values the manifest describes.
    pub fn validate(&self) -> Result<u64, Error> {
        if self.tensors.len() > MAX_TENSORS {
            return Err(Error::InvalidManifest(format!(
                "{} tensors, at most {MAX_TENSORS} allowed",
                self.tensors.len()
            )));
        }
        let mut names = BTreeSet::new();
        let mut total: u64 = 0;
        for t in &self.tensors {
            if t.name.is_empty() || t.name.len() > MAX_NAME_LEN {
                return Err(Error::InvalidManifest(format!(
                    "tensor name of {} bytes (must be 1..={MAX_NAME_LEN})",
                    t.name.len()
                )));
            }
            if !names.insert(t.name.as_str()) {
                return Err(Error::InvalidManifest(format!(
                    "tensor name {:?} appears twice",
                    t.name
                )));
            }
            if t.shape.len() > MAX_RANK {
                return Err(Error::InvalidManifest(format!(
                    "tensor {:?} has rank {}, at most {MAX_RANK}",
                    t.name,
                    t.shape.len()
                )));
            }
            let n = t.numel().ok_or_else(|| {
                Error::InvalidManifest(format!("tensor {:?}: element count overflows", t.name))
            })?;
            total = total
                .checked_add(n)
                .ok_or_else(|| Error::InvalidManifest("total element count overflows".into()))?;
        }
        // The payload is 4 bytes per value; it must fit a u64 byte count.
        total
            .checked_mul(4)
            .ok_or_else(|| Error::InvalidManifest("payload size overflows".into()))?;
        Ok(total)
    }

    /// Total number of values (no validation; saturates on overflow).
    pub fn numel(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.numel().unwrap_or(u64::MAX))
            .fold(0u64, u64::saturating_add)
    }

    /// SHA-256 over the manifest's canonical encoding.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        hash_manifest(&mut h, self);
        h.finalize().into()
    }
}

fn hash_manifest(h: &mut Sha256, m: &Manifest) {
    h.update((m.tensors.len() as u64).to_le_bytes());
    for t in &m.tensors {
        h.update((t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update((t.shape.len() as u64).to_le_bytes());
        for d in &t.shape {
            h.update(d.to_le_bytes());
        }
    }
}

/// A model's parameters: a validated manifest and the flat values it describes.
///
/// Cheap to clone: both parts are reference-counted, so the coordinator can hand the same
/// global model to thousands of clients without copying it.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    manifest: Arc<Manifest>,
    values: Arc<[f32]>,
}

impl Params {
    /// Builds parameters, checking that `values` has exactly as many entries as the manifest
    /// describes.
    pub fn new(
        manifest: impl Into<Arc<Manifest>>,
        values: impl Into<Arc<[f32]>>,
    ) -> Result<Self, Error> {
        let manifest = manifest.into();
        let values = values.into();
        let expected = manifest.validate()?;
        if values.len() as u64 != expected {
            return Err(Error::ShapeMismatch {
                expected,
                got: values.len() as u64,
            });
        }
        Ok(Self { manifest, values })
    }

    /// All-zero parameters for a manifest.
    pub fn zeros(manifest: impl Into<Arc<Manifest>>) -> Result<Self, Error> {
        let manifest = manifest.into();
        let n = usize::try_from(manifest.validate()?)
            .map_err(|_| Error::InvalidManifest("model too large for this platform".into()))?;
        Ok(Self {
            manifest,
            values: vec![0.0f32; n].into(),
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// The flat values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Shared handle to the flat values.
    pub fn values_arc(&self) -> &Arc<[f32]> {
        &self.values
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True if the model has no values.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Replaces the values, keeping the manifest; the length must match.
    pub fn with_values(&self, values: impl Into<Arc<[f32]>>) -> Result<Self, Error> {
        Self::new(self.manifest.clone(), values)
    }

    /// Errors if any value is NaN or infinite, naming the tensor it lies in.
    pub fn check_finite(&self) -> Result<(), Error> {
        if let Some(pos) = self.values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                tensor: self.tensor_at(pos).unwrap_or_default(),
                index: pos as u64,
            });
        }
        Ok(())
    }

    /// Errors unless `other` has the same manifest as `self`.
    pub fn check_same_manifest(&self, other: &Manifest) -> Result<(), Error> {
        if *self.manifest == *other {
            Ok(())
        } else {
            Err(Error::ManifestMismatch)
        }
    }

    /// Name of the tensor holding flat index `pos`.
    pub fn tensor_at(&self, pos: usize) -> Option<String> {
        let mut start: u64 = 0;
        for t in &self.manifest.tensors {
            let end = start + t.numel()?;
            if (pos as u64) < end {
                return Some(t.name.clone());
            }
            start = end;
        }
        None
    }

    /// Iterates over `(spec, values)` for each tensor.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorSpec, &[f32])> {
        let mut rest: &[f32] = &self.values;
        self.manifest.tensors.iter().map(move |t| {
            // Validated at construction, so the split point is in range.
            let n = (t.numel().unwrap_or(0) as usize).min(rest.len());
            let (head, tail) = rest.split_at(n);
            rest = tail;
            (t, head)
        })
    }

    /// SHA-256 over the manifest and the values' little-endian bytes: the model hash that
    /// clients compare with each other under secure aggregation.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        hash_manifest(&mut h, &self.manifest);
        for chunk in self.values.chunks(16 * 1024) {
            h.update(crate::wire::codec::f32_le_bytes(chunk).as_ref());
        }
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest::new(vec![
            TensorSpec::new("w", &[2, 3]),
            TensorSpec::new("b", &[3]),
        ])
    }

    #[test]
    fn new_checks_length() {
        assert!(Params::new(manifest(), vec![0.0; 9]).is_ok());
        let err = Params::new(manifest(), vec![0.0; 8]).unwrap_err();
        assert!(matches!(
            err,
            Error::ShapeMismatch {
                expected: 9,
                got: 8
            }
        ));
    }

    #[test]
    fn manifest_rejects_duplicates_and_overflow() {
        let dup = Manifest::new(vec![TensorSpec::new("a", &[1]), TensorSpec::new("a", &[2])]);
        assert!(matches!(dup.validate(), Err(Error::InvalidManifest(_))));
        let huge = Manifest::new(vec![TensorSpec {
            name: "x".into(),
            shape: vec![u64::MAX, 2],
        }]);
        assert!(matches!(huge.validate(), Err(Error::InvalidManifest(_))));
        let empty_name = Manifest::new(vec![TensorSpec::new("", &[1])]);
        assert!(empty_name.validate().is_err());
    }

    #[test]
    fn nan_is_reported_with_tensor_name() {
        let mut v = vec![0.0; 9];
        v[7] = f32::NAN;
        let p = Params::new(manifest(), v).unwrap();
        match p.check_finite() {
            Err(Error::NonFinite { tensor, index }) => {
                assert_eq!(tensor, "b");
                assert_eq!(index, 7);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn tensors_split_in_order() {
        let p = Params::new(manifest(), (0..9).map(|i| i as f32).collect::<Vec<_>>()).unwrap();
        let parts: Vec<_> = p
            .tensors()
            .map(|(t, v)| (t.name.clone(), v.to_vec()))
            .collect();
        assert_eq!(parts[0], ("w".into(), vec![0., 1., 2., 3., 4., 5.]));
        assert_eq!(parts[1], ("b".into(), vec![6., 7., 8.]));
    }

    #[test]
    fn digest_depends_on_values_and_manifest() {
        let a = Params::new(manifest(), vec![0.0; 9]).unwrap();
        let mut v = vec![0.0; 9];
        v[0] = 1.0;
        let b = a.with_values(v).unwrap();
        assert_ne!(a.digest(), b.digest());
        let m2 = Manifest::new(vec![
            TensorSpec::new("w", &[3, 2]),
            TensorSpec::new("b", &[3]),
        ]);
        let c = Params::new(m2, vec![0.0; 9]).unwrap();
        assert_ne!(a.digest(), c.digest());
    }
}
