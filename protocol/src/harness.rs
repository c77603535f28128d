//! A deterministic harness that runs one [`Coordinator`] and many [`Participant`]s on a
//! simulated clock, with in-memory queues in place of QUIC.
//!
//! Every message is really encoded with [`crate::wire::codec`] and decoded on arrival, so faults can
//! act on bytes: a [`Filter`] sees each message before it is sent and may drop, delay,
//! duplicate, corrupt or replace it; any participant can be killed silently (a crash: the
//! server only notices at its deadline) or disconnected (the server is told, as a closed QUIC
//! connection would). Everything happens in one thread in a fixed order, and all randomness
//! comes from a seeded RNG, so a run is reproducible bit for bit. The design follows quinn's
//! `Pair` and raft-rs's test `Network`.
//!
//! Simulations reuse it as their in-memory transport, so thousands of virtual clients run the
//! very state machines the real drivers run.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::coordinator::{Coordinator, DropReason, Event};
use crate::participant::{Participant, ParticipantEvent};
use crate::wire::codec::{self, Limits};
use crate::wire::messages::{
    Capabilities, ClientId, EvaluateRes, Message, Metrics, ModelSummary, TrainConfig, TrainRes,
};
use crate::wire::params::Params;

/// Which way a message travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    ToServer,
    /// Server to client.
    ToClient,
}

/// A message about to be sent, as a [`Filter`] sees it.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// The client at the other end.
    pub client: &'a ClientId,
    /// Direction.
    pub direction: Direction,
    /// The message.
    pub message: &'a Message,
    /// Time since the start of the simulation.
    pub elapsed: Duration,
}

/// What to do with a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Deliver after the harness latency.
    Deliver,
    /// Lose it.
    Drop,
    /// Deliver after the latency plus this.
    Delay(Duration),
    /// Deliver twice.
    Duplicate,
    /// Flip one random byte of the encoding.
    Corrupt,
    /// Deliver these bytes instead.
    Replace(Vec<u8>),
}

/// Fault injection: decides the fate of each message.
pub type Filter = Box<dyn FnMut(&Envelope<'_>) -> Action>;

/// A training result now, or one that work on other threads will produce.
pub enum Deferred<T> {
    /// Already computed.
    Ready(T),
    /// Computed elsewhere; called (and may block) when the simulated compute time is over.
    Later(Box<dyn FnOnce() -> T>),
}

impl<T: std::fmt::Debug> std::fmt::Debug for Deferred<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Deferred::Ready(t) => f.debug_tuple("Ready").field(t).finish(),
            Deferred::Later(_) => f.write_str("Later(..)"),
        }
    }
}

impl<T> Deferred<T> {
    fn resolve(self) -> T {
        match self {
            Deferred::Ready(t) => t,
            Deferred::Later(f) => f(),
        }
    }
}

/// How a simulated client trains and evaluates.
pub trait ClientBehaviour {
    /// Parameters it offers when the server has no model yet.
    fn initial_params(&mut self) -> Params;
    /// Local training.
    fn train(&mut self, round: u64, config: &TrainConfig, model: &Params) -> TrainRes;
    /// Starts local training. The harness collects the result only when the client's simulated
    /// compute time has passed, so every client sampled at one instant has started before any
    /// result is waited for: a behaviour that hands the work to a thread pool trains them in
    /// parallel. By default, trains at once with [`ClientBehaviour::train`].
    fn start_train(
        &mut self,
        round: u64,
        config: &TrainConfig,
        model: Params,
    ) -> Deferred<TrainRes> {
        Deferred::Ready(self.train(round, config, &model))
    }
    /// Local evaluation.
    fn evaluate(&mut self, round: u64, model: &Params) -> EvaluateRes;
    /// Simulated time the work takes.
    fn compute_time(&self) -> Duration {
        Duration::from_millis(10)
    }
}

/// A client that answers every round with the model plus `delta` on every coordinate, with a
/// fixed example count. Enough to check aggregation arithmetic by hand.
#[derive(Clone, Debug)]
pub struct FixedDelta {
    /// Added to every coordinate of the received model.
    pub delta: f32,
    /// Example count reported (the FedAvg weight).
    pub num_examples: u64,
    /// Initial parameters it offers.
    pub initial: Params,
    /// Simulated training time.
    pub compute: Duration,
}

impl ClientBehaviour for FixedDelta {
    fn initial_params(&mut self) -> Params {
        self.initial.clone()
    }

    fn train(&mut self, round: u64, _config: &TrainConfig, model: &Params) -> TrainRes {
        let values: Vec<f32> = model.values().iter().map(|v| v + self.delta).collect();
        let mut metrics = Metrics::new();
        metrics.insert("loss".into(), self.delta as f64);
        TrainRes {
            round,
            num_examples: self.num_examples,
            metrics,
            // Same manifest as the model, same length: cannot fail.
            params: model.with_values(values).unwrap_or_else(|_| model.clone()),
        }
    }

    fn evaluate(&mut self, round: u64, model: &Params) -> EvaluateRes {
        let mean =
            model.values().iter().map(|&v| v as f64).sum::<f64>() / model.len().max(1) as f64;
        EvaluateRes {
            round,
            num_examples: self.num_examples,
            loss: mean,
            metrics: Metrics::new(),
        }
    }

    fn compute_time(&self) -> Duration {
        self.compute
    }
}

enum Job {
    Train(Deferred<TrainRes>),
    Evaluate(EvaluateRes),
}

enum What {
    ToServer(ClientId, Vec<u8>),
    ToClient(ClientId, Vec<u8>),
    ServerSeesDisconnect(ClientId),
    ClientSeesDisconnect(ClientId),
    CoordinatorTimer,
    ParticipantTimer(ClientId),
    JobDone(ClientId, u64, Job),
    /// The device leaves (end of an availability window).
    GoOffline(ClientId),
    /// The device comes back with a new session (start of an availability window).
    GoOnline(ClientId),
}

struct Item {
    at: Instant,
    seq: u64,
    what: What,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Node {
    participant: Participant,
    behaviour: Box<dyn ClientBehaviour>,
    /// The process is running.
    alive: bool,
    /// The connection is open (the server has not dropped it).
    connected: bool,
    timer: Option<Instant>,
    job_gen: u64,
}

/// Counters of what the harness did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages delivered (both ways).
    pub delivered: u64,
    /// Bytes delivered (both ways).
    pub bytes: u64,
    /// Messages the filter dropped.
    pub dropped: u64,
    /// Messages that failed to decode on arrival.
    pub undecodable: u64,
}

/// The simulated network. See the module docs.
pub struct Harness {
    base: Instant,
    now: Instant,
    /// The server's machine (public so tests can inspect it).
    pub coordinator: Coordinator,
    nodes: BTreeMap<ClientId, Node>,
    queue: BinaryHeap<Reverse<Item>>,
    seq: u64,
    /// One-way latency of every message.
    pub latency: Duration,
    filter: Option<Filter>,
    rng: ChaCha8Rng,
    /// The seed, from which the clients' providers are derived.
    seed: u64,
    coordinator_timer: Option<Instant>,
    limits: Limits,
    /// Every coordinator event, with the simulated time it happened at.
    pub events: Vec<(Duration, Event)>,
    /// Counters.
    pub stats: Stats,
    /// Acknowledge each round's snapshot as durable at once
    /// ([`Coordinator::handle_persisted`]); default on.
    pub auto_persist: bool,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("elapsed", &self.elapsed())
            .field("nodes", &self.nodes.len())
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl Harness {
    /// A harness around `coordinator`; `seed` drives every random choice the harness makes.
    pub fn new(coordinator: Coordinator, seed: u64) -> Self {
        let base = Instant::now();
        Self {
            base,
            now: base,
            coordinator,
            nodes: BTreeMap::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            latency: Duration::from_millis(5),
            filter: None,
            rng: ChaCha8Rng::seed_from_u64(seed),
            seed,
            coordinator_timer: None,
            limits: Limits::default(),
            events: Vec::new(),
            stats: Stats::default(),
            auto_persist: true,
        }
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    /// The simulated "now".
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Installs a fault filter (replacing any previous one).
    pub fn set_filter(&mut self, filter: Filter) {
        self.filter = Some(filter);
    }

    /// Removes the fault filter.
    pub fn clear_filter(&mut self) {
        self.filter = None;
    }

    /// Adds a client and connects it (it sends its hello, declaring the model of its
    /// initial parameters).
    pub fn add_client(&mut self, id: ClientId, mut behaviour: Box<dyn ClientBehaviour>) {
        let model = ModelSummary::of(behaviour.initial_params().manifest());
        let participant = Participant::new(Capabilities {
            backend: "sim".into(),
            num_examples: None,
            secure_aggregation: false,
            software: "harness".into(),
            model: Some(model),
        })
        // The harness repeats bit for bit: a client's noise follows from the harness's seed
        // and the client's name.
        .with_provider(crate::provider::CryptoProvider::insecure_deterministic(
            self.seed ^ fnv1a(id.as_str().as_bytes()),
        ));
        self.add_participant(id, participant, behaviour);
    }

    /// Adds a client with a participant configured by the caller (for example with secure
    /// aggregation) and connects it.
    pub fn add_participant(
        &mut self,
        id: ClientId,
        mut participant: Participant,
        behaviour: Box<dyn ClientBehaviour>,
    ) {
        participant.connect(self.now);
        self.nodes.insert(
            id.clone(),
            Node {
                participant,
                behaviour,
                alive: true,
                connected: true,
                timer: None,
                job_gen: 0,
            },
        );
        self.flush_node(&id);
    }

    /// Tells the coordinator that the last round's snapshot is durable (when
    /// [`Harness::auto_persist`] is off) and delivers what follows.
    pub fn persisted(&mut self) {
        self.coordinator.handle_persisted(self.now);
        self.flush_coordinator();
    }

    /// The participant of a client.
    pub fn participant(&self, id: &ClientId) -> Option<&Participant> {
        self.nodes.get(id).map(|n| &n.participant)
    }

    /// Kills a client silently: it stops at once, and the server finds out only through its
    /// deadlines (a crash, or a network partition).
    pub fn kill(&mut self, id: &ClientId) {
        if let Some(n) = self.nodes.get_mut(id) {
            n.alive = false;
        }
    }

    /// Makes `id` available only within `windows` (simulated time since the start, each
    /// `(from, to)`, in order and not overlapping): at each window's end the device goes away
    /// as a closed connection would (its work is lost, the server sees the close), and at
    /// the next window's start it comes back with a new session (a new hello, the same
    /// credentials). Before the first window it is away. Windows already past are skipped.
    pub fn set_availability(&mut self, id: &ClientId, windows: &[(Duration, Duration)]) {
        let elapsed = self.elapsed();
        if !windows
            .iter()
            .any(|&(from, to)| from <= elapsed && elapsed < to)
        {
            self.schedule(Duration::ZERO, What::GoOffline(id.clone()));
        }
        for &(from, to) in windows {
            if to <= elapsed || to <= from {
                continue;
            }
            if from > elapsed {
                self.schedule(from - elapsed, What::GoOnline(id.clone()));
            }
            self.schedule(to - elapsed, What::GoOffline(id.clone()));
        }
    }

    /// Kills a client and lets the server see its connection close after the latency.
    pub fn disconnect(&mut self, id: &ClientId) {
        let was_up = self.nodes.get(id).is_some_and(|n| n.alive && n.connected);
        if let Some(n) = self.nodes.get_mut(id) {
            n.alive = false;
            n.connected = false;
        }
        if was_up {
            self.schedule(self.latency, What::ServerSeesDisconnect(id.clone()));
        }
    }

    fn schedule(&mut self, after: Duration, what: What) {
        self.seq += 1;
        self.queue.push(Reverse(Item {
            at: self.now + after,
            seq: self.seq,
            what,
        }));
    }

    fn send(&mut self, client: ClientId, direction: Direction, msg: Message) {
        let action = match &mut self.filter {
            Some(f) => f(&Envelope {
                client: &client,
                direction,
                message: &msg,
                elapsed: self.now - self.base,
            }),
            None => Action::Deliver,
        };
        let bytes = match codec::encode_to_vec(&msg) {
            Ok(b) => b,
            Err(_) => return, // an unencodable message is lost, like a failed write
        };
        let (bytes, copies, extra) = match action {
            Action::Deliver => (bytes, 1, Duration::ZERO),
            Action::Drop => {
                self.stats.dropped += 1;
                return;
            }
            Action::Delay(d) => (bytes, 1, d),
            Action::Duplicate => (bytes, 2, Duration::ZERO),
            Action::Corrupt => {
                let mut b = bytes;
                if !b.is_empty() {
                    let i = self.rng.random_range(0..b.len());
                    let bit = 1u8 << self.rng.random_range(0..8);
                    if let Some(x) = b.get_mut(i) {
                        *x ^= bit;
                    }
                }
                (b, 1, Duration::ZERO)
            }
            Action::Replace(b) => (b, 1, Duration::ZERO),
        };
        for _ in 0..copies {
            let what = match direction {
                Direction::ToServer => What::ToServer(client.clone(), bytes.clone()),
                Direction::ToClient => What::ToClient(client.clone(), bytes.clone()),
            };
            self.schedule(self.latency + extra, what);
        }
    }

    fn flush_coordinator(&mut self) {
        loop {
            // Heavy work runs inline, at the simulated instant it was asked for: runs stay
            // deterministic (a driver runs it on another thread).
            while let Some(job) = self.coordinator.poll_job() {
                let result = job.run();
                self.coordinator.handle_job_result(self.now, result);
            }
            while let Some((to, msg)) = self.coordinator.poll_transmit() {
                self.send(to, Direction::ToClient, msg);
            }
            while let Some(ev) = self.coordinator.poll_event() {
                if let Event::ClientDropped { client, .. } = &ev {
                    let client = client.clone();
                    if let Some(n) = self.nodes.get_mut(&client) {
                        n.connected = false;
                    }
                    self.schedule(self.latency, What::ClientSeesDisconnect(client));
                }
                self.events.push((self.now - self.base, ev));
            }
            // The harness "persists" at once (a test can turn this off to see what a crash
            // between a round's end and its checkpoint would leave).
            if !self.auto_persist || self.coordinator.awaiting_persistence().is_none() {
                break;
            }
            self.coordinator.handle_persisted(self.now);
        }
        let t = self.coordinator.poll_timeout();
        if t.is_some() && t != self.coordinator_timer {
            self.coordinator_timer = t;
            if let Some(t) = t {
                let after = t.saturating_duration_since(self.now);
                self.schedule(after, What::CoordinatorTimer);
            }
        }
    }

    fn flush_node(&mut self, id: &ClientId) {
        let now = self.now;
        let Some(node) = self.nodes.get_mut(id) else {
            return;
        };
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        loop {
            // Heavy work (masking) runs inline, at the simulated instant it was asked for.
            while let Some(job) = node.participant.poll_job() {
                let result = job.run();
                node.participant.handle_job_result(now, result);
            }
            while let Some(m) = node.participant.poll_transmit() {
                out.push(m);
            }
            let Some(ev) = node.participant.poll_event() else {
                break;
            };
            match ev {
                ParticipantEvent::ProvideParams => {
                    let p = node.behaviour.initial_params();
                    let _ = node.participant.submit_initial_params(p);
                }
                ParticipantEvent::Train {
                    round,
                    config,
                    model,
                    ..
                } => {
                    node.job_gen += 1;
                    let res = node.behaviour.start_train(round, &config, model);
                    jobs.push((node.behaviour.compute_time(), node.job_gen, Job::Train(res)));
                }
                ParticipantEvent::Evaluate { round, model, .. } => {
                    node.job_gen += 1;
                    let res = node.behaviour.evaluate(round, &model);
                    jobs.push((
                        node.behaviour.compute_time(),
                        node.job_gen,
                        Job::Evaluate(res),
                    ));
                }
                ParticipantEvent::RoundAborted { .. } => node.job_gen += 1,
                ParticipantEvent::Enrolled { .. } | ParticipantEvent::Closed { .. } => {}
            }
        }
        let t = node.participant.poll_timeout();
        let new_timer = t.is_some() && t != node.timer;
        if new_timer {
            node.timer = t;
        }
        for m in out {
            self.send(id.clone(), Direction::ToServer, m);
        }
        for (after, generation, job) in jobs {
            self.schedule(after, What::JobDone(id.clone(), generation, job));
        }
        if new_timer && let Some(t) = t {
            self.schedule(
                t.saturating_duration_since(now),
                What::ParticipantTimer(id.clone()),
            );
        }
    }

    /// Processes the next scheduled item. Returns false when nothing is left.
    pub fn step(&mut self) -> bool {
        let Some(Reverse(item)) = self.queue.pop() else {
            return false;
        };
        self.now = self.now.max(item.at);
        let now = self.now;
        match item.what {
            What::ToServer(from, bytes) => {
                let up = self.nodes.get(&from).is_some_and(|n| n.connected);
                if up {
                    self.stats.delivered += 1;
                    self.stats.bytes += bytes.len() as u64;
                    match codec::decode_from_slice(&bytes, &self.limits) {
                        Ok(msg) => {
                            let _ = self.coordinator.handle_message(now, &from, msg);
                        }
                        Err(e) => {
                            self.stats.undecodable += 1;
                            self.coordinator.handle_malformed(now, &from, &e);
                        }
                    }
                    self.flush_coordinator();
                }
            }
            What::ToClient(to, bytes) => {
                let alive = self.nodes.get(&to).is_some_and(|n| n.alive);
                if alive {
                    self.stats.delivered += 1;
                    self.stats.bytes += bytes.len() as u64;
                    let result = codec::decode_from_slice(&bytes, &self.limits).and_then(|m| {
                        match self.nodes.get_mut(&to) {
                            Some(n) => n.participant.handle_message(now, m),
                            None => Ok(()),
                        }
                    });
                    if result.is_err() {
                        // A client that cannot make sense of the server hangs up.
                        self.stats.undecodable += 1;
                        self.disconnect(&to);
                    }
                    self.flush_node(&to);
                }
            }
            What::ServerSeesDisconnect(id) => {
                self.coordinator.handle_disconnect(now, &id);
                self.flush_coordinator();
            }
            What::ClientSeesDisconnect(id) => {
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.participant.handle_disconnect();
                }
                self.flush_node(&id);
            }
            What::CoordinatorTimer => {
                if self.coordinator_timer.is_some_and(|t| t <= now) {
                    self.coordinator_timer = None;
                    self.coordinator.handle_timeout(now);
                    self.flush_coordinator();
                }
            }
            What::ParticipantTimer(id) => {
                let due = self
                    .nodes
                    .get_mut(&id)
                    .filter(|n| n.alive && n.timer.is_some_and(|t| t <= now));
                if let Some(n) = due {
                    n.timer = None;
                    n.participant.handle_timeout(now);
                    self.flush_node(&id);
                }
            }
            What::GoOffline(id) => {
                self.disconnect(&id);
                if let Some(n) = self.nodes.get_mut(&id) {
                    // Work in progress is lost with the device.
                    n.job_gen += 1;
                    n.timer = None;
                    n.participant.handle_disconnect();
                }
                self.flush_node(&id);
            }
            What::GoOnline(id) => {
                let back = self.nodes.get_mut(&id).filter(|n| !n.alive).map(|n| {
                    n.alive = true;
                    n.connected = true;
                    n.timer = None;
                    n.job_gen += 1;
                    n.participant.reconnect(now);
                });
                if back.is_some() {
                    self.flush_node(&id);
                }
            }
            What::JobDone(id, generation, job) => {
                if let Some(n) = self
                    .nodes
                    .get_mut(&id)
                    .filter(|n| n.alive && n.job_gen == generation)
                {
                    // A stale result (round closed meanwhile) is refused by the machine.
                    let _ = match job {
                        Job::Train(r) => n.participant.submit_train(r.resolve()),
                        Job::Evaluate(r) => n.participant.submit_evaluation(r),
                    };
                    self.flush_node(&id);
                }
            }
        }
        true
    }

    /// Runs until `done` holds, nothing is left to do, or `max` of simulated time has passed.
    /// Returns whether `done` held.
    pub fn run_until(&mut self, max: Duration, mut done: impl FnMut(&Harness) -> bool) -> bool {
        let limit = self.base + max;
        loop {
            if done(self) {
                return true;
            }
            let next_at = self.queue.peek().map(|Reverse(i)| i.at);
            match next_at {
                Some(at) if at <= limit => {
                    self.step();
                }
                _ => return done(self),
            }
        }
    }

    /// Runs until the coordinator has finished all rounds (or `max` simulated time).
    pub fn run_to_completion(&mut self, max: Duration) -> bool {
        self.run_until(max, |h| h.coordinator.is_finished())
    }

    /// Records of rounds that completed.
    pub fn completed_rounds(&self) -> Vec<&crate::RoundRecord> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::RoundCompleted(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// Records of rounds that were aborted.
    pub fn aborted_rounds(&self) -> Vec<&crate::RoundRecord> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::RoundAborted(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    /// Clients the coordinator dropped, with its reasons.
    pub fn dropped_clients(&self) -> Vec<(ClientId, DropReason)> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::ClientDropped { client, reason, .. } => {
                    Some((client.clone(), reason.clone()))
                }
                _ => None,
            })
            .collect()
    }
}

/// FNV-1a (64-bit): a stable hash of a client's name for seeding (std's hasher is not
/// specified to stay the same across Rust releases).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
