//! The server side of a federation, as a sans-IO state machine.
//!
//! The [`Coordinator`] owns the round logic and nothing else: no sockets, no tasks, no clock.
//! A driver feeds it what happened (`handle_*`) with the current time, and asks it what to do
//! (`poll_*`): messages to send, heavy work, the next time it wants a
//! [`Coordinator::handle_timeout`] call, and events (a client to drop, a round completed).
//! quinn-proto's `Connection` is the model.
//!
//! It is a thin shell over a round engine ([`crate::engine`]): the shell keeps what does not
//! depend on how rounds are scheduled, and the engine the rest.
//!
//! * **Enrollment**: the hello (protocol version, declared model), the welcome, refusals.
//! * **The initial model**: until `min_available_clients` are enrolled the run waits; if no
//!   initial model was configured, one client of the largest group declaring the same model
//!   (at least `model_quorum` of them) is asked for its parameters, the next if it fails.
//! * **Liveness**: clients not heard from within the idle timeout are dropped; every drop,
//!   disconnect and abort is reported to the engine as a failure.
//! * **Routing**: training, evaluation and secure-aggregation messages go to the engine.
//!
//! The engine today is the synchronous one (`Waiting → Train → [Evaluate] → Waiting`, see
//! `engine/sync.rs`): the strategy samples clients, each trains on the global model before a
//! deadline, results are checked and aggregated (or, under SecAgg+, their sum is unmasked),
//! the new model is evaluated, the round is recorded, and the next round starts once the
//! driver persisted it.

use std::time::Instant;

use crate::engine::fedbuff::FedBuffEngine;
use crate::engine::sync::SyncEngine;
use crate::engine::{Core, Engine, Timer};
use crate::job::{Job, JobResult};
use crate::strategy::{FailureReason, Strategy};
use crate::wire::messages::{
    AbortReason, ClientId, Message, ModelSummary, PROTOCOL_VERSION, Welcome,
};
use crate::wire::params::Params;
use crate::{Error, InvalidMessage};
use flotilla_crypto::dp::RdpAccountant;

pub use crate::engine::{
    AsyncStep, CoordinatorConfig, DEFAULT_HISTORY_WINDOW, DEFAULT_MAX_EXAMPLES, DropKind,
    DropReason, EngineConfig, Event, FedBuffConfig, RoundRecord, Snapshot, StalenessWeight,
    Transmit,
};

/// The server's round state machine. See the module docs.
pub struct Coordinator {
    core: Core,
    engine: Box<dyn Engine>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("strategy", &self.core.strategy.name())
            .field("round", &self.core.round)
            .field("phase", &self.phase_name())
            .field("clients", &self.core.registry.len())
            .finish()
    }
}

impl Coordinator {
    /// A coordinator. With `initial` `None`, the first enrolled client is asked for its
    /// initial parameters.
    pub fn new(
        config: CoordinatorConfig,
        strategy: Box<dyn Strategy>,
        initial: Option<Params>,
    ) -> Result<Self, Error> {
        config.validate()?;
        if config.secure_aggregation.is_some() && strategy.needs_individual_updates() {
            return Err(Error::Config(format!(
                "strategy {} needs each client's update, which secure aggregation hides; \
                 turn secure aggregation off or choose a strategy that works on the sum",
                strategy.name()
            )));
        }
        if let Some(p) = &initial {
            p.check_finite()?;
        }
        let engine: Box<dyn Engine> = match &config.engine {
            EngineConfig::Sync => Box::new(SyncEngine::default()),
            EngineConfig::FedBuff(fb) => Box::new(FedBuffEngine::new(fb.clone(), 0)),
        };
        Ok(Self {
            core: Core::new(config, strategy, initial),
            engine,
        })
    }

    /// A coordinator resuming after the round recorded in `snapshot`.
    pub fn resume(
        config: CoordinatorConfig,
        mut strategy: Box<dyn Strategy>,
        snapshot: Snapshot,
    ) -> Result<Self, Error> {
        strategy.restore_state(&snapshot.strategy_state)?;
        let mut c = Self::new(config, strategy, Some(snapshot.global.clone()))?;
        // Synchronous rounds number their tasks by round; an asynchronous run goes on after
        // its last task (a snapshot of a synchronous run has none: after its round).
        c.core.round = snapshot.round;
        if let EngineConfig::FedBuff(fb) = &c.core.config.engine {
            c.engine = Box::new(FedBuffEngine::new(fb.clone(), snapshot.round));
            c.core.round = snapshot.last_task.unwrap_or(0).max(snapshot.round);
        }
        let core = &mut c.core;
        core.history = snapshot.history.clone();
        let window = core.config.history_window;
        if core.history.len() > window {
            core.history.drain(..core.history.len() - window);
        }
        // The privacy spent before the restart: the accountant's saved state, or (snapshots
        // without it) rebuilt from the rounds' records.
        if core.accountant.is_some() {
            core.accountant = Some(match &snapshot.accountant {
                Some((rdp, steps)) => RdpAccountant::restore(rdp.clone(), *steps)?,
                None => {
                    let mut acc = RdpAccountant::new();
                    for p in core.history.iter().filter_map(|r| r.privacy.as_ref()) {
                        acc.compose(p.sampling_rate, p.noise_multiplier, 1);
                    }
                    acc
                }
            });
        }
        core.last_snapshot = Some(snapshot);
        if core.round >= core.config.num_rounds {
            core.finished = true;
            core.events.push_back(Event::Finished);
        }
        Ok(c)
    }

    /// The state as of the end of the last finished round: what a checkpoint must hold. It
    /// is captured when the round ends, so it stays right even though the next round has
    /// already started by the time the driver sees [`Event::RoundCompleted`].
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.core.last_snapshot.clone()
    }

    /// The unmasked sum of the encoded inputs of the last secure round that completed: one
    /// `u32` per parameter, then the total weight. What the server learned, and nothing else.
    pub fn last_unmasked_sum(&self) -> Option<&[u32]> {
        self.core.last_unmasked.as_deref()
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.core.config
    }

    /// The current global model.
    pub fn global(&self) -> Option<&Params> {
        self.core.global.as_ref()
    }

    /// Last round started (synchronous rounds), or the model version (FedBuff: steps taken).
    pub fn round(&self) -> u64 {
        self.engine.round(&self.core)
    }

    /// What happened so far.
    pub fn history(&self) -> &[RoundRecord] {
        &self.core.history
    }

    /// Name of the current phase: `Finished`, `InitParams` (asking a client for the initial
    /// model), or the engine's (`Waiting`, `Train`, `Evaluate`).
    pub fn phase_name(&self) -> &'static str {
        if self.core.finished {
            "Finished"
        } else if self.core.init.is_some() {
            "InitParams"
        } else {
            self.engine.phase_name()
        }
    }

    /// True once all rounds are done.
    pub fn is_finished(&self) -> bool {
        self.core.finished
    }

    /// Enrolled clients.
    pub fn clients(&self) -> impl Iterator<Item = &ClientId> {
        self.core.registry.ids()
    }

    /// Whether `id` is excluded from sampling now.
    pub fn is_excluded(&self, now: Instant, id: &ClientId) -> bool {
        self.core.registry.is_excluded(now, id)
    }

    /// Next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.core.transmits.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.core.events.pop_front()
    }

    /// Next piece of heavy work (see [`crate::job`]): run it off the event loop and hand its
    /// result to [`Coordinator::handle_job_result`]. Until then the round it belongs to waits
    /// (its deadlines are suspended); everything else (other messages, timers, new clients)
    /// goes on.
    #[must_use = "a job must be run and its result handed back, or its round never ends"]
    pub fn poll_job(&mut self) -> Option<Job> {
        self.core.jobs.pop()
    }

    /// The result of a job from [`Coordinator::poll_job`]. A result for a round that ended
    /// meanwhile (or one this machine did not ask for) is ignored.
    pub fn handle_job_result(&mut self, now: Instant, result: JobResult) {
        let Some((round, output)) = self.core.jobs.accept(result) else {
            return;
        };
        self.engine
            .on_job_result(&mut self.core, now, round, output);
    }

    /// When the coordinator next needs [`Coordinator::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        let idle = self
            .core
            .config
            .idle_timeout
            .and_then(|d| self.core.registry.next_idle_deadline(d));
        match (self.core.timers.next(), idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The round that ended last (the one in the last [`Event::RoundCompleted`] or
    /// [`Event::RoundAborted`]) is durable: its [`Coordinator::snapshot`] is on disk (or the
    /// driver does not persist). Until this call no new round starts, so that round `k + 1`
    /// is never announced before round `k` is on disk (raft's `Ready` rule): a crash in
    /// between resumes after round `k`, and no client ever trained on a round that is lost.
    pub fn handle_persisted(&mut self, now: Instant) {
        if self.core.unpersisted.take().is_some() {
            self.dispatch(now);
        }
    }

    /// The round waiting for [`Coordinator::handle_persisted`], if any.
    pub fn awaiting_persistence(&self) -> Option<u64> {
        self.core.unpersisted
    }

    /// The driver's transport lost the connection to `client`.
    pub fn handle_disconnect(&mut self, now: Instant, client: &ClientId) {
        if self.core.registry.remove(now, client) {
            self.fail(now, client, FailureReason::Disconnected);
        }
    }

    /// `client` was heard from at `at` without a complete message (bytes of a long upload
    /// arriving, a transport keep-alive): it counts as alive. Drivers report this before
    /// [`Coordinator::handle_timeout`], so that neither a slow upload nor the server's own
    /// pauses (a long aggregation while messages queued up) count against a client.
    pub fn handle_activity(&mut self, at: Instant, client: &ClientId) {
        self.core.registry.heard_from(at, client, true);
    }

    /// A message from `client` could not be decoded: the client is dropped.
    pub fn handle_malformed(&mut self, now: Instant, client: &ClientId, error: &Error) {
        self.drop_client(now, client, DropReason::Malformed(error.clone()));
    }

    /// The driver is serving: the machine says what it waits for
    /// ([`Event::WaitingForClients`], "have 0 of N" before anyone connected), or finishes at
    /// once if a resumed run has no round left.
    pub fn handle_start(&mut self, now: Instant) {
        self.dispatch(now);
    }

    /// The timer returned by [`Coordinator::poll_timeout`] fired (or any time; early calls
    /// are harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(idle) = self.core.config.idle_timeout {
            for id in self.core.registry.idle(now, idle) {
                self.drop_client(now, &id, DropReason::Idle(idle));
            }
        }
        for timer in self.core.timers.expire(now) {
            match timer {
                Timer::InitParams => {
                    if let Some(asked) = self.core.init.as_ref().map(|i| i.asked.clone()) {
                        self.drop_client(now, &asked, DropReason::NoInitialParams);
                    }
                }
                other => self.engine.on_timer(&mut self.core, now, other),
            }
        }
    }

    /// A message from `from` (whose identity the transport established). An `Err` means the
    /// client broke the protocol: it has been dropped (an [`Event::ClientDropped`] is queued)
    /// and the error says why.
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: &ClientId,
        msg: Message,
    ) -> Result<(), Error> {
        self.core.registry.heard_from(now, from, false);
        match self.process(now, from, msg) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.drop_client(now, from, DropReason::ProtocolViolation(e.clone()));
                Err(e)
            }
        }
    }

    /// Lets the engine dispatch work, unless the run is finished, the model is being asked
    /// for, or a round waits to be persisted.
    fn dispatch(&mut self, now: Instant) {
        if self.core.may_dispatch() {
            self.engine.dispatch(&mut self.core, now);
        }
    }

    fn process(&mut self, now: Instant, from: &ClientId, msg: Message) -> Result<(), Error> {
        let enrolled = self.core.registry.contains(from);
        let core = &mut self.core;
        let engine = &mut self.engine;
        match msg {
            Message::Hello(h) => {
                if h.protocol_version != PROTOCOL_VERSION {
                    return Err(Error::ProtocolVersion {
                        got: h.protocol_version,
                        supported: PROTOCOL_VERSION,
                    });
                }
                if enrolled {
                    // A second hello on a live session is a duplicate and changes nothing. (A
                    // reconnect comes on a new connection: the driver reports the old one
                    // closed with `handle_disconnect` first, so the client is not enrolled.)
                    return Ok(());
                }
                if let Some(reason) = core.model_mismatch(h.capabilities.model.as_ref()) {
                    core.refuse(from, reason);
                    return Ok(());
                }
                core.registry.enroll(now, from.clone(), h.capabilities);
                core.transmits.push_back((
                    from.clone(),
                    Message::Welcome(Welcome {
                        client_id: from.clone(),
                        // Without an idle timeout nothing reads heartbeats: ask for none.
                        heartbeat_ms: match core.config.idle_timeout {
                            Some(_) => core.config.heartbeat_interval.as_millis() as u64,
                            None => 0,
                        },
                    }),
                ));
                core.events.push_back(Event::ClientEnrolled(from.clone()));
                if core.finished {
                    core.transmits.push_back((
                        from.clone(),
                        Message::Abort {
                            round: None,
                            reason: AbortReason::Finished,
                        },
                    ));
                }
                self.dispatch(now);
                Ok(())
            }
            _ if !enrolled => Err(Error::UnexpectedMessage {
                kind: msg.kind(),
                from: Some(from.clone()),
                state: "not enrolled (no hello yet)",
            }),
            Message::Heartbeat { .. } => Ok(()),
            Message::InitialParams(p) => self.on_initial_params(now, from, p),
            Message::TrainResult(r) => engine.on_train_result(core, now, from, r),
            Message::EvaluateResult(r) => engine.on_evaluate_result(core, now, from, r),
            m @ (Message::AdvertiseKeys(_)
            | Message::ShareKeys { .. }
            | Message::MaskedInput(_)
            | Message::SurvivorsSigned { .. }
            | Message::UnmaskShares { .. }) => engine.on_secagg(core, now, from, m),
            Message::Abort { round, reason } => {
                // The client gives up on a round (or the session): a failure, not a violation.
                if round.is_none() {
                    core.registry.remove(now, from);
                }
                self.fail(now, from, FailureReason::Aborted(reason.clone()));
                Ok(())
            }
            other => Err(Error::UnexpectedMessage {
                kind: other.kind(),
                from: Some(from.clone()),
                state: "server never receives this kind",
            }),
        }
    }

    fn on_initial_params(&mut self, now: Instant, from: &ClientId, p: Params) -> Result<(), Error> {
        let core = &mut self.core;
        if core.init.as_ref().is_none_or(|i| &i.asked != from) {
            return Err(Error::UnexpectedMessage {
                kind: "InitialParams",
                from: Some(from.clone()),
                state: self.phase_name(),
            });
        }
        p.check_finite()?;
        let got = ModelSummary::of(p.manifest());
        let declared = core.registry.capabilities(from).and_then(|c| c.model);
        if declared.is_some_and(|d| d.digest != got.digest) {
            return Err(Error::InvalidMessage(InvalidMessage::UndeclaredModel(
                got.to_string(),
            )));
        }
        core.global = Some(p);
        core.init = None;
        core.timers.stop(&Timer::InitParams);
        core.events.push_back(Event::ModelInitialized);
        // Clients that declared another model are not part of this federation.
        let others: Vec<(ClientId, AbortReason)> = core
            .registry
            .iter()
            .filter_map(|(id, c)| {
                core.model_mismatch(c.model.as_ref())
                    .map(|r| (id.clone(), r))
            })
            .collect();
        for (id, reason) in others {
            core.registry.remove(now, &id);
            core.refuse(&id, reason);
        }
        self.dispatch(now);
        Ok(())
    }

    /// Removes a client, tells it why, and records the failure.
    fn drop_client(&mut self, now: Instant, client: &ClientId, reason: DropReason) {
        let text = reason.to_string();
        self.core.transmits.push_back((
            client.clone(),
            Message::Abort {
                round: None,
                reason: AbortReason::ProtocolViolation(text.clone()),
            },
        ));
        self.core.registry.remove(now, client);
        let kind = reason.kind();
        self.core.events.push_back(Event::ClientDropped {
            client: client.clone(),
            reason,
        });
        self.fail(now, client, FailureReason::Dropped { kind, detail: text });
    }

    /// Records that `client` will not contribute to what it was asked for: the initial model
    /// (the next client is asked), or the engine's work.
    fn fail(&mut self, now: Instant, client: &ClientId, reason: FailureReason) {
        // Reasons end up in round records and checkpoints: keep them short.
        let max = crate::wire::bounds::DEFAULT_MAX_TEXT_BYTES as usize;
        let reason = match reason {
            FailureReason::Dropped { kind, detail } => FailureReason::Dropped {
                kind,
                detail: crate::wire::bounds::truncate(&detail, max),
            },
            FailureReason::Aborted(why) => FailureReason::Aborted(why.truncated(max)),
            other => other,
        };
        if self.core.init.as_ref().is_some_and(|i| &i.asked == client) {
            if let Some(mut init) = self.core.init.take() {
                self.core.timers.stop(&Timer::InitParams);
                init.tried.insert(client.clone());
                self.core.ask_for_params(now, init.tried);
            }
            return;
        }
        self.engine.on_failure(&mut self.core, now, client, reason);
    }
}
