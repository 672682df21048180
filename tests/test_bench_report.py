"""benchmarks/report.py on a synthetic pytest-benchmark JSON: the summary takes the provider auto runs
(and the paired ratio of end-to-end groups), counts the groups where auto is at least as fast as eager,
shows the CPU correlation's two paths side by side, and puts the step's composition beside it."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402


def _bench(group, ms, **extra):
    return {"group": group, "stats": {"median": ms / 1e3}, "extra_info": extra}


def _doc():
    kl = dict(op="kd_kl", pass_="fwd+bwd", device="cpu", n=4096, c=1000, dtype="float32", bytes=3 * 4096 * 1000 * 4)
    corr = dict(op="correlation", pass_="fwd+bwd", device="cpu", m=768, n=256, d=512, mode="rotations",
                dtype="float32", flops=12 * 768 * 256 * 512)
    mlkd = dict(op="mlkd", pass_="fwd+bwd", device="cpu", preset="paper", b=256, c=1000, d=512, views=4,
                dtype="float32")
    g_kl, g_corr, g_mlkd = "kd_kl fwd+bwd a", "correlation fwd+bwd b", "mlkd fwd+bwd c"
    return {"datetime": "2026-12-02T00:00:00", "machine_info": {"mlkd_fast": {"device": "cpu", "commit": "abc"}},
            "benchmarks": [
                _bench("roofline copy cpu", 20.0, op="copy", provider="torch", device="cpu", bytes=2 * 256 << 20),
                _bench("roofline matmul cpu", 60.0, op="matmul", provider="torch", device="cpu", n=2048,
                       flops=2 * 2048 ** 3),
                _bench(g_kl, 18.0, provider="eager", auto_pick=False, **kl),
                _bench(g_kl, 7.0, provider="compile", auto_pick=False, **kl),
                _bench(g_kl, 2.0, provider="native", auto_pick=True, path="fused", **kl),
                _bench(g_corr, 4.8, provider="eager", auto_pick=False, **corr),
                _bench(g_corr, 3.7, provider="native", auto_pick=True, path="dense", **corr),
                _bench(g_corr, 5.6, provider="native-tiled", auto_pick=False, path="tiled", **corr),
                _bench(g_mlkd, 300.0, provider="eager", auto_pick=False, **mlkd),
                _bench(g_mlkd, 310.0, provider="auto", auto_pick=True, paired_vs_eager=1.01, **mlkd),
            ]}


def test_summary_full_table_and_composition(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_doc()))
    train = tmp_path / "train.json"
    shares = {"teacher_forward": 0.3, "student_fwd_bwd": 0.6, "loss_fwd_bwd": 0.01, "other": 0.09}
    mode = {"step_ms": 1000.0, "images_per_s": 64.0, "teacher_ms": 300.0, "student_ms": 600.0, "loss_ms": 10.0,
            "shares": shares}
    train.write_text(json.dumps({"teacher_arch": "resnet34", "arch": "resnet18", "batch_size": 64,
                                 "image_size": 224, "num_classes": 1000, "device": "cpu", "commit": "abc",
                                 "fp32_eager": mode, "fast": mode, "command": "python benchmarks/train_throughput.py"}))
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{report.START}\nold\n{report.END}\nb\n")
    out = tmp_path / "cpu.md"
    report.main([str(path), "--out", str(out), "--readme", str(readme), "--train", str(train)])
    text = readme.read_text()
    assert "| kd_kl | fwd+bwd | float32 | 4096x1000 | cpu | 18.00 ms | 7.00 ms | native, fused | 2.00 ms | 9.00x | 3.50x |" in text
    assert "| mlkd | fwd+bwd | float32 | paper B=256 C=1000 D=512 | cpu |" in text and "1.01x (paired)" in text
    assert "auto at least as fast as eager in 3 of 3 groups; the lowest ratio 1.01x" in text
    assert "| M=768 N=256 D=512 | 4.80 ms | 3.70 ms (dense) | 5.60 ms | 1.51 | 0.86x |" in text
    assert "teacher forward" in text and "300.00 ms (30.0%)" in text and "(1.00%)" in text
    assert "cpu.md" in text and "old" not in text and text.endswith("b\n")
    full = out.read_text()
    assert "| correlation | fwd+bwd | float32 | M=768 N=256 D=512 | cpu | native-tiled |  | tiled |" in full
    assert "| kd_kl | fwd+bwd | float32 | 4096x1000 | cpu | native | yes | fused |" in full



def _section(text: str, start: str, end: str) -> str:
    assert text.count(start) == 1 and text.count(end) == 1, (start, end)
    return text[text.index(start):text.index(end) + len(end)]


def _regenerated(page: str, update) -> str:
    """The page as ``update(copy)`` rewrites it, the copy beside the page (so that the generator's relative
    links are the page's)."""
    path = os.path.join(ROOT, page)
    copy = os.path.join(os.path.dirname(path), ".regenerated-" + os.path.basename(path))
    with open(path) as f, open(copy, "w") as g:
        g.write(f.read())
    try:
        update(copy)
        with open(copy) as f:
            return f.read()
    finally:
        os.remove(copy)


def _teacher_cache_report(page: str) -> None:
    """benchmarks/teacher_cache.py's report-only mode (measures nothing), as a user runs it."""
    run = subprocess.run([sys.executable, "benchmarks/teacher_cache.py", "--report",
                          "benchmarks/results/teacher_cache_cpu.json", "--page", page],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_the_docs_sections_are_what_the_generators_write_from_the_committed_results(tmp_path):
    """docs/benchmarks.md's bench and bench-lm sections and docs/cache.md's cache section are byte for byte
    what report.py, report_lm.py and teacher_cache.py write there from the committed JSON (their report-only
    paths: nothing is measured). A results file changed without its page, or the reverse, fails here."""
    from benchmarks import report_lm

    results = os.path.join(ROOT, "benchmarks", "results")
    rows, runs = report.load([os.path.join(results, "cpu.json")])
    short = report.summary(rows, runs) + "\n" + report.composition(os.path.join(results, "train_throughput_cpu.json"))
    plots = [os.path.join(results, "plots", os.path.basename(p)) for p in report.plots(rows, str(tmp_path))]
    lm_rows, lm_runs = report_lm.load([os.path.join(results, name) for name in report_lm.COMMITTED_RUNS])
    cases = [
        ("docs/benchmarks.md", report.START, report.END,
         lambda page: report.update_readme(page, short, plots, os.path.join(results, "cpu.md"))),
        ("docs/benchmarks.md", report_lm.START, report_lm.END,
         lambda page: report_lm.update_readme(page, report_lm.summary(lm_rows, lm_runs),
                                              os.path.join(results, "lm_cpu.md"))),
        ("docs/cache.md", "<!-- cache:start -->", "<!-- cache:end -->", _teacher_cache_report),
    ]
    for page, start, end, update in cases:
        with open(os.path.join(ROOT, page)) as f:
            committed = _section(f.read(), start, end)
        assert _section(_regenerated(page, update), start, end) == committed, (page, start)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert not any(start in readme for _, start, _, _ in cases)  # the README holds none of them


def test_the_generators_take_page(capsys):
    """Each generator names its target --page (--readme, its old name, still works: the tests above use it)."""
    from benchmarks import report_lm

    for main in (report.main, report_lm.main):
        try:
            main(["--help"])
        except SystemExit:
            pass
        assert "--page PAGE, --readme PAGE" in capsys.readouterr().out
