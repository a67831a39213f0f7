//! TwiML for `/twilio/voice`: point the call's audio at this gateway.
//!
//! ```xml
//! <Response><Start><Stream url="wss://…/stream" track="inbound_track"
//!   statusCallback="https://…/twilio/status"><Parameter name="From" value="…"/></Stream></Start>
//!   <Pause length="60"/></Response>
//! ```
//! `--twiml-mode connect` uses `<Connect><Stream>` (bidirectional; Twilio only supports the
//! inbound track there, so no `track` attribute). Every attribute value is XML-escaped.

use std::fmt;

/// `<Start>` (one-way fork) or `<Connect>` (bidirectional, the call waits on the stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TwimlMode {
    /// `<Start><Stream>`.
    #[default]
    Start,
    /// `<Connect><Stream>`.
    Connect,
}

/// The verb after the stream element (`--twiml-then`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThenVerb {
    /// `<Pause length="N"/>`: keeps a one-way call (and its stream) up for N seconds.
    Pause(u32),
    /// `<Hangup/>`.
    Hangup,
    /// Nothing.
    None,
}

impl ThenVerb {
    /// Parses `pause:N` (1–14400), `hangup`, `none`.
    pub fn parse(s: &str) -> Option<ThenVerb> {
        match s.trim() {
            "hangup" => Some(ThenVerb::Hangup),
            "none" => Some(ThenVerb::None),
            other => {
                let n: u32 = other.strip_prefix("pause:")?.parse().ok()?;
                (1..=14_400).contains(&n).then_some(ThenVerb::Pause(n))
            }
        }
    }
}

impl fmt::Display for ThenVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThenVerb::Pause(n) => write!(f, "pause:{n}"),
            ThenVerb::Hangup => f.write_str("hangup"),
            ThenVerb::None => f.write_str("none"),
        }
    }
}

/// What `/twilio/voice` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwimlConfig {
    /// Start or Connect.
    pub mode: TwimlMode,
    /// `inbound_track`, `outbound_track` or `both_tracks` (Start only).
    pub track: String,
    /// Verb after the stream.
    pub then: ThenVerb,
    /// Webhook fields copied into `<Parameter>`s, in this order (missing ones skipped).
    pub parameters: Vec<String>,
}

impl Default for TwimlConfig {
    fn default() -> Self {
        TwimlConfig {
            mode: TwimlMode::Start,
            track: "inbound_track".into(),
            then: ThenVerb::Pause(60),
            parameters: Vec::new(),
        }
    }
}

/// Appends `s` escaped for an XML attribute or text. Characters XML 1.0 forbids (controls
/// other than tab, CR, LF) are dropped rather than producing a document Twilio cannot parse.
pub fn escape_xml(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => {
                out.push_str("&#");
                out.push_str(&(c as u32).to_string());
                out.push(';');
            }
            c if c.is_control() || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
}

fn attr(out: &mut String, name: &str, value: &str) {
    out.push(' ');
    out.push_str(name);
    out.push_str("=\"");
    escape_xml(value, out);
    out.push('"');
}

/// Renders the TwiML document. `fields` are the webhook's (decoded) form/query fields.
pub fn render(
    cfg: &TwimlConfig,
    stream_url: &str,
    status_url: &str,
    fields: &[(String, String)],
) -> String {
    let mut x = String::with_capacity(512);
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response>");
    let outer = match cfg.mode {
        TwimlMode::Start => "Start",
        TwimlMode::Connect => "Connect",
    };
    x.push('<');
    x.push_str(outer);
    x.push_str("><Stream");
    attr(&mut x, "url", stream_url);
    if cfg.mode == TwimlMode::Start {
        attr(&mut x, "track", &cfg.track);
    }
    attr(&mut x, "statusCallback", status_url);
    attr(&mut x, "statusCallbackMethod", "POST");
    x.push('>');
    for name in &cfg.parameters {
        if let Some((_, value)) = fields.iter().find(|(k, _)| k == name) {
            x.push_str("<Parameter");
            attr(&mut x, "name", name);
            attr(&mut x, "value", value);
            x.push_str("/>");
        }
    }
    x.push_str("</Stream></");
    x.push_str(outer);
    x.push('>');
    match cfg.then {
        ThenVerb::Pause(n) => x.push_str(&format!("<Pause length=\"{n}\"/>")),
        ThenVerb::Hangup => x.push_str("<Hangup/>"),
        ThenVerb::None => {}
    }
    x.push_str("</Response>");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn start_with_parameters_escaped() {
        let cfg = TwimlConfig {
            parameters: vec!["From".into(), "Missing".into(), "To".into()],
            ..TwimlConfig::default()
        };
        let x = render(
            &cfg,
            "wss://gw/stream",
            "https://gw/twilio/status",
            &f(&[("To", "<>&\"'"), ("From", "+1\u{1}23")]),
        );
        assert_eq!(
            x,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Start><Stream url=\"wss://gw/stream\" \
             track=\"inbound_track\" statusCallback=\"https://gw/twilio/status\" statusCallbackMethod=\"POST\">\
             <Parameter name=\"From\" value=\"+123\"/><Parameter name=\"To\" value=\"&lt;&gt;&amp;&quot;&apos;\"/>\
             </Stream></Start><Pause length=\"60\"/></Response>"
        );
    }

    #[test]
    fn connect_mode_and_then_verbs() {
        let cfg = TwimlConfig {
            mode: TwimlMode::Connect,
            then: ThenVerb::Hangup,
            ..TwimlConfig::default()
        };
        let x = render(&cfg, "wss://gw/s", "https://gw/twilio/status", &[]);
        assert!(x.contains("<Connect><Stream url=\"wss://gw/s\" statusCallback"));
        assert!(x.ends_with("</Stream></Connect><Hangup/></Response>"));
        assert_eq!(ThenVerb::parse("pause:5"), Some(ThenVerb::Pause(5)));
        assert_eq!(ThenVerb::parse("pause:0"), None);
        assert_eq!(ThenVerb::parse("none"), Some(ThenVerb::None));
        assert_eq!(ThenVerb::parse("sing"), None);
    }
}
