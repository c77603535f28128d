//! The server side of a federation, as a sans-IO state machine.
//!
//! The [`Coordinator`] owns the round logic and nothing else: no sockets, no tasks, no clock.
//! A driver feeds it what happened (`handle_*`) with the current time, and asks it what to do
//! (`poll_*`): messages to send, the next time it wants a [`Coordinator::handle_timeout`] call,
//! and events (a client to drop, a round completed). quinn-proto's `Connection` is the model.
//!
//! A round goes `Waiting → [InitParams] → Train → [Evaluate] → Waiting | Finished`:
//!
//! * **Waiting**: until `min_available_clients` are enrolled.
//! * **InitParams**: if no initial model was configured, one enrolled client is asked for its
//!   initial parameters (the next is asked if it fails).
//! * **Train**: the strategy samples clients; each gets the global model and a deadline.
//!   Updates are checked (round, sender, manifest, finiteness, weight); a client that sends
//!   anything invalid is dropped and recorded as a failure. The phase ends when every sampled
//!   client answered or failed, or at the deadline (stragglers are cut and recorded). With
//!   fewer than `min_train_results` results the round is aborted with a reason; otherwise the
//!   strategy aggregates.
//! * **Evaluate** (every `evaluate_every` rounds): the new model is evaluated by the clients
//!   the strategy picks, with the same deadline rule.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::dp::{DpConfig, DpMode, PrivacyReport};
use crate::job::{Job, JobResult, Jobs, Output, Work};
use crate::registry::Registry;
use crate::secagg::{Handled, SecAggConfig, SecAggStats, ServerRound};
use crate::strategy::{
    ClientInfo, ClientUpdate, EvalSummary, Failure, FailureReason, Strategy, TrainResults,
    weighted_train_metrics,
};
use crate::timer::TimerQueue;
use crate::wire::config::ClientDp;
use crate::wire::messages::{
    AbortReason, ClientId, EvaluateIns, EvaluateRes, Message, Metrics, ModelSummary,
    PROTOCOL_VERSION, TrainIns, TrainRes, Welcome,
};
use crate::wire::params::Params;
use crate::{Error, InvalidMessage};
use flotilla_crypto::dp::RdpAccountant;

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
        Ok(())
    }
}

/// What happened in one round, as recorded in the history and checkpoints.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundRecord {
    /// Round number.
    pub round: u64,
    /// Clients sampled for training.
    pub selected: usize,
    /// Results aggregated.
    pub results: usize,
    /// Sampled clients that did not contribute.
    pub failures: Vec<Failure>,
    /// Example-weighted means of the clients' training metrics.
    pub train_metrics: Metrics,
    /// Federated evaluation of the new model, if one ran and produced results.
    pub evaluation: Option<EvalSummary>,
    /// Why the round was aborted, if it was (the model is then unchanged).
    pub aborted: Option<AbortReason>,
    /// Client-set sizes of a secure round.
    #[serde(default)]
    pub secagg: Option<SecAggStats>,
    /// Privacy spent so far, if differential privacy is on.
    #[serde(default)]
    pub privacy: Option<PrivacyReport>,
}

pub use crate::strategy::DropKind;

/// Why the coordinator dropped a client, with the error that caused it: match the variant
/// (and the [`Error`]'s), not the text.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum DropReason {
    /// A message that could not be decoded, or broke a bound.
    Malformed(Error),
    /// Nothing heard from it for this long (the idle timeout).
    Idle(Duration),
    /// Asked for the initial model, it did not send one in time.
    NoInitialParams,
    /// A well-formed message that breaks the protocol (wrong phase, wrong round, bad sizes,
    /// a failed secure-aggregation check...).
    ProtocolViolation(Error),
}

impl DropReason {
    /// The reason's kind, for counting.
    pub fn kind(&self) -> DropKind {
        match self {
            Self::Malformed(_) => DropKind::Malformed,
            Self::Idle(_) => DropKind::Idle,
            Self::NoInitialParams => DropKind::NoInitialParams,
            Self::ProtocolViolation(_) => DropKind::ProtocolViolation,
        }
    }

    /// The error behind the drop, if a message caused it.
    pub fn error(&self) -> Option<&Error> {
        match self {
            Self::Malformed(e) | Self::ProtocolViolation(e) => Some(e),
            Self::Idle(_) | Self::NoInitialParams => None,
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(e) => write!(f, "malformed message: {e}"),
            Self::Idle(after) => write!(f, "no message for {after:?}"),
            Self::NoInitialParams => f.write_str("did not send initial parameters in time"),
            Self::ProtocolViolation(e) => write!(f, "{e}"),
        }
    }
}

/// Something the driver should know or act on.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A client completed the hello and is enrolled.
    ClientEnrolled(ClientId),
    /// The coordinator dropped a client: the driver must close its connection (after sending
    /// what is queued for it).
    ClientDropped {
        /// Who.
        client: ClientId,
        /// Why ([`DropReason::kind`] for counting).
        reason: DropReason,
    },
    /// The coordinator received the initial model.
    ModelInitialized,
    /// There is no model yet and not enough enrolled clients agree on one to take it from
    /// them (emitted when this changes).
    WaitingForModel {
        /// Clients in the largest group declaring the same model.
        agreeing: usize,
        /// Clients that must agree ([`CoordinatorConfig::model_quorum`], capped).
        required: usize,
        /// Enrolled clients that declared no model.
        undeclared: usize,
    },
    /// A client was refused at enrollment or dropped because its model is not the
    /// federation's; it was told why ([`AbortReason::ModelMismatch`]).
    ClientRefused {
        /// The client.
        client: ClientId,
        /// Why, in words.
        reason: String,
    },
    /// A round began.
    RoundStarted {
        /// Round number.
        round: u64,
        /// Clients sampled.
        selected: usize,
    },
    /// A round ended with a new global model (or kept the old one, if the strategy chose to).
    /// The driver checkpoints here.
    RoundCompleted(RoundRecord),
    /// A round was aborted; the model is unchanged.
    RoundAborted(RoundRecord),
    /// The global model after `round`. The [`Coordinator`] does not emit this (its events
    /// are kept by harnesses, and models are large); a driver sends it to an in-process
    /// observer right after [`Event::RoundCompleted`], once the round is durable, so that
    /// the observer never has to read the model back from checkpoint files (which retention
    /// may already have deleted). `Params` share their memory: this is not a copy.
    GlobalModel {
        /// The round that produced it.
        round: u64,
        /// The model.
        params: Params,
    },
    /// A secure round moved to another stage (progress; also when masked inputs start to
    /// be collected).
    SecureStage {
        /// Round.
        round: u64,
        /// Stage entered.
        stage: crate::secagg::Stage,
    },
    /// The next round would exceed the privacy budget: the run stops here ([`Event::Finished`]
    /// follows).
    PrivacyBudgetReached {
        /// ε spent so far.
        spent: f64,
        /// ε after one more round.
        next: f64,
        /// The budget.
        budget: f64,
    },
    /// A message arrived too late for its round and was ignored.
    LateMessage {
        /// Sender.
        client: ClientId,
        /// Round it was for.
        round: u64,
    },
    /// No round can start yet: too few clients are enrolled, or too few of them can take
    /// part. Emitted when the situation changes (drivers repeat it in their logs); a round
    /// that cannot start is not counted, nothing is burnt.
    WaitingForClients {
        /// Clients enrolled.
        enrolled: usize,
        /// Of those, clients that may take part in the next round.
        eligible: usize,
        /// Clients a round needs (enrolled, then sampled).
        required: usize,
        /// Enrolled clients left out because they do not implement secure aggregation,
        /// which this federation requires.
        without_secure_aggregation: usize,
    },
    /// All rounds are done.
    Finished,
}

/// Where an outgoing message goes.
pub type Transmit = (ClientId, Message);

/// The coordinator's named timers (in [`TimerQueue`]); the idle queue is the registry's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// The client asked for the initial model must have sent it.
    InitParams,
    /// The round's training deadline.
    Train,
    /// The secure round's current stage deadline (mirrored from the SecAgg layer).
    SecAggStage,
    /// The evaluation deadline.
    Evaluate,
}

#[derive(Debug)]
struct TrainPhase {
    round: u64,
    selected: BTreeSet<ClientId>,
    pending: BTreeSet<ClientId>,
    results: Vec<ClientUpdate>,
    failures: Vec<Failure>,
    secagg: Option<Box<ServerRound>>,
    /// Results that close the phase early (the strategy's count; over-selected clients
    /// beyond it are not waited for).
    target: usize,
}

#[derive(Debug)]
struct EvalPhase {
    record: RoundRecord,
    pending: BTreeSet<ClientId>,
    results: Vec<(ClientId, EvaluateRes)>,
    failures: Vec<Failure>,
}

#[derive(Debug)]
enum Phase {
    Waiting,
    InitParams {
        asked: ClientId,
        tried: BTreeSet<ClientId>,
    },
    Train(TrainPhase),
    Evaluate(EvalPhase),
    Finished,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Waiting => "Waiting",
            Phase::InitParams { .. } => "InitParams",
            Phase::Train(_) => "Train",
            Phase::Evaluate(_) => "Evaluate",
            Phase::Finished => "Finished",
        }
    }
}

/// A snapshot from which a coordinator can resume (the checkpoint's content).
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Last completed (or aborted) round.
    pub round: u64,
    /// Global model after that round.
    pub global: Params,
    /// What happened in the last rounds (at most [`CoordinatorConfig::history_window`]).
    pub history: Vec<RoundRecord>,
    /// The strategy's own state.
    pub strategy_state: Vec<u8>,
    /// The privacy accountant's state (RDP per order, steps), if differential privacy is on.
    pub accountant: Option<(Vec<f64>, u64)>,
}

/// The server's round state machine. See the module docs.
pub struct Coordinator {
    config: CoordinatorConfig,
    strategy: Box<dyn Strategy>,
    registry: Registry,
    global: Option<Params>,
    /// Last round started (0 before the first).
    round: u64,
    phase: Phase,
    /// The phase's deadlines (cleared whenever the phase changes).
    timers: TimerQueue<Timer>,
    history: Vec<RoundRecord>,
    /// State as of the end of the last finished round (what a checkpoint holds).
    last_snapshot: Option<Snapshot>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Heavy work for the driver.
    jobs: Jobs,
    /// The unmasked quantized sum of the last secure round (for audits and tests).
    last_unmasked: Option<Vec<u32>>,
    /// Privacy spent (if DP is on).
    accountant: Option<RdpAccountant>,
    /// The round whose end the driver has not yet made durable: no round starts until
    /// [`Coordinator::handle_persisted`].
    unpersisted: Option<u64>,
    /// The last [`Event::WaitingForClients`] emitted (to emit it only on change).
    waiting: Option<Event>,
    /// The open round's privacy report, put in its record when it ends.
    round_privacy: Option<PrivacyReport>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("strategy", &self.strategy.name())
            .field("round", &self.round)
            .field("phase", &self.phase.name())
            .field("clients", &self.registry.len())
            .finish()
    }
}

impl Coordinator {
    /// A coordinator. With `initial` `None`, the first enrolled client is asked for its
    /// initial parameters.
    pub fn new(
        config: CoordinatorConfig,
        strategy: Box<dyn Strategy>,
        initial: Option<Params>,
    ) -> Result<Self, Error> {
        config.validate()?;
        if config.secure_aggregation.is_some() && strategy.needs_individual_updates() {
            return Err(Error::Config(format!(
                "strategy {} needs each client's update, which secure aggregation hides; \
                 turn secure aggregation off or choose a strategy that works on the sum",
                strategy.name()
            )));
        }
        if let Some(p) = &initial {
            p.check_finite()?;
        }
        let accountant = config.dp.as_ref().map(|_| RdpAccountant::new());
        Ok(Self {
            config,
            strategy,
            registry: Registry::default(),
            timers: TimerQueue::default(),
            global: initial,
            round: 0,
            phase: Phase::Waiting,
            history: Vec::new(),
            last_snapshot: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            jobs: Jobs::default(),
            last_unmasked: None,
            accountant,
            round_privacy: None,
            unpersisted: None,
            waiting: None,
        })
    }

    /// A coordinator resuming after the round recorded in `snapshot`.
    pub fn resume(
        config: CoordinatorConfig,
        mut strategy: Box<dyn Strategy>,
        snapshot: Snapshot,
    ) -> Result<Self, Error> {
        strategy.restore_state(&snapshot.strategy_state)?;
        let mut c = Self::new(config, strategy, Some(snapshot.global.clone()))?;
        c.round = snapshot.round;
        c.history = snapshot.history.clone();
        let window = c.config.history_window;
        if c.history.len() > window {
            c.history.drain(..c.history.len() - window);
        }
        // The privacy spent before the restart: the accountant's saved state, or (snapshots
        // without it) rebuilt from the rounds' records.
        if c.accountant.is_some() {
            c.accountant = Some(match &snapshot.accountant {
                Some((rdp, steps)) => RdpAccountant::restore(rdp.clone(), *steps)?,
                None => {
                    let mut acc = RdpAccountant::new();
                    for p in c.history.iter().filter_map(|r| r.privacy.as_ref()) {
                        acc.compose(p.sampling_rate, p.noise_multiplier, 1);
                    }
                    acc
                }
            });
        }
        c.last_snapshot = Some(snapshot);
        if c.round >= c.config.num_rounds {
            c.phase = Phase::Finished;
            c.events.push_back(Event::Finished);
        }
        Ok(c)
    }

    /// The state as of the end of the last finished round: what a checkpoint must hold. It
    /// is captured when the round ends, so it stays right even though the next round has
    /// already started by the time the driver sees [`Event::RoundCompleted`].
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.last_snapshot.clone()
    }

    /// The unmasked sum of the encoded inputs of the last secure round that completed: one
    /// `u32` per parameter, then the total weight. What the server learned, and nothing else.
    pub fn last_unmasked_sum(&self) -> Option<&[u32]> {
        self.last_unmasked.as_deref()
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The current global model.
    pub fn global(&self) -> Option<&Params> {
        self.global.as_ref()
    }

    /// Last round started.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// What happened so far.
    pub fn history(&self) -> &[RoundRecord] {
        &self.history
    }

    /// Name of the current phase.
    pub fn phase_name(&self) -> &'static str {
        self.phase.name()
    }

    /// True once all rounds are done.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// Enrolled clients.
    pub fn clients(&self) -> impl Iterator<Item = &ClientId> {
        self.registry.ids()
    }

    /// Next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Next piece of heavy work (see [`crate::job`]): run it off the event loop and hand its
    /// result to [`Coordinator::handle_job_result`]. Until then the round it belongs to waits
    /// (its deadlines are suspended); everything else (other messages, timers, new clients)
    /// goes on.
    #[must_use = "a job must be run and its result handed back, or its round never ends"]
    pub fn poll_job(&mut self) -> Option<Job> {
        self.jobs.pop()
    }

    /// The result of a job from [`Coordinator::poll_job`]. A result for a round that ended
    /// meanwhile (or one this machine did not ask for) is ignored.
    pub fn handle_job_result(&mut self, now: Instant, result: JobResult) {
        let Some((round, output)) = self.jobs.accept(result) else {
            return;
        };
        match output {
            Output::Unmask(sum) => {
                if let Phase::Train(t) = &mut self.phase
                    && t.round == round
                    && let Some(sa) = &mut t.secagg
                {
                    sa.handle_unmask_result(sum);
                    self.pump_secagg(now);
                }
            }
            // Not a coordinator's job (its id could not have matched).
            Output::Mask(_) => {}
        }
    }

    /// When the coordinator next needs [`Coordinator::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        let idle = self
            .config
            .idle_timeout
            .and_then(|d| self.registry.next_idle_deadline(d));
        match (self.timers.next(), idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The round that ended last (the one in the last [`Event::RoundCompleted`] or
    /// [`Event::RoundAborted`]) is durable: its [`Coordinator::snapshot`] is on disk (or the
    /// driver does not persist). Until this call no new round starts, so that round `k + 1`
    /// is never announced before round `k` is on disk (raft's `Ready` rule): a crash in
    /// between resumes after round `k`, and no client ever trained on a round that is lost.
    pub fn handle_persisted(&mut self, now: Instant) {
        if self.unpersisted.take().is_some() {
            self.maybe_start(now);
        }
    }

    /// The round waiting for [`Coordinator::handle_persisted`], if any.
    pub fn awaiting_persistence(&self) -> Option<u64> {
        self.unpersisted
    }

    /// The driver's transport lost the connection to `client`.
    pub fn handle_disconnect(&mut self, now: Instant, client: &ClientId) {
        if self.remove_client(now, client) {
            self.fail(now, client, FailureReason::Disconnected);
        }
    }

    /// `client` was heard from at `at` without a complete message (bytes of a long upload
    /// arriving, a transport keep-alive): it counts as alive. Drivers report this before
    /// [`Coordinator::handle_timeout`], so that neither a slow upload nor the server's own
    /// pauses (a long aggregation while messages queued up) count against a client.
    pub fn handle_activity(&mut self, at: Instant, client: &ClientId) {
        self.registry.heard_from(at, client, true);
    }

    /// A message from `client` could not be decoded: the client is dropped.
    pub fn handle_malformed(&mut self, now: Instant, client: &ClientId, error: &Error) {
        self.drop_client(now, client, DropReason::Malformed(error.clone()));
    }

    /// The driver is serving: the machine says what it waits for
    /// ([`Event::WaitingForClients`], "have 0 of N" before anyone connected), or finishes at
    /// once if a resumed run has no round left.
    pub fn handle_start(&mut self, now: Instant) {
        self.maybe_start(now);
    }

    /// The timer returned by [`Coordinator::poll_timeout`] fired (or any time; early calls
    /// are harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(idle) = self.config.idle_timeout {
            for id in self.registry.idle(now, idle) {
                self.drop_client(now, &id, DropReason::Idle(idle));
            }
        }
        for timer in self.timers.expire(now) {
            self.on_timer(now, timer);
        }
    }

    /// A named timer fired. Timers are cleared whenever the phase changes, so each belongs
    /// to the current phase; the match still checks, and ignores what does not fit.
    fn on_timer(&mut self, now: Instant, timer: Timer) {
        match (timer, &mut self.phase) {
            (Timer::InitParams, Phase::InitParams { asked, .. }) => {
                let asked = asked.clone();
                self.drop_client(now, &asked, DropReason::NoInitialParams);
            }
            // A secure round's deadlines are its stages' (the round deadline caps them).
            (Timer::Train | Timer::SecAggStage, Phase::Train(t)) if t.secagg.is_some() => {
                if let Some(sa) = &mut t.secagg {
                    sa.handle_timeout(now);
                }
                self.pump_secagg(now);
            }
            (Timer::Train, Phase::Train(t)) => {
                let missed: Vec<ClientId> = std::mem::take(&mut t.pending).into_iter().collect();
                for id in &missed {
                    t.failures.push(Failure {
                        client: id.clone(),
                        reason: FailureReason::Timeout,
                    });
                }
                self.note_missed_deadlines(now, &missed);
                self.close_train(now);
            }
            (Timer::Evaluate, Phase::Evaluate(e)) => {
                for id in std::mem::take(&mut e.pending) {
                    e.failures.push(Failure {
                        client: id,
                        reason: FailureReason::Timeout,
                    });
                }
                self.close_eval(now);
            }
            _ => {}
        }
    }

    /// A message from `from` (whose identity the transport established). An `Err` means the
    /// client broke the protocol: it has been dropped (an [`Event::ClientDropped`] is queued)
    /// and the error says why.
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: &ClientId,
        msg: Message,
    ) -> Result<(), Error> {
        self.registry.heard_from(now, from, false);
        match self.process(now, from, msg) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.drop_client(now, from, DropReason::ProtocolViolation(e.clone()));
                Err(e)
            }
        }
    }

    fn process(&mut self, now: Instant, from: &ClientId, msg: Message) -> Result<(), Error> {
        let enrolled = self.registry.contains(from);
        match msg {
            Message::Hello(h) => {
                if h.protocol_version != PROTOCOL_VERSION {
                    return Err(Error::ProtocolVersion {
                        got: h.protocol_version,
                        supported: PROTOCOL_VERSION,
                    });
                }
                if enrolled {
                    // A second hello on a live session is a duplicate and changes nothing. (A
                    // reconnect comes on a new connection: the driver reports the old one
                    // closed with `handle_disconnect` first, so the client is not enrolled.)
                    return Ok(());
                }
                if let Some(reason) = self.model_mismatch(h.capabilities.model.as_ref()) {
                    self.refuse(from, reason);
                    return Ok(());
                }
                self.registry.enroll(now, from.clone(), h.capabilities);
                self.transmits.push_back((
                    from.clone(),
                    Message::Welcome(Welcome {
                        client_id: from.clone(),
                        // Without an idle timeout nothing reads heartbeats: ask for none.
                        heartbeat_ms: match self.config.idle_timeout {
                            Some(_) => self.config.heartbeat_interval.as_millis() as u64,
                            None => 0,
                        },
                    }),
                ));
                self.events.push_back(Event::ClientEnrolled(from.clone()));
                if self.is_finished() {
                    self.transmits.push_back((
                        from.clone(),
                        Message::Abort {
                            round: None,
                            reason: AbortReason::Finished,
                        },
                    ));
                }
                self.maybe_start(now);
                Ok(())
            }
            _ if !enrolled => Err(Error::UnexpectedMessage {
                kind: msg.kind(),
                from: Some(from.clone()),
                state: "not enrolled (no hello yet)",
            }),
            Message::Heartbeat { .. } => Ok(()),
            Message::InitialParams(p) => self.on_initial_params(now, from, p),
            Message::TrainResult(r) => self.on_train_result(now, from, r),
            Message::EvaluateResult(r) => self.on_evaluate_result(now, from, r),
            m @ (Message::AdvertiseKeys(_)
            | Message::ShareKeys { .. }
            | Message::MaskedInput(_)
            | Message::SurvivorsSigned { .. }
            | Message::UnmaskShares { .. }) => self.on_secagg(now, from, m),
            Message::Abort { round, reason } => {
                // The client gives up on a round (or the session): a failure, not a violation.
                if round.is_none() {
                    self.remove_client(now, from);
                }
                self.fail(now, from, FailureReason::Aborted(reason.clone()));
                Ok(())
            }
            other => Err(Error::UnexpectedMessage {
                kind: other.kind(),
                from: Some(from.clone()),
                state: "server never receives this kind",
            }),
        }
    }

    fn on_initial_params(&mut self, now: Instant, from: &ClientId, p: Params) -> Result<(), Error> {
        match &self.phase {
            Phase::InitParams { asked, .. } if asked == from => {
                p.check_finite()?;
                let got = ModelSummary::of(p.manifest());
                let declared = self.registry.capabilities(from).and_then(|c| c.model);
                if declared.is_some_and(|d| d.digest != got.digest) {
                    return Err(Error::InvalidMessage(InvalidMessage::UndeclaredModel(
                        got.to_string(),
                    )));
                }
                self.global = Some(p);
                self.enter(Phase::Waiting);
                self.events.push_back(Event::ModelInitialized);
                // Clients that declared another model are not part of this federation.
                let others: Vec<(ClientId, AbortReason)> = self
                    .registry
                    .iter()
                    .filter_map(|(id, c)| {
                        self.model_mismatch(c.model.as_ref())
                            .map(|r| (id.clone(), r))
                    })
                    .collect();
                for (id, reason) in others {
                    self.remove_client(now, &id);
                    self.refuse(&id, reason);
                }
                self.maybe_start(now);
                Ok(())
            }
            _ => Err(Error::UnexpectedMessage {
                kind: "InitialParams",
                from: Some(from.clone()),
                state: self.phase.name(),
            }),
        }
    }

    fn on_train_result(&mut self, now: Instant, from: &ClientId, r: TrainRes) -> Result<(), Error> {
        let (current, global) = match (&mut self.phase, &self.global) {
            (Phase::Train(t), Some(g)) => (t, g),
            _ => return self.late_or_invalid(from, r.round, "TrainResult"),
        };
        if r.round != current.round {
            return self.late_or_invalid(from, r.round, "TrainResult");
        }
        if current.secagg.is_some() {
            return Err(Error::InvalidMessage(InvalidMessage::WrongMode(
                "a plain training result in a secure-aggregation round".into(),
            )));
        }
        if !current.selected.contains(from) {
            return Err(Error::InvalidMessage(InvalidMessage::NotSampled {
                round: r.round,
            }));
        }
        if !current.pending.contains(from) {
            // A duplicate (or a result after the client already failed): ignore it.
            self.events.push_back(Event::LateMessage {
                client: from.clone(),
                round: r.round,
            });
            return Ok(());
        }
        if r.num_examples == 0 {
            return Err(Error::InvalidMessage(InvalidMessage::ZeroExamples));
        }
        if r.num_examples > self.config.max_examples {
            return Err(Error::LimitExceeded {
                what: "example count",
                len: r.num_examples,
                max: self.config.max_examples,
            });
        }
        r.params.check_same_manifest(global.manifest())?;
        r.params.check_finite()?;
        current.pending.remove(from);
        current.results.push(ClientUpdate {
            client: from.clone(),
            num_examples: r.num_examples,
            metrics: r.metrics,
            params: r.params,
        });
        let done = current.pending.is_empty() || current.results.len() >= current.target;
        self.registry.met_deadline(from);
        if done {
            self.close_train(now);
        }
        Ok(())
    }

    fn on_evaluate_result(
        &mut self,
        now: Instant,
        from: &ClientId,
        r: EvaluateRes,
    ) -> Result<(), Error> {
        let Phase::Evaluate(e) = &mut self.phase else {
            return self.late_or_invalid(from, r.round, "EvaluateResult");
        };
        if r.round != e.record.round {
            return self.late_or_invalid(from, r.round, "EvaluateResult");
        }
        if !e.pending.remove(from) {
            self.events.push_back(Event::LateMessage {
                client: from.clone(),
                round: r.round,
            });
            return Ok(());
        }
        if !r.loss.is_finite() || r.metrics.values().any(|v| !v.is_finite()) {
            return Err(Error::InvalidMessage(InvalidMessage::NonFinite(
                "evaluation result".into(),
            )));
        }
        if r.num_examples > self.config.max_examples {
            return Err(Error::LimitExceeded {
                what: "example count",
                len: r.num_examples,
                max: self.config.max_examples,
            });
        }
        e.results.push((from.clone(), r));
        if e.pending.is_empty() {
            self.close_eval(now);
        }
        Ok(())
    }

    /// A result for a round that is not the open one: ignored if it is for a past round
    /// (late), a violation if it claims a future one.
    fn late_or_invalid(
        &mut self,
        from: &ClientId,
        round: u64,
        kind: &'static str,
    ) -> Result<(), Error> {
        if round <= self.round {
            self.events.push_back(Event::LateMessage {
                client: from.clone(),
                round,
            });
            Ok(())
        } else {
            Err(Error::InvalidMessage(InvalidMessage::FutureRound {
                kind,
                round,
                current: self.round,
            }))
        }
    }

    /// Removes a client, tells it why, and records the failure.
    fn drop_client(&mut self, now: Instant, client: &ClientId, reason: DropReason) {
        let text = reason.to_string();
        self.transmits.push_back((
            client.clone(),
            Message::Abort {
                round: None,
                reason: AbortReason::ProtocolViolation(text.clone()),
            },
        ));
        self.remove_client(now, client);
        let kind = reason.kind();
        self.events.push_back(Event::ClientDropped {
            client: client.clone(),
            reason,
        });
        self.fail(now, client, FailureReason::Dropped { kind, detail: text });
    }

    /// Records that `client` will not contribute to the current phase, and moves the phase on
    /// if that settles it.
    fn fail(&mut self, now: Instant, client: &ClientId, reason: FailureReason) {
        // Reasons end up in round records and checkpoints: keep them short.
        let reason = match reason {
            FailureReason::Dropped { kind, detail } => FailureReason::Dropped {
                kind,
                detail: crate::wire::bounds::truncate(
                    &detail,
                    crate::wire::bounds::DEFAULT_MAX_TEXT_BYTES as usize,
                ),
            },
            FailureReason::Aborted(why) => FailureReason::Aborted(
                why.truncated(crate::wire::bounds::DEFAULT_MAX_TEXT_BYTES as usize),
            ),
            other => other,
        };
        match &mut self.phase {
            Phase::InitParams { asked, tried, .. } if asked == client => {
                tried.insert(client.clone());
                let tried = std::mem::take(tried);
                self.enter(Phase::Waiting);
                self.ask_for_params(now, tried);
            }
            Phase::Train(t) if t.secagg.is_some() => {
                if let Some(sa) = &mut t.secagg {
                    sa.handle_failure(now, client, reason);
                }
                self.pump_secagg(now);
            }
            Phase::Train(t) => {
                if t.pending.remove(client) {
                    t.failures.push(Failure {
                        client: client.clone(),
                        reason,
                    });
                    let possible = t.results.len() + t.pending.len();
                    if t.pending.is_empty() || possible < self.config.min_train_results {
                        self.close_train(now);
                    }
                }
            }
            Phase::Evaluate(e) => {
                if e.pending.remove(client) {
                    e.failures.push(Failure {
                        client: client.clone(),
                        reason,
                    });
                    if e.pending.is_empty() {
                        self.close_eval(now);
                    }
                }
            }
            _ => {}
        }
    }

    /// Clients that may be sampled now: all but excluded stragglers, unless leaving those
    /// out would leave fewer than `min_train_results`.
    fn eligible_infos(&self, now: Instant, secure_only: bool) -> Vec<ClientInfo> {
        self.registry
            .eligible(now, secure_only, self.config.min_train_results)
    }

    /// Whether `id` is excluded from sampling now.
    pub fn is_excluded(&self, now: Instant, id: &ClientId) -> bool {
        self.registry.is_excluded(now, id)
    }

    /// Unenrolls a client, remembering its straggler record. True if it was enrolled.
    fn remove_client(&mut self, now: Instant, id: &ClientId) -> bool {
        self.registry.remove(now, id)
    }

    /// Records missed training deadlines; excludes repeat offenders.
    fn note_missed_deadlines(&mut self, now: Instant, ids: &[ClientId]) {
        self.registry.missed_deadlines(
            now,
            ids,
            self.config.max_missed_deadlines,
            self.config.straggler_backoff,
        );
    }

    fn rng_for(&self, round: u64, stream: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(round.wrapping_mul(4).wrapping_add(stream));
        rng
    }

    /// Why a client declaring `declared` cannot join, if the federation's model is known and
    /// differs. A client that declares nothing is admitted; its payloads are still checked
    /// against the model's manifest.
    fn model_mismatch(&self, declared: Option<&ModelSummary>) -> Option<AbortReason> {
        let got = declared?;
        let expected = ModelSummary::of(self.global.as_ref()?.manifest());
        (expected.digest != got.digest).then_some(AbortReason::ModelMismatch {
            expected,
            got: *got,
        })
    }

    /// Tells `client` it is refused and why (it is not, or no longer, enrolled).
    fn refuse(&mut self, client: &ClientId, reason: AbortReason) {
        self.events.push_back(Event::ClientRefused {
            client: client.clone(),
            reason: reason.to_string(),
        });
        self.transmits.push_back((
            client.clone(),
            Message::Abort {
                round: None,
                reason,
            },
        ));
    }

    /// The quorum a client-provided initial model needs.
    fn model_quorum(&self) -> usize {
        self.config
            .model_quorum
            .min(self.config.min_available_clients)
            .max(1)
    }

    /// The client to ask for the initial model: one (not yet tried) of the largest group of
    /// clients declaring the same model, if that group reaches the quorum. Otherwise `Err`
    /// with the size of the largest group.
    fn model_source(&self, tried: &BTreeSet<ClientId>) -> Result<ClientId, usize> {
        let quorum = self.model_quorum();
        // Counted per hello while the run waits for a model: from the registry's tallies, so
        // that the walk over every client below happens only once a quorum exists.
        let counts = self.registry.declared_models();
        let largest = counts.values().copied().max().unwrap_or(0);
        if largest < quorum {
            return Err(largest);
        }
        let mut groups: BTreeMap<[u8; 32], Vec<&ClientId>> = BTreeMap::new();
        for (id, c) in self.registry.iter() {
            if let Some(m) = &c.model
                && counts.get(&m.digest).is_some_and(|&n| n >= quorum)
            {
                groups.entry(m.digest).or_default().push(id);
            }
        }
        let mut agreed: Vec<&Vec<&ClientId>> =
            groups.values().filter(|g| g.len() >= quorum).collect();
        // Largest group first; ties go to the group whose first id sorts first (groups are
        // keyed by digest, so this is deterministic).
        agreed.sort_by_key(|g| std::cmp::Reverse(g.len()));
        agreed
            .iter()
            .find_map(|g| {
                g.iter()
                    .find(|id| !tried.contains(**id))
                    .map(|id| (*id).clone())
            })
            .ok_or(largest)
    }

    fn ask_for_params(&mut self, now: Instant, tried: BTreeSet<ClientId>) {
        let next = match self.model_source(&tried) {
            Ok(id) => Some(id),
            Err(agreeing) => {
                let undeclared = self.registry.undeclared_models();
                let ev = Event::WaitingForModel {
                    agreeing,
                    required: self.model_quorum(),
                    undeclared,
                };
                if self.waiting.as_ref() != Some(&ev) {
                    self.waiting = Some(ev.clone());
                    self.events.push_back(ev);
                }
                None
            }
        };
        if let Some(id) = next {
            self.transmits.push_back((id.clone(), Message::GetParams));
            self.enter(Phase::InitParams { asked: id, tried });
            self.timers
                .set(Timer::InitParams, now + self.config.init_timeout);
        }
    }

    /// Starts the next round if the machine is idle and enough clients are enrolled.
    fn maybe_start(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Waiting) || self.unpersisted.is_some() {
            return;
        }
        if self.round >= self.config.num_rounds {
            self.finish();
            return;
        }
        // Only clients that implement the protocol can take part in a secure round.
        let secure = self.config.secure_aggregation.is_some();
        if self.registry.len() < self.config.min_available_clients {
            let eligible = self
                .registry
                .eligible_count(now, secure, self.config.min_train_results);
            self.wait_for_clients(eligible, self.config.min_available_clients);
            return;
        }
        let Some(global) = self.global.clone() else {
            self.ask_for_params(now, BTreeSet::new());
            return;
        };
        let round = self.round + 1;
        let infos = self.eligible_infos(now, secure);
        let mut rng = self.rng_for(round, 0);
        let plan = self.strategy.configure_train(round, &infos, &mut rng);
        let mut selected = BTreeSet::new();
        let mut configs = Vec::new();
        for (id, config) in plan {
            if !self.registry.contains(&id) || !selected.insert(id.clone()) {
                continue; // the strategy named an unknown client or named one twice
            }
            configs.push((id, config));
        }
        if selected.len() < self.config.min_train_results {
            // A round that cannot reach its minimum is not started (nor counted): wait for
            // more clients that can take part.
            self.wait_for_clients(infos.len(), self.config.min_train_results);
            return;
        }
        self.waiting = None;
        self.round = round;
        let target = configs.len();
        if self.config.secure_aggregation.is_none()
            && self.config.over_selection > 0.0
            && let Some((_, template)) = configs.first().cloned()
        {
            let extra = (target as f64 * self.config.over_selection).ceil() as usize;
            let mut rest: Vec<&ClientInfo> =
                infos.iter().filter(|i| !selected.contains(&i.id)).collect();
            rand::seq::SliceRandom::shuffle(rest.as_mut_slice(), &mut rng);
            for info in rest.into_iter().take(extra) {
                selected.insert(info.id.clone());
                configs.push((info.id.clone(), template.clone()));
            }
        }
        if let (Some(dp), Some(acc)) = (&self.config.dp, &mut self.accountant) {
            // Each round is one step of the sampled Gaussian mechanism at rate q.
            let q = selected.len() as f64 / infos.len().max(1) as f64;
            let sigma = dp.noise_multiplier;
            if let Some(budget) = dp.privacy_budget {
                let next = acc.epsilon_after(q, sigma, dp.delta);
                if next > budget {
                    self.round -= 1;
                    self.events.push_back(Event::PrivacyBudgetReached {
                        spent: acc.epsilon(dp.delta),
                        next,
                        budget,
                    });
                    self.finish();
                    return;
                }
            }
            acc.compose(q, sigma, 1);
            self.round_privacy = Some(PrivacyReport {
                sampling_rate: q,
                noise_multiplier: sigma,
                epsilon: acc.epsilon(dp.delta),
                delta: dp.delta,
            });
            if dp.mode == DpMode::Client {
                let client_dp = ClientDp {
                    clip: dp.clip_norm(),
                    noise_std: sigma * dp.clip_norm() / (selected.len().max(1) as f64).sqrt(),
                };
                for (_, c) in configs.iter_mut() {
                    c.dp = Some(client_dp);
                }
            }
        }
        let deadline = now + self.config.round_timeout;
        let mut secagg = None;
        if let Some(sa) = &self.config.secure_aggregation {
            let graph_seed = rand::RngCore::next_u64(&mut self.rng_for(round, 2));
            match sa.setup_for(selected.iter().cloned().collect(), graph_seed) {
                Ok(setup) => {
                    secagg = Some(Box::new(ServerRound::new(
                        round,
                        setup,
                        now,
                        Duration::from_millis(sa.phase_timeout_ms),
                        deadline,
                        global.len(),
                        self.config.min_train_results,
                    )))
                }
                Err(e) => {
                    self.events.push_back(Event::RoundStarted {
                        round,
                        selected: selected.len(),
                    });
                    let record = RoundRecord {
                        round,
                        selected: selected.len(),
                        results: 0,
                        failures: Vec::new(),
                        train_metrics: Metrics::new(),
                        evaluation: None,
                        aborted: Some(AbortReason::SecureAggregation(e.to_string())),
                        secagg: None,
                        privacy: None,
                    };
                    self.end_round(now, record);
                    return;
                }
            }
        }
        let setup = secagg.as_ref().map(|s| s.setup().clone());
        for (id, config) in configs {
            self.transmits.push_back((
                id,
                Message::Train(TrainIns {
                    round,
                    config,
                    deadline_ms: self.config.round_timeout.as_millis() as u64,
                    model: global.clone(),
                    secagg: setup.clone(),
                }),
            ));
        }
        self.events.push_back(Event::RoundStarted {
            round,
            selected: selected.len(),
        });
        self.enter(Phase::Train(TrainPhase {
            round,
            pending: selected.clone(),
            selected,
            results: Vec::new(),
            failures: Vec::new(),
            secagg,
            target,
        }));
        self.timers.set(Timer::Train, deadline);
        self.set_secagg_timer();
        if let Phase::Train(t) = &self.phase
            && t.selected.len() < self.config.min_train_results
        {
            self.close_train(now);
        }
    }

    /// Moves to `phase`, stopping the old phase's timers; returns the old phase.
    fn enter(&mut self, phase: Phase) -> Phase {
        self.timers.clear();
        std::mem::replace(&mut self.phase, phase)
    }

    /// Mirrors the secure round's stage deadline into the timer table.
    fn set_secagg_timer(&mut self) {
        if let Phase::Train(t) = &self.phase
            && let Some(sa) = &t.secagg
        {
            self.timers.set_or_stop(Timer::SecAggStage, sa.deadline());
        }
    }

    /// Routes a SecAgg message to the open secure round.
    fn on_secagg(&mut self, now: Instant, from: &ClientId, msg: Message) -> Result<(), Error> {
        let round = msg.secagg_round().unwrap_or(0);
        let handled = match &mut self.phase {
            Phase::Train(t) if t.round == round => match &mut t.secagg {
                Some(sa) => sa.handle_message(now, from, msg)?,
                None => {
                    return Err(Error::InvalidMessage(InvalidMessage::WrongMode(format!(
                        "{} in a round without secure aggregation",
                        msg.kind()
                    ))));
                }
            },
            _ => return self.late_or_invalid(from, round, msg.kind()),
        };
        if handled == Handled::Late {
            self.events.push_back(Event::LateMessage {
                client: from.clone(),
                round,
            });
        }
        self.pump_secagg(now);
        Ok(())
    }

    /// Sends what the secure round queued and closes the round when it is done.
    fn pump_secagg(&mut self, now: Instant) {
        let Phase::Train(t) = &mut self.phase else {
            return;
        };
        let Some(sa) = &mut t.secagg else {
            return;
        };
        self.transmits.extend(sa.drain_transmits());
        self.timers.set_or_stop(Timer::SecAggStage, sa.deadline());
        if let Some(job) = sa.take_job() {
            self.jobs.push(t.round, Work::Unmask(job));
        }
        if let Some(stage) = sa.take_stage_change() {
            self.events.push_back(Event::SecureStage {
                round: t.round,
                stage,
            });
        }
        if let Some(outcome) = sa.take_outcome() {
            self.close_secure_train(now, outcome);
        }
    }

    fn close_secure_train(
        &mut self,
        now: Instant,
        outcome: Result<crate::secagg::Unmasked, AbortReason>,
    ) {
        let Phase::Train(t) = self.enter(Phase::Waiting) else {
            return;
        };
        let Some(sa) = t.secagg else {
            return;
        };
        let mut record = RoundRecord {
            round: t.round,
            selected: t.selected.len(),
            results: 0,
            failures: sa.failures(),
            train_metrics: Metrics::new(),
            evaluation: None,
            aborted: None,
            secagg: Some(sa.stats().clone()),
            privacy: None,
        };
        let unmasked = match outcome {
            Ok(u) => u,
            Err(reason) => {
                record.aborted = Some(reason);
                self.end_round(now, record);
                return;
            }
        };
        record.results = unmasked.contributors.len();
        record.train_metrics = mean_metrics(&unmasked.metrics);
        let sum = self.global.as_ref().map(|g| {
            crate::secagg::decode_sum(sa.setup(), g, &unmasked.sum, unmasked.contributors.len())
        });
        let outcome = match (sum, &self.global) {
            (Some(Ok(ws)), Some(g)) => {
                self.strategy
                    .aggregate_train(t.round, g, TrainResults::Sum(&ws), &record.failures)
            }
            (Some(Err(e)), _) => Err(e),
            _ => Err(Error::Config("no global model".into())),
        };
        self.last_unmasked = Some(unmasked.sum);
        self.apply_aggregate(now, record, outcome);
    }

    fn close_train(&mut self, now: Instant) {
        let Phase::Train(t) = self.enter(Phase::Waiting) else {
            return;
        };
        // Tell clients still working that the round is over.
        for id in &t.pending {
            self.transmits.push_back((
                id.clone(),
                Message::Abort {
                    round: Some(t.round),
                    reason: AbortReason::Other("round closed".into()),
                },
            ));
        }
        let mut failures = t.failures;
        // Closed early because enough results are in: the over-selected rest did not fail.
        if t.results.len() < t.target {
            failures.extend(t.pending.iter().map(|id| Failure {
                client: id.clone(),
                reason: FailureReason::Timeout,
            }));
        }
        let mut record = RoundRecord {
            round: t.round,
            selected: t.selected.len(),
            results: t.results.len(),
            failures,
            train_metrics: weighted_train_metrics(&t.results),
            evaluation: None,
            aborted: None,
            secagg: None,
            privacy: None,
        };
        if t.results.len() < self.config.min_train_results {
            let reason = AbortReason::TooFewClients {
                available: t.results.len() as u64,
                required: self.config.min_train_results as u64,
            };
            for id in &t.selected {
                if t.results.iter().any(|u| &u.client == id) {
                    self.transmits.push_back((
                        id.clone(),
                        Message::Abort {
                            round: Some(t.round),
                            reason: reason.clone(),
                        },
                    ));
                }
            }
            record.aborted = Some(reason);
            self.end_round(now, record);
            return;
        }
        let outcome = match &self.global {
            Some(g) => self.strategy.aggregate_train(
                t.round,
                g,
                TrainResults::Individual(&t.results),
                &record.failures,
            ),
            None => Err(Error::Config("no global model".into())),
        };
        self.apply_aggregate(now, record, outcome);
    }

    /// Installs the strategy's new model (if sane) and moves on to evaluation.
    fn apply_aggregate(
        &mut self,
        now: Instant,
        mut record: RoundRecord,
        outcome: Result<Option<Params>, Error>,
    ) {
        match outcome {
            Ok(Some(new))
                if new.check_finite().is_ok()
                    && self
                        .global
                        .as_ref()
                        .is_none_or(|g| g.manifest() == new.manifest()) =>
            {
                self.global = Some(new);
            }
            Ok(Some(_)) => {
                record.aborted = Some(AbortReason::Other(
                    "strategy produced a non-finite or mis-shaped model; kept the previous one"
                        .into(),
                ));
                self.end_round(now, record);
                return;
            }
            Ok(None) => {}
            Err(e) => {
                record.aborted = Some(AbortReason::Other(format!("aggregation failed: {e}")));
                self.end_round(now, record);
                return;
            }
        }
        self.start_eval(now, record);
    }

    fn start_eval(&mut self, now: Instant, record: RoundRecord) {
        let round = record.round;
        let due =
            self.config.evaluate_every > 0 && round.is_multiple_of(self.config.evaluate_every);
        let Some(global) = self.global.clone().filter(|_| due) else {
            self.end_round(now, record);
            return;
        };
        // Clients that just timed out or went away in training are not asked to evaluate
        // (a dead client would hold the evaluation until its deadline).
        let gone: BTreeSet<&ClientId> = record
            .failures
            .iter()
            .filter(|f| {
                matches!(
                    f.reason,
                    FailureReason::Timeout | FailureReason::Disconnected
                )
            })
            .map(|f| &f.client)
            .collect();
        let infos: Vec<ClientInfo> = self
            .eligible_infos(now, false)
            .into_iter()
            .filter(|i| !gone.contains(&i.id))
            .collect();
        let mut rng = self.rng_for(round, 1);
        let chosen: BTreeSet<ClientId> = self
            .strategy
            .configure_evaluate(round, &infos, &mut rng)
            .into_iter()
            .filter(|id| self.registry.contains(id))
            .collect();
        if chosen.is_empty() {
            self.end_round(now, record);
            return;
        }
        for id in &chosen {
            self.transmits.push_back((
                id.clone(),
                Message::Evaluate(EvaluateIns {
                    round,
                    deadline_ms: self.config.round_timeout.as_millis() as u64,
                    model: global.clone(),
                }),
            ));
        }
        self.enter(Phase::Evaluate(EvalPhase {
            record,
            pending: chosen,
            results: Vec::new(),
            failures: Vec::new(),
        }));
        self.timers
            .set(Timer::Evaluate, now + self.config.round_timeout);
    }

    fn close_eval(&mut self, now: Instant) {
        let Phase::Evaluate(e) = self.enter(Phase::Waiting) else {
            return;
        };
        let mut record = e.record;
        record.evaluation = self
            .strategy
            .aggregate_evaluate(record.round, &e.results, &e.failures);
        self.end_round(now, record);
    }

    fn end_round(&mut self, now: Instant, mut record: RoundRecord) {
        if record.privacy.is_none() {
            record.privacy = self.round_privacy.take();
        }
        self.history.push(record.clone());
        if self.history.len() > self.config.history_window {
            let excess = self.history.len() - self.config.history_window;
            self.history.drain(..excess);
        }
        if let Some(global) = self.global.clone() {
            self.last_snapshot = Some(Snapshot {
                round: record.round,
                global,
                history: self.history.clone(),
                strategy_state: self.strategy.state(),
                accountant: self
                    .accountant
                    .as_ref()
                    .map(|a| (a.rdp().to_vec(), a.steps())),
            });
        }
        self.enter(Phase::Waiting);
        let persist = self.last_snapshot.is_some();
        if record.aborted.is_some() {
            self.events.push_back(Event::RoundAborted(record.clone()));
        } else {
            self.events.push_back(Event::RoundCompleted(record.clone()));
        }
        if persist {
            // Nothing more until the driver says the snapshot is durable.
            self.unpersisted = Some(record.round);
        } else {
            self.maybe_start(now);
        }
    }

    /// Emits [`Event::WaitingForClients`] if it differs from the last one.
    fn wait_for_clients(&mut self, eligible: usize, required: usize) {
        let without = if self.config.secure_aggregation.is_some() {
            self.registry.without_secure_aggregation()
        } else {
            0
        };
        let ev = Event::WaitingForClients {
            enrolled: self.registry.len(),
            eligible,
            required,
            without_secure_aggregation: without,
        };
        if self.waiting.as_ref() != Some(&ev) {
            self.waiting = Some(ev.clone());
            self.events.push_back(ev);
        }
    }

    fn finish(&mut self) {
        self.enter(Phase::Finished);
        for id in self.registry.ids() {
            self.transmits.push_back((
                id.clone(),
                Message::Abort {
                    round: None,
                    reason: AbortReason::Finished,
                },
            ));
        }
        self.events.push_back(Event::Finished);
    }
}

/// Unweighted means of the clients' metrics (secure rounds hide the example counts).
fn mean_metrics(all: &[Metrics]) -> Metrics {
    crate::strategy::weighted_metrics(all.iter().map(|m| (1.0, m)))
}
