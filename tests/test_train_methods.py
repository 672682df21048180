"""Every method of the zoo trains end to end in ``mlkd-train`` on the digits default (short runs:
the loss goes down and the student beats chance), and a method with a per-sample memory (CRD's bank)
resumes exactly."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mlkd_fast import methods as M
from mlkd_fast.train import main

EPOCHS = ["--epochs", "3", "--quiet"]
# AT's and NST's reference weights (1000, 50) are sized for CIFAR's 32x32 maps; on the digits'
# 8x8 stage maps they swamp CE for the few epochs of these runs.
OPTIONS = {"at": ["--method-opt", "w_at=10"], "nst": ["--method-opt", "w_nst=5"]}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    main(["--out", str(out), "--teacher-epochs", "8", "--epochs", "1", "--method", "ce", "--quiet"])
    return str(out / "teacher.pt")


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in M.available() if m != "ce"] + ["paper"])
def test_method_trains_on_digits(tmp_path, teacher, method):
    out = tmp_path / method
    summary = main(["--out", str(out), "--teacher-weights", teacher, "--method", method, *EPOCHS,
                    *OPTIONS.get(method, [])])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert summary["method"] == method and len(records) == 3
    # a loss of other terms before (fsp's initialisation stage: FSP alone in epoch 1) is not compared
    first = next(i for i, r in enumerate(records) if "ce" in r or "ce0" in r)
    assert first < 2 and records[-1]["loss"] < records[first]["loss"], records
    assert summary["student_top1"] > 25.0, summary  # 10 classes: chance is 10%
    assert "total" in records[-1]


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in M.available() if m != "ce"])
def test_method_trains_under_bf16_autocast(tmp_path, teacher, method):
    """--precision bf16 (autocast; on CPU here, the GPU default there): every method's loss takes
    bf16 activations and stays finite, and its trainable parts stay fp32."""
    out = tmp_path / method
    summary = main(["--out", str(out), "--teacher-weights", teacher, "--method", method, "--precision", "bf16",
                    "--epochs", "2", "--quiet", *OPTIONS.get(method, [])])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e6 for r in records), records
    assert summary["student_top1"] > 10.0, summary
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    floats = [v for v in (state["distiller"] or {}).values() if torch.is_tensor(v) and v.is_floating_point()]
    assert all(v.dtype == torch.float32 for v in floats)


def test_crd_bank_resumes_exactly(tmp_path, teacher):
    run = ["--teacher-weights", teacher, "--method", "crd", "--method-opt", "num_negatives=64", *EPOCHS]
    main(["--out", str(tmp_path / "full"), *run])
    part = str(tmp_path / "part")
    assert main(["--out", part, *run, "--max-steps", "30"]) == {"interrupted": True}
    assert main(["--out", part, *run, "--resume"])["last_epoch"] == 3
    for name in ("student.pt", "checkpoint.pt"):
        a = torch.load(tmp_path / "full" / name, map_location="cpu", weights_only=False)
        b = torch.load(os.path.join(part, name), map_location="cpu", weights_only=False)
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["distiller"]
    resumed = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)["distiller"]
    assert {"memory.memory_s", "memory.memory_t"} <= set(full)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_bad_method_options_are_named(tmp_path, teacher, capsys):
    base = ["--out", str(tmp_path / "x"), "--teacher-weights", teacher, *EPOCHS]
    with pytest.raises(SystemExit):  # refused by the flag checks, before anything trains
        main([*base, "--method", "dkd", "--method-opt", "betta=2"])
    assert "method 'dkd' has no option 'betta'; its options are: w_ce, alpha, beta" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--method", "kd", "--method-opt", "oops"])
    assert "--method-opt 'oops': expected KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--method", "at", "--rotations", "4"])
    assert "--rotations 4 applies to methods that take rotated views (mlkd, paper), not at" in capsys.readouterr().err


_RECORDING_MAIN = r"""
import sys
import torch
import torch.distributed as dist
import mlkd_fast.train.run as run

plain = run.run_phase


def recording(phase, *args, **kwargs):
    result = plain(phase, *args, **kwargs)
    if phase.name == "student":
        out = sys.argv[sys.argv.index("--out") + 1]
        torch.save(phase.distiller.state_dict(), f"{out}/distiller{dist.get_rank()}.pt")
    return result


run.run_phase = recording
run.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("method, port", [(m, str(29561 + i)) for i, m in enumerate(M.available()) if m != "ce"])
def test_method_under_ddp_keeps_the_ranks_in_step(tmp_path, teacher, method, port):
    """Two gloo processes: the run finishes and both ranks end with the same distiller state
    (regressors and heads through DDP's averaged gradients, CRD's banks take the global batch on
    every rank, DML's peers are DDP-synchronised)."""
    script = tmp_path / "recording_main.py"
    script.write_text(_RECORDING_MAIN)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(script), "--out", str(out), "--teacher-weights", teacher, "--method", method, "--epochs", "1",
           "--batch-size", "32", "--quiet", *OPTIONS.get(method, [])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"distiller{r}.pt") for r in range(2))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    if method == "crd":
        # rows the epoch wrote are unit vectors, untouched ones keep their random start: both ranks'
        # samples were written (one epoch covers all but the remainder of the last global batch)
        written = (rank0["memory.memory_s"].norm(dim=1) - 1).abs() < 1e-4
        assert written.float().mean() > 0.95, written.float().mean()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["student_top1"] > 10.0
