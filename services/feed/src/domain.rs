//! Input newtypes: parsed once at the edge, so the core never sees invalid data.

use loadlab_kit::ApiError;

/// A user handle: 3–32 characters of `a-z`, `0-9`, `_`, stored lower-case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle(String);

impl Handle {
    /// Validates and normalises (lower-cases) a handle.
    pub fn parse(raw: &str) -> Result<Handle, ApiError> {
        let lowered = raw.to_ascii_lowercase();
        let ok = (3..=32).contains(&lowered.len())
            && lowered
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(Handle(lowered))
        } else {
            Err(ApiError::unprocessable(
                "invalid_handle",
                "handle must be 3-32 characters of a-z, 0-9 and _",
            ))
        }
    }

    /// The normalised handle.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A password: 8–256 characters.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(…)")
    }
}

impl Password {
    /// Validates a new password.
    pub fn parse(raw: &str) -> Result<Password, ApiError> {
        let n = raw.chars().count();
        if (8..=256).contains(&n) {
            Ok(Password(raw.to_owned()))
        } else {
            Err(ApiError::unprocessable(
                "invalid_password",
                "password must be 8-256 characters",
            ))
        }
    }

    /// The password.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A post body: non-blank, at most the configured number of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostBody(String);

impl PostBody {
    /// Validates a post body against `max_chars`.
    pub fn parse(raw: &str, max_chars: usize) -> Result<PostBody, ApiError> {
        if raw.trim().is_empty() {
            return Err(ApiError::unprocessable(
                "empty_post",
                "post body must not be empty",
            ));
        }
        let n = raw.chars().count();
        if n > max_chars {
            return Err(ApiError::unprocessable(
                "post_too_long",
                format!("post body is {n} characters; the limit is {max_chars}"),
            ));
        }
        Ok(PostBody(raw.to_owned()))
    }

    /// The text.
    pub fn into_inner(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles() {
        assert_eq!(
            Handle::parse("Alice_01").expect("valid").as_str(),
            "alice_01"
        );
        for bad in ["ab", "", "with space", "émile", "a-b-c", &"x".repeat(33)] {
            assert!(Handle::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn post_bodies_count_characters_not_bytes() {
        assert!(PostBody::parse(&"é".repeat(2_000), 2_000).is_ok());
        let err = PostBody::parse(&"é".repeat(2_001), 2_000).expect_err("too long");
        assert_eq!(err.code, "post_too_long");
        assert_eq!(
            PostBody::parse("  \n", 10).expect_err("blank").code,
            "empty_post"
        );
    }

    #[test]
    fn passwords() {
        assert!(Password::parse("12345678").is_ok());
        assert!(Password::parse("1234567").is_err());
        assert_eq!(
            format!("{:?}", Password::parse("secret-pw").expect("ok")),
            "Password(…)"
        );
    }
}
