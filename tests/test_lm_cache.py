"""The offline top-k teacher cache for language models (mlkd_fast.lm.cache, ``mlkd-cache lm``; issue #34).

The writer and reader tests use a tiny torch causal LM (embedding, causal running mean, linear head):
no transformers. Only the command-line tests need transformers (a tiny local Llama and BPE tokenizer)
and skip without it."""
import hashlib
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from mlkd_fast.linear_kd import linear_kd_loss
from mlkd_fast.lm import cache as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyLM(torch.nn.Module):
    """Causal: position i sees tokens 0..i only (running mean of embeddings)."""

    def __init__(self, vocab=50, hidden=16, max_positions=None, scale=3.0):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)
        self.scale = scale
        if max_positions is not None:
            self.config = types.SimpleNamespace(max_position_embeddings=max_positions, vocab_size=vocab)

    def forward(self, input_ids):
        h = self.emb(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]
        return types.SimpleNamespace(logits=self.scale * self.head(h))


def _teacher(vocab=50, seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(vocab, **kw).eval()


def _seqs(s=7, length=12, vocab=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (s, length), generator=g)


def _shift(labels):  # Hugging Face's causal shift, as mlkd_fast.lm.hf.shift_labels
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100)


def _folder_bytes(folder):
    out = {}
    for n in sorted(os.listdir(folder)):
        p = os.path.join(folder, n)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                out[n] = f.read()
    return out


# ---------------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [2, 255, 256, 257, 32000, 128256, 151936])
def test_pack_round_trip(vocab):
    bits = C.bits_for_vocab(vocab)
    assert bits == max(1, (vocab - 1).bit_length())
    g = torch.Generator().manual_seed(vocab)
    for n in (1, 7, 8, 1001):
        ids = torch.randint(0, vocab, (n,), generator=g)
        ids[0] = vocab - 1
        if n > 1:
            ids[1] = 0
        packed = C.pack_ids(ids, bits)
        assert packed.size == (n * bits + 7) // 8
        assert torch.equal(C.unpack_ids(packed, n, bits), ids)


def test_pack_refuses_ids_out_of_range():
    with pytest.raises(ValueError, match="2\\*\\*8"):
        C.pack_ids(torch.tensor([256]), 8)


# ---------------------------------------------------------------------------------------------
# the cache reproduces the live teacher
# ---------------------------------------------------------------------------------------------
def _student(n, vocab, hidden=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g)


def _cached(folder):
    cache = C.LMCache.open(folder)
    batch = C.collate([cache.dataset()[i] for i in range(len(cache))])
    return cache, batch


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_full_vocab_cache_equals_live_teacher(tmp_path, divergence):
    vocab = 40
    t, seqs = _teacher(vocab), _seqs(vocab=vocab)
    C.write_lm_cache(t, seqs, str(tmp_path / "c"), k=vocab, logprob_dtype=torch.float32, shard_size=3,
                     batch_size=2, progress=False)
    cache, batch = _cached(str(tmp_path / "c"))
    assert torch.equal(batch["input_ids"], seqs) and torch.equal(batch["labels"], seqs)
    idx, lp, rest = batch["teacher_topk"]
    assert idx.shape == (7, 12, vocab) and lp.dtype == torch.float32 and torch.isneginf(rest).all()
    h, w = _student(seqs.numel(), vocab)
    labels = _shift(batch["labels"]).reshape(-1)
    with torch.no_grad():
        live_logits = t(seqs).logits.reshape(-1, vocab)
    live = linear_kd_loss(h, w, teacher_logits=live_logits, labels=labels, divergence=divergence)
    cached = linear_kd_loss(h, w, teacher_topk=(idx.reshape(-1, vocab), lp.reshape(-1, vocab), rest.reshape(-1)),
                            labels=labels, divergence=divergence)
    torch.testing.assert_close(cached, live, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [8, 32])
def test_topk_cache_is_the_topk_formula(tmp_path, k):
    vocab = 40
    t, seqs = _teacher(vocab), _seqs(vocab=vocab)
    C.write_lm_cache(t, seqs, str(tmp_path / "c"), k=k, shard_size=3, batch_size=len(seqs), progress=False)
    _, batch = _cached(str(tmp_path / "c"))
    idx, lp, rest = batch["teacher_topk"]
    with torch.no_grad():
        logits = t(seqs).logits
    logp = torch.log_softmax(logits.float(), -1)
    want_lp, want_idx = logp.topk(k, -1)
    want_rest = logp.scatter(-1, want_idx, float("-inf")).logsumexp(-1)
    assert torch.equal(idx, want_idx)
    assert torch.equal(lp, want_lp.to(torch.float16).float())
    torch.testing.assert_close(rest, want_rest, rtol=0, atol=1e-6)
    # row i is the distribution of token i + 1 given tokens <= i: the prefix alone gives it
    with torch.no_grad():
        prefix = torch.log_softmax(t(seqs[:, :5]).logits.float(), -1)[:, 4]
    assert torch.equal(idx[:, 4], prefix.topk(k, -1).indices)
    h, w = _student(seqs.numel(), vocab)
    labels = _shift(batch["labels"]).reshape(-1)
    flat = (idx.reshape(-1, k), lp.reshape(-1, k), rest.reshape(-1))
    formula = (want_idx.reshape(-1, k), want_lp.to(torch.float16).float().reshape(-1, k), want_rest.reshape(-1))
    for div in ("forward_kl", "jsd"):
        got = linear_kd_loss(h, w, teacher_topk=flat, labels=labels, divergence=div)
        torch.testing.assert_close(got, linear_kd_loss(h, w, teacher_topk=formula, labels=labels, divergence=div),
                                   rtol=1e-6, atol=1e-6)
        live = linear_kd_loss(h, w, teacher_logits=logits.reshape(-1, vocab), labels=labels, divergence=div)
        if k == 32:  # most of the mass in the top k: close to the live teacher
            assert abs(float(got) - float(live)) < 0.1 * float(live), (div, float(got), float(live))
    # the tail bucket coarse-grains both distributions: the forward KL can only shrink (data processing)
    kd_only = dict(kd_weight=1.0, ce_weight=0.0, divergence="forward_kl")
    assert float(linear_kd_loss(h, w, teacher_topk=flat, **kd_only)) <= float(
        linear_kd_loss(h, w, teacher_logits=logits.reshape(-1, vocab), **kd_only)) + 1e-4


def test_dataset_alignment_collate_and_dataloader(tmp_path):
    t, seqs = _teacher(), _seqs(s=5)
    m = C.write_lm_cache(t, seqs, str(tmp_path / "c"), k=4, logprob_dtype="bf16", shard_size=2, progress=False)
    assert "row i" in m["rows"] and m["logprob_dtype"] == "bf16"
    ds = C.LMCache.open(str(tmp_path / "c")).dataset()
    assert len(ds) == 5
    item = ds[-1]
    assert torch.equal(item["input_ids"], seqs[4]) and item["labels"].dtype == torch.int64
    i, lp, r = item["teacher_topk"]
    assert i.shape == (12, 4) and i.dtype == torch.int64 and lp.shape == (12, 4) and lp.dtype == torch.float32
    assert r.shape == (12,) and r.dtype == torch.float32
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=C.collate)
    shapes = [tuple(b["teacher_topk"][0].shape) for b in loader]
    assert shapes == [(2, 12, 4), (2, 12, 4), (1, 12, 4)]
    with pytest.raises(IndexError):
        ds[5]


# ---------------------------------------------------------------------------------------------
# resume, integrity, identity
# ---------------------------------------------------------------------------------------------
def test_resume_after_a_kill_gives_byte_identical_shards(tmp_path):
    t, seqs = _teacher(), _seqs(s=7)
    kw = dict(k=5, shard_size=2, batch_size=2, progress=False)
    full = C.write_lm_cache(t, seqs, str(tmp_path / "a"), **kw)
    assert full["status"]["complete"] and full["shards"]["count"] == 4
    b = str(tmp_path / "b")
    part = C.write_lm_cache(t, seqs, b, max_shards=1, **kw)  # "killed" after one shard
    assert not part["status"]["complete"] and part["status"]["written"] == 1
    with pytest.raises(ValueError, match="incomplete"):
        C.LMCache.open(b)
    # a kill after the second shard's rename but before the manifest's update, and a torn temp file
    C.write_lm_cache(t, seqs, b, max_shards=1, **kw)
    mpath = os.path.join(b, C.MANIFEST)
    m = json.load(open(mpath))
    m["shards"]["files"][1] = None
    json.dump(m, open(mpath, "w"))
    open(os.path.join(b, ".tmp-torn"), "wb").write(b"half a shard")
    res = C.write_lm_cache(t, seqs, b, **kw)
    assert res["status"] == {**res["status"], "complete": True, "kept": 2, "written": 2}
    a_files = {n: v for n, v in _folder_bytes(str(tmp_path / "a")).items() if n.endswith(".bin")}
    b_files = {n: v for n, v in _folder_bytes(b).items() if n.endswith(".bin")}
    assert a_files == b_files and len(a_files) == 4
    # a corrupt shard on disk is rewritten on resume, identically
    p = os.path.join(b, "s00002.bin")
    open(p, "r+b").write(b"\0\0\0\0")
    again = C.write_lm_cache(t, seqs, b, **kw)
    assert again["status"]["written"] == 1 and open(p, "rb").read() == a_files["s00002.bin"]


def test_check_names_each_field_and_both_values(tmp_path):
    t, seqs = _teacher(), _seqs()
    C.write_lm_cache(t, seqs, str(tmp_path / "c"), k=3, tokenizer_hash="tok-a", progress=False)
    cache = C.LMCache.open(str(tmp_path / "c"))
    fp = C.teacher_fingerprint(t)["weights_sha256"]
    cache.check(teacher_hash=fp, tokenizer_hash="tok-a", data_hash=C.token_stream_hash(seqs), seq_len=12, k=3,
                vocab_size=50)
    cache.check(teacher_hash=t, data_hash=seqs)  # a model and a tensor are hashed
    other = _teacher(seed=5)
    cases = {"teacher_hash": (other, fp), "tokenizer_hash": ("tok-b", "tok-a"),
             "data_hash": (_seqs(seed=9), C.token_stream_hash(seqs)), "seq_len": (16, 12), "k": (8, 3),
             "vocab_size": (51, 50)}
    for field, (given, stored) in cases.items():
        with pytest.raises(ValueError) as e:
            cache.check(**{field: given})
        msg = str(e.value)
        assert "\n" not in msg and field in msg and repr(stored) in msg, msg
        shown = given if isinstance(given, (str, int)) else (
            C.teacher_fingerprint(given)["weights_sha256"] if isinstance(given, torch.nn.Module)
            else C.token_stream_hash(given))
        assert repr(shown) in msg, msg
    with pytest.raises(ValueError, match="seq_len.*; k "):
        cache.check(seq_len=3, k=4)


def test_truncated_or_corrupt_shard_names_the_file(tmp_path):
    t, seqs = _teacher(), _seqs()
    folder = str(tmp_path / "c")
    C.write_lm_cache(t, seqs, folder, k=3, shard_size=3, progress=False)
    p = os.path.join(folder, "s00001.bin")
    data = open(p, "rb").read()
    open(p, "wb").write(data[:-7])
    with pytest.raises(ValueError) as e:
        C.LMCache.open(folder)
    assert repr(p) in str(e.value) and "truncated" in str(e.value) and "\n" not in str(e.value)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    open(p, "wb").write(bytes(flipped))
    ds = C.LMCache.open(folder).dataset()
    ds[0]  # shard 0 is fine
    with pytest.raises(ValueError) as e:
        ds[3]
    assert repr(p) in str(e.value) and "sha256" in str(e.value) and "\n" not in str(e.value)


def test_manifest_names_what_the_cache_is_of(tmp_path):
    t, seqs = _teacher(max_positions=64), _seqs()
    m = C.write_lm_cache(t, seqs, str(tmp_path / "c"), k=3, tokenizer_hash="tok", shard_size=4, progress=False)
    disk = json.load(open(tmp_path / "c" / C.MANIFEST))
    assert disk["teacher"]["weights_sha256"] == C.teacher_fingerprint(t)["weights_sha256"] == m["teacher"]["weights_sha256"]
    assert disk["teacher"]["config"]["max_position_embeddings"] == 64
    assert disk["tokenizer"]["sha256"] == "tok"
    assert disk["data"]["sha256"] == hashlib.sha256(seqs.numpy().astype("<i8").tobytes()).hexdigest()
    for key, want in dict(seq_len=12, num_sequences=7, k=3, vocab_size=50, bits_per_id=6, logprob_dtype="fp16",
                          rest_dtype="fp32", complete=True).items():
        assert disk[key] == want, key
    assert disk["library_version"]
    files = disk["shards"]["files"]
    assert [(f["file"], f["start"], f["stop"]) for f in files] == [("s00000.bin", 0, 4), ("s00001.bin", 4, 7)]
    for f in files:
        p = tmp_path / "c" / f["file"]
        assert os.path.getsize(p) == f["bytes"] and hashlib.sha256(p.read_bytes()).hexdigest() == f["sha256"]
    assert disk["sizes"]["bytes_per_entry"] > 0 and disk["sizes"]["file_bytes"] == sum(f["bytes"] for f in files)


def test_bytes_per_entry_at_32000_k64_fp16(tmp_path):
    vocab, k = 32000, 64
    t, seqs = _teacher(vocab, hidden=4), _seqs(s=8, length=32, vocab=vocab)
    m = C.write_lm_cache(t, seqs, str(tmp_path / "c"), k=k, progress=False)
    sizes = m["sizes"]
    assert sizes["bits_per_id"] == 15
    assert sizes["bytes_per_entry"] == pytest.approx(15 / 8 + 2 + 4 / 64)
    assert sizes["bytes_per_entry"] <= 4 and sizes["file_bytes_per_entry"] <= 4
    assert C.bytes_per_token(vocab, k)["bytes_per_entry"] <= 4
    assert sizes["file_bytes_per_token"] < 300  # DistillKit: ~300 B a token at k = 128


# ---------------------------------------------------------------------------------------------
# bad input: one line, nothing overwritten
# ---------------------------------------------------------------------------------------------
def test_writer_bad_input(tmp_path):
    t, seqs = _teacher(max_positions=10), _seqs(length=8)
    for kw, pattern in ((dict(k=51), "larger than the teacher's vocabulary"), (dict(k=0), "k must be >= 1")):
        with pytest.raises(ValueError, match=pattern):
            C.write_lm_cache(t, seqs, str(tmp_path / "x"), progress=False, **kw)
    with pytest.raises(ValueError, match="max_position_embeddings = 10"):
        C.write_lm_cache(t, _seqs(length=11), str(tmp_path / "x"), k=2, progress=False)
    with pytest.raises(ValueError, match="empty"):
        C.write_lm_cache(t, torch.zeros(0, 8, dtype=torch.long), str(tmp_path / "x"), k=2, progress=False)
    with pytest.raises(ValueError, match="token ids must lie in"):
        C.write_lm_cache(t, seqs + 50, str(tmp_path / "x"), k=2, progress=False)
    assert not (tmp_path / "x").exists()
    # a folder holding other files
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an LM cache .*notes.txt"):
        C.write_lm_cache(t, seqs, str(tmp_path / "other"), k=2, progress=False)
    assert sorted(os.listdir(tmp_path / "other")) == ["notes.txt"]
    # a cache of another teacher, another corpus, other settings: refused naming the field, untouched
    folder = str(tmp_path / "c")
    C.write_lm_cache(t, seqs, folder, k=2, shard_size=3, progress=False)
    before = _folder_bytes(folder)
    for args, kw, field in ((_teacher(max_positions=10, seed=4), seqs, "teacher.weights_sha256"),
                            (t, _seqs(length=8, seed=7), "data.sha256"), (t, seqs, "k")):
        with pytest.raises(ValueError) as e:
            C.write_lm_cache(args, kw, folder, k=3 if field == "k" else 2, shard_size=3, progress=False)
        assert field in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="resume=True"):
        C.write_lm_cache(t, seqs, folder, k=2, shard_size=3, progress=False, resume=False)
    assert _folder_bytes(folder) == before


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def test_topk_reconstruction_kl(tmp_path):
    vocab = 30
    t, seqs = _teacher(vocab), _seqs(s=3, length=6, vocab=vocab)
    rep = C.topk_reconstruction_kl(t, seqs, ks=(1, 4, 16, vocab), batch_size=2)
    with torch.no_grad():
        logp = torch.log_softmax(t(seqs).logits.double(), -1).reshape(-1, vocab)
    p = logp.exp()
    for k in (1, 4, 16):
        top = logp.topk(k, -1)
        q = torch.empty_like(p)
        rest = 1 - top.values.exp().sum(-1, keepdim=True)
        q[:] = rest / (vocab - k)
        q.scatter_(-1, top.indices, top.values.exp())
        want = (p * (logp - q.log())).sum(-1).mean()
        assert rep["kl"][k] == pytest.approx(float(want), rel=1e-6, abs=1e-9)
    assert rep["kl"][vocab] == 0.0
    kls = [e["kl_mean"] for e in rep["per_k"]]
    assert kls == sorted(kls, reverse=True)
    assert rep["tokens"] == 18 and "uniformly" in rep["reconstruction"]
    assert [e["bits_per_id"] for e in rep["per_k"]] == [5] * 4


# ---------------------------------------------------------------------------------------------
# the command (a tiny local Llama and BPE tokenizer)
# ---------------------------------------------------------------------------------------------
TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
        "import os\nprint(os.path.join('a', 'b'))\n", "for i in range(10):\n    print(i * i)\n"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="the mlkd-cache lm command needs transformers "
                                                              "(mlkd_fast[lm])")
    tokenizers = pytest.importorskip("tokenizers", reason="the test's tokenizer needs tokenizers")
    root = tmp_path_factory.mktemp("lm")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(str(root / "tok"))
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(root / "teacher"))
    data = root / "corpus"
    (data / "sub").mkdir(parents=True)
    for i, text in enumerate(TEXT * 3):
        (data / ("sub" if i % 2 else "") / f"f{i:02d}.{'py' if i % 3 else 'txt'}").write_text(text)
    (data / "skip.md").write_text("not read")
    return types.SimpleNamespace(root=root, tok=str(root / "tok"), teacher=str(root / "teacher"), data=str(data),
                                 vocab=len(fast), transformers=transformers)


def _cli(args):
    from mlkd_fast.train.cache import cli  # mlkd-cache's entry point dispatches "lm"

    return cli(["lm", *args])


def test_cli_end_to_end(llama, tmp_path, capsys):
    out = str(tmp_path / "cache")
    base = ["--teacher", llama.teacher, "--tokenizer", llama.tok, "--data", llama.data, "--seq-len", "16",
            "--k", "8", "--out", out, "--quiet", "--shard-size", "2", "--device", "cpu"]
    assert _cli(base + ["--max-shards", "1"]) == 0
    assert "incomplete" in capsys.readouterr().out
    assert _cli(base) == 0  # continues
    assert "complete" in capsys.readouterr().out
    cache = C.LMCache.open(out)
    tf = llama.transformers
    model = tf.AutoModelForCausalLM.from_pretrained(llama.teacher, local_files_only=True).eval()
    tok = tf.AutoTokenizer.from_pretrained(llama.tok, local_files_only=True)
    seqs = C.tokenize_corpus(tok, C.corpus_files(llama.data), 16)
    assert [os.path.basename(f) for f in C.corpus_files(llama.data)][:2] == ["f00.txt", "f02.py"]
    cache.check(teacher_hash=model, tokenizer_hash=C.tokenizer_file_hash(llama.tok), data_hash=seqs, seq_len=16, k=8,
                vocab_size=llama.vocab)
    assert cache.manifest["teacher"]["config"]["model_type"] == "llama"
    batch = C.collate([cache.dataset()[i] for i in range(len(cache))])
    assert torch.equal(batch["input_ids"], seqs)
    with torch.no_grad():
        logp = torch.log_softmax(model(seqs).logits.float(), -1)
    idx, lp, rest = batch["teacher_topk"]
    top = logp.topk(8, -1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(lp, top.values, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rest, logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1), rtol=1e-5, atol=1e-5)


def _one_line_error(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code == 2 and err and "\n" not in err, err
    return err


def test_cli_bad_input(llama, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "cache")
    base = dict(teacher=llama.teacher, tokenizer=llama.tok, data=llama.data, seq_len="16", k="4", out=out)

    def run(**over):
        a = {**base, **over}
        argv = []
        for key, v in a.items():
            argv += [f"--{key.replace('_', '-')}", v]
        return _cli(argv + ["--quiet", "--device", "cpu"])

    assert run() == 0
    capsys.readouterr()
    before = _folder_bytes(out)
    err = _one_line_error(capsys, run(k="5"))
    assert "k is 4 in the cache but 5 here" in err
    other = tmp_path / "other_corpus"
    other.mkdir()
    (other / "a.py").write_text(TEXT[0] * 10)
    assert "data.sha256" in _one_line_error(capsys, run(data=str(other)))
    assert _folder_bytes(out) == before
    notcache = tmp_path / "mine"
    notcache.mkdir()
    (notcache / "keep.txt").write_text("x")
    assert "not an LM cache" in _one_line_error(capsys, run(out=str(notcache)))
    assert sorted(os.listdir(notcache)) == ["keep.txt"]
    assert "max_position_embeddings = 32" in _one_line_error(capsys, run(seq_len="33", out=str(tmp_path / "n1")))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty" in _one_line_error(capsys, run(data=str(empty), out=str(tmp_path / "n2")))
    (empty / "blank.txt").write_text("")
    assert "fewer than one sequence" in _one_line_error(capsys, run(data=str(empty), out=str(tmp_path / "n2")))
    assert "larger than the teacher's vocabulary" in _one_line_error(capsys, run(k=str(llama.vocab + 1),
                                                                                 out=str(tmp_path / "n3")))
    assert "--k must be >= 1" in _one_line_error(capsys, run(k="0", out=str(tmp_path / "n4")))
    assert "no such folder" in _one_line_error(capsys, run(teacher=str(tmp_path / "nope"), out=str(tmp_path / "n5")))
    for n in ("n1", "n2", "n3", "n4", "n5"):
        assert not (tmp_path / n).exists()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert 'pip install "mlkd_fast[lm]"' in _one_line_error(capsys, run(out=str(tmp_path / "n6")))


def test_python_dash_m(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mlkd_fast.lm.cache", "--teacher", str(tmp_path), "--tokenizer",
                          str(tmp_path), "--data", str(tmp_path / "none"), "--seq-len", "8", "--k", "2", "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert "--data" in run.stderr and "no such file or folder" in run.stderr
