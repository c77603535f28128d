//! The per-round settings that travel on the wire with a `Train` message: differential privacy
//! and secure aggregation. Only the data is here; what they mean lives in [`crate::dp`] and
//! [`crate::secagg`].

use serde::{Deserialize, Serialize};

use crate::wire::messages::ClientId;

/// Client-side DP instructions sent with a round's training configuration.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientDp {
    /// L2 clip norm C of the update.
    pub clip: f64,
    /// Std of the Gaussian noise this client adds to each coordinate: σ·C/√m.
    pub noise_std: f64,
}

/// The parameters of one secure round, sent with `Train` and checked by every client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SecAggSetup {
    /// The sampled clients, sorted; a client's index here is its position in the round.
    pub participants: Vec<ClientId>,
    /// Neighbours per client `k` (even, or `n − 1`).
    pub neighbours: u32,
    /// Threshold `t`, in `(k/2, k]`.
    pub threshold: u32,
    /// Clipping range `c`.
    pub clip: f32,
    /// Quantization bits `b`.
    pub bits: u32,
    /// Weight cap `W`.
    pub max_weight: u64,
    /// Seed of the neighbour graph.
    pub graph_seed: u64,
}
