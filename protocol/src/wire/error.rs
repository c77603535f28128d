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
    InvalidMessage(String),
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
    SecAgg(String),
    /// An operation on a client the machine does not know.
    #[error("unknown client {0:?}")]
    UnknownClient(ClientId),
}

impl From<flotilla_crypto::Error> for Error {
    fn from(e: flotilla_crypto::Error) -> Self {
        Error::SecAgg(e.to_string())
    }
}
