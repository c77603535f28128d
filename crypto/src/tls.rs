//! rustls configurations for mutually authenticated TLS 1.3 (as QUIC requires), always with
//! the `ring` provider.
//!
//! The server *requires* a client certificate that chains to the federation CA and is not on
//! the CRL; the client requires the server's certificate to chain to the same CA and name the
//! server. Both sides offer the ALPN protocol [`ALPN`].

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::Error;
use crate::pki::Identity;

/// ALPN protocol id of Flotilla's wire protocol, version 1.
pub const ALPN: &[u8] = b"flotilla/1";

/// The ring crypto provider, shared.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, Error> {
    let mut store = RootCertStore::empty();
    for c in ca {
        store
            .add(c.clone())
            .map_err(|e| Error::Certificate(format!("bad CA certificate: {e}")))?;
    }
    if store.is_empty() {
        return Err(Error::Certificate("no CA certificate".into()));
    }
    Ok(Arc::new(store))
}

fn tls_err(what: &'static str) -> impl FnOnce(rustls::Error) -> Error {
    move |e| Error::Certificate(format!("{what}: {e}"))
}

/// The verifier the server uses for client certificates: chained to `ca`, not revoked by any
/// of `crls`, within its validity. Exposed so that tests can check it directly.
pub fn client_verifier(
    ca: &[CertificateDer<'static>],
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, Error> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider());
    if !crls.is_empty() {
        // Our CA issues leaf certificates directly, so the leaf is what may be revoked; a
        // certificate the CRL does not mention is good.
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    builder
        .build()
        .map_err(|e| Error::Certificate(format!("client verifier: {e}")))
}

/// Server TLS config: our identity, required client certificates.
pub fn server_config(
    identity: &Identity,
    ca: &[CertificateDer<'static>],
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<rustls::ServerConfig, Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS versions"))?
        .with_client_cert_verifier(client_verifier(ca, crls)?)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(tls_err("server certificate"))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Client TLS config: trust only the federation CA, present our certificate.
pub fn client_config(
    identity: &Identity,
    ca: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS versions"))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(tls_err("client certificate"))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CertificateAuthority, Identity, PkiDir, load_certs, load_crls};
    use rustls_pki_types::UnixTime;
    use time::{Duration, OffsetDateTime};

    #[test]
    fn verifier_accepts_good_and_refuses_revoked_foreign_and_expired() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("CA").unwrap();
        for id in ["good", "revoked"] {
            pki.issue_client(id).unwrap();
        }
        pki.revoke("revoked").unwrap();
        let ca = load_certs(&pki.ca_cert()).unwrap();
        let v = client_verifier(&ca, load_crls(&pki.crl()).unwrap()).unwrap();
        let now = UnixTime::now();
        let leaf = |id: &str| load_certs(&pki.client_cert(id)).unwrap().remove(0);

        v.verify_client_cert(&leaf("good"), &[], now).unwrap();
        let e = v
            .verify_client_cert(&leaf("revoked"), &[], now)
            .unwrap_err();
        assert!(e.to_string().to_lowercase().contains("revoked"), "{e}");

        let other = CertificateAuthority::generate("Other CA", 10).unwrap();
        let foreign = other.issue_client("good", 10).unwrap().cert_der().unwrap();
        assert!(v.verify_client_cert(&foreign, &[], now).is_err());

        let t = OffsetDateTime::now_utc();
        let expired = pki
            .ca()
            .unwrap()
            .issue_client_between("old", t - Duration::days(9), t - Duration::days(1))
            .unwrap();
        let e = v
            .verify_client_cert(&expired.cert_der().unwrap(), &[], now)
            .unwrap_err();
        assert!(e.to_string().to_lowercase().contains("expired"), "{e}");
    }

    #[test]
    fn configs_build() {
        let ca = CertificateAuthority::generate("CA", 10).unwrap();
        let server =
            Identity::from_issued(&ca.issue_server(&["localhost".into()], 1).unwrap()).unwrap();
        let client = Identity::from_issued(&ca.issue_client("c", 1).unwrap()).unwrap();
        let roots = vec![ca.cert_der().unwrap()];
        server_config(&server, &roots, vec![]).unwrap();
        client_config(&client, &roots).unwrap();
    }
}

/// Derives `N` bytes for `purpose` from the identity's private key (HKDF-SHA256); `None`
/// only if HKDF refuses the length (never for the lengths used here).
fn derive<const N: usize>(identity: &Identity, purpose: &[u8]) -> Option<[u8; N]> {
    use ring::hkdf;
    struct Len<const N: usize>;
    impl<const N: usize> hkdf::KeyType for Len<N> {
        fn len(&self) -> usize {
            N
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"flotilla quic endpoint v1")
        .extract(identity.key.secret_der());
    let mut out = [0u8; N];
    prk.expand(&[purpose], Len::<N>).ok()?.fill(&mut out).ok()?;
    Some(out)
}

/// Random bytes, for the (unreachable) case where derivation fails: the endpoint then only
/// loses the fast reconnection after a restart.
fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut out = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut out)
        .map_err(|_| Error::Random)?;
    Ok(out)
}

/// The key a QUIC endpoint derives its stateless reset tokens from (RFC 9000 §10.3),
/// derived from the server's private key. A server restarted with the same key answers
/// packets of its predecessor's connections with a reset the clients accept, so they
/// reconnect at once instead of waiting for their idle timeout; nobody without the key can
/// forge one.
pub fn stateless_reset_key(identity: &Identity) -> Result<ring::hmac::Key, Error> {
    let bytes = match derive::<32>(identity, b"stateless reset") {
        Some(b) => b,
        None => random::<32>()?,
    };
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &bytes))
}

/// The key of quinn's hashed connection-ID generator, derived from the server's private key:
/// a restarted server recognises its predecessor's connection IDs as its own (so it answers
/// them with a stateless reset instead of dropping them as invalid).
pub fn connection_id_key(identity: &Identity) -> Result<u64, Error> {
    let bytes = match derive::<8>(identity, b"connection id") {
        Some(b) => b,
        None => random::<8>()?,
    };
    Ok(u64::from_le_bytes(bytes))
}
