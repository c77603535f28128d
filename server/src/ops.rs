//! Operating the server: Prometheus metrics, the live dashboard's state, and the plain-HTTP
//! endpoint that serves both.
//!
//! The endpoint (`[operations] listen`, or `--metrics-listen`) speaks plain HTTP and has no
//! authentication: bind it to localhost or a private network, or put it behind the operator's
//! own TLS proxy. It serves
//!
//! | path           | what                                                                 |
//! |----------------|----------------------------------------------------------------------|
//! | `/metrics`     | Prometheus / OpenMetrics text exposition (`flotilla_*`)              |
//! | `/`            | the live dashboard (HTML and JavaScript embedded in the binary)      |
//! | `/api/status`  | the dashboard's data as JSON                                         |
//! | `/healthz`     | liveness: 200 while the server's event loop turns                    |
//! | `/readyz`      | readiness: 200 once listening with a model (or asking clients for one) |
//!
//! Everything here is bounded: the round history kept for the chart (newest
//! [`MAX_ROUND_POINTS`]), the client table (the server's own connection limit), label sets
//! (closed enums, never client-supplied strings), concurrent HTTP requests
//! ([`MAX_HTTP_REQUESTS`]) and each request's time ([`HTTP_REQUEST_TIMEOUT`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flotilla_protocol::ClientId;
use flotilla_protocol::coordinator::{DropKind, Event, RoundRecord};
use flotilla_protocol::wire::messages::Message;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;

/// Rounds kept for the dashboard's chart (the newest).
pub const MAX_ROUND_POINTS: usize = 10_000;
/// Concurrent HTTP requests served; more wait in the listener's backlog.
pub const MAX_HTTP_REQUESTS: usize = 16;
/// Longest time one HTTP request may take.
pub const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A phase of a round, for the phase-duration histogram and the dashboard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for enough clients (or for a model).
    Waiting,
    /// Clients training (plain rounds; a secure round goes through the SecAgg+ stages
    /// below instead, its clients training during the masked-input stage).
    Train,
    /// SecAgg+: collecting key advertisements.
    SecaggAdvertiseKeys,
    /// SecAgg+: collecting encrypted shares.
    SecaggShareKeys,
    /// SecAgg+: collecting masked inputs.
    SecaggMaskedInput,
    /// SecAgg+: collecting consistency signatures.
    SecaggConsistency,
    /// SecAgg+: collecting revealed shares.
    SecaggUnmask,
    /// SecAgg+: removing the masks (a job off the event loop).
    SecaggUnmasking,
    /// Federated evaluation of the new model.
    Evaluate,
    /// All rounds done.
    Finished,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Train => "train",
            Self::SecaggAdvertiseKeys => "secagg_advertise_keys",
            Self::SecaggShareKeys => "secagg_share_keys",
            Self::SecaggMaskedInput => "secagg_masked_input",
            Self::SecaggConsistency => "secagg_consistency",
            Self::SecaggUnmask => "secagg_unmask",
            Self::SecaggUnmasking => "secagg_unmasking",
            Self::Evaluate => "evaluate",
            Self::Finished => "finished",
        }
    }

    fn of_stage(stage: flotilla_protocol::secagg::Stage) -> Option<Self> {
        use flotilla_protocol::secagg::Stage;
        Some(match stage {
            Stage::AdvertiseKeys => Self::SecaggAdvertiseKeys,
            Stage::ShareKeys => Self::SecaggShareKeys,
            Stage::MaskedInput => Self::SecaggMaskedInput,
            Stage::Consistency => Self::SecaggConsistency,
            Stage::Unmask => Self::SecaggUnmask,
            Stage::Unmasking => Self::SecaggUnmasking,
            Stage::Done => return None,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why the server refused a connection or closed one itself (beyond [`DropKind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The TLS handshake failed or timed out (bad, foreign, revoked or expired certificate).
    Handshake,
    /// Over the handshake cap.
    HandshakeCap,
    /// Over the connection limits.
    TooManyConnections,
    /// No usable client id in the certificate.
    BadIdentity,
    /// Revoked (found at the hello or by a CRL reload).
    Revoked,
    /// Another live connection holds the identity.
    IdentityInUse,
    /// The client's model is not the federation's.
    WrongModel,
    /// The client could not keep up with its send queue.
    TooSlow,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Self::Handshake => "handshake_failed",
            Self::HandshakeCap => "handshake_cap",
            Self::TooManyConnections => "too_many_connections",
            Self::BadIdentity => "bad_identity",
            Self::Revoked => "revoked",
            Self::IdentityInUse => "identity_in_use",
            Self::WrongModel => "wrong_model",
            Self::TooSlow => "send_queue_full",
        }
    }
}

fn phase_histogram() -> Histogram {
    // 10 ms to about 11 minutes.
    Histogram::new(exponential_buckets(0.01, 2.0, 17))
}

/// One round on the dashboard's chart.
#[derive(Clone, Debug, Serialize)]
pub struct RoundPoint {
    /// Round number.
    pub round: u64,
    /// Clients sampled.
    pub selected: usize,
    /// Results aggregated.
    pub results: usize,
    /// Clients that did not contribute.
    pub failures: usize,
    /// Example-weighted mean training loss, if clients reported one.
    pub train_loss: Option<f64>,
    /// Federated evaluation loss.
    pub eval_loss: Option<f64>,
    /// Federated evaluation accuracy.
    pub accuracy: Option<f64>,
    /// Wall time of the round, seconds.
    pub seconds: Option<f64>,
    /// Why it was aborted, if it was.
    pub aborted: Option<String>,
    /// ε spent after this round, if differential privacy is on.
    pub epsilon: Option<f64>,
}

/// One enrolled client on the dashboard.
#[derive(Clone, Debug, Serialize)]
pub struct ClientRow {
    /// Client id (from its certificate).
    pub id: String,
    /// Seconds since it enrolled.
    pub connected_secs: f64,
    /// Last round it was asked to train in.
    pub last_round: Option<u64>,
    /// Its last failure: round and reason.
    pub last_failure: Option<String>,
}

/// What the dashboard shows (`/api/status`).
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// Server software version.
    pub version: &'static str,
    /// Strategy name.
    pub strategy: String,
    /// Rounds configured.
    pub num_rounds: u64,
    /// Current (or last) round.
    pub round: u64,
    /// Current phase.
    pub phase: Phase,
    /// Seconds in the current phase.
    pub phase_secs: f64,
    /// Replies the current phase has / expects (training results, evaluations).
    pub progress: Option<(usize, usize)>,
    /// What the server is waiting for, in words, if it is waiting.
    pub waiting: Option<String>,
    /// Rounds completed.
    pub rounds_completed: u64,
    /// Rounds aborted.
    pub rounds_aborted: u64,
    /// ε spent so far (differential privacy), and its δ.
    pub epsilon: Option<f64>,
    /// δ of `epsilon`.
    pub delta: Option<f64>,
    /// Enrolled clients, by id.
    pub clients: Vec<ClientRow>,
    /// Rounds for the chart, oldest first (at most [`MAX_ROUND_POINTS`]).
    pub rounds: Vec<RoundPoint>,
    /// Seconds since the server started.
    pub uptime_secs: f64,
    /// Unix time of this status.
    pub now_unix: u64,
}

struct ClientInfo {
    since: Instant,
    last_round: Option<u64>,
    last_failure: Option<String>,
}

/// What the driver knows beyond the metrics, for the dashboard.
struct State {
    strategy: String,
    num_rounds: u64,
    round: u64,
    phase: Phase,
    phase_since: Instant,
    round_since: Option<Instant>,
    expected: usize,
    replies: usize,
    waiting: Option<String>,
    rounds_completed: u64,
    rounds_aborted: u64,
    epsilon: Option<f64>,
    delta: Option<f64>,
    clients: BTreeMap<ClientId, ClientInfo>,
    rounds: VecDeque<RoundPoint>,
    ready: bool,
}

/// The server's metrics and dashboard state. The driver updates it; the HTTP endpoint reads
/// it. Cheap to update (atomics, one short lock per event).
pub struct Telemetry {
    registry: Registry,
    started: Instant,
    heartbeat: AtomicU64,
    state: RwLock<State>,
    connections: Gauge,
    enrolled: Gauge,
    rounds_completed: Counter,
    rounds_aborted: Counter,
    round_duration: Histogram,
    phase_duration: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    bytes_received: Counter,
    bytes_sent: Counter,
    drops: Family<ReasonLabel, Counter>,
    refusals: Family<ReasonLabel, Counter>,
    checkpoint_write: Histogram,
    epsilon: Gauge<f64, AtomicU64>,
    current_round: Gauge,
    failures: Counter,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Metrics registered under the `flotilla_` prefix, no round yet.
    pub fn new(strategy: &str, num_rounds: u64) -> Self {
        let mut registry = Registry::with_prefix("flotilla");
        let t = Self {
            registry: Registry::default(),
            started: Instant::now(),
            heartbeat: AtomicU64::new(0),
            state: RwLock::new(State {
                strategy: strategy.to_string(),
                num_rounds,
                round: 0,
                phase: Phase::Waiting,
                phase_since: Instant::now(),
                round_since: None,
                expected: 0,
                replies: 0,
                waiting: None,
                rounds_completed: 0,
                rounds_aborted: 0,
                epsilon: None,
                delta: None,
                clients: BTreeMap::new(),
                rounds: VecDeque::new(),
                ready: false,
            }),
            connections: Gauge::default(),
            enrolled: Gauge::default(),
            rounds_completed: Counter::default(),
            rounds_aborted: Counter::default(),
            round_duration: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            phase_duration: Family::new_with_constructor(phase_histogram),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            drops: Family::default(),
            refusals: Family::default(),
            checkpoint_write: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            epsilon: Gauge::default(),
            current_round: Gauge::default(),
            failures: Counter::default(),
        };
        registry.register(
            "connections",
            "Open QUIC connections of clients (enrolled or not yet)",
            t.connections.clone(),
        );
        registry.register(
            "clients_enrolled",
            "Clients enrolled (hello accepted)",
            t.enrolled.clone(),
        );
        registry.register(
            "rounds_completed",
            "Rounds completed (model updated, checkpoint written)",
            t.rounds_completed.clone(),
        );
        registry.register(
            "rounds_aborted",
            "Rounds aborted (model unchanged)",
            t.rounds_aborted.clone(),
        );
        registry.register(
            "round",
            "The current (or last) round",
            t.current_round.clone(),
        );
        registry.register_with_unit(
            "round_duration",
            "Wall time of completed and aborted rounds",
            Unit::Seconds,
            t.round_duration.clone(),
        );
        registry.register_with_unit(
            "round_phase_duration",
            "Wall time of each phase of a round (train, the SecAgg+ stages, evaluate)",
            Unit::Seconds,
            t.phase_duration.clone(),
        );
        registry.register_with_unit(
            "received",
            "Message bytes received from clients (headers and payloads)",
            Unit::Bytes,
            t.bytes_received.clone(),
        );
        registry.register_with_unit(
            "sent",
            "Message bytes sent to clients (headers and payloads)",
            Unit::Bytes,
            t.bytes_sent.clone(),
        );
        registry.register(
            "client_drops",
            "Clients dropped by the round engine, by reason",
            t.drops.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused or closed by the server, by reason",
            t.refusals.clone(),
        );
        registry.register(
            "client_failures",
            "Sampled clients that did not contribute to their round",
            t.failures.clone(),
        );
        registry.register_with_unit(
            "checkpoint_write",
            "Time to write a round's checkpoint durably",
            Unit::Seconds,
            t.checkpoint_write.clone(),
        );
        registry.register(
            "privacy_epsilon",
            "Differential privacy: epsilon spent so far (0 without DP)",
            t.epsilon.clone(),
        );
        // Every label value exists from the start (a counter at 0 is information).
        for k in DropKind::ALL {
            let _ = t.drops.get_or_create(&ReasonLabel { reason: k.as_str() });
        }
        Self { registry, ..t }
    }

    /// The text exposition (OpenMetrics) of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The driver's loop turned (liveness).
    pub fn beat(&self) {
        self.heartbeat
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Milliseconds since the driver's loop last turned.
    pub fn since_beat(&self) -> Duration {
        let last = Duration::from_millis(self.heartbeat.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// The server is listening and can run rounds (readiness).
    pub fn set_ready(&self) {
        self.state().ready = true;
    }

    /// Whether [`Telemetry::set_ready`] was called.
    pub fn is_ready(&self) -> bool {
        self.state.read().map(|s| s.ready).unwrap_or(false)
    }

    /// Open client connections now.
    pub fn set_connections(&self, n: usize) {
        self.connections.set(n as i64);
    }

    /// Message bytes received.
    pub fn received(&self, bytes: u64) {
        self.bytes_received.inc_by(bytes);
    }

    /// Message bytes sent.
    pub fn sent(&self, bytes: u64) {
        self.bytes_sent.inc_by(bytes);
    }

    /// A connection refused or closed by the server.
    pub fn refused(&self, why: Refusal) {
        self.refusals
            .get_or_create(&ReasonLabel {
                reason: why.as_str(),
            })
            .inc();
    }

    /// `n` more failed handshakes (counted by the connection tasks).
    pub fn refused_handshakes(&self, n: u64) {
        self.refusals
            .get_or_create(&ReasonLabel {
                reason: Refusal::Handshake.as_str(),
            })
            .inc_by(n);
    }

    /// A checkpoint took `secs` to write.
    pub fn checkpoint_written(&self, secs: f64) {
        self.checkpoint_write.observe(secs);
    }

    /// A message the server sends (a client asked to train or evaluate moves the phase).
    pub fn sending(&self, to: &ClientId, msg: &Message) {
        let mut s = self.state();
        match msg {
            Message::Train(t) => {
                if let Some(c) = s.clients.get_mut(to) {
                    c.last_round = Some(t.round);
                }
                // The round's first instructions open its phase (later ones, e.g. in the
                // stages of a secure round, leave the phase to the round's events).
                if s.round != t.round || s.phase == Phase::Waiting {
                    self.enter(&mut s, Phase::Train);
                    s.round = t.round;
                    s.expected = 0;
                    s.replies = 0;
                }
                if s.phase == Phase::Train {
                    s.expected += 1;
                }
            }
            Message::Evaluate(e) => {
                if s.phase != Phase::Evaluate {
                    self.enter(&mut s, Phase::Evaluate);
                    s.round = e.round;
                    s.expected = 0;
                    s.replies = 0;
                }
                s.expected += 1;
            }
            _ => {}
        }
    }

    /// A message a client sent (progress of the current phase).
    pub fn receiving(&self, msg: &Message) {
        if matches!(
            msg,
            Message::TrainResult(_) | Message::EvaluateResult(_) | Message::MaskedInput(_)
        ) {
            let mut s = self.state();
            s.replies += 1;
        }
    }

    /// Moves to `phase`, observing how long the previous one took.
    fn enter(&self, s: &mut State, phase: Phase) {
        if s.phase == phase {
            return;
        }
        if !matches!(s.phase, Phase::Waiting | Phase::Finished) {
            self.phase_duration
                .get_or_create(&PhaseLabel {
                    phase: s.phase.as_str(),
                })
                .observe(s.phase_since.elapsed().as_secs_f64());
        }
        s.phase = phase;
        s.phase_since = Instant::now();
    }

    /// A coordinator event (after the driver acted on it).
    pub fn event(&self, ev: &Event) {
        let mut s = self.state();
        match ev {
            Event::ClientEnrolled(id) => {
                s.clients.insert(
                    id.clone(),
                    ClientInfo {
                        since: Instant::now(),
                        last_round: None,
                        last_failure: None,
                    },
                );
            }
            Event::ClientDropped { client, reason } => {
                let kind = reason.kind();
                s.clients.remove(client);
                self.drops
                    .get_or_create(&ReasonLabel {
                        reason: kind.as_str(),
                    })
                    .inc();
            }
            Event::ClientRefused { client, .. } => {
                s.clients.remove(client);
                drop(s);
                self.refused(Refusal::WrongModel);
                return;
            }
            Event::WaitingForClients {
                eligible, required, ..
            } => {
                s.waiting = Some(format!("{eligible} of {required} clients"));
                self.enter(&mut s, Phase::Waiting);
            }
            Event::WaitingForModel {
                agreeing, required, ..
            } => {
                s.waiting = Some(format!(
                    "a model: {agreeing} of {required} clients agree on one"
                ));
                self.enter(&mut s, Phase::Waiting);
            }
            Event::RoundStarted { round, selected } => {
                s.waiting = None;
                s.round = *round;
                s.round_since = Some(Instant::now());
                self.current_round.set(*round as i64);
                self.enter(&mut s, Phase::Train);
                s.expected = *selected;
                s.replies = 0;
            }
            Event::Dispatched { version, .. } => {
                // Asynchronous rounds: clients train all the time; the round shown is the
                // model step being filled.
                s.waiting = None;
                if s.phase != Phase::Train || s.round != *version + 1 {
                    s.round = *version + 1;
                    s.round_since = Some(Instant::now());
                    self.current_round.set(s.round as i64);
                    self.enter(&mut s, Phase::Train);
                    s.replies = 0;
                }
            }
            Event::SecureStage { stage, .. } => {
                if let Some(p) = Phase::of_stage(*stage) {
                    // A secure round opens with key advertisement (no event of its own):
                    // the time since the round started was that stage, not training, which
                    // happens during the masked-input stage.
                    if s.phase == Phase::Train {
                        s.phase = Phase::SecaggAdvertiseKeys;
                    }
                    self.enter(&mut s, p);
                    s.replies = 0;
                }
            }
            Event::RoundCompleted(r) | Event::RoundAborted(r) => {
                let completed = matches!(ev, Event::RoundCompleted(_));
                self.round_done(&mut s, r, completed);
            }
            Event::Finished => {
                self.enter(&mut s, Phase::Finished);
                s.waiting = None;
            }
            _ => {}
        }
        self.enrolled.set(s.clients.len() as i64);
    }

    /// A client's connection went away (not dropped by the engine).
    pub fn disconnected(&self, id: &ClientId) {
        let mut s = self.state();
        s.clients.remove(id);
        self.enrolled.set(s.clients.len() as i64);
    }

    fn round_done(&self, s: &mut State, r: &RoundRecord, completed: bool) {
        let seconds = s.round_since.take().map(|t| t.elapsed().as_secs_f64());
        if let Some(secs) = seconds {
            self.round_duration.observe(secs);
        }
        if completed {
            self.rounds_completed.inc();
            s.rounds_completed += 1;
        } else {
            self.rounds_aborted.inc();
            s.rounds_aborted += 1;
        }
        self.failures.inc_by(r.failures.len() as u64);
        for f in &r.failures {
            if let Some(c) = s.clients.get_mut(&f.client) {
                c.last_failure = Some(format!("round {}: {}", r.round, f.reason));
            }
        }
        if let Some(p) = &r.privacy {
            self.epsilon.set(p.epsilon);
            s.epsilon = Some(p.epsilon);
            s.delta = Some(p.delta);
        }
        // The round's last phase ends here; the next begins with the next round.
        self.enter(s, Phase::Waiting);
        s.waiting = None;
        let eval = r.evaluation.as_ref();
        if s.rounds.len() >= MAX_ROUND_POINTS {
            s.rounds.pop_front();
        }
        s.rounds.push_back(RoundPoint {
            round: r.round,
            selected: r.selected,
            results: r.results,
            failures: r.failures.len(),
            train_loss: r
                .train_metrics
                .get("train_loss")
                .or_else(|| r.train_metrics.get("loss"))
                .copied(),
            eval_loss: eval.map(|e| e.loss),
            accuracy: eval.and_then(|e| e.metrics.get("accuracy").copied()),
            seconds,
            aborted: r.aborted.as_ref().map(ToString::to_string),
            epsilon: r.privacy.as_ref().map(|p| p.epsilon),
        });
    }

    /// The dashboard's data now.
    pub fn status(&self) -> Status {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        let in_round = matches!(
            s.phase,
            Phase::Train
                | Phase::Evaluate
                | Phase::SecaggAdvertiseKeys
                | Phase::SecaggShareKeys
                | Phase::SecaggMaskedInput
                | Phase::SecaggConsistency
                | Phase::SecaggUnmask
                | Phase::SecaggUnmasking
        );
        Status {
            version: env!("CARGO_PKG_VERSION"),
            strategy: s.strategy.clone(),
            num_rounds: s.num_rounds,
            round: s.round,
            phase: s.phase,
            phase_secs: s.phase_since.elapsed().as_secs_f64(),
            progress: in_round.then_some((s.replies.min(s.expected), s.expected)),
            waiting: s.waiting.clone(),
            rounds_completed: s.rounds_completed,
            rounds_aborted: s.rounds_aborted,
            epsilon: s.epsilon,
            delta: s.delta,
            clients: s
                .clients
                .iter()
                .map(|(id, c)| ClientRow {
                    id: id.to_string(),
                    connected_secs: c.since.elapsed().as_secs_f64(),
                    last_round: c.last_round,
                    last_failure: c.last_failure.clone(),
                })
                .collect(),
            rounds: s.rounds.iter().cloned().collect(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            now_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// The dashboard page (HTML, CSS and JavaScript in one file, no external resources).
const DASHBOARD: &str = include_str!("dashboard.html");

/// Serves `/metrics`, the dashboard, `/api/status`, `/healthz` and `/readyz` on `listener`
/// until `stop` changes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;

    let metrics = |t: Arc<Telemetry>| async move {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            t.encode(),
        )
    };
    let status = |t: Arc<Telemetry>| async move { axum::Json(t.status()) };
    let page = || async {
        (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
                ),
            ],
            DASHBOARD,
        )
    };
    let healthz = |t: Arc<Telemetry>| async move {
        // The driver's loop turns at least every heartbeat interval (its timers); a loop
        // stuck for a minute is not alive.
        if t.since_beat() < Duration::from_secs(60) {
            (StatusCode::OK, "ok\n").into_response()
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "event loop stalled\n").into_response()
        }
    };
    let readyz = |t: Arc<Telemetry>| async move {
        if t.is_ready() {
            (StatusCode::OK, "ready\n").into_response()
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
        }
    };
    let t1 = telemetry.clone();
    let t2 = telemetry.clone();
    let t3 = telemetry.clone();
    let t4 = telemetry;
    let app = axum::Router::new()
        .route("/metrics", get(move || metrics(t1.clone())))
        .route("/api/status", get(move || status(t2.clone())))
        .route("/healthz", get(move || healthz(t3.clone())))
        .route("/readyz", get(move || readyz(t4.clone())))
        .route("/", get(page))
        .layer(tower::limit::ConcurrencyLimitLayer::new(MAX_HTTP_REQUESTS))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            HTTP_REQUEST_TIMEOUT,
        ));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await
}

/// Binds the operations endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
