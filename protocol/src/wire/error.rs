//! The crate's one error type.

use crate::wire::messages::ClientId;

/// Everything that can go wrong in the protocol crate: malformed bytes, invalid parameters,
/// and messages that break the round protocol. Every decoder returns one of these; none
/// panics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input ended before a complete item.
    #[error("truncated {what}: needed {needed} bytes, got {got}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        got: u64,
    },
    /// The frame does not start with the Flotilla magic.
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 2]),
    /// The peer speaks another frame version.
    #[error("unsupported wire version {got} (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version received.
        got: u8,
        /// Version supported.
        supported: u8,
    },
    /// A control body is larger than allowed.
    #[error("control frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Declared length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// A tensor payload is larger than allowed.
    #[error("tensor payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge {
        /// Declared length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// A tensor payload's length does not match its manifest.
    #[error("tensor payload is {got} bytes, the manifest says {expected}")]
    PayloadLengthMismatch {
        /// Bytes the manifest implies.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// Bytes after the end of a message.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(u64),
    /// The control body does not decode.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A manifest is invalid (duplicate names, overflow, ...).
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// A parameter vector's length does not match its manifest.
    #[error("parameter vector has {got} values, the manifest describes {expected}")]
    ShapeMismatch {
        /// Values the manifest describes.
        expected: u64,
        /// Values given.
        got: u64,
    },
    /// Parameters are for another model.
    #[error("parameters do not match the model's manifest")]
    ManifestMismatch,
    /// A NaN or infinity in parameters.
    #[error("non-finite value in tensor {tensor:?} at flat index {index}")]
    NonFinite {
        /// Tensor holding it.
        tensor: String,
        /// Flat index.
        index: u64,
    },
    /// A message that is not allowed in the current state.
    #[error("unexpected {kind} message from {from:?} in state {state}")]
    UnexpectedMessage {
        /// Message kind.
        kind: &'static str,
        /// Sender, if known.
        from: Option<ClientId>,
        /// State of the machine.
        state: &'static str,
    },
    /// A message that is allowed but wrong (round mismatch, zero examples, ...).
    #[error("invalid message: {0}")]
    InvalidMessage(InvalidMessage),
    /// The peer speaks another protocol version.
    #[error("protocol version {got} not supported (this build speaks {supported})")]
    ProtocolVersion {
        /// Version received.
        got: u16,
        /// Version supported.
        supported: u16,
    },
    /// A peer-supplied count or length is over its bound (see [`crate::wire::bounds`]).
    #[error("{what} is {len}, over the limit of {max}")]
    LimitExceeded {
        /// What was measured.
        what: &'static str,
        /// Its value.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A read or send missed its deadline.
    #[error("{what} timed out after {after_ms} ms")]
    Timeout {
        /// What was being done.
        what: &'static str,
        /// The deadline.
        after_ms: u64,
    },
    /// A misconfiguration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The transport failed (connection lost, stream reset, ...).
    #[error("transport: {0}")]
    Transport(String),
    /// A secure-aggregation check failed (bad signature, inconsistent shares, too many
    /// dropouts, ...).
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] SecAggError),
    /// An operation on a client the machine does not know.
    #[error("unknown client {0:?}")]
    UnknownClient(ClientId),
}

impl From<flotilla_crypto::Error> for Error {
    fn from(e: flotilla_crypto::Error) -> Self {
        Error::SecAgg(SecAggError::Crypto(e.to_string()))
    }
}

/// How a well-formed message is wrong, by kind. The text in a variant is for people; match
/// the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    /// A message for a round after the current one (earlier rounds' are late, not invalid).
    #[error("{kind} for round {round}, but the current round is {current}")]
    FutureRound {
        /// The message's kind.
        kind: &'static str,
        /// The round it names.
        round: u64,
        /// The current round.
        current: u64,
    },
    /// A result from a client that was not sampled for the round.
    #[error("training result for round {round} from a client that was not sampled")]
    NotSampled {
        /// The round.
        round: u64,
    },
    /// A plain message in a secure-aggregation round, or a secure one in a plain round.
    #[error("{0}")]
    WrongMode(String),
    /// A training result that claims no examples.
    #[error("training result with zero examples")]
    ZeroExamples,
    /// A metric or loss that is NaN or infinite (which one).
    #[error("{0} is not finite")]
    NonFinite(String),
    /// Initial parameters that are not the model the client declared.
    #[error("initial parameters ({0}) are not the model the client declared")]
    UndeclaredModel(String),
    /// A result for a task that is not open.
    #[error("{0}")]
    NoOpenTask(String),
    /// A metric that a strategy needs is missing or out of range.
    #[error("{0}")]
    BadMetric(String),
}

/// Why a secure-aggregation (SecAgg+) step failed, by kind: what a peer did wrong, or why the
/// round cannot complete. The text in each variant is for people; match the variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggError {
    /// The round's parameters cannot work (fewer than 2 clients, a weight bound that
    /// overflows the 32-bit sum, a threshold out of range, ...).
    #[error("invalid round parameters: {0}")]
    InvalidParameters(String),
    /// A client was asked to take part in secure aggregation without credentials for it.
    #[error("this client has no secure-aggregation credentials")]
    MissingCredentials,
    /// A message for a stage that is over or has not begun, or repeated.
    #[error("out of order: {0}")]
    OutOfOrder(String),
    /// A client that is not a participant (or not a neighbour) of this round.
    #[error("not a participant: {0}")]
    NotAParticipant(String),
    /// A key advertisement that is stale, repeated, oversized or in another client's name.
    #[error("bad key advertisement: {0}")]
    BadAdvertisement(String),
    /// A signature (of an advertisement or of the survivor list) that does not verify, or
    /// from someone who may not sign.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// A secret share that does not open, is for another point, is repeated, or goes to the
    /// wrong clients.
    #[error("bad share: {0}")]
    BadShare(String),
    /// A survivor list that is unsorted, leaves the client out, names strangers, differs
    /// from the one signed, or asks for both shares of one client.
    #[error("bad survivor list: {0}")]
    BadSurvivors(String),
    /// Fewer neighbours than the threshold took a step.
    #[error("only {have} neighbours {step}, {need} needed")]
    BelowThreshold {
        /// The step (`advertised keys`, `shared keys`, `survived`, `vouched for the survivor
        /// list`).
        step: &'static str,
        /// How many did.
        have: usize,
        /// The threshold.
        need: usize,
    },
    /// Too many clients dropped for the masks to be removed.
    #[error("too many dropouts: {0}")]
    TooManyDropouts(String),
    /// An input that cannot be aggregated (no weight, a non-finite metric, a sum of the wrong
    /// length, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A cryptographic primitive failed (key agreement, sealing, Shamir recovery).
    #[error("{0}")]
    Crypto(String),
    /// A broken internal invariant (a worker thread panicked, state missing that was there).
    #[error("internal error: {0}")]
    Internal(String),
}
