//! Fuzzes every decoder of the wire format: the one-shot decoder and the incremental path a
//! driver uses (header, control body, payload fed in uneven chunks). Neither may panic, and
//! both must agree.
#![no_main]

use flotilla_protocol::wire::codec::{self, Decoded, FrameHeader, HEADER_LEN, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits so that the fuzzer explores the size checks instead of allocating.
    let limits = Limits {
        max_control_bytes: 64 * 1024,
        max_payload_bytes: 1 << 20,
        ..Limits::default()
    };
    let whole = codec::decode_from_slice(data, &limits);

    let incremental = (|| {
        let header = FrameHeader::parse(data, &limits)?;
        let end = HEADER_LEN + header.body_len as usize;
        let body = data.get(HEADER_LEN..end).ok_or(flotilla_protocol::Error::Truncated {
            what: "control body",
            needed: header.body_len as u64,
            got: 0,
        })?;
        let rest = data.get(end..).unwrap_or(&[]);
        match codec::decode_control(body, &limits)? {
            Decoded::Complete(m) if rest.is_empty() => Ok(m),
            Decoded::Complete(_) => Err(flotilla_protocol::Error::TrailingBytes(rest.len() as u64)),
            Decoded::NeedsPayload(p) => {
                if rest.len() as u64 != p.payload_len() {
                    return Err(flotilla_protocol::Error::PayloadLengthMismatch {
                        expected: p.payload_len(),
                        got: rest.len() as u64,
                    });
                }
                let mut a = p.start()?;
                let step = 1 + (data.first().copied().unwrap_or(0) as usize % 13);
                for chunk in rest.chunks(step) {
                    a.push(chunk)?;
                }
                a.finish()
            }
        }
    })();

    assert_eq!(whole.is_ok(), incremental.is_ok());
    if let (Ok(a), Ok(b)) = (&whole, &incremental) {
        // Compared through their encodings (a NaN metric makes `==` false).
        let ea = codec::encode_to_vec(a).ok();
        assert!(ea.is_some());
        assert_eq!(ea, codec::encode_to_vec(b).ok());
    }
});
