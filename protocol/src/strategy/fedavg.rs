//! FedAvg and its two closest relatives: FedAvgM (server momentum) and FedProx (a proximal
//! term in the clients' loss).

use rand::RngCore;

use super::{
    ClientInfo, EvalSummary, Failure, Sampling, Strategy, TrainResults, WeightedSum, decode_state,
    encode_state, weighted_mean,
};
use crate::Error;
use crate::wire::messages::{ClientId, EvaluateRes, TrainConfig};
use crate::wire::params::Params;

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

/// FedAvgM (Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for
/// Federated Visual Classification", 2019): server momentum on the pseudo-gradient
/// `g = global − mean`: `v ← β·v + g`, `global ← global − η·v`. Defaults: η = 1, β = 0.9.
#[derive(Clone, Debug)]
pub struct FedAvgM {
    /// Sampling and client configuration.
    pub base: FedAvg,
    /// Server learning rate η.
    pub server_learning_rate: f64,
    /// Server momentum β.
    pub server_momentum: f64,
    pub(super) velocity: Option<Vec<f32>>,
}

impl FedAvgM {
    /// With the published defaults (η = 1, β = 0.9).
    pub fn new(base: FedAvg) -> Self {
        Self {
            base,
            server_learning_rate: 1.0,
            server_momentum: 0.9,
            velocity: None,
        }
    }
}

impl Strategy for FedAvgM {
    fn name(&self) -> &str {
        "fedavgm"
    }
    delegate_to!(base);

    fn aggregate_train(
        &mut self,
        _round: u64,
        global: &Params,
        results: TrainResults<'_>,
        _failures: &[Failure],
    ) -> Result<Option<Params>, Error> {
        let Some(mean) = weighted_mean(results)? else {
            return Ok(None);
        };
        let g: Vec<f32> = global
            .values()
            .iter()
            .zip(mean.values())
            .map(|(x, m)| x - m)
            .collect();
        let v = match self.velocity.take() {
            Some(mut v) if v.len() == g.len() => {
                let beta = self.server_momentum as f32;
                for (vi, gi) in v.iter_mut().zip(&g) {
                    *vi = beta * *vi + gi;
                }
                v
            }
            _ => g,
        };
        let eta = self.server_learning_rate as f32;
        let new: Vec<f32> = global
            .values()
            .iter()
            .zip(&v)
            .map(|(x, vi)| x - eta * vi)
            .collect();
        self.velocity = Some(v);
        global.with_values(new).map(Some)
    }

    fn state(&self) -> Vec<u8> {
        encode_state(&self.velocity)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), Error> {
        if !state.is_empty() {
            self.velocity = decode_state(state, "fedavgm")?;
        }
        Ok(())
    }
}

/// FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020):
/// FedAvg whose clients minimise `loss + μ/2 · ||w − global||²`. Default μ = 0.01 (one of the
/// paper's grid {0.001, 0.01, 0.1, 1}).
#[derive(Clone, Debug)]
pub struct FedProx {
    /// Sampling and client configuration; `train_config.proximal_mu` is set from `mu`.
    pub base: FedAvg,
}

impl FedProx {
    /// FedProx with proximal term `mu`.
    pub fn new(mut base: FedAvg, mu: f64) -> Self {
        base.train_config.proximal_mu = mu;
        Self { base }
    }
}

impl Strategy for FedProx {
    fn name(&self) -> &str {
        "fedprox"
    }
    delegate_to!(base);

    fn aggregate_train(
        &mut self,
        round: u64,
        global: &Params,
        results: TrainResults<'_>,
        failures: &[Failure],
    ) -> Result<Option<Params>, Error> {
        self.base.aggregate_train(round, global, results, failures)
    }
}
