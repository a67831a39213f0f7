//! `X-Twilio-Signature`: `base64(HMAC-SHA1(key = auth token, data))`.
//!
//! - WebSocket upgrade: `data` = the public `wss://` URL (a GET: nothing appended).
//! - Webhooks: `data` = the public `https://` URL (with `?query` when there is one) followed by
//!   every POST field name and value, sorted by name, without separators.
//!
//! Verification decodes the header once and compares MACs with `hmac`'s constant-time
//! `verify_slice`, for each token (primary, then secondary) and each URL form.

use hmac::{Hmac, Mac};
use sha1::Sha1;

use super::config::Secret;

type HmacSha1 = Hmac<Sha1>;

/// Why a signature was refused (the `reason` label of `gateway_signature_rejections_total`).
pub use crate::metrics::SignatureRejection as Rejection;

/// The configured auth tokens (primary first). Holds secrets: no `Debug`.
pub struct SignatureValidator {
    tokens: Vec<Secret>,
}

/// HMAC-SHA1 of `parts` concatenated, keyed by `token`.
pub fn compute(token: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    let mut mac = HmacSha1::new_from_slice(token).expect("HMAC takes keys of any length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// The header value Twilio would send for `parts` under `token` (tests and tooling).
pub fn sign(token: &[u8], parts: &[&[u8]]) -> String {
    base64_simd::STANDARD.encode_to_string(compute(token, parts))
}

/// What a webhook signature covers after the URL: `?query` (if any), then the POST fields
/// sorted by name (then value), each name immediately followed by its value.
pub fn webhook_suffix(query: Option<&str>, form: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    let mut sorted: Vec<&(String, String)> = form.iter().collect();
    sorted.sort();
    for (k, v) in sorted {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

impl SignatureValidator {
    /// `None` when no token is configured (signatures off).
    pub fn new(tokens: &[Secret]) -> Option<SignatureValidator> {
        if tokens.is_empty() {
            return None;
        }
        Some(SignatureValidator {
            tokens: tokens.to_vec(),
        })
    }

    /// Checks `header` against `HMAC(token, url + suffix)` for every token and URL form.
    pub fn verify(
        &self,
        header: Option<&[u8]>,
        urls: &[String],
        suffix: &[u8],
    ) -> Result<(), Rejection> {
        let header = header.ok_or(Rejection::Missing)?;
        let header = trim_ascii(header);
        if header.is_empty() {
            return Err(Rejection::Missing);
        }
        let given = base64_simd::STANDARD
            .decode_to_vec(header)
            .map_err(|_| Rejection::Invalid)?;
        if given.len() != 20 {
            return Err(Rejection::Invalid);
        }
        let mut ok = false;
        // Every combination is tried (no early exit) so timing does not tell which matched.
        for token in &self.tokens {
            for url in urls {
                let mut mac = HmacSha1::new_from_slice(token.expose().as_bytes())
                    .expect("HMAC takes keys of any length");
                mac.update(url.as_bytes());
                mac.update(suffix);
                ok |= mac.verify_slice(&given).is_ok();
            }
        }
        if ok {
            Ok(())
        } else {
            Err(Rejection::Invalid)
        }
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls() -> Vec<String> {
        vec![
            "wss://gw.example.com/stream".into(),
            "wss://gw.example.com:443/stream".into(),
        ]
    }

    #[test]
    fn known_vector() {
        // Twilio's documented example (security docs), also what python3's hmac module gives.
        let form: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let suffix = webhook_suffix(Some("foo=1&bar=2"), &form);
        let sig = sign(b"12345", &[b"https://mycompany.com/myapp.php", &suffix]);
        assert_eq!(sig, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
    }

    #[test]
    fn primary_secondary_missing_invalid() {
        let v =
            SignatureValidator::new(&[Secret::new("primary"), Secret::new("secondary")]).unwrap();
        for token in ["primary", "secondary"] {
            for url in urls() {
                let sig = sign(token.as_bytes(), &[url.as_bytes()]);
                assert_eq!(v.verify(Some(sig.as_bytes()), &urls(), b""), Ok(()));
            }
        }
        assert_eq!(v.verify(None, &urls(), b""), Err(Rejection::Missing));
        assert_eq!(v.verify(Some(b"  "), &urls(), b""), Err(Rejection::Missing));
        let wrong = sign(b"other", &[b"wss://gw.example.com/stream"]);
        assert_eq!(
            v.verify(Some(wrong.as_bytes()), &urls(), b""),
            Err(Rejection::Invalid)
        );
        let wrong_url = sign(b"primary", &[b"wss://evil.example.com/stream"]);
        assert_eq!(
            v.verify(Some(wrong_url.as_bytes()), &urls(), b""),
            Err(Rejection::Invalid)
        );
        assert_eq!(
            v.verify(Some(b"not base64!"), &urls(), b""),
            Err(Rejection::Invalid)
        );
        assert_eq!(
            v.verify(Some(b"AAAA"), &urls(), b""),
            Err(Rejection::Invalid)
        );
        assert!(SignatureValidator::new(&[]).is_none());
    }
}
