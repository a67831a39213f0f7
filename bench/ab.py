#!/usr/bin/env python3
"""Paired A/B of two gateway builds or flag sets, run at the same time on the same machine.

Why: this machine's speed drifts by 10–30 % between runs a minute apart (docs/benchmarks.md),
more than most levers it is asked to judge, so sequential alternating runs need many rounds.
Here both gateways run side by side, each with its own generator and the same number of
real-time calls, against one fresh broker: whatever the machine does during the window it does
to both. Each round reports both gateways' CPU per media message (process and per thread
group) and the ratio B/A; the order of start-up alternates between rounds. Gateways and
generators share the cores, so absolute figures are higher than in `bench/e2e.py`; only the
ratio is the result.

Not a correctness check (no Kafka verification, to keep the harness light): the gateways'
own accounting is checked instead (`frames_delivered_total` equals `frames_published_total`
and nothing is dropped, after the calls end).

    python3 bench/ab.py --a-bin DIR --b-bin DIR [--a-arg=--flag ...] [--b-arg=...] \\
        [--streams 150] [--tracks both] [--window 15] [--rounds 3]
"""

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("e2e", os.path.join(HERE, "e2e.py"))
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)


def metrics_sum(admin, prefix):
    """Sum of every series whose name starts with `prefix` (all label sets)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(prefix) and not line.startswith("#"):
            total += float(line.split()[-1])
    return total


def media(admin):
    return e2e.metric(admin, 'gateway_messages_received_total{event="media"}')


def one_round(a, rnd):
    broker = e2e.Broker(None)
    addr = broker.fresh()
    sides = [("A", a.a_bin, a.a_arg), ("B", a.b_bin, a.b_arg)]
    if rnd % 2 == 1:
        sides.reverse()  # alternate which one starts (and ramps) first
    gws, loads = {}, {}
    try:
        for name, bin_dir, args in sides:
            gws[name] = e2e.start_gateway(bin_dir, args, addr, f"ab{rnd}{name}{int(time.time())}")
        for name, bin_dir, _ in sides:
            _, port, _ = gws[name]
            out = os.path.join(e2e.RESULTS, f"ab-{name}-{rnd}.json")
            loads[name] = e2e.run_load(bin_dir, f"ws://127.0.0.1:{port}/stream", a.streams, a.tracks,
                                       a.window + a.streams / a.ramp + 8, a.ramp,
                                       ["--no-verify-inbound"], out)
        time.sleep(a.streams / a.ramp + 4)
        pids = {n: gws[n][0].pid for n in gws}
        c0 = {n: e2e.cpu_seconds(p) for n, p in pids.items()}
        t0 = {n: e2e.thread_cpu_seconds(p) for n, p in pids.items()}
        m0 = {n: media(gws[n][2]) for n in gws}
        w0 = time.time()
        time.sleep(a.window)
        c1 = {n: e2e.cpu_seconds(p) for n, p in pids.items()}
        t1 = {n: e2e.thread_cpu_seconds(p) for n, p in pids.items()}
        m1 = {n: media(gws[n][2]) for n in gws}
        wall = time.time() - w0
        for lt in loads.values():
            lt.wait()
        time.sleep(2)
        res = {}
        for n in ("A", "B"):
            msgs = max(m1[n] - m0[n], 1)
            admin = gws[n][2]
            published = e2e.metric(admin, "gateway_frames_published_total")
            delivered = e2e.metric(admin, "gateway_frames_delivered_total")
            dropped = metrics_sum(admin, "gateway_frames_dropped_total")
            res[n] = {
                "cpu_us_per_msg": 1e6 * (c1[n] - c0[n]) / msgs,
                "threads_us_per_msg": {k: round(1e6 * (v - t0[n].get(k, 0.0)) / msgs, 2)
                                       for k, v in sorted(t1[n].items(), key=lambda kv: kv[0])
                                       if 1e6 * (v - t0[n].get(k, 0.0)) / msgs >= 0.05},
                "media_per_sec": msgs / wall,
                "published": published, "delivered": delivered, "dropped": dropped,
                "accounting_ok": published == delivered and dropped == 0 and published > 0,
            }
        return res
    finally:
        for lt in loads.values():
            if lt.poll() is None:
                lt.kill()
        for p, _, _ in gws.values():
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a-bin", required=True)
    ap.add_argument("--b-bin", required=True)
    ap.add_argument("--a-arg", action="append", default=[])
    ap.add_argument("--b-arg", action="append", default=[])
    ap.add_argument("--streams", type=int, default=150, help="calls per gateway")
    ap.add_argument("--tracks", default="both")
    ap.add_argument("--window", type=float, default=15)
    ap.add_argument("--ramp", type=float, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    os.makedirs(e2e.RESULTS, exist_ok=True)
    rounds = []
    for rnd in range(a.rounds):
        r = one_round(a, rnd)
        rounds.append(r)
        ratio = r["B"]["cpu_us_per_msg"] / r["A"]["cpu_us_per_msg"]
        print(f"round {rnd + 1}: A {r['A']['cpu_us_per_msg']:.2f}  B {r['B']['cpu_us_per_msg']:.2f} µs/msg  "
              f"B/A {ratio:.3f}  (media/s {r['A']['media_per_sec']:.0f} / {r['B']['media_per_sec']:.0f}; "
              f"accounting {'ok' if r['A']['accounting_ok'] and r['B']['accounting_ok'] else 'NOT OK'})", flush=True)
        for n in ("A", "B"):
            print(f"    {n} threads: " + ", ".join(f"{k} {v:.2f}" for k, v in r[n]["threads_us_per_msg"].items()),
                  flush=True)
    ratios = [r["B"]["cpu_us_per_msg"] / r["A"]["cpu_us_per_msg"] for r in rounds]
    print(f"B/A per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {e2e.median(ratios):.3f}; "
          f"B lower in {sum(x < 1 for x in ratios)} of {len(ratios)}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"args": vars(a), "rounds": rounds, "ratios": ratios}, f, indent=1)
    if not all(r[n]["accounting_ok"] for r in rounds for n in ("A", "B")):
        sys.exit(1)


if __name__ == "__main__":
    main()
