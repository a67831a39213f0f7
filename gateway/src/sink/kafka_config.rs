//! Kafka client configuration shared by every client the gateway creates.
//!
//! One source of truth: [`KafkaOptions`] holds `bootstrap.servers`, the user's `--kafka-option`
//! settings (security, networking, anything else) and knows which of them are secrets. The
//! producer, the admin client that creates topics, the metadata probe behind `/readyz`, the
//! playback consumer and `gateway tap` all start from [`KafkaOptions::client_config`], so a
//! SASL/SSL cluster works for all of them or none (issue: topic creation once used
//! `bootstrap.servers` only).
//!
//! Secrets (`sasl.password`, `ssl.key.password`, `sasl.oauthbearer.client.secret`, private
//! keys, ...) never print: `Debug`, `print-config`, and error messages built here show
//! `<redacted>`, and [`KafkaOptions::redact`] scrubs any text (librdkafka's own error strings
//! can quote a value) before it reaches a log or an exit message.

use std::fmt;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;

/// What prints in place of a secret value.
pub const REDACTED: &str = "<redacted>";

/// True for librdkafka properties whose values are credentials. librdkafka marks these
/// properties sensitive itself; the patterns also cover properties added in later versions.
pub fn is_sensitive(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.contains("passphrase")
        || k.contains("private.key")
        || k == "ssl.key.pem"
        || k == "ssl_key"
        || k == "sasl.oauthbearer.config"
        || k.ends_with(".token")
}

/// One `key=value` setting.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaOption {
    /// librdkafka property name.
    pub key: String,
    /// Its value (a secret when [`is_sensitive`] says so).
    pub value: String,
}

impl KafkaOption {
    /// The value as it may be shown.
    pub fn shown_value(&self) -> &str {
        if is_sensitive(&self.key) {
            REDACTED
        } else {
            &self.value
        }
    }
}

impl fmt::Debug for KafkaOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.shown_value())
    }
}

/// Parses one `key=value` (the value may contain `=` and `,`).
pub fn parse_option(kv: &str) -> Result<KafkaOption, String> {
    match kv.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok(KafkaOption {
            key: k.trim().to_owned(),
            value: v.trim().to_owned(),
        }),
        _ => {
            // Never echo the text: it may be a secret with a missing key.
            Err("must be key=value".to_owned())
        }
    }
}

/// Parses a Java-style properties text (`key=value` per line, `#`/`!` comments, blank lines):
/// the format of `--kafka-options-file` and of the newline-separated `GATEWAY_KAFKA_OPTIONS`.
pub fn parse_properties(text: &str) -> Result<Vec<KafkaOption>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        match parse_option(line) {
            Ok(o) => out.push(o),
            Err(e) => return Err(format!("line {}: {e}", n + 1)),
        }
    }
    Ok(out)
}

/// Connection, security and tuning settings for every Kafka client of the process.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KafkaOptions {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// User settings in the order given (later ones win in librdkafka).
    pub options: Vec<KafkaOption>,
}

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaOptions")
            .field("brokers", &self.brokers)
            .field("options", &self.options)
            .finish()
    }
}

impl KafkaOptions {
    /// Options for `brokers` with no extra settings.
    pub fn new(brokers: impl Into<String>) -> KafkaOptions {
        KafkaOptions {
            brokers: brokers.into(),
            options: Vec::new(),
        }
    }

    /// Adds a setting (builder style, for tests and embedders).
    pub fn with(mut self, key: &str, value: &str) -> KafkaOptions {
        self.options.push(KafkaOption {
            key: key.to_owned(),
            value: value.to_owned(),
        });
        self
    }

    /// The last value given for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|o| o.key == key)
            .map(|o| o.value.as_str())
    }

    /// The base configuration of any client: bootstrap servers plus every user setting.
    /// Producer-only or consumer-only settings given by the user reach the other clients too;
    /// librdkafka ignores them there with a warning, which beats silently dropping a security
    /// setting that a prefix filter did not know about.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for o in &self.options {
            c.set(&o.key, &o.value);
        }
        c
    }

    /// Like [`Self::client_config`] with the gateway's own `defaults` first, so the user's
    /// settings override them.
    pub fn client_config_with(&self, defaults: &[(&str, String)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            c.set(*k, v);
        }
        for o in &self.options {
            c.set(&o.key, &o.value);
        }
        c
    }

    /// `text` with every secret value replaced by [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for o in &self.options {
            if is_sensitive(&o.key) && !o.value.is_empty() {
                out = out.replace(&o.value, REDACTED);
            }
        }
        out
    }

    /// A client creation error as text safe to log (rust-rdkafka's `ClientConfig` error
    /// quotes the offending value).
    pub fn describe_error(&self, e: &KafkaError) -> String {
        match e {
            KafkaError::ClientConfig(_, desc, key, value) => {
                let shown = if is_sensitive(key) {
                    REDACTED.to_owned()
                } else {
                    value.clone()
                };
                self.redact(&format!("invalid setting {key}={shown}: {desc}"))
            }
            other => self.redact(&other.to_string()),
        }
    }

    /// `[kafka_options]` lines for `print-config`, secrets redacted.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        if !self.options.is_empty() {
            s.push_str("\n[kafka_options]\n");
            for (i, o) in self.options.iter().enumerate() {
                // Later sources win (flag over env over file): only the value in effect is
                // written, since a TOML table cannot repeat a key.
                if self.options[i + 1..].iter().any(|later| later.key == o.key) {
                    continue;
                }
                // A redacted value is written as a comment: read back, the file must not set
                // a password to the literal `<redacted>`.
                let comment = if is_sensitive(&o.key) { "# " } else { "" };
                s.push_str(&format!(
                    "{comment}{} = {}\n",
                    crate::config::toml_string(&o.key),
                    crate::config::toml_string(o.shown_value())
                ));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_keys() {
        for k in [
            "sasl.password",
            "ssl.key.password",
            "sasl.oauthbearer.client.secret",
            "ssl.keystore.password",
            "ssl.key.pem",
            "ssl_key",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.assertion.private.key.passphrase",
        ] {
            assert!(is_sensitive(k), "{k}");
        }
        for k in [
            "sasl.username",
            "security.protocol",
            "debug",
            "sasl.oauthbearer.extensions",
        ] {
            assert!(!is_sensitive(k), "{k}");
        }
    }

    #[test]
    fn values_keep_commas_and_equals() {
        let o = parse_option("sasl.oauthbearer.extensions=a=1,b=2").unwrap();
        assert_eq!(o.key, "sasl.oauthbearer.extensions");
        assert_eq!(o.value, "a=1,b=2");
        let props =
            parse_properties("# c\n\ndebug=broker,topic\n ssl.cipher.suites = A:B,C \n").unwrap();
        assert_eq!(props.len(), 2);
        assert_eq!(props[0].value, "broker,topic");
        assert_eq!(props[1].value, "A:B,C");
        assert!(parse_properties("novalue\n")
            .unwrap_err()
            .contains("line 1"));
        assert!(!parse_option("hunter2").unwrap_err().contains("hunter2"));
    }

    #[test]
    fn secrets_never_show() {
        let o = KafkaOptions::new("b:9092")
            .with("sasl.username", "alice")
            .with("sasl.password", "hunter2")
            .with("ssl.key.password", "k3y");
        let shown = format!("{o:?}\n{}", o.to_toml());
        assert!(shown.contains("alice"));
        assert!(
            !shown.contains("hunter2") && !shown.contains("k3y"),
            "{shown}"
        );
        assert_eq!(
            o.redact("bad value hunter2 for k3y"),
            "bad value <redacted> for <redacted>"
        );
        let e = KafkaError::ClientConfig(
            rdkafka::types::RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
            "Invalid value".into(),
            "sasl.password".into(),
            "hunter2".into(),
        );
        assert!(!o.describe_error(&e).contains("hunter2"));
        // Every client gets the same security settings.
        let c = o.client_config();
        assert_eq!(c.get("sasl.password"), Some("hunter2"));
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
    }
}
