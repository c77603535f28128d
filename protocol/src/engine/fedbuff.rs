//! Buffered asynchronous aggregation (FedBuff; Nguyen et al., "Federated Learning with
//! Buffered Asynchronous Aggregation", AISTATS 2022).
//!
//! Up to `concurrency` clients train at once, each on the model version it was sent. Work
//! goes out in *tasks* (the `round` its messages carry; one task per dispatch, numbered
//! apart from the model versions). Each arriving update `Δ = local − model(v)` is weighted
//! by its staleness `τ = current − v` and folded into a buffer; updates more than
//! `max_staleness` versions behind are refused. Every `buffer_size` updates the server steps:
//! the strategy gets each buffered update as `current + η·s(τ)·Δ` with its example count, so
//! FedAvg computes `current + η · Σ wᵢ s(τᵢ) Δᵢ / Σ wᵢ` (the paper's step, with example
//! weights), and server optimizers (FedAdam, FedYogi, FedAvgM…), robust aggregators and
//! central DP work on the same inputs as in synchronous rounds.
//!
//! **Under secure aggregation** clients are dispatched in *cohorts* of `cohort_size`, each
//! one SecAgg+ instance ([`Cohort`]): keys are advertised and shared while the cohort
//! trains, its masked inputs are unmasked together once they are in (or at its deadline,
//! with dropouts handled as in synchronous SecAgg+), and the cohort's sum enters the buffer
//! as `count` updates with the cohort's staleness, as `η·s(τ)·Σ wᵢΔᵢ`. The server never
//! sees one client's update; the strategy gets the buffer's sum.
//!
//! A step is one round of the run: it is recorded (with each update's staleness), evaluated
//! if due, and persisted like a synchronous round; no new task goes out until the step is
//! durable (updates that arrive meanwhile wait in the next buffer). In-flight tasks are not
//! part of a checkpoint: after a restart they are gone (their clients reconnect and get new
//! tasks), and task ids continue after the last one dispatched, so a result of a task sent
//! before the restart is never taken for a new one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use rand::seq::SliceRandom;

use crate::job::Output;
use crate::secagg::{ServerRound, Unmasked};
use crate::strategy::{
    ClientInfo, ClientUpdate, Failure, FailureReason, TrainResults, WeightedSum,
    weighted_train_metrics,
};
use crate::wire::messages::{
    AbortReason, ClientId, EvaluateIns, EvaluateRes, Message, Metrics, TrainIns, TrainRes,
};
use crate::wire::params::Params;
use crate::{Error, InvalidMessage};

use super::cohort::Cohort;
use super::config::FedBuffConfig;
use super::{AsyncStep, Core, Engine, Event, RoundRecord, Timer};

/// Failures kept per step (the rest are counted in the record's `dispatched`, not listed):
/// a population that keeps failing must not grow the record without bound.
pub const MAX_FAILURES_PER_STEP: usize = 1_024;

/// Work out with a set of clients.
#[derive(Debug)]
struct Task {
    /// The model version sent.
    version: u64,
    /// That model (shared, not copied): updates are taken relative to it.
    model: Params,
    /// Clients that have not answered.
    pending: BTreeSet<ClientId>,
    /// Every client the task was sent to.
    clients: BTreeSet<ClientId>,
    /// Its SecAgg+ instance (secure runs): the task ends with the cohort, not with its
    /// last answer.
    cohort: Option<Cohort>,
}

/// Cohort sums waiting for the next step (secure runs): `Σ_c η·s(τ_c)·Σ_{i∈c} wᵢΔᵢ`.
#[derive(Debug, Default)]
struct SecureBuffer {
    delta: Vec<f64>,
    weight: f64,
    count: usize,
    metrics: Vec<Metrics>,
}

/// The evaluation of a new version, holding the step's record until it ends.
#[derive(Debug)]
struct Evaluation {
    record: RoundRecord,
    pending: BTreeSet<ClientId>,
    results: Vec<(ClientId, EvaluateRes)>,
    failures: Vec<Failure>,
}

/// The FedBuff engine.
#[derive(Debug)]
pub(crate) struct FedBuffEngine {
    config: FedBuffConfig,
    /// The current model version (steps taken).
    version: u64,
    tasks: BTreeMap<u64, Task>,
    /// The task each training client works on.
    busy: BTreeMap<ClientId, u64>,
    /// Updates of the next step, already weighted (see the module docs).
    buffer: Vec<ClientUpdate>,
    /// The same for secure runs, as one sum.
    secure: SecureBuffer,
    /// Their staleness, in the same order.
    staleness: Vec<(ClientId, u64)>,
    failures: Vec<Failure>,
    discarded: u64,
    dispatched: u64,
    evaluation: Option<Evaluation>,
}

impl FedBuffEngine {
    /// An engine whose model is at `version` (0 for a new run).
    pub(crate) fn new(config: FedBuffConfig, version: u64) -> Self {
        Self {
            config,
            version,
            tasks: BTreeMap::new(),
            busy: BTreeMap::new(),
            buffer: Vec::new(),
            secure: SecureBuffer::default(),
            staleness: Vec::new(),
            failures: Vec::new(),
            discarded: 0,
            dispatched: 0,
            evaluation: None,
        }
    }

    fn note_failure(&mut self, client: &ClientId, reason: FailureReason) {
        if self.failures.len() < MAX_FAILURES_PER_STEP {
            self.failures.push(Failure {
                client: client.clone(),
                reason,
            });
        }
    }

    /// Forgets `client`'s place in task `id`; the task ends when nobody is left in it.
    fn release(&mut self, core: &mut Core, client: &ClientId, id: u64) {
        self.busy.remove(client);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.pending.remove(client);
            if task.pending.is_empty() && task.cohort.is_none() {
                self.tasks.remove(&id);
                core.timers.stop(&Timer::Task(id));
            }
        }
    }

    /// Updates waiting for the next step.
    fn buffered(&self) -> usize {
        self.buffer.len() + self.secure.count
    }

    /// Steps when the buffer is full, then keeps `concurrency` clients busy.
    fn pump(&mut self, core: &mut Core, now: Instant) {
        while self.evaluation.is_none()
            && core.may_dispatch()
            && self.version < core.config.num_rounds
            && self.buffered() >= self.config.buffer_size
        {
            self.step(core, now);
        }
        self.fill(core, now);
    }

    /// Sends tasks to idle clients until `concurrency` are busy.
    fn fill(&mut self, core: &mut Core, now: Instant) {
        if self.evaluation.is_some() || !core.may_dispatch() {
            return;
        }
        if self.version >= core.config.num_rounds {
            core.finish();
            return;
        }
        let secure = core.config.secure_aggregation.is_some();
        if core.registry.len() < core.config.min_available_clients {
            let eligible = core
                .registry
                .eligible_count(now, secure, core.config.min_train_results);
            core.wait_for_clients(eligible, core.config.min_available_clients);
            return;
        }
        let Some(global) = core.global.clone() else {
            core.ask_for_params(now, BTreeSet::new());
            return;
        };
        let free = self.config.concurrency.saturating_sub(self.busy.len());
        // A cohort goes out whole: one SecAgg+ instance over `cohort_size` clients.
        let size = if secure { self.config.cohort_size } else { 1 };
        if free < size {
            return;
        }
        let idle: Vec<ClientInfo> = core
            .eligible_infos(now, secure)
            .into_iter()
            .filter(|i| !self.busy.contains_key(&i.id))
            .collect();
        if idle.len() < size {
            if self.busy.is_empty() {
                core.wait_for_clients(idle.len(), size);
            }
            return;
        }
        let mut rng = core.rng_for(core.round + 1, 0);
        // The strategy's training configuration for the next version (its learning-rate
        // schedule follows versions); the clients are FedBuff's own uniform choice.
        let Some((_, template)) = core
            .strategy
            .configure_train(self.version + 1, &idle, &mut rng)
            .into_iter()
            .next()
        else {
            if self.busy.is_empty() {
                core.wait_for_clients(idle.len(), size);
            }
            return;
        };
        let mut order: Vec<&ClientInfo> = idle.iter().collect();
        order.shuffle(&mut rng);
        let take = if secure { free / size * size } else { free };
        order.truncate(take.min(idle.len() / size * size));
        let chosen: Vec<ClientId> = order.into_iter().map(|i| i.id.clone()).collect();
        if chosen.is_empty() {
            return;
        }
        core.waiting = None;
        // Plain: one task for everyone sent now; secure: one cohort per `size` clients.
        let per_task = if secure { size } else { chosen.len() };
        for group in chosen.chunks(per_task) {
            self.send_task(
                core,
                now,
                &global,
                &template,
                group.iter().cloned().collect(),
            );
        }
    }

    /// Sends one task (a cohort, under secure aggregation) to `clients`.
    fn send_task(
        &mut self,
        core: &mut Core,
        now: Instant,
        global: &Params,
        template: &crate::wire::messages::TrainConfig,
        clients: BTreeSet<ClientId>,
    ) {
        let id = core.round + 1;
        let deadline = now + core.config.round_timeout;
        let mut config = template.clone();
        config.seed = config
            .seed
            .wrapping_add(id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // At most one step is released per `buffer_size` updates: the clients' DP settings
        // are those of a release of `buffer_size` updates (accounted at the step).
        if let Some(client_dp) = core.client_dp(self.config.buffer_size) {
            config.dp = Some(client_dp);
        }
        let mut cohort = None;
        if let Some(sa) = &core.config.secure_aggregation {
            let graph_seed = rand::RngCore::next_u64(&mut core.rng_for(id, 2));
            match sa.setup_for(clients.iter().cloned().collect(), graph_seed) {
                Ok(setup) => {
                    cohort = Some(Cohort::new(
                        id,
                        Timer::Cohort(id),
                        ServerRound::new(
                            id,
                            setup,
                            now,
                            std::time::Duration::from_millis(sa.phase_timeout_ms),
                            deadline,
                            global.len(),
                            core.config.min_train_results,
                        )
                        .with_collect_target(
                            match self.config.cohort_target {
                                0 => usize::MAX,
                                t => t,
                            },
                        ),
                    ));
                }
                // Settings were validated with the cohort size: nothing to send.
                Err(_) => return,
            }
        }
        core.round = id;
        self.dispatched += 1;
        let setup = cohort.as_ref().map(|c| c.server().setup().clone());
        for c in &clients {
            self.busy.insert(c.clone(), id);
            core.transmits.push_back((
                c.clone(),
                Message::Train(TrainIns {
                    round: id,
                    config: config.clone(),
                    deadline_ms: core.config.round_timeout.as_millis() as u64,
                    model: global.clone(),
                    secagg: setup.clone(),
                }),
            ));
        }
        core.events.push_back(Event::Dispatched {
            task: id,
            version: self.version,
            clients: clients.len(),
        });
        core.timers.set(Timer::Task(id), deadline);
        if let Some(c) = &cohort {
            core.timers
                .set_or_stop(Timer::Cohort(id), c.server().deadline());
        }
        self.tasks.insert(
            id,
            Task {
                version: self.version,
                model: global.clone(),
                pending: clients.clone(),
                clients,
                cohort,
            },
        );
    }

    /// Moves what task `id`'s cohort queued into the core; folds its sum in once it has one.
    fn pump_cohort(&mut self, core: &mut Core, now: Instant, id: u64) {
        let Some(outcome) = self
            .tasks
            .get_mut(&id)
            .and_then(|t| t.cohort.as_mut())
            .and_then(|c| c.pump(core))
        else {
            return;
        };
        self.close_cohort(core, id, outcome);
        self.pump(core, now);
    }

    /// A cohort ended: its clients are free, its failures recorded, its sum (if any) folded
    /// into the buffer with its staleness.
    fn close_cohort(&mut self, core: &mut Core, id: u64, outcome: Result<Unmasked, AbortReason>) {
        let Some(task) = self.tasks.remove(&id) else {
            return;
        };
        core.timers.stop(&Timer::Task(id));
        core.timers.stop(&Timer::Cohort(id));
        for c in &task.clients {
            if self.busy.get(c) == Some(&id) {
                self.busy.remove(c);
            }
        }
        let Some(cohort) = task.cohort else {
            return;
        };
        for f in cohort.failures() {
            self.note_failure(&f.client, f.reason);
        }
        let Ok(unmasked) = outcome else {
            return;
        };
        let staleness = self.version.saturating_sub(task.version);
        let contributors = unmasked.contributors.len();
        let decoded = cohort.decode(&task.model, &unmasked);
        core.last_unmasked = Some(unmasked.sum);
        if staleness > self.config.max_staleness {
            self.discarded += contributors as u64;
            return;
        }
        let Ok(ws) = decoded else {
            return;
        };
        // Σ wᵢ·localᵢ − W·base = Σ wᵢΔᵢ, scaled by η·s(τ).
        let scale =
            self.config.server_learning_rate * self.config.staleness_weight.weight(staleness);
        let buf = &mut self.secure;
        if buf.delta.is_empty() {
            buf.delta = vec![0.0; ws.sum.len()];
        }
        for ((d, s), &b) in buf.delta.iter_mut().zip(&ws.sum).zip(task.model.values()) {
            *d += scale * (s - ws.total_weight * b as f64);
        }
        buf.weight += ws.total_weight;
        buf.count += contributors;
        buf.metrics.extend(unmasked.metrics);
        self.staleness
            .extend(unmasked.contributors.into_iter().map(|c| (c, staleness)));
    }

    /// Folds an update into the buffer, weighted by its staleness, or refuses it.
    fn fold(
        &mut self,
        core: &Core,
        from: &ClientId,
        r: TrainRes,
        base: &Params,
        version: u64,
    ) -> Result<(), Error> {
        let staleness = self.version.saturating_sub(version);
        if staleness > self.config.max_staleness {
            self.discarded += 1;
            return Ok(());
        }
        let Some(current) = core.global.as_ref() else {
            return Err(Error::Config("no global model".into()));
        };
        let scale =
            self.config.server_learning_rate * self.config.staleness_weight.weight(staleness);
        let values: Vec<f32> = current
            .values()
            .iter()
            .zip(r.params.values())
            .zip(base.values())
            .map(|((&c, &l), &b)| (c as f64 + scale * (l as f64 - b as f64)) as f32)
            .collect();
        let params = current.with_values(values)?;
        self.buffer.push(ClientUpdate {
            client: from.clone(),
            num_examples: r.num_examples,
            metrics: r.metrics,
            params,
        });
        self.staleness.push((from.clone(), staleness));
        Ok(())
    }

    /// One server step: aggregate the buffer into the next version.
    fn step(&mut self, core: &mut Core, now: Instant) {
        let n = self.buffered();
        let next = self.version + 1;
        // Each step is one release of the sampled Gaussian mechanism: `n` of the population
        // contributed.
        let q = n as f64 / core.registry.len().max(n).max(1) as f64;
        if core.account_release(q, n).is_err() {
            core.finish();
            return;
        }
        let updates = std::mem::take(&mut self.buffer);
        let secure = std::mem::take(&mut self.secure);
        let failures = std::mem::take(&mut self.failures);
        let train_metrics = if secure.count > 0 {
            crate::strategy::weighted_metrics(secure.metrics.iter().map(|m| (1.0, m)))
        } else {
            weighted_train_metrics(&updates)
        };
        let mut record = RoundRecord {
            round: next,
            selected: n,
            results: n,
            failures,
            train_metrics,
            evaluation: None,
            aborted: None,
            secagg: None,
            privacy: None,
            asynchronous: Some(AsyncStep {
                staleness: std::mem::take(&mut self.staleness),
                discarded: std::mem::take(&mut self.discarded),
                dispatched: std::mem::take(&mut self.dispatched),
            }),
        };
        let outcome = match &core.global {
            Some(g) if secure.count > 0 => {
                // The strategy sees the buffer as a weighted sum: W·current + Σ η s ΣwΔ.
                let sum = WeightedSum {
                    manifest: g.manifest().clone(),
                    sum: g
                        .values()
                        .iter()
                        .zip(&secure.delta)
                        .map(|(&c, d)| secure.weight * c as f64 + d)
                        .collect(),
                    total_weight: secure.weight,
                    count: secure.count,
                };
                core.strategy
                    .aggregate_train(next, g, TrainResults::Sum(&sum), &record.failures)
            }
            Some(g) => core.strategy.aggregate_train(
                next,
                g,
                TrainResults::Individual(&updates),
                &record.failures,
            ),
            None => Err(Error::Config("no global model".into())),
        };
        self.version = next;
        let installed = core.install(outcome);
        self.cancel_hopeless(core);
        if let Err(reason) = installed {
            record.aborted = Some(reason);
            self.end_step(core, now, record);
            return;
        }
        self.start_eval(core, now, record);
    }

    /// Tasks whose version is already too stale to count are called off.
    fn cancel_hopeless(&mut self, core: &mut Core) {
        let floor = self.version.saturating_sub(self.config.max_staleness);
        let hopeless: Vec<u64> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.version < floor)
            .map(|(id, _)| *id)
            .collect();
        for id in hopeless {
            let Some(task) = self.tasks.remove(&id) else {
                continue;
            };
            core.timers.stop(&Timer::Task(id));
            core.timers.stop(&Timer::Cohort(id));
            for c in task.pending {
                if self.busy.get(&c) == Some(&id) {
                    self.busy.remove(&c);
                }
                self.discarded += 1;
                core.transmits.push_back((
                    c,
                    Message::Abort {
                        round: Some(id),
                        reason: AbortReason::Other("update would be too stale".into()),
                    },
                ));
            }
        }
    }

    fn start_eval(&mut self, core: &mut Core, now: Instant, record: RoundRecord) {
        let version = record.round;
        let due =
            core.config.evaluate_every > 0 && version.is_multiple_of(core.config.evaluate_every);
        let Some(global) = core.global.clone().filter(|_| due) else {
            self.end_step(core, now, record);
            return;
        };
        // Only idle clients evaluate: a client does one task at a time.
        let infos: Vec<ClientInfo> = core
            .eligible_infos(now, false)
            .into_iter()
            .filter(|i| !self.busy.contains_key(&i.id))
            .collect();
        let mut rng = core.rng_for(version, 1);
        let chosen: BTreeSet<ClientId> = core
            .strategy
            .configure_evaluate(version, &infos, &mut rng)
            .into_iter()
            .filter(|id| core.registry.contains(id) && !self.busy.contains_key(id))
            .collect();
        if chosen.is_empty() {
            self.end_step(core, now, record);
            return;
        }
        for id in &chosen {
            core.transmits.push_back((
                id.clone(),
                Message::Evaluate(EvaluateIns {
                    round: version,
                    deadline_ms: core.config.round_timeout.as_millis() as u64,
                    model: global.clone(),
                }),
            ));
        }
        self.evaluation = Some(Evaluation {
            record,
            pending: chosen,
            results: Vec::new(),
            failures: Vec::new(),
        });
        core.timers
            .set(Timer::Evaluate, now + core.config.round_timeout);
    }

    fn close_eval(&mut self, core: &mut Core, now: Instant) {
        let Some(e) = self.evaluation.take() else {
            return;
        };
        core.timers.stop(&Timer::Evaluate);
        let mut record = e.record;
        record.evaluation = core
            .strategy
            .aggregate_evaluate(record.round, &e.results, &e.failures);
        self.end_step(core, now, record);
    }

    fn end_step(&mut self, core: &mut Core, now: Instant, record: RoundRecord) {
        if core.record_round(record) {
            self.pump(core, now);
        }
    }
}

impl Engine for FedBuffEngine {
    fn phase_name(&self) -> &'static str {
        if self.evaluation.is_some() {
            "Evaluate"
        } else if self.busy.is_empty() {
            "Waiting"
        } else {
            "Train"
        }
    }

    fn round(&self, _core: &Core) -> u64 {
        self.version
    }

    fn dispatch(&mut self, core: &mut Core, now: Instant) {
        self.pump(core, now);
    }

    fn on_train_result(
        &mut self,
        core: &mut Core,
        now: Instant,
        from: &ClientId,
        r: TrainRes,
    ) -> Result<(), Error> {
        let Some(task) = self.tasks.get(&r.round) else {
            return core.late_or_invalid(from, r.round, "TrainResult");
        };
        if task.cohort.is_some() {
            return Err(Error::InvalidMessage(InvalidMessage::WrongMode(
                "a plain training result in a secure cohort".into(),
            )));
        }
        if !task.clients.contains(from) {
            return Err(Error::InvalidMessage(InvalidMessage::NotSampled {
                round: r.round,
            }));
        }
        if !task.pending.contains(from) {
            core.events.push_back(Event::LateMessage {
                client: from.clone(),
                round: r.round,
            });
            return Ok(());
        }
        core.check_train_result(&r, task.model.manifest())?;
        let (base, version) = (task.model.clone(), task.version);
        self.release(core, from, r.round);
        core.registry.met_deadline(from);
        self.fold(core, from, r, &base, version)?;
        self.pump(core, now);
        Ok(())
    }

    fn on_evaluate_result(
        &mut self,
        core: &mut Core,
        now: Instant,
        from: &ClientId,
        r: EvaluateRes,
    ) -> Result<(), Error> {
        let Some(e) = self
            .evaluation
            .as_mut()
            .filter(|e| e.record.round == r.round)
        else {
            if r.round <= self.version {
                core.events.push_back(Event::LateMessage {
                    client: from.clone(),
                    round: r.round,
                });
                return Ok(());
            }
            return Err(Error::InvalidMessage(InvalidMessage::FutureRound {
                kind: "EvaluateResult",
                round: r.round,
                current: self.version,
            }));
        };
        if !e.pending.remove(from) {
            core.events.push_back(Event::LateMessage {
                client: from.clone(),
                round: r.round,
            });
            return Ok(());
        }
        core.check_evaluate_result(&r)?;
        e.results.push((from.clone(), r));
        if e.pending.is_empty() {
            self.close_eval(core, now);
        }
        Ok(())
    }

    fn on_secagg(
        &mut self,
        core: &mut Core,
        now: Instant,
        from: &ClientId,
        msg: Message,
    ) -> Result<(), Error> {
        let id = msg.secagg_round().unwrap_or(0);
        let Some(task) = self.tasks.get_mut(&id) else {
            return core.late_or_invalid(from, id, msg.kind());
        };
        let Some(cohort) = task.cohort.as_mut() else {
            return Err(Error::InvalidMessage(InvalidMessage::WrongMode(format!(
                "{} in a task without secure aggregation",
                msg.kind()
            ))));
        };
        cohort.on_message(core, now, from, msg)?;
        self.pump_cohort(core, now, id);
        Ok(())
    }

    fn on_failure(
        &mut self,
        core: &mut Core,
        now: Instant,
        client: &ClientId,
        reason: FailureReason,
    ) {
        if let Some(e) = self.evaluation.as_mut()
            && e.pending.remove(client)
        {
            e.failures.push(Failure {
                client: client.clone(),
                reason: reason.clone(),
            });
            if e.pending.is_empty() {
                self.close_eval(core, now);
            }
        }
        let Some(&id) = self.busy.get(client) else {
            return;
        };
        if let Some(cohort) = self.tasks.get_mut(&id).and_then(|t| t.cohort.as_mut()) {
            // The cohort records it (and may end: too few left).
            cohort.on_failure(now, client, reason);
            self.release(core, client, id);
            self.pump_cohort(core, now, id);
        } else {
            self.release(core, client, id);
            self.note_failure(client, reason);
        }
        self.pump(core, now);
    }

    fn on_timer(&mut self, core: &mut Core, now: Instant, timer: Timer) {
        match timer {
            Timer::Task(id) | Timer::Cohort(id)
                if self.tasks.get(&id).is_some_and(|t| t.cohort.is_some()) =>
            {
                if let Some(cohort) = self.tasks.get_mut(&id).and_then(|t| t.cohort.as_mut()) {
                    cohort.on_timeout(now);
                }
                self.pump_cohort(core, now, id);
            }
            Timer::Task(id) => {
                let Some(task) = self.tasks.remove(&id) else {
                    return;
                };
                let missed: Vec<ClientId> = task.pending.into_iter().collect();
                for c in &missed {
                    self.busy.remove(c);
                    self.note_failure(c, FailureReason::Timeout);
                    core.transmits.push_back((
                        c.clone(),
                        Message::Abort {
                            round: Some(id),
                            reason: AbortReason::Other("task deadline passed".into()),
                        },
                    ));
                }
                core.note_missed_deadlines(now, &missed);
                self.pump(core, now);
            }
            Timer::Evaluate => {
                if let Some(e) = self.evaluation.as_mut() {
                    for id in std::mem::take(&mut e.pending) {
                        e.failures.push(Failure {
                            client: id,
                            reason: FailureReason::Timeout,
                        });
                    }
                }
                self.close_eval(core, now);
            }
            _ => {}
        }
    }

    fn on_job_result(&mut self, core: &mut Core, now: Instant, round: u64, output: Output) {
        if let Output::Unmask(sum) = output
            && let Some(cohort) = self.tasks.get_mut(&round).and_then(|t| t.cohort.as_mut())
        {
            cohort.on_unmask_result(sum);
            self.pump_cohort(core, now, round);
        }
    }
}
