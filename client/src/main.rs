//! `flotilla-client`: join a federation and train on local data.
//!
//! ```sh
//! flotilla-client --server fl.example.org:4433 \
//!     --pki pki --id client-7 --data ~/mnist --partition 7/100 --model cnn --backend cpu
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use flotilla_client::address::ServerAddr;
use flotilla_client::data::{Dataset, Split, bundled, load_idx_dir};
use flotilla_client::driver::{ClientOptions, run};
use flotilla_client::partition::{Partition, evaluation_shard};
use flotilla_client::{
    BackendKind, BurnTrainer, Cnn, LocalData, Mlp2nn, ModelKind, Precision, select_device_at,
};
use flotilla_crypto::pki::{Identity, PkiDir, load_certs};
use flotilla_protocol::cli::{LogFormat, exit_code, init_logging, stop_signals};

#[derive(Parser, Debug)]
#[command(
    name = "flotilla-client",
    version,
    about = "Flotilla edge client: trains locally with Burn, talks QUIC + mutual TLS"
)]
struct Args {
    /// Server address, HOST:PORT (UDP): a DNS name (resolved at each connection attempt),
    /// an IPv4 address or a bracketed IPv6 address.
    #[arg(long)]
    server: ServerAddr,
    /// Name the server's certificate must be issued for. Default: the host of --server
    /// (give it when connecting by IP address to a certificate issued for a DNS name).
    #[arg(long)]
    server_name: Option<String>,
    /// Seconds one connection attempt may take before it is retried (with back-off).
    #[arg(long, default_value_t = 5.0)]
    connect_timeout: f64,
    /// Log lines as text or as JSON objects (one per line), on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// PKI directory (ca.crt and clients/<id>.crt/.key); or give --ca/--cert/--key.
    #[arg(long)]
    pki: Option<PathBuf>,
    /// Client id (with --pki).
    #[arg(long)]
    id: Option<String>,
    /// CA certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Our certificate.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Our private key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Directory with MNIST-format IDX files, or "bundled" for the built-in MNIST subset.
    #[arg(long, default_value = "bundled")]
    data: String,
    /// Which share of the data this client holds: INDEX/COUNT (e.g. 3/10). Default: all.
    #[arg(long)]
    partition: Option<String>,
    /// How the data is split among COUNT clients: iid, shards, or dirichlet:<alpha>.
    #[arg(long, default_value = "iid")]
    split: String,
    /// Seed of the split (all clients of a federation must use the same).
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Model: cnn or 2nn.
    #[arg(long, default_value = "cnn")]
    model: String,
    /// Compute backend: cpu (burn flex), cuda, or (builds with their feature) ndarray,
    /// libtorch, cubecl-cpu.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Which GPU, with --backend cuda (0 = the first).
    #[arg(long, default_value_t = 0)]
    device_index: usize,
    /// Arithmetic precision of local training: f32, bf16 or f16 (mixed precision: f32
    /// master weights; the update sent is f32). bf16/f16 need a device that computes in them
    /// (CUDA); elsewhere the client says so and trains in f32.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Refuse secure aggregation (take part in plain rounds only). By default the client
    /// joins SecAgg+ rounds when the server runs them.
    #[arg(long)]
    no_secure_aggregation: bool,
}

/// `t` training in `precision`, or in f32 with one warning line where that cannot be done.
fn in_precision<M: flotilla_client::Classifier>(
    t: BurnTrainer<M>,
    precision: Precision,
) -> anyhow::Result<BurnTrainer<M>> {
    if precision == Precision::F32 {
        return Ok(t);
    }
    // `with_precision` consumes the trainer; check first so that it can be kept.
    let device = t.device().clone();
    if precision.dtype().is_some_and(|d| !device.supports_dtype(d)) {
        tracing::warn!("this device cannot compute in {precision}; training in f32 instead");
        return Ok(t);
    }
    Ok(t.with_precision(precision)?)
}

fn parse_split(s: &str) -> anyhow::Result<Partition> {
    Ok(match s {
        "iid" => Partition::Iid,
        "shards" => Partition::Shards { per_client: 2 },
        other => match other.strip_prefix("dirichlet:") {
            Some(a) => Partition::Dirichlet {
                alpha: a.parse().context("dirichlet alpha")?,
            },
            None => anyhow::bail!("unknown split {other:?} (iid, shards, dirichlet:<alpha>)"),
        },
    })
}

fn load(data: &str, split: Split) -> anyhow::Result<Dataset> {
    Ok(if data == "bundled" {
        bundled::mnist(split)?
    } else {
        load_idx_dir(std::path::Path::new(data), split)?
    })
}

/// `INDEX/COUNT` of `--partition`.
fn parse_partition(p: &str) -> anyhow::Result<(usize, usize)> {
    let (i, n) = p
        .split_once('/')
        .with_context(|| format!("--partition {p:?}: expected INDEX/COUNT, e.g. 3/10"))?;
    let i: usize = i.trim().parse().map_err(|_| {
        anyhow::anyhow!(
            "--partition {p:?}: INDEX {i:?} is not a whole number (expected INDEX/COUNT, e.g. 3/10)"
        )
    })?;
    let n: usize = n.trim().parse().map_err(|_| {
        anyhow::anyhow!(
            "--partition {p:?}: COUNT {n:?} is not a whole number (expected INDEX/COUNT, e.g. 3/10)"
        )
    })?;
    anyhow::ensure!(
        i < n,
        "--partition {p:?}: INDEX must be below COUNT (0-based: 0/{n} to {}/{n})",
        n.saturating_sub(1)
    );
    Ok((i, n))
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format, "info,quinn=warn");
    let format = args.log_format;
    exit_code(client(args), format)
}

fn client(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.connect_timeout.is_finite() && (0.1..=600.0).contains(&args.connect_timeout),
        "--connect-timeout must be between 0.1 and 600 seconds"
    );
    let (ca, cert, key) = match (&args.pki, &args.id) {
        (Some(dir), Some(id)) => {
            let pki = PkiDir::new(dir);
            (pki.ca_cert(), pki.client_cert(id), pki.client_key(id))
        }
        _ => (
            args.ca
                .clone()
                .context("give --pki and --id, or --ca, --cert and --key")?,
            args.cert
                .clone()
                .context("--cert is required without --pki")?,
            args.key
                .clone()
                .context("--key is required without --pki")?,
        ),
    };
    let identity = Identity::load_for_device(&cert, &key)?;
    if let Err(e) = identity.check_validity(time::OffsetDateTime::now_utc()) {
        // Not fatal: the clock may be wrong and set right later (the connection attempts
        // say so each time); the server decides.
        tracing::error!(
            "{e} by this device's clock ({}); check the clock (NTP) if the certificate is new",
            time::OffsetDateTime::now_utc()
        );
    }
    let ca = load_certs(&ca)?;

    let train = load(&args.data, Split::Train)?;
    let test = load(&args.data, Split::Test)?;
    let (train_local, test_local) = match &args.partition {
        None => (LocalData::all(train), LocalData::all(test)),
        Some(p) => {
            let (i, n) = parse_partition(p)?;
            let how = parse_split(&args.split)?;
            let tr = how.split(&train.labels, train.num_classes, n, args.split_seed)?;
            // The evaluation split does not depend on the training partition count.
            let te = evaluation_shard(test.labels.len(), i, n, args.split_seed)?;
            let tr = tr.into_iter().nth(i);
            (
                LocalData::subset(train, tr.context("partition")?)?,
                LocalData::subset(test, te)?,
            )
        }
    };
    tracing::info!(
        "{} training and {} test examples",
        train_local.len(),
        test_local.len()
    );

    let backend: BackendKind = args.backend.parse()?;
    let (device, used) = select_device_at(backend, args.device_index);
    let precision: Precision = args.precision.parse()?;
    let server_name = args
        .server_name
        .clone()
        .unwrap_or_else(|| args.server.host().to_string());
    let mut options = ClientOptions::new(args.server.clone(), server_name, identity, ca);
    options.connect_timeout = Duration::from_secs_f64(args.connect_timeout);
    options.capabilities.backend = used.to_string();
    options.secure_aggregation = !args.no_secure_aggregation;
    // The example count is the FedAvg weight: under secure aggregation it is only sent
    // masked, so it is not announced in the clear either.
    options.capabilities.num_examples =
        (!options.secure_aggregation).then_some(train_local.len() as u64);
    let model: ModelKind = args.model.parse()?;

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut signals = stop_signals()?;
        tokio::spawn(async move {
            if signals.changed().await.is_ok() {
                let _ = stop_tx.send(true);
            }
        });
        let side = train_local.data.rows;
        let classes = train_local.data.num_classes;
        let stats = match model {
            ModelKind::Cnn => {
                let t = BurnTrainer::new(
                    Cnn::new(side, classes, &device),
                    train_local,
                    Some(test_local),
                )?;
                run(options, in_precision(t, precision)?, stop_rx).await?.1
            }
            ModelKind::Mlp2nn => {
                let t = BurnTrainer::new(
                    Mlp2nn::new(side * side, classes, &device),
                    train_local,
                    Some(test_local),
                )?;
                run(options, in_precision(t, precision)?, stop_rx).await?.1
            }
        };
        tracing::info!(
            "trained {} rounds, {} evaluations; {:.1} MB sent, {:.1} MB received",
            stats.rounds_trained,
            stats.evaluations,
            stats.udp_bytes_sent as f64 / 1e6,
            stats.udp_bytes_received as f64 / 1e6
        );
        anyhow::Ok(())
    })
}
