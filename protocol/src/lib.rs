//! # flotilla-protocol
//!
//! The language the Flotilla server and its clients speak, and the rules of a round, with no
//! I/O at all.
//!
//! * [`params`]: a model as the server sees it, a flat `f32` vector plus a [`Manifest`] of
//!   named shapes. The server is model-agnostic; only the client knows Burn.
//! * [`messages`]: what is said (hello, train instructions, updates, evaluation, abort,
//!   heartbeat).
//! * [`codec`]: how it is said. Versioned, length-prefixed control frames with a hard size cap,
//!   and tensors as raw little-endian chunks whose length is checked against the manifest
//!   before anything is allocated. Every decoder returns a typed [`Error`]; none panics
//!   (a `cargo fuzz` target in `fuzz/` holds it to that).
//! * [`Coordinator`] (server) and [`Participant`] (client): the round state machines, in
//!   quinn-proto's sans-IO style. Inputs are `handle_*(now, ...)`, outputs are
//!   `poll_transmit`, `poll_event` and `poll_timeout`. Time is passed in, so the same machines
//!   run under a real driver (QUIC, tokio), in a simulation of thousands of clients, and in the
//!   deterministic [`harness`] that tests them on a simulated clock with injected faults.
//! * [`strategy`]: the [`Strategy`] seam (who trains, how results are combined), with
//!   [`FedAvg`].
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

pub mod bounds;
#[cfg(feature = "cli")]
pub mod cli;
pub mod codec;
pub mod coordinator;
pub mod dp;
mod error;
pub mod harness;
pub mod messages;
pub mod params;
pub mod participant;
#[cfg(feature = "quic")]
pub mod quic;
pub mod secagg;
pub mod strategies;
pub mod strategy;

pub use coordinator::{Coordinator, CoordinatorConfig, Event, RoundRecord, Snapshot};
pub use error::Error;
pub use messages::{ClientId, Message};
pub use params::{Manifest, Params, TensorSpec};
pub use participant::{Participant, ParticipantEvent};
pub use strategy::{FedAvg, Strategy};
