//! Bounds on everything a peer puts in a control body.
//!
//! The control-body cap ([`Limits::max_control_bytes`]) bounds one message; these bounds stop
//! a peer from making the *receiver's state* grow: a metric map with thousands of names that
//! would be merged into every round record, a megabyte abort reason kept in the history, a
//! certificate blob stored per round. They are checked right after a control body decodes
//! ([`crate::wire::codec::decode_control`]), so every transport (QUIC, the in-memory harness) and
//! both sides enforce them, and a peer over any bound gets a typed
//! [`Error::LimitExceeded`] (the server drops it).
//!
//! The match below is exhaustive on purpose: a new message kind does not compile until it
//! says how its peer-supplied fields are bounded.

use crate::wire::codec::{Control, Limits};
use crate::wire::messages::{
    AbortReason, Advertisement, Capabilities, ClientId, EncryptedShare, Metrics,
};
use crate::wire::{Error, InvalidMessage};

/// Default cap on the number of metrics in one result.
pub const DEFAULT_MAX_METRICS: u32 = 32;
/// Default cap on a metric name, in bytes.
pub const DEFAULT_MAX_NAME_BYTES: u32 = 64;
/// Default cap on a free-text field (reasons, capability strings), in bytes.
pub const DEFAULT_MAX_TEXT_BYTES: u32 = 256;
/// Default cap on an opaque blob (a certificate in a key advertisement), in bytes.
pub const DEFAULT_MAX_BLOB_BYTES: u32 = 16 * 1024;
/// Cap on a client id (ids come from certificates, which bound them already; the same bound
/// applies to ids named in messages).
pub const MAX_CLIENT_ID_BYTES: u64 = 128;
/// Cap on a signature (ECDSA P-256 DER signatures are at most 72 bytes).
pub const MAX_SIGNATURE_BYTES: u64 = 512;

fn check(what: &'static str, len: usize, max: u64) -> Result<(), Error> {
    let len = len as u64;
    if len > max {
        return Err(Error::LimitExceeded { what, len, max });
    }
    Ok(())
}

/// Checks a metric map: at most `max_metrics` names of at most `max_name_bytes`, every value
/// finite.
pub fn check_metrics(m: &Metrics, limits: &Limits) -> Result<(), Error> {
    check("metric count", m.len(), limits.max_metrics.into())?;
    for (name, v) in m {
        check(
            "metric name bytes",
            name.len(),
            limits.max_name_bytes.into(),
        )?;
        if !v.is_finite() {
            return Err(Error::InvalidMessage(InvalidMessage::NonFinite(format!(
                "metric {name:?}"
            ))));
        }
    }
    Ok(())
}

fn check_reason(r: &AbortReason, limits: &Limits) -> Result<(), Error> {
    match r {
        AbortReason::ProtocolViolation(s)
        | AbortReason::Other(s)
        | AbortReason::SecureAggregation(s) => {
            check("reason bytes", s.len(), limits.max_text_bytes.into())
        }
        AbortReason::TooFewClients { .. }
        | AbortReason::ServerShutdown
        | AbortReason::Finished
        | AbortReason::ModelMismatch { .. } => Ok(()),
    }
}

fn check_id(id: &ClientId) -> Result<(), Error> {
    check("client id bytes", id.as_str().len(), MAX_CLIENT_ID_BYTES)
}

fn check_ids<'a>(ids: impl IntoIterator<Item = &'a ClientId>) -> Result<(), Error> {
    ids.into_iter().try_for_each(check_id)
}

fn check_capabilities(c: &Capabilities, limits: &Limits) -> Result<(), Error> {
    check(
        "backend name bytes",
        c.backend.len(),
        limits.max_text_bytes.into(),
    )?;
    check(
        "software name bytes",
        c.software.len(),
        limits.max_text_bytes.into(),
    )
}

fn check_advert(a: &Advertisement, limits: &Limits) -> Result<(), Error> {
    check_id(&a.client)?;
    check(
        "certificate bytes",
        a.certificate.len(),
        limits.max_blob_bytes.into(),
    )?;
    check("signature bytes", a.signature.len(), MAX_SIGNATURE_BYTES)
}

fn check_shares(shares: &[EncryptedShare], limits: &Limits) -> Result<(), Error> {
    for s in shares {
        check_id(&s.peer)?;
        check(
            "share ciphertext bytes",
            s.ciphertext.len(),
            limits.max_blob_bytes.into(),
        )?;
    }
    Ok(())
}

/// Checks every peer-supplied string, map and blob of a decoded control body.
pub fn check_control(c: &Control, limits: &Limits) -> Result<(), Error> {
    match c {
        Control::Hello(h) => check_capabilities(&h.capabilities, limits),
        Control::Welcome(w) => check_id(&w.client_id),
        Control::GetParams
        | Control::InitialParams { .. }
        | Control::Train { .. }
        | Control::Evaluate { .. }
        | Control::Heartbeat { .. } => Ok(()),
        Control::TrainResult { metrics, .. } | Control::MaskedInput { metrics, .. } => {
            check_metrics(metrics, limits)
        }
        Control::EvaluateResult(r) => {
            if !r.loss.is_finite() {
                return Err(Error::InvalidMessage(InvalidMessage::NonFinite(
                    "evaluation loss".into(),
                )));
            }
            check_metrics(&r.metrics, limits)
        }
        Control::Abort { reason, .. } => check_reason(reason, limits),
        Control::AdvertiseKeys(a) => check_advert(a, limits),
        Control::NeighbourKeys { adverts, .. } => {
            adverts.iter().try_for_each(|a| check_advert(a, limits))
        }
        Control::ShareKeys { shares, .. } | Control::ForwardShares { shares, .. } => {
            check_shares(shares, limits)
        }
        Control::Survivors { survivors, .. } => check_ids(survivors),
        Control::SurvivorsSigned { signature, .. } => {
            check("signature bytes", signature.len(), MAX_SIGNATURE_BYTES)
        }
        Control::Unmask(u) => {
            check_ids(u.survivors.iter().chain(&u.dropped))?;
            for (id, sig) in &u.signatures {
                check_id(id)?;
                check("signature bytes", sig.len(), MAX_SIGNATURE_BYTES)?;
            }
            Ok(())
        }
        Control::UnmaskShares {
            self_mask, keys, ..
        } => check_ids(self_mask.iter().chain(keys).map(|(id, _)| id)),
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary (for reasons we send or store).
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", s.get(..end).unwrap_or(""))
}

impl AbortReason {
    /// The same reason with its text cut to `max` bytes (what the encoder sends, so that an
    /// honest peer never trips the receiver's bound).
    pub fn truncated(&self, max: usize) -> AbortReason {
        match self {
            AbortReason::ProtocolViolation(s) => AbortReason::ProtocolViolation(truncate(s, max)),
            AbortReason::Other(s) => AbortReason::Other(truncate(s, max)),
            AbortReason::SecureAggregation(s) => AbortReason::SecureAggregation(truncate(s, max)),
            other => other.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries_and_the_cap() {
        let s = "é".repeat(200); // 400 bytes
        let t = truncate(&s, 256);
        assert!(t.len() <= 256, "{}", t.len());
        assert!(t.ends_with("..."));
        assert_eq!(truncate("short", 256), "short");
    }

    #[test]
    fn metric_bounds() {
        let l = Limits::default();
        let mut m = Metrics::new();
        for i in 0..DEFAULT_MAX_METRICS {
            m.insert(format!("m{i}"), 1.0);
        }
        assert_eq!(check_metrics(&m, &l), Ok(()));
        m.insert("one-too-many".into(), 1.0);
        assert_eq!(
            check_metrics(&m, &l),
            Err(Error::LimitExceeded {
                what: "metric count",
                len: 33,
                max: 32
            })
        );
        let mut m = Metrics::new();
        m.insert("x".repeat(65), 1.0);
        assert!(matches!(
            check_metrics(&m, &l),
            Err(Error::LimitExceeded {
                what: "metric name bytes",
                len: 65,
                max: 64
            })
        ));
        let mut m = Metrics::new();
        m.insert("loss".into(), f64::NAN);
        assert!(matches!(
            check_metrics(&m, &l),
            Err(Error::InvalidMessage(_))
        ));
    }
}
