//! Security end to end: wss:// with certificates made here (rcgen), certificate reload under a
//! live stream, X-Twilio-Signature on the upgrade, the signed `/twilio/status` and
//! `/twilio/voice` endpoints, handshake caps, and memory per wss stream. Real broker, real
//! gateway binary. Signatures are computed here from the documented formula, independently of
//! the gateway's code.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Empty;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SerialNumber};
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;

const ACCOUNT: &str = "AC00000000000000000000000000000009";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const TOKEN2: &str = "fedcba9876543210fedcba9876543210";
const PUBLIC: &str = "wss://gw.example.com/stream";

// ---- signatures, written from the documentation ----

fn hmac_b64(token: &str, data: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(token.as_bytes()).unwrap();
    mac.update(data.as_bytes());
    base64_simd::STANDARD.encode_to_string(mac.finalize().into_bytes())
}

/// Webhook signature: URL, then every field name+value sorted by name, no separators.
fn webhook_sig(token: &str, url: &str, fields: &[(&str, &str)]) -> String {
    let mut sorted = fields.to_vec();
    sorted.sort();
    let mut data = url.to_string();
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    hmac_b64(token, &data)
}

fn form_encode(fields: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".into(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

// ---- raw HTTP ----

struct HttpReply {
    status: u16,
    head: String,
    body: String,
}

/// Sends `request` and reads one response (head + Content-Length body), leaving keep-alive
/// connections alone.
fn raw_http(port: u16, request: &str) -> HttpReply {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            panic!("no response head: {:?}", String::from_utf8_lossy(&buf));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    HttpReply { status, head, body }
}

fn upgrade_request(path: &str, sig: Option<&str>) -> String {
    let sig = sig
        .map(|s| format!("X-Twilio-Signature: {s}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: gw.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         User-Agent: Twilio.TmeWs/1.0\r\n{sig}\r\n"
    )
}

fn webhook_request(method: &str, path_and_query: &str, sig: Option<&str>, body: &str) -> String {
    let sig = sig
        .map(|s| format!("X-Twilio-Signature: {s}\r\n"))
        .unwrap_or_default();
    let ct = if method == "POST" {
        "Content-Type: application/x-www-form-urlencoded; charset=utf-8\r\n"
    } else {
        ""
    };
    format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: gw.example.com\r\n{ct}{sig}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

// ---- WebSocket clients ----

fn ws_request(port: u16, scheme: &str, sig: Option<&str>) -> hyper::Request<Empty<Bytes>> {
    let mut b = twilio_upgrade_request(
        &format!("{scheme}://localhost:{port}/stream"),
        &format!("localhost:{port}"),
    );
    if let Some(s) = sig {
        b = b.header("X-Twilio-Signature", s);
    }
    b.body(Empty::new()).unwrap()
}

/// Plain ws:// client with an optional signature.
async fn connect_ws(port: u16, sig: Option<&str>) -> Result<Client, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut ws, _) =
        fastwebsockets::handshake::client(&SpawnExecutor, ws_request(port, "http", sig), tcp)
            .await
            .map_err(|e| e.to_string())?;
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    Ok(Client { ws })
}

/// wss:// client trusting `ca`; returns the client and the server's leaf certificate (DER).
async fn connect_wss(
    port: u16,
    ca: &CertificateDer<'static>,
    sig: Option<&str>,
) -> Result<(Client, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| e.to_string())?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
    let leaf = session.peer_certificates().ok_or("no peer certificate")?[0].to_vec();
    let (mut ws, _) =
        fastwebsockets::handshake::client(&SpawnExecutor, ws_request(port, "https", sig), tls)
            .await
            .map_err(|e| e.to_string())?;
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    Ok((Client { ws }, leaf))
}

// ---- certificates ----

struct Pki {
    ca_key: KeyPair,
    ca: rcgen::Certificate,
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "gateway test CA");
        let ca = p.self_signed(&ca_key).unwrap();
        let dir = std::env::temp_dir().join(format!("gw-sec-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Pki { ca_key, ca, dir }
    }
    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }
    fn cert_path(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    fn key_path(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    /// Issues a `localhost` leaf with `serial`, writes chain + key, returns the leaf DER.
    fn issue(&self, serial: u64) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.serial_number = Some(SerialNumber::from(serial));
        p.distinguished_name
            .push(DnType::CommonName, format!("leaf {serial}"));
        let leaf = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        write(
            &self.cert_path(),
            &format!("{}{}", leaf.pem(), self.ca.pem()),
        );
        write(&self.key_path(), &key.serialize_pem());
        leaf.der().to_vec()
    }
    fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert_path().display().to_string(),
            "--tls-key".into(),
            self.key_path().display().to_string(),
        ]
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn start_gateway(name: &str, args: &[String]) -> Gateway {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::start(name, &refs)
}

fn signed_args() -> Vec<String> {
    [
        "--twilio-auth-token",
        TOKEN,
        "--twilio-auth-token-secondary",
        TOKEN2,
        "--public-url",
        PUBLIC,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn chunk(audio: &[u8], offset: usize, k: usize) -> Vec<u8> {
    let start = (offset + k * 160) % (audio.len() - 160);
    audio[start..start + 160].to_vec()
}

/// Sends `media` chunks `from..to` (inbound) of stream `sid`; sequence = chunk + 1.
async fn send_media(
    c: &mut Client,
    sid: &str,
    audio: &[u8],
    offset: usize,
    from: usize,
    to: usize,
) {
    for k in from..to {
        let data = chunk(audio, offset, k);
        c.send(&media(
            sid,
            k as u64 + 2,
            "inbound",
            k as u64 + 1,
            k as u64 * 20,
            &data,
        ))
        .await;
    }
}

async fn finish(c: &mut Client, sid: &str, call: &str, seq: u64) {
    c.send(&stop(sid, seq, ACCOUNT, call)).await;
    c.close().await;
    let _ = c.read_close(Duration::from_secs(3)).await;
}

fn inbound_of(recs: &[Record], topic: &str, sid: &str) -> Vec<Vec<u8>> {
    let mut mine: Vec<&Record> = recs
        .iter()
        .filter(|r| r.topic == topic && r.key.as_deref() == Some(sid))
        .collect();
    mine.sort_by_key(|r| r.offset);
    mine.iter().map(|r| r.value.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_streams_bit_exact_and_certificate_reload_keeps_live_stream() {
    let pki = Pki::new("reload");
    let leaf1 = pki.issue(1001);
    let mut args = pki.args();
    args.extend(signed_args());
    let gw = start_gateway("wss", &args);
    let ca = pki.ca_der();
    let sig = hmac_b64(TOKEN, PUBLIC);
    let audio = speech();

    // Plain ws:// to a TLS listener fails the TLS handshake (counted).
    assert!(connect_ws(gw.port, Some(&sig)).await.is_err());

    // Stream A over wss, first half of its audio before the reload.
    let (sid_a, call_a) = (sid("MZ", 0xa), sid("CA", 0xa));
    let (mut a, seen) = connect_wss(gw.port, &ca, Some(&sig)).await.expect("wss A");
    assert_eq!(seen, leaf1, "first connection sees certificate 1");
    a.send(&connected()).await;
    a.send(&start(&sid_a, &call_a, ACCOUNT, &["inbound"], &[]))
        .await;
    send_media(&mut a, &sid_a, &audio, 0, 0, 50).await;

    // Rotate: new certificate in place, SIGHUP.
    let leaf2 = pki.issue(2002);
    assert_ne!(leaf1, leaf2);
    unsafe {
        libc::kill(gw.child.id() as i32, libc::SIGHUP);
    }
    let t = Instant::now();
    let (mut b, seen) = loop {
        let (c, seen) = connect_wss(gw.port, &ca, Some(&sig)).await.expect("wss B");
        if seen == leaf2 {
            break (c, seen);
        }
        assert!(t.elapsed() < Duration::from_secs(5), "reload not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seen, leaf2, "new connection sees certificate 2");

    // A continues on its original session; B streams on the new certificate.
    send_media(&mut a, &sid_a, &audio, 0, 50, 100).await;
    let (sid_b, call_b) = (sid("MZ", 0xb), sid("CA", 0xb));
    b.send(&start(&sid_b, &call_b, ACCOUNT, &["inbound"], &[]))
        .await;
    send_media(&mut b, &sid_b, &audio, 5000, 0, 30).await;
    finish(&mut a, &sid_a, &call_a, 102).await;
    finish(&mut b, &sid_b, &call_b, 32).await;

    let brokers = gw.brokers.clone();
    let tps = topics(&gw);
    let inbound = tps[0].clone();
    let keys = [sid_a.clone(), sid_b.clone()];
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(60), |r| {
            let keyed_events = r
                .iter()
                .filter(|x| x.topic.ends_with(".events"))
                .filter(|x| keys.iter().any(|k| x.key.as_deref() == Some(k)))
                .count();
            r.iter().filter(|x| x.topic.contains(".audio.")).count() >= 130 && keyed_events >= 4
        })
    })
    .await
    .unwrap();
    let got_a = inbound_of(&recs, &inbound, &sid_a);
    assert_eq!(
        got_a.len(),
        100,
        "stream A: every chunk, before and after the reload"
    );
    for (k, v) in got_a.iter().enumerate() {
        assert_eq!(*v, ulaw_to_pcm(&chunk(&audio, 0, k)), "A chunk {k}");
    }
    let got_b = inbound_of(&recs, &inbound, &sid_b);
    assert_eq!(got_b.len(), 30);
    for (k, v) in got_b.iter().enumerate() {
        assert_eq!(*v, ulaw_to_pcm(&chunk(&audio, 5000, k)), "B chunk {k}");
    }
    let types = |s: &str| -> Vec<String> {
        recs.iter()
            .filter(|r| r.topic.ends_with(".events") && r.key.as_deref() == Some(s))
            .map(|r| r.json()["type"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(types(&sid_a), ["start", "stop"]);
    assert_eq!(types(&sid_b), ["start", "stop"]);
    assert!(gw.metric("gateway_http_rejections_total{reason=\"tls_handshake\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_signature_accepts_valid_forms_and_refuses_the_rest() {
    let gw = start_gateway("sig", &signed_args());
    let audio = speech();

    // Valid: primary without port, primary with explicit :443, secondary token.
    let valid = [
        hmac_b64(TOKEN, "wss://gw.example.com/stream"),
        hmac_b64(TOKEN, "wss://gw.example.com:443/stream"),
        hmac_b64(TOKEN2, "wss://gw.example.com/stream"),
    ];
    let mut valid_sids = HashSet::new();
    for (i, sig) in valid.iter().enumerate() {
        let (s, call) = (sid("MZ", 0x500 + i as u64), sid("CA", 0x500 + i as u64));
        let mut c = connect_ws(gw.port, Some(sig))
            .await
            .expect("valid signature");
        c.send(&start(&s, &call, ACCOUNT, &["inbound"], &[])).await;
        send_media(&mut c, &s, &audio, 0, 0, 3).await;
        finish(&mut c, &s, &call, 5).await;
        valid_sids.insert(s);
    }

    // Refused before the upgrade.
    let cases: [(&str, Option<String>, u16); 6] = [
        ("/stream", None, 403),                                  // missing
        ("/stream", Some(hmac_b64("wrong-token", PUBLIC)), 403), // wrong token
        (
            "/stream",
            Some(hmac_b64(TOKEN, "wss://evil.example.com/stream")),
            403,
        ), // wrong URL
        (
            "/stream",
            Some(hmac_b64(TOKEN, "https://gw.example.com/stream")),
            403,
        ), // https form
        ("/stream", Some("not-base64!".into()), 403),            // garbage
        ("/other", Some(hmac_b64(TOKEN, PUBLIC)), 404),          // replay elsewhere
    ];
    for (path, sig, want) in &cases {
        let r = raw_http(gw.port, &upgrade_request(path, sig.as_deref()));
        assert_eq!(r.status, *want, "{path} {sig:?}: {}", r.head);
    }
    // A replay signed for another path is refused too.
    let r = raw_http(
        gw.port,
        &upgrade_request(
            "/stream",
            Some(&hmac_b64(TOKEN, "wss://gw.example.com/other")),
        ),
    );
    assert_eq!(r.status, 403);
    // And a valid raw upgrade really upgrades (the refusals above are not an artefact).
    let r = raw_http(gw.port, &upgrade_request("/stream", Some(&valid[0])));
    assert_eq!(r.status, 101, "{}", r.head);

    assert_eq!(
        gw.metric("gateway_signature_rejections_total{reason=\"missing\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("gateway_signature_rejections_total{reason=\"invalid\"}"),
        5.0
    );
    assert_eq!(
        gw.metric("gateway_http_rejections_total{reason=\"signature\"}"),
        6.0
    );
    assert_eq!(
        gw.metric("gateway_http_rejections_total{reason=\"not_found\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("gateway_messages_received_total{event=\"start\"}"),
        3.0
    );

    // Only the valid streams reached Kafka.
    let brokers = gw.brokers.clone();
    let tps = topics(&gw);
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &tps, Duration::from_secs(30), |r| {
            r.iter().filter(|x| x.topic.ends_with(".events")).count() >= 6
                && r.iter().filter(|x| x.topic.contains(".audio.")).count() >= 9
        })
    })
    .await
    .unwrap();
    let keys: HashSet<String> = recs.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(keys, valid_sids, "records only for validly signed streams");
    assert_eq!(
        recs.iter().filter(|r| r.topic.contains(".audio.")).count(),
        9
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_callback_and_twiml_are_signed_escaped_and_published() {
    let mut args = signed_args();
    args.extend([
        "--twiml-parameters".to_string(),
        "From,To,CallSid".to_string(),
    ]);
    let gw = start_gateway("hooks", &args);
    let status_url = "https://gw.example.com/twilio/status";
    let voice_url = "https://gw.example.com/twilio/voice";
    let hostile = "<>&\"' x+y=z%";
    let (sid1, sid2) = (sid("MZ", 0x51), sid("MZ", 0x52));
    let call = sid("CA", 0x51);

    // POST, signed (form fields sorted into the signature).
    let fields = [
        ("AccountSid", ACCOUNT),
        ("CallSid", call.as_str()),
        ("StreamSid", sid1.as_str()),
        ("StreamName", hostile),
        ("StreamEvent", "stream-error"),
        ("StreamError", "31920 handshake <failed>"),
        ("Timestamp", "2024-05-01T12:00:00.000Z"),
    ];
    let body = form_encode(&fields);
    let sig = webhook_sig(TOKEN, status_url, &fields);
    let r = raw_http(
        gw.port,
        &webhook_request("POST", "/twilio/status", Some(&sig), &body),
    );
    assert_eq!(r.status, 204, "{}{}", r.head, r.body);

    // GET, signed over the URL with its query string (secondary token, explicit :443).
    let query = form_encode(&[
        ("StreamSid", sid2.as_str()),
        ("CallSid", call.as_str()),
        ("AccountSid", ACCOUNT),
        ("StreamEvent", "stream-started"),
    ]);
    let sig_get = hmac_b64(
        TOKEN2,
        &format!("https://gw.example.com:443/twilio/status?{query}"),
    );
    let r = raw_http(
        gw.port,
        &webhook_request(
            "GET",
            &format!("/twilio/status?{query}"),
            Some(&sig_get),
            "",
        ),
    );
    assert_eq!(r.status, 204, "{}{}", r.head, r.body);

    // Refused: unsigned, wrong token, tampered body, signed for another endpoint, malformed.
    let other_sid = sid("MZ", 0x66);
    let bad_fields = [
        ("StreamSid", other_sid.as_str()),
        ("StreamEvent", "stream-stopped"),
    ];
    let bad_body = form_encode(&bad_fields);
    let refused = [
        (None, bad_body.clone(), 403),
        (
            Some(webhook_sig("nope", status_url, &bad_fields)),
            bad_body.clone(),
            403,
        ),
        (Some(sig.clone()), bad_body.clone(), 403),
        (
            Some(webhook_sig(TOKEN, voice_url, &bad_fields)),
            bad_body.clone(),
            403,
        ),
        (Some(sig.clone()), "StreamSid=%zz".to_string(), 400),
    ];
    for (s, b, want) in &refused {
        let r = raw_http(
            gw.port,
            &webhook_request("POST", "/twilio/status", s.as_deref(), b),
        );
        assert_eq!(r.status, *want, "{s:?} {b}: {}", r.head);
    }
    let r = raw_http(
        gw.port,
        &webhook_request("PUT", "/twilio/status", Some(&sig), &body),
    );
    assert_eq!(r.status, 405);

    // TwiML, POST signed, hostile values escaped.
    let vfields = [
        ("CallSid", call.as_str()),
        ("From", hostile),
        ("To", "+15550001111"),
        ("AccountSid", ACCOUNT),
    ];
    let vsig = webhook_sig(TOKEN, voice_url, &vfields);
    let r = raw_http(
        gw.port,
        &webhook_request("POST", "/twilio/voice", Some(&vsig), &form_encode(&vfields)),
    );
    assert_eq!(r.status, 200, "{}{}", r.head, r.body);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: text/xml"),
        "{}",
        r.head
    );
    let want = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Start><Stream url=\"{PUBLIC}\" \
         track=\"inbound_track\" statusCallback=\"{status_url}\" statusCallbackMethod=\"POST\">\
         <Parameter name=\"From\" value=\"&lt;&gt;&amp;&quot;&apos; x+y=z%\"/>\
         <Parameter name=\"To\" value=\"+15550001111\"/><Parameter name=\"CallSid\" value=\"{call}\"/>\
         </Stream></Start><Pause length=\"60\"/></Response>"
    );
    assert_eq!(r.body, want);
    // TwiML unsigned → 403; GET signed with the query → 200.
    let r = raw_http(
        gw.port,
        &webhook_request("POST", "/twilio/voice", None, &form_encode(&vfields)),
    );
    assert_eq!(r.status, 403);
    let q = form_encode(&[("From", "+1555"), ("CallSid", call.as_str())]);
    let gsig = hmac_b64(TOKEN, &format!("{voice_url}?{q}"));
    let r = raw_http(
        gw.port,
        &webhook_request("GET", &format!("/twilio/voice?{q}"), Some(&gsig), ""),
    );
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r
        .body
        .contains("<Parameter name=\"From\" value=\"+1555\"/>"));

    assert_eq!(
        gw.metric("gateway_signature_rejections_total{reason=\"missing\"}"),
        2.0
    );
    assert_eq!(
        gw.metric("gateway_signature_rejections_total{reason=\"invalid\"}"),
        3.0
    );
    assert_eq!(
        gw.metric("gateway_http_rejections_total{reason=\"bad_request\"}"),
        1.0
    );
    assert_eq!(
        gw.metric("gateway_events_published_total{type=\"status\"}"),
        2.0
    );

    // The status records, read back from the broker.
    let brokers = gw.brokers.clone();
    let events = vec![format!("{}.events", gw.prefix)];
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&brokers, &events, Duration::from_secs(30), |r| r.len() >= 2);
        // Then linger: a refused callback that leaked would show up as a third record.
        consume_until(&brokers, &events, Duration::from_secs(2), |r| r.len() >= 3)
    })
    .await
    .unwrap();
    assert_eq!(recs.len(), 2, "only the two signed callbacks are published");
    let by_key: HashMap<String, serde_json::Value> = recs
        .iter()
        .map(|r| (r.key.clone().unwrap(), r.json()))
        .collect();
    let e = &by_key[&sid1];
    assert_eq!(e["type"], "status");
    assert_eq!(e["stream_sid"], sid1.as_str());
    assert_eq!(e["call_sid"], call.as_str());
    assert_eq!(e["account_sid"], ACCOUNT);
    assert_eq!(e["stream_event"], "stream-error");
    assert_eq!(e["stream_error"], "31920 handshake <failed>");
    assert_eq!(e["stream_name"], hostile);
    assert_eq!(e["timestamp"], "2024-05-01T12:00:00.000Z");
    assert_eq!(e["gateway"], "gw-test");
    assert!(e["at_us"].as_u64().unwrap() > 1_600_000_000_000_000);
    let e = &by_key[&sid2];
    assert_eq!(e["stream_event"], "stream-started");
    assert_eq!(e["stream_error"], serde_json::Value::Null);
}

#[test]
fn handshake_caps_close_excess_connections() {
    // Rate: a burst of 5, then closed at accept.
    let gw = start_gateway("rate", &["--max-handshakes-per-second".into(), "5".into()]);
    let mut statuses = Vec::new();
    for _ in 0..15 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        statuses.push(buf.starts_with("HTTP/1.1 404"));
    }
    let served = statuses.iter().filter(|x| **x).count();
    assert!((5..=7).contains(&served), "served {served} of 15");
    assert!(gw.metric("gateway_http_rejections_total{reason=\"handshake_rate\"}") >= 8.0);

    // Concurrency: two connections sit in the handshake; the third is closed at once.
    let gw = start_gateway("conc", &["--max-concurrent-handshakes".into(), "2".into()]);
    let _idle: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        buf.is_empty(),
        "refused connection got {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(
        gw.metric("gateway_http_rejections_total{reason=\"handshake_concurrency\"}"),
        1.0
    );
}

#[test]
fn insecure_configurations_are_refused_at_startup() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(args)
            .env_remove("GATEWAY_TWILIO_AUTH_TOKEN")
            .output()
            .unwrap()
    };
    let out = run(&["print-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure-skip-signature"));
    let out = run(&["--twilio-auth-token", "tok-secret"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--public-url") && !err.contains("tok-secret"),
        "{err}"
    );
    let out = run(&[
        "--insecure-skip-signature",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
    ]);
    assert_eq!(out.status.code(), Some(64));
    let out = run(&[
        "--twilio-auth-token",
        "tok-secret",
        "--public-url",
        PUBLIC,
        "print-config",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        !printed.contains("tok-secret") && printed.contains(PUBLIC),
        "{printed}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Opens `n` live wss streams (started, some audio, held open) and returns them.
async fn open_wss_streams(
    port: u16,
    ca: &CertificateDer<'static>,
    sig: &str,
    base: u64,
    n: u64,
    audio: &[u8],
) -> Vec<Client> {
    let mut v = Vec::new();
    for i in 0..n {
        let s = sid("MZ", base + i);
        let (mut c, _) = connect_wss(port, ca, Some(sig)).await.expect("wss");
        c.send(&start(&s, &sid("CA", base + i), ACCOUNT, &["inbound"], &[]))
            .await;
        send_media(&mut c, &s, audio, i as usize * 160, 0, 5).await;
        v.push(c);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_live_wss_stream_is_under_64_kib() {
    let pki = Pki::new("mem");
    pki.issue(7);
    let mut args = pki.args();
    args.extend(signed_args());
    args.extend(
        ["--idle-timeout", "120s", "--ping-interval", "0"]
            .iter()
            .map(|s| s.to_string()),
    );
    let gw = start_gateway("mem", &args);
    let ca = pki.ca_der();
    let sig = hmac_b64(TOKEN, PUBLIC);
    let audio = speech();
    let pid = gw.child.id();

    // Warm up (allocator arenas, producer buffers, thread stacks), then measure a batch.
    let warm = open_wss_streams(gw.port, &ca, &sig, 0x10000, 50, &audio).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = rss_kib(pid);
    let n: u64 = std::env::var("GATEWAY_TEST_MEM_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let mut batch = open_wss_streams(gw.port, &ca, &sig, 0x20000, n, &audio).await;
    // A second round of audio on every stream, so each one's buffers are in use when measured.
    for (i, c) in batch.iter_mut().enumerate() {
        let s = sid("MZ", 0x20000 + i as u64);
        send_media(c, &s, &audio, i * 160, 5, 10).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = rss_kib(pid);
    assert_eq!(
        gw.metric("gateway_open_streams"),
        (50 + n) as f64,
        "every stream is live while measured"
    );
    let per_stream = (after.saturating_sub(before)) as f64 / n as f64;
    eprintln!(
        "memory per live wss stream: {per_stream:.1} KiB (RSS {before} KiB -> {after} KiB over {n} streams)"
    );
    assert!(per_stream <= 64.0, "{per_stream:.1} KiB per wss stream");
    drop(batch);
    drop(warm);
}
