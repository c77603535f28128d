//! Key agreement and share encryption.
//!
//! Each client makes two X25519 key pairs per round: `c` (to encrypt the shares it sends its
//! neighbours) and `s` (from which the pairwise mask seeds are derived). `x25519-dalek`'s
//! `StaticSecret` is used because the secret of `s` must be Shamir-shared (so that the
//! server can remove a dropped client's pairwise masks), which ring's single-use ephemeral
//! keys do not allow. Shared secrets go through HKDF-SHA256 (ring) with a purpose label;
//! shares are sealed with ChaCha20-Poly1305 (ring), the associated data binding round and
//! both parties.

use super::Entropy;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::Error;

const SALT: &[u8] = b"flotilla secagg v1";

/// An X25519 key pair whose secret can be exported (for Shamir sharing).
pub struct KeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public.as_bytes())
            .finish_non_exhaustive()
    }
}

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

impl KeyPair {
    /// A fresh key pair from the system's secure random generator.
    pub fn generate(rng: &mut dyn Entropy) -> Result<Self, Error> {
        let mut b = Zeroizing::new([0u8; 32]);
        rng.fill(b.as_mut())?;
        Ok(Self::from_secret(*b))
    }

    /// The key pair of a (recovered) secret.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let secret = StaticSecret::from(secret);
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// The secret, for Shamir sharing. Wiped when dropped.
    pub fn secret_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// A 32-byte key shared with the owner of `peer`, for `purpose` (HKDF-SHA256 over the
    /// X25519 result). Refuses a peer key that yields no shared secret (a low-order point).
    pub fn agree(&self, peer: &[u8; 32], purpose: &[u8]) -> Result<Zeroizing<[u8; 32]>, Error> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        if !shared.was_contributory() {
            return Err(Error::SecAgg("peer public key is a low-order point".into()));
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(shared.as_bytes());
        let info = [purpose];
        let okm = prk
            .expand(&info, Len32)
            .map_err(|_| Error::SecAgg("HKDF expand failed".into()))?;
        let mut out = Zeroizing::new([0u8; 32]);
        okm.fill(out.as_mut())
            .map_err(|_| Error::SecAgg("HKDF fill failed".into()))?;
        Ok(out)
    }
}

/// Which way a sealed message goes between two parties sharing one key: the nonce differs
/// by direction, so the same key never seals two messages under one nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the party with the smaller index to the larger.
    Up,
    /// From the larger to the smaller.
    Down,
}

fn key(k: &[u8; 32]) -> Result<LessSafeKey, Error> {
    UnboundKey::new(&CHACHA20_POLY1305, k)
        .map(LessSafeKey::new)
        .map_err(|_| Error::SecAgg("bad AEAD key".into()))
}

fn nonce(d: Direction) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = match d {
        Direction::Up => 1,
        Direction::Down => 2,
    };
    Nonce::assume_unique_for_key(n)
}

/// Seals `plaintext` (ChaCha20-Poly1305) with associated data `aad`.
pub fn seal(k: &[u8; 32], d: Direction, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
    let mut buf = plaintext.to_vec();
    key(k)?
        .seal_in_place_append_tag(nonce(d), Aad::from(aad), &mut buf)
        .map_err(|_| Error::SecAgg("sealing failed".into()))?;
    Ok(buf)
}

/// Opens what [`seal`] made; any change to the ciphertext, the associated data, the key or
/// the direction is an error.
pub fn open(
    k: &[u8; 32],
    d: Direction,
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    let len = key(k)?
        .open_in_place(nonce(d), Aad::from(aad), buf.as_mut_slice())
        .map_err(|_| Error::SecAgg("a sealed share failed authentication".into()))?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::SystemEntropy;

    #[test]
    fn both_sides_agree_and_purposes_separate() {
        let mut rng = SystemEntropy::new();
        let (a, b) = (
            KeyPair::generate(&mut rng).unwrap(),
            KeyPair::generate(&mut rng).unwrap(),
        );
        let ab = a.agree(&b.public(), b"mask").unwrap();
        assert_eq!(*ab, *b.agree(&a.public(), b"mask").unwrap());
        assert_ne!(*ab, *a.agree(&b.public(), b"share").unwrap());
        // The secret round-trips (what Shamir recovery relies on).
        let again = KeyPair::from_secret(*a.secret_bytes());
        assert_eq!(again.public(), a.public());
        assert_eq!(*again.agree(&b.public(), b"mask").unwrap(), *ab);
        // A low-order point is refused.
        assert!(a.agree(&[0u8; 32], b"mask").is_err());
    }

    #[test]
    fn sealed_shares_resist_tampering() {
        let k = [7u8; 32];
        let sealed = seal(&k, Direction::Up, b"round 3, 1 -> 2", b"share bytes").unwrap();
        assert_eq!(
            &open(&k, Direction::Up, b"round 3, 1 -> 2", &sealed).unwrap()[..],
            b"share bytes"
        );
        assert!(open(&k, Direction::Down, b"round 3, 1 -> 2", &sealed).is_err());
        assert!(open(&k, Direction::Up, b"round 4, 1 -> 2", &sealed).is_err());
        assert!(open(&[8u8; 32], Direction::Up, b"round 3, 1 -> 2", &sealed).is_err());
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert!(open(&k, Direction::Up, b"round 3, 1 -> 2", &bad).is_err());
        assert!(open(&k, Direction::Up, b"", &[]).is_err());
    }
}
