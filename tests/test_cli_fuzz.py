"""``mlkd-train`` driven through a seeded random selection of bad flags and values (issue #33): each
must end with exit status 2 and exactly one line on stderr (no traceback), and must leave a finished
run in ``--out`` byte for byte as it was (nothing beside it either).

The table below lists bad inputs by kind: unknown names, negative / zero / NaN / infinite numbers for
every numeric flag, backends, method options (keys, formats, kinds, ranges), missing or wrong
files, data a flag does not apply to, and flags that conflict. Each drawn case runs against the
prior run's folder as ``--out`` (as it is, or with ``--overwrite``, which must move nothing aside
before every check has passed; the ``--resume`` cases continue it) or against a new folder, which
must not be created: a check that came after the folder was touched would show. The commands run in this process (``mlkd_fast.train.__main__.main``, the
console script's function: its exit status and stderr are the command's).
"""
import hashlib
import json
import os
import random

import pytest

from mlkd_fast.train import __main__ as command

from helpers import make_image_folder

SEED = 33
CASES_PER_RUN = 40

# flag -> values that must be refused (type errors, ranges, non-finite numbers)
BAD_NUMBERS = {
    "--epochs": ["0", "-1", "nan", "1.5"],
    "--batch-size": ["0", "1", "-3", "nan"],
    "--lr": ["0", "-0.1", "nan", "inf", "abc"],
    "--weight-decay": ["-1", "nan", "inf"],
    "--temperature": ["0", "-4", "nan", "inf"],
    "--teacher-epochs": ["-1", "nan"],
    "--max-steps": ["-1", "x"],
    "--log-every": ["0", "-1"],
    "--eval-every": ["0", "-2"],
    "--image-size": ["0", "-1"],
    "--workers": ["-1"],
    "--label-noise": ["-0.1", "1", "nan"],
    "--imbalance": ["0.5", "nan", "inf"],
    "--val-fraction": ["-0.1", "1", "nan"],
    "--train-per-class": ["0", "151", "-1"],
    "--subset-seed": ["-1", "x", "1.5"],
    "--lr-steps": ["a,b", "0", "-5"],
    "--num-classes": ["3", "0"],
    "--steps-per-epoch": ["2", "0"],
    "--rotations": ["2", "0"],
    "--seed": ["x", "1.5"],
}

BAD_METHOD_OPTIONS = [
    ["--method-opt", "nosuch=1"],
    ["--method-opt", "novalue"],
    ["--method-opt", "=3"],
    ["--method-opt", "temperature=-1"],
    ["--method-opt", "temperature=0"],
    ["--method-opt", "w_kd=nan"],
    ["--method-opt", "w_kd=inf"],
    ["--method-opt", "w_kd=abc"],
    ["--method-opt", "tau=-0.5"],
    ["--method-opt", "w_corr=nan"],
    ["--method-opt", "corr_head=maybe"],
    ["--method", "dkd", "--method-opt", "beta=abc"],
    ["--method", "dkd", "--method-opt", "warmup=x"],
    ["--method", "crd", "--method-opt", "negatives=3"],
    ["--method", "crd", "--method-opt", "negatives=foo"],
    ["--method", "kd", "--method-opt", "temperature=-2"],
]


def _table(prior: str, files: dict[str, str]) -> list[tuple[list[str], dict[str, str]]]:
    """Every bad command as ``(argv, environment)``; ``--out`` is the prior run's unless given."""
    cases: list[tuple[list[str], dict[str, str]]] = []
    for flag, values in BAD_NUMBERS.items():
        cases += [([flag, value], {}) for value in values]
    cases += [(argv, {}) for argv in BAD_METHOD_OPTIONS]
    cases += [
        # unknown names
        (["--method", "nosuch"], {}),
        (["--arch", "nosuch-net"], {}),
        (["--teacher-arch", "resnet-nosuch"], {}),
        (["--recipe", "nosuch"], {}),
        (["--device", "tpu"], {}),
        (["--precision", "fp8"], {}),
        (["--no-such-flag"], {}),
        # backends
        (["--backend", "nosuch"], {}),
        (["--backend", ""], {}),
        ([], {"MLKD_FAST_BACKEND": "bogus"}),
        (["--backend", "auto"], {"MLKD_FAST_BACKEND": "cuda-please"}),
        # paths that do not exist or are the wrong kind of file
        (["--data", files["missing"]], {}),
        (["--data", files["one_class"], "--method", "ce", "--image-size", "16"], {}),
        (["--data", files["no_val"], "--method", "ce", "--image-size", "16", "--workers", "0"], {}),
        (["--data", "cifar10:"], {}),
        (["--data", "cifar100:" + files["missing"], "--teacher-epochs", "1"], {}),
        (["--teacher-weights", files["missing"] + ".pt"], {}),
        (["--teacher-weights", os.path.join(prior, "checkpoint.pt")], {}),
        (["--teacher-weights", files["text"]], {}),
        (["--teacher-weights", os.path.join(prior, "student.pt")], {}),  # a cnn-small's weights for cnn-large
        (["--teacher-cache", files["missing"]], {}),
        (["--config", files["missing"] + ".json"], {}),
        (["--config", files["text"]], {}),
        (["--config", files["bad_config"]], {}),
        (["--config", files["unknown_config"]], {}),
        (["--out", os.path.join(prior, "summary.json")], {}),
        (["--out", os.path.join(prior, "summary.json", "sub")], {}),
        # data a flag does not apply to
        (["--data", "synthetic", "--label-noise", "0.2"], {}),
        (["--data", "synthetic", "--val-fraction", "0.1"], {}),
        (["--data", "synthetic", "--train-per-class", "5"], {}),
        (["--data", "synthetic", "--teacher-epochs", "2"], {}),
        (["--data", "synthetic", "--teacher-cache", prior], {}),
        (["--recipe", "cifar"], {}),
        (["--recipe", "imagenet"], {}),
        (["--rotations", "4", "--method", "kd"], {}),
        (["--global-supcon", "--method", "kd"], {}),
        (["--global-correlation", "--method", "dkd"], {}),
        # flags that conflict
        (["--teacher-epochs", "0", "--method", "kd"], {}),
        (["--cache-wrap"], {}),
        (["--teacher-new-head"], {}),
        (["--teacher-weights", os.path.join(prior, "teacher.pt"), "--teacher-epochs", "3"], {}),
        (["--teacher-cache", prior, "--method", "ce"], {}),
        (["--teacher-cache", prior, "--teacher-epochs", "2"], {}),
        (["--unset", "lr"], {}),
        (["--resume", "--overwrite"], {}),
        # the run in --out, continued with what it cannot take
        (["--resume", "--seed", "5"], {}),
        (["--resume", "--method", "kd"], {}),
        (["--resume", "--arch", "cnn-tiny"], {}),
        (["--resume", "--method-opt", "temperature=-1"], {}),
        (["--resume", "--epochs", "0"], {}),
    ]
    return cases


# valid but for the run already in --out (started afresh without --resume or --overwrite): run against it only
EXISTING_RUN_CASES = [[], ["--method", "kd"], ["--epochs", "2", "--teacher-epochs", "1"]]

# where a case writes: the prior run as it is, the prior run with --overwrite (which must move nothing
# aside before every check has passed), or a new folder (which must not be created)
TARGETS = ("prior", "overwrite", "fresh")


def _argv(case: list[str], target: str, prior: str, fresh: str, first: bool) -> list[str]:
    """The command of ``case`` against ``target``; ``first``: ``--out`` before the case's flags."""
    if "--out" in case:
        return case
    out = ["--out", fresh if target == "fresh" else prior] + (["--overwrite"] if target == "overwrite" else [])
    return out + case if first else case + out


def _snapshot(folder) -> dict[str, str]:
    """sha256 of every file under ``folder`` and the names beside it (nothing moved aside or added)."""
    digest = {}
    for root, dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    digest["<siblings>"] = ",".join(sorted(os.listdir(os.path.dirname(folder))))  # nothing moved aside, no new run
    return digest


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A finished tiny digits run, and the helper files the bad commands point at."""
    base = tmp_path_factory.mktemp("fuzz")
    run = str(base / "runs" / "prior")
    assert command.main(["--out", run, "--epochs", "1", "--teacher-epochs", "1", "--train-per-class", "10",
                         "--batch-size", "16", "--quiet", "--no-curves"]) == 0
    files = {"missing": str(base / "missing"), "text": str(base / "notes.txt"),
             "bad_config": str(base / "bad.json"), "unknown_config": str(base / "unknown.json"),
             "one_class": str(base / "one_class"), "no_val": str(base / "no_val")}
    (base / "notes.txt").write_text("not a checkpoint, not JSON\n")
    (base / "bad.json").write_text(json.dumps({"batch_size": 1, "lr": -2}))
    (base / "unknown.json").write_text(json.dumps({"batch_sise": 8}))
    make_image_folder(base / "one_class", classes=("only",), per_class=2)
    make_image_folder(base / "no_val", per_class=2)
    for name in os.listdir(base / "no_val" / "val"):
        for image in os.listdir(base / "no_val" / "val" / name):
            os.remove(base / "no_val" / "val" / name / image)
        os.rmdir(base / "no_val" / "val" / name)
    os.rmdir(base / "no_val" / "val")
    return run, files


def test_the_table_is_large_and_its_draw_is_fixed(prior):
    table = _table(*prior)
    assert len(table) >= 3 * CASES_PER_RUN
    draw = random.Random(SEED).sample(range(len(table)), CASES_PER_RUN)
    assert draw == random.Random(SEED).sample(range(len(table)), CASES_PER_RUN)


def _one_line_status_2(argv, env, patch, capsys) -> list:
    """Runs one command; an empty list when it ended with status 2 and one line on stderr, else what it did."""
    with patch.context() as p:
        for name, value in env.items():
            p.setenv(name, value)
        status = command.main(argv + ["--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    if status == 2 and len(err) == 1 and err[0].startswith("mlkd-train: ") and "Traceback" not in err[0]:
        return []
    return [(argv, env, status, err[-3:])]


def test_bad_commands_are_one_line_with_status_2_and_touch_nothing(prior, capsys, monkeypatch):
    run, files = prior
    table = _table(run, files)
    rng = random.Random(SEED)
    fresh_root = os.path.join(os.path.dirname(os.path.dirname(run)), "fresh")
    before = _snapshot(run)
    failures = []
    cases = [(table[i], rng.choice(TARGETS)) for i in rng.sample(range(len(table)), CASES_PER_RUN)]
    cases += [((case, {}), "prior") for case in EXISTING_RUN_CASES]
    for n, ((case, env), target) in enumerate(cases):
        if "--resume" in case:  # continues the prior run (into a new folder it would start one)
            target = "prior"
        fresh = os.path.join(fresh_root, f"run{n}")
        argv = _argv(case, target, run, fresh, rng.random() < 0.5)
        failures += _one_line_status_2(argv, env, monkeypatch, capsys)
        if _snapshot(run) != before:
            failures.append((argv, env, "changed the prior run's folder or what is beside it"))
            before = _snapshot(run)
        if os.path.exists(fresh):
            failures.append((argv, env, f"created {fresh}"))
    assert not failures, "\n".join(map(repr, failures))
