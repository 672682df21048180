"""The README quickstart's learning rate: the loop as written (SGD with momentum 0.9, ``MLKDLoss``),
20 steps on one fixed batch of 64 images, for each lr, in several setups:

- ResNet-18 from a ResNet-18-sized random teacher at 32 pixels, 100 classes, seeds 0 and 1;
- the same at 112 pixels and 1000 classes;
- a confident teacher: its logits times 8, as a trained teacher's are sharper than a random one's;
- a small CNN pair (widths 16-32-64 from 32-64-128).

A step "rises" when its loss exceeds the previous one's by more than 5 %. ``largest_stable_lr`` is
the largest lr with no rise in any setup; the recommended one is the next smaller lr of the grid, a
margin against what the curves do not cover (other seeds and thread counts move them a little, and
the largest stable lr sits next to one that is not). Writes the curves and both lrs as JSON
(``--out``; nothing is written without it).
    python benchmarks/quickstart_lr.py --out benchmarks/results/quickstart_lr.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch

import mlkd_fast
from mlkd_fast.train.models import SmallCNN, build_model

LRS = (0.1, 0.05, 0.02, 0.01)
STEPS = 20


def setups() -> dict[str, dict]:
    resnet = dict(make=lambda c: build_model("resnet18", c), dims=(512, 512))
    cnn = dict(make=lambda c: SmallCNN((16, 32, 64), c, in_channels=3), dims=(64, 128),
               teacher=lambda c: SmallCNN((32, 64, 128), c, in_channels=3))
    return {"resnet18-32px-100cls-seed0": dict(resnet, size=32, classes=100, seed=0, scale=1.0),
            "resnet18-32px-100cls-seed1": dict(resnet, size=32, classes=100, seed=1, scale=1.0),
            "resnet18-112px-1000cls": dict(resnet, size=112, classes=1000, seed=0, scale=1.0),
            "resnet18-confident-teacher": dict(resnet, size=32, classes=100, seed=0, scale=8.0),
            "small-cnn-pair": dict(cnn, size=32, classes=100, seed=0, scale=1.0)}


def curve(setup: dict, lr: float) -> list[float]:
    gen = torch.Generator().manual_seed(setup["seed"])
    x = torch.randn(64, 3, setup["size"], setup["size"], generator=gen)
    y = torch.randint(0, setup["classes"], (64,), generator=gen)
    torch.manual_seed(1000 + setup["seed"])
    teacher = setup.get("teacher", setup["make"])(setup["classes"]).eval()
    torch.manual_seed(setup["seed"])
    student = setup["make"](setup["classes"])
    loss_fn = mlkd_fast.MLKDLoss(*setup["dims"])
    opt = torch.optim.SGD(list(student.parameters()) + list(loss_fn.parameters()), lr=lr, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        with torch.no_grad():
            t_logits, t_feats = teacher(x)
        s_logits, s_feats = student(x)
        loss = loss_fn(s_logits, t_logits * setup["scale"], s_feats, t_feats, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def rises(losses: list[float]) -> list[int]:
    """The steps (1-based) whose loss is more than 5 % above the previous step's."""
    return [i + 1 for i in range(1, len(losses)) if losses[i] > 1.05 * losses[i - 1]]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON to write (default: print only)")
    args = p.parse_args(argv)
    table = {}
    for name, setup in setups().items():
        table[name] = {}
        for lr in LRS:
            losses = curve(setup, lr)
            table[name][str(lr)] = {"losses": [round(v, 4) for v in losses], "rises": rises(losses),
                                    "max_over_first": round(max(losses) / losses[0], 3)}
            print(f"{name:28s} lr {lr:<5} {losses[0]:.2f} -> {losses[-1]:.2f}  rises at {rises(losses)}", flush=True)
    stable = [lr for lr in LRS if all(not table[n][str(lr)]["rises"] for n in table)]
    largest = max(stable) if stable else None
    smaller = [lr for lr in LRS if largest is not None and lr < largest]
    result = {"what": "loss of the README quickstart loop over 20 steps on one fixed batch of 64, per lr",
              "largest_stable_lr": largest, "recommended_lr": max(smaller) if smaller else largest, "setups": table,
              "versions": {"torch": torch.__version__, "mlkd_fast": mlkd_fast.__version__,
                           "python": platform.python_version()},
              "command": "python benchmarks/quickstart_lr.py" + (f" --out {args.out}" if args.out else "")}
    print(f"largest stable lr: {result['largest_stable_lr']}, recommended: {result['recommended_lr']}")
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
        os.replace(args.out + ".tmp", args.out)
    return result


if __name__ == "__main__":
    main()
