//! The coordinator's configuration.

use std::time::Duration;

use crate::Error;
use crate::dp::DpConfig;
use crate::secagg::SecAggConfig;

/// Configuration of the round machine.
#[derive(Clone, Debug, PartialEq)]
pub struct CoordinatorConfig {
    /// Rounds to run.
    pub num_rounds: u64,
    /// Enrolled clients needed before a round starts.
    pub min_available_clients: usize,
    /// Results needed for a round to count; fewer aborts it.
    pub min_train_results: usize,
    /// How long clients have to train (and, separately, to evaluate).
    pub round_timeout: Duration,
    /// How long a client has to send its initial parameters.
    pub init_timeout: Duration,
    /// Heartbeat interval announced to clients.
    pub heartbeat_interval: Duration,
    /// A client not heard from for this long is dropped. `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Evaluate after every this many rounds (0 = never).
    pub evaluate_every: u64,
    /// Seed of the sampling RNG (mixed with the round number).
    pub seed: u64,
    /// Secure aggregation (SecAgg+); `None`: plain rounds, the server sees each update.
    pub secure_aggregation: Option<SecAggConfig>,
    /// Differential privacy: accounting, budget, and (client mode) the clients' clip and
    /// noise. The server-side modes also need the strategy wrapped in
    /// [`crate::dp::DpServer`].
    pub dp: Option<DpConfig>,
    /// Round records kept in memory and in snapshots (the newest ones): a checkpoint's size
    /// does not grow with the number of rounds. The driver logs every record as it ends.
    pub history_window: usize,
    /// A client that misses this many training deadlines in a row is excluded from sampling
    /// for [`CoordinatorConfig::straggler_backoff`] (0: never excluded). Excluded clients are
    /// still sampled when the others are too few for a round.
    pub max_missed_deadlines: u32,
    /// How long an excluded straggler sits out.
    pub straggler_backoff: Duration,
    /// Over-selection for plain rounds: this fraction more clients than the strategy asked
    /// for are sampled, and training closes as soon as the strategy's number of results is
    /// in (Bonawitz et al., "Towards Federated Learning at Scale", 2019). 0: off.
    pub over_selection: f64,
    /// Largest example count a client may report (it is the client's FedAvg weight): a
    /// result claiming more is a protocol violation.
    pub max_examples: u64,
    /// With no initial model configured, the model is taken from a client only once this
    /// many enrolled clients declare the same model (manifest digest): one misconfigured
    /// client cannot choose the federation's model. Capped at `min_available_clients` (a
    /// federation that starts with one client trusts that one).
    pub model_quorum: usize,
    /// How rounds are scheduled: synchronous rounds (the default) or buffered-asynchronous
    /// steps (FedBuff).
    pub engine: EngineConfig,
}

/// How the coordinator schedules work.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum EngineConfig {
    /// Synchronous rounds: sample, wait for every sampled client (or the deadline),
    /// aggregate. `num_rounds` counts rounds.
    #[default]
    Sync,
    /// Buffered asynchronous aggregation (FedBuff; Nguyen et al., AISTATS 2022): up to
    /// `concurrency` clients train at once, each on the model version it was sent; every
    /// `buffer_size` updates the server steps the model. `num_rounds` counts steps.
    FedBuff(FedBuffConfig),
}

/// FedBuff's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FedBuffConfig {
    /// Clients training at once.
    pub concurrency: usize,
    /// Updates per server step (K in the paper).
    pub buffer_size: usize,
    /// Updates more than this many versions behind the current model are refused.
    pub max_staleness: u64,
    /// How an update is down-weighted by its staleness τ.
    pub staleness_weight: StalenessWeight,
    /// Server learning rate η: each update moves the model by `η · s(τ) · Δ`, scaled by
    /// its share of the step's example weight.
    pub server_learning_rate: f64,
    /// Under secure aggregation: clients per cohort (one SecAgg+ instance; its sum enters
    /// the buffer as `count` updates with the cohort's staleness). The cohort's threshold
    /// is `[secure_aggregation]`'s, its minimum of inputs `min_train_results`, its deadline
    /// `round_timeout`.
    pub cohort_size: usize,
    /// Under secure aggregation: a cohort's masked inputs are unmasked as soon as this many
    /// are in; members still training are left out as dropouts (0: wait for every member or
    /// the deadline). At most `cohort_size`, at least `min_train_results`, and no more than
    /// the SecAgg+ graph tolerates (`cohort_size − cohort_target ≤ k − t`).
    pub cohort_target: usize,
}

impl Default for FedBuffConfig {
    fn default() -> Self {
        Self {
            concurrency: 10,
            buffer_size: 10,
            max_staleness: 10,
            staleness_weight: StalenessWeight::Sqrt,
            server_learning_rate: 1.0,
            cohort_size: 10,
            cohort_target: 0,
        }
    }
}

/// Most versions an update may be behind (bounds the models kept for in-flight tasks).
pub const MAX_STALENESS_LIMIT: u64 = 1_000;

/// Most clients training at once under FedBuff.
pub const MAX_CONCURRENCY: usize = 1_000_000;

/// The staleness weight s(τ) of an update τ versions behind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StalenessWeight {
    /// s(τ) = 1.
    Constant,
    /// s(τ) = 1/√(1+τ) (the paper's default).
    Sqrt,
    /// s(τ) = (1+τ)^−a, a ≥ 0.
    Poly(f64),
}

impl StalenessWeight {
    /// s(τ).
    pub fn weight(&self, staleness: u64) -> f64 {
        let t = 1.0 + staleness as f64;
        match self {
            Self::Constant => 1.0,
            Self::Sqrt => 1.0 / t.sqrt(),
            Self::Poly(a) => t.powf(-a),
        }
    }
}

impl std::str::FromStr for StalenessWeight {
    type Err = Error;

    /// `constant`, `sqrt` or `poly:a`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "constant" => Ok(Self::Constant),
            "sqrt" => Ok(Self::Sqrt),
            _ => match s.strip_prefix("poly:").map(str::parse::<f64>) {
                Some(Ok(a)) if a.is_finite() && (0.0..=16.0).contains(&a) => Ok(Self::Poly(a)),
                _ => Err(Error::Config(format!(
                    "staleness_weight {s:?}: expected \"constant\", \"sqrt\" or \"poly:a\" \
                     with 0 <= a <= 16"
                ))),
            },
        }
    }
}

impl FedBuffConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(Error::Config(format!(
                "engine.concurrency {} must be between 1 and {MAX_CONCURRENCY}",
                self.concurrency
            )));
        }
        if self.buffer_size == 0 {
            return Err(Error::Config(
                "engine.buffer_size must be at least 1".into(),
            ));
        }
        if self.max_staleness > MAX_STALENESS_LIMIT {
            return Err(Error::Config(format!(
                "engine.max_staleness {} is above {MAX_STALENESS_LIMIT}",
                self.max_staleness
            )));
        }
        if !(self.server_learning_rate.is_finite() && self.server_learning_rate > 0.0) {
            return Err(Error::Config(format!(
                "engine.server_learning_rate {} must be positive",
                self.server_learning_rate
            )));
        }
        if let StalenessWeight::Poly(a) = self.staleness_weight
            && !(a.is_finite() && (0.0..=16.0).contains(&a))
        {
            return Err(Error::Config(format!(
                "engine.staleness_weight poly:{a}: a must be between 0 and 16"
            )));
        }
        Ok(())
    }
}

/// Default [`CoordinatorConfig::max_examples`].
pub const DEFAULT_MAX_EXAMPLES: u64 = 100_000_000;

/// Default [`CoordinatorConfig::history_window`].
pub const DEFAULT_HISTORY_WINDOW: usize = 100;

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            num_rounds: 1,
            min_available_clients: 2,
            min_train_results: 2,
            round_timeout: Duration::from_secs(600),
            init_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(60)),
            evaluate_every: 1,
            seed: 0,
            secure_aggregation: None,
            dp: None,
            history_window: DEFAULT_HISTORY_WINDOW,
            max_missed_deadlines: 2,
            straggler_backoff: Duration::from_secs(600),
            over_selection: 0.0,
            max_examples: DEFAULT_MAX_EXAMPLES,
            model_quorum: 2,
            engine: EngineConfig::Sync,
        }
    }
}

impl CoordinatorConfig {
    /// Checks the configuration for contradictions.
    pub fn validate(&self) -> Result<(), Error> {
        if self.num_rounds == 0 {
            return Err(Error::Config("num_rounds must be at least 1".into()));
        }
        if self.min_train_results == 0 {
            return Err(Error::Config("min_train_results must be at least 1".into()));
        }
        if self.min_available_clients < self.min_train_results {
            return Err(Error::Config(format!(
                "min_available_clients ({}) is below min_train_results ({})",
                self.min_available_clients, self.min_train_results
            )));
        }
        if !(self.over_selection.is_finite() && (0.0..=10.0).contains(&self.over_selection)) {
            return Err(Error::Config(format!(
                "over_selection {} must be between 0 and 10",
                self.over_selection
            )));
        }
        if self.model_quorum == 0 {
            return Err(Error::Config("model_quorum must be at least 1".into()));
        }
        if self.history_window == 0 {
            return Err(Error::Config("history_window must be at least 1".into()));
        }
        if self.round_timeout.is_zero() {
            return Err(Error::Config("round_timeout must be positive".into()));
        }
        if let Some(sa) = &self.secure_aggregation {
            sa.validate()?;
            // Every secure round sums at least min_train_results weights in 32 bits.
            let least = (self.min_train_results as u64).saturating_mul(sa.max_weight);
            if least > u32::MAX as u64 {
                return Err(Error::Config(format!(
                    "secure_aggregation.max_weight {} × min_train_results {} overflows the \
                     32-bit sum: every secure round would abort; lower max_weight",
                    sa.max_weight, self.min_train_results
                )));
            }
        }
        if let Some(dp) = &self.dp {
            dp.validate()?;
        }
        if let EngineConfig::FedBuff(fb) = &self.engine {
            fb.validate()?;
            if let Some(sa) = &self.secure_aggregation {
                if fb.cohort_size < 2 || fb.cohort_size > fb.concurrency {
                    return Err(Error::Config(format!(
                        "engine.cohort_size {} must be between 2 and engine.concurrency ({})",
                        fb.cohort_size, fb.concurrency
                    )));
                }
                if self.min_train_results > fb.cohort_size {
                    return Err(Error::Config(format!(
                        "rounds.min_train_results {} (each cohort's minimum of inputs) is above \
                         engine.cohort_size {}",
                        self.min_train_results, fb.cohort_size
                    )));
                }
                if fb.cohort_target > 0 {
                    if fb.cohort_target < self.min_train_results
                        || fb.cohort_target > fb.cohort_size
                    {
                        return Err(Error::Config(format!(
                            "engine.cohort_target {} must be between rounds.min_train_results \
                             ({}) and engine.cohort_size ({})",
                            fb.cohort_target, self.min_train_results, fb.cohort_size
                        )));
                    }
                    // The members left out are dropouts: the graph must tolerate that many.
                    let probe: Vec<crate::ClientId> = (0..fb.cohort_size)
                        .map(|i| crate::ClientId::new(format!("c{i}")))
                        .collect();
                    let setup = sa.setup_for(probe, 0)?;
                    let tolerated = setup.neighbours.saturating_sub(setup.threshold) as usize;
                    if fb.cohort_size - fb.cohort_target > tolerated {
                        return Err(Error::Config(format!(
                            "engine.cohort_target {} leaves {} of a cohort of {} out, but its \
                             SecAgg+ graph (k = {}, t = {}) tolerates {} dropouts: raise \
                             cohort_target or lower secure_aggregation.threshold",
                            fb.cohort_target,
                            fb.cohort_size - fb.cohort_target,
                            fb.cohort_size,
                            setup.neighbours,
                            setup.threshold,
                            tolerated
                        )));
                    }
                }
                if (fb.cohort_size as u64).saturating_mul(sa.max_weight) > u32::MAX as u64 {
                    return Err(Error::Config(format!(
                        "secure_aggregation.max_weight {} × engine.cohort_size {} overflows the \
                         32-bit sum",
                        sa.max_weight, fb.cohort_size
                    )));
                }
            }
            if let Some(dp) = &self.dp
                && dp.mode == crate::dp::DpMode::Client
                && fb.staleness_weight != StalenessWeight::Constant
            {
                // Down-weighting a noised update scales its noise too: the sum would hold
                // less noise than the accountant assumes.
                return Err(Error::Config(
                    "client-side DP with the fedbuff engine needs staleness_weight = \
                     \"constant\" (a down-weighted update carries less noise than accounted)"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}
