//! Twilio request signatures for the WebSocket upgrade.
//!
//! `x-twilio-signature = base64(HMAC-SHA1(key = auth token, data = full wss:// URL))`.
//! The upgrade is a GET without a body, so nothing is appended to the URL.

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Header name Twilio uses on WebSocket upgrades (lower-case).
pub const SIGNATURE_HEADER: &str = "x-twilio-signature";

/// Computes the signature of `url` with `auth_token`.
pub fn signature(auth_token: &str, url: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(auth_token.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(url.as_bytes());
    base64_simd::STANDARD.encode_to_string(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed independently with Python:
    // base64.b64encode(hmac.new(key, url, hashlib.sha1).digest())
    #[test]
    fn matches_python_hmac() {
        assert_eq!(
            signature("12345", "wss://example.com/stream"),
            "KG4JbhDlv15BMlxSTOWKt9btbgg="
        );
        // A key longer than the SHA-1 block is hashed first.
        assert_eq!(
            signature(&"a".repeat(100), "wss://gw.example.net:443/stream"),
            "yiCmdawebdtnbxw1b2hNwKj9BXI="
        );
    }
}
