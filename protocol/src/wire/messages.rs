//! The messages exchanged between the server and a client.
//!
//! A [`Message`] is what the round machines consume and produce. On the wire it is split by
//! [`crate::wire::codec`] into a small control frame (serde, compact binary, size-capped) and, for
//! the variants that carry a model, the raw little-endian `f32` values that follow it on the
//! same QUIC stream.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::wire::params::Params;

/// Version of the wire protocol spoken by this build. A peer with another version is refused
/// at the hello.
///
/// 3: SecAgg+ masks are AES-256-CTR keystreams (2 used ChaCha20: the sums of mixed peers
/// would be garbage, so they must not meet).
pub const PROTOCOL_VERSION: u16 = 3;

/// Identity of a client. On the network it is taken from the client's certificate, never from
/// a message.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId(pub Arc<str>);

impl ClientId {
    /// A client id from a string.
    pub fn new(s: impl AsRef<str>) -> Self {
        Self(Arc::from(s.as_ref()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Named scalar metrics (loss, accuracy, ...), ordered for deterministic encoding.
pub type Metrics = BTreeMap<String, f64>;

/// What a client can do, sent in its hello.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Compute backend the client trains on (`cpu`, `ndarray`, `cuda`, ...).
    pub backend: String,
    /// Number of local training examples, if the client is willing to say.
    pub num_examples: Option<u64>,
    /// Whether the client implements secure aggregation.
    pub secure_aggregation: bool,
    /// Software version string of the client.
    pub software: String,
    /// The model this client trains, if it says: the server refuses a client whose model
    /// differs from the federation's at enrollment, and takes the initial model from a client
    /// only once enough clients agree on it.
    pub model: Option<ModelSummary>,
}

/// A model's identity as a client declares it: its manifest's digest (tensor names and
/// shapes, SHA-256; see [`Manifest::digest`](crate::wire::params::Manifest::digest)) and its sizes, for
/// messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModelSummary {
    /// SHA-256 of the manifest.
    pub digest: [u8; 32],
    /// Number of tensors.
    pub tensors: u32,
    /// Number of parameters.
    pub parameters: u64,
}

impl ModelSummary {
    /// The summary of `manifest`.
    pub fn of(manifest: &crate::wire::params::Manifest) -> Self {
        Self {
            digest: manifest.digest(),
            tensors: u32::try_from(manifest.tensors.len()).unwrap_or(u32::MAX),
            parameters: manifest.numel(),
        }
    }

    /// The digest's first 6 bytes in hex, enough to tell models apart in a log line.
    pub fn short_digest(&self) -> String {
        self.digest
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} tensors, {} parameters, manifest {}",
            self.tensors,
            self.parameters,
            self.short_digest()
        )
    }
}

/// First message from a client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Wire protocol version the client speaks.
    pub protocol_version: u16,
    /// What the client can do.
    pub capabilities: Capabilities,
}

/// The server's answer to a hello: the client is enrolled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The id the server knows this client by (from its certificate).
    pub client_id: ClientId,
    /// Heartbeat interval the client should keep, in milliseconds (at least 100 are kept).
    /// `0`: the server has no idle timeout and wants no heartbeats.
    pub heartbeat_ms: u64,
}

/// Local optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Optimizer {
    /// Stochastic gradient descent with optional momentum (0 = none).
    Sgd {
        /// Momentum factor.
        momentum: f64,
    },
    /// Adam.
    Adam {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Numerical stabilizer.
        epsilon: f64,
    },
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer::Sgd { momentum: 0.0 }
    }
}

/// Local batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchSize {
    /// Fixed mini-batch size.
    Fixed(u32),
    /// Full batch: the whole local data set at once (McMahan et al.'s B = ∞).
    Full,
}

impl Default for BatchSize {
    fn default() -> Self {
        BatchSize::Fixed(10)
    }
}

/// How a client should train in one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Local epochs (E).
    pub epochs: u32,
    /// Local batch size (B).
    pub batch_size: BatchSize,
    /// Learning rate at the start of local training.
    pub learning_rate: f64,
    /// Multiplicative learning-rate decay applied per round (1.0 = none).
    pub lr_decay: f64,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// FedProx proximal term mu (0 = plain FedAvg local training).
    pub proximal_mu: f64,
    /// Seed for shuffling and any other local randomness.
    pub seed: u64,
    /// Client-side differential privacy for this round (clip and noise), if on.
    pub dp: Option<crate::wire::config::ClientDp>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: BatchSize::default(),
            learning_rate: 0.05,
            lr_decay: 1.0,
            optimizer: Optimizer::default(),
            proximal_mu: 0.0,
            seed: 0,
            dp: None,
        }
    }
}

/// Train instructions for one client in one round.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainIns {
    /// Round number (1-based).
    pub round: u64,
    /// Local training configuration.
    pub config: TrainConfig,
    /// Time the client has, from receipt, before the server stops waiting (milliseconds).
    pub deadline_ms: u64,
    /// The global model to start from.
    pub model: Params,
    /// Secure-aggregation parameters of this round; `None` for a plain round.
    pub secagg: Option<crate::wire::config::SecAggSetup>,
}

/// A client's result of local training.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainRes {
    /// Round the update belongs to.
    pub round: u64,
    /// Number of local examples trained on (the FedAvg weight).
    pub num_examples: u64,
    /// Local metrics (training loss, ...).
    pub metrics: Metrics,
    /// The locally trained model.
    pub params: Params,
}

/// Evaluate instructions.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluateIns {
    /// Round number.
    pub round: u64,
    /// Time the client has, from receipt (milliseconds).
    pub deadline_ms: u64,
    /// The model to evaluate.
    pub model: Params,
}

/// A client's evaluation result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvaluateRes {
    /// Round the result belongs to.
    pub round: u64,
    /// Number of local examples evaluated.
    pub num_examples: u64,
    /// Mean loss over those examples.
    pub loss: f64,
    /// Other metrics (accuracy, ...).
    pub metrics: Metrics,
}

/// Why a round or a session was aborted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AbortReason {
    /// Fewer clients remained than the round needs.
    TooFewClients {
        /// Clients that could still contribute.
        available: u64,
        /// Clients the round needs.
        required: u64,
    },
    /// The client broke the protocol and is dropped.
    ProtocolViolation(String),
    /// The server is shutting down.
    ServerShutdown,
    /// The federation finished all its rounds.
    Finished,
    /// Anything else, in words.
    Other(String),
    /// Secure aggregation could not complete (too many dropouts, a failed check); nothing
    /// about any update was revealed.
    SecureAggregation(String),
    /// The client's model is not the federation's: it is refused (and should not retry
    /// until it is reconfigured).
    ModelMismatch {
        /// The federation's model.
        expected: ModelSummary,
        /// The model the client declared (or sent).
        got: ModelSummary,
    },
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbortReason::TooFewClients {
                available,
                required,
            } => write!(
                f,
                "too few clients: {available} available, {required} required"
            ),
            AbortReason::ProtocolViolation(s) => write!(f, "protocol violation: {s}"),
            AbortReason::ServerShutdown => f.write_str("server shutting down"),
            AbortReason::Finished => f.write_str("federation finished"),
            AbortReason::Other(s) => f.write_str(s),
            AbortReason::SecureAggregation(s) => write!(f, "secure aggregation: {s}"),
            AbortReason::ModelMismatch { expected, got } => write!(
                f,
                "wrong model: the federation trains a model of {expected}; this client's has {got}"
            ),
        }
    }
}

/// Everything the server and a client say to each other.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// Client → server: first message on a connection.
    Hello(Hello),
    /// Server → client: enrolled.
    Welcome(Welcome),
    /// Server → client: send your initial parameters (when the server has no model yet).
    GetParams,
    /// Client → server: initial parameters.
    InitialParams(Params),
    /// Server → client: train.
    Train(TrainIns),
    /// Client → server: training result.
    TrainResult(TrainRes),
    /// Server → client: evaluate.
    Evaluate(EvaluateIns),
    /// Client → server: evaluation result.
    EvaluateResult(EvaluateRes),
    /// Either way: the round (or the whole session when `round` is `None`) is over.
    Abort {
        /// Round being aborted; `None` for the whole session.
        round: Option<u64>,
        /// Why.
        reason: AbortReason,
    },
    /// Either way: liveness.
    Heartbeat {
        /// Sender's counter.
        seq: u64,
    },
    /// Client → server, SecAgg phase 0: signed public keys.
    AdvertiseKeys(Advertisement),
    /// Server → client: the advertisements of the client's neighbours.
    NeighbourKeys {
        /// Round.
        round: u64,
        /// One per neighbour that advertised.
        adverts: Vec<Advertisement>,
    },
    /// Client → server, SecAgg phase 1: encrypted shares, one per neighbour (`peer` = to).
    ShareKeys {
        /// Round.
        round: u64,
        /// Sealed shares.
        shares: Vec<EncryptedShare>,
    },
    /// Server → client: the shares addressed to this client (`peer` = from).
    ForwardShares {
        /// Round.
        round: u64,
        /// Sealed shares.
        shares: Vec<EncryptedShare>,
    },
    /// Client → server, SecAgg phase 2: the masked, quantized, weighted update; the last word
    /// is the masked weight.
    MaskedInput(MaskedInput),
    /// Server → client, SecAgg phase 3a: the survivors; sign them if they look right.
    Survivors {
        /// Round.
        round: u64,
        /// Clients whose masked inputs are in the sum (sorted).
        survivors: Vec<ClientId>,
    },
    /// Client → server: signature over the survivor list.
    SurvivorsSigned {
        /// Round.
        round: u64,
        /// ECDSA signature of `survivors_bytes(round, survivors)`.
        signature: Vec<u8>,
    },
    /// Server → client, SecAgg phase 3b: reveal shares.
    Unmask(UnmaskRequest),
    /// Client → server: the revealed shares.
    UnmaskShares {
        /// Round.
        round: u64,
        /// Shares of survivors' self-mask seeds, by owner.
        self_mask: Vec<(ClientId, flotilla_crypto::secagg::shamir::Share)>,
        /// Shares of dropped clients' mask keys, by owner.
        keys: Vec<(ClientId, flotilla_crypto::secagg::shamir::Share)>,
    },
}

/// A client's signed key advertisement for one secure-aggregation round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Advertisement {
    /// Round.
    pub round: u64,
    /// The advertising client.
    pub client: ClientId,
    /// X25519 public key for share encryption.
    pub c_pk: [u8; 32],
    /// X25519 public key for pairwise masks.
    pub s_pk: [u8; 32],
    /// The client's certificate (DER), whose key made `signature`.
    pub certificate: Vec<u8>,
    /// ECDSA signature over round, id, model hash and both keys.
    pub signature: Vec<u8>,
}

/// A sealed pair of Shamir shares between two clients, relayed by the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// The other client (recipient when sent, sender when forwarded).
    pub peer: ClientId,
    /// ChaCha20-Poly1305 ciphertext.
    pub ciphertext: Vec<u8>,
}

/// A masked input.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskedInput {
    /// Round.
    pub round: u64,
    /// Local training metrics (in the clear, like the example count is not).
    pub metrics: Metrics,
    /// Masked words: one per parameter, then the weight.
    pub values: Vec<u32>,
}

/// The server's request to reveal shares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// Round.
    pub round: u64,
    /// Clients whose inputs are in the sum: reveal shares of their self-mask seeds.
    pub survivors: Vec<ClientId>,
    /// Clients that shared keys but sent no input: reveal shares of their mask keys.
    pub dropped: Vec<ClientId>,
    /// Survivor-list signatures of the recipient's neighbours.
    pub signatures: Vec<(ClientId, Vec<u8>)>,
}

impl Message {
    /// Short name of the variant, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::GetParams => "GetParams",
            Message::InitialParams(_) => "InitialParams",
            Message::Train(_) => "Train",
            Message::TrainResult(_) => "TrainResult",
            Message::Evaluate(_) => "Evaluate",
            Message::EvaluateResult(_) => "EvaluateResult",
            Message::Abort { .. } => "Abort",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::AdvertiseKeys(_) => "AdvertiseKeys",
            Message::NeighbourKeys { .. } => "NeighbourKeys",
            Message::ShareKeys { .. } => "ShareKeys",
            Message::ForwardShares { .. } => "ForwardShares",
            Message::MaskedInput(_) => "MaskedInput",
            Message::Survivors { .. } => "Survivors",
            Message::SurvivorsSigned { .. } => "SurvivorsSigned",
            Message::Unmask(_) => "Unmask",
            Message::UnmaskShares { .. } => "UnmaskShares",
        }
    }

    /// The round a SecAgg message belongs to.
    pub fn secagg_round(&self) -> Option<u64> {
        match self {
            Message::AdvertiseKeys(a) => Some(a.round),
            Message::MaskedInput(m) => Some(m.round),
            Message::Unmask(u) => Some(u.round),
            Message::NeighbourKeys { round, .. }
            | Message::ShareKeys { round, .. }
            | Message::ForwardShares { round, .. }
            | Message::Survivors { round, .. }
            | Message::SurvivorsSigned { round, .. }
            | Message::UnmaskShares { round, .. } => Some(*round),
            // Listed, not `_`: a new SecAgg message must not silently have no round.
            Message::Hello(_)
            | Message::Welcome(_)
            | Message::GetParams
            | Message::InitialParams(_)
            | Message::Train(_)
            | Message::TrainResult(_)
            | Message::Evaluate(_)
            | Message::EvaluateResult(_)
            | Message::Abort { .. }
            | Message::Heartbeat { .. } => None,
        }
    }

    /// The model this message carries, if any.
    pub fn params(&self) -> Option<&Params> {
        match self {
            Message::InitialParams(p) => Some(p),
            Message::Train(t) => Some(&t.model),
            Message::TrainResult(r) => Some(&r.params),
            Message::Evaluate(e) => Some(&e.model),
            // Listed, not `_`: a new message carrying a model must say so.
            Message::Hello(_)
            | Message::Welcome(_)
            | Message::GetParams
            | Message::EvaluateResult(_)
            | Message::Abort { .. }
            | Message::Heartbeat { .. }
            | Message::AdvertiseKeys(_)
            | Message::NeighbourKeys { .. }
            | Message::ShareKeys { .. }
            | Message::ForwardShares { .. }
            | Message::MaskedInput(_)
            | Message::Survivors { .. }
            | Message::SurvivorsSigned { .. }
            | Message::Unmask(_)
            | Message::UnmaskShares { .. } => None,
        }
    }
}
