//! Running the real round machines in memory: the deterministic [`Harness`] of
//! `flotilla-protocol` (every message encoded and decoded, simulated clock) with clients that
//! train for real through a [`Trainer`] — Burn included.

use std::time::Duration;

use flotilla_client::Trainer;
use flotilla_protocol::Params;
use flotilla_protocol::harness::ClientBehaviour;
use flotilla_protocol::wire::messages::{EvaluateRes, Metrics, TrainConfig, TrainRes};

/// What a malicious client does to its honest update before sending it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Attack {
    /// Sends `global − scale · (local − global)`: the update reversed and amplified.
    SignFlip {
        /// Amplification.
        scale: f32,
    },
}

impl Attack {
    /// Applies the attack to an honest local model.
    pub fn apply(&self, global: &Params, local: &Params) -> Params {
        match *self {
            Attack::SignFlip { scale } => {
                let v: Vec<f32> = global
                    .values()
                    .iter()
                    .zip(local.values())
                    .map(|(g, l)| g - scale * (l - g))
                    .collect();
                global.with_values(v).unwrap_or_else(|_| global.clone())
            }
        }
    }
}

/// A harness client backed by a [`Trainer`], optionally malicious.
pub struct TrainerClient<T: Trainer> {
    /// The trainer.
    pub trainer: T,
    /// `Some`: this client attacks.
    pub attack: Option<Attack>,
    /// Simulated time one training or evaluation job takes.
    pub compute: Duration,
    /// Offered as initial parameters if the trainer cannot produce them.
    pub fallback: Params,
}

impl<T: Trainer> std::fmt::Debug for TrainerClient<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainerClient")
            .field("attack", &self.attack)
            .finish_non_exhaustive()
    }
}

impl<T: Trainer> TrainerClient<T> {
    /// An honest client; `initial` is the federation's starting model.
    pub fn new(trainer: T, initial: Params) -> Self {
        Self {
            trainer,
            attack: None,
            compute: Duration::from_millis(100),
            fallback: initial,
        }
    }
}

impl<T: Trainer> ClientBehaviour for TrainerClient<T> {
    fn initial_params(&mut self) -> Params {
        // Asked only when the server has no initial model; then a failure falls back to the
        // model the client was built with.
        self.trainer
            .initial_params()
            .unwrap_or_else(|_| self.fallback.clone())
    }

    fn train(&mut self, round: u64, config: &TrainConfig, model: &Params) -> TrainRes {
        match self.trainer.train(model, config) {
            Ok(u) => TrainRes {
                round,
                num_examples: u.num_examples,
                metrics: u.metrics,
                params: match &self.attack {
                    Some(a) => a.apply(model, &u.params),
                    None => u.params,
                },
            },
            // Zero examples: the coordinator refuses it and drops this client.
            Err(_) => TrainRes {
                round,
                num_examples: 0,
                metrics: Metrics::new(),
                params: model.clone(),
            },
        }
    }

    fn evaluate(&mut self, round: u64, model: &Params) -> EvaluateRes {
        match self.trainer.evaluate(model) {
            Ok(e) => {
                let mut metrics = Metrics::new();
                metrics.insert("accuracy".into(), e.accuracy);
                EvaluateRes {
                    round,
                    num_examples: e.num_examples,
                    loss: e.loss,
                    metrics,
                }
            }
            Err(_) => EvaluateRes {
                round,
                num_examples: 0,
                loss: f64::NAN,
                metrics: Metrics::new(),
            },
        }
    }

    fn compute_time(&self) -> Duration {
        self.compute
    }
}
