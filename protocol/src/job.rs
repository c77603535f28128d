//! Work a machine hands to its driver because it is too heavy for the event loop.
//!
//! Removing the masks of a secure round takes seconds at hundreds of clients (the
//! [`Coordinator`](crate::Coordinator)'s unmask job); masking an update takes tens of
//! milliseconds for a CNN (the [`Participant`](crate::Participant)'s mask job). Done inside
//! [`Coordinator::handle_message`](crate::Coordinator::handle_message), it stalled every
//! other client's I/O (heartbeats, uploads, new connections) for that long. Instead the
//! machine emits a [`Job`] ([`Coordinator::poll_job`](crate::Coordinator::poll_job)); the
//! driver runs it wherever it likes ([`Job::run`] is pure computation: a blocking thread in a
//! tokio driver, inline in the deterministic test harness) and hands back the [`JobResult`]
//! ([`Coordinator::handle_job_result`](crate::Coordinator::handle_job_result)). A result
//! whose round has ended meanwhile is ignored.

use crate::secagg::{MaskJob, UnmaskJob};
use crate::wire::Error;
use crate::wire::messages::MaskedInput;

/// A piece of heavy, pure computation a machine wants done. See the module docs.
#[derive(Debug)]
#[must_use = "a job must be run and its result handed back, or its round never ends"]
pub struct Job {
    pub(crate) id: u64,
    pub(crate) round: u64,
    pub(crate) work: Work,
}

#[derive(Debug)]
pub(crate) enum Work {
    Unmask(UnmaskJob),
    Mask(Box<MaskJob>),
}

impl Job {
    /// What the job does, for logs.
    pub fn kind(&self) -> &'static str {
        match self.work {
            Work::Unmask(_) => "unmask",
            Work::Mask(_) => "mask",
        }
    }

    /// The round it belongs to.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Does the work (on any thread; it may use all cores).
    pub fn run(self) -> JobResult {
        let output = match self.work {
            Work::Unmask(j) => Output::Unmask(j.run()),
            Work::Mask(j) => Output::Mask(j.run()),
        };
        JobResult {
            id: self.id,
            output,
        }
    }
}

/// The result of [`Job::run`], for the machine that emitted the job.
#[derive(Debug)]
pub struct JobResult {
    pub(crate) id: u64,
    pub(crate) output: Output,
}

#[derive(Debug)]
pub(crate) enum Output {
    Unmask(Result<Vec<u32>, Error>),
    Mask(Result<MaskedInput, Error>),
}

/// The jobs a machine has handed out, and the one whose result it waits for (at most one per
/// round is out at a time). Shared by the [`Coordinator`](crate::Coordinator) and the
/// [`Participant`](crate::Participant).
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    queue: std::collections::VecDeque<Job>,
    /// (id, round) of the job whose result is awaited.
    out: Option<(u64, u64)>,
    next: u64,
}

impl Jobs {
    /// Queues `work` for `round`; its result is now the one awaited.
    pub(crate) fn push(&mut self, round: u64, work: Work) {
        self.next += 1;
        self.out = Some((self.next, round));
        self.queue.push_back(Job {
            id: self.next,
            round,
            work,
        });
    }

    /// The next job for the driver.
    pub(crate) fn pop(&mut self) -> Option<Job> {
        self.queue.pop_front()
    }

    /// The round and output of `result` if it is the awaited one; `None` for a stale result.
    pub(crate) fn accept(&mut self, result: JobResult) -> Option<(u64, Output)> {
        match self.out {
            Some((id, round)) if id == result.id => {
                self.out = None;
                Some((round, result.output))
            }
            _ => None,
        }
    }
}
