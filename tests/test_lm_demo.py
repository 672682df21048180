"""python -m mlkd_fast.lm.demo --quick end to end (issue #34, deliverable 3): the JSON's fields, a re-run
that trains nothing again, the report as a pure function of the JSON, and nothing committed touched."""
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = [m for m in ("transformers", "tokenizers", "scipy") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the LM demo needs {', '.join(MISSING)} (pip install "
                                                        f"'mlkd_fast[lm]')")


def _tree_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(args):
    """The command in this process (its throughput children are processes of their own); torch's
    thread count, which the command sets, restored."""
    import torch

    from mlkd_fast.lm import demo

    threads = torch.get_num_threads()
    try:
        return demo.main(args)
    finally:
        torch.set_num_threads(threads)


def test_quick_end_to_end(tmp_path):
    from mlkd_fast.lm import demo

    committed = {"results": _tree_hashes(ROOT / "benchmarks" / "results"),
                 "readme": hashlib.sha256((ROOT / "README.md").read_bytes()).hexdigest(),
                 "docs": hashlib.sha256((ROOT / "docs" / "lm.md").read_bytes()).hexdigest()}
    work, out = tmp_path / "work", tmp_path / "out"
    _run(["--quick", "--work", str(work), "--out", str(out)])
    result = json.loads((out / "lm_stdlib.json").read_text())

    p = demo.QUICK
    assert result["quick"] is True and result["fingerprint"] == p.fingerprint()
    corpus = result["corpus"]
    assert corpus["python"] == result["environment"]["python"] and len(corpus["sha256"]) == 64
    assert all(corpus["files"][s] >= 1 and corpus["tokens"][s] > 0 for s in ("train", "val", "test"))
    files = result["corpus_files"]  # split by file: no file in two splits
    assert not (set(files["train"]) & set(files["val"]) or set(files["train"]) & set(files["test"])
                or set(files["val"]) & set(files["test"]))
    assert all(not any(part in demo.EXCLUDED_DIRS for part in f.split("/")) for s in files for f in files[s])
    assert len(result["tokenizer"]["sha256"]) == 64 and result["tokenizer"]["vocab"] <= p.vocab
    assert result["teacher"]["test"]["ppl"] > 1
    # the grid (CE's lr grid as large as each KD arm's) and the table: every arm at every seed
    assert len(result["grid"]) == len(p.ce_lrs) + len(demo.KD_ARMS) * len(p.kd_grid)
    assert sorted((r["arm"], r["seed"]) for r in result["runs"]) == sorted(
        (a, s) for a in demo.ARMS for s in p.seeds)
    for r in result["runs"]:
        sel = result["selected"][r["arm"]]
        assert (r["lr"], r["alpha"], r["temperature"]) == (sel["lr"], sel["alpha"], sel["temperature"])
        assert r["test"]["ppl"] > 1 and r["tokens"] == p.student_steps * p.batch * p.seq_len
    st = result["statistics"]
    assert set(st["arms"]) == set(demo.ARMS) and set(st["vs_ce"]) == set(demo.KD_ARMS)
    for arm in demo.KD_ARMS:
        d = st["vs_ce"][arm]
        assert d["n"] == len(p.seeds) and d["p_holm"] >= d["p"] and d["ci_low"] <= d["mean"] <= d["ci_high"]
    cache = result["cache"]
    assert cache["k"] == p.topk and 0 < cache["bytes_per_entry"] <= 4 + 4 / p.topk  # ids packed, fp16, fp32 rest
    kl = {int(k): v for k, v in result["topk_reconstruction"]["kl"].items()}
    assert sorted(kl) == sorted(k for k in p.topk_ks if k <= result["tokenizer"]["vocab"])
    assert all(kl[a] >= kl[b] - 1e-9 for a, b in zip(sorted(kl), sorted(kl)[1:]))  # more entries, less lost
    tp = {(r["shape"], r["loop"]): r for r in result["throughput"]}
    assert [(r["shape"], r["loop"]) for r in result["throughput"]] == [
        ("demo", "fused"), ("demo", "hf_materialised"), ("large", "fused"), ("large", "hf_materialised")]
    assert set(tp) == {(s, loop) for s in ("demo", "large") for loop in ("fused", "hf_materialised")}
    for shape in ("demo", "large"):
        fused, eager = tp[(shape, "fused")], tp[(shape, "hf_materialised")]
        assert fused["tokens_per_s"] > 0 and eager["tokens_per_s"] > 0 and eager["peak_rss_mb"] > 0
        # the same loss on the same batch: the fused loop computes what HF's logits give
        assert fused["first_step_loss"] == pytest.approx(eager["first_step_loss"], rel=1e-4)

    # a re-run trains nothing again
    runs = {p_.name: p_.stat().st_mtime_ns for p_ in (work / "runs").iterdir()}
    teacher = (work / "teacher.json").stat().st_mtime_ns
    _run(["--quick", "--work", str(work), "--out", str(out)])
    assert {p_.name: p_.stat().st_mtime_ns for p_ in (work / "runs").iterdir()} == runs
    assert (work / "teacher.json").stat().st_mtime_ns == teacher
    again = json.loads((out / "lm_stdlib.json").read_text())
    assert again["runs"] == result["runs"] and again["statistics"] == result["statistics"]

    # the report: a pure function of the JSON, written only into the marked section it is given
    docs = tmp_path / "lm.md"
    shutil.copy(ROOT / "docs" / "lm.md", docs)
    outputs = []
    for _ in range(2):
        demo.main(["--report", "--out", str(out), "--docs", str(docs)])
        outputs.append([(out / "lm_stdlib.md").read_text(), docs.read_text()])
    assert outputs[0] == outputs[1]
    assert outputs[0][0] == demo.markdown(result)
    b, a = (ROOT / "docs" / "lm.md").read_text(), docs.read_text()
    assert b.split(demo.START)[0] == a.split(demo.START)[0] and b.split(demo.END)[1] == a.split(demo.END)[1]
    assert demo.markdown(result).strip() in a

    assert _tree_hashes(ROOT / "benchmarks" / "results") == committed["results"]
    assert hashlib.sha256((ROOT / "README.md").read_bytes()).hexdigest() == committed["readme"]
    assert hashlib.sha256((ROOT / "docs" / "lm.md").read_bytes()).hexdigest() == committed["docs"]


def test_quick_never_writes_committed_results():
    from mlkd_fast.lm import demo

    with pytest.raises(SystemExit):
        demo.parse_args(["--quick", "--out", str(ROOT / "benchmarks" / "results")])
    with pytest.raises(SystemExit):
        demo.parse_args(["--work", str(ROOT / "benchmarks" / "results" / "x")])
    args = demo.parse_args(["--quick"])
    assert args.docs == "" and args.work.startswith(str(ROOT / "runs"))


def test_split_by_file_is_deterministic():
    from mlkd_fast.lm import demo

    assert demo.split_of("json/decoder.py") == demo.split_of("json/decoder.py")
    splits = [demo.split_of(f"pkg/m{i}.py") for i in range(2000)]
    assert 0.75 < splits.count("train") / 2000 < 0.85 and splits.count("val") > 100 and splits.count("test") > 100
