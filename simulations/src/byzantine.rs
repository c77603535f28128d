//! The Byzantine experiment: 20 clients on the bundled MNIST subset (IID), 20% of them sending
//! their update sign-flipped and scaled ×10; FedAvg against the robust strategies. Runs the
//! real round machines in memory ([`crate::inmemory`]) with real Burn training (the 2NN), and
//! evaluates each final model on the bundled 2,000 test images.
//!
//! ```text
//! cargo run --release -p flotilla-sim -- byzantine
//! ```

use std::time::Duration;

use anyhow::Context;
use flotilla_client::data::{Split, bundled};
use flotilla_client::partition::Partition;
use flotilla_client::{
    BackendKind, BurnTrainer, LocalData, Mlp2nn, Trainer, seeded, select_device,
};
use flotilla_protocol::harness::Harness;
use flotilla_protocol::{ClientId, Coordinator, CoordinatorConfig};
use flotilla_server::ServerConfig;

use crate::inmemory::{Attack, TrainerClient};

/// Settings of the experiment.
#[derive(Clone, Debug)]
pub struct Options {
    /// Clients (all sampled every round).
    pub clients: usize,
    /// How many of them attack.
    pub malicious: usize,
    /// Rounds.
    pub rounds: u64,
    /// Local epochs.
    pub epochs: u32,
    /// Local batch size.
    pub batch_size: u32,
    /// Learning rate.
    pub learning_rate: f64,
    /// Attack amplification.
    pub scale: f32,
    /// Seed of the split, the initialization and the sampling.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            clients: 20,
            malicious: 4,
            rounds: 10,
            epochs: 1,
            batch_size: 10,
            learning_rate: 0.1,
            scale: 10.0,
            seed: 0,
        }
    }
}

/// One line of the result table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Strategy name as in the server config.
    pub strategy: String,
    /// Attackers present.
    pub attacked: bool,
    /// Test accuracy of the final model.
    pub accuracy: f64,
}

/// The server-config strategy section for `name`, tuned to the experiment's attackers.
fn strategy_config(opts: &Options, name: &str) -> ServerConfig {
    let mut c = ServerConfig::default();
    c.strategy.name = name.into();
    c.strategy.fraction_train = 1.0;
    c.strategy.min_train_clients = opts.clients;
    c.strategy.fraction_evaluate = 0.0;
    c.strategy.min_evaluate_clients = 0;
    c.strategy.num_malicious = opts.malicious;
    c.train.epochs = opts.epochs;
    c.train.batch_size = opts.batch_size;
    c.train.learning_rate = opts.learning_rate;
    c.train.seed = opts.seed;
    c
}

/// Runs one federation and returns the final model's test accuracy.
pub fn run_one(opts: &Options, strategy: &str, attacked: bool) -> anyhow::Result<f64> {
    let train = bundled::mnist(Split::Train)?;
    let test = bundled::mnist(Split::Test)?;
    let parts = Partition::Iid.split(&train.labels, 10, opts.clients, opts.seed)?;
    let (device, _) = select_device(BackendKind::Cpu);
    let features = train.features();
    let mut evaluator = BurnTrainer::new(
        seeded(&device, opts.seed, |d| Mlp2nn::new(features, 10, d)),
        LocalData::all(train.head(1)),
        Some(LocalData::all(test)),
    )?;
    let initial = evaluator.initial_params()?;
    let server = strategy_config(opts, strategy);
    let coordinator = Coordinator::new(
        CoordinatorConfig {
            num_rounds: opts.rounds,
            min_available_clients: opts.clients,
            min_train_results: opts.clients,
            round_timeout: Duration::from_secs(600),
            idle_timeout: None,
            evaluate_every: 0,
            seed: opts.seed,
            ..CoordinatorConfig::default()
        },
        server.strategy()?,
        Some(initial.clone()),
    )?;
    let mut h = Harness::new(coordinator, opts.seed);
    for (i, idx) in parts.into_iter().enumerate() {
        let trainer = BurnTrainer::new(
            seeded(&device, opts.seed, |d| Mlp2nn::new(features, 10, d)),
            LocalData::subset(train.clone(), idx)?,
            None,
        )?;
        let mut client = TrainerClient::new(trainer, initial.clone());
        if attacked && i < opts.malicious {
            client.attack = Some(Attack::SignFlip { scale: opts.scale });
        }
        h.add_client(ClientId::new(format!("client-{i:03}")), Box::new(client));
    }
    anyhow::ensure!(
        h.run_to_completion(Duration::from_secs(24 * 3600)),
        "{strategy}: the federation did not finish"
    );
    if let Some(r) = h.aborted_rounds().first() {
        anyhow::bail!("{strategy}: round {} aborted: {:?}", r.round, r.aborted);
    }
    let global = h.coordinator.global().context("no model")?.clone();
    Ok(evaluator.evaluate(&global)?.accuracy)
}

/// The strategies compared under attack.
pub const ROBUST: [&str; 5] = ["fedmedian", "fedtrimmedavg", "multikrum", "krum", "bulyan"];

/// Runs the whole table: FedAvg without and with attackers, then every robust strategy with.
pub fn run(opts: &Options) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (strategy, attacked) in [("fedavg", false), ("fedavg", true)]
        .into_iter()
        .chain(ROBUST.iter().map(|s| (*s, true)))
    {
        let accuracy = run_one(opts, strategy, attacked)?;
        rows.push(Row {
            strategy: strategy.into(),
            attacked,
            accuracy,
        });
    }
    Ok(rows)
}

/// The table as Markdown.
pub fn table(opts: &Options, rows: &[Row]) -> String {
    let mut s = format!(
        "| strategy | attackers | test accuracy after {} rounds |\n|---|---|---|\n",
        opts.rounds
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.4} |\n",
            r.strategy,
            if r.attacked {
                format!("{} of {}", opts.malicious, opts.clients)
            } else {
                "none".into()
            },
            r.accuracy
        ));
    }
    s
}
