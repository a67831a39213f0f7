//! Run results: the terminal summary, the JSON report and the SVG chart.

use crate::downlink::DownlinkSummary;
use crate::echo::EchoSummary;
use crate::playout::PlayoutStats;
use crate::stats::Percentiles;
use crate::verify::VerifySummary;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Stream outcome counts.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StreamCounts {
    /// Streams the scenario asked for (ramp: streams opened in total).
    pub requested: u64,
    /// Streams whose task began connecting.
    pub started: u64,
    /// Upgrades answered 101.
    pub handshake_ok: u64,
    /// Upgrades that failed.
    pub handshake_errors: u64,
    /// Streams that sent `stop` and closed normally.
    pub completed: u64,
    /// Streams that ended otherwise after connecting.
    pub failed: u64,
    /// Streams the server closed before our `stop`.
    pub server_closed_early: u64,
}

/// One 1-second sample.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t: f64,
    /// Connected streams.
    pub open_streams: i64,
    /// Messages sent in the last second.
    pub messages_per_sec: u64,
    /// Media messages sent in the last second.
    pub media_per_sec: u64,
    /// Chunks read back from Kafka in the last second (verification only).
    pub verified_per_sec: u64,
    /// Records stamped but not yet verified (verification only).
    pub verify_queue: u64,
    /// The verifying consumer's broker-side lag at its last sample, records.
    pub consumer_lag: i64,
    /// Handshake errors so far.
    pub handshake_errors: u64,
    /// Failed streams so far.
    pub failed: u64,
}

/// Gateway memory over the run, from its `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RssReport {
    /// First sample, bytes.
    pub start_bytes: f64,
    /// Last sample, bytes.
    pub end_bytes: f64,
    /// Largest sample, bytes.
    pub max_bytes: f64,
    /// Failed scrapes.
    pub scrape_errors: u64,
    /// `(seconds since start, bytes)`.
    pub samples: Vec<(f64, f64)>,
}

/// The gateway's receive → broker ack latency over one metrics interval, read from the
/// difference of two scrapes of `gateway_receive_to_ack_latency_seconds`. A Prometheus
/// histogram only knows its buckets, so each quantile is given as the upper bound of the bucket
/// that holds it (10, 20, 30, 50, 75, 100 ms …). In JSON a bound is `null` when `records` is 0
/// (no acknowledgement in the interval) or when it lies above the last finite bucket.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AckWindow {
    /// Interval end, seconds since the run started.
    pub end_s: f64,
    /// Records acknowledged in the interval.
    pub records: u64,
    /// Median is at most this, ms.
    pub p50_le_ms: Option<f64>,
    /// 99th percentile is at most this, ms.
    pub p99_le_ms: Option<f64>,
    /// 99th percentile of librdkafka produce → ack alone (`gateway_kafka_delivery_latency_
    /// seconds`: linger, request, broker) is at most this, ms. When it equals `p99_le_ms`, the
    /// gateway's own time before the produce call did not move the p99 out of its bucket.
    pub produce_p99_le_ms: Option<f64>,
}

/// One step of a ramp.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RampStep {
    /// Streams open during the step.
    pub streams: u64,
    /// p99 of the step's latency (end-to-end when verifying, else send lag), ms.
    pub p99_ms: f64,
    /// Which latency `p99_ms` is.
    pub latency_kind: String,
    /// Handshake errors, failed streams and early server closes during the step.
    pub failures: u64,
    /// p99 send lag during the step, ms.
    pub send_lag_p99_ms: f64,
}

/// Ramp results.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RampReport {
    /// Every step, in order.
    pub steps: Vec<RampStep>,
    /// Largest stream count of a step without failures and within the p99 limit.
    pub max_sustained_streams: u64,
    /// Why the ramp stopped.
    pub stop_reason: String,
}

/// Results of the bidirectional scenario.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BidiReport {
    /// Echo delay, ms.
    pub echo_delay_ms: f64,
    /// `pcm`, `mulaw` or `alternate`.
    pub echo_encoding: String,
    /// A mark after every N media records.
    pub mark_every: u64,
    /// Seconds between clears per stream (0 = none).
    pub clear_every_secs: f64,
    /// Inbound records per playback burst.
    pub burst: u64,
    /// Every N-th stream stopped by a `stop` record (0 = none).
    pub stop_every: u64,
    /// Streams the gateway closed with 1000 before our `stop`.
    pub streams_stopped_by_server: u64,
    /// Downlink frames Twilio would reject.
    pub downlink_invalid_frames: u64,
    /// The simulated Twilio playout, all streams.
    pub playout: PlayoutStats,
    /// The echo bot.
    pub echo: EchoSummary,
    /// Downlink verification.
    pub downlink: DownlinkSummary,
}

/// Everything a run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// `steady`, `burst`, `ramp` or `soak`.
    pub scenario: String,
    /// Target URL.
    pub url: String,
    /// `inbound` or `both`.
    pub tracks: String,
    /// Speed factor.
    pub speed: f64,
    /// Flood mode.
    pub flood: bool,
    /// Audio seconds per call (`null` for open-ended streams).
    pub call_secs: Option<f64>,
    /// Wall time of the run, seconds.
    pub wall_secs: f64,
    /// Stream outcomes.
    pub streams: StreamCounts,
    /// Connect + upgrade time.
    pub handshake_latency: Percentiles,
    /// Messages sent, all kinds.
    pub messages_sent: u64,
    /// Media messages sent.
    pub media_sent: u64,
    /// WebSocket payload bytes sent.
    pub bytes_sent: u64,
    /// Frames received from the server.
    pub frames_received: u64,
    /// Average send rate over the run.
    pub messages_per_sec: f64,
    /// How late sends were against the schedule.
    pub send_lag: Percentiles,
    /// Send lag chart buckets `(upper ms, count)`.
    pub send_lag_buckets: Vec<(f64, u64)>,
    /// Close codes the server sent, by code.
    pub close_codes: BTreeMap<String, u64>,
    /// Failures by reason.
    pub errors: BTreeMap<String, u64>,
    /// First full message per failure reason.
    pub error_examples: BTreeMap<String, String>,
    /// Kafka verification, when enabled.
    pub verification: Option<VerifySummary>,
    /// Gateway memory, when `--gateway-metrics` was given.
    pub gateway_rss: Option<RssReport>,
    /// The gateway's own receive → broker acknowledgement latency per `--metrics-every`
    /// interval, when `--gateway-metrics` was given (from its Prometheus histogram).
    pub gateway_ack_latency: Option<Vec<AckWindow>>,
    /// Ramp steps, for the ramp scenario.
    pub ramp: Option<RampReport>,
    /// Echo bot and downlink results, for the bidirectional scenario.
    pub bidirectional: Option<BidiReport>,
    /// 1-second samples.
    pub timeseries: Vec<Sample>,
}

/// Errors writing report files.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// File I/O.
    #[error("writing {path}: {source}")]
    Io {
        /// Target file.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Serialisation.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// Chart drawing.
    #[error("svg: {0}")]
    Svg(String),
}

fn pct_line(name: &str, p: &Percentiles) -> String {
    format!(
        "  {name:<22} n={:<9} p50={:>8.2}  p90={:>8.2}  p99={:>8.2}  p99.9={:>8.2}  max={:>8.2} ms\n",
        p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
    )
}

impl Report {
    /// The terminal summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let s_ = &self.streams;
        let _ = writeln!(
            s,
            "== loadtest {} → {}  ({} tracks, speed {}{}, {:.1} s wall)",
            self.scenario,
            self.url,
            self.tracks,
            self.speed,
            if self.flood { ", flood" } else { "" },
            self.wall_secs
        );
        let _ = writeln!(
            s,
            "  streams                requested={} started={} handshake_ok={} handshake_errors={} completed={} failed={} server_closed_early={}",
            s_.requested, s_.started, s_.handshake_ok, s_.handshake_errors, s_.completed, s_.failed, s_.server_closed_early
        );
        let _ = writeln!(
            s,
            "  sent                   messages={} media={} bytes={} ({:.0} msg/s)  frames_received={}",
            self.messages_sent, self.media_sent, self.bytes_sent, self.messages_per_sec, self.frames_received
        );
        s.push_str(&pct_line("handshake latency", &self.handshake_latency));
        s.push_str(&pct_line("send lag", &self.send_lag));
        if !self.close_codes.is_empty() {
            let _ = writeln!(s, "  server close codes     {:?}", self.close_codes);
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "  errors                 {:?}", self.errors);
            for (k, v) in &self.error_examples {
                let _ = writeln!(s, "    e.g. {k} ← {v}");
            }
        }
        if let Some(v) = &self.verification {
            let t = &v.total;
            let _ = writeln!(
                s,
                "  kafka chunks           expected={} received={} missing={} duplicated={} out_of_order={} pcm_mismatch={} unexpected={}",
                t.expected, t.received, t.missing, t.duplicated, t.out_of_order, t.pcm_mismatches, t.unexpected
            );
            if t.unread_after_server_close > 0 {
                let _ = writeln!(
                    s,
                    "  kafka chunks           {} sent after the server ended a stream (stop record), never published: not counted as missing",
                    t.unread_after_server_close
                );
            }
            let _ = writeln!(
                s,
                "  kafka records          audio={} batched={} foreign={} malformed={} playback_recorded={} consumer_errors={}  events={:?}",
                v.audio_records, v.batched_records, v.foreign_records, v.malformed_records, v.playback_recorded_records, v.consumer_errors, v.events
            );
            let _ = writeln!(
                s,
                "  kafka streams          registered={} start_events={} end_events={} gateway frames_published={} frames_dropped={}",
                v.streams, v.start_events, v.end_events, v.gateway_frames_published, v.gateway_frames_dropped
            );
            if v.read_after_load {
                let _ = writeln!(
                    s,
                    "  end-to-end latency     not measured by the verifier: read back after the load (--verify-after-load; the probe below, if any, read live)"
                );
            } else {
                let label = if v.flood_latency_from_start {
                    "e2e latency (from start)"
                } else {
                    "end-to-end latency"
                };
                s.push_str(&pct_line(label, &v.latency));
            }
            let h = &v.harness;
            s.push_str(&pct_line("  receipt → verified", &h.receipt_to_verify));
            let _ = writeln!(
                s,
                "  harness lag            verify queue max={} of {}  consume loop blocked {:.1} ms ({}×)  consumer lag max={} mean={:.1} records ({} samples)",
                h.queue_max_depth,
                h.queue_capacity,
                h.receiver_blocked_ms,
                h.receiver_blocked_times,
                h.consumer_lag.max_records,
                h.consumer_lag.mean_records,
                h.consumer_lag.samples
            );
            if let Some(p) = &v.probe {
                let name = format!("probe p{} send→receipt", p.partition);
                s.push_str(&pct_line(&name, &p.send_to_receipt));
                s.push_str(&pct_line("probe gateway→receipt", &p.gateway_to_receipt));
                s.push_str(&pct_line("probe send→gateway", &p.send_to_gateway));
                let _ = writeln!(
                    s,
                    "  probe                  records={} chunks={} foreign={} malformed={} consumer lag max={} records",
                    p.records, p.chunks, p.foreign_records, p.malformed_records, p.consumer_lag.max_records
                );
                if !p.windows.is_empty() {
                    let _ = writeln!(
                        s,
                        "  probe p99 by window    {} ms (windows of {} s from the probe's start; - = no record)",
                        p.windows
                            .iter()
                            .map(|w| if w.send_to_receipt.count == 0 {
                                "-".into()
                            } else {
                                format!("{:.0}", w.send_to_receipt.p99_ms)
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                        p.window_s
                    );
                }
            }
            if let Some(a) = &v.attribution {
                let _ = writeln!(
                    s,
                    "  latency attribution    same records ({}): verifier p50={:.2} p99={:.2} ms vs probe p50={:.2} p99={:.2} ms → harness's own lag p50={:.2} p99={:.2} ms; Kafka path alone p50={:.2} p99={:.2} ms",
                    a.sample,
                    a.verifier_p50_ms,
                    a.verifier_p99_ms,
                    a.probe_p50_ms,
                    a.probe_p99_ms,
                    a.harness_p50_ms,
                    a.harness_p99_ms,
                    a.gateway_to_receipt_p50_ms,
                    a.gateway_to_receipt_p99_ms
                );
            }
            if v.inbound_not_verified {
                let _ = writeln!(
                    s,
                    "  inbound audio          not read back (--no-verify-inbound)"
                );
            }
            if !v.missing_topics.is_empty() {
                let _ = writeln!(s, "  missing topics         {:?}", v.missing_topics);
            }
        }
        if let Some(r) = &self.gateway_rss {
            let mb = |b: f64| b / 1_048_576.0;
            let _ = writeln!(
                s,
                "  gateway RSS            start={:.1} MiB end={:.1} MiB max={:.1} MiB ({} samples, {} scrape errors)",
                mb(r.start_bytes), mb(r.end_bytes), mb(r.max_bytes), r.samples.len(), r.scrape_errors
            );
        }
        if let Some(w) = self.gateway_ack_latency.as_ref().filter(|w| !w.is_empty()) {
            // One bound per interval: `-` = no acknowledgement, `inf` = above the last bucket.
            let series = |bound: fn(&AckWindow) -> Option<f64>| {
                w.iter()
                    .map(|w| match bound(w) {
                        None => "-".to_string(),
                        Some(v) if v.is_finite() => format!("{v:.0}"),
                        Some(_) => "inf".into(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let _ = writeln!(
                s,
                "  gateway recv→ack p99 ≤ {} ms by scrape interval (bucket bounds)",
                series(|w| w.p99_le_ms)
            );
            let _ = writeln!(
                s,
                "  of which produce→ack ≤ {} ms",
                series(|w| w.produce_p99_le_ms)
            );
        }
        if let Some(b) = &self.bidirectional {
            bidi_table(&mut s, b);
        }
        if let Some(r) = &self.ramp {
            for st in &r.steps {
                let _ = writeln!(
                    s,
                    "  ramp step              streams={:<6} p99={:>8.2} ms ({}) send_lag_p99={:>8.2} ms failures={}",
                    st.streams, st.p99_ms, st.latency_kind, st.send_lag_p99_ms, st.failures
                );
            }
            let _ = writeln!(
                s,
                "  ramp result            max sustained streams={} (stopped: {})",
                r.max_sustained_streams, r.stop_reason
            );
        }
        s
    }

    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<(), ReportError> {
        let text = serde_json::to_vec_pretty(self)?;
        std::fs::write(path, text).map_err(|source| ReportError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Draws the latency histogram (end-to-end when verified, else send lag) and the
    /// open-streams / throughput timeline into an SVG file.
    pub fn write_svg(&self, path: &Path) -> Result<(), ReportError> {
        use plotters::prelude::*;
        let err = |e: &dyn std::fmt::Display| ReportError::Svg(e.to_string());
        let (buckets, title) = match &self.verification {
            Some(v) if !v.latency_buckets.is_empty() => {
                (&v.latency_buckets, "End-to-end latency (ms)")
            }
            _ => (&self.send_lag_buckets, "Send lag vs schedule (ms)"),
        };
        let root = SVGBackend::new(path, (1000, 800)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, bottom) = root.split_vertically(400);

        // Latency histogram: bars from the previous bucket bound to this one.
        let x_max = buckets.iter().map(|b| b.0).fold(1.0, f64::max);
        let y_max = buckets.iter().map(|b| b.1).max().unwrap_or(1).max(1);
        let mut chart = ChartBuilder::on(&top)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0u64..y_max + y_max / 10 + 1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("ms")
            .y_desc("chunks")
            .draw()
            .map_err(|e| err(&e))?;
        let mut lo = 0.0;
        let bars: Vec<_> = buckets
            .iter()
            .map(|&(hi, n)| {
                let r = Rectangle::new([(lo, 0u64), (hi, n)], BLUE.mix(0.6).filled());
                lo = hi;
                r
            })
            .collect();
        chart.draw_series(bars).map_err(|e| err(&e))?;

        // Timeline: open streams (left axis) and media messages/s (right axis).
        let t_max = self.timeseries.last().map(|s| s.t).unwrap_or(1.0).max(1.0);
        let open_max = self
            .timeseries
            .iter()
            .map(|s| s.open_streams)
            .max()
            .unwrap_or(1)
            .max(1);
        let rate_max = self
            .timeseries
            .iter()
            .map(|s| s.media_per_sec.max(s.verified_per_sec))
            .max()
            .unwrap_or(1)
            .max(1);
        let mut chart = ChartBuilder::on(&bottom)
            .caption(
                "Open streams and throughput (1 s samples)",
                ("sans-serif", 20),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .right_y_label_area_size(70)
            .build_cartesian_2d(0.0..t_max, 0i64..open_max + open_max / 10 + 1)
            .map_err(|e| err(&e))?
            .set_secondary_coord(0.0..t_max, 0u64..rate_max + rate_max / 10 + 1);
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("open streams")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .configure_secondary_axes()
            .y_desc("messages / s")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                self.timeseries.iter().map(|s| (s.t, s.open_streams)),
                &RED,
            ))
            .map_err(|e| err(&e))?
            .label("open streams")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        chart
            .draw_secondary_series(LineSeries::new(
                self.timeseries.iter().map(|s| (s.t, s.media_per_sec)),
                &BLUE,
            ))
            .map_err(|e| err(&e))?
            .label("media sent / s")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        if self.verification.is_some() {
            chart
                .draw_secondary_series(LineSeries::new(
                    self.timeseries.iter().map(|s| (s.t, s.verified_per_sec)),
                    &GREEN,
                ))
                .map_err(|e| err(&e))?
                .label("chunks read back / s")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GREEN));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

/// The bidirectional section of the terminal summary.
fn bidi_table(s: &mut String, b: &BidiReport) {
    let e = &b.echo;
    let d = &b.downlink;
    let p = &b.playout;
    let _ = writeln!(
        s,
        "  echo bot               delay={:.0} ms encoding={} burst={} mark_every={} clear_every={} s stop_every={}  streams={} routed={} unrouted_starts={}",
        b.echo_delay_ms, b.echo_encoding, b.burst, b.mark_every, b.clear_every_secs, b.stop_every, e.streams, e.streams_routed, e.starts_unrouted
    );
    let _ = writeln!(
        s,
        "  playback produced      media={} (pcm={} mulaw={}, {} bytes μ-law) marks={} clears={} stops={} produce_errors={} delivery_errors={} retracted={}",
        d.produced.media_records, d.produced.pcm_records, d.produced.mulaw_records, d.produced.media_bytes,
        d.produced.marks, d.produced.clears, d.produced.stops, e.produce_errors, e.delivery_errors, d.produced.retracted
    );
    let _ = writeln!(
        s,
        "  downlink received      frames={} bytes={} marks={} clears={} invalid={:?}  stopped_by_server={}",
        d.received.media_frames, d.received.media_bytes, d.received.marks, d.received.clears, d.received.invalid, b.streams_stopped_by_server
    );
    let a = &d.audio;
    let _ = writeln!(
        s,
        "  downlink audio         matched={} mismatched={} (pcm near-misses {}) unexpected={} misframed={} lost_records={}  discarded_by_clear={} bytes ({} records) in_flight_at_end={} cut_by_stop={}",
        a.bytes_matched, a.bytes_mismatched, a.pcm_near_misses, a.bytes_unexpected, a.frames_misframed, a.records_lost,
        a.bytes_discarded_by_clear, a.records_discarded_by_clear, a.records_in_flight_at_end, a.records_cut_by_stop
    );
    let m = &d.marks;
    let _ = writeln!(
        s,
        "  downlink marks         in_place={} early_at_clear={} after_clear={} misplaced={} missing={} unexpected={} dropped_at_clear={} in_flight_at_end={}",
        m.in_place, m.early_at_clear, m.after_clear, m.misplaced, m.missing, m.unexpected, m.dropped_at_clear, m.in_flight_at_end
    );
    let c = &d.echoes;
    let _ = writeln!(
        s,
        "  mark echoes            played={} unplayed={} overflowed={} → gateway events matched={} played_mismatch={} (near a clear: {}) for_unforwarded={} no_played_field={} missing={} unexpected={}",
        c.played, c.unplayed, p.marks_overflowed, c.events_matched, c.events_played_mismatch, c.events_played_mismatch_near_clear,
        c.events_for_unforwarded_marks, c.events_without_played, c.events_missing, c.events_unexpected
    );
    let _ = writeln!(
        s,
        "  clears                 received={} unexpected={} missing={} in_flight_at_end={}  playout discarded {} bytes, max buffered {} ms",
        d.clears.received, d.clears.unexpected, d.clears.missing, d.clears.in_flight_at_end, p.bytes_cleared, p.max_buffered_ms
    );
    let st = &d.stops;
    let _ = writeln!(
        s,
        "  stops                  produced={} closed_1000={} wrong_close={} stopped_by_control_events={} wrong_end_events={} unexpected_server_closes={}",
        st.produced, st.closed_1000, st.wrong_close, st.stopped_by_control_events, st.wrong_end_events, st.unexpected_server_closes
    );
    s.push_str(&pct_line("playback latency", &d.playback_latency));
    s.push_str(&pct_line("clear latency", &d.clear_latency));
    s.push_str(&pct_line("mark latency", &d.mark_latency));
    s.push_str(&pct_line("  stamp → verified", &d.stamp_to_verify));
    s.push_str(&pct_line("  bot lateness", &e.bot_lag));
    s.push_str(&pct_line("  gateway → bot", &e.gateway_to_bot));
    let _ = writeln!(
        s,
        "  downlink harness       queue waits={} bot consumer lag max={} mean={:.1} records; gateway terminal events with playback={} totals={:?}",
        d.queue_waits, e.consumer_lag.max_records, e.consumer_lag.mean_records, d.gateway_events.end_events_with_playback, d.gateway_events.playback_totals
    );
    let _ = writeln!(s, "  downlink faults        {}", d.faults);
    if e.starts_unrouted > 0 {
        let _ = writeln!(
            s,
            "    note: {} start events carried no \"playback\" route: the gateway does not do bidirectional streams, nothing could be played back",
            e.starts_unrouted
        );
    } else if d.produced.media_records == 0 {
        let _ = writeln!(
            s,
            "    note: no playback was produced (no caller audio reached the echo bot)"
        );
    }
    for (k, v) in &d.examples {
        let _ = writeln!(s, "    e.g. {k} ← {v}");
    }
}
