//! The client side of a federation, as a sans-IO state machine.
//!
//! The [`Participant`] says hello, waits to be welcomed (the application-level round trip
//! that proves the server accepted the client's certificate), turns the server's instructions
//! into [`ParticipantEvent`]s for the driver's trainer, and turns the trainer's results back
//! into messages, checking that they answer the task actually open. It keeps the heartbeat
//! timer. Like the [`crate::Coordinator`], it has no sockets and no clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::job::{Job, JobResult, Jobs, Output, Work};
use crate::provider::CryptoProvider;
use crate::secagg::{ClientRound, SecAggIdentity};
use crate::wire::messages::{
    AbortReason, Capabilities, ClientId, EvaluateRes, Hello, Message, PROTOCOL_VERSION,
    TrainConfig, TrainRes,
};
use crate::wire::params::Params;
use crate::{Error, InvalidMessage, SecAggError};

/// What the driver should do.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ParticipantEvent {
    /// The server accepted us.
    Enrolled {
        /// The id the server knows us by.
        client_id: ClientId,
    },
    /// Send the server our initial parameters ([`Participant::submit_initial_params`]).
    ProvideParams,
    /// Train and then call [`Participant::submit_train`].
    Train {
        /// Round.
        round: u64,
        /// Local training configuration.
        config: TrainConfig,
        /// Global model to start from.
        model: Params,
        /// When the server stops waiting.
        deadline: Instant,
    },
    /// Evaluate and then call [`Participant::submit_evaluation`].
    Evaluate {
        /// Round.
        round: u64,
        /// Model to evaluate.
        model: Params,
        /// When the server stops waiting.
        deadline: Instant,
    },
    /// The server closed a round we may be working on: drop that work.
    RoundAborted {
        /// Round.
        round: u64,
        /// Why.
        reason: AbortReason,
    },
    /// The session is over (federation finished, or we were dropped).
    Closed {
        /// Why.
        reason: AbortReason,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Task {
    None,
    Params,
    Train(u64),
    Evaluate(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    New,
    AwaitWelcome,
    Enrolled(Task),
    Closed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::New => "New",
            State::AwaitWelcome => "AwaitWelcome",
            State::Enrolled(Task::None) => "Idle",
            State::Enrolled(Task::Params) => "ProvidingParams",
            State::Enrolled(Task::Train(_)) => "Training",
            State::Enrolled(Task::Evaluate(_)) => "Evaluating",
            State::Closed => "Closed",
        }
    }
}

/// How many refused rounds [`Participant::refusals`] remembers (a long-lived client refuses
/// rounds forever if a hostile server keeps trying).
pub const MAX_REFUSALS_KEPT: usize = 64;

/// The client's protocol state machine. See the module docs.
///
/// With [`Participant::with_secure_aggregation`], it runs its side of SecAgg+ itself: it
/// advertises keys when a secure `Train` arrives, exchanges shares while the trainer works,
/// masks the result handed to [`Participant::submit_train`] and answers the unmasking — the
/// driver only moves messages. A failed check (forged advertisement, different model, bad
/// survivor list, a request for both shares of one neighbour) aborts the round on this
/// client and is recorded in [`Participant::refusals`].
#[derive(Debug)]
pub struct Participant {
    capabilities: Capabilities,
    secagg: Option<SecAggIdentity>,
    provider: CryptoProvider,
    secure: Option<ClientRound>,
    refusals: std::collections::VecDeque<(u64, Error)>,
    /// The open round's model and DP instructions, when client-side DP is on.
    dp_task: Option<(u64, Params, crate::wire::config::ClientDp)>,
    state: State,
    client_id: Option<ClientId>,
    heartbeat: Option<Duration>,
    next_heartbeat: Option<Instant>,
    heartbeat_seq: u64,
    transmits: VecDeque<Message>,
    events: VecDeque<ParticipantEvent>,
    /// Heavy work for the driver (the mask job of the open secure round).
    jobs: Jobs,
}

impl Participant {
    /// A participant that will declare `capabilities`.
    pub fn new(capabilities: Capabilities) -> Self {
        Self {
            capabilities,
            secagg: None,
            provider: CryptoProvider::default_provider(),
            secure: None,
            refusals: std::collections::VecDeque::new(),
            dp_task: None,
            state: State::New,
            client_id: None,
            heartbeat: None,
            next_heartbeat: None,
            heartbeat_seq: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            jobs: Jobs::default(),
        }
    }

    /// Enables secure aggregation with these credentials (and declares it in the hello).
    pub fn with_secure_aggregation(mut self, identity: SecAggIdentity) -> Self {
        self.capabilities.secure_aggregation = true;
        self.secagg = Some(identity);
        self
    }

    /// Where the client's keys, masks and noise come from: the default is
    /// [`CryptoProvider::default_provider`]; [`CryptoProvider::insecure_deterministic`] only
    /// for tests and simulations.
    pub fn with_provider(mut self, provider: CryptoProvider) -> Self {
        self.provider = provider;
        self
    }

    /// Secure rounds this client refused, and why: the last [`MAX_REFUSALS_KEPT`], oldest
    /// first.
    pub fn refusals(&self) -> Vec<(u64, Error)> {
        self.refusals.iter().cloned().collect()
    }

    /// Aborts the secure round on our side after a failed check.
    fn refuse(&mut self, round: u64, e: Error) {
        let why = e.to_string();
        if self.refusals.len() >= MAX_REFUSALS_KEPT {
            self.refusals.pop_front();
        }
        self.refusals.push_back((round, e));
        self.secure = None;
        if matches!(self.state, State::Enrolled(Task::Train(r)) if r == round) {
            self.state = State::Enrolled(Task::None);
        }
        self.transmits.push_back(Message::Abort {
            round: Some(round),
            reason: AbortReason::SecureAggregation(why.clone()),
        });
        self.events.push_back(ParticipantEvent::RoundAborted {
            round,
            reason: AbortReason::SecureAggregation(why),
        });
    }

    /// Handles a server SecAgg message for the open secure round (others are stale: ignored).
    fn on_secagg(&mut self, msg: Message) {
        let Some(round) = msg.secagg_round() else {
            return;
        };
        let (Some(sr), Some(id)) = (self.secure.as_mut(), self.secagg.as_ref()) else {
            return;
        };
        if sr.round() != round {
            return;
        }
        let out = match msg {
            Message::NeighbourKeys { adverts, .. } => sr.on_neighbour_keys(adverts, id).map(Some),
            Message::ForwardShares { shares, .. } => sr.on_forward_shares(shares),
            Message::Survivors { survivors, .. } => sr.on_survivors(survivors, id).map(Some),
            Message::Unmask(req) => sr.on_unmask(req).map(Some),
            _ => Ok(None),
        };
        match out {
            Ok(Some(m)) => self.transmits.push_back(m),
            Ok(None) => {}
            Err(e) => self.refuse(round, e),
        }
        self.take_secure_job();
    }

    /// Queues the open secure round's mask job, if it has one ready.
    fn take_secure_job(&mut self) {
        let Some(sr) = self.secure.as_mut() else {
            return;
        };
        if let Some(job) = sr.take_job() {
            self.jobs.push(sr.round(), Work::Mask(Box::new(job)));
        }
    }

    /// Next piece of heavy work (see [`crate::job`]): run it off the event loop and hand its
    /// result to [`Participant::handle_job_result`].
    #[must_use = "a job must be run and its result handed back, or the round stalls"]
    pub fn poll_job(&mut self) -> Option<Job> {
        self.jobs.pop()
    }

    /// The result of a job from [`Participant::poll_job`]. A result for a round that is no
    /// longer open is ignored.
    pub fn handle_job_result(&mut self, _now: Instant, result: JobResult) {
        let Some((round, Output::Mask(masked))) = self.jobs.accept(result) else {
            return;
        };
        let Some(sr) = self.secure.as_mut().filter(|s| s.round() == round) else {
            return;
        };
        match sr.handle_mask_result(masked) {
            Ok(Some(m)) => self.transmits.push_back(m),
            Ok(None) => {}
            Err(e) => self.refuse(round, e),
        }
    }

    /// Starts the session: queues the hello.
    pub fn connect(&mut self, _now: Instant) {
        if self.state == State::New {
            self.transmits.push_back(Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                capabilities: self.capabilities.clone(),
            }));
            self.state = State::AwaitWelcome;
        }
    }

    /// A new session on a new connection (after this one closed, or to replace it): the
    /// session's state is dropped — enrollment, heartbeats, the open task and its secure
    /// round, queued messages and jobs — and a new hello is queued. The capabilities, the
    /// secure-aggregation credentials, the crypto provider and the refusals are kept.
    pub fn reconnect(&mut self, now: Instant) {
        self.state = State::New;
        self.client_id = None;
        self.heartbeat = None;
        self.next_heartbeat = None;
        self.secure = None;
        self.dp_task = None;
        self.transmits.clear();
        self.events.clear();
        self.jobs = Jobs::default();
        self.connect(now);
    }

    /// True once welcomed.
    pub fn is_enrolled(&self) -> bool {
        matches!(self.state, State::Enrolled(_))
    }

    /// True once the session is over.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The id the server gave us.
    pub fn client_id(&self) -> Option<&ClientId> {
        self.client_id.as_ref()
    }

    /// Next message to send.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.transmits.pop_front()
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<ParticipantEvent> {
        self.events.pop_front()
    }

    /// When the participant next needs [`Participant::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_enrolled() {
            self.next_heartbeat
        } else {
            None
        }
    }

    /// Timer: sends a heartbeat when one is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let (Some(due), Some(every)) = (self.next_heartbeat, self.heartbeat)
            && self.is_enrolled()
            && now >= due
        {
            self.heartbeat_seq += 1;
            self.transmits.push_back(Message::Heartbeat {
                seq: self.heartbeat_seq,
            });
            self.next_heartbeat = Some(now + every);
        }
    }

    /// The connection is gone; the session is over.
    pub fn handle_disconnect(&mut self) {
        if self.state != State::Closed {
            self.state = State::Closed;
            self.secure = None;
            self.events.push_back(ParticipantEvent::Closed {
                reason: AbortReason::Other("connection lost".into()),
            });
        }
    }

    /// A message from the server. An `Err` means the server broke the protocol; the driver
    /// should close the connection.
    pub fn handle_message(&mut self, now: Instant, msg: Message) -> Result<(), Error> {
        let unexpected = |state: State, kind| Error::UnexpectedMessage {
            kind,
            from: None,
            state: state.name(),
        };
        match (self.state, msg) {
            (State::Closed, _) => Ok(()),
            (State::AwaitWelcome, Message::Welcome(w)) => {
                // 0: the server does not time idle clients out, and heartbeats would only
                // cost messages (a simulation of thousands of waiting clients).
                if w.heartbeat_ms > 0 {
                    // The server's number, bounded: at most ten a second, at least one an
                    // hour (an absurd interval would overflow the clock arithmetic).
                    let every = Duration::from_millis(w.heartbeat_ms.clamp(100, 3_600_000));
                    self.heartbeat = Some(every);
                    self.next_heartbeat = Some(now + every);
                }
                self.client_id = Some(w.client_id.clone());
                self.state = State::Enrolled(Task::None);
                self.events.push_back(ParticipantEvent::Enrolled {
                    client_id: w.client_id,
                });
                Ok(())
            }
            (State::Enrolled(_), Message::Welcome(w))
                if Some(&w.client_id) == self.client_id.as_ref() =>
            {
                Ok(()) // a duplicate welcome
            }
            (
                _,
                Message::Abort {
                    round: None,
                    reason,
                },
            ) => {
                self.state = State::Closed;
                self.secure = None;
                self.events.push_back(ParticipantEvent::Closed { reason });
                Ok(())
            }
            (State::Enrolled(task), msg) => match msg {
                Message::Heartbeat { .. } => Ok(()),
                Message::GetParams => {
                    self.state = State::Enrolled(Task::Params);
                    self.events.push_back(ParticipantEvent::ProvideParams);
                    Ok(())
                }
                Message::Train(t) => {
                    t.model.check_finite()?;
                    self.secure = None;
                    self.dp_task = t.config.dp.map(|dp| (t.round, t.model.clone(), dp));
                    if let Some(setup) = t.secagg.clone() {
                        let started = match (&self.secagg, &self.client_id) {
                            (Some(identity), Some(me)) => ClientRound::start(
                                t.round,
                                setup,
                                t.model.clone(),
                                me,
                                identity,
                                &self.provider,
                            ),
                            _ => Err(Error::SecAgg(SecAggError::MissingCredentials)),
                        };
                        match started {
                            Ok((round, advert)) => {
                                self.secure = Some(round);
                                self.transmits.push_back(advert);
                            }
                            Err(e) => {
                                self.refuse(t.round, e);
                                return Ok(());
                            }
                        }
                    }
                    self.state = State::Enrolled(Task::Train(t.round));
                    self.events.push_back(ParticipantEvent::Train {
                        round: t.round,
                        config: t.config,
                        model: t.model,
                        deadline: now + Duration::from_millis(t.deadline_ms),
                    });
                    Ok(())
                }
                Message::Evaluate(e) => {
                    e.model.check_finite()?;
                    self.state = State::Enrolled(Task::Evaluate(e.round));
                    self.events.push_back(ParticipantEvent::Evaluate {
                        round: e.round,
                        model: e.model,
                        deadline: now + Duration::from_millis(e.deadline_ms),
                    });
                    Ok(())
                }
                Message::Abort {
                    round: Some(round),
                    reason,
                } => {
                    if matches!(task, Task::Train(r) | Task::Evaluate(r) if r == round) {
                        self.state = State::Enrolled(Task::None);
                    }
                    if self.secure.as_ref().is_some_and(|s| s.round() == round) {
                        self.secure = None;
                    }
                    self.events
                        .push_back(ParticipantEvent::RoundAborted { round, reason });
                    Ok(())
                }
                m @ (Message::NeighbourKeys { .. }
                | Message::ForwardShares { .. }
                | Message::Survivors { .. }
                | Message::Unmask(_)) => {
                    self.on_secagg(m);
                    Ok(())
                }
                other => Err(unexpected(self.state, other.kind())),
            },
            (state, other) => Err(unexpected(state, other.kind())),
        }
    }

    /// The trainer's result for `round`. Errors (and sends nothing) if that is not the open
    /// task: the round was closed or replaced meanwhile, so the result is stale.
    pub fn submit_train(&mut self, res: TrainRes) -> Result<(), Error> {
        if self.state != State::Enrolled(Task::Train(res.round)) {
            return Err(Error::InvalidMessage(InvalidMessage::NoOpenTask(format!(
                "no open training task for round {} (state {})",
                res.round,
                self.state.name()
            ))));
        }
        // A training that diverged (NaN, infinities) or saw no data is a failed round for
        // this client, not an update: say so, and stay enrolled. (The server would drop a
        // client that sent such an update as a protocol violation.)
        let failure = if res.num_examples == 0 {
            Some("training saw no examples".to_string())
        } else if let Err(e) = res.params.check_finite() {
            Some(format!("training diverged: {e}"))
        } else if let Some((k, _)) = res.metrics.iter().find(|(_, v)| !v.is_finite()) {
            Some(format!("training diverged: metric {k:?} is not finite"))
        } else {
            None
        };
        if let Some(reason) = failure {
            self.dp_task = None;
            self.abandon(format!("training failed: {reason}"));
            return Ok(());
        }
        self.state = State::Enrolled(Task::None);
        let mut res = res;
        if let Some((round, model, dp)) = self.dp_task.take()
            && round == res.round
        {
            // Clip and noise before anything leaves (masked or not); equal weights.
            let mut noise = self.provider.client_dp_noise(round)?;
            res.params = crate::dp::privatize(&model, &res.params, &dp, &mut noise)?;
            res.num_examples = 1;
        }
        if let Some(sr) = self.secure.as_mut().filter(|s| s.round() == res.round) {
            let round = res.round;
            match sr.on_result(res) {
                Ok(Some(m)) => self.transmits.push_back(m),
                Ok(None) => {} // masked by a job, once the neighbours' shares are in
                Err(e) => self.refuse(round, e),
            }
            self.take_secure_job();
            return Ok(());
        }
        self.transmits.push_back(Message::TrainResult(res));
        Ok(())
    }

    /// The evaluation result for `res.round`; same rule as [`Participant::submit_train`].
    pub fn submit_evaluation(&mut self, res: EvaluateRes) -> Result<(), Error> {
        if self.state != State::Enrolled(Task::Evaluate(res.round)) {
            return Err(Error::InvalidMessage(InvalidMessage::NoOpenTask(format!(
                "no open evaluation task for round {} (state {})",
                res.round,
                self.state.name()
            ))));
        }
        self.state = State::Enrolled(Task::None);
        self.transmits.push_back(Message::EvaluateResult(res));
        Ok(())
    }

    /// Our initial parameters, when the server asked for them.
    pub fn submit_initial_params(&mut self, params: Params) -> Result<(), Error> {
        if self.state != State::Enrolled(Task::Params) {
            return Err(Error::InvalidMessage(InvalidMessage::NoOpenTask(format!(
                "the server did not ask for parameters (state {})",
                self.state.name()
            ))));
        }
        self.state = State::Enrolled(Task::None);
        self.transmits.push_back(Message::InitialParams(params));
        Ok(())
    }

    /// Gives up on the open task (the trainer failed), telling the server why.
    pub fn abandon(&mut self, reason: String) {
        if let State::Enrolled(task) = self.state {
            let round = match task {
                Task::Train(r) | Task::Evaluate(r) => Some(r),
                Task::Params | Task::None => None,
            };
            if let Some(round) = round {
                if self.secure.as_ref().is_some_and(|s| s.round() == round) {
                    self.secure = None;
                }
                self.transmits.push_back(Message::Abort {
                    round: Some(round),
                    reason: AbortReason::Other(reason),
                });
            }
            self.state = State::Enrolled(Task::None);
        }
    }
}
