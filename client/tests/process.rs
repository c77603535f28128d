//! The `flotilla-client` binary as an operator runs it: a separate process, stopped by
//! SIGTERM (what systemd, Docker and Kubernetes send) with or without a server, and its user
//! errors.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_crypto::pki::PkiDir;
use flotilla_server::ServerConfig;
use rustix::process::{Pid, Signal, kill_process};

fn pki(dir: &Path) -> PkiDir {
    let pki = PkiDir::new(dir.join("pki"));
    pki.init("client process test CA").unwrap();
    pki.issue_server(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    pki.issue_client("c1").unwrap();
    pki
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The client binary with its log (standard error) in `log`.
fn spawn_client(dir: &Path, server: &str, extra: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_flotilla-client"))
        .args([
            "--server", server, "--id", "c1", "--data", "bundled", "--model", "2nn",
        ])
        .arg("--pki")
        .arg(dir.join("pki"))
        .args(extra)
        .env("RUST_LOG", "info,quinn=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap()
}

async fn log_line(log: &Path, needle: &str, within: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        if start.elapsed() > within {
            panic!("no log line with {needle:?} within {within:?}; log:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then the exit status within 3 s.
async fn terminate(child: &mut Child, log: &Path) -> std::process::ExitStatus {
    kill_process(Pid::from_raw(child.id() as i32).unwrap(), Signal::TERM).unwrap();
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            eprintln!("client exited {:?} after SIGTERM", start.elapsed());
            return s;
        }
        if start.elapsed() > Duration::from_secs(3) {
            let _ = child.kill();
            panic!(
                "the client did not exit within 3 s of SIGTERM; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_client_that_cannot_reach_its_server_within_3s() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let log = dir.path().join("client.log");
    let server = format!("127.0.0.1:{}", free_port());
    let mut child = spawn_client(dir.path(), &server, &["--connect-timeout", "1"], &log);
    // The attempt fails at the connect timeout and the back-off is visible.
    let line = log_line(&log, "reconnecting in", Duration::from_secs(20)).await;
    assert!(line.contains("no answer from 127.0.0.1"), "{line}");
    // Mid-attempt or mid-back-off: either way it stops at once.
    let status = terminate(&mut child, &log).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_client_in_the_middle_of_local_training_within_3s() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let mut cfg = ServerConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        checkpoint_dir: dir.path().join("checkpoints"),
        ..ServerConfig::default()
    };
    cfg.tls.ca = pki.ca_cert();
    cfg.tls.cert = pki.server_cert();
    cfg.tls.key = pki.server_key();
    cfg.rounds.num_rounds = 1;
    cfg.rounds.min_available_clients = 1;
    cfg.rounds.min_train_results = 1;
    cfg.rounds.model_quorum = 1;
    cfg.rounds.round_timeout_secs = 600.0;
    cfg.strategy.min_train_clients = 1;
    cfg.strategy.min_evaluate_clients = 1;
    // Minutes of local training: the signal comes in the middle of it.
    cfg.train.epochs = 1000;
    let server = flotilla_server::start(cfg, None).unwrap();
    let log = dir.path().join("client.log");
    let mut child = spawn_client(
        dir.path(),
        &server.local_addr.to_string(),
        &["--server-name", "localhost", "--no-secure-aggregation"],
        &log,
    );
    let line = log_line(&log, "round 1: training", Duration::from_secs(30)).await;
    assert!(line.contains("1000 epoch(s)"), "{line}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = terminate(&mut child, &log).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("stopping the local training"), "{text}");
}

#[test]
fn user_errors_are_one_line_without_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    for (args, expect) in [
        (
            vec!["--partition", "a/3"],
            "--partition \"a/3\": INDEX \"a\" is not a whole number",
        ),
        (vec!["--partition", "3/3"], "INDEX must be below COUNT"),
        (vec!["--partition", "3"], "expected INDEX/COUNT"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla-client"))
            .args(["--server", "127.0.0.1:9", "--id", "c1", "--data", "bundled"])
            .arg("--pki")
            .arg(dir.path().join("pki"))
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(expect),
            "{err}"
        );
        assert!(!err.contains("backtrace"), "{err}");
    }
    // An address without a port is refused by the argument parser, naming the form.
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-client"))
        .args(["--server", "fl.example.org", "--id", "c1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HOST:PORT"), "{err}");
}
