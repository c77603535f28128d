//! Central DP on the server: clip each update, add the noise to the sum ([`DpServer`]).

use flotilla_crypto::dp::{GaussianNoise, clip_l2};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{DpConfig, DpMode};
use crate::Error;
use crate::strategy::{
    ClientInfo, EvalSummary, Failure, Strategy, TrainResults, WeightedSum, delegate_to,
};
use crate::wire::messages::{ClientId, EvaluateRes, TrainConfig};
use crate::wire::params::Params;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct DpServerState {
    clip: f64,
    inner: Vec<u8>,
}

/// Server-side DP around any strategy: clips every update, adds the noise to their sum, and
/// hands the inner strategy the noised, equally weighted sum. It needs each update, so it is
/// refused under secure aggregation (use [`DpMode::Client`] there).
pub struct DpServer {
    inner: Box<dyn Strategy>,
    clip: f64,
    sigma: f64,
    adaptive: Option<(f64, f64, Option<f64>)>,
    noise: GaussianNoise,
    name: String,
}

impl std::fmt::Debug for DpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpServer")
            .field("inner", &self.inner.name())
            .field("clip", &self.clip)
            .field("sigma", &self.sigma)
            .finish_non_exhaustive()
    }
}

impl DpServer {
    /// Wraps `inner` with the server-side mode of `config` (errors for client mode).
    pub fn new(
        inner: Box<dyn Strategy>,
        config: &DpConfig,
        noise: GaussianNoise,
    ) -> Result<Self, Error> {
        config.validate()?;
        let adaptive = match config.mode {
            DpMode::Client => {
                return Err(Error::Config(
                    "client-side DP is applied by the clients, not a server wrapper".into(),
                ));
            }
            DpMode::ServerFixed => None,
            DpMode::ServerAdaptive => Some((
                config.target_quantile,
                config.clip_learning_rate,
                config.clip_count_stddev,
            )),
        };
        let name = format!(
            "dp-{}+{}",
            if adaptive.is_some() {
                "adaptive"
            } else {
                "fixed"
            },
            inner.name()
        );
        Ok(Self {
            inner,
            clip: config.clip_norm(),
            sigma: config.noise_multiplier,
            adaptive,
            noise,
            name,
        })
    }

    /// The current clip norm.
    pub fn clip(&self) -> f64 {
        self.clip
    }
}

impl Strategy for DpServer {
    fn name(&self) -> &str {
        &self.name
    }

    fn needs_individual_updates(&self) -> bool {
        true
    }

    delegate_to!(inner);

    fn aggregate_train(
        &mut self,
        round: u64,
        global: &Params,
        results: TrainResults<'_>,
        failures: &[Failure],
    ) -> Result<Option<Params>, Error> {
        let TrainResults::Individual(updates) = results else {
            return Err(Error::Config(
                "server-side DP needs each update; with secure aggregation use dp.mode = \"client\""
                    .into(),
            ));
        };
        if updates.is_empty() {
            return Ok(None);
        }
        let m = updates.len() as f64;
        let mut sum = vec![0.0f64; global.len()];
        let mut within = 0usize;
        for u in updates {
            u.params.check_same_manifest(global.manifest())?;
            let mut d: Vec<f32> = u
                .params
                .values()
                .iter()
                .zip(global.values())
                .map(|(l, g)| l - g)
                .collect();
            if clip_l2(&mut d, self.clip) <= self.clip {
                within += 1;
            }
            for (s, x) in sum.iter_mut().zip(&d) {
                *s += *x as f64;
            }
        }
        // Noise on the sum; in adaptive mode part of the budget goes to the clipped count.
        let (update_sigma, count_std) = match self.adaptive {
            None => (self.sigma, 0.0),
            Some((_, _, count)) => {
                let sb = count.unwrap_or(m / 20.0);
                let rest = self.sigma.powi(-2) - (2.0 * sb).powi(-2);
                if self.sigma > 0.0 && rest <= 0.0 {
                    return Err(Error::Config(format!(
                        "dp: the clipped-count noise (σ_b = {sb}) leaves no budget for the update \
                         noise at noise_multiplier {}; raise clip_count_stddev",
                        self.sigma
                    )));
                }
                (
                    if self.sigma > 0.0 {
                        rest.powf(-0.5)
                    } else {
                        0.0
                    },
                    sb,
                )
            }
        };
        let std = update_sigma * self.clip;
        for s in sum.iter_mut() {
            *s += self.noise.sample(std);
        }
        // The inner strategy gets Σ w·params with weight 1 per client: m·global + Σ noised δ.
        let ws = WeightedSum {
            manifest: global.manifest().clone(),
            sum: sum
                .iter()
                .zip(global.values())
                .map(|(d, g)| m * *g as f64 + d)
                .collect(),
            total_weight: m,
            count: updates.len(),
        };
        let out = self
            .inner
            .aggregate_train(round, global, TrainResults::Sum(&ws), failures);
        if let Some((gamma, eta, _)) = self.adaptive {
            let noised = (within as f64 + self.noise.sample(count_std)) / m;
            self.clip *= (-eta * (noised - gamma)).exp();
        }
        out
    }

    fn state(&self) -> Vec<u8> {
        postcard::to_allocvec(&DpServerState {
            clip: self.clip,
            inner: self.inner.state(),
        })
        .unwrap_or_default()
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), Error> {
        if state.is_empty() {
            return Ok(());
        }
        let s: DpServerState = postcard::from_bytes(state)
            .map_err(|e| Error::Config(format!("corrupt DP state in checkpoint: {e}")))?;
        if !(s.clip > 0.0 && s.clip.is_finite()) {
            return Err(Error::Config("corrupt DP clip norm in checkpoint".into()));
        }
        self.clip = s.clip;
        self.inner.restore_state(&s.inner)
    }
}
