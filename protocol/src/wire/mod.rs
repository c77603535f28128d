//! The ground floor: what is said between a server and a client, and how.
//!
//! * [`messages`]: the [`Message`](messages::Message) enum and its payloads.
//! * [`config`]: per-round settings carried by `Train` (DP, secure aggregation).
//! * [`params`]: a model as the server sees it, a flat `f32` vector with a
//!   [`Manifest`](params::Manifest) of named shapes.
//! * [`codec`]: versioned, length-prefixed frames; tensors checked against the manifest before
//!   anything is allocated.
//! * [`bounds`]: the limits every count, string and size from a peer is checked against.
//! * [`Error`]: the crate's error type.
//!
//! Nothing here imports anything above it in the crate.

pub mod bounds;
pub mod codec;
pub mod config;
mod error;
pub mod messages;
pub mod params;

pub use error::{Error, InvalidMessage, SecAggError};
