//! Certificate logins upstream (`upstream.login = "certificate"`).
//!
//! PostgreSQL trusts a CA for client certificates (`ssl_ca_file`) and a
//! `hostssl … cert clientcert=verify-full` line in `pg_hba.conf` lets a
//! certificate whose CN is a role log in as that role. Ephemera holds that
//! CA's key ([`LoginCa`]) and, for every upstream login, issues a client
//! certificate ([`ClientCertificate`]) for the one role, valid only for the
//! login window, with a key drawn for that login alone. No password or
//! verifier of the role ever exists.

use std::fmt;
use std::time::Duration;

use rand::Rng;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use zeroize::Zeroize;

/// How far back a login certificate's `not_before` lies, for clocks of
/// Ephemera and PostgreSQL that disagree a little.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The login CA's certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoginCaError {
    #[error("is not a PEM certificate: {0}")]
    BadCertificate(String),
    /// The reason never contains key material, only what kind of problem.
    #[error("is not a PEM private key rcgen can sign with: {0}")]
    BadKey(String),
    #[error("is not a CA certificate (its basicConstraints do not say CA:TRUE)")]
    NotACa,
    #[error("is a CA certificate whose keyUsage does not allow keyCertSign")]
    CannotSign,
    #[error("does not match the certificate in upstream.login_ca_cert (another key pair's)")]
    KeyMismatch,
}

/// Issuing a login certificate failed (SQLSTATE 58000 where it reaches a
/// client: a system error on our side, nothing the client did).
#[derive(Debug, thiserror::Error)]
#[error("could not issue a client certificate for role {role:?}: {reason}")]
pub struct LoginCertError {
    pub role: String,
    pub reason: String,
}

impl LoginCertError {
    pub const SQLSTATE: &'static str = "58000";
}

/// The CA PostgreSQL trusts for client certificates, with its key.
/// `Debug` shows the subject only.
pub struct LoginCa {
    issuer: Issuer<'static, KeyPair>,
    subject: String,
}

impl fmt::Debug for LoginCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginCa")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl LoginCa {
    /// The CA from its certificate and key, both PEM. Checks that the
    /// certificate is a CA that may sign certificates and that the key is
    /// its own. Errors say which of the two is wrong
    /// ([`LoginCaError::BadKey`] and [`LoginCaError::KeyMismatch`] concern
    /// the key, the others the certificate).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, LoginCaError> {
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes()).map_err(
            |e: rustls::pki_types::pem::Error| LoginCaError::BadCertificate(e.to_string()),
        )?;
        let der: CertificateDer<'static> = der;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| LoginCaError::BadCertificate(e.to_string()))?;
        if !x509.is_ca() {
            return Err(LoginCaError::NotACa);
        }
        if let Ok(Some(usage)) = x509.key_usage() {
            if !usage.value.key_cert_sign() {
                return Err(LoginCaError::CannotSign);
            }
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| LoginCaError::BadKey(e.to_string()))?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(LoginCaError::KeyMismatch);
        }
        let subject = x509.subject().to_string();
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| LoginCaError::BadCertificate(e.to_string()))?;
        Ok(LoginCa { issuer, subject })
    }

    /// A client certificate for `role` (its CN), valid from a little
    /// before now ([`CLOCK_SKEW`]) until now + `lifetime`, with a fresh key.
    pub fn issue(
        &self,
        role: &str,
        lifetime: Duration,
    ) -> Result<ClientCertificate, LoginCertError> {
        let fail = |reason: String| LoginCertError {
            role: role.to_owned(),
            reason,
        };
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .map_err(|e| fail(e.to_string()))?;
        let not_before = crate::checked_sub(now, CLOCK_SKEW)
            .ok_or_else(|| fail("now - clock skew is out of range".into()))?;
        let not_after = crate::checked_add(now, lifetime)
            .ok_or_else(|| fail("now + lease.login_window is out of range".into()))?;
        // 127 random bits, positive.
        let serial: u128 = rand::rngs::OsRng.gen::<u128>() >> 1;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, role);
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(|e| fail(e.to_string()))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(ClientCertificate {
            chain: vec![cert.der().clone()],
            key: key_der,
            role: role.to_owned(),
            serial: serial.to_string(),
            not_after,
        })
    }
}

/// A client certificate for one upstream login and its private key.
/// `Debug` never shows the key; the key is zeroised on drop.
pub struct ClientCertificate {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    role: String,
    /// The serial number, in decimal (as `pg_stat_ssl.client_serial`).
    serial: String,
    not_after: OffsetDateTime,
}

impl ClientCertificate {
    /// The certificate (leaf first) and a copy of its key, for the TLS
    /// handshake that logs in.
    pub fn for_handshake(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain.clone(), self.key.clone_key())
    }

    /// The role it names (its CN).
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The serial number in decimal, as PostgreSQL shows it.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// When it expires: the end of the login window.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("role", &self.role)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Drop for ClientCertificate {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "test login CA");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn issues_a_short_lived_certificate_for_the_role() {
        let (cert, key) = ca();
        let ca = LoginCa::from_pem(&cert, &key).unwrap();
        let before = OffsetDateTime::now_utc();
        let issued = ca.issue("eph_t_abc", Duration::from_secs(60)).unwrap();
        assert!(issued.not_after() <= before + time::Duration::seconds(61));
        let der = issued.for_handshake().0.remove(0);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(x509.subject().to_string(), "CN=eph_t_abc");
        assert!(!x509.tbs_certificate.raw_serial_as_string().is_empty());
        assert_eq!(
            x509.validity().not_after.timestamp(),
            issued.not_after().unix_timestamp()
        );
        let debug = format!("{issued:?}");
        assert!(
            debug.contains("<redacted>") && !debug.contains("PRIVATE"),
            "{debug}"
        );
    }

    #[test]
    fn refuses_a_key_of_another_ca_and_a_leaf() {
        let (cert, _) = ca();
        let (_, other_key) = ca();
        assert!(matches!(
            LoginCa::from_pem(&cert, &other_key),
            Err(LoginCaError::KeyMismatch)
        ));
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(matches!(
            LoginCa::from_pem(&leaf.pem(), &key.serialize_pem()),
            Err(LoginCaError::NotACa)
        ));
        assert!(matches!(
            LoginCa::from_pem("nope", "nope"),
            Err(LoginCaError::BadCertificate(_))
        ));
    }
}
