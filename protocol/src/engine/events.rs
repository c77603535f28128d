//! What the coordinator reports: events, round records, drop reasons, snapshots.

use std::time::Duration;

use crate::Error;
use crate::dp::PrivacyReport;
use crate::secagg::SecAggStats;
use crate::strategy::{EvalSummary, Failure};
use crate::wire::messages::{AbortReason, ClientId, Message, Metrics};
use crate::wire::params::Params;

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
    /// What a buffered-asynchronous step folded in (FedBuff; `None` for synchronous rounds):
    /// each round of an asynchronous run is one step of the model.
    #[serde(default)]
    pub asynchronous: Option<AsyncStep>,
}

/// What one buffered-asynchronous step (FedBuff) folded in.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AsyncStep {
    /// Each update in the step: its client and its staleness (how many model versions
    /// behind the step's base model the version it trained on was).
    pub staleness: Vec<(ClientId, u64)>,
    /// Updates refused because they were more than `max_staleness` versions behind.
    pub discarded: u64,
    /// Training tasks dispatched since the previous step.
    pub dispatched: u64,
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
        /// Clients that must agree ([`CoordinatorConfig::model_quorum`](crate::CoordinatorConfig::model_quorum), capped).
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
    /// The global model after `round`. The [`Coordinator`](crate::Coordinator) does not emit this (its events
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
    /// Training work went out (asynchronous engines): `clients` clients got task `task`, to
    /// train on model version `version`.
    Dispatched {
        /// The task's id (the `round` its messages carry).
        task: u64,
        /// The model version sent.
        version: u64,
        /// Clients in the task.
        clients: usize,
    },
    /// All rounds are done.
    Finished,
}

/// Where an outgoing message goes.
pub type Transmit = (ClientId, Message);

/// A snapshot from which a coordinator can resume (the checkpoint's content).
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Last completed (or aborted) round.
    pub round: u64,
    /// Global model after that round.
    pub global: Params,
    /// What happened in the last rounds (at most [`CoordinatorConfig::history_window`](crate::CoordinatorConfig::history_window)).
    pub history: Vec<RoundRecord>,
    /// The strategy's own state.
    pub strategy_state: Vec<u8>,
    /// The privacy accountant's state (RDP per order, steps), if differential privacy is on.
    pub accountant: Option<(Vec<f64>, u64)>,
    /// The last task id an asynchronous engine dispatched (its tasks outnumber its rounds);
    /// a resumed run numbers its tasks after it, so that no result of a task sent before
    /// the restart can be taken for a new one. `None` for synchronous rounds, whose task is
    /// the round.
    pub last_task: Option<u64>,
}
