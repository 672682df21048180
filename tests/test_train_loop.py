"""The training loop beyond the digits default: exact resume, SIGTERM, DDP (gloo, 2 processes),
the global correlation, the robustness-study data options, folder and synthetic data, bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from mlkd_fast.train import data as D
from mlkd_fast.train import main
from mlkd_fast.train.checkpoint import load_checkpoint, save_checkpoint
from mlkd_fast.train.models import build_model

from helpers import make_image_folder

SHORT = ["--teacher-epochs", "3", "--epochs", "3", "--quiet"]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_after_interruptions_gives_the_same_weights(tmp_path):
    full = main(["--out", str(tmp_path / "full"), *SHORT])
    part = str(tmp_path / "part")
    # 21 steps per epoch: stop inside the teacher's 2nd epoch, then inside the student's 1st
    assert main(["--out", part, *SHORT, "--max-steps", "30"]) == {"interrupted": True}
    ckpt = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)
    assert (ckpt["phase"], ckpt["epoch"], ckpt["step"]) == ("teacher", 1, 9)
    assert main(["--out", part, *SHORT, "--resume", "--max-steps", "40"]) == {"interrupted": True}
    ckpt = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=False)
    assert (ckpt["phase"], ckpt["epoch"], ckpt["step"]) == ("student", 0, 7)
    resumed = main(["--out", part, *SHORT, "--resume"])
    _same_weights(tmp_path / "full" / "teacher.pt", os.path.join(part, "teacher.pt"))
    _same_weights(tmp_path / "full" / "student.pt", os.path.join(part, "student.pt"))
    for key in ("teacher_top1", "student_top1", "best_top1", "best_epoch"):
        assert resumed[key] == full[key], key
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(part, "metrics.jsonl"))]
    assert epochs == [1, 2, 3, 1, 2, 3]  # each epoch logged once across the three invocations


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mlkd_fast.train", "--out", str(out), "--teacher-epochs", "400",
                             "--epochs", "1", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "continue with --resume" in stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["phase"] == "teacher" and ckpt["epoch"] < 400
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # no torn temp files left


# mlkd-train's entry point, also keeping the buffers (BatchNorm statistics) of every model each rank evaluates
_RECORDING_MAIN = r"""
import os, sys, torch
import mlkd_fast.train.loop as loop
from mlkd_fast.train import main

seen, evaluate = [], loop.evaluate

def recording_evaluate(model, batches, ctx):
    seen.append({k: v.clone() for k, v in model.named_buffers()})
    return evaluate(model, batches, ctx)

loop.evaluate = recording_evaluate
out = sys.argv[sys.argv.index("--out") + 1]
main(sys.argv[1:])
torch.save(seen, os.path.join(out, "evaluated" + os.environ["RANK"] + ".pt"))
"""


@pytest.mark.parametrize("extra", [[], ["--loss", "paper", "--sync-bn", "--global-supcon"]],
                         ids=["mlkd", "paper-syncbn-globalsupcon"])
def test_torchrun_two_processes_on_cpu_all_reduces_metrics(tmp_path, extra):
    """The logged top-1 is the saved student's on the whole test set: every rank evaluates its shard
    with the same BatchNorm statistics, those of the saved model (rank 0's)."""
    out = tmp_path / "ddp"
    script = tmp_path / "recording_main.py"
    script.write_text(_RECORDING_MAIN)
    port = "29517" if not extra else "29518"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(script), "--out", str(out), "--teacher-epochs", "2", "--epochs", "2",
           "--batch-size", "32", "--global-correlation", "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    evaluated = [torch.load(out / f"evaluated{rank}.pt") for rank in range(2)]
    assert len(evaluated[0]) == len(evaluated[1]) == 4  # teacher and student, two epochs each
    for rank0, rank1 in zip(*evaluated):
        assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = _weights(out / "student.pt")
    assert all(torch.equal(v, saved[k]) for k, v in evaluated[0][-1].items())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # the logged accuracy is over the whole test set (both ranks' shards summed)
    _, _, x_test, y_test = D.load_digits_split(seed=0)
    student = build_model("cnn-small", 10, str(out / "student.pt")).eval()
    with torch.no_grad():
        top1 = 100.0 * int((student(x_test)[0].argmax(1) == y_test).sum()) / len(y_test)  # exact, as the loop counts
    assert summary["student_top1"] == pytest.approx(top1, abs=1e-6)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["images_per_s"] > 0 for r in records)


_GLOBAL_CORR_WORKER = r"""
import os, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from mlkd_fast import MLKDLoss
from mlkd_fast.train.distributed import gather_with_grad, shutdown_distributed
rank, world, views, b = int(sys.argv[1]), 2, int(sys.argv[4]), 6
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.manual_seed(0)
x, t = torch.randn(views, world * b, 6), torch.randn(views, world * b, 5)  # view-major global batch
head = torch.nn.Linear(6, 7)
loss_fn = MLKDLoss(w_ce=0, w_kd=0, w_corr=1, views=views, correlation_gather=gather_with_grad)
model = DDP(head)
mine = slice(rank * b, rank * b + b)  # this rank's images, every view of them (view-major again)
loss = loss_fn(student_feats=model(x[:, mine].reshape(-1, 6)), teacher_feats=t[:, mine].reshape(-1, 5))
loss.backward()
losses = [torch.zeros(()) for _ in range(world)]
dist.all_gather(losses, loss.detach())
if rank == 0:
    torch.save({"losses": torch.stack(losses), "grad": head.weight.grad.clone()}, sys.argv[2])
del model, loss  # they hold the process group (see shutdown_distributed)
shutdown_distributed(wait_for_all=True)
"""


@pytest.mark.parametrize("views", [1, 4], ids=["square", "rotations"])
def test_global_correlation_under_ddp_equals_the_single_process_loss_and_gradient(tmp_path, views):
    """Each rank computes only its rows against the gathered columns (its losses differ from the
    other rank's); their mean is the global-batch loss and DDP's averaged gradient its gradient."""
    from mlkd_fast import MLKDLoss

    path = tmp_path / "rank0.pt"
    port = str(29533 + views)
    procs = [subprocess.Popen([sys.executable, "-c", _GLOBAL_CORR_WORKER, str(r), str(path), port, str(views)])
             for r in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    got = torch.load(path)
    torch.manual_seed(0)
    x, t = torch.randn(views, 12, 6), torch.randn(views, 12, 5)
    head = torch.nn.Linear(6, 7)
    loss = MLKDLoss(w_ce=0, w_kd=0, w_corr=1, views=views, backend="torch")(
        student_feats=head(x.reshape(-1, 6)), teacher_feats=t.reshape(-1, 5))
    loss.backward()
    assert not torch.allclose(got["losses"][0], got["losses"][1])  # split work, not the global loss twice
    torch.testing.assert_close(got["losses"].mean(), loss.detach())
    torch.testing.assert_close(got["grad"], head.weight.grad)


_DDP_TERMS_SETUP = r"""
import torch
from torch import nn
from mlkd_fast import MLKDLoss

class Net(nn.Module):
    def __init__(self, mode, views):
        super().__init__()
        torch.manual_seed(0)
        if mode == "supcon":
            self.student = nn.Linear(6, 7)
            self.loss_fn = MLKDLoss(7, 5, w_ce=0, w_kd=0, w_corr=0, w_supcon=1, supcon_dim=4, views=views)
        else:  # BatchNorm in the student and in the alignment head
            self.student = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 7))
            self.loss_fn = MLKDLoss(7, 5, w_ce=0, w_kd=0, w_corr=0, w_align=1, views=views)

    def forward(self, x, t, y):
        return self.loss_fn(student_feats=self.student(x), teacher_feats=t, target=y)

def data(views, n):  # a view-major global batch
    g = torch.Generator().manual_seed(1)
    return (torch.randn(views, n, 6, generator=g), torch.randn(views, n, 5, generator=g),
            torch.randint(0, 3, (n,), generator=g))
"""

_DDP_TERMS_WORKER = _DDP_TERMS_SETUP + r"""
import os, sys, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from mlkd_fast.train.distributed import convert_sync_batchnorm, gather_with_grad, shutdown_distributed
rank, out, port, mode, views = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
world, b = 2, 6
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=world)
net = Net(mode, views)
if mode == "supcon":
    net.loss_fn.supcon_gather = gather_with_grad
else:
    convert_sync_batchnorm(net, "cpu")
x, t, y = data(views, world * b)
mine = slice(rank * b, rank * b + b)  # this rank's images, every view of them
model = DDP(net)
loss = model(x[:, mine].reshape(-1, 6), t[:, mine].reshape(-1, 5), y[mine])
loss.backward()
losses = [torch.zeros(()) for _ in range(world)]
dist.all_gather(losses, loss.detach())
torch.save({"losses": torch.stack(losses), "grads": {k: p.grad for k, p in net.named_parameters()},
            "buffers": {k: v.clone() for k, v in net.named_buffers()}}, out + str(rank) + ".pt")
del model, loss  # they hold the process group (see shutdown_distributed)
shutdown_distributed(wait_for_all=True)
"""


@pytest.mark.parametrize("mode,views", [("supcon", 1), ("supcon", 4), ("syncbn", 1)],
                         ids=["global-supcon", "global-supcon-rotations", "sync-bn"])
def test_global_supcon_and_sync_bn_under_ddp_equal_the_single_process_batch(tmp_path, mode, views):
    """Two gloo processes, each with half of the batch: with the SupCon embeddings all-gathered
    (``supcon_gather``), or with SyncBatchNorm in the student and the alignment head, the mean of
    the processes' losses and DDP's averaged gradient equal those of one process with the whole
    batch; with SyncBatchNorm both ranks' running statistics equal that process's too."""
    out = str(tmp_path / "rank")
    port = {("supcon", 1): "29541", ("supcon", 4): "29542", ("syncbn", 1): "29543"}[(mode, views)]
    procs = [subprocess.Popen([sys.executable, "-c", _DDP_TERMS_WORKER, str(r), out, port, mode, str(views)])
             for r in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    got = [torch.load(out + f"{r}.pt") for r in range(2)]
    ns: dict = {}
    exec(_DDP_TERMS_SETUP, ns)
    net = ns["Net"](mode, views)
    x, t, y = ns["data"](views, 12)
    loss = net(x.reshape(-1, 6), t.reshape(-1, 5), y)
    loss.backward()
    torch.testing.assert_close(got[0]["losses"].mean(), loss.detach())
    for name, p in net.named_parameters():
        torch.testing.assert_close(got[0]["grads"][name], p.grad, msg=name)
    if mode == "supcon":
        assert not torch.allclose(got[0]["losses"][0], got[0]["losses"][1])  # each rank its own anchors
    else:
        buffers = dict(net.named_buffers())
        assert buffers and any("loss_fn" in k for k in buffers)
        for rank in range(2):
            for name, value in buffers.items():
                torch.testing.assert_close(got[rank]["buffers"][name], value, msg=f"rank {rank} {name}")


def _checkpoint_state(epoch, numel=10):
    return {"phase": "student", "epoch": epoch, "step": 0, "model": {"w": torch.full((numel,), float(epoch))},
            "optimizer": {}, "scheduler": {}, "rng": {}}


_KILLED_WRITER = r"""
import sys, time, torch
from mlkd_fast.train.checkpoint import atomic_write

class StallingFile:
    # passes writes on to the temp file until half of the checkpoint is there, then hangs
    def __init__(self, f, stall_at):
        self.f, self.stall_at, self.written = f, stall_at, 0

    def write(self, data):
        data = memoryview(data).cast("B")
        room = self.stall_at - self.written
        self.f.write(data[:room])
        self.written += min(len(data), room)
        if self.written >= self.stall_at:
            self.f.flush()
            print("stalled", flush=True)
            time.sleep(600)
        return len(data)

    def flush(self):
        self.f.flush()

state = {"phase": "student", "epoch": 2, "step": 0, "model": {"w": torch.full((8_000_000,), 2.0)},
         "optimizer": {}, "scheduler": {}, "rng": {}}
atomic_write(sys.argv[1], lambda f: torch.save(state, StallingFile(f, int(sys.argv[2]))))
"""


def test_writer_killed_mid_checkpoint_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL (no handler, no cleanup) while a 32 MB checkpoint is half written to its temp file:
    the checkpoint path still holds the previous one, and the torn temp file is never read for it."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), _checkpoint_state(1))
    before = path.read_bytes()
    half = 16_000_000
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path), str(half)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stalled"
        temps = [tmp_path / f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
        assert len(temps) == 1 and temps[0].stat().st_size == half
    finally:
        proc.kill()  # SIGKILL
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    state = load_checkpoint(str(path))
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(10))
    with pytest.raises(ValueError, match=re.escape(str(temps[0])) + ".*truncated or corrupt"):
        load_checkpoint(str(temps[0]))  # what the killed writer left is unusable


def test_truncated_or_corrupt_checkpoint_gives_an_error_naming_the_file(tmp_path):
    out = tmp_path / "run"
    path = out / "checkpoint.pt"
    save_checkpoint(str(path), _checkpoint_state(1, numel=10_000))
    good = path.read_bytes()
    for content in (good[: len(good) // 2], good[:100], b"", bytes(len(good)), b"\x80\x04not a pickle" * 50):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(repr(str(path))) + " is not a readable PyTorch checkpoint "
                                             r"\(truncated or corrupt\?\)"):
            load_checkpoint(str(path))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated or corrupt"):
        main(["--out", str(out), *SHORT, "--resume"])
    torch.save({"weights": torch.ones(3)}, path)  # readable, but not a training checkpoint
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + " is not an mlkd-train checkpoint .*lacks phase"):
        load_checkpoint(str(path))
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(good[:200])
    with pytest.raises(ValueError, match=re.escape(str(weights)) + ".*truncated or corrupt"):
        build_model("cnn-large", 10, str(weights))


def test_resume_with_other_settings_names_the_setting_and_both_values(tmp_path, capsys):
    out = str(tmp_path / "run")
    run = ["--data", "synthetic", "--arch", "resnet18", "--teacher-arch", "resnet18", "--image-size", "16",
           "--num-classes", "5", "--batch-size", "2", "--steps-per-epoch", "3", "--epochs", "1", "--out", out,
           "--quiet", "--sync-bn"]
    assert main([*run, "--max-steps", "1"]) == {"interrupted": True}
    assert "--sync-bn does nothing in a single process" in capsys.readouterr().err
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert "scaler" not in ckpt and ckpt["step"] == 1
    assert (ckpt["config"]["arch"], ckpt["config"]["method"], ckpt["config"]["num_classes"]) == ("resnet18", "mlkd", 5)
    for flag, value, message in [
        ("--arch", "resnet34", "--arch is 'resnet18' in the checkpoint but 'resnet34' in this run"),
        ("--loss", "kd", "--method is 'mlkd' in the checkpoint but 'kd' in this run"),  # --loss: its alias
        ("--method-opt", "w_kd=2", r"--method-options is \{\} in the checkpoint but \{'w_kd': 2\} in this run"),
        ("--num-classes", "7", r"number of classes \(--num-classes.*\) is 5 in the checkpoint but 7 in this run"),
        ("--rotations", "4", "--rotations is 1 in the checkpoint but 4 in this run"),
        ("--batch-size", "4", "--batch-size is 2 in the checkpoint but 4 in this run"),  # stopped mid-epoch
    ]:
        with pytest.raises(ValueError, match=message):
            main([*run, "--resume", flag, value])
    summary = main([*run, "--resume"])  # the same settings continue
    assert summary["last_epoch"] == 1


def test_label_noise_flips_exactly_the_requested_fraction():
    y = torch.arange(10).repeat(50)
    noisy, flipped = D.add_label_noise(y, 0.3, 10, seed=4)
    assert int(flipped.sum()) == 150
    assert (noisy[flipped] != y[flipped]).all() and torch.equal(noisy[~flipped], y[~flipped])
    assert noisy.min() >= 0 and noisy.max() <= 9
    again, _ = D.add_label_noise(y, 0.3, 10, seed=4)
    other, _ = D.add_label_noise(y, 0.3, 10, seed=5)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)


def test_imbalance_makes_a_long_tail_with_the_requested_ratio():
    y = torch.arange(10).repeat(100)
    keep = D.imbalance_indices(y, 10.0, seed=0)
    counts = torch.bincount(y[keep], minlength=10)
    assert counts[0] == 100 and counts[-1] == 10
    assert (counts[:-1] >= counts[1:]).all()


def test_digits_run_with_noise_and_imbalance_reports_the_data(tmp_path):
    summary = main(["--out", str(tmp_path), "--teacher-epochs", "1", "--epochs", "1", "--quiet",
                    "--label-noise", "0.2", "--imbalance", "5"])
    assert summary["noisy_labels"] == round(0.2 * summary["train_samples"])
    assert summary["train_samples"] < 1347


def test_rotations_and_paper_preset_on_synthetic_images_bf16_channels_last(tmp_path):
    summary = main(["--data", "synthetic", "--arch", "resnet18", "--teacher-arch", "resnet18", "--image-size", "32",
                    "--num-classes", "10", "--batch-size", "4", "--steps-per-epoch", "2", "--epochs", "1",
                    "--rotations", "4", "--loss", "paper", "--precision", "bf16", "--channels-last", "on",
                    "--out", str(tmp_path), "--quiet"])
    assert summary["student_top1"] is None and summary["images_per_s"] > 0
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"ce", "corr", "align", "supcon"} <= set(record)


def test_image_folder_run_skips_and_counts_corrupt_files(tmp_path):
    make_image_folder(tmp_path / "data", corrupt=1)
    weights = tmp_path / "teacher.pt"
    torch.save(build_model("resnet18", 2).state_dict(), weights)
    summary = main(["--data", str(tmp_path / "data"), "--arch", "resnet18", "--teacher-arch", "resnet18",
                    "--teacher-weights", str(weights), "--image-size", "32", "--batch-size", "4", "--epochs", "1",
                    "--workers", "0", "--out", str(tmp_path / "out"), "--quiet"])
    assert summary["classes"] == 2 and summary["train_samples"] == 13 and summary["val_samples"] == 12
    assert 0.0 <= summary["student_top1"] <= 100.0
    # 13 files, 3 global batches of 4; whether the broken file falls in them depends on the order
    assert summary["corrupt_images"] in (0, 1)


def test_image_folder_fail_mode_names_the_corrupt_file(tmp_path):
    make_image_folder(tmp_path / "data", per_class=1, corrupt=1)
    samples = D.scan_image_folder(str(tmp_path / "data" / "train"))[1]
    dataset = D.ImageFiles(samples, D.folder_transforms(True, 16), on_corrupt="fail")
    bad = [i for i, (p, _) in enumerate(samples) if "broken" in p][0]
    with pytest.raises(RuntimeError, match="broken0.jpg"):
        dataset[bad]
    skipping = D.ImageFiles(samples, D.folder_transforms(True, 16))
    images, labels, n_bad, index = D.collate_skipping([skipping[i] for i in range(len(samples))])
    assert n_bad == 1 and images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 1]
    assert index.tolist() == [i for i in range(len(samples)) if i != bad]  # the broken file's index left out


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_folder_batches_carry_their_sample_indices_and_crd_keeps_a_bank_over_them(tmp_path, decode):
    make_image_folder(tmp_path / "data", per_class=5)
    samples = D.scan_image_folder(str(tmp_path / "data" / "train"))[1]
    source = D.FolderSource(samples, D.Shard(4), seed=3, device=torch.device("cpu"), train=True, image_size=16,
                            workers=0, decode=decode)
    seen = []
    for x, y, index in source.epoch(1, with_index=True):
        assert x.shape == (4, 3, 16, 16)
        assert y.tolist() == [samples[i][1] for i in index.tolist()]  # each label is its sample's
        seen += index.tolist()
    assert seen == D.epoch_order(10, 3, 1)[:8].tolist()  # the epoch's order, partial last batch dropped
    weights = tmp_path / "teacher.pt"
    torch.save(build_model("resnet18", 2).state_dict(), weights)
    out = tmp_path / f"out-{decode}"
    summary = main(["--data", str(tmp_path / "data"), "--arch", "resnet18", "--teacher-arch", "resnet18",
                    "--teacher-weights", str(weights), "--image-size", "16", "--batch-size", "4", "--epochs", "1",
                    "--workers", "0", "--decode", decode, "--method", "crd", "--method-opt", "num_negatives=4",
                    "--out", str(out), "--quiet"])
    assert 0.0 <= summary["student_top1"] <= 100.0
    bank = torch.load(out / "checkpoint.pt", weights_only=False)["distiller"]
    banks = [v for k, v in bank.items() if k.endswith("memory_s")]
    assert banks and banks[0].shape[0] == 10  # one row per training image


def test_missing_and_empty_folders_give_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(tmp_path / "nowhere"), "--teacher-weights", "x.pt"])
    assert exc.value.code == 2 and "no such folder" in capsys.readouterr().err
    make_image_folder(tmp_path / "data", per_class=1)
    os.makedirs(tmp_path / "data" / "train" / "empty")
    with pytest.raises(ValueError, match="empty.*holds no images"):
        D.scan_image_folder(str(tmp_path / "data" / "train"))
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(tmp_path / "data")])
    assert "--teacher-weights is required" in capsys.readouterr().err


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(build_model("resnet18", 10).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit --arch resnet34"):
        build_model("resnet34", 10, str(path))
    torch.save({"model": build_model("cnn-large", 10).state_dict()}, path)
    build_model("cnn-large", 10, str(path))  # our own checkpoints load
    with pytest.raises(ValueError, match="do not fit --arch cnn-small"):
        build_model("cnn-small", 10, str(path))


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path):
    out = str(tmp_path / "run")
    main(["--out", out, *SHORT, "--max-steps", "70"])  # stops inside the student phase
    with pytest.raises(ValueError, match="--arch is 'cnn-small' in the checkpoint but 'cnn-large' in this run"):
        main(["--out", out, *SHORT, "--resume", "--arch", "cnn-large"])


def test_compiled_student_and_teacher_train(tmp_path):
    summary = main(["--out", str(tmp_path), "--teacher-epochs", "1", "--epochs", "1", "--compile", "--quiet"])
    assert summary["student_top1"] > 10.0


def test_device_decoding_path_trains_and_skips_corrupt_files(tmp_path):
    """``--decode device``: the workers read bytes, decoding and augmentation run on the training
    device (nvJPEG on CUDA; here the CPU twin of the same code)."""
    from PIL import Image

    make_image_folder(tmp_path / "data", corrupt=1)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "data" / "train" / "b" / "real.jpg")
    datas = [D.ImageBytes(D.scan_image_folder(str(tmp_path / "data" / "train"))[1])[i] for i in range(3)]
    weights = tmp_path / "teacher.pt"
    torch.save(build_model("resnet18", 2).state_dict(), weights)
    summary = main(["--data", str(tmp_path / "data"), "--arch", "resnet18", "--teacher-arch", "resnet18",
                    "--teacher-weights", str(weights), "--image-size", "32", "--batch-size", "4", "--epochs", "1",
                    "--workers", "0", "--decode", "device", "--out", str(tmp_path / "out"), "--quiet"])
    assert summary["train_samples"] == 14 and 0.0 <= summary["student_top1"] <= 100.0
    assert len(datas) == 3 and datas[0][0].dtype == torch.uint8
    samples = D.scan_image_folder(str(tmp_path / "data" / "train"))[1]
    raw = [D.ImageBytes(samples)[i] for i in range(len(samples))]
    decoded = D.decode_on_device([r[0] for r in raw], [r[2] for r in raw], torch.device("cpu"))
    assert sum(img is None for img in decoded) == 1
    assert all(img.shape[0] == 3 for img in decoded if img is not None)
    batch = D.augment_on_device([img for img in decoded if img is not None], True, 24)
    assert batch.shape == (len(samples) - 1, 3, 24, 24) and batch.dtype == torch.uint8
    with pytest.raises(RuntimeError, match="broken0.jpg"):
        D.decode_on_device([r[0] for r in raw], [r[2] for r in raw], torch.device("cpu"), on_corrupt="fail")


def test_samples_a_method_makes_leave_the_students_batchnorm_estimates_alone():
    """BSS's adversarial samples go through the student in train mode (their own batch statistics,
    gradients to the student) without moving BatchNorm's running estimates, which evaluation uses."""
    from mlkd_fast.methods import Distillation

    student, teacher = build_model("cnn-tiny", 10), build_model("cnn-small", 10)
    step = Distillation(student, teacher, "bss", input_shape=(1, 8, 8)).train()
    before = {k: v.clone() for k, v in student.state_dict().items() if "running" in k or "num_batches" in k}
    logits = step._extra_logits(torch.randn(16, 1, 8, 8) * 50.0)  # far off the data
    assert logits.shape == (16, 10) and logits.requires_grad
    logits.sum().backward()
    assert student.fc.weight.grad is not None
    for k, v in student.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    student(torch.randn(16, 1, 8, 8))  # an ordinary training forward still updates them
    assert not torch.equal(student.state_dict()["body.1.running_mean"], before["body.1.running_mean"])
