//! q-FedAvg (Li et al., "Fair Resource Allocation in Federated Learning", ICLR 2020).

use rand::RngCore;

use super::{
    ClientInfo, EvalSummary, Failure, FedAvg, Strategy, TrainResults, individual, same_len,
};
use crate::Error;
use crate::wire::messages::{ClientId, EvaluateRes, TrainConfig};
use crate::wire::params::Params;

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
                    Error::InvalidMessage(crate::InvalidMessage::BadMetric(format!(
                        "qfedavg needs a positive train_loss metric from {}",
                        u.client
                    )))
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
