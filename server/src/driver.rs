//! The server's driver: a quinn endpoint that pumps QUIC streams into the
//! [`Coordinator`] and fires its timers. It holds no round logic.
//!
//! * **Admission.** Handshakes in progress are capped (`limits.max_handshakes`; more are
//!   refused), above `limits.retry_above_handshakes` unvalidated addresses must first answer
//!   a QUIC Retry (address validation: no state is kept for a spoofed source), and a
//!   handshake must finish within `limits.handshake_timeout_secs`. Refused handshakes are
//!   counted and summarised every 30 s, not logged one by one. Connections are capped in
//!   total and per identity.
//! * **One task per connection** takes the client id from the verified certificate (never
//!   from a message) and reads nothing before the Hello, which must come within
//!   `limits.hello_timeout_secs` and carries no payload. It then reads one message per
//!   unidirectional stream, in order, each within a deadline sized from its length
//!   (`limits.io_timeout_secs` plus its size at `limits.min_transfer_rate`). No payload is
//!   accepted before there is a global model, except from the one client asked for the
//!   initial model (bounded by `max_model_bytes`); once there is a model, every payload must
//!   match its manifest, checked before anything is allocated.
//! * **One identity, one session.** A Hello for an identity whose connection is live
//!   (anything delivered within `limits.live_connection_secs`) is refused with close code
//!   [`close::IDENTITY_IN_USE`]: a copied certificate cannot evict its owner. A stale or
//!   closed connection is replaced (at most `limits.replacements_per_minute` times a
//!   minute). Both are logged at WARN with both addresses.
//! * **One writer task per connection** sends what the coordinator queues for that client,
//!   in order, each send within its deadline; the queue is bounded (`limits.send_queue`)
//!   and a client that cannot keep up is closed.
//! * **The central task** owns the coordinator: it feeds it inputs and timeouts, routes its
//!   transmits, closes the connections of clients it drops or replaces itself, re-reads the
//!   CRL (when the file changes, checked every `limits.crl_reload_secs`, and on
//!   [`RunningServer::reload_crl`]) and closes revoked clients' connections, and writes a
//!   checkpoint (and a line of `history.jsonl`) after every round before going on.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use flotilla_crypto::pki::{
    Identity, client_id_from_cert, crl_entries, load_certs, load_crls, serial_of,
};
use flotilla_crypto::tls;
use flotilla_protocol::coordinator::{Coordinator, Event, RoundRecord};
use flotilla_protocol::quic::{
    IoDeadline, close, recv_message_observed, recv_message_timed, send_message_timed,
};
use flotilla_protocol::wire::codec::Limits;
use flotilla_protocol::wire::messages::{AbortReason, ModelSummary};
use flotilla_protocol::{ClientId, JobResult, Manifest, Message, Params};
use rustls_pki_types::CertificateDer;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::Error;
use crate::checkpoint::{self, FileStore, SnapshotStore};
use crate::config::{LimitsConfig, ServerConfig};
use crate::ops::{Refusal, Telemetry};

/// What the server did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// Every round's record (including rounds before a resume).
    pub history: Vec<RoundRecord>,
    /// The final global model.
    pub global: Option<Params>,
    /// Message bytes sent to clients (headers and payloads).
    pub bytes_sent: u64,
    /// Message bytes received from clients.
    pub bytes_received: u64,
}

/// A server running in this process.
#[derive(Debug)]
pub struct RunningServer {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    /// The operations endpoint's address (metrics, dashboard), if one is configured.
    pub ops_addr: Option<SocketAddr>,
    /// Its metrics and dashboard state.
    pub telemetry: Arc<Telemetry>,
    /// The operations endpoint serves until this is dropped (after the run: the last
    /// figures stay readable while the process lives).
    _ops_stop: watch::Sender<bool>,
    shutdown: watch::Sender<bool>,
    reload: Arc<Notify>,
    endpoint: quinn::Endpoint,
    task: JoinHandle<Result<RunSummary, Error>>,
}

impl RunningServer {
    /// Waits for the federation to finish (all rounds done) or for a shutdown.
    pub async fn wait(mut self) -> Result<RunSummary, Error> {
        self.join().await
    }

    /// Like [`RunningServer::wait`], by reference (for `select!`). Call it once.
    pub async fn join(&mut self) -> Result<RunSummary, Error> {
        (&mut self.task)
            .await
            .map_err(|e| Error::Config(format!("server task failed: {e}")))?
    }

    /// Asks the server to stop: clients are told, connections closed; checkpoints already
    /// written stay.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Asks the server to re-read its CRL now (the binary calls this on SIGHUP): new
    /// handshakes use it, and live connections of revoked certificates are closed.
    pub fn reload_crl(&self) {
        self.reload.notify_one();
    }

    /// Kills the server at once, as a crash would: the task stops mid-flight and every
    /// connection is dropped (tests use it to check resuming from checkpoints).
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
        self.endpoint.close(0u32.into(), b"killed");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

enum Input {
    /// A connection sent its Hello.
    Hello {
        id: ClientId,
        conn: Arc<Conn>,
        hello: Message,
    },
    Message {
        id: ClientId,
        conn_id: u64,
        msg: Message,
        bytes: u64,
    },
    Malformed {
        id: ClientId,
        conn_id: u64,
        error: flotilla_protocol::Error,
    },
    Closed {
        id: ClientId,
        conn_id: u64,
    },
}

/// One established connection, as the central task knows it.
struct Conn {
    conn_id: u64,
    conn: quinn::Connection,
    remote: SocketAddr,
    /// Serial number of the client's certificate (for revocation).
    serial: Vec<u8>,
    /// Milliseconds since the server started at which this connection last delivered a
    /// message or opened a stream.
    activity: AtomicU64,
}

struct Client {
    conn: Arc<Conn>,
    tx: mpsc::Sender<Message>,
}

/// What connection tasks need to know about the model: payloads are accepted only when they
/// fit it (or, before there is one, only from the client asked for it).
#[derive(Clone, Debug, Default)]
struct ModelGate {
    manifest: Option<Arc<Manifest>>,
    asked: Option<ClientId>,
}

/// Counters shared by the accept loop and the connection tasks.
#[derive(Debug, Default)]
struct Admission {
    handshakes: AtomicUsize,
    connections: AtomicUsize,
    per_identity: Mutex<HashMap<ClientId, usize>>,
    refused_handshakes: AtomicU64,
}

/// Decrements a counter when dropped.
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one connection slot of an identity (and of the total) until dropped.
struct IdentitySlot {
    admission: Arc<Admission>,
    id: ClientId,
}

impl IdentitySlot {
    fn take(admission: &Arc<Admission>, id: &ClientId, limits: &LimitsConfig) -> Option<Self> {
        let total = admission.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let mut per = admission.per_identity.lock().ok()?;
        let n = per.entry(id.clone()).or_insert(0);
        *n += 1;
        let slot = Self {
            admission: admission.clone(),
            id: id.clone(),
        };
        let over = *n > limits.max_connections_per_identity || total > limits.max_connections;
        drop(per);
        (!over).then_some(slot)
    }
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        self.admission.connections.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut per) = self.admission.per_identity.lock()
            && let Some(n) = per.get_mut(&self.id)
        {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.id);
            }
        }
    }
}

/// The quinn server configuration from the configured TLS files (the CRL as it is on disk
/// now).
pub fn quinn_server_config(config: &ServerConfig) -> Result<quinn::ServerConfig, Error> {
    let identity = Identity::load(&config.tls.cert, &config.tls.key)?;
    let ca = load_certs(&config.tls.ca)?;
    let crls = match &config.tls.crl {
        Some(p) => load_crls(p)?,
        None => Vec::new(),
    };
    let tls = tls::server_config(&identity, &ca, crls)?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| Error::Config(format!("TLS config unusable for QUIC: {e}")))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(Arc::new(flotilla_protocol::quic::transport_config()));
    // Connection attempts waiting to be accepted are bounded too.
    sc.max_incoming(config.limits.max_handshakes);
    Ok(sc)
}

/// Builds the quinn endpoint from the configured TLS files. Its stateless reset key and its
/// connection-ID key come from the server's key, so a restarted server recognises its
/// predecessor's connections and resets them: clients reconnect at once.
pub fn endpoint(config: &ServerConfig) -> Result<quinn::Endpoint, Error> {
    let sc = quinn_server_config(config)?;
    let identity = Identity::load(&config.tls.cert, &config.tls.key)?;
    let mut ec = quinn::EndpointConfig::new(Arc::new(tls::stateless_reset_key(&identity)?));
    let cid_key = tls::connection_id_key(&identity)?;
    ec.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    let io = |source| Error::Io {
        path: format!("udp://{}", config.listen).into(),
        source,
    };
    let socket = std::net::UdpSocket::bind(config.listen).map_err(io)?;
    quinn::Endpoint::new(ec, Some(sc), socket, Arc::new(quinn::TokioRuntime)).map_err(io)
}

fn load_initial(path: &Path) -> Result<Params, Error> {
    let params = if path.extension().and_then(|e| e.to_str()) == Some("ckpt") {
        checkpoint::read(path)?.0.global
    } else {
        checkpoint::import_safetensors(path)?
    };
    info!(
        "initial model {}: {}",
        path.display(),
        ModelSummary::of(params.manifest())
    );
    Ok(params)
}

/// Builds the coordinator: resumed from the newest valid checkpoint in the configured folder
/// if there is one, else from the configured initial model (or none: a client will be
/// asked). Checkpoints that exist but none of which verifies stop the start (see
/// [`FileStore::latest`]), unless `fresh` sets them aside.
pub fn coordinator(config: &ServerConfig) -> Result<Coordinator, Error> {
    coordinator_with(config, &FileStore::for_config(config))
}

/// [`coordinator`], resuming from `store`.
pub fn coordinator_with(
    config: &ServerConfig,
    store: &dyn SnapshotStore,
) -> Result<Coordinator, Error> {
    let cc = config.coordinator()?;
    let strategy = config.strategy()?;
    if let Some((snapshot, name)) = store.latest()? {
        if name != strategy.name() {
            warn!(
                "the snapshot was written by strategy {name:?}, now {:?}; its strategy state is ignored",
                strategy.name()
            );
        }
        info!("resuming after round {} from {store:?}", snapshot.round);
        let snapshot = if name == strategy.name() {
            snapshot
        } else {
            flotilla_protocol::Snapshot {
                strategy_state: Vec::new(),
                ..snapshot
            }
        };
        return Ok(Coordinator::resume(cc, strategy, snapshot)?);
    }
    let initial = config
        .initial_model
        .as_deref()
        .map(load_initial)
        .transpose()?;
    Ok(Coordinator::new(cc, strategy, initial)?)
}

/// Starts the server: binds, resumes from checkpoints, and runs the federation in a task.
/// Coordinator events are also sent to `observer`, if given, each after the driver acted on
/// it (a completed round's checkpoint is on disk first), followed for each completed round by
/// [`Event::GlobalModel`].
pub fn start(
    config: ServerConfig,
    observer: Option<mpsc::UnboundedSender<Event>>,
) -> Result<RunningServer, Error> {
    let store = Arc::new(FileStore::for_config(&config));
    start_with_store(config, store, observer)
}

/// [`start`], with the run's snapshots and round records kept in `store` instead of the
/// configured checkpoint folder (for example a [`checkpoint::MemoryStore`] in a simulation).
pub fn start_with_store(
    config: ServerConfig,
    store: Arc<dyn SnapshotStore>,
    observer: Option<mpsc::UnboundedSender<Event>>,
) -> Result<RunningServer, Error> {
    let coordinator = coordinator_with(&config, store.as_ref())?;
    let endpoint = endpoint(&config)?;
    let local_addr = endpoint.local_addr().map_err(|source| Error::Io {
        path: "udp socket".into(),
        source,
    })?;
    info!(
        "listening on {local_addr} (QUIC, mutual TLS); {} rounds, strategy {}",
        config.coordinator()?.num_rounds,
        config.strategy.name
    );
    let telemetry = Arc::new(Telemetry::new(
        &config.strategy.name,
        config.coordinator()?.num_rounds,
    ));
    // The operations endpoint lives as long as the `RunningServer`.
    let (ops_stop, ops_stop_rx) = watch::channel(false);
    let ops_addr = match config.operations.listen {
        None => None,
        Some(addr) => {
            let io = |source| Error::Io {
                path: format!("tcp://{addr} (operations endpoint)").into(),
                source,
            };
            let std_listener = std::net::TcpListener::bind(addr).map_err(io)?;
            std_listener.set_nonblocking(true).map_err(io)?;
            let bound = std_listener.local_addr().map_err(io)?;
            let listener = tokio::net::TcpListener::from_std(std_listener).map_err(io)?;
            info!(
                "operations endpoint on http://{bound}/ (dashboard; /metrics for Prometheus; plain HTTP, keep it private)"
            );
            let t = telemetry.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::ops::serve(listener, t, ops_stop_rx).await {
                    warn!("operations endpoint stopped: {e}");
                }
            });
            Some(bound)
        }
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let reload = Arc::new(Notify::new());
    let task = tokio::spawn(run(
        config,
        store,
        coordinator,
        endpoint.clone(),
        shutdown_rx,
        reload.clone(),
        observer,
        telemetry.clone(),
    ));
    Ok(RunningServer {
        local_addr,
        ops_addr,
        telemetry,
        _ops_stop: ops_stop,
        shutdown,
        reload,
        endpoint,
        task,
    })
}

fn peer_certificate(conn: &quinn::Connection) -> Result<(ClientId, Vec<u8>), String> {
    let any = conn.peer_identity().ok_or("no client certificate")?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type")?;
    let leaf = certs.first().ok_or("empty certificate chain")?;
    let id = client_id_from_cert(leaf)
        .map(ClientId::new)
        .map_err(|e| e.to_string())?;
    let serial = serial_of(leaf).map_err(|e| e.to_string())?;
    Ok((id, serial))
}

/// Everything a connection task needs, shared.
#[derive(Clone)]
struct Shared {
    tx: mpsc::Sender<Input>,
    telemetry: Arc<Telemetry>,
    gate: Arc<RwLock<ModelGate>>,
    admission: Arc<Admission>,
    limits: LimitsConfig,
    codec: Limits,
    deadline: IoDeadline,
    epoch: Instant,
}

fn millis_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// Completes a handshake (within its deadline), then serves the connection.
async fn serve_incoming(incoming: quinn::Incoming, conn_id: u64, shared: Shared) {
    let remote = incoming.remote_address();
    let handshake = {
        let _held = Held(&shared.admission.handshakes);
        let limit = Duration::from_secs_f64(shared.limits.handshake_timeout_secs);
        tokio::time::timeout(limit, incoming).await
    };
    let conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // Bad, revoked, expired or foreign certificates end here: counted, summarised.
            shared
                .admission
                .refused_handshakes
                .fetch_add(1, Ordering::Relaxed);
            debug!("refused connection from {remote}: {e}");
            return;
        }
        Err(_) => {
            shared
                .admission
                .refused_handshakes
                .fetch_add(1, Ordering::Relaxed);
            debug!("handshake from {remote} timed out");
            return;
        }
    };
    let (id, serial) = match peer_certificate(&conn) {
        Ok(v) => v,
        Err(e) => {
            warn!("refused connection from {remote}: {e}");
            shared.telemetry.refused(Refusal::BadIdentity);
            conn.close(
                close::BAD_IDENTITY.into(),
                b"no usable client id in certificate",
            );
            return;
        }
    };
    let Some(_slot) = IdentitySlot::take(&shared.admission, &id, &shared.limits) else {
        warn!(client = %id, "refused connection from {remote}: too many connections");
        shared.telemetry.refused(Refusal::TooManyConnections);
        conn.close(close::TOO_MANY_CONNECTIONS.into(), b"too many connections");
        return;
    };
    debug!(client = %id, "connected from {remote}");
    let c = Arc::new(Conn {
        conn_id,
        conn: conn.clone(),
        remote,
        serial,
        activity: AtomicU64::new(millis_since(shared.epoch)),
    });
    serve_connection(c, id, shared).await;
}

async fn serve_connection(c: Arc<Conn>, id: ClientId, shared: Shared) {
    let conn = c.conn.clone();
    let conn_id = c.conn_id;
    // Nothing but a payload-less Hello is read before the client is known to speak the
    // protocol, and it must come in time.
    let hello_limits = Limits {
        max_payload_bytes: 0,
        ..shared.codec
    };
    let first = tokio::time::timeout(
        Duration::from_secs_f64(shared.limits.hello_timeout_secs),
        async {
            let mut s = conn
                .accept_uni()
                .await
                .map_err(|e| flotilla_protocol::Error::Transport(e.to_string()))?;
            recv_message_timed(&mut s, &hello_limits, None, &shared.deadline).await
        },
    )
    .await;
    let hello = match first {
        Ok(Ok((m @ Message::Hello(_), _))) => m,
        Ok(Ok((m, _))) => {
            debug!(client = %id, "first message was {}, not Hello", m.kind());
            conn.close(
                close::PROTOCOL_VIOLATION.into(),
                b"the first message must be Hello",
            );
            return;
        }
        Ok(Err(e)) => {
            debug!(client = %id, "no valid Hello: {e}");
            conn.close(close::PROTOCOL_VIOLATION.into(), b"invalid Hello");
            return;
        }
        Err(_) => {
            debug!(client = %id, "no Hello in time");
            conn.close(close::NO_HELLO.into(), b"no Hello in time");
            return;
        }
    };
    c.activity
        .store(millis_since(shared.epoch), Ordering::Relaxed);
    if shared
        .tx
        .send(Input::Hello {
            id: id.clone(),
            conn: c.clone(),
            hello,
        })
        .await
        .is_err()
    {
        return;
    }
    loop {
        let mut stream = match conn.accept_uni().await {
            Ok(s) => s,
            Err(e) => {
                debug!(client = %id, "connection closed: {e}");
                let _ = shared.tx.send(Input::Closed { id, conn_id }).await;
                return;
            }
        };
        c.activity
            .store(millis_since(shared.epoch), Ordering::Relaxed);
        let gate = shared
            .gate
            .read()
            .ok()
            .map(|g| g.clone())
            .unwrap_or_default();
        let limits = match (&gate.manifest, &gate.asked) {
            // Payloads must match the model (checked before allocation).
            (Some(_), _) => shared.codec,
            // Before there is a model, only the client asked for one may send a payload.
            (None, Some(asked)) if *asked == id => shared.codec,
            (None, _) => Limits {
                max_payload_bytes: 0,
                ..shared.codec
            },
        };
        // Every chunk of a long upload counts as a sign of life.
        let epoch = shared.epoch;
        let activity = &c.activity;
        let read = recv_message_observed(
            &mut stream,
            &limits,
            gate.manifest.as_deref(),
            &shared.deadline,
            &|| activity.store(millis_since(epoch), Ordering::Relaxed),
        )
        .await;
        c.activity
            .store(millis_since(shared.epoch), Ordering::Relaxed);
        let input = match read {
            Ok((msg, bytes)) => {
                debug!(client = %id, "received {} ({bytes} bytes)", msg.kind());
                Input::Message {
                    id: id.clone(),
                    conn_id,
                    msg,
                    bytes,
                }
            }
            Err(_) if conn.close_reason().is_some() => Input::Closed {
                id: id.clone(),
                conn_id,
            },
            Err(error) => Input::Malformed {
                id: id.clone(),
                conn_id,
                error,
            },
        };
        if shared.tx.send(input).await.is_err() {
            return;
        }
    }
}

/// Sends queued messages to one client in order, each within its deadline; when the queue
/// closes, waits (briefly) for the last message to be acknowledged, then closes the
/// connection. A send that misses its deadline closes the connection.
async fn writer(
    conn: quinn::Connection,
    mut rx: mpsc::Receiver<Message>,
    sent: Arc<AtomicU64>,
    deadline: IoDeadline,
) {
    while let Some(msg) = rx.recv().await {
        match send_message_timed(&conn, &msg, &deadline).await {
            Ok(n) => {
                sent.fetch_add(n, Ordering::Relaxed);
            }
            Err(e @ flotilla_protocol::Error::Timeout { .. }) => {
                debug!("send failed: {e}");
                conn.close(close::TOO_SLOW.into(), b"send deadline missed");
                return;
            }
            Err(e) => {
                // The connection broke (the client's close reason is kept: closing it again
                // would replace it), or (a bug of ours) the message could not be encoded.
                if conn.close_reason().is_none() {
                    warn!(
                        "sending a {} failed: {e}; closing the connection",
                        msg.kind()
                    );
                    conn.close(close::DONE.into(), b"send failed");
                } else {
                    debug!("sending a {} failed: {e}", msg.kind());
                }
                return;
            }
        }
    }
    // Give the peer a moment to read what was sent (an Abort telling it why) before closing.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    if conn.close_reason().is_none() {
        conn.close(close::DONE.into(), b"bye");
    }
}

/// Closes a connection after a short grace (time for a queued Abort to leave), whatever its
/// writer is doing.
fn close_soon(conn: &quinn::Connection, code: u32, reason: &'static [u8]) {
    let conn = conn.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = conn.closed() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => conn.close(code.into(), reason),
        }
    });
}

/// The CRL's revoked serials, if a CRL is configured and readable.
fn revoked_serials(config: &ServerConfig) -> Option<BTreeSet<Vec<u8>>> {
    let path = config.tls.crl.as_ref()?;
    match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|pem| crl_entries(&pem).map_err(|e| e.to_string()))
    {
        Ok((serials, _)) => Some(serials.into_iter().collect()),
        Err(e) => {
            warn!(
                "cannot read the CRL {}: {e}; keeping the previous one",
                path.display()
            );
            None
        }
    }
}

/// Modification time and length of the CRL file (to notice changes).
fn crl_stamp(config: &ServerConfig) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(config.tls.crl.as_ref()?).ok()?;
    Some((m.modified().ok()?, m.len()))
}

struct Central {
    telemetry: Arc<Telemetry>,
    config: ServerConfig,
    coord: Coordinator,
    clients: HashMap<ClientId, Client>,
    replacements: HashMap<ClientId, VecDeque<Instant>>,
    revoked: BTreeSet<Vec<u8>>,
    sent: Arc<AtomicU64>,
    epoch: Instant,
    writers: Vec<JoinHandle<()>>,
}

impl Central {
    /// Removes a client's connection (closing it now with `code`) and tells the coordinator.
    fn disconnect(&mut self, now: Instant, id: &ClientId, code: u32, reason: &'static [u8]) {
        if let Some(c) = self.clients.remove(id) {
            c.conn.conn.close(code.into(), reason);
            self.coord.handle_disconnect(now, id);
            self.telemetry.disconnected(id);
        }
    }

    /// A Hello from `conn`: enroll it, replace a stale session, or refuse it (copied
    /// certificate, too many replacements).
    fn on_hello(&mut self, now: Instant, id: ClientId, conn: Arc<Conn>, hello: Message) {
        if self.revoked.contains(&conn.serial) {
            warn!(client = %id, "refused {}: certificate revoked", conn.remote);
            self.telemetry.refused(Refusal::Revoked);
            conn.conn
                .close(close::REVOKED.into(), b"certificate revoked");
            return;
        }
        if let Some(old) = self.clients.get(&id) {
            let idle_ms =
                millis_since(self.epoch).saturating_sub(old.conn.activity.load(Ordering::Relaxed));
            let live_window = (self.config.limits.live_connection_secs * 1000.0) as u64;
            let live = old.conn.conn.close_reason().is_none() && idle_ms < live_window;
            let recent = self.replacements.entry(id.clone()).or_default();
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
            {
                recent.pop_front();
            }
            let too_many = recent.len() >= self.config.limits.replacements_per_minute as usize;
            if live || too_many {
                warn!(
                    client = %id,
                    "refused a second connection for this identity from {} while the one from {} is {}; \
                     a copied certificate, or the owner restarting (it may retry once the old connection is stale)",
                    conn.remote,
                    old.conn.remote,
                    if live { "live" } else { "replaced too often" }
                );
                self.telemetry.refused(Refusal::IdentityInUse);
                conn.conn.close(
                    close::IDENTITY_IN_USE.into(),
                    b"another device is using this identity",
                );
                return;
            }
            recent.push_back(now);
            warn!(
                client = %id,
                "connection from {} replaces the stale one from {} (idle {} ms)",
                conn.remote,
                old.conn.remote,
                idle_ms
            );
            self.disconnect(now, &id, close::REPLACED, b"replaced by a newer connection");
        }
        self.replacements.retain(|_, v| {
            v.back()
                .is_some_and(|t| now.duration_since(*t) <= Duration::from_secs(60))
        });
        let (ctx, crx) = mpsc::channel(self.config.limits.send_queue);
        self.writers.push(tokio::spawn(writer(
            conn.conn.clone(),
            crx,
            self.sent.clone(),
            self.config.limits.io_deadline(),
        )));
        self.writers.retain(|w| !w.is_finished());
        self.clients.insert(id.clone(), Client { conn, tx: ctx });
        if let Err(e) = self.coord.handle_message(now, &id, hello) {
            debug!(client = %id, "hello refused: {e}");
        }
    }

    /// Re-reads the CRL: new handshakes check it, live revoked clients are closed.
    fn reload_crl(&mut self, endpoint: &quinn::Endpoint) {
        match quinn_server_config(&self.config) {
            Ok(sc) => endpoint.set_server_config(Some(sc)),
            Err(e) => {
                warn!("CRL reload failed, keeping the previous one: {e}");
                return;
            }
        }
        let Some(revoked) = revoked_serials(&self.config) else {
            return;
        };
        self.revoked = revoked;
        let now = Instant::now();
        let gone: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| self.revoked.contains(&c.conn.serial))
            .map(|(id, _)| id.clone())
            .collect();
        info!("CRL reloaded: {} serials revoked", self.revoked.len());
        for id in gone {
            warn!(client = %id, "certificate revoked; closing its connection");
            self.telemetry.refused(Refusal::Revoked);
            self.disconnect(now, &id, close::REVOKED, b"certificate revoked");
        }
    }
}

async fn run(
    config: ServerConfig,
    store: Arc<dyn SnapshotStore>,
    coord: Coordinator,
    endpoint: quinn::Endpoint,
    mut shutdown: watch::Receiver<bool>,
    reload: Arc<Notify>,
    observer: Option<mpsc::UnboundedSender<Event>>,
    telemetry: Arc<Telemetry>,
) -> Result<RunSummary, Error> {
    let epoch = Instant::now();
    let gate: Arc<RwLock<ModelGate>> = Arc::new(RwLock::new(ModelGate::default()));
    let admission = Arc::new(Admission::default());
    // Inputs from connection tasks: bounded, so a flood of messages slows its senders down
    // instead of growing the server.
    let (tx, mut rx) = mpsc::channel::<Input>(1024);
    // Results of heavy work (unmasking) done on blocking threads; one job per round is out at
    // a time.
    let (job_tx, mut job_rx) = mpsc::channel::<JobResult>(4);
    let shared = Shared {
        tx,
        telemetry: telemetry.clone(),
        gate: gate.clone(),
        admission: admission.clone(),
        limits: config.limits.clone(),
        codec: config.limits.codec_limits(config.max_model_bytes),
        deadline: config.limits.io_deadline(),
        epoch,
    };
    let mut received = 0u64;
    let mut next_conn_id = 0u64;
    let strategy_name = config.strategy.name.clone();
    let mut crl_stamp_seen = crl_stamp(&config);
    let mut central = Central {
        telemetry: telemetry.clone(),
        revoked: revoked_serials(&config).unwrap_or_default(),
        config,
        coord,
        clients: HashMap::new(),
        replacements: HashMap::new(),
        sent: Arc::new(AtomicU64::new(0)),
        epoch,
        writers: Vec::new(),
    };
    let mut crl_tick = tokio::time::interval(Duration::from_secs_f64(
        central.config.limits.crl_reload_secs,
    ));
    crl_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut summary_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(30),
        Duration::from_secs(30),
    );
    summary_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused_reported = 0u64;
    let mut waiting: Option<String> = None;
    let (mut sent_counted, mut refused_counted) = (0u64, 0u64);
    telemetry.set_ready();
    central.coord.handle_start(Instant::now());

    loop {
        // What the connection tasks counted since the last turn.
        telemetry.beat();
        telemetry.set_connections(admission.connections.load(Ordering::Relaxed));
        let sent_now = central.sent.load(Ordering::Relaxed);
        telemetry.sent(sent_now.saturating_sub(sent_counted));
        sent_counted = sent_now;
        let refused_now = admission.refused_handshakes.load(Ordering::Relaxed);
        telemetry.refused_handshakes(refused_now.saturating_sub(refused_counted));
        refused_counted = refused_now;
        // The connection tasks bound payloads by the model: they must know it before any
        // client is sent work it will answer with one (a Train sent before this, answered
        // quickly, was read as an unexpected payload and its sender dropped).
        let mut model_from = None;
        if let Ok(mut g) = gate.write() {
            g.manifest = central.coord.global().map(|p| p.manifest().clone());
            if g.manifest.is_some() {
                model_from = g.asked.take();
            }
        }
        // Route everything the coordinator wants done.
        let mut finished = false;
        let mut too_slow = Vec::new();
        while let Some((to, msg)) = central.coord.poll_transmit() {
            debug!(client = %to, "sending {}", msg.kind());
            telemetry.sending(&to, &msg);
            if matches!(msg, Message::GetParams)
                && let Ok(mut g) = gate.write()
            {
                g.asked = Some(to.clone());
            }
            if let Some(c) = central.clients.get(&to)
                && c.tx.try_send(msg).is_err()
            {
                too_slow.push(to);
            }
        }
        for id in too_slow {
            warn!(client = %id, "cannot keep up with its send queue; closing");
            telemetry.refused(Refusal::TooSlow);
            central.disconnect(Instant::now(), &id, close::TOO_SLOW, b"send queue full");
        }
        // Heavy work leaves the loop: connections, heartbeats and timers go on meanwhile.
        while let Some(job) = central.coord.poll_job() {
            let (kind, round) = (job.kind(), job.round());
            debug!("round {round}: {kind} job started");
            let tx = job_tx.clone();
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let result = job.run();
                debug!(
                    "round {round}: {kind} job done in {:.3} s",
                    started.elapsed().as_secs_f64()
                );
                let _ = tx.blocking_send(result);
            });
        }
        let mut persisted = false;
        while let Some(ev) = central.coord.poll_event() {
            match &ev {
                Event::ClientEnrolled(id) => info!(client = %id, "enrolled"),
                Event::WaitingForClients {
                    enrolled,
                    eligible,
                    required,
                    without_secure_aggregation,
                } => {
                    let line =
                        waiting_line(*enrolled, *eligible, *required, *without_secure_aggregation);
                    info!("{line}");
                    waiting = Some(line);
                }
                Event::ClientRefused { client, reason } => {
                    warn!(client = %client, "refused: {reason}");
                    if let Some(c) = central.clients.remove(client) {
                        close_soon(&c.conn.conn, close::WRONG_MODEL, b"wrong model");
                    }
                }
                Event::WaitingForModel {
                    agreeing,
                    required,
                    undeclared,
                } => {
                    let line = format!(
                        "waiting for {required} clients that declare the same model to take the \
                         initial model from (largest group so far: {agreeing}; {undeclared} \
                         declared none); or give the server an initial model (--initial-model)"
                    );
                    info!("{line}");
                    waiting = Some(line);
                }
                Event::ClientDropped { client, reason } => {
                    let kind = reason.kind();
                    warn!(client = %client, kind = %kind, "dropped ({kind}): {reason}");
                    // Dropping the sender lets the writer flush the Abort; the connection
                    // is closed shortly whatever the writer is doing.
                    if let Some(c) = central.clients.remove(client) {
                        close_soon(&c.conn.conn, close::PROTOCOL_VIOLATION, b"dropped");
                    }
                }
                Event::RoundStarted { round, selected } => {
                    waiting = None;
                    info!("round {round}: {selected} clients training")
                }
                Event::Dispatched {
                    task,
                    version,
                    clients,
                } => {
                    waiting = None;
                    debug!("task {task}: {clients} clients training on model version {version}")
                }
                Event::RoundAborted(r) => {
                    // A round that did not complete changes nothing worth a checkpoint (and
                    // must never put a model no round produced on disk): only its record.
                    log_round(r);
                    let store = store.clone();
                    let record = r.clone();
                    tokio::task::spawn_blocking(move || store.record(&record))
                        .await
                        .map_err(|e| Error::Config(format!("history task: {e}")))??;
                    persisted = true;
                }
                Event::RoundCompleted(r) => {
                    log_round(r);
                    if let Some(snapshot) = central.coord.snapshot() {
                        let store = store.clone();
                        let name = strategy_name.clone();
                        let record = r.clone();
                        let started = Instant::now();
                        tokio::task::spawn_blocking(move || store.save(&snapshot, &name, &record))
                            .await
                            .map_err(|e| Error::Config(format!("checkpoint task: {e}")))??;
                        telemetry.checkpoint_written(started.elapsed().as_secs_f64());
                    }
                    // Round k is on disk: only now may round k + 1 be announced.
                    persisted = true;
                }
                Event::PrivacyBudgetReached {
                    spent,
                    next,
                    budget,
                } => warn!(
                    "privacy budget reached: ε = {spent:.3} spent, the next round would bring it to {next:.3} > {budget}; stopping"
                ),
                Event::SecureStage { round, stage } => {
                    info!("round {round}: secure aggregation, {stage:?}")
                }
                Event::Finished => finished = true,
                Event::ModelInitialized => {
                    if let (Some(g), Some(from)) = (central.coord.global(), &model_from) {
                        info!(
                            "initial model taken from client {from}: {}",
                            ModelSummary::of(g.manifest())
                        );
                    }
                }
                Event::LateMessage { .. } => debug!("{ev:?}"),
                _ => debug!("{ev:?}"),
            }
            telemetry.event(&ev);
            if let Some(o) = &observer {
                let completed = match &ev {
                    Event::RoundCompleted(r) => Some(r.round),
                    _ => None,
                };
                let _ = o.send(ev);
                if let (Some(round), Some(params)) = (completed, central.coord.global()) {
                    let _ = o.send(Event::GlobalModel {
                        round,
                        params: params.clone(),
                    });
                }
            }
        }
        if finished {
            info!("all {} rounds done", central.coord.config().num_rounds);
            break;
        }
        if persisted {
            central.coord.handle_persisted(Instant::now());
            continue;
        }

        let deadline = central.coord.poll_timeout();
        tokio::select! {
            _ = shutdown.changed() => {
                info!("shutting down");
                for c in central.clients.values() {
                    let _ = c.tx.try_send(Message::Abort { round: None, reason: AbortReason::ServerShutdown });
                }
                break;
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let limits = &central.config.limits;
                let in_flight = admission.handshakes.load(Ordering::Relaxed);
                if in_flight >= limits.max_handshakes {
                    admission.refused_handshakes.fetch_add(1, Ordering::Relaxed);
                    incoming.refuse();
                    continue;
                }
                if in_flight >= limits.retry_above_handshakes
                    && !incoming.remote_address_validated()
                    && incoming.may_retry()
                {
                    // Address validation: the peer must echo a token before we keep state.
                    let _ = incoming.retry();
                    continue;
                }
                admission.handshakes.fetch_add(1, Ordering::Relaxed);
                next_conn_id += 1;
                tokio::spawn(serve_incoming(incoming, next_conn_id, shared.clone()));
            }
            Some(input) = rx.recv() => {
                let now = Instant::now();
                match input {
                    Input::Hello { id, conn, hello } => central.on_hello(now, id, conn, hello),
                    Input::Message { id, conn_id, msg, bytes } => {
                        if central.clients.get(&id).is_some_and(|c| c.conn.conn_id == conn_id) {
                            received += bytes;
                            telemetry.received(bytes);
                            telemetry.receiving(&msg);
                            if let Err(e) = central.coord.handle_message(now, &id, msg) {
                                debug!(client = %id, "protocol error: {e}");
                            }
                        }
                    }
                    Input::Malformed { id, conn_id, error } => {
                        if central.clients.get(&id).is_some_and(|c| c.conn.conn_id == conn_id) {
                            central.coord.handle_malformed(now, &id, &error);
                        }
                    }
                    Input::Closed { id, conn_id } => {
                        if central.clients.get(&id).is_some_and(|c| c.conn.conn_id == conn_id) {
                            central.clients.remove(&id);
                            central.coord.handle_disconnect(now, &id);
                            telemetry.disconnected(&id);
                        }
                    }
                }
            }
            Some(result) = job_rx.recv() => {
                central.coord.handle_job_result(Instant::now(), result);
            }
            _ = reload.notified() => {
                crl_stamp_seen = crl_stamp(&central.config);
                central.reload_crl(&endpoint);
            }
            _ = crl_tick.tick() => {
                let stamp = crl_stamp(&central.config);
                if stamp != crl_stamp_seen {
                    crl_stamp_seen = stamp;
                    central.reload_crl(&endpoint);
                }
            }
            _ = summary_tick.tick() => {
                let refused = admission.refused_handshakes.load(Ordering::Relaxed);
                if refused > refused_reported {
                    warn!(
                        "refused {} connection attempts in the last 30 s ({} in all; failed or timed-out handshakes, over the handshake cap)",
                        refused - refused_reported,
                        refused
                    );
                    refused_reported = refused;
                }
                if let Some(line) = &waiting {
                    info!("still {line}");
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                // What the connections saw (bytes of uploads in progress, messages still
                // queued behind a long pause of ours) counts before anyone is found idle.
                for (id, c) in &central.clients {
                    let at = epoch + Duration::from_millis(c.conn.activity.load(Ordering::Relaxed));
                    central.coord.handle_activity(at, id);
                }
                central.coord.handle_timeout(Instant::now());
            }
        }
    }

    // Let writers deliver the final messages, then close.
    central.clients.clear();
    // Bounded as a whole (not per writer): a stop signal must end the process within
    // seconds, whatever slow clients do.
    let flush_by = tokio::time::Instant::now() + Duration::from_millis(1500);
    for w in std::mem::take(&mut central.writers) {
        let _ = tokio::time::timeout_at(flush_by, w).await;
    }
    telemetry.sent(
        central
            .sent
            .load(Ordering::Relaxed)
            .saturating_sub(sent_counted),
    );
    endpoint.close(0u32.into(), b"server done");
    let _ = tokio::time::timeout(Duration::from_millis(700), endpoint.wait_idle()).await;
    Ok(RunSummary {
        history: central.coord.history().to_vec(),
        global: central.coord.global().cloned(),
        bytes_sent: central.sent.load(Ordering::Relaxed),
        bytes_received: received,
    })
}

fn waiting_line(
    enrolled: usize,
    eligible: usize,
    required: usize,
    without_secagg: usize,
) -> String {
    let why = if without_secagg > 0 {
        format!(
            "; {without_secagg} connected but not eligible because they do not implement secure aggregation"
        )
    } else {
        String::new()
    };
    format!(
        "waiting for {required} eligible clients (have {eligible} eligible of {enrolled} enrolled{why})"
    )
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

fn log_round(r: &RoundRecord) {
    let eval = r
        .evaluation
        .as_ref()
        .map(|e| {
            let acc = e
                .metrics
                .get("accuracy")
                .map(|a| format!(", accuracy {a:.4}"))
                .unwrap_or_default();
            format!("; eval loss {:.4}{acc}", e.loss)
        })
        .unwrap_or_default();
    let privacy = r
        .privacy
        .as_ref()
        .map(|p| format!("; privacy spent ε = {:.3} at δ = {:e}", p.epsilon, p.delta))
        .unwrap_or_default();
    match &r.aborted {
        None => info!(
            "round {} done: {}/{} results{}{eval}{privacy}",
            r.round,
            r.results,
            r.selected,
            failures_text(&r.failures)
        ),
        Some(reason) => warn!("round {} aborted: {reason}", r.round),
    }
}

/// `; 2 failures: c7 (disconnected), c9 (no answer before the deadline)`: each client and
/// why, the first ten named.
fn failures_text(failures: &[flotilla_protocol::strategy::Failure]) -> String {
    const NAMED: usize = 10;
    if failures.is_empty() {
        return String::new();
    }
    let mut named: Vec<String> = failures
        .iter()
        .take(NAMED)
        .map(|f| format!("{} ({})", f.client, f.reason))
        .collect();
    if failures.len() > NAMED {
        named.push(format!("and {} more", failures.len() - NAMED));
    }
    let n = failures.len();
    format!(
        "; {n} failure{}: {}",
        if n == 1 { "" } else { "s" },
        named.join(", ")
    )
}
