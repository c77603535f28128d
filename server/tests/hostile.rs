//! Hostile peers against the real server over real QUIC and mutual TLS on loopback.
//!
//! Attackers are raw quinn connections with good (enrolled) certificates that write
//! hand-made frames; the good clients are the real client driver. Memory bounds are measured
//! on the real `flotilla-server` binary run as a separate process (its resident set from
//! `/proc`), the rest on a server in this process. Each test asserts the bound the threat
//! model promises (see `docs/threat-model.md`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;

// ---------------------------------------------------------------------------------------
// 1. Unbounded state from one enrolled client

/// An enrolled client sends, again and again, results with 10,000 distinct metric names and
/// aborts with a 1 MB reason. Each is refused at decode (LimitExceeded) and the sender is
/// dropped; the server's memory grows by less than 100 MB; the rounds complete with the good
/// clients; checkpoints keep `history_window` records whatever the number of rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_flood_is_refused_and_state_stays_bounded() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["good-0", "good-1", "evil"]);
    let mut cfg = config(&pki, tmp.path(), 10_000);
    cfg.rounds.num_rounds = 12;
    cfg.rounds.history_window = 3;
    cfg.rounds.round_timeout_secs = 5.0;
    let server = ServerProcess::spawn(cfg, tmp.path());
    let addr = server.addr;
    wait_listening(&pki, addr).await;
    // Rounds of about a second, so that the attack overlaps several of them.
    let trainer = Delta {
        n: 10_000,
        pause: Duration::from_secs(1),
    };
    let (g0, s0) = good_client(&pki, "good-0", addr, trainer.clone());
    let (g1, s1) = good_client(&pki, "good-1", addr, trainer);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss();
    // Header sizes of the checkpoints as they appear (only the last three stay on disk).
    let ckpt = tmp.path().join("checkpoints");
    let headers = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
    let watcher = {
        let (ckpt, headers) = (ckpt.clone(), headers.clone());
        tokio::spawn(async move {
            loop {
                for round in 1..=12u64 {
                    let p = ckpt.join(format!("round-{round:06}.ckpt"));
                    let mut h = headers.lock().unwrap();
                    // (A file can be pruned between two looks: read it once, fallibly.)
                    if !h.contains_key(&round)
                        && let Ok(b) = std::fs::read(&p)
                        && b.len() >= 12
                    {
                        h.insert(round, u32::from_le_bytes([b[8], b[9], b[10], b[11]]));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // The attacker: enroll, flood, get dropped, reconnect.
    let evil = identity(&pki, "evil");
    let mut refused = 0;
    let attack_until = Instant::now() + Duration::from_secs(8);
    let mut i = 0u64;
    while Instant::now() < attack_until {
        let Ok(conn) = raw_connect(&ep, &pki, addr, &evil, false).await else {
            continue;
        };
        if !enroll(&conn).await {
            continue;
        }
        // Mostly floods of metric names; every fourth time a 512 KB abort reason (our own
        // encoder would cut it, so it is written by hand).
        let sent = if i % 4 == 3 {
            send_raw_abort(&conn, 512 * 1024).await
        } else {
            let msg = Message::TrainResult(TrainRes {
                round: 1,
                num_examples: 10,
                metrics: flood_metrics(10_000),
                params: model(10_000, 0.0),
            });
            send_message(&conn, &msg).await.is_ok()
        };
        i += 1;
        if sent && let Some(reason) = dropped_because(&conn).await {
            let text = reason.to_string();
            assert!(text.contains("over the limit"), "{text}");
            refused += 1;
        }
        conn.close(0u32.into(), b"again");
    }
    let after = server.rss();
    eprintln!(
        "metric flood: {refused} floods refused in 8 s; server resident {} MB before, {} MB after",
        before / MB,
        after / MB
    );
    assert!(
        refused >= 10,
        "only {refused} floods went through the test loop"
    );
    assert!(
        after < before + 100 * MB,
        "server resident memory grew from {} MB to {} MB under the metric flood",
        before / MB,
        after / MB
    );

    let status = server.wait(Duration::from_secs(240)).await;
    watcher.abort();
    assert!(status.success());
    let _ = (s0.send(true), s1.send(true));
    let _ = (g0.await, g1.await);
    let records = history_lines(tmp.path());
    assert_eq!(records.len(), 12, "one history line per round");
    assert!(records.iter().all(|r| r.aborted.is_none()), "{records:?}");
    for r in &records {
        assert!(
            r.train_metrics.len() <= 32,
            "round {} kept {} metrics",
            r.round,
            r.train_metrics.len()
        );
    }
    let (snapshot, _) = flotilla_server::checkpoint::read(&ckpt.join("round-000012.ckpt")).unwrap();
    assert_eq!(snapshot.history.len(), 3, "the checkpoint keeps the window");
    let late = header_len(&ckpt.join("round-000012.ckpt"));
    let early = *headers
        .lock()
        .unwrap()
        .get(&4)
        .expect("saw round 4's checkpoint");
    eprintln!("checkpoint header: {early} bytes after round 4, {late} bytes after round 12");
    assert!(
        late <= 2 * early && late < 64 * 1024,
        "checkpoint header grew from {early} bytes at round 4 to {late} at round 12"
    );
}

/// Writes an Abort frame with a reason of `len` bytes by hand (our encoder refuses it).
async fn send_raw_abort(conn: &quinn::Connection, len: usize) -> bool {
    // postcard: variant tag of Control::Abort (8), Option<u64> None (0), AbortReason::Other
    // (4), varint length, bytes.
    let mut body = vec![8u8, 0, 4];
    let mut n = len;
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            body.push(b);
            break;
        }
        body.push(b | 0x80);
    }
    body.extend(std::iter::repeat_n(b'x', len));
    let mut frame = vec![b'F', b'L', flotilla_protocol::wire::codec::WIRE_VERSION, 0];
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    let Ok(mut s) = conn.open_uni().await else {
        return false;
    };
    s.write_all(&frame).await.is_ok() && s.finish().is_ok()
}

// ---------------------------------------------------------------------------------------
// 2. Allocation before the first model

/// Before any model exists, enrolled clients that were not asked for one declare 4 GiB
/// models, and unenrolled connections send payloads before their Hello. Nothing is
/// allocated: the server's memory grows by less than 100 MB, every such sender is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_payload_is_read_before_hello_or_before_the_model() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["evil-0", "evil-1"]);
    let mut cfg = config(&pki, tmp.path(), 10);
    cfg.initial_model = None; // no model: clients would be asked, once enough are enrolled
    cfg.rounds.min_available_clients = 5;
    cfg.rounds.min_train_results = 2;
    // This loop reconnects within a millisecond of closing, faster than the server notices
    // the close: the per-identity cap (its own defence) would refuse some attempts.
    cfg.limits.max_connections_per_identity = 8;
    let server = ServerProcess::spawn(cfg, tmp.path());
    let addr = server.addr;
    wait_listening(&pki, addr).await;
    let before = server.rss();
    let mut closed = 0;
    for i in 0..40 {
        let id = identity(&pki, if i % 2 == 0 { "evil-0" } else { "evil-1" });
        let conn = raw_connect(&ep, &pki, addr, &id, false).await.unwrap();
        let hello_first = i % 4 < 2;
        if hello_first {
            assert!(enroll(&conn).await);
        }
        // InitialParams declaring 2^30 f32 values (4 GiB), then a little of the payload.
        assert!(send_declared_model(&conn, 1 << 30).await);
        if hello_first {
            // Enrolled, not asked for a model: dropped with a typed reason.
            let reason = dropped_because(&conn).await.expect("dropped").to_string();
            assert!(reason.contains("payload"), "{reason}");
            closed += 1;
        } else {
            assert_eq!(
                closed_with(&conn, Duration::from_secs(5)).await,
                Some(u64::from(close::PROTOCOL_VIOLATION))
            );
            closed += 1;
        }
        conn.close(0u32.into(), b"again");
    }
    let after = server.rss();
    eprintln!(
        "pre-model payloads: 40 senders of 4 GiB models closed; server resident {} MB before, {} MB after",
        before / MB,
        after / MB
    );
    assert_eq!(closed, 40, "every sender was closed");
    // Their connection slots were all released: both identities can still enroll.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in ["evil-0", "evil-1"] {
        let conn = raw_connect(&ep, &pki, addr, &identity(&pki, id), false)
            .await
            .unwrap();
        assert!(enroll(&conn).await, "{id} can still connect");
    }
    assert!(
        after < before + 100 * MB,
        "server resident memory grew from {} MB to {} MB",
        before / MB,
        after / MB
    );
}

/// An InitialParams frame whose manifest declares `numel` values, followed by 64 KiB of them.
async fn send_declared_model(conn: &quinn::Connection, numel: u64) -> bool {
    let control = flotilla_protocol::wire::codec::Control::InitialParams {
        manifest: manifest(numel as usize),
    };
    let body = postcard::to_stdvec(&control).unwrap();
    let mut frame = vec![b'F', b'L', flotilla_protocol::wire::codec::WIRE_VERSION, 0];
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame.extend(std::iter::repeat_n(0u8, 64 * 1024));
    let mut s = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("open_uni: {e}");
            return false;
        }
    };
    let _ = s.write_all(&frame).await;
    true
}

// ---------------------------------------------------------------------------------------
// 3. Zombie connections

/// A client that enrolls and then grants no flow-control credit blocks the server's send
/// of its Train message: the send misses its deadline and the server closes the connection
/// (TOO_SLOW) within it; the round completes without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_closed_within_the_send_deadline() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["good-0", "good-1", "zombie"]);
    let mut cfg = config(&pki, tmp.path(), 200_000); // 800 KB model
    // One round: it needs all three enrolled, and the zombie will not be back.
    cfg.rounds.num_rounds = 1;
    cfg.rounds.min_available_clients = 3;
    cfg.limits.io_timeout_secs = 1.0;
    cfg.limits.min_transfer_rate = 1 << 20; // deadline: 1 s + 0.8 s
    let (etx, mut events) = mpsc::unbounded_channel();
    let server = flotilla_server::start(cfg, Some(etx)).unwrap();
    let addr = server.local_addr;
    let zombie = raw_connect(&ep, &pki, addr, &identity(&pki, "zombie"), true)
        .await
        .unwrap();
    assert!(enroll(&zombie).await);
    let t = Delta {
        n: 200_000,
        pause: Duration::ZERO,
    };
    let (g0, s0) = good_client(&pki, "good-0", addr, t.clone());
    let (g1, s1) = good_client(&pki, "good-1", addr, t);
    // The round starts when the third client enrolls; the zombie's Train send then blocks.
    let started = loop {
        match events.recv().await.unwrap() {
            Event::RoundStarted { .. } => break Instant::now(),
            _ => continue,
        }
    };
    let code = closed_with(&zombie, Duration::from_secs(10)).await;
    let waited = started.elapsed();
    assert_eq!(code, Some(u64::from(close::TOO_SLOW)), "closed as too slow");
    assert!(waited < Duration::from_secs(6), "closed after {waited:?}");
    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = (s0.send(true), s1.send(true));
    let _ = (g0.await, g1.await);
    assert_eq!(summary.history.len(), 1);
    assert!(summary.history[0].aborted.is_none());
    assert_eq!(summary.history[0].results, 2);
    assert!(
        summary.history[0]
            .failures
            .iter()
            .any(|f| f.client.as_str() == "zombie")
    );
}

/// A connection that went silent is replaced by a new one with its identity, and the
/// server closes the old one itself (REPLACED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_connection_is_replaced_and_closed() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["a"]);
    let mut cfg = config(&pki, tmp.path(), 10);
    cfg.limits.live_connection_secs = 0.5;
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let id = identity(&pki, "a");
    let old = raw_connect(&ep, &pki, addr, &id, false).await.unwrap();
    assert!(enroll(&old).await);
    tokio::time::sleep(Duration::from_millis(800)).await; // silent: stale
    let new = raw_connect(&ep, &pki, addr, &id, false).await.unwrap();
    assert!(enroll(&new).await, "the newcomer is welcomed");
    assert_eq!(
        closed_with(&old, Duration::from_secs(5)).await,
        Some(u64::from(close::REPLACED))
    );
    assert!(new.close_reason().is_none());
    server.shutdown();
    let _ = server.wait().await;
}

/// A connection that never says Hello is closed after the Hello deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_hello_is_closed() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["mute"]);
    let mut cfg = config(&pki, tmp.path(), 10);
    cfg.limits.hello_timeout_secs = 0.5;
    let server = flotilla_server::start(cfg, None).unwrap();
    let conn = raw_connect(&ep, &pki, server.local_addr, &identity(&pki, "mute"), false)
        .await
        .unwrap();
    assert_eq!(
        closed_with(&conn, Duration::from_secs(5)).await,
        Some(u64::from(close::NO_HELLO))
    );
    server.shutdown();
    let _ = server.wait().await;
}

// ---------------------------------------------------------------------------------------
// 5. Slow clients

/// A client that heartbeats but never finishes training misses its first two deadlines,
/// then sits out: later rounds sample only the others and end without waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_excluded_after_missing_its_deadlines() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["fast-0", "fast-1", "slow"]);
    let mut cfg = config(&pki, tmp.path(), 100);
    cfg.rounds.num_rounds = 6;
    cfg.rounds.min_available_clients = 3; // all three enrolled before round 1
    cfg.rounds.round_timeout_secs = 1.0;
    cfg.rounds.max_missed_deadlines = 2;
    cfg.rounds.evaluate_every = 0;
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let fast = Delta {
        n: 100,
        pause: Duration::ZERO,
    };
    // Slower than the deadline; not so slow that the test's runtime waits long for its
    // blocking thread at the end.
    let slow = Delta {
        n: 100,
        pause: Duration::from_secs(4),
    };
    let (a, sa) = good_client(&pki, "fast-0", addr, fast.clone());
    let (b, sb) = good_client(&pki, "fast-1", addr, fast);
    let (c, _sc) = good_client(&pki, "slow", addr, slow);
    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = (sa.send(true), sb.send(true));
    let _ = (a.await, b.await);
    c.abort();
    let h = &summary.history;
    assert_eq!(h.len(), 6);
    for r in &h[..2] {
        assert_eq!(r.selected, 3, "round {}", r.round);
        assert_eq!(r.failures.len(), 1, "round {}: {:?}", r.round, r.failures);
        assert_eq!(r.failures[0].reason, FailureReason::Timeout);
        assert_eq!(r.failures[0].client.as_str(), "slow");
    }
    for r in &h[2..] {
        assert_eq!(r.selected, 2, "round {}: the straggler sits out", r.round);
        assert!(r.failures.is_empty(), "round {}: {:?}", r.round, r.failures);
        assert!(r.aborted.is_none());
    }
}

/// With over-selection, training closes as soon as the strategy's number of results is in:
/// a slow client among four does not hold any round, and is not recorded as failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_selection_closes_a_round_without_the_slowest() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["c0", "c1", "c2", "slow"]);
    let mut cfg = config(&pki, tmp.path(), 100);
    cfg.rounds.num_rounds = 3;
    cfg.rounds.min_available_clients = 4;
    cfg.rounds.round_timeout_secs = 600.0; // a round that waited for the slow one would hang
    cfg.rounds.evaluate_every = 0;
    cfg.rounds.over_selection = 0.5;
    cfg.strategy.fraction_train = 0.5; // 2 of 4, plus 1 over-selected
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let fast = Delta {
        n: 100,
        pause: Duration::ZERO,
    };
    let mut tasks = Vec::new();
    for id in ["c0", "c1", "c2"] {
        tasks.push(good_client(&pki, id, addr, fast.clone()));
    }
    let slow = good_client(
        &pki,
        "slow",
        addr,
        Delta {
            n: 100,
            pause: Duration::from_secs(4),
        },
    );
    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .expect("no round waited for the slow client")
        .unwrap();
    for (t, s) in tasks {
        let _ = s.send(true);
        let _ = t.await;
    }
    slow.0.abort();
    for r in &summary.history {
        assert_eq!(r.selected, 3, "round {}", r.round);
        assert_eq!(r.results, 2, "round {}", r.round);
        assert!(r.failures.is_empty(), "round {}: {:?}", r.round, r.failures);
    }
}

// ---------------------------------------------------------------------------------------
// 6. Copied certificate

/// A second device with a copy of a client's certificate connects again and again during
/// the run: each attempt is refused (IDENTITY_IN_USE), the owner takes part in every round,
/// and a real client driver with the copy says "another device is using this identity".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_certificate_cannot_evict_its_owner() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["owner", "other"]);
    let mut cfg = config(&pki, tmp.path(), 100);
    cfg.rounds.num_rounds = 6;
    cfg.rounds.evaluate_every = 0;
    let server = flotilla_server::start(cfg, None).unwrap();
    let addr = server.local_addr;
    let t = Delta {
        n: 100,
        pause: Duration::from_secs(1),
    };
    let (o, so) = good_client(&pki, "owner", addr, t.clone());
    let (x, sx) = good_client(&pki, "other", addr, t.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let copy = identity(&pki, "owner");
    let mut refused = 0;
    for _ in 0..5 {
        let conn = raw_connect(&ep, &pki, addr, &copy, false).await.unwrap();
        let _ = send_message(&conn, &hello()).await;
        if closed_with(&conn, Duration::from_secs(5)).await
            == Some(u64::from(close::IDENTITY_IN_USE))
        {
            refused += 1;
        }
    }
    assert_eq!(refused, 5);
    // The real client with the copy reports it, rather than retrying silently.
    let mut opts = options(&pki, "owner", addr);
    opts.max_attempts = Some(1);
    let (_stop, rx) = watch::channel(false);
    let err = run_client(opts, t, rx).await.unwrap_err().to_string();
    assert!(
        err.contains("another device is using this identity"),
        "{err}"
    );

    let summary = tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = (so.send(true), sx.send(true));
    let _ = (o.await, x.await);
    assert_eq!(summary.history.len(), 6);
    for r in &summary.history {
        assert_eq!(r.results, 2, "round {}: the owner took part", r.round);
        assert!(r.failures.is_empty(), "round {}: {:?}", r.round, r.failures);
    }
}

// ---------------------------------------------------------------------------------------
// 7. Revocation without a restart

/// `revoke` on a running server: the CRL file changes, the server re-reads it, closes the
/// revoked client's live connection (its driver stops with "revoked"), refuses its
/// reconnection at the handshake, and finishes the run with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_takes_effect_without_a_restart() {
    let ep = endpoint();
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["a", "b", "c"]);
    let mut cfg = config(&pki, tmp.path(), 100);
    cfg.rounds.num_rounds = 30;
    cfg.rounds.evaluate_every = 0;
    cfg.limits.crl_reload_secs = 0.2;
    let (etx, mut events) = mpsc::unbounded_channel();
    let server = flotilla_server::start(cfg, Some(etx)).unwrap();
    let addr = server.local_addr;
    let t = Delta {
        n: 100,
        pause: Duration::from_millis(50),
    };
    let (a, sa) = good_client(&pki, "a", addr, t.clone());
    let (b, sb) = good_client(&pki, "b", addr, t.clone());
    let (c, _sc) = good_client(&pki, "c", addr, t);
    loop {
        if let Event::RoundCompleted(_) = events.recv().await.unwrap() {
            break;
        }
    }
    pki.revoke("c").unwrap();
    let revoked_at = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), c)
        .await
        .expect("the revoked client was closed")
        .unwrap();
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    let err = end.unwrap_err().to_string();
    assert!(err.contains("revoked"), "{err}");
    // Its reconnection is refused at the handshake (the new CRL is in force).
    let conn = raw_connect(&ep, &pki, addr, &identity(&pki, "c"), false).await;
    let refused = match conn {
        Err(_) => true,
        Ok(conn) => {
            let _ = send_message(&conn, &hello()).await;
            tokio::time::timeout(Duration::from_secs(5), conn.closed())
                .await
                .is_ok()
        }
    };
    assert!(refused, "the revoked certificate still connects");
    let summary = tokio::time::timeout(Duration::from_secs(120), server.wait())
        .await
        .unwrap()
        .unwrap();
    let _ = (sa.send(true), sb.send(true));
    let _ = (a.await, b.await);
    assert_eq!(summary.history.len(), 30);
    assert!(summary.history.iter().all(|r| r.aborted.is_none()));
}

// ---------------------------------------------------------------------------------------
// 4. Handshake flood without a certificate

/// The first datagram a real quinn client sends: a QUIC Initial with a TLS ClientHello.
async fn capture_initial(pki: &PkiDir) -> Vec<u8> {
    let trap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = trap.local_addr().unwrap();
    let ep = endpoint();
    let id = identity(pki, "probe");
    let pki2 = pki.clone();
    let attempt = tokio::spawn(async move {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            raw_connect(&ep, &pki2, to, &id, false),
        )
        .await;
    });
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), trap.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    attempt.abort();
    buf.truncate(n);
    buf
}

/// 6,000 Initial packets from 200 source ports that never complete a handshake: the server
/// keeps at most a bounded number of half-open connections (address validation with Retry
/// above `retry_above_handshakes`, a cap, a short handshake timeout), so its memory grows by
/// less than 100 MB, it sends back less than it receives (no amplification), and the good
/// clients complete their rounds meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_is_bounded_and_good_clients_keep_training() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = pki(tmp.path(), &["good-0", "good-1"]);
    let mut cfg = config(&pki, tmp.path(), 1000);
    cfg.rounds.num_rounds = 6;
    cfg.rounds.evaluate_every = 0;
    let server = ServerProcess::spawn(cfg, tmp.path());
    let addr = server.addr;
    wait_listening(&pki, addr).await;
    let initial = capture_initial(&pki).await;
    assert!(initial.len() >= 1200, "an Initial is padded to 1200 bytes");
    assert_eq!(initial[0] & 0xf0, 0xc0, "a long-header Initial packet");
    let t = Delta {
        n: 1000,
        pause: Duration::from_millis(500),
    };
    let (g0, s0) = good_client(&pki, "good-0", addr, t.clone());
    let (g1, s1) = good_client(&pki, "good-1", addr, t);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss();

    let mut sockets = Vec::new();
    for _ in 0..200 {
        sockets.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    let mut sent = 0u64;
    for _burst in 0..30 {
        for s in &sockets {
            if s.send_to(&initial, addr).await.is_ok() {
                sent += initial.len() as u64;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What came back (drain every socket for a moment).
    let mut back = 0u64;
    let drain_until = Instant::now() + Duration::from_secs(1);
    let mut buf = vec![0u8; 2048];
    while Instant::now() < drain_until {
        let mut got = false;
        for s in &sockets {
            while let Ok((n, _)) = s.try_recv_from(&mut buf) {
                back += n as u64;
                got = true;
            }
        }
        if !got {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let after = server.rss();
    eprintln!(
        "handshake flood: sent {} KB of Initials from 200 ports, got {} KB back ({:.2}x); \
         server resident {} MB before, {} MB after",
        sent / 1024,
        back / 1024,
        back as f64 / sent as f64,
        before / MB,
        after / MB
    );
    assert!(
        after < before + 100 * MB,
        "server resident memory grew from {} MB to {} MB",
        before / MB,
        after / MB
    );
    assert!(
        back < sent,
        "amplification: {back} bytes back for {sent} sent"
    );

    let status = server.wait(Duration::from_secs(120)).await;
    assert!(status.success());
    let _ = (s0.send(true), s1.send(true));
    let _ = (g0.await, g1.await);
    let records = history_lines(tmp.path());
    assert_eq!(records.len(), 6);
    assert!(
        records
            .iter()
            .all(|r| r.aborted.is_none() && r.results == 2)
    );
}
