#!/usr/bin/env python3
"""End-to-end benchmark: broker + gateway + loadtest, and the floor server under the same load.

For each (streams, tracks) configuration it runs real-time Twilio streams from the speech
fixture, first against the gateway (with Kafka verification), then against `floor` (read and
discard). Over a steady window it samples each server's CPU time from /proc/<pid>/stat and
divides by the media messages received in the window; RSS per open stream is the growth of the
server's RSS over its idle RSS divided by the open streams. Loss and end-to-end latency come
from loadtest's verification report. Results: bench/results/e2e-<timestamp>.json and a Markdown
table on stdout (paste into docs/benchmarks.md).

Usage: bench/e2e.sh [--configs 100:inbound,300:both] [--window 15]
"""
import argparse, json, os, re, signal, socket, subprocess, sys, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=30):
    t = time.time()
    while time.time() - t < timeout:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICK  # utime + stime


def rss_bytes(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def metric(admin_port, name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def run_load(url, streams, tracks, duration, ramp, extra, out_json):
    cmd = [os.path.join(REL, "loadtest"), "steady", "--url", url, "--streams", str(streams),
           "--tracks", tracks, "--duration", str(duration), "--ramp-per-sec", str(ramp),
           "--audio", os.path.join(ROOT, "..", "shared", "fixtures", "speech-8k.ulaw"),
           "--json-out", out_json, "--quiet"] + extra
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def measure(pid, streams, tracks, ramp, window, count_fn):
    """Waits for the ramp, then samples CPU/messages over `window` seconds."""
    time.sleep(streams / ramp + 3)
    c0, m0, t0 = cpu_seconds(pid), count_fn(), time.time()
    time.sleep(window)
    c1, m1, t1 = cpu_seconds(pid), count_fn(), time.time()
    rss = rss_bytes(pid)
    return {"cpu_s": c1 - c0, "messages": m1 - m0, "wall_s": t1 - t0, "rss_bytes": rss}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="100:inbound,300:inbound,500:inbound,1000:inbound,100:both,300:both,500:both,1000:both")
    ap.add_argument("--window", type=float, default=15)
    ap.add_argument("--brokers", default=None, help="existing broker; default: start Tansu")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeatable)")
    ap.add_argument("--no-floor", action="store_true", help="skip the floor server runs")
    args = ap.parse_args()
    configs = [(int(a), b) for a, b in (c.split(":") for c in args.configs.split(","))]
    procs = []
    broker = args.brokers
    if broker is None:
        tansu = subprocess.check_output([os.path.join(ROOT, "scripts", "install-broker.sh")]).decode().strip()
        bp = free_port()
        url = f"tcp://127.0.0.1:{bp}"
        procs.append(subprocess.Popen([tansu, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                       "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(bp)
        broker = f"127.0.0.1:{bp}"
    results = []
    try:
        for streams, tracks in configs:
            ramp = 200
            duration = int(streams / ramp + 3 + args.window + 3)
            per_msg = 2 if tracks == "both" else 1
            row = {"streams": streams, "tracks": tracks, "window_s": args.window}
            # --- gateway
            port, admin = free_port(), free_port()
            prefix = f"bench{int(time.time())}{streams}{tracks}"
            gw = subprocess.Popen([os.path.join(REL, "gateway"), "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                                   "--brokers", broker, "--topic-prefix", prefix, "--log-level", "warn", "--max-streams", "20000", "--insecure-skip-signature"] + args.gateway_arg,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(admin)
            while True:
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2).status == 200:
                        break
                except Exception:
                    time.sleep(0.1)
            idle_rss = rss_bytes(gw.pid)
            out = os.path.join(ROOT, "bench", "results", f"load-gw-{streams}-{tracks}.json")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            lt = run_load(f"ws://127.0.0.1:{port}/stream", streams, tracks, duration, ramp,
                          ["--verify-brokers", broker, "--topic-prefix", prefix, "--grace", "10"], out)
            m = measure(gw.pid, streams, tracks, ramp, args.window,
                        lambda: metric(admin, 'gateway_messages_received_total{event="media"}'))
            lt.wait()
            rep = json.load(open(out))
            v = rep.get("verification") or {}
            tot = v.get("total", {})
            row["gateway"] = {
                "cpu_us_per_msg": 1e6 * m["cpu_s"] / max(m["messages"], 1),
                "messages": m["messages"],
                "rss_per_stream_bytes": (m["rss_bytes"] - idle_rss) / streams,
                "rss_bytes": m["rss_bytes"],
                "expected": tot.get("expected"), "received": tot.get("received"), "missing": tot.get("missing"),
                "duplicated": tot.get("duplicated"), "out_of_order": tot.get("out_of_order"), "pcm_mismatches": tot.get("pcm_mismatches"),
                "e2e_p50_ms": v.get("latency", {}).get("p50_ms"), "e2e_p99_ms": v.get("latency", {}).get("p99_ms"),
                "e2e_max_ms": v.get("latency", {}).get("max_ms"),
                "send_lag_p99_ms": rep.get("send_lag", {}).get("p99_ms"),
                "streams_failed": rep.get("streams", {}).get("failed"),
            }
            gw.send_signal(signal.SIGTERM)
            gw.wait(timeout=60)
            # --- floor, same load without Kafka
            if args.no_floor:
                row["floor"] = {"cpu_us_per_msg": float("nan"), "rss_per_stream_bytes": float("nan"), "send_lag_p99_ms": None}
                row["ratio"] = float("nan")
                results.append(row)
                g = row["gateway"]
                print(f"{streams:5d} {tracks:8s} gw {g['cpu_us_per_msg']:6.2f} µs/msg rss/stream {g['rss_per_stream_bytes']/1024:5.1f} KiB missing {g['missing']} p99 {g['e2e_p99_ms']}", flush=True)
                continue
            port = free_port()
            fl = subprocess.Popen([os.path.join(REL, "floor"), f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(port)
            idle_rss = rss_bytes(fl.pid)
            out = os.path.join(ROOT, "bench", "results", f"load-floor-{streams}-{tracks}.json")
            lt = run_load(f"ws://127.0.0.1:{port}/stream", streams, tracks, duration, ramp, [], out)
            msgs_per_s = streams * per_msg * 50
            t_start = time.time()
            m = measure(fl.pid, streams, tracks, ramp, args.window, lambda: (time.time() - t_start) * msgs_per_s)
            lt.wait()
            rep = json.load(open(out))
            row["floor"] = {
                "cpu_us_per_msg": 1e6 * m["cpu_s"] / max(m["messages"], 1),
                "rss_per_stream_bytes": (m["rss_bytes"] - idle_rss) / streams,
                "send_lag_p99_ms": rep.get("send_lag", {}).get("p99_ms"),
            }
            fl.terminate()
            fl.wait()
            row["ratio"] = row["gateway"]["cpu_us_per_msg"] / max(row["floor"]["cpu_us_per_msg"], 1e-9)
            results.append(row)
            g, f = row["gateway"], row["floor"]
            print(f"{streams:5d} {tracks:8s} gw {g['cpu_us_per_msg']:6.2f} µs/msg  floor {f['cpu_us_per_msg']:6.2f} µs/msg  "
                  f"ratio {row['ratio']:4.2f}  rss/stream {g['rss_per_stream_bytes']/1024:5.1f} KiB  "
                  f"missing {g['missing']} dup {g['duplicated']} ooo {g['out_of_order']} mismatch {g['pcm_mismatches']}  "
                  f"p50 {g['e2e_p50_ms']} p99 {g['e2e_p99_ms']} ms", flush=True)
    finally:
        for p in procs:
            p.terminate()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(ROOT, "bench", "results", f"e2e-{stamp}.json")
    json.dump({"machine": machine(), "results": results}, open(path, "w"), indent=2)
    print(f"\nwrote {path}\n")
    print("| streams | tracks | gateway µs/msg | floor µs/msg | ratio | gateway RSS/stream | missing | dup | out of order | PCM mismatches | e2e p50 | e2e p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        g, f = r["gateway"], r["floor"]
        print(f"| {r['streams']} | {r['tracks']} | {g['cpu_us_per_msg']:.2f} | {f['cpu_us_per_msg']:.2f} | {r['ratio']:.2f} | "
              f"{g['rss_per_stream_bytes']/1024:.1f} KiB | {g['missing']} | {g['duplicated']} | {g['out_of_order']} | {g['pcm_mismatches']} | "
              f"{g['e2e_p50_ms']} ms | {g['e2e_p99_ms']} ms |")


def machine():
    info = {"nproc": os.cpu_count()}
    try:
        model = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
        info["cpu"] = model.group(1) if model else "?"
        info["mem_kb"] = int(re.search(r"MemTotal:\s*(\d+)", open("/proc/meminfo").read()).group(1))
        info["kernel"] = os.uname().release
    except Exception:
        pass
    return info


if __name__ == "__main__":
    main()
