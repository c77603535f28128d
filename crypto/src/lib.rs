//! # flotilla-crypto
//!
//! The cryptography of a federation, with no networking and no async:
//!
//! * [`pki`]: the federation CA, server and client certificates (a client *is* its
//!   certificate), PEM files with private keys written 0600, and the revocation list the
//!   server's TLS verifier consumes.
//! * [`tls`]: the rustls configurations for mutual TLS 1.3 with the ring provider.
//! * [`secagg`]: building blocks of secure aggregation: Shamir sharing, the AES-256-CTR mask
//!   generator, clipping and stochastic quantization.
//! * [`dp`]: Gaussian noise, L2 clipping and the Rényi DP accountant.
//! * [`fs`]: atomic file writes (checkpoints, keys, revocation lists).
//!
//! Everything here uses `ring` (through `rcgen` and `rustls-pki-types` for certificates) for
//! randomness, signatures and hashing.

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

pub mod dp;
pub mod fs;
pub mod pki;
pub mod secagg;
pub mod tls;

use std::path::PathBuf;

/// Everything that can go wrong in the crypto crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file that should exist does not.
    #[error("file not found: {0}")]
    NotFound(PathBuf),
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file refused to be overwritten.
    #[error("{0} already exists; refusing to overwrite it")]
    AlreadyExists(PathBuf),
    /// A PEM file that does not hold what it should.
    #[error("malformed PEM in {path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A key that is not the certificate's.
    #[error("private key {key} does not belong to certificate {cert}")]
    KeyMismatch {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
    },
    /// A certificate that cannot be made, parsed or used.
    #[error("certificate error: {0}")]
    Certificate(String),
    /// A certificate past its end of validity.
    #[error("certificate expired on {not_after}")]
    Expired {
        /// End of validity.
        not_after: String,
    },
    /// A certificate before its start of validity.
    #[error("certificate not valid before {not_before}")]
    NotYetValid {
        /// Start of validity.
        not_before: String,
    },
    /// A client id that is not 1–64 of `[A-Za-z0-9._-]`.
    #[error(
        "invalid client id {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with '.')"
    )]
    InvalidClientId(String),
    /// A secure-aggregation primitive was misused or given inconsistent input.
    #[error("secure aggregation: {0}")]
    SecAgg(String),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}
