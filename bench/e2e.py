#!/usr/bin/env python3
"""End-to-end benchmark: broker + gateway + loadtest, and reference servers under the same load.

For each (streams, tracks) configuration it runs real-time Twilio streams from the speech
fixture against each server in turn, with the identical `loadtest steady` load:

- `gateway`      the gateway, with Kafka verification (loss, order, bit-exactness, latency);
- `floor`        the framing floor: fastwebsockets read-and-discard (bench/src/bin/floor.rs);
- `kafka_floor`  the Kafka floor: the same read plus one librdkafka produce of each text frame's
                 raw bytes with the gateway's producer settings (bench/src/bin/kafka_floor.rs);
- optional ingest prototypes (`--also`, docs/benchmarks.md): `tpc_floor` (thread per
  core, SO_REUSEPORT), `tpc_floor_paced` (the same with `--pace-us`: read coalescing),
  `uring_floor` (io_uring multishot receive), `epoll_floor` (the same hand-written server on
  epoll).

Over a steady window it samples each server's CPU time from /proc/<pid>/stat and divides by the
media messages received in the window (the gateway's counter; for the floors, which count
nothing, streams x 50/s per track x the window). RSS per open stream is the growth of the
server's RSS over its idle RSS divided by the open streams. Each measurement also records the
load average and the CPU that processes outside the experiment used during the window ("other
cores"), so noisy runs can be spotted and re-run. A fresh broker is started for each server that
talks to Kafka (unless --brokers names one), so every Kafka run starts from the same state.

Results: bench/results/e2e-<timestamp>.json (every run plus medians) and, on stdout, a line per
measurement and Markdown tables (paste into docs/benchmarks.md): per configuration the gateway's
µs/msg, the framing floor's, the Kafka floor's, and the gateway's ratio to each, all from the
same invocation (with --runs N: medians of N runs, ratios of the medians).

With --verify-after-load the gateway's output is read back and checked only after the load,
so during the CPU window nothing reads from the broker in any run: like for like with the Kafka
floors, which count their topic back after the load too. Without it, the verifier reads every
record back while the window is measured (e2e latency is then measured too), and the broker's
serving of those reads and the verifier's own work share the two cores with the gateway only.

Usage: bench/e2e.sh [--configs 100:inbound,300:both] [--window 15] [--runs 3]
                    [--no-floor] [--no-kafka-floor] [--no-gateway] [--also tpc_floor,uring_floor]
                    [--syscalls 5] [--verify-after-load]
"""
import argparse, json, os, re, signal, socket, statistics, subprocess, sys, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
RESULTS = os.path.join(ROOT, "bench", "results")
FIXTURE = os.path.join(ROOT, "..", "shared", "fixtures", "speech-8k.ulaw")
FLOORS = ["floor", "kafka_floor", "kafka_floor_headers", "tpc_floor", "tpc_floor_paced", "uring_floor",
          "epoll_floor"]
# Floors that produce to Kafka: a fresh broker each, delivery checked, broker CPU measured.
KAFKA_FLOORS = ("kafka_floor", "kafka_floor_headers")
LABELS = {
    "gateway": "gateway", "floor": "framing floor", "kafka_floor": "Kafka floor",
    "kafka_floor_headers": "Kafka floor + contract headers",
    "tpc_floor": "thread-per-core floor", "tpc_floor_paced": "thread-per-core floor, paced reads",
    "uring_floor": "io_uring floor", "epoll_floor": "raw epoll floor",
}
SYSCALL_EVENTS = ["raw_syscalls:sys_enter", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_read",
                  "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_io_uring_enter",
                  "syscalls:sys_enter_futex", "syscalls:sys_enter_sendto", "syscalls:sys_enter_sendmsg",
                  "syscalls:sys_enter_poll", "syscalls:sys_enter_ppoll", "context-switches"]


def default_bin_dir():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.path.join(target, "release")


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
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / TICK  # utime + stime
    except (OSError, IndexError):
        return 0.0


def thread_group(comm):
    """Groups a thread name: `ingest-1` → `ingest`, `rdk:broker111` → `rdk:broker`."""
    return re.sub(r"[-:]?\d+$", "", comm) or comm


def thread_cpu_seconds(pid):
    """CPU seconds of each thread group of `pid` (threads that ended meanwhile are not seen)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        parts = raw.rsplit(")", 1)[1].split()
        key = thread_group(comm)
        out[key] = out.get(key, 0.0) + (int(parts[11]) + int(parts[12])) / TICK
    return out


def machine_busy_seconds():
    """CPU seconds spent by everything on the machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / TICK


def rss_bytes(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def metric(admin_port, name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def median(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else float("nan")


def fmt(x, spec=".2f"):
    return "–" if x is None or x != x else format(x, spec)


class Broker:
    """A Tansu broker we own (restartable), or an external one."""

    def __init__(self, external):
        self.external = external
        self.proc = None
        self.addr = external

    def fresh(self):
        if self.external:
            return self.addr
        self.stop()
        tansu = subprocess.check_output([os.path.join(ROOT, "scripts", "install-broker.sh")]).decode().strip()
        bp = free_port()
        url = f"tcp://127.0.0.1:{bp}"
        self.proc = subprocess.Popen([tansu, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                      "--storage-engine", "memory://tansu/"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(bp)
        self.addr = f"127.0.0.1:{bp}"
        return self.addr

    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def run_load(bin_dir, url, streams, tracks, duration, ramp, extra, out_json):
    cmd = [os.path.join(bin_dir, "loadtest"), "steady", "--url", url, "--streams", str(streams),
           "--tracks", tracks, "--duration", str(duration), "--ramp-per-sec", str(ramp),
           "--audio", FIXTURE, "--json-out", out_json, "--quiet"] + extra
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    p.t_start = time.time()
    return p


def measure(pid, streams, ramp, window, count_fn, load_pid, broker_pid):
    """Waits for the ramp, then samples CPU/messages over `window` seconds."""
    time.sleep(streams / ramp + 3)
    pids = [p for p in (pid, load_pid, broker_pid) if p]
    c0 = {p: cpu_seconds(p) for p in pids}
    th0 = thread_cpu_seconds(pid)
    b0, m0, t0, l0 = machine_busy_seconds(), count_fn(), time.time(), os.getloadavg()[0]
    time.sleep(window)
    c1 = {p: cpu_seconds(p) for p in pids}
    th1 = thread_cpu_seconds(pid)
    b1, m1, t1, l1 = machine_busy_seconds(), count_fn(), time.time(), os.getloadavg()[0]
    d = {p: c1[p] - c0[p] for p in pids}
    wall = t1 - t0
    return {
        "cpu_s": d[pid], "messages": m1 - m0, "wall_s": wall, "rss_bytes": rss_bytes(pid), "t0": t0, "t1": t1,
        "loadtest_cpu_s": d.get(load_pid), "broker_cpu_s": d.get(broker_pid),
        "thread_cpu_s": {k: th1[k] - th0.get(k, 0.0) for k in th1},
        "loadavg_1m": [round(l0, 2), round(l1, 2)],
        "other_cores": max(0.0, (b1 - b0) - sum(d.values())) / wall,
    }


def perf_syscalls(pid, seconds):
    """Syscalls and context switches of `pid` over `seconds` (perf stat on tracepoints)."""
    cmd = ["perf", "stat", "-x", ",", "--no-big-num"] + sum((["-e", e] for e in SYSCALL_EVENTS), []) + \
          ["-p", str(pid), "--", "sleep", str(seconds)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    counts = {}
    for line in out.splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and parts[2] in SYSCALL_EVENTS:
            try:
                counts[parts[2]] = int(float(parts[0]))
            except ValueError:
                counts[parts[2]] = None  # "<not supported>" / "<not counted>"
    if not counts:
        return {"error": out.strip()[-300:]}
    return counts


def read_summary(path):
    """The JSON summary line a floor printed on SIGTERM (kafka_floor, uring_floor), if any."""
    try:
        text = open(path).read()
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
        i = line.find("summary {")
        if i >= 0:
            try:
                return json.loads(line[i + len("summary "):])
            except ValueError:
                return None
    return None


def generator_rate(rep, lt, m):
    """Media messages/s the generator really sent during the CPU window (its 1 s timeseries)."""
    a, b = m["t0"] - lt.t_start, m["t1"] - lt.t_start
    xs = [p["media_per_sec"] for p in rep.get("timeseries") or [] if a + 1 <= p["t"] <= b + 0.5]
    return statistics.mean(xs) if xs else None


def load_report(out, lt=None, m=None):
    rep = json.load(open(out))
    st = rep.get("streams", {})
    return rep, {
        "achieved_media_per_sec": generator_rate(rep, lt, m) if lt is not None else None,
        "send_lag_p99_ms": rep.get("send_lag", {}).get("p99_ms"),
        "streams_failed": st.get("failed"), "streams_completed": st.get("completed"),
        "messages_sent": rep.get("messages_sent"), "close_codes": rep.get("close_codes"),
    }


def start_gateway(bin_dir, args, broker_addr, prefix):
    """Starts a gateway on free ports and waits for /readyz. Returns (process, port, admin
    port). Its stderr goes to bench/results/gateway-<prefix>.log, whose tail is in the error
    when it never becomes ready (it is killed then)."""
    port, admin = free_port(), free_port()
    log_path = os.path.join(RESULTS, f"gateway-{prefix}.log")
    with open(log_path, "wb") as log:
        gw = subprocess.Popen([os.path.join(bin_dir, "gateway"), "--listen", f"127.0.0.1:{port}",
                               "--admin-listen", f"127.0.0.1:{admin}", "--brokers", broker_addr,
                               "--topic-prefix", prefix, "--log-level", "warn", "--max-streams", "20000",
                               "--insecure-skip-signature"] + list(args),
                              stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 60
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2).status == 200:
                return gw, port, admin
        except Exception:
            if time.time() > deadline or gw.poll() is not None:
                gw.kill()
                gw.wait()
                tail = open(log_path, "rb").read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"gateway {bin_dir} {args} never became ready "
                                   f"(exit {gw.returncode}):\n{tail}")
            time.sleep(0.1)


def run_gateway(a, broker, streams, tracks, ramp, duration, tag):
    prefix = f"bench{int(time.time())}{streams}{tracks}"
    gw, port, admin = start_gateway(a.bin_dir, a.gateway_arg, broker.addr, prefix)
    try:
        idle_rss = rss_bytes(gw.pid)
        out = os.path.join(RESULTS, f"load-gateway-{streams}-{tracks}-{tag}.json")
        verify = ["--verify-brokers", broker.addr, "--topic-prefix", prefix, "--grace", "10"]
        if a.verify_after_load:
            verify.append("--verify-after-load")
        lt = run_load(a.bin_dir, f"ws://127.0.0.1:{port}/stream", streams, tracks, duration, ramp,
                      verify, out)
        m = measure(gw.pid, streams, ramp, a.window,
                    lambda: metric(admin, 'gateway_messages_received_total{event="media"}'), lt.pid, broker.pid())
        sc = perf_syscalls(gw.pid, a.syscalls) if a.syscalls else None
        lt.wait()
        rep, lrep = load_report(out, lt, m)
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(timeout=60)
    v = rep.get("verification") or {}
    tot = v.get("total", {})
    # Read back after the load: every count is exact, latency was not measured.
    lat = {} if v.get("read_after_load") else v.get("latency", {})
    return dict(result(m, idle_rss, streams, sc), **lrep, **{
        "expected": tot.get("expected"), "received": tot.get("received"), "missing": tot.get("missing"),
        "duplicated": tot.get("duplicated"), "out_of_order": tot.get("out_of_order"),
        "pcm_mismatches": tot.get("pcm_mismatches"),
        "e2e_p50_ms": lat.get("p50_ms"), "e2e_p99_ms": lat.get("p99_ms"), "e2e_max_ms": lat.get("max_ms"),
        "verified_after_load": bool(v.get("read_after_load")),
    })


def gateway_partitions_per_track(a):
    """Partitions of each audio topic the gateway writes to, so the Kafka floor's producer
    touches as many: --partitions-per-instance N (default 1), or `all` = --topic-partitions
    (default 6)."""
    args = list(a.gateway_arg)
    def flag(name, default):
        for i, v in enumerate(args):
            if v == name and i + 1 < len(args):
                return args[i + 1]
            if v.startswith(name + "="):
                return v.split("=", 1)[1]
        return default
    # A librdkafka partitioner option makes the gateway's default `all` (config.rs).
    partitioner = any("partitioner=" in v for v in args)
    n = flag("--partitions-per-instance", "all" if partitioner else "1")
    total = int(flag("--topic-partitions", "6"))
    return total if n == "all" else min(int(n), total)


def run_floor(a, name, broker, streams, tracks, ramp, duration, tag):
    port = free_port()
    addr = f"127.0.0.1:{port}"
    err_path = os.path.join(RESULTS, f"server-{name}-{streams}-{tracks}-{tag}.log")
    summary_path = None
    if name in KAFKA_FLOORS:
        summary_path = os.path.join(RESULTS, f"summary-{name}-{streams}-{tracks}-{tag}.json")
        parts = a.kafka_floor_partitions or gateway_partitions_per_track(a) * (2 if tracks == "both" else 1)
        cmd = ["kafka_floor", addr, "--brokers", broker.addr, "--topic", f"kfloor{int(time.time())}{streams}{tracks}",
               "--partitions", str(parts), "--summary", summary_path, "--count-back"]
        if name == "kafka_floor_headers":
            cmd.append("--headers")
    elif name == "tpc_floor_paced":
        cmd = ["tpc_floor", addr, "--pace-us", str(a.pace_us)]
    elif name == "uring_floor":
        cmd = ["uring_floor", addr, "--mode", "uring"]
    elif name == "epoll_floor":
        cmd = ["uring_floor", addr, "--mode", "epoll"]
    else:
        cmd = [name, addr]
    cmd[0] = os.path.join(a.bin_dir, cmd[0])
    err = open(err_path, "w")
    fl = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_port(port, timeout=60)
        idle_rss = rss_bytes(fl.pid)
        out = os.path.join(RESULTS, f"load-{name}-{streams}-{tracks}-{tag}.json")
        lt = run_load(a.bin_dir, f"ws://{addr}/stream", streams, tracks, duration, ramp, [], out)
        msgs_per_s = streams * (2 if tracks == "both" else 1) * 50
        t_start = time.time()
        m = measure(fl.pid, streams, ramp, a.window, lambda: (time.time() - t_start) * msgs_per_s,
                    lt.pid, broker.pid() if name in KAFKA_FLOORS else None)
        sc = perf_syscalls(fl.pid, a.syscalls) if a.syscalls else None
        lt.wait()
        _, lrep = load_report(out, lt, m)
        if lrep["achieved_media_per_sec"]:
            # The floors count nothing: what the generator sent in the window, not the target.
            m["messages"] = lrep["achieved_media_per_sec"] * m["wall_s"]
    finally:
        fl.terminate()
        try:
            fl.wait(timeout=180)  # the Kafka floor flushes, then reads its topic back
        except subprocess.TimeoutExpired:
            fl.kill()
            fl.wait()
        err.close()
    r = dict(result(m, idle_rss, streams, sc), **lrep)
    summary = read_summary(summary_path) if summary_path else read_summary(err_path)
    if summary:
        r["summary"] = summary
    return r


def result(m, idle_rss, streams, sc):
    r = {
        "cpu_us_per_msg": 1e6 * m["cpu_s"] / max(m["messages"], 1),
        "messages": m["messages"], "cpu_s": m["cpu_s"], "wall_s": m["wall_s"],
        "rss_per_stream_bytes": (m["rss_bytes"] - idle_rss) / streams, "rss_bytes": m["rss_bytes"],
        "loadavg_1m": m["loadavg_1m"], "other_cores": m["other_cores"],
        "loadtest_cpu_us_per_msg": 1e6 * m["loadtest_cpu_s"] / max(m["messages"], 1) if m["loadtest_cpu_s"] is not None else None,
        "broker_cpu_us_per_msg": 1e6 * m["broker_cpu_s"] / max(m["messages"], 1) if m["broker_cpu_s"] is not None else None,
        "loadtest_cores": m["loadtest_cpu_s"] / m["wall_s"] if m["loadtest_cpu_s"] is not None else None,
        # Where the server's CPU went, by thread group (µs per message; groups under 0.05 omitted).
        "thread_us_per_msg": {k: round(1e6 * v / max(m["messages"], 1), 2)
                              for k, v in sorted(m["thread_cpu_s"].items(), key=lambda kv: -kv[1])
                              if 1e6 * v / max(m["messages"], 1) >= 0.05},
    }
    if sc is not None:
        r["syscalls"] = sc
    return r


def sanity(name, r):
    """Warnings that make a measurement suspect (failed streams, undelivered records)."""
    w = []
    if r.get("generator_pace") is not None and abs(r["generator_pace"] - 1) > 0.02:
        w.append(f"generator sent {r['generator_pace']:.3f}× the target rate in the window")
    if r.get("streams_failed"):
        w.append(f"{r['streams_failed']} streams failed")
    s = r.get("summary") or {}
    if name in KAFKA_FLOORS and s:
        lost = s.get("frames", 0) - s.get("delivered", 0)
        if lost or s.get("queue_full") or s.get("delivery_failed"):
            w.append(f"kafka_floor: {lost} frames not delivered (queue_full {s.get('queue_full')}, "
                     f"failed {s.get('delivery_failed')})")
        if s.get("read_back") is not None and s["read_back"] != s.get("delivered"):
            w.append(f"kafka_floor: broker holds {s['read_back']} records, {s.get('delivered')} delivered")
    if name != "gateway" and s and r.get("messages_sent") and s.get("frames") != r["messages_sent"]:
        w.append(f"{name} read {s.get('frames')} frames of {r['messages_sent']} sent")
    if name == "gateway" and not r.get("expected"):
        w.append("gateway verification did not run (nothing expected)")
    elif name == "gateway" and r.get("received") != r.get("expected"):
        w.append(f"gateway verification: received {r.get('received')} of {r.get('expected')}")
    if name == "gateway" and (r.get("missing") or r.get("pcm_mismatches") or r.get("duplicated")
                              or r.get("out_of_order")):
        w.append(f"gateway verification: missing {r.get('missing')} dup {r.get('duplicated')} "
                 f"mismatch {r.get('pcm_mismatches')}")
    return w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="100:inbound,300:inbound,500:inbound,1000:inbound,100:both,300:both,500:both,1000:both")
    ap.add_argument("--window", type=float, default=15)
    ap.add_argument("--runs", type=int, default=1, help="repeat every configuration; report medians")
    ap.add_argument("--brokers", default=None, help="existing broker; default: a fresh Tansu per Kafka run")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeatable)")
    ap.add_argument("--no-gateway", action="store_true", help="skip the gateway runs")
    ap.add_argument("--no-floor", action="store_true", help="skip the framing floor runs")
    ap.add_argument("--no-kafka-floor", action="store_true", help="skip the Kafka floor runs")
    ap.add_argument("--verify-after-load", action="store_true",
                    help="gateway runs: the harness reads the gateway's output back and checks it only after the "
                         "load (loadtest --verify-after-load), as the Kafka floors count theirs back after it; "
                         "nothing reads from the broker during the CPU window; no e2e latency")
    ap.add_argument("--also", default="",
                    help="more servers: kafka_floor_headers,tpc_floor,tpc_floor_paced,uring_floor,epoll_floor")
    ap.add_argument("--kafka-floor-partitions", type=int, default=None,
                    help="partitions of the Kafka floor's topic (default: per track as many as the gateway writes to, "
                         "from its --partitions-per-instance and --topic-partitions)")
    ap.add_argument("--pace-us", type=int, default=1000,
                    help="tpc_floor_paced: µs each runtime thread sleeps between I/O polls (read coalescing)")
    ap.add_argument("--syscalls", type=float, default=0,
                    help="after the CPU window, count each server's syscalls for this many seconds (perf stat)")
    ap.add_argument("--bin-dir", default=default_bin_dir(), help="release binaries ($CARGO_TARGET_DIR/release)")
    args = ap.parse_args()
    configs = [(int(a), b) for a, b in (c.split(":") for c in args.configs.split(","))]
    servers = ([] if args.no_gateway else ["gateway"]) + ([] if args.no_floor else ["floor"]) + \
              ([] if args.no_kafka_floor else ["kafka_floor"])
    for extra in filter(None, args.also.split(",")):
        if extra not in FLOORS:
            sys.exit(f"--also {extra}: one of {', '.join(FLOORS)}")
        if extra not in servers:
            servers.append(extra)
    os.makedirs(RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    broker = Broker(args.brokers)
    runs = []  # one entry per (run, config): {"run", "streams", "tracks", "<server>": {...}}
    try:
        for run in range(1, args.runs + 1):
            for streams, tracks in configs:
                ramp = 200
                duration = int(streams / ramp + 3 + args.window + args.syscalls + 3)
                row = {"run": run, "streams": streams, "tracks": tracks, "window_s": args.window}
                for name in servers:
                    tag = f"{stamp}-r{run}"
                    if name == "gateway" or name in KAFKA_FLOORS:
                        broker.fresh()
                    elif broker.proc is None and not broker.external:
                        broker.fresh()  # an idle broker stays up, as in every earlier run
                    if name == "gateway":
                        r = run_gateway(args, broker, streams, tracks, ramp, duration, tag)
                    else:
                        r = run_floor(args, name, broker, streams, tracks, ramp, duration, tag)
                    r["target_media_per_sec"] = streams * (2 if tracks == "both" else 1) * 50
                    ach = r.get("achieved_media_per_sec")
                    r["generator_pace"] = ach / r["target_media_per_sec"] if ach else None
                    r["warnings"] = sanity(name, r)
                    row[name] = r
                    print(f"run {run} {streams:5d} {tracks:8s} {name:12s} {r['cpu_us_per_msg']:6.2f} µs/msg  "
                          f"rss/stream {r['rss_per_stream_bytes']/1024:5.1f} KiB  load {r['loadavg_1m'][0]:.2f}→{r['loadavg_1m'][1]:.2f}  "
                          f"other {r['other_cores']:.2f} cores  generator {fmt(r['generator_pace'], '.3f')}× target, "
                          f"{fmt(r['loadtest_cores'])} cores, send lag p99 {r['send_lag_p99_ms']} ms" +
                          (f"  missing {r['missing']} dup {r['duplicated']} ooo {r['out_of_order']} mismatch {r['pcm_mismatches']} "
                           + ("verified after the load" if r.get("verified_after_load") else
                              f"p50 {r['e2e_p50_ms']} p99 {r['e2e_p99_ms']} ms") if name == "gateway" else "") +
                          "".join(f"  WARNING {w}" for w in r["warnings"]), flush=True)
                    print("      threads (µs/msg): " + ", ".join(f"{k} {v:.2f}" for k, v in r["thread_us_per_msg"].items()), flush=True)
                add_ratios(row)
                runs.append(row)
    finally:
        broker.stop()
    med = medians(runs, configs, servers)
    path = os.path.join(RESULTS, f"e2e-{stamp}.json")
    json.dump({"machine": machine(), "args": vars(args), "servers": servers, "runs": runs, "medians": med,
               "results": runs if args.runs == 1 else med},
              open(path, "w"), indent=2)
    print(f"\nwrote {path}\n")
    if args.runs > 1:
        for run in range(1, args.runs + 1):
            print(f"### Run {run}\n")
            print_table([r for r in runs if r["run"] == run], servers)
            print()
        print(f"### Medians of {args.runs} runs\n")
    print_table(med, servers)
    if args.syscalls:
        print()
        print_syscalls(med if args.runs > 1 else runs, servers, args.syscalls)


RATIO_KEYS = {"floor": "ratio", "kafka_floor": "ratio_kafka_floor",
              "kafka_floor_headers": "ratio_kafka_floor_headers"}


def add_ratios(row):
    g = row.get("gateway", {}).get("cpu_us_per_msg")
    for f, key in RATIO_KEYS.items():
        v = row.get(f, {}).get("cpu_us_per_msg")
        row[key] = g / v if g and v else float("nan")


def medians(runs, configs, servers):
    out = []
    for streams, tracks in configs:
        rows = [r for r in runs if r["streams"] == streams and r["tracks"] == tracks]
        m = {"streams": streams, "tracks": tracks, "runs": len(rows)}
        for name in servers:
            rs = [r[name] for r in rows if name in r]
            keys = ["cpu_us_per_msg", "rss_per_stream_bytes", "other_cores", "broker_cpu_us_per_msg",
                    "loadtest_cpu_us_per_msg", "send_lag_p99_ms", "loadtest_cores", "generator_pace"]
            if name == "gateway":
                keys += ["e2e_p50_ms", "e2e_p99_ms"]
            s = {k: median([r.get(k) for r in rs]) for k in keys}
            s["cpu_us_per_msg_runs"] = [round(r["cpu_us_per_msg"], 2) for r in rs]
            s["loadavg_1m_runs"] = [r["loadavg_1m"] for r in rs]
            s["warnings"] = sum((r.get("warnings", []) for r in rs), [])
            if name == "gateway":
                for k in ("missing", "duplicated", "out_of_order", "pcm_mismatches"):
                    vals = [r.get(k) for r in rs]
                    s[k] = None if any(v is None for v in vals) else sum(vals)
            if any("syscalls" in r for r in rs):
                s["syscalls"] = {e: median([(r.get("syscalls") or {}).get(e) for r in rs]) for e in SYSCALL_EVENTS}
            m[name] = s
        add_ratios(m)
        out.append(m)
    return out


def print_table(rows, servers):
    floors = [s for s in servers if s not in ("gateway", "floor", "kafka_floor")]
    head = ["streams", "tracks"]
    if "gateway" in servers:
        head.append("gateway µs/msg")
    if "floor" in servers:
        head.append("framing floor µs/msg")
    if "kafka_floor" in servers:
        head.append("Kafka floor µs/msg")
    head += [f"{LABELS[f]} µs/msg" for f in floors]
    if "gateway" in servers and "floor" in servers:
        head.append("gateway ÷ framing floor")
    if "gateway" in servers and "kafka_floor" in servers:
        head.append("gateway ÷ Kafka floor")
    if "gateway" in servers and "kafka_floor_headers" in servers:
        head.append("gateway ÷ Kafka floor + headers")
    if "gateway" in servers:
        head += ["gateway RSS/stream", "missing", "dup", "out of order", "PCM mismatches", "e2e p50", "e2e p99"]
    head += ["load avg (1 min)", "other cores"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [str(r["streams"]), r["tracks"]]
        for name in ["gateway", "floor", "kafka_floor"] + floors:
            if name in servers:
                cells.append(fmt(r[name]["cpu_us_per_msg"]))
        if "gateway" in servers and "floor" in servers:
            cells.append(fmt(r["ratio"]))
        if "gateway" in servers and "kafka_floor" in servers:
            cells.append(fmt(r["ratio_kafka_floor"]))
        if "gateway" in servers and "kafka_floor_headers" in servers:
            cells.append(fmt(r["ratio_kafka_floor_headers"]))
        if "gateway" in servers:
            g = r["gateway"]
            cells += [f"{fmt(g['rss_per_stream_bytes'] / 1024, '.1f')} KiB", str(g["missing"]), str(g["duplicated"]),
                      str(g["out_of_order"]), str(g["pcm_mismatches"]),
                      f"{fmt(g['e2e_p50_ms'], '.1f')} ms", f"{fmt(g['e2e_p99_ms'], '.1f')} ms"]
        loads = []
        others = []
        for name in servers:
            s = r[name]
            if "loadavg_1m_runs" in s:
                loads += [l[1] for l in s["loadavg_1m_runs"]]
            else:
                loads.append(s["loadavg_1m"][1])
            others.append(s["other_cores"])
        cells.append(f"{min(loads):.2f}–{max(loads):.2f}")
        cells.append(f"{max(others):.2f}")
        print("| " + " | ".join(cells) + " |")


def print_syscalls(rows, servers, seconds):
    print("Syscalls and context switches per media message (perf stat over the extra window):\n")
    cols = ["raw_syscalls:sys_enter", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_epoll_wait",
            "syscalls:sys_enter_io_uring_enter", "syscalls:sys_enter_futex", "context-switches"]
    print("| streams | tracks | server | syscalls | recvfrom | epoll_wait | io_uring_enter | futex | context switches |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = r["streams"] * (2 if r["tracks"] == "both" else 1) * 50
        for name in servers:
            s = r[name]
            sc = s.get("syscalls")
            if not sc or "error" in sc:
                continue
            msgs = rate * seconds
            cells = [fmt(sc.get(c) / msgs if sc.get(c) is not None else None, ".3f") for c in cols]
            print(f"| {r['streams']} | {r['tracks']} | {LABELS[name]} | " + " | ".join(cells) + " |")


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
