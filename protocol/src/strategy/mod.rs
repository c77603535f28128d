//! The seam between the round machinery and the aggregation rule.
//!
//! A [`Strategy`] decides who trains in a round and with what configuration, and how the
//! results become the next global model. It never sees sockets or clocks. Under secure
//! aggregation it receives only a weighted **sum** ([`TrainResults::Sum`]); strategies that
//! need each client's update (median, Krum, ...) say so through
//! [`Strategy::needs_individual_updates`] and are refused for secure runs.
//!
//! The strategies, one file per family (`fedavg`, `fedopt`, `qfedavg`, `robust`), each with its
//! paper and its published (or Flower's) defaults. All share [`FedAvg`]'s sampling and client
//! configuration (`base`) and differ in how they turn the round's results into the next model.
//!
//! | strategy | receives | idea |
//! |---|---|---|
//! | [`FedAvgM`] | sum | server momentum on the pseudo-gradient |
//! | [`FedProx`] | sum | FedAvg with a proximal term in the clients' loss |
//! | [`FedOpt`] (FedAdagrad, FedAdam, FedYogi) | sum | adaptive server optimizers |
//! | [`QFedAvg`] | individual | q-fair: clients with higher loss weigh more |
//! | [`FedMedian`] | individual | coordinate-wise median |
//! | [`FedTrimmedAvg`] | individual | coordinate-wise trimmed mean |
//! | [`Krum`] | individual | the update(s) closest to their neighbours |
//! | [`Bulyan`] | individual | Multi-Krum selection, then a trimmed mean around the median |
//!
//! Strategies that receive *individual* updates say so ([`Strategy::needs_individual_updates`])
//! and are refused at start-up when secure aggregation is on; given a sum, they error.

use rand::RngCore;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::Error;
use crate::wire::messages::{
    AbortReason, Capabilities, ClientId, EvaluateRes, Metrics, TrainConfig,
};
use crate::wire::params::{Manifest, Params};

/// A client as the strategy sees it when sampling.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientInfo {
    /// Client id (from its certificate).
    pub id: ClientId,
    /// What it declared in its hello.
    pub capabilities: Capabilities,
}

/// One client's training result.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientUpdate {
    /// Who sent it.
    pub client: ClientId,
    /// Examples trained on.
    pub num_examples: u64,
    /// Local metrics.
    pub metrics: Metrics,
    /// The locally trained model.
    pub params: Params,
}

/// The weighted sum of the updates: all that secure aggregation reveals.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedSum {
    /// Manifest of the model.
    pub manifest: std::sync::Arc<Manifest>,
    /// `Σ weight_i · params_i`, per coordinate.
    pub sum: Vec<f64>,
    /// `Σ weight_i`.
    pub total_weight: f64,
    /// Number of clients in the sum.
    pub count: usize,
}

impl WeightedSum {
    /// Sums individual updates weighted by their example counts.
    pub fn from_updates(updates: &[ClientUpdate]) -> Result<Self, Error> {
        let first = updates
            .first()
            .ok_or_else(|| Error::Config("no updates to aggregate".into()))?;
        let manifest = first.params.manifest().clone();
        let mut sum = vec![0.0f64; first.params.len()];
        let mut total_weight = 0.0;
        for u in updates {
            u.params.check_same_manifest(&manifest)?;
            let w = u.num_examples as f64;
            total_weight += w;
            for (s, &v) in sum.iter_mut().zip(u.params.values()) {
                *s += w * v as f64;
            }
        }
        Ok(Self {
            manifest,
            sum,
            total_weight,
            count: updates.len(),
        })
    }

    /// `sum / total_weight` as parameters.
    pub fn mean(&self) -> Result<Params, Error> {
        if self.total_weight <= 0.0 || !self.total_weight.is_finite() {
            return Err(Error::Config(format!(
                "cannot average with total weight {}",
                self.total_weight
            )));
        }
        let inv = 1.0 / self.total_weight;
        let values: Vec<f32> = self.sum.iter().map(|s| (s * inv) as f32).collect();
        Params::new(self.manifest.clone(), values)
    }
}

/// What a strategy gets to aggregate.
#[derive(Clone, Copy, Debug)]
pub enum TrainResults<'a> {
    /// Each client's update (plain rounds).
    Individual(&'a [ClientUpdate]),
    /// Only the weighted sum (secure aggregation).
    Sum(&'a WeightedSum),
}

/// Why a selected client did not contribute. Kept in round records and checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "FailureReasonRepr", into = "FailureReasonRepr")]
#[non_exhaustive]
pub enum FailureReason {
    /// It did not answer before the deadline.
    Timeout,
    /// Its connection went away.
    Disconnected,
    /// The coordinator dropped it (see `coordinator::DropReason`).
    Dropped {
        /// Why, as one of a closed set.
        kind: DropKind,
        /// Why, in words (bounded).
        detail: String,
    },
    /// The client gave up on the round and said why (its training failed, ...).
    Aborted(AbortReason),
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => f.write_str("no answer before the deadline"),
            Self::Disconnected => f.write_str("disconnected"),
            Self::Dropped { kind, detail } => write!(f, "dropped ({}): {detail}", kind.as_str()),
            Self::Aborted(why) => write!(f, "client aborted: {why}"),
        }
    }
}

/// The stored form of [`FailureReason`]: what it writes, and what it reads, which includes
/// the `Invalid` records of checkpoints written before drops were typed.
#[derive(Serialize, Deserialize)]
enum FailureReasonRepr {
    Timeout,
    Disconnected,
    Dropped { kind: DropKind, detail: String },
    Aborted(AbortReason),
    Invalid(String),
}

impl From<FailureReasonRepr> for FailureReason {
    fn from(r: FailureReasonRepr) -> Self {
        match r {
            FailureReasonRepr::Timeout => Self::Timeout,
            FailureReasonRepr::Disconnected => Self::Disconnected,
            FailureReasonRepr::Dropped { kind, detail } => Self::Dropped { kind, detail },
            FailureReasonRepr::Aborted(why) => Self::Aborted(why),
            FailureReasonRepr::Invalid(why) => match why.strip_prefix("client aborted: ") {
                Some(rest) => Self::Aborted(AbortReason::Other(rest.to_owned())),
                None => Self::Dropped {
                    kind: DropKind::ProtocolViolation,
                    detail: why,
                },
            },
        }
    }
}

impl From<FailureReason> for FailureReasonRepr {
    fn from(r: FailureReason) -> Self {
        match r {
            FailureReason::Timeout => Self::Timeout,
            FailureReason::Disconnected => Self::Disconnected,
            FailureReason::Dropped { kind, detail } => Self::Dropped { kind, detail },
            FailureReason::Aborted(why) => Self::Aborted(why),
        }
    }
}

/// Why the coordinator dropped a client: a closed set, so that operators can count drops by
/// reason (the event's text has the details).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropKind {
    /// A message that could not be decoded (or broke a bound).
    Malformed,
    /// Nothing heard from it for the idle timeout.
    Idle,
    /// Asked for the initial model, it did not send one in time.
    NoInitialParams,
    /// A well-formed message that breaks the protocol (wrong phase, wrong round, bad sizes,
    /// a failed secure-aggregation check...).
    ProtocolViolation,
}

impl DropKind {
    /// Every kind.
    pub const ALL: [DropKind; 4] = [
        Self::Malformed,
        Self::Idle,
        Self::NoInitialParams,
        Self::ProtocolViolation,
    ];

    /// The kind's name (`snake_case`, as in metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Idle => "idle",
            Self::NoInitialParams => "no_initial_params",
            Self::ProtocolViolation => "protocol_violation",
        }
    }
}

impl std::fmt::Display for DropKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A selected client that did not contribute, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    /// The client.
    pub client: ClientId,
    /// Why.
    pub reason: FailureReason,
}

/// Aggregated evaluation results of a round.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalSummary {
    /// Examples evaluated over all clients.
    pub num_examples: u64,
    /// Example-weighted mean loss.
    pub loss: f64,
    /// Example-weighted mean of each metric.
    pub metrics: Metrics,
}

/// How many of the available clients to sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Fraction of available clients (C in McMahan et al.).
    pub fraction: f64,
    /// Lower bound on the number sampled (if that many are available).
    pub min_clients: usize,
}

impl Sampling {
    /// Number to sample out of `available`: `max(ceil(fraction · available), min_clients)`,
    /// capped at `available`.
    pub fn count(&self, available: usize) -> usize {
        let by_fraction = (self.fraction * available as f64).ceil() as usize;
        by_fraction.max(self.min_clients).min(available)
    }

    /// Samples client ids uniformly without replacement. `clients` must be in a deterministic
    /// order (the coordinator passes them sorted by id) for runs to be reproducible.
    pub fn sample(&self, clients: &[ClientInfo], rng: &mut dyn RngCore) -> Vec<ClientId> {
        let n = self.count(clients.len());
        let mut ids: Vec<ClientId> = clients
            .choose_multiple(rng, n)
            .map(|c| c.id.clone())
            .collect();
        ids.sort();
        ids
    }
}

/// Averages evaluation results weighted by example count.
pub fn weighted_eval(results: &[(ClientId, EvaluateRes)]) -> Option<EvalSummary> {
    let total = results
        .iter()
        .fold(0u64, |a, (_, r)| a.saturating_add(r.num_examples));
    if total == 0 {
        return None;
    }
    let weights: Vec<f64> = results.iter().map(|(_, r)| r.num_examples as f64).collect();
    let sum: f64 = weights.iter().sum();
    let loss = results
        .iter()
        .zip(&weights)
        .map(|((_, r), w)| w / sum * r.loss)
        .sum();
    Some(EvalSummary {
        num_examples: total,
        loss,
        metrics: weighted_metrics(
            weights
                .iter()
                .copied()
                .zip(results.iter().map(|(_, r)| &r.metrics)),
        ),
    })
}

/// Example-weighted means of the clients' training metrics.
pub fn weighted_train_metrics(updates: &[ClientUpdate]) -> Metrics {
    weighted_metrics(updates.iter().map(|u| (u.num_examples as f64, &u.metrics)))
}

/// Most metric names kept in one aggregated map (a round record's).
pub const MAX_AGGREGATED_METRICS: usize = crate::wire::bounds::DEFAULT_MAX_METRICS as usize;

/// Weighted means of metric maps, each name averaged over the maps that report it. Weights
/// are summed as `f64`, so no count can overflow. At most [`MAX_AGGREGATED_METRICS`] names
/// are kept, those reported by the most clients (ties: by name): one client cannot grow a
/// round record, nor push out the names every honest client reports.
pub fn weighted_metrics<'a>(items: impl IntoIterator<Item = (f64, &'a Metrics)>) -> Metrics {
    let mut acc: BTreeMap<&str, (f64, f64, usize)> = BTreeMap::new();
    for (w, m) in items {
        for (k, v) in m {
            let e = acc.entry(k.as_str()).or_insert((0.0, 0.0, 0));
            e.0 += w * v;
            e.1 += w;
            e.2 += 1;
        }
    }
    let mut names: Vec<(&str, usize)> = acc.iter().map(|(k, e)| (*k, e.2)).collect();
    names.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    names
        .into_iter()
        .take(MAX_AGGREGATED_METRICS)
        .filter_map(|(k, _)| {
            let (sum, w, _) = acc.get(k)?;
            (*w > 0.0).then(|| (k.to_string(), sum / w))
        })
        .collect()
}

/// An aggregation strategy (Flower's `Strategy`, with typed configs).
pub trait Strategy: Send {
    /// Name for logs and checkpoints.
    fn name(&self) -> &str;

    /// True if the strategy needs each client's update, which rules it out under secure
    /// aggregation.
    fn needs_individual_updates(&self) -> bool {
        false
    }

    /// Chooses the clients of a round and their training configuration. `clients` is sorted
    /// by id; `rng` is seeded from the run's seed and the round number.
    fn configure_train(
        &mut self,
        round: u64,
        clients: &[ClientInfo],
        rng: &mut dyn RngCore,
    ) -> Vec<(ClientId, TrainConfig)>;

    /// Turns the round's results into the next global model. `None` keeps the current one.
    fn aggregate_train(
        &mut self,
        round: u64,
        global: &Params,
        results: TrainResults<'_>,
        failures: &[Failure],
    ) -> Result<Option<Params>, Error>;

    /// Chooses the clients that evaluate the new global model. Default: none.
    fn configure_evaluate(
        &mut self,
        _round: u64,
        _clients: &[ClientInfo],
        _rng: &mut dyn RngCore,
    ) -> Vec<ClientId> {
        Vec::new()
    }

    /// Aggregates evaluation results. Default: example-weighted means.
    fn aggregate_evaluate(
        &mut self,
        _round: u64,
        results: &[(ClientId, EvaluateRes)],
        _failures: &[Failure],
    ) -> Option<EvalSummary> {
        weighted_eval(results)
    }

    /// Serialized strategy state for checkpoints (server momentum, optimizer moments...).
    fn state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Restores what [`Strategy::state`] produced.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), Error> {
        Ok(())
    }
}

/// Implements a strategy's sampling, client configuration and evaluation by delegating them
/// to the strategy in field `$field` (strategies that differ only in how they aggregate, and
/// wrappers such as the server-side DP one). Needs `ClientInfo`, `ClientId`, `TrainConfig`,
/// `EvaluateRes`, `EvalSummary`, `Failure` and `RngCore` in scope.
macro_rules! delegate_to {
    ($field:ident) => {
        fn configure_train(
            &mut self,
            round: u64,
            clients: &[ClientInfo],
            rng: &mut dyn RngCore,
        ) -> Vec<(ClientId, TrainConfig)> {
            self.$field.configure_train(round, clients, rng)
        }

        fn configure_evaluate(
            &mut self,
            round: u64,
            clients: &[ClientInfo],
            rng: &mut dyn RngCore,
        ) -> Vec<ClientId> {
            self.$field.configure_evaluate(round, clients, rng)
        }

        fn aggregate_evaluate(
            &mut self,
            round: u64,
            results: &[(ClientId, EvaluateRes)],
            failures: &[Failure],
        ) -> Option<EvalSummary> {
            self.$field.aggregate_evaluate(round, results, failures)
        }
    };
}
pub(crate) use delegate_to;

mod fedavg;
mod fedopt;
mod qfedavg;
mod robust;
#[cfg(test)]
mod tests;

pub use fedavg::{FedAvg, FedAvgM, FedProx, round_train_config};
pub use fedopt::{FedOpt, ServerOptimizer};
pub use qfedavg::QFedAvg;
pub use robust::{Bulyan, FedMedian, FedTrimmedAvg, Krum};

/// The weighted mean of the round (from a sum or from individual updates), `None` if empty.
fn weighted_mean(results: TrainResults<'_>) -> Result<Option<Params>, Error> {
    match results {
        TrainResults::Individual([]) => Ok(None),
        TrainResults::Individual(u) => WeightedSum::from_updates(u)?.mean().map(Some),
        TrainResults::Sum(s) => s.mean().map(Some),
    }
}

fn individual<'a>(results: TrainResults<'a>, name: &str) -> Result<&'a [ClientUpdate], Error> {
    match results {
        TrainResults::Individual(u) => Ok(u),
        TrainResults::Sum(_) => Err(Error::Config(format!(
            "{name} needs each client's update, but the round was securely aggregated"
        ))),
    }
}

fn same_len(global: &Params, updates: &[ClientUpdate]) -> Result<(), Error> {
    for u in updates {
        u.params.check_same_manifest(global.manifest())?;
    }
    Ok(())
}

fn encode_state<T: Serialize>(state: &T) -> Vec<u8> {
    postcard::to_allocvec(state).unwrap_or_default()
}

fn decode_state<'a, T: Deserialize<'a>>(bytes: &'a [u8], name: &str) -> Result<T, Error> {
    postcard::from_bytes(bytes)
        .map_err(|e| Error::Config(format!("corrupt {name} state in checkpoint: {e}")))
}
