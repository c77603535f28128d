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
