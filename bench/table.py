#!/usr/bin/env python3
"""Prints a bench/run results file (JSON) as a Markdown table, for bench/README.md.

    bench/table.py [bench/results.json]
"""
import json
import sys



def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1000:.1f} ms"
    if unit in ("ns", "ns/op"):
        return f"{v:.0f} {unit}"
    if unit == "ms":
        return f"{v:.3f} ms"
    return f"{v:.2f} {unit}"


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "bench/results.json"
    with open(path) as fh:
        d = json.load(fh)
    m = d["meta"]
    print(f"Run of {m['date']} (git {m['git']}), {m['cpus']} x {m['cpu']}, Linux {m['kernel']}, "
          f"{m['pairs']} pairs, {m['seconds'] / 60:.0f} min, verdict on {m['metric']} time.\n")
    print("| # | row | reference | library | ratio | cpu ratio | target | status |")
    print("|---|---|---|---|---|---|---|---|")
    for r in d["rows"]:
        u = r["unit"]
        if r["ref_median"] is None:
            status = "skipped" if r["note"].startswith("skipped") else "ERROR"
            print(f"| {r['case']} | {r['name']} | - | - | - | - | {r['target']} | {status}: {r['note']} |")
            continue
        status = "met" if r["met"] else "-" if r["met"] is None else "MISSED"
        cpu = f"{r['cpu_ratio']:.3f}" if r.get("cpu_ratio") else "-"
        name = r["name"].replace("|", "/")
        print(f"| {r['case']} | {name} | {fmt(r['ref_median'], u)} | {fmt(r['lib_median'], u)} | "
              f"{r['ratio']:.3f} | {cpu} | {r['target'] or '-'} | {status} |")


if __name__ == "__main__":
    main()
