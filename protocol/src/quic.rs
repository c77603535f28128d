//! Reading and writing [`Message`]s on quinn streams (feature `quic`).
//!
//! One message per unidirectional stream: header and control body, then the tensor payload
//! in chunks, then FIN. The reader applies the [`Limits`], checks the payload's manifest
//! against the one it expects *before* allocating, and requires the stream to end exactly
//! where the message does. Messages to one peer are written one after another and read one
//! after another (streams are accepted in the order they were opened), so a peer sees them
//! in the order they were sent.

use crate::Error;
use crate::codec::{self, DEFAULT_CHUNK_BYTES, Decoded, FrameHeader, HEADER_LEN, Limits};
use crate::messages::Message;
use crate::params::Manifest;

/// QUIC transport settings for Flotilla: windows sized for multi-megabyte models (16 MiB per
/// stream, 64 MiB per connection), keep-alive every 5 s, idle timeout 60 s, uni streams only.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(64u32.into());
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
    let mut head = [0u8; HEADER_LEN];
    read_exact(s, &mut head, "frame header").await?;
    let header = FrameHeader::parse(&head, limits)?;
    let mut body = vec![0u8; header.body_len as usize];
    read_exact(s, &mut body, "control body").await?;
    let mut total = (HEADER_LEN + body.len()) as u64;
    let msg = match codec::decode_control(&body, limits)? {
        Decoded::Complete(m) => m,
        Decoded::NeedsPayload(p) => {
            if let Some(m) = expect {
                p.check_expected(m)?;
            }
            total += p.payload_len();
            let mut a = p.start()?;
            while a.remaining() > 0 {
                let max = (a.remaining() as usize).min(DEFAULT_CHUNK_BYTES);
                match s
                    .read_chunk(max, true)
                    .await
                    .map_err(transport("reading payload"))?
                {
                    Some(chunk) => a.push(&chunk.bytes)?,
                    None => break, // finish() reports the shortfall
                }
            }
            a.finish()?
        }
    };
    // The stream must end with the message.
    match s.read_chunk(1, true).await.map_err(transport("reading"))? {
        None => Ok((msg, total)),
        Some(_) => Err(Error::TrailingBytes(1)),
    }
}
