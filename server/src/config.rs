//! The server's configuration: a TOML file, every field defaulted, overridable from the
//! command line.
//!
//! ```toml
//! listen = "0.0.0.0:4433"
//! checkpoint_dir = "checkpoints"
//! # initial_model = "model.safetensors"   # else the first client's initial parameters
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

use flotilla_protocol::coordinator::CoordinatorConfig;
use flotilla_protocol::messages::{BatchSize, Optimizer, TrainConfig};
use flotilla_protocol::secagg::SecAggConfig;
use flotilla_protocol::strategy::{FedAvg, Sampling, Strategy};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Where the server's TLS material is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Seconds without any message after which a client is dropped.
    pub idle_timeout_secs: f64,
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
        }
    }
}

/// The aggregation strategy and its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StrategyConfig {
    /// Strategy name (`fedavg`).
    pub name: String,
    /// Fraction of available clients sampled for training (C).
    pub fraction_train: f64,
    /// At least this many trainers per round.
    pub min_train_clients: usize,
    /// Fraction of available clients sampled for evaluation.
    pub fraction_evaluate: f64,
    /// At least this many evaluators per round.
    pub min_evaluate_clients: usize,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            name: "fedavg".into(),
            fraction_train: 1.0,
            min_train_clients: 2,
            fraction_evaluate: 1.0,
            min_evaluate_clients: 2,
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
        })
    }
}

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
    /// Largest model accepted, in bytes.
    pub max_model_bytes: u64,
    /// Secure aggregation; absent: off.
    pub secure_aggregation: Option<SecAggConfig>,
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
            max_model_bytes: flotilla_protocol::codec::DEFAULT_MAX_PAYLOAD_BYTES,
            secure_aggregation: None,
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
        let c = CoordinatorConfig {
            num_rounds: self.rounds.num_rounds,
            min_available_clients: self.rounds.min_available_clients,
            min_train_results: self.rounds.min_train_results,
            round_timeout: secs(self.rounds.round_timeout_secs, "round_timeout_secs")?,
            init_timeout: secs(self.rounds.round_timeout_secs, "round_timeout_secs")?,
            heartbeat_interval: Duration::from_secs(10),
            idle_timeout: Some(secs(self.rounds.idle_timeout_secs, "idle_timeout_secs")?),
            evaluate_every: self.rounds.evaluate_every,
            seed: self.rounds.seed,
            secure_aggregation: self.secure_aggregation.clone(),
        };
        c.validate()?;
        Ok(c)
    }

    /// The configured strategy.
    pub fn strategy(&self) -> Result<Box<dyn Strategy>, Error> {
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
        match s.name.to_ascii_lowercase().as_str() {
            "fedavg" => Ok(Box::new(FedAvg {
                train_sampling: sampling(s.fraction_train, s.min_train_clients, "fraction_train")?,
                evaluate_sampling: sampling(
                    s.fraction_evaluate,
                    s.min_evaluate_clients,
                    "fraction_evaluate",
                )?,
                train_config: self.train.to_train_config()?,
            })),
            other => Err(Error::Config(format!(
                "unknown strategy {other:?} (available: fedavg)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let bad: ServerConfig = toml::from_str("[strategy]\nname = \"krum\"").unwrap();
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
}
