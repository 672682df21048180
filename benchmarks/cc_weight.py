"""How strongly to weight CC's paper formula so that it trains like RepDistiller's CC.

RepDistiller's CC runs (``-b 0.02``) weight its surrogate (``cc_repdistiller_loss``, consecutive
samples' products of |e_s - e_t|), not the paper's kernel-matrix formula (``cc_loss``). This script
measures, on the same embeddings, how the two compare, so that the paper formula's default weight
pushes the student as hard as RepDistiller's 0.02 does:

- along a RepDistiller-style run (``formula="repdistiller"``, weight 0.02) of the study's digits
  default (cnn-tiny student from a trained cnn-large teacher, 20 images per class, batch 16), at
  every step, the ratio of the two terms' gradient norms with respect to the student's embedding
  (``0.02 |d surrogate / d e_s| / |d paper / d e_s|``: the weight that gives the paper term the same
  push) and of their values;
- at initialisation, on random ReLU features of ResNet widths (512 -> 128, 2048 -> 128, batch 64).

Writes a JSON with the medians and quartiles (``--out``; nothing is written without it).
    python benchmarks/cc_weight.py --out benchmarks/results/cc_weight.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile

import torch

import mlkd_fast
from mlkd_fast import methods as M
from mlkd_fast.methods._common import Embed
from mlkd_fast.methods.cc import CC_REPDISTILLER_WEIGHT, cc_loss, cc_repdistiller_loss
from mlkd_fast.train import data as D
from mlkd_fast.train import main as train_main
from mlkd_fast.train.models import build_model


def _grad_norm(loss: torch.Tensor, e_s: torch.Tensor) -> float:
    (g,) = torch.autograd.grad(loss, e_s, retain_graph=True)
    return float(g.norm())


def quartiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "n": len(values)}


def digits_run(seed: int, epochs: int, work: str) -> dict[str, list[float]]:
    teacher_dir = os.path.join(work, f"teacher{seed}")
    train_main(["--method", M.baseline(), "--arch", "cnn-large", "--teacher-epochs", "0", "--epochs", str(epochs),
                "--train-per-class", "20", "--batch-size", "16", "--seed", str(seed), "--quiet", "--out", teacher_dir])
    teacher = build_model("cnn-large", 10, os.path.join(teacher_dir, "student.pt"))
    torch.manual_seed(seed)
    student = build_model("cnn-tiny", 10)
    distill = M.Distillation(student, teacher, "cc", input_shape=(1, 8, 8), formula="repdistiller")
    opt = torch.optim.SGD(distill.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y, _, _ = D.load_digits_split(seed=seed, train_per_class=20)
    source = D.TensorSource(x, y, D.Shard(16), seed, torch.device("cpu"))
    grad_ratio, value_ratio = [], []
    for epoch in range(epochs):
        for xb, yb in source.epoch(epoch):
            s_out = distill._student_run(xb)
            with torch.no_grad():
                t_out = distill._teacher_run(xb)
            d = distill.distiller
            e_s, e_t = d.embed_s(s_out.feats), d.embed_t(t_out.feats)
            surrogate, paper = cc_repdistiller_loss(e_s, e_t), cc_loss(e_s, e_t)
            g_paper = _grad_norm(paper, e_s)
            if g_paper > 0:
                grad_ratio.append(CC_REPDISTILLER_WEIGHT * _grad_norm(surrogate, e_s) / g_paper)
                value_ratio.append(CC_REPDISTILLER_WEIGHT * float(surrogate.detach()) / float(paper.detach()))
            loss = d.w_ce * torch.nn.functional.cross_entropy(s_out.logits, yb) + CC_REPDISTILLER_WEIGHT * surrogate
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {"grad": grad_ratio, "value": value_ratio}


def random_features(trials: int) -> dict[str, dict[str, list[float]]]:
    out = {}
    gen = torch.Generator().manual_seed(0)
    for d_s, d_t in ((512, 512), (512, 2048)):
        grads, values = [], []
        for _ in range(trials):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            embed_s, embed_t = Embed(d_s, 128), M.cc.Embed(d_t, 128)
            e_s = embed_s(torch.relu(torch.randn(64, d_s, generator=gen)))
            e_t = embed_t(torch.relu(torch.randn(64, d_t, generator=gen))).detach()
            surrogate, paper = cc_repdistiller_loss(e_s, e_t), cc_loss(e_s, e_t)
            grads.append(CC_REPDISTILLER_WEIGHT * _grad_norm(surrogate, e_s) / _grad_norm(paper, e_s))
            values.append(CC_REPDISTILLER_WEIGHT * float(surrogate.detach()) / float(paper.detach()))
        out[f"{d_s}->{d_t}"] = {"grad": grads, "value": values}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON to write (default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as work:
        runs = [digits_run(seed, args.epochs, work) for seed in args.seeds]
    digits = {k: quartiles([v for r in runs for v in r[k]]) for k in ("grad", "value")}
    rand = {shape: {k: quartiles(v) for k, v in r.items()} for shape, r in random_features(args.trials).items()}
    result = {"what": "weight of cc_loss matching RepDistiller's 0.02 x cc_repdistiller_loss: ratio of gradient norms "
                      "w.r.t. the student embedding ('grad') and of values ('value')",
              "digits": {"protocol": f"cnn-tiny from cnn-large, 20 images per class, batch 16, {args.epochs} epochs, "
                                     f"seeds {args.seeds}, trained with formula='repdistiller' (weight 0.02)",
                         **digits},
              "random_features_at_init": rand,
              "versions": {"torch": torch.__version__, "mlkd_fast": mlkd_fast.__version__,
                           "python": platform.python_version()}}
    text = json.dumps(result, indent=1) + "\n"
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    return result


if __name__ == "__main__":
    main()
