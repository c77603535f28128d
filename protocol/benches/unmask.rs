//! Server-side cost of unmasking a secure round: n clients × 100,000 parameters, a fraction of
//! them dropping out after sharing keys (so their pairwise masks must be rebuilt from Shamir
//! shares, the expensive case), for classic SecAgg (k = n − 1, Bonawitz et al.'s setting) and
//! SecAgg+ (k = 100 neighbours).
//!
//!     cargo bench -p flotilla-protocol --bench unmask [-- n=500 k=0 drop=0.1]
//!
//! The clients and the server are the real `ClientRound`s and `ServerRound`, with real
//! certificates and signatures; messages are handed over in memory. The figure is the time of
//! the server call that reconstructs the secrets and removes the masks (it runs on all cores).
//! Client-side work (key exchange, masking) is done first and not timed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use flotilla_crypto::pki::{CertificateAuthority, Identity};
use flotilla_crypto::secagg::sign::{PeerVerifier, Signer};
use flotilla_protocol::secagg::{ClientRound, SecAggConfig, SecAggIdentity, ServerRound};
use flotilla_protocol::strategy::FailureReason;
use flotilla_protocol::wire::messages::{Metrics, TrainRes};
use flotilla_protocol::{ClientId, CryptoProvider, Manifest, Message, Params, TensorSpec};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

const LEN: usize = 100_000;

struct Outcome {
    unmask: Duration,
    setup: Duration,
    recovered: usize,
    ok: bool,
}

fn run(n: usize, k: usize, drop: f64, identities: &[SecAggIdentity]) -> Outcome {
    let t0 = Instant::now();
    let ids: Vec<ClientId> = (0..n).map(|i| ClientId::new(format!("c{i:04}"))).collect();
    let config = SecAggConfig {
        neighbours: k,
        threshold: 1, // raised to k/2 + 1
        clip: 1.0,
        bits: 20,
        max_weight: 1000,
        phase_timeout_ms: 3_600_000,
    };
    let setup = config.setup_for(ids.clone(), 7).unwrap();
    let model = Params::new(
        Manifest::new(vec![TensorSpec::new("w", &[LEN])]),
        vec![0.0; LEN],
    )
    .unwrap();
    let now = Instant::now();
    let mut server = ServerRound::new(
        1,
        setup.clone(),
        now,
        Duration::from_secs(3600),
        now + Duration::from_secs(3600),
        LEN,
        1,
    );
    let mut clients = Vec::with_capacity(n);
    let mut to_server = VecDeque::new();
    for (i, id) in ids.iter().enumerate() {
        let (c, advert) = ClientRound::start(
            1,
            setup.clone(),
            model.clone(),
            id,
            &identities[i],
            &CryptoProvider::insecure_deterministic(i as u64),
        )
        .unwrap();
        clients.push(c);
        to_server.push_back((i, advert));
    }
    let victims: Vec<usize> = sample(
        &mut ChaCha8Rng::seed_from_u64(n as u64),
        n,
        (drop * n as f64).round() as usize,
    )
    .into_vec();
    let mut unmask = Duration::ZERO;
    let mut ok = false;
    let mut trained = false;
    loop {
        while let Some((i, m)) = to_server.pop_front() {
            let started = Instant::now();
            server.handle_message(now, &ids[i], m).unwrap();
            // The reconstruct-and-unmask job (a driver runs it on a blocking thread).
            if let Some(job) = server.take_job() {
                server.handle_unmask_result(job.run());
            }
            let spent = started.elapsed();
            if let Some(outcome) = server.take_outcome() {
                unmask = spent;
                ok = outcome.is_ok();
                if let Err(e) = &outcome {
                    eprintln!("round aborted: {e}");
                }
            }
        }
        let out = server.drain_transmits();
        if out.is_empty() {
            if trained || server.take_outcome().is_some() || unmask > Duration::ZERO {
                break;
            }
            // Key exchange done: every client "trains" and uploads; victims crash instead.
            trained = true;
            for (i, c) in clients.iter_mut().enumerate() {
                if victims.contains(&i) {
                    server.handle_failure(now, &ids[i], FailureReason::Disconnected);
                    continue;
                }
                let values: Vec<f32> = (0..LEN).map(|j| ((i + j) % 100) as f32 * 1e-3).collect();
                let res = TrainRes {
                    round: 1,
                    num_examples: 10,
                    metrics: Metrics::new(),
                    params: model.with_values(values).unwrap(),
                };
                if let Some(m) = c.on_result(res).unwrap() {
                    to_server.push_back((i, m));
                }
                // The mask job (a driver runs it on a blocking thread).
                if let Some(job) = c.take_job()
                    && let Some(m) = c.handle_mask_result(job.run()).unwrap()
                {
                    to_server.push_back((i, m));
                }
            }
            continue;
        }
        for (to, m) in out {
            let i = ids.binary_search(&to).unwrap();
            let c = &mut clients[i];
            let reply = match m {
                Message::NeighbourKeys { adverts, .. } => {
                    Some(c.on_neighbour_keys(adverts, &identities[i]).unwrap())
                }
                Message::ForwardShares { shares, .. } => c.on_forward_shares(shares).unwrap(),
                Message::Survivors { survivors, .. } => {
                    Some(c.on_survivors(survivors, &identities[i]).unwrap())
                }
                Message::Unmask(req) => Some(c.on_unmask(req).unwrap()),
                _ => None,
            };
            if let Some(r) = reply {
                to_server.push_back((i, r));
            }
        }
    }
    Outcome {
        unmask,
        setup: t0.elapsed() - unmask,
        recovered: server.stats().recovered_dropped,
        ok,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{name}=")).map(str::to_owned))
    };
    let ns: Vec<usize> = arg("n").map_or(vec![100, 200, 500], |v| vec![v.parse().unwrap()]);
    let ks: Vec<usize> = arg("k").map_or(vec![0, 100], |v| vec![v.parse().unwrap()]);
    let drops: Vec<f64> = arg("drop").map_or(vec![0.0, 0.1, 0.3], |v| vec![v.parse().unwrap()]);
    let max_n = *ns.iter().max().unwrap();
    let ca = CertificateAuthority::generate("Bench CA", 1).unwrap();
    let ca_der = ca.cert_der().unwrap();
    let identities: Vec<SecAggIdentity> = (0..max_n)
        .map(|i| {
            let ident =
                Identity::from_issued(&ca.issue_client(&format!("c{i:04}"), 1).unwrap()).unwrap();
            SecAggIdentity {
                signer: Signer::from_identity(&ident).unwrap(),
                certificate: ident.leaf().unwrap().to_vec(),
                verifier: PeerVerifier::new(std::slice::from_ref(&ca_der), Vec::new()).unwrap(),
            }
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("server unmasking, {LEN} parameters, dropouts after key sharing, {threads} threads");
    println!("| clients | k | dropout | masks rebuilt | unmask (s) | client side, untimed (s) |");
    println!("|---|---|---|---|---|---|");
    for &n in &ns {
        for &k in &ks {
            if k != 0 && k >= n - 1 {
                continue; // same as classic
            }
            for &d in &drops {
                let o = run(n, k, d, &identities);
                let k_eff = if k == 0 { n - 1 } else { k };
                println!(
                    "| {n} | {k_eff}{} | {:.0}% | {} | {} | {:.1} |",
                    if k == 0 { " (classic)" } else { "" },
                    d * 100.0,
                    o.recovered,
                    if o.ok {
                        format!("{:.3}", o.unmask.as_secs_f64())
                    } else {
                        "aborted".into()
                    },
                    o.setup.as_secs_f64()
                );
            }
        }
    }
}
