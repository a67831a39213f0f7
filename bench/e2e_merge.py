#!/usr/bin/env python3
"""Medians over several bench/e2e.py result files (one repetition each, e.g. one per MEASURING
hold): per configuration and server, every run's µs/msg and the median; ratios of the gateway to
the framing floor and to the Kafka floor per run and of the medians; the generator's pace and CPU
and the CPU used outside the experiment ("other cores") in each window.

Usage: bench/e2e_merge.py bench/results/e2e-A.json bench/results/e2e-B.json ...
"""
import json, statistics, sys

LABELS = {"gateway": "gateway", "floor": "framing floor", "kafka_floor": "Kafka floor",
          "tpc_floor": "thread-per-core floor", "uring_floor": "io_uring floor", "epoll_floor": "raw epoll floor"}


def main():
    files = [json.load(open(p)) for p in sys.argv[1:]]
    rows = {}
    for f in files:
        for r in f["runs"]:
            rows.setdefault((r["streams"], r["tracks"]), []).append(r)
    servers = files[0]["servers"]
    print("| streams | tracks | server | µs/msg per run | median | other cores per run | generator pace (min) | generator cores (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for (streams, tracks), rs in rows.items():
        for s in servers:
            xs = [r[s]["cpu_us_per_msg"] for r in rs if s in r]
            oth = [r[s]["other_cores"] for r in rs if s in r]
            pace = [r[s].get("generator_pace") for r in rs if s in r and r[s].get("generator_pace")]
            ltc = [r[s].get("loadtest_cores") for r in rs if s in r and r[s].get("loadtest_cores") is not None]
            print(f"| {streams} | {tracks} | {LABELS.get(s, s)} | {' / '.join(f'{x:.2f}' for x in xs)} | "
                  f"**{statistics.median(xs):.2f}** | {' / '.join(f'{x:.2f}' for x in oth)} | "
                  f"{min(pace):.3f} | {max(ltc):.2f} |")
    print()
    print("| streams | tracks | gateway ÷ framing floor per run | of the medians | gateway ÷ Kafka floor per run | of the medians |")
    print("|---|---|---|---|---|---|")
    for (streams, tracks), rs in rows.items():
        def med(s):
            return statistics.median(r[s]["cpu_us_per_msg"] for r in rs)
        cells = []
        for f in ("floor", "kafka_floor"):
            if "gateway" in servers and f in servers:
                per = [r["gateway"]["cpu_us_per_msg"] / r[f]["cpu_us_per_msg"] for r in rs]
                cells += [" / ".join(f"{x:.2f}" for x in per), f"**{med('gateway') / med(f):.2f}**"]
            else:
                cells += ["–", "–"]
        print(f"| {streams} | {tracks} | " + " | ".join(cells) + " |")
    if "gateway" in servers:
        print()
        for (streams, tracks), rs in rows.items():
            g = [r["gateway"] for r in rs]
            print(f"gateway {streams} {tracks}: missing {[x.get('missing') for x in g]} dup {[x.get('duplicated') for x in g]} "
                  f"ooo {[x.get('out_of_order') for x in g]} mismatch {[x.get('pcm_mismatches') for x in g]} "
                  f"p50 {[x.get('e2e_p50_ms') for x in g]} p99 {[x.get('e2e_p99_ms') for x in g]} "
                  f"broker µs/msg {[round(x.get('broker_cpu_us_per_msg') or 0, 1) for x in g]}")
    if "kafka_floor" in servers:
        for (streams, tracks), rs in rows.items():
            k = [r["kafka_floor"] for r in rs]
            print(f"kafka_floor {streams} {tracks}: " + "; ".join(
                f"frames {x.get('summary', {}).get('frames')} delivered {x.get('summary', {}).get('delivered')} "
                f"read back {x.get('summary', {}).get('read_back')} queue_full {x.get('summary', {}).get('queue_full')} "
                f"broker µs/msg {round(x.get('broker_cpu_us_per_msg') or 0, 1)}" for x in k))


if __name__ == "__main__":
    main()
