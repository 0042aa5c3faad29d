//! The X.509-SVID rules: a chain to the trust domain's bundle, exactly one
//! `spiffe://` URI SAN, a leaf that is no CA, intermediates that may sign.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use rustls::DistinguishedName;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::spiffe_id::{SpiffeId, SpiffeIdError};

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
    pub(super) provider: Arc<CryptoProvider>,
    /// Subjects of the bundles' CAs, sent as hints in the TLS handshake.
    pub(super) root_subjects: Vec<DistinguishedName>,
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
