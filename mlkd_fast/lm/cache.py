"""The offline top-k teacher cache for language models (``mlkd-cache lm``, ``python -m mlkd_fast.lm.cache``).

A causal-LM teacher is run once over a tokenised corpus cut into sequences ``(S, L)``; for every
token position the cache stores the teacher's ``k`` most probable next-token ids, their
log-probabilities and the log-mass of the rest of the vocabulary. Training then reads it back
(:class:`LMCache`) and hands it to ``linear_kd_loss(..., teacher_topk=(indices, logprobs, rest))``
without running the teacher.

Alignment. Row ``i`` of a sequence holds the teacher's distribution of token ``i + 1`` given tokens
``0..i`` (the teacher's logits at position ``i``): the row that goes with the student's hidden state
``i`` and with ``shift_labels(labels)[i] = labels[i + 1]``. The last row (``i = L - 1``) predicts a
token outside the sequence; it is stored too, and the shifted labels ignore it.

What is stored per token (every value computed from the teacher's logits in fp32)::

    logp    = log_softmax(logits.float())             # over the teacher's whole vocabulary V
    values, indices = logp.topk(k)                    # sorted, largest first
    rest    = logsumexp(logp over the V - k other ids)   # = log1p(-sum(exp(values))), without the cancellation

``indices`` are bit-packed to ``bits = ceil(log2(V))`` bits each (15 at V = 32000, 17 at 128256);
``values`` are stored in the cache's ``logprob_dtype`` (fp16, bf16, or fp32 for an exact cache);
``rest`` in fp32 (4 bytes a token, 1/16 byte an entry at k = 64): the tail bucket of a k < V cache
is then as exact as the live teacher's, and at k = V it is ``-inf`` (nothing left out), so a cache of
the whole distribution in fp32 gives ``linear_kd_loss`` the live teacher's loss to fp32 round-off.
The rest is computed as the log-sum-exp of the left-out log-probabilities rather than as
``log1p(-sum exp(values))``: the same number mathematically, but without the cancellation when the
top k hold nearly all the mass.

Folder::

    DIR/manifest.json        what the cache is of (teacher, tokenizer, data, L, k, V, dtypes, shards)
    DIR/s00000.bin ...       shards of ``shard_size`` sequences each

A shard is ``b"MLKDLMC1"``, a little-endian uint32 header length, a JSON header (shard number,
sequence range, layout, sha256 of the payload) and the payload: one fixed-size record per sequence,
``[input ids packed][top-k ids packed][logprobs L*k][rest L fp32]``, each packed part padded to a
whole byte. Shards are written atomically (temp file, fsync, rename) and deterministically: a killed
run resumed with the same arguments writes byte-identical shards. The manifest is rewritten
(atomically) after each shard with the shard's file name, sequence range, size and sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import struct
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._hashing import file_sha256

__all__ = ["write_lm_cache", "LMCache", "LMCacheDataset", "collate", "topk_reconstruction_kl", "tokenizer_file_hash",
           "teacher_fingerprint", "token_stream_hash", "pack_ids", "unpack_ids", "bits_for_vocab", "bytes_per_token",
           "LMCacheError", "cli", "main"]

PROG = "mlkd-cache lm"
FORMAT = "mlkd-lm-topk-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_NAME = "s{shard:05d}.bin"
MAGIC = b"MLKDLMC1"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
REST_DTYPE = "fp32"
EXTRA_HINT = 'pip install "mlkd_fast[lm]"'
RECONSTRUCTION = ("the k stored ids keep their exact probabilities; the rest mass (1 - their sum) is spread "
                  "uniformly over the other V - k ids")


class LMCacheError(ValueError):
    """A cache, a shard or an argument that cannot be used as given (one line, naming the field or file)."""


class _MissingDependency(LMCacheError, ImportError):
    pass


# --------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------
def bits_for_vocab(vocab_size: int) -> int:
    """Bits an id of a vocabulary of ``vocab_size`` needs: ``ceil(log2(V))``, at least 1."""
    if vocab_size < 1:
        raise LMCacheError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, (int(vocab_size) - 1).bit_length())


_PACK_CHUNK = 1 << 20  # ids per packing step (a multiple of 8: chunks end on whole bytes)


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_ids(ids: Union[Tensor, np.ndarray], bits: int) -> np.ndarray:
    """``ids`` (any shape, values in ``[0, 2**bits)``) flattened and packed to ``bits`` bits each, little
    endian (id ``j`` at bits ``j*bits .. j*bits + bits - 1`` of the stream, bit 0 the lowest of byte 0);
    a uint8 array of ``ceil(n * bits / 8)`` bytes. Vectorised (numpy), in chunks of 2**20 ids."""
    a = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    a = a.reshape(-1).astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= (1 << bits)):
        raise LMCacheError(f"ids must lie in [0, 2**{bits}) to pack in {bits} bits; got [{a.min()}, {a.max()}]")
    shifts = np.arange(bits, dtype=np.int64)
    out = np.empty(packed_nbytes(a.size, bits), dtype=np.uint8)
    for lo in range(0, a.size, _PACK_CHUNK):
        part = a[lo:lo + _PACK_CHUNK]
        bitmat = ((part[:, None] >> shifts) & 1).astype(np.uint8)  # (n, bits), LSB first
        packed = np.packbits(bitmat.reshape(-1), bitorder="little")
        start = lo * bits // 8
        out[start:start + packed.size] = packed
    return out


def unpack_ids(buf: Union[bytes, bytearray, memoryview, np.ndarray], count: int, bits: int) -> Tensor:
    """The ``count`` ids packed by :func:`pack_ids` in ``buf``, as an int64 tensor ``(count,)``."""
    b = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1)
    need = packed_nbytes(count, bits)
    if b.size < need:
        raise LMCacheError(f"{count} ids of {bits} bits need {need} bytes, got {b.size}")
    weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    for lo in range(0, count, _PACK_CHUNK):
        n = min(_PACK_CHUNK, count - lo)
        start = lo * bits // 8
        bitv = np.unpackbits(b[start:start + packed_nbytes(n, bits)], count=n * bits, bitorder="little")
        out[lo:lo + n] = bitv.reshape(n, bits).astype(np.int64) @ weights
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# Identities: teacher, tokenizer, data
# --------------------------------------------------------------------------------------------
_CONFIG_NOT_HASHED = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset")


def _config_json(teacher: Any) -> Optional[dict]:
    cfg = getattr(teacher, "config", None)
    if cfg is None:
        return None
    try:
        if hasattr(cfg, "to_json_string"):
            d = json.loads(cfg.to_json_string(use_diff=False))
        elif hasattr(cfg, "to_dict"):
            d = json.loads(json.dumps(cfg.to_dict(), default=str))
        elif isinstance(cfg, dict):
            d = json.loads(json.dumps(cfg, default=str))
        elif hasattr(cfg, "__dict__"):
            d = json.loads(json.dumps(vars(cfg), default=str))
        else:
            return None
    except Exception:  # pragma: no cover - an exotic config
        return None
    return {k: v for k, v in d.items() if k not in _CONFIG_NOT_HASHED}


def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def teacher_fingerprint(teacher: Any, *, weights: bool = True) -> dict[str, Any]:
    """The teacher as the manifest names it: ``config`` (its config as JSON where it has one, without
    paths and versions), ``config_sha256`` and ``weights_sha256``: the sha256 of each state_dict entry's
    name, dtype, shape and bytes, in state_dict order (the weights as run: a bf16 copy hashes otherwise
    than its fp32 original). A plain callable without a state_dict hashes to None."""
    config = _config_json(teacher)
    digest = None
    if weights and hasattr(teacher, "state_dict"):
        h = hashlib.sha256()
        for name, t in teacher.state_dict().items():
            if not isinstance(t, Tensor):
                continue
            h.update(f"{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
            h.update(_tensor_bytes(t))
        digest = h.hexdigest()
    cfg_hash = None if config is None else hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return {"class": type(teacher).__name__, "config": config, "config_sha256": cfg_hash, "weights_sha256": digest}


_TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece",
                            "sentencepiece", "chat_template")


def tokenizer_file_hash(path: str) -> str:
    """sha256 of a tokenizer: a file's bytes, or a folder's tokenizer files (``tokenizer*``, ``vocab*``,
    ``merges*``, ``special_tokens_map*``, ``added_tokens*``, ``spiece*``, ``*.model``, ``chat_template*``;
    every file when none of these is there), each as its relative path and its bytes, in sorted order.
    A model folder that also holds the tokenizer hashes only the tokenizer's files."""
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)]
    elif os.path.isdir(path):
        every = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in names:
                if not n.startswith("."):
                    full = os.path.join(root, n)
                    every.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
        every.sort()
        files = [(r, f) for r, f in every
                 if os.path.basename(r).lower().startswith(_TOKENIZER_FILE_PREFIXES) or r.endswith(".model")] or every
        if not files:
            raise LMCacheError(f"tokenizer folder {path!r} is empty: nothing to hash")
    else:
        raise FileNotFoundError(f"tokenizer {path!r}: no such file or folder")
    h = hashlib.sha256()
    for rel, full in files:
        h.update(rel.encode() + b"\0")
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def token_stream_hash(sequences: Tensor) -> str:
    """sha256 of the token stream: the sequences' ids as little-endian int64, row after row (the shape is
    in the manifest as seq_len and num_sequences)."""
    a = sequences.detach().cpu().to(torch.int64).contiguous().numpy()
    return hashlib.sha256(a.astype("<i8", copy=False).tobytes()).hexdigest()


def _library_version() -> str:
    from .. import __version__

    return __version__


# --------------------------------------------------------------------------------------------
# Layout and sizes
# --------------------------------------------------------------------------------------------
def _record_layout(seq_len: int, k: int, bits: int, logprob_dtype: str) -> dict[str, tuple[int, int]]:
    """name -> (offset, nbytes) within one sequence's record."""
    item = torch.empty((), dtype=DTYPES[logprob_dtype]).element_size()
    parts = [("input_ids", packed_nbytes(seq_len, bits)), ("indices", packed_nbytes(seq_len * k, bits)),
             ("logprobs", seq_len * k * item), ("rest", seq_len * 4)]
    layout, off = {}, 0
    for name, n in parts:
        layout[name] = (off, n)
        off += n
    return layout


def _record_bytes(seq_len: int, k: int, bits: int, logprob_dtype: str) -> int:
    return sum(n for _, n in _record_layout(seq_len, k, bits, logprob_dtype).values())


def bytes_per_token(vocab_size: int, k: int, *, seq_len: int = 2048, logprob_dtype: str = "fp16") -> dict[str, float]:
    """Stored bytes per token and per top-k entry of a cache (payload; shard headers aside):
    ``teacher_bytes_per_token`` (packed ids, log-probs, the fp32 rest), ``bytes_per_entry`` (that / k),
    ``bytes_per_token`` (with the token's own packed input id)."""
    bits = bits_for_vocab(vocab_size)
    lay = _record_layout(seq_len, k, bits, logprob_dtype)
    teacher = lay["indices"][1] + lay["logprobs"][1] + lay["rest"][1]
    return {"bits_per_id": bits, "teacher_bytes_per_token": teacher / seq_len,
            "bytes_per_entry": teacher / (seq_len * k),
            "bytes_per_token": (teacher + lay["input_ids"][1]) / seq_len}


# --------------------------------------------------------------------------------------------
# Running the teacher
# --------------------------------------------------------------------------------------------
def _is_hf_model(teacher: Any) -> bool:
    mod = sys.modules.get("transformers")
    return mod is not None and isinstance(teacher, getattr(mod, "PreTrainedModel", ()))


def _device_of(teacher: Any) -> torch.device:
    if isinstance(teacher, torch.nn.Module):
        for p in teacher.parameters():
            return p.device
    return torch.device("cpu")


def _logits(teacher: Any, x: Tensor) -> Tensor:
    out = teacher(x, use_cache=False) if _is_hf_model(teacher) else teacher(x)
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, dict):
        out = out["logits"]
    if not isinstance(out, Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(x.shape):
        raise LMCacheError(f"the teacher must return logits (B, L, V) for input_ids (B, L) = {tuple(x.shape)}; got "
                           f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
    return out


def _topk_rows(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(values fp32, indices int64, rest fp32) of rows (..., V): log_softmax in fp32, its top k, and the
    log-sum-exp of the other entries (-inf when k = V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, indices = logp.topk(k, dim=-1, sorted=True)
    if k == logp.shape[-1]:
        rest = torch.full(logp.shape[:-1], float("-inf"), dtype=torch.float32, device=logp.device)
    else:
        rest = logp.scatter_(-1, indices, float("-inf")).logsumexp(-1)
    return values, indices, rest


def _teacher_rows(teacher: Any, x: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's top-k rows for input_ids ``x`` (B, L) on the host: indices int64 (B, L, k), values in
    ``dtype`` (B, L, k), rest fp32 (B, L). One sequence at a time after the forward (one (L, V) fp32 copy)."""
    logits = _logits(teacher, x)
    idx, val, rest = [], [], []
    for b in range(logits.shape[0]):
        v, i, r = _topk_rows(logits[b], k)
        idx.append(i.cpu())
        val.append(v.to(dtype).cpu())
        rest.append(r.cpu())
    return torch.stack(idx), torch.stack(val), torch.stack(rest)


def _probe_vocab(teacher: Any, sequences: Tensor) -> int:
    """The teacher's vocabulary: the width of its logits for one token (id 0, in every vocabulary)."""
    with torch.inference_mode():
        x = torch.zeros((1, 1), dtype=torch.int64, device=_device_of(teacher))
        return int(_logits(teacher, x).shape[-1])


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def _atomic_write(path: str, data: Union[bytes, Sequence[Union[bytes, memoryview, np.ndarray]]]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in ([data] if isinstance(data, (bytes, bytearray)) else data):
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: str, obj: dict) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())




def shard_path(folder: str, shard: int) -> str:
    return os.path.join(folder, SHARD_NAME.format(shard=shard))


def _shard_span(manifest: dict, shard: int) -> tuple[int, int]:
    size, n = manifest["shards"]["size"], manifest["num_sequences"]
    return shard * size, min(n, (shard + 1) * size)


def _shard_bytes(manifest: dict, idx: Tensor, val: Tensor, rest: Tensor, tokens: Tensor, shard: int) -> bytes:
    """The file of one shard: magic, header length, header JSON, records. Deterministic in its inputs."""
    L, k, bits = manifest["seq_len"], manifest["k"], manifest["bits_per_id"]
    lay = _record_layout(L, k, bits, manifest["logprob_dtype"])
    rec = sum(n for _, n in lay.values())
    start, stop = _shard_span(manifest, shard)
    n = stop - start
    payload = np.zeros((n, rec), dtype=np.uint8)
    for s in range(n):
        parts = {"input_ids": pack_ids(tokens[s], bits), "indices": pack_ids(idx[s], bits),
                 "logprobs": val[s].contiguous().view(torch.uint8).numpy().reshape(-1),
                 "rest": rest[s].to(torch.float32).contiguous().view(torch.uint8).numpy().reshape(-1)}
        for name, (off, nb) in lay.items():
            payload[s, off:off + nb] = parts[name]
    body = payload.tobytes()
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "shard": shard, "start": start, "stop": stop,
              "seq_len": L, "k": k, "bits_per_id": bits, "logprob_dtype": manifest["logprob_dtype"],
              "rest_dtype": REST_DTYPE, "record_bytes": rec, "layout": {k_: list(v) for k_, v in lay.items()},
              "payload_sha256": hashlib.sha256(body).hexdigest()}
    hb = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(hb)) + hb + body


def _read_header(path: str, data: Union[bytes, memoryview, np.ndarray]) -> tuple[dict, int]:
    buf = memoryview(data) if not isinstance(data, np.ndarray) else memoryview(data)
    if len(buf) < 12 or bytes(buf[:8]) != MAGIC:
        raise LMCacheError(f"LM cache shard {path!r} is corrupt: it does not start with the shard magic {MAGIC!r}; "
                           f"delete it and resume the cache to rewrite it")
    (hl,) = struct.unpack("<I", bytes(buf[8:12]))
    try:
        header = json.loads(bytes(buf[12:12 + hl]).decode())
    except Exception as exc:
        raise LMCacheError(f"LM cache shard {path!r} is corrupt: its header is unreadable ({type(exc).__name__}); "
                           f"delete it and resume the cache to rewrite it") from exc
    return header, 12 + hl


def _shard_self_check(path: str, manifest: dict, shard: int) -> Optional[str]:
    """None when the file at ``path`` is a complete shard ``shard`` of ``manifest`` (its header matches and
    its payload has the sha256 in its header), else what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        header, off = _read_header(path, data)
    except (OSError, LMCacheError) as exc:
        return str(exc)
    start, stop = _shard_span(manifest, shard)
    want = {"shard": shard, "start": start, "stop": stop, "seq_len": manifest["seq_len"], "k": manifest["k"],
            "bits_per_id": manifest["bits_per_id"], "logprob_dtype": manifest["logprob_dtype"]}
    for key, v in want.items():
        if header.get(key) != v:
            return f"its header has {key} {header.get(key)!r}, not {v!r}"
    body = data[off:]
    if len(body) != (stop - start) * header.get("record_bytes", -1):
        return f"it holds {len(body)} payload bytes, not {(stop - start) * header.get('record_bytes', 0)} (truncated)"
    if hashlib.sha256(body).hexdigest() != header.get("payload_sha256"):
        return "its payload does not match its checksum"
    return None


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------
# manifest fields compared on resume (a difference names the field); the rest is informational
_COMPARED = ("teacher.weights_sha256", "teacher.config_sha256", "tokenizer.sha256", "data.sha256", "seq_len",
             "num_sequences", "k", "vocab_size", "bits_per_id", "logprob_dtype", "rest_dtype", "teacher_batch",
             "shards.size", "shards.count")


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise LMCacheError(f"{path!r} is not a readable LM cache manifest: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise LMCacheError(f"{path!r} is not an LM top-k cache manifest (no \"format\": \"{FORMAT}\"); give another "
                           f"folder")
    if m.get("format_version") != FORMAT_VERSION:
        raise LMCacheError(f"{path!r} is an LM cache of format version {m.get('format_version')}; this library reads "
                           f"version {FORMAT_VERSION}: make it again")
    return m


def _summary(manifest: dict, folder: str) -> None:
    """Sizes of the shards written so far, into the manifest's ``sizes``."""
    files = [s for s in manifest["shards"]["files"] if s is not None]
    tokens = sum(s["stop"] - s["start"] for s in files) * manifest["seq_len"]
    total = sum(s["bytes"] for s in files)
    per = bytes_per_token(manifest["vocab_size"], manifest["k"], seq_len=manifest["seq_len"],
                          logprob_dtype=manifest["logprob_dtype"])
    manifest["sizes"] = {
        "bits_per_id": per["bits_per_id"],
        "bytes_per_entry": per["bytes_per_entry"],
        "teacher_bytes_per_token": per["teacher_bytes_per_token"],
        "bytes_per_token": per["bytes_per_token"],
        "file_bytes": total, "tokens": tokens,
        "file_bytes_per_token": total / tokens if tokens else None,
        "file_bytes_per_entry": total / (tokens * manifest["k"]) if tokens else None,
        "note": "bytes_per_entry: packed top-k ids, log-probs and the fp32 rest, per stored entry; bytes_per_token "
                "adds the packed input id; file_* are the shard files' sizes (headers included)",
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise LMCacheError(f"logprob_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise LMCacheError(f"logprob_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    return _DTYPE_NAMES[dtype]


def _check_sequences(sequences: Any) -> Tensor:
    if not isinstance(sequences, Tensor) or sequences.is_floating_point() or sequences.dtype == torch.bool:
        raise LMCacheError(f"sequences must be an integer tensor (S, L) of token ids, got "
                           f"{getattr(sequences, 'dtype', type(sequences).__name__)}")
    if sequences.dim() != 2:
        raise LMCacheError(f"sequences must be 2-D (S sequences, L tokens), got shape {tuple(sequences.shape)}")
    if sequences.shape[0] == 0 or sequences.shape[1] == 0:
        raise LMCacheError(f"the corpus is empty: sequences of shape {tuple(sequences.shape)} hold no token")
    return sequences.detach().cpu().to(torch.int64).contiguous()


def _max_positions(teacher: Any) -> Optional[int]:
    cfg = getattr(teacher, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None) if cfg is not None and not isinstance(cfg, dict) else \
            (cfg.get(name) if isinstance(cfg, dict) else None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def write_lm_cache(teacher: Any, sequences: Tensor, out: str, *, k: int,
                   logprob_dtype: Union[str, torch.dtype] = torch.float16, batch_size: int = 8,
                   tokenizer_hash: Optional[str] = None, teacher_hash: Optional[str] = None, resume: bool = True,
                   progress: bool = True, shard_size: Optional[int] = None, max_shards: Optional[int] = None,
                   extra: Optional[dict] = None) -> dict[str, Any]:
    """Runs ``teacher`` over ``sequences`` (int (S, L) token ids) and writes the top-k cache to the folder
    ``out``; returns the manifest (also ``out/manifest.json``) with a ``"status"`` entry (not in the file).

    ``teacher``: a causal LM (an ``nn.Module`` whose ``forward(input_ids)`` returns an object with
    ``.logits``, a ``transformers`` model, or a callable returning logits ``(B, L, V)``), run in
    ``torch.inference_mode`` on its own device (put it in eval mode first; ``write_lm_cache`` does not
    change its mode). ``k``: ids stored per token, ``1 <= k <= V``. ``logprob_dtype``: fp16 (default),
    bf16 or fp32 (exact). ``batch_size``: sequences per teacher forward (recorded: a resume must use the
    same, its batches are then the same and the shards byte-identical). ``shard_size``: sequences per
    shard (default: about 2**20 tokens a shard). ``tokenizer_hash``: the caller's (e.g.
    :func:`tokenizer_file_hash`), recorded and compared. ``teacher_hash``: the weights' sha256 when the
    caller has it (default: computed, :func:`teacher_fingerprint`). ``resume``: an existing cache of
    the same teacher, tokenizer, data and settings at ``out`` is continued (complete shards kept, the
    others written); a cache of anything else is refused naming the field, as is a folder holding
    other files (nothing is overwritten); ``resume=False`` refuses any existing cache. ``max_shards``:
    stop after writing that many shards (resume continues). ``extra``: JSON-able notes stored in the
    manifest (e.g. the command's settings).
    """
    seqs = _check_sequences(sequences)
    dtype_name = _dtype_name(logprob_dtype)
    if isinstance(k, bool) or not isinstance(k, int):
        raise LMCacheError(f"k must be an int (ids per token), got {k!r}")
    if k < 1:
        raise LMCacheError(f"k must be >= 1 (ids stored per token), got {k}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LMCacheError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_shards is not None and max_shards < 0:
        raise LMCacheError(f"max_shards must be >= 0, got {max_shards}")
    S, L = seqs.shape
    ctx = _max_positions(teacher)
    if ctx is not None and L > ctx:
        raise LMCacheError(f"sequences of {L} tokens are longer than the teacher's context (max_position_embeddings "
                           f"= {ctx}): give a seq_len <= {ctx}")
    if shard_size is None:
        shard_size = max(1, (1 << 20) // L)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise LMCacheError(f"shard_size must be a positive int (sequences per shard), got {shard_size!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise LMCacheError(f"out {out!r} is an existing file, not a folder")
    # an existing folder: only our cache (resumed when it matches), or an empty folder
    existing = None
    if os.path.isdir(out):
        if os.path.isfile(os.path.join(out, MANIFEST)):
            existing = _read_manifest(out)
            if not resume:
                raise LMCacheError(f"out {out!r} already holds an LM cache: give resume=True (--resume is the "
                                   f"default of the command) to continue it, or another folder")
        else:
            others = sorted(n for n in os.listdir(out) if not n.startswith(".tmp-"))
            if others:
                raise LMCacheError(f"out {out!r} is not empty and is not an LM cache (it holds "
                                   f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): give an empty or "
                                   f"new folder")
    vocab = _probe_vocab(teacher, seqs)
    if k > vocab:
        raise LMCacheError(f"k = {k} is larger than the teacher's vocabulary ({vocab} ids): give k <= {vocab}")
    mx = int(seqs.max())
    if int(seqs.min()) < 0 or mx >= vocab:
        raise LMCacheError(f"token ids must lie in [0, {vocab}) (the teacher's vocabulary); the sequences hold "
                           f"[{int(seqs.min())}, {mx}]: a tokenizer of another vocabulary?")
    fp = teacher_fingerprint(teacher, weights=teacher_hash is None)
    if teacher_hash is not None:
        fp["weights_sha256"] = teacher_hash
    count = math.ceil(S / shard_size)
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": _library_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": fp, "tokenizer": {"sha256": tokenizer_hash},
        "data": {"sha256": token_stream_hash(seqs), "hashed": "the sequences' token ids as little-endian int64, row "
                                                              "after row", "tokens": S * L},
        "seq_len": L, "num_sequences": S, "k": k, "vocab_size": vocab, "bits_per_id": bits_for_vocab(vocab),
        "logprob_dtype": dtype_name, "rest_dtype": REST_DTYPE, "index_dtype": f"uint{bits_for_vocab(vocab)} packed",
        "teacher_batch": batch_size,
        "rows": "row i of a sequence: the teacher's distribution of token i + 1 given tokens 0..i (its logits at "
                "position i), aligned with the student's hidden state i and shift_labels(labels)[i] = labels[i + 1]; "
                "the last row predicts past the sequence",
        "stored": "log_softmax in fp32; top-k ids (sorted, largest first) and their log-probs in logprob_dtype; rest = "
                  "logsumexp of the other V - k log-probs (= log1p(-sum exp top-k)) in fp32, -inf at k = V",
        "shards": {"size": shard_size, "count": count, "name": SHARD_NAME, "files": [None] * count,
                   "format": "MAGIC 'MLKDLMC1', uint32 LE header length, JSON header, records of [input ids packed]"
                             "[top-k ids packed][logprobs L*k][rest L fp32] per sequence"},
        "complete": False,
    }
    if extra:
        manifest["extra"] = extra
    if existing is not None:
        differ = [f"{f} is {_get(existing, f)!r} in the cache but {_get(manifest, f)!r} here" for f in _COMPARED
                  if _get(existing, f) != _get(manifest, f)]
        if differ:
            raise LMCacheError(f"out {out!r} holds an LM cache of something else ({'; '.join(differ)}): give the "
                               f"cache's settings to resume it, or another folder")
        manifest = existing
        files = manifest["shards"]["files"]
    else:
        os.makedirs(out, exist_ok=True)
        _write_json(os.path.join(out, MANIFEST), manifest)
        files = manifest["shards"]["files"]
    todo, kept, dirty = [], 0, False
    for s in range(count):
        p = shard_path(out, s)
        entry = files[s]
        if os.path.isfile(p):
            if entry is not None and os.path.getsize(p) == entry["bytes"] and file_sha256(p) == entry["sha256"]:
                kept += 1
                continue
            if _shard_self_check(p, manifest, s) is None:  # written, but the manifest was not updated (a kill)
                start, stop = _shard_span(manifest, s)
                files[s] = {"file": os.path.basename(p), "start": start, "stop": stop, "bytes": os.path.getsize(p),
                            "sha256": file_sha256(p)}
                kept += 1
                dirty = True
                continue
        if entry is not None:
            files[s] = None
            dirty = True
        todo.append(s)
    if dirty:
        _summary(manifest, out)
        _write_json(os.path.join(out, MANIFEST), manifest)
    if max_shards is not None:
        todo = todo[:max_shards]
    device = _device_of(teacher)
    dtype = DTYPES[dtype_name]
    t0, done_tokens, last_print = time.perf_counter(), 0, 0.0
    for n_written, s in enumerate(todo):
        start, stop = _shard_span(manifest, s)
        idx, val, rest = [], [], []
        with torch.inference_mode():
            for lo in range(start, stop, batch_size):
                x = seqs[lo:min(lo + batch_size, stop)].to(device)
                i, v, r = _teacher_rows(teacher, x, k, dtype)
                idx.append(i)
                val.append(v)
                rest.append(r)
        data = _shard_bytes(manifest, torch.cat(idx), torch.cat(val), torch.cat(rest), seqs[start:stop], s)
        p = shard_path(out, s)
        _atomic_write(p, data)
        files[s] = {"file": os.path.basename(p), "start": start, "stop": stop, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
        manifest["complete"] = all(f is not None for f in files)
        _summary(manifest, out)
        _write_json(os.path.join(out, MANIFEST), manifest)
        done_tokens += (stop - start) * L
        now = time.perf_counter()
        if progress and (now - last_print > 30 or n_written == len(todo) - 1):
            last_print = now
            print(f"{PROG}: {out}: shard {s + 1} of {count} written; {done_tokens / max(now - t0, 1e-9):.0f} tokens/s",
                  file=sys.stderr, flush=True)
    complete = all(f is not None for f in files)
    if manifest.get("complete") != complete or "sizes" not in manifest:
        manifest["complete"] = complete
        _summary(manifest, out)
        _write_json(os.path.join(out, MANIFEST), manifest)
    elapsed = time.perf_counter() - t0
    return {**manifest, "status": {"complete": complete, "written": len(todo), "kept": kept, "total": count,
                                   "seconds": round(elapsed, 3),
                                   "tokens_per_s": round(done_tokens / elapsed, 1) if done_tokens else None}}


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
_CHECK_FIELDS = {"teacher_hash": "teacher.weights_sha256", "tokenizer_hash": "tokenizer.sha256",
                 "data_hash": "data.sha256", "seq_len": "seq_len", "k": "k", "vocab_size": "vocab_size"}


class LMCache:
    """A top-k LM cache folder, opened for reading (:meth:`open`)."""

    def __init__(self, folder: str, manifest: dict) -> None:
        self.folder, self.manifest = folder, manifest
        self.seq_len, self.k, self.vocab_size = manifest["seq_len"], manifest["k"], manifest["vocab_size"]
        self.num_sequences, self.bits = manifest["num_sequences"], manifest["bits_per_id"]
        self.logprob_dtype = DTYPES[manifest["logprob_dtype"]]

    @classmethod
    def open(cls, folder: str) -> "LMCache":
        """Opens ``folder``: its manifest read and checked (format, complete), every shard present with the
        size the manifest gives (a truncated or missing shard: an error naming the file). Each shard's sha256
        is checked when the dataset first reads it."""
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"LM cache {folder!r}: no such folder (make one with mlkd-cache lm)")
        if not os.path.isfile(os.path.join(folder, MANIFEST)):
            raise LMCacheError(f"LM cache {folder!r}: no {MANIFEST} in it (not an LM cache; make one with mlkd-cache "
                               f"lm)")
        m = _read_manifest(folder)
        files = m["shards"]["files"]
        missing = [SHARD_NAME.format(shard=s) for s, f in enumerate(files) if f is None]
        if missing:
            raise LMCacheError(f"LM cache {folder!r} is incomplete: {len(missing)} of {len(files)} shards not written "
                               f"(first {missing[0]}): run the same mlkd-cache lm command again to finish it")
        for f in files:
            p = os.path.join(folder, f["file"])
            if not os.path.isfile(p):
                raise LMCacheError(f"LM cache shard {p!r} is missing: run the same mlkd-cache lm command again to "
                                   f"rewrite it")
            size = os.path.getsize(p)
            if size != f["bytes"]:
                raise LMCacheError(f"LM cache shard {p!r} is truncated or corrupt: {size} bytes, the manifest says "
                                   f"{f['bytes']}; delete it and run the same mlkd-cache lm command again to rewrite "
                                   f"it")
        return cls(folder, m)

    def check(self, *, teacher_hash: Union[str, torch.nn.Module, None] = None, tokenizer_hash: Optional[str] = None,
              data_hash: Union[str, Tensor, None] = None, seq_len: Optional[int] = None, k: Optional[int] = None,
              vocab_size: Optional[int] = None) -> None:
        """Compares the cache with what training uses; every difference in one line (a ValueError naming the
        field and both values). ``teacher_hash`` may be a model (hashed, :func:`teacher_fingerprint`),
        ``data_hash`` the sequences tensor (hashed, :func:`token_stream_hash`). None: not checked."""
        if isinstance(teacher_hash, torch.nn.Module):
            teacher_hash = teacher_fingerprint(teacher_hash)["weights_sha256"]
        if isinstance(data_hash, Tensor):
            data_hash = token_stream_hash(data_hash)
        given = dict(teacher_hash=teacher_hash, tokenizer_hash=tokenizer_hash, data_hash=data_hash, seq_len=seq_len,
                     k=k, vocab_size=vocab_size)
        differ = [f"{name} is {_get(self.manifest, _CHECK_FIELDS[name])!r} in the cache but {v!r} here"
                  for name, v in given.items() if v is not None and _get(self.manifest, _CHECK_FIELDS[name]) != v]
        if differ:
            raise LMCacheError(f"LM cache {self.folder!r} does not match: {'; '.join(differ)}")

    def __len__(self) -> int:
        return self.num_sequences

    def dataset(self, verify: bool = True) -> "LMCacheDataset":
        """A ``torch.utils.data.Dataset`` of the cache's sequences (see :class:`LMCacheDataset`)."""
        return LMCacheDataset(self.folder, self.manifest, verify=verify)


class LMCacheDataset(torch.utils.data.Dataset):
    """Item ``i``: ``{"input_ids": (L,) int64, "labels": (L,) int64 (= input_ids: unshifted, Hugging Face
    style; the consumer shifts), "teacher_topk": (indices (L, k) int64, logprobs (L, k) float32, rest (L,)
    float32)}``. Row ``j`` of ``teacher_topk`` is the teacher's distribution of token ``j + 1`` given tokens
    ``0..j``: it goes with the student's hidden state ``j`` and ``shift_labels(labels)[j] = labels[j + 1]``.
    Shards are memory-mapped lazily (per process: safe with DataLoader workers); with ``verify`` each
    shard's sha256 is checked on first use (an error naming the file)."""

    def __init__(self, folder: str, manifest: dict, verify: bool = True) -> None:
        self.folder, self.manifest, self.verify = folder, manifest, verify
        self.L, self.k, self.bits = manifest["seq_len"], manifest["k"], manifest["bits_per_id"]
        self.dtype = DTYPES[manifest["logprob_dtype"]]
        self.layout = _record_layout(self.L, self.k, self.bits, manifest["logprob_dtype"])
        self.record = sum(n for _, n in self.layout.values())
        self.size = manifest["shards"]["size"]
        self._maps: dict[int, tuple[np.ndarray, int]] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_maps"] = {}
        return d

    def __len__(self) -> int:
        return self.manifest["num_sequences"]

    def _shard(self, s: int) -> tuple[np.ndarray, int]:
        if s not in self._maps:
            entry = self.manifest["shards"]["files"][s]
            p = os.path.join(self.folder, entry["file"])
            if not os.path.isfile(p):
                raise LMCacheError(f"LM cache shard {p!r} is missing: rerun the mlkd-cache lm command to rewrite it")
            if os.path.getsize(p) != entry["bytes"]:
                raise LMCacheError(f"LM cache shard {p!r} is truncated or corrupt: {os.path.getsize(p)} bytes, the "
                                   f"manifest says {entry['bytes']}; delete it and rerun the mlkd-cache lm command")
            if self.verify and file_sha256(p) != entry["sha256"]:
                raise LMCacheError(f"LM cache shard {p!r} is corrupt: its sha256 is not the manifest's; delete it and "
                                   f"rerun the mlkd-cache lm command")
            data = np.memmap(p, dtype=np.uint8, mode="r")
            header, off = _read_header(p, data)
            if header.get("record_bytes") != self.record or header.get("shard") != s:
                raise LMCacheError(f"LM cache shard {p!r} is corrupt: its header does not match the manifest")
            self._maps[s] = (data, off)
        return self._maps[s]

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range [0, {n})")
        s, row = divmod(i, self.size)
        data, off = self._shard(s)
        rec = data[off + row * self.record: off + (row + 1) * self.record]
        L, k, bits = self.L, self.k, self.bits

        def part(name):
            o, nb = self.layout[name]
            return rec[o:o + nb]

        ids = unpack_ids(part("input_ids"), L, bits)
        idx = unpack_ids(part("indices"), L * k, bits).reshape(L, k)
        lp = torch.from_numpy(np.array(part("logprobs"))).view(self.dtype).reshape(L, k).float()
        rest = torch.from_numpy(np.array(part("rest"))).view(torch.float32).reshape(L).clone()
        return {"input_ids": ids, "labels": ids.clone(), "teacher_topk": (idx, lp, rest)}


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks :class:`LMCacheDataset` items into ``{"input_ids": (B, L), "labels": (B, L), "teacher_topk":
    (indices (B, L, k), logprobs (B, L, k), rest (B, L))}`` (a DataLoader's ``collate_fn``)."""
    if not items:
        raise LMCacheError("collate got an empty batch")
    return {"input_ids": torch.stack([it["input_ids"] for it in items]),
            "labels": torch.stack([it["labels"] for it in items]),
            "teacher_topk": tuple(torch.stack([it["teacher_topk"][j] for it in items]) for j in range(3))}


# --------------------------------------------------------------------------------------------
# The report: how much of the teacher a top-k cache keeps
# --------------------------------------------------------------------------------------------
def topk_reconstruction_kl(teacher: Any, sequences: Tensor, ks: Sequence[int] = (1, 8, 32, 64, 128), *,
                           batch_size: int = 8, logprob_dtype: str = "fp16") -> dict[str, Any]:
    """Per k, the mean over every token position of KL(p || p_k), p the teacher's full next-token
    distribution (fp32) and p_k its reconstruction from a top-k cache: the k stored ids keep their exact
    probabilities, the rest mass R = 1 - sum(top k) is spread uniformly over the other V - k ids
    (p_k = p on the top k, R / (V - k) elsewhere; 0 at k = V). This is the information the cache drops by
    truncation (fp16 rounding of the stored values aside). With the tail bucket of ``linear_kd_loss`` the
    student is matched on the k ids and the rest's total mass, never on how the rest is spread: this
    KL is what that ignores. Also per k: the mean rest mass, the max KL over tokens and the stored bytes
    per token / per entry (:func:`bytes_per_token`, at the sequences' length and ``logprob_dtype``).
    Returns ``{"reconstruction": ..., "kl": {k: mean KL}, "vocab_size", "tokens", "per_k": [{k, kl_mean,
    kl_max, rest_mass_mean, bytes_per_token, bytes_per_entry, teacher_bytes_per_token, bits_per_id}, ...]}``."""
    seqs = _check_sequences(sequences)
    ks = [int(x) for x in ks]
    device = _device_of(teacher)
    vocab = _probe_vocab(teacher, seqs)
    for k in ks:
        if k < 1 or k > vocab:
            raise LMCacheError(f"k = {k} must lie in [1, {vocab}] (the teacher's vocabulary)")
    kmax = max(ks)
    sums = {k: 0.0 for k in ks}
    maxes = {k: 0.0 for k in ks}
    rest_sums = {k: 0.0 for k in ks}
    tokens = 0
    with torch.inference_mode():
        for lo in range(0, seqs.shape[0], batch_size):
            logits = _logits(teacher, seqs[lo:lo + batch_size].to(device))
            for b in range(logits.shape[0]):
                logp = torch.log_softmax(logits[b].float(), dim=-1).double()  # (L, V)
                p = logp.exp()
                plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
                total_plogp = plogp.sum(-1)
                top, ti = logp.topk(kmax, dim=-1)
                ptop = top.exp()
                cum_p = ptop.cumsum(-1)
                cum_plogp = torch.where(ptop > 0, ptop * top, torch.zeros_like(ptop)).cumsum(-1)
                for k in ks:
                    rest_mass = (1.0 - cum_p[:, k - 1]).clamp_min(0.0)
                    if k == vocab:
                        kl = torch.zeros_like(rest_mass)
                    else:
                        # sum over the rest of p log p - R log(R / (V - k))
                        rest_plogp = total_plogp - cum_plogp[:, k - 1]
                        safe = rest_mass.clamp_min(1e-300)
                        kl = (rest_plogp - rest_mass * (safe.log() - math.log(vocab - k))).clamp_min(0.0)
                        kl = torch.where(rest_mass > 0, kl, torch.zeros_like(kl))
                    sums[k] += float(kl.sum())
                    maxes[k] = max(maxes[k], float(kl.max()))
                    rest_sums[k] += float(rest_mass.sum())
                tokens += logp.shape[0]
    L = seqs.shape[1]
    per_k = []
    for k in ks:
        sizes = bytes_per_token(vocab, k, seq_len=L, logprob_dtype=logprob_dtype)
        per_k.append({"k": k, "kl_mean": sums[k] / tokens, "kl_max": maxes[k], "rest_mass_mean": rest_sums[k] / tokens,
                      **sizes})
    return {"reconstruction": RECONSTRUCTION, "kl": {e["k"]: e["kl_mean"] for e in per_k},
            "kl_note": "KL(teacher || reconstruction) in nats, mean over every token position",
            "vocab_size": vocab, "tokens": tokens, "seq_len": L, "logprob_dtype": logprob_dtype, "per_k": per_k}


# --------------------------------------------------------------------------------------------
# The command: mlkd-cache lm
# --------------------------------------------------------------------------------------------
USAGE = """Run a causal-LM teacher once over a text corpus and store its top-k next-token distribution.

    mlkd-cache lm --teacher runs/teacher --tokenizer runs/tokenizer --data corpus/ --seq-len 256 --k 64 \\
        --out cache/lm-k64

Loads the teacher and tokenizer from local folders only (transformers, local_files_only: never a
download), tokenises --data (a text file, or a folder's .py and .txt files in sorted order, each file
followed by the tokenizer's end-of-sequence token), cuts the token stream into --seq-len sequences
(the tail shorter than one sequence is dropped) and writes the cache (mlkd_fast.lm.cache: per token
the top-k ids bit-packed, their log-probs in --dtype and the fp32 log-mass of the rest). A cache of
the same teacher, tokenizer, corpus and settings at --out is continued (finished shards kept); a
folder holding anything else is refused, naming the field that differs. Exit status 0, or 2 with
one line on stderr for a user error.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        self.exit(2, f"{self.prog}: {message}\n")


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = _Parser(prog=PROG, description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, metavar="DIR", help="the teacher's local Hugging Face folder")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="the tokenizer's local folder (hashed into "
                                                                     "the manifest)")
    p.add_argument("--data", required=True, metavar="FILE_OR_DIR",
                   help="a text file, or a folder whose .py and .txt files (recursively, sorted) are the corpus")
    p.add_argument("--seq-len", type=int, required=True, metavar="L", help="tokens per sequence")
    p.add_argument("--k", type=int, required=True, metavar="K", help="ids stored per token (1 <= K <= vocab)")
    p.add_argument("--out", required=True, metavar="DIR", help="the cache folder (created, or a matching cache "
                                                               "continued)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16",
                   help="dtype of the stored log-probs (default: %(default)s; fp32 is exact)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=None, metavar="N",
                   help="sequences per shard (default: about 2**20 tokens a shard)")
    p.add_argument("--max-shards", type=int, default=None, metavar="N",
                   help="stop after writing N shards (running the command again continues)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    if a.seq_len < 1:
        p.error(f"--seq-len must be >= 1, got {a.seq_len}")
    if a.k < 1:
        p.error(f"--k must be >= 1, got {a.k}")
    if a.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.shard_size is not None and a.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {a.shard_size}")
    if a.max_shards is not None and a.max_shards < 0:
        p.error(f"--max-shards must be >= 0, got {a.max_shards}")
    return a


def _transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise _MissingDependency(f"mlkd-cache lm needs the transformers package: {EXTRA_HINT}") from exc
    return transformers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _quiet(tf) -> None:
    """No download or weight-loading progress bars and no advice on stderr: the command's errors stay one line."""
    try:
        tf.utils.logging.disable_progress_bar()
        tf.utils.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - another transformers layout
        pass


def _load_tokenizer(args: argparse.Namespace):
    tf = _transformers()
    _quiet(tf)
    if not os.path.isdir(args.tokenizer):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer!r}: no such folder (a local Hugging Face folder)")
    try:
        return tf.AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    except Exception as exc:
        raise LMCacheError(f"--tokenizer {args.tokenizer!r}: no tokenizer loads from it ({_first_line(exc)})") from exc


def _load_model(args: argparse.Namespace):
    tf = _transformers()
    _quiet(tf)
    if not os.path.isdir(args.teacher):
        raise FileNotFoundError(f"--teacher {args.teacher!r}: no such folder (a local Hugging Face folder)")
    try:
        return tf.AutoModelForCausalLM.from_pretrained(args.teacher, local_files_only=True)
    except Exception as exc:
        raise LMCacheError(f"--teacher {args.teacher!r}: no causal LM loads from it ({_first_line(exc)})") from exc


def corpus_files(path: str) -> list[str]:
    """The corpus: ``path`` itself (a file), or a folder's .py and .txt files, recursively, sorted by their
    path relative to the folder."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--data {path!r}: no such file or folder")
    found = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            if n.endswith((".py", ".txt")) and not n.startswith("."):
                found.append(os.path.join(root, n))
    return sorted(found, key=lambda f: os.path.relpath(f, path))


def tokenize_corpus(tokenizer: Any, files: Sequence[str], seq_len: int) -> Tensor:
    """The files' text tokenised one file at a time (no special tokens), each followed by the tokenizer's
    end-of-sequence id when it has one, concatenated and cut into ``(S, seq_len)`` (the tail dropped)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        if not text:
            continue
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if isinstance(eos, int):
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise LMCacheError(f"the corpus holds {len(stream)} tokens, fewer than one sequence of --seq-len {seq_len}: "
                           f"give more text or a shorter --seq-len")
    return torch.tensor(stream[:n * seq_len], dtype=torch.int64).reshape(n, seq_len)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Runs ``mlkd-cache lm`` with ``argv``; returns the manifest (errors raised; :func:`cli` prints them)."""
    args = _parse(argv)
    return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    # the checks that need no model first: nothing is loaded or written for a bad --out or corpus
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise LMCacheError(f"--out {out!r} is an existing file, not a folder")
    if os.path.isdir(out) and not os.path.isfile(os.path.join(out, MANIFEST)):
        others = sorted(n for n in os.listdir(out) if not n.startswith(".tmp-"))
        if others:
            raise LMCacheError(f"--out {out!r} is not empty and is not an LM cache (it holds "
                               f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): give an empty or new "
                               f"folder")
    elif os.path.isdir(out):
        _read_manifest(out)  # another kind of cache (e.g. the image teacher cache): refused before loading
    files = corpus_files(args.data)
    if not files:
        raise LMCacheError(f"--data {args.data!r}: the corpus is empty (no .py or .txt file in it)")
    for flag, path in (("--teacher", args.teacher), ("--tokenizer", args.tokenizer)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{flag} {path!r}: no such folder (a local Hugging Face folder)")
    tok = _load_tokenizer(args)
    seqs = tokenize_corpus(tok, files, args.seq_len)
    tok_hash = tokenizer_file_hash(args.tokenizer)
    if os.path.isfile(os.path.join(out, MANIFEST)):  # a cache there: what can be compared before loading the teacher
        stored = _read_manifest(out)
        mine = {"tokenizer.sha256": tok_hash, "data.sha256": token_stream_hash(seqs), "seq_len": args.seq_len,
                "num_sequences": int(seqs.shape[0]), "k": args.k, "logprob_dtype": args.dtype,
                "teacher_batch": args.batch_size}
        if args.shard_size is not None:
            mine["shards.size"] = args.shard_size
        differ = [f"{f} is {_get(stored, f)!r} in the cache but {v!r} here" for f, v in mine.items()
                  if _get(stored, f) != v]
        if differ:
            raise LMCacheError(f"--out {out!r} holds an LM cache of something else ({'; '.join(differ)}): give the "
                               f"cache's settings to resume it, or another --out")
        if args.shard_size is None:
            args.shard_size = stored["shards"]["size"]
    model = _load_model(args)
    ctx = _max_positions(model)
    if ctx is not None and args.seq_len > ctx:
        raise LMCacheError(f"--seq-len {args.seq_len} is longer than the teacher's context (max_position_embeddings = "
                           f"{ctx}): give --seq-len <= {ctx}")
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else \
        int(model.config.vocab_size)
    if args.k > vocab:
        raise LMCacheError(f"--k {args.k} is larger than the teacher's vocabulary ({vocab} ids): give --k <= {vocab}")
    tlen = len(tok)
    if tlen > vocab:
        raise LMCacheError(f"the tokenizer has {tlen} ids but the teacher's vocabulary {vocab}: they are not of one "
                           f"vocabulary (give the teacher's own tokenizer)")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise LMCacheError(f"--device {args.device!r} is not a device ({exc})") from exc
    model = model.to(device).eval()
    extra = {"command": {"teacher": os.path.abspath(args.teacher), "tokenizer": os.path.abspath(args.tokenizer),
                         "data": os.path.abspath(args.data), "files": len(files)}}
    m = write_lm_cache(model, seqs, out, k=args.k, logprob_dtype=args.dtype, batch_size=args.batch_size,
                       tokenizer_hash=tok_hash, resume=True, progress=not args.quiet,
                       shard_size=args.shard_size, max_shards=args.max_shards, extra=extra)
    st, sz = m["status"], m.get("sizes", {})
    print(f"{PROG}: {out}: {st['written']} shard(s) written, {st['kept']} kept, of {st['total']}; "
          f"{'complete' if st['complete'] else 'incomplete (run the command again to continue)'}; "
          f"{m['num_sequences']} x {m['seq_len']} tokens, k = {m['k']}, V = {m['vocab_size']} "
          f"({m['bits_per_id']} bits an id), {sz.get('bytes_per_entry', float('nan')):.3f} B an entry, "
          f"{sz.get('bytes_per_token', float('nan')):.1f} B a token", flush=True)
    return m


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``mlkd-cache lm``'s entry point: 0 when done, 2 after an error in what was given (one line on stderr),
    130 on Ctrl-C (the shards written so far are kept: the same command continues)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parse(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        _run(args)
    except (LMCacheError, FileNotFoundError, ImportError) as exc:
        msg = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip()) or type(exc).__name__
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the shards written so far are kept: the same command continues",
              file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
