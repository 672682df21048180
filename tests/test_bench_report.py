"""benchmarks/report.py on a synthetic pytest-benchmark JSON: the summary takes the provider auto runs
(and the paired ratio of end-to-end groups), counts the groups where auto is at least as fast as eager,
shows the CPU correlation's two paths side by side, and puts the step's composition beside it."""
import json
import os
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
