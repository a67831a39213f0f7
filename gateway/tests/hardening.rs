//! Production hardening, against the real gateway binary and broker: secrets never printed,
//! comma-valued librdkafka settings, the public URL checked against the WebSocket path,
//! signals at any time, refusals counted (431, handshake timeouts, 415), the allow-list,
//! trusted proxies (PROXY v1/v2, X-Forwarded-For), the per-source handshake cap, and
//! rate-limited logs.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const ACCOUNT: &str = "AC00000000000000000000000000000009";
const SECRET: &str = "hunter2-do-not-print";

fn gateway_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
}

fn output(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd.output().expect("run gateway");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn secrets_from_flags_env_and_file_are_redacted_everywhere() {
    let dir = std::env::temp_dir().join(format!("gw-secrets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("g.toml");
    std::fs::write(
        &toml,
        format!("[kafka_options]\n\"ssl.key.password\" = \"{SECRET}-file\"\n"),
    )
    .unwrap();
    let props = dir.join("client.properties");
    std::fs::write(
        &props,
        format!("sasl.oauthbearer.client.secret={SECRET}-props\n"),
    )
    .unwrap();
    let args = [
        "--insecure-skip-signature",
        "--config",
        toml.to_str().unwrap(),
        "--kafka-options-file",
        props.to_str().unwrap(),
        "--kafka-option",
        &format!("sasl.password={SECRET}-flag"),
        "--kafka-option",
        "sasl.username=alice",
    ];
    let env = format!("debug=broker,topic\nssl.keystore.password={SECRET}-env\n");
    // print-config: every source, all redacted, non-secrets shown as given.
    let (code, out, err) = output(
        gateway_bin()
            .args(args)
            .arg("print-config")
            .env("GATEWAY_KAFKA_OPTIONS", &env),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !out.contains(SECRET),
        "print-config leaked a secret:\n{out}"
    );
    for key in [
        "ssl.key.password",
        "sasl.oauthbearer.client.secret",
        "sasl.password",
        "ssl.keystore.password",
    ] {
        assert!(
            out.contains(&format!("\"{key}\" = \"<redacted>\"")),
            "{key} missing:\n{out}"
        );
    }
    assert!(out.contains("\"sasl.username\" = \"alice\""), "{out}");
    assert!(out.contains("\"debug\" = \"broker,topic\""), "{out}");
    // --help never shows environment values.
    let (_, out, err) = output(
        gateway_bin()
            .arg("--help")
            .env("GATEWAY_KAFKA_OPTIONS", &env)
            .env("GATEWAY_TWILIO_AUTH_TOKEN", SECRET),
    );
    assert!(!out.contains(SECRET) && !err.contains(SECRET), "{out}");
    // A configuration error about a secret names the key, never the value.
    let (code, _, err) = output(gateway_bin().args([
        "--insecure-skip-signature",
        "--kafka-option",
        &format!("{SECRET}-no-equals-sign"),
    ]));
    assert_eq!(code, Some(64));
    assert!(!err.contains(SECRET), "{err}");
    assert!(err.contains("--kafka-option"), "{err}");
    // Start-up: a client error from librdkafka and the logs at debug level stay clean.
    let (code, _, err) = output(
        gateway_bin()
            .args([
                "--insecure-skip-signature",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--kafka-option",
                &format!("sasl.password={SECRET}-flag"),
                "--kafka-option",
                "sasl.username=alice",
                "--kafka-option",
                "sasl.mechanism=NOT-A-MECHANISM",
                "--kafka-option",
                "security.protocol=sasl_plaintext",
            ])
            .env("GATEWAY_LOG_LEVEL", "debug")
            .env(
                "GATEWAY_KAFKA_OPTIONS",
                format!("ssl.key.password={SECRET}-env\n"),
            ),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("NOT-A-MECHANISM"), "{err}");
    assert!(!err.contains(SECRET), "a secret reached the logs:\n{err}");
}

#[test]
fn public_url_path_other_than_ws_path_exits_64_naming_both() {
    let (code, _, err) = output(gateway_bin().args([
        "--insecure-skip-signature",
        "--public-url",
        "wss://gw.example.com/stream/",
    ]));
    assert_eq!(code, Some(64));
    assert!(
        err.contains("\"/stream/\"") && err.contains("\"/stream\""),
        "{err}"
    );
}

fn alive(gw: &mut Gateway) -> bool {
    gw.child.try_wait().unwrap().is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_never_kills_a_plain_ws_gateway() {
    let mut gw = Gateway::start("hup", &[]);
    for _ in 0..3 {
        unsafe {
            libc::kill(gw.child.id() as i32, libc::SIGHUP);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(alive(&mut gw), "SIGHUP killed the gateway");
    assert_eq!(http_get(gw.admin_port, "/readyz").unwrap().0, 200);
    // Still serving streams.
    let s = sid("MZ", 9001);
    let mut c = connect(&gw).await;
    c.send(&start(&s, &sid("CA", 9001), ACCOUNT, &["inbound"], &[]))
        .await;
    c.send(&stop(&s, 2, ACCOUNT, &sid("CA", 9001))).await;
    c.close().await;
    assert!(c.read_close(Duration::from_secs(5)).await.is_some());
}

#[test]
fn sigterm_during_startup_exits_cleanly_and_fast() {
    // A broker address that accepts TCP but never answers: start-up waits on metadata.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut child = gateway_bin()
        .args([
            "--insecure-skip-signature",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--brokers",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(child.try_wait().unwrap().is_none(), "exited before SIGTERM");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(8), "did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "clean exit, not killed by the signal"
    );
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("during start-up"), "{err}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_skips_the_drain_timeout_and_flushes() {
    let mut gw = Gateway::start("twice", &["--drain-timeout", "120s"]);
    let audio = speech();
    let s = sid("MZ", 9100);
    let call = sid("CA", 9100);
    let mut c = connect(&gw).await;
    c.send(&start(&s, &call, ACCOUNT, &["inbound"], &[])).await;
    for k in 0..50u64 {
        c.send(&media(&s, k + 2, "inbound", k + 1, k * 20, &audio[..160]))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.sigterm();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(&mut gw), "the first SIGTERM drains, it does not exit");
    let t0 = Instant::now();
    gw.sigterm();
    let close = c.read_close(Duration::from_secs(10)).await;
    assert_eq!(close.map(|c| c.0), Some(1001));
    let (code, gw) =
        tokio::task::spawn_blocking(move || (gw.wait_exit(Duration::from_secs(30)), gw))
            .await
            .unwrap();
    assert_eq!(code, Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "waited out the drain timeout"
    );
    let (b, t) = (gw.brokers.clone(), topics(&gw));
    let recs = tokio::task::spawn_blocking(move || {
        consume_until(&b, &t, Duration::from_secs(20), |r| {
            count_events(r, "disconnect") >= 1
                && r.iter().filter(|x| x.topic.contains(".audio.")).count() >= 50
        })
    })
    .await
    .unwrap();
    let end = recs
        .iter()
        .find(|r| r.topic.ends_with(".events") && r.json()["type"] == "disconnect")
        .unwrap()
        .json();
    assert_eq!(end["reason"], "shutdown");
    assert_eq!(end["frames_delivered"], 50);
    assert_eq!(end["frames_dropped"], 0);
}

/// Sends raw bytes, returns what came back: up to the end of a response head, or everything
/// before EOF, or what arrived before the timeout.
fn raw(port: u16, bytes: &[u8], timeout: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if out.windows(4).any(|w| w == b"\r\n\r\n") {
            return out;
        }
    }
}

fn wait_metric(gw: &Gateway, series: &str, want: f64) {
    let t0 = Instant::now();
    while gw.metric(series) < want {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{series} = {} (want {want})",
            gw.metric(series)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn refusals_hyper_answers_and_handshake_timeouts_are_counted() {
    let gw = Gateway::start(
        "refusals",
        &["--handshake-timeout", "500ms", "--max-header-bytes", "8192"],
    );
    // An oversized head: hyper answers 431 itself.
    let big = format!(
        "GET /stream HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let out = raw(gw.port, big.as_bytes(), Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"));
    wait_metric(
        &gw,
        "gateway_http_rejections_total{reason=\"header_too_large\"}",
        1.0,
    );
    // A connection that never completes its request head.
    let out = raw(
        gw.port,
        b"GET /stream HTTP/1.1\r\nHost:",
        Duration::from_secs(5),
    );
    assert!(!String::from_utf8_lossy(&out).starts_with("HTTP/1.1 101"));
    wait_metric(
        &gw,
        "gateway_http_rejections_total{reason=\"handshake_timeout\"}",
        1.0,
    );
    // 415 is its own reason, not bad_request.
    let out = raw(
        gw.port,
        b"POST /twilio/status HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        Duration::from_secs(5),
    );
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 415"));
    wait_metric(
        &gw,
        "gateway_http_rejections_total{reason=\"unsupported_media_type\"}",
        1.0,
    );
    assert_eq!(
        gw.metric("gateway_http_rejections_total{reason=\"bad_request\"}"),
        0.0
    );
    // A head hyper cannot parse (a TLS ClientHello on the plain listener) gets its 400 and
    // is counted as a bad request.
    let out = raw(
        gw.port,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "{}",
        status_line(&out)
    );
    wait_metric(
        &gw,
        "gateway_http_rejections_total{reason=\"bad_request\"}",
        1.0,
    );
}

/// A Twilio upgrade request as raw bytes.
fn upgrade_bytes(port: u16) -> String {
    format!(
        "GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

fn status_line(out: &[u8]) -> String {
    String::from_utf8_lossy(out)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

/// RFC 6455 §4.2.2: an upgrade in a WebSocket version other than 13 is answered 426 with the
/// version this server speaks; one without the header, with a key that is not a base64 16-byte
/// nonce, or in HTTP/1.0 is malformed (400). All are counted.
#[test]
fn an_unsupported_websocket_version_gets_426_naming_13() {
    let gw = Gateway::start("wsver", &[]);
    let req =
        upgrade_bytes(gw.port).replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let out = raw(gw.port, req.as_bytes(), Duration::from_secs(5));
    let head = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 426"), "{head}");
    assert!(head.contains("\r\nsec-websocket-version: 13\r\n"), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    let req = upgrade_bytes(gw.port).replace("Sec-WebSocket-Version: 13\r\n", "");
    let out = raw(gw.port, req.as_bytes(), Duration::from_secs(5));
    assert_eq!(status_line(&out), "HTTP/1.1 400 Bad Request");
    // RFC 6455 §4.1: the key is a base64 16-byte nonce, and the handshake is HTTP/1.1+.
    let req = upgrade_bytes(gw.port).replace("dGhlIHNhbXBsZSBub25jZQ==", "abc");
    let out = raw(gw.port, req.as_bytes(), Duration::from_secs(5));
    assert_eq!(status_line(&out), "HTTP/1.1 400 Bad Request");
    let req = upgrade_bytes(gw.port).replace("HTTP/1.1\r\n", "HTTP/1.0\r\n");
    let out = raw(gw.port, req.as_bytes(), Duration::from_secs(5));
    assert!(
        status_line(&out).ends_with(" 400 Bad Request"),
        "{}",
        status_line(&out)
    );
    wait_metric(
        &gw,
        "gateway_http_rejections_total{reason=\"bad_upgrade\"}",
        4.0,
    );
    // Version 13 still upgrades.
    let out = raw(
        gw.port,
        upgrade_bytes(gw.port).as_bytes(),
        Duration::from_secs(2),
    );
    assert_eq!(status_line(&out), "HTTP/1.1 101 Switching Protocols");
}

#[test]
fn allow_list_is_checked_at_accept() {
    let gw = Gateway::start("deny", &["--allow-cidr", "192.0.2.0/24"]);
    let out = raw(
        gw.port,
        upgrade_bytes(gw.port).as_bytes(),
        Duration::from_secs(5),
    );
    assert!(
        out.is_empty(),
        "closed without a response: {}",
        status_line(&out)
    );
    wait_metric(
        &gw,
        "gateway_http_rejections_total{reason=\"not_allowed\"}",
        1.0,
    );
    let gw2 = Gateway::start("allow", &["--allow-cidr", "192.0.2.0/24,127.0.0.0/8"]);
    let out = raw(
        gw2.port,
        upgrade_bytes(gw2.port).as_bytes(),
        Duration::from_millis(500),
    );
    assert!(
        status_line(&out).starts_with("HTTP/1.1 101"),
        "{}",
        status_line(&out)
    );
}

fn proxy_v2(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v.extend_from_slice(&[0x21, 0x11, 0, 12]);
    v.extend_from_slice(&src);
    v.extend_from_slice(&[127, 0, 0, 1]);
    v.extend_from_slice(&port.to_be_bytes());
    v.extend_from_slice(&443u16.to_be_bytes());
    v
}

#[test]
fn trusted_proxies_name_the_client_with_proxy_headers_or_forwarded_for() {
    let gw = Gateway::start(
        "proxy",
        &[
            "--trusted-proxy",
            "127.0.0.1/32",
            "--allow-cidr",
            "198.51.100.0/24",
        ],
    );
    let up = upgrade_bytes(gw.port);
    // PROXY v1 naming an allowed client: upgraded.
    let v1 = format!("PROXY TCP4 198.51.100.7 127.0.0.1 40000 443\r\n{up}");
    let out = raw(gw.port, v1.as_bytes(), Duration::from_millis(500));
    assert!(
        status_line(&out).starts_with("HTTP/1.1 101"),
        "{}",
        status_line(&out)
    );
    // PROXY v2, allowed client.
    let mut v2 = proxy_v2([198, 51, 100, 9], 40001);
    v2.extend_from_slice(up.as_bytes());
    let out = raw(gw.port, &v2, Duration::from_millis(500));
    assert!(
        status_line(&out).starts_with("HTTP/1.1 101"),
        "{}",
        status_line(&out)
    );
    // A client outside the allow-list behind the proxy: closed, counted.
    let v1 = format!("PROXY TCP4 203.0.113.9 127.0.0.1 40002 443\r\n{up}");
    let out = raw(gw.port, v1.as_bytes(), Duration::from_secs(2));
    assert!(out.is_empty(), "{}", status_line(&out));
    wait_metric(
        &gw,
        "gateway_http_rejections_total{reason=\"not_allowed\"}",
        1.0,
    );
    // A malformed PROXY header: closed, counted.
    let out = raw(gw.port, b"PROXY TCP4 nonsense\r\n", Duration::from_secs(2));
    assert!(out.is_empty());
    wait_metric(
        &gw,
        "gateway_http_rejections_total{reason=\"proxy_protocol\"}",
        1.0,
    );
    // No PROXY header: X-Forwarded-For names the client (rightmost untrusted address).
    let hook = |xff: &str| {
        let body = "StreamSid=MZ00000000000000000000000000000077&StreamEvent=stream-started";
        format!(
            "POST /twilio/status HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {xff}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let out = raw(
        gw.port,
        hook("10.9.9.9, 198.51.100.20").as_bytes(),
        Duration::from_secs(5),
    );
    assert!(
        status_line(&out).starts_with("HTTP/1.1 204"),
        "{}",
        status_line(&out)
    );
    let out = raw(
        gw.port,
        hook("198.51.100.20, 203.0.113.1").as_bytes(),
        Duration::from_secs(5),
    );
    assert!(
        status_line(&out).starts_with("HTTP/1.1 403"),
        "{}",
        status_line(&out)
    );
    wait_metric(
        &gw,
        "gateway_http_rejections_total{reason=\"not_allowed\"}",
        2.0,
    );
}

#[test]
fn one_source_cannot_hold_every_handshake_permit() {
    let gw = Gateway::start(
        "persource",
        &[
            "--max-handshakes-per-source",
            "3",
            "--handshake-timeout",
            "3s",
        ],
    );
    // Three idle connections hold this source's permits...
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", gw.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // ...so a fourth is closed at accept and counted,
    let out = raw(
        gw.port,
        upgrade_bytes(gw.port).as_bytes(),
        Duration::from_secs(2),
    );
    assert!(out.is_empty(), "{}", status_line(&out));
    wait_metric(
        &gw,
        "gateway_http_rejections_total{reason=\"source_concurrency\"}",
        1.0,
    );
    // and once they are gone, the source is served again.
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let out = raw(
        gw.port,
        upgrade_bytes(gw.port).as_bytes(),
        Duration::from_millis(500),
    );
    assert!(
        status_line(&out).starts_with("HTTP/1.1 101"),
        "{}",
        status_line(&out)
    );
}

#[test]
fn a_flood_of_bad_signatures_is_logged_at_a_bounded_rate() {
    let port = free_port();
    let admin = free_port();
    let mut child = gateway_bin()
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--brokers",
            &brokers(),
            "--topic-prefix",
            &unique_prefix("sigflood"),
            "--twilio-auth-token",
            SECRET,
            "--public-url",
            &format!("ws://127.0.0.1:{port}/stream"),
        ])
        .env("GATEWAY_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while http_get(admin, "/readyz").map(|r| r.0).unwrap_or(0) != 200 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..200 {
        let out = raw(port, upgrade_bytes(port).as_bytes(), Duration::from_secs(2));
        assert!(status_line(&out).starts_with("HTTP/1.1 403"));
    }
    let metrics = http_get(admin, "/metrics").unwrap().1;
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.trim().parse().ok()))
            .unwrap_or(0.0)
    };
    assert_eq!(
        value("gateway_signature_rejections_total{reason=\"missing\"}"),
        200.0
    );
    let suppressed = value("gateway_log_lines_suppressed_total{site=\"signature\"}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let lines = err
        .lines()
        .filter(|l| l.contains("bad Twilio signature"))
        .count();
    assert!(lines <= 20, "{lines} log lines for 200 refusals");
    assert_eq!(
        lines as f64 + suppressed,
        200.0,
        "every refusal logged or counted"
    );
    assert!(!err.contains(SECRET));
}

/// Every Kafka client the gateway creates (producer, topic admin, metadata probe, playback
/// consumer, `tap`) is configured from the one `KafkaOptions`, so security settings reach all
/// of them. Checked two ways: no code builds a librdkafka configuration any other way, and the
/// configurations that are built carry the user's security settings. (The local broker's SASL
/// listener cannot be provisioned with users on its in-memory storage: creating a user needs
/// an authenticated connection; see docs/decisions.md.)
#[test]
fn every_kafka_client_is_configured_from_the_shared_options() {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&workspace_root().join("gateway/src"), &mut files);
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        if f.ends_with("sink/kafka_config.rs") {
            continue;
        }
        assert!(
            !text.contains("ClientConfig::new"),
            "{} builds a Kafka client configuration without KafkaOptions",
            f.display()
        );
    }
    let kafka = gateway::sink::kafka_config::KafkaOptions::new("b:9093")
        .with("security.protocol", "sasl_ssl")
        .with("sasl.mechanism", "SCRAM-SHA-512")
        .with("sasl.username", "alice")
        .with("sasl.password", SECRET);
    let mut sink = gateway::sink::SinkConfig::new("b:9093", "t");
    sink.kafka = kafka.clone();
    let configs = [
        ("producer", sink.producer_config()),
        ("admin / metadata / probe", kafka.client_config()),
        (
            "consumers (playback, tap)",
            kafka.client_config_with(&[("group.id", "x".to_owned())]),
        ),
    ];
    for (who, c) in configs {
        assert_eq!(c.get("bootstrap.servers"), Some("b:9093"), "{who}");
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"), "{who}");
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"), "{who}");
        assert_eq!(c.get("sasl.password"), Some(SECRET), "{who}");
    }
}
