//! A bounded pool of training workers shared by many simulated clients.
//!
//! Each worker owns one Burn model; a client holds only the indices of its examples and, while
//! training, borrows a worker. A job's result depends only on its inputs (the global model, the
//! client's examples and the round's configuration, whose seed orders the batches), never on
//! which worker ran it or when, so a seeded simulation gives the same results with any number
//! of workers.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use flotilla_client::{BurnTrainer, Classifier, Evaluation, LocalData, LocalUpdate, Trainer};
use flotilla_protocol::Params;
use flotilla_protocol::wire::messages::TrainConfig;

/// What a job returns.
pub type JobResult = Result<LocalUpdate, flotilla_client::Error>;

struct Job {
    data: LocalData,
    model: Params,
    config: TrainConfig,
    reply: mpsc::Sender<JobResult>,
}

/// A pool of `workers` threads, each with its own model, training jobs in submission order.
pub struct TrainerPool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    handles: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for TrainerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainerPool")
            .field("workers", &self.handles.len())
            .finish()
    }
}

/// The default number of workers: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl TrainerPool {
    /// Starts `workers` threads (at least one), each owning a trainer made by `make`.
    pub fn new<M: Classifier + Send>(
        workers: usize,
        mut make: impl FnMut() -> anyhow::Result<BurnTrainer<M>>,
    ) -> anyhow::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let mut trainer = make()?;
            let rx = rx.clone();
            let h = std::thread::Builder::new()
                .name(format!("trainer-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok(job) = next else { break };
                        let previous = trainer.set_train_data(job.data);
                        let r = trainer.train(&job.model, &job.config);
                        trainer.set_train_data(previous);
                        // The submitter may have given up on the result (client killed).
                        let _ = job.reply.send(r);
                    }
                })?;
            handles.push(h);
        }
        Ok(Arc::new(Self {
            tx: Mutex::new(Some(tx)),
            handles,
        }))
    }

    /// Workers in the pool.
    pub fn workers(&self) -> usize {
        self.handles.len()
    }

    /// Queues a job; the receiver yields its result.
    pub fn submit(
        &self,
        data: LocalData,
        model: Params,
        config: TrainConfig,
    ) -> mpsc::Receiver<JobResult> {
        let (reply, rx) = mpsc::channel();
        let job = Job {
            data,
            model,
            config,
            reply,
        };
        // If the pool has shut down, the job (and its reply sender) is dropped here and
        // `wait` reports the closed channel as an error.
        if let Some(tx) = self
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            let _ = tx.send(job);
        }
        rx
    }

    /// Waits for a submitted job.
    pub fn wait(rx: &mpsc::Receiver<JobResult>) -> JobResult {
        rx.recv().unwrap_or_else(|_| {
            Err(flotilla_client::Error::Model(
                "the training pool stopped before the job ran".into(),
            ))
        })
    }
}

impl Drop for TrainerPool {
    fn drop(&mut self) {
        // Closing the channel ends every worker once the queue is drained.
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A client's [`Trainer`] that trains on the shared pool: it holds its examples' indices and
/// no model.
#[derive(Debug)]
pub struct PooledTrainer {
    /// The pool.
    pub pool: Arc<TrainerPool>,
    /// The client's examples.
    pub data: LocalData,
    /// Offered if the server has no model (the simulation always gives it one).
    pub initial: Params,
    /// Extra wall-clock delay after each training job (a straggler).
    pub delay: std::time::Duration,
    /// Probability of failing a round's training (the client drops out of the round), and
    /// the seeded generator deciding it.
    pub dropout: Option<(f64, rand_chacha::ChaCha8Rng)>,
}

impl Trainer for PooledTrainer {
    fn initial_params(&mut self) -> Result<Params, flotilla_client::Error> {
        Ok(self.initial.clone())
    }

    fn train(&mut self, global: &Params, config: &TrainConfig) -> JobResult {
        use rand::Rng;
        if let Some((p, rng)) = &mut self.dropout
            && rng.random_bool(p.clamp(0.0, 1.0))
        {
            return Err(flotilla_client::Error::Data(
                "simulated dropout (faults.dropout)".into(),
            ));
        }
        let rx = self
            .pool
            .submit(self.data.clone(), global.clone(), config.clone());
        let r = TrainerPool::wait(&rx);
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        r
    }

    fn evaluate(&mut self, _global: &Params) -> Result<Evaluation, flotilla_client::Error> {
        // The simulation evaluates the global model centrally on the test set.
        Err(flotilla_client::Error::Data(
            "simulated clients hold no evaluation data".into(),
        ))
    }
}
