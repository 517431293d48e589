"""Turn saved benchmark JSON into markdown tables (and, for ``fastff bench``, a plot).

* pytest-benchmark JSON: one row per case, grouped, with the ratio to the fastest peer of the
  group measured in the same run (to the slowest case of a group without peers, e.g. reuse vs
  rebuild).
* ``fastff bench --json`` output: one row per component, one column per size (us per
  atom-step, mean and median), then the headline ratios; ``--plot FILE.png`` redraws the plot.

Run: python bench/report.py results.json [more.json ...] [--plot FILE.png]
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


def fastff_bench_table(doc) -> str:
    """Markdown of a ``fastff bench --json`` document: us per atom-step per component and size."""
    results = doc["results"]
    sizes = [r["atoms"] for r in results]
    names = list(dict.fromkeys(row["component"] for r in results for row in r["rows"]))
    lines = ["| component | " + " | ".join(f"{n:,} atoms" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name in names:
        cells = []
        for r in results:
            row = next((x for x in r["rows"] if x["component"] == name), None)
            if row is None or row["skipped"]:
                cells.append("skipped" if row is None else f"({row['skipped']})")
            else:
                # the mean over MD steps (rebuilds included) where the JSON has it
                mean = row.get("mean_s", row["median_s"])
                cell = (f"{mean * 1e6:.3g} (median {row['median_s'] * 1e6:.3g} ± "
                        f"{row['iqr_s'] * 1e6:.2g})")
                error = row.get("force_error")
                if error:  # a tabulated row beside its force error against the exact network
                    cell += (f"; force error max {error['max_abs']:.2g}, RMS {error['rms']:.2g}"
                             f" {error['unit']}")
                cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    keys = list(dict.fromkeys(k for r in results for k in r["headline"]))
    lines += ["", "| ratio | " + " | ".join(f"{n:,}" for n in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for key in keys:
        cells = [f"{r['headline'][key]:.3g}x" if key in r["headline"] else "" for r in results]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    s, m = doc["settings"], doc["machine"]
    traj = results[0].get("trajectory") or {}
    if traj:
        lines.append(f"\nframes: {traj.get('integrator')}"
                     + (f", {traj['timestep_fs']:g} fs, {traj['temperature_K']:g} K"
                        if "timestep_fs" in traj else "")
                     + "; Verlet-list rebuilds per step: "
                     + ", ".join(f"{k} {v:.3g}" for k, v in
                                 traj.get("rebuilds_per_step", {}).items()))
    lines.append(f"\n{m['processor']}, {s['threads']} threads, {s['dtype']}, fastff "
                 f"{doc['versions']['fastff']}, torch {doc['versions']['torch']}")
    return "\n".join(lines)


def _plot(doc, path):
    """Redraw the ``fastff bench --plot`` figure from saved JSON."""
    from fastff import benchmark, cli

    results = [{"rows": [benchmark.Row(**{k: v for k, v in row.items()
                                          if k not in ("mean_s", "median_s", "iqr_s")})
                         for row in r["rows"]]} for r in doc["results"]]
    cli.plot(results, path)


def main(argv):
    plot = None
    if "--plot" in argv:
        k = argv.index("--plot")
        plot, argv = argv[k + 1], argv[:k] + argv[k + 2:]
    docs = []
    for path in argv:
        with open(path) as f:
            docs.append(json.load(f))
    for doc in docs:
        if "results" in doc:  # fastff bench --json
            print(fastff_bench_table(doc))
            if plot:
                _plot(doc, plot)
                print(f"wrote {plot}")
    bench = [d for d in docs if "benchmarks" in d]
    if bench:
        _pytest_benchmark_tables(bench)


def _pytest_benchmark_tables(docs):
    print("| benchmark | case | median ± IQR | ratio | notes |")
    print("|---|---|---|---|---|")
    for data in docs:
        for row in rows(data):
            print("| " + " | ".join(row) + " |")
    machine = data.get("machine_info", {})
    print(f"\n{machine.get('cpu', {}).get('brand_raw', '')}, "
          f"{data.get('datetime', '')[:10]}, python {machine.get('python_version', '')}")


if __name__ == "__main__":
    main(sys.argv[1:])
