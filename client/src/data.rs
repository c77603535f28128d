//! Data sets: the IDX format of MNIST and Fashion-MNIST (raw or gzip), and the small real MNIST
//! subset bundled in this crate for the offline quick start.
//!
//! A [`Dataset`] holds its images as `u8` (a quarter of the memory of `f32`) behind an `Arc`,
//! so thousands of virtual clients can share one copy and own only index lists into it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::Error;

/// A labelled image classification data set, shared read-only.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Pixel values, `len * rows * cols`, row-major per image.
    pub images: Arc<[u8]>,
    /// Labels, one per image.
    pub labels: Arc<[u8]>,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// Number of classes.
    pub num_classes: usize,
}

impl Dataset {
    /// Builds a data set, checking that the sizes agree.
    pub fn new(
        images: Vec<u8>,
        labels: Vec<u8>,
        rows: usize,
        cols: usize,
        num_classes: usize,
    ) -> Result<Self, Error> {
        let n = labels.len();
        if images.len() != n * rows * cols {
            return Err(Error::Data(format!(
                "{} pixel values for {n} labels of {rows}x{cols} images",
                images.len()
            )));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= num_classes) {
            return Err(Error::Data(format!("label {bad} outside 0..{num_classes}")));
        }
        Ok(Self {
            images: images.into(),
            labels: labels.into(),
            rows,
            cols,
            num_classes,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per example (`rows * cols`).
    pub fn features(&self) -> usize {
        self.rows * self.cols
    }

    /// Appends example `i`'s pixels scaled to `[0, 1]` to `out`, and returns its label.
    /// `i` must be `< len()` (callers iterate over validated index lists).
    pub fn push_example(&self, i: usize, out: &mut Vec<f32>) -> u8 {
        let f = self.features();
        let start = i * f;
        if let Some(px) = self.images.get(start..start + f) {
            out.extend(px.iter().map(|&p| p as f32 * (1.0 / 255.0)));
        }
        self.labels.get(i).copied().unwrap_or(0)
    }

    /// Count of each label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.num_classes];
        for &l in self.labels.iter() {
            if let Some(x) = c.get_mut(l as usize) {
                *x += 1;
            }
        }
        c
    }

    /// The first `n` examples as a new data set.
    pub fn head(&self, n: usize) -> Self {
        let n = n.min(self.len());
        Self {
            images: self
                .images
                .get(..n * self.features())
                .unwrap_or_default()
                .into(),
            labels: self.labels.get(..n).unwrap_or_default().into(),
            ..self.clone()
        }
    }
}

/// Which half of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training examples.
    Train,
    /// Test examples.
    Test,
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, Error> {
    let raw = std::fs::read(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    decompress_if_gz(raw, path)
}

fn decompress_if_gz(raw: Vec<u8>, path: &Path) -> Result<Vec<u8>, Error> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::Idx {
                path: path.to_path_buf(),
                reason: format!("corrupt gzip stream: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes (type 0x08): returns its dimensions and data. Checks
/// the magic number, the element type, the rank and that the data length is exactly the
/// product of the dimensions.
pub fn parse_idx(bytes: &[u8], path: &Path) -> Result<(Vec<usize>, Vec<u8>), Error> {
    let bad = |reason: String| Error::Idx {
        path: path.to_path_buf(),
        reason,
    };
    let head = bytes.get(..4).ok_or_else(|| {
        bad(format!(
            "{} bytes is too short for an IDX header",
            bytes.len()
        ))
    })?;
    let [z0, z1, ty, rank] = [head[0], head[1], head[2], head[3]];
    if z0 != 0 || z1 != 0 {
        return Err(bad(format!(
            "bad magic {:02x}{:02x} (expected 0000)",
            z0, z1
        )));
    }
    if ty != 0x08 {
        return Err(bad(format!(
            "element type {ty:#04x} is not unsigned byte (0x08)"
        )));
    }
    if rank == 0 || rank > 4 {
        return Err(bad(format!("rank {rank} (expected 1 to 4)")));
    }
    let rank = rank as usize;
    let dims_bytes = bytes
        .get(4..4 + 4 * rank)
        .ok_or_else(|| bad("truncated dimensions".into()))?;
    let dims: Vec<usize> = dims_bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("dimensions overflow".into()))?;
    let data = bytes.get(4 + 4 * rank..).unwrap_or_default();
    if data.len() != expected {
        return Err(bad(format!(
            "{} data bytes, dimensions {:?} need {expected} (truncated or corrupt file)",
            data.len(),
            dims
        )));
    }
    Ok((dims, data.to_vec()))
}

/// Builds a data set from the bytes of an IDX image file and an IDX label file.
pub fn from_idx_bytes(
    images: &[u8],
    labels: &[u8],
    names: (&Path, &Path),
    num_classes: usize,
) -> Result<Dataset, Error> {
    let (idims, pixels) = parse_idx(images, names.0)?;
    let (ldims, labels) = parse_idx(labels, names.1)?;
    let [n, rows, cols] = idims[..] else {
        return Err(Error::Idx {
            path: names.0.to_path_buf(),
            reason: format!("image file has dimensions {idims:?}, expected [n, rows, cols]"),
        });
    };
    if ldims != [n] {
        return Err(Error::Idx {
            path: names.1.to_path_buf(),
            reason: format!(
                "label file has dimensions {ldims:?}, expected [{n}] to match the images"
            ),
        });
    }
    Dataset::new(pixels, labels, rows, cols, num_classes)
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf, Error> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(Error::Data(format!(
        "no {stem} or {stem}.gz in {}",
        dir.display()
    )))
}

/// Loads MNIST or Fashion-MNIST (same format) from a directory holding the standard file
/// names (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-...`).
pub fn load_idx_dir(dir: &Path, split: Split) -> Result<Dataset, Error> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let ip = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let lp = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    from_idx_bytes(&read_maybe_gz(&ip)?, &read_maybe_gz(&lp)?, (&ip, &lp), 10)
}

/// The MNIST subset bundled with Flotilla: the first 10,000 training and the first 2,000 test
/// images of MNIST (LeCun, Cortes and Burges; CC BY-SA 3.0). See `client/data/README.md`.
pub mod bundled {
    use super::*;

    const TRAIN_IMAGES: &[u8] = include_bytes!("../data/mnist-subset/train-images-idx3-ubyte.gz");
    const TRAIN_LABELS: &[u8] = include_bytes!("../data/mnist-subset/train-labels-idx1-ubyte.gz");
    const TEST_IMAGES: &[u8] = include_bytes!("../data/mnist-subset/t10k-images-idx3-ubyte.gz");
    const TEST_LABELS: &[u8] = include_bytes!("../data/mnist-subset/t10k-labels-idx1-ubyte.gz");

    /// Loads one split of the bundled subset.
    pub fn mnist(split: Split) -> Result<Dataset, Error> {
        let (i, l, name) = match split {
            Split::Train => (TRAIN_IMAGES, TRAIN_LABELS, "bundled/train"),
            Split::Test => (TEST_IMAGES, TEST_LABELS, "bundled/t10k"),
        };
        let p = Path::new(name);
        let i = decompress_if_gz(i.to_vec(), p)?;
        let l = decompress_if_gz(l.to_vec(), p)?;
        from_idx_bytes(&i, &l, (p, p), 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn typed_errors_for_bad_files() {
        let p = Path::new("x");
        assert!(parse_idx(&idx(&[2, 2], &[1, 2, 3, 4]), p).is_ok());
        for bad in [
            vec![],
            vec![0, 0, 8],
            vec![1, 0, 8, 1, 0, 0, 0, 1, 5],           // magic
            vec![0, 0, 9, 1, 0, 0, 0, 1, 5],           // type
            vec![0, 0, 8, 0],                          // rank 0
            vec![0, 0, 8, 2, 0, 0, 0, 2],              // truncated dims
            idx(&[2, 2], &[1, 2, 3]),                  // truncated data
            idx(&[2, 2], &[1, 2, 3, 4, 5]),            // trailing data
            idx(&[u32::MAX, u32::MAX, u32::MAX], &[]), // huge claim, no data
        ] {
            assert!(
                matches!(parse_idx(&bad, p), Err(Error::Idx { .. })),
                "{bad:?}"
            );
        }
        // Mismatched label count.
        let e = from_idx_bytes(
            &idx(&[2, 1, 1], &[0, 0]),
            &idx(&[3], &[0, 1, 2]),
            (p, p),
            10,
        );
        assert!(e.is_err());
        // Label out of range.
        let e = from_idx_bytes(&idx(&[1, 1, 1], &[0]), &idx(&[1], &[10]), (p, p), 10);
        assert!(matches!(e, Err(Error::Data(_))));
        // Corrupt gzip.
        assert!(decompress_if_gz(vec![0x1f, 0x8b, 1, 2, 3], p).is_err());
    }

    #[test]
    fn bundled_subset_loads() {
        let train = bundled::mnist(Split::Train).unwrap();
        let test = bundled::mnist(Split::Test).unwrap();
        assert_eq!((train.len(), test.len()), (10_000, 2_000));
        assert_eq!(&train.labels[..6], &[5, 0, 4, 1, 9, 2]);
        assert!(train.class_counts().iter().all(|&c| c > 800));
    }
}
