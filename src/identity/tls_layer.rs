//! What the TLS layer checks of a client certificate: only that the client
//! holds its private key; the SVID rules come after the handshake
//! ([`super::svid::SvidVerifier::verify`]), where they can be explained.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::svid::SvidVerifier;

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
