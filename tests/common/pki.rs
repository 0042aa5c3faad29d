//! A small PKI for tests: certificate authorities, SPIFFE X.509-SVIDs (good and
//! deliberately broken ones), server certificates, and rustls client configs.
//!
//! Everything is generated in memory with `rcgen` (ECDSA P-256 keys), so creating a
//! CA or a certificate takes well under a millisecond.
//!
//! ```ignore
//! let ca = TestCa::new("spiffe-bundle");
//! let svid = ca.svid("spiffe://example.org/ns/prod/sa/api");
//! let (cert_path, key_path) = svid.write(dir.path(), "api");
//! let bad = ca.svid_expired("spiffe://example.org/ns/prod/sa/api");
//! let stranger = TestCa::new("other").svid("spiffe://example.org/ns/prod/sa/api");
//! ```
//!
//! The X.509-SVID rules the good SVID follows (and the bad variants break) are in
//! <https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md>: exactly one
//! URI SAN holding the SPIFFE ID, `CA:FALSE`, `digitalSignature` key usage and no
//! `keyCertSign`/`cRLSign`.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// How long "valid" certificates are valid for, on each side of "now".
const LEAF_SLACK: Duration = Duration::hours(1);
/// CAs are valid for longer than their leaves so that a leaf's validity window
/// (even the deliberately expired / not-yet-valid ones) sits inside the CA's.
const CA_SLACK: Duration = Duration::days(30);

/// A certificate authority that can issue test certificates.
///
/// `TestCa::new` makes a self-signed root; [`TestCa::intermediate`] makes a CA signed by
/// another one. Leaves issued by an intermediate carry the intermediate(s) in
/// [`TestCert::chain_pem`] so they can be presented as a chain.
pub struct TestCa {
    name: String,
    /// What rcgen needs to sign: the CA's subject name, key identifier and key.
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    /// PEMs of the CA certificates a leaf of this CA must present after itself:
    /// empty for a root, `[self, parent, ...]` (excluding the root) for an intermediate.
    chain_pems: Vec<String>,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .field("is_intermediate", &!self.chain_pems.is_empty())
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new self-signed root CA (`CA:TRUE`, key usage keyCertSign + cRLSign),
    /// valid from 30 days ago to 30 days from now. `name` becomes its common name.
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("rcgen can always generate a P-256 key");
        let params = ca_params(name);
        let cert = params
            .self_signed(&key)
            .expect("a self-signed CA certificate from valid parameters");
        TestCa {
            name: name.to_owned(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            chain_pems: Vec::new(),
        }
    }

    /// A new intermediate CA signed by `self`.
    pub fn intermediate(&self, name: &str) -> TestCa {
        self.intermediate_with_key_usages(
            name,
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
        )
    }

    /// A new intermediate CA signed by `self` (`CA:TRUE`) whose key usage
    /// extension lists `key_usages` (none: no key usage extension at all),
    /// e.g. digitalSignature only, which RFC 5280 forbids for a CA that
    /// signs certificates.
    pub fn intermediate_with_key_usages(
        &self,
        name: &str,
        key_usages: Vec<KeyUsagePurpose>,
    ) -> TestCa {
        let key = KeyPair::generate().expect("rcgen can always generate a P-256 key");
        let mut params = ca_params(name);
        params.key_usages = key_usages;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("an intermediate CA certificate from valid parameters");
        let mut chain_pems = vec![cert.pem()];
        chain_pems.extend(self.chain_pems.iter().cloned());
        TestCa {
            name: name.to_owned(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            chain_pems,
        }
    }

    /// The name given to [`TestCa::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This CA's certificate, PEM encoded (what goes into a trust bundle).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// This CA's certificate, DER encoded (for a rustls `RootCertStore`).
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// This CA's private key (PKCS#8 PEM), for the rare test that needs to sign by hand.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Writes the CA certificate to `dir/<name>-ca.pem` and returns that path.
    pub fn write_pem(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("{}-ca.pem", file_stem(&self.name)));
        fs::write(&path, &self.cert_pem)
            .unwrap_or_else(|e| panic!("writing CA certificate {}: {e}", path.display()));
        path
    }

    // ----- good certificates -------------------------------------------------

    /// A valid X.509-SVID for `spiffe_id`: one URI SAN, `CA:FALSE`, key usage
    /// digitalSignature, EKU clientAuth + serverAuth, valid from 1 h ago to 1 h from now.
    pub fn svid(&self, spiffe_id: &str) -> TestCert {
        self.issue(format!("svid {spiffe_id}"), &svid_params(spiffe_id))
    }

    /// A TLS server certificate (for the proxy, or PostgreSQL itself): `CA:FALSE`,
    /// EKU serverAuth, DNS SANs `dns_names` and IP SANs `ips`.
    pub fn server_cert(&self, dns_names: &[&str], ips: &[IpAddr]) -> TestCert {
        let mut params = leaf_params("ephemera test server");
        params.subject_alt_names = dns_names
            .iter()
            .map(|name| SanType::DnsName(ia5(name)))
            .chain(ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(format!("server {dns_names:?} {ips:?}"), &params)
    }

    // ----- deliberately broken SVIDs -----------------------------------------

    /// An otherwise valid SVID whose notAfter is in the past (valid 2 h ago .. 1 h ago).
    pub fn svid_expired(&self, spiffe_id: &str) -> TestCert {
        let mut params = svid_params(spiffe_id);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - LEAF_SLACK * 2;
        params.not_after = now - LEAF_SLACK;
        self.issue(format!("expired svid {spiffe_id}"), &params)
    }

    /// An otherwise valid SVID whose notBefore is in the future (valid in 1 h .. 2 h).
    pub fn svid_not_yet_valid(&self, spiffe_id: &str) -> TestCert {
        let mut params = svid_params(spiffe_id);
        let now = OffsetDateTime::now_utc();
        params.not_before = now + LEAF_SLACK;
        params.not_after = now + LEAF_SLACK * 2;
        self.issue(format!("not-yet-valid svid {spiffe_id}"), &params)
    }

    /// A client certificate with only a DNS SAN (`workload.test`) and no URI SAN.
    pub fn leaf_without_uri_san(&self) -> TestCert {
        let mut params = svid_params("spiffe://placeholder.test/replaced");
        params.subject_alt_names = vec![SanType::DnsName(ia5("workload.test"))];
        self.issue("leaf without URI SAN", &params)
    }

    /// An SVID-like certificate with two URI SANs (the spec allows exactly one).
    pub fn svid_two_uris(&self, first: &str, second: &str) -> TestCert {
        let mut params = svid_params(first);
        params.subject_alt_names = vec![uri_san(first), uri_san(second)];
        self.issue(format!("svid with two URIs {first} {second}"), &params)
    }

    /// A certificate with the SPIFFE ID as URI SAN that is itself a CA
    /// (`CA:TRUE`, keyCertSign), signed by this CA: must not be accepted as a leaf.
    pub fn ca_as_leaf(&self, spiffe_id: &str) -> TestCert {
        let mut params = svid_params(spiffe_id);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        self.issue(format!("CA cert used as leaf {spiffe_id}"), &params)
    }

    /// An otherwise valid SVID whose URI SAN is not a SPIFFE ID (e.g. `https://...`).
    pub fn svid_https_uri(&self, uri: &str) -> TestCert {
        self.issue(format!("svid with non-SPIFFE URI {uri}"), &svid_params(uri))
    }

    // ----- escape hatch ------------------------------------------------------

    /// Signs arbitrary parameters (start from [`svid_params`] and break something).
    /// A fresh P-256 key is generated for the leaf. `label` only shows up in `Debug`.
    pub fn issue(&self, label: impl Into<String>, params: &CertificateParams) -> TestCert {
        let key = KeyPair::generate().expect("rcgen can always generate a P-256 key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("rcgen signs any well-formed parameters");
        let cert_pem = cert.pem();
        let mut chain_pem = cert_pem.clone();
        for pem in &self.chain_pems {
            chain_pem.push_str(pem);
        }
        TestCert {
            label: label.into(),
            cert_pem,
            chain_pem,
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

/// A leaf certificate and its private key.
#[derive(Clone)]
pub struct TestCert {
    /// Human-readable description (e.g. `expired svid spiffe://...`), shown by `Debug`.
    pub label: String,
    /// The leaf certificate alone, PEM.
    pub cert_pem: String,
    /// The leaf followed by any intermediate CAs (equal to `cert_pem` for a leaf issued
    /// by a root). This is what [`TestCert::write`] writes and what a client presents.
    pub chain_pem: String,
    /// The leaf's private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl fmt::Debug for TestCert {
    // Deliberately never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCert")
            .field("label", &self.label)
            .field("cert_der_len", &self.cert_der.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl TestCert {
    /// Writes `dir/<name>.pem` (certificate chain) and `dir/<name>-key.pem` (key,
    /// mode 0600 as libpq and PostgreSQL require) and returns `(cert_path, key_path)`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        fs::write(&cert_path, &self.chain_pem)
            .unwrap_or_else(|e| panic!("writing certificate {}: {e}", cert_path.display()));
        write_private(&key_path, self.key_pem.as_bytes());
        (cert_path, key_path)
    }

    /// The leaf certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The leaf followed by its intermediates, DER (for rustls `with_client_auth_cert`
    /// / `with_single_cert`).
    pub fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("the chain PEM was produced by rcgen and parses")
    }

    /// The private key, PKCS#8 DER.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// The parameters of a valid X.509-SVID for `spiffe_id` (what [`TestCa::svid`] signs).
/// Public so tests can tweak one property and sign with [`TestCa::issue`].
pub fn svid_params(spiffe_id: &str) -> CertificateParams {
    let mut params = leaf_params("ephemera test svid");
    params.subject_alt_names = vec![uri_san(spiffe_id)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params
}

/// A rustls client config that trusts the CA certificate(s) in `ca_pem_of_server`
/// (verifying the server's name as usual) and, if `client` is given, presents that
/// certificate chain for client authentication. Uses the ring provider explicitly,
/// never the process-wide default.
pub fn tls_client_config(
    ca_pem_of_server: &str,
    client: Option<&TestCert>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem_of_server.as_bytes()) {
        let cert = cert.expect("ca_pem_of_server must contain PEM certificates");
        roots
            .add(cert)
            .expect("the CA certificate is acceptable as a trust anchor");
    }
    assert!(
        !roots.is_empty(),
        "ca_pem_of_server contained no certificate"
    );

    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("the ring provider supports the default protocol versions")
    .with_root_certificates(roots);
    match client {
        Some(cert) => builder
            .with_client_auth_cert(cert.chain_der(), cert.key_der())
            .expect("rustls accepts the test client certificate and key"),
        None => builder.with_no_client_auth(),
    }
}

/// [`tls_client_config`] wrapped for `tokio_postgres::Config::connect`.
pub fn make_tls_connect(
    ca_pem_of_server: &str,
    client: Option<&TestCert>,
) -> tokio_postgres_rustls::MakeRustlsConnect {
    tokio_postgres_rustls::MakeRustlsConnect::new(tls_client_config(ca_pem_of_server, client))
}

// ----- helpers -----------------------------------------------------------------

fn ca_params(name: &str) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - CA_SLACK;
    params.not_after = now + CA_SLACK;
    params
}

/// Common leaf settings: explicit `CA:FALSE`, valid now +/- 1 h, authority key id.
fn leaf_params(common_name: &str) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.not_before = now - LEAF_SLACK;
    params.not_after = now + LEAF_SLACK;
    params.use_authority_key_identifier_extension = true;
    params
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ephemera tests");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn ia5(s: &str) -> Ia5String {
    Ia5String::try_from(s)
        .unwrap_or_else(|e| panic!("{s:?} is not a valid IA5 (ASCII) string: {e}"))
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(ia5(uri))
}

/// Turns a CA name into something safe to use in a file name.
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes a secret file with mode 0600 (also tightening a pre-existing file).
pub(crate) fn write_private(path: &Path, contents: &[u8]) {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    // `mode` only applies when the file is created; make sure an old file is tightened too.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 0600 {}: {e}", path.display()));
    file.write_all(contents)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A self-signed certificate that otherwise looks like an X.509-SVID for
/// `spiffe_id` (no CA vouches for it).
pub fn self_signed_svid(spiffe_id: &str) -> TestCert {
    let key = KeyPair::generate().expect("rcgen can always generate a P-256 key");
    let cert = svid_params(spiffe_id)
        .self_signed(&key)
        .expect("a self-signed certificate from valid parameters");
    TestCert {
        label: format!("self-signed svid {spiffe_id}"),
        cert_pem: cert.pem(),
        chain_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
    }
}
