//! The round engine: the seam between what every way of running rounds shares (the
//! [`Core`]) and what decides when work is dispatched and when an aggregate is ready (an
//! [`Engine`]).
//!
//! The [`crate::Coordinator`] is a thin shell: it owns a `Core` and one engine, keeps
//! enrollment, the initial model, idle drops and message routing, and hands the engine the
//! rest. The engine never sees the transport or the clock; it sees the `Core` (config,
//! strategy, registry, global model and its version, history, privacy accountant, output
//! queues, timer table, persistence gate) and the messages of the work it dispatched.
//!
//! * [`sync::SyncEngine`]: synchronous rounds (FedAvg's): sample, train, aggregate,
//!   evaluate, persist, repeat.
//! * [`fedbuff::FedBuffEngine`]: buffered asynchronous aggregation: clients train on the
//!   version they were sent, updates are folded in as they arrive, weighted by staleness,
//!   and the model steps every `buffer_size` updates.
//!
//! Two layers sit under the engines rather than inside them:
//!
//! * [`cohort::Cohort`] is secure aggregation: one SecAgg+ instance over a set of clients,
//!   with its own stage deadline in the timer table; it hands back the unmasked sum or why
//!   it failed. The synchronous engine runs one cohort per round; a buffered-async engine
//!   runs several at once.
//! * [`Core::account_release`] is differential privacy: one accountant step per aggregate
//!   release, whichever engine releases it, and the client-DP settings that go with it.

pub(crate) mod cohort;
pub(crate) mod config;
pub(crate) mod events;
pub(crate) mod fedbuff;
pub(crate) mod sync;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::dp::{DpMode, PrivacyReport};
use crate::job::{Jobs, Output};
use crate::registry::Registry;
use crate::strategy::{ClientInfo, FailureReason, Strategy};
use crate::timer::TimerQueue;
use crate::wire::config::ClientDp;
use crate::wire::messages::{AbortReason, ClientId, EvaluateRes, Message, ModelSummary, TrainRes};
use crate::wire::params::Params;
use crate::{Error, InvalidMessage};
use flotilla_crypto::dp::RdpAccountant;

pub use config::{
    CoordinatorConfig, DEFAULT_HISTORY_WINDOW, DEFAULT_MAX_EXAMPLES, EngineConfig, FedBuffConfig,
    StalenessWeight,
};
pub use events::{AsyncStep, DropKind, DropReason, Event, RoundRecord, Snapshot, Transmit};

/// The coordinator's named timers (in [`TimerQueue`]); the idle queue is the registry's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// The client asked for the initial model must have sent it (the shell's).
    InitParams,
    /// The round's training deadline.
    Train,
    /// The secure round's current stage deadline (mirrored from its cohort).
    SecAggStage,
    /// The evaluation deadline.
    Evaluate,
    /// An asynchronous task's deadline, by task id.
    Task(u64),
    /// The current stage deadline of an asynchronous task's SecAgg+ cohort, by task id.
    Cohort(u64),
}

/// The client asked for the initial model, and those tried before it.
#[derive(Debug)]
pub(crate) struct InitAsk {
    pub(crate) asked: ClientId,
    pub(crate) tried: BTreeSet<ClientId>,
}

/// What every engine shares: the coordinator's state apart from the engine's own.
pub(crate) struct Core {
    pub(crate) config: CoordinatorConfig,
    pub(crate) strategy: Box<dyn Strategy>,
    pub(crate) registry: Registry,
    pub(crate) global: Option<Params>,
    /// Last round started (0 before the first): the version of work dispatched last.
    pub(crate) round: u64,
    /// Named deadlines; each engine stops its own when its state changes.
    pub(crate) timers: TimerQueue<Timer>,
    pub(crate) history: Vec<RoundRecord>,
    /// State as of the end of the last finished round (what a checkpoint holds).
    pub(crate) last_snapshot: Option<Snapshot>,
    pub(crate) transmits: VecDeque<Transmit>,
    pub(crate) events: VecDeque<Event>,
    /// Heavy work for the driver.
    pub(crate) jobs: Jobs,
    /// The unmasked quantized sum of the last secure round (for audits and tests).
    pub(crate) last_unmasked: Option<Vec<u32>>,
    /// Privacy spent (if DP is on).
    pub(crate) accountant: Option<RdpAccountant>,
    /// The round whose end the driver has not yet made durable: nothing is dispatched
    /// until [`crate::Coordinator::handle_persisted`].
    pub(crate) unpersisted: Option<u64>,
    /// The last [`Event::WaitingForClients`] or [`Event::WaitingForModel`] emitted (to emit
    /// it only on change).
    pub(crate) waiting: Option<Event>,
    /// The open round's privacy report, put in its record when it ends.
    pub(crate) round_privacy: Option<PrivacyReport>,
    /// The initial model is being asked of a client.
    pub(crate) init: Option<InitAsk>,
    /// All rounds are done (or the privacy budget is spent).
    pub(crate) finished: bool,
    /// Tasks are numbered apart from rounds (asynchronous engines): snapshots keep the last.
    pub(crate) numbered_tasks: bool,
}

/// Why [`Core::account_release`] refused a release.
#[derive(Debug)]
pub(crate) struct BudgetReached;

/// How a round's work is scheduled and when its aggregate is ready. Every method gets the
/// [`Core`]; none reads a clock or touches a socket.
pub(crate) trait Engine: Send {
    /// The engine's state, for status pages ("Waiting", "Train", …).
    fn phase_name(&self) -> &'static str;
    /// The round reached: the last round started (synchronous), the model version
    /// (asynchronous).
    fn round(&self, core: &Core) -> u64;
    /// Dispatch work if the engine can: called when something changed that may allow it
    /// (a client enrolled, the model arrived, a round became durable, the driver started).
    /// Never called while the initial model is asked for, while a round waits to be
    /// persisted, or once the run finished.
    fn dispatch(&mut self, core: &mut Core, now: Instant);
    /// A training result.
    fn on_train_result(
        &mut self,
        core: &mut Core,
        now: Instant,
        from: &ClientId,
        r: TrainRes,
    ) -> Result<(), Error>;
    /// An evaluation result.
    fn on_evaluate_result(
        &mut self,
        core: &mut Core,
        now: Instant,
        from: &ClientId,
        r: EvaluateRes,
    ) -> Result<(), Error>;
    /// A secure-aggregation message (routed to its cohort).
    fn on_secagg(
        &mut self,
        core: &mut Core,
        now: Instant,
        from: &ClientId,
        msg: Message,
    ) -> Result<(), Error>;
    /// `client` will not contribute to the work it holds (it left, timed out, aborted or
    /// was dropped).
    fn on_failure(&mut self, core: &mut Core, now: Instant, client: &ClientId, r: FailureReason);
    /// One of the engine's timers fired.
    fn on_timer(&mut self, core: &mut Core, now: Instant, timer: Timer);
    /// A job's result, for the work (round) it was pushed with.
    fn on_job_result(&mut self, core: &mut Core, now: Instant, round: u64, output: Output);
}

impl Core {
    pub(crate) fn new(
        config: CoordinatorConfig,
        strategy: Box<dyn Strategy>,
        global: Option<Params>,
    ) -> Self {
        let accountant = config.dp.as_ref().map(|_| RdpAccountant::new());
        let numbered_tasks = !matches!(config.engine, EngineConfig::Sync);
        Self {
            numbered_tasks,
            config,
            strategy,
            registry: Registry::default(),
            global,
            round: 0,
            timers: TimerQueue::default(),
            history: Vec::new(),
            last_snapshot: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            jobs: Jobs::default(),
            last_unmasked: None,
            accountant,
            unpersisted: None,
            waiting: None,
            round_privacy: None,
            init: None,
            finished: false,
        }
    }

    /// Whether an engine may dispatch now (see [`Engine::dispatch`]).
    pub(crate) fn may_dispatch(&self) -> bool {
        !self.finished && self.init.is_none() && self.unpersisted.is_none()
    }

    /// Clients that may be sampled now: all but excluded stragglers, unless leaving those
    /// out would leave fewer than `min_train_results`.
    pub(crate) fn eligible_infos(&self, now: Instant, secure_only: bool) -> Vec<ClientInfo> {
        self.registry
            .eligible(now, secure_only, self.config.min_train_results)
    }

    /// Records missed training deadlines; excludes repeat offenders.
    pub(crate) fn note_missed_deadlines(&mut self, now: Instant, ids: &[ClientId]) {
        self.registry.missed_deadlines(
            now,
            ids,
            self.config.max_missed_deadlines,
            self.config.straggler_backoff,
        );
    }

    /// The sampling RNG of `round`'s `stream` (0 training, 1 evaluation, 2 the SecAgg graph).
    pub(crate) fn rng_for(&self, round: u64, stream: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(round.wrapping_mul(4).wrapping_add(stream));
        rng
    }

    /// A result for work that is not open: ignored if it is for a past round (late), a
    /// violation if it claims a future one.
    pub(crate) fn late_or_invalid(
        &mut self,
        from: &ClientId,
        round: u64,
        kind: &'static str,
    ) -> Result<(), Error> {
        if round <= self.round {
            self.events.push_back(Event::LateMessage {
                client: from.clone(),
                round,
            });
            Ok(())
        } else {
            Err(Error::InvalidMessage(InvalidMessage::FutureRound {
                kind,
                round,
                current: self.round,
            }))
        }
    }

    /// The checks every training result passes before it is counted: a positive example
    /// count within `max_examples`, the model's manifest, finite values.
    pub(crate) fn check_train_result(
        &self,
        r: &TrainRes,
        manifest: &crate::Manifest,
    ) -> Result<(), Error> {
        if r.num_examples == 0 {
            return Err(Error::InvalidMessage(InvalidMessage::ZeroExamples));
        }
        if r.num_examples > self.config.max_examples {
            return Err(Error::LimitExceeded {
                what: "example count",
                len: r.num_examples,
                max: self.config.max_examples,
            });
        }
        r.params.check_same_manifest(manifest)?;
        r.params.check_finite()
    }

    /// The checks every evaluation result passes: finite loss and metrics, an example count
    /// within `max_examples`.
    pub(crate) fn check_evaluate_result(&self, r: &EvaluateRes) -> Result<(), Error> {
        if !r.loss.is_finite() || r.metrics.values().any(|v| !v.is_finite()) {
            return Err(Error::InvalidMessage(InvalidMessage::NonFinite(
                "evaluation result".into(),
            )));
        }
        if r.num_examples > self.config.max_examples {
            return Err(Error::LimitExceeded {
                what: "example count",
                len: r.num_examples,
                max: self.config.max_examples,
            });
        }
        Ok(())
    }

    /// One release of an aggregate under differential privacy: composes one step of the
    /// sampled Gaussian mechanism at rate `q` into the accountant and keeps the round's
    /// report. Returns the clients' DP settings (client mode; `cohort` clients add noise
    /// that sums to the configured level), `Ok(None)` without DP or in a server mode, and
    /// `Err` (with [`Event::PrivacyBudgetReached`] queued) if the step would pass the budget.
    pub(crate) fn account_release(
        &mut self,
        q: f64,
        cohort: usize,
    ) -> Result<Option<ClientDp>, BudgetReached> {
        let (Some(dp), Some(acc)) = (&self.config.dp, &mut self.accountant) else {
            return Ok(None);
        };
        let sigma = dp.noise_multiplier;
        if let Some(budget) = dp.privacy_budget {
            let next = acc.epsilon_after(q, sigma, dp.delta);
            if next > budget {
                self.events.push_back(Event::PrivacyBudgetReached {
                    spent: acc.epsilon(dp.delta),
                    next,
                    budget,
                });
                return Err(BudgetReached);
            }
        }
        acc.compose(q, sigma, 1);
        self.round_privacy = Some(PrivacyReport {
            sampling_rate: q,
            noise_multiplier: sigma,
            epsilon: acc.epsilon(dp.delta),
            delta: dp.delta,
        });
        Ok(self.client_dp(cohort))
    }

    /// The clip and noise each client applies (client-mode DP) when `cohort` updates make
    /// up one release: together their noise has the configured standard deviation.
    pub(crate) fn client_dp(&self, cohort: usize) -> Option<ClientDp> {
        let dp = self
            .config
            .dp
            .as_ref()
            .filter(|dp| dp.mode == DpMode::Client)?;
        Some(ClientDp {
            clip: dp.clip_norm(),
            noise_std: dp.noise_multiplier * dp.clip_norm() / (cohort.max(1) as f64).sqrt(),
        })
    }

    /// Records a round that ended: history (windowed), the snapshot a checkpoint will hold,
    /// the event. Afterwards nothing is dispatched until the driver persisted the snapshot;
    /// returns true if the engine may dispatch at once (no model yet, so nothing to persist).
    #[must_use]
    pub(crate) fn record_round(&mut self, mut record: RoundRecord) -> bool {
        if record.privacy.is_none() {
            record.privacy = self.round_privacy.take();
        }
        self.history.push(record.clone());
        if self.history.len() > self.config.history_window {
            let excess = self.history.len() - self.config.history_window;
            self.history.drain(..excess);
        }
        if let Some(global) = self.global.clone() {
            self.last_snapshot = Some(Snapshot {
                round: record.round,
                global,
                history: self.history.clone(),
                strategy_state: self.strategy.state(),
                accountant: self
                    .accountant
                    .as_ref()
                    .map(|a| (a.rdp().to_vec(), a.steps())),
                last_task: self.numbered_tasks.then_some(self.round),
            });
        }
        let persist = self.last_snapshot.is_some();
        let round = record.round;
        if record.aborted.is_some() {
            self.events.push_back(Event::RoundAborted(record));
        } else {
            self.events.push_back(Event::RoundCompleted(record));
        }
        if persist {
            self.unpersisted = Some(round);
        }
        !persist
    }

    /// Installs an aggregate's new model if it is sane. `Err` says why the round must be
    /// aborted instead (the model is then unchanged).
    pub(crate) fn install(
        &mut self,
        outcome: Result<Option<Params>, Error>,
    ) -> Result<(), AbortReason> {
        match outcome {
            Ok(Some(new))
                if new.check_finite().is_ok()
                    && self
                        .global
                        .as_ref()
                        .is_none_or(|g| g.manifest() == new.manifest()) =>
            {
                self.global = Some(new);
                Ok(())
            }
            Ok(Some(_)) => Err(AbortReason::Other(
                "strategy produced a non-finite or mis-shaped model; kept the previous one".into(),
            )),
            Ok(None) => Ok(()),
            Err(e) => Err(AbortReason::Other(format!("aggregation failed: {e}"))),
        }
    }

    /// Emits [`Event::WaitingForClients`] if it differs from the last one.
    pub(crate) fn wait_for_clients(&mut self, eligible: usize, required: usize) {
        let without = if self.config.secure_aggregation.is_some() {
            self.registry.without_secure_aggregation()
        } else {
            0
        };
        let ev = Event::WaitingForClients {
            enrolled: self.registry.len(),
            eligible,
            required,
            without_secure_aggregation: without,
        };
        if self.waiting.as_ref() != Some(&ev) {
            self.waiting = Some(ev.clone());
            self.events.push_back(ev);
        }
    }

    /// Ends the run: every client is told, and [`Event::Finished`] is queued.
    pub(crate) fn finish(&mut self) {
        self.finished = true;
        self.timers.clear();
        for id in self.registry.ids() {
            self.transmits.push_back((
                id.clone(),
                Message::Abort {
                    round: None,
                    reason: AbortReason::Finished,
                },
            ));
        }
        self.events.push_back(Event::Finished);
    }

    /// Why a client declaring `declared` cannot join, if the federation's model is known and
    /// differs. A client that declares nothing is admitted; its payloads are still checked
    /// against the model's manifest.
    pub(crate) fn model_mismatch(&self, declared: Option<&ModelSummary>) -> Option<AbortReason> {
        let got = declared?;
        let expected = ModelSummary::of(self.global.as_ref()?.manifest());
        (expected.digest != got.digest).then_some(AbortReason::ModelMismatch {
            expected,
            got: *got,
        })
    }

    /// Tells `client` it is refused and why (it is not, or no longer, enrolled).
    pub(crate) fn refuse(&mut self, client: &ClientId, reason: AbortReason) {
        self.events.push_back(Event::ClientRefused {
            client: client.clone(),
            reason: reason.to_string(),
        });
        self.transmits.push_back((
            client.clone(),
            Message::Abort {
                round: None,
                reason,
            },
        ));
    }

    /// The quorum a client-provided initial model needs.
    fn model_quorum(&self) -> usize {
        self.config
            .model_quorum
            .min(self.config.min_available_clients)
            .max(1)
    }

    /// The client to ask for the initial model: one (not yet tried) of the largest group of
    /// clients declaring the same model, if that group reaches the quorum. Otherwise `Err`
    /// with the size of the largest group.
    fn model_source(&self, tried: &BTreeSet<ClientId>) -> Result<ClientId, usize> {
        let quorum = self.model_quorum();
        // Counted per hello while the run waits for a model: from the registry's tallies, so
        // that the walk over every client below happens only once a quorum exists.
        let counts = self.registry.declared_models();
        let largest = counts.values().copied().max().unwrap_or(0);
        if largest < quorum {
            return Err(largest);
        }
        let mut groups: BTreeMap<[u8; 32], Vec<&ClientId>> = BTreeMap::new();
        for (id, c) in self.registry.iter() {
            if let Some(m) = &c.model
                && counts.get(&m.digest).is_some_and(|&n| n >= quorum)
            {
                groups.entry(m.digest).or_default().push(id);
            }
        }
        let mut agreed: Vec<&Vec<&ClientId>> =
            groups.values().filter(|g| g.len() >= quorum).collect();
        // Largest group first; ties go to the group whose first id sorts first (groups are
        // keyed by digest, so this is deterministic).
        agreed.sort_by_key(|g| std::cmp::Reverse(g.len()));
        agreed
            .iter()
            .find_map(|g| {
                g.iter()
                    .find(|id| !tried.contains(**id))
                    .map(|id| (*id).clone())
            })
            .ok_or(largest)
    }

    /// Asks a client for the initial model (one not in `tried`), or says what is missing.
    pub(crate) fn ask_for_params(&mut self, now: Instant, tried: BTreeSet<ClientId>) {
        let next = match self.model_source(&tried) {
            Ok(id) => Some(id),
            Err(agreeing) => {
                let undeclared = self.registry.undeclared_models();
                let ev = Event::WaitingForModel {
                    agreeing,
                    required: self.model_quorum(),
                    undeclared,
                };
                if self.waiting.as_ref() != Some(&ev) {
                    self.waiting = Some(ev.clone());
                    self.events.push_back(ev);
                }
                None
            }
        };
        if let Some(id) = next {
            self.transmits.push_back((id.clone(), Message::GetParams));
            self.init = Some(InitAsk { asked: id, tried });
            self.timers
                .set(Timer::InitParams, now + self.config.init_timeout);
        }
    }
}
