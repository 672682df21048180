"""Distilling a small code model on the Python standard library's own source: one offline command
(``python -m mlkd_fast.lm.demo``), the study of issue #34, deliverable 3.

The protocol, in the order it runs (every stage resumable: its result is written atomically and a
re-run skips it):

1. Corpus. The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (sorted by relative path;
   any path through ``test/``, ``tests/``, ``idle_test/``, ``site-packages/`` or ``__pycache__``
   excluded; files between ``min_file_bytes`` and ``max_file_bytes`` only). Each file goes to one
   split by the SHA-256 of its relative path (80 % train, 10 % validation, 10 % test), and within a
   split the files are taken in the order of that hash until the split's byte budget is full: a
   fixed, deterministic subset. The validation split chooses everything chosen; the test split gives
   the reported perplexity. The corpus differs between Python versions (the standard library
   changes): the results record the version and the SHA-256 of the selected files.
2. Tokenizer: byte-level BPE (``tokenizers``, offline) trained on the train split only; each file's
   tokens end with ``<|endoftext|>``; a split's token stream is cut into non-overlapping sequences of
   ``seq_len`` tokens (the remainder dropped).
3. Teacher: a ``transformers`` Llama model built from a local ``LlamaConfig`` (no download), trained
   with CE for a fixed number of steps, saved with ``save_pretrained``.
4. Students (a smaller Llama, the same tokenizer), each the same number of steps and tokens:
   ``ce`` (CE only), ``kd_fkl`` (live teacher, forward KL), ``kd_jsd`` (live teacher, TRL's
   generalised JSD with beta 0.5), ``kd_topk`` (forward KL from a top-k cache of the teacher,
   tail bucket). Every loss is :func:`mlkd_fast.linear_kd_loss` on the base model's last hidden
   state and ``lm_head`` (the logits are never formed); a KD arm's loss is
   ``alpha * T^2 * D + (1 - alpha) * CE``. Choice on the validation split, same budget for every arm:
   CE's learning rate from ``ce_lrs``; then each KD arm's ``(alpha, T)`` from ``kd_grid`` (as many
   points as CE's grid) at CE's chosen learning rate. The choice runs use the first seed and are
   reused as that seed's table runs (the test split takes no part in any choice).
5. Seeds: every arm at its chosen setting for ``seeds``; a seed fixes the student's initialisation
   and the batch order, identical across arms (paired). Test perplexity per arm with a 95 % t
   interval over seeds; the paired difference to CE per seed with its 95 % CI and paired t-test,
   p-values Holm-corrected over the KD arms (``benchmarks/study_stats.py``). The claims are
   generated from those statistics only.
6. Throughput and peak memory per training step (student fwd+bwd+AdamW with a live teacher,
   forward KL + CE, 0.5 / 0.5): the fused loop against the same loop with Hugging Face's default
   materialised logits (``model(input_ids, labels=...)`` and an eager KL of the materialised teacher
   and student logits), each in its own child process (``--quick``: one per loop, the shapes in turn),
   at the demo's shapes and at a larger
   vocabulary and sequence where the logits dominate. Peak memory: the child's resident-set
   high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after the models and batch are
   built, and again after the first step) minus its resident set before the first step: what the
   steady steps add (the first step, allocator warm-up and any one-off compile, reported apart). The
   median time of the steps after the first. Both loops' first-step losses are recorded: they are the
   same loss. One measurement each, on a shared machine: no interval.
7. The cache: bytes per token on disk, and the KL between the teacher's full distribution and its
   top-k reconstruction for k in ``topk_ks`` on the validation split.

Sizes (:data:`FULL`, chosen from a pilot's per-step times): files of 2-60 kB, 1.2 MB of train files
and 150 kB each of validation and test files; vocab 2048; sequences of 128 tokens, batch 8; teacher
4 layers x 256 for 600 steps; students 2 layers x 128 for 300 steps (307k tokens); grids of 3 points;
seeds 0, 1, 2; k = 32. On the shared 2-core machine (load average 5-9 from other jobs, one torch
thread) the pilot and the first full run took 0.7-1.1 s a teacher step, 0.07-0.15 s a CE student
step, 0.22-0.42 s a live-teacher step and 0.10-0.13 s a cached-teacher step: the first full run
took 31 minutes (the teacher 7). ``--quick`` (:data:`QUICK`) is about a minute.

Threads: ``--threads`` (default 1). On the shared 2-core machine of the pilot two torch threads spun
against the other jobs and ran 5-20x slower per step than one.

Where it writes: the work (tokenizer, teacher, cache, one JSON per run) under ``--work`` (default
``runs/lm_stdlib/`` or ``runs/lm_stdlib_quick/``); the results ``lm_stdlib.json`` and ``lm_stdlib.md``
into ``--out`` (default: the work folder). Committed results change only with an explicit
``--out benchmarks/results`` (refused with ``--quick``); that also rewrites docs/lm.md's marked
section, which ``--docs`` can name or disable (``''``).
``--report`` only regenerates the markdown and sections from the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from .._hashing import file_sha256
from ..linear_kd import linear_kd_loss

NAME = "lm_stdlib"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COMMITTED = os.path.join(ROOT, "benchmarks", "results")
START, END = "<!-- lm-demo:start -->", "<!-- lm-demo:end -->"
EOS = "<|endoftext|>"
EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "__pycache__")
ARMS = ("ce", "kd_fkl", "kd_jsd", "kd_topk")
KD_ARMS = ARMS[1:]
ARM_TEXT = {"ce": "CE only", "kd_fkl": "live teacher, forward KL", "kd_jsd": "live teacher, JSD (beta 0.5)",
            "kd_topk": "top-k cache, forward KL"}


@dataclass(frozen=True)
class Protocol:
    """Every size of the study (its fingerprint guards a work folder against a changed protocol)."""
    min_file_bytes: int = 2_000
    max_file_bytes: int = 60_000
    train_bytes: int = 1_200_000
    val_bytes: int = 150_000
    test_bytes: int = 150_000
    vocab: int = 2048
    seq_len: int = 128
    batch: int = 8
    teacher_layers: int = 4
    teacher_hidden: int = 256
    teacher_heads: int = 4
    teacher_steps: int = 600
    teacher_lr: float = 3e-3
    student_layers: int = 2
    student_hidden: int = 128
    student_heads: int = 4
    student_steps: int = 300
    ce_lrs: tuple = (1e-3, 3e-3, 1e-2)  # as many points as kd_grid: the same choice budget
    kd_grid: tuple = ((0.5, 1.0), (1.0, 1.0), (0.5, 2.0))  # (alpha, T)
    jsd_beta: float = 0.5
    topk: int = 32
    topk_ks: tuple = (1, 8, 32, 64, 128)
    seeds: tuple = (0, 1, 2)
    bench_steps: int = 4
    bench_large: tuple = (32000, 512, 4)  # (vocab, seq_len, batch) where the logits dominate
    eval_batch: int = 8
    bench_isolated: bool = True  # one child process per (shape, loop); False: one per loop, shapes in turn

    def fingerprint(self) -> str:
        """What the runs depend on (how the throughput children are grouped is not part of it)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "bench_isolated"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


FULL = Protocol()
QUICK = Protocol(min_file_bytes=2_000, max_file_bytes=20_000, train_bytes=120_000, val_bytes=20_000,
                 test_bytes=20_000, vocab=384, seq_len=64, batch=8, teacher_layers=2, teacher_hidden=64,
                 teacher_heads=2, teacher_steps=40, student_layers=1, student_hidden=32, student_heads=2,
                 student_steps=16, ce_lrs=(3e-3, 1e-2), kd_grid=((0.5, 1.0), (1.0, 1.0)), topk=16,
                 topk_ks=(1, 8, 32, 64, 128), seeds=(0, 1), bench_steps=2, bench_large=(4096, 128, 2),
                 eval_batch=32, bench_isolated=False)


# ---------------------------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------------------------
def _atomic_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)




def _stats_module():
    """benchmarks/study_stats.py (the KD-beyond-compression study's paired statistics), by path."""
    path = os.path.join(ROOT, "benchmarks", "study_stats.py")
    if not os.path.exists(path):
        raise SystemExit(f"error: the statistics need {path} (a checkout of the repository)")
    spec = importlib.util.spec_from_file_location("_mlkd_study_stats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _need_lm_extra() -> None:
    missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"error: the demo needs {', '.join(missing)}: pip install 'mlkd_fast[lm]'")


# ---------------------------------------------------------------------------------------------
# 1. the corpus
# ---------------------------------------------------------------------------------------------
def _key(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def split_of(rel: str) -> str:
    """train / validation / test by the SHA-256 of the file's relative path (80 / 10 / 10)."""
    bucket = int(_key(rel)[:8], 16) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def stdlib_files(root: str, min_bytes: int, max_bytes: int) -> list[tuple[str, int]]:
    """(relative path, size) of the standard library's .py files in the size window, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if any(part in EXCLUDED_DIRS for part in rel.split("/")[:-1]):
                continue
            size = os.path.getsize(path)
            if min_bytes <= size <= max_bytes:
                found.append((rel, size))
    return sorted(found)


def load_corpus(p: Protocol, root: Optional[str] = None) -> dict:
    """The three splits' texts and the corpus record (files, bytes, SHA-256)."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root, p.min_file_bytes, p.max_file_bytes)
    if not files:
        raise SystemExit(f"error: no .py files of {p.min_file_bytes}-{p.max_file_bytes} bytes under {root}")
    budgets = {"train": p.train_bytes, "val": p.val_bytes, "test": p.test_bytes}
    chosen: dict[str, list[str]] = {s: [] for s in budgets}
    used = dict.fromkeys(budgets, 0)
    for rel, size in sorted(files, key=lambda fs: _key(fs[0])):
        s = split_of(rel)
        if used[s] + size <= budgets[s]:
            chosen[s].append(rel)
            used[s] += size
    texts, h = {}, hashlib.sha256()
    for s in ("train", "val", "test"):
        if not chosen[s]:
            raise SystemExit(f"error: the {s} split is empty (corpus budgets too small)")
        texts[s] = []
        for rel in chosen[s]:
            with open(os.path.join(root, rel), "rb") as f:
                data = f.read()
            h.update(f"{s}\0{rel}\0{len(data)}\0".encode())
            h.update(data)
            texts[s].append(data.decode("utf-8", errors="replace"))
    record = {"stdlib": root, "python": platform.python_version(), "sha256": h.hexdigest(),
              "files": {s: len(chosen[s]) for s in chosen}, "bytes": used, "candidates": len(files),
              "file_list": chosen,
              "note": "the standard library differs between Python versions: so do the corpus and its hash"}
    return {"texts": texts, "record": record}


# ---------------------------------------------------------------------------------------------
# 2. the tokenizer and the sequences
# ---------------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab: int, path: str) -> None:
    from tokenizers import ByteLevelBPETokenizer  # noqa: PLC0415 - the lm extra

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(list(texts), vocab_size=vocab, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    tmp = path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, path)


def load_tokenizer(path: str):
    from tokenizers import Tokenizer  # noqa: PLC0415

    return Tokenizer.from_file(path)


def encode_split(tok, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """(S, seq_len) int64: the files' tokens, each file ended by EOS, cut into whole sequences."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise SystemExit("error: a split has fewer tokens than one sequence")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


# ---------------------------------------------------------------------------------------------
# 3-4. models and the loss plumbing (mlkd_fast.lm.hf's helpers when they exist)
# ---------------------------------------------------------------------------------------------
def build_llama(vocab: int, layers: int, hidden: int, heads: int, seq_len: int, seed: int, eos_id: int = 0):
    """A Llama model from a local config (no download), initialised from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=(8 * hidden) // 3 // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=seq_len, tie_word_embeddings=False, bos_token_id=eos_id,
                         eos_token_id=eos_id, pad_token_id=None, rope_theta=10000.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def shift_labels(ids: torch.Tensor) -> torch.Tensor:
    """Label of position i = token i + 1, the last position -100 (as ``ForCausalLMLoss`` shifts)."""
    from .hf import shift_labels as hf_shift  # noqa: PLC0415

    return hf_shift(ids)


def hidden_of(model, ids: torch.Tensor) -> torch.Tensor:
    """The base model's last hidden state (after the final norm): the logits are never computed."""
    from .hf import head_of  # noqa: PLC0415

    return head_of(model).base(input_ids=ids).last_hidden_state


def head_kwargs(model, side: str) -> dict:
    """``{side}_weight`` / ``_bias`` / ``_softcap`` / ``_logit_scale`` of the model's lm_head
    (:func:`mlkd_fast.lm.hf.head_of`)."""
    from .hf import head_of  # noqa: PLC0415

    head = head_of(model)
    return {f"{side}_weight": head.weight, f"{side}_bias": head.bias, f"{side}_softcap": head.softcap,
            f"{side}_logit_scale": head.logit_scale}


def _schedule(step: int, steps: int) -> float:
    """Linear warm-up over 5 % of the steps, then cosine to 10 % of the peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def batch_order(n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch) sequence indices: epochs of a seeded permutation (the same for every arm)."""
    g = torch.Generator().manual_seed(10_007 + seed)
    need, parts = steps * batch, []
    while sum(len(q) for q in parts) < need:
        parts.append(torch.randperm(n, generator=g))
    return torch.cat(parts)[:need].view(steps, batch)


@torch.no_grad()
def evaluate(model, seqs: torch.Tensor, batch: int) -> dict:
    """Mean next-token CE (nats) and perplexity over every predicted token of the sequences."""
    model.eval()
    total, count = 0.0, 0
    head = head_kwargs(model, "student")
    weight = head.pop("student_weight")
    for i in range(0, len(seqs), batch):
        x = seqs[i:i + batch]
        labels = shift_labels(x)
        loss = linear_kd_loss(hidden_of(model, x), weight, **head, labels=labels, kd_weight=0.0, ce_weight=1.0,
                              reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    model.train()
    return {"loss": total / count, "ppl": math.exp(total / count), "tokens": count}


def train_model(model, seqs: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int, arm: str = "ce",
                alpha: float = 0.0, temperature: float = 1.0, beta: float = 0.5, teacher=None,
                topk: Optional[dict] = None, log_every: int = 0, label: str = "") -> dict:
    """AdamW (0.9, 0.95, wd 0.01), grad-norm clip 1, warm-up + cosine; the loss of the arm."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps))
    order = batch_order(len(seqs), batch, steps, seed)
    if teacher is not None:
        t_head = head_kwargs(teacher, "teacher")
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        idx = order[step]
        x = seqs[idx]
        labels = shift_labels(x)
        head = head_kwargs(model, "student")
        weight = head.pop("student_weight")
        h = hidden_of(model, x)
        if arm == "ce":
            loss = linear_kd_loss(h, weight, **head, labels=labels, kd_weight=0.0, ce_weight=1.0)
        elif arm in ("kd_fkl", "kd_jsd"):
            with torch.no_grad():
                th = hidden_of(teacher, x)
            loss = linear_kd_loss(h, weight, **head, teacher_hidden=th, **t_head, labels=labels,
                                  divergence="forward_kl" if arm == "kd_fkl" else "jsd", beta=beta,
                                  temperature=temperature, kd_weight=alpha, ce_weight=1.0 - alpha)
        elif arm == "kd_topk":
            entries = topk_batch(topk, idx, x)
            loss = linear_kd_loss(h, weight, **head, teacher_topk=entries, labels=labels, divergence="forward_kl",
                                  temperature=temperature, kd_weight=alpha, ce_weight=1.0 - alpha)
        else:
            raise ValueError(arm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{label}: non-finite loss at step {step}")
        if log_every and (step + 1) % log_every == 0:
            _log(f"  {label} step {step + 1}/{steps} loss {statistics.fmean(losses[-log_every:]):.4f} "
                 f"({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "sec_per_step": seconds / steps, "final_loss": statistics.fmean(losses[-10:]),
            "tokens": steps * batch * seqs.shape[1]}


# ---------------------------------------------------------------------------------------------
# the top-k cache (mlkd_fast.lm.cache)
# ---------------------------------------------------------------------------------------------
def build_topk(teacher, seqs: torch.Tensor, k: int, cache_dir: str, tokenizer_path: str, batch: int):
    """Writes (or resumes) the teacher's top-k cache of the training sequences with
    :func:`mlkd_fast.lm.cache.write_lm_cache`, opens it, checks it against the teacher, tokenizer and
    sequences, and returns its dataset (item i = training sequence i) and a record of its size."""
    from .cache import LMCache, tokenizer_file_hash, write_lm_cache  # noqa: PLC0415

    teacher.eval()
    tok_hash = tokenizer_file_hash(tokenizer_path)
    write_lm_cache(teacher, seqs, cache_dir, k=k, batch_size=batch, tokenizer_hash=tok_hash, resume=True,
                   progress=False)
    cache = LMCache.open(cache_dir)
    cache.check(teacher_hash=teacher, tokenizer_hash=tok_hash, data_hash=seqs, seq_len=seqs.shape[1], k=k,
                vocab_size=teacher.config.vocab_size)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(cache_dir) for f in fs)
    shards = sum(f["bytes"] for f in cache.manifest["shards"]["files"])
    tokens = seqs.numel()
    record = {"source": "mlkd_fast.lm.cache", "k": k, "tokens": tokens, "bytes_on_disk": size,
              "bytes_per_token": shards / tokens, "bytes_per_entry": shards / (tokens * k),
              "bytes_per_token_with_manifest": size / tokens, "bits_per_id": cache.bits,
              "logprob_dtype": cache.manifest["logprob_dtype"]}
    return cache.dataset(), record


def topk_batch(dataset, idx: torch.Tensor, x: torch.Tensor) -> tuple:
    """The cached teacher entries of the sequences ``idx`` (checked to be ``x``)."""
    items = [dataset[int(i)] for i in idx]
    ids = torch.stack([torch.as_tensor(it["input_ids"]) for it in items])
    if not torch.equal(ids, x):
        raise RuntimeError("the cache's sequences are not the training sequences")
    return tuple(torch.stack([torch.as_tensor(it["teacher_topk"][j]) for it in items]).to(
        torch.int64 if j == 0 else torch.float32) for j in range(3))


def topk_reconstruction(teacher, seqs: torch.Tensor, ks: Sequence[int], batch: int) -> dict:
    """:func:`mlkd_fast.lm.cache.topk_reconstruction_kl` on ``seqs``: per k, the mean KL between the
    teacher's full distribution and its top-k reconstruction (rest mass spread evenly)."""
    from .cache import topk_reconstruction_kl  # noqa: PLC0415

    teacher.eval()
    ks = [k for k in ks if k <= teacher.config.vocab_size]
    out = topk_reconstruction_kl(teacher, seqs, ks=tuple(ks), batch_size=batch)
    out = json.loads(json.dumps(out))  # int keys as JSON strings, as the file will hold them
    out["source"] = "mlkd_fast.lm.cache.topk_reconstruction_kl (rest mass spread evenly over the other ids)"
    return out


# ---------------------------------------------------------------------------------------------
# 6. throughput and memory per step, in a child process per (shape, loop)
# ---------------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return -1


def bench_child(spec: dict) -> dict:
    """One (shape, loop) measurement; runs in its own process (``--_bench``)."""
    torch.manual_seed(0)
    vocab, seq_len, batch = spec["vocab"], spec["seq_len"], spec["batch"]
    student = build_llama(vocab, spec["student_layers"], spec["student_hidden"], spec["student_heads"], seq_len, 1)
    teacher = build_llama(vocab, spec["teacher_layers"], spec["teacher_hidden"], spec["teacher_heads"], seq_len, 2)
    teacher.eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, vocab, (batch, seq_len), generator=g) for _ in range(spec["steps"])]
    fused = spec["loop"] == "fused"
    t_head = head_kwargs(teacher, "teacher")

    def step(x):
        if fused:
            labels = shift_labels(x)
            head = head_kwargs(student, "student")
            w = head.pop("student_weight")
            with torch.no_grad():
                th = hidden_of(teacher, x)
            loss = linear_kd_loss(hidden_of(student, x), w, **head, teacher_hidden=th, **t_head, labels=labels,
                                  kd_weight=0.5, ce_weight=0.5)
        else:
            out = student(input_ids=x, labels=x)
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits
            s = out.logits[:, :-1].float().log_softmax(-1)
            t = t_logits[:, :-1].float().log_softmax(-1)
            kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()
            loss = 0.5 * kl + 0.5 * out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    def reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    # the first step (allocator warm-up, any one-off compile) and the steady steps, each peak over the
    # resident set the process had before the first step
    rss0 = _status_kb("VmRSS")
    reset = reset_hwm()
    times, first_loss, first_hwm = [], None, None
    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        value = step(x)
        times.append(time.perf_counter() - t0)
        if i == 0:
            first_loss, first_hwm = value, _status_kb("VmHWM")
            reset = reset_hwm() and reset
    hwm = _status_kb("VmHWM")
    timed = times[1:] or times
    tokens = batch * seq_len
    return {"loop": spec["loop"], "shape": spec["shape"], "vocab": vocab, "seq_len": seq_len, "batch": batch,
            "tokens_per_step": tokens, "steps_timed": len(timed), "sec_per_step": statistics.median(timed),
            "first_step_sec": times[0], "tokens_per_s": tokens / statistics.median(timed),
            "first_step_loss": first_loss, "peak_rss_mb": max(hwm, first_hwm) / 1024, "rss_before_mb": rss0 / 1024,
            "peak_extra_mb": (hwm - rss0) / 1024, "first_step_peak_extra_mb": (first_hwm - rss0) / 1024,
            "hwm_reset": reset, "logits_mb_one_tensor": tokens * vocab * 4 / 2 ** 20,
            "threads": torch.get_num_threads()}


def run_bench(p: Protocol, work: str) -> list[dict]:
    shapes = [("demo", p.vocab, p.seq_len, p.batch), ("large", *p.bench_large)]
    specs = [{"shape": shape, "loop": loop, "vocab": vocab, "seq_len": seq_len, "batch": batch,
              "steps": p.bench_steps + 1, "student_layers": p.student_layers, "student_hidden": p.student_hidden,
              "student_heads": p.student_heads, "teacher_layers": p.teacher_layers,
              "teacher_hidden": p.teacher_hidden, "teacher_heads": p.teacher_heads}
             for loop in ("fused", "hf_materialised") for shape, vocab, seq_len, batch in shapes]
    path = lambda sp: os.path.join(work, "bench", f"{sp['shape']}_{sp['loop']}.json")  # noqa: E731
    groups = [[sp] for sp in specs] if p.bench_isolated else [[sp for sp in specs if sp["loop"] == loop]
                                                               for loop in ("fused", "hf_materialised")]
    for group in groups:
        todo = [sp for sp in group if _read_json(path(sp)) is None]
        if not todo:
            continue
        _log("throughput " + ", ".join(f"{sp['shape']} {sp['loop']} (V={sp['vocab']}, L={sp['seq_len']}, "
                                       f"B={sp['batch']})" for sp in todo))
        run = subprocess.run([sys.executable, "-m", "mlkd_fast.lm.demo", "--threads", str(torch.get_num_threads()),
                              "--_bench", json.dumps(todo)], capture_output=True, text=True, cwd=ROOT, timeout=3600)
        if run.returncode != 0:
            raise RuntimeError(f"throughput child failed:\n{run.stdout}\n{run.stderr}")
        for sp, row in zip(todo, json.loads(run.stdout.strip().splitlines()[-1])):
            row["load_avg_1m"] = round(os.getloadavg()[0], 2)
            row["own_process"] = len(todo) == 1
            _atomic_json(path(sp), row)
    return [_read_json(path(sp)) for sp in sorted(specs, key=lambda sp: (sp["shape"] != "demo", sp["loop"]))]


# ---------------------------------------------------------------------------------------------
# the study
# ---------------------------------------------------------------------------------------------
def _run_name(arm: str, lr: float, alpha: float, temperature: float, seed: int) -> str:
    return f"{arm}_lr{lr:g}_a{alpha:g}_T{temperature:g}_s{seed}"


class Study:
    def __init__(self, p: Protocol, work: str):
        self.p, self.work = p, work
        os.makedirs(work, exist_ok=True)
        stamp = os.path.join(work, "protocol.json")
        old = _read_json(stamp)
        if old is not None and old.get("fingerprint") != p.fingerprint():
            raise SystemExit(f"error: {work} holds runs of another protocol ({old.get('fingerprint')} != "
                             f"{p.fingerprint()}); pass another --work or remove it")
        _atomic_json(stamp, {"fingerprint": p.fingerprint(), "protocol": dataclasses.asdict(p)})

    # --- data, tokenizer, teacher ---
    def prepare(self) -> None:
        p = self.p
        corpus = load_corpus(p)
        self.corpus = corpus["record"]
        tok_path = os.path.join(self.work, "tokenizer.json")
        record_path = os.path.join(self.work, "corpus.json")
        old = _read_json(record_path)
        if old is not None and old["sha256"] != self.corpus["sha256"]:
            raise SystemExit(f"error: {self.work} was built from another corpus (Python "
                             f"{old['python']}); pass another --work")
        if not os.path.exists(tok_path):
            _log(f"tokenizer: BPE vocab {p.vocab} on {self.corpus['files']['train']} train files")
            train_tokenizer(corpus["texts"]["train"], p.vocab, tok_path)
        _atomic_json(record_path, self.corpus)
        self.tokenizer_hash = file_sha256(tok_path)
        tok = load_tokenizer(tok_path)
        self.vocab = tok.get_vocab_size()
        self.eos = tok.token_to_id(EOS)
        self.seqs = {s: encode_split(tok, corpus["texts"][s], p.seq_len) for s in ("train", "val", "test")}
        self.corpus["tokens"] = {s: int(v.numel()) for s, v in self.seqs.items()}
        self.corpus["sequences"] = {s: int(v.shape[0]) for s, v in self.seqs.items()}
        _log(f"corpus: Python {self.corpus['python']}, sha256 {self.corpus['sha256'][:12]}, files "
             f"{self.corpus['files']}, sequences {self.corpus['sequences']} of {p.seq_len} tokens")

    def teacher(self) -> None:
        from .hf import load_causal_lm  # noqa: PLC0415

        p = self.p
        folder = os.path.join(self.work, "teacher")
        record_path = os.path.join(self.work, "teacher.json")
        record = _read_json(record_path)
        if record is None:
            _log(f"teacher: {p.teacher_layers} layers, hidden {p.teacher_hidden}, {p.teacher_steps} steps")
            model = build_llama(self.vocab, p.teacher_layers, p.teacher_hidden, p.teacher_heads, p.seq_len, 12345,
                                self.eos)
            fit = train_model(model, self.seqs["train"], steps=p.teacher_steps, batch=p.batch, lr=p.teacher_lr,
                              seed=12345, log_every=max(1, p.teacher_steps // 10), label="teacher")
            tmp = folder + ".tmp"
            model.save_pretrained(tmp)
            if os.path.exists(folder):
                import shutil  # noqa: PLC0415

                shutil.rmtree(folder)
            os.replace(tmp, folder)
            weights = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") or f.endswith(".bin"))
            record = {**fit, "val": evaluate(model, self.seqs["val"], p.eval_batch),
                      "test": evaluate(model, self.seqs["test"], p.eval_batch),
                      "params": sum(t.numel() for t in model.parameters()),
                      "weights_sha256": file_sha256(os.path.join(folder, weights[0])) if weights else None,
                      "config": {k: model.config.to_dict()[k] for k in ("vocab_size", "hidden_size",
                                 "intermediate_size", "num_hidden_layers", "num_attention_heads")}}
            _atomic_json(record_path, record)
            _log(f"teacher: val ppl {record['val']['ppl']:.2f}, test ppl {record['test']['ppl']:.2f}")
        self.teacher_record = record
        self.teacher_model = load_causal_lm(folder).eval()
        self.teacher_model.requires_grad_(False)
        self._topk = None

    def topk_table(self) -> dict:
        if self._topk is None:
            p = self.p
            _log(f"top-k cache: k={p.topk} over {self.corpus['sequences']['train']} train sequences")
            self._topk, self.cache_record = build_topk(
                self.teacher_model, self.seqs["train"], p.topk, os.path.join(self.work, "cache"),
                os.path.join(self.work, "tokenizer.json"), p.eval_batch)
            _atomic_json(os.path.join(self.work, "cache_record.json"), self.cache_record)
        return self._topk

    # --- one student run ---
    def student(self, arm: str, lr: float, alpha: float, temperature: float, seed: int, stage: str) -> dict:
        p = self.p
        name = _run_name(arm, lr, alpha, temperature, seed)
        path = os.path.join(self.work, "runs", name + ".json")
        row = _read_json(path)
        if row is not None:
            return row
        _log(f"student {name} ({stage})")
        model = build_llama(self.vocab, p.student_layers, p.student_hidden, p.student_heads, p.seq_len, seed,
                            self.eos)
        fit = train_model(model, self.seqs["train"], steps=p.student_steps, batch=p.batch, lr=lr, seed=seed,
                          arm=arm, alpha=alpha, temperature=temperature, beta=p.jsd_beta,
                          teacher=self.teacher_model if arm in ("kd_fkl", "kd_jsd") else None,
                          topk=self.topk_table() if arm == "kd_topk" else None,
                          log_every=max(1, p.student_steps // 4), label=name)
        row = {"arm": arm, "lr": lr, "alpha": alpha, "temperature": temperature, "seed": seed, "stage": stage,
               **fit, "load_avg_1m": round(os.getloadavg()[0], 2),
               "val": evaluate(model, self.seqs["val"], p.eval_batch),
               "test": evaluate(model, self.seqs["test"], p.eval_batch)}
        _atomic_json(path, row)
        _log(f"  {name}: val ppl {row['val']['ppl']:.3f}, test ppl {row['test']['ppl']:.3f}, "
             f"{row['sec_per_step']:.2f} s/step")
        return row

    def run(self, bench: bool = True) -> dict:
        p = self.p
        self.prepare()
        self.teacher()
        s0 = p.seeds[0]
        grid = [self.student("ce", lr, 0.0, 1.0, s0, "choice") for lr in p.ce_lrs]
        ce_best = min(grid, key=lambda r: r["val"]["ppl"])
        lr = ce_best["lr"]
        selected = {"ce": {"lr": lr, "alpha": 0.0, "temperature": 1.0, "val_ppl": ce_best["val"]["ppl"]}}
        for arm in KD_ARMS:
            rows = [self.student(arm, lr, a, t, s0, "choice") for a, t in p.kd_grid]
            grid += rows
            best = min(rows, key=lambda r: r["val"]["ppl"])
            selected[arm] = {"lr": lr, "alpha": best["alpha"], "temperature": best["temperature"],
                             "val_ppl": best["val"]["ppl"]}
        table = []
        for seed in p.seeds:
            for arm in ARMS:
                c = selected[arm]
                table.append(self.student(arm, c["lr"], c["alpha"], c["temperature"], seed,
                                          "choice" if seed == s0 else "table"))
        self.topk_table()
        topk_path = os.path.join(self.work, "topk_kl.json")
        recon = _read_json(topk_path)
        if recon is None:
            _log(f"top-k reconstruction KL on the validation split, k in {list(p.topk_ks)}")
            recon = topk_reconstruction(self.teacher_model, self.seqs["val"], p.topk_ks, p.eval_batch)
            _atomic_json(topk_path, recon)
        throughput = run_bench(p, self.work) if bench else []
        return {"name": NAME, "protocol": dataclasses.asdict(p), "fingerprint": p.fingerprint(),
                "environment": _environment(), "corpus": {k: v for k, v in self.corpus.items() if k != "file_list"},
                "corpus_files": self.corpus["file_list"],
                "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab": self.vocab,
                              "sha256": self.tokenizer_hash},
                "teacher": self.teacher_record, "grid": grid, "selected": selected, "runs": table,
                "statistics": statistics_of(table, p.seeds), "cache": self.cache_record,
                "topk_reconstruction": recon, "throughput": throughput}


def _environment() -> dict:
    import tokenizers  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        commit = None
    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "commit": commit,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------------------------------------
# 5. statistics (benchmarks/study_stats.py)
# ---------------------------------------------------------------------------------------------
def statistics_of(rows: list[dict], seeds: Sequence[int]) -> dict:
    S = _stats_module()
    by = {(r["arm"], r["seed"]): r for r in rows}
    arms = {}
    for arm in ARMS:
        values = [by[(arm, s)]["test"]["ppl"] for s in seeds if (arm, s) in by]
        n = len(values)
        mean = statistics.fmean(values)
        half = S.t_quantile(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n) if n >= 2 else None
        arms[arm] = {"n": n, "test_ppl": values, "mean": mean, "ci_low": None if half is None else mean - half,
                     "ci_high": None if half is None else mean + half}
    diffs = {}
    for arm in KD_ARMS:
        d = [by[(arm, s)]["test"]["ppl"] - by[("ce", s)]["test"]["ppl"] for s in seeds
             if (arm, s) in by and ("ce", s) in by]
        diffs[arm] = {"differences": d, **S.paired_summary(d), "better_seeds": sum(x < 0 for x in d)}
        sd, n = diffs[arm]["sd"], len(d)
        if sd and n >= 2:
            # at the Holm level of the most stringent step (alpha / number of arms), 80 % power
            alpha = 0.05 / len(KD_ARMS)
            diffs[arm]["detectable_at_n"] = S.detectable_difference(sd, n, alpha=alpha)
            diffs[arm]["seeds_for_observed"] = S.seeds_for(sd, abs(diffs[arm]["mean"]), alpha=alpha, least=n) \
                if diffs[arm]["mean"] else None
    adjusted = S.holm([diffs[a]["p"] for a in KD_ARMS])
    for arm, p_holm in zip(KD_ARMS, adjusted):
        diffs[arm]["p_holm"] = p_holm
        diffs[arm]["significant"] = p_holm is not None and p_holm < 0.05
    return {"value": "test perplexity", "arms": arms, "vs_ce": diffs, "alpha": 0.05,
            "correction": "Holm over the KD arms", "ci": "95 % Student t over seeds (paired for differences)"}


# ---------------------------------------------------------------------------------------------
# the report (a pure function of the JSON)
# ---------------------------------------------------------------------------------------------
def _f(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _p(x: Optional[float]) -> str:
    return "n/a" if x is None else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def _setting(sel: dict, arm: str) -> str:
    if arm == "ce":
        return f"lr {sel['lr']:g}"
    return f"lr {sel['lr']:g}, alpha {sel['alpha']:g}, T {sel['temperature']:g}"


def _grid_label(r: dict) -> str:
    return f"lr {r['lr']:g}" if r["arm"] == "ce" else f"alpha {r['alpha']:g}, T {r['temperature']:g}"


def markdown(result: dict) -> str:
    p, st, corpus, env = result["protocol"], result["statistics"], result["corpus"], result["environment"]
    teacher = result["teacher"]
    lines = [
        f"Corpus: {sum(corpus['files'].values())} files of the Python {corpus['python']} standard library "
        f"(train / validation / test {corpus['files']['train']} / {corpus['files']['val']} / "
        f"{corpus['files']['test']} files, {corpus['tokens']['train']:,} / {corpus['tokens']['val']:,} / "
        f"{corpus['tokens']['test']:,} tokens; sha256 `{corpus['sha256'][:16]}`; another Python version gives "
        f"another corpus). Byte-level BPE, vocab {result['tokenizer']['vocab']}; sequences of {p['seq_len']} "
        f"tokens, batch {p['batch']}.",
        f"Teacher: Llama {p['teacher_layers']} layers x {p['teacher_hidden']} ({teacher['params']:,} parameters), "
        f"{p['teacher_steps']} steps of CE: test perplexity {teacher['test']['ppl']:.2f}. Students: Llama "
        f"{p['student_layers']} layers x {p['student_hidden']}, {p['student_steps']} steps each "
        f"({p['student_steps'] * p['batch'] * p['seq_len']:,} tokens), {len(p['seeds'])} seeds (paired: same "
        f"initialisation and batch order per seed).",
        "",
        "| student | chosen on validation | validation ppl (choice run) | test perplexity (95 % CI) | "
        "vs CE (95 % CI) | p | p (Holm) | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        a, sel = st["arms"][arm], result["selected"][arm]
        ci = f"{a['mean']:.3f} ({_f(a['ci_low'], 3)}, {_f(a['ci_high'], 3)})"
        speed = statistics.fmean(r["sec_per_step"] for r in result["runs"] if r["arm"] == arm)
        first = f"| {ARM_TEXT[arm]} | {_setting(sel, arm)} | {sel['val_ppl']:.3f} | {ci} | "
        if arm == "ce":
            lines.append(first + f" | | | {speed:.2f} |")
        else:
            d = st["vs_ce"][arm]
            lines.append(first + f"{d['mean']:+.3f} ({_f(d['ci_low'], 3)}, {_f(d['ci_high'], 3)}) | {_p(d['p'])} | "
                         f"{_p(d['p_holm'])} | {speed:.2f} |")
    lines += ["", "The validation perplexity of every choice run (first seed):", "",
              "| student | " + " | ".join(_grid_label(r) for r in result["grid"] if r["arm"] == "ce") + " |",
              "|---|" + "---|" * sum(r["arm"] == "ce" for r in result["grid"])]
    lines.append("| CE only | " + " | ".join(f"{r['val']['ppl']:.3f}" for r in result["grid"] if r["arm"] == "ce")
                 + " |")
    kd_rows = [r for r in result["grid"] if r["arm"] != "ce"]
    labels = list(dict.fromkeys(_grid_label(r) for r in kd_rows))
    lines += ["", "| student | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for arm in KD_ARMS:
        vals = {_grid_label(r): r["val"]["ppl"] for r in kd_rows if r["arm"] == arm}
        lines.append(f"| {ARM_TEXT[arm]} | " + " | ".join(_f(vals.get(lab), 3) for lab in labels) + " |")
    cache, recon = result["cache"], result["topk_reconstruction"]
    kl = sorted(((int(k), v) for k, v in recon["kl"].items()))
    lines += ["", f"Top-k cache (k = {cache['k']}): {cache['bytes_per_token']:.1f} bytes per token "
              f"({cache['bytes_per_entry']:.2f} per stored entry; {cache['source']}). KL(teacher || top-k "
              f"reconstruction) per token on the validation split ({recon['source']}):", "",
              "| k | " + " | ".join(str(k) for k, _ in kl) + " |", "|---|" + "---|" * len(kl),
              "| KL (nats) | " + " | ".join(f"{v:.4f}" for _, v in kl) + " |"]
    if result.get("throughput"):
        lines += ["", "Per training step (student fwd + bwd + AdamW, live teacher, forward KL + CE), fused "
                  "`linear_kd_loss` vs Hugging Face's materialised logits, in child processes "
                  f"({env['cpus']} CPUs, torch threads: {env['threads']}, a shared machine):", "",
                  "| shape (V, L, batch) | loop | tokens/s | peak extra memory per step (MB) | first step (MB) | "
                  "one fp32 logits tensor (MB) |", "|---|---|---|---|---|---|"]
        for r in result["throughput"]:
            lines.append(f"| {r['shape']} ({r['vocab']}, {r['seq_len']}, {r['batch']}) | {r['loop']} | "
                         f"{r['tokens_per_s']:,.0f} | {r['peak_extra_mb']:.0f} | {r['first_step_peak_extra_mb']:.0f} | "
                         f"{r['logits_mb_one_tensor']:.0f} |")
    lines += ["", "What the statistics support:", ""] + [f"- {c}" for c in claims(result)]
    return "\n".join(lines) + "\n"


def claims(result: dict) -> list[str]:
    """Sentences generated from the statistics only."""
    st, out = result["statistics"], []
    n = st["arms"]["ce"]["n"]
    for arm in KD_ARMS:
        d = st["vs_ce"][arm]
        ci = f"{d['mean']:+.3f} perplexity, 95 % CI ({_f(d['ci_low'], 3)}, {_f(d['ci_high'], 3)})"
        if d["significant"]:
            verb = "lower (better)" if d["mean"] < 0 else "higher (worse)"
            out.append(f"{ARM_TEXT[arm]}: test perplexity {verb} than CE only, {ci}, Holm-corrected p "
                       f"{_p(d['p_holm'])} over {n} paired seeds.")
        else:
            text = (f"{ARM_TEXT[arm]}: no difference from CE only survives the Holm correction ({ci}, "
                    f"p {_p(d['p'])}, Holm {_p(d['p_holm'])}; lower in {d.get('better_seeds', 'n/a')} of {n} "
                    f"paired seeds); these seeds do not resolve it")
            if d.get("detectable_at_n") is not None:
                text += (f": with the paired SD seen here ({d['sd']:.2f}), {n} seeds detect {d['detectable_at_n']:.1f} "
                         f"perplexity at alpha 0.05 / {len(KD_ARMS)} with 80 % power")
                need = d.get("seeds_for_observed")
                if need:
                    text += ("; a difference of the observed size would need " +
                             (f"about {need} seeds" if need < 30 else "more than 30 seeds"))
            out.append(text + ".")
    if n <= 4:
        out.append(f"With {n} seeds no exact (sign-flip) paired test can reach p < 0.05 (its smallest two-sided p "
                   f"is {2 / 2 ** n:.3f}); the t-tests above carry the normality assumption.")
    tp = {(r["shape"], r["loop"]): r for r in result.get("throughput", [])}
    for shape in ("demo", "large"):
        f, e = tp.get((shape, "fused")), tp.get((shape, "hf_materialised"))
        if f and e:
            out.append(f"Shape {shape} (V {f['vocab']}, {f['tokens_per_step']} tokens a step): fused "
                       f"{f['tokens_per_s'] / e['tokens_per_s']:.2f}x the materialised loop's tokens/s, peak extra "
                       f"memory {f['peak_extra_mb']:.0f} MB vs {e['peak_extra_mb']:.0f} MB (one run each on a "
                       f"shared machine: no interval).")
    return out


COMMAND = """```bash
pip install -e '.[lm]'                                    # transformers, tokenizers, safetensors
python -m mlkd_fast.lm.demo --quick                       # the CI slice, about a minute, writes runs/ only
python -m mlkd_fast.lm.demo --out benchmarks/results      # the study (under an hour on 2 cores), resumable
python -m mlkd_fast.lm.demo --out benchmarks/results --report   # this section again from the JSON
```"""

INTRO = ("Distilling a small code model on text every machine has: the Python standard library's own "
         "source files (`mlkd_fast/lm/demo.py`, its docstring gives the protocol). A byte-level BPE "
         "tokenizer and a Llama-style teacher (a `transformers` model from a local config) are trained on "
         "the train files; students of the same family are trained with CE only, with a live teacher "
         "(forward KL, JSD) and from the top-k cache (`mlkd_fast.lm.cache`), every loss through "
         "`linear_kd_loss` on the hidden states and head (the logits never formed); settings chosen on "
         "validation files, perplexity reported on held-out test files.")


def section(result: Optional[dict]) -> str:
    """docs/lm.md's generated section."""
    head = ["## 6. A study on real text: the standard library's source", ""]
    body = markdown(result) if result is not None else (
        f"Not run yet: `benchmarks/results/{NAME}.json` does not exist; the last command above writes it.\n")
    return "\n".join(head + [INTRO, "", COMMAND, "", body.rstrip()]) + "\n"


def _replace_section(path: str, body: str) -> None:
    with open(path) as f:
        text = f.read()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"error: {path} has no single {START} ... {END} section")
    block = (f"{START}\n<!-- generated by python -m mlkd_fast.lm.demo from {NAME}.json; do not edit by hand -->\n"
             f"{body.rstrip()}\n{END}")
    head, rest = text.split(START, 1)
    _atomic_text(path, head + block + rest.split(END, 1)[1])


def write_outputs(result: dict, out: str, docs: Optional[str]) -> str:
    md = markdown(result)
    _atomic_text(os.path.join(out, f"{NAME}.md"), md)
    if docs:
        _replace_section(docs, section(result))
    return md


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mlkd_fast.lm.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (about 1-2 minutes); writes only under runs/")
    ap.add_argument("--out", default=None, help="where lm_stdlib.json / .md go (default: the work folder); "
                    "benchmarks/results only when named")
    ap.add_argument("--work", default=None, help="tokenizer, teacher, cache and per-run JSON (default "
                    "runs/lm_stdlib or runs/lm_stdlib_quick); a re-run skips what is finished")
    ap.add_argument("--report", action="store_true", help="only regenerate the markdown and sections from the JSON")
    ap.add_argument("--docs", default=None, help="docs file whose lm-demo section is rewritten (default: "
                    "docs/lm.md with --out benchmarks/results, else none; '' for none)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared 2-core "
                    "machine two threads spin against the other jobs and ran 5-20x slower in the pilot)")
    ap.add_argument("--no-bench", action="store_true", help="skip the throughput / memory measurement")
    ap.add_argument("--_bench", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    default_work = os.path.join(ROOT, "runs", "lm_stdlib_quick" if args.quick else "lm_stdlib")
    args.work = os.path.abspath(args.work or default_work)
    args.out = os.path.abspath(args.out or args.work)
    committed = os.path.abspath(args.out) == os.path.abspath(COMMITTED)
    if args.quick and committed:
        ap.error("--quick writes only under runs/ (or a folder you name), never benchmarks/results")
    if os.path.abspath(args.work).startswith(os.path.abspath(COMMITTED)):
        ap.error("--work may not be under benchmarks/results (models and caches stay out of the repository)")
    if args.docs is None:
        args.docs = os.path.join(ROOT, "docs", "lm.md") if committed else ""
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if args._bench:
        specs = json.loads(args._bench)
        rows = [bench_child(spec) for spec in specs] if isinstance(specs, list) else bench_child(specs)
        print(json.dumps(rows), flush=True)
        return None
    json_path = os.path.join(args.out, f"{NAME}.json")
    if args.report:
        result = _read_json(json_path)
        if result is None:
            raise SystemExit(f"error: {json_path} does not exist; run the study first")
        write_outputs(result, args.out, args.docs)
        _log(f"wrote {os.path.join(args.out, NAME + '.md')}" + (f", {args.docs}" if args.docs else ""))
        return result
    _need_lm_extra()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    result = Study(p, args.work).run(bench=not args.no_bench)
    result["quick"] = bool(args.quick)
    result["wall_seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    _atomic_json(json_path, result)
    write_outputs(result, args.out, args.docs)
    _log(f"wrote {json_path}")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
