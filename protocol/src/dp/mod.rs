//! Differential privacy for federated rounds (DP-FedAvg, McMahan et al., "Learning
//! Differentially Private Recurrent Language Models", ICLR 2018).
//!
//! Three modes, all accounted with the same Rényi DP accountant
//! ([`flotilla_crypto::dp::RdpAccountant`]: each round is one step of the sampled Gaussian
//! mechanism at sampling rate `q = sampled / available` and noise multiplier σ):
//!
//! * **client** (distributed DP, works with secure aggregation): each sampled client clips its
//!   update `local − global` to L2 norm C and adds Gaussian noise of standard deviation
//!   `σ·C/√m` (m = clients sampled), so the *sum* carries `N(0, σ²C²)`. Updates are weighted
//!   equally (weight 1), as the sensitivity analysis assumes. Without secure aggregation the
//!   server sees each update with only its share of the noise; the guarantee then holds
//!   against everyone who sees the model, not against the server.
//! * **server-fixed** (no secure aggregation): the server clips each update to C, sums, adds
//!   `N(0, σ²C²)` and averages ([`DpServer`]).
//! * **server-adaptive**: the same with the clip norm adapted each round towards a quantile of
//!   the update norms (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private
//!   Learning with Adaptive Clipping", NeurIPS 2021): `C ← C·exp(−η_C·(b̃ − γ))` where `b̃` is
//!   the noised fraction of updates within the clip. Defaults from the paper: γ = 0.5,
//!   η_C = 0.2, initial C = 0.1, count noise σ_b = m/20; the update noise is then
//!   `σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2)` so that the whole round has noise multiplier σ.
//!
//! A `privacy_budget` (ε at δ) stops the run cleanly before a round that would exceed it.

use flotilla_crypto::dp::{GaussianNoise, clip_l2};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::wire::config::ClientDp;
use crate::wire::params::Params;

/// Where the noise is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DpMode {
    /// Each client clips and adds its share of the noise (works with secure aggregation).
    Client,
    /// The server clips each update to a fixed norm and adds the noise.
    ServerFixed,
    /// The server clips to an adaptive norm (Andrew et al. 2021) and adds the noise.
    ServerAdaptive,
}

/// Differential-privacy settings (the server's `[dp]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpConfig {
    /// Where the noise is added.
    pub mode: DpMode,
    /// L2 clip norm C (the initial one in adaptive mode; default 1.0, or 0.1 adaptive).
    pub clip: Option<f64>,
    /// Noise multiplier σ: the noise on the sum of clipped updates has std σ·C.
    pub noise_multiplier: f64,
    /// δ of the reported (ε, δ).
    pub delta: f64,
    /// Stop before a round would take ε above this. `None`: report only.
    pub privacy_budget: Option<f64>,
    /// Adaptive mode: target quantile γ of the update norms.
    pub target_quantile: f64,
    /// Adaptive mode: clip learning rate η_C.
    pub clip_learning_rate: f64,
    /// Adaptive mode: std of the noise on the clipped count (default m/20).
    pub clip_count_stddev: Option<f64>,
}

impl Default for DpConfig {
    fn default() -> Self {
        Self {
            mode: DpMode::Client,
            clip: None,
            noise_multiplier: 1.0,
            delta: 1e-5,
            privacy_budget: None,
            target_quantile: 0.5,
            clip_learning_rate: 0.2,
            clip_count_stddev: None,
        }
    }
}

impl DpConfig {
    /// The clip norm (initial one in adaptive mode).
    pub fn clip_norm(&self) -> f64 {
        self.clip.unwrap_or(match self.mode {
            DpMode::ServerAdaptive => 0.1,
            _ => 1.0,
        })
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |s: String| Err(Error::Config(format!("dp: {s}")));
        if !(self.clip_norm() > 0.0 && self.clip_norm().is_finite()) {
            return bad(format!("clip must be positive, not {}", self.clip_norm()));
        }
        if !(self.noise_multiplier >= 0.0 && self.noise_multiplier.is_finite()) {
            return bad(format!(
                "noise_multiplier must be ≥ 0, not {}",
                self.noise_multiplier
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return bad(format!("delta must be in (0, 1), not {}", self.delta));
        }
        if let Some(b) = self.privacy_budget
            && !(b > 0.0)
        {
            return bad(format!("privacy_budget must be positive, not {b}"));
        }
        if !(0.0..=1.0).contains(&self.target_quantile) || self.clip_learning_rate < 0.0 {
            return bad("target_quantile in [0, 1] and clip_learning_rate ≥ 0 needed".into());
        }
        Ok(())
    }
}

/// Clips `local − global` to `dp.clip`, adds the noise, and returns the new local model.
pub fn privatize(
    global: &Params,
    local: &Params,
    dp: &ClientDp,
    noise: &mut GaussianNoise,
) -> Result<Params, Error> {
    local.check_same_manifest(global.manifest())?;
    let mut delta: Vec<f32> = local
        .values()
        .iter()
        .zip(global.values())
        .map(|(l, g)| l - g)
        .collect();
    clip_l2(&mut delta, dp.clip);
    noise.add_to(&mut delta, dp.noise_std);
    let values: Vec<f32> = delta
        .iter()
        .zip(global.values())
        .map(|(d, g)| g + d)
        .collect();
    global.with_values(values)
}

/// Per-round privacy report, kept in the round record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyReport {
    /// Sampling rate q of the round.
    pub sampling_rate: f64,
    /// Noise multiplier σ.
    pub noise_multiplier: f64,
    /// ε spent by the run so far, at `delta`.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}

mod server;

pub use server::DpServer;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::{ClientUpdate, FedAvg, Strategy, TrainResults, WeightedSum};
    use crate::wire::messages::ClientId;
    use crate::wire::messages::Metrics;
    use crate::wire::params::{Manifest, TensorSpec};

    fn p(v: &[f32]) -> Params {
        Params::new(
            Manifest::new(vec![TensorSpec::new("x", &[v.len()])]),
            v.to_vec(),
        )
        .unwrap()
    }

    fn upd(i: usize, v: &[f32]) -> ClientUpdate {
        ClientUpdate {
            client: ClientId::new(format!("c{i}")),
            num_examples: 100 + i as u64,
            metrics: Metrics::new(),
            params: p(v),
        }
    }

    fn config(mode: DpMode, clip: f64, sigma: f64) -> DpConfig {
        DpConfig {
            mode,
            clip: Some(clip),
            noise_multiplier: sigma,
            ..DpConfig::default()
        }
    }

    #[test]
    fn fixed_clipping_by_hand() {
        // Without noise: δ = (3, 4) clipped to norm 1 → (0.6, 0.8); δ = (0.3, 0) kept.
        // Equal weights: mean = (0.45, 0.4).
        let mut s = DpServer::new(
            Box::new(FedAvg::default()),
            &config(DpMode::ServerFixed, 1.0, 0.0),
            GaussianNoise::from_seed([1; 32]),
        )
        .unwrap();
        let ups = [upd(0, &[3.0, 4.0]), upd(1, &[0.3, 0.0])];
        let out = s
            .aggregate_train(1, &p(&[0.0, 0.0]), TrainResults::Individual(&ups), &[])
            .unwrap()
            .unwrap();
        assert!((out.values()[0] - 0.45).abs() < 1e-6 && (out.values()[1] - 0.4).abs() < 1e-6);
        // With noise σ = 1: the mean moves by N(0, (σC/m)²) per coordinate.
        let mut noisy = DpServer::new(
            Box::new(FedAvg::default()),
            &config(DpMode::ServerFixed, 1.0, 1.0),
            GaussianNoise::from_seed([1; 32]),
        )
        .unwrap();
        let out = noisy
            .aggregate_train(1, &p(&[0.0, 0.0]), TrainResults::Individual(&ups), &[])
            .unwrap()
            .unwrap();
        assert_ne!(out.values(), &[0.45, 0.4]);
        // Refused with a sum, refused for client mode.
        let ws = WeightedSum::from_updates(&ups).unwrap();
        assert!(
            noisy
                .aggregate_train(1, &p(&[0.0, 0.0]), TrainResults::Sum(&ws), &[])
                .is_err()
        );
        assert!(
            DpServer::new(
                Box::new(FedAvg::default()),
                &config(DpMode::Client, 1.0, 1.0),
                GaussianNoise::from_seed([1; 32])
            )
            .is_err()
        );
    }

    #[test]
    fn adaptive_clip_moves_towards_the_median_norm() {
        // 20 updates with norms 1..=20 (median ≈ 10); start at C = 0.1.
        let ups: Vec<ClientUpdate> = (1..=20).map(|i| upd(i, &[i as f32, 0.0])).collect();
        let mut cfg = config(DpMode::ServerAdaptive, 0.1, 0.0);
        cfg.clip_count_stddev = Some(0.0);
        let mut s = DpServer::new(
            Box::new(FedAvg::default()),
            &cfg,
            GaussianNoise::from_seed([2; 32]),
        )
        .unwrap();
        let g = p(&[0.0, 0.0]);
        // Round 1: no update within 0.1 → b = 0 → C·exp(0.2·0.5).
        s.aggregate_train(1, &g, TrainResults::Individual(&ups), &[])
            .unwrap();
        assert!((s.clip() - 0.1 * (0.1f64).exp()).abs() < 1e-12);
        for r in 2..200 {
            s.aggregate_train(r, &g, TrainResults::Individual(&ups), &[])
                .unwrap();
        }
        assert!((9.0..=11.5).contains(&s.clip()), "clip {}", s.clip());
        // The clip survives a checkpoint.
        let mut t = DpServer::new(
            Box::new(FedAvg::default()),
            &cfg,
            GaussianNoise::from_seed([3; 32]),
        )
        .unwrap();
        t.restore_state(&s.state()).unwrap();
        assert_eq!(t.clip(), s.clip());
    }

    #[test]
    fn client_privatization_clips_and_noises() {
        let g = p(&[1.0, 1.0]);
        let local = p(&[4.0, 5.0]); // δ = (3, 4), norm 5
        let dp = ClientDp {
            clip: 1.0,
            noise_std: 0.0,
        };
        let out = privatize(&g, &local, &dp, &mut GaussianNoise::from_seed([4; 32])).unwrap();
        assert!((out.values()[0] - 1.6).abs() < 1e-6 && (out.values()[1] - 1.8).abs() < 1e-6);
        let dp = ClientDp {
            clip: 1.0,
            noise_std: 0.5,
        };
        let out = privatize(&g, &local, &dp, &mut GaussianNoise::from_seed([4; 32])).unwrap();
        assert!((out.values()[0] - 1.6).abs() > 1e-6);
    }
}
