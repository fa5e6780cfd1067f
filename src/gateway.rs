//! Gateway tokens: the short-lived right to open one session's desktop through the hive's
//! WebSocket gateway (`GET /sessions/{pool}.{handle}/vnc?token=…`). A token names the pool, the
//! handle and the VM it was issued for and when it expires, signed with HMAC-SHA256; the
//! gateway checks the signature and the time here, then asks the pool that the handle still
//! holds that VM, so a token is worthless once its handle is released or has expired.
//!
//! The key is derived from the admin token, which every instance of one hive shares, so a token
//! issued by one instance opens the gateway on any other; without an admin token it is random
//! per process (one instance). Tokens are not secret from their session's user: they hold ids
//! that user already knows.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::domain::{HandleId, Millis, VmId};

type HmacSha256 = Hmac<Sha256>;

/// What a valid token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub pool: String,
    pub handle: HandleId,
    pub vm: VmId,
    pub expires_at: Millis,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a gateway token")]
    Malformed,
    #[error("the token's signature does not match (forged or from another hive)")]
    BadSignature,
    #[error("the token expired")]
    Expired,
}

pub struct GatewayKey([u8; 32]);

impl GatewayKey {
    pub fn new(admin_token: Option<&SecretString>) -> GatewayKey {
        match admin_token {
            Some(t) => {
                let mut h = Sha256::new();
                h.update(b"guaca-hive gateway tokens\0");
                h.update(t.expose_secret().as_bytes());
                GatewayKey(h.finalize().into())
            }
            None => GatewayKey(rand::random()),
        }
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(payload.as_bytes());
        m
    }

    /// `<pool>.<handle>.<vm>.<expires_at>.<hex HMAC>`; pool names hold no dots.
    pub fn issue(&self, g: &Grant) -> String {
        let payload = format!("{}.{}.{}.{}", g.pool, g.handle, g.vm, g.expires_at);
        let sig = hex::encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    pub fn verify(&self, token: &str, now: Millis) -> Result<Grant, TokenError> {
        let (payload, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let sig = hex::decode(sig).map_err(|_| TokenError::Malformed)?;
        // Constant-time comparison.
        self.mac(payload).verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
        let parts: Vec<&str> = payload.split('.').collect();
        let [pool, handle, vm, expires_at] = parts.as_slice() else { return Err(TokenError::Malformed) };
        let num = |s: &str| s.parse::<u64>().map_err(|_| TokenError::Malformed);
        let g = Grant { pool: pool.to_string(), handle: num(handle)?, vm: num(vm)?, expires_at: num(expires_at)? };
        if now >= g.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant { pool: "default".into(), handle: 7, vm: 3, expires_at: 10_000 }
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let key = GatewayKey::new(Some(&SecretString::from("admin-secret")));
        let t = key.issue(&grant());
        assert_eq!(key.verify(&t, 9_999), Ok(grant()));
        assert_eq!(key.verify(&t, 10_000), Err(TokenError::Expired));
    }

    #[test]
    fn instances_sharing_the_admin_token_accept_each_others_tokens() {
        let a = GatewayKey::new(Some(&SecretString::from("admin-secret")));
        let b = GatewayKey::new(Some(&SecretString::from("admin-secret")));
        let other = GatewayKey::new(Some(&SecretString::from("another hive")));
        let t = a.issue(&grant());
        assert_eq!(b.verify(&t, 0), Ok(grant()));
        assert_eq!(other.verify(&t, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn forged_and_altered_tokens_are_refused() {
        let key = GatewayKey::new(None);
        let t = key.issue(&grant());
        // Another handle, a later expiry, a flipped signature bit: all refused.
        for forged in [
            t.replacen("default.7.", "default.8.", 1),
            t.replacen(".10000.", ".99999999.", 1),
            format!("{}{}", &t[..t.len() - 1], if t.ends_with('0') { '1' } else { '0' }),
        ] {
            assert_eq!(key.verify(&forged, 0), Err(TokenError::BadSignature), "{forged}");
        }
        for junk in ["", "abc", "a.b.c.d.zz", "default.x.3.10.00"] {
            assert!(matches!(key.verify(junk, 0), Err(TokenError::Malformed | TokenError::BadSignature)), "{junk}");
        }
    }
}
