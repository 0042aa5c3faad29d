//! Reading the file: TOML plus `EPHEMERA_*` overrides, deserialised with
//! key paths taken from the deserialiser (`serde_path_to_error`), and the
//! warnings about how the secret files it names are kept.

use std::path::Path;

use crate::config::problems::ConfigProblem;
use crate::config::schema::FileConfig;

/// Secret files that group or others may access (mode & 0o077 != 0, the
/// rule by which libpq refuses a client key): `tls.key` and
/// `upstream.admin_password_file`, paths resolved against `base`. Each
/// warning names the key and the file and says `chmod 600`. A file that
/// cannot be looked at is left to the loading itself to report.
pub fn secret_file_warnings(file: &FileConfig, base: &Path) -> Vec<ConfigProblem> {
    use std::os::unix::fs::PermissionsExt;
    let login_ca_key = std::path::PathBuf::from(&file.upstream.login_ca_key);
    let mut secrets = vec![
        ("tls.key", file.tls.key.as_ref()),
        (
            "upstream.admin_password_file",
            Some(&file.upstream.admin_password_file),
        ),
    ];
    if !file.upstream.login_ca_key.is_empty() {
        secrets.push(("upstream.login_ca_key", Some(&login_ca_key)));
    }
    let mut warnings = Vec::new();
    for (key, path) in secrets {
        let Some(path) = path else {
            continue;
        };
        let path = base.join(path);
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warnings.push(ConfigProblem {
                key: key.to_owned(),
                message: format!(
                    "{} has mode {mode:04o}: group or others can access this secret (libpq would refuse such a key file); run: chmod 600 {}",
                    path.display(),
                    path.display()
                ),
            });
        }
    }
    warnings
}

/// Parse the file (and environment overrides) into the schema.
pub fn read_file_config(path: &Path) -> Result<FileConfig, ConfigProblem> {
    if !path.is_file() {
        return Err(ConfigProblem {
            key: String::new(),
            message: format!("cannot read {}: no such file", path.display()),
        });
    }
    let merged = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            // Only section-qualified variables (EPHEMERA_UPSTREAM__PORT) are
            // configuration; EPHEMERA_LOG and friends belong to the command.
            config::Environment::with_prefix("EPHEMERA")
                .source(Some(
                    std::env::vars()
                        .filter(|(k, _)| k.starts_with("EPHEMERA_") && k.contains("__"))
                        .collect(),
                ))
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("tls.trust_domains"),
        )
        .build()
        .and_then(|c| c.try_deserialize::<serde_json::Value>())
        .map_err(|e| ConfigProblem {
            key: String::new(),
            message: e.to_string(),
        })?;
    // The schema's own deserialisation, with the key path of any problem.
    ephemera_engine::keys::from_keys::<FileConfig>(merged).map_err(|problem| ConfigProblem {
        key: problem.key,
        message: problem.message,
    })
}
