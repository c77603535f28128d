//! The seam between the round machinery and the aggregation rule.
//!
//! A [`Strategy`] decides who trains in a round and with what configuration, and how the
//! results become the next global model. It never sees sockets or clocks. Under secure
//! aggregation it receives only a weighted **sum** ([`TrainResults::Sum`]); strategies that
//! need each client's update (median, Krum, ...) say so through
//! [`Strategy::needs_individual_updates`] and are refused for secure runs.

use rand::RngCore;
use rand::seq::IndexedRandom;
use std::collections::BTreeMap;

use crate::Error;
use crate::messages::{Capabilities, ClientId, EvaluateRes, Metrics, TrainConfig};
use crate::params::{Manifest, Params};

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

/// Why a selected client did not contribute.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum FailureReason {
    /// It did not answer before the deadline.
    Timeout,
    /// Its connection went away.
    Disconnected,
    /// It sent something invalid and was dropped.
    Invalid(String),
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => f.write_str("no answer before the deadline"),
            Self::Disconnected => f.write_str("disconnected"),
            Self::Invalid(why) => write!(f, "invalid: {why}"),
        }
    }
}

/// A selected client that did not contribute, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
pub const MAX_AGGREGATED_METRICS: usize = crate::bounds::DEFAULT_MAX_METRICS as usize;

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

/// Federated Averaging (McMahan et al., "Communication-Efficient Learning of Deep Networks
/// from Decentralized Data", AISTATS 2017): the new global model is the mean of the clients'
/// models weighted by their number of training examples.
#[derive(Clone, Debug)]
pub struct FedAvg {
    /// Who trains.
    pub train_sampling: Sampling,
    /// Who evaluates.
    pub evaluate_sampling: Sampling,
    /// Local training configuration sent to every sampled client.
    pub train_config: TrainConfig,
}

impl Default for FedAvg {
    fn default() -> Self {
        Self {
            train_sampling: Sampling {
                fraction: 1.0,
                min_clients: 2,
            },
            evaluate_sampling: Sampling {
                fraction: 0.0,
                min_clients: 0,
            },
            train_config: TrainConfig::default(),
        }
    }
}

/// Per-round config: the configured one with its seed mixed with the round number, so that
/// clients shuffle differently each round yet reproducibly.
pub fn round_train_config(base: &TrainConfig, round: u64) -> TrainConfig {
    let mut c = base.clone();
    c.seed = base
        .seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(round);
    c.learning_rate = base.learning_rate * base.lr_decay.powf(round.saturating_sub(1) as f64);
    c
}

impl Strategy for FedAvg {
    fn name(&self) -> &str {
        "fedavg"
    }

    fn configure_train(
        &mut self,
        round: u64,
        clients: &[ClientInfo],
        rng: &mut dyn RngCore,
    ) -> Vec<(ClientId, TrainConfig)> {
        let config = round_train_config(&self.train_config, round);
        self.train_sampling
            .sample(clients, rng)
            .into_iter()
            .map(|id| (id, config.clone()))
            .collect()
    }

    fn aggregate_train(
        &mut self,
        _round: u64,
        _global: &Params,
        results: TrainResults<'_>,
        _failures: &[Failure],
    ) -> Result<Option<Params>, Error> {
        let owned;
        let sum = match results {
            TrainResults::Individual(u) => {
                if u.is_empty() {
                    return Ok(None);
                }
                owned = WeightedSum::from_updates(u)?;
                &owned
            }
            TrainResults::Sum(s) => s,
        };
        sum.mean().map(Some)
    }

    fn configure_evaluate(
        &mut self,
        _round: u64,
        clients: &[ClientInfo],
        rng: &mut dyn RngCore,
    ) -> Vec<ClientId> {
        self.evaluate_sampling.sample(clients, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::TensorSpec;
    use rand::SeedableRng;

    fn upd(id: &str, n: u64, v: Vec<f32>) -> ClientUpdate {
        ClientUpdate {
            client: ClientId::new(id),
            num_examples: n,
            metrics: [("loss".to_string(), v[0] as f64)].into_iter().collect(),
            params: Params::new(Manifest::new(vec![TensorSpec::new("x", &[v.len()])]), v).unwrap(),
        }
    }

    #[test]
    fn fedavg_is_example_weighted_mean() {
        let ups = vec![upd("a", 1, vec![1.0, 2.0]), upd("b", 3, vec![5.0, -2.0])];
        let g = ups[0].params.clone();
        let out = FedAvg::default()
            .aggregate_train(1, &g, TrainResults::Individual(&ups), &[])
            .unwrap()
            .unwrap();
        // (1*1 + 3*5)/4 = 4, (1*2 + 3*-2)/4 = -1
        assert_eq!(out.values(), &[4.0, -1.0]);
        let m = weighted_train_metrics(&ups);
        assert_eq!(m["loss"], 4.0);
    }

    #[test]
    fn sampling_counts_and_determinism() {
        let s = Sampling {
            fraction: 0.1,
            min_clients: 2,
        };
        assert_eq!(s.count(100), 10);
        assert_eq!(s.count(5), 2);
        assert_eq!(s.count(1), 1);
        let clients: Vec<ClientInfo> = (0..100)
            .map(|i| ClientInfo {
                id: ClientId::new(format!("c{i:03}")),
                capabilities: Capabilities::default(),
            })
            .collect();
        let a = s.sample(&clients, &mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
        let b = s.sample(&clients, &mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
        let c = s.sample(&clients, &mut rand_chacha::ChaCha8Rng::seed_from_u64(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 10);
    }
}
