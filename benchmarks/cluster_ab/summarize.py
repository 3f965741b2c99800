"""Summarize cluster A/B runs (result.json + metrics.txt) and sim runs into a markdown table."""
import json, re, statistics, sys
from pathlib import Path

HERE = Path(__file__).parent

def metrics(path):
    out = {"preemptions": 0.0, "mig": {}, "dt_count": 0.0, "dt_sum": 0.0, "kv_bytes": 0.0, "buckets": {}}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if line.startswith("shoal:num_preemptions_total"):
            out["preemptions"] += float(line.split()[-1])
        m = re.match(r'shoal:migrations_total\{outcome="(\w+)",reason="(\w+)"\} (\S+)', line)
        if m:
            out["mig"][f"{m[2]}/{m[1]}"] = int(float(m[3]))
        if line.startswith("shoal:migration_downtime_seconds_count"):
            out["dt_count"] = float(line.split()[-1])
        if line.startswith("shoal:migration_downtime_seconds_sum"):
            out["dt_sum"] = float(line.split()[-1])
        m = re.match(r'shoal:migration_downtime_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
        if m:
            out["buckets"][m[1]] = int(float(m[2]))
        if line.startswith("shoal:migration_kv_bytes_total"):
            out["kv_bytes"] = float(line.split()[-1])
    return out

def row(name, r, m=None):
    t, p = r["ttft_ms"], r["tpot_ms"]
    s = (f"| {name} | {r['goodput_rps']:.3f} | {r['slo_attainment']:.2f} | {t['p50']:.0f} | {t['p99']:.0f} | "
         f"{p['p50']:.0f} | {p['p99']:.0f} | {r['completed']}/{r['failed']} | {r['duration_s']:.0f} |")
    if m is not None:
        dt = f"{1000 * m['dt_sum'] / m['dt_count']:.0f}" if m["dt_count"] else "-"
        mig = ", ".join(f"{k} {v}" for k, v in sorted(m["mig"].items())) or "-"
        s += f" {m['preemptions']:.0f} | {mig} | {dt} |"
    else:
        mg = r.get("migrations") or {}
        mig = ", ".join(f"{k}/{o} {v}" for k, d in sorted(mg.get("by_reason", {}).items()) for o, v in sorted(d.items())) or "-"
        dt = f"{mg['downtime_ms']['mean']:.1f}" if mg.get("done") else "-"
        s += f" {r.get('preemptions', 'n/a')} | {mig} | {dt} |"
    return s

HDR = ("| run | goodput rps | SLO att. | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | done/failed | dur s "
       "| preemptions | migrations (reason/outcome) | mean downtime ms |\n" + "|---" * 12 + "|")

if __name__ == "__main__":
    names = sys.argv[1:]
    print(HDR)
    for n in names:
        d = HERE / n
        r = json.loads((d / "result.json").read_text())
        print(row(n, r, metrics(d / "metrics.txt") if (d / "metrics.txt").exists() else None))
