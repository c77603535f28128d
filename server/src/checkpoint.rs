//! Checkpoints: the server's state after each round, written atomically and checksummed.
//!
//! A checkpoint file `round-NNNNNN.ckpt` is:
//!
//! ```text
//! "FLCKPT02" | header_len u32 LE | header (JSON) | values (f32 LE) | strategy state (bytes)
//!            | SHA-256 of all before
//! ```
//!
//! The header holds the round, the manifest, the last rounds' records (a bounded window),
//! the privacy accountant, and the *lengths* of what follows; the strategy's state (server
//! optimizer moments: as large as the model, or larger) is raw bytes after the values, so
//! no size limit depends on the model. Files in the first format (`FLCKPT01`, state inside
//! the JSON header) are still read.
//!
//! Files are written to a temporary name, fsynced, renamed into place and the directory
//! fsynced, so a crash leaves either the old or the new checkpoint, never half of one. On
//! start the server resumes from the newest checkpoint that verifies; a corrupt one is
//! reported and the one before it is used; if checkpoints exist but none verifies, the
//! server refuses to start (see [`FileStore::latest`]). Retention never deletes a
//! checkpoint newer than the one just written, and deletes old ones only once [`KEEP`]
//! newer ones are known to verify.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use flotilla_protocol::coordinator::{RoundRecord, Snapshot};
use flotilla_protocol::{Manifest, Params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Error;

const MAGIC: &[u8; 8] = b"FLCKPT02";
/// The first format (strategy state in the JSON header); still read.
const MAGIC_V1: &[u8; 8] = b"FLCKPT01";
/// Largest header accepted (the history of a long run fits easily).
const MAX_HEADER: u32 = 256 << 20;
/// Where a server keeps what must survive it: each completed round's [`Snapshot`], and the
/// record of every round. The driver follows raft's `Ready` rule through it: round `k + 1` is
/// announced only after [`SnapshotStore::save`] of round `k` returned, so a store must not
/// return before the snapshot is durable (for [`FileStore`]: fsynced and renamed into place).
///
/// Both methods block (file I/O): the driver calls them on a blocking thread.
pub trait SnapshotStore: Send + Sync + std::fmt::Debug {
    /// Makes the snapshot of a completed round durable (with the name of the strategy whose
    /// state it holds), then appends the round's record to the history.
    fn save(&self, snapshot: &Snapshot, strategy: &str, record: &RoundRecord) -> Result<(), Error>;
    /// Appends the record of a round that did not complete (no snapshot: an aborted round
    /// changes no state worth keeping, and must never store a model no round produced).
    fn record(&self, record: &RoundRecord) -> Result<(), Error>;
    /// The newest snapshot that verifies, with its strategy's name; `None` if there is none.
    fn latest(&self) -> Result<Option<(Snapshot, String)>, Error>;
}

/// The store of a deployed server: checkpoint files in a folder (this module's format,
/// written atomically, the newest [`KEEP`] kept) and `history.jsonl` beside them.
#[derive(Clone, Debug)]
pub struct FileStore {
    dir: PathBuf,
    set_aside_unreadable: bool,
}

impl FileStore {
    /// A store in `dir` (created at the first save).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            set_aside_unreadable: false,
        }
    }

    /// The server's store: its `checkpoint_dir`, and `--fresh` as
    /// [`FileStore::set_aside_unreadable`].
    pub fn for_config(config: &crate::ServerConfig) -> Self {
        Self::new(&config.checkpoint_dir).set_aside_unreadable(config.fresh)
    }

    /// When checkpoints exist but none verifies, [`FileStore::latest`] renames them
    /// `*.ckpt.unreadable` and finds nothing, instead of refusing (the operator's `--fresh`).
    pub fn set_aside_unreadable(mut self, yes: bool) -> Self {
        self.set_aside_unreadable = yes;
        self
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The history log: one JSON round record per line.
    pub fn history_path(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }
}

impl SnapshotStore for FileStore {
    fn save(&self, snapshot: &Snapshot, strategy: &str, record: &RoundRecord) -> Result<(), Error> {
        let path = write(&self.dir, snapshot, strategy)?;
        tracing::debug!("checkpoint {}", path.display());
        append_history(&self.history_path(), record)
    }

    fn record(&self, record: &RoundRecord) -> Result<(), Error> {
        append_history(&self.history_path(), record)
    }

    /// The newest checkpoint that verifies (corrupt newer ones are reported and skipped).
    /// Checkpoints that exist but none of which verifies are an error: starting over at
    /// round 1 would throw the run's progress away (and retention would then delete the
    /// old files) — unless [`FileStore::set_aside_unreadable`].
    fn latest(&self) -> Result<Option<(Snapshot, String)>, Error> {
        if let Some((path, snapshot, name)) = latest_valid(&self.dir)? {
            tracing::info!("newest valid checkpoint: {}", path.display());
            return Ok(Some((snapshot, name)));
        }
        let existing = list(&self.dir)?;
        let Some(newest) = existing.first() else {
            return Ok(None);
        };
        if !self.set_aside_unreadable {
            let why = match read(newest) {
                Err(e) => e.to_string(),
                Ok(_) => "unreadable".into(),
            };
            return Err(Error::Checkpoint {
                path: self.dir.clone(),
                reason: format!(
                    "{} checkpoint(s) here but none verifies (newest: {why}); refusing to start \
                     over from round 1. Repair or remove them, or run with --fresh to set them \
                     aside (renamed *.unreadable) and start anew",
                    existing.len()
                ),
            });
        }
        for p in &existing {
            let aside = p.with_extension("ckpt.unreadable");
            tracing::warn!(
                "--fresh: setting {} aside as {}",
                p.display(),
                aside.display()
            );
            fs::rename(p, &aside).map_err(io(p))?;
        }
        Ok(None)
    }
}

/// A store in memory, for tests and in-process simulations: it keeps the newest snapshot and
/// the last [`MemoryStore::MAX_RECORDS`] records, and loses them with the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: std::sync::Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    latest: Option<(Snapshot, String)>,
    records: std::collections::VecDeque<RoundRecord>,
}

impl MemoryStore {
    /// Records kept.
    pub const MAX_RECORDS: usize = 10_000;

    /// The records kept, oldest first.
    pub fn records(&self) -> Vec<RoundRecord> {
        self.lock().records.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // A panic while holding the lock leaves plain data behind: still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(inner: &mut MemoryInner, record: &RoundRecord) {
        if inner.records.len() >= Self::MAX_RECORDS {
            inner.records.pop_front();
        }
        inner.records.push_back(record.clone());
    }
}

impl SnapshotStore for MemoryStore {
    fn save(&self, snapshot: &Snapshot, strategy: &str, record: &RoundRecord) -> Result<(), Error> {
        let mut inner = self.lock();
        inner.latest = Some((snapshot.clone(), strategy.to_string()));
        Self::push(&mut inner, record);
        Ok(())
    }

    fn record(&self, record: &RoundRecord) -> Result<(), Error> {
        Self::push(&mut self.lock(), record);
        Ok(())
    }

    fn latest(&self) -> Result<Option<(Snapshot, String)>, Error> {
        Ok(self.lock().latest.clone())
    }
}

/// Checkpoints kept on disk (older ones are pruned).
pub const KEEP: usize = 3;

#[derive(Serialize, Deserialize)]
struct Header {
    round: u64,
    strategy: String,
    /// Version 1 only: the state inside the header.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    strategy_state: Vec<u8>,
    /// Version 2: bytes of strategy state after the values.
    #[serde(default)]
    strategy_state_len: u64,
    manifest: Manifest,
    history: Vec<RoundRecord>,
    num_values: u64,
    #[serde(default)]
    accountant: Option<(Vec<f64>, u64)>,
    /// Asynchronous runs: the last task id dispatched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_task: Option<u64>,
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
        strategy_state: Vec::new(),
        strategy_state_len: snapshot.strategy_state.len() as u64,
        manifest: (**snapshot.global.manifest()).clone(),
        history: snapshot.history.clone(),
        num_values: snapshot.global.len() as u64,
        accountant: snapshot.accountant.clone(),
        last_task: snapshot.last_task,
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
        put(&mut w, &flotilla_protocol::wire::codec::f32_le_bytes(chunk))?;
    }
    for chunk in snapshot.strategy_state.chunks(1 << 20) {
        put(&mut w, chunk)?;
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
    mark_verified(&path);
    prune(dir, KEEP, snapshot.round)?;
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
    let v1 = match body.get(..8) {
        Some(m) if m == MAGIC.as_slice() => false,
        Some(m) if m == MAGIC_V1.as_slice() => true,
        _ => return Err(bad("not a Flotilla checkpoint (bad magic)".into())),
    };
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
    let rest = body.get(hend..).unwrap_or_default();
    let values_len = header.num_values.saturating_mul(4);
    let state_len = if v1 { 0 } else { header.strategy_state_len };
    if rest.len() as u64 != values_len.saturating_add(state_len) {
        return Err(bad(format!(
            "{} bytes after the header for {} values and {state_len} bytes of strategy state",
            rest.len(),
            header.num_values
        )));
    }
    let (payload, state) = rest.split_at(values_len as usize);
    let values: Vec<f32> = payload
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let global = Params::new(header.manifest, values).map_err(|e| bad(e.to_string()))?;
    mark_verified(path);
    Ok((
        Snapshot {
            round: header.round,
            global,
            history: header.history,
            strategy_state: if v1 {
                header.strategy_state
            } else {
                state.to_vec()
            },
            accountant: header.accountant,
            last_task: header.last_task,
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
    // The first record may come before any checkpoint made the directory (a first round
    // that did not complete).
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
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

/// Checkpoint files this process wrote or read successfully (so retention need not re-read
/// large files to know they verify).
static VERIFIED: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn mark_verified(path: &Path) {
    if let Ok(mut v) = VERIFIED.lock() {
        v.insert(path.to_path_buf());
    }
}

fn is_verified(path: &Path) -> bool {
    VERIFIED.lock().map(|v| v.contains(path)).unwrap_or(false) || read(path).is_ok()
}

fn round_of(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("round-")?
        .strip_suffix(".ckpt")?
        .parse()
        .ok()
}

/// Deletes old checkpoints: never one newer than `written` (the round just written), and
/// only those older than the `keep` newest checkpoints that verify.
fn prune(dir: &Path, keep: usize, written: u64) -> Result<(), Error> {
    let mut good = 0;
    for path in list(dir)? {
        let Some(round) = round_of(&path) else {
            continue;
        };
        if round > written {
            tracing::warn!(
                "{} is newer than the round just written ({written}); left alone",
                path.display()
            );
            continue;
        }
        if good < keep {
            if is_verified(&path) {
                good += 1;
            }
            continue;
        }
        fs::remove_file(&path).map_err(io(&path))?;
        if let Ok(mut v) = VERIFIED.lock() {
            v.remove(&path);
        }
    }
    Ok(())
}

/// Writes the model as safetensors (F32 tensors named as in the manifest).
pub fn export_safetensors(params: &Params, path: &Path) -> Result<(), Error> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut views = Vec::new();
    for (spec, values) in params.tensors() {
        let shape: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
        let bytes = flotilla_protocol::wire::codec::f32_le_bytes(values);
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
    flotilla_crypto::fs::write_atomic(path, &bytes, 0o644).map_err(|e| Error::Checkpoint {
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

    /// Failure reasons became typed (kind and text, or the client's own abort reason);
    /// round records written before that hold `Invalid("text")` and must still load.
    #[test]
    fn failure_reasons_of_older_records_still_load() {
        use flotilla_protocol::coordinator::DropKind;
        use flotilla_protocol::strategy::{Failure, FailureReason};
        use flotilla_protocol::wire::messages::AbortReason;
        let old: Vec<Failure> = serde_json::from_str(
            r#"[{"client":"c1","reason":{"Invalid":"malformed message: bad frame magic"}},
                {"client":"c2","reason":{"Invalid":"client aborted: training failed"}},
                {"client":"c3","reason":"Timeout"}]"#,
        )
        .unwrap();
        assert_eq!(
            old[0].reason,
            FailureReason::Dropped {
                kind: DropKind::ProtocolViolation,
                detail: "malformed message: bad frame magic".into()
            }
        );
        assert_eq!(
            old[1].reason,
            FailureReason::Aborted(AbortReason::Other("training failed".into()))
        );
        assert_eq!(old[2].reason, FailureReason::Timeout);
        // What is written now reads back as it was.
        for f in &old {
            let again: Failure = serde_json::from_slice(&serde_json::to_vec(f).unwrap()).unwrap();
            assert_eq!(&again, f);
        }
        let text = serde_json::to_string(&old[0]).unwrap();
        assert!(text.contains(r#""kind":"protocol_violation""#), "{text}");
    }

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
            last_task: None,
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

    #[test]
    fn a_50m_parameter_fedadam_checkpoint_resumes_at_its_round() {
        use flotilla_protocol::strategy::{ClientUpdate, TrainResults};
        use flotilla_protocol::wire::messages::{ClientId, Metrics};
        let dir = tempfile::tempdir().unwrap();
        let n = 50_000_000;
        let manifest = Manifest::new(vec![TensorSpec::new("w", &[n])]);
        let global = Params::new(manifest.clone(), vec![0.0; n]).unwrap();
        let mut cfg = crate::ServerConfig::default();
        cfg.strategy.name = "fedadam".into();
        cfg.checkpoint_dir = dir.path().to_path_buf();
        let mut strategy = cfg.strategy().unwrap();
        let update = ClientUpdate {
            client: ClientId::new("a"),
            num_examples: 10,
            metrics: Metrics::new(),
            params: Params::new(manifest, vec![0.5; n]).unwrap(),
        };
        let new = strategy
            .aggregate_train(
                3,
                &global,
                TrainResults::Individual(std::slice::from_ref(&update)),
                &[],
            )
            .unwrap()
            .unwrap();
        drop((global, update));
        let state = strategy.state();
        // Far over the 256 MiB that the first format's JSON header could hold.
        assert!(
            state.len() > 256 << 20,
            "{} bytes of optimizer state",
            state.len()
        );
        let snapshot = Snapshot {
            round: 3,
            global: new,
            history: Vec::new(),
            strategy_state: state,
            accountant: None,
            last_task: None,
        };
        write(dir.path(), &snapshot, "fedadam").unwrap();
        let (back, name) = read(&path_for(dir.path(), 3)).unwrap();
        assert_eq!(name, "fedadam");
        assert!(back == snapshot, "the checkpoint reads back as written");
        drop(back);
        let coord = crate::driver::coordinator(&cfg).unwrap();
        assert_eq!(coord.round(), 3, "resumed after round 3");
        assert!(coord.global() == Some(&snapshot.global));
    }

    #[test]
    fn unreadable_checkpoints_refuse_a_start_unless_fresh() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &snapshot(7), "fedavg").unwrap();
        let path = path_for(dir.path(), 7);
        let mut bytes = fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let mut cfg = crate::ServerConfig {
            checkpoint_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let err = crate::driver::coordinator(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("none verifies") && err.contains("--fresh"),
            "{err}"
        );
        assert!(path.exists(), "nothing was deleted");
        cfg.fresh = true;
        let coord = crate::driver::coordinator(&cfg).unwrap();
        assert_eq!(coord.round(), 0);
        assert!(!path.exists());
        assert!(
            path.with_extension("ckpt.unreadable").exists(),
            "set aside, not deleted"
        );
    }

    #[test]
    fn retention_keeps_the_newest_and_never_deletes_newer_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        for r in 1..=6 {
            write(dir.path(), &snapshot(r), "fedavg").unwrap();
        }
        let rounds = |d: &Path| -> Vec<u64> {
            let mut v: Vec<u64> = list(d)
                .unwrap()
                .iter()
                .filter_map(|p| round_of(p))
                .collect();
            v.sort();
            v
        };
        assert_eq!(rounds(dir.path()), vec![4, 5, 6]);
        // A run that (wrongly) started over writes round 1: the newer files stay.
        write(dir.path(), &snapshot(1), "fedavg").unwrap();
        assert_eq!(rounds(dir.path()), vec![1, 4, 5, 6]);
    }
}
