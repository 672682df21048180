"""Helpers shared by the test files: the backend matrix, error measures, dtype tables and the
property-test machinery. Import them as ``from helpers import ...``: tests/ is on sys.path (pytest's
default rootdir-relative ``prepend`` import of the test files, and tests/conftest.py puts it there
for any other import mode). Fixtures live in tests/conftest.py, not here.
"""
import os
from typing import Optional

import pytest
import torch

from mlkd_fast import backends, ops
from mlkd_fast.backends import backend_status

BACKENDS = backends.BACKENDS  # every registered backend, the reference ("torch") first
DEVICES = ("cpu", "cuda")
# the backends with fused kernels (custom ops) of their own, and the torch.ops namespace of those ops
FUSED_NAMESPACE = {"triton": ops.TRITON_NAMESPACE, "native": ops.NATIVE_NAMESPACE}
KERNEL_BACKENDS = tuple(FUSED_NAMESPACE)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
PRECISION = (F64, F32, F16, BF16)  # most to least precise
# student and teacher dtypes: each dtype alone, and mixed pairs (either side more precise)
DTYPE_PAIRS = [(d, d) for d in (F32, F16, BF16, F64)] + [
    (F32, F64), (F64, F32), (BF16, F32), (F32, BF16), (F16, F32), (F16, F64), (BF16, F64), (BF16, F16)]


def backend_device_id(pair) -> str:
    """Test id of a (backend, device) pair: 'native-cuda' (the GPU pass selects with -k cuda)."""
    return f"{pair[0]}-{pair[1]}"


def dtype_id(dtype) -> str:
    return str(dtype).replace("torch.", "")


def require_backend(backend: str, device: str) -> None:
    """Skip (with the reason) when a backend cannot run on a device here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the CPU twin of this test runs on CPU)")
    status = backend_status(backend, device)
    if not status:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {status.reason}")


def fused_ops(backend: str):
    """The torch.ops namespace of a kernel backend's custom ops (torch.ops.mlkd_fast, ...triton)."""
    return getattr(torch.ops, FUSED_NAMESPACE[backend])


def namespace_ops(namespace: str) -> set[str]:
    """The names of the ops defined under a torch.ops namespace (its dispatcher entries)."""
    prefix = f"{namespace}::"
    return {n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest |ref| (0 where both are NaN), in fp64."""
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    same_nan = torch.isnan(x) & torch.isnan(ref)
    diff = torch.where(same_nan, torch.zeros_like(x), (x - ref).abs())
    return float(diff.max() / ref.abs().nan_to_num(0).max().clamp_min(1e-30))


def least_precise(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=PRECISION.index)


def math_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the ops compute (and return the loss) in: fp64 if any input is fp64, else fp32."""
    return F64 if F64 in dtypes else F32


def dtype_tolerances(loss_tol: dict, grad_tol: dict, dtypes, grad_dtype: torch.dtype) -> tuple[float, float]:
    """(loss tolerance, gradient tolerance) for inputs of ``dtypes`` and a gradient stored in
    ``grad_dtype``: by the math dtype and, with fp32 math, by the least precise input (fp16/bf16 dots
    and gradient operands)."""
    if F64 in dtypes:  # fp64 math: only the storage of the gradient rounds
        return loss_tol[F64], grad_tol[grad_dtype]
    low = least_precise(*dtypes)
    return loss_tol[low], max(grad_tol[low], grad_tol[grad_dtype])


def skip_interpreted_bf16_dots(backend: str, device: torch.device, *dtypes: torch.dtype) -> None:
    """The correlation's tl.dot on bf16 operands is wrong under the Triton interpreter (ENV.md); fp64
    anywhere takes the tiled path, whose matmuls are torch's: no tl.dot then."""
    if backend == "triton" and device.type == "cpu" and BF16 in dtypes and F64 not in dtypes:
        pytest.skip("tl.dot on bf16 operands is wrong under the Triton interpreter; bf16 dots are tested on GPU")


# ---------------------------------------------------------------------------------------------
# property-based tests (hypothesis): profiles, tolerance floors, layouts
# ---------------------------------------------------------------------------------------------
def hypothesis_profile():
    """The settings of the property tests: ``ci`` (default; few derandomized examples, so that they
    run in well under a minute on two cores: the Triton interpreter is slow, so its shapes stay
    small) or ``soak`` (many random examples), chosen by ``MLKD_FAST_HYPOTHESIS_PROFILE``:

        MLKD_FAST_HYPOTHESIS_PROFILE=soak python -m pytest tests/test_op_kd_kl.py tests/test_op_correlation.py -k property
    """
    from hypothesis import HealthCheck, settings

    common = dict(deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])
    settings.register_profile("ci", max_examples=20, derandomize=True, **common)
    settings.register_profile("soak", max_examples=300, **common)
    return settings.get_profile(os.environ.get("MLKD_FAST_HYPOTHESIS_PROFILE", "ci"))


def tolerance_floor(table: dict, dtypes, grad_dtype: Optional[torch.dtype] = None) -> float:
    """The floor of the allowed error for inputs of ``dtypes`` (fp64 anywhere: fp64 math, only the
    gradient's own storage rounds), by the least precise input and the gradient's storage dtype."""
    if F64 in dtypes:
        return table[F64] if grad_dtype is None else table[grad_dtype]
    low = least_precise(*dtypes)
    return table[low] if grad_dtype is None else max(table[low], table[grad_dtype])


def assert_close_to_reference(x, ref, baseline, floor, what, natural=1e-6, atol=0.0, rows=None):
    """x within max(floor, 10 * baseline error) of ref, relative to the largest |ref|, or to ``natural``
    (the op's own scale) where ref is smaller: a reference near 0 (P = Q) leaves only rounding."""
    tol = max(floor, 10 * rel_err(baseline, ref))
    if rows is not None:  # compare these rows only
        x, ref = x[rows], ref[rows]
    diff = (x.detach().cpu().double() - ref.detach().cpu().double()).abs()
    both_nan = torch.isnan(x.detach().cpu()) & torch.isnan(ref.detach().cpu())
    assert not (torch.isnan(diff) & ~both_nan).any(), f"{what}: NaN where the reference has none (or the reverse)"
    scale = max(ref.detach().abs().nan_to_num(0).max().item(), natural)
    err = float(diff[~both_nan].max()) if (~both_nan).any() else 0.0
    if err <= atol:
        return
    err /= scale
    assert err <= tol, f"{what}: error {err:.2e} > {tol:.1e}"


LAYOUTS = ("contiguous", "row_strided", "col_strided", "expanded")


def apply_layout(kind: str, x: torch.Tensor) -> torch.Tensor:
    """x (differentiably) as a non-contiguous view: row stride > width (last stride 1, no copy in the
    op), column stride 2 (copied by the op); or its first row expanded over the rows (row stride 0)."""
    if kind == "row_strided":
        return torch.nn.functional.pad(x, (1, 2))[:, 1:1 + x.shape[1]]
    if kind == "col_strided":
        return torch.stack([x, torch.zeros_like(x)], dim=-1).reshape(x.shape[0], 2 * x.shape[1])[:, ::2]
    if kind == "expanded":
        return x[:1].expand(x.shape[0], x.shape[1])
    return x


def make_image_folder(root, classes=("a", "b"), per_class=6, corrupt=0) -> None:
    """An ImageNet-style folder of random 40 x 36 PNGs: ``root/{train,val}/<class>/<i>.png``, plus
    ``corrupt`` undecodable ``broken<i>.jpg`` files in the first training class."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(root / split / c, exist_ok=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (40, 36, 3), generator=gen, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    for i in range(corrupt):
        (root / "train" / classes[0] / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")


def make_cifar_pickles(root, kind="cifar10", train_per_class=3, test_per_class=2, meta=True):
    """A tiny CIFAR dataset in the python-version layout, ``root/cifar-10-batches-py/`` (data_batch_1..5,
    test_batch, batches.meta) or ``root/cifar-100-python/`` (train, test, meta), each file a pickled dict
    with the real files' keys ("data": uint8 (n, 3072) rows in CHW order, "labels" or "fine_labels" and
    "coarse_labels", "filenames", "batch_label"; str keys, as torchvision's latin1 unpickling of the real
    Python 2 files gives them). Returns the batches folder."""
    import pickle

    import numpy as np

    classes = 10 if kind == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)

    def batch(labels, name):
        entry = {"batch_label": name, "data": rng.randint(0, 256, (len(labels), 3072)).astype(np.uint8),
                 "filenames": [f"img_{name}_{i}.png" for i in range(len(labels))]}
        if kind == "cifar10":
            entry["labels"] = list(labels)
        else:
            entry.update(fine_labels=list(labels), coarse_labels=[c // 5 for c in labels])
        return entry

    train = [c for _ in range(train_per_class) for c in range(classes)]
    test = [c for _ in range(test_per_class) for c in range(classes)]
    if kind == "cifar10":
        chunks = np.array_split(np.array(train), 5)
        files = {f"data_batch_{i + 1}": batch(chunk.tolist(), f"training batch {i + 1} of 5")
                 for i, chunk in enumerate(chunks)}
        files["test_batch"] = batch(test, "testing batch 1 of 1")
        if meta:
            files["batches.meta"] = {"label_names": [f"class{c}" for c in range(10)], "num_vis": 3072}
    else:
        files = {"train": batch(train, "train"), "test": batch(test, "test")}
        if meta:
            files["meta"] = {"fine_label_names": [f"fine{c}" for c in range(100)],
                             "coarse_label_names": [f"coarse{c}" for c in range(20)]}
    for name, entry in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return folder
