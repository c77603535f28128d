//! What a round's [`SecAggSetup`] means: its checks and its neighbour graph.

use flotilla_crypto::secagg::quantize::Quantizer;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::wire::config::SecAggSetup;
use crate::wire::messages::ClientId;
use crate::{Error, SecAggError};

impl SecAggSetup {
    /// Number of participants.
    pub fn n(&self) -> usize {
        self.participants.len()
    }

    /// The quantizer of the round.
    pub fn quantizer(&self) -> Result<Quantizer, Error> {
        Ok(Quantizer::new(self.clip, self.bits)?)
    }

    /// Checks the parameters for consistency and safety (a client runs this on what the
    /// server sent).
    pub fn validate(&self) -> Result<(), Error> {
        let n = self.n();
        let bad = |s: String| Err(Error::SecAgg(SecAggError::InvalidParameters(s)));
        if n < 2 {
            return bad(format!("{n} participants"));
        }
        if self.participants.windows(2).any(|w| w[0] >= w[1]) {
            return bad("participants not sorted and distinct".into());
        }
        let k = self.neighbours as usize;
        let t = self.threshold as usize;
        if k == 0 || k > n - 1 || (k % 2 == 1 && k != n - 1) {
            return bad(format!("{k} neighbours for {n} participants"));
        }
        if t <= k / 2 || t > k {
            return bad(format!("threshold {t} outside ({}, {k}]", k / 2));
        }
        let q = self.quantizer()?;
        q.check_capacity(n as u64)?;
        if self.max_weight == 0 || (n as u64).saturating_mul(self.max_weight) > u32::MAX as u64 {
            return bad(format!("max_weight {}", self.max_weight));
        }
        Ok(())
    }

    /// The neighbour lists of every participant (indices, sorted). `k = n − 1`: everyone.
    /// Otherwise a ring (Harary graph) over a seeded permutation: each client's neighbours
    /// are the `k/2` before and after it.
    pub fn graph(&self) -> Vec<Vec<usize>> {
        let n = self.n();
        let k = self.neighbours as usize;
        if k + 1 >= n {
            return (0..n)
                .map(|i| (0..n).filter(|&j| j != i).collect())
                .collect();
        }
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(self.graph_seed));
        let mut pos = vec![0usize; n];
        for (p, &i) in perm.iter().enumerate() {
            if let Some(slot) = pos.get_mut(i) {
                *slot = p;
            }
        }
        (0..n)
            .map(|i| {
                let p = pos.get(i).copied().unwrap_or(0);
                let mut v: Vec<usize> = (1..=k / 2)
                    .flat_map(|d| [(p + d) % n, (p + n - d) % n])
                    .filter_map(|q| perm.get(q).copied())
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            })
            .collect()
    }

    pub(super) fn index_of(&self, id: &ClientId) -> Option<usize> {
        self.participants.binary_search(id).ok()
    }

    pub(super) fn id(&self, i: usize) -> Result<&ClientId, Error> {
        self.participants.get(i).ok_or_else(|| {
            Error::SecAgg(SecAggError::NotAParticipant(format!("no participant {i}")))
        })
    }
}
