//! What this engine does to a static role: set a verifier and open its
//! login window, or close it. Nothing else about the role is ever changed.

use ephemera_engine::ScramSecret;
use ephemera_engine_postgres::sql::{quote_ident, quote_literal, Unquotable};
use time::OffsetDateTime;

/// `VALID UNTIL` of a closed role: long past.
pub const CLOSED: &str = "1970-01-01T00:00:00Z";

pub fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("a current timestamp formats as RFC 3339")
}

/// Let `secret`'s holder log in as `role` until `valid_until`.
pub fn open_sql(
    role: &str,
    secret: &ScramSecret,
    valid_until: OffsetDateTime,
) -> Result<String, Unquotable> {
    Ok(format!(
        "ALTER ROLE {} WITH PASSWORD {} VALID UNTIL {};\n",
        quote_ident(role)?,
        quote_literal(&secret.verifier())?,
        quote_literal(&rfc3339(valid_until))?
    ))
}

/// Nobody logs in as `role` any more: `VALID UNTIL` in the past and, with
/// `rotate`, a verifier of keys drawn here and forgotten at once.
pub fn close_sql(role: &str, rotate: bool) -> Result<String, Unquotable> {
    let role = quote_ident(role)?;
    let closed = quote_literal(CLOSED)?;
    Ok(if rotate {
        let nobody = ScramSecret::generate();
        format!(
            "ALTER ROLE {role} WITH PASSWORD {} VALID UNTIL {closed};\n",
            quote_literal(&nobody.verifier())?
        )
    } else {
        format!("ALTER ROLE {role} VALID UNTIL {closed};\n")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_verifiers_reach_the_statements() {
        let secret = ScramSecret::generate();
        let sql = open_sql("billing\"app", &secret, OffsetDateTime::UNIX_EPOCH).unwrap();
        assert!(
            sql.starts_with("ALTER ROLE \"billing\"\"app\" WITH PASSWORD 'SCRAM-SHA-256$1:"),
            "{sql}"
        );
        assert!(
            sql.ends_with("VALID UNTIL '1970-01-01T00:00:00Z';\n"),
            "{sql}"
        );
        let closed = close_sql("app", true).unwrap();
        assert!(closed.contains("PASSWORD 'SCRAM-SHA-256$1:"), "{closed}");
        assert_ne!(
            closed,
            close_sql("app", true).unwrap(),
            "fresh keys each time"
        );
        assert_eq!(
            close_sql("app", false).unwrap(),
            "ALTER ROLE \"app\" VALID UNTIL '1970-01-01T00:00:00Z';\n"
        );
    }
}
