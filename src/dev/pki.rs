//! The development CA of `ephemera dev`: trust domain `ephemera.dev`, the
//! proxy's (and the dev cluster's) server certificate, and SVIDs for the
//! demo identities. Made once per directory and reused.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use super::cluster::{write_private, ClusterError};

pub const TRUST_DOMAIN: &str = "ephemera.dev";

/// A demo workload: its SPIFFE ID and the file stem of its SVID.
#[derive(Debug, Clone, Copy)]
pub struct DemoIdentity {
    pub spiffe_id: &'static str,
    pub file: &'static str,
}

pub const APP: DemoIdentity = DemoIdentity {
    spiffe_id: "spiffe://ephemera.dev/app/web",
    file: "web",
};
pub const JOB: DemoIdentity = DemoIdentity {
    spiffe_id: "spiffe://ephemera.dev/job/nightly",
    file: "nightly",
};
pub const ADMIN: DemoIdentity = DemoIdentity {
    spiffe_id: "spiffe://ephemera.dev/ops/admin",
    file: "admin",
};

/// Where the certificates are.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub dir: PathBuf,
}

impl DevCerts {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    pub fn svid(&self, who: DemoIdentity) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{}.pem", who.file)),
            self.dir.join(format!("{}-key.pem", who.file)),
        )
    }

    fn complete(&self) -> bool {
        [self.ca(), self.server_cert(), self.server_key()]
            .into_iter()
            .chain([APP, JOB, ADMIN].into_iter().flat_map(|w| {
                let (c, k) = self.svid(w);
                [c, k]
            }))
            .all(|p| p.is_file())
    }

    /// Make the CA and every certificate unless all exist already. Returns
    /// whether anything was made.
    pub fn ensure(dir: &Path) -> Result<(DevCerts, bool), ClusterError> {
        let certs = DevCerts {
            dir: dir.to_owned(),
        };
        if certs.complete() {
            return Ok((certs, false));
        }
        fs::create_dir_all(dir).map_err(|source| ClusterError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let now = OffsetDateTime::now_utc();
        let ca_key = KeyPair::generate().map_err(rcgen_error)?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = name("Ephemera development CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = now - Duration::hours(1);
        ca.not_after = now + Duration::days(365);
        let ca_cert = ca.self_signed(&ca_key).map_err(rcgen_error)?;
        write(&certs.ca(), ca_cert.pem().as_bytes())?;
        let issuer = Issuer::new(ca, ca_key);

        let mut server = leaf(now, "localhost");
        server.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().map_err(rcgen_error)?),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (cert, key) = sign(&server, &issuer)?;
        write(&certs.server_cert(), cert.as_bytes())?;
        write_private(&certs.server_key(), key.as_bytes())?;

        for who in [APP, JOB, ADMIN] {
            let mut svid = leaf(now, who.file);
            svid.subject_alt_names =
                vec![SanType::URI(who.spiffe_id.try_into().map_err(rcgen_error)?)];
            svid.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ];
            let (cert, key) = sign(&svid, &issuer)?;
            let (cert_path, key_path) = certs.svid(who);
            write(&cert_path, cert.as_bytes())?;
            write_private(&key_path, key.as_bytes())?;
        }
        Ok((certs, true))
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn leaf(now: OffsetDateTime, common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(90);
    params.use_authority_key_identifier_extension = true;
    params
}

fn sign(
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<(String, String), ClusterError> {
    let key = KeyPair::generate().map_err(rcgen_error)?;
    let cert = params.signed_by(&key, issuer).map_err(rcgen_error)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write(path: &Path, contents: &[u8]) -> Result<(), ClusterError> {
    fs::write(path, contents).map_err(|source| ClusterError::Io {
        path: path.to_owned(),
        source,
    })
}

fn rcgen_error(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Command {
        what: "making the development certificates".into(),
        detail: e.to_string(),
    }
}
