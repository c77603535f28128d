//! Reading and writing [`Message`]s on quinn streams (feature `quic`).
//!
//! One message per unidirectional stream: header and control body, then the tensor payload
//! in chunks, then FIN. The reader applies the [`Limits`], checks the payload's manifest
//! against the one it expects *before* allocating, and requires the stream to end exactly
//! where the message does. Messages to one peer are written one after another and read one
//! after another (streams are accepted in the order they were opened), so a peer sees them
//! in the order they were sent.

use crate::Error;
use crate::wire::codec::{self, DEFAULT_CHUNK_BYTES, Decoded, FrameHeader, HEADER_LEN, Limits};
use crate::wire::messages::Message;
use crate::wire::params::Manifest;

/// QUIC transport settings for Flotilla: windows sized for multi-megabyte models (16 MiB per
/// stream, 64 MiB per connection), keep-alive every 5 s, idle timeout 60 s, uni streams only.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(8u32.into());
    t.max_concurrent_bidi_streams(0u32.into());
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    t.keep_alive_interval(Some(std::time::Duration::from_secs(5)));
    if let Ok(idle) = std::time::Duration::from_secs(60).try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// Application close codes (QUIC `CONNECTION_CLOSE` error codes), so that a peer can tell
/// *why* it was closed without parsing the reason text.
pub mod close {
    /// Normal end.
    pub const DONE: u32 = 0;
    /// The certificate names no usable client id.
    pub const BAD_IDENTITY: u32 = 1;
    /// Another live connection holds this identity; this one is refused.
    pub const IDENTITY_IN_USE: u32 = 0x10;
    /// A newer connection with the same identity replaced this one.
    pub const REPLACED: u32 = 0x11;
    /// Too many connections (in total or for this identity).
    pub const TOO_MANY_CONNECTIONS: u32 = 0x12;
    /// A read or send missed its deadline, or the peer could not keep up with its queue.
    pub const TOO_SLOW: u32 = 0x13;
    /// The peer broke the protocol (the Abort message says how).
    pub const PROTOCOL_VIOLATION: u32 = 0x14;
    /// The peer's certificate was revoked.
    pub const REVOKED: u32 = 0x15;
    /// No Hello before the deadline.
    pub const NO_HELLO: u32 = 0x16;
    /// The client's model is not the federation's (the Abort message names both); it should
    /// not retry until reconfigured.
    pub const WRONG_MODEL: u32 = 0x17;
}

/// Deadlines for moving one message: `base` plus the time the message's bytes take at
/// `min_bytes_per_sec`. A peer slower than that (or one that stops granting flow-control
/// credit) fails with [`Error::Timeout`] instead of holding a task forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoDeadline {
    /// Fixed allowance per message (latency, scheduling).
    pub base: std::time::Duration,
    /// Slowest transfer rate tolerated.
    pub min_bytes_per_sec: u64,
}

impl Default for IoDeadline {
    /// 10 s plus 64 KiB/s.
    fn default() -> Self {
        Self {
            base: std::time::Duration::from_secs(10),
            min_bytes_per_sec: 64 * 1024,
        }
    }
}

impl IoDeadline {
    /// Time allowed to move `bytes`.
    pub fn for_bytes(&self, bytes: u64) -> std::time::Duration {
        let rate = self.min_bytes_per_sec.max(1) as f64;
        self.base + std::time::Duration::from_secs_f64(bytes as f64 / rate)
    }
}

async fn within<T>(
    limit: std::time::Duration,
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| Error::Timeout {
            what,
            after_ms: limit.as_millis() as u64,
        })?
}

/// [`send_message`] within `deadline` (sized from the message's length).
pub async fn send_message_timed(
    conn: &quinn::Connection,
    msg: &Message,
    deadline: &IoDeadline,
) -> Result<u64, Error> {
    let len = msg.params().map_or(0, |p| p.len() as u64 * 4)
        + match msg {
            Message::MaskedInput(m) => m.values.len() as u64 * 4,
            _ => 0,
        };
    within(
        deadline.for_bytes(len),
        "sending a message",
        send_message(conn, msg),
    )
    .await
}

/// [`recv_message`] with deadlines: the header and control body within `deadline.base` plus
/// their length at the minimum rate, then the payload within the same rule for its length.
pub async fn recv_message_timed(
    s: &mut quinn::RecvStream,
    limits: &Limits,
    expect: Option<&Manifest>,
    deadline: &IoDeadline,
) -> Result<(Message, u64), Error> {
    recv_inner(s, limits, expect, Some(deadline), &|| {}).await
}

/// [`recv_message_timed`], calling `on_progress` whenever bytes arrive (so that a peer in
/// the middle of a long upload counts as alive).
pub async fn recv_message_observed(
    s: &mut quinn::RecvStream,
    limits: &Limits,
    expect: Option<&Manifest>,
    deadline: &IoDeadline,
    on_progress: &(dyn Fn() + Sync),
) -> Result<(Message, u64), Error> {
    recv_inner(s, limits, expect, Some(deadline), on_progress).await
}

fn transport<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Transport(format!("{what}: {e}"))
}

/// Writes `msg` on a new unidirectional stream of `conn` and finishes the stream. Returns the
/// bytes written.
pub async fn send_message(conn: &quinn::Connection, msg: &Message) -> Result<u64, Error> {
    let enc = codec::encode(msg)?;
    let mut s = conn
        .open_uni()
        .await
        .map_err(transport("opening a stream"))?;
    s.write_all(&enc.head).await.map_err(transport("writing"))?;
    for chunk in enc.payload_chunks(DEFAULT_CHUNK_BYTES) {
        s.write_all(&chunk).await.map_err(transport("writing"))?;
    }
    s.finish().map_err(transport("finishing a stream"))?;
    Ok(enc.wire_len())
}

async fn read_exact(
    s: &mut quinn::RecvStream,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), Error> {
    s.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(got) => Error::Truncated {
            what,
            needed: buf.len() as u64,
            got: got as u64,
        },
        quinn::ReadExactError::ReadError(e) => Error::Transport(format!("reading {what}: {e}")),
    })
}

/// Reads one message from a stream. `expect`: the manifest a model payload must have (the
/// server passes the global model's), checked before the payload buffer is allocated. Returns
/// the message and the bytes read.
pub async fn recv_message(
    s: &mut quinn::RecvStream,
    limits: &Limits,
    expect: Option<&Manifest>,
) -> Result<(Message, u64), Error> {
    recv_inner(s, limits, expect, None, &|| {}).await
}

async fn maybe_within<T>(
    deadline: Option<&IoDeadline>,
    bytes: u64,
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match deadline {
        Some(d) => within(d.for_bytes(bytes), what, f).await,
        None => f.await,
    }
}

async fn recv_inner(
    s: &mut quinn::RecvStream,
    limits: &Limits,
    expect: Option<&Manifest>,
    deadline: Option<&IoDeadline>,
    on_progress: &(dyn Fn() + Sync),
) -> Result<(Message, u64), Error> {
    let mut head = [0u8; HEADER_LEN];
    maybe_within(
        deadline,
        HEADER_LEN as u64,
        "reading a frame header",
        read_exact(s, &mut head, "frame header"),
    )
    .await?;
    let header = FrameHeader::parse(&head, limits)?;
    let mut body = vec![0u8; header.body_len as usize];
    maybe_within(
        deadline,
        body.len() as u64,
        "reading a control body",
        read_exact(s, &mut body, "control body"),
    )
    .await?;
    let mut total = (HEADER_LEN + body.len()) as u64;
    let msg = match codec::decode_control(&body, limits)? {
        Decoded::Complete(m) => m,
        Decoded::NeedsPayload(p) => {
            if let Some(m) = expect {
                p.check_expected(m)?;
            }
            let len = p.payload_len();
            total += len;
            let mut a = p.start()?;
            maybe_within(deadline, len, "reading a payload", async {
                while a.remaining() > 0 {
                    let max = (a.remaining() as usize).min(DEFAULT_CHUNK_BYTES);
                    match s
                        .read_chunk(max, true)
                        .await
                        .map_err(transport("reading payload"))?
                    {
                        Some(chunk) => {
                            on_progress();
                            a.push(&chunk.bytes)?
                        }
                        None => break, // finish() reports the shortfall
                    }
                }
                Ok(())
            })
            .await?;
            a.finish()?
        }
    };
    // The stream must end with the message.
    let end = maybe_within(deadline, 0, "reading the end of a stream", async {
        s.read_chunk(1, true).await.map_err(transport("reading"))
    })
    .await?;
    match end {
        None => Ok((msg, total)),
        Some(_) => Err(Error::TrailingBytes(1)),
    }
}
