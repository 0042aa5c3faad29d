//! `--token-file`: an identity token (a projected service-account token, a
//! JWT-SVID, an OIDC ID token) read from disk for every connection, and
//! sent as the password when Ephemera asks for one, inside TLS.

use std::fmt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest token file read (Ephemera's own limit is lower).
const MAX_TOKEN_FILE: u64 = 64 * 1024;
/// The largest first message from Ephemera that is read whole here.
const MAX_FIRST_MESSAGE: usize = 64 * 1024;
/// `AuthenticationCleartextPassword`'s code in an `R` message.
const CLEARTEXT_PASSWORD: [u8; 4] = [0, 0, 0, 3];

/// Why the token could not be read or sent.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the token file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("the token file {path} is empty")]
    Empty { path: PathBuf },
    #[error("the token file {path} is larger than {MAX_TOKEN_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("the token file {path} holds a NUL byte or is not UTF-8")]
    NotText { path: PathBuf },
    #[error("the connection to Ephemera failed during the password exchange: {0}")]
    Io(#[from] std::io::Error),
    #[error("Ephemera sent a malformed first message")]
    Malformed,
}

/// A token's text. `Debug` never shows it.
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The token file, read now (tokens rotate on disk).
pub fn read(path: &Path) -> Result<Token, TokenFileError> {
    let read_error = |e: std::io::Error| TokenFileError::Read {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let len = std::fs::metadata(path).map_err(read_error)?.len();
    if len > MAX_TOKEN_FILE {
        return Err(TokenFileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let bytes = std::fs::read(path).map_err(read_error)?;
    let text = String::from_utf8(bytes).map_err(|_| TokenFileError::NotText {
        path: path.to_owned(),
    })?;
    let token = text.trim();
    if token.contains('\0') {
        return Err(TokenFileError::NotText {
            path: path.to_owned(),
        });
    }
    if token.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(Token(token.to_owned()))
}

/// Read Ephemera's first message after the startup packet. A request for
/// a cleartext password is answered with `token` and consumed; anything
/// else is returned, to go to the application as it is.
pub async fn answer_password_request<S: AsyncRead + AsyncWrite + Unpin>(
    server: &mut S,
    token: &Token,
) -> Result<Option<Vec<u8>>, TokenFileError> {
    let mut header = [0u8; 5];
    server.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=MAX_FIRST_MESSAGE).contains(&len) {
        return Err(TokenFileError::Malformed);
    }
    let mut body = vec![0u8; len - 4];
    server.read_exact(&mut body).await?;
    if header[0] == b'R' && body == CLEARTEXT_PASSWORD {
        let mut answer = Vec::with_capacity(token.0.len() + 6);
        answer.push(b'p');
        let body_len = u32::try_from(token.0.len() + 5).map_err(|_| TokenFileError::Malformed)?;
        answer.extend_from_slice(&body_len.to_be_bytes());
        answer.extend_from_slice(token.0.as_bytes());
        answer.push(0);
        server.write_all(&answer).await?;
        server.flush().await?;
        return Ok(None);
    }
    let mut message = header.to_vec();
    message.extend_from_slice(&body);
    Ok(Some(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_never_prints_itself() {
        assert_eq!(format!("{:?}", Token("secret".into())), "Token(<redacted>)");
    }

    #[test]
    fn empty_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        assert!(read(&path).unwrap_err().to_string().contains("token"));
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(read(&path), Err(TokenFileError::Empty { .. })));
        std::fs::write(&path, "abc.def.ghi\n").unwrap();
        assert_eq!(read(&path).unwrap().0, "abc.def.ghi");
    }
}
