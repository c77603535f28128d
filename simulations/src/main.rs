//! `flotilla-sim`: run federations in one process.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use flotilla_protocol::cli::{LogFormat, exit_code, init_logging};
use flotilla_sim::quickstart;

#[derive(Parser, Debug)]
#[command(
    name = "flotilla-sim",
    version,
    about = "Flotilla simulations: a server and many clients in one process"
)]
struct Cli {
    /// Log lines as text or as JSON objects (one per line), on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A real federation on this machine: throwaway PKI, server and 10 clients over QUIC +
    /// mTLS on loopback, bundled MNIST subset, 5 rounds of FedAvg. Offline.
    Quickstart {
        /// Output directory (default: out/quickstart-<date>-<time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Number of clients.
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Rounds.
        #[arg(long, default_value_t = 5)]
        rounds: u64,
        /// Local epochs per round.
        #[arg(long, default_value_t = 1)]
        epochs: u32,
        /// Learning rate.
        #[arg(long, default_value_t = 0.02)]
        lr: f64,
        /// SGD momentum.
        #[arg(long, default_value_t = 0.9)]
        momentum: f64,
        /// Backend: cpu, ndarray or cuda.
        #[arg(long, default_value = "cpu")]
        backend: String,
        /// No progress bar (plain lines).
        #[arg(long)]
        no_progress: bool,
        /// Plain aggregation: the server sees every update (SecAgg+ is on by default).
        #[arg(long)]
        no_secagg: bool,
    },
    /// What a GPU gives: CUDA devices found, CNN training samples/s (B = 10, 50, 256; f32,
    /// bf16, f16) next to flex on this CPU, the CNN IID preset's first rounds on CUDA vs the
    /// CPU from one seed, and the preset's time to 99 % on CUDA. Runs from a copied release
    /// binary (see scripts/gpu-check.sh); without a GPU it prints the CPU figures only.
    GpuCheck {
        /// MNIST IDX directory (the preset runs are skipped without it).
        #[arg(long)]
        data: Option<PathBuf>,
        /// The preset experiment.
        #[arg(long, default_value = "experiments/mcmahan-cnn-iid.toml")]
        preset: PathBuf,
        /// Output directory of the preset runs.
        #[arg(long, default_value = "out/gpu-check")]
        out: PathBuf,
        /// Examples per timed epoch on the GPU (the CPU gets a fifth).
        #[arg(long, default_value_t = 5000)]
        samples: usize,
        /// Timed runs per throughput figure.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Most rounds of the run to the target.
        #[arg(long, default_value_t = 60)]
        max_rounds: u64,
        /// Throughput only (skip the preset runs).
        #[arg(long)]
        throughput_only: bool,
        /// Skip the throughput figures (the preset runs only).
        #[arg(long)]
        no_throughput: bool,
    },
    /// Run an experiment file (see experiments/): many virtual clients, in memory or over real
    /// QUIC, the real round machines, metrics (CSV, JSON), curves (SVG, PNG) and a summary.
    Run {
        /// The experiment TOML.
        experiment: PathBuf,
        /// Override the file's transport: `memory` or `quic`.
        #[arg(long, value_parser = ["memory", "quic"])]
        transport: Option<String>,
        /// Override the number of clients.
        #[arg(long)]
        clients: Option<usize>,
        /// Override the number of rounds.
        #[arg(long)]
        rounds: Option<u64>,
        /// Training workers (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        /// Override the file's backend: cpu or cuda.
        #[arg(long)]
        backend: Option<String>,
        /// On CUDA, training workers per GPU.
        #[arg(long)]
        workers_per_gpu: Option<usize>,
        /// Override the file's training precision: f32, bf16 or f16.
        #[arg(long)]
        precision: Option<String>,
        /// Output directory (default: out/<experiment name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Directory of the IDX files, overriding the file's data.dir.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Plain lines instead of a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Runs several experiment files and compares them on the federation's clock (time to
    /// target in simulated hours, rounds, bytes) with one chart of accuracy against time:
    /// `compare experiments/async-2nn-*.toml` is synchronous rounds against FedBuff.
    Compare {
        /// The experiment files.
        #[arg(required = true)]
        experiments: Vec<PathBuf>,
        /// Output directory (default: out/compare).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The Byzantine experiment: 20 clients, 4 sending sign-flipped updates ×10, FedAvg
    /// against the robust strategies (in memory, real Burn training, bundled MNIST subset).
    Byzantine {
        /// Rounds.
        #[arg(long, default_value_t = 10)]
        rounds: u64,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, "warn");
    let format = cli.log_format;
    exit_code(dispatch(cli.command), format)
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Compare { experiments, out } => {
            let out = out.unwrap_or_else(|| PathBuf::from("out").join("compare"));
            flotilla_sim::compare::compare(&experiments, &out)?;
            Ok(())
        }
        Command::Run {
            experiment,
            transport,
            clients,
            rounds,
            workers,
            backend,
            workers_per_gpu,
            precision,
            out,
            data,
            no_progress,
        } => {
            use flotilla_sim::experiment::{Experiment, Transport};
            let mut exp = Experiment::load(&experiment)?;
            if let Some(d) = data {
                exp.data.dir = Some(d);
            }
            match transport.as_deref() {
                Some("quic") => exp.transport = Transport::Quic,
                Some("memory") => exp.transport = Transport::Memory,
                _ => {}
            }
            if let Some(n) = clients {
                anyhow::ensure!(n >= 1, "--clients must be at least 1");
                exp.clients = n;
            }
            if let Some(r) = rounds {
                exp.rounds = r;
            }
            if workers.is_some() {
                exp.workers = workers;
            }
            if let Some(b) = backend {
                exp.backend = b.parse()?;
            }
            if workers_per_gpu.is_some() {
                exp.workers_per_gpu = workers_per_gpu;
            }
            if let Some(p) = precision {
                exp.precision = p.parse()?;
            }
            let out = out.unwrap_or_else(|| PathBuf::from("out").join(&exp.name));
            println!(
                "{}: {} clients ({:?} transport), C = {}, {} rounds at most, model {}, {:?}",
                exp.name,
                exp.clients,
                exp.transport,
                exp.fraction,
                exp.rounds,
                exp.model,
                exp.partition
            );
            let s = flotilla_sim::experiment::run(&exp, &out, !no_progress)?;
            println!(
                "done: {} rounds in {:.1}s, final accuracy {:.4}, best {:.4}{}",
                s.rounds,
                s.wall_secs,
                s.final_accuracy,
                s.best_accuracy,
                match (exp.target_accuracy, s.rounds_to_target) {
                    (Some(t), Some(r)) => format!(", {t} reached in {r:.1} rounds"),
                    (Some(t), None) => format!(", {t} not reached"),
                    _ => String::new(),
                }
            );
            println!("outputs in {}", out.display());
            Ok(())
        }
        Command::GpuCheck {
            data,
            preset,
            out,
            samples,
            repeats,
            max_rounds,
            throughput_only,
            no_throughput,
        } => {
            let opts = flotilla_sim::gpucheck::Options {
                preset,
                data,
                out,
                samples,
                repeats,
                max_rounds,
                throughput_only,
                skip_throughput: no_throughput,
                ..Default::default()
            };
            flotilla_sim::gpucheck::run(&opts)?;
            Ok(())
        }
        Command::Byzantine { rounds } => {
            let opts = flotilla_sim::byzantine::Options {
                rounds,
                ..Default::default()
            };
            let rows = flotilla_sim::byzantine::run(&opts)?;
            print!("{}", flotilla_sim::byzantine::table(&opts, &rows));
            Ok(())
        }
        Command::Quickstart {
            out,
            clients,
            rounds,
            epochs,
            lr,
            momentum,
            backend,
            no_progress,
            no_secagg,
        } => {
            let out = out.unwrap_or_else(|| {
                let now = time::OffsetDateTime::now_utc();
                PathBuf::from(format!(
                    "out/quickstart-{:04}{:02}{:02}-{:02}{:02}{:02}",
                    now.year(),
                    now.month() as u8,
                    now.day(),
                    now.hour(),
                    now.minute(),
                    now.second()
                ))
            });
            let mut opts = quickstart::Options::new(out.clone());
            opts.clients = clients;
            opts.rounds = rounds;
            opts.epochs = epochs;
            opts.learning_rate = lr;
            opts.momentum = momentum;
            opts.backend = backend.parse()?;
            opts.progress = !no_progress;
            opts.secure_aggregation = !no_secagg;
            println!(
                "Flotilla quick start: {clients} clients, {rounds} rounds of FedAvg{} on the bundled MNIST subset, QUIC + mTLS on loopback",
                if no_secagg {
                    ""
                } else {
                    " with secure aggregation (SecAgg+)"
                }
            );
            let rt = tokio::runtime::Runtime::new()?;
            let s = rt.block_on(quickstart::run(opts))?;
            println!(
                "done: {} rounds in {:.1}s, final test accuracy {}, {:.1} MB sent / {:.1} MB received by clients",
                s.rounds_completed,
                s.wall_time_secs,
                s.final_accuracy
                    .map(|a| format!("{a:.4}"))
                    .unwrap_or_else(|| "n/a".into()),
                s.bytes_sent as f64 / 1e6,
                s.bytes_received as f64 / 1e6
            );
            println!("summary: {}", out.join("summary.json").display());
            Ok(())
        }
    }
}
