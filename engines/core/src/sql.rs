//! The one place where names and values become SQL text.
//!
//! Every identifier (role, database, group) and every literal that Ephemera
//! puts into a statement goes through [`quote_ident`] or [`quote_literal`].
//! Do not `format!` names into SQL anywhere else. Where a value can be a bind
//! parameter (`$1`), prefer that; these helpers exist for the statements
//! PostgreSQL does not accept parameters in (`CREATE ROLE`, `COMMENT ON`,
//! `GRANT`, …).

use std::fmt;

/// A string that cannot be quoted: PostgreSQL text cannot contain NUL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} contains a NUL byte, which PostgreSQL cannot store")]
pub struct Unquotable {
    pub what: &'static str,
}

/// A quoted SQL fragment, safe to splice into a statement.
#[derive(Clone, PartialEq, Eq)]
pub struct Quoted(String);

impl Quoted {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Quote an identifier: always double-quoted, embedded `"` doubled. Always
/// quoting (unlike PostgreSQL's `quote_ident`) means case is preserved and no
/// keyword can change the statement.
pub fn quote_ident(name: &str) -> Result<Quoted, Unquotable> {
    if name.contains('\0') {
        return Err(Unquotable { what: "identifier" });
    }
    Ok(Quoted(format!("\"{}\"", name.replace('"', "\"\""))))
}

/// A name exactly as PostgreSQL printed it for a `regclass` or
/// `regprocedure` value (with `search_path` empty, so always
/// schema-qualified): the server has quoted each part already, the same way
/// it parses them back. The only way names read from the catalog reach SQL
/// text other than through [`quote_ident`].
pub fn printed_by_server(name: &str) -> Result<Quoted, Unquotable> {
    if name.contains('\0') {
        return Err(Unquotable { what: "name" });
    }
    Ok(Quoted(name.to_owned()))
}

/// Quote a literal: `'…'` with `'` doubled. If the text contains a backslash
/// the `E'…'` form is used with backslashes doubled too, so the result means
/// the same whatever `standard_conforming_strings` is set to.
pub fn quote_literal(value: &str) -> Result<Quoted, Unquotable> {
    if value.contains('\0') {
        return Err(Unquotable { what: "literal" });
    }
    let escaped = value.replace('\'', "''");
    Ok(Quoted(if escaped.contains('\\') {
        format!("E'{}'", escaped.replace('\\', "\\\\"))
    } else {
        format!("'{escaped}'")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted_and_quotes_doubled() {
        assert_eq!(
            quote_ident("billing_rw").unwrap().as_str(),
            "\"billing_rw\""
        );
        assert_eq!(
            quote_ident("Mixed Case").unwrap().as_str(),
            "\"Mixed Case\""
        );
        assert_eq!(
            quote_ident("x\"; DROP ROLE postgres; --").unwrap().as_str(),
            "\"x\"\"; DROP ROLE postgres; --\""
        );
        assert!(quote_ident("a\0b").is_err());
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(quote_literal("it's").unwrap().as_str(), "'it''s'");
        assert_eq!(quote_literal("a\\'b").unwrap().as_str(), "E'a\\\\''b'");
        assert_eq!(quote_literal("").unwrap().as_str(), "''");
        assert!(quote_literal("\0").is_err());
    }
}
