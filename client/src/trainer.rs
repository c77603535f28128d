//! Local training and evaluation with Burn.
//!
//! [`Trainer`] is the client's seam: the driver hands it the global model and the round's
//! configuration and gets back a [`LocalUpdate`]. [`BurnTrainer`] implements it for any
//! [`Classifier`] on any Burn device (flex, ndarray or CUDA, chosen at run time): E epochs of
//! mini-batch SGD (with optional momentum) or Adam, shuffled by the round's seed, with the
//! FedProx proximal term when `proximal_mu > 0`. The loop is the plain Burn loop
//! (`forward → backward → GradientsParams::from_grads → optim.step`): the model is loaded once
//! per round and read back once at the end, never copied per batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::models::Precision;
use burn::module::Module;
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{AdamConfig, GradientsParams, SgdConfig, momentum::MomentumConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use flotilla_protocol::wire::messages::{BatchSize, Metrics, Optimizer, TrainConfig};
use flotilla_protocol::{Manifest, Params};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::Error;
use crate::convert::{check_manifest, load_params, manifest_of, to_params};
use crate::data::Dataset;
use crate::models::Classifier;

/// The result of local training.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalUpdate {
    /// Examples trained on (the aggregation weight).
    pub num_examples: u64,
    /// Training metrics (`train_loss`).
    pub metrics: Metrics,
    /// The trained model.
    pub params: Params,
}

/// The result of local evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// Examples evaluated.
    pub num_examples: u64,
    /// Mean cross-entropy loss.
    pub loss: f64,
    /// Fraction classified correctly.
    pub accuracy: f64,
}

/// What a client does with a model. Implement it to federate any training code.
pub trait Trainer: Send {
    /// The model's initial parameters (offered when the server has none).
    fn initial_params(&mut self) -> Result<Params, Error>;
    /// Trains from `global` as `config` says.
    fn train(&mut self, global: &Params, config: &TrainConfig) -> Result<LocalUpdate, Error>;
    /// Evaluates `global` on local held-out data.
    fn evaluate(&mut self, global: &Params) -> Result<Evaluation, Error>;
    /// A flag that, once set, makes a `train` or `evaluate` in progress return
    /// [`Error::Cancelled`] soon (between batches); `None` if this trainer cannot be
    /// interrupted. The driver sets it when the client is asked to stop.
    fn stop_flag(&self) -> Option<Arc<AtomicBool>> {
        None
    }
}

/// A data set and the examples of it that belong to this client.
#[derive(Clone, Debug)]
pub struct LocalData {
    /// The (shared) data set.
    pub data: Dataset,
    /// Indices of this client's examples.
    pub indices: Vec<usize>,
}

impl LocalData {
    /// All of `data`.
    pub fn all(data: Dataset) -> Self {
        let indices = (0..data.len()).collect();
        Self { data, indices }
    }

    /// A subset; errors if an index is out of range.
    pub fn subset(data: Dataset, indices: Vec<usize>) -> Result<Self, Error> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= data.len()) {
            return Err(Error::Data(format!(
                "index {bad} outside a data set of {}",
                data.len()
            )));
        }
        Ok(Self { data, indices })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// Builds one batch of inputs `[n, features]` and labels `[n]` on `device`.
pub fn make_batch(data: &Dataset, idx: &[usize], device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let f = data.features();
    let mut x = Vec::with_capacity(idx.len() * f);
    let mut y = Vec::with_capacity(idx.len());
    for &i in idx {
        y.push(data.push_example(i, &mut x) as i64);
    }
    (
        Tensor::<2>::from_data(TensorData::new(x, [idx.len(), f]), device),
        Tensor::<1, Int>::from_data(TensorData::new(y, [idx.len()]), device),
    )
}

/// `Σ ||w − w_global||²` over all parameters (the FedProx proximal term without mu/2); the
/// anchor is flat in the federation's layout, as [`crate::convert::flat_tensors`] gives the
/// model's parameters.
fn proximal<M: Module>(model: &M, global: &[Tensor<1>]) -> Option<Tensor<1>> {
    crate::convert::flat_tensors(model)
        .into_iter()
        .zip(global)
        .map(|(w, g)| (w - g.clone()).powf_scalar(2.0).sum())
        .reduce(|a, b| a + b)
}

/// Trains and evaluates a Burn [`Classifier`]. See the module docs.
pub struct BurnTrainer<M: Classifier> {
    device: Device,
    model: Option<M>,
    manifest: Arc<Manifest>,
    train: LocalData,
    test: Option<LocalData>,
    loss: CrossEntropyLoss,
    /// Batch size used for evaluation.
    pub eval_batch: usize,
    /// Arithmetic precision of training steps (see [`Precision`]).
    precision: Precision,
    /// Set to stop a training or evaluation in progress (see [`Trainer::stop_flag`]).
    stop: Arc<AtomicBool>,
}

impl<M: Classifier> std::fmt::Debug for BurnTrainer<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BurnTrainer")
            .field("device", &self.device)
            .field("train", &self.train.len())
            .field("test", &self.test.as_ref().map(LocalData::len))
            .finish()
    }
}

impl<M: Classifier> BurnTrainer<M> {
    /// A trainer for `model` (already created on `device`; autodiff is enabled here if it is
    /// not yet) with local training data and optional test data.
    pub fn new(model: M, train: LocalData, test: Option<LocalData>) -> Result<Self, Error> {
        let device = model
            .devices()
            .first()
            .cloned()
            .ok_or_else(|| Error::Model("model has no parameters".into()))?
            .autodiff();
        let model = model.to_device(&device).train();
        let manifest = Arc::new(manifest_of(&model));
        manifest.validate()?;
        Ok(Self {
            loss: CrossEntropyLossConfig::new().init(&device),
            device,
            model: Some(model),
            manifest,
            train,
            test,
            eval_batch: 1000,
            precision: Precision::F32,
            stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Trains in `precision` (f32 master weights either way). Refused where the device or
    /// the model cannot do it; the caller decides whether to fall back to f32.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self, Error> {
        if let Some(dtype) = precision.dtype() {
            if !self.device.supports_dtype(dtype) {
                return Err(Error::Config(format!(
                    "this device ({:?}) cannot compute in {precision}",
                    self.device
                )));
            }
            if !self.model.as_ref().is_some_and(M::supports_mixed_precision) {
                return Err(Error::Config(format!(
                    "this model does not implement {precision} training (Classifier::forward_mixed)"
                )));
            }
        }
        self.precision = precision;
        Ok(self)
    }

    /// The training precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The model's manifest.
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }

    /// The training device (with autodiff).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of local training examples.
    pub fn num_train_examples(&self) -> usize {
        self.train.len()
    }

    /// Replaces the training data and returns the previous one. Simulations share one
    /// trainer (one model in memory) among many virtual clients this way.
    pub fn set_train_data(&mut self, train: LocalData) -> LocalData {
        std::mem::replace(&mut self.train, train)
    }

    fn take_model(&mut self) -> Result<M, Error> {
        self.model
            .take()
            .ok_or_else(|| Error::Model("the model was lost in an earlier failure".into()))
    }

    /// Loads `params` into the model, checking the manifest *before* taking the model, so
    /// that a mismatched vector is an error and leaves the trainer usable.
    fn load(&mut self, params: &Params) -> Result<M, Error> {
        check_manifest(&self.manifest, params)?;
        load_params(self.take_model()?, &self.manifest, params)
    }

    /// Evaluates `global` on `data` (used for the local test split and for central checks).
    pub fn evaluate_on(&mut self, global: &Params, data: &LocalData) -> Result<Evaluation, Error> {
        let model = self.load(global)?;
        let valid = model.valid();
        self.model = Some(model);
        let device = self.device.clone().without_autodiff();
        let (mut loss_sum, mut correct, mut n) = (0.0f64, 0i64, 0usize);
        for idx in data.indices.chunks(self.eval_batch.max(1)) {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let (x, y) = make_batch(&data.data, idx, &device);
            let logits = valid.forward(x);
            let loss = self.loss.forward(logits.clone(), y.clone());
            loss_sum += loss.into_scalar::<f32>() as f64 * idx.len() as f64;
            let pred = logits.argmax(1).reshape([idx.len()]);
            correct += pred.equal(y).int().sum().into_scalar::<i64>();
            n += idx.len();
        }
        if n == 0 {
            return Err(Error::Data("no evaluation examples".into()));
        }
        Ok(Evaluation {
            num_examples: n as u64,
            loss: loss_sum / n as f64,
            accuracy: correct as f64 / n as f64,
        })
    }
}

impl<M: Classifier> Trainer for BurnTrainer<M> {
    fn stop_flag(&self) -> Option<Arc<AtomicBool>> {
        Some(self.stop.clone())
    }

    fn initial_params(&mut self) -> Result<Params, Error> {
        let model = self.take_model()?;
        let p = to_params(&model, &self.manifest);
        self.model = Some(model);
        p
    }

    fn train(&mut self, global: &Params, config: &TrainConfig) -> Result<LocalUpdate, Error> {
        if self.train.is_empty() {
            return Err(Error::Data("no local training examples".into()));
        }
        if !(config.learning_rate.is_finite() && config.learning_rate > 0.0) {
            return Err(Error::Config(format!(
                "learning rate {} must be positive",
                config.learning_rate
            )));
        }
        let mut model = self.load(global)?;
        let mu = config.proximal_mu;
        let anchor: Vec<Tensor<1>> = if mu > 0.0 {
            global
                .tensors()
                .map(|(_, v)| {
                    Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &self.device)
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut optim = match config.optimizer {
            Optimizer::Sgd { momentum } => SgdConfig::new()
                .with_momentum((momentum > 0.0).then(|| {
                    MomentumConfig::new()
                        .with_momentum(momentum)
                        .with_dampening(0.0)
                }))
                .init(),
            Optimizer::Adam {
                beta1,
                beta2,
                epsilon,
            } => AdamConfig::new()
                .with_beta_1(beta1 as f32)
                .with_beta_2(beta2 as f32)
                .with_epsilon(epsilon as f32)
                .init(),
        };
        let batch = match config.batch_size {
            BatchSize::Fixed(b) => (b as usize).max(1),
            BatchSize::Full => self.train.len(),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut order = self.train.indices.clone();
        let mut loss_sum: Option<Tensor<1>> = None;
        let mut seen = 0usize;
        for _epoch in 0..config.epochs.max(1) {
            order.shuffle(&mut rng);
            for idx in order.chunks(batch) {
                if self.stop.load(Ordering::Relaxed) {
                    self.model = Some(model);
                    return Err(Error::Cancelled);
                }
                let (x, y) = make_batch(&self.train.data, idx, &self.device);
                let logits = match self.precision.dtype() {
                    None => model.forward(x),
                    Some(dtype) => model.forward_mixed(x, dtype),
                };
                let mut loss = self.loss.forward(logits, y);
                let report = loss.clone().detach() * idx.len() as f32;
                loss_sum = Some(match loss_sum {
                    Some(s) => s + report,
                    None => report,
                });
                seen += idx.len();
                if mu > 0.0
                    && let Some(p) = proximal(&model, &anchor)
                {
                    loss = loss + p * (mu / 2.0) as f32;
                }
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(config.learning_rate, model, grads);
            }
        }
        let train_loss =
            loss_sum.map_or(0.0, |s| s.into_scalar::<f32>() as f64) / seen.max(1) as f64;
        let params = to_params(&model, &self.manifest);
        self.model = Some(model);
        let params = params?;
        if !train_loss.is_finite() {
            return Err(Error::Training(format!(
                "training diverged (loss {train_loss}); lower the learning rate"
            )));
        }
        params
            .check_finite()
            .map_err(|e| Error::Training(format!("training produced {e}")))?;
        let mut metrics = Metrics::new();
        metrics.insert("train_loss".into(), train_loss);
        Ok(LocalUpdate {
            num_examples: self.train.len() as u64,
            metrics,
            params,
        })
    }

    fn evaluate(&mut self, global: &Params) -> Result<Evaluation, Error> {
        let data = self
            .test
            .clone()
            .ok_or_else(|| Error::Data("this client has no evaluation data".into()))?;
        self.evaluate_on(global, &data)
    }
}
