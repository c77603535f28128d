//! # flotilla-client
//!
//! The edge client: everything that knows about Burn lives here.
//!
//! * [`data`]: IDX loading (MNIST, Fashion-MNIST; raw or gzip, validated) and the small MNIST
//!   subset bundled for the offline quick start.
//! * [`partition`]: IID, sort-and-shard and Dirichlet splits, deterministic by seed.
//! * [`models`]: McMahan et al.'s 2NN and CNN, and the [`Classifier`] trait your own model
//!   implements.
//! * [`convert`]: Burn module ⇄ flat [`flotilla_protocol::Params`], bit-exact, with the manifest
//!   checked so a mismatched vector is a typed error.
//! * [`trainer`]: the [`Trainer`] seam and [`BurnTrainer`] (SGD/momentum/Adam, FedProx).
//! * [`backend`]: the device, chosen at run time (`cpu` = burn's `flex`, `ndarray`, `cuda`).
//!
//! Burn 0.22 has no backend type parameter: models hold tensors on a runtime `Device`, so all
//! of this code is backend-agnostic and only [`backend::select_device`] names a backend.

#![deny(missing_docs)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod address;
pub mod backend;
pub mod convert;
pub mod data;
pub mod driver;
pub mod models;
pub mod partition;
pub mod trainer;

pub use backend::{BackendKind, cuda_devices, select_device, select_device_at};
/// The run-time compute device (burn 0.22 selects the backend through it).
pub use burn::module::Module;
pub use burn::tensor::Device;
pub use models::{Classifier, Cnn, Mlp2nn, ModelKind, Precision, seeded};
pub use trainer::{BurnTrainer, Evaluation, LocalData, LocalUpdate, Trainer};

use std::path::PathBuf;

/// Everything that can go wrong in the client crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An IDX file that is truncated or corrupt.
    #[error("bad IDX file {path}: {reason}")]
    Idx {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Unusable data (sizes, labels, partitions).
    #[error("data error: {0}")]
    Data(String),
    /// Parameters that do not fit the model, or a model that cannot be used.
    #[error("model error: {0}")]
    Model(String),
    /// Training failed (diverged, ...).
    #[error("training failed: {0}")]
    Training(String),
    /// A bad setting.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The server refused us: our certificate (rejected by its TLS), revoked, or our model.
    /// The text says which.
    #[error("refused: {0}")]
    Refused(String),
    /// We refused the server: its certificate is not issued by our CA, or not for the name
    /// we connect to (`--server-name`).
    #[error("the server's certificate is not trusted: {0}")]
    UntrustedServer(String),
    /// A stop was asked (signal) while training or evaluating.
    #[error("stopped before it finished")]
    Cancelled,
    /// The server could not be reached (after the configured attempts).
    #[error("cannot reach the server: {0}")]
    Unreachable(String),
    /// Certificates and keys.
    #[error(transparent)]
    Crypto(#[from] flotilla_crypto::Error),
    /// A protocol-level error (invalid parameters, ...).
    #[error(transparent)]
    Protocol(#[from] flotilla_protocol::Error),
}
