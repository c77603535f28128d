//! # flotilla-protocol
//!
//! The language the Flotilla server and its clients speak, and the rules of a round, with no
//! I/O at all.
//!
//! The folders, from the ground up (each imports only those above it in this list):
//!
//! * [`wire`]: what is said and how. [`wire::params`] (a model as the server sees it, a flat
//!   `f32` vector plus a [`Manifest`] of named shapes; the server is model-agnostic),
//!   [`wire::messages`], [`wire::config`] (per-round DP and SecAgg settings carried by `Train`),
//!   [`wire::codec`] (versioned, length-prefixed control frames with a hard size cap, tensors
//!   as raw little-endian chunks checked against the manifest before anything is allocated;
//!   every decoder returns a typed [`Error`], none panics, a `cargo fuzz` target holds it to
//!   that) and [`wire::bounds`].
//! * [`strategy`]: the [`Strategy`] seam (who trains, how results are combined), one file per
//!   family: FedAvg/FedAvgM/FedProx, FedOpt, q-FedAvg, the robust ones.
//! * [`dp`] and [`secagg`]: the layers a round uses, differential privacy and SecAgg+ (client
//!   side, server side, round setup and neighbour graph).
//! * [`Coordinator`] (server) and [`Participant`] (client): the round state machines, in
//!   quinn-proto's sans-IO style. Inputs are `handle_*(now, ...)`, outputs are
//!   `poll_transmit`, `poll_event` and `poll_timeout`. Time is passed in, so the same machines
//!   run under a real driver (QUIC, tokio), in a simulation of thousands of clients, and in the
//!   deterministic [`harness`] that tests them on a simulated clock with injected faults.
//!
//! The drivers (in `flotilla-server` and `flotilla-client`) hold no round logic: they pump
//! bytes between the network and these machines and fire their timers.

#![warn(missing_docs)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

#[cfg(feature = "cli")]
pub mod cli;
pub mod coordinator;
pub mod dp;
pub mod harness;
pub mod job;
pub mod participant;
#[cfg(feature = "quic")]
pub mod quic;
mod registry;
pub mod secagg;
pub mod strategy;
pub mod wire;

pub use coordinator::{Coordinator, CoordinatorConfig, Event, RoundRecord, Snapshot};
pub use job::{Job, JobResult};
pub use participant::{Participant, ParticipantEvent};
pub use strategy::{FedAvg, Strategy};
pub use wire::Error;
pub use wire::messages::{ClientId, Message};
pub use wire::params::{Manifest, Params, TensorSpec};
