//! Checkpoints: the server's state after each round, written atomically and checksummed.
//!
//! A checkpoint file `round-NNNNNN.ckpt` is:
//!
//! ```text
//! "FLCKPT01" | header_len u32 LE | header (JSON) | values (f32 LE) | SHA-256 of all before
//! ```
//!
//! The header holds the round, the manifest, the metrics history and the strategy's state.
//! Files are written to a temporary name, fsynced, renamed into place and the directory
//! fsynced, so a crash leaves either the old or the new checkpoint, never half of one. On
//! start the server resumes from the newest checkpoint that verifies; a corrupt one is
//! reported and the one before it is used.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use flotilla_protocol::coordinator::{RoundRecord, Snapshot};
use flotilla_protocol::{Manifest, Params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

const MAGIC: &[u8; 8] = b"FLCKPT01";
/// Largest header accepted (the history of a long run fits easily).
const MAX_HEADER: u32 = 256 << 20;
/// Checkpoints kept on disk (older ones are pruned).
pub const KEEP: usize = 3;

#[derive(Serialize, Deserialize)]
struct Header {
    round: u64,
    strategy: String,
    strategy_state: Vec<u8>,
    manifest: Manifest,
    history: Vec<RoundRecord>,
    num_values: u64,
    #[serde(default)]
    accountant: Option<(Vec<f64>, u64)>,
}

/// Path of the checkpoint for `round` in `dir`.
pub fn path_for(dir: &Path, round: u64) -> PathBuf {
    dir.join(format!("round-{round:06}.ckpt"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a checkpoint atomically and prunes old ones. Returns its path.
pub fn write(dir: &Path, snapshot: &Snapshot, strategy: &str) -> Result<PathBuf, Error> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let header = Header {
        round: snapshot.round,
        strategy: strategy.to_string(),
        strategy_state: snapshot.strategy_state.clone(),
        manifest: (**snapshot.global.manifest()).clone(),
        history: snapshot.history.clone(),
        num_values: snapshot.global.len() as u64,
        accountant: snapshot.accountant.clone(),
    };
    let header = serde_json::to_vec(&header).map_err(|e| Error::Checkpoint {
        path: dir.to_path_buf(),
        reason: format!("encoding header: {e}"),
    })?;
    let path = path_for(dir, snapshot.round);
    let tmp = path.with_extension("ckpt.tmp");
    let file = fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut hash = Sha256::new();
    let mut put = |w: &mut BufWriter<fs::File>, bytes: &[u8]| -> Result<(), Error> {
        hash.update(bytes);
        w.write_all(bytes).map_err(io(&tmp))
    };
    put(&mut w, MAGIC)?;
    put(&mut w, &(header.len() as u32).to_le_bytes())?;
    put(&mut w, &header)?;
    for chunk in snapshot.global.values().chunks(64 * 1024) {
        put(&mut w, &flotilla_protocol::codec::f32_le_bytes(chunk))?;
    }
    let digest = hash.finalize();
    w.write_all(&digest).map_err(io(&tmp))?;
    let file = w.into_inner().map_err(|e| Error::Io {
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io(&path))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    prune(dir, KEEP)?;
    Ok(path)
}

/// Reads and verifies one checkpoint.
pub fn read(path: &Path) -> Result<(Snapshot, String), Error> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(io(path))?;
    if bytes.len() < MAGIC.len() + 4 + 32 {
        return Err(bad(format!("{} bytes is too short", bytes.len())));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(bad("checksum mismatch (truncated or corrupted file)".into()));
    }
    if body.get(..8) != Some(MAGIC.as_slice()) {
        return Err(bad("not a Flotilla checkpoint (bad magic)".into()));
    }
    let len_bytes: [u8; 4] = body
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("truncated header length".into()))?;
    let hlen = u32::from_le_bytes(len_bytes);
    if hlen > MAX_HEADER {
        return Err(bad(format!("header of {hlen} bytes is too large")));
    }
    let hend = 12 + hlen as usize;
    let header: Header = serde_json::from_slice(
        body.get(12..hend)
            .ok_or_else(|| bad("truncated header".into()))?,
    )
    .map_err(|e| bad(format!("header: {e}")))?;
    let payload = body.get(hend..).unwrap_or_default();
    if payload.len() as u64 != header.num_values.saturating_mul(4) {
        return Err(bad(format!(
            "{} payload bytes for {} values",
            payload.len(),
            header.num_values
        )));
    }
    let values: Vec<f32> = payload
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let global = Params::new(header.manifest, values).map_err(|e| bad(e.to_string()))?;
    Ok((
        Snapshot {
            round: header.round,
            global,
            history: header.history,
            strategy_state: header.strategy_state,
            accountant: header.accountant,
        },
        header.strategy,
    ))
}

/// Appends one round record to the run's history log (one JSON object per line, fsynced).
/// Checkpoints keep only the last rounds; this log keeps them all, for operators.
pub fn append_history(path: &Path, record: &RoundRecord) -> Result<(), Error> {
    let mut line = serde_json::to_vec(record).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("encoding a round record: {e}"),
    })?;
    line.push(b'\n');
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(&line).map_err(io(path))?;
    f.sync_data().map_err(io(path))
}

/// Checkpoint files in `dir`, newest round first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut out: Vec<(u64, PathBuf)> = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in entries {
        let p = entry.map_err(io(dir))?.path();
        let round = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("round-"))
            .and_then(|n| n.strip_suffix(".ckpt"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(r) = round {
            out.push((r, p));
        }
    }
    out.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// The newest checkpoint that verifies. Corrupt ones are reported (warn) and skipped.
pub fn latest_valid(dir: &Path) -> Result<Option<(PathBuf, Snapshot, String)>, Error> {
    for p in list(dir)? {
        match read(&p) {
            Ok((s, strategy)) => return Ok(Some((p, s, strategy))),
            Err(e) => tracing::warn!("{e}; trying the previous checkpoint"),
        }
    }
    Ok(None)
}

fn prune(dir: &Path, keep: usize) -> Result<(), Error> {
    for old in list(dir)?.into_iter().skip(keep) {
        fs::remove_file(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// Writes the model as safetensors (F32 tensors named as in the manifest).
pub fn export_safetensors(params: &Params, path: &Path) -> Result<(), Error> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut views = Vec::new();
    for (spec, values) in params.tensors() {
        let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
        let bytes = flotilla_protocol::codec::f32_le_bytes(values);
        views.push((spec.name.clone(), shape, bytes));
    }
    let tensors: Result<Vec<(String, TensorView<'_>)>, _> = views
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect();
    let tensors = tensors.map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("safetensors: {e}"),
    })?;
    // safetensors lays tensors out in its own order; keep ours in the metadata.
    let order: Vec<&str> = params
        .manifest()
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let meta = std::collections::HashMap::from([(ORDER_KEY.to_string(), order.join("\n"))]);
    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("safetensors: {e}"),
    })?;
    flotilla_crypto::pki::write_file(path, &bytes, 0o644).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Metadata key holding the manifest's tensor order in exported safetensors files.
const ORDER_KEY: &str = "flotilla.manifest_order";

/// Reads a safetensors file of F32 tensors as parameters: in the manifest order recorded by
/// [`export_safetensors`], or, for files from elsewhere, in the order of their data.
pub fn import_safetensors(path: &Path) -> Result<Params, Error> {
    let bad = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(io(path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("safetensors: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("safetensors: {e}")))?;
    let order: Option<Vec<String>> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(ORDER_KEY))
        .map(|o| o.split('\n').map(str::to_string).collect());
    let mut entries: Vec<_> = st.tensors();
    match order {
        Some(order) => {
            if order.len() != entries.len() {
                return Err(bad(
                    "the recorded tensor order does not match the tensors".into()
                ));
            }
            let mut sorted = Vec::with_capacity(entries.len());
            for name in &order {
                let i = entries
                    .iter()
                    .position(|(n, _)| n == name)
                    .ok_or_else(|| bad(format!("tensor {name:?} is listed but missing")))?;
                sorted.push(entries.swap_remove(i));
            }
            entries = sorted;
        }
        None => entries.sort_by_key(|(_, v)| v.data().as_ptr() as usize),
    }
    let mut specs = Vec::new();
    let mut values = Vec::new();
    for (name, view) in entries {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!(
                "tensor {name:?} is {:?}, only F32 is supported",
                view.dtype()
            )));
        }
        specs.push(flotilla_protocol::TensorSpec::new(name, view.shape()));
        values.extend(
            view.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Params::new(Manifest::new(specs), values).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_protocol::TensorSpec;

    fn snapshot(round: u64) -> Snapshot {
        Snapshot {
            round,
            global: Params::new(
                Manifest::new(vec![
                    TensorSpec::new("w", &[2, 3]),
                    TensorSpec::new("b", &[3]),
                ]),
                (0..9)
                    .map(|i| i as f32 * 0.5 - round as f32)
                    .collect::<Vec<_>>(),
            )
            .unwrap(),
            history: Vec::new(),
            accountant: None,
            strategy_state: vec![1, 2, 3],
        }
    }

    #[test]
    fn write_read_round_trip_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        for r in 1..=5 {
            write(dir.path(), &snapshot(r), "fedavg").unwrap();
        }
        let files = list(dir.path()).unwrap();
        assert_eq!(files.len(), KEEP);
        let (p, s, strategy) = latest_valid(dir.path()).unwrap().unwrap();
        assert_eq!(p, path_for(dir.path(), 5));
        assert_eq!(s, snapshot(5));
        assert_eq!(strategy, "fedavg");
    }

    #[test]
    fn corrupt_newest_falls_back_to_previous() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &snapshot(1), "fedavg").unwrap();
        let newest = write(dir.path(), &snapshot(2), "fedavg").unwrap();
        let mut bytes = fs::read(&newest).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        fs::write(&newest, &bytes).unwrap();
        assert!(matches!(read(&newest), Err(Error::Checkpoint { .. })));
        let (_, s, _) = latest_valid(dir.path()).unwrap().unwrap();
        assert_eq!(s.round, 1);
        // Truncated, and garbage: typed errors too.
        fs::write(&newest, &bytes[..10]).unwrap();
        assert!(matches!(read(&newest), Err(Error::Checkpoint { .. })));
        fs::write(&newest, b"").unwrap();
        assert!(matches!(read(&newest), Err(Error::Checkpoint { .. })));
    }

    #[test]
    fn safetensors_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = snapshot(3).global;
        let path = dir.path().join("model.safetensors");
        export_safetensors(&p, &path).unwrap();
        assert_eq!(import_safetensors(&path).unwrap(), p);
    }
}
