//! Building blocks of SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020), no I/O:
//!
//! * [`shamir`]: t-of-n secret sharing of 32-byte secrets over the prime field GF(2^61 − 1).
//! * [`mask`]: the mask generator, ChaCha20 expanding a 32-byte seed into `u32` words, added
//!   to or subtracted from a vector with wrapping arithmetic (the modulus is 2^32).
//! * [`keys`]: X25519 (static secrets, so they can be Shamir-shared) with HKDF-SHA256, and
//!   ChaCha20-Poly1305 sealing of shares.
//! * [`sign`]: ECDSA P-256 signatures of key advertisements with the certificate's key.
//! * [`quantize`]: clipping to `[-c, c]` and unbiased stochastic rounding to `b` bits, with the
//!   overflow bound `n · (2^b − 1) < 2^32` checked, and dequantization of a sum.
//!
//! The protocol phases that use them (key advertisement, share exchange, masked input,
//! unmasking) are not built yet.

pub mod keys;
pub mod mask;
pub mod quantize;
pub mod shamir;
pub mod sign;
