//! Signatures of key advertisements with the client's certificate key (ECDSA P-256, which is
//! what the federation PKI issues), so that neighbours can check that an advertisement comes
//! from the client the certificate names and carries the model hash they saw too.

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
};
use rustls_pki_types::PrivateKeyDer;

use crate::Error;
use crate::pki::Identity;

/// Signs with a client's certificate key.
pub struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from a TLS identity's private key (PKCS#8 ECDSA P-256).
    pub fn from_identity(identity: &Identity) -> Result<Self, Error> {
        let PrivateKeyDer::Pkcs8(pkcs8) = &identity.key else {
            return Err(Error::SecAgg(
                "signing needs a PKCS#8 ECDSA P-256 key".into(),
            ));
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| Error::SecAgg(format!("unusable signing key: {e}")))?;
        Ok(Self { key, rng })
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        self.key
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| Error::SecAgg("signing failed".into()))
    }
}

/// Verifies `signature` over `message` with the public key in certificate `cert_der`.
pub fn verify(cert_der: &[u8], message: &[u8], signature: &[u8]) -> Result<(), Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| Error::Certificate(format!("unparsable certificate: {e}")))?;
    let public = cert.public_key().subject_public_key.data.as_ref();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, public)
        .verify(message, signature)
        .map_err(|_| Error::SecAgg("bad signature".into()))
}

/// Checks a neighbour's certificate the way the server checks a connecting client (chained
/// to the federation CA, within its validity, not revoked) and returns the client id it
/// names. Clients use it on the certificates the server forwards with key advertisements, so
/// a server cannot invent a neighbour.
#[derive(Clone)]
pub struct PeerVerifier {
    inner: std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerVerifier").finish_non_exhaustive()
    }
}

impl PeerVerifier {
    /// A verifier trusting `ca`, refusing what `crls` revoke.
    pub fn new(
        ca: &[rustls_pki_types::CertificateDer<'static>],
        crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
    ) -> Result<Self, Error> {
        Ok(Self {
            inner: crate::tls::client_verifier(ca, crls)?,
        })
    }

    /// Verifies `cert_der` now and returns the client id in it.
    pub fn verify(&self, cert_der: &[u8]) -> Result<String, Error> {
        let cert = rustls_pki_types::CertificateDer::from(cert_der.to_vec());
        self.inner
            .verify_client_cert(&cert, &[], rustls_pki_types::UnixTime::now())
            .map_err(|e| Error::Certificate(format!("neighbour certificate refused: {e}")))?;
        crate::pki::client_id_from_cert(cert_der)
    }
}

/// The bytes a client signs to vouch for the survivor list of a round (the consistency
/// check of Bonawitz et al.: every survivor must have been shown the same list before anyone
/// reveals a share).
pub fn survivors_bytes(round: u64, survivors: &[&str]) -> Vec<u8> {
    let mut m = Vec::with_capacity(48 + survivors.iter().map(|s| s.len() + 4).sum::<usize>());
    m.extend_from_slice(b"flotilla secagg survivors v1\0");
    m.extend_from_slice(&round.to_le_bytes());
    m.extend_from_slice(&(survivors.len() as u32).to_le_bytes());
    for s in survivors {
        m.extend_from_slice(&(s.len() as u32).to_le_bytes());
        m.extend_from_slice(s.as_bytes());
    }
    m
}

/// The bytes a key advertisement signs: a domain label, the round, the client id, the hash
/// of the global model the client received, and its two public keys, length-prefixed.
pub fn advertisement_bytes(
    round: u64,
    client_id: &str,
    model_hash: &[u8; 32],
    c_pk: &[u8; 32],
    s_pk: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + client_id.len() + 96);
    m.extend_from_slice(b"flotilla secagg advertisement v1\0");
    m.extend_from_slice(&round.to_le_bytes());
    m.extend_from_slice(&(client_id.len() as u32).to_le_bytes());
    m.extend_from_slice(client_id.as_bytes());
    m.extend_from_slice(model_hash);
    m.extend_from_slice(c_pk);
    m.extend_from_slice(s_pk);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CertificateAuthority;

    #[test]
    fn signatures_bind_the_advertisement_to_the_certificate() {
        let ca = CertificateAuthority::generate("CA", 1).unwrap();
        let alice = Identity::from_issued(&ca.issue_client("alice", 1).unwrap()).unwrap();
        let bob = Identity::from_issued(&ca.issue_client("bob", 1).unwrap()).unwrap();
        let msg = advertisement_bytes(3, "alice", &[1; 32], &[2; 32], &[3; 32]);
        let sig = Signer::from_identity(&alice).unwrap().sign(&msg).unwrap();
        verify(alice.leaf().unwrap(), &msg, &sig).unwrap();
        // Another certificate, another model hash, another round: all refused.
        assert!(verify(bob.leaf().unwrap(), &msg, &sig).is_err());
        let other_model = advertisement_bytes(3, "alice", &[9; 32], &[2; 32], &[3; 32]);
        assert!(verify(alice.leaf().unwrap(), &other_model, &sig).is_err());
        let other_round = advertisement_bytes(4, "alice", &[1; 32], &[2; 32], &[3; 32]);
        assert!(verify(alice.leaf().unwrap(), &other_round, &sig).is_err());
    }

    #[test]
    fn peer_verifier_names_the_client_and_refuses_foreign_certificates() {
        let ca = CertificateAuthority::generate("CA", 1).unwrap();
        let other = CertificateAuthority::generate("Other", 1).unwrap();
        let v = PeerVerifier::new(&[ca.cert_der().unwrap()], Vec::new()).unwrap();
        let alice = Identity::from_issued(&ca.issue_client("alice", 1).unwrap()).unwrap();
        assert_eq!(v.verify(alice.leaf().unwrap()).unwrap(), "alice");
        let mallory = Identity::from_issued(&other.issue_client("alice", 1).unwrap()).unwrap();
        assert!(v.verify(mallory.leaf().unwrap()).is_err());
        assert!(v.verify(b"not a certificate").is_err());
    }
}
