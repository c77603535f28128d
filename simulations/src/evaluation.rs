//! Central evaluation of the global model, sharded over devices: with several GPUs, each
//! tests its contiguous share of the test set at the same time, and the figures are combined
//! weighted by examples (the result is that of one device over the whole set, up to float
//! rounding in the loss).

use flotilla_client::{BurnTrainer, Classifier, Evaluation, LocalData};
use flotilla_protocol::Params;

/// One evaluator per device, each with its shard of the test set.
pub struct ShardedEvaluator<M: Classifier> {
    shards: Vec<(BurnTrainer<M>, LocalData)>,
}

impl<M: Classifier> std::fmt::Debug for ShardedEvaluator<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedEvaluator")
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl<M: Classifier + Send> ShardedEvaluator<M> {
    /// Splits `test` into as many contiguous shards as there are `evaluators` (one per device;
    /// at least one), dropping evaluators that would get no example.
    pub fn new(evaluators: Vec<BurnTrainer<M>>, test: &LocalData) -> anyhow::Result<Self> {
        let k = evaluators.len().min(test.indices.len()).max(1);
        let per = test.indices.len().div_ceil(k);
        let mut shards = Vec::with_capacity(k);
        for (evaluator, idx) in evaluators.into_iter().zip(test.indices.chunks(per.max(1))) {
            shards.push((
                evaluator,
                LocalData::subset(test.data.clone(), idx.to_vec())?,
            ));
        }
        anyhow::ensure!(!shards.is_empty(), "no evaluator or no test example");
        Ok(Self { shards })
    }

    /// Devices (shards) in use.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Tests `global` on every shard at once and combines the figures.
    pub fn evaluate(&mut self, global: &Params) -> anyhow::Result<Evaluation> {
        let results: Vec<anyhow::Result<Evaluation>> = if self.shards.len() == 1 {
            self.shards
                .iter_mut()
                .map(|(e, d)| Ok(e.evaluate_on(global, d)?))
                .collect()
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .shards
                    .iter_mut()
                    .map(|(e, d)| s.spawn(move || e.evaluate_on(global, d)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| match h.join() {
                        Ok(r) => Ok(r?),
                        Err(_) => Err(anyhow::anyhow!("an evaluation shard panicked")),
                    })
                    .collect()
            })
        };
        let (mut n, mut loss, mut correct) = (0u64, 0.0f64, 0.0f64);
        for r in results {
            let e = r?;
            n += e.num_examples;
            loss += e.loss * e.num_examples as f64;
            // accuracy = correct / n exactly, so this recovers the count.
            correct += (e.accuracy * e.num_examples as f64).round();
        }
        anyhow::ensure!(n > 0, "no evaluation examples");
        Ok(Evaluation {
            num_examples: n,
            loss: loss / n as f64,
            accuracy: correct / n as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use flotilla_client::data::{Split, bundled};
    use flotilla_client::{BackendKind, Mlp2nn, Trainer, seeded, select_device};

    /// Three shards (three evaluators on the CPU, standing in for three GPUs) give the figures
    /// of one evaluator over the whole set: the same correct count, the loss within rounding.
    #[test]
    fn sharded_evaluation_equals_one_device_over_the_whole_set() {
        let (cpu, _) = select_device(BackendKind::Cpu);
        let test = LocalData::all(bundled::mnist(Split::Test).unwrap().head(1001));
        let make = || {
            BurnTrainer::new(
                seeded(&cpu, 7, |d| Mlp2nn::new(784, 10, d)),
                LocalData::all(bundled::mnist(Split::Train).unwrap().head(1)),
                None,
            )
            .unwrap()
        };
        let mut one = make();
        let global = one.initial_params().unwrap();
        let whole = one.evaluate_on(&global, &test).unwrap();
        let mut sharded = ShardedEvaluator::new(vec![make(), make(), make()], &test).unwrap();
        assert_eq!(sharded.shards(), 3);
        let split = sharded.evaluate(&global).unwrap();
        assert_eq!(split.num_examples, 1001);
        assert_eq!(split.accuracy, whole.accuracy);
        assert!((split.loss - whole.loss).abs() < 1e-5 * whole.loss.abs().max(1.0));
        // More devices than examples: one example each, the rest unused.
        let tiny = LocalData::all(bundled::mnist(Split::Test).unwrap().head(2));
        let s = ShardedEvaluator::new(vec![make(), make(), make()], &tiny).unwrap();
        assert_eq!(s.shards(), 2);
    }
}
