//! The platform's own cost: a real server and real clients over QUIC + mTLS on loopback, the
//! CNN's 1,663,370 parameters, and a trainer that returns at once (or after `train_ms` of
//! sleep, standing in for devices that train in parallel). Runs plain rounds, then SecAgg+
//! rounds (k = 10, t = 6), and prints seconds per round, their ratio, and the bytes each
//! client sends and receives per round: message bytes (what the protocol puts on streams)
//! and UDP bytes (QUIC and TLS included), per parameter and next to the payload.
//!
//!     cargo bench -p flotilla-sim --bench platform_overhead [-- clients=100 rounds=4 train_ms=0]
//!
//! It also prints the **transport floor**: the same bytes each way per client and round (what
//! the plain run measured) through bare quinn streams, with the same TLS configuration, the
//! same transport settings and the same number of connections, and no protocol at all; and the
//! plain round as a ratio to it.
//!
//! Per-round time is the median over the rounds after the first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use flotilla_client::{Evaluation, LocalUpdate, Trainer};
use flotilla_protocol::coordinator::Event;
use flotilla_protocol::secagg::SecAggConfig;
use flotilla_protocol::wire::messages::{Metrics, TrainConfig};
use flotilla_protocol::{Manifest, Params, TensorSpec};
use flotilla_sim::federation::{client_options, make_pki, server_config};
use tokio::sync::{mpsc, watch};

/// Returns the global model with every value nudged, at once (or after a sleep).
struct Instant0(Duration);

impl Trainer for Instant0 {
    fn initial_params(&mut self) -> Result<Params, flotilla_client::Error> {
        Ok(cnn_sized(0.0))
    }
    fn train(
        &mut self,
        g: &Params,
        _c: &TrainConfig,
    ) -> Result<LocalUpdate, flotilla_client::Error> {
        std::thread::sleep(self.0);
        let v: Vec<f32> = g.values().iter().map(|x| x + 0.001).collect();
        Ok(LocalUpdate {
            num_examples: 1,
            metrics: Metrics::new(),
            params: g.with_values(v)?,
        })
    }
    fn evaluate(&mut self, _g: &Params) -> Result<Evaluation, flotilla_client::Error> {
        Ok(Evaluation {
            num_examples: 1,
            loss: 0.0,
            accuracy: 0.0,
        })
    }
}

/// The CNN's manifest shapes (the federation's layout, PyTorch's), zero-filled.
fn cnn_sized(v: f32) -> Params {
    let m = Manifest::new(vec![
        TensorSpec::new("conv1.weight", &[32, 1, 5, 5]),
        TensorSpec::new("conv1.bias", &[32]),
        TensorSpec::new("conv2.weight", &[64, 32, 5, 5]),
        TensorSpec::new("conv2.bias", &[64]),
        TensorSpec::new("fc1.weight", &[512, 3136]),
        TensorSpec::new("fc1.bias", &[512]),
        TensorSpec::new("fc2.weight", &[10, 512]),
        TensorSpec::new("fc2.bias", &[10]),
    ]);
    let n = m.numel() as usize;
    Params::new(m, vec![v; n]).expect("shape")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Measured {
    per_round: f64,
    udp_sent: f64,
    udp_received: f64,
    msg_sent: f64,
    msg_received: f64,
}

async fn measure(
    clients: usize,
    rounds: u64,
    train: Duration,
    secure: bool,
) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir()?;
    let (pki, ids) = make_pki(&dir.path().join("pki"), clients)?;
    let model = dir.path().join("init.safetensors");
    flotilla_server::checkpoint::export_safetensors(&cnn_sized(0.0), &model)?;
    let mut config = server_config(&pki, &dir.path().join("ckpt"));
    config.initial_model = Some(model);
    config.rounds.num_rounds = rounds;
    config.rounds.min_available_clients = clients;
    config.rounds.min_train_results = clients;
    config.rounds.evaluate_every = 0;
    config.strategy.min_train_clients = clients;
    if secure {
        config.secure_aggregation = Some(SecAggConfig::default());
    }
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let server = flotilla_server::start(config, Some(ev_tx))?;
    let addr = server.local_addr;
    let (_stop, stop_rx) = watch::channel(false);
    let handles: Vec<_> = ids
        .iter()
        .map(|id| {
            let o = client_options(&pki, id, addr).expect("options");
            tokio::spawn(flotilla_client::driver::run(
                o,
                Instant0(train),
                stop_rx.clone(),
            ))
        })
        .collect();
    let mut started = Instant::now();
    let mut per_round = Vec::new();
    while let Some(ev) = ev_rx.recv().await {
        match ev {
            Event::RoundStarted { .. } => started = Instant::now(),
            Event::RoundCompleted(r) if r.round > 1 => {
                per_round.push(started.elapsed().as_secs_f64());
            }
            Event::RoundAborted(r) => anyhow::bail!("round {} aborted: {:?}", r.round, r.aborted),
            Event::Finished => break,
            _ => {}
        }
    }
    let summary = server.wait().await?;
    let (mut tx, mut rx) = (0u64, 0u64);
    for c in handles {
        if let Ok(Ok(Ok((_, s)))) = tokio::time::timeout(Duration::from_secs(60), c).await {
            tx += s.udp_bytes_sent;
            rx += s.udp_bytes_received;
        }
    }
    let per = clients as f64 * rounds as f64;
    Ok(Measured {
        per_round: median(per_round),
        udp_sent: tx as f64 / per,
        udp_received: rx as f64 / per,
        msg_sent: summary.bytes_received as f64 / per,
        msg_received: summary.bytes_sent as f64 / per,
    })
}

/// Bare quinn: `clients` connections with the federation's TLS and transport settings; each
/// round the server sends `down` bytes on a fresh stream to every client, each client answers
/// with `up` bytes, and the round ends when all answers are in. Median seconds per round over
/// the rounds after the first.
async fn transport_floor(
    clients: usize,
    rounds: u64,
    down: usize,
    up: usize,
) -> anyhow::Result<f64> {
    use flotilla_crypto::pki::Identity;
    use flotilla_crypto::tls;
    use std::sync::Arc;
    let dir = tempfile::tempdir()?;
    let (pki, ids) = make_pki(&dir.path().join("pki"), clients)?;
    let config = server_config(&pki, &dir.path().join("ckpt"));
    let server = flotilla_server::driver::endpoint(&config)?;
    let addr = server.local_addr()?;
    let ca = flotilla_crypto::pki::load_certs(&pki.ca_cert())?;
    let mut clients_done = Vec::new();
    for id in &ids {
        let identity = Identity::load(&pki.client_cert(id), &pki.client_key(id))?;
        let tls = tls::client_config(&identity, &ca)?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))?;
        let mut cc = quinn::ClientConfig::new(Arc::new(quic));
        cc.transport_config(Arc::new(flotilla_protocol::quic::transport_config()));
        let mut e = quinn::Endpoint::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
        e.set_default_client_config(cc);
        clients_done.push(tokio::spawn(async move {
            let conn = e.connect(addr, "localhost")?.await?;
            let reply = vec![7u8; up];
            for _ in 0..rounds {
                let mut rx = conn.accept_uni().await?;
                let got = rx.read_to_end(down + 1).await?;
                anyhow::ensure!(got.len() == down, "short read");
                let mut tx = conn.open_uni().await?;
                tx.write_all(&reply).await?;
                tx.finish()?;
            }
            conn.closed().await;
            anyhow::Ok(())
        }));
    }
    let mut conns = Vec::new();
    while conns.len() < clients {
        let incoming = server
            .accept()
            .await
            .ok_or_else(|| anyhow::anyhow!("endpoint closed"))?;
        conns.push(incoming.await?);
    }
    let model = Arc::new(vec![3u8; down]);
    let mut times = Vec::new();
    for round in 0..rounds {
        let started = Instant::now();
        let tasks: Vec<_> = conns
            .iter()
            .cloned()
            .map(|conn| {
                let model = model.clone();
                tokio::spawn(async move {
                    let mut tx = conn.open_uni().await?;
                    tx.write_all(&model).await?;
                    tx.finish()?;
                    let mut rx = conn.accept_uni().await?;
                    let got = rx.read_to_end(up + 1).await?;
                    anyhow::ensure!(got.len() == up, "short read");
                    anyhow::Ok(())
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        if round > 0 {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    for c in &conns {
        c.close(0u32.into(), b"done");
    }
    for c in clients_done {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    Ok(median(times))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .find_map(|a| {
                a.strip_prefix(&format!("{name}="))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(default)
    };
    let clients = arg("clients", 10) as usize;
    let rounds = arg("rounds", 6);
    let train = Duration::from_millis(arg("train_ms", 0));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let params = cnn_sized(0.0).len() as f64;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    let mut times = Vec::new();
    let mut plain_bytes = (0usize, 0usize);
    for secure in [false, true] {
        let m = rt.block_on(measure(clients, rounds, train, secure))?;
        if !secure {
            plain_bytes = (m.msg_received as usize, m.msg_sent as usize);
        }
        println!(
            "{}: {clients} clients x {params} params, {rounds} rounds, training {:?}: {:.3} s/round (median of rounds 2-{rounds})",
            if secure {
                "SecAgg+ (k=10, t=6)"
            } else {
                "plain"
            },
            train,
            m.per_round
        );
        println!(
            "  per client per round: up {:.2} MiB of messages ({:.3} B/param), {:.2} MiB UDP ({:.3} B/param); down {:.2} MiB of messages, {:.2} MiB UDP; payload {:.2} MiB",
            mib(m.msg_sent),
            m.msg_sent / params,
            mib(m.udp_sent),
            m.udp_sent / params,
            mib(m.msg_received),
            mib(m.udp_received),
            mib(params * 4.0)
        );
        times.push(m.per_round);
    }
    println!(
        "SecAgg+ round time / plain round time: {:.2}",
        times[1] / times[0]
    );
    let (down, up) = plain_bytes;
    let floor = rt.block_on(transport_floor(clients, rounds, down, up))?;
    println!(
        "transport floor (bare quinn, same TLS and transport settings, {clients} connections, {:.2} MiB down and {:.2} MiB up per client per round): {floor:.3} s/round (median of rounds 2-{rounds})",
        mib(down as f64),
        mib(up as f64)
    );
    println!(
        "plain round time / transport floor: {:.2}",
        times[0] / floor
    );
    Ok(())
}
