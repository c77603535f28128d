//! `flotilla-sim run <experiment.toml>`: many virtual clients on one machine, driving the very
//! round machines the server and clients run in production.
//!
//! Two transports: `memory` runs the sans-IO coordinator and participants on the in-memory
//! harness in simulated time (message loss, delay and per-phase dropouts can be injected);
//! `quic` starts the real server and one real client per virtual client, each with its own
//! certificate and QUIC connection over loopback.
//!
//! Virtual clients are cheap while idle: each holds only the indices of its examples into the
//! one shared, read-only data set, and its protocol state machine (plus, over QUIC, its
//! connection). Training runs on a bounded [`TrainerPool`] of workers (one per core by
//! default), each holding one model; the clients sampled in a round queue their jobs together
//! and the workers train them in parallel. The global model is evaluated centrally on the test
//! set after every round (as in McMahan et al.), and the run writes per-round metrics (CSV,
//! JSON), accuracy and loss curves (SVG, PNG) and a summary with the rounds needed to reach
//! the target accuracy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_client::data::{Dataset, Split, bundled, load_idx_dir};
use flotilla_client::partition::Partition;
use flotilla_client::{
    BackendKind, BurnTrainer, Classifier, Cnn, LocalData, Mlp2nn, Precision, Trainer, seeded,
    select_device,
};
use flotilla_crypto::pki::{CertificateAuthority, Identity};
use flotilla_crypto::secagg::sign::{PeerVerifier, Signer};
use flotilla_protocol::CryptoProvider;
use flotilla_protocol::coordinator::Event;
use flotilla_protocol::dp::DpConfig;
use flotilla_protocol::harness::{Action, ClientBehaviour, Deferred, Direction, Harness};
use flotilla_protocol::secagg::{SecAggConfig, SecAggIdentity};
use flotilla_protocol::wire::messages::Capabilities;
use flotilla_protocol::wire::messages::{EvaluateRes, Metrics, TrainConfig, TrainRes};
use flotilla_protocol::{ClientId, Coordinator, Params, Participant, RoundRecord};
use flotilla_server::ServerConfig;
use flotilla_server::config::{EngineSettings, StrategyConfig, TrainSettings};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::evaluation::ShardedEvaluator;
use crate::federation::{client_options, make_pki, server_config};
use crate::pool::{PooledTrainer, TrainerPool, default_workers};

/// Where the data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `mnist` (a directory with the standard IDX files; Fashion-MNIST works the same) or
    /// `bundled` (the MNIST subset shipped in the repository).
    pub name: String,
    /// Directory of the IDX files, for `mnist`.
    pub dir: Option<PathBuf>,
}

/// Per-phase dropout probabilities: the chance that a client's message of that phase is its
/// last of the round (it goes silent, and the server times it out). In-memory transport only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhaseDropout {
    /// The training result of a plain round.
    pub train: f64,
    /// SecAgg+ key advertisement.
    pub advertise_keys: f64,
    /// SecAgg+ encrypted shares.
    pub share_keys: f64,
    /// SecAgg+ masked input (the training result of a secure round).
    pub masked_input: f64,
    /// SecAgg+ signed survivor list.
    pub survivors: f64,
    /// SecAgg+ unmasking shares.
    pub unmask: f64,
}

/// Fault and heterogeneity injection (all seeded).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Probability that a client drops out at each phase of a round (in-memory: its message
    /// of that phase is lost; over QUIC: a sampled client fails its training).
    pub dropout: f64,
    /// Extra dropout probability at one phase (in-memory transport), on top of `dropout`.
    pub dropout_at: PhaseDropout,
    /// Probability that any message is lost.
    pub message_loss: f64,
    /// Extra delay of every message, milliseconds (simulated time).
    pub message_delay_ms: u64,
    /// Probability that a client is a straggler (its work takes `straggler_factor` longer).
    pub straggler_fraction: f64,
    /// Slow-down of stragglers.
    pub straggler_factor: f64,
    /// Client speed profiles: each client draws one (weighted by `share`) and its work takes
    /// `factor` times as long (stragglers' factor applies on top). Empty: all at speed 1.
    pub speed_profiles: Vec<SpeedProfile>,
    /// Simulated seconds one local training job takes on a normal client.
    pub compute_secs: f64,
    /// Heavy-tailed device speeds: each client's work takes `exp(σ·Z)` times as long
    /// (log-normal with median 1, Z standard normal), on top of its profile. 0: off.
    pub speed_lognormal_sigma: f64,
    /// A device trace: a CSV file of `client,speed_factor` lines (client index from 0; a
    /// header line is allowed). Client `i` takes the factor of line `i` (the file repeats
    /// for more clients), in place of the profiles and the log-normal draw.
    pub speed_trace: Option<PathBuf>,
    /// Diurnal availability (in memory): each client is online for
    /// `diurnal_online_fraction` of every period of this many simulated seconds, from a
    /// seeded random phase; offline it is gone (a closed connection: its work is lost) and it
    /// comes back with a new session. 0: always online.
    pub diurnal_period_secs: f64,
    /// Share of each period a client is online (see `diurnal_period_secs`).
    pub diurnal_online_fraction: f64,
    /// Availability windows from a trace (in memory): a CSV file of
    /// `client,start_secs,end_secs` lines, any number per client; a listed client is online
    /// only within its windows, an unlisted one always. Replaces the diurnal pattern.
    pub availability_trace: Option<PathBuf>,
}

/// Most availability windows a client may have (trace lines or diurnal periods).
pub const MAX_WINDOWS_PER_CLIENT: usize = 10_000;

/// Reads an availability trace (see [`Faults::availability_trace`]): each listed client's
/// windows, in seconds, sorted, checked not to overlap.
pub fn read_availability_trace(path: &Path) -> anyhow::Result<BTreeMap<usize, Vec<(f64, f64)>>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    anyhow::ensure!(
        len <= MAX_TRACE_BYTES,
        "{}: {len} bytes, more than the {MAX_TRACE_BYTES} a trace may have",
        path.display()
    );
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut windows: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        let parsed = match cols.as_slice() {
            [c, a, b] => match (c.parse::<usize>(), a.parse::<f64>(), b.parse::<f64>()) {
                (Ok(c), Ok(a), Ok(b)) => Some((c, a, b)),
                _ => None,
            },
            _ => None,
        };
        let Some((client, start, end)) = parsed else {
            if n == 0 {
                continue; // a header
            }
            anyhow::bail!(
                "{}:{}: expected `client,start_secs,end_secs`",
                path.display(),
                n + 1
            );
        };
        anyhow::ensure!(
            client < 10_000_000
                && start.is_finite()
                && end.is_finite()
                && 0.0 <= start
                && start < end,
            "{}:{}: client {client}, window {start}..{end}: a client below 10,000,000 and \
             0 <= start < end, in seconds",
            path.display(),
            n + 1
        );
        let w = windows.entry(client).or_default();
        anyhow::ensure!(
            w.len() < MAX_WINDOWS_PER_CLIENT,
            "{}:{}: client {client} has more than {MAX_WINDOWS_PER_CLIENT} windows",
            path.display(),
            n + 1
        );
        w.push((start, end));
    }
    anyhow::ensure!(!windows.is_empty(), "{}: no windows", path.display());
    for (client, w) in windows.iter_mut() {
        w.sort_by(|a, b| a.0.total_cmp(&b.0));
        anyhow::ensure!(
            w.windows(2).all(|p| match p {
                [a, b] => a.1 <= b.0,
                _ => true,
            }),
            "{}: client {client}'s windows overlap",
            path.display()
        );
    }
    Ok(windows)
}

/// Largest speed-trace file read (bytes).
pub const MAX_TRACE_BYTES: u64 = 16 << 20;

/// Reads a speed trace (see [`Faults::speed_trace`]): the factor of each client, in order.
pub fn read_speed_trace(path: &Path) -> anyhow::Result<Vec<f64>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    anyhow::ensure!(
        len <= MAX_TRACE_BYTES,
        "{}: {len} bytes, more than the {MAX_TRACE_BYTES} a speed trace may have",
        path.display()
    );
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut by_client = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut cols = line.split(',').map(str::trim);
        let (Some(c), Some(f), None) = (cols.next(), cols.next(), cols.next()) else {
            anyhow::bail!(
                "{}:{}: expected `client,speed_factor`",
                path.display(),
                n + 1
            );
        };
        let (Ok(client), Ok(factor)) = (c.parse::<usize>(), f.parse::<f64>()) else {
            if n == 0 {
                continue; // a header
            }
            anyhow::bail!(
                "{}:{}: expected `client,speed_factor`",
                path.display(),
                n + 1
            );
        };
        anyhow::ensure!(
            factor.is_finite() && factor > 0.0 && factor <= 1e4,
            "{}:{}: speed factor {factor} must be in (0, 10000]",
            path.display(),
            n + 1
        );
        anyhow::ensure!(
            by_client.insert(client, factor).is_none(),
            "{}:{}: client {client} listed twice",
            path.display(),
            n + 1
        );
    }
    anyhow::ensure!(!by_client.is_empty(), "{}: no clients", path.display());
    let factors: Vec<f64> = by_client.values().copied().collect();
    anyhow::ensure!(
        by_client.keys().copied().eq(0..factors.len()),
        "{}: clients must be numbered 0, 1, 2, … without gaps",
        path.display()
    );
    Ok(factors)
}

/// A class of clients with the same speed (e.g. phones 3× slower than laptops).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeedProfile {
    /// Relative share of clients with this profile.
    pub share: f64,
    /// Work takes this many times as long as on a speed-1 client.
    pub factor: f64,
}

impl Faults {
    /// Whether clients come and go (in memory only).
    pub fn has_availability(&self) -> bool {
        self.availability_trace.is_some() || self.diurnal_period_secs > 0.0
    }

    /// Each client's availability windows in seconds, or `None` for always online, up to
    /// `horizon` seconds: the trace's, or the diurnal pattern's from a seeded phase.
    pub fn availability(
        &self,
        clients: usize,
        seed: u64,
        horizon: f64,
    ) -> anyhow::Result<Vec<Option<Vec<(f64, f64)>>>> {
        if let Some(path) = &self.availability_trace {
            let trace = read_availability_trace(path)?;
            return Ok((0..clients).map(|i| trace.get(&i).cloned()).collect());
        }
        let period = self.diurnal_period_secs;
        if period <= 0.0 {
            return Ok(vec![None; clients]);
        }
        let on = self.diurnal_online_fraction.clamp(0.0, 1.0) * period;
        let periods = ((horizon / period).ceil() as usize + 1).min(MAX_WINDOWS_PER_CLIENT);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xD1A1);
        Ok((0..clients)
            .map(|_| {
                let phase = rng.random::<f64>() * period;
                // The window that began before 0 (if it reaches past it), then one per period.
                let w = (0..=periods)
                    .map(|k| phase + (k as f64 - 1.0) * period)
                    .map(|start| (start.max(0.0), start + on))
                    .filter(|(start, end)| end > start)
                    .collect();
                Some(w)
            })
            .collect())
    }

    /// Every client's slow-down, in client order: the trace's factor, or the profile's
    /// factor times the log-normal draw times the straggler factor. Seeded from `seed`.
    pub fn slowdowns(&self, clients: usize, seed: u64) -> anyhow::Result<Vec<f64>> {
        if let Some(path) = &self.speed_trace {
            let trace = read_speed_trace(path)?;
            return Ok((0..clients)
                .map(|i| trace.get(i % trace.len()).copied().unwrap_or(1.0))
                .collect());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED);
        Ok((0..clients).map(|_| self.slowdown(&mut rng)).collect())
    }

    /// A client's slow-down: its profile's factor, times the straggler factor if it is one.
    /// Draws from `rng` in a fixed order, so the same seed gives every client the same speed.
    fn slowdown(&self, rng: &mut ChaCha8Rng) -> f64 {
        let straggler = rng.random_bool(self.straggler_fraction.clamp(0.0, 1.0));
        let total: f64 = self.speed_profiles.iter().map(|p| p.share.max(0.0)).sum();
        let mut profile = 1.0;
        if total > 0.0 {
            let mut x = rng.random::<f64>() * total;
            for p in &self.speed_profiles {
                profile = p.factor.max(0.0);
                x -= p.share.max(0.0);
                if x < 0.0 {
                    break;
                }
            }
        }
        // Drawn last, and only when on: runs without it keep their speeds.
        let heavy = if self.speed_lognormal_sigma > 0.0 {
            let z: f64 = rng.sample(rand_distr::StandardNormal);
            (self.speed_lognormal_sigma * z).exp()
        } else {
            1.0
        };
        profile
            * heavy
            * if straggler {
                self.straggler_factor.max(1.0)
            } else {
                1.0
            }
    }

    fn any_dropout(&self) -> bool {
        self.dropout > 0.0 || self.dropout_at != PhaseDropout::default()
    }

    /// Probability that a client's message of this kind is its last of the round.
    fn dropout_for(&self, kind: &str) -> f64 {
        let d = &self.dropout_at;
        let phase = match kind {
            "TrainResult" => d.train,
            "AdvertiseKeys" => d.advertise_keys,
            "ShareKeys" => d.share_keys,
            "MaskedInput" => d.masked_input,
            "SurvivorsSigned" => d.survivors,
            "UnmaskShares" => d.unmask,
            _ => return 0.0, // hello, heartbeats, evaluation: not a round phase
        };
        let keep = (1.0 - self.dropout.clamp(0.0, 1.0)) * (1.0 - phase.clamp(0.0, 1.0));
        (1.0 - keep).clamp(0.0, 1.0)
    }
}

/// How the virtual clients reach the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The sans-IO machines on the in-memory harness, in simulated time (fast, scales to
    /// tens of thousands of clients, supports message loss and delay).
    #[default]
    Memory,
    /// A real server and one real client per virtual client, each with its own certificate and
    /// QUIC connection over loopback, in real time.
    Quic,
}

/// An experiment file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name (used in file names and titles).
    pub name: String,
    /// Virtual clients.
    pub clients: usize,
    /// Fraction of clients sampled per round (C).
    pub fraction: f64,
    /// Data set.
    pub data: DataConfig,
    /// How the training set is split among the clients.
    pub partition: Partition,
    /// `2nn` or `cnn`.
    pub model: String,
    /// Local training (epochs, batch size, learning rate, ...).
    #[serde(default)]
    pub train: TrainSettings,
    /// Strategy and its parameters (`name = "fedavg"` by default).
    #[serde(default)]
    pub strategy: StrategyConfig,
    /// Secure aggregation, if any.
    pub secure_aggregation: Option<SecAggConfig>,
    /// Differential privacy, if any.
    pub dp: Option<DpConfig>,
    /// Rounds to run (at most).
    pub rounds: u64,
    /// Stop once the test accuracy reaches this (the rounds-to-target figure uses it).
    pub target_accuracy: Option<f64>,
    /// Keep going after the target is reached until `rounds`.
    #[serde(default)]
    pub run_past_target: bool,
    /// Seed of everything.
    #[serde(default)]
    pub seed: u64,
    /// Faults and heterogeneity.
    #[serde(default)]
    pub faults: Faults,
    /// `memory` (default) or `quic`.
    #[serde(default)]
    pub transport: Transport,
    /// Training workers (each holds one model); default: one per core, or, on CUDA,
    /// `workers_per_gpu` per GPU.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Where the workers train: `cpu` (flex, the default) or `cuda` (falls back to the CPU
    /// with one log line where no GPU is usable). Central evaluation is sharded over the GPUs.
    #[serde(default)]
    pub backend: BackendKind,
    /// On CUDA: training workers (models) per GPU, spread over every GPU found. Several per
    /// GPU keep it busy when one client's small batches cannot.
    #[serde(default)]
    pub workers_per_gpu: Option<usize>,
    /// Arithmetic precision of local training: `f32` (default), `bf16` or `f16` (f32
    /// master weights; updates are f32).
    #[serde(default)]
    pub precision: Precision,
    /// Simulated seconds before a round's stragglers are cut.
    #[serde(default = "default_round_timeout")]
    pub round_timeout_secs: f64,
    /// How rounds are scheduled (the server's `[engine]`): `sync` (default) or `fedbuff`;
    /// with `fedbuff`, `rounds` counts model steps and `fraction` is not used.
    #[serde(default)]
    pub engine: EngineSettings,
}

fn default_round_timeout() -> f64 {
    600.0
}

impl Experiment {
    /// Reads an experiment file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let e: Experiment =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        validate(&e).with_context(|| format!("checking {}", path.display()))?;
        Ok(e)
    }
}

/// One round in the metrics files.
#[derive(Clone, Debug, Serialize)]
pub struct RoundMetrics {
    /// Round (0 = the initial model).
    pub round: u64,
    /// Test accuracy of the global model after the round.
    pub accuracy: f64,
    /// Test loss.
    pub loss: f64,
    /// Mean local training loss.
    pub train_loss: Option<f64>,
    /// Results aggregated.
    pub results: usize,
    /// Sampled clients that did not contribute.
    pub failures: usize,
    /// Whether the round was aborted.
    pub aborted: bool,
    /// Why, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort_reason: Option<String>,
    /// ε spent so far (with DP).
    pub epsilon: Option<f64>,
    /// Wall-clock seconds since the start.
    pub wall_secs: f64,
    /// The federation's clock at the end of the round: simulated seconds in memory (device
    /// speeds and message delays included), wall-clock seconds over QUIC.
    pub sim_secs: f64,
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The experiment.
    pub experiment: Experiment,
    /// Rounds run.
    pub rounds: u64,
    /// Accuracy after the last round.
    pub final_accuracy: f64,
    /// Best accuracy seen.
    pub best_accuracy: f64,
    /// Rounds to reach the target (McMahan et al.'s way: best-so-far curve, linear
    /// interpolation at the crossing), if reached.
    pub rounds_to_target: Option<f64>,
    /// Wall-clock seconds.
    pub wall_secs: f64,
    /// Model parameters.
    pub model_parameters: usize,
    /// Training workers used.
    pub training_workers: usize,
    /// Bytes of protocol messages delivered (in memory: by the harness; over QUIC: sent and
    /// received by the server).
    pub bytes_delivered: u64,
    /// Resident memory added by creating the idle virtual clients (enrolled, no model), per
    /// client, in bytes (Linux `/proc/self/status`; `None` elsewhere).
    pub idle_client_bytes: Option<f64>,
    /// Median wall-clock seconds per round (rounds after the first).
    pub secs_per_round: Option<f64>,
    /// The federation's clock (simulated seconds in memory, wall-clock over QUIC) when the
    /// target was reached, interpolated as `rounds_to_target` is, if reached.
    pub time_to_target_secs: Option<f64>,
    /// The federation's clock at the end of the run.
    pub sim_secs: f64,
}

/// Resident set size of this process, from `/proc/self/status` (Linux).
pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The clock when `target` was reached: [`rounds_to_target`]'s fractional round mapped onto
/// the clock of the rows (`clock[r]` at the end of round r), linearly.
pub fn time_to_target(acc: &[f64], clock: &[f64], target: f64) -> Option<f64> {
    let r = rounds_to_target(acc, target)?;
    let lo = r.floor() as usize;
    let a = *clock.get(lo)?;
    let b = clock.get(lo + 1).copied().unwrap_or(a);
    Some(a + (b - a) * (r - lo as f64))
}

/// Rounds to reach `target` on the best-so-far accuracy curve, interpolating linearly between
/// the last round below and the first at or above (McMahan et al. 2017). `acc[0]` is the
/// initial model, `acc[r]` the model after round r.
pub fn rounds_to_target(acc: &[f64], target: f64) -> Option<f64> {
    let mut best = f64::NEG_INFINITY;
    let mut prev = f64::NEG_INFINITY;
    for (r, &a) in acc.iter().enumerate() {
        best = best.max(a);
        if best >= target {
            if r == 0 {
                return Some(0.0);
            }
            let frac = if best > prev {
                (target - prev) / (best - prev)
            } else {
                1.0
            };
            return Some((r - 1) as f64 + frac.clamp(0.0, 1.0));
        }
        prev = best;
    }
    None
}

/// A virtual client: its example indices and a handle on the shared training pool.
struct VirtualClient {
    data: LocalData,
    pool: Arc<TrainerPool>,
    compute: Duration,
    initial: Params,
}

fn train_res(round: u64, model: &Params, r: crate::pool::JobResult) -> TrainRes {
    match r {
        Ok(u) => TrainRes {
            round,
            num_examples: u.num_examples,
            metrics: u.metrics,
            params: u.params,
        },
        Err(_) => TrainRes {
            round,
            num_examples: 0, // refused by the coordinator: this client drops out
            metrics: Metrics::new(),
            params: model.clone(),
        },
    }
}

impl ClientBehaviour for VirtualClient {
    fn initial_params(&mut self) -> Params {
        // The coordinator is given the initial model, so this is not asked for.
        self.initial.clone()
    }

    fn train(&mut self, round: u64, config: &TrainConfig, model: &Params) -> TrainRes {
        let rx = self
            .pool
            .submit(self.data.clone(), model.clone(), config.clone());
        train_res(round, model, TrainerPool::wait(&rx))
    }

    fn start_train(
        &mut self,
        round: u64,
        config: &TrainConfig,
        model: Params,
    ) -> Deferred<TrainRes> {
        // Queued now, collected when the simulated compute time is over: the clients sampled
        // together train in parallel on the pool's workers.
        let rx = self
            .pool
            .submit(self.data.clone(), model.clone(), config.clone());
        Deferred::Later(Box::new(move || {
            train_res(round, &model, TrainerPool::wait(&rx))
        }))
    }

    fn evaluate(&mut self, round: u64, _model: &Params) -> EvaluateRes {
        EvaluateRes {
            round,
            num_examples: 0,
            loss: 0.0,
            metrics: Metrics::new(),
        }
    }

    fn compute_time(&self) -> Duration {
        self.compute
    }
}

/// Certificates for `n` simulated clients from a throwaway CA, as SecAgg identities.
fn secagg_identities(n: usize) -> anyhow::Result<Vec<SecAggIdentity>> {
    let ca = CertificateAuthority::generate("Flotilla simulation CA", 1)?;
    let ca_der = ca.cert_der()?;
    let verifier = PeerVerifier::new(std::slice::from_ref(&ca_der), Vec::new())?;
    (0..n)
        .map(|i| {
            let ident = Identity::from_issued(&ca.issue_client(&format!("client-{i:05}"), 1)?)?;
            Ok(SecAggIdentity {
                signer: Signer::from_identity(&ident)?,
                certificate: ident.leaf()?.to_vec(),
                verifier: verifier.clone(),
            })
        })
        .collect()
}

fn load_data(c: &DataConfig) -> anyhow::Result<(Dataset, Dataset)> {
    Ok(match c.name.as_str() {
        "bundled" => (bundled::mnist(Split::Train)?, bundled::mnist(Split::Test)?),
        "mnist" | "fashion-mnist" => {
            let dir = c
                .dir
                .as_ref()
                .context("data.dir is needed for mnist (the directory with the IDX files)")?;
            (
                load_idx_dir(dir, Split::Train)?,
                load_idx_dir(dir, Split::Test)?,
            )
        }
        other => anyhow::bail!("unknown data set {other:?} (bundled, mnist, fashion-mnist)"),
    })
}

/// The server-side settings of an experiment (strategy, rounds, training, SecAgg, DP).
fn server_settings(exp: &Experiment) -> ServerConfig {
    let mut server = ServerConfig {
        strategy: exp.strategy.clone(),
        train: exp.train.clone(),
        ..ServerConfig::default()
    };
    server.strategy.fraction_train = exp.fraction;
    server.strategy.min_train_clients = server.strategy.min_train_clients.min(exp.clients);
    server.strategy.fraction_evaluate = 0.0;
    server.strategy.min_evaluate_clients = 0;
    server.train.seed = exp.seed;
    server.dp = exp.dp.clone();
    server.secure_aggregation = exp.secure_aggregation.clone();
    server.rounds.num_rounds = exp.rounds;
    // Everyone enrolled before the first round, unless clients come and go: then a round
    // needs only the clients it samples.
    server.rounds.min_available_clients = if exp.faults.has_availability() {
        exp.clients.min(server.strategy.min_train_clients.max(1))
    } else {
        exp.clients
    };
    server.rounds.min_train_results = 1;
    server.rounds.round_timeout_secs = exp.round_timeout_secs;
    server.rounds.evaluate_every = 0;
    server.rounds.seed = exp.seed;
    server.engine = exp.engine.clone();
    server
}

/// Checks an experiment before anything is loaded or started: the model, the data set, the
/// server-side settings (strategy and its parameters, rounds, SecAgg, DP) and the faults the
/// chosen transport supports.
pub fn validate(exp: &Experiment) -> anyhow::Result<()> {
    anyhow::ensure!(exp.clients >= 1, "clients must be at least 1");
    anyhow::ensure!(
        exp.fraction > 0.0 && exp.fraction <= 1.0,
        "fraction must be in (0, 1]"
    );
    anyhow::ensure!(
        matches!(
            exp.model.to_ascii_lowercase().as_str(),
            "2nn" | "mlp" | "cnn"
        ),
        "unknown model {:?} (2nn, cnn)",
        exp.model
    );
    anyhow::ensure!(
        matches!(
            exp.data.name.as_str(),
            "bundled" | "mnist" | "fashion-mnist"
        ),
        "unknown data set {:?} (bundled, mnist, fashion-mnist)",
        exp.data.name
    );
    let f = &exp.faults;
    anyhow::ensure!(
        f.diurnal_period_secs == 0.0
            || (f.diurnal_period_secs.is_finite()
                && f.diurnal_period_secs >= 60.0
                && f.diurnal_online_fraction > 0.0
                && f.diurnal_online_fraction <= 1.0),
        "faults.diurnal_period_secs must be 0 (off) or at least 60, with \
         faults.diurnal_online_fraction in (0, 1]"
    );
    let server = server_settings(exp);
    server.coordinator()?;
    server.strategy()?;
    if exp.transport == Transport::Quic {
        anyhow::ensure!(
            exp.faults.message_loss == 0.0 && exp.faults.message_delay_ms == 0,
            "faults.message_loss and faults.message_delay_ms apply to the in-memory transport only"
        );
        anyhow::ensure!(
            !exp.faults.has_availability(),
            "faults.diurnal_period_secs and faults.availability_trace apply to the in-memory transport only"
        );
        anyhow::ensure!(
            exp.faults.dropout_at == PhaseDropout::default(),
            "faults.dropout_at applies to the in-memory transport only (over QUIC, faults.dropout makes a sampled client fail its training)"
        );
    }
    Ok(())
}

/// Runs `exp`, writing its outputs into `out`. `progress`: show a progress bar.
pub fn run(exp: &Experiment, out: &Path, progress: bool) -> anyhow::Result<Summary> {
    validate(exp)?;
    match exp.model.to_ascii_lowercase().as_str() {
        "2nn" | "mlp" => run_model(exp, out, progress, |f, d| Mlp2nn::new(f, 10, d)),
        "cnn" => run_model(exp, out, progress, |_, d| Cnn::new(28, 10, d)),
        other => anyhow::bail!("unknown model {other:?} (2nn, cnn)"),
    }
}

/// Default [`Experiment::workers_per_gpu`].
pub const DEFAULT_WORKERS_PER_GPU: usize = 4;

/// The GPUs the experiment trains on: empty for the CPU (also when CUDA was asked for but is
/// not usable here: then one warning line says why).
fn training_devices(exp: &Experiment) -> Vec<flotilla_client::Device> {
    if exp.backend != BackendKind::Cuda {
        return Vec::new();
    }
    let (first, used) = flotilla_client::select_device(BackendKind::Cuda);
    if used != BackendKind::Cuda {
        return Vec::new();
    }
    let all = flotilla_client::cuda_devices();
    if all.is_empty() { vec![first] } else { all }
}

/// What both transports share: the data, the pool, the evaluation and the per-round rows.
struct Run<'a> {
    exp: &'a Experiment,
    start: Instant,
    train: Dataset,
    parts: Vec<Vec<usize>>,
    pool: Arc<TrainerPool>,
    initial: Params,
    server: ServerConfig,
    recorder: Recorder,
}

/// Tests a global model on the test set.
type EvaluateFn = Box<dyn FnMut(&Params) -> anyhow::Result<flotilla_client::Evaluation>>;

/// Evaluates the global model after every round and keeps the rows.
struct Recorder {
    evaluate: EvaluateFn,
    rows: Vec<RoundMetrics>,
    bar: Option<indicatif::ProgressBar>,
    start: Instant,
    target: Option<f64>,
    run_past_target: bool,
    seen: BTreeSet<u64>,
    /// Where `metrics.csv` is rewritten after every round.
    out: PathBuf,
}

impl Recorder {
    /// Records a finished round; returns whether the run should stop (target reached).
    /// Records a round's row; `sim_secs` is the simulated clock (`None`: real time).
    fn round(
        &mut self,
        record: &RoundRecord,
        global: &Params,
        sim_secs: Option<f64>,
    ) -> anyhow::Result<bool> {
        if !self.seen.insert(record.round) {
            return Ok(false);
        }
        let e = (self.evaluate)(global)?;
        let row = RoundMetrics {
            round: record.round,
            accuracy: e.accuracy,
            loss: e.loss,
            train_loss: record.train_metrics.get("train_loss").copied(),
            results: record.results,
            failures: record.failures.len(),
            aborted: record.aborted.is_some(),
            abort_reason: record.aborted.as_ref().map(|a| format!("{a:?}")),
            epsilon: record.privacy.as_ref().map(|p| p.epsilon),
            wall_secs: self.start.elapsed().as_secs_f64(),
            sim_secs: sim_secs.unwrap_or_else(|| self.start.elapsed().as_secs_f64()),
        };
        match &self.bar {
            Some(b) => {
                b.set_position(row.round);
                b.set_message(format!("accuracy {:.4}", row.accuracy));
            }
            None => println!(
                "round {}: accuracy {:.4}, loss {:.4}, {} results{}{}",
                row.round,
                row.accuracy,
                row.loss,
                row.results,
                row.epsilon
                    .map(|e| format!(", ε {e:.3}"))
                    .unwrap_or_default(),
                row.abort_reason
                    .as_ref()
                    .map(|r| format!(", aborted: {r}"))
                    .unwrap_or_default()
            ),
        }
        let reached = self.target.is_some_and(|t| row.accuracy >= t);
        self.rows.push(row);
        write_csv(&self.out, &self.rows)?;
        Ok(reached && !self.run_past_target)
    }
}

/// What a transport reports besides the rows.
struct TransportStats {
    bytes: u64,
    idle_client_bytes: Option<f64>,
}

fn run_model<M: Classifier + Send + 'static>(
    exp: &Experiment,
    out: &Path,
    progress: bool,
    make: impl Fn(usize, &flotilla_client::Device) -> M,
) -> anyhow::Result<Summary> {
    let start = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (train, test) = load_data(&exp.data)?;
    let parts = exp
        .partition
        .split(&train.labels, train.num_classes, exp.clients, exp.seed)?;
    // The initial model is drawn on the CPU whatever the backend, so that runs with the same
    // seed start from the same weights on every backend.
    let (cpu, _) = select_device(BackendKind::Cpu);
    let features = train.features();
    let init = || seeded(&cpu, exp.seed, |d| make(features, d));
    let devices = training_devices(exp);
    // Central evaluation: one evaluator per GPU, each testing its share of the test set at
    // the same time (one on the CPU).
    let eval_devices = if devices.is_empty() {
        vec![cpu.clone()]
    } else {
        devices.clone()
    };
    let mut evaluators = Vec::with_capacity(eval_devices.len());
    for d in &eval_devices {
        evaluators.push(BurnTrainer::new(
            init().to_device(d),
            LocalData::all(train.head(1)),
            None,
        )?);
    }
    let initial = evaluators
        .first_mut()
        .context("no evaluation device")?
        .initial_params()?;
    let params = initial.len();
    let workers = match (exp.workers, devices.is_empty()) {
        (Some(w), _) => w,
        (None, true) => default_workers(),
        (None, false) => devices.len() * exp.workers_per_gpu.unwrap_or(DEFAULT_WORKERS_PER_GPU),
    }
    .max(1);
    if devices.is_empty() && exp.precision != Precision::F32 {
        tracing::warn!(
            "precision {} needs a GPU; training in f32 on the CPU",
            exp.precision
        );
    }
    let mut next = 0usize;
    let pool = TrainerPool::new(workers, || {
        // Round-robin over the GPUs (or all on the CPU).
        let device = devices
            .get(next % devices.len().max(1))
            .cloned()
            .unwrap_or_else(|| cpu.clone());
        next += 1;
        let t = BurnTrainer::new(
            init().to_device(&device),
            LocalData::all(train.head(1)),
            None,
        )?;
        Ok(if devices.is_empty() {
            t
        } else {
            t.with_precision(exp.precision)?
        })
    })?;
    let test_all = LocalData::all(test);
    let mut evaluator = ShardedEvaluator::new(evaluators, &test_all)?;
    if evaluator.shards() > 1 {
        tracing::info!(
            "central evaluation sharded over {} GPUs",
            evaluator.shards()
        );
    }

    let server = server_settings(exp);

    let bar = progress.then(|| {
        let b = indicatif::ProgressBar::new(exp.rounds);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise} (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let e0 = evaluator.evaluate(&initial)?;
    let recorder = Recorder {
        evaluate: Box::new(move |p| evaluator.evaluate(p)),
        rows: vec![RoundMetrics {
            round: 0,
            accuracy: e0.accuracy,
            loss: e0.loss,
            train_loss: None,
            results: 0,
            failures: 0,
            aborted: false,
            abort_reason: None,
            epsilon: None,
            wall_secs: start.elapsed().as_secs_f64(),
            sim_secs: 0.0,
        }],
        bar,
        start,
        target: exp.target_accuracy,
        run_past_target: exp.run_past_target,
        seen: BTreeSet::new(),
        out: out.to_path_buf(),
    };
    let mut run = Run {
        exp,
        start,
        train,
        parts,
        pool,
        initial,
        server,
        recorder,
    };
    let stats = match exp.transport {
        Transport::Memory => run.in_memory()?,
        Transport::Quic => run.over_quic(out)?,
    };
    let rows = std::mem::take(&mut run.recorder.rows);
    if let Some(b) = &run.recorder.bar {
        b.finish_and_clear();
    }
    let acc: Vec<f64> = rows.iter().map(|r| r.accuracy).collect();
    let mut per_round: Vec<f64> = rows
        .windows(2)
        .skip(1)
        .filter_map(|w| Some(w.get(1)?.wall_secs - w.first()?.wall_secs))
        .collect();
    per_round.sort_by(f64::total_cmp);
    let summary = Summary {
        experiment: exp.clone(),
        rounds: rows.last().map_or(0, |r| r.round),
        final_accuracy: acc.last().copied().unwrap_or(0.0),
        best_accuracy: acc.iter().copied().fold(0.0, f64::max),
        rounds_to_target: exp.target_accuracy.and_then(|t| rounds_to_target(&acc, t)),
        wall_secs: run.start.elapsed().as_secs_f64(),
        model_parameters: params,
        training_workers: run.pool.workers(),
        bytes_delivered: stats.bytes,
        idle_client_bytes: stats.idle_client_bytes,
        secs_per_round: per_round.get(per_round.len() / 2).copied(),
        time_to_target_secs: exp.target_accuracy.and_then(|t| {
            let clock: Vec<f64> = rows.iter().map(|r| r.sim_secs).collect();
            time_to_target(&acc, &clock, t)
        }),
        sim_secs: rows.last().map_or(0.0, |r| r.sim_secs),
    };
    write_outputs(out, exp, &rows, &summary)?;
    Ok(summary)
}

impl Run<'_> {
    /// The sans-IO machines on the in-memory harness, in simulated time.
    fn in_memory(&mut self) -> anyhow::Result<TransportStats> {
        let exp = self.exp;
        let mut cc = self.server.coordinator()?;
        // Reproducible runs: seeded (and therefore insecure) central DP noise.
        let central_noise = CryptoProvider::insecure_deterministic(exp.seed);
        // Simulated clients never go idle unnoticed; heartbeats would only cost messages.
        cc.idle_timeout = None;
        let coordinator = Coordinator::new(
            cc,
            self.server.strategy_with(&central_noise)?,
            Some(self.initial.clone()),
        )?;
        let mut h = Harness::new(coordinator, exp.seed);
        let f = exp.faults.clone();
        if f.any_dropout() || f.message_loss > 0.0 || f.message_delay_ms > 0 {
            // One generator per client, seeded from the run's seed and the client's id: a
            // client's faults depend on its own messages only, so other clients' traffic (or a
            // message kind no fault touches, such as heartbeats) does not reshuffle them.
            let seed = exp.seed ^ 0xF417;
            let mut rngs: BTreeMap<ClientId, ChaCha8Rng> = BTreeMap::new();
            h.set_filter(Box::new(move |env| {
                // A client's message of any phase of a round may be its last: the client goes
                // silent and the server times it out of the phase.
                let p = match env.direction {
                    Direction::ToServer => f.dropout_for(env.message.kind()),
                    Direction::ToClient => 0.0,
                };
                // No draw (and no generator kept) where nothing can happen: a client that
                // only said hello costs nothing here.
                let (lost, dropped) = if f.message_loss > 0.0 || p > 0.0 {
                    let rng = rngs.entry(env.client.clone()).or_insert_with(|| {
                        ChaCha8Rng::seed_from_u64(
                            seed ^ flotilla_protocol::harness::fnv1a(
                                env.client.as_str().as_bytes(),
                            ),
                        )
                    });
                    let lost =
                        f.message_loss > 0.0 && rng.random_bool(f.message_loss.clamp(0.0, 1.0));
                    (lost, p > 0.0 && rng.random_bool(p))
                } else {
                    (false, false)
                };
                if lost || dropped {
                    Action::Drop
                } else if f.message_delay_ms > 0 {
                    Action::Delay(Duration::from_millis(f.message_delay_ms))
                } else {
                    Action::Deliver
                }
            }));
        }
        // Secure aggregation needs every client to hold a certificate of the federation.
        let identities = match &exp.secure_aggregation {
            Some(_) => Some(secagg_identities(exp.clients)?),
            None => None,
        };
        let mut identities = identities.map(Vec::into_iter);
        let rss_before = rss_bytes();
        let slowdowns = exp.faults.slowdowns(exp.clients, exp.seed)?;
        let compute = Duration::from_secs_f64(if exp.faults.compute_secs > 0.0 {
            exp.faults.compute_secs
        } else {
            1.0
        });
        for (i, idx) in std::mem::take(&mut self.parts).into_iter().enumerate() {
            let slowdown = slowdowns.get(i).copied().unwrap_or(1.0);
            let c = VirtualClient {
                data: LocalData::subset(self.train.clone(), idx)?,
                pool: self.pool.clone(),
                initial: self.initial.clone(),
                compute: compute.mul_f64(slowdown),
            };
            let id = ClientId::new(format!("client-{i:05}"));
            match identities.as_mut().and_then(Iterator::next) {
                Some(identity) => {
                    let p = Participant::new(Capabilities {
                        backend: "sim".into(),
                        ..Capabilities::default()
                    })
                    .with_secure_aggregation(identity)
                    // Reproducible runs: seeded (and therefore insecure) keys, masks and noise.
                    .with_provider(CryptoProvider::insecure_deterministic(
                        exp.seed.wrapping_add(i as u64),
                    ));
                    h.add_participant(id, p, Box::new(c));
                }
                None => h.add_client(id, Box::new(c)),
            }
        }
        // Devices that come and go.
        let horizon = exp.round_timeout_secs.max(1.0) * exp.rounds as f64;
        for (i, windows) in exp
            .faults
            .availability(exp.clients, exp.seed, horizon)?
            .into_iter()
            .enumerate()
        {
            if let Some(w) = windows {
                let w: Vec<(Duration, Duration)> = w
                    .into_iter()
                    .map(|(a, b)| (Duration::from_secs_f64(a), Duration::from_secs_f64(b)))
                    .collect();
                h.set_availability(&ClientId::new(format!("client-{i:05}")), &w);
            }
        }
        // What the idle clients cost: their state machines, their example indices, their
        // queued hello (measured before the first round puts models in flight).
        let idle_client_bytes = match (rss_before, rss_bytes()) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / exp.clients as f64),
            _ => None,
        };
        let mut cursor = 0usize;
        // A coordinator that cannot start a round waits for clients (nothing is burnt). In
        // memory no new client will come, so after this much simulated time without a round
        // the run stops, saying why, instead of simulating heartbeats forever.
        let stall = {
            let c = h.coordinator.config();
            let mut stall = c.round_timeout + c.idle_timeout.unwrap_or(Duration::ZERO) * 2;
            if exp.faults.availability_trace.is_some() {
                // A trace may leave too few online for any stretch of its horizon.
                stall += Duration::from_secs_f64(horizon);
            } else if exp.faults.has_availability() {
                // Waiting through the hours when too few are online is not a stall.
                stall += Duration::from_secs_f64(exp.faults.diurnal_period_secs);
            }
            stall
        };
        let mut waiting: Option<(Duration, Event)> = None;
        loop {
            let mut ended = None;
            let mut stalled = false;
            h.run_until(Duration::from_secs(u64::MAX / 4), |h| {
                while let Some((at, ev)) = h.events.get(cursor) {
                    cursor += 1;
                    match ev {
                        Event::RoundCompleted(r) | Event::RoundAborted(r) => {
                            ended = Some(r.clone());
                            return true;
                        }
                        Event::Finished => return true,
                        Event::WaitingForClients { .. } => {
                            waiting.get_or_insert((*at, ev.clone()));
                        }
                        Event::RoundStarted { .. } | Event::Dispatched { .. } => waiting = None,
                        Event::ClientDropped { client, reason } => {
                            tracing::warn!("{client} dropped: {reason}");
                        }
                        _ => {}
                    }
                }
                if let Some((since, _)) = &waiting
                    && h.elapsed() > *since + stall
                {
                    stalled = true;
                    return true;
                }
                false
            });
            if stalled {
                if let Some((
                    _,
                    Event::WaitingForClients {
                        enrolled,
                        eligible,
                        required,
                        ..
                    },
                )) = &waiting
                {
                    tracing::warn!(
                        "stopping after round {}: no round could start for {stall:?} of simulated time \
                         (waiting for {required} eligible clients, have {eligible} of {enrolled} enrolled)",
                        h.coordinator.round()
                    );
                }
                break;
            }
            // None: finished (all rounds done, or the privacy budget), or nothing left to do.
            let Some(record) = ended else { break };
            let global = h.coordinator.global().context("no model")?.clone();
            let clock = Some(h.elapsed().as_secs_f64());
            if self.recorder.round(&record, &global, clock)? || h.coordinator.is_finished() {
                break;
            }
        }
        Ok(TransportStats {
            bytes: h.stats.bytes,
            idle_client_bytes,
        })
    }

    /// A real server and one real client per virtual client, each with its own certificate
    /// and QUIC connection over loopback, in real time.
    fn over_quic(&mut self, out: &Path) -> anyhow::Result<TransportStats> {
        let exp = self.exp;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let pki_dir = tempfile::tempdir()?;
        let (pki, ids) = make_pki(pki_dir.path(), exp.clients)?;
        // Snapshots in memory: a fresh run every time (never one resumed from an earlier
        // run's files), and the model is read from the server's events, not from files.
        let store = std::sync::Arc::new(flotilla_server::checkpoint::MemoryStore::default());
        let mut config = server_config(&pki, &out.join("checkpoints"));
        config.rounds = self.server.rounds.clone();
        config.strategy = self.server.strategy.clone();
        config.train = self.server.train.clone();
        config.secure_aggregation = self.server.secure_aggregation.clone();
        config.dp = self.server.dp.clone();
        config.engine = self.server.engine.clone();
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut server =
            rt.block_on(async { flotilla_server::start_with_store(config, store, Some(ev_tx)) })?;
        let addr = server.local_addr;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let rss_before = rss_bytes();
        let slowdowns = exp.faults.slowdowns(exp.clients, exp.seed)?;
        let mut clients = Vec::new();
        for (i, (id, idx)) in ids.iter().zip(std::mem::take(&mut self.parts)).enumerate() {
            // Real time: a slowed client sleeps the extra share of `compute_secs`.
            let slowdown = slowdowns.get(i).copied().unwrap_or(1.0);
            let delay = exp.faults.compute_secs.max(0.0) * (slowdown - 1.0).max(0.0);
            let trainer = PooledTrainer {
                pool: self.pool.clone(),
                data: LocalData::subset(self.train.clone(), idx)?,
                initial: self.initial.clone(),
                delay: Duration::from_secs_f64(delay),
                dropout: (exp.faults.dropout > 0.0).then(|| {
                    (
                        exp.faults.dropout,
                        ChaCha8Rng::seed_from_u64(exp.seed ^ 0xD809 ^ i as u64),
                    )
                }),
            };
            let mut o = client_options(&pki, id, addr)?;
            o.capabilities.backend = "sim".into();
            clients.push(rt.spawn(flotilla_client::driver::run(o, trainer, stop_rx.clone())));
        }
        let mut enrolled = 0usize;
        let mut idle_client_bytes = None;
        let mut stopped_early = false;
        let mut global = self.initial.clone();
        let mut completed = None;
        while let Some(ev) = rt.block_on(ev_rx.recv()) {
            match ev {
                Event::ClientEnrolled(_) => {
                    enrolled += 1;
                    if enrolled == exp.clients {
                        // Every client connected and idle (its connection, its machine, its
                        // examples' indices), before the first round.
                        idle_client_bytes = match (rss_before, rss_bytes()) {
                            (Some(a), Some(b)) => {
                                Some(b.saturating_sub(a) as f64 / exp.clients as f64)
                            }
                            _ => None,
                        };
                    }
                }
                Event::RoundCompleted(r) => completed = Some(r),
                Event::GlobalModel { round, params } => {
                    // Sent right after the round's record, once its checkpoint is on disk.
                    let Some(r) = completed.take().filter(|r| r.round == round) else {
                        anyhow::bail!("the server sent round {round}'s model without its record");
                    };
                    global = params;
                    if self.recorder.round(&r, &global, None)? {
                        stopped_early = true;
                        break;
                    }
                }
                Event::RoundAborted(r) => {
                    // No checkpoint for a round that did not complete: the model is the last
                    // completed round's.
                    if self.recorder.round(&r, &global, None)? {
                        stopped_early = true;
                        break;
                    }
                }
                Event::Finished => break,
                _ => {}
            }
        }
        if stopped_early {
            server.shutdown();
        }
        let summary = rt.block_on(server.join())?;
        let _ = stop_tx.send(true);
        rt.block_on(async {
            for c in clients {
                match tokio::time::timeout(Duration::from_secs(30), c).await {
                    Ok(Ok(Ok(_))) => {}
                    Ok(Ok(Err(e))) => tracing::debug!("a client ended with: {e}"),
                    _ => tracing::warn!("a client did not stop in time"),
                }
            }
        });
        Ok(TransportStats {
            bytes: summary.bytes_sent + summary.bytes_received,
            idle_client_bytes,
        })
    }
}
fn write_outputs(
    out: &Path,
    exp: &Experiment,
    rows: &[RoundMetrics],
    summary: &Summary,
) -> anyhow::Result<()> {
    write_csv(out, rows)?;
    std::fs::write(
        out.join("metrics.json"),
        serde_json::to_string_pretty(rows)?,
    )?;
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(summary)?,
    )?;
    crate::plot::curves(out, &exp.name, rows, exp.target_accuracy)?;
    Ok(())
}

/// Writes `metrics.csv` (atomically: a long run's file is complete after every round).
fn write_csv(out: &Path, rows: &[RoundMetrics]) -> anyhow::Result<()> {
    let mut csv = String::from(
        "round,accuracy,loss,train_loss,results,failures,aborted,epsilon,sim_secs,wall_secs\n",
    );
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{:.3},{:.3}\n",
            r.round,
            r.accuracy,
            r.loss,
            r.train_loss.map(|v| v.to_string()).unwrap_or_default(),
            r.results,
            r.failures,
            r.aborted,
            r.epsilon.map(|v| v.to_string()).unwrap_or_default(),
            r.sim_secs,
            r.wall_secs
        ));
    }
    let tmp = out.join("metrics.csv.tmp");
    std::fs::write(&tmp, csv).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out.join("metrics.csv"))?;
    Ok(())
}
