//! `flotilla-server`: run an aggregation server, manage the federation's certificates, export
//! the model.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla_crypto::pki::PkiDir;
use flotilla_protocol::cli::{LogFormat, exit_code, init_logging, stop_signals};
use flotilla_server::{ServerConfig, checkpoint};

#[derive(Parser, Debug)]
#[command(
    name = "flotilla-server",
    version,
    about = "Flotilla aggregation server (QUIC + mutual TLS)"
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
    /// Run the server.
    Run(RunArgs),
    /// Manage the federation's certificates.
    Certs {
        /// PKI directory (ca.crt, ca.key, server.*, clients/, crl.pem).
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Hours before now that new certificates are valid from (devices whose clock is
        /// behind still accept them).
        #[arg(long, default_value_t = 24)]
        backdate_hours: i64,
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Export the newest valid checkpoint's model as safetensors.
    Export {
        /// Checkpoint directory.
        #[arg(long, default_value = "checkpoints")]
        checkpoint_dir: PathBuf,
        /// Output file.
        #[arg(long, default_value = "model.safetensors")]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CertsAction {
    /// Create the federation CA (refuses to overwrite one).
    Init {
        /// CA name.
        #[arg(long, default_value = "Flotilla federation CA")]
        name: String,
    },
    /// Issue the server certificate for these DNS names / IP addresses.
    IssueServer {
        /// DNS names and IP addresses (repeat).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
    },
    /// Issue a client certificate (refuses an id that has one, unless --rotate).
    IssueClient {
        /// Client id (1-64 of A-Z a-z 0-9 . _ -).
        id: String,
        /// Issue a new certificate for an existing id (the old one stays valid until
        /// `revoke`, which revokes every certificate ever issued to the id).
        #[arg(long)]
        rotate: bool,
    },
    /// Revoke every certificate ever issued to a client (rewrites crl.pem; a running server
    /// picks it up within `limits.crl_reload_secs`, or at once on SIGHUP, and closes the
    /// client's connection).
    Revoke {
        /// Client id.
        id: String,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override: UDP address to listen on.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Override: number of rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// Override: clients needed to start a round.
    #[arg(long)]
    min_clients: Option<usize>,
    /// Override: round deadline in seconds.
    #[arg(long)]
    round_timeout: Option<f64>,
    /// Override: checkpoint directory.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Override: initial model (.safetensors or .ckpt).
    #[arg(long)]
    initial_model: Option<PathBuf>,
    /// Override: PKI directory holding ca.crt, server.crt, server.key and crl.pem.
    #[arg(long)]
    pki: Option<PathBuf>,
    /// Override: serve metrics (/metrics), the dashboard (/) and health checks (/healthz,
    /// /readyz) over plain HTTP on this TCP address. No TLS, no authentication: use
    /// localhost or a private network, or the operator's own TLS proxy.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Start anew when the checkpoint directory holds checkpoints none of which verifies
    /// (they are set aside as *.unreadable); without it the server refuses to start.
    #[arg(long)]
    fresh: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, "info,quinn=warn");
    let format = cli.log_format;
    exit_code(dispatch(cli.command), format)
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Certs {
            dir,
            backdate_hours,
            action,
        } => certs(
            PkiDir::new(dir).with_backdate(time::Duration::hours(backdate_hours.max(0))),
            action,
        ),
        Command::Export {
            checkpoint_dir,
            out,
        } => {
            let (path, snapshot, _) = checkpoint::latest_valid(&checkpoint_dir)?
                .with_context(|| format!("no valid checkpoint in {}", checkpoint_dir.display()))?;
            checkpoint::export_safetensors(&snapshot.global, &out)?;
            println!(
                "exported round {} from {} to {}",
                snapshot.round,
                path.display(),
                out.display()
            );
            Ok(())
        }
        Command::Run(args) => run(args),
    }
}

fn certs(pki: PkiDir, action: CertsAction) -> anyhow::Result<()> {
    match action {
        CertsAction::Init { name } => {
            pki.init(&name)?;
            println!(
                "created CA {} and empty CRL {}",
                pki.ca_cert().display(),
                pki.crl().display()
            );
        }
        CertsAction::IssueServer { names } => {
            pki.issue_server(&names)?;
            println!(
                "issued {} for {}",
                pki.server_cert().display(),
                names.join(", ")
            );
        }
        CertsAction::IssueClient { id, rotate } => {
            if rotate {
                pki.rotate_client(&id)?;
            } else {
                pki.issue_client(&id).map_err(|e| match e {
                    flotilla_crypto::Error::AlreadyExists(p) => anyhow::anyhow!(
                        "{id} already has a certificate ({}); pass --rotate to issue a new one",
                        p.display()
                    ),
                    other => other.into(),
                })?;
            }
            println!(
                "issued {} and {}",
                pki.client_cert(&id).display(),
                pki.client_key(&id).display()
            );
        }
        CertsAction::Revoke { id } => {
            pki.revoke(&id)?;
            let n = pki.serials_of(&id).map(|s| s.len()).unwrap_or(0);
            println!(
                "revoked {n} certificate(s) of {id}; {} updated",
                pki.crl().display()
            );
        }
    }
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(p) => ServerConfig::load(p)?,
        None => ServerConfig::default(),
    };
    if let Some(dir) = args.pki {
        let pki = PkiDir::new(dir);
        config.tls.ca = pki.ca_cert();
        config.tls.cert = pki.server_cert();
        config.tls.key = pki.server_key();
        config.tls.crl = pki.crl().exists().then(|| pki.crl());
    }
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = args.rounds {
        config.rounds.num_rounds = v;
    }
    if let Some(v) = args.min_clients {
        config.rounds.min_available_clients = v;
        config.rounds.min_train_results = config.rounds.min_train_results.min(v);
    }
    if let Some(v) = args.round_timeout {
        config.rounds.round_timeout_secs = v;
    }
    if let Some(v) = args.checkpoint_dir {
        config.checkpoint_dir = v;
    }
    if let Some(v) = args.initial_model {
        config.initial_model = Some(v);
    }
    if let Some(v) = args.metrics_listen {
        config.operations.listen = Some(v);
    }
    config.fresh = args.fresh;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut server = flotilla_server::start(config, None)?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let mut stop = stop_signals()?;
        let summary = loop {
            tokio::select! {
                s = server.join() => break s,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: re-reading the CRL");
                    server.reload_crl();
                }
                _ = stop.changed() => {
                    tracing::info!("stopping: telling clients, closing connections (checkpoints on disk are kept)");
                    server.shutdown();
                    break server.join().await;
                }
            }
        }?;
        let done = summary
            .history
            .iter()
            .filter(|r| r.aborted.is_none())
            .count();
        tracing::info!("{done} rounds completed");
        anyhow::Ok(())
    })
}
