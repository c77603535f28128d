//! The server's driver: a quinn endpoint that pumps QUIC streams into the
//! [`Coordinator`] and fires its timers. It holds no round logic.
//!
//! * One task per connection: it takes the client id from the verified certificate (never
//!   from a message), then reads one message per unidirectional stream, in order, with the
//!   codec's limits and the global model's manifest checked before any payload is allocated.
//! * One writer task per connection sends what the coordinator queues for that client, in
//!   order, streaming model payloads in chunks straight from the shared global parameters.
//! * The central task owns the coordinator: it feeds it inputs and timeouts, routes its
//!   transmits, closes the connections of clients it drops, and writes a checkpoint after
//!   every round before going on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use flotilla_crypto::pki::{Identity, client_id_from_cert, load_certs, load_crls};
use flotilla_crypto::tls;
use flotilla_protocol::codec::Limits;
use flotilla_protocol::coordinator::{Coordinator, Event, RoundRecord};
use flotilla_protocol::quic::{recv_message, send_message};
use flotilla_protocol::{ClientId, Manifest, Message, Params};
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::Error;
use crate::checkpoint;
use crate::config::ServerConfig;

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
    shutdown: watch::Sender<bool>,
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
    Connected {
        id: ClientId,
        conn_id: u64,
        conn: quinn::Connection,
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

struct Client {
    conn_id: u64,
    tx: mpsc::UnboundedSender<Message>,
}

/// Builds the quinn endpoint from the configured TLS files.
pub fn endpoint(config: &ServerConfig) -> Result<quinn::Endpoint, Error> {
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
    quinn::Endpoint::server(sc, config.listen).map_err(|source| Error::Io {
        path: format!("udp://{}", config.listen).into(),
        source,
    })
}

fn load_initial(path: &Path) -> Result<Params, Error> {
    if path.extension().and_then(|e| e.to_str()) == Some("ckpt") {
        Ok(checkpoint::read(path)?.0.global)
    } else {
        checkpoint::import_safetensors(path)
    }
}

/// Builds the coordinator: resumed from the newest valid checkpoint if there is one, else
/// from the configured initial model (or none: a client will be asked).
pub fn coordinator(config: &ServerConfig) -> Result<Coordinator, Error> {
    let cc = config.coordinator()?;
    let strategy = config.strategy()?;
    if let Some((path, snapshot, name)) = checkpoint::latest_valid(&config.checkpoint_dir)? {
        if name != strategy.name() {
            warn!(
                "checkpoint {} was written by strategy {name:?}, now {:?}; its strategy state is ignored",
                path.display(),
                strategy.name()
            );
        }
        info!(
            "resuming after round {} from {}",
            snapshot.round,
            path.display()
        );
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
/// Coordinator events are also sent to `observer`, if given.
pub fn start(
    config: ServerConfig,
    observer: Option<mpsc::UnboundedSender<Event>>,
) -> Result<RunningServer, Error> {
    let coordinator = coordinator(&config)?;
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
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(run(
        config,
        coordinator,
        endpoint.clone(),
        shutdown_rx,
        observer,
    ));
    Ok(RunningServer {
        local_addr,
        shutdown,
        endpoint,
        task,
    })
}

fn peer_client_id(conn: &quinn::Connection) -> Result<ClientId, String> {
    let any = conn.peer_identity().ok_or("no client certificate")?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type")?;
    let leaf = certs.first().ok_or("empty certificate chain")?;
    client_id_from_cert(leaf)
        .map(ClientId::new)
        .map_err(|e| e.to_string())
}

async fn serve_connection(
    incoming: quinn::Incoming,
    conn_id: u64,
    tx: mpsc::UnboundedSender<Input>,
    expected: Arc<RwLock<Option<Arc<Manifest>>>>,
    limits: Limits,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Bad, revoked, expired or foreign certificates end here.
            info!("refused connection from {remote}: {e}");
            return;
        }
    };
    let id = match peer_client_id(&conn) {
        Ok(id) => id,
        Err(e) => {
            warn!("refused connection from {remote}: {e}");
            conn.close(1u32.into(), b"no usable client id in certificate");
            return;
        }
    };
    debug!(client = %id, "connected from {remote}");
    if tx
        .send(Input::Connected {
            id: id.clone(),
            conn_id,
            conn: conn.clone(),
        })
        .is_err()
    {
        return;
    }
    loop {
        let mut stream = match conn.accept_uni().await {
            Ok(s) => s,
            Err(e) => {
                debug!(client = %id, "connection closed: {e}");
                let _ = tx.send(Input::Closed { id, conn_id });
                return;
            }
        };
        let expect = expected.read().ok().and_then(|g| g.clone());
        let input = match recv_message(&mut stream, &limits, expect.as_deref()).await {
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
        if tx.send(input).is_err() {
            return;
        }
    }
}

/// Sends queued messages to one client in order; when the queue closes, waits (briefly) for
/// the last message to be acknowledged, then closes the connection.
async fn writer(
    conn: quinn::Connection,
    mut rx: mpsc::UnboundedReceiver<Message>,
    sent: Arc<std::sync::atomic::AtomicU64>,
) {
    while let Some(msg) = rx.recv().await {
        match send_message(&conn, &msg).await {
            Ok(n) => {
                sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                debug!("send failed: {e}");
                break;
            }
        }
    }
    // Give the peer a moment to read what was sent (an Abort telling it why) before closing.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(0u32.into(), b"bye");
}

async fn run(
    config: ServerConfig,
    mut coord: Coordinator,
    endpoint: quinn::Endpoint,
    mut shutdown: watch::Receiver<bool>,
    observer: Option<mpsc::UnboundedSender<Event>>,
) -> Result<RunSummary, Error> {
    let limits = Limits {
        max_payload_bytes: config.max_model_bytes,
        ..Limits::default()
    };
    let expected: Arc<RwLock<Option<Arc<Manifest>>>> = Arc::new(RwLock::new(None));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut received = 0u64;
    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let mut clients: HashMap<ClientId, Client> = HashMap::new();
    let mut writers: Vec<JoinHandle<()>> = Vec::new();
    let mut next_conn_id = 0u64;
    let strategy_name = config.strategy.name.clone();

    loop {
        // Route everything the coordinator wants done.
        let mut finished = false;
        while let Some((to, msg)) = coord.poll_transmit() {
            debug!(client = %to, "sending {}", msg.kind());
            if let Some(c) = clients.get(&to) {
                let _ = c.tx.send(msg);
            }
        }
        while let Some(ev) = coord.poll_event() {
            match &ev {
                Event::ClientEnrolled(id) => info!(client = %id, "enrolled"),
                Event::ClientDropped { client, reason } => {
                    warn!(client = %client, "dropped: {reason}");
                    // Dropping the sender lets the writer flush the Abort, then close.
                    clients.remove(client);
                }
                Event::RoundStarted { round, selected } => {
                    info!("round {round}: {selected} clients training")
                }
                Event::RoundCompleted(r) | Event::RoundAborted(r) => {
                    log_round(r);
                    if let Some(snapshot) = coord.snapshot() {
                        let dir = config.checkpoint_dir.clone();
                        let name = strategy_name.clone();
                        let path = tokio::task::spawn_blocking(move || {
                            checkpoint::write(&dir, &snapshot, &name)
                        })
                        .await
                        .map_err(|e| Error::Config(format!("checkpoint task: {e}")))??;
                        debug!("checkpoint {}", path.display());
                    }
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
                Event::ModelInitialized | Event::LateMessage { .. } => debug!("{ev:?}"),
                _ => debug!("{ev:?}"),
            }
            if let Some(o) = &observer {
                let _ = o.send(ev);
            }
        }
        if let Ok(mut g) = expected.write() {
            *g = coord.global().map(|p| p.manifest().clone());
        }
        if finished {
            info!("all {} rounds done", coord.config().num_rounds);
            break;
        }

        let deadline = coord.poll_timeout();
        tokio::select! {
            _ = shutdown.changed() => {
                info!("shutting down");
                for c in clients.values() {
                    let _ = c.tx.send(Message::Abort { round: None, reason: flotilla_protocol::messages::AbortReason::ServerShutdown });
                }
                break;
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                next_conn_id += 1;
                tokio::spawn(serve_connection(incoming, next_conn_id, tx.clone(), expected.clone(), limits));
            }
            Some(input) = rx.recv() => {
                let now = Instant::now();
                match input {
                    Input::Connected { id, conn_id, conn } => {
                        if clients.remove(&id).is_some() {
                            info!(client = %id, "reconnected; replacing its old connection");
                            coord.handle_disconnect(now, &id);
                        }
                        let (ctx, crx) = mpsc::unbounded_channel();
                        writers.push(tokio::spawn(writer(conn, crx, sent.clone())));
                        writers.retain(|w| !w.is_finished());
                        clients.insert(id, Client { conn_id, tx: ctx });
                    }
                    Input::Message { id, conn_id, msg, bytes } => {
                        if clients.get(&id).is_some_and(|c| c.conn_id == conn_id) {
                            received += bytes;
                            if let Err(e) = coord.handle_message(now, &id, msg) {
                                debug!(client = %id, "protocol error: {e}");
                            }
                        }
                    }
                    Input::Malformed { id, conn_id, error } => {
                        if clients.get(&id).is_some_and(|c| c.conn_id == conn_id) {
                            coord.handle_malformed(now, &id, &error);
                        }
                    }
                    Input::Closed { id, conn_id } => {
                        if clients.get(&id).is_some_and(|c| c.conn_id == conn_id) {
                            clients.remove(&id);
                            coord.handle_disconnect(now, &id);
                        }
                    }
                }
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                coord.handle_timeout(Instant::now());
            }
        }
    }

    // Let writers deliver the final messages, then close.
    clients.clear();
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }
    endpoint.close(0u32.into(), b"server done");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(RunSummary {
        history: coord.history().to_vec(),
        global: coord.global().cloned(),
        bytes_sent: sent.load(std::sync::atomic::Ordering::Relaxed),
        bytes_received: received,
    })
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
            "round {} done: {}/{} results, {} failures{eval}{privacy}",
            r.round,
            r.results,
            r.selected,
            r.failures.len()
        ),
        Some(reason) => warn!("round {} aborted: {reason}", r.round),
    }
}
