//! # flotilla-server
//!
//! The aggregation server. It is model-agnostic: it never depends on Burn, and sees a model
//! only as flat `f32` parameters with a manifest.
//!
//! * [`config`]: the TOML configuration (every field defaulted; unknown keys refused).
//! * [`driver`]: the quinn endpoint (QUIC, TLS 1.3, client certificates *required*, chained
//!   to the federation CA and not revoked) that pumps streams into the sans-IO
//!   [`flotilla_protocol::Coordinator`] and fires its timers. It holds no round logic.
//! * [`checkpoint`]: atomic, checksummed checkpoints after every round; resume from the
//!   newest valid one; safetensors export.

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

pub mod checkpoint;
pub mod config;
pub mod driver;
pub mod ops;

pub use config::ServerConfig;
pub use driver::{RunSummary, RunningServer, start, start_with_store};

use std::path::PathBuf;

/// Everything that can go wrong in the server crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file or socket failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// What was being accessed.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A bad configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A checkpoint (or model file) that cannot be used.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Certificates and keys.
    #[error(transparent)]
    Crypto(#[from] flotilla_crypto::Error),
    /// The round protocol.
    #[error(transparent)]
    Protocol(#[from] flotilla_protocol::Error),
}
