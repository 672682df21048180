"""The benchmark suites, the report and the training-throughput script run end to end at tiny sizes
(so that they never rot); their timings here mean nothing and nothing is asserted about them."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env=None, timeout=600):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    return res.stdout


def test_benchmark_suite_report_and_readme_section(tmp_path):
    result = tmp_path / "tiny.json"
    _run(["-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-warmup=off",
          "--benchmark-json", str(result)], env={"MLKD_BENCH_TINY": "1"})
    doc = json.loads(result.read_text())
    names = {b["extra_info"]["op"] + "/" + b["extra_info"]["provider"] for b in doc["benchmarks"]}
    assert {"kd_kl/eager", "kd_kl/native", "correlation/eager", "copy/torch", "matmul/torch"} <= names
    assert doc["machine_info"]["mlkd_fast"]["torch"]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\noutro\n")
    table = _run(["-m", "benchmarks.report", str(result), "--out", str(tmp_path / "r.md"),
                  "--plots", str(tmp_path / "plots"), "--readme", str(readme)])
    assert "| kd_kl | fwd+bwd | float32 | 64x100 | cpu | native |" in table
    text = readme.read_text()
    assert "old" not in text and "| kd_kl |" in text and text.endswith("outro\n")
    assert (tmp_path / "plots" / "kd_kl_cpu_speedup.png").exists()


def test_training_throughput_script(tmp_path):
    out = tmp_path / "tt.json"
    _run(["benchmarks/train_throughput.py", "--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["fp32_eager"]["images_per_s"] > 0 and result["fast"]["images_per_s"] > 0
    assert 0 < result["fast"]["loss_share"] < 1


def test_ddp_correlation_script(tmp_path):
    out = tmp_path / "ddp.json"
    _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
          "benchmarks/ddp_correlation.py", "--rows", "64", "--dim", "16", "--out", str(out)],
         env={"OMP_NUM_THREADS": "1"})
    result = json.loads(out.read_text())
    assert result["global_batch"] == 128 and set(result["median_ms"]) == {"whole_matrix_per_process",
                                                                            "own_rows_per_process"}
