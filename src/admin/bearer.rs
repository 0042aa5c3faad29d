//! Callers without a client certificate: `Authorization: Bearer <token>`.
//!
//! With `[[tokens.issuer]]` configured, the admin API's TLS layer lets a
//! client in without a certificate (`ephemera exec --token-file`). Every
//! request of such a connection must then carry a token, verified as at
//! the PostgreSQL door (same issuers, same policy); it may ask for
//! credentials (`/v1/creds`) and renew or revoke its own standalone lease,
//! and nothing else. The token is a credential: it is never logged, and
//! refusals name the reason only.

use axum::http::{header, HeaderMap, StatusCode};

use super::{failure, Caller, Failure, Shared};
use crate::identity::token::{BearerToken, TokenError};
use crate::identity::Principal;
use crate::leases::Bound;

/// Who is calling: its SVID, or the token in `Authorization`.
pub(super) async fn principal(
    shared: &Shared,
    caller: &Caller,
    headers: &HeaderMap,
) -> Result<(Principal, Option<Bound>), Failure> {
    match caller {
        Caller::Verified(id) => Ok((Principal::Svid(id.clone()), None)),
        Caller::Invalid(reason) => Err(failure(
            StatusCode::FORBIDDEN,
            format!("the client certificate is not a valid X.509-SVID: {reason}"),
        )),
        Caller::Anonymous => {
            let token = bearer(headers)?;
            let tokens = shared.state.rules().tokens.clone();
            let verified = tokens.verify(&token).await.map_err(|e| {
                tracing::info!(reason = %e, "admin API bearer token refused");
                unauthorized(format!("the bearer token is refused: {e}"))
            })?;
            let bound = verified
                .bind_to_expiry
                .then_some(Bound::Token(verified.expires_at));
            Ok((Principal::from_token(verified), bound))
        }
    }
}

/// The token of `Authorization: Bearer …`, or a 401 saying what to send.
fn bearer(headers: &HeaderMap) -> Result<BearerToken, Failure> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "no client certificate and no token: present an X.509-SVID, or send \
             Authorization: Bearer <identity token>"
                .to_owned(),
        ));
    };
    let text = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or_else(|| {
            unauthorized("the Authorization header must be \"Bearer <identity token>\"".to_owned())
        })?;
    BearerToken::new(text.to_owned())
        .map_err(|e: TokenError| unauthorized(format!("the bearer token is refused: {e}")))
}

pub(super) fn unauthorized(message: String) -> Failure {
    failure(StatusCode::UNAUTHORIZED, message)
}

/// A `single_use` issuer's token opens one lease, across replicas (as at
/// the PostgreSQL door); renewing and revoking do not count.
pub(super) async fn claim_single_use(
    shared: &Shared,
    principal: &Principal,
    template: &str,
) -> Result<(), Failure> {
    let Some(token) = principal.token() else {
        return Ok(());
    };
    let Some(key) = &token.single_use_key else {
        return Ok(());
    };
    match shared
        .state
        .leases
        .claim_token_use(template, key, token.expires_at)
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err(unauthorized(
            TokenError::Replayed(token.issuer.clone()).to_string(),
        )),
        Err(e) => Err(e.into()),
    }
}
