//! Aggregation strategies beyond FedAvg, each with its paper and its published (or Flower's)
//! defaults. All share [`FedAvg`]'s sampling and client configuration (`base`) and differ in
//! how they turn the round's results into the next model.
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
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::messages::{ClientId, EvaluateRes, TrainConfig};
use crate::params::Params;
use crate::strategy::{
    ClientInfo, ClientUpdate, EvalSummary, Failure, FedAvg, Strategy, TrainResults, WeightedSum,
    delegate_to,
};

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
    velocity: Option<Vec<f32>>,
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
struct Moments {
    m: Vec<f32>,
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
    moments: Option<Moments>,
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

/// q-FedAvg (Li, Sanjabi, Beirami and Smith, "Fair Resource Allocation in Federated
/// Learning", ICLR 2020): with `L = 1/lr` and each client's loss `F_k` (its `train_loss`
/// metric), `Δw_k = L·(global − w_k)`, `Δ_k = F_k^q·Δw_k`,
/// `h_k = q·F_k^(q−1)·||Δw_k||² + L·F_k^q`, and `global ← global − Σ Δ_k / Σ h_k`. q = 0 is
/// FedAvg-like; larger q favours clients with higher loss. Defaults (Flower's): q = 0.2,
/// lr = 0.1.
#[derive(Clone, Debug)]
pub struct QFedAvg {
    /// Sampling and client configuration.
    pub base: FedAvg,
    /// Fairness parameter q.
    pub q: f64,
    /// The learning rate that defines `L = 1/lr`.
    pub learning_rate: f64,
}

impl QFedAvg {
    /// With q = 0.2 and lr = 0.1.
    pub fn new(base: FedAvg) -> Self {
        Self {
            base,
            q: 0.2,
            learning_rate: 0.1,
        }
    }
}

impl Strategy for QFedAvg {
    fn name(&self) -> &str {
        "qfedavg"
    }
    fn needs_individual_updates(&self) -> bool {
        true
    }
    delegate_to!(base);

    fn aggregate_train(
        &mut self,
        _round: u64,
        global: &Params,
        results: TrainResults<'_>,
        _failures: &[Failure],
    ) -> Result<Option<Params>, Error> {
        let updates = individual(results, "qfedavg")?;
        if updates.is_empty() {
            return Ok(None);
        }
        same_len(global, updates)?;
        let l = 1.0 / self.learning_rate;
        let q = self.q;
        let mut num = vec![0.0f64; global.len()];
        let mut h_sum = 0.0;
        for u in updates {
            let loss = u
                .metrics
                .get("train_loss")
                .or_else(|| u.metrics.get("loss"))
                .copied()
                .filter(|f| f.is_finite() && *f > 0.0)
                .ok_or_else(|| {
                    Error::InvalidMessage(format!(
                        "qfedavg needs a positive train_loss metric from {}",
                        u.client
                    ))
                })?;
            let fq = loss.powf(q);
            let mut norm2 = 0.0;
            for (acc, (x, w)) in num
                .iter_mut()
                .zip(global.values().iter().zip(u.params.values()))
            {
                let dw = l * (*x as f64 - *w as f64);
                norm2 += dw * dw;
                *acc += fq * dw;
            }
            h_sum += q * loss.powf(q - 1.0) * norm2 + l * fq;
        }
        let new: Vec<f32> = global
            .values()
            .iter()
            .zip(&num)
            .map(|(x, d)| (*x as f64 - d / h_sum) as f32)
            .collect();
        global.with_values(new).map(Some)
    }
}

/// Per coordinate, the values of all updates, handed to `f`; builds the new model.
fn per_coordinate(
    global: &Params,
    updates: &[&ClientUpdate],
    mut f: impl FnMut(&mut [f32]) -> f32,
) -> Result<Params, Error> {
    let mut col = vec![0.0f32; updates.len()];
    let mut out = Vec::with_capacity(global.len());
    for j in 0..global.len() {
        for (c, u) in col.iter_mut().zip(updates) {
            *c = u.params.values().get(j).copied().unwrap_or(f32::NAN);
        }
        out.push(f(&mut col));
    }
    global.with_values(out)
}

fn median_of(v: &mut [f32]) -> f32 {
    v.sort_unstable_by(f32::total_cmp);
    let n = v.len();
    match (v.get(n / 2), n % 2) {
        (Some(&m), 1) => m,
        (Some(&hi), _) => {
            let lo = v.get(n / 2 - 1).copied().unwrap_or(hi);
            (lo + hi) / 2.0
        }
        (None, _) => f32::NAN,
    }
}

/// FedMedian (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
/// Statistical Rates", ICML 2018): the coordinate-wise median of the clients' models
/// (unweighted; the mean of the two middle values for an even count).
#[derive(Clone, Debug)]
pub struct FedMedian {
    /// Sampling and client configuration.
    pub base: FedAvg,
}

impl Strategy for FedMedian {
    fn name(&self) -> &str {
        "fedmedian"
    }
    fn needs_individual_updates(&self) -> bool {
        true
    }
    delegate_to!(base);

    fn aggregate_train(
        &mut self,
        _round: u64,
        global: &Params,
        results: TrainResults<'_>,
        _failures: &[Failure],
    ) -> Result<Option<Params>, Error> {
        let updates = individual(results, "fedmedian")?;
        if updates.is_empty() {
            return Ok(None);
        }
        same_len(global, updates)?;
        let refs: Vec<&ClientUpdate> = updates.iter().collect();
        per_coordinate(global, &refs, median_of).map(Some)
    }
}

/// FedTrimmedAvg (Yin et al. 2018, the coordinate-wise trimmed mean): per coordinate, drop the
/// `⌊β·n⌋` largest and smallest values and average the rest. Default β = 0.2 (Flower's).
#[derive(Clone, Debug)]
pub struct FedTrimmedAvg {
    /// Sampling and client configuration.
    pub base: FedAvg,
    /// Fraction trimmed from each end, in [0, 0.5).
    pub beta: f64,
}

impl Strategy for FedTrimmedAvg {
    fn name(&self) -> &str {
        "fedtrimmedavg"
    }
    fn needs_individual_updates(&self) -> bool {
        true
    }
    delegate_to!(base);

    fn aggregate_train(
        &mut self,
        _round: u64,
        global: &Params,
        results: TrainResults<'_>,
        _failures: &[Failure],
    ) -> Result<Option<Params>, Error> {
        let updates = individual(results, "fedtrimmedavg")?;
        if updates.is_empty() {
            return Ok(None);
        }
        if !(0.0..0.5).contains(&self.beta) {
            return Err(Error::Config(format!(
                "fedtrimmedavg beta must be in [0, 0.5), not {}",
                self.beta
            )));
        }
        same_len(global, updates)?;
        let n = updates.len();
        let cut = (self.beta * n as f64).floor() as usize;
        let refs: Vec<&ClientUpdate> = updates.iter().collect();
        per_coordinate(global, &refs, |v| {
            v.sort_unstable_by(f32::total_cmp);
            let kept = v.get(cut..n - cut).unwrap_or(&[]);
            kept.iter().map(|&x| x as f64).sum::<f64>() as f32 / kept.len().max(1) as f32
        })
        .map(Some)
    }
}

fn sq_dist(a: &Params, b: &Params) -> f64 {
    a.values()
        .iter()
        .zip(b.values())
        .map(|(x, y)| {
            let d = *x as f64 - *y as f64;
            d * d
        })
        .sum()
}

/// Krum scores: for each update, the sum of squared distances to its `n − f − 2` nearest
/// other updates.
fn krum_scores(updates: &[&ClientUpdate], f: usize) -> Vec<f64> {
    let n = updates.len();
    let mut d = vec![vec![0.0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            if let (Some(a), Some(b)) = (updates.get(i), updates.get(j)) {
                let x = sq_dist(&a.params, &b.params);
                if let Some(c) = d.get_mut(i).and_then(|row| row.get_mut(j)) {
                    *c = x;
                }
                if let Some(c) = d.get_mut(j).and_then(|row| row.get_mut(i)) {
                    *c = x;
                }
            }
        }
    }
    let closest = n.saturating_sub(f + 2).max(1);
    d.iter()
        .enumerate()
        .map(|(i, row)| {
            let mut others: Vec<f64> = row
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, x)| *x)
                .collect();
            others.sort_unstable_by(f64::total_cmp);
            others.iter().take(closest).sum()
        })
        .collect()
}

/// Indices of the `m` lowest Krum scores (ties broken by position).
fn krum_select(updates: &[&ClientUpdate], f: usize, m: usize) -> Vec<usize> {
    let scores = krum_scores(updates, f);
    let mut idx: Vec<usize> = (0..updates.len()).collect();
    idx.sort_by(|&a, &b| {
        scores
            .get(a)
            .unwrap_or(&f64::INFINITY)
            .total_cmp(scores.get(b).unwrap_or(&f64::INFINITY))
            .then(a.cmp(&b))
    });
    idx.truncate(m.max(1));
    idx
}

/// Krum and Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine
/// Tolerant Gradient Descent", NeurIPS 2017): score each update by the summed squared
/// distances to its `n − f − 2` nearest others; Krum takes the best one, Multi-Krum averages
/// the `m` best. Defaults: f = 0; Multi-Krum's m = n − f (the paper's choice) when `None`.
#[derive(Clone, Debug)]
pub struct Krum {
    /// Sampling and client configuration.
    pub base: FedAvg,
    /// Byzantine clients tolerated, f.
    pub num_malicious: usize,
    /// Updates averaged, m: `Some(1)` is Krum, `None` is n − f.
    pub num_to_keep: Option<usize>,
}

impl Strategy for Krum {
    fn name(&self) -> &str {
        if self.num_to_keep == Some(1) {
            "krum"
        } else {
            "multikrum"
        }
    }
    fn needs_individual_updates(&self) -> bool {
        true
    }
    delegate_to!(base);

    fn aggregate_train(
        &mut self,
        _round: u64,
        global: &Params,
        results: TrainResults<'_>,
        _failures: &[Failure],
    ) -> Result<Option<Params>, Error> {
        let updates = individual(results, "krum")?;
        if updates.is_empty() {
            return Ok(None);
        }
        same_len(global, updates)?;
        let refs: Vec<&ClientUpdate> = updates.iter().collect();
        let m = self
            .num_to_keep
            .unwrap_or(refs.len().saturating_sub(self.num_malicious));
        let chosen = krum_select(&refs, self.num_malicious, m);
        let picked: Vec<&ClientUpdate> = chosen
            .iter()
            .filter_map(|&i| refs.get(i).copied())
            .collect();
        per_coordinate(global, &picked, |v| {
            v.iter().map(|&x| x as f64).sum::<f64>() as f32 / v.len().max(1) as f32
        })
        .map(Some)
    }
}

/// Bulyan (El Mhamdi, Guerraoui and Rouault, "The Hidden Vulnerability of Distributed Learning
/// in Byzantium", ICML 2018): pick θ = n − 2f updates by repeated Krum, then per coordinate
/// average the β = θ − 2f values closest to the median of the picked ones. Needs
/// n ≥ 4f + 3. Default f = 0 (set it to the number of attackers to tolerate).
#[derive(Clone, Debug)]
pub struct Bulyan {
    /// Sampling and client configuration.
    pub base: FedAvg,
    /// Byzantine clients tolerated, f.
    pub num_malicious: usize,
}

impl Strategy for Bulyan {
    fn name(&self) -> &str {
        "bulyan"
    }
    fn needs_individual_updates(&self) -> bool {
        true
    }
    delegate_to!(base);

    fn aggregate_train(
        &mut self,
        _round: u64,
        global: &Params,
        results: TrainResults<'_>,
        _failures: &[Failure],
    ) -> Result<Option<Params>, Error> {
        let updates = individual(results, "bulyan")?;
        if updates.is_empty() {
            return Ok(None);
        }
        let n = updates.len();
        let f = self.num_malicious;
        if n < 4 * f + 3 {
            return Err(Error::Config(format!(
                "bulyan with f = {f} needs at least {} results, got {n}",
                4 * f + 3
            )));
        }
        same_len(global, updates)?;
        let mut rest: Vec<&ClientUpdate> = updates.iter().collect();
        let theta = n - 2 * f;
        let mut picked = Vec::with_capacity(theta);
        while picked.len() < theta && !rest.is_empty() {
            let best = krum_select(&rest, f, 1).first().copied().unwrap_or(0);
            picked.push(rest.remove(best.min(rest.len() - 1)));
        }
        let beta = theta - 2 * f;
        per_coordinate(global, &picked, |v| {
            let med = median_of(v);
            // Stable: among equally distant values the smaller (median_of sorted them) wins.
            v.sort_by(|a, b| (a - med).abs().total_cmp(&(b - med).abs()));
            let kept = v.get(..beta.min(v.len())).unwrap_or_default();
            kept.iter().map(|&x| x as f64).sum::<f64>() as f32 / kept.len().max(1) as f32
        })
        .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::Metrics;
    use crate::params::{Manifest, TensorSpec};

    fn p(v: &[f32]) -> Params {
        Params::new(
            Manifest::new(vec![TensorSpec::new("x", &[v.len()])]),
            v.to_vec(),
        )
        .unwrap()
    }

    fn upd(i: usize, n: u64, v: &[f32], loss: f64) -> ClientUpdate {
        let mut metrics = Metrics::new();
        metrics.insert("train_loss".into(), loss);
        ClientUpdate {
            client: ClientId::new(format!("c{i}")),
            num_examples: n,
            metrics,
            params: p(v),
        }
    }

    fn agg(s: &mut dyn Strategy, g: &[f32], ups: &[ClientUpdate]) -> Vec<f32> {
        s.aggregate_train(1, &p(g), TrainResults::Individual(ups), &[])
            .unwrap()
            .unwrap()
            .values()
            .to_vec()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn fedavgm_momentum_by_hand() {
        // global 1, mean of clients 0.5 → g = 0.5; v1 = 0.5, new = 1 − 0.5 = 0.5.
        let mut s = FedAvgM::new(FedAvg::default());
        let ups = [upd(0, 1, &[0.5], 1.0), upd(1, 1, &[0.5], 1.0)];
        close(&agg(&mut s, &[1.0], &ups), &[0.5]);
        // Round 2 from 0.5, mean 0.25 → g = 0.25; v2 = 0.9·0.5 + 0.25 = 0.7; new = 0.5 − 0.7.
        let ups = [upd(0, 1, &[0.25], 1.0), upd(1, 1, &[0.25], 1.0)];
        close(&agg(&mut s, &[0.5], &ups), &[-0.2]);
        // State survives a checkpoint.
        let mut t = FedAvgM::new(FedAvg::default());
        t.restore_state(&s.state()).unwrap();
        assert_eq!(t.velocity, s.velocity);
    }

    #[test]
    fn fedopt_by_hand() {
        // Δ = mean − global = 2 − 1 = 1 (weights 1 and 3: (1·1 + 3·(7/3))/4 = 2).
        let ups = [upd(0, 1, &[1.0], 1.0), upd(1, 3, &[7.0 / 3.0], 1.0)];
        // Adam: m = 0.1·1 = 0.1, v = 0.99·τ² + 0.01·1 ≈ 0.01, new = 1 + 0.1·0.1/(0.1 + 1e-9).
        let mut adam = FedOpt::new(FedAvg::default(), ServerOptimizer::Adam);
        close(&agg(&mut adam, &[1.0], &ups), &[1.1]);
        // Adagrad: m = Δ = 1, v = τ² + 1, new = 1 + 0.1·1/(1 + τ) = 1.1.
        let mut ada = FedOpt::new(FedAvg::default(), ServerOptimizer::Adagrad);
        close(&agg(&mut ada, &[1.0], &ups), &[1.1]);
        // Yogi: m = 0.1, v = τ² − 0.01·1·sign(τ² − 1) = 1e-6 + 0.01, new = 1 + 0.01·0.1/(√v + 1e-3).
        let mut yogi = FedOpt::new(FedAvg::default(), ServerOptimizer::Yogi);
        let v = 1e-6f32 + 0.01;
        close(
            &agg(&mut yogi, &[1.0], &ups),
            &[1.0 + 0.01 * 0.1 / (v.sqrt() + 1e-3)],
        );
        // A second Adam step: Δ = 2 − 1.1 = 0.9 (the same client models).
        let m = 0.9 * 0.1 + 0.1 * 0.9f32;
        let v = 0.99 * (0.99 * 1e-18 + 0.01) + 0.01 * 0.81f32;
        close(
            &agg(&mut adam, &[1.1], &ups),
            &[1.1 + 0.1 * m / (v.sqrt() + 1e-9)],
        );
        let mut back = FedOpt::new(FedAvg::default(), ServerOptimizer::Adam);
        back.restore_state(&adam.state()).unwrap();
        assert_eq!(back.moments.unwrap().m, adam.moments.unwrap().m);
    }

    #[test]
    fn qfedavg_by_hand() {
        // q = 1, lr = 1 (L = 1); global 0; clients at 1 (loss 1) and 2 (loss 4).
        // Δw = global − w = −1, −2; F^q = 1, 4 → ΣΔ = −1 − 8 = −9.
        // h = q·F^(q−1)·Δw² + L·F^q = 1 + 1 = 2 and 4 + 4 = 8 → Σh = 10. new = 0 + 9/10.
        let mut s = QFedAvg {
            base: FedAvg::default(),
            q: 1.0,
            learning_rate: 1.0,
        };
        let ups = [upd(0, 1, &[1.0], 1.0), upd(1, 1, &[2.0], 4.0)];
        close(&agg(&mut s, &[0.0], &ups), &[0.9]);
    }

    #[test]
    fn median_and_trimmed_mean_by_hand() {
        let ups: Vec<ClientUpdate> = [
            [1.0, 10.0],
            [2.0, 20.0],
            [3.0, 30.0],
            [100.0, -50.0],
            [4.0, 40.0],
        ]
        .iter()
        .enumerate()
        .map(|(i, v)| upd(i, 1, v, 1.0))
        .collect();
        close(
            &agg(
                &mut FedMedian {
                    base: FedAvg::default(),
                },
                &[0.0, 0.0],
                &ups,
            ),
            &[3.0, 20.0],
        );
        close(
            &agg(
                &mut FedMedian {
                    base: FedAvg::default(),
                },
                &[0.0, 0.0],
                &ups[..4],
            ),
            &[2.5, 15.0],
        );
        // β = 0.2 of 5 → drop 1 from each end: (2 + 3 + 4)/3 = 3, (10 + 20 + 30)/3 = 20.
        let mut t = FedTrimmedAvg {
            base: FedAvg::default(),
            beta: 0.2,
        };
        close(&agg(&mut t, &[0.0, 0.0], &ups), &[3.0, 20.0]);
        // Given only a sum, they refuse.
        let ws = WeightedSum::from_updates(&ups).unwrap();
        assert!(
            t.aggregate_train(1, &p(&[0.0, 0.0]), TrainResults::Sum(&ws), &[])
                .is_err()
        );
        assert!(t.needs_individual_updates());
    }

    #[test]
    fn krum_multikrum_and_bulyan_by_hand() {
        // Four honest updates near 0 and one far away.
        let vals = [[0.0f32], [0.1], [-0.1], [0.2], [10.0]];
        let ups: Vec<ClientUpdate> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| upd(i, 1, v, 1.0))
            .collect();
        // f = 1: each scores its n − f − 2 = 2 nearest. 0.0: 0.01 + 0.01 = 0.02; 0.1: 0.01 + 0.01
        // = 0.02 (to 0.0 and 0.2); −0.1: 0.01 + 0.04 = 0.05; 0.2: 0.01 + 0.04 = 0.05; 10: large.
        // Krum picks the first lowest (0.0).
        let mut k = Krum {
            base: FedAvg::default(),
            num_malicious: 1,
            num_to_keep: Some(1),
        };
        close(&agg(&mut k, &[0.0], &ups), &[0.0]);
        assert_eq!(k.name(), "krum");
        // Multi-Krum m = 3: 0.0, 0.1 and −0.1 (tie with 0.2 broken by position) → 0.0.
        let mut mk = Krum {
            base: FedAvg::default(),
            num_malicious: 1,
            num_to_keep: Some(3),
        };
        close(&agg(&mut mk, &[0.0], &ups), &[0.0]);
        mk.num_to_keep = None; // n − f = 4
        close(&agg(&mut mk, &[0.0], &ups), &[0.05]);
        assert_eq!(mk.name(), "multikrum");
        // Bulyan f = 1 needs 7 updates: add two more honest ones.
        let vals = [[0.0f32], [0.1], [-0.1], [0.2], [10.0], [0.05], [-0.05]];
        let ups: Vec<ClientUpdate> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| upd(i, 1, v, 1.0))
            .collect();
        let mut b = Bulyan {
            base: FedAvg::default(),
            num_malicious: 1,
        };
        // θ = 5 picked by repeated Krum (scores over the n − f − 2 nearest, ties by
        // position): 0.0, 0.1, −0.05, −0.1, 0.2 — never 10 and not 0.05. Their median is 0;
        // the β = 3 values closest to it are 0, −0.05 and −0.1 (−0.1 before 0.1 on the tie).
        close(&agg(&mut b, &[0.0], &ups), &[-0.05]);
        assert!(
            b.aggregate_train(1, &p(&[0.0]), TrainResults::Individual(&ups[..6]), &[])
                .is_err()
        );
    }
}
