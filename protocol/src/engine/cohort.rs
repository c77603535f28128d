//! Secure aggregation as a layer of the engines: a [`Cohort`] is one SecAgg+ instance over
//! the clients it was dispatched to. An engine routes the cohort's messages, failures, timer
//! and job results to it and gets back, once, the unmasked sum or why there is none.

use std::time::Instant;

use crate::Error;
use crate::job::Work;
use crate::secagg::{Handled, ServerRound, Unmasked};
use crate::strategy::{Failure, FailureReason, WeightedSum};
use crate::wire::messages::{AbortReason, ClientId, Message};
use crate::wire::params::Params;

use super::{Core, Event, Timer};

/// One SecAgg+ instance, keyed by the round (version) it was dispatched with.
#[derive(Debug)]
pub(crate) struct Cohort {
    round: u64,
    /// Its stage deadline's name in the timer table.
    timer: Timer,
    server: Box<ServerRound>,
}

impl Cohort {
    pub(crate) fn new(round: u64, timer: Timer, server: ServerRound) -> Self {
        Self {
            round,
            timer,
            server: Box::new(server),
        }
    }

    /// The instance itself (setup, statistics, failures).
    pub(crate) fn server(&self) -> &ServerRound {
        &self.server
    }

    /// A SecAgg message from `from`; `Ok` also for a late one (an event says so).
    pub(crate) fn on_message(
        &mut self,
        core: &mut Core,
        now: Instant,
        from: &ClientId,
        msg: Message,
    ) -> Result<(), Error> {
        if self.server.handle_message(now, from, msg)? == Handled::Late {
            core.events.push_back(Event::LateMessage {
                client: from.clone(),
                round: self.round,
            });
        }
        Ok(())
    }

    /// `client` will not contribute.
    pub(crate) fn on_failure(&mut self, now: Instant, client: &ClientId, reason: FailureReason) {
        self.server.handle_failure(now, client, reason);
    }

    /// A deadline passed.
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        self.server.handle_timeout(now);
    }

    /// The unmask job's result.
    pub(crate) fn on_unmask_result(&mut self, sum: Result<Vec<u32>, Error>) {
        self.server.handle_unmask_result(sum);
    }

    /// Moves what the instance queued into the core (messages, its stage deadline, the
    /// unmask job, a stage event) and returns its outcome once it has one.
    pub(crate) fn pump(&mut self, core: &mut Core) -> Option<Result<Unmasked, AbortReason>> {
        core.transmits.extend(self.server.drain_transmits());
        core.timers.set_or_stop(self.timer, self.server.deadline());
        if let Some(job) = self.server.take_job() {
            core.jobs.push(self.round, Work::Unmask(job));
        }
        if let Some(stage) = self.server.take_stage_change() {
            core.events.push_back(Event::SecureStage {
                round: self.round,
                stage,
            });
        }
        self.server.take_outcome()
    }

    /// The clients that did not contribute.
    pub(crate) fn failures(&self) -> Vec<Failure> {
        self.server.failures()
    }

    /// The weighted sum an unmasked result stands for, against the model `global`.
    pub(crate) fn decode(
        &self,
        global: &Params,
        unmasked: &Unmasked,
    ) -> Result<WeightedSum, Error> {
        crate::secagg::decode_sum(
            self.server.setup(),
            global,
            &unmasked.sum,
            unmasked.contributors.len(),
        )
    }
}
