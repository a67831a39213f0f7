#!/usr/bin/env python3
"""End to end through the real gateway: espeak-ng speech → μ-law 8 kHz → the Twilio simulator
(`loadtest`) → the gateway (with the `wb16` 16 kHz output profile) → Kafka → transcribe.py →
`<prefix>.transcripts`, scored against the known text.

Unlike selftest.py (which publishes the contract itself, with sox standing in for the profile),
here every byte the recognizer sees came through the gateway: its WebSocket server, its parser,
its resampler, its Kafka path. It transcribes the same calls twice, from the `wb16` profile
topics and from the default 8 kHz topics, and prints both word error rates.

    gateway_e2e.py --tansu BIN --gateway BIN --loadtest BIN [--workdir DIR] [--max-wer 0.75]

Run it with `examples/transcribe/gateway_e2e.sh` (installs and builds what it needs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from selftest import check_and_score, free_port, log, read_topic, wait_port  # noqa: E402

PREFIX = "e2e"
PROFILE = "wb16"
SPEC = "wb16:rate=16000,format=s16le,layout=mono"


def pad_to_seconds(src: str, dst: str) -> float:
    """The simulator sends whole seconds (and wraps around the file): pad with μ-law silence."""
    with open(src, "rb") as f:
        audio = f.read()
    whole = -(-len(audio) // 8000) * 8000
    with open(dst, "wb") as f:
        f.write(audio + b"\xff" * (whole - len(audio)))
    return whole / 8000


def wait_ready(admin_port: int, proc: subprocess.Popen, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("gateway not ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tansu", required=True)
    p.add_argument("--gateway", required=True)
    p.add_argument("--loadtest", required=True)
    p.add_argument("--workdir", default=os.path.join(HERE, ".gateway-e2e"))
    p.add_argument("--voices", default="en-us,en-us+klatt,en-us+klatt2")
    p.add_argument("--max-wer", type=float, default=0.75, help="fail above this 16 kHz WER")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    t_all = time.monotonic()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    speech = os.path.join(args.workdir, "speech")
    subprocess.run(
        [sys.executable, os.path.join(HERE, "make_speech.py"), "--out", speech,
         "--voices", args.voices],
        check=True,
    )
    with open(os.path.join(speech, "manifest.json"), encoding="utf-8") as f:
        clips = json.load(f)
    for c in clips:
        c["padded"] = os.path.join(speech, c["name"] + ".padded.ulaw")
        c["seconds"] = pad_to_seconds(c["mulaw_8k"], c["padded"])

    bport, gport, aport = free_port(), free_port(), free_port()
    brokers = f"127.0.0.1:{bport}"
    logs = {n: open(os.path.join(args.workdir, f"{n}.log"), "wb") for n in ("broker", "gateway")}
    children = []
    errors: list[str] = []
    try:
        broker = subprocess.Popen(
            [args.tansu, "broker", "--listener-url", f"tcp://{brokers}",
             "--advertised-listener-url", f"tcp://{brokers}", "--storage-engine", "memory://tansu/"],
            stdout=logs["broker"], stderr=subprocess.STDOUT,
        )
        children.append(broker)
        wait_port(bport, broker)
        gw = subprocess.Popen(
            [args.gateway, "--listen", f"127.0.0.1:{gport}", "--admin-listen", f"127.0.0.1:{aport}",
             "--brokers", brokers, "--topic-prefix", PREFIX, "--insecure-skip-signature",
             "--profile", SPEC, "--log-level", "warn"],
            stdout=logs["gateway"], stderr=subprocess.STDOUT,
        )
        children.append(gw)
        wait_ready(aport, gw)
        log(f"broker {brokers}, gateway ws://127.0.0.1:{gport}/stream with --profile {SPEC}")
        # One simulated call per clip, started one second apart: the order of the `start`
        # events maps streams to clips.
        sims = []
        for c in clips:
            sims.append(subprocess.Popen(
                [args.loadtest, "steady", "--url", f"ws://127.0.0.1:{gport}/stream",
                 "--streams", "1", "--duration", str(int(c["seconds"])), "--tracks", "inbound",
                 "--audio", c["padded"], "--quiet"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            time.sleep(1.0)
        for s in sims:
            if s.wait(timeout=args.timeout) != 0:
                errors.append(f"loadtest exited with {s.returncode}")
        time.sleep(2)
        starts = []
        for m in read_topic(brokers, f"{PREFIX}.events"):
            e = json.loads(m.value())
            if e.get("type") == "start":
                starts.append(e)
        starts.sort(key=lambda e: e["at_us"])
        if len(starts) != len(clips):
            errors.append(f"{len(starts)} start events for {len(clips)} calls")
        streams = [
            {"stream_sid": e["stream_sid"], "call_sid": e["call_sid"], "clips": {"inbound": i}}
            for i, e in enumerate(starts[: len(clips)])
        ]
        log(f"{len(streams)} calls through the gateway")

        runs = [(PROFILE, "wb16 profile, 16 kHz (the gateway's resampler)"),
                ("none", "default topics, 8 kHz")]
        results = {}
        for profile, label in runs:
            cmd = [sys.executable, os.path.join(HERE, "transcribe.py"), "--brokers", brokers,
                   "--prefix", PREFIX, "--profile", profile, "--from-beginning",
                   "--once", str(len(streams)), "--timeout", str(args.timeout),
                   "--final-grace", "0.5"]
            with open(os.path.join(args.workdir, f"transcribe-{profile}.log"), "w") as lf:
                rc = subprocess.run(cmd, stdout=lf, stderr=lf).returncode
            if rc != 0:
                errors.append(f"transcribe.py --profile {profile} exited with {rc}")
            results[profile] = {"label": label}
        msgs = read_topic(brokers, f"{PREFIX}.transcripts")
        print()
        for profile, label in runs:
            total, rows = check_and_score(msgs, profile, streams, clips, errors)
            print(f"== {label} ==")
            for name, track, n, r, hyp in rows:
                print(f"  {name:22} {track:8} {n} utt  {100 * r.wer:5.1f}%  {hyp}")
            print(f"  TOTAL {total}\n")
            results[profile]["wer"] = None if total is None else total.wer
        w16, w8 = results[PROFILE]["wer"], results["none"]["wer"]
        if w16 is not None and w8 is not None:
            print(f"WER through the gateway: 16 kHz ({PROFILE} profile) {100 * w16:.1f}%, "
                  f"8 kHz (default topics) {100 * w8:.1f}%")
        if w16 is None or w16 > args.max_wer:
            errors.append(f"16 kHz WER {w16} above --max-wer {args.max_wer}")
        with open(os.path.join(args.workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
        for f in logs.values():
            f.close()
    log(f"total {time.monotonic() - t_all:.1f}s")
    for e in errors:
        log(f"FAIL: {e}")
    print("gateway_e2e: " + ("FAILED" if errors else "OK"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
