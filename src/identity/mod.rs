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
//!
//! A client without a certificate may instead send an identity token as
//! its password ([`token`]); either way the result is a [`Principal`].

mod principal;
mod spiffe_id;
mod svid;
mod tls_layer;
pub mod token;
pub mod workload_api;

pub use self::principal::{Actor, OnBehalf, Principal};
pub(crate) use self::spiffe_id::parse_spiffe_uri;
pub use self::spiffe_id::{SpiffeId, SpiffeIdError, MAX_SPIFFE_ID_LEN};
pub use self::svid::{IdentityError, SvidVerifier, TrustBundleError, VerifiedSvid};
pub use self::tls_layer::AcceptAnyClientCert;

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
