"""linear_kd_loss under DDP and FSDP2 (``fully_shard``): 2 gloo processes on CPU, each with half of
the batch, give the gradients (lm_head included) of one process with the whole batch (docs/lm.md §3).

The two processes run every case in one process group (one start-up for the file); the parent
computes the single-process references in fp64 and compares. A child's failure shows up in the
assertion message with its stderr.

FSDP2 cases: the loss reads ``model.lm_head.weight`` outside the head module's forward. With the
head in the root's group and the root's default ``reshard_after_forward`` (False for the root), that
is the unsharded plain parameter; with ``reshard_after_forward=True`` on the root, or the head
sharded as its own group (whose forward never runs), it is the sharded DTensor ((V/2, H) a rank),
which linear_kd gathers differentiably with an averaged Partial gradient (``_unshard``). The loss
called inside the wrapped root's forward sees the unsharded parameter.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

WORLD, PER_RANK = 2, 2  # sequences per rank; each of 6 tokens: 24 tokens in all

_SETUP = r"""
import torch
from torch import nn
from mlkd_fast.functional import linear_kd_loss

V, H, SEQ = 64, 16, 6

class Tiny(nn.Module):
    '''embedding -> Linear body -> hidden states; lm_head (V, H) used only by the loss.'''

    def __init__(self, seed=0, vocab=V, bias=False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(V, H)
        self.body = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, H))
        self.lm_head = nn.Linear(H, vocab, bias=bias)

    def forward(self, ids):
        return self.body(self.embed(ids))

class LossInside(Tiny):
    '''The loss computed in the module's own forward (where FSDP2 has the parameters unsharded).'''

    def forward(self, ids, teacher_hidden, teacher_weight, labels):
        return linear_kd_loss(super().forward(ids), self.lm_head.weight, student_bias=self.lm_head.bias,
                              teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, labels=labels,
                              ce_weight=0.5, chunk_size=5)

def data(n, vocab=V, ignored=(3, 3)):
    '''n sequences of ids, the teacher's hidden states and head, and labels with ignored[r] tokens of
    rank r's half set to -100 (ranks hold consecutive halves).'''
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (n, SEQ), generator=g)
    th, tw = torch.randn(n, SEQ, H, generator=g), torch.randn(vocab, H, generator=g)
    labels = torch.randint(0, vocab, (n, SEQ), generator=g)
    half = n // 2
    for r, k in enumerate(ignored):
        labels[r * half:(r + 1) * half].view(-1)[torch.randperm(half * SEQ, generator=g)[:k]] = -100
    return ids, th, tw, labels

def kd(model, ids, th, tw, labels, **kw):
    return linear_kd_loss(model(ids), model.lm_head.weight, student_bias=model.lm_head.bias, teacher_hidden=th,
                          teacher_weight=tw, labels=labels, ce_weight=0.5, chunk_size=5, **kw)

# case -> (model kwargs, ignored per rank, reduction)
CASES = {
    "ddp-mean": ({}, (3, 3), "mean"),
    "ddp-sum": ({}, (2, 5), "sum"),
    "ddp-unequal-mean": ({}, (1, 7), "mean"),
    "ddp-unequal-global-mean": ({}, (1, 7), "global"),
    "fsdp-head-in-root": ({}, (3, 3), "mean"),
    "fsdp-root-resharded": ({"bias": True}, (3, 3), "mean"),
    "fsdp-head-own-group": ({"vocab": 63, "bias": True}, (3, 3), "mean"),
    "fsdp-sharded-teacher": ({}, (3, 3), "mean"),
    "fsdp-loss-inside-forward": ({"bias": True}, (3, 3), "mean"),
}
"""

_WORKER = _SETUP + r"""
import os, sys, traceback
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

torch.set_default_dtype(torch.float64)
rank, port, out, PER_RANK = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2)
results = {}
for case, (model_kw, ignored, reduction) in CASES.items():
    ids, th, tw, labels = data(2 * PER_RANK, model_kw.get("vocab", V), ignored)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    ids, th, labels = ids[mine], th[mine], labels[mine]
    net = (LossInside if case == "fsdp-loss-inside-forward" else Tiny)(**model_kw)
    info = {}
    if case.startswith("ddp"):
        model = DDP(net)
        hidden = model(ids)  # DDP's forward, then the loss on the head's parameter
        kw = dict(student_bias=net.lm_head.bias, teacher_hidden=th, teacher_weight=tw, labels=labels, ce_weight=0.5,
                  chunk_size=5)
        if reduction == "global":  # the global mean: a sum, times the world size over the global count
            count = (labels != -100).sum().double()
            dist.all_reduce(count)
            loss = linear_kd_loss(hidden, net.lm_head.weight, reduction="sum", **kw) * dist.get_world_size() / count
        else:
            loss = linear_kd_loss(hidden, net.lm_head.weight, reduction=reduction, **kw)
    else:
        fully_shard(net.body)
        if case == "fsdp-head-own-group":
            fully_shard(net.lm_head)
        fully_shard(net, reshard_after_forward=True if case == "fsdp-root-resharded" else None)
        if case == "fsdp-loss-inside-forward":
            loss = net(ids, th, tw, labels)
            info["weight"] = type(net.lm_head.weight).__name__
        elif case == "fsdp-sharded-teacher":
            teacher = Tiny(seed=2)
            teacher.requires_grad_(False)
            fully_shard(teacher.body)
            fully_shard(teacher, reshard_after_forward=True)
            with torch.no_grad():
                t_hidden = teacher(ids)
            info["teacher_weight"] = type(teacher.lm_head.weight).__name__
            hidden = net(ids)
            info["weight"] = type(net.lm_head.weight).__name__
            loss = linear_kd_loss(hidden, net.lm_head.weight, teacher_hidden=t_hidden,
                                  teacher_weight=teacher.lm_head.weight, labels=labels, ce_weight=0.5, chunk_size=5)
        else:
            hidden = net(ids)
            w = net.lm_head.weight
            info["weight"] = type(w).__name__
            info["local_rows"] = w.to_local().shape[0] if hasattr(w, "to_local") else w.shape[0]
            loss = kd(net, ids, th, tw, labels)
    loss.backward()
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    grads = {}
    for name, p in net.named_parameters():  # full_tensor is a collective: every rank calls it
        grads[name] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
    results[case] = {"losses": torch.stack(losses), "grads": grads, "info": info}
    del net, loss
    if case.startswith("ddp"):
        del model
if rank == 0:
    torch.save(results, out)
dist.barrier()
dist.destroy_process_group()
# skip the interpreter's teardown: a thread the collectives left joinable was destroyed there and aborted a rank
# ("terminate called without an active exception", exit -6) in one fresh-clone CI run, its work already done
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case in two gloo processes; rank 0's results (losses of both ranks, full gradients)."""
    out = tmp_path_factory.mktemp("linear_kd_dist") / "results.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    logs = [out.with_name(f"rank{r}.log") for r in range(WORLD)]  # files, not pipes: no child blocks on output
    procs = []
    for r in range(WORLD):
        with open(logs[r], "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(r), port, str(out), str(PER_RANK)],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
    failures = []
    for r, p in enumerate(procs):
        try:
            p.wait(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            p.wait()
            failures.append(f"rank {r} timed out after 180 s:\n{logs[r].read_text()[-6000:]}")
            continue
        if p.returncode != 0:
            failures.append(f"rank {r} exited with {p.returncode}:\n{logs[r].read_text()[-6000:]}")
    assert not failures, "\n\n".join(failures)
    return torch.load(out)


def _reference(case):
    """One process, the whole batch, fp64: (loss, gradients by name)."""
    ns: dict = {}
    exec(_SETUP, ns)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model_kw, ignored, reduction = ns["CASES"][case]
        ids, th, tw, labels = ns["data"](WORLD * PER_RANK, model_kw.get("vocab", ns["V"]), ignored)
        net = (ns["LossInside"] if case == "fsdp-loss-inside-forward" else ns["Tiny"])(**model_kw)
        if case == "fsdp-loss-inside-forward":
            loss = net(ids, th, tw, labels)
        elif case == "fsdp-sharded-teacher":
            teacher = ns["Tiny"](seed=2)
            with torch.no_grad():
                t_hidden = teacher(ids)
            loss = ns["linear_kd_loss"](net(ids), net.lm_head.weight, teacher_hidden=t_hidden,
                                        teacher_weight=teacher.lm_head.weight, labels=labels, ce_weight=0.5,
                                        chunk_size=5)
        else:
            loss = ns["kd"](net, ids, th, tw, labels, reduction="sum" if reduction == "sum" else "mean")
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in net.named_parameters()}
    finally:
        torch.set_default_dtype(default)


def _same_grads(got, ref, scale=1.0):
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name] * scale, ref[name], rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_ddp_mean_with_equal_counts_equals_one_process(runs):
    """reduction="mean", each rank with 9 counted tokens of 12: the ranks' mean loss and DDP's
    averaged gradients are the whole batch's."""
    got = runs["ddp-mean"]
    loss, grads = _reference("ddp-mean")
    assert not torch.allclose(got["losses"][0], got["losses"][1])  # each rank its own tokens
    torch.testing.assert_close(got["losses"].mean(), loss, rtol=1e-12, atol=0)
    _same_grads(got["grads"], grads)


def test_ddp_sum_times_world_size_equals_one_process(runs):
    """reduction="sum" (counts 10 and 7): the ranks' sums add up to the whole batch's, and DDP's
    average times the world size is its gradient."""
    got = runs["ddp-sum"]
    loss, grads = _reference("ddp-sum")
    torch.testing.assert_close(got["losses"].sum(), loss, rtol=1e-12, atol=0)
    _same_grads(got["grads"], grads, scale=WORLD)


def test_ddp_unequal_counts_mean_of_means_differs_and_the_global_mean_recipe_is_exact(runs):
    """With 11 and 5 counted tokens, DDP's average of per-rank means is not the whole batch's mean
    (the caveat of docs/lm.md §3); the sum times world size / global count is, exactly."""
    _, grads = _reference("ddp-unequal-mean")
    naive = runs["ddp-unequal-mean"]["grads"]
    assert not torch.allclose(naive["lm_head.weight"], grads["lm_head.weight"], rtol=1e-3, atol=0)
    got = runs["ddp-unequal-global-mean"]
    loss, _ = _reference("ddp-unequal-global-mean")
    torch.testing.assert_close(got["losses"].mean(), loss, rtol=1e-12, atol=0)
    _same_grads(got["grads"], grads)


@pytest.mark.parametrize("case, weight_type, local_rows", [
    ("fsdp-head-in-root", "Parameter", 64),        # the root keeps its parameters unsharded after forward
    ("fsdp-root-resharded", "DTensor", 32),         # reshard_after_forward=True: the sharded head
    ("fsdp-head-own-group", "DTensor", 32),         # its own group, never run: sharded (63 rows: 32 + 31)
])
def test_fsdp2_head_read_outside_its_forward_gives_one_process_gradients(runs, case, weight_type, local_rows):
    """fully_shard on the body and the root: the loss called on ``model.lm_head.weight`` after the
    model's forward gives the whole batch's loss and, gathered, its gradients, whether the head is
    the unsharded parameter or the sharded DTensor there."""
    got = runs[case]
    assert got["info"] == {"weight": weight_type, "local_rows": local_rows}
    loss, grads = _reference(case)
    torch.testing.assert_close(got["losses"].mean(), loss, rtol=1e-12, atol=0)
    _same_grads(got["grads"], grads)


def test_fsdp2_sharded_frozen_teacher(runs):
    """A frozen teacher sharded by fully_shard too: its head is a DTensor, gathered without a gradient."""
    got = runs["fsdp-sharded-teacher"]
    assert got["info"]["teacher_weight"] == "DTensor"
    loss, grads = _reference("fsdp-sharded-teacher")
    torch.testing.assert_close(got["losses"].mean(), loss, rtol=1e-12, atol=0)
    _same_grads(got["grads"], grads)


def test_fsdp2_loss_inside_the_wrapped_forward(runs):
    """The loss computed in the root module's own forward, where FSDP2 has unsharded the head."""
    got = runs["fsdp-loss-inside-forward"]
    loss, grads = _reference("fsdp-loss-inside-forward")
    torch.testing.assert_close(got["losses"].mean(), loss, rtol=1e-12, atol=0)
    _same_grads(got["grads"], grads)
