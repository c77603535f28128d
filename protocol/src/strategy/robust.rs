//! Byzantine-robust aggregation: coordinate-wise median and trimmed mean (Yin et al., ICML
//! 2018), Krum and Multi-Krum (Blanchard et al., NeurIPS 2017), Bulyan (El Mhamdi et al.,
//! ICML 2018). Each needs every client's update, so none runs under secure aggregation.

use rand::RngCore;

use super::{
    ClientInfo, ClientUpdate, EvalSummary, Failure, FedAvg, Strategy, TrainResults, individual,
    same_len,
};
use crate::Error;
use crate::wire::messages::{ClientId, EvaluateRes, TrainConfig};
use crate::wire::params::Params;

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
