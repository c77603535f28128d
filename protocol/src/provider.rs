//! Where the protocol machines' secret randomness comes from, in one value
//! ([`CryptoProvider`], after rustls's provider of the same name).
//!
//! Every secret random value a machine draws goes through it: a client's SecAgg+ key pairs,
//! self-mask seed and Shamir coefficients; the stochastic rounding of its secure input; its
//! DP noise; the server's central DP noise. A deployment uses [`CryptoProvider::default_provider`]
//! (the operating system's generator). Tests, fuzzing and simulations that must repeat bit for
//! bit use [`CryptoProvider::insecure_deterministic`], whose every value follows from a public
//! seed — it is named so that it cannot be chosen by accident, and the client and server
//! binaries never construct it.
//!
//! What is *not* here, on purpose: values that are public by design and must agree between
//! machines (the sampling of a round and the SecAgg+ neighbour graph come from the run's seed
//! and the round number, see `CoordinatorConfig::seed`); and the fixed algorithms (X25519 key
//! agreement, ChaCha20-Poly1305 share sealing, ECDSA signatures, the AES-256-CTR mask
//! generator), which are `flotilla_crypto`'s and not pluggable.

use flotilla_crypto::dp::GaussianNoise;
use flotilla_crypto::secagg::{Entropy, InsecureDeterministicEntropy, SystemEntropy};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::Error;

/// The source of a machine's secret randomness. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CryptoProvider {
    source: Source,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    System,
    InsecureDeterministic(u64),
}

/// What a stream of randomness is for. Each purpose gets its own stream, so that no two
/// purposes ever see the same bytes (for the deterministic provider: distinct ChaCha20
/// stream numbers of one seed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// A client's SecAgg+ keys, self-mask seed and Shamir coefficients for a round.
    SecAggKeys,
    /// A client's stochastic rounding of its secure input for a round.
    Rounding,
    /// A client's DP noise for a round.
    ClientDpNoise,
    /// The server's central DP noise (one stream for the run).
    CentralDpNoise,
}

impl Purpose {
    /// The stream number for `round`: keys and rounding keep the numbers they had before
    /// this type existed (2r and 2r+1), so seeded runs repeat across the change; the noise
    /// streams live at 2⁶³ and above, where no key or rounding stream of a round below 2⁶²
    /// reaches.
    fn stream(self, round: u64) -> u64 {
        const NOISE: u64 = 1 << 63;
        match self {
            Self::SecAggKeys => round.wrapping_mul(2),
            Self::Rounding => round.wrapping_mul(2).wrapping_add(1),
            Self::ClientDpNoise => NOISE | (round & (u64::MAX >> 2)),
            Self::CentralDpNoise => NOISE | (1 << 62),
        }
    }
}

impl Default for CryptoProvider {
    fn default() -> Self {
        Self::default_provider()
    }
}

impl CryptoProvider {
    /// The operating system's secure generator. The only choice for a deployment.
    pub const fn default_provider() -> Self {
        Self {
            source: Source::System,
        }
    }

    /// **INSECURE**: every value follows from `seed` (public) and the round, so that tests,
    /// fuzzing and simulations repeat bit for bit. Anyone who knows the seed can remove a
    /// client's masks and noise.
    pub const fn insecure_deterministic(seed: u64) -> Self {
        Self {
            source: Source::InsecureDeterministic(seed),
        }
    }

    /// Whether this is the insecure deterministic provider.
    pub fn is_insecure(&self) -> bool {
        matches!(self.source, Source::InsecureDeterministic(_))
    }

    fn entropy(&self, purpose: Purpose, round: u64) -> Box<dyn Entropy + Send> {
        match self.source {
            Source::System => Box::new(SystemEntropy::new()),
            Source::InsecureDeterministic(seed) => Box::new(InsecureDeterministicEntropy::new(
                seed,
                purpose.stream(round),
            )),
        }
    }

    fn key(&self, purpose: Purpose, round: u64) -> Result<[u8; 32], Error> {
        let mut k = [0u8; 32];
        self.entropy(purpose, round).fill(&mut k)?;
        Ok(k)
    }

    /// Entropy for a client's SecAgg+ key pairs, self-mask seed and Shamir coefficients in
    /// `round`.
    pub fn secagg_entropy(&self, round: u64) -> Box<dyn Entropy + Send> {
        self.entropy(Purpose::SecAggKeys, round)
    }

    /// The generator of a client's stochastic rounding of its secure input in `round`.
    pub fn rounding_rng(&self, round: u64) -> Result<ChaCha20Rng, Error> {
        Ok(ChaCha20Rng::from_seed(self.key(Purpose::Rounding, round)?))
    }

    /// A client's DP noise for `round`.
    pub fn client_dp_noise(&self, round: u64) -> Result<GaussianNoise, Error> {
        Ok(GaussianNoise::from_seed(
            self.key(Purpose::ClientDpNoise, round)?,
        ))
    }

    /// The server's central DP noise, for the run.
    pub fn central_dp_noise(&self) -> Result<GaussianNoise, Error> {
        Ok(GaussianNoise::from_seed(
            self.key(Purpose::CentralDpNoise, 0)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    #[test]
    fn deterministic_streams_repeat_and_purposes_differ() {
        let p = CryptoProvider::insecure_deterministic(7);
        assert!(p.is_insecure() && !CryptoProvider::default_provider().is_insecure());
        let draw = |p: &CryptoProvider, purpose, round| p.key(purpose, round).unwrap();
        let purposes = [
            Purpose::SecAggKeys,
            Purpose::Rounding,
            Purpose::ClientDpNoise,
            Purpose::CentralDpNoise,
        ];
        let mut seen = std::collections::BTreeSet::new();
        for round in [0, 1, 2, u64::MAX / 2] {
            for purpose in purposes {
                let a = draw(&p, purpose, round);
                assert_eq!(a, draw(&p, purpose, round), "{purpose:?} {round}");
                // The central stream ignores the round; every other pair is distinct.
                if purpose != Purpose::CentralDpNoise || round == 0 {
                    assert!(seen.insert(a), "{purpose:?} {round} repeats another stream");
                }
            }
        }
        // Another seed, other bytes; the system provider never repeats.
        assert_ne!(
            draw(&p, Purpose::Rounding, 1),
            draw(
                &CryptoProvider::insecure_deterministic(8),
                Purpose::Rounding,
                1
            )
        );
        let sys = CryptoProvider::default_provider();
        assert_ne!(
            sys.rounding_rng(1).unwrap().next_u64(),
            sys.rounding_rng(1).unwrap().next_u64()
        );
    }

    /// The key and rounding streams are the ones seeded runs used before the provider:
    /// `InsecureDeterministicEntropy::new(seed, 2r)` and `(seed, 2r + 1)`.
    #[test]
    fn key_and_rounding_streams_are_unchanged() {
        let p = CryptoProvider::insecure_deterministic(42);
        let mut old = [0u8; 32];
        InsecureDeterministicEntropy::new(42, 6)
            .fill(&mut old)
            .unwrap();
        let mut new = [0u8; 32];
        p.secagg_entropy(3).fill(&mut new).unwrap();
        assert_eq!(old, new);
        InsecureDeterministicEntropy::new(42, 7)
            .fill(&mut old)
            .unwrap();
        assert_eq!(old, p.key(Purpose::Rounding, 3).unwrap());
    }
}
