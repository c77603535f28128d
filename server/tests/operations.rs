//! Operating the server as an operator would (issue "Operating Flotilla"): the real
//! `flotilla-server` binary as a separate process, stopped by signals, read through its logs;
//! clients told clearly who refused whom.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use rustix::process::{Pid, Signal, kill_process};

fn signal(child: &Child, sig: Signal) {
    let pid = Pid::from_raw(child.id() as i32).unwrap();
    kill_process(pid, sig).unwrap();
}

/// Waits for `child` to exit; its status and how long that took, or `None` after `within`.
async fn exit_within(
    child: &mut Child,
    within: Duration,
) -> Option<(std::process::ExitStatus, Duration)> {
    let start = Instant::now();
    while start.elapsed() < within {
        if let Some(s) = child.try_wait().unwrap() {
            return Some((s, start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Waits until the log file holds a line containing `needle`.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_server_within_3s_and_the_log_says_what_it_waits_for() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["c1", "c2"]);
    let mut cfg = config(&pki, dir.path(), 1000);
    cfg.rounds.num_rounds = 1000;
    cfg.rounds.min_available_clients = 3;
    let mut server = ServerProcess::spawn(cfg, dir.path());
    wait_listening(&pki, server.addr).await;
    let line = log_line(
        &server.log,
        "waiting for 3 eligible clients",
        Duration::from_secs(10),
    )
    .await;
    assert!(line.contains("have 0 eligible of 0 enrolled"), "{line}");
    // Two of the three clients: the log says how many it has.
    let (_c1, _s1) = good_client(
        &pki,
        "c1",
        server.addr,
        Delta {
            n: 1000,
            pause: Duration::ZERO,
        },
    );
    let (_c2, _s2) = good_client(
        &pki,
        "c2",
        server.addr,
        Delta {
            n: 1000,
            pause: Duration::ZERO,
        },
    );
    log_line(
        &server.log,
        "have 2 eligible of 2 enrolled",
        Duration::from_secs(10),
    )
    .await;

    signal(&server.child, Signal::TERM);
    let (status, took) = exit_within(&mut server.child, Duration::from_secs(3))
        .await
        .expect("the server did not exit within 3 s of SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    eprintln!("server exited {took:?} after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_round_with_a_training_client_stops_the_server_within_3s() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["c1", "c2"]);
    let mut cfg = config(&pki, dir.path(), 1000);
    cfg.rounds.num_rounds = 1000;
    let mut server = ServerProcess::spawn(cfg, dir.path());
    wait_listening(&pki, server.addr).await;
    // Both train for a long time: the round is in flight when the signal comes.
    let slow = Delta {
        n: 1000,
        pause: Duration::from_secs(30),
    };
    let (_c1, _s1) = good_client(&pki, "c1", server.addr, slow.clone());
    let (_c2, _s2) = good_client(&pki, "c2", server.addr, slow);
    log_line(
        &server.log,
        "round 1: 2 clients training",
        Duration::from_secs(10),
    )
    .await;
    signal(&server.child, Signal::TERM);
    let (status, _) = exit_within(&mut server.child, Duration::from_secs(3))
        .await
        .expect("the server did not exit within 3 s of SIGTERM mid-round");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_line_names_each_failed_client_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["fast1", "fast2", "slow"]);
    let mut cfg = config(&pki, dir.path(), 100);
    cfg.rounds.num_rounds = 1;
    cfg.rounds.min_available_clients = 3;
    cfg.rounds.round_timeout_secs = 2.0;
    cfg.strategy.min_train_clients = 3;
    let server = ServerProcess::spawn(cfg, dir.path());
    wait_listening(&pki, server.addr).await;
    let fast = Delta {
        n: 100,
        pause: Duration::ZERO,
    };
    let (_a, _sa) = good_client(&pki, "fast1", server.addr, fast.clone());
    let (_b, _sb) = good_client(&pki, "fast2", server.addr, fast);
    let (_c, _sc) = good_client(
        &pki,
        "slow",
        server.addr,
        Delta {
            n: 100,
            pause: Duration::from_secs(10),
        },
    );
    let line = log_line(&server.log, "round 1 done", Duration::from_secs(20)).await;
    assert!(
        line.contains("2/3 results; 1 failure: slow (no answer before the deadline)"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &[]);
    let mut cfg = config(&pki, dir.path(), 10);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
    let path = dir.path().join("server.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let log = dir.path().join("json.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-server"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    log_line(&log, "waiting for", Duration::from_secs(10)).await;
    signal(&child, Signal::TERM);
    let (status, _) = exit_within(&mut child, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{l}"
        );
    }
}

#[test]
fn a_user_error_is_one_line_without_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla-server"))
        .args(["run", "--config"])
        .arg(dir.path().join("missing.toml"))
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("missing.toml"),
        "{err}"
    );
    assert!(!err.contains("backtrace"), "{err}");
}

/// A restarted server (same address, same key) resets its predecessor's connections, so
/// clients come back within seconds, not after the 60 s QUIC idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_back_within_seconds_after_the_server_is_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["c1", "c2"]);
    let mut cfg = config(&pki, dir.path(), 100);
    cfg.rounds.num_rounds = 1000;
    cfg.rounds.min_available_clients = 3; // no round starts: the clients just stay enrolled
    let first = ServerProcess::spawn(cfg.clone(), dir.path());
    wait_listening(&pki, first.addr).await;
    let addr = first.addr;
    let (_c1, _s1) = good_client(
        &pki,
        "c1",
        addr,
        Delta {
            n: 100,
            pause: Duration::ZERO,
        },
    );
    let (_c2, _s2) = good_client(
        &pki,
        "c2",
        addr,
        Delta {
            n: 100,
            pause: Duration::ZERO,
        },
    );
    log_line(
        &first.log,
        "have 2 eligible of 2 enrolled",
        Duration::from_secs(10),
    )
    .await;
    drop(first); // SIGKILL
    // The same configuration, address and key: a new process.
    let second_dir = dir.path().join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let mut cfg2 = cfg;
    cfg2.listen = addr;
    let second = ServerProcess::spawn_at(cfg2, &second_dir);
    let restarted = Instant::now();
    log_line(
        &second.log,
        "have 2 eligible of 2 enrolled",
        Duration::from_secs(15),
    )
    .await;
    let took = restarted.elapsed();
    eprintln!("both clients enrolled again {took:?} after the restart");
    assert!(took < Duration::from_secs(15));
}

/// Runs one client with `options` against a live in-process server; its error.
async fn client_error(options: ClientOptions) -> flotilla_client::Error {
    let (_stop, rx) = watch::channel(false);
    let t = Delta {
        n: 10,
        pause: Duration::ZERO,
    };
    match tokio::time::timeout(Duration::from_secs(20), run_client(options, t, rx)).await {
        Ok(Err(e)) => e,
        Ok(Ok(_)) => panic!("the client was accepted"),
        Err(_) => panic!("the client kept retrying instead of saying what is wrong"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_certificate_says_which_side_refused_which() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["c1"]);
    let other = PkiDir::new(dir.path().join("other"));
    other.init("some other CA").unwrap();
    other.issue_client("c1").unwrap();
    let mut server = flotilla_server::start(config(&pki, dir.path(), 10), None).unwrap();
    let addr = server.local_addr;

    // We trust another CA: we refuse the server's certificate.
    let mut o = options(&pki, "c1", addr);
    o.ca = load_certs(&other.ca_cert()).unwrap();
    o.max_attempts = Some(2);
    let e = client_error(o).await;
    let text = e.to_string();
    assert!(
        matches!(e, flotilla_client::Error::UntrustedServer(_)),
        "{e:?}"
    );
    assert!(
        text.contains("not trusted") && text.contains("UnknownIssuer") && text.contains("CA"),
        "{text}"
    );

    // The server's certificate is not for the name we ask for.
    let mut o = options(&pki, "c1", addr);
    o.server_name = "fl.example.org".into();
    o.max_attempts = Some(2);
    let e = client_error(o).await;
    let text = e.to_string();
    assert!(
        matches!(e, flotilla_client::Error::UntrustedServer(_)),
        "{e:?}"
    );
    assert!(
        text.contains("fl.example.org") && text.contains("--server-name"),
        "{text}"
    );

    // Our certificate is from another CA: the server refuses it.
    let mut o = options(&pki, "c1", addr);
    o.identity = Identity::load(&other.client_cert("c1"), &other.client_key("c1")).unwrap();
    o.max_attempts = Some(2);
    let e = client_error(o).await;
    let text = e.to_string();
    assert!(matches!(e, flotilla_client::Error::Refused(_)), "{e:?}");
    assert!(
        text.contains("the server refused our certificate"),
        "{text}"
    );
    server.shutdown();
    server.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_no_server_gives_up_each_attempt_within_the_connect_timeout() {
    // Nothing listens: each attempt ends at the connect timeout (not the 60 s idle timeout).
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["c1"]);
    let mut o = options(&pki, "c1", SocketAddr::from(([127, 0, 0, 1], port)));
    o.connect_timeout = Duration::from_millis(500);
    o.max_attempts = Some(3);
    let start = Instant::now();
    let e = client_error(o).await;
    let took = start.elapsed();
    assert!(matches!(e, flotilla_client::Error::Unreachable(_)), "{e:?}");
    assert!(e.to_string().contains("no answer from 127.0.0.1"), "{e}");
    // 3 × 0.5 s plus two back-offs of at most 0.1 and 0.2 s.
    assert!(took < Duration::from_secs(4), "{took:?}");
}

/// `GET path` over plain HTTP/1.1; status code and body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let code: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    // Chunked bodies: axum sends fixed-length ones for these routes.
    (code, body.to_string())
}

/// The samples of a text exposition: `name{labels}` → value.
fn samples(exposition: &str) -> std::collections::BTreeMap<String, f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {l:?}"));
            (
                name.to_string(),
                value
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("bad value in {l:?}")),
            )
        })
        .collect()
}

fn ops_config(pki: &PkiDir, dir: &Path, n: usize) -> ServerConfig {
    let mut cfg = config(pki, dir, n);
    cfg.operations.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_a_three_round_run() {
    const N: usize = 50_000; // 200 kB of parameters
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["c1", "c2"]);
    let mut server = flotilla_server::start(ops_config(&pki, dir.path(), N), None).unwrap();
    let ops = server.ops_addr.unwrap();
    let (code, body) = http_get(ops, "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (code, _) = http_get(ops, "/healthz").await;
    assert_eq!(code, 200);
    let fast = Delta {
        n: N,
        pause: Duration::ZERO,
    };
    let (c1, _s1) = good_client(&pki, "c1", server.local_addr, fast.clone());
    let (c2, _s2) = good_client(&pki, "c2", server.local_addr, fast);
    let summary = server.join().await.unwrap();
    assert_eq!(summary.history.len(), 3);
    let _ = tokio::join!(c1, c2);

    let (code, text) = http_get(ops, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        text.trim_end().ends_with("# EOF"),
        "not OpenMetrics: {text}"
    );
    for family in [
        "flotilla_rounds_completed",
        "flotilla_round_duration_seconds",
        "flotilla_round_phase_duration_seconds",
        "flotilla_received_bytes",
        "flotilla_client_drops",
        "flotilla_checkpoint_write_seconds",
        "flotilla_privacy_epsilon",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "no {family}:\n{text}"
        );
    }
    let m = samples(&text);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no sample {k}:\n{text}"));
    assert_eq!(get("flotilla_rounds_completed_total"), 3.0);
    assert_eq!(get("flotilla_rounds_aborted_total"), 0.0);
    assert_eq!(get("flotilla_round_duration_seconds_count"), 3.0);
    assert_eq!(get("flotilla_checkpoint_write_seconds_count"), 3.0);
    assert_eq!(
        get("flotilla_round_phase_duration_seconds_count{phase=\"train\"}"),
        3.0
    );
    assert_eq!(
        get("flotilla_round_phase_duration_seconds_count{phase=\"evaluate\"}"),
        3.0
    );
    assert_eq!(
        get("flotilla_client_drops_total{reason=\"malformed\"}"),
        0.0
    );
    assert_eq!(get("flotilla_round"), 3.0);
    let model_bytes = (N * 4) as f64;
    // Each round: both clients upload a model and download one (twice: train, evaluate).
    assert!(
        get("flotilla_received_bytes_total") > model_bytes * 2.0 * 3.0,
        "{text}"
    );
    assert!(
        get("flotilla_sent_bytes_total") > model_bytes * 2.0 * 3.0,
        "{text}"
    );
    assert_eq!(
        get("flotilla_received_bytes_total"),
        summary.bytes_received as f64
    );
    assert_eq!(get("flotilla_sent_bytes_total"), summary.bytes_sent as f64);

    // Every metric the Grafana dashboard in the repository queries exists.
    let grafana = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json"),
    )
    .unwrap();
    let queried: std::collections::BTreeSet<&str> = grafana
        .match_indices("flotilla_")
        .map(|(i, _)| {
            let rest = &grafana[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|n| *n != "flotilla_server" && !n.starts_with("flotilla_federated"))
        .collect();
    assert!(queried.len() >= 10, "{queried:?}");
    for name in queried {
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "the Grafana dashboard queries {name}, which the server does not export"
        );
    }

    let (code, json) = http_get(ops, "/api/status").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["rounds_completed"], 3);
    assert_eq!(v["rounds"].as_array().unwrap().len(), 3);
    assert_eq!(v["rounds"][2]["accuracy"], 0.5);
    assert_eq!(v["phase"], "finished");
}

/// The Chromium of the Debian package (or `FLOTILLA_CHROMIUM`).
fn chromium() -> String {
    if let Ok(p) = std::env::var("FLOTILLA_CHROMIUM") {
        return p;
    }
    for p in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return p.into();
        }
    }
    panic!(
        "no Chromium to test the dashboard with (apt install chromium, or set FLOTILLA_CHROMIUM)"
    );
}

/// Loads the dashboard in headless Chromium during a run; the rendered DOM (after its
/// scripts ran) and a screenshot.
fn render_dashboard(url: &str, shot: &Path) -> String {
    let browser = chromium();
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--window-size=1280,1000",
        // Time for the first fetch of /api/status and the render.
        "--virtual-time-budget=4000",
    ];
    let dom = Command::new(&browser)
        .args(common)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let shot_arg = format!("--screenshot={}", shot.display());
    let s = Command::new(&browser)
        .args(common)
        .arg(shot_arg)
        .arg(url)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    String::from_utf8_lossy(&dom.stdout).to_string()
}

/// The text of the element with `id` in a dumped DOM.
fn element_text<'a>(dom: &'a str, id: &str) -> &'a str {
    let open = format!("id=\"{id}\"");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap();
    &rest[start..start + end]
}

/// An attribute of the element with `id`.
fn element_attr<'a>(dom: &'a str, id: &str, attr: &str) -> &'a str {
    let open = format!("id=\"{id}\"");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let tag_start = dom[..at].rfind('<').unwrap();
    let tag_end = at + dom[at..].find('>').unwrap();
    let tag = &dom[tag_start..tag_end];
    let key = format!("{attr}=\"");
    let v = tag
        .find(&key)
        .unwrap_or_else(|| panic!("#{id} has no {attr}: {tag}"))
        + key.len();
    &tag[v..v + tag[v..].find('"').unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_renders_the_live_run_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["c1", "c2"]);
    let mut cfg = ops_config(&pki, dir.path(), 1000);
    cfg.rounds.num_rounds = 1000;
    let server = flotilla_server::start(cfg, None).unwrap();
    let url = format!("http://{}/", server.ops_addr.unwrap());
    let paced = Delta {
        n: 1000,
        pause: Duration::from_millis(100),
    };
    let (_c1, _s1) = good_client(&pki, "c1", server.local_addr, paced.clone());
    let (_c2, _s2) = good_client(&pki, "c2", server.local_addr, paced);
    let start = Instant::now();
    while server.telemetry.status().rounds_completed < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "3 rounds took too long"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = server.telemetry.status().rounds_completed;
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let page = url.clone();
    let shot2 = shot.clone();
    let dom = tokio::task::spawn_blocking(move || render_dashboard(&page, &shot2))
        .await
        .unwrap();
    let after = server.telemetry.status().rounds_completed;
    std::fs::write(artifacts.join("dashboard.html"), &dom).unwrap();
    eprintln!("dashboard screenshot: {}", shot.display());

    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page's script did not render:\n{dom}"
    );
    let shown: u64 = element_text(&dom, "rounds-completed").parse().unwrap();
    assert!(
        (before..=after).contains(&shown),
        "rendered {shown}, server had {before}..{after}"
    );
    assert_eq!(element_text(&dom, "clients-enrolled"), "2");
    assert_eq!(element_text(&dom, "accuracy"), "0.5000");
    // The chart has one point per completed round, on both lines.
    let points: u64 = element_attr(&dom, "chart", "data-points").parse().unwrap();
    assert!(points >= 3 && points <= after, "{points}");
    let acc = element_attr(&dom, "acc-line", "points");
    assert_eq!(acc.split_whitespace().count() as u64, points, "{acc}");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}

/// As a container runs it: uid 65534, the root filesystem read-only, only the checkpoint
/// volume writable. The server serves rounds and stops cleanly on SIGTERM. (Needs root to
/// set this up with `unshare` and `setpriv`, as CI has; elsewhere it says so and does nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_runs_unprivileged_on_a_read_only_root_filesystem() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to build the read-only, unprivileged sandbox");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &["c1", "c2"]);
    let volume = dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let mut cfg = config(&pki, dir.path(), 100);
    cfg.checkpoint_dir = volume.join("checkpoints");
    cfg.rounds.num_rounds = 1000;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg_path = dir.path().join("server.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();
    // The unprivileged user reads the configuration and the PKI and owns the volume.
    assert!(
        Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success()
    );
    let log = dir.path().join("server.log");
    let script = r#"
        mount --bind "$VOLUME" "$VOLUME"
        mount -o remount,bind,ro /
        exec setpriv --reuid=65534 --regid=65534 --clear-groups --no-new-privs \
            "$SERVER" run --config "$CONFIG"
    "#;
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-ec", script])
        .env("VOLUME", &volume)
        .env("SERVER", env!("CARGO_BIN_EXE_flotilla-server"))
        .env("CONFIG", &cfg_path)
        .env("RUST_LOG", "info,quinn=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    wait_listening(&pki, cfg.listen).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid}"
    );
    let fast = Delta {
        n: 100,
        pause: Duration::ZERO,
    };
    let (_c1, _s1) = good_client(&pki, "c1", cfg.listen, fast.clone());
    let (_c2, _s2) = good_client(&pki, "c2", cfg.listen, fast);
    log_line(&log, "round 2 done", Duration::from_secs(30)).await;
    let written = std::fs::read_dir(&cfg.checkpoint_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".ckpt")
        })
        .count();
    assert!(written >= 1, "no checkpoint written in the volume");
    signal(&child, Signal::TERM);
    let (st, _) = exit_within(&mut child, Duration::from_secs(3))
        .await
        .expect("no exit within 3 s of SIGTERM");
    assert_eq!(
        st.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_time_each_stage_of_a_secure_round() {
    let dir = tempfile::tempdir().unwrap();
    let ids = ["c1", "c2", "c3"];
    let pki = pki(dir.path(), &ids);
    let mut cfg = ops_config(&pki, dir.path(), 1000);
    cfg.rounds.num_rounds = 1;
    cfg.rounds.min_available_clients = 3;
    cfg.rounds.min_train_results = 3;
    cfg.strategy.min_train_clients = 3;
    cfg.secure_aggregation = Some(flotilla_protocol::secagg::SecAggConfig {
        neighbours: 0,
        threshold: 2,
        clip: 1.0,
        ..Default::default()
    });
    let mut server = flotilla_server::start(cfg, None).unwrap();
    let ops = server.ops_addr.unwrap();
    let mut stops = Vec::new();
    for id in ids {
        let mut o = options(&pki, id, server.local_addr);
        o.secure_aggregation = true;
        let (stop, rx) = watch::channel(false);
        tokio::spawn(run_client(
            o,
            Delta {
                n: 1000,
                pause: Duration::ZERO,
            },
            rx,
        ));
        stops.push(stop);
    }
    let summary = server.join().await.unwrap();
    assert!(
        summary.history[0].aborted.is_none(),
        "{:?}",
        summary.history[0]
    );
    assert!(summary.history[0].secagg.is_some());
    let (_, text) = http_get(ops, "/metrics").await;
    let m = samples(&text);
    for phase in [
        "secagg_advertise_keys",
        "secagg_share_keys",
        "secagg_masked_input",
        "secagg_consistency",
        "secagg_unmask",
        "secagg_unmasking",
    ] {
        let key = format!("flotilla_round_phase_duration_seconds_count{{phase=\"{phase}\"}}");
        assert_eq!(m.get(&key).copied(), Some(1.0), "{key}:\n{text}");
    }
    // Training is part of the masked-input stage in a secure round, not a phase of its own.
    assert_eq!(
        m.get("flotilla_round_phase_duration_seconds_count{phase=\"train\"}"),
        None,
        "{text}"
    );
}
