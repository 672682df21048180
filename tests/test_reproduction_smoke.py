"""The README's CIFAR-100 reproduction commands, each as a CPU smoke run: a tiny synthetic file in the
CIFAR-100 pickle format and a teacher checkpoint in RepDistiller's {"model": ...} layout (with its
argparse options), --recipe cifar, one epoch."""
import argparse
import json
import re
import pathlib
import shlex

import pytest
import torch

from helpers import make_cifar_pickles
from mlkd_fast.train import main
from mlkd_fast.train.models import build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SECTION = README[README.index("### Reproducing the CIFAR-100 KD benchmark"):README.index("### The distiller zoo")]
COMMANDS = [line for line in re.search(r"```bash\n(.*?)```", SECTION, re.S).group(1).splitlines()
            if line.startswith("mlkd-train")]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar_pickles(root, "cifar100", train_per_class=1, test_per_class=1)
    return root


def _teacher(tmp_path, arch: str) -> str:
    path = tmp_path / f"{arch}_vanilla_ckpt_epoch_240.pth"
    torch.manual_seed(0)
    torch.save({"model": build_model(arch, 100).state_dict(), "opt": argparse.Namespace(model=arch), "epoch": 240},
               path)
    return str(path)


def test_the_readme_gives_the_commands():
    assert len(COMMANDS) == 5 and all("--recipe cifar" in c and "cifar100:" in c for c in COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMMANDS)))
def test_reproduction_command_runs_as_a_smoke_test(index, cifar, tmp_path):
    argv = shlex.split(COMMANDS[index].replace("$T", "TEACHER"))[1:]
    argv[argv.index("--data") + 1] = f"cifar100:{cifar}"
    arch = argv[argv.index("--teacher-arch") + 1]
    argv[argv.index("--teacher-weights") + 1] = _teacher(tmp_path, arch)
    summary = main(argv + ["--epochs", "1", "--batch-size", "25", "--quiet", "--no-curves",
                           "--out", str(tmp_path / "run")])
    assert summary["student_top1"] is not None
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"] == "cifar" and config["weight_decay"] == 5e-4 and config["lr_steps"] == [150, 180, 210]
