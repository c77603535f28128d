//! # flotilla-sim
//!
//! A server and many clients in one process, over the same code paths as production.
//!
//! * [`federation`]: build a throwaway PKI, start a real server and real clients, each client
//!   with its own certificate and its own QUIC connection over loopback.
//! * [`quickstart`]: the README's first command: 10 clients, the bundled MNIST subset split IID,
//!   5 rounds of FedAvg, progress per round, `summary.json`.

#![deny(missing_docs)]

pub mod byzantine;
pub mod compare;
pub mod evaluation;
pub mod experiment;
pub mod federation;
pub mod gpucheck;
pub mod inmemory;
pub mod plot;
pub mod pool;
pub mod quickstart;
