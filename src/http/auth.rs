//! Bearer tokens: the admin token check (compared in constant time), and who is calling a
//! route open to users (the admin, or a user by their `hut_` token). Tokens are never logged.

use secrecy::ExposeSecret;

use warp::http::StatusCode;

use super::error::ApiError;
use crate::app::Hive;
use crate::domain::lifecycle::Caller;

/// Ok if `header` is `Bearer <admin token>`. With no token configured, admin routes are closed.
pub fn require_admin(hive: &Hive, header: Option<&str>) -> Result<(), ApiError> {
    let Some(token) = hive.admin_token() else { return Err(ApiError::Unauthorized) };
    let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.expose_secret().as_bytes()) { Ok(()) } else { Err(ApiError::Unauthorized) }
}

/// The admin (admin token) or the user whose token `header` carries.
pub async fn caller(hive: &Hive, header: Option<&str>) -> Result<Caller, ApiError> {
    if require_admin(hive, header).is_ok() {
        return Ok(Caller::Admin);
    }
    let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    hive.lifecycle().authenticate(given).await.ok_or_else(|| ApiError::Refused {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthorized",
        message: "this route needs a user's token or the admin token (Authorization: Bearer …)".into(),
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares_exactly() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"abcd"));
    }
}
