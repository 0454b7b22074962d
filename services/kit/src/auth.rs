//! Authentication: HS256 bearer tokens (claims `sub`, `iat`, `exp`) shared by every service, and
//! argon2id password hashing bounded so a burst of logins cannot exhaust memory or the runtime.

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation, decode, encode};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::ids::Id;

/// The shortest secret accepted for HS256 signing.
pub const MIN_SECRET_LEN: usize = 16;

/// Token claims: `sub` is the user id as a decimal string.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Subject: the user id, decimal.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The signing secret is too short.
    #[error("the JWT secret must be at least {MIN_SECRET_LEN} bytes")]
    WeakSecret,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// Signature, algorithm, structure or claims are wrong.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Signs and verifies tokens with one shared secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl TokenKeys {
    /// Keys for `secret`; issued tokens live for `ttl`.
    pub fn new(secret: &[u8], ttl: Duration) -> Result<Self, TokenError> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(TokenError::WeakSecret);
        }
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub", "iat"]);
        Ok(TokenKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        })
    }

    /// A token for `user` valid from now for the configured ttl.
    pub fn issue(&self, user: Id) -> String {
        let now = chrono::Utc::now().timestamp();
        self.issue_with(user, now, now + self.ttl.as_secs() as i64)
    }

    /// A token with explicit times (load generators and tests mint their own).
    pub fn issue_with(&self, user: Id, iat: i64, exp: i64) -> String {
        let claims = Claims {
            sub: user.to_string(),
            iat,
            exp,
        };
        // HS256 signing of a plain struct cannot fail: no key parsing, no fallible serializer.
        encode(&Header::default(), &claims, &self.encoding).unwrap_or_default()
    }

    /// The user a token speaks for.
    pub fn verify(&self, token: &str) -> Result<Id, TokenError> {
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => TokenError::Expired,
                    _ => TokenError::Invalid(e.to_string()),
                }
            })?;
        data.claims
            .sub
            .parse::<Id>()
            .map_err(|e| TokenError::Invalid(format!("sub: {e}")))
    }
}

/// The authenticated caller, taken from `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthUser(pub Id);

impl<S> FromRequestParts<S> for AuthUser
where
    Arc<TokenKeys>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let keys = Arc::<TokenKeys>::from_ref(state);
        let token = bearer_token(parts)?;
        match keys.verify(token) {
            Ok(id) => Ok(AuthUser(id)),
            Err(TokenError::Expired) => Err(ApiError::unauthorized("token expired")),
            Err(e) => Err(ApiError::unauthorized(e.to_string())),
        }
    }
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer_token(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts
        .headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?
        .to_str()
        .map_err(|_| ApiError::unauthorized("Authorization header is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::unauthorized(
            "expected `Authorization: Bearer <token>`",
        )),
    }
}

/// The bearer token, or `?token=` when there is no `Authorization` header: browsers cannot set
/// headers on WebSocket upgrades. Plain HTTP routes accept the header only, so tokens stay out
/// of URLs (and access logs) there.
pub fn bearer_or_query_token(parts: &Parts) -> Result<&str, ApiError> {
    if parts.headers.contains_key(AUTHORIZATION) {
        return bearer_token(parts);
    }
    parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("token=")))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("missing bearer token"))
}

/// argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
}

impl HashCost {
    /// OWASP's recommended argon2id minimum (19 MiB, 2 passes).
    pub const RECOMMENDED: HashCost = HashCost {
        memory_kib: 19 * 1024,
        iterations: 2,
    };
}

/// Why hashing failed.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// Cost parameters rejected by argon2.
    #[error("invalid argon2 parameters: {0}")]
    Params(String),
    /// The hashing task died.
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Hashes and verifies passwords on the blocking pool, at most `parallelism` at a time: each hash
/// holds `memory_kib` of RAM, so an unbounded burst of sign-ups could take the process down.
#[derive(Clone)]
pub struct Passwords {
    argon: Arc<Argon2<'static>>,
    permits: Arc<Semaphore>,
    /// A valid hash to verify against for unknown users, so a login for a handle that does not
    /// exist takes as long as one that does (no user enumeration by timing).
    decoy: Arc<String>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords").finish_non_exhaustive()
    }
}

impl Passwords {
    /// A hasher with the given cost, running at most `parallelism` hashes at once.
    pub fn new(cost: HashCost, parallelism: usize) -> Result<Self, PasswordError> {
        let params = Params::new(cost.memory_kib, cost.iterations, 1, None)
            .map_err(|e| PasswordError::Params(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let decoy = hash_with(&argon, "decoy password for unknown users")?;
        Ok(Passwords {
            argon: Arc::new(argon),
            permits: Arc::new(Semaphore::new(parallelism.max(1))),
            decoy: Arc::new(decoy),
        })
    }

    /// The PHC string for `password`.
    pub async fn hash(&self, password: &str) -> Result<String, PasswordError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| PasswordError::Hash(e.to_string()))?;
        let argon = Arc::clone(&self.argon);
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || hash_with(&argon, &password))
            .await
            .map_err(|e| PasswordError::Hash(e.to_string()))?
    }

    /// Whether `password` matches `phc`; `None` verifies against a decoy and returns false.
    pub async fn verify(&self, password: &str, phc: Option<&str>) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let argon = Arc::clone(&self.argon);
        let password = password.to_owned();
        let known = phc.is_some();
        let phc = phc.map_or_else(|| self.decoy.as_str().to_owned(), str::to_owned);
        tokio::task::spawn_blocking(move || {
            PasswordHash::new(&phc)
                .map(|parsed| argon.verify_password(password.as_bytes(), &parsed).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false)
            && known
    }
}

fn hash_with(argon: &Argon2<'_>, password: &str) -> Result<String, PasswordError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| PasswordError::Hash(e.to_string()))?;
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::new(b"0123456789abcdef-test", Duration::from_secs(60)).expect("keys")
    }

    #[test]
    fn token_round_trip() {
        let k = keys();
        let token = k.issue(Id(42));
        assert_eq!(k.verify(&token), Ok(Id(42)));
    }

    #[test]
    fn forged_expired_and_weak_are_refused() {
        let k = keys();
        let other =
            TokenKeys::new(b"another-secret-0123456", Duration::from_secs(60)).expect("keys");
        assert!(matches!(
            k.verify(&other.issue(Id(1))),
            Err(TokenError::Invalid(_))
        ));
        let now = chrono::Utc::now().timestamp();
        assert_eq!(
            k.verify(&k.issue_with(Id(1), now - 100, now - 60)),
            Err(TokenError::Expired)
        );
        assert!(matches!(
            k.verify("not.a.token"),
            Err(TokenError::Invalid(_))
        ));
        assert!(matches!(
            TokenKeys::new(b"short", Duration::from_secs(1)),
            Err(TokenError::WeakSecret)
        ));
    }

    fn parts(uri: &str, auth: Option<&str>) -> Parts {
        let mut req = axum::http::Request::builder().uri(uri);
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        req.body(()).expect("request").into_parts().0
    }

    #[test]
    fn tokens_come_from_the_header_and_for_websockets_the_query() {
        assert_eq!(bearer_token(&parts("/x", Some("Bearer abc"))), Ok("abc"));
        assert_eq!(bearer_token(&parts("/x", Some("bearer  abc "))), Ok("abc"));
        for bad in [Some("Basic abc"), Some("Bearer "), Some("abc"), None] {
            assert!(
                bearer_token(&parts("/x?token=abc", bad)).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            bearer_or_query_token(&parts("/ws?a=1&token=xyz", None)),
            Ok("xyz")
        );
        assert_eq!(
            bearer_or_query_token(&parts("/ws?token=xyz", Some("Bearer abc"))),
            Ok("abc")
        );
        assert!(bearer_or_query_token(&parts("/ws?token=", None)).is_err());
        assert!(bearer_or_query_token(&parts("/ws", None)).is_err());
    }

    #[tokio::test]
    async fn passwords_hash_and_verify() {
        let p = Passwords::new(
            HashCost {
                memory_kib: 1024,
                iterations: 1,
            },
            2,
        )
        .expect("params");
        let phc = p.hash("correct horse").await.expect("hash");
        assert!(phc.starts_with("$argon2id$"));
        assert!(p.verify("correct horse", Some(&phc)).await);
        assert!(!p.verify("wrong horse", Some(&phc)).await);
        assert!(!p.verify("correct horse", None).await);
        assert!(!p.verify("x", Some("not a phc string")).await);
    }
}
