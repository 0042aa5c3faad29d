//! Role templates: what a minted role is made of, as the DBA configured it.

use crate::sql::{quote_ident, Quoted, Unquotable};

/// One `[templates.<name>]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleTemplate {
    /// The template's name; also part of every role name minted from it.
    pub name: String,
    /// The database sessions of this template connect to. Creation and
    /// revocation statements run there.
    pub database: String,
    /// Group roles the minted role joins; they carry the privileges.
    pub member_of: Vec<String>,
    /// Objects the session created are reassigned to this role on revoke.
    pub owner: Option<String>,
    /// Extra SQL run when the role is created, in the same transaction.
    pub creation_statements: Vec<String>,
    /// Extra SQL run before the role is dropped.
    pub revocation_statements: Vec<String>,
    /// With an `owner`: hand the session's large objects over too, instead
    /// of removing them (`keep_large_objects`, default false).
    pub keep_large_objects: bool,
}

/// The longest template name that still leaves room for the role-name prefix
/// and the random suffix within PostgreSQL's 63-byte identifiers.
pub const MAX_TEMPLATE_NAME_LEN: usize = 63 - ROLE_PREFIX.len() - 1 - RANDOM_SUFFIX_LEN;

/// Every role Ephemera creates starts with this; nothing else should.
pub const ROLE_PREFIX: &str = "eph_";

/// Length of the random part of a role name (base-36, ~93 bits).
pub const RANDOM_SUFFIX_LEN: usize = 18;

/// Is `name` usable as a template name? Lower-case ASCII letters, digits and
/// `_`, starting with a letter, short enough for role names. Returns why not.
pub fn check_template_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a template name cannot be empty".into());
    }
    if name.len() > MAX_TEMPLATE_NAME_LEN {
        return Err(format!(
            "a template name can be at most {MAX_TEMPLATE_NAME_LEN} characters (role names are limited to 63 bytes)"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(
            "a template name must start with a lower-case letter and use only a-z, 0-9 and _"
                .into(),
        );
    }
    Ok(())
}

/// Replace `{{name}}` and `{{database}}` in a template statement with the
/// quoted role and database identifiers.
pub fn render_statement(
    statement: &str,
    role: &Quoted,
    database: &str,
) -> Result<String, Unquotable> {
    let database = quote_ident(database)?;
    Ok(statement
        .replace("{{name}}", role.as_str())
        .replace("{{database}}", database.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_fit_role_names() {
        assert!(check_template_name("billing_rw").is_ok());
        assert!(check_template_name(&"a".repeat(MAX_TEMPLATE_NAME_LEN)).is_ok());
        assert!(check_template_name(&"a".repeat(MAX_TEMPLATE_NAME_LEN + 1)).is_err());
        for bad in ["", "Billing", "1abc", "a-b", "a\"b", "a b", "x;drop"] {
            assert!(check_template_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            ROLE_PREFIX.len() + MAX_TEMPLATE_NAME_LEN + 1 + RANDOM_SUFFIX_LEN,
            63
        );
    }

    #[test]
    fn statements_get_quoted_names() {
        let role = quote_ident("eph_t_x").unwrap();
        assert_eq!(
            render_statement(
                "GRANT CONNECT ON DATABASE {{database}} TO {{name}}",
                &role,
                "bill\"ing"
            )
            .unwrap(),
            "GRANT CONNECT ON DATABASE \"bill\"\"ing\" TO \"eph_t_x\""
        );
    }
}
