"""Turns pytest-benchmark JSON from ``benchmarks/test_bench_losses.py`` into markdown tables and plots.

    python -m benchmarks.report benchmarks/results/cpu.json [more.json ...] \\
        [--out benchmarks/results/cpu.md] [--plots benchmarks/results/plots] [--page docs/benchmarks.md] \
        [--train benchmarks/results/train_throughput_cpu.json]

Two tables. The summary: one row per group (op, pass, dtype, shape, device) with eager's and
torch.compile's medians beside the provider that ``backend="auto"`` runs there (its path, median, speed-up
over eager and over compile, fraction of the copy bandwidth / matmul peak measured in the same run, and
peak extra memory against eager's), and a line counting the groups where auto is at least as fast as
eager. The full table: every provider's median time (CUDA-event median on GPU), GB/s (KL: bytes read
once + gradient written once) or TFLOP/s (correlation: useful flops), fraction of peak, speed-ups and
peak extra memory. ``--out`` writes both; ``--page`` replaces the text between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` with the summary (and a link to ``--out``).
``--train`` adds the composition of a distillation step from ``benchmarks/train_throughput.py``'s
JSON (teacher forward, student forward + backward, loss, the rest) beside the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ORDER = {"eager": 0, "compile": 1, "reference": 2, "liger": 3, "triton": 4, "native": 5, "native-tiled": 6,
         "auto": 7, "torch": 8}
OPS = {"kd_kl": 0, "correlation": 1, "mlkd": 2, "copy": 3, "matmul": 4}


def _other_share(share: float) -> str:
    """The step's remainder after its parts, each timed alone: below zero it is the timings' noise."""
    return f"{100 * share:.1f}%" if share >= 0 else f"~0% (parts sum to {100 * (1 - share):.1f}%)"


def shape_label(r: dict) -> str:
    op = r.get("op")
    if op == "kd_kl":
        return f"{r['n']}x{r['c']}"
    if op == "correlation":
        n = r.get("n", r["m"])
        return f"M=N={r['m']} D={r['d']}" if r.get("mode", "square") == "square" else f"M={r['m']} N={n} D={r['d']}"
    if op == "mlkd":
        return f"{r['preset']} B={r['b']} C={r['c']} D={r['d']}"
    return f"{r.get('n', '')}"


def _sort_key(r: dict):
    return (r["file"], r.get("device", ""), OPS.get(r.get("op"), 9), r.get("pass_", ""), r.get("mode", ""),
            r.get("preset", ""), r.get("d", 0), r.get("n", r.get("m", r.get("b", 0))), r.get("c", 0),
            ORDER.get(r["provider"], 9))


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
            if str(e.get("op", "")).startswith("linear_kd"):
                continue  # benchmarks/test_bench_lm.py's cases: benchmarks/report_lm.py reports them
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
        r["rate"] = r["unit"] = None
        if r.get("op") in ("kd_kl", "copy"):
            r["rate"], r["unit"] = r["bytes"] / r["ms"] / 1e6, "GB/s"
        elif r.get("op") in ("correlation", "matmul"):
            r["rate"], r["unit"] = r["flops"] / r["ms"] / 1e9, "TFLOP/s"
        peak = roof.get((r["file"], r.get("device"), r.get("unit")))
        r["of_peak"] = r["rate"] / peak if peak and r.get("op") in ("kd_kl", "correlation") else None
        peers = by_group[(r["file"], r["group"])]
        r["vs_eager"] = peers["eager"]["ms"] / r["ms"] if "eager" in peers else None
        if r.get("paired_vs_eager"):  # timed alternately with eager in one test (end-to-end groups)
            r["vs_eager"] = r["paired_vs_eager"]
        r["vs_compile"] = peers["compile"]["ms"] / r["ms"] if "compile" in peers else None
        r["shape"] = shape_label(r)
    return rows, runs


def _fmt(v, spec, suffix=""):
    return "—" if v is None else format(v, spec) + suffix


def _time(ms: float) -> str:
    return f"{ms * 1e3:.1f} µs" if ms < 1 else (f"{ms:.2f} ms" if ms < 1000 else f"{ms / 1e3:.2f} s")


def _runs(runs: list[dict]) -> list[str]:
    return [f"Measured on **{run.get('device', '?')}** ({run.get('cpu', '?')}, {run.get('threads', '?')} threads), "
            f"torch {run.get('torch')}, triton {run.get('triton')}, CUDA {run.get('cuda')}, "
            f"commit {run.get('commit')}, {run.get('datetime')} (`{run['file']}`)." for run in runs]


def markdown(rows: list[dict], runs: list[dict]) -> str:
    """Every provider of every group."""
    out = _runs(runs)
    out += ["", "| op | pass | dtype | shape | device | provider | auto | path | median | rate | of peak | vs eager "
                "| vs compile | peak extra MiB |", "|" + "---|" * 14]
    for r in sorted(rows, key=_sort_key):
        out.append(f"| {r.get('op')} | {r.get('pass_', '')} | {r.get('dtype', '')} | {r['shape']} | {r.get('device')} | "
                   f"{r['provider']} | {'yes' if r.get('auto_pick') else ''} | {r.get('path', '')} | "
                   f"{_time(r['ms'])} | {_fmt(r.get('rate'), '.3g', ' ' + (r.get('unit') or ''))} | "
                   f"{_fmt(r['of_peak'] and 100 * r['of_peak'], '.0f', '%')} | "
                   f"{_fmt(r['vs_eager'], '.2f', 'x')} | {_fmt(r['vs_compile'], '.2f', 'x')} | "
                   f"{_fmt(r.get('peak_extra_mib'), '.0f')} |")
    out.append("")
    out.append("Rate: KL = bytes (inputs read once + gradient written once) / time; correlation = useful "
               "flops / time (fwd+bwd counts 3x the forward's matmuls). \"of peak\": against the copy bandwidth or "
               "matmul peak measured in the same run. eager and compile: the loss as a user writes it in plain "
               "PyTorch, and torch.compile of it; reference: this package's PyTorch reference; auto: the provider "
               "`backend=\"auto\"` runs for the shape; path: the native or Triton path taken (`mlkd_fast.explain`).")
    return "\n".join(out) + "\n"


def _auto_rows(rows: list[dict]) -> list[dict]:
    """The provider auto runs, per group (the first marked ``auto_pick``)."""
    picked = {}
    for r in sorted(rows, key=_sort_key):
        if r.get("auto_pick") and (r["file"], r["group"]) not in picked:
            picked[(r["file"], r["group"])] = r
    return sorted(picked.values(), key=_sort_key)


def summary(rows: list[dict], runs: list[dict]) -> str:
    """One row per group: eager, compile and what ``backend="auto"`` runs."""
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["file"], r["group"])][r["provider"]] = r
    out = _runs(runs)
    out += ["", "| op | pass | dtype | shape | device | eager | compile | auto: provider, path | auto | vs eager "
                "| vs compile | of peak | peak MiB (auto / eager) |", "|" + "---|" * 13]
    ratios = []
    for a in _auto_rows(rows):
        g = groups[(a["file"], a["group"])]
        eager, comp = g.get("eager"), g.get("compile")
        if a["vs_eager"] is not None:
            ratios.append((a["vs_eager"], a))
        held = f" (+{a['held_mib']:.0f} held)" if a.get("held_mib", 0) >= 1 else ""
        mem = f"{_fmt(a.get('peak_extra_mib'), '.0f')}{held} / {_fmt(eager and eager.get('peak_extra_mib'), '.0f')}"
        out.append(f"| {a.get('op')} | {a.get('pass_', '')} | {a.get('dtype', '')} | {a['shape']} | {a.get('device')} | "
                   f"{_time(eager['ms']) if eager else '—'} | {_time(comp['ms']) if comp else '—'} | "
                   f"{a['provider']}{', ' + a['path'] if a.get('path') else ''} | {_time(a['ms'])} | "
                   f"{_fmt(a['vs_eager'], '.2f', 'x')}{' (paired)' if a.get('paired_vs_eager') else ''} | "
                   f"{_fmt(a['vs_compile'], '.2f', 'x')} | "
                   f"{_fmt(a['of_peak'] and 100 * a['of_peak'], '.0f', '%')} | {mem} |")
    roofs = [r for r in rows if r.get("op") in ("copy", "matmul")]
    cross = [(g["native"], g["native-tiled"], g.get("eager")) for g in groups.values()
             if "native" in g and "native-tiled" in g and g["native"].get("pass_") == "fwd+bwd"]
    if cross:
        out += ["", "The CPU correlation's two paths in the same run (docs/design.md §5.1: auto takes `dense` up to "
                    "2^28 entries): ", "",
                "| shape | eager | native, auto's path | native, tiled forced | tiled / auto | eager / tiled |",
                "|---|---|---|---|---|---|"]
        for a, t, e in sorted(cross, key=lambda x: _sort_key(x[0])):
            out.append(f"| {a['shape']} | {_time(e['ms']) if e else '—'} | {_time(a['ms'])} ({a.get('path', '')}) | "
                       f"{_time(t['ms'])} | {t['ms'] / a['ms']:.2f} | {_fmt(e and e['ms'] / t['ms'], '.2f', 'x')} |")
    out.append("")
    if ratios:
        worst = min(ratios, key=lambda p: p[0])
        at_least = sum(1 for v, _ in ratios if v >= 1.0)
        out.append(f"auto at least as fast as eager in {at_least} of {len(ratios)} groups; the lowest ratio "
                   f"{worst[0]:.2f}x ({worst[1]['op']} {worst[1].get('pass_', '')} {worst[1]['shape']}).")
    for r in sorted(roofs, key=_sort_key):
        out.append(f"Roofline in the same run, {r['device']}: {r['op']} {_fmt(r['rate'], '.3g', ' ' + r['unit'])} "
                   f"({_time(r['ms'])}).")
    out.append("")
    out.append("auto: the provider `backend=\"auto\"` runs for the shape (native on CPU, Triton on CUDA; for "
               "MLKDLoss the module itself) and its path (`mlkd_fast.explain`); (paired): eager and auto timed "
               "alternately in one test (medians of 7 each), for the end-to-end groups. eager / compile: the loss as a "
               "user writes it in plain PyTorch, and torch.compile of it. of peak: KL bytes (inputs once + "
               "gradient once) against the copy bandwidth, correlation useful flops against the matmul peak, "
               "both measured in the same run. Peak MiB: sampled RSS growth on CPU (0: memory the process "
               "already held), max_memory_allocated on CUDA; (+N held): the materialised correlation's stored gradient "
               "operand, which the process keeps in its output block cache between calls.")
    return "\n".join(out) + "\n"


def composition(path: str) -> str:
    """The distillation step's composition (benchmarks/train_throughput.py): what each part costs alone
    and its share of the step."""
    with open(path) as f:
        r = json.load(f)
    out = [f"Composition of a distillation step ({r['teacher_arch']} -> {r['arch']}, batch {r['batch_size']}, "
           f"{r['image_size']} px, {r['num_classes']} classes, {r['device']}, commit {r.get('commit')}, "
           f"`{os.path.basename(path)}`): each part timed alone, as a share of the whole step.", "",
           "| loop | step | images/s | teacher forward | student fwd+bwd | MLKD loss fwd+bwd | other |",
           "|---|---|---|---|---|---|---|"]
    for name, label in (("fp32_eager", "fp32 eager, loss on the reference"), ("fast", "fast, loss on auto")):
        m = r[name]
        sh = m["shares"]
        out.append(f"| {label} | {_time(m['step_ms'])} | {m['images_per_s']:.1f} | "
                   f"{_time(m['teacher_ms'])} ({100 * sh['teacher_forward']:.1f}%) | "
                   f"{_time(m['student_ms'])} ({100 * sh['student_fwd_bwd']:.1f}%) | "
                   f"{_time(m['loss_ms'])} ({100 * sh['loss_fwd_bwd']:.2f}%) | {_other_share(sh['other'])} |")
    out += ["", f"Command: `{r.get('command', 'python benchmarks/train_throughput.py')}`; \"other\" is what the "
            "three parts leave of the step (the optimiser, the input normalisation, the distiller's glue)."]
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
    for device in sorted({r["device"] for r in rows if r.get("op") == "kd_kl"}):
        sel = [r for r in rows if r.get("op") == "kd_kl" and r["device"] == device and r.get("pass_") == "fwd+bwd"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider in sorted({r["provider"] for r in sel} - {"eager"}, key=lambda p: ORDER.get(p, 9)):
            pts = sorted((r["n"] * r["c"], r["vs_eager"], r["shape"]) for r in sel
                         if r["provider"] == provider and r["vs_eager"])
            if pts:
                ax.plot([p[2] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("speed-up over eager (fwd+bwd)")
        ax.tick_params(axis="x", labelrotation=30)
        written.append(_finish(plt, fig, ax, f"kd_kl on {device}", os.path.join(folder, f"kd_kl_{device}_speedup.png")))
    for device in sorted({r["device"] for r in rows if r.get("op") == "correlation"}):
        picked = [r for r in _auto_rows(rows) if r.get("op") == "correlation" and r["device"] == device
                  and r.get("pass_") == "fwd+bwd" and r["vs_eager"]]
        if picked:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for mode, d in sorted({(r.get("mode", "square"), r["d"]) for r in picked}):
                pts = sorted((r.get("n", r["m"]), r["vs_eager"]) for r in picked if (r.get("mode", "square"), r["d"]) == (mode, d))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if mode == "square" else "s",
                        ls="-" if mode == "square" else "--", label=f"{mode} D={d}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch B (square: M = N = B; rotations: M = 3B, N = B)")
            ax.set_ylabel("auto over eager (fwd+bwd)")
            written.append(_finish(plt, fig, ax, f"correlation on {device}: backend='auto' vs eager",
                                   os.path.join(folder, f"correlation_{device}_speedup.png")))
        sel = [r for r in rows if r.get("op") == "correlation" and r["device"] == device and r.get("pass_") == "fwd+bwd"
               and r.get("peak_extra_mib") is not None and r["d"] == min(x["d"] for x in rows if x.get("op") == "correlation")]
        if sel:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for provider, mode in sorted({(r["provider"], r.get("mode", "square")) for r in sel}):
                pts = sorted((r.get("n", r["m"]), max(r["peak_extra_mib"], 0.5)) for r in sel
                             if r["provider"] == provider and r.get("mode", "square") == mode)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if mode == "square" else "--",
                        label=f"{provider} {mode}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch B")
            ax.set_ylabel(f"peak extra memory (MiB), fwd+bwd, D={sel[0]['d']}")
            written.append(_finish(plt, fig, ax, f"correlation memory on {device} (a missing point: not run)",
                                   os.path.join(folder, f"correlation_{device}_memory.png")))
    return written


def _finish(plt, fig, ax, title: str, path: str) -> str:
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_readme(readme: str, table: str, plot_paths: list[str], full_table: str | None = None) -> None:
    with open(readme) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section to replace")
    base = os.path.dirname(os.path.abspath(readme))
    link = (f"\nEvery provider of every shape: [`{os.path.relpath(full_table, base)}`]({os.path.relpath(full_table, base)}).\n"
            if full_table else "")
    links = "".join(f"\n![{os.path.basename(p)}]({os.path.relpath(p, base)})" for p in plot_paths)
    body = f"{START}\n<!-- generated by python -m benchmarks.report; do not edit by hand -->\n{table}{link}{links}\n{END}"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: body, text, flags=re.S)
    with open(readme, "w") as f:
        f.write(text)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files")
    p.add_argument("--out", help="write the summary and the full table here (markdown)")
    p.add_argument("--plots", help="folder for the PNG plots")
    p.add_argument("--page", "--readme", dest="readme", metavar="PAGE",
                   help="markdown page whose bench section gets the summary (docs/benchmarks.md)")
    p.add_argument("--train", help="benchmarks/train_throughput.py JSON: the step's composition beside the summary")
    a = p.parse_args(argv)
    rows, runs = load(a.json)
    short, full = summary(rows, runs), markdown(rows, runs)
    if a.train:
        short += "\n" + composition(a.train)
    written = plots(rows, a.plots) if a.plots else []
    if a.out:
        with open(a.out, "w") as f:
            f.write("## Summary\n\n" + short + "\n## Every provider\n\n" + full)
    if a.readme:
        update_readme(a.readme, short, written, a.out)
    print(short)
    print(full)
    return short + full


if __name__ == "__main__":
    main()
