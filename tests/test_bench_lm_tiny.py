"""benchmarks/test_bench_lm.py and benchmarks/report_lm.py at tiny sizes (so that they never rot): the
providers compute the same loss, the suite runs (one case with its memory measured in a child
process), the report turns its JSON into the table and the README section, and the targets' checks
say PASS / MISS from made-up numbers. Liger-Kernel is optional: its comparisons skip without it.
Timings here mean nothing and nothing is asserted about them."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report_lm  # noqa: E402
from benchmarks import test_bench_lm as bench  # noqa: E402


@pytest.mark.parametrize("teacher", ["live", "dense"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_providers_compute_the_same_loss(teacher, divergence):
    x = bench.make_inputs("cpu", 24, 16, 70, "float32", teacher)
    grads = {}
    for provider in ("fused", "eager"):
        grads[provider] = bench.build_step(provider, "cpu", x, divergence)()
    for a, b in zip(grads["fused"], grads["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    dh, dw = bench.build_step("gemms", "cpu", x, divergence)()  # the floor runs (its numbers are not a loss)
    assert dh.shape == x["h_s"].shape and dw.shape == x["w_s"].shape


def test_liger_provider_matches_when_installed():
    pytest.importorskip("liger_kernel.chunked_loss", reason="Liger-Kernel is optional")
    x = bench.make_inputs("cpu", 24, 16, 70, "float32", "live")
    for divergence in ("forward_kl", "jsd"):
        ours = bench.build_step("fused", "cpu", x, divergence)()
        liger = bench.build_step("liger", "cpu", x, divergence)()  # uncompiled outside MLKD_BENCH_COMPILE
        for a, b in zip(ours, liger):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_skip_rules():
    assert bench.skip_reason("eager", "cpu", False, "live")  # eager is not timed at the chunked-only shape
    assert bench.skip_reason("fused", "cpu", False, "live") is None
    assert bench.skip_reason("liger", "cpu", True, "dense")  # Liger takes a live teacher only
    assert bench.skip_reason("gemms", "cpu", True, "dense") is None


def test_peak_in_child_measures_and_guards():
    mem = bench.peak_in_child("eager", "cpu", 256, 16, 4000, "float32", "live", "forward_kl")
    assert "error" not in mem, mem
    # eager holds at least the student's and the teacher's fp32 logits (256 x 4000 x 4 B = 3.9 MiB each)
    assert mem["peak_extra_mib"] > 7.5, mem
    with bench.MemoryGuard(64 << 20):  # an allocation past the guard fails instead of the OOM killer
        with pytest.raises(RuntimeError):
            torch.empty(256 << 20, dtype=torch.uint8).fill_(1)


def _run(args, env=None):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res.stdout


def test_suite_and_report(tmp_path):
    result = tmp_path / "lm.json"
    _run(["-m", "pytest", "benchmarks/test_bench_lm.py", "-q", "-p", "no:cacheprovider", "-k",
          "float32-live-jsd-N64 and (fused or eager or gemms)", "--benchmark-json", str(result)],
         env={"MLKD_BENCH_TINY": "1", "MLKD_BENCH_LM_MEMORY": "inprocess"})  # the child: test above
    doc = json.loads(result.read_text())
    rows = {b["extra_info"]["provider"]: b["extra_info"] for b in doc["benchmarks"]}
    assert {"fused", "eager", "gemms"} <= set(rows)
    assert rows["fused"]["vs_eager"] > 0 and rows["fused"]["vs_gemms"] > 0  # the ratios written into the JSON
    assert rows["eager"]["peak_extra_mib"] is not None and "in-process" in rows["eager"]["memory_method"]
    assert rows["fused"]["load_before"] and rows["fused"]["load_after"]
    assert doc["machine_info"]["mlkd_fast"]["torch"]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report_lm.START}\nold\n{report_lm.END}\noutro\n")
    table = report_lm.main([str(result), "--out", str(tmp_path / "out"), "--readme", str(readme)])
    assert "| cpu | float32 | live | jsd | 64 x 32 x 320 |" in table
    assert "fwd+bwd >= 1.0x eager" in table and "GPU targets" in table
    text = readme.read_text()
    assert "old" not in text and "| cpu | float32 | live | jsd |" in text and text.endswith("outro\n")
    assert (tmp_path / "out" / "lm.md").exists()


def _doc(fused_ms, eager_ms, liger_ms, gemms_ms, fused_mib, eager_mib, liger_mib):
    def bench_row(provider, ms, mib, teacher="live"):
        return {"group": f"g {teacher}", "stats": {"median": ms / 1e3, "rounds": 3},
                "extra_info": {"op": "linear_kd", "provider": provider, "device": "cpu", "n": 4096, "h": 1024,
                               "v": 128256, "dtype": "float32", "teacher": teacher, "divergence": "jsd",
                               "flops": 4 * 2 * 4096 * 1024 * 128256, "peak_extra_mib": mib,
                               "load_before": [1.0, 1.0, 1.0], "load_after": [1.5, 1.2, 1.0]}}
    return {"datetime": "2026-12-07T00:00:00", "machine_info": {"mlkd_fast": {"device": "cpu", "threads": 2}},
            "benchmarks": [bench_row("fused", fused_ms, fused_mib), bench_row("eager", eager_ms, eager_mib),
                           bench_row("liger", liger_ms, liger_mib), bench_row("gemms", gemms_ms, 0.0)]}


def test_targets_pass_and_miss(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_doc(1000, 2000, 1500, 900, 600, 12000, 3000)))
    text = report_lm.main([str(good), "--out", str(tmp_path)])
    assert "**PASS** CPU fp32 fwd+bwd >= 1.0x eager" in text
    assert "**PASS** CPU fp32 extra peak memory <= 1/8 of eager" in text
    assert "**PASS** CPU fp32 ahead of Liger-Kernel" in text and "**PASS** CPU within 1.25x" in text
    assert "load averages (1, 5, 15 min) 1.0, 1.0, 1.0 before and 1.5, 1.2, 1.0 after" in text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_doc(2100, 2000, 1500, 900, 2000, 12000, 3000)))
    text = report_lm.main([str(bad), "--out", str(tmp_path)])
    assert "**MISS** CPU fp32 fwd+bwd >= 1.0x eager" in text and "0.95x" in text
    assert "**MISS** CPU fp32 extra peak memory" in text and "**MISS** CPU within 1.25x" in text
