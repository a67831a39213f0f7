#!/usr/bin/env python3
"""Self-contained check of the transcription pipeline, without the gateway.

1. Synthesises test speech with known transcripts (make_speech.py: espeak-ng → μ-law 8 kHz →
   s16le 8 kHz and, resampled by sox, s16le 16 kHz).
2. Starts a local Tansu broker on a free port (in memory) and creates the topics.
3. Plays the clips as a gateway would publish them: start events, per-track audio records in
   the Kafka contract (headers, `timestamp_ms`, `chunks`), stop events — once on the `wb16`
   profile topics (16 kHz; s16le and f32le; 1, 5 and 50 chunks per record) and once on the
   unresampled default topics (8 kHz s16le, one chunk per record). Streams are interleaved;
   two of them have an outbound track too.
4. Runs `transcribe.py --from-beginning --once N` on each, reads `<prefix>.transcripts` back
   and prints the word error rate of both runs (16 kHz profile vs 8 kHz default topics).

Everything it writes goes to examples/transcribe/.selftest/ (gitignored). Exit status 0 when
both runs finished, every (stream, track) got transcripts with valid fields, and the 16 kHz WER
is below --max-wer (a sanity bound: a pipeline that misplaces audio scores ~100 %).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import wer as wermod  # noqa: E402

PREFIX = "twilio"
PROFILE = "wb16"
PARTITIONS = 6
CHUNK_MS = 20


def log(msg: str):
    print(f"selftest: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"broker exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"broker did not listen on {port} within {timeout}s")


def sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


# ------------------------------------------------------------------------------------------
# Playing clips as the gateway would publish them
# ------------------------------------------------------------------------------------------


class Track:
    """One track of one stream: a clip cut into 20 ms chunks, grouped into records."""

    def __init__(
        self,
        stream: dict,
        track: str,
        clip: dict,
        pcm: bytes,
        rate: int,
        encoding: str,
        chunks_per_record: int,
        topic: str,
        profile: str | None,
    ):
        self.stream, self.track, self.clip = stream, track, clip
        self.rate, self.encoding, self.per_record = rate, encoding, chunks_per_record
        self.topic, self.profile = topic, profile
        chunk_bytes = rate * CHUNK_MS // 1000 * 2
        pcm += bytes(-len(pcm) % chunk_bytes)  # Twilio sends whole chunks: pad with silence
        self.chunks = [pcm[i : i + chunk_bytes] for i in range(0, len(pcm), chunk_bytes)]
        self.next = 0
        self.jump_at: int | None = None  # chunk index from which timestamps jump ahead...
        self.jump_ms = 0  # ...by this much (a gap in the timeline)

    def done(self) -> bool:
        return self.next >= len(self.chunks)

    def produce_next(self, producer: Producer, gateway: str):
        first = self.next
        group = self.chunks[first : first + self.per_record]
        self.next += len(group)
        value = b"".join(group)
        if self.encoding == "pcm_f32le":
            value = (np.frombuffer(value, dtype="<i2").astype("<f4") / 32768.0).tobytes()
        s = self.stream
        headers = {
            "stream_sid": s["stream_sid"],
            "call_sid": s["call_sid"],
            "account_sid": s["account_sid"],
            "track": self.track,
            "seq": str(2 + first),  # Twilio: sequenceNumber 1 is `start`
            "chunk": str(1 + first),
            "timestamp_ms": str(
                first * CHUNK_MS
                + (self.jump_ms if self.jump_at is not None and first >= self.jump_at else 0)
            ),
            "encoding": self.encoding,
            "sample_rate": str(self.rate),
            "channels": "1",
            "gateway": gateway,
            "received_at_us": str(int(time.time() * 1e6)),
        }
        if self.profile is not None:
            headers["profile"] = self.profile
        if self.per_record > 1:
            headers["chunks"] = str(len(group))
        producer.produce(
            self.topic,
            key=s["stream_sid"],
            value=value,
            headers=[(k, v.encode()) for k, v in headers.items()],
        )


def event(stream: dict, etype: str, gateway: str, **extra) -> bytes:
    ev = {
        "type": etype,
        "stream_sid": stream["stream_sid"],
        "call_sid": stream["call_sid"],
        "account_sid": stream["account_sid"],
        "gateway": gateway,
        "at_us": int(time.time() * 1e6),
    }
    ev.update(extra)
    return json.dumps(ev).encode()


def publish(brokers: str, streams: list[dict], clips: list[dict]):
    """Publishes every stream on both the wb16 profile topics and the default 8 kHz topics,
    as one gateway with the profile configured would."""
    producer = Producer(
        {"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all", "linger.ms": 5}
    )
    gateway = "selftest-gateway"
    tracks: list[Track] = []
    for n, s in enumerate(streams):
        for track, ci in s["clips"].items():
            clip = clips[ci]
            with open(clip["s16le_16k"], "rb") as f:
                pcm16 = f.read()
            with open(clip["s16le_8k"], "rb") as f:
                pcm8 = f.read()
            enc = "pcm_f32le" if (n + (track == "outbound")) % 2 else "pcm_s16le"
            per = (1, 5, 50)[(n + (track == "outbound")) % 3]
            tracks.append(
                Track(
                    s,
                    track,
                    clip,
                    pcm16,
                    16000,
                    enc,
                    per,
                    f"{PREFIX}.audio.{PROFILE}.{track}",
                    PROFILE,
                )
            )
            tracks.append(
                Track(s, track, clip, pcm8, 8000, "pcm_s16le", 1, f"{PREFIX}.audio.{track}", None)
            )
        producer.produce(
            f"{PREFIX}.events",
            key=s["stream_sid"],
            value=event(
                s,
                "start",
                gateway,
                tracks=list(s["clips"]),
                custom_parameters={},
                media_format={"encoding": "audio/x-mulaw", "sample_rate": 8000, "channels": 1},
            ),
        )
    producer.flush(30)
    records = 0
    while not all(t.done() for t in tracks):  # interleave streams and tracks, like live calls
        for t in tracks:
            if not t.done():
                t.produce_next(producer, gateway)
                records += 1
        producer.poll(0)
    if producer.flush(60):
        raise SystemExit("audio records not delivered")
    for s in streams:
        frames = max(len(t.chunks) for t in tracks if t.stream is s)
        producer.produce(
            f"{PREFIX}.events",
            key=s["stream_sid"],
            value=event(
                s, "stop", gateway, reason="stop", frames_published=frames, frames_dropped=0
            ),
        )
    if producer.flush(30):
        raise SystemExit("events not delivered")
    return records


# ------------------------------------------------------------------------------------------
# Reading transcripts back
# ------------------------------------------------------------------------------------------


def read_topic(brokers: str, topic: str) -> list:
    c = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"selftest-{os.getpid()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    md = c.list_topics(topic, timeout=10).topics[topic]
    parts = sorted(md.partitions)
    todo = set()
    tps = []
    for p in parts:
        low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
        if high > low:
            todo.add(p)
        tps.append(TopicPartition(topic, p, low))
    c.assign(tps)
    out = []
    deadline = time.monotonic() + 30
    while todo and time.monotonic() < deadline:
        for m in c.consume(500, timeout=0.5):
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    todo.discard(m.partition())
                continue
            out.append(m)
    c.close()
    return out


def check_and_score(
    msgs, profile: str, streams, clips, check_errors: list, keep: dict | None = None
) -> tuple:
    by_key: dict = {}
    for m in msgs:
        h = {k: v.decode() for k, v in (m.headers() or [])}
        if h.get("profile") != profile:
            continue
        t = json.loads(m.value())
        fields = {"stream_sid", "call_sid", "track", "start_ms", "end_ms", "text"}
        if set(t) != fields:
            check_errors.append(f"{profile}: transcript fields {sorted(t)}")
        if m.key().decode() != t.get("stream_sid"):
            check_errors.append(f"{profile}: key {m.key()} != stream_sid {t.get('stream_sid')}")
        by_key.setdefault((t["stream_sid"], t["track"]), []).append(t)
    total = None
    rows = []
    for s in streams:
        for track, ci in s["clips"].items():
            clip = clips[ci]
            utts = sorted(by_key.get((s["stream_sid"], track), []), key=lambda t: t["start_ms"])
            if not utts:
                check_errors.append(f"{profile}: no transcript for {s['stream_sid']} {track}")
            last_end = 0
            for t in utts:
                if t["call_sid"] != s["call_sid"]:
                    check_errors.append(
                        f"{profile}: call_sid {t['call_sid']} for {t['stream_sid']}"
                    )
                if not (last_end <= t["start_ms"] < t["end_ms"] <= clip["seconds"] * 1000 + 40):
                    check_errors.append(
                        f"{profile}: utterance times {t['start_ms']}–{t['end_ms']}"
                        f" out of order or outside the {clip['seconds']:.2f}s clip"
                    )
                last_end = t["end_ms"]
            if keep is not None:
                keep[(s["stream_sid"], track)] = utts
            hyp = " ".join(t["text"] for t in utts)
            r = wermod.wer(clip["text"], hyp)
            total = r if total is None else total + r
            rows.append((clip["name"], track, len(utts), r, hyp))
    return total, rows


# ------------------------------------------------------------------------------------------
# Edge cases, live: timeline gap, duplicated records, terminal event read before the tail
# ------------------------------------------------------------------------------------------

JUMP_MS = 2040  # a multiple of the 20 ms chunk and the endpointer's 30 ms frame


def edge_run(brokers: str, clip: dict, reference: list, workdir: str, check_errors: list):
    """Replays one clip live (the transcriber starts first and reads from the end) with a
    2.04 s timestamp jump in the first pause, five records sent twice, and the stop event
    published before the last quarter of the audio. Expected: the same texts as the plain
    wb16 run, utterances after the jump 2040 ms later, nothing lost."""
    prefix = "edge"
    admin = AdminClient({"bootstrap.servers": brokers})
    topics = [f"{prefix}.audio.{PROFILE}.inbound", f"{prefix}.events", f"{prefix}.transcripts"]
    for fut in admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in topics]).values():
        fut.result(30)
    del admin
    log_path = os.path.join(workdir, "transcribe-edge.log")
    cmd = [
        sys.executable,
        os.path.join(HERE, "transcribe.py"),
        "--brokers",
        brokers,
        "--prefix",
        prefix,
        "--profile",
        PROFILE,
        "--track",
        "inbound",
        "--once",
        "1",
        "--timeout",
        "120",
        "--final-grace",
        "1.5",
    ]
    log(f"edge run (live): {' '.join(cmd[1:])}  (log: {os.path.relpath(log_path)})")
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(cmd, stderr=lf, stdout=lf)
    try:
        deadline = time.monotonic() + 60
        while "assigned" not in open(log_path).read():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("transcribe.py did not start")
            time.sleep(0.1)
        stream = {"stream_sid": sid("MZ"), "call_sid": sid("CA"), "account_sid": sid("AC")}
        with open(clip["s16le_16k"], "rb") as f:
            pcm = f.read()
        t = Track(
            stream,
            "inbound",
            clip,
            pcm,
            16000,
            "pcm_s16le",
            1,
            f"{prefix}.audio.{PROFILE}.inbound",
            PROFILE,
        )
        # The jump goes just before the second utterance's onset. (Placed mid-pause, the VAD,
        # having adapted to the zero-filled gap, takes the line noise that follows it for speech
        # and opens the utterance up to 0.5 s early: true, and documented, but not what this
        # test is about.)
        jump_chunk = reference[1]["start_ms"] // 60 * 60 // CHUNK_MS
        dup_chunk = jump_chunk + 50
        stop_chunk = len(t.chunks) * 3 // 4
        producer = Producer(
            {"bootstrap.servers": brokers, "enable.idempotence": True, "linger.ms": 5}
        )
        producer.produce(
            f"{prefix}.events",
            key=stream["stream_sid"],
            value=event(
                stream,
                "start",
                "selftest-gateway",
                tracks=["inbound"],
                custom_parameters={},
                media_format={"encoding": "audio/x-mulaw", "sample_rate": 8000, "channels": 1},
            ),
        )
        t.jump_at, t.jump_ms = jump_chunk, JUMP_MS
        while not t.done():
            if t.next == stop_chunk:
                producer.flush(10)
                producer.produce(
                    f"{prefix}.events",
                    key=stream["stream_sid"],
                    value=event(
                        stream,
                        "stop",
                        "selftest-gateway",
                        reason="stop",
                        frames_published=len(t.chunks),
                        frames_dropped=0,
                    ),
                )
                producer.flush(10)
                time.sleep(0.3)  # the event is readable before the rest of the audio exists
            if t.next == dup_chunk:
                t.next -= 5  # five records sent again: overlaps to drop
                for _ in range(5):
                    t.produce_next(producer, "selftest-gateway")
            t.produce_next(producer, "selftest-gateway")
            producer.poll(0)
        producer.flush(10)
        rc = proc.wait(150)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    if rc != 0:
        check_errors.append(f"edge: transcribe.py exited with {rc}")
        return
    with open(log_path) as lf:
        dropped_line = [ln for ln in lf if " finalised (" in ln]
    want_dropped = f"{5 * len(t.chunks[0]) // 2} overlapping samples dropped"
    if not dropped_line or want_dropped not in dropped_line[-1]:
        check_errors.append(f"edge: expected '{want_dropped}' in: {dropped_line}")
    got = []
    for m in read_topic(brokers, f"{prefix}.transcripts"):
        got.append(json.loads(m.value()))
    got.sort(key=lambda u: u["start_ms"])
    expect = [dict(u) for u in reference]
    for u in expect[1:]:
        u["start_ms"] += JUMP_MS
        u["end_ms"] += JUMP_MS
    ok = len(got) == len(expect) and all(
        g["text"] == e["text"]
        and abs(g["start_ms"] - e["start_ms"]) <= 30
        and abs(g["end_ms"] - e["end_ms"]) <= 30
        and g["stream_sid"] == stream["stream_sid"]
        for g, e in zip(got, expect, strict=False)
    )
    summary = "; ".join(f"{u['start_ms']}–{u['end_ms']} {u['text']!r}" for u in got)
    if ok:
        log(
            f"edge: OK — {len(got)} utterances as in the plain run, shifted by the jump: "
            f"{summary}"
        )
    else:
        check_errors.append(
            "edge: transcripts differ from the plain run shifted by "
            f"{JUMP_MS} ms: got {summary}; expected "
            + "; ".join(f"{u['start_ms']}–{u['end_ms']} {u['text']!r}" for u in expect)
        )


# ------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tansu", required=True, help="path of the tansu binary")
    p.add_argument("--workdir", default=os.path.join(HERE, ".selftest"))
    p.add_argument("--voices", default="", help="espeak-ng voices (default: make_speech.py's)")
    p.add_argument(
        "--max-wer",
        type=float,
        default=0.75,
        help="fail if the 16 kHz WER is above this (sanity bound)",
    )
    p.add_argument("--timeout", type=float, default=600, help="per transcribe.py run (s)")
    p.add_argument("--skip-edge", action="store_true", help="skip the live edge-case run")
    args = p.parse_args()
    t_all = time.monotonic()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    speech = os.path.join(args.workdir, "speech")

    t0 = time.monotonic()
    cmd = [sys.executable, os.path.join(HERE, "make_speech.py"), "--out", speech]
    if args.voices:
        cmd += ["--voices", args.voices]
    subprocess.run(cmd, check=True)
    with open(os.path.join(speech, "manifest.json"), encoding="utf-8") as f:
        clips = json.load(f)
    audio_s = sum(c["seconds"] for c in clips)
    log(
        f"{len(clips)} clips, {audio_s:.1f}s of speech synthesised in "
        f"{time.monotonic() - t0:.1f}s"
    )

    # Streams: every clip is used once; the first streams get an outbound track as well.
    n_streams = max(1, len(clips) - len(clips) // 3)
    streams = []
    for i in range(n_streams):
        streams.append(
            {
                "stream_sid": sid("MZ"),
                "call_sid": sid("CA"),
                "account_sid": sid("AC"),
                "clips": {"inbound": i},
            }
        )
    for j, ci in enumerate(range(n_streams, len(clips))):
        streams[j]["clips"]["outbound"] = ci

    port = free_port()
    brokers = f"127.0.0.1:{port}"
    broker_log = open(os.path.join(args.workdir, "broker.log"), "wb")
    broker = subprocess.Popen(
        [
            args.tansu,
            "broker",
            "--listener-url",
            f"tcp://{brokers}",
            "--advertised-listener-url",
            f"tcp://{brokers}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=broker_log,
        stderr=subprocess.STDOUT,
    )
    children = [broker]

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    check_errors: list[str] = []
    results = {}
    try:
        wait_port(port, broker)
        log(f"Tansu broker (pid {broker.pid}) on {brokers}")
        admin = AdminClient({"bootstrap.servers": brokers})
        topics = [f"{PREFIX}.audio.{t}" for t in ("inbound", "outbound")]
        topics += [f"{PREFIX}.audio.{PROFILE}.{t}" for t in ("inbound", "outbound")]
        topics += [f"{PREFIX}.events", f"{PREFIX}.transcripts"]
        futures = admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in topics])
        for _t, fut in futures.items():
            fut.result(30)
        del admin, futures  # (an admin client would log the broker's disconnection at exit)
        log(f"topics created: {', '.join(topics)}")

        t0 = time.monotonic()
        records = publish(brokers, streams, clips)
        log(
            f"published {len(streams)} streams ({sum(len(s['clips']) for s in streams)} tracks),"
            f" {records} audio records in {time.monotonic() - t0:.1f}s"
        )

        runs = [
            (PROFILE, "wb16 profile, 16 kHz (sox-resampled stand-in)"),
            ("none", "default topics, 8 kHz"),
        ]
        for profile, label in runs:
            log_path = os.path.join(args.workdir, f"transcribe-{profile}.log")
            cmd = [
                sys.executable,
                os.path.join(HERE, "transcribe.py"),
                "--brokers",
                brokers,
                "--prefix",
                PREFIX,
                "--profile",
                profile,
                "--from-beginning",
                "--once",
                str(len(streams)),
                "--timeout",
                str(args.timeout),
                "--final-grace",
                "0.5",
            ]
            log(f"run: {' '.join(cmd[1:])}  (log: {os.path.relpath(log_path)})")
            t0 = time.monotonic()
            with open(log_path, "w") as lf:
                proc = subprocess.Popen(cmd, stderr=lf, stdout=lf)
                children.append(proc)
                rc = proc.wait()
                children.remove(proc)
            took = time.monotonic() - t0
            if rc != 0:
                check_errors.append(f"transcribe.py --profile {profile} exited with {rc}")
                with open(log_path) as lf:
                    sys.stderr.write(lf.read()[-3000:])
            results[profile] = {"label": label, "seconds": took}
            log(f"  finished in {took:.1f}s (status {rc}) for {audio_s:.1f}s of audio")

        msgs = read_topic(brokers, f"{PREFIX}.transcripts")
        print()
        kept: dict = {}
        for profile, label in runs:
            total, rows = check_and_score(
                msgs, profile, streams, clips, check_errors, kept if profile == PROFILE else None
            )
            results[profile]["wer"] = total.wer
            results[profile]["detail"] = str(total)
            print(f"== {label} (transcribe.py --profile {profile}) ==")
            for name, track, n, r, hyp in rows:
                print(f"  {name:22} {track:8} {n} utt  {100 * r.wer:5.1f}%  {hyp}")
            print(f"  TOTAL {total}\n")

        if not args.skip_edge:
            s0 = streams[0]
            reference = kept.get((s0["stream_sid"], "inbound"), [])
            if len(reference) >= 2:
                edge_run(
                    brokers, clips[s0["clips"]["inbound"]], reference, args.workdir, check_errors
                )
            else:
                check_errors.append("edge: the plain run gave fewer than two utterances")
    except KeyboardInterrupt as e:
        check_errors.append(f"interrupted ({e})")
    finally:
        for c in children:
            if c.poll() is None:
                c.terminate()
                try:
                    c.wait(10)
                except subprocess.TimeoutExpired:
                    c.kill()
                    c.wait()
        broker_log.close()

    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if PROFILE in results and "wer" in results[PROFILE]:
        w16 = results[PROFILE]["wer"]
        w8 = results.get("none", {}).get("wer", float("nan"))
        print(
            f"WER 16 kHz ({PROFILE} profile): {100 * w16:.1f}%   "
            f"WER 8 kHz (default topics): {100 * w8:.1f}%"
        )
        if w16 > args.max_wer:
            check_errors.append(
                f"16 kHz WER {100 * w16:.1f}% above --max-wer " f"{100 * args.max_wer:.0f}%"
            )
    log(f"total {time.monotonic() - t_all:.1f}s")
    for e in check_errors:
        log(f"FAIL: {e}")
    print("selftest: " + ("FAILED" if check_errors else "OK"))
    return 1 if check_errors else 0


if __name__ == "__main__":
    sys.exit(main())
