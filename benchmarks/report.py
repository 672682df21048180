"""Turns pytest-benchmark JSON from ``benchmarks/test_bench_losses.py`` into a markdown table and plots.

    python -m benchmarks.report benchmarks/results/cpu.json [more.json ...] \
        [--out benchmarks/results/report.md] [--plots benchmarks/results/plots] [--readme README.md]

Per group (one op, pass, dtype, shape, device): each provider's median time (CUDA-event median on
GPU), GB/s (KL: 6 bytes/element for bf16 fwd+bwd) or TFLOP/s (correlation), the fraction of the
copy bandwidth / matmul peak measured in the same run, the speed-up over eager and over
torch.compile, and the peak extra memory. ``--readme`` replaces the text between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` with the table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def load(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(rows, runs): one row per benchmark with its derived figures; one entry per JSON file."""
    rows, runs = [], []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        info = doc.get("machine_info", {}).get("mlkd_fast", {})
        runs.append({"file": os.path.basename(path), "datetime": doc.get("datetime", "")[:19], **info})
        for b in doc["benchmarks"]:
            e = b.get("extra_info", {})
            ms = e.get("device_median_ms") or b["stats"]["median"] * 1e3
            rows.append({"group": b["group"], "file": os.path.basename(path), "ms": ms, **e,
                         "timer": "cuda-events" if e.get("device_median_ms") else "wall"})
    roof = {}
    for r in rows:
        if r.get("op") == "copy":
            roof[(r["file"], r["device"], "GB/s")] = r["bytes"] / r["ms"] / 1e6
        if r.get("op") == "matmul":
            roof[(r["file"], r["device"], "TFLOP/s")] = r["flops"] / r["ms"] / 1e9
    by_group = defaultdict(dict)
    for r in rows:
        by_group[(r["file"], r["group"])][r["provider"]] = r
    for r in rows:
        if r.get("op") in ("kd_kl", "copy"):
            r["rate"], r["unit"] = r["bytes"] / r["ms"] / 1e6, "GB/s"
        elif r.get("op") in ("correlation", "matmul"):
            r["rate"], r["unit"] = r["flops"] / r["ms"] / 1e9, "TFLOP/s"
        peak = roof.get((r["file"], r.get("device"), r.get("unit")))
        r["of_peak"] = r["rate"] / peak if peak and r.get("op") in ("kd_kl", "correlation") else None
        peers = by_group[(r["file"], r["group"])]
        r["vs_eager"] = peers["eager"]["ms"] / r["ms"] if "eager" in peers else None
        r["vs_compile"] = peers["compile"]["ms"] / r["ms"] if "compile" in peers else None
    return rows, runs


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(rows: list[dict], runs: list[dict]) -> str:
    out = []
    for run in runs:
        out.append(f"Measured on **{run.get('device', '?')}** ({run.get('cpu', '?')}, {run.get('threads', '?')} threads), "
                   f"torch {run.get('torch')}, triton {run.get('triton')}, CUDA {run.get('cuda')}, "
                   f"commit {run.get('commit')}, {run.get('datetime')} (`{run['file']}`).")
    out += ["", "| op | pass | dtype | shape | device | provider | median | rate | of peak | vs eager | vs compile "
                "| peak extra MiB |", "|" + "---|" * 12]
    order = {"eager": 0, "compile": 1, "reference": 2, "liger": 3, "triton": 4, "native": 5, "torch": 6}
    rows = sorted(rows, key=lambda r: (r["file"], r.get("device", ""), r.get("op", ""), r.get("pass_", ""),
                                       r.get("n", r.get("m", 0)), r.get("c", r.get("d", 0)),
                                       order.get(r["provider"], 9)))
    for r in rows:
        shape = (f"{r['n']}x{r['c']}" if r.get("op") == "kd_kl" else f"M=N={r['m']} D={r['d']}"
                 if r.get("op") == "correlation" else f"{r.get('n', '')}")
        ms = r["ms"]
        time_s = f"{ms * 1e3:.1f} µs" if ms < 1 else f"{ms:.2f} ms"
        out.append(f"| {r.get('op')} | {r.get('pass_', '')} | {r.get('dtype', '')} | {shape} | {r.get('device')} | "
                   f"{r['provider']} | {time_s} | {_fmt(r.get('rate'), '.3g')} {r.get('unit', '')} | "
                   f"{_fmt(r['of_peak'] and 100 * r['of_peak'], '.0f')}{'%' if r['of_peak'] else ''} | "
                   f"{_fmt(r['vs_eager'], '.2f')}{'x' if r['vs_eager'] else ''} | "
                   f"{_fmt(r['vs_compile'], '.2f')}{'x' if r['vs_compile'] else ''} | "
                   f"{_fmt(r.get('peak_extra_mib'), '.0f')} |")
    out.append("")
    out.append("Rate: KL = bytes (inputs read once + gradient written once) / time; correlation = useful "
               "flops / time. \"of peak\": against the copy bandwidth or matmul peak measured in the same run. "
               "eager and compile: the loss as a user writes it in plain PyTorch, and torch.compile of it; "
               "reference: this package's PyTorch reference.")
    return "\n".join(out) + "\n"


def plots(rows: list[dict], folder: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    os.makedirs(folder, exist_ok=True)
    written = []
    for op, size_key in (("kd_kl", lambda r: r["n"] * r["c"]), ("correlation", lambda r: r["m"] * 1000 + r["d"])):
        for device in sorted({r["device"] for r in rows if r.get("op") == op}):
            sel = [r for r in rows if r.get("op") == op and r["device"] == device and r.get("pass_") == "fwd+bwd"]
            if not sel:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for provider in sorted({r["provider"] for r in sel} - {"eager"}):
                pts = sorted((size_key(r), r["vs_eager"], r) for r in sel if r["provider"] == provider and r["vs_eager"])
                if pts:
                    labels = [f"{p[2]['n']}x{p[2]['c']}" if op == "kd_kl" else f"{p[2]['m']}/D{p[2]['d']}" for p in pts]
                    ax.plot(labels, [p[1] for p in pts], marker="o", label=provider)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_ylabel("speed-up over eager (fwd+bwd)")
            written.append(_finish(plt, fig, ax, f"{op} on {device}", os.path.join(folder, f"{op}_{device}_speedup.png")))
    sel = [r for r in rows if r.get("op") == "correlation" and r.get("pass_") == "fwd+bwd" and r.get("peak_extra_mib")]
    for device in sorted({r["device"] for r in sel}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider in sorted({r["provider"] for r in sel if r["device"] == device}):
            pts = sorted((r["m"], r["peak_extra_mib"]) for r in sel if r["device"] == device and r["provider"] == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch M = N")
        ax.set_ylabel("peak extra memory (MiB), fwd+bwd")
        written.append(_finish(plt, fig, ax, f"correlation memory on {device} (a missing point: out of memory)",
                               os.path.join(folder, f"correlation_{device}_memory.png")))
    return written


def _finish(plt, fig, ax, title: str, path: str) -> str:
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_readme(readme: str, table: str, plot_paths: list[str]) -> None:
    with open(readme) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section to replace")
    links = "".join(f"\n![{os.path.basename(p)}]({os.path.relpath(p, os.path.dirname(os.path.abspath(readme)))})"
                     for p in plot_paths)
    body = f"{START}\n<!-- generated by python -m benchmarks.report; do not edit by hand -->\n{table}{links}\n{END}"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    with open(readme, "w") as f:
        f.write(text)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--plots", help="folder for the PNG plots")
    p.add_argument("--readme", help="README whose bench section gets the table")
    a = p.parse_args(argv)
    rows, runs = load(a.json)
    table = markdown(rows, runs)
    written = plots(rows, a.plots) if a.plots else []
    if a.out:
        with open(a.out, "w") as f:
            f.write(table)
    if a.readme:
        update_readme(a.readme, table, written)
    print(table)
    return table


if __name__ == "__main__":
    main()
