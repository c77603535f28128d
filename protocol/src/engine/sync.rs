//! Synchronous rounds: `Waiting → Train → [Evaluate] → Waiting`, one round at a time.
//!
//! * **Train**: the strategy samples clients; each gets the global model and a deadline.
//!   Updates are checked (round, sender, manifest, finiteness, weight); a client that sends
//!   anything invalid is dropped and recorded as a failure. The phase ends when every sampled
//!   client answered or failed, or at the deadline (stragglers are cut and recorded). With
//!   fewer than `min_train_results` results the round is aborted with a reason; otherwise the
//!   strategy aggregates. Under secure aggregation the round's clients form one
//!   [`Cohort`] and the strategy gets its unmasked sum.
//! * **Evaluate** (every `evaluate_every` rounds): the new model is evaluated by the clients
//!   the strategy picks, with the same deadline rule.
//!
//! The round is then recorded, and the next one starts once the driver persisted it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::job::Output;
use crate::secagg::{ServerRound, Unmasked};
use crate::strategy::{
    ClientInfo, ClientUpdate, Failure, FailureReason, TrainResults, weighted_train_metrics,
};
use crate::wire::messages::{
    AbortReason, ClientId, EvaluateIns, EvaluateRes, Message, Metrics, TrainIns, TrainRes,
};
use crate::{Error, InvalidMessage};

use super::cohort::Cohort;
use super::{Core, Engine, Event, RoundRecord, Timer};

#[derive(Debug)]
struct TrainPhase {
    round: u64,
    selected: BTreeSet<ClientId>,
    pending: BTreeSet<ClientId>,
    results: Vec<ClientUpdate>,
    failures: Vec<Failure>,
    secagg: Option<Cohort>,
    /// Results that close the phase early (the strategy's count; over-selected clients
    /// beyond it are not waited for).
    target: usize,
}

#[derive(Debug)]
struct EvalPhase {
    record: RoundRecord,
    pending: BTreeSet<ClientId>,
    results: Vec<(ClientId, EvaluateRes)>,
    failures: Vec<Failure>,
}

#[derive(Debug, Default)]
enum Phase {
    #[default]
    Waiting,
    Train(TrainPhase),
    Evaluate(EvalPhase),
}

/// The synchronous-rounds engine.
#[derive(Debug, Default)]
pub(crate) struct SyncEngine {
    phase: Phase,
}

impl Engine for SyncEngine {
    fn phase_name(&self) -> &'static str {
        match self.phase {
            Phase::Waiting => "Waiting",
            Phase::Train(_) => "Train",
            Phase::Evaluate(_) => "Evaluate",
        }
    }

    fn round(&self, core: &Core) -> u64 {
        core.round
    }

    /// Starts the next round if the engine is idle and enough clients are enrolled.
    fn dispatch(&mut self, core: &mut Core, now: Instant) {
        if !matches!(self.phase, Phase::Waiting) || !core.may_dispatch() {
            return;
        }
        if core.round >= core.config.num_rounds {
            core.finish();
            return;
        }
        // Only clients that implement the protocol can take part in a secure round.
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
        let round = core.round + 1;
        let infos = core.eligible_infos(now, secure);
        let mut rng = core.rng_for(round, 0);
        let plan = core.strategy.configure_train(round, &infos, &mut rng);
        let mut selected = BTreeSet::new();
        let mut configs = Vec::new();
        for (id, config) in plan {
            if !core.registry.contains(&id) || !selected.insert(id.clone()) {
                continue; // the strategy named an unknown client or named one twice
            }
            configs.push((id, config));
        }
        if selected.len() < core.config.min_train_results {
            // A round that cannot reach its minimum is not started (nor counted): wait for
            // more clients that can take part.
            core.wait_for_clients(infos.len(), core.config.min_train_results);
            return;
        }
        core.waiting = None;
        core.round = round;
        let target = configs.len();
        if core.config.secure_aggregation.is_none()
            && core.config.over_selection > 0.0
            && let Some((_, template)) = configs.first().cloned()
        {
            let extra = (target as f64 * core.config.over_selection).ceil() as usize;
            let mut rest: Vec<&ClientInfo> =
                infos.iter().filter(|i| !selected.contains(&i.id)).collect();
            rand::seq::SliceRandom::shuffle(rest.as_mut_slice(), &mut rng);
            for info in rest.into_iter().take(extra) {
                selected.insert(info.id.clone());
                configs.push((info.id.clone(), template.clone()));
            }
        }
        // Each round is one release: one step of the sampled Gaussian mechanism at rate q.
        let q = selected.len() as f64 / infos.len().max(1) as f64;
        match core.account_release(q, selected.len()) {
            Ok(Some(client_dp)) => {
                for (_, c) in configs.iter_mut() {
                    c.dp = Some(client_dp);
                }
            }
            Ok(None) => {}
            Err(_) => {
                core.round -= 1;
                core.finish();
                return;
            }
        }
        let deadline = now + core.config.round_timeout;
        let mut secagg = None;
        if let Some(sa) = &core.config.secure_aggregation {
            let graph_seed = rand::RngCore::next_u64(&mut core.rng_for(round, 2));
            match sa.setup_for(selected.iter().cloned().collect(), graph_seed) {
                Ok(setup) => {
                    secagg = Some(Cohort::new(
                        round,
                        Timer::SecAggStage,
                        ServerRound::new(
                            round,
                            setup,
                            now,
                            Duration::from_millis(sa.phase_timeout_ms),
                            deadline,
                            global.len(),
                            core.config.min_train_results,
                        ),
                    ))
                }
                Err(e) => {
                    core.events.push_back(Event::RoundStarted {
                        round,
                        selected: selected.len(),
                    });
                    let record = RoundRecord {
                        round,
                        selected: selected.len(),
                        results: 0,
                        failures: Vec::new(),
                        train_metrics: Metrics::new(),
                        evaluation: None,
                        aborted: Some(AbortReason::SecureAggregation(e.to_string())),
                        secagg: None,
                        privacy: None,
                        asynchronous: None,
                    };
                    self.end_round(core, now, record);
                    return;
                }
            }
        }
        let setup = secagg.as_ref().map(|s| s.server().setup().clone());
        for (id, config) in configs {
            core.transmits.push_back((
                id,
                Message::Train(TrainIns {
                    round,
                    config,
                    deadline_ms: core.config.round_timeout.as_millis() as u64,
                    model: global.clone(),
                    secagg: setup.clone(),
                }),
            ));
        }
        core.events.push_back(Event::RoundStarted {
            round,
            selected: selected.len(),
        });
        self.enter(
            core,
            Phase::Train(TrainPhase {
                round,
                pending: selected.clone(),
                selected,
                results: Vec::new(),
                failures: Vec::new(),
                secagg,
                target,
            }),
        );
        core.timers.set(Timer::Train, deadline);
        if let Phase::Train(t) = &mut self.phase
            && let Some(cohort) = &mut t.secagg
        {
            core.timers
                .set_or_stop(Timer::SecAggStage, cohort.server().deadline());
        }
        if let Phase::Train(t) = &self.phase
            && t.selected.len() < core.config.min_train_results
        {
            self.close_train(core, now);
        }
    }

    fn on_train_result(
        &mut self,
        core: &mut Core,
        now: Instant,
        from: &ClientId,
        r: TrainRes,
    ) -> Result<(), Error> {
        let (current, global) = match (&mut self.phase, &core.global) {
            (Phase::Train(t), Some(g)) => (t, g),
            _ => return core.late_or_invalid(from, r.round, "TrainResult"),
        };
        if r.round != current.round {
            return core.late_or_invalid(from, r.round, "TrainResult");
        }
        if current.secagg.is_some() {
            return Err(Error::InvalidMessage(InvalidMessage::WrongMode(
                "a plain training result in a secure-aggregation round".into(),
            )));
        }
        if !current.selected.contains(from) {
            return Err(Error::InvalidMessage(InvalidMessage::NotSampled {
                round: r.round,
            }));
        }
        if !current.pending.contains(from) {
            // A duplicate (or a result after the client already failed): ignore it.
            core.events.push_back(Event::LateMessage {
                client: from.clone(),
                round: r.round,
            });
            return Ok(());
        }
        core.check_train_result(&r, global.manifest())?;
        current.pending.remove(from);
        current.results.push(ClientUpdate {
            client: from.clone(),
            num_examples: r.num_examples,
            metrics: r.metrics,
            params: r.params,
        });
        let done = current.pending.is_empty() || current.results.len() >= current.target;
        core.registry.met_deadline(from);
        if done {
            self.close_train(core, now);
        }
        Ok(())
    }

    fn on_evaluate_result(
        &mut self,
        core: &mut Core,
        now: Instant,
        from: &ClientId,
        r: EvaluateRes,
    ) -> Result<(), Error> {
        let Phase::Evaluate(e) = &mut self.phase else {
            return core.late_or_invalid(from, r.round, "EvaluateResult");
        };
        if r.round != e.record.round {
            return core.late_or_invalid(from, r.round, "EvaluateResult");
        }
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

    /// Routes a SecAgg message to the open round's cohort.
    fn on_secagg(
        &mut self,
        core: &mut Core,
        now: Instant,
        from: &ClientId,
        msg: Message,
    ) -> Result<(), Error> {
        let round = msg.secagg_round().unwrap_or(0);
        match &mut self.phase {
            Phase::Train(t) if t.round == round => match &mut t.secagg {
                Some(cohort) => cohort.on_message(core, now, from, msg)?,
                None => {
                    return Err(Error::InvalidMessage(InvalidMessage::WrongMode(format!(
                        "{} in a round without secure aggregation",
                        msg.kind()
                    ))));
                }
            },
            _ => return core.late_or_invalid(from, round, msg.kind()),
        }
        self.pump_cohort(core, now);
        Ok(())
    }

    /// Records that `client` will not contribute to the current phase, and moves the phase on
    /// if that settles it.
    fn on_failure(
        &mut self,
        core: &mut Core,
        now: Instant,
        client: &ClientId,
        reason: FailureReason,
    ) {
        match &mut self.phase {
            Phase::Train(t) if t.secagg.is_some() => {
                if let Some(cohort) = &mut t.secagg {
                    cohort.on_failure(now, client, reason);
                }
                self.pump_cohort(core, now);
            }
            Phase::Train(t) => {
                if t.pending.remove(client) {
                    t.failures.push(Failure {
                        client: client.clone(),
                        reason,
                    });
                    let possible = t.results.len() + t.pending.len();
                    if t.pending.is_empty() || possible < core.config.min_train_results {
                        self.close_train(core, now);
                    }
                }
            }
            Phase::Evaluate(e) => {
                if e.pending.remove(client) {
                    e.failures.push(Failure {
                        client: client.clone(),
                        reason,
                    });
                    if e.pending.is_empty() {
                        self.close_eval(core, now);
                    }
                }
            }
            Phase::Waiting => {}
        }
    }

    /// A named timer fired. The engine's timers are stopped whenever its phase changes, so
    /// each belongs to the current phase; the match still checks, and ignores what does not
    /// fit.
    fn on_timer(&mut self, core: &mut Core, now: Instant, timer: Timer) {
        match (timer, &mut self.phase) {
            // A secure round's deadlines are its stages' (the round deadline caps them).
            (Timer::Train | Timer::SecAggStage, Phase::Train(t)) if t.secagg.is_some() => {
                if let Some(cohort) = &mut t.secagg {
                    cohort.on_timeout(now);
                }
                self.pump_cohort(core, now);
            }
            (Timer::Train, Phase::Train(t)) => {
                let missed: Vec<ClientId> = std::mem::take(&mut t.pending).into_iter().collect();
                for id in &missed {
                    t.failures.push(Failure {
                        client: id.clone(),
                        reason: FailureReason::Timeout,
                    });
                }
                core.note_missed_deadlines(now, &missed);
                self.close_train(core, now);
            }
            (Timer::Evaluate, Phase::Evaluate(e)) => {
                for id in std::mem::take(&mut e.pending) {
                    e.failures.push(Failure {
                        client: id,
                        reason: FailureReason::Timeout,
                    });
                }
                self.close_eval(core, now);
            }
            _ => {}
        }
    }

    fn on_job_result(&mut self, core: &mut Core, now: Instant, round: u64, output: Output) {
        match output {
            Output::Unmask(sum) => {
                if let Phase::Train(t) = &mut self.phase
                    && t.round == round
                    && let Some(cohort) = &mut t.secagg
                {
                    cohort.on_unmask_result(sum);
                    self.pump_cohort(core, now);
                }
            }
            // Not a coordinator's job (its id could not have matched).
            Output::Mask(_) => {}
        }
    }
}

impl SyncEngine {
    /// Moves to `phase`, stopping the old phase's timers; returns the old phase.
    fn enter(&mut self, core: &mut Core, phase: Phase) -> Phase {
        for t in [Timer::Train, Timer::SecAggStage, Timer::Evaluate] {
            core.timers.stop(&t);
        }
        std::mem::replace(&mut self.phase, phase)
    }

    /// Moves what the round's cohort queued into the core, and closes the round once the
    /// cohort has its outcome.
    fn pump_cohort(&mut self, core: &mut Core, now: Instant) {
        let Phase::Train(t) = &mut self.phase else {
            return;
        };
        let Some(cohort) = &mut t.secagg else {
            return;
        };
        if let Some(outcome) = cohort.pump(core) {
            self.close_secure_train(core, now, outcome);
        }
    }

    fn close_secure_train(
        &mut self,
        core: &mut Core,
        now: Instant,
        outcome: Result<Unmasked, AbortReason>,
    ) {
        let Phase::Train(t) = self.enter(core, Phase::Waiting) else {
            return;
        };
        let Some(cohort) = t.secagg else {
            return;
        };
        let mut record = RoundRecord {
            round: t.round,
            selected: t.selected.len(),
            results: 0,
            failures: cohort.failures(),
            train_metrics: Metrics::new(),
            evaluation: None,
            aborted: None,
            secagg: Some(cohort.server().stats().clone()),
            privacy: None,
            asynchronous: None,
        };
        let unmasked = match outcome {
            Ok(u) => u,
            Err(reason) => {
                record.aborted = Some(reason);
                self.end_round(core, now, record);
                return;
            }
        };
        record.results = unmasked.contributors.len();
        record.train_metrics = mean_metrics(&unmasked.metrics);
        let outcome = match &core.global {
            Some(g) => cohort.decode(g, &unmasked).and_then(|ws| {
                core.strategy
                    .aggregate_train(t.round, g, TrainResults::Sum(&ws), &record.failures)
            }),
            None => Err(Error::Config("no global model".into())),
        };
        core.last_unmasked = Some(unmasked.sum);
        self.apply_aggregate(core, now, record, outcome);
    }

    fn close_train(&mut self, core: &mut Core, now: Instant) {
        let Phase::Train(t) = self.enter(core, Phase::Waiting) else {
            return;
        };
        // Tell clients still working that the round is over.
        for id in &t.pending {
            core.transmits.push_back((
                id.clone(),
                Message::Abort {
                    round: Some(t.round),
                    reason: AbortReason::Other("round closed".into()),
                },
            ));
        }
        let mut failures = t.failures;
        // Closed early because enough results are in: the over-selected rest did not fail.
        if t.results.len() < t.target {
            failures.extend(t.pending.iter().map(|id| Failure {
                client: id.clone(),
                reason: FailureReason::Timeout,
            }));
        }
        let mut record = RoundRecord {
            round: t.round,
            selected: t.selected.len(),
            results: t.results.len(),
            failures,
            train_metrics: weighted_train_metrics(&t.results),
            evaluation: None,
            aborted: None,
            secagg: None,
            privacy: None,
            asynchronous: None,
        };
        if t.results.len() < core.config.min_train_results {
            let reason = AbortReason::TooFewClients {
                available: t.results.len() as u64,
                required: core.config.min_train_results as u64,
            };
            for id in &t.selected {
                if t.results.iter().any(|u| &u.client == id) {
                    core.transmits.push_back((
                        id.clone(),
                        Message::Abort {
                            round: Some(t.round),
                            reason: reason.clone(),
                        },
                    ));
                }
            }
            record.aborted = Some(reason);
            self.end_round(core, now, record);
            return;
        }
        let outcome = match &core.global {
            Some(g) => core.strategy.aggregate_train(
                t.round,
                g,
                TrainResults::Individual(&t.results),
                &record.failures,
            ),
            None => Err(Error::Config("no global model".into())),
        };
        self.apply_aggregate(core, now, record, outcome);
    }

    /// Installs the strategy's new model (if sane) and moves on to evaluation.
    fn apply_aggregate(
        &mut self,
        core: &mut Core,
        now: Instant,
        mut record: RoundRecord,
        outcome: Result<Option<crate::Params>, Error>,
    ) {
        match core.install(outcome) {
            Ok(()) => self.start_eval(core, now, record),
            Err(reason) => {
                record.aborted = Some(reason);
                self.end_round(core, now, record);
            }
        }
    }

    fn start_eval(&mut self, core: &mut Core, now: Instant, record: RoundRecord) {
        let round = record.round;
        let due =
            core.config.evaluate_every > 0 && round.is_multiple_of(core.config.evaluate_every);
        let Some(global) = core.global.clone().filter(|_| due) else {
            self.end_round(core, now, record);
            return;
        };
        // Clients that just timed out or went away in training are not asked to evaluate
        // (a dead client would hold the evaluation until its deadline).
        let gone: BTreeSet<&ClientId> = record
            .failures
            .iter()
            .filter(|f| {
                matches!(
                    f.reason,
                    FailureReason::Timeout | FailureReason::Disconnected
                )
            })
            .map(|f| &f.client)
            .collect();
        let infos: Vec<ClientInfo> = core
            .eligible_infos(now, false)
            .into_iter()
            .filter(|i| !gone.contains(&i.id))
            .collect();
        let mut rng = core.rng_for(round, 1);
        let chosen: BTreeSet<ClientId> = core
            .strategy
            .configure_evaluate(round, &infos, &mut rng)
            .into_iter()
            .filter(|id| core.registry.contains(id))
            .collect();
        if chosen.is_empty() {
            self.end_round(core, now, record);
            return;
        }
        for id in &chosen {
            core.transmits.push_back((
                id.clone(),
                Message::Evaluate(EvaluateIns {
                    round,
                    deadline_ms: core.config.round_timeout.as_millis() as u64,
                    model: global.clone(),
                }),
            ));
        }
        self.enter(
            core,
            Phase::Evaluate(EvalPhase {
                record,
                pending: chosen,
                results: Vec::new(),
                failures: Vec::new(),
            }),
        );
        core.timers
            .set(Timer::Evaluate, now + core.config.round_timeout);
    }

    fn close_eval(&mut self, core: &mut Core, now: Instant) {
        let Phase::Evaluate(e) = self.enter(core, Phase::Waiting) else {
            return;
        };
        let mut record = e.record;
        record.evaluation = core
            .strategy
            .aggregate_evaluate(record.round, &e.results, &e.failures);
        self.end_round(core, now, record);
    }

    /// Records the round; the next one starts once it is persisted (at once if there is
    /// nothing to persist).
    fn end_round(&mut self, core: &mut Core, now: Instant, record: RoundRecord) {
        self.enter(core, Phase::Waiting);
        if core.record_round(record) {
            self.dispatch(core, now);
        }
    }
}

/// Unweighted means of the clients' metrics (secure rounds hide the example counts).
fn mean_metrics(all: &[Metrics]) -> Metrics {
    crate::strategy::weighted_metrics(all.iter().map(|m| (1.0, m)))
}
