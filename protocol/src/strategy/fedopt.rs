//! Adaptive server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021):
//! FedAdagrad, FedAdam, FedYogi.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{
    ClientInfo, EvalSummary, Failure, FedAvg, Strategy, TrainResults, decode_state, encode_state,
    weighted_mean,
};
use crate::Error;
use crate::wire::messages::{ClientId, EvaluateRes, TrainConfig};
use crate::wire::params::Params;

/// Which adaptive server optimizer [`FedOpt`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerOptimizer {
    /// `v ← v + Δ²`.
    Adagrad,
    /// `v ← β₂·v + (1 − β₂)·Δ²`.
    Adam,
    /// `v ← v − (1 − β₂)·Δ²·sign(v − Δ²)`.
    Yogi,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Moments {
    pub(super) m: Vec<f32>,
    v: Vec<f32>,
}

/// FedAdagrad, FedAdam and FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR
/// 2021, Algorithm 2): with `Δ = mean − global`, `m ← β₁·m + (1 − β₁)·Δ`, `v` by the chosen
/// rule (starting at τ²), `global ← global + η·m / (√v + τ)`. Defaults as in Flower's
/// implementation of the paper: FedAdagrad η = 0.1, β₁ = 0, τ = 1e-9; FedAdam η = 0.1,
/// β₁ = 0.9, β₂ = 0.99, τ = 1e-9; FedYogi η = 0.01, β₁ = 0.9, β₂ = 0.99, τ = 1e-3.
#[derive(Clone, Debug)]
pub struct FedOpt {
    /// Sampling and client configuration (the client learning rate η_l is its
    /// `train_config.learning_rate`).
    pub base: FedAvg,
    /// Adagrad, Adam or Yogi.
    pub optimizer: ServerOptimizer,
    /// Server learning rate η.
    pub eta: f64,
    /// First-moment decay β₁.
    pub beta_1: f64,
    /// Second-moment decay β₂ (Adam, Yogi).
    pub beta_2: f64,
    /// Adaptivity τ.
    pub tau: f64,
    pub(super) moments: Option<Moments>,
}

impl FedOpt {
    /// With the defaults for `optimizer` (see the type's docs).
    pub fn new(base: FedAvg, optimizer: ServerOptimizer) -> Self {
        let (eta, beta_1, tau) = match optimizer {
            ServerOptimizer::Adagrad => (0.1, 0.0, 1e-9),
            ServerOptimizer::Adam => (0.1, 0.9, 1e-9),
            ServerOptimizer::Yogi => (0.01, 0.9, 1e-3),
        };
        Self {
            base,
            optimizer,
            eta,
            beta_1,
            beta_2: 0.99,
            tau,
            moments: None,
        }
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> &str {
        match self.optimizer {
            ServerOptimizer::Adagrad => "fedadagrad",
            ServerOptimizer::Adam => "fedadam",
            ServerOptimizer::Yogi => "fedyogi",
        }
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
        let n = global.len();
        let tau = self.tau as f32;
        let mut mo = match self.moments.take() {
            Some(mo) if mo.m.len() == n && mo.v.len() == n => mo,
            _ => Moments {
                m: vec![0.0; n],
                v: vec![tau * tau; n],
            },
        };
        let (b1, b2, eta) = (self.beta_1 as f32, self.beta_2 as f32, self.eta as f32);
        let mut new = Vec::with_capacity(n);
        for (((x, avg), m), v) in global
            .values()
            .iter()
            .zip(mean.values())
            .zip(mo.m.iter_mut())
            .zip(mo.v.iter_mut())
        {
            let d = avg - x;
            *m = b1 * *m + (1.0 - b1) * d;
            let d2 = d * d;
            *v = match self.optimizer {
                ServerOptimizer::Adagrad => *v + d2,
                ServerOptimizer::Adam => b2 * *v + (1.0 - b2) * d2,
                ServerOptimizer::Yogi => *v - (1.0 - b2) * d2 * (*v - d2).signum(),
            };
            new.push(x + eta * *m / (v.sqrt() + tau));
        }
        self.moments = Some(mo);
        global.with_values(new).map(Some)
    }

    fn state(&self) -> Vec<u8> {
        encode_state(&self.moments)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), Error> {
        if !state.is_empty() {
            self.moments = decode_state(state, self.name())?;
        }
        Ok(())
    }
}
