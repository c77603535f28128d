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
//! * The client registry (enrolled clients, their idle queue, straggler records) and
//!   [`job`] (heavy work handed to the driver: unmasking, masking).
//! * [`Coordinator`] (server) and [`Participant`] (client): the round state machines, in
//!   quinn-proto's sans-IO style. Inputs are `handle_*(now, ...)`, outputs are
//!   `poll_transmit`, `poll_job`, `poll_event` and `poll_timeout`. Time is passed in, so the same machines
//!   run under a real driver (QUIC, tokio), in a simulation of thousands of clients, and in the
//!   deterministic [`harness`] that tests them on a simulated clock with injected faults.
//!
//! The drivers (in `flotilla-server` and `flotilla-client`) hold no round logic: they pump
//! bytes between the network and these machines and fire their timers.
//!
//! ## Pumping the machines by hand
//!
//! A driver's whole job, without the network (see `docs/architecture.md` for the contract):
//! route transmits both ways, run jobs, react to events, acknowledge persistence. One client
//! that adds 1 to every weight, one round:
//!
//! ```
//! use std::time::Instant;
//!
//! use flotilla_protocol::coordinator::Event;
//! use flotilla_protocol::wire::messages::{Capabilities, Metrics, TrainRes};
//! use flotilla_protocol::{
//!     ClientId, Coordinator, CoordinatorConfig, FedAvg, Manifest, Params, Participant,
//!     ParticipantEvent, TensorSpec,
//! };
//!
//! let model = Params::new(Manifest::new(vec![TensorSpec::new("w", &[4])]), vec![0.0; 4])?;
//! let config = CoordinatorConfig {
//!     num_rounds: 1,
//!     min_available_clients: 1,
//!     min_train_results: 1,
//!     evaluate_every: 0,
//!     ..CoordinatorConfig::default()
//! };
//! let mut fedavg = FedAvg::default();
//! fedavg.train_sampling.min_clients = 1;
//! let mut server = Coordinator::new(config, Box::new(fedavg), Some(model))?;
//! let mut client = Participant::new(Capabilities::default());
//! // On the network the id comes from the client's certificate, never from a message.
//! let id = ClientId::new("client-1");
//! let now = Instant::now(); // a driver passes a monotonic clock's time
//! server.handle_start(now);
//! client.connect(now);
//! for _ in 0..100 {
//!     if server.is_finished() {
//!         break;
//!     }
//!     while let Some(msg) = client.poll_transmit() {
//!         let _ = server.handle_message(now, &id, msg); // Err: the client was dropped
//!     }
//!     while let Some(job) = server.poll_job() {
//!         let result = job.run(); // a driver runs it on a blocking thread
//!         server.handle_job_result(now, result);
//!     }
//!     while let Some((to, msg)) = server.poll_transmit() {
//!         assert_eq!(to, id);
//!         client.handle_message(now, msg)?;
//!     }
//!     while let Some(job) = client.poll_job() {
//!         let result = job.run();
//!         client.handle_job_result(now, result);
//!     }
//!     while let Some(event) = client.poll_event() {
//!         if let ParticipantEvent::Train { round, model, .. } = event {
//!             let moved: Vec<f32> = model.values().iter().map(|w| w + 1.0).collect();
//!             let local = model.with_values(moved)?;
//!             let res = TrainRes { round, num_examples: 10, metrics: Metrics::new(), params: local };
//!             client.submit_train(res)?;
//!         }
//!     }
//!     while let Some(event) = server.poll_event() {
//!         if let Event::RoundCompleted(_) = event {
//!             // A driver writes `server.snapshot()` to disk first.
//!             server.handle_persisted(now);
//!         }
//!     }
//! }
//! assert!(server.is_finished());
//! assert_eq!(server.global().unwrap().values(), &[1.0; 4]);
//! # Ok::<(), flotilla_protocol::Error>(())
//! ```

#![deny(missing_docs)]
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
mod engine;
pub mod harness;
pub mod job;
pub mod participant;
pub mod provider;
#[cfg(feature = "quic")]
pub mod quic;
mod registry;
pub mod secagg;
pub mod strategy;
mod timer;
pub mod wire;

pub use coordinator::{Coordinator, CoordinatorConfig, Event, RoundRecord, Snapshot};
pub use job::{Job, JobResult};
pub use participant::{Participant, ParticipantEvent};
pub use provider::CryptoProvider;
pub use strategy::{FedAvg, Strategy};
pub use wire::messages::{ClientId, Message};
pub use wire::params::{Manifest, Params, TensorSpec};
pub use wire::{Error, InvalidMessage, SecAggError};
