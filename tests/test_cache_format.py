"""The teacher cache's format as a package: caches written before the field table still load and
replay (a fixture made by the code at commit 36efb4c), today's writer writes the same shards, a new
field is one row of the table, and the writer reaches the trainer through one adapter only."""
import ast
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mlkd_fast.train import data as D
from mlkd_fast.train import main as train
from mlkd_fast.train import replay as R
from mlkd_fast.train.cache import checks, format as F, reader
from mlkd_fast.train.cache import writer as W
from mlkd_fast.train.cache.reader import CachedSource, TeacherCache
from mlkd_fast.train.models import build_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "teacher_cache_v1"
# the fixture's command (digits, 5 training images per class: 50 samples; 2 epochs of 2 shards)
COMMON = ["--data", "digits", "--train-per-class", "5", "--teacher-arch", "cnn-tiny", "--epochs", "2",
          "--batch-size", "16", "--shard-size", "32", "--device", "cpu", "--quiet"]
FORMATS = {"all_fp32": ["--features"], "top3_fp16_rot4": ["--top-k", "3", "--logits-dtype", "fp16", "--rotations", "4"]}


def _copy(name: str, tmp_path) -> str:
    """A copy of a fixture cache (a run must not write next to the repository's files)."""
    dst = tmp_path / name
    shutil.copytree(FIXTURE / name, dst)
    return str(dst)


def _manifest(folder) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def test_the_format_v1_layout_is_the_table_s():
    """The layout of both fixture manifests, spelled out: a change of the table that changes it breaks
    every existing cache (a new format version is needed then)."""
    full, topk = _manifest(FIXTURE / "all_fp32"), _manifest(FIXTURE / "top3_fp16_rot4")
    assert F.shard_layout(full, 32) == {
        "index": ((32,), torch.int32), "valid": ((32,), torch.bool), "aug": ((32, 3), torch.int32),
        "logits": ((32, 1, 10), torch.float32), "feats": ((32, 1, 16), torch.float32)}
    assert F.shard_layout(topk, 18) == {
        "index": ((18,), torch.int32), "valid": ((18,), torch.bool), "aug": ((18, 3), torch.int32),
        "topk_values": ((18, 4, 3), torch.float16), "topk_indices": ((18, 4, 3), torch.int32),
        "rest_lse": ((18, 4), torch.float32)}
    for folder, m in ((FIXTURE / "all_fp32", full), (FIXTURE / "top3_fp16_rot4", topk)):
        for e in range(2):
            for k in range(2):
                state = checks.read_shard(F.shard_path(str(folder), e, k), m, e, k)  # checksum and layout
                assert list(state) == [*F.SHARD_HEADER, *F.shard_layout(m, state["count"]), "sha256"]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_an_old_cache_replays_the_teacher_and_trains_as_the_live_one(name, tmp_path):
    """The fixture opens, every shard checks, its replayed outputs are the teacher's on the replayed
    views; the all-classes fp32 one trains the same student as the live teacher."""
    cache = _copy(name, tmp_path)
    teacher = build_model("cnn-tiny", 10, str(FIXTURE / "teacher.pt"), in_channels=1).eval()
    x, y, _, _ = D.load_digits_split(seed=0, train_per_class=5)
    views = 4 if "rot4" in name else 1
    source = D.MemorySource(x, y, D.Shard(16), 0, torch.device("cpu"), pad=D.DIGITS_PAD)
    replay = CachedSource(source, TeacherCache.open(cache), torch.device("cpu"), views=views)
    for epoch in range(2):
        for xb, yb, index, out in replay.epoch(epoch):
            with torch.no_grad():
                logits, feats = teacher(D.with_rotations(xb, views))
            if views == 1:
                torch.testing.assert_close(out.logits, logits)
                torch.testing.assert_close(out.feats, feats)
            else:  # top 3 in fp16: the stored classes keep their logits (to fp16), the rest share rest_lse
                top = logits.topk(3, -1).indices
                torch.testing.assert_close(out.logits.gather(1, top), logits.gather(1, top), atol=2e-2, rtol=2e-3)
                assert out.feats is None
    if views == 1:
        run = ["--data", "digits", "--train-per-class", "5", "--method", "kd", "--epochs", "2", "--batch-size", "16",
               "--quiet", "--no-curves"]
        live = train(run + ["--teacher-arch", "cnn-tiny", "--teacher-weights", str(FIXTURE / "teacher.pt"),
                            "--teacher-epochs", "0", "--out", str(tmp_path / "live")])
        cached = train(run + ["--teacher-cache", cache, "--out", str(tmp_path / "cached")])
        a = torch.load(tmp_path / "live" / "student.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "cached" / "student.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a) and live["student_top1"] == cached["student_top1"]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_todays_writer_writes_the_old_caches_shards(name, tmp_path):
    """The same command today: the same manifest (what is compared), the same shard keys in the same
    order, the same samples and views, the same outputs."""
    old = FIXTURE / name
    new = W.main(COMMON + FORMATS[name] + ["--teacher-weights", str(FIXTURE / "teacher.pt"), "--out",
                                           str(tmp_path / name)])
    assert checks.differences(_manifest(old), {k: v for k, v in new.items() if k != "status"}) == []
    for e in range(2):
        for k in range(2):
            a = F.load_shard(F.shard_path(str(old), e, k))
            b = F.load_shard(F.shard_path(str(tmp_path / name), e, k))
            assert list(a) == list(b)
            for key, value in a.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    torch.testing.assert_close(b[key], value, rtol=1e-5, atol=1e-5)  # another CPU's rounding
                elif key != "sha256":
                    assert torch.equal(b[key], value) if isinstance(value, torch.Tensor) else b[key] == value, key


def test_a_new_field_is_one_row_of_the_table(tmp_path, monkeypatch):
    """A row with its producer (here the margin between the two largest logits of each view): written by
    the writer, in the layout and the checksum the checks compare, no other code touched."""
    margin = F.Field("margin", ("V",), torch.float32, "always", None,
                     lambda t: t.logits.topk(2, -1).values.diff(dim=-1).neg().squeeze(-1))
    monkeypatch.setattr(F, "FIELDS", F.FIELDS + (margin,))
    out = str(tmp_path / "c")
    m = W.main(COMMON + ["--teacher-weights", str(FIXTURE / "teacher.pt"), "--out", out])
    state = checks.read_shard(F.shard_path(out, 1, 0), m, 1, 0)
    assert state["margin"].shape == (32, 1) and (state["margin"] >= 0).all() and state["margin"].sum() > 0
    logits = state["logits"][:, 0].topk(2, -1).values
    torch.testing.assert_close(state["margin"][:, 0], logits[:, 0] - logits[:, 1])
    state["margin"][0] += 1  # the checksum covers the new field
    assert checks.shard_problem(state, m, 1, 0) == "its checksum does not match its contents"
    del state["margin"]
    assert "its margin is none" in checks.shard_problem(state, m, 1, 0)


def _imports(path: Path) -> set[str]:
    """The modules of mlkd_fast.train a file of the cache package imports (lazily too), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "mlkd_fast.train.cache" if path.parent.name == "cache" else "mlkd_fast.train"
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_writer_reaches_the_trainer_through_its_adapter_only():
    """No module of the cache package but _trainer_glue imports the trainer (cli, run, loop); the reading
    side (format, checks, inputs, reader, and replay, which the trainer imports) imports neither the
    writer nor the adapter."""
    trainer = {"mlkd_fast.train.cli", "mlkd_fast.train.run", "mlkd_fast.train.loop"}
    package = ROOT / "mlkd_fast" / "train" / "cache"
    reading = {"format", "checks", "inputs", "reader"}
    for path in package.glob("*.py"):
        imported = _imports(path)
        if path.stem != "_trainer_glue":
            assert not imported & trainer, (path.name, imported & trainer)
        if path.stem in reading:
            assert not imported & {"mlkd_fast.train.cache.writer", "mlkd_fast.train.cache._trainer_glue"}, path.name
    replay = _imports(ROOT / "mlkd_fast" / "train" / "replay.py")
    assert not replay & (trainer | {"mlkd_fast.train.cache.writer", "mlkd_fast.train.cache._trainer_glue",
                                    "mlkd_fast.train.cache"}), replay


def test_the_trainer_facing_names_stay_importable():
    """What run.py, the tests and the benchmarks import from mlkd_fast.train.cache / .replay."""
    from mlkd_fast.train import cache as C

    for name in ("main", "cli", "create", "parse_cache_args", "check_cache_out", "PROG"):
        assert callable(getattr(C, name)) or isinstance(getattr(C, name), str), name
    for name in ("TeacherCache", "CachedSource", "data_identity", "file_sha256", "read_shard", "shard_path",
                 "rebuild_logits", "write_shard"):
        assert hasattr(R, name), name
    assert os.path.basename(F.shard_path("x", 3, 12)) == "e0003-s00012.pt"


@pytest.mark.parametrize("read", ["whole", "streamed"])
@pytest.mark.parametrize("damage, message", [
    ("order", "holds other samples at these positions of epoch 1 than this run draws"),
    ("valid", "holds no outputs for sample"),
    ("view", "was cached with the view"),
])
def test_the_replay_verifies_each_shard_once_and_names_it(damage, message, read, tmp_path, monkeypatch):
    """A shard whose samples are of another order, lack outputs, or were cached with other views (its
    checksum rewritten to match): refused when the replay reaches it, naming the file, whichever of its
    rows differs (here the last one drawn, in the epoch's last batch); the same whether the cache was
    read whole when the replay was built or is streamed."""
    if read == "streamed":
        monkeypatch.setattr(reader, "PRELOAD_MAX_BYTES", 0)
    cache = _copy("all_fp32", tmp_path)
    m = _manifest(cache)
    path = F.shard_path(cache, 0, 1)
    state = checks.read_shard(path, m, 0, 1)
    last = 47 - 32  # position 47: the last drawn (3 batches of 16 of the 50 samples), in shard 1
    if damage == "order":
        state["index"][[last, last - 1]] = state["index"][[last - 1, last]]
    elif damage == "valid":
        state["valid"][last] = False
    else:
        state["aug"][last, 0] = (state["aug"][last, 0] + 1) % 3
    os.unlink(path)
    F.write_shard(path, state)
    x, y, _, _ = D.load_digits_split(seed=0, train_per_class=5)
    source = D.MemorySource(x, y, D.Shard(16), 0, torch.device("cpu"), pad=D.DIGITS_PAD)
    replay = CachedSource(source, TeacherCache.open(cache), torch.device("cpu"), views=1)
    batches = replay.epoch(0)
    next(batches)  # shard 0: intact
    with pytest.raises(ValueError, match=message) as err:
        list(batches)
    assert "e0000-s00001.pt" in str(err.value)


def test_a_small_cache_is_read_whole_when_built_and_replays_as_the_streamed_one(tmp_path, monkeypatch):
    """A cache within PRELOAD_MAX_BYTES is read and verified when the replay is built: its epochs read
    no file (here every shard file is gone by then), and they yield what the streamed replay yields, in
    one slice per slot where the stored logits are a view of training's (all C, fp32, one view)."""
    cache = _copy("all_fp32", tmp_path)
    x, y, _, _ = D.load_digits_split(seed=0, train_per_class=5)

    def source():
        return D.MemorySource(x, y, D.Shard(12), 0, torch.device("cpu"), pad=D.DIGITS_PAD)

    whole = CachedSource(source(), TeacherCache.open(cache), torch.device("cpu"), views=1)
    monkeypatch.setattr(reader, "PRELOAD_MAX_BYTES", 0)
    streamed = CachedSource(source(), TeacherCache.open(cache), torch.device("cpu"), views=1)
    epochs = TeacherCache.open(cache).epochs
    expected = [list(streamed.epoch(e)) for e in range(epochs)]
    for f in os.listdir(cache):
        if f.endswith(".pt"):
            os.unlink(os.path.join(cache, f))
    for e in range(epochs):
        for (xb, yb, ib, out), (xs, ys, is_, out_s) in zip(whole.epoch(e), expected[e], strict=True):
            assert torch.equal(xb, xs) and torch.equal(yb, ys) and torch.equal(ib, is_)
            assert torch.equal(out.logits, out_s.logits) and (out.feats is None) == (out_s.feats is None)
            if out.feats is not None:
                assert torch.equal(out.feats, out_s.feats)
    held = whole._shard(0, 0)
    assert held.slots is not None and held.slots["logits"].untyped_storage().data_ptr() == \
        held.state["logits"].untyped_storage().data_ptr()


def test_an_in_memory_source_drawing_another_order_is_refused_before_its_first_batch(tmp_path):
    """An in-memory set's batches are read as slices of the stored order: the source's epoch order is
    compared with the cache's once, at the epoch's start (here a source of another seed, which
    ``check_against`` would have refused by name before training)."""
    x, y, _, _ = D.load_digits_split(seed=0, train_per_class=5)
    source = D.MemorySource(x, y, D.Shard(16), 1, torch.device("cpu"), pad=D.DIGITS_PAD)
    replay = CachedSource(source, TeacherCache.open(_copy("all_fp32", tmp_path)), torch.device("cpu"), views=1)
    with pytest.raises(ValueError, match="draws epoch 1's samples in another order than the cache holds"):
        next(replay.epoch(0))


def test_replayed_outputs_are_the_stored_rows_in_the_batch_order(tmp_path):
    """Batches of consecutive positions read slices, others gather: the same rows either way (a batch of
    12 crosses the 32-sample shards and a DDP rank's batches are strided)."""
    cache = _copy("all_fp32", tmp_path)
    m = _manifest(cache)
    stored = {k: checks.read_shard(F.shard_path(cache, 1, k), m, 1, k) for k in range(2)}
    x, y, _, _ = D.load_digits_split(seed=0, train_per_class=5)
    for shard in (D.Shard(12), D.Shard(8, rank=1, world=2)):
        source = D.MemorySource(x, y, shard, 0, torch.device("cpu"), pad=D.DIGITS_PAD)
        replay = CachedSource(source, TeacherCache.open(cache), torch.device("cpu"), views=1)
        for _, _, index, out in replay.epoch(1):
            pos = {int(i): p for p, i in enumerate(torch.cat([stored[0]["index"], stored[1]["index"]]).tolist())}
            rows = [pos[int(i)] for i in index]
            logits = torch.cat([stored[0]["logits"], stored[1]["logits"]])[rows, 0]
            assert torch.equal(out.logits, logits)


def test_the_replay_also_yields_the_step_s_keyword_arguments(tmp_path):
    """``batches``: the same batches as ``epoch`` in the (x, y, extras) shape a loop calling
    ``step(x, y, **extras)`` reads."""
    replay = CachedSource(D.MemorySource(*D.load_digits_split(seed=0, train_per_class=5)[:2], D.Shard(16), 0,
                                         torch.device("cpu"), pad=D.DIGITS_PAD),
                          TeacherCache.open(_copy("all_fp32", tmp_path)), torch.device("cpu"), views=1)
    for (x, y, index, out), (x2, y2, extras) in zip(replay.epoch(1), replay.batches(1, with_index=True)):
        assert torch.equal(x, x2) and torch.equal(y, y2) and set(extras) == {"index", "teacher_outputs"}
        assert torch.equal(extras["index"], index) and torch.equal(extras["teacher_outputs"].logits, out.logits)
    assert set(next(replay.batches(0))[2]) == {"teacher_outputs"}
