//! The federation's public-key infrastructure.
//!
//! A federation has one CA. It issues the server a certificate (DNS/IP SANs) and each client
//! one whose subject common name and URI SAN (`urn:flotilla:client:<id>`) carry the client id.
//! A client *is* its certificate: the server takes the id from the verified certificate, never
//! from a message. Revoked clients are listed in a CRL signed by the CA, which the server's
//! TLS verifier consumes. Keys are ECDSA P-256 (ring signs and verifies them; the same key
//! signs secure-aggregation key advertisements).
//!
//! Files are PEM. Private keys are written with mode 0600, atomically (temporary file, fsync,
//! rename). [`PkiDir`] lays out a whole federation in one directory:
//!
//! ```text
//! ca.crt ca.key server.crt server.key crl.pem clients/<id>.crt clients/<id>.key
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::Error;

/// Prefix of the URI SAN that carries a client id.
pub const CLIENT_URI_PREFIX: &str = "urn:flotilla:client:";
/// Longest client id.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// Checks that a client id is 1–64 characters of `[A-Za-z0-9._-]`, so that it is safe as a
/// file name, in a certificate and in logs.
pub fn validate_client_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_CLIENT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidClientId(id.to_string()))
    }
}

fn rcgen_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::Certificate(format!("{what}: {e}"))
}

fn random_serial() -> Result<SerialNumber, Error> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::Random)?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and not starting with a zero byte
    Ok(SerialNumber::from_slice(&b))
}

/// A certificate and its private key, as PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM. Wiped from memory on drop.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl IssuedCert {
    /// Writes the certificate (mode 0644) and the key (mode 0600).
    pub fn save(&self, cert: &Path, key: &Path) -> Result<(), Error> {
        crate::fs::write_atomic(cert, self.cert_pem.as_bytes(), 0o644)?;
        crate::fs::write_atomic(key, self.key_pem.as_bytes(), 0o600)
    }

    /// The certificate as DER.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, Error> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| Error::Pem {
            path: PathBuf::from("<memory>"),
            reason: e.to_string(),
        })
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(path.to_path_buf())
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Reads every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let data = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::Pem {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE section".into(),
        });
    }
    Ok(certs)
}

/// Reads a private key from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let data = Zeroizing::new(read_file(path)?);
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| Error::Pem {
        path: path.to_path_buf(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY section".into(),
            other => other.to_string(),
        },
    })
}

/// Reads every CRL in a PEM file. A missing file is an error; an empty list is fine.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
    let data = read_file(path)?;
    CertificateRevocationListDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

fn parse_cert<'a>(der: &'a [u8]) -> Result<x509_parser::certificate::X509Certificate<'a>, Error> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| Error::Certificate(format!("unparsable certificate: {e}")))
}

/// The client id a certificate carries (its URI SAN `urn:flotilla:client:<id>`, or failing
/// that its subject common name), validated.
pub fn client_id_from_cert(der: &[u8]) -> Result<String, Error> {
    use x509_parser::extensions::GeneralName;
    let cert = parse_cert(der)?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && let Some(id) = uri.strip_prefix(CLIENT_URI_PREFIX)
            {
                validate_client_id(id)?;
                return Ok(id.to_string());
            }
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| Error::Certificate("certificate has no client id".into()))?;
    validate_client_id(cn)?;
    Ok(cn.to_string())
}

/// Serial number of a certificate (big-endian bytes).
pub fn serial_of(der: &[u8]) -> Result<Vec<u8>, Error> {
    Ok(parse_cert(der)?.tbs_certificate.raw_serial().to_vec())
}

/// Validity window of a certificate.
pub fn validity_of(der: &[u8]) -> Result<(OffsetDateTime, OffsetDateTime), Error> {
    let c = parse_cert(der)?;
    Ok((
        c.validity().not_before.to_datetime(),
        c.validity().not_after.to_datetime(),
    ))
}

/// A TLS identity: a certificate chain and the private key that goes with it.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Loads a certificate and key and checks that they belong together and that the
    /// certificate is valid now.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, Error> {
        let id = Self::load_for_device(cert, key)?;
        id.check_validity(OffsetDateTime::now_utc())?;
        Ok(id)
    }

    /// Loads a certificate and key for a device: checks that they belong together, but not
    /// the validity dates, since the device's own clock may be wrong (no RTC, NTP not synced
    /// yet). The caller checks [`Identity::check_validity`] and says what is wrong; the
    /// server's verdict is the one that counts.
    pub fn load_for_device(cert: &Path, key: &Path) -> Result<Self, Error> {
        let id = Self {
            cert_chain: load_certs(cert)?,
            key: load_key(key)?,
        };
        id.check_key_matches().map_err(|e| match e {
            Error::KeyMismatch { .. } => Error::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            },
            other => other,
        })?;
        Ok(id)
    }

    /// An identity from PEM strings (for in-process use).
    pub fn from_issued(issued: &IssuedCert) -> Result<Self, Error> {
        let mem = || PathBuf::from("<memory>");
        let cert_chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Pem {
                path: mem(),
                reason: e.to_string(),
            })?;
        let key =
            PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).map_err(|e| Error::Pem {
                path: mem(),
                reason: e.to_string(),
            })?;
        let id = Self { cert_chain, key };
        id.check_key_matches()?;
        Ok(id)
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> Result<&CertificateDer<'static>, Error> {
        self.cert_chain
            .first()
            .ok_or_else(|| Error::Certificate("empty certificate chain".into()))
    }

    /// Errors unless the key's public half is the one in the leaf certificate.
    pub fn check_key_matches(&self) -> Result<(), Error> {
        let leaf = self.leaf()?;
        let cert = parse_cert(leaf)?;
        let key = KeyPair::try_from(&self.key)
            .map_err(|e| Error::Certificate(format!("unusable private key: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw() {
            Ok(())
        } else {
            Err(Error::KeyMismatch {
                cert: PathBuf::from("<certificate>"),
                key: PathBuf::from("<key>"),
            })
        }
    }

    /// Errors if the leaf certificate is expired or not yet valid at `now`.
    pub fn check_validity(&self, now: OffsetDateTime) -> Result<(), Error> {
        let (not_before, not_after) = validity_of(self.leaf()?)?;
        if now > not_after {
            return Err(Error::Expired {
                not_after: not_after.to_string(),
            });
        }
        if now < not_before {
            return Err(Error::NotYetValid {
                not_before: not_before.to_string(),
            });
        }
        Ok(())
    }

    /// The client id in the leaf certificate.
    pub fn client_id(&self) -> Result<String, Error> {
        client_id_from_cert(self.leaf()?)
    }
}

/// The federation's certificate authority.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA named `name`, valid for `days` days.
    pub fn generate(name: &str, days: i64) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_err("CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Flotilla federation");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - DEFAULT_BACKDATE;
        params.not_after = now + Duration::days(days);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = false;
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("CA certificate"))?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, Error> {
        let cert_pem = String::from_utf8(read_file(cert)?).map_err(|_| Error::Pem {
            path: cert.to_path_buf(),
            reason: "not UTF-8".into(),
        })?;
        let key_pem =
            Zeroizing::new(String::from_utf8(read_file(key)?).map_err(|_| Error::Pem {
                path: key.to_path_buf(),
                reason: "not UTF-8".into(),
            })?);
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| Error::Pem {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
        let der = load_certs(cert)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Certificate("empty CA file".into()))?;
        let parsed = parse_cert(&der)?;
        if parsed.public_key().subject_public_key.data.as_ref() != key_pair.public_key_raw() {
            return Err(Error::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            });
        }
        let issuer =
            Issuer::from_ca_cert_der(&der, key_pair).map_err(rcgen_err("CA certificate"))?;
        Ok(Self { cert_pem, issuer })
    }

    /// Writes the CA certificate and key (key mode 0600).
    pub fn save(&self, cert: &Path, key: &Path) -> Result<(), Error> {
        crate::fs::write_atomic(cert, self.cert_pem.as_bytes(), 0o644)?;
        crate::fs::write_atomic(
            key,
            Zeroizing::new(self.issuer.key().serialize_pem()).as_bytes(),
            0o600,
        )
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, Error> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| Error::Pem {
            path: PathBuf::from("<CA>"),
            reason: e.to_string(),
        })
    }

    fn issue(&self, mut params: CertificateParams) -> Result<IssuedCert, Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_err("key"))?;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err("certificate"))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// A server certificate for these DNS names and IP addresses, valid for `days`.
    pub fn issue_server(&self, names: &[String], days: i64) -> Result<IssuedCert, Error> {
        if names.is_empty() {
            return Err(Error::Certificate(
                "a server certificate needs at least one DNS name or IP".into(),
            ));
        }
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(rcgen_err("server names"))?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - DEFAULT_BACKDATE;
        params.not_after = now + Duration::days(days);
        self.issue(params)
    }

    /// A client certificate for `id`, valid for `days`.
    pub fn issue_client(&self, id: &str, days: i64) -> Result<IssuedCert, Error> {
        let now = OffsetDateTime::now_utc();
        self.issue_client_between(id, now - DEFAULT_BACKDATE, now + Duration::days(days))
    }

    /// A client certificate for `id` with an explicit validity window (tests use it to make
    /// expired certificates).
    pub fn issue_client_between(
        &self,
        id: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, Error> {
        validate_client_id(id)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id);
        dn.push(DnType::OrganizationName, "Flotilla client");
        params.distinguished_name = dn;
        let uri = format!("{CLIENT_URI_PREFIX}{id}");
        params.subject_alt_names = vec![SanType::URI(
            uri.try_into().map_err(rcgen_err("client URI"))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        self.issue(params)
    }

    /// A CRL revoking the certificates with these serial numbers, numbered `crl_number`,
    /// valid for `days`.
    pub fn crl(
        &self,
        revoked_serials: &[Vec<u8>],
        crl_number: u64,
        days: i64,
    ) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(days),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked_serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|crl| crl.pem())
            .map_err(rcgen_err("CRL"))
    }
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Serial numbers listed in a CRL (PEM), and its CRL number.
pub fn crl_entries(pem: &[u8]) -> Result<(Vec<Vec<u8>>, u64), Error> {
    let mut serials = Vec::new();
    let mut number = 0;
    for der in CertificateRevocationListDer::pem_slice_iter(pem) {
        let der = der.map_err(|e| Error::Certificate(format!("CRL: {e}")))?;
        let (_, crl) = x509_parser::parse_x509_crl(&der)
            .map_err(|e| Error::Certificate(format!("unparsable CRL: {e}")))?;
        if let Some(n) = crl.crl_number() {
            number = number.max(u64::try_from(n).unwrap_or(u64::MAX));
        }
        serials.extend(
            crl.iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec()),
        );
    }
    Ok((serials, number))
}

/// A federation's PKI laid out in one directory (see the module docs).
#[derive(Clone, Debug)]
pub struct PkiDir {
    /// The directory.
    pub root: PathBuf,
    /// How far back new certificates are valid from (see [`DEFAULT_BACKDATE`]).
    pub backdate: Duration,
}

/// How far back certificates' `not_before` is set, so that a device whose clock is behind
/// (no RTC, no NTP yet) still accepts them: 24 hours by default.
pub const DEFAULT_BACKDATE: Duration = Duration::hours(24);

/// Default lifetime of the CA, in days.
pub const CA_DAYS: i64 = 3650;
/// Default lifetime of server and client certificates, in days.
pub const CERT_DAYS: i64 = 365;
/// Default lifetime of a CRL, in days.
pub const CRL_DAYS: i64 = 30;

impl PkiDir {
    /// A PKI directory at `root` (nothing is created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            backdate: DEFAULT_BACKDATE,
        }
    }

    /// The same directory, issuing certificates valid from `backdate` ago.
    pub fn with_backdate(mut self, backdate: Duration) -> Self {
        self.backdate = backdate;
        self
    }

    /// `issued/<id>.serials`: every serial ever issued to a client id, one hex line each.
    pub fn issued_serials(&self, id: &str) -> PathBuf {
        self.root.join("issued").join(format!("{id}.serials"))
    }
    /// `ca.crt`.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    /// `ca.key`.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// `server.crt`.
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("server.crt")
    }
    /// `server.key`.
    pub fn server_key(&self) -> PathBuf {
        self.root.join("server.key")
    }
    /// `crl.pem`.
    pub fn crl(&self) -> PathBuf {
        self.root.join("crl.pem")
    }
    /// `clients/<id>.crt`.
    pub fn client_cert(&self, id: &str) -> PathBuf {
        self.root.join("clients").join(format!("{id}.crt"))
    }
    /// `clients/<id>.key`.
    pub fn client_key(&self, id: &str) -> PathBuf {
        self.root.join("clients").join(format!("{id}.key"))
    }

    /// Creates the CA and an empty CRL. Refuses to overwrite an existing CA.
    pub fn init(&self, name: &str) -> Result<CertificateAuthority, Error> {
        if self.ca_key().exists() {
            return Err(Error::AlreadyExists(self.ca_key()));
        }
        let ca = CertificateAuthority::generate(name, CA_DAYS)?;
        ca.save(&self.ca_cert(), &self.ca_key())?;
        crate::fs::write_atomic(&self.crl(), ca.crl(&[], 1, CRL_DAYS)?.as_bytes(), 0o644)?;
        Ok(ca)
    }

    /// Loads the CA.
    pub fn ca(&self) -> Result<CertificateAuthority, Error> {
        CertificateAuthority::load(&self.ca_cert(), &self.ca_key())
    }

    /// Issues and writes the server certificate.
    pub fn issue_server(&self, names: &[String]) -> Result<(), Error> {
        self.ca()?
            .issue_server(names, CERT_DAYS)?
            .save(&self.server_cert(), &self.server_key())
    }

    /// Issues and writes a client certificate. Refuses an id that already has one (a second
    /// certificate for one id would be a second device with its identity): use
    /// [`PkiDir::rotate_client`] to replace it on purpose.
    pub fn issue_client(&self, id: &str) -> Result<(), Error> {
        validate_client_id(id)?;
        if self.client_cert(id).exists() {
            return Err(Error::AlreadyExists(self.client_cert(id)));
        }
        self.issue_client_unchecked(id)
    }

    /// Issues a new certificate for an existing id (a lost or replaced device). The old
    /// certificate stays valid until revoked; [`PkiDir::revoke`] revokes every certificate
    /// ever issued to the id.
    pub fn rotate_client(&self, id: &str) -> Result<(), Error> {
        validate_client_id(id)?;
        self.issue_client_unchecked(id)
    }

    fn issue_client_unchecked(&self, id: &str) -> Result<(), Error> {
        let now = OffsetDateTime::now_utc();
        let issued = self.ca()?.issue_client_between(
            id,
            now - self.backdate,
            now + Duration::days(CERT_DAYS),
        )?;
        // Record the serial before the certificate exists, so that no certificate is ever
        // out of reach of `revoke`.
        let serial = serial_of(issued.cert_der()?.as_ref())?;
        let ledger = self.issued_serials(id);
        let mut text = match fs::read_to_string(&ledger) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(Error::Io {
                    path: ledger,
                    source,
                });
            }
        };
        text.push_str(&hex_string(&serial));
        text.push('\n');
        crate::fs::write_atomic(&ledger, text.as_bytes(), 0o644)?;
        issued.save(&self.client_cert(id), &self.client_key(id))
    }

    /// Every serial issued to `id` (the ledger, plus the current certificate's).
    pub fn serials_of(&self, id: &str) -> Result<Vec<Vec<u8>>, Error> {
        validate_client_id(id)?;
        let mut out = Vec::new();
        match fs::read_to_string(self.issued_serials(id)) {
            Ok(text) => {
                for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    out.push(parse_hex(line).ok_or_else(|| {
                        Error::Certificate(format!(
                            "{}: bad serial line {line:?}",
                            self.issued_serials(id).display()
                        ))
                    })?);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    path: self.issued_serials(id),
                    source,
                });
            }
        }
        if let Ok(cert) = load_certs(&self.client_cert(id))
            && let Some(c) = cert.first()
        {
            let serial = serial_of(c.as_ref())?;
            if !out.contains(&serial) {
                out.push(serial);
            }
        }
        if out.is_empty() {
            return Err(Error::Certificate(format!(
                "no certificate was ever issued to {id:?} here"
            )));
        }
        Ok(out)
    }

    /// Revokes every certificate ever issued to the client and rewrites the CRL (atomically;
    /// a running server picks it up without a restart).
    pub fn revoke(&self, id: &str) -> Result<(), Error> {
        let revoke = self.serials_of(id)?;
        let (mut serials, number) = match fs::read(self.crl()) {
            Ok(pem) => crl_entries(&pem)?,
            Err(_) => (Vec::new(), 0),
        };
        for serial in revoke {
            if !serials.contains(&serial) {
                serials.push(serial);
            }
        }
        let crl = self.ca()?.crl(&serials, number + 1, CRL_DAYS)?;
        crate::fs::write_atomic(&self.crl(), crl.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        for ok in ["a", "client-0001", "edge.pi_4"] {
            validate_client_id(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "x y", &"z".repeat(65), "é"] {
            assert!(
                matches!(validate_client_id(bad), Err(Error::InvalidClientId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn issue_save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("Test CA").unwrap();
        pki.issue_server(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        pki.issue_client("client-1").unwrap();

        let id = Identity::load(&pki.client_cert("client-1"), &pki.client_key("client-1")).unwrap();
        assert_eq!(id.client_id().unwrap(), "client-1");
        Identity::load(&pki.server_cert(), &pki.server_key()).unwrap();
        // The CA reloads and can keep issuing.
        let ca = pki.ca().unwrap();
        let again = ca.issue_client("client-2", 1).unwrap();
        assert_eq!(
            client_id_from_cert(again.cert_der().unwrap().as_ref()).unwrap(),
            "client-2"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [pki.ca_key(), pki.server_key(), pki.client_key("client-1")] {
                let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
        }
        // Refuses to clobber an existing CA.
        assert!(matches!(pki.init("again"), Err(Error::AlreadyExists(_))));
    }

    #[test]
    fn clear_errors_for_missing_malformed_and_mismatched() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("CA").unwrap();
        pki.issue_client("a").unwrap();
        pki.issue_client("b").unwrap();

        let missing = dir.path().join("nope.crt");
        assert!(
            matches!(Identity::load(&missing, &pki.client_key("a")), Err(Error::NotFound(p)) if p == missing)
        );

        let garbage = dir.path().join("garbage.crt");
        fs::write(&garbage, "this is not PEM").unwrap();
        let e = Identity::load(&garbage, &pki.client_key("a")).unwrap_err();
        assert!(matches!(e, Error::Pem { .. }), "{e}");

        let e = Identity::load(&pki.client_cert("a"), &pki.client_cert("a")).unwrap_err();
        assert!(matches!(e, Error::Pem { .. }), "{e}");

        let e = Identity::load(&pki.client_cert("a"), &pki.client_key("b")).unwrap_err();
        assert!(matches!(e, Error::KeyMismatch { .. }), "{e}");
        assert!(e.to_string().contains("a.crt"), "{e}");
    }

    #[test]
    fn expired_certificate_is_reported() {
        let ca = CertificateAuthority::generate("CA", 10).unwrap();
        let now = OffsetDateTime::now_utc();
        let old = ca
            .issue_client_between("old", now - Duration::days(30), now - Duration::days(1))
            .unwrap();
        let id = Identity::from_issued(&old).unwrap();
        assert!(matches!(id.check_validity(now), Err(Error::Expired { .. })));
    }

    #[test]
    fn revocation_lists_the_serial() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("CA").unwrap();
        pki.issue_client("bad").unwrap();
        pki.issue_client("good").unwrap();
        let (before, n0) = crl_entries(&fs::read(pki.crl()).unwrap()).unwrap();
        assert!(before.is_empty());
        pki.revoke("bad").unwrap();
        pki.revoke("bad").unwrap(); // idempotent
        let (after, n1) = crl_entries(&fs::read(pki.crl()).unwrap()).unwrap();
        let bad = serial_of(load_certs(&pki.client_cert("bad")).unwrap()[0].as_ref()).unwrap();
        let good = serial_of(load_certs(&pki.client_cert("good")).unwrap()[0].as_ref()).unwrap();
        assert_eq!(after, vec![bad]);
        assert!(!after.contains(&good));
        assert!(n1 > n0);
        assert_eq!(load_crls(&pki.crl()).unwrap().len(), 1);
    }

    fn serial(pki: &PkiDir, id: &str) -> Vec<u8> {
        serial_of(load_certs(&pki.client_cert(id)).unwrap()[0].as_ref()).unwrap()
    }

    #[test]
    fn issue_client_refuses_an_existing_id_unless_rotating() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("CA").unwrap();
        pki.issue_client("dev").unwrap();
        let first = serial(&pki, "dev");
        match pki.issue_client("dev") {
            Err(Error::AlreadyExists(p)) => assert_eq!(p, pki.client_cert("dev")),
            other => panic!("expected AlreadyExists, got {other:?}"),
        }
        assert_eq!(
            serial(&pki, "dev"),
            first,
            "the certificate was not overwritten"
        );
        pki.rotate_client("dev").unwrap();
        let second = serial(&pki, "dev");
        assert_ne!(first, second);
        assert_eq!(pki.serials_of("dev").unwrap(), vec![first, second]);
    }

    #[test]
    fn revoke_revokes_every_certificate_ever_issued_to_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("CA").unwrap();
        pki.issue_client("dev").unwrap();
        let old = serial(&pki, "dev");
        pki.rotate_client("dev").unwrap();
        let new = serial(&pki, "dev");
        pki.issue_client("other").unwrap();
        pki.revoke("dev").unwrap();
        let (revoked, _) = crl_entries(&fs::read(pki.crl()).unwrap()).unwrap();
        assert!(revoked.contains(&old), "the older copy is revoked too");
        assert!(revoked.contains(&new));
        assert!(!revoked.contains(&serial(&pki, "other")));
        assert!(matches!(
            pki.revoke("never-issued"),
            Err(Error::Certificate(_))
        ));
    }

    #[test]
    fn certificates_are_back_dated_for_devices_whose_clock_is_behind() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("CA").unwrap();
        pki.issue_client("dev").unwrap();
        let now = OffsetDateTime::now_utc();
        let (nb, _) =
            validity_of(load_certs(&pki.client_cert("dev")).unwrap()[0].as_ref()).unwrap();
        assert!(
            nb <= now - Duration::hours(23),
            "not_before {nb} is not a day back"
        );
        let (ca_nb, _) = validity_of(load_certs(&pki.ca_cert()).unwrap()[0].as_ref()).unwrap();
        assert!(ca_nb <= now - Duration::hours(23), "CA not_before {ca_nb}");
        // Configurable.
        let short = PkiDir::new(dir.path()).with_backdate(Duration::hours(2));
        short.issue_client("dev2").unwrap();
        let (nb, _) =
            validity_of(load_certs(&short.client_cert("dev2")).unwrap()[0].as_ref()).unwrap();
        assert!(
            nb > now - Duration::hours(3) && nb <= now - Duration::hours(1),
            "{nb}"
        );
        // A device 12 hours behind still finds its new certificate valid.
        let id =
            Identity::load_for_device(&pki.client_cert("dev"), &pki.client_key("dev")).unwrap();
        id.check_validity(now - Duration::hours(12)).unwrap();
    }
}
