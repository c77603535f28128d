//! The server's configuration: a TOML file, every field defaulted, overridable from the
//! command line.
//!
//! ```toml
//! listen = "0.0.0.0:4433"
//! checkpoint_dir = "checkpoints"
//! # initial_model = "model.safetensors"   # else taken from a client, once [rounds]
//!                                         # model_quorum clients declare the same model
//! max_model_bytes = 1073741824            # bound on an initial model taken from a client
//!
//! [operations]
//! # listen = "127.0.0.1:9464"             # plain HTTP: /metrics (Prometheus), / (dashboard),
//!                                         # /api/status, /healthz, /readyz. No TLS, no
//!                                         # authentication: keep it private. Off by default.
//!
//! [tls]
//! ca = "pki/ca.crt"
//! cert = "pki/server.crt"
//! key = "pki/server.key"
//! crl = "pki/crl.pem"                     # optional
//!
//! [rounds]
//! num_rounds = 10
//! min_available_clients = 2
//! min_train_results = 2
//! round_timeout_secs = 600
//! evaluate_every = 1
//! seed = 0
//! idle_timeout_secs = 120               # no sign of life this long: the client is dropped
//! heartbeat_secs = 10                     # clients send a heartbeat this often (at most
//!                                         # half the idle timeout)
//! history_window = 100                    # round records in memory and checkpoints
//! max_missed_deadlines = 2                # then a straggler sits out...
//! straggler_backoff_secs = 600            # ...this long
//! over_selection = 0.0                    # sample this fraction more, close when enough
//! max_examples = 100000000                # cap on a client's reported example count
//! model_quorum = 2                        # clients that must agree on the model before it
//!                                         # is taken from one (no initial_model; capped at
//!                                         # min_available_clients)
//!
//! [limits]                                # what peers can make the server hold or wait for
//! max_connections = 10000
//! max_connections_per_identity = 2
//! max_handshakes = 256                    # in progress; more are refused
//! retry_above_handshakes = 32             # QUIC Retry (address validation) above this
//! handshake_timeout_secs = 10.0
//! hello_timeout_secs = 10.0
//! io_timeout_secs = 10.0                  # per message read or send, plus...
//! min_transfer_rate = 65536               # ...its size at this many bytes per second
//! send_queue = 32                         # messages queued per client
//! replacements_per_minute = 3             # of one identity's live connection
//! live_connection_secs = 30.0             # a second connection for a live one is refused
//! max_metrics = 32
//! max_metric_name_bytes = 64
//! max_text_bytes = 256
//! crl_reload_secs = 30.0                  # the CRL is re-read when it changes (and on SIGHUP)
//!
//! [strategy]
//! name = "fedavg"
//! fraction_train = 1.0
//! min_train_clients = 2
//! fraction_evaluate = 1.0
//! min_evaluate_clients = 2
//!
//! [train]                                 # sent to clients every round
//! epochs = 1
//! batch_size = 10                         # 0 = full batch
//! learning_rate = 0.05
//! lr_decay = 1.0                          # per round
//! momentum = 0.0
//! optimizer = "sgd"                       # or "adam"
//! proximal_mu = 0.0
//! seed = 0
//!
//! [secure_aggregation]                    # SecAgg+; the section's presence turns it on
//! neighbours = 10                         # k; 0 = everyone (classic SecAgg)
//! threshold = 6                           # t, kept in (k/2, k]
//! clip = 1.0                              # c: range of w/W · (local − global)
//! bits = 24                               # b; lowered per round so n·2^b fits 32 bits
//! max_weight = 10000                      # W: cap on a client's example count
//! phase_timeout_ms = 30000                # per key-exchange / unmasking step
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_protocol::CryptoProvider;
use flotilla_protocol::coordinator::{CoordinatorConfig, EngineConfig, FedBuffConfig};
use flotilla_protocol::dp::{DpConfig, DpMode, DpServer};
use flotilla_protocol::secagg::SecAggConfig;
use flotilla_protocol::strategy::{
    Bulyan, FedAvgM, FedMedian, FedOpt, FedProx, FedTrimmedAvg, Krum, QFedAvg, ServerOptimizer,
};
use flotilla_protocol::strategy::{FedAvg, Sampling, Strategy};
use flotilla_protocol::wire::messages::{BatchSize, Optimizer, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Where the server's TLS material is (each field defaults to the `pki/` layout that
/// `flotilla-server certs` writes, so a section may name only what differs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Federation CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// Certificate revocation list (PEM), if any.
    pub crl: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            ca: "pki/ca.crt".into(),
            cert: "pki/server.crt".into(),
            key: "pki/server.key".into(),
            crl: None,
        }
    }
}

/// The operations endpoint (see [`crate::ops`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OperationsConfig {
    /// TCP address of the plain-HTTP endpoint serving `/metrics`, the dashboard,
    /// `/api/status`, `/healthz` and `/readyz`; none (the default) serves nothing. It has no
    /// TLS and no authentication: bind it to localhost or a private network.
    pub listen: Option<SocketAddr>,
}

/// Round settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundsConfig {
    /// Rounds to run.
    pub num_rounds: u64,
    /// Enrolled clients needed before a round starts.
    pub min_available_clients: usize,
    /// Results needed for a round to count.
    pub min_train_results: usize,
    /// Seconds clients have to train (and to evaluate).
    pub round_timeout_secs: f64,
    /// Evaluate every this many rounds (0 = never).
    pub evaluate_every: u64,
    /// Seed for client sampling.
    pub seed: u64,
    /// Seconds without any sign of life (a message, bytes of one, a heartbeat) after which
    /// a client is dropped. At least twice `heartbeat_secs`.
    pub idle_timeout_secs: f64,
    /// Seconds between the heartbeats clients are told to send while they have nothing
    /// else to send.
    pub heartbeat_secs: f64,
    /// Round records kept in memory and in checkpoints (every record is also appended to
    /// `history.jsonl` in the checkpoint directory).
    pub history_window: usize,
    /// Training deadlines missed in a row before a client sits out (0: never).
    pub max_missed_deadlines: u32,
    /// Seconds an excluded straggler sits out.
    pub straggler_backoff_secs: f64,
    /// Sample this fraction more clients than the strategy asks for and close training as
    /// soon as the strategy's number of results is in (plain rounds only).
    pub over_selection: f64,
    /// Largest example count a client may report (its FedAvg weight).
    pub max_examples: u64,
    /// Without `initial_model`: clients that must declare the same model before the initial
    /// model is taken from one of them (capped at `min_available_clients`).
    pub model_quorum: usize,
}

impl Default for RoundsConfig {
    fn default() -> Self {
        Self {
            num_rounds: 10,
            min_available_clients: 2,
            min_train_results: 2,
            round_timeout_secs: 600.0,
            evaluate_every: 1,
            seed: 0,
            idle_timeout_secs: 120.0,
            heartbeat_secs: 10.0,
            history_window: flotilla_protocol::coordinator::DEFAULT_HISTORY_WINDOW,
            max_missed_deadlines: 2,
            straggler_backoff_secs: 600.0,
            over_selection: 0.0,
            max_examples: flotilla_protocol::coordinator::DEFAULT_MAX_EXAMPLES,
            model_quorum: 2,
        }
    }
}

/// The aggregation strategy and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StrategyConfig {
    /// Strategy name: `fedavg`, `fedavgm`, `fedprox`, `fedadagrad`, `fedadam`, `fedyogi`,
    /// `qfedavg`, `fedmedian`, `fedtrimmedavg`, `krum`, `multikrum`, `bulyan`.
    pub name: String,
    /// Fraction of available clients sampled for training (C).
    pub fraction_train: f64,
    /// At least this many trainers per round.
    pub min_train_clients: usize,
    /// Fraction of available clients sampled for evaluation.
    pub fraction_evaluate: f64,
    /// At least this many evaluators per round.
    pub min_evaluate_clients: usize,
    /// FedAvgM: server learning rate (default 1.0).
    pub server_learning_rate: Option<f64>,
    /// FedAvgM: server momentum (default 0.9).
    pub server_momentum: Option<f64>,
    /// FedProx: proximal term μ (default 0.01).
    pub proximal_mu: Option<f64>,
    /// FedAdagrad/FedAdam/FedYogi: server learning rate η.
    pub eta: Option<f64>,
    /// FedAdagrad/FedAdam/FedYogi: β₁.
    pub beta_1: Option<f64>,
    /// FedAdam/FedYogi: β₂.
    pub beta_2: Option<f64>,
    /// FedAdagrad/FedAdam/FedYogi: τ.
    pub tau: Option<f64>,
    /// QFedAvg: q (default 0.2).
    pub q: Option<f64>,
    /// QFedAvg: learning rate defining L = 1/lr (default 0.1).
    pub qffl_learning_rate: Option<f64>,
    /// FedTrimmedAvg: fraction trimmed at each end (default 0.2).
    pub trim_beta: Option<f64>,
    /// Krum/Multi-Krum/Bulyan: Byzantine clients tolerated, f (default 0).
    pub num_malicious: usize,
    /// Multi-Krum: updates averaged, m (default: n − f).
    pub num_to_keep: Option<usize>,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            name: "fedavg".into(),
            fraction_train: 1.0,
            min_train_clients: 2,
            fraction_evaluate: 1.0,
            min_evaluate_clients: 2,
            server_learning_rate: None,
            server_momentum: None,
            proximal_mu: None,
            eta: None,
            beta_1: None,
            beta_2: None,
            tau: None,
            q: None,
            qffl_learning_rate: None,
            trim_beta: None,
            num_malicious: 0,
            num_to_keep: None,
        }
    }
}

/// Local training settings sent to clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    /// Local epochs (E).
    pub epochs: u32,
    /// Local batch size (B); 0 = full batch.
    pub batch_size: u32,
    /// Learning rate.
    pub learning_rate: f64,
    /// Learning-rate decay per round.
    pub lr_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// `sgd` or `adam`.
    pub optimizer: String,
    /// FedProx mu.
    pub proximal_mu: f64,
    /// Base seed for local shuffling.
    pub seed: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 10,
            learning_rate: 0.05,
            lr_decay: 1.0,
            momentum: 0.0,
            optimizer: "sgd".into(),
            proximal_mu: 0.0,
            seed: 0,
        }
    }
}

impl TrainSettings {
    /// As the protocol's [`TrainConfig`].
    pub fn to_train_config(&self) -> Result<TrainConfig, Error> {
        let optimizer = match self.optimizer.to_ascii_lowercase().as_str() {
            "sgd" => Optimizer::Sgd {
                momentum: self.momentum,
            },
            "adam" => Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
            },
            other => {
                return Err(Error::Config(format!(
                    "unknown optimizer {other:?} (sgd or adam)"
                )));
            }
        };
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(Error::Config(format!(
                "learning_rate {} must be positive",
                self.learning_rate
            )));
        }
        if self.epochs == 0 {
            return Err(Error::Config("epochs must be at least 1".into()));
        }
        Ok(TrainConfig {
            epochs: self.epochs,
            batch_size: if self.batch_size == 0 {
                BatchSize::Full
            } else {
                BatchSize::Fixed(self.batch_size)
            },
            learning_rate: self.learning_rate,
            lr_decay: self.lr_decay,
            optimizer,
            proximal_mu: self.proximal_mu,
            seed: self.seed,
            dp: None,
        })
    }
}

/// Bounds on what peers (enrolled or not) can make the server hold or wait for. See the
/// threat model in `docs/threat-model.md`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections at once, all identities together.
    pub max_connections: usize,
    /// Connections at once per client identity (one live session plus a newcomer).
    pub max_connections_per_identity: usize,
    /// TLS handshakes in progress at once; further attempts are refused.
    pub max_handshakes: usize,
    /// Above this many handshakes in progress, unvalidated addresses must answer a QUIC
    /// Retry first (address validation; 0: always).
    pub retry_above_handshakes: usize,
    /// Seconds a handshake may take.
    pub handshake_timeout_secs: f64,
    /// Seconds a new connection has to send its Hello.
    pub hello_timeout_secs: f64,
    /// Fixed seconds allowed for reading or sending any one message...
    pub io_timeout_secs: f64,
    /// ...plus its size at this rate (bytes per second): slower peers are closed.
    pub min_transfer_rate: u64,
    /// Messages queued for one client before it counts as too slow and is closed.
    pub send_queue: usize,
    /// Times per minute one identity's live connection may be replaced by a new one.
    pub replacements_per_minute: u32,
    /// A connection that delivered anything within this many seconds is live: a second
    /// connection with its identity is refused rather than allowed to replace it.
    pub live_connection_secs: f64,
    /// Metrics per result.
    pub max_metrics: u32,
    /// Bytes per metric name.
    pub max_metric_name_bytes: u32,
    /// Bytes per free-text field (reasons, capability strings).
    pub max_text_bytes: u32,
    /// Seconds between re-reads of the CRL file (it is also re-read on SIGHUP).
    pub crl_reload_secs: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_identity: 2,
            max_handshakes: 256,
            retry_above_handshakes: 32,
            handshake_timeout_secs: 10.0,
            hello_timeout_secs: 10.0,
            io_timeout_secs: 10.0,
            min_transfer_rate: 64 * 1024,
            send_queue: 32,
            replacements_per_minute: 3,
            live_connection_secs: 30.0,
            max_metrics: flotilla_protocol::wire::bounds::DEFAULT_MAX_METRICS,
            max_metric_name_bytes: flotilla_protocol::wire::bounds::DEFAULT_MAX_NAME_BYTES,
            max_text_bytes: flotilla_protocol::wire::bounds::DEFAULT_MAX_TEXT_BYTES,
            crl_reload_secs: 30.0,
        }
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), Error> {
        for (v, what) in [
            (self.handshake_timeout_secs, "handshake_timeout_secs"),
            (self.hello_timeout_secs, "hello_timeout_secs"),
            (self.io_timeout_secs, "io_timeout_secs"),
            (self.crl_reload_secs, "crl_reload_secs"),
            (self.live_connection_secs, "live_connection_secs"),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::Config(format!(
                    "limits.{what} must be a positive number of seconds"
                )));
            }
        }
        for (v, what) in [
            (self.max_connections, "max_connections"),
            (
                self.max_connections_per_identity,
                "max_connections_per_identity",
            ),
            (self.max_handshakes, "max_handshakes"),
            (self.send_queue, "send_queue"),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("limits.{what} must be at least 1")));
            }
        }
        if self.min_transfer_rate == 0 {
            return Err(Error::Config(
                "limits.min_transfer_rate must be positive".into(),
            ));
        }
        Ok(())
    }

    /// The codec limits for messages from clients.
    pub fn codec_limits(&self, max_payload_bytes: u64) -> flotilla_protocol::wire::codec::Limits {
        flotilla_protocol::wire::codec::Limits {
            max_payload_bytes,
            max_metrics: self.max_metrics,
            max_name_bytes: self.max_metric_name_bytes,
            max_text_bytes: self.max_text_bytes,
            ..Default::default()
        }
    }

    /// The deadline rule for moving one message.
    pub fn io_deadline(&self) -> flotilla_protocol::quic::IoDeadline {
        flotilla_protocol::quic::IoDeadline {
            base: Duration::from_secs_f64(self.io_timeout_secs),
            min_bytes_per_sec: self.min_transfer_rate,
        }
    }
}

/// `[engine]`: synchronous rounds, or buffered asynchronous aggregation (FedBuff). With
/// `fedbuff`, `rounds.num_rounds` counts model steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// `"sync"` or `"fedbuff"`.
    pub kind: String,
    /// FedBuff: clients training at once.
    pub concurrency: usize,
    /// FedBuff: updates per model step.
    pub buffer_size: usize,
    /// FedBuff: updates more than this many versions behind are refused.
    pub max_staleness: u64,
    /// FedBuff: `"sqrt"` (1/√(1+τ)), `"constant"` or `"poly:a"` ((1+τ)^−a).
    pub staleness_weight: String,
    /// FedBuff: server learning rate η.
    pub server_learning_rate: f64,
    /// FedBuff under secure aggregation: clients per SecAgg+ cohort.
    pub cohort_size: usize,
    /// FedBuff under secure aggregation: unmask a cohort once this many masked inputs are
    /// in (the rest are left out as dropouts); 0: wait for all or the deadline.
    pub cohort_target: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        let d = FedBuffConfig::default();
        Self {
            kind: "sync".into(),
            concurrency: d.concurrency,
            buffer_size: d.buffer_size,
            max_staleness: d.max_staleness,
            staleness_weight: "sqrt".into(),
            server_learning_rate: d.server_learning_rate,
            cohort_size: d.cohort_size,
            cohort_target: d.cohort_target,
        }
    }
}

impl EngineSettings {
    /// The engine these settings name.
    pub fn engine(&self) -> Result<EngineConfig, Error> {
        match self.kind.as_str() {
            "sync" => Ok(EngineConfig::Sync),
            "fedbuff" => Ok(EngineConfig::FedBuff(FedBuffConfig {
                concurrency: self.concurrency,
                buffer_size: self.buffer_size,
                max_staleness: self.max_staleness,
                staleness_weight: self.staleness_weight.parse()?,
                server_learning_rate: self.server_learning_rate,
                cohort_size: self.cohort_size,
                cohort_target: self.cohort_target,
            })),
            other => Err(Error::Config(format!(
                "engine.kind {other:?}: expected \"sync\" or \"fedbuff\""
            ))),
        }
    }
}

/// Default [`ServerConfig::max_model_bytes`]: 1 GiB.
pub const DEFAULT_MAX_MODEL_BYTES: u64 = 1 << 30;

/// The whole server configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// TLS material.
    pub tls: TlsConfig,
    /// Round settings.
    pub rounds: RoundsConfig,
    /// Strategy.
    pub strategy: StrategyConfig,
    /// Local training settings.
    pub train: TrainSettings,
    /// Where checkpoints go (and are resumed from).
    pub checkpoint_dir: PathBuf,
    /// Initial model (safetensors or a Flotilla checkpoint); else a client's.
    pub initial_model: Option<PathBuf>,
    /// Largest initial model accepted from a client (asked only when no initial model is
    /// configured), in bytes. Once the model is known, every payload must match its manifest
    /// exactly.
    pub max_model_bytes: u64,
    /// Bounds on what peers can make the server hold or wait for.
    pub limits: LimitsConfig,
    /// Secure aggregation; absent: off.
    pub secure_aggregation: Option<SecAggConfig>,
    /// Metrics, dashboard and health endpoint.
    pub operations: OperationsConfig,
    /// Differential privacy; absent: off.
    pub dp: Option<DpConfig>,
    /// How rounds are scheduled: `kind = "sync"` (the default) or `"fedbuff"`.
    pub engine: EngineSettings,
    /// Start anew even if the checkpoint directory holds checkpoints none of which verifies
    /// (they are renamed `*.unreadable`). Command line only (`--fresh`).
    #[serde(skip)]
    pub fresh: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            tls: TlsConfig::default(),
            rounds: RoundsConfig::default(),
            strategy: StrategyConfig::default(),
            train: TrainSettings::default(),
            checkpoint_dir: "checkpoints".into(),
            initial_model: None,
            max_model_bytes: DEFAULT_MAX_MODEL_BYTES,
            limits: LimitsConfig::default(),
            secure_aggregation: None,
            operations: OperationsConfig::default(),
            dp: None,
            engine: EngineSettings::default(),
            fresh: false,
        }
    }
}

impl ServerConfig {
    /// Reads a TOML file; unknown keys are errors (so that typos are caught).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// The round machine's configuration.
    pub fn coordinator(&self) -> Result<CoordinatorConfig, Error> {
        let secs = |s: f64, what: &str| {
            if s.is_finite() && s > 0.0 {
                Ok(Duration::from_secs_f64(s))
            } else {
                Err(Error::Config(format!(
                    "{what} must be a positive number of seconds"
                )))
            }
        };
        let idle = secs(self.rounds.idle_timeout_secs, "idle_timeout_secs")?;
        let heartbeat = secs(self.rounds.heartbeat_secs, "heartbeat_secs")?;
        if heartbeat < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "rounds.heartbeat_secs ({}) must be at least 0.1: clients send at most ten \
                 heartbeats a second",
                self.rounds.heartbeat_secs
            )));
        }
        if idle < 2 * heartbeat {
            return Err(Error::Config(format!(
                "rounds.idle_timeout_secs ({}) must be at least twice rounds.heartbeat_secs \
                 ({}): a client waiting for its next task sends nothing but heartbeats, so it \
                 would be dropped as idle (or after a single lost heartbeat)",
                self.rounds.idle_timeout_secs, self.rounds.heartbeat_secs
            )));
        }
        let c = CoordinatorConfig {
            num_rounds: self.rounds.num_rounds,
            min_available_clients: self.rounds.min_available_clients,
            min_train_results: self.rounds.min_train_results,
            round_timeout: secs(self.rounds.round_timeout_secs, "round_timeout_secs")?,
            init_timeout: secs(self.rounds.round_timeout_secs, "round_timeout_secs")?,
            heartbeat_interval: heartbeat,
            idle_timeout: Some(idle),
            evaluate_every: self.rounds.evaluate_every,
            seed: self.rounds.seed,
            secure_aggregation: self.secure_aggregation.clone(),
            dp: self.dp.clone(),
            history_window: self.rounds.history_window,
            max_missed_deadlines: self.rounds.max_missed_deadlines,
            straggler_backoff: secs(self.rounds.straggler_backoff_secs, "straggler_backoff_secs")?,
            over_selection: self.rounds.over_selection,
            max_examples: self.rounds.max_examples,
            model_quorum: self.rounds.model_quorum,
            engine: self.engine.engine()?,
        };
        c.validate()?;
        self.limits.validate()?;
        Ok(c)
    }

    /// The configured strategy (central DP noise from the system generator).
    pub fn strategy(&self) -> Result<Box<dyn Strategy>, Error> {
        self.strategy_with(&CryptoProvider::default_provider())
    }

    /// The configured strategy, its central DP noise from `provider` (simulations pass a
    /// seeded one to repeat runs).
    pub fn strategy_with(&self, provider: &CryptoProvider) -> Result<Box<dyn Strategy>, Error> {
        let s = &self.strategy;
        let sampling = |fraction: f64, min: usize, what: &str| {
            if (0.0..=1.0).contains(&fraction) {
                Ok(Sampling {
                    fraction,
                    min_clients: min,
                })
            } else {
                Err(Error::Config(format!("{what} must be between 0 and 1")))
            }
        };
        let base = FedAvg {
            train_sampling: sampling(s.fraction_train, s.min_train_clients, "fraction_train")?,
            evaluate_sampling: sampling(
                s.fraction_evaluate,
                s.min_evaluate_clients,
                "fraction_evaluate",
            )?,
            train_config: self.train.to_train_config()?,
        };
        let opt = |optimizer| {
            let mut o = FedOpt::new(base.clone(), optimizer);
            o.eta = s.eta.unwrap_or(o.eta);
            o.beta_1 = s.beta_1.unwrap_or(o.beta_1);
            o.beta_2 = s.beta_2.unwrap_or(o.beta_2);
            o.tau = s.tau.unwrap_or(o.tau);
            Box::new(o) as Box<dyn Strategy>
        };
        let strategy: Box<dyn Strategy> = match s.name.to_ascii_lowercase().as_str() {
            "fedavg" => Box::new(base),
            "fedavgm" => {
                let mut m = FedAvgM::new(base);
                m.server_learning_rate = s.server_learning_rate.unwrap_or(m.server_learning_rate);
                m.server_momentum = s.server_momentum.unwrap_or(m.server_momentum);
                Box::new(m)
            }
            "fedprox" => {
                let mu = s.proximal_mu.unwrap_or(if self.train.proximal_mu > 0.0 {
                    self.train.proximal_mu
                } else {
                    0.01
                });
                Box::new(FedProx::new(base, mu))
            }
            "fedadagrad" => opt(ServerOptimizer::Adagrad),
            "fedadam" => opt(ServerOptimizer::Adam),
            "fedyogi" => opt(ServerOptimizer::Yogi),
            "qfedavg" => {
                let mut q = QFedAvg::new(base);
                q.q = s.q.unwrap_or(q.q);
                q.learning_rate = s.qffl_learning_rate.unwrap_or(q.learning_rate);
                Box::new(q)
            }
            "fedmedian" => Box::new(FedMedian { base }),
            "fedtrimmedavg" => Box::new(FedTrimmedAvg {
                base,
                beta: s.trim_beta.unwrap_or(0.2),
            }),
            "krum" => Box::new(Krum {
                base,
                num_malicious: s.num_malicious,
                num_to_keep: Some(1),
            }),
            "multikrum" => Box::new(Krum {
                base,
                num_malicious: s.num_malicious,
                // Unset: Blanchard et al.'s m = n − f, resolved per round.
                num_to_keep: s.num_to_keep,
            }),
            "bulyan" => Box::new(Bulyan {
                base,
                num_malicious: s.num_malicious,
            }),
            other => {
                return Err(Error::Config(format!(
                    "unknown strategy {other:?} (available: fedavg, fedavgm, fedprox, fedadagrad, \
                     fedadam, fedyogi, qfedavg, fedmedian, fedtrimmedavg, krum, multikrum, bulyan)"
                )));
            }
        };
        match &self.dp {
            Some(dp) if dp.mode != DpMode::Client => Ok(Box::new(DpServer::new(
                strategy,
                dp,
                provider
                    .central_dp_noise()
                    .map_err(|e| Error::Config(format!("DP noise source: {e}")))?,
            )?)),
            _ => Ok(strategy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in the module docs is a valid file, and says what the defaults are.
    #[test]
    fn the_documented_example_is_the_defaults() {
        let src = include_str!("config.rs");
        let start = src.find("//! ```toml\n").unwrap() + "//! ```toml\n".len();
        let end = start + src[start..].find("//! ```\n").unwrap();
        let toml_text: String = src[start..end]
            .lines()
            .map(|l| {
                l.strip_prefix("//! ")
                    .or_else(|| l.strip_prefix("//!"))
                    .unwrap()
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c: ServerConfig = toml::from_str(&toml_text).unwrap();
        let mut want = ServerConfig::default();
        want.tls.crl = Some("pki/crl.pem".into());
        want.secure_aggregation = Some(SecAggConfig::default());
        assert_eq!(c, want);
    }

    #[test]
    fn every_section_may_name_only_what_differs() {
        // Each table of the configuration, given empty, is the default; [tls] with one field
        // keeps the others' defaults (it once failed with "missing field cert").
        let full = toml::to_string(&ServerConfig::default()).unwrap();
        let table: toml::Table = toml::from_str(&full).unwrap();
        let sections: Vec<&String> = table
            .iter()
            .filter(|(_, v)| v.is_table())
            .map(|(k, _)| k)
            .collect();
        assert!(sections.len() >= 5, "{sections:?}");
        for name in sections {
            let c: ServerConfig = toml::from_str(&format!("[{name}]\n"))
                .unwrap_or_else(|e| panic!("an empty [{name}] is refused: {e}"));
            assert_eq!(c, ServerConfig::default(), "[{name}]");
        }
        let c: ServerConfig = toml::from_str("[tls]\nca = \"other/ca.crt\"\n").unwrap();
        assert_eq!(c.tls.ca, PathBuf::from("other/ca.crt"));
        assert_eq!(c.tls.cert, TlsConfig::default().cert);
    }

    #[test]
    fn defaults_parse_and_typos_are_refused() {
        let c: ServerConfig = toml::from_str("").unwrap();
        assert_eq!(c, ServerConfig::default());
        c.coordinator().unwrap();
        c.strategy().unwrap();
        let c: ServerConfig =
            toml::from_str("[rounds]\nnum_rounds = 3\n[train]\nbatch_size = 0").unwrap();
        assert_eq!(c.rounds.num_rounds, 3);
        assert_eq!(
            c.train.to_train_config().unwrap().batch_size,
            BatchSize::Full
        );
        assert!(toml::from_str::<ServerConfig>("[rounds]\nnum_round = 3").is_err());
        let bad: ServerConfig = toml::from_str("[strategy]\nname = \"krumm\"").unwrap();
        assert!(bad.strategy().is_err());
        let bad: ServerConfig = toml::from_str("[rounds]\nround_timeout_secs = -1").unwrap();
        assert!(bad.coordinator().is_err());
        // Secure aggregation: the section turns it on, missing keys take their defaults.
        let c: ServerConfig = toml::from_str("[secure_aggregation]\nneighbours = 4").unwrap();
        let sa = c.coordinator().unwrap().secure_aggregation.unwrap();
        assert_eq!(sa.neighbours, 4);
        assert_eq!(sa.bits, SecAggConfig::default().bits);
        assert!(toml::from_str::<ServerConfig>("[secure_aggregation]\nk = 4").is_err());
        let bad: ServerConfig = toml::from_str("[secure_aggregation]\nbits = 40").unwrap();
        assert!(bad.coordinator().is_err());
    }

    /// A waiting client sends only heartbeats: an idle timeout shorter than two heartbeat
    /// intervals would drop healthy clients, so it is refused at start, naming both values.
    #[test]
    fn an_idle_timeout_shorter_than_two_heartbeats_is_refused() {
        let bad: ServerConfig =
            toml::from_str("[rounds]\nidle_timeout_secs = 15\nheartbeat_secs = 10").unwrap();
        let Err(Error::Config(why)) = bad.coordinator() else {
            panic!("accepted idle 15 s with heartbeats every 10 s");
        };
        assert!(why.contains("idle_timeout_secs (15)") && why.contains("heartbeat_secs (10)"));
        let ok: ServerConfig =
            toml::from_str("[rounds]\nidle_timeout_secs = 20\nheartbeat_secs = 10").unwrap();
        let c = ok.coordinator().unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(20)));
        let ok: ServerConfig =
            toml::from_str("[rounds]\nidle_timeout_secs = 1\nheartbeat_secs = 0.25").unwrap();
        assert_eq!(
            ok.coordinator().unwrap().heartbeat_interval,
            Duration::from_millis(250)
        );
        for h in ["0", "0.05", "-1"] {
            let bad: ServerConfig =
                toml::from_str(&format!("[rounds]\nheartbeat_secs = {h}")).unwrap();
            assert!(bad.coordinator().is_err(), "{h}");
        }
    }

    #[test]
    fn every_strategy_and_dp_mode_builds_and_secagg_refuses_individual_ones() {
        use flotilla_protocol::Coordinator;
        for name in [
            "fedavg",
            "fedavgm",
            "fedprox",
            "fedadagrad",
            "fedadam",
            "fedyogi",
            "qfedavg",
            "fedmedian",
            "fedtrimmedavg",
            "krum",
            "multikrum",
            "bulyan",
        ] {
            let c: ServerConfig =
                toml::from_str(&format!("[strategy]\nname = \"{name}\"\nnum_malicious = 1"))
                    .unwrap();
            let s = c.strategy().unwrap();
            assert_eq!(s.name(), name);
            // Under SecAgg only the strategies that work on the sum are accepted.
            let mut secure = c.clone();
            secure.secure_aggregation = Some(SecAggConfig::default());
            let built = Coordinator::new(secure.coordinator().unwrap(), s, None);
            let needs_all = [
                "qfedavg",
                "fedmedian",
                "fedtrimmedavg",
                "krum",
                "multikrum",
                "bulyan",
            ];
            assert_eq!(built.is_err(), needs_all.contains(&name), "{name}");
        }
        let c: ServerConfig = toml::from_str(
            "[strategy]\nname = \"fedadam\"\neta = 0.5\n[dp]\nmode = \"server-adaptive\"\nnoise_multiplier = 1.1",
        )
        .unwrap();
        assert_eq!(c.strategy().unwrap().name(), "dp-adaptive+fedadam");
        assert_eq!(c.coordinator().unwrap().dp.unwrap().clip_norm(), 0.1);
        let c: ServerConfig = toml::from_str("[dp]\nmode = \"client\"").unwrap();
        assert_eq!(c.strategy().unwrap().name(), "fedavg");
        assert!(toml::from_str::<ServerConfig>("[dp]\nmode = \"central\"").is_err());
        let bad: ServerConfig = toml::from_str("[dp]\ndelta = 2.0").unwrap();
        assert!(bad.coordinator().is_err());
    }
}
