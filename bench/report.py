"""Turn pytest-benchmark JSON into a markdown table: one row per case, grouped, with the ratio
to the fastest peer of the group measured in the same run (to the slowest case of a group
without peers, e.g. reuse vs rebuild).

Run: python bench/report.py bench-results.json [more.json ...]
"""

import json
import sys


def _fmt(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def rows(data):
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"] or b["name"], []).append(b)
    for group, cases in groups.items():
        peers = [c for c in cases if "fastff" not in c["name"]]
        # the ratio is to the fastest peer; a group without peers compares to its slowest case
        best_peer = (min(c["stats"]["median"] for c in peers) if peers
                     else max(c["stats"]["median"] for c in cases))
        for c in sorted(cases, key=lambda c: c["stats"]["median"]):
            median, iqr = c["stats"]["median"], c["stats"]["iqr"]
            case = c["name"].split("[", 1)[-1].rstrip("]") if "[" in c["name"] else c["name"]
            ratio = f"{median / best_peer:.2f}x" if best_peer else ""
            extra = c.get("extra_info", {})
            note = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in extra.items())
            yield group, case, f"{_fmt(median)} ± {_fmt(iqr)}", ratio, note


def main(paths):
    print("| benchmark | case | median ± IQR | ratio | notes |")
    print("|---|---|---|---|---|")
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for row in rows(data):
            print("| " + " | ".join(row) + " |")
    machine = data.get("machine_info", {})
    print(f"\n{machine.get('cpu', {}).get('brand_raw', '')}, "
          f"{data.get('datetime', '')[:10]}, python {machine.get('python_version', '')}")


if __name__ == "__main__":
    main(sys.argv[1:])
