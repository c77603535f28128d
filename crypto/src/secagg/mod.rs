//! Building blocks of SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020), no I/O:
//!
//! * [`shamir`]: t-of-n secret sharing of 32-byte secrets over the prime field GF(2^61 − 1).
//! * [`mask`]: the mask generator, AES-256-CTR expanding a 32-byte seed into `u32` words, added
//!   to or subtracted from a vector with wrapping arithmetic (the modulus is 2^32).
//! * [`keys`]: X25519 (static secrets, so they can be Shamir-shared) with HKDF-SHA256, and
//!   ChaCha20-Poly1305 sealing of shares.
//! * [`sign`]: ECDSA P-256 signatures of key advertisements with the certificate's key.
//! * [`quantize`]: clipping to `[-c, c]` and unbiased stochastic rounding to `b` bits, with the
//!   overflow bound `n · (2^b − 1) < 2^32` checked, and dequantization of a sum.
//!
//! The protocol phases that use them live in `flotilla_protocol::secagg`.

pub mod keys;
pub mod mask;
pub mod quantize;
pub mod shamir;
pub mod sign;

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

use crate::Error;

/// Where secret randomness (keys, self-mask seeds, Shamir coefficients) comes from.
pub trait Entropy {
    /// Fills `buf` with random bytes.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), Error>;
}

/// The operating system's secure generator (through ring). What production uses.
#[derive(Debug)]
pub struct SystemEntropy(ring::rand::SystemRandom);

impl Default for SystemEntropy {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemEntropy {
    /// The system generator.
    pub fn new() -> Self {
        Self(ring::rand::SystemRandom::new())
    }
}

impl Entropy for SystemEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        ring::rand::SecureRandom::fill(&self.0, buf).map_err(|_| Error::Random)
    }
}

/// **INSECURE**: a ChaCha20 stream from a public seed, so that tests and fuzzing are
/// reproducible. Anyone who knows the seed knows every key. Never use it in a deployment.
#[derive(Debug)]
pub struct InsecureDeterministicEntropy(ChaCha20Rng);

impl InsecureDeterministicEntropy {
    /// A deterministic stream for `(seed, stream)`.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self(rng)
    }
}

impl Entropy for InsecureDeterministicEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        self.0.fill_bytes(buf);
        Ok(())
    }
}
