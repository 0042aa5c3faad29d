//! Identity: who is on the other end of a TLS connection.
//!
//! A workload proves who it is with an X.509-SVID: a certificate chaining to
//! the SPIFFE trust bundle, carrying exactly one `spiffe://` URI SAN. This
//! module checks the chain ([`webpki`]) and the X.509-SVID rules
//! ([`x509_parser`]) and yields the [`SpiffeId`] everything else keys on.
//!
//! Why not let rustls reject bad certificates during the handshake? Because
//! a handshake alert reaches the user as an opaque "SSL error", while a
//! PostgreSQL `ErrorResponse` after the handshake can say *what* is wrong
//! ("certificate expired", "trust domain not accepted"). So the TLS layer
//! ([`AcceptAnyClientCert`]) checks only that the client holds the private key
//! of the certificate it presented, and [`SvidVerifier::verify`] decides,
//! before anything else happens on the connection.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// The longest SPIFFE ID accepted (the SPIFFE spec's limit for URIs).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// A syntactically valid SPIFFE ID: `spiffe://<trust-domain>/<path>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the path starts (== uri.len() if there is none).
    path_start: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("a SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    #[error("a SPIFFE ID can be at most {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    #[error("the trust domain may contain only lower-case letters, digits, '.', '-' and '_' (no port, user info or upper case)")]
    BadTrustDomain,
    #[error("path segments may contain only letters, digits, '.', '-' and '_' (no percent-encoding, query or fragment)")]
    BadPathCharacter,
    #[error("the path has an empty segment (\"//\" or a trailing \"/\")")]
    EmptySegment,
    #[error("the path has a \".\" or \"..\" segment")]
    DotSegment,
}

impl SpiffeId {
    /// Parse and validate per the SPIFFE ID specification.
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        parse_spiffe_uri(uri, false)?;
        let rest = &uri["spiffe://".len()..];
        let path_start = "spiffe://".len() + rest.find('/').unwrap_or(rest.len());
        Ok(SpiffeId {
            uri: uri.to_owned(),
            path_start,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.path_start]
    }

    /// The path's segments (none for the trust domain's own ID).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.uri[self.path_start..].split('/').skip(1)
    }
}

/// Shared by [`SpiffeId::parse`] and the policy's patterns: with
/// `allow_wildcards`, the segments `*` and `**` are accepted too (their
/// placement is the policy's business).
pub(crate) fn parse_spiffe_uri(uri: &str, allow_wildcards: bool) -> Result<(), SpiffeIdError> {
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or(SpiffeIdError::WrongScheme)?;
    if uri.len() > MAX_SPIFFE_ID_LEN {
        return Err(SpiffeIdError::TooLong);
    }
    let (trust_domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if trust_domain.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if !trust_domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::BadTrustDomain);
    }
    if path.is_empty() {
        return Ok(());
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err(SpiffeIdError::EmptySegment),
            "." | ".." => return Err(SpiffeIdError::DotSegment),
            "*" | "**" if allow_wildcards => {}
            _ if segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) => {}
            _ => return Err(SpiffeIdError::BadPathCharacter),
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.uri, f)
    }
}

/// Why a client certificate is not an acceptable X.509-SVID. The messages
/// go to the client, so they say what to fix and never echo key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the client certificate has expired")]
    Expired,
    #[error("the client certificate is not valid yet")]
    NotYetValid,
    #[error("the client certificate is not signed by a CA in Ephemera's SPIFFE trust bundle")]
    UnknownIssuer,
    #[error("the client certificate claims trust domain {0:?} but is signed by a CA of another trust domain's bundle; each trust domain's SVIDs must chain to its own bundle")]
    ForeignIssuer(String),
    #[error("the client certificate is a CA certificate; an X.509-SVID leaf must have CA:FALSE")]
    CaAsLeaf,
    #[error("the client certificate is not valid for client authentication (extended key usage)")]
    WrongPurpose,
    #[error("the client certificate was rejected: {0}")]
    Invalid(String),
    #[error("the client certificate cannot be parsed")]
    Unparseable,
    #[error("the client certificate has no key usage extension; an X.509-SVID leaf needs digitalSignature")]
    NoKeyUsage,
    #[error("the client certificate's key usage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("the client certificate's key usage includes keyCertSign or cRLSign, which an X.509-SVID leaf must not have")]
    SigningKeyUsage,
    #[error(
        "the client certificate has no URI SAN; an X.509-SVID carries exactly one spiffe:// URI"
    )]
    NoUriSan,
    #[error("the client certificate has {0} URI SANs; an X.509-SVID carries exactly one")]
    SeveralUriSans(usize),
    #[error("the client certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(SpiffeIdError),
    #[error("the trust domain {0:?} is not accepted here")]
    UntrustedDomain(String),
    #[error("the client certificate's chain has a CA certificate ({0}) whose key usage lacks keyCertSign, so it may not sign certificates (RFC 5280); its issuer must reissue it with keyCertSign")]
    IssuerCannotSign(String),
}

/// A verified X.509-SVID: who, and until when the certificate is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    pub id: SpiffeId,
    pub not_after: time::OffsetDateTime,
}

/// Checks X.509-SVIDs against the trust bundle and the accepted trust domains.
pub struct SvidVerifier {
    /// One bundle per group of trust domains: an SVID must chain to the
    /// bundle of its own trust domain (the SPIFFE rule), so a federated
    /// domain's CA cannot vouch for the home domain's identities.
    bundles: Vec<Bundle>,
    /// Every bundle's anchors, for certificates that name no usable trust
    /// domain (the errors then say what is wrong with them).
    all_anchors: Vec<TrustAnchor<'static>>,
    provider: Arc<CryptoProvider>,
    /// Subjects of the bundles' CAs, sent as hints in the TLS handshake.
    root_subjects: Vec<DistinguishedName>,
}

struct Bundle {
    trust_domains: BTreeSet<String>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl fmt::Debug for SvidVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for bundle in &self.bundles {
            map.entry(&bundle.trust_domains, &bundle.anchors.len());
        }
        map.finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrustBundleError {
    #[error("the trust bundle contains no certificate")]
    Empty,
    #[error("certificate #{index} of the trust bundle cannot be used as a trust anchor: {reason}")]
    BadAnchor { index: usize, reason: String },
    #[error("certificate #{index} of the trust bundle is not a CA certificate (basicConstraints CA:TRUE)")]
    NotCa { index: usize },
    #[error("trust domain {0:?} has two bundles")]
    DuplicateDomain(String),
}

impl SvidVerifier {
    /// A verifier for `trust_domains`, all of whose SVIDs chain to `bundle`.
    pub fn new(
        bundle: &[CertificateDer<'static>],
        trust_domains: impl IntoIterator<Item = String>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TrustBundleError> {
        let mut verifier = SvidVerifier {
            bundles: Vec::new(),
            all_anchors: Vec::new(),
            provider,
            root_subjects: Vec::new(),
        };
        verifier.add_bundle(bundle, trust_domains.into_iter().collect())?;
        Ok(verifier)
    }

    /// Also accept SVIDs of the federated `trust_domain`, which must chain
    /// to `bundle` (and only those may).
    pub fn with_federated(
        mut self,
        trust_domain: String,
        bundle: &[CertificateDer<'static>],
    ) -> Result<Self, TrustBundleError> {
        self.add_bundle(bundle, BTreeSet::from([trust_domain]))?;
        Ok(self)
    }

    fn add_bundle(
        &mut self,
        bundle: &[CertificateDer<'static>],
        trust_domains: BTreeSet<String>,
    ) -> Result<(), TrustBundleError> {
        if bundle.is_empty() {
            return Err(TrustBundleError::Empty);
        }
        if let Some(domain) = trust_domains.iter().find(|d| self.bundle_for(d).is_some()) {
            return Err(TrustBundleError::DuplicateDomain(domain.clone()));
        }
        let mut anchors = Vec::new();
        for (index, der) in bundle.iter().enumerate() {
            let (_, cert) =
                X509Certificate::from_der(der).map_err(|e| TrustBundleError::BadAnchor {
                    index,
                    reason: e.to_string(),
                })?;
            if !cert.is_ca() {
                return Err(TrustBundleError::NotCa { index });
            }
            let anchor =
                webpki::anchor_from_trusted_cert(der).map_err(|e| TrustBundleError::BadAnchor {
                    index,
                    reason: e.to_string(),
                })?;
            // The anchor's subject is the Name without its SEQUENCE header; the
            // TLS CertificateRequest wants the full DER.
            self.root_subjects
                .push(DistinguishedName::in_sequence(&anchor.subject));
            anchors.push(anchor.to_owned());
        }
        self.all_anchors.extend(anchors.iter().cloned());
        self.bundles.push(Bundle {
            trust_domains,
            anchors,
        });
        Ok(())
    }

    fn bundle_for(&self, trust_domain: &str) -> Option<&Bundle> {
        self.bundles
            .iter()
            .find(|b| b.trust_domains.contains(trust_domain))
    }

    /// Verify a presented chain (leaf first) as an X.509-SVID at `now`.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<VerifiedSvid, IdentityError> {
        let (leaf_der, intermediates) = chain.split_first().ok_or(IdentityError::NoCertificate)?;
        let leaf = webpki::EndEntityCert::try_from(leaf_der).map_err(chain_error)?;
        let parsed = X509Certificate::from_der(leaf_der).map(|(_, cert)| cert);
        // The SVID rules, checked once; their verdict is reported only after
        // the chain's. Until the chain is verified the SPIFFE ID is merely
        // claimed: it only picks the bundle the chain must reach.
        let rules = parsed
            .as_ref()
            .map_err(|_| IdentityError::Unparseable)
            .and_then(svid_rules);
        let claimed = rules.as_ref().ok();
        let bundle = claimed.and_then(|id| self.bundle_for(id.trust_domain()));
        let anchors = bundle.map_or(&self.all_anchors, |b| &b.anchors);
        // The path found, then (webpki does not look at a CA's key usage)
        // whether each intermediate on it may sign certificates.
        let verify_with = |anchors: &[TrustAnchor<'_>]| {
            leaf.verify_for_usage(
                self.provider.signature_verification_algorithms.all,
                anchors,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map(|path| intermediates_may_sign(&path))
        };
        match verify_with(anchors) {
            Ok(signers) => signers?,
            Err(error) => {
                // Chains to another domain's bundle: say so, it is a
                // configuration (or impersonation) matter, not an unknown CA.
                if let (Some(id), webpki::Error::UnknownIssuer) = (claimed, &error) {
                    if self.bundles.len() > 1 && verify_with(&self.all_anchors).is_ok() {
                        return Err(IdentityError::ForeignIssuer(id.trust_domain().to_owned()));
                    }
                }
                return Err(chain_error(error));
            }
        }

        let cert = parsed.map_err(|_| IdentityError::Unparseable)?;
        let id = rules?;
        if bundle.is_none() {
            return Err(IdentityError::UntrustedDomain(id.trust_domain().to_owned()));
        }
        Ok(VerifiedSvid {
            id,
            not_after: cert.validity().not_after.to_datetime(),
        })
    }
}

fn chain_error(error: webpki::Error) -> IdentityError {
    use webpki::Error as E;
    match error {
        E::CertExpired { .. } | E::InvalidCertValidity => IdentityError::Expired,
        E::CertNotValidYet { .. } => IdentityError::NotYetValid,
        E::UnknownIssuer => IdentityError::UnknownIssuer,
        E::CaUsedAsEndEntity => IdentityError::CaAsLeaf,
        E::RequiredEkuNotFoundContext(_) => IdentityError::WrongPurpose,
        E::BadDer | E::BadDerTime | E::TrailingData(_) => IdentityError::Unparseable,
        other => IdentityError::Invalid(other.to_string()),
    }
}

/// RFC 5280 6.1.4 (n): a CA certificate on the path whose key usage
/// extension is present must assert keyCertSign (the X.509-SVID spec says the
/// same of signing certificates). One without the extension is accepted, as
/// RFC 5280 path validation, OpenSSL and so PostgreSQL itself accept it
/// (SPIRE always sets it). webpki checks neither; the trust anchor is not
/// looked at (a bundle entry is trusted as configured).
fn intermediates_may_sign(path: &webpki::VerifiedPath<'_>) -> Result<(), IdentityError> {
    for cert in path.intermediate_certificates() {
        let der = cert.der();
        let (_, parsed) =
            X509Certificate::from_der(&der).map_err(|_| IdentityError::Unparseable)?;
        let key_usage = parsed.key_usage().map_err(|_| IdentityError::Unparseable)?;
        if key_usage.is_some_and(|ku| !ku.value.key_cert_sign()) {
            return Err(IdentityError::IssuerCannotSign(
                parsed.subject().to_string(),
            ));
        }
    }
    Ok(())
}

/// The X.509-SVID rules for a leaf beyond what path validation checks.
fn svid_rules(cert: &X509Certificate<'_>) -> Result<SpiffeId, IdentityError> {
    if cert.is_ca() {
        return Err(IdentityError::CaAsLeaf);
    }
    let key_usage = cert
        .key_usage()
        .map_err(|_| IdentityError::Unparseable)?
        .ok_or(IdentityError::NoKeyUsage)?
        .value;
    if !key_usage.digital_signature() {
        return Err(IdentityError::NoDigitalSignature);
    }
    if key_usage.key_cert_sign() || key_usage.crl_sign() {
        return Err(IdentityError::SigningKeyUsage);
    }
    let mut uris = Vec::new();
    for extension in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    match uris.as_slice() {
        [] => Err(IdentityError::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(IdentityError::BadSpiffeId),
        several => Err(IdentityError::SeveralUriSans(several.len())),
    }
}

/// The TLS-layer client certificate policy: ask for a certificate, accept the
/// connection without one (libpq sends cancel requests without), and check
/// only that the client proves possession of the certificate's key. Whether
/// the certificate is a valid SVID is decided by [`SvidVerifier::verify`]
/// right after the handshake, so the client gets a PostgreSQL error it can read.
#[derive(Debug)]
pub struct AcceptAnyClientCert {
    verifier: Arc<SvidVerifier>,
}

impl AcceptAnyClientCert {
    pub fn new(verifier: Arc<SvidVerifier>) -> Self {
        AcceptAnyClientCert { verifier }
    }
}

impl ClientCertVerifier for AcceptAnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.verifier.root_subjects
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.verifier.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.verifier.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_spiffe_ids_parse() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/billing").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(
            id.segments().collect::<Vec<_>>(),
            ["ns", "prod", "sa", "billing"]
        );
        let td = SpiffeId::parse("spiffe://example.org").unwrap();
        assert_eq!(td.segments().count(), 0);
        assert!(SpiffeId::parse("spiffe://a-b_c.9/A.b-C_9").is_ok());
    }

    #[test]
    fn invalid_spiffe_ids_are_refused_with_the_reason() {
        use SpiffeIdError::*;
        let cases = [
            ("https://example.org/a", WrongScheme),
            ("SPIFFE://example.org/a", WrongScheme),
            ("spiffe:///a", EmptyTrustDomain),
            ("spiffe://Example.org/a", BadTrustDomain),
            ("spiffe://example.org:443/a", BadTrustDomain),
            ("spiffe://user@example.org/a", BadTrustDomain),
            ("spiffe://example.org/a//b", EmptySegment),
            ("spiffe://example.org/a/", EmptySegment),
            ("spiffe://example.org/a/../b", DotSegment),
            ("spiffe://example.org/./b", DotSegment),
            ("spiffe://example.org/a%2Fb", BadPathCharacter),
            ("spiffe://example.org/a?x=1", BadPathCharacter),
            ("spiffe://example.org/a#frag", BadPathCharacter),
            ("spiffe://example.org/*", BadPathCharacter),
        ];
        for (uri, expected) in cases {
            assert_eq!(SpiffeId::parse(uri), Err(expected), "{uri}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(TooLong));
    }
}
