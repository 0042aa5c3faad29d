//! Reading what the configuration points at: certificates, keys, secret
//! files. Each failure is a problem under the key that named the file.

use std::path::Path;

use ephemera_engine::Password;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::problems::Problems;

pub(super) use crate::config::is_unix_socket_dir;

pub(super) type ServerIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

pub(super) fn clone_identity(identity: &Option<ServerIdentity>) -> Option<ServerIdentity> {
    identity
        .as_ref()
        .map(|(chain, key)| (chain.clone(), key.clone_key()))
}

pub(super) fn load_certs(
    path: &Path,
    key: &str,
    problems: &mut Problems,
) -> Option<Vec<CertificateDer<'static>>> {
    match CertificateDer::pem_file_iter(path).and_then(|iter| iter.collect::<Result<Vec<_>, _>>()) {
        Ok(certs) if certs.is_empty() => {
            problems.add(key, format!("{} holds no PEM certificate", path.display()));
            None
        }
        Ok(certs) => Some(certs),
        Err(e) => {
            problems.add(
                key,
                format!("cannot read PEM certificates from {}: {e}", path.display()),
            );
            None
        }
    }
}

pub(super) fn load_key(
    path: &Path,
    key: &str,
    problems: &mut Problems,
) -> Option<PrivateKeyDer<'static>> {
    match PrivateKeyDer::from_pem_file(path) {
        Ok(k) => Some(k),
        // The error never contains key material, only what kind of problem.
        Err(e) => {
            problems.add(
                key,
                format!("cannot read a PEM private key from {}: {e}", path.display()),
            );
            None
        }
    }
}

pub(super) fn read_secret_file(
    path: &Path,
    key: &str,
    problems: &mut Problems,
) -> Option<Password> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim_end_matches(['\r', '\n']).to_owned();
            if secret.is_empty() {
                problems.add(key, format!("{} is empty", path.display()));
                None
            } else {
                Some(Password::new(secret))
            }
        }
        Err(e) => {
            problems.add(key, format!("cannot read {}: {e}", path.display()));
            None
        }
    }
}
