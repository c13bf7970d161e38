//! Build capabilities: what the coordinator gives a build instead of a storage key. A
//! capability names a build, the prefix of its project's cache and an expiry (the job's
//! timeout), signed with HMAC-SHA256 under a key derived from the storage secret — stateless,
//! so every coordinator replica (and a restarted one) verifies what another issued.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What a capability allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Claims {
    /// The build (`gitlab/<runner>/<job id>`), for the coordinator's log.
    pub(crate) build: String,
    /// The object-name prefix of the project's cache (ends with `/`).
    pub(crate) prefix: String,
    /// Seconds since the epoch after which it is refused.
    pub(crate) expires: u64,
}

/// Why a capability is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// Not of the form `claims.signature`, or not decodable.
    #[error("malformed cache capability")]
    Malformed,
    /// The signature does not match.
    #[error("cache capability signature does not match")]
    Signature,
    /// Past its expiry.
    #[error("cache capability expired")]
    Expired,
}

/// Issues and verifies capabilities.
#[derive(Clone)]
pub(crate) struct Capabilities {
    key: [u8; 32],
}

impl std::fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Capabilities { key: <redacted> }")
    }
}

type HmacSha256 = Hmac<Sha256>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Capabilities {
    /// Capabilities keyed from the storage `secret` (never the secret itself: a derived key).
    pub(crate) fn new(secret: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| {
            // HMAC takes keys of any length; this branch is never taken.
            HmacSha256::new_from_slice(b"kiln").expect("HMAC accepts any key length")
        });
        mac.update(b"kiln cache capability v1");
        Self {
            key: mac.finalize().into_bytes().into(),
        }
    }

    fn mac(&self, payload: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC accepts any key length");
        mac.update(payload);
        mac
    }

    /// A capability for `build` on `prefix`, valid for `lifetime`.
    pub(crate) fn issue(&self, build: &str, prefix: &str, lifetime: Duration) -> String {
        let claims = Claims {
            build: build.to_owned(),
            prefix: prefix.to_owned(),
            expires: now().saturating_add(lifetime.as_secs()),
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signature =
            URL_SAFE_NO_PAD.encode(self.mac(payload.as_bytes()).finalize().into_bytes());
        format!("{payload}.{signature}")
    }

    /// The claims of a valid, unexpired capability.
    ///
    /// # Errors
    /// Malformed, forged or expired.
    pub(crate) fn verify(&self, capability: &str) -> Result<Claims, CapabilityError> {
        let (payload, signature) = capability
            .split_once('.')
            .ok_or(CapabilityError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| CapabilityError::Malformed)?;
        self.mac(payload.as_bytes())
            .verify_slice(&signature)
            .map_err(|_| CapabilityError::Signature)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(CapabilityError::Malformed)?;
        if claims.expires < now() {
            return Err(CapabilityError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capability_verifies_under_the_same_secret_only_and_until_it_expires() {
        let issuer = Capabilities::new(b"the storage secret");
        let token = issuer.issue("gitlab/r/1", "kiln/project/7/", Duration::from_secs(60));
        let claims = issuer.verify(&token).unwrap();
        assert_eq!(claims.prefix, "kiln/project/7/");
        // Another replica with the same secret accepts it; another secret does not.
        assert!(
            Capabilities::new(b"the storage secret")
                .verify(&token)
                .is_ok()
        );
        assert_eq!(
            Capabilities::new(b"another secret").verify(&token),
            Err(CapabilityError::Signature)
        );
        // A build that edits its prefix breaks the signature.
        let (payload, signature) = token.split_once('.').unwrap();
        let mut claims: Claims =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims.prefix = "kiln/project/8/".into();
        let forged = format!(
            "{}.{signature}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert_eq!(issuer.verify(&forged), Err(CapabilityError::Signature));
        assert_eq!(issuer.verify("nonsense"), Err(CapabilityError::Malformed));
        let expired = issuer.issue("b", "p/", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(issuer.verify(&expired), Err(CapabilityError::Expired));
    }
}
