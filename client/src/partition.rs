//! Splitting a data set among clients, deterministically from a seed.
//!
//! * [`iid`]: shuffle, then equal shares.
//! * [`shards`]: McMahan et al.'s pathological non-IID split: sort by label, cut into
//!   `clients × shards_per_client` equal shards, give each client `shards_per_client` random
//!   shards (60,000 MNIST images, 100 clients, 2 shards each: 200 shards of 300).
//! * [`dirichlet`]: for each class, the share of each client is drawn from Dirichlet(alpha)
//!   (Hsu et al. 2019); small alpha is very skewed, large alpha approaches IID.
//!
//! Every function returns one sorted index list per client; together they are disjoint and
//! cover every example exactly once.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use crate::Error;

/// How to split.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Partition {
    /// Independent and identically distributed.
    Iid,
    /// Sort-and-shard (McMahan et al. 2017).
    Shards {
        /// Shards per client (2 in the paper).
        per_client: usize,
    },
    /// Dirichlet over labels.
    Dirichlet {
        /// Concentration.
        alpha: f64,
    },
}

impl Partition {
    /// Splits `labels` among `clients`.
    pub fn split(
        &self,
        labels: &[u8],
        num_classes: usize,
        clients: usize,
        seed: u64,
    ) -> Result<Vec<Vec<usize>>, Error> {
        match *self {
            Partition::Iid => iid(labels.len(), clients, seed),
            Partition::Shards { per_client } => shards(labels, clients, per_client, seed),
            Partition::Dirichlet { alpha } => dirichlet(labels, num_classes, clients, alpha, seed),
        }
    }
}

/// The test examples client `index` of `clients` evaluates on: the test set is dealt IID
/// into `min(clients, n)` shards and client `index` takes shard `index % shards`. The
/// evaluation split never limits the number of clients (a few thousand clients can share a
/// test set of two thousand examples; neighbours in index share a shard).
pub fn evaluation_shard(
    n: usize,
    index: usize,
    clients: usize,
    seed: u64,
) -> Result<Vec<usize>, Error> {
    if index >= clients {
        return Err(Error::Data(format!(
            "partition index {index} must be below {clients}"
        )));
    }
    let shards = clients.min(n);
    iid(n, shards, seed)?
        .into_iter()
        .nth(index % shards.max(1))
        .ok_or_else(|| Error::Data("no evaluation shard".into()))
}

fn check(n: usize, clients: usize) -> Result<(), Error> {
    if clients == 0 {
        return Err(Error::Data("cannot partition among 0 clients".into()));
    }
    if n < clients {
        return Err(Error::Data(format!(
            "{n} examples cannot be split among {clients} clients"
        )));
    }
    Ok(())
}

/// Shuffles `0..n` and deals it into `clients` near-equal contiguous shares.
pub fn iid(n: usize, clients: usize, seed: u64) -> Result<Vec<Vec<usize>>, Error> {
    check(n, clients)?;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let (base, extra) = (n / clients, n % clients);
    let mut out = Vec::with_capacity(clients);
    let mut start = 0;
    for c in 0..clients {
        let len = base + usize::from(c < extra);
        let mut part = idx.get(start..start + len).unwrap_or_default().to_vec();
        part.sort_unstable();
        out.push(part);
        start += len;
    }
    Ok(out)
}

/// McMahan et al.'s sort-and-shard split.
pub fn shards(
    labels: &[u8],
    clients: usize,
    per_client: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, Error> {
    check(labels.len(), clients)?;
    let num_shards = clients
        .checked_mul(per_client)
        .filter(|&s| s > 0 && s <= labels.len())
        .ok_or_else(|| {
            Error::Data(format!(
                "cannot cut {} examples into {clients}x{per_client} shards",
                labels.len()
            ))
        })?;
    let mut by_label: Vec<usize> = (0..labels.len()).collect();
    by_label.sort_by_key(|&i| (labels.get(i).copied().unwrap_or(0), i));
    let size = labels.len() / num_shards;
    let mut ids: Vec<usize> = (0..num_shards).collect();
    ids.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut out = vec![Vec::new(); clients];
    for (k, shard) in ids.iter().enumerate() {
        let start = shard * size;
        // The last shard takes the remainder so that nothing is left out.
        let end = if *shard == num_shards - 1 {
            labels.len()
        } else {
            start + size
        };
        if let Some(part) = out.get_mut(k / per_client) {
            part.extend_from_slice(by_label.get(start..end).unwrap_or_default());
        }
    }
    for p in &mut out {
        p.sort_unstable();
    }
    Ok(out)
}

/// Dirichlet(alpha) label split. Redraws (up to 100 times) until every client has at least
/// one example.
pub fn dirichlet(
    labels: &[u8],
    num_classes: usize,
    clients: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>, Error> {
    check(labels.len(), clients)?;
    let gamma = Gamma::new(alpha, 1.0)
        .map_err(|e| Error::Data(format!("invalid Dirichlet alpha {alpha}: {e}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut per_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        per_class
            .get_mut(l as usize)
            .ok_or_else(|| Error::Data(format!("label {l} outside 0..{num_classes}")))?
            .push(i);
    }
    for _attempt in 0..100 {
        let mut out = vec![Vec::new(); clients];
        for class in &per_class {
            let mut idx = class.clone();
            idx.shuffle(&mut rng);
            let w: Vec<f64> = (0..clients).map(|_| gamma.sample(&mut rng)).collect();
            let total: f64 = w.iter().sum();
            // Cumulative cut points, so rounding never loses an example.
            let mut acc = 0.0;
            let mut start = 0;
            for (c, wc) in w.iter().enumerate() {
                acc += wc;
                let end = if c + 1 == clients {
                    idx.len()
                } else {
                    ((acc / total) * idx.len() as f64).round() as usize
                }
                .clamp(start, idx.len());
                if let Some(part) = out.get_mut(c) {
                    part.extend_from_slice(idx.get(start..end).unwrap_or_default());
                }
                start = end;
            }
        }
        if out.iter().all(|p| !p.is_empty()) {
            for p in &mut out {
                p.sort_unstable();
            }
            return Ok(out);
        }
    }
    Err(Error::Data(format!(
        "Dirichlet({alpha}) left a client empty in 100 draws; use more data, fewer clients or a larger alpha"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_shards_do_not_limit_the_number_of_clients() {
        // 2,001 clients over a 2,000-example test set: every client gets a shard.
        let last = evaluation_shard(2000, 2000, 2001, 7).unwrap();
        assert_eq!(last, evaluation_shard(2000, 0, 2001, 7).unwrap());
        assert_eq!(last.len(), 1);
        // Up to the test set's size, the shards are the plain IID split.
        let ten = iid(2000, 10, 7).unwrap();
        for (i, shard) in ten.iter().enumerate() {
            assert_eq!(&evaluation_shard(2000, i, 10, 7).unwrap(), shard);
        }
        assert!(evaluation_shard(2000, 10, 10, 7).is_err());
        assert!(
            evaluation_shard(0, 0, 10, 7).is_err(),
            "no test data at all"
        );
    }

    fn labels(n: usize) -> Vec<u8> {
        // 10 classes, uneven sizes.
        (0..n).map(|i| ((i * 7 + i / 3) % 10) as u8).collect()
    }

    fn assert_disjoint_complete(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn iid_is_balanced_disjoint_complete_and_seeded() {
        let p = iid(1003, 10, 1).unwrap();
        assert_disjoint_complete(&p, 1003);
        assert!(p.iter().all(|x| x.len() == 100 || x.len() == 101));
        assert_eq!(p, iid(1003, 10, 1).unwrap());
        assert_ne!(p, iid(1003, 10, 2).unwrap());
    }

    #[test]
    fn shards_give_each_client_few_labels() {
        let l = labels(6000);
        let p = shards(&l, 10, 2, 3).unwrap();
        assert_disjoint_complete(&p, 6000);
        for part in &p {
            let mut seen: Vec<u8> = part.iter().map(|&i| l[i]).collect();
            seen.sort_unstable();
            seen.dedup();
            // Two shards of one sorted run each touch at most two labels apiece.
            assert!(seen.len() <= 4, "{seen:?}");
            assert_eq!(part.len(), 600);
        }
        assert_eq!(p, shards(&l, 10, 2, 3).unwrap());
    }

    #[test]
    fn dirichlet_skew_depends_on_alpha() {
        let l = labels(5000);
        let skew = |alpha: f64| {
            let p = dirichlet(&l, 10, 20, alpha, 9).unwrap();
            assert_disjoint_complete(&p, 5000);
            // Mean over clients of the largest label share.
            p.iter()
                .map(|part| {
                    let mut c = [0usize; 10];
                    for &i in part {
                        c[l[i] as usize] += 1;
                    }
                    *c.iter().max().unwrap() as f64 / part.len() as f64
                })
                .sum::<f64>()
                / 20.0
        };
        let (low, high) = (skew(0.1), skew(100.0));
        assert!(low > 0.5, "{low}");
        assert!(high < 0.2, "{high}");
        assert!(dirichlet(&l, 10, 20, -1.0, 0).is_err());
    }
}
