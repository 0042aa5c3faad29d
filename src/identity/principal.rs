//! Who a session or lease is for: an X.509-SVID's SPIFFE ID, a verified
//! token's identity, or an agent (the actor) acting for a person (the
//! subject, whose token it presented).

use std::fmt;

use super::spiffe_id::SpiffeId;
use super::token::VerifiedToken;

#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    /// A client certificate (X.509-SVID).
    Svid(SpiffeId),
    /// A token: its SPIFFE ID (JWT-SVIDs) or `<issuer>:<sub>`.
    Token(Box<VerifiedToken>),
    /// An agent acting for a person (`on_behalf_of`).
    OnBehalf(Box<OnBehalf>),
}

/// An agent and the person it acts for.
#[derive(Debug, Clone, PartialEq)]
pub struct OnBehalf {
    pub actor: Actor,
    /// The person's token.
    pub subject: VerifiedToken,
}

/// How the agent proved who it is.
#[derive(Debug, Clone, PartialEq)]
pub enum Actor {
    /// Its own X.509-SVID (mutual TLS).
    Svid(SpiffeId),
    /// The `act.sub` claim of the person's token (RFC 8693 token exchange):
    /// the token's issuer says this actor acts for the person.
    Act(String),
}

impl Actor {
    pub fn as_str(&self) -> &str {
        match self {
            Actor::Svid(id) => id.as_str(),
            Actor::Act(sub) => sub,
        }
    }

    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        match self {
            Actor::Svid(id) => Some(id.clone()),
            Actor::Act(sub) => SpiffeId::parse(sub).ok(),
        }
    }
}

impl Principal {
    /// A verified token's principal: the person, or, when the token has an
    /// RFC 8693 `act` claim, the actor it names acting for the person.
    pub fn from_token(token: VerifiedToken) -> Self {
        let actor = token
            .claims
            .get("act")
            .and_then(|act| act.get("sub"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        match actor {
            Some(actor) => Principal::OnBehalf(Box::new(OnBehalf {
                actor: Actor::Act(actor),
                subject: token,
            })),
            None => Principal::Token(Box::new(token)),
        }
    }

    /// The identity string audit, leases and metrics show (for an agent
    /// acting for a person: the agent).
    pub fn as_str(&self) -> &str {
        match self {
            Principal::Svid(id) => id.as_str(),
            Principal::Token(token) => &token.identity,
            Principal::OnBehalf(on_behalf) => on_behalf.actor.as_str(),
        }
    }

    /// The person an agent acts for (`corp:alice`), if it is one.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Principal::OnBehalf(on_behalf) => Some(&on_behalf.subject.identity),
            _ => None,
        }
    }

    /// The SPIFFE ID, for SVIDs and JWT-SVIDs; for an agent, the agent's.
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        match self {
            Principal::Svid(id) => Some(id.clone()),
            Principal::Token(token) => SpiffeId::parse(&token.identity).ok(),
            Principal::OnBehalf(on_behalf) => on_behalf.actor.spiffe_id(),
        }
    }

    /// The token the session presented (for an agent: the person's).
    pub fn token(&self) -> Option<&VerifiedToken> {
        match self {
            Principal::Svid(_) => None,
            Principal::Token(token) => Some(token),
            Principal::OnBehalf(on_behalf) => Some(&on_behalf.subject),
        }
    }

    /// An agent acting for a person.
    pub fn on_behalf(&self) -> Option<&OnBehalf> {
        match self {
            Principal::OnBehalf(on_behalf) => Some(on_behalf),
            _ => None,
        }
    }
}

impl From<SpiffeId> for Principal {
    fn from(id: SpiffeId) -> Self {
        Principal::Svid(id)
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
