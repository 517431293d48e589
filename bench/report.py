"""Turn saved benchmark JSON into markdown tables (and, for ``fastff bench``, a plot).

* pytest-benchmark JSON: one row per case, grouped, with the ratio to the fastest peer of the
  group measured in the same run (to the slowest case of a group without peers, e.g. reuse vs
  rebuild).
* ``fastff bench --json`` output: one row per component, one column per size (us per
  atom-step, mean and median), then the headline ratios; ``--plot FILE.png`` redraws the plot.

* ``--readme``: the README's headline table (fastff against the peers people run), rebuilt
  from the committed JSON under bench/results/ and written between the README's
  ``<!-- results:start -->`` and ``<!-- results:end -->`` markers. A missing file or field
  drops that row or prints "not recorded"; it never fails.

Run: python bench/report.py results.json [more.json ...] [--plot FILE.png]
     python bench/report.py --readme [--check]     (the README's headline table)
     python bench/report.py --docs [--check]       (every JSON's table, docs/benchmarks.md)
"""

import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
DOCS = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


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


def _load(name):
    try:
        with open(RESULTS / name) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _commit(doc, run=None):
    """The commit a document (or one run inside it) records, short, or None."""
    for d in (run or {}, doc):
        for value in (d.get("commit"), d.get("git_commit"),
                      (d.get("commit_info") or {}).get("id"),
                      (d.get("versions") or {}).get("commit")):
            if isinstance(value, str) and value:
                dirty = (d.get("commit_info") or {}).get("dirty")
                return value[:7] + (" (dirty)" if dirty else "")
    return None


def _machine(doc):
    """'AMD EPYC, 2 cores' from either JSON format, or None."""
    m = doc.get("machine")
    if isinstance(m, dict):
        name, cores = m.get("processor") or m.get("platform"), m.get("cpu_count")
    elif isinstance(m, str):
        name, cores = m, None
    else:
        cpu = (doc.get("machine_info") or {}).get("cpu") or {}
        name, cores = cpu.get("brand_raw"), cpu.get("count")
    if not name:
        return None
    return f"{name}, {cores} cores" if cores else str(name)


def _time(seconds):
    return _fmt(seconds) if seconds is not None else ""


def _pytest_cases(doc, group):
    """{implementation: (median seconds, extra_info)} of one pytest-benchmark group."""
    out = {}
    for b in doc.get("benchmarks", []):
        if b.get("group") == group and "stats" in b:
            impl = (b.get("params") or {}).get("impl") or b["name"].split("[", 1)[-1]
            out[str(impl).split("-")[0]] = (b["stats"]["median"], b.get("extra_info") or {})
    return out


def _mm_rows():
    """fastff's MM against OpenMM's CPU platform on the same System (``fastff bench``)."""
    rows = []
    for name in ("bench_3000.json", "bench_30000.json"):
        doc = _load(name)
        if doc is None:
            continue
        for r in doc.get("results", []):
            got = {x.get("component"): x.get("median_s") for x in r.get("rows", [])
                   if not x.get("skipped")}
            ours, peer = got.get("MM (fastff)"), got.get("MM (OpenMM)")
            if ours and peer:
                rows.append((f"MM energy + forces (LJ, reaction field, bonds, angles), water "
                             f"box, {r.get('atoms', 0):,} atoms", ours, "OpenMM CPU platform", peer,
                             "/atom-step", "", _machine(doc), _commit(doc), name))
    return rows


def _neighbor_rows():
    """fastff's full list (shifts and distances) against vesin, 10^4 and 10^5 atoms: medians
    over the runs of ``bench_neighbors_ratios.json``."""
    doc = _load("bench_neighbors_ratios.json")
    rows = []
    for n in (10_000, 100_000):
        ours, peer = (statistics.median(run[f"test_uniform_periodic[{code}-{n}]"]
                                        for run in doc["medians_s"])
                      for code in ("fastff", "vesin"))
        rows.append((f"neighbor list, {n:,} atoms, cutoff 5 A, full, shifts + distances", ours,
                     "vesin", peer, "", "", f"{doc['machine']}, {doc['cpu_count']} cores",
                     _commit(doc),
                     "bench_neighbors_ratios.json"))
    return rows


def _main_job_rows():
    """Each fastff row of ``fastff bench`` at 3,000 atoms against its named peer (ratio of
    means over real dynamics, rebuilds included), tabulated rows with their force error."""
    doc = _load("bench_3000.json")
    rows = []
    for r in (doc or {}).get("results", []):
        by = {x.get("component"): x for x in r.get("rows", []) if not x.get("skipped")}
        for x in by.values():
            peer = by.get(x.get("peer") or "")
            if peer is None or not x.get("mean_s") or not peer.get("mean_s"):
                continue
            fe = x.get("force_error") or {}
            err = (f"{fe['max_abs'] / fe['max_abs_force']:.1e}"
                   if fe.get("max_abs") is not None and fe.get("max_abs_force") else "")
            rows.append((f"{x['component']}, {r.get('atoms', 0):,} atoms, energy + forces",
                         x["mean_s"], peer["component"], peer["mean_s"], "/atom-step", err,
                         _machine(doc), _commit(doc), "bench_3000.json"))
    return rows


def _mace_rows():
    """mace-torch's MACE against the same model accelerated in place (bench/bench_mace.py,
    median of alternating rounds); a case measured again in a later file takes that row."""
    rows = {}
    for name in ("bench_mace_64x0e.json", "bench_mace_rerun.json",
                 "bench_mace_64x0e_blocks.json", "bench_mace_blocks_rerun.json",
                 "bench_mace_pairs_64x0e.json", "bench_mace_pairs_rerun.json",
                 "bench_mace_recompute_64x0e.json", "bench_mace_recompute_rerun.json"):
        doc = _load(name)
        for c in (doc or {}).get("cases", []):
            ours, peer = c.get("accelerated") or {}, c.get("original") or {}
            what = "training step" if c["case"].startswith("training") else "energy + forces"
            hidden = c["case"].replace("training ", "")
            err = c.get("forces_max_diff_over_max") if "tabulated" in hidden else None
            rows[c["case"]] = (f"MACE {hidden}, {c.get('atoms', 0):,} atoms, {what}",
                               ours.get("median_s_per_step"), "mace-torch MACE",
                               peer.get("median_s_per_step"), "", f"{err:.1e}" if err else "",
                               _machine(doc), _commit(doc), name)
    return list(rows.values())


def readme_table():
    """The README's results table, as markdown, from the committed JSON."""
    rows = []
    for part in (_main_job_rows, _mace_rows, _neighbor_rows):
        try:  # a JSON in another shape drops its rows, never the table
            rows += [r for r in part() if r[1] and r[3]]
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            continue
    machines = {r[6] for r in rows}
    shared = machines.pop() if len(machines) == 1 else None
    lines = ["| case | fastff | peer | speed-up | force error | "
             + ("commit, data |" if shared else "machine, commit, data |"),
             "|---|---|---|---|---|---|"]
    for what, ours, peer_name, peer, unit, err, machine, commit, name in rows:
        where = "" if shared else f"{machine or 'machine not recorded'}, "
        lines.append(f"| {what} | {_time(ours)}{unit} | {peer_name}: {_time(peer)}{unit} | "
                     f"**{peer / ours:.2g}x** | {err or '-'} | {where}"
                     f"{commit or 'commit not recorded'}, `{name}` |")
    lines += ["", (f"{shared}, " if shared else "") + "float32 (neighbor lists: float64), 2 "
              "threads. `fastff bench`: means over MD frames, list rebuilds included; MACE: "
              "medians of alternating processes. Speed-up: peer time / fastff time, same run; "
              "force error: largest deviation of tabulated from exact forces over the largest "
              "force. Generated by `python bench/report.py --readme`."]
    return "\n".join(lines)


def _pytest_table(doc):
    lines = ["| benchmark | case | median ± IQR | ratio | notes |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(doc)]
    return "\n".join(lines)


def _alternating_table(doc):
    lines = ["| case | rounds | medians | ratio (range over rounds) | command |",
             "|---|---|---|---|---|"]
    for run in doc.get("runs", []):
        for r in run.get("results", []):
            medians = ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("medians_s") or {}).items())
            ratios = "; ".join(
                f"{k} {v:.3g}x" + (f" ({lo:.3g}-{hi:.3g})" if (lo_hi := (
                    r.get("round_ratio_range") or {}).get(k)) and (lo := lo_hi[0]) is not None
                    and (hi := lo_hi[1]) is not None else "")
                for k, v in (r.get("ratios") or {}).items())
            lines.append(f"| {r.get('case', '')} | {r.get('rounds', '')} | {medians} | {ratios} "
                         f"| `{run.get('command', 'not recorded')}` |")
    return "\n".join(lines)


def _first_run_machine(doc):
    runs = doc.get("runs")
    return _machine(runs[0]) if isinstance(runs, list) and runs and isinstance(runs[0], dict) \
        else None


def _slowdown_table(doc):
    """Runs of bench/contention.py: each row's slowdown beside one busy process, and its quiet
    time per atom-step, per run."""
    lines = ["| run | settings | row | quiet us/atom-step | slowdown | over OpenMM's |",
             "|---|---|---|---|---|---|"]
    for k, run in enumerate(doc["runs"]):
        quiet = run["rounds"][0]["quiet_s"] if run.get("rounds") else {}
        spin = run.get("GOMP_SPINCOUNT_of_the_bench_processes") or "default"
        settings = f"GOMP_SPINCOUNT {spin}" + (
            f", numba {run['numba_threading_layer']}" if "numba_threading_layer" in run else "")
        if "code" in run:  # runs of two versions of the code, alternating
            settings += f", code {run['code']}"
        for row, slow in run["median_slowdown"].items():
            over = run["slowdown_over_openmm"].get(row)
            lines.append(f"| {k + 1} | {settings} | {row} | {quiet.get(row, 0) * 1e6:.2f} | "
                         f"{slow:.2f}x | {f'{over:.2f}x' if over else ''} |")
    return "\n".join(lines)


def _paths_table(doc):
    """Two code paths timed in turn (``timing``: median CPU seconds per path) and their peak
    memory (``memory``), one row per run."""
    lines = ["| run | median CPU s per step | extra peak MiB | ratio | commit |",
             "|---|---|---|---|---|"]
    for run in doc["runs"]:
        med = run["timing"]["median_cpu_s"]
        mem = run.get("memory", {})
        paths = list(med)
        ratio = med[paths[1]] / med[paths[0]] if len(paths) == 2 and med[paths[0]] else None
        lines.append("| " + " | ".join([
            str(run.get("hidden", "")),
            ", ".join(f"{p}: {med[p]:.3f}" for p in paths),
            ", ".join(f"{p}: {mem[p].get('extra_peak_MiB')}" for p in mem),
            f"{paths[1]} / {paths[0]}: {ratio:.3f}" if ratio else "",
            _commit(run) or ""]) + " |")
    return "\n".join(lines)


def docs_tables():
    """Every committed JSON as a table (docs/benchmarks.md), each with its provenance."""
    out = []
    for path in sorted(RESULTS.glob("*.json")):
        doc = _load(path.name)
        if not isinstance(doc, dict):
            continue
        if "results" in doc:
            try:
                table = "Energy + forces, us per atom-step (median ± IQR).\n\n" + (
                    fastff_bench_table(doc))
            except (KeyError, TypeError):
                continue
        elif "benchmarks" in doc:
            table = _pytest_table(doc)
        elif "runs" in doc and all("benchmarks" in run for run in doc["runs"]):
            table = "\n\n".join(f"Run {k + 1}, commit {_commit(run) or 'not recorded'}:\n\n"
                                 + _pytest_table(run) for k, run in enumerate(doc["runs"]))
        elif "runs" in doc and all("timing" in run for run in doc["runs"]):
            table = _paths_table(doc)
        elif "runs" in doc and all("median_slowdown" in run for run in doc["runs"]):
            table = _slowdown_table(doc)
        elif "runs" in doc:
            table = _alternating_table(doc)
        elif "rows" in doc:
            keys = list(dict.fromkeys(k for r in doc["rows"] for k in r))
            table = "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + [
                "| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in doc["rows"]])
        else:
            continue
        command = doc.get("command")
        machine = _machine(doc) or _first_run_machine(doc)
        out.append(f"### `{path.name}`\n\n"
                   f"Machine: {machine or 'not recorded'}; commit: "
                   f"{_commit(doc) or 'not recorded'}"
                   + (f"; command: `{command}`" if command else "")
                   + (f"; {doc['datetime'][:10]}" if isinstance(doc.get("datetime"), str)
                      else "") + ".\n"
                   + (f"\n{doc['note']}\n" if isinstance(doc.get("note"), str) else "")
                   + f"\n{table}\n")
    return "\n".join(out)


def update_readme(path=README, check=False, table=None):
    """Rewrite the table between the markers; with ``check``, only say whether it differs."""
    text = Path(path).read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: no {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{(table or readme_table)()}\n{END}{tail}"
    if check:
        return new == text
    if new != text:
        Path(path).write_text(new)
    return True


def main(argv):
    if "--docs" in argv:
        ok = update_readme(DOCS, check="--check" in argv, table=docs_tables)
        print(("docs tables up to date" if ok else "docs tables differ")
              if "--check" in argv else f"wrote the tables in {os.path.relpath(DOCS)}")
        sys.exit(0 if ok else 1)
    if "--readme" in argv:
        ok = update_readme(check="--check" in argv)
        print(("README table up to date" if ok else "README table differs")
              if "--check" in argv else f"wrote the table in {os.path.relpath(README)}")
        sys.exit(0 if ok else 1)
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
