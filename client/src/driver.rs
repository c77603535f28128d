//! The client's driver: a quinn connection pumped into the sans-IO
//! [`Participant`](flotilla_protocol::Participant), with training run off the async runtime.
//!
//! * **Enrollment** is an application-level round trip: with TLS 1.3 over QUIC a server that
//!   refuses our certificate only says so after the handshake "succeeded" on our side, at the
//!   first stream. So the client counts itself enrolled only when the server's `Welcome`
//!   arrives, and reports a refused certificate as such (and does not retry it).
//! * **Training** runs in `spawn_blocking` (Burn is synchronous and CPU-bound); heartbeats and
//!   server messages keep flowing meanwhile. A result for a round the server has closed is
//!   refused by the participant and dropped.
//! * **Reconnection**: a lost connection or a restarting server is retried with exponential
//!   backoff and jitter; a finished federation or a shutdown request ends the loop cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flotilla_crypto::pki::Identity;
use flotilla_crypto::secagg::sign::{PeerVerifier, Signer};
use flotilla_crypto::tls;
use flotilla_protocol::quic::{IoDeadline, close, recv_message_timed, send_message_timed};
use flotilla_protocol::secagg::SecAggIdentity;
use flotilla_protocol::wire::codec::Limits;
use flotilla_protocol::wire::messages::{
    AbortReason, Capabilities, EvaluateRes, Metrics, ModelSummary, TrainConfig, TrainRes,
};
use flotilla_protocol::{Message, Params, Participant, ParticipantEvent};
use rand::Rng;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::Error;
use crate::address::ServerAddr;
use crate::trainer::Trainer;

/// How to reach the server and who we are.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Server address: `host:port` (a DNS name, resolved at each attempt, or an IP address).
    pub server: ServerAddr,
    /// Name in the server's certificate.
    pub server_name: String,
    /// Our certificate and key.
    pub identity: Identity,
    /// The federation CA.
    pub ca: Vec<CertificateDer<'static>>,
    /// First reconnection delay.
    pub backoff_initial: Duration,
    /// Longest reconnection delay.
    pub backoff_max: Duration,
    /// Give up after this many failed connection attempts in a row (`None`: never).
    pub max_attempts: Option<u32>,
    /// How long one connection attempt (name resolution, then the QUIC + TLS handshake)
    /// may take before it counts as failed and is retried after the back-off.
    pub connect_timeout: Duration,
    /// How long to wait for the server's welcome.
    pub enroll_timeout: Duration,
    /// Largest model accepted.
    pub max_model_bytes: u64,
    /// Deadline rule for reading or sending one message (a base plus its size at a
    /// minimum rate); a server slower than that is treated as lost.
    pub io_deadline: IoDeadline,
    /// Declared in the hello.
    pub capabilities: Capabilities,
    /// Take part in secure aggregation when the server asks for it (default: yes). The
    /// advertisements are signed with `identity`'s key; neighbours are checked against `ca`.
    pub secure_aggregation: bool,
}

impl ClientOptions {
    /// Options with sane defaults (connect timeout 5 s; backoff 0.5 s doubling to 30 s,
    /// retry forever).
    pub fn new(
        server: impl Into<ServerAddr>,
        server_name: impl Into<String>,
        identity: Identity,
        ca: Vec<CertificateDer<'static>>,
    ) -> Self {
        Self {
            server: server.into(),
            server_name: server_name.into(),
            identity,
            ca,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_attempts: None,
            connect_timeout: Duration::from_secs(5),
            enroll_timeout: Duration::from_secs(15),
            max_model_bytes: flotilla_protocol::wire::codec::DEFAULT_MAX_PAYLOAD_BYTES,
            io_deadline: IoDeadline::default(),
            capabilities: Capabilities {
                backend: "cpu".into(),
                num_examples: None,
                secure_aggregation: false,
                software: format!("flotilla-client {}", env!("CARGO_PKG_VERSION")),
                model: None,
            },
            secure_aggregation: true,
        }
    }
}

/// What a client run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connections made (1 + reconnections).
    pub connections: u32,
    /// Training rounds completed and sent.
    pub rounds_trained: u32,
    /// Evaluations sent.
    pub evaluations: u32,
    /// UDP bytes sent, QUIC overhead included.
    pub udp_bytes_sent: u64,
    /// UDP bytes received, QUIC overhead included.
    pub udp_bytes_received: u64,
}

/// Why a session ended.
enum SessionEnd {
    Finished,
    Shutdown,
}

/// Why a session failed.
#[derive(Debug)]
enum SessionError {
    /// Worth retrying (connection lost, server restarting...).
    Retry(String, bool),
    /// Not worth retrying (certificate refused...).
    Fatal(Error),
}

/// QUIC carries TLS alerts as the transport error codes 0x100-0x1ff (RFC 9001 §4.8).
fn is_tls_alert(code: u64) -> bool {
    (0x100..0x200).contains(&code)
}

/// What a failed TLS handshake means: which side refused whose certificate. `None` if `e`
/// is not a TLS refusal.
fn tls_refusal(e: &quinn::ConnectionError, options: &ClientOptions) -> Option<Error> {
    match e {
        // An alert *we* raised: our verifier refused the server's certificate (unknown CA,
        // wrong name, expired...).
        quinn::ConnectionError::TransportError(t) if is_tls_alert(u64::from(t.code)) => {
            Some(Error::UntrustedServer(format!(
                "{} ({}, name {:?}): check that the CA certificate given (--ca or the PKI \
                 directory's ca.crt) is the federation's, and that --server-name is a name the \
                 server's certificate was issued for (`flotilla-server certs issue-server --name`)",
                t.reason, options.server, options.server_name
            )))
        }
        // An alert the *server* sent: it refused our certificate.
        quinn::ConnectionError::ConnectionClosed(c) if is_tls_alert(u64::from(c.error_code)) => {
            Some(Error::Refused(format!(
                "the server refused our certificate ({e}): is it issued by the federation's CA, \
                 for this client, and not revoked?"
            )))
        }
        _ => None,
    }
}

/// The application close code the server gave, if it closed the connection on purpose.
fn close_code(e: &quinn::ConnectionError) -> Option<u32> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => u32::try_from(u64::from(c.error_code)).ok(),
        _ => None,
    }
}

/// What to do when the server closed the connection with a Flotilla close code.
fn closed_by_server(e: &quinn::ConnectionError, enrolled: bool) -> Option<SessionError> {
    match close_code(e)? {
        close::IDENTITY_IN_USE => {
            error!(
                "another device is using this identity: the server keeps its live connection \
                 and refused ours (a copied certificate? revoke it with `certs revoke` and issue \
                 a new one); retrying"
            );
            Some(SessionError::Retry(
                "another device is using this identity".into(),
                false,
            ))
        }
        close::REVOKED => Some(SessionError::Fatal(Error::Refused(
            "the server says our certificate is revoked".into(),
        ))),
        close::WRONG_MODEL => Some(SessionError::Fatal(Error::Refused(
            "the server refused our model: it is not the federation's (check the model \
             and its configuration against the other clients')"
                .into(),
        ))),
        _ => {
            let _ = enrolled;
            None
        }
    }
}

/// If a failed handshake looks like a clock problem on this device, says so (and the session
/// is retried rather than given up: the clock may be set right later, e.g. once NTP syncs).
fn clock_problem(e: &quinn::ConnectionError, identity: &Identity) -> Option<String> {
    let now = time::OffsetDateTime::now_utc();
    clock_message(identity.check_validity(now), &e.to_string(), now)
}

/// [`clock_problem`] on its parts: our certificate's validity by our clock, and the
/// handshake error's text.
fn clock_message(
    own: Result<(), flotilla_crypto::Error>,
    error: &str,
    now: time::OffsetDateTime,
) -> Option<String> {
    match own {
        Err(flotilla_crypto::Error::NotYetValid { not_before }) => {
            return Some(format!(
                "our certificate is not valid yet by this device's clock (valid from {not_before}, \
                 the clock says {now}): check the clock (NTP); retrying"
            ));
        }
        Err(flotilla_crypto::Error::Expired { not_after }) => {
            return Some(format!(
                "our certificate expired on {not_after} by this device's clock (now {now}): \
                 if the clock is right, get a new certificate; retrying"
            ));
        }
        _ => {}
    }
    let lower = error.to_ascii_lowercase();
    (lower.contains("notvalidyet") || lower.contains("not valid yet") || lower.contains("expired"))
        .then(|| {
            format!(
                "the server's certificate is not valid by this device's clock (now {now}): {error}; \
                 check the clock (NTP); retrying"
            )
        })
}

enum Job {
    Train(u64, Params, TrainConfig),
    Evaluate(u64, Params),
    Initial,
}

enum JobDone<T> {
    Train(T, u64, Result<crate::trainer::LocalUpdate, Error>),
    Evaluate(T, u64, Result<crate::trainer::Evaluation, Error>),
    Initial(T, Result<Params, Error>),
}

fn run_job<T: Trainer>(mut t: T, job: Job) -> JobDone<T> {
    match job {
        Job::Train(round, model, config) => {
            let r = t.train(&model, &config);
            JobDone::Train(t, round, r)
        }
        Job::Evaluate(round, model) => {
            let r = t.evaluate(&model);
            JobDone::Evaluate(t, round, r)
        }
        Job::Initial => {
            let r = t.initial_params();
            JobDone::Initial(t, r)
        }
    }
}

/// Runs a client until the federation finishes, `shutdown` is set, or a fatal error. Returns
/// the trainer back with the statistics.
pub async fn run<T: Trainer + 'static>(
    options: ClientOptions,
    trainer: T,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(T, ClientStats), Error> {
    let tls = tls::client_config(&options.identity, &options.ca)?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| Error::Config(format!("TLS config unusable for QUIC: {e}")))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    cc.transport_config(Arc::new(flotilla_protocol::quic::transport_config()));
    let mut endpoints = Endpoints {
        config: cc,
        v4: None,
        v6: None,
    };

    // Declare our model in the hello, so that a server training another one refuses us at
    // once, with the reason, instead of after a download.
    let mut trainer = trainer;
    let mut options = options;
    if options.capabilities.model.is_none() {
        let initial = trainer.initial_params()?;
        options.capabilities.model = Some(ModelSummary::of(initial.manifest()));
    }
    let options = options;
    let stop_flag = trainer.stop_flag();
    if let Some(f) = &stop_flag {
        f.store(false, Ordering::Relaxed);
    }
    let mut trainer = Some(trainer);
    let mut stats = ClientStats::default();
    let mut backoff = options.backoff_initial;
    let mut failures = 0u32;
    let result = loop {
        if *shutdown.borrow() {
            break Ok(());
        }
        stats.connections += 1;
        let outcome = session(
            &mut endpoints,
            &options,
            &mut trainer,
            &mut stats,
            &mut shutdown,
            stop_flag.as_ref(),
        )
        .await;
        match outcome {
            Ok(SessionEnd::Finished) => {
                info!("federation finished");
                break Ok(());
            }
            Ok(SessionEnd::Shutdown) => break Ok(()),
            Err(SessionError::Fatal(e)) => break Err(e),
            Err(SessionError::Retry(why, was_enrolled)) => {
                if was_enrolled {
                    backoff = options.backoff_initial;
                    failures = 0;
                }
                failures += 1;
                if options.max_attempts.is_some_and(|m| failures >= m) {
                    break Err(Error::Unreachable(format!(
                        "giving up after {failures} attempts: {why}"
                    )));
                }
                let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
                warn!("{why}; reconnecting in {:.1}s", jittered.as_secs_f64());
                tokio::select! {
                    _ = tokio::time::sleep(jittered) => {}
                    _ = shutdown.changed() => break Ok(()),
                }
                backoff = (backoff * 2).min(options.backoff_max);
            }
        }
    };
    // Closing is told to the server; waiting for its acknowledgement is bounded (a client
    // asked to stop exits within a second or two).
    for endpoint in [&endpoints.v4, &endpoints.v6].into_iter().flatten() {
        endpoint.close(0u32.into(), b"client done");
        let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    }
    let trainer = trainer.ok_or_else(|| Error::Model("trainer lost".into()))?;
    result.map(|()| (trainer, stats))
}

/// The client's UDP endpoints, one per address family, made when first needed (the server's
/// name may resolve to either).
struct Endpoints {
    config: quinn::ClientConfig,
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    fn for_addr(&mut self, to: SocketAddr) -> Result<&quinn::Endpoint, Error> {
        let (slot, bind) = if to.is_ipv6() {
            (
                &mut self.v6,
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
            )
        } else {
            (
                &mut self.v4,
                SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)),
            )
        };
        if slot.is_none() {
            let mut e = quinn::Endpoint::client(bind).map_err(|source| Error::Io {
                path: format!("udp socket {bind}").into(),
                source,
            })?;
            e.set_default_client_config(self.config.clone());
            *slot = Some(e);
        }
        slot.as_ref()
            .ok_or_else(|| Error::Config("no endpoint".into()))
    }
}

/// Resolves the server's name and completes the QUIC + TLS handshake, within the connect
/// timeout.
async fn connect(
    endpoints: &mut Endpoints,
    options: &ClientOptions,
) -> Result<quinn::Connection, SessionError> {
    let retry = |e: String| SessionError::Retry(e, false);
    let addrs = options
        .server
        .resolve(options.connect_timeout)
        .await
        .map_err(retry)?;
    let to = *addrs
        .first()
        .ok_or_else(|| retry(format!("{} resolves to no address", options.server)))?;
    let connecting = endpoints
        .for_addr(to)
        .map_err(SessionError::Fatal)?
        .connect(to, &options.server_name)
        .map_err(|e| {
            SessionError::Fatal(Error::Config(format!(
                "cannot connect to {} as {:?}: {e}",
                options.server, options.server_name
            )))
        })?;
    let at = if options.server.ip().is_some() {
        options.server.to_string()
    } else {
        format!("{} ({to})", options.server)
    };
    match tokio::time::timeout(options.connect_timeout, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Err(_) => Err(retry(format!(
            "no answer from {at} within {:.0?} (is the server running, and UDP port {} open?)",
            options.connect_timeout,
            to.port()
        ))),
        Ok(Err(e)) => {
            if let Some(why) = clock_problem(&e, &options.identity) {
                error!("{why}");
                return Err(retry(why));
            }
            if let Some(refusal) = tls_refusal(&e, options) {
                return Err(SessionError::Fatal(refusal));
            }
            Err(retry(format!("cannot connect to {at}: {e}")))
        }
    }
}

async fn session<T: Trainer + 'static>(
    endpoints: &mut Endpoints,
    options: &ClientOptions,
    trainer: &mut Option<T>,
    stats: &mut ClientStats,
    shutdown: &mut watch::Receiver<bool>,
    stop_flag: Option<&Arc<AtomicBool>>,
) -> Result<SessionEnd, SessionError> {
    let conn = tokio::select! {
        c = connect(endpoints, options) => c?,
        _ = shutdown.changed() => return Ok(SessionEnd::Shutdown),
    };
    info!("connected to {}", options.server);
    let result = drive(&conn, options, trainer, stats, shutdown, stop_flag).await;
    let s = conn.stats();
    stats.udp_bytes_sent += s.udp_tx.bytes;
    stats.udp_bytes_received += s.udp_rx.bytes;
    result
}

async fn drive<T: Trainer + 'static>(
    conn: &quinn::Connection,
    options: &ClientOptions,
    trainer: &mut Option<T>,
    stats: &mut ClientStats,
    shutdown: &mut watch::Receiver<bool>,
    stop_flag: Option<&Arc<AtomicBool>>,
) -> Result<SessionEnd, SessionError> {
    // Reader: one message per stream, in order, each within its deadline; the queue is
    // bounded (the reader waits while the driver is behind).
    let (in_tx, mut in_rx) = mpsc::channel(QUEUE);
    let limits = Limits {
        max_payload_bytes: options.max_model_bytes,
        ..Limits::default()
    };
    let deadline = options.io_deadline;
    let reader_conn = conn.clone();
    let reader = tokio::spawn(async move {
        loop {
            let mut s = match reader_conn.accept_uni().await {
                Ok(s) => s,
                Err(e) => {
                    let _ = in_tx.send(Err(e.to_string())).await;
                    return;
                }
            };
            let r = recv_message_timed(&mut s, &limits, None, &deadline).await;
            if in_tx.send(r.map_err(|e| e.to_string())).await.is_err() {
                return;
            }
        }
    });
    // Writer: in order too, each send within its deadline.
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(QUEUE);
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            match send_message_timed(&writer_conn, &m, &deadline).await {
                Ok(_) => {}
                Err(e @ flotilla_protocol::Error::Timeout { .. }) => {
                    debug!("send failed: {e}");
                    writer_conn.close(close::TOO_SLOW.into(), b"send deadline missed");
                    return;
                }
                Err(e) => {
                    // Most often the server closed the connection (it refused our certificate,
                    // or restarted). Closing it here would replace the server's reason, which
                    // the session reads to tell the user why, by our own.
                    debug!("send failed: {e}");
                    if writer_conn.close_reason().is_none() {
                        writer_conn.close(close::DONE.into(), b"send failed");
                    }
                    return;
                }
            }
        }
    });
    // If this future is dropped (the task running the client is aborted), close the
    // connection and stop the reader instead of leaving a half-alive session behind.
    let _cancel = CancelGuard {
        conn: conn.clone(),
        reader: reader.abort_handle(),
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<JobDone<T>>();
    // The participant's own heavy work (masking a secure update), on a blocking thread so that
    // heartbeats and messages go on meanwhile; one job per round is out at a time.
    let (work_tx, mut work_rx) = mpsc::channel::<flotilla_protocol::JobResult>(2);
    let mut pending: Option<Job> = None;
    let mut busy = false;
    // For the per-round log lines: the size of the message last received, and when the
    // current job started.
    let mut last_bytes = 0u64;
    let mut job_started = Instant::now();

    let mut p = Participant::new(options.capabilities.clone());
    if options.secure_aggregation {
        match secagg_identity(options) {
            Ok(id) => p = p.with_secure_aggregation(id),
            Err(e) => {
                warn!("secure aggregation unavailable, taking part in plain rounds only: {e}")
            }
        }
    }
    p.connect(Instant::now());
    let enroll_by = tokio::time::Instant::now() + options.enroll_timeout;
    let end = 'session: loop {
        // Route what the participant wants done.
        let mut overflow = false;
        while let Some(m) = p.poll_transmit() {
            overflow |= out_tx.try_send(m).is_err();
        }
        if overflow {
            break Err(SessionError::Retry(
                "the server is not taking our messages (send queue full)".into(),
                p.is_enrolled(),
            ));
        }
        while let Some(ev) = p.poll_event() {
            match ev {
                ParticipantEvent::Enrolled { client_id } => info!("enrolled as {client_id}"),
                ParticipantEvent::ProvideParams => pending = Some(Job::Initial),
                ParticipantEvent::Train {
                    round,
                    config,
                    model,
                    ..
                } => {
                    info!(
                        "round {round}: training ({} epoch(s), {:.2} MB received)",
                        config.epochs,
                        last_bytes as f64 / 1e6
                    );
                    pending = Some(Job::Train(round, model, config));
                }
                ParticipantEvent::Evaluate { round, model, .. } => {
                    pending = Some(Job::Evaluate(round, model))
                }
                ParticipantEvent::RoundAborted {
                    round,
                    reason: reason @ AbortReason::SecureAggregation(_),
                } => warn!("round {round}: {reason}"),
                ParticipantEvent::RoundAborted { round, reason } => {
                    debug!("round {round} closed: {reason}")
                }
                ParticipantEvent::Closed { reason } => {
                    break 'session match reason {
                        AbortReason::Finished => Ok(SessionEnd::Finished),
                        // Retrying cannot help: the model must be changed first.
                        r @ AbortReason::ModelMismatch { .. } => Err(SessionError::Fatal(
                            Error::Refused(format!("the server refused our model: {r}")),
                        )),
                        other => Err(SessionError::Retry(
                            format!("server closed the session: {other}"),
                            true,
                        )),
                    };
                }
                other => debug!("{other:?}"),
            }
        }
        while let Some(job) = p.poll_job() {
            let tx = work_tx.clone();
            debug!("round {}: {} job started", job.round(), job.kind());
            tokio::task::spawn_blocking(move || {
                let _ = tx.blocking_send(job.run());
            });
        }
        // Take the trainer only when there is a job for it.
        if !busy
            && pending.is_some()
            && let Some(t) = trainer.take()
            && let Some(job) = pending.take()
        {
            busy = true;
            job_started = Instant::now();
            let done = done_tx.clone();
            tokio::task::spawn_blocking(move || {
                let _ = done.send(run_job(t, job));
            });
        }

        let hb = p.poll_timeout();
        tokio::select! {
            msg = in_rx.recv() => match msg {
                Some(Ok((m, bytes))) => {
                    debug!("received {} ({bytes} bytes)", m.kind());
                    last_bytes = bytes;
                    if let Err(e) = p.handle_message(Instant::now(), m) {
                        break Err(SessionError::Retry(format!("server sent an invalid message: {e}"), p.is_enrolled()));
                    }
                }
                Some(Err(e)) => {
                    if let Some(reason) = conn.close_reason() {
                        if let Some(end) = closed_by_server(&reason, p.is_enrolled()) {
                            break Err(end);
                        }
                        if let Some(why) = clock_problem(&reason, &options.identity) {
                            error!("{why}");
                            break Err(SessionError::Retry(why, false));
                        }
                        if let Some(refusal) = tls_refusal(&reason, options) {
                            break Err(SessionError::Fatal(refusal));
                        }
                        break Err(SessionError::Retry(format!("connection lost: {reason}"), p.is_enrolled()));
                    }
                    break Err(SessionError::Retry(format!("bad message from the server: {e}"), p.is_enrolled()));
                }
                None => break Err(SessionError::Retry("connection reader ended".into(), p.is_enrolled())),
            },
            Some(result) = work_rx.recv() => p.handle_job_result(Instant::now(), result),
            Some(done) = done_rx.recv() => {
                busy = false;
                match done {
                    JobDone::Train(t, round, r) => {
                        *trainer = Some(t);
                        match r {
                            Ok(u) => {
                                let loss = u.metrics.get("train_loss").map(|l| format!(", train loss {l:.4}")).unwrap_or_default();
                                let (n, mb) = (u.num_examples, u.params.len() as f64 * 4.0 / 1e6);
                                let res = TrainRes { round, num_examples: u.num_examples, metrics: u.metrics, params: u.params };
                                match p.submit_train(res) {
                                    Ok(()) => {
                                        stats.rounds_trained += 1;
                                        info!(
                                            "round {round}: trained on {n} examples in {:.2} s{loss}; sending the update ({mb:.2} MB)",
                                            job_started.elapsed().as_secs_f64()
                                        );
                                    }
                                    Err(e) => info!("round {round}: trained, but the server has closed the round ({e}); update dropped"),
                                }
                            }
                            Err(Error::Cancelled) => {}
                            Err(e) => {
                                warn!("round {round}: training failed: {e}");
                                p.abandon(e.to_string());
                            }
                        }
                    }
                    JobDone::Evaluate(t, round, r) => {
                        *trainer = Some(t);
                        match r {
                            Ok(ev) => {
                                let mut metrics = Metrics::new();
                                metrics.insert("accuracy".into(), ev.accuracy);
                                let res = EvaluateRes { round, num_examples: ev.num_examples, loss: ev.loss, metrics };
                                if p.submit_evaluation(res).is_ok() {
                                    stats.evaluations += 1;
                                    info!(
                                        "round {round}: evaluated on {} examples: loss {:.4}, accuracy {:.4}",
                                        ev.num_examples, ev.loss, ev.accuracy
                                    );
                                }
                            }
                            Err(Error::Cancelled) => {}
                            Err(e) => {
                                warn!("round {round}: evaluation failed: {e}");
                                p.abandon(e.to_string());
                            }
                        }
                    }
                    JobDone::Initial(t, r) => {
                        *trainer = Some(t);
                        match r.map_err(|e| e.to_string()).and_then(|params| p.submit_initial_params(params).map_err(|e| e.to_string())) {
                            Ok(()) => {}
                            Err(e) => warn!("could not provide initial parameters: {e}"),
                        }
                    }
                }
            }
            _ = sleep_until(hb) => p.handle_timeout(Instant::now()),
            _ = tokio::time::sleep_until(enroll_by), if !p.is_enrolled() => {
                break Err(SessionError::Retry("no welcome from the server in time".into(), false));
            }
            _ = shutdown.changed() => {
                info!("leaving the federation{}", if busy { " (stopping the local training)" } else { "" });
                if let Some(f) = stop_flag {
                    f.store(true, Ordering::Relaxed);
                }
                let _ = out_tx.try_send(Message::Abort { round: None, reason: AbortReason::Other("client shutting down".into()) });
                break Ok(SessionEnd::Shutdown);
            }
        }
    };
    // A job still running keeps the trainer; wait for it so the trainer is not lost.
    if busy && let Some(done) = done_rx.recv().await {
        *trainer = Some(match done {
            JobDone::Train(t, ..) | JobDone::Evaluate(t, ..) | JobDone::Initial(t, _) => t,
        });
    }
    finish(conn, reader, writer, out_tx, end).await
}

async fn finish(
    conn: &quinn::Connection,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
    out_tx: mpsc::Sender<Message>,
    end: Result<SessionEnd, SessionError>,
) -> Result<SessionEnd, SessionError> {
    drop(out_tx);
    // Asked to stop: the goodbye gets a second, not more.
    let flush = match end {
        Ok(SessionEnd::Shutdown) => Duration::from_secs(1),
        _ => Duration::from_secs(5),
    };
    let _ = tokio::time::timeout(flush, writer).await;
    conn.close(0u32.into(), b"bye");
    reader.abort();
    end
}

/// Closes the connection and stops the reader when a session is dropped mid-way.
struct CancelGuard {
    conn: quinn::Connection,
    reader: tokio::task::AbortHandle,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.conn.close_reason().is_none() {
            self.conn.close(0u32.into(), b"client stopped");
        }
        self.reader.abort();
    }
}

/// Our SecAgg credentials: the TLS key signs, the CA checks neighbours.
fn secagg_identity(options: &ClientOptions) -> Result<SecAggIdentity, flotilla_crypto::Error> {
    Ok(SecAggIdentity {
        signer: Signer::from_identity(&options.identity)?,
        certificate: options.identity.leaf()?.to_vec(),
        verifier: PeerVerifier::new(&options.ca, Vec::new())?,
    })
}

/// Messages queued between the driver and its reader or writer.
const QUEUE: usize = 32;

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_is_reported_as_such() {
        let now = time::OffsetDateTime::now_utc();
        let behind = clock_message(
            Err(flotilla_crypto::Error::NotYetValid {
                not_before: "2026-12-01 00:00:00.0 +00:00:00".into(),
            }),
            "aborted by peer: the cryptographic handshake failed: error 42",
            now,
        )
        .unwrap();
        assert!(
            behind.starts_with("our certificate is not valid yet by this device's clock"),
            "{behind}"
        );
        assert!(behind.contains("check the clock") && behind.contains("retrying"));
        let server_cert = clock_message(
            Ok(()),
            "the cryptographic handshake failed: error 42: invalid peer certificate: certificate not valid yet",
            now,
        )
        .unwrap();
        assert!(
            server_cert.starts_with("the server's certificate is not valid by this device's clock"),
            "{server_cert}"
        );
        let expired = clock_message(
            Err(flotilla_crypto::Error::Expired {
                not_after: "2020-01-01".into(),
            }),
            "",
            now,
        )
        .unwrap();
        assert!(expired.contains("expired on 2020-01-01 by this device's clock"));
        // Other handshake failures are not blamed on the clock.
        assert_eq!(
            clock_message(Ok(()), "invalid peer certificate: UnknownIssuer", now),
            None
        );
    }
}
