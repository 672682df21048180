"""The command line's errors of issue #33, one test per finding: flags that were silently ignored,
crashes (a traceback, exit status 1) that are now one line with exit status 2 before anything
trains, misleading messages, ``--version``, and the README's functional signatures.

The commands run in this process (``mlkd_fast.train.__main__.main`` and ``mlkd_fast.train.cache.cli``
return the exit status and print the one line to stderr), which is what the console scripts call.
"""
import inspect
import json
import os
import pathlib
import re

import pytest
import torch

import mlkd_fast
from mlkd_fast import functional as F
from mlkd_fast.methods.crd import CRDMemory, crd_loss, crd_sample_indices
from mlkd_fast.train import __main__ as command
from mlkd_fast.train import parse_args
from mlkd_fast.train.cache import cli as cache_cli

from helpers import make_image_folder

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--teacher-epochs", "1", "--train-per-class", "10", "--batch-size", "16", "--quiet",
        "--no-curves"]


def _run(argv, capsys, entry=command.main):
    """(exit status, stderr lines, stdout) of one command in this process."""
    status = entry([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.err.strip().splitlines(), captured.out


def _one_line(argv, capsys, *fragments, entry=command.main, prog="mlkd-train"):
    """Runs ``argv``, asserts exit status 2 and exactly one line on stderr, ``<prog>: ...``, holding
    every fragment; returns the line."""
    status, err, _ = _run(argv, capsys, entry)
    assert status == 2, (argv, status, err)
    assert len(err) == 1 and err[0].startswith(f"{prog}: "), (argv, err)
    for fragment in fragments:
        assert fragment in err[0], (argv, fragment, err[0])
    return err[0]


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory):
    """A finished tiny digits run (its checkpoint.pt, student.pt and teacher.pt)."""
    out = tmp_path_factory.mktemp("prior") / "run"
    assert command.main(["--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "data"
    make_image_folder(root, per_class=2)
    return root


FOLDER = ["--method", "ce", "--image-size", "16", "--workers", "0", "--batch-size", "2", "--epochs", "1", "--quiet"]


# ---- finding 8: flags that were silently ignored, a one-class folder --------------------------
def test_steps_per_epoch_is_refused_on_folder_data_and_digits(tmp_path, folder, capsys):
    _one_line(["--data", folder, *FOLDER, "--steps-per-epoch", "3", "--out", tmp_path / "r"], capsys,
              "--steps-per-epoch applies to --data synthetic only", "one pass over the training images")
    _one_line(["--steps-per-epoch", "3", "--out", tmp_path / "r"], capsys, "--steps-per-epoch", "synthetic")
    assert not (tmp_path / "r").exists()


def test_num_classes_is_refused_on_digits(tmp_path, capsys):
    _one_line(["--num-classes", "3", "--out", tmp_path / "r"], capsys,
              "--num-classes applies to --data synthetic only", "the data's own")
    assert not (tmp_path / "r").exists()


def test_synthetic_data_keeps_its_defaults_and_takes_both_flags():
    args = parse_args(["--data", "synthetic"])
    assert (args.num_classes, args.steps_per_epoch) == (1000, 100)
    args = parse_args(["--data", "synthetic", "--num-classes", "7", "--steps-per-epoch", "3"])
    assert (args.num_classes, args.steps_per_epoch) == (7, 3)


def test_a_one_class_training_folder_is_refused_naming_the_folder_and_the_count(tmp_path, capsys):
    make_image_folder(tmp_path / "one", classes=("only",), per_class=4)
    line = _one_line(["--data", tmp_path / "one", *FOLDER, "--out", tmp_path / "r"], capsys,
                     str(tmp_path / "one" / "train"), "holds 1 class folder;", "at least 2")
    assert "100" not in line
    assert not (tmp_path / "r").exists()


# ---- crashes that are one line with exit status 2, before anything trains ----------------------
def test_an_unknown_backend_is_a_flag_error(tmp_path, capsys):
    _one_line(["--backend", "nosuch", "--out", tmp_path / "r"], capsys, "--backend", "'nosuch'", "'torch'")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs on the GPU here")
def test_triton_on_a_cpu_only_machine_is_refused_saying_why(tmp_path, capsys, monkeypatch):
    from mlkd_fast import backends

    if backends._triton is not None:  # conftest turns the interpreter on for the tests
        monkeypatch.setattr(backends._triton, "INTERPRET", False)
    _one_line(["--backend", "triton", "--out", tmp_path / "r"], capsys, "--backend triton", "not available on cpu")
    assert not (tmp_path / "r").exists()


def test_a_bogus_backend_in_the_environment_is_refused_naming_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLKD_FAST_BACKEND", "bogus")
    _one_line(["--out", tmp_path / "r"], capsys, "MLKD_FAST_BACKEND='bogus'", "is not a backend")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("option, fragment", [("temperature=-1", "temperature"), ("w_kd=nan", "w_kd"),
                                              ("w_kd=inf", "w_kd")])
def test_bad_method_options_fail_before_the_teacher_phase(tmp_path, capsys, option, fragment):
    """The default digits run trains a 30-epoch teacher first: the student's options are checked
    before it (nothing is written)."""
    _one_line(["--method-opt", option, "--out", tmp_path / "r"], capsys, fragment)
    assert not (tmp_path / "r").exists()


def test_batch_size_1_is_refused_saying_why(tmp_path, capsys):
    _one_line(["--batch-size", "1", "--out", tmp_path / "r"], capsys, "--batch-size must be >= 2", "BatchNorm")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("entry, prog", [(command.main, "mlkd-train"), (cache_cli, "mlkd-cache")])
def test_out_that_is_a_file_or_under_a_file_is_one_line(tmp_path, capsys, prior_run, entry, prog):
    weights = ["--teacher-weights", prior_run / "teacher.pt"] if prog == "mlkd-cache" else []
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    for out in (afile, afile / "sub"):
        _one_line(["--out", out, *weights, "--epochs", "1", "--quiet"], capsys, "--out", str(afile),
                  entry=entry, prog=prog)
    assert afile.read_text() == "keep me\n"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
@pytest.mark.parametrize("entry, prog", [(command.main, "mlkd-train"), (cache_cli, "mlkd-cache")])
def test_out_in_an_unwritable_folder_is_one_line(tmp_path, capsys, prior_run, entry, prog):
    weights = ["--teacher-weights", prior_run / "teacher.pt"] if prog == "mlkd-cache" else []
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _one_line(["--out", locked / "run", *weights, "--epochs", "1", "--quiet"], capsys, str(locked),
                  entry=entry, prog=prog)
    finally:
        locked.chmod(0o700)


# ---- misleading messages --------------------------------------------------------------------
def test_a_method_option_of_the_wrong_kind_names_the_option_and_what_it_takes(tmp_path, capsys):
    _one_line(["--method", "dkd", "--method-opt", "beta=abc", "--out", tmp_path / "r"], capsys,
              "beta", "takes a number", "8.0")
    _one_line(["--method", "crd", "--method-opt", "negatives=3", "--out", tmp_path / "r"], capsys,
              "negatives", "takes a string")


def test_teacher_weights_given_a_training_checkpoint_says_to_pass_student_pt(tmp_path, capsys, prior_run):
    line = _one_line(["--teacher-weights", prior_run / "checkpoint.pt", "--out", tmp_path / "r", *TINY[:2]], capsys,
                     "training checkpoint", str(prior_run / "student.pt"))
    assert "corrupt" not in line
    # a file that really is cut short still says so
    torn = tmp_path / "torn.pt"
    torn.write_bytes((prior_run / "teacher.pt").read_bytes()[:200])
    _one_line(["--teacher-weights", torn, "--out", tmp_path / "r", *TINY[:2]], capsys, "truncated or corrupt")


def _config(tmp_path, **values):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return path


def test_an_error_in_a_value_from_the_config_file_names_the_file(tmp_path, capsys):
    config = _config(tmp_path, batch_size=1, lr=0.05)
    line = _one_line(["--config", config, "--out", tmp_path / "r"], capsys, "--batch-size must be >= 2",
                     f"from --config {config}", "--unset batch-size")
    assert line.count("--config") == 1
    # the same value typed on the command line is the user's own: no mention of the file
    line = _one_line(["--config", config, "--batch-size", "1", "--out", tmp_path / "r"], capsys, "--batch-size")
    assert str(config) not in line
    # a method option from the file, refused when the method is built (before anything trains)
    config = _config(tmp_path, method="kd", method_opt=["temperature=-1"])
    _one_line(["--config", config, "--out", tmp_path / "r"], capsys, "temperature", f"--config {config}")
    assert not (tmp_path / "r").exists()


def test_config_values_are_overridden_or_unset_from_the_command_line(tmp_path, capsys):
    config = _config(tmp_path, batch_size=1, teacher_weights="t.pt", compare_baseline=True, method="kd",
                     method_opt=["temperature=2.0"])
    args = parse_args(["--config", str(config), "--batch-size", "8", "--unset", "teacher-weights",
                       "--unset", "compare-baseline", "--unset", "method-opt"])
    assert (args.batch_size, args.teacher_weights, args.compare_baseline, args.method_options) == (8, None, False, {})
    assert args.method == "kd"  # what was not unset stays the file's
    _one_line(["--unset", "batch-size", "--out", tmp_path / "r"], capsys, "--unset", "--config")
    _one_line(["--config", config, "--unset", "no-such-flag", "--out", tmp_path / "r"], capsys,
              "--unset no-such-flag")


def test_crd_with_an_index_outside_num_data_is_a_value_error_naming_both():
    memory = CRDMemory(10, 8)
    emb = torch.randn(4, 8), torch.randn(4, 8)
    for index, bad in ((torch.tensor([0, 1, 2, 10]), 10), (torch.tensor([0, -1, 2, 3]), -1)):
        with pytest.raises(ValueError, match=rf"index {bad}\b.*num_data = 10"):
            crd_loss(*emb, index, memory, k=3)
        with pytest.raises(ValueError, match=rf"index {bad}\b.*num_data = 10"):
            crd_sample_indices(index, 10, k=3)
        with pytest.raises(ValueError, match=rf"index {bad}\b.*num_data = 10"):
            memory.update(index, *emb)
    contrast = torch.tensor([[0, 1], [1, 12], [2, 3], [3, 4]])
    with pytest.raises(ValueError, match=r"contrast_idx holds the dataset index 12.*num_data = 10"):
        crd_loss(*emb, torch.arange(4), memory, contrast)
    assert torch.isfinite(crd_loss(*emb, torch.arange(4), memory, k=3))  # in range: a loss


def test_the_readme_names_the_real_keywords_of_the_functional_forms():
    text = (ROOT / "README.md").read_text()
    for name in ("correlation_kl", "kd_kl_div"):
        params = set(inspect.signature(getattr(F, name)).parameters)
        calls = re.findall(rf"{name}\(([^()]*)\)", text)
        assert calls, name
        for call in calls:
            keywords = set(re.findall(r"(\w+)\s*=(?!=)", call))
            assert keywords <= params, (name, keywords - params)


# ---- --version ------------------------------------------------------------------------------
@pytest.mark.parametrize("entry, prog", [(command.main, "mlkd-train"), (cache_cli, "mlkd-cache")])
def test_version(capsys, entry, prog):
    status, err, out = _run(["--version"], capsys, entry)
    assert status == 0 and not err
    assert out.strip() == f"{prog} {mlkd_fast.__version__}"
