//! What Flotilla's binaries share: logging set-up (`--log-format text|json`), stop signals
//! (SIGTERM and SIGINT; a second one exits at once) and user errors printed as one line.

use std::io::IsTerminal;
use std::process::ExitCode;

use tokio::sync::watch;

/// How log lines are written (to standard error).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object per line (for journald, Loki, Elasticsearch ...): `timestamp`,
    /// `level`, `target`, `fields` (with `message` and structured fields such as `client`).
    Json,
}

/// Installs the process's log subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests calling `main`-like code twice) is not an error.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}

/// The process's exit code for `result`: 0, or 1 after printing the error as one line
/// (`error: what: why: root cause`) on standard error. No backtrace, whatever
/// `RUST_BACKTRACE` says: a user error is not a crash.
/// With JSON logs the error is a JSON log line (level ERROR) like every other line.
pub fn exit_code(result: anyhow::Result<()>, format: LogFormat) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match format {
                LogFormat::Text => eprintln!("error: {e:#}"),
                LogFormat::Json => tracing::error!("{e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

/// Which signal asked the process to stop.
pub fn signal_name(n: u8) -> &'static str {
    match n {
        1 => "SIGINT",
        2 => "SIGTERM",
        _ => "none",
    }
}

/// Watches SIGTERM (what systemd, Docker and Kubernetes send) and SIGINT (Ctrl-C). The
/// returned receiver changes to 1 (SIGINT) or 2 (SIGTERM) at the first one; a second signal
/// of either kind ends the process at once with status 130 (an operator pressing Ctrl-C
/// twice means it). Must be called inside a Tokio runtime.
pub fn stop_signals() -> std::io::Result<watch::Receiver<u8>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(0u8);
    tokio::spawn(async move {
        let mut seen = false;
        loop {
            let which = tokio::select! {
                Some(()) = int.recv() => 1u8,
                Some(()) = term.recv() => 2u8,
                else => return,
            };
            if seen {
                tracing::warn!("second {}: exiting now", signal_name(which));
                std::process::exit(130);
            }
            seen = true;
            tracing::info!(
                "{}: stopping (send it again to exit at once)",
                signal_name(which)
            );
            let _ = tx.send(which);
        }
    });
    Ok(rx)
}
