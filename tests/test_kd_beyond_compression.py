"""The KD-beyond-compression study (benchmarks/kd_beyond_compression.py, issue #37): its CI slice
(--quick, digits) end to end -- where it writes, calibration before the table, the chosen
configurations used by the table, curves, the early-stopped CE, resuming, the report rebuild -- and its
decisions on hand-made rows: the plateau rule, the choice on validation, the class counts mlkd-train
draws, the declared family, the best control and the claims. Accuracy is not asserted (1-2 epochs)."""
import hashlib
import json
import os
import time

import pytest
import torch

from benchmarks import kd_beyond_compression as study
from benchmarks import study_stats as S


def _committed_digest() -> str:
    """A hash of what the study could rewrite: benchmarks/results/, docs/study.md and the README."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(study.COMMITTED):
        dirs[:] = sorted(d for d in dirs if d != f"{study.NAME}_runs")
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + hashlib.sha256(f.read()).digest())
    for path in (study.DOCS, os.path.join(study.ROOT, "README.md"), study.PROTOCOL_FILE):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The CI slice with no --out, from a scratch folder: it writes runs/kd_beyond_compression_quick/ there
    and nothing committed changes."""
    cwd = tmp_path_factory.mktemp("kdbc")
    before, here = _committed_digest(), os.getcwd()
    os.chdir(cwd)
    start = time.perf_counter()
    try:
        result = study.main(["--quick"])
    finally:
        os.chdir(here)
    result["_seconds"] = time.perf_counter() - start
    assert _committed_digest() == before, "the quick slice rewrote committed results"
    out = cwd / "runs" / "kd_beyond_compression_quick"
    assert (out / "kd_beyond_compression.json").is_file()
    return out, result


def test_default_outputs_are_never_the_committed_results():
    args, _ = study.parse_args(["--quick"])
    assert args.out == os.path.join("runs", "kd_beyond_compression_quick") and args.readme == ""
    args, _ = study.parse_args([])
    assert args.out == os.path.join("runs", "kd_beyond_compression") and args.readme == ""
    args, _ = study.parse_args(["--out", study.COMMITTED])  # the whole study, named: its docs page section too
    assert args.readme == study.DOCS == os.path.join(study.ROOT, "docs", "study.md")
    args, _ = study.parse_args(["--settings", "clean", "--out", study.COMMITTED])
    assert args.readme == ""  # a slice never rewrites it unless --readme names it


def test_quick_slice_calibrates_then_runs_the_table_with_the_choices(quick):
    out, result = quick
    rows = result["rows"]
    cal = [r for r in rows if r["phase"] == "calibration"]
    table = [r for r in rows if r["phase"] == "table"]
    choice = result["choice"]
    # ladders: CE at every length on each group's setting, the teacher on clean
    assert sorted({(r["setting"], r["steps"]) for r in cal if r["role"] == "base"}) == [
        (s, e) for s in ("clean", "lt10", "sym40") for e in (10, 20)]
    assert {r["steps"] for r in cal if r["role"] == "teacher" and r["setting"] == "clean"} == {10, 20}
    assert set(choice["student_steps"]) == {"clean", "noise", "imbalance"} and choice["teacher_steps"] in (10, 20)
    assert all(e in (10, 20) for e in choice["student_steps"].values())
    # a length is SGD steps: the long-tailed set (fewer images) trains more epochs for the same steps
    clean, lt = ([r for r in cal if r["role"] == "base" and r["steps"] == 20 and r["setting"] == s][0]
                 for s in ("clean", "lt10"))
    assert lt["epochs"] > clean["epochs"] == 2
    # the table uses the chosen configurations
    for r in table:
        g = study.SETTINGS[r["setting"]].group
        if r["role"] == "base":
            assert [r["lr"], r["steps"]] == list(choice["baseline"][g])
        elif r["role"] == "teacher":
            assert r["lr"] == choice["teacher_lr"][g] and r["steps"] == choice["teacher_steps"]
        else:
            label = f"{g}:{r['method']}" + (":sd" if r["role"] == "sd" else "")
            assert [r["lr"], r["weight"]] == list(choice["methods"][label]) and r["steps"] == choice["student_steps"][g]
        assert r["curve"] and all(len(p) == 3 for p in r["curve"]), r  # learning curves: every epoch
        assert r["val_top1"] is not None and 0 <= r["top1"] <= 100
    labels = {(r["label"], r["setting"]) for r in table}
    assert ("gce", "sym40") in labels and ("gce", "clean") not in labels and ("cb", "lt10") in labels
    assert ("self-distillation", "clean") in labels and ("kd", "sym40") in labels
    stats = result["statistics"]
    assert set(stats["confirmatory"]) == {"kd:sym40", "kd:lt10"}
    assert {k.split(":")[0] for k in stats["absolute"]} >= {"teacher", "ce", "ce-es", "self-distillation", "ls"}
    assert result["_seconds"] < 90, result["_seconds"]


def test_quick_slice_writes_the_report_and_plots(quick):
    out, result = quick
    text = (out / "kd_beyond_compression.md").read_text()
    assert "Confirmatory family" in text and "Protocol (declared before the runs)" in text
    assert (out / "kd_beyond_compression_severity.png").is_file() or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_second_invocation_trains_nothing(quick, capsys, monkeypatch):
    out, _ = quick
    monkeypatch.chdir(out.parent.parent)
    study.main(["--quick"])
    printed = capsys.readouterr().out
    phases = [line for line in printed.splitlines() if "already finished" in line]
    assert len(phases) == 4 and all(", 0 to train on" in line for line in phases), printed


def test_report_rebuilds_the_docs_section_from_the_json(quick, tmp_path):
    out, _ = quick
    page = tmp_path / "study.md"
    page.write_text(f"# Study\n\nbefore\n{study.START}\nSTALE-SECTION\n{study.END}\nafter\n")
    study.main(["--quick", "--report", "--out", str(out), "--readme", str(page)])
    text = page.read_text()
    assert text.startswith("# Study\n\nbefore\n") and text.endswith("after\n") and "STALE-SECTION" not in text
    assert "Confirmatory family" in text
    missing = tmp_path / "docs" / "new.md"  # a page that does not exist yet is created with the section
    study.main(["--quick", "--report", "--out", str(out), "--readme", str(missing)])
    assert study.START in missing.read_text()


def test_the_declared_family_and_controls_come_from_the_traits():
    assert study.confirmatory_family() == ["dist", "dkd", "kd", "mlkd"]
    assert study.teacher_free_controls("noise") == ["gce", "ls"]
    assert study.teacher_free_controls("imbalance") == ["cb", "ls"]
    args, extra = study.parse_args([])
    protocol = study.build_protocol(args, extra)
    hyps = study.family_hypotheses(protocol)
    assert len(hyps) == 4 * 7 + 4 * 2 and "trend:kd:noise" in hyps and "kd:pair40" in hyps
    assert len(protocol.seeds) >= 10 and S.min_sign_flip_p(len(protocol.seeds)) < 0.05 / len(hyps)
    # every configuration grid has CE's size: 3 lr x 3 lengths for CE, 3 lr x 3 weights for the others
    for m in study.confirmatory_family() + study.teacher_free_controls():
        assert len(study.weight_values(m, study.WEIGHT_FACTORS)) == 3, m
    assert len(study.LR_GRID) * len(study.STEP_LADDER) == 9


def test_heaviest_tail_keeps_four_training_images():
    args, extra = study.parse_args([])
    protocol = study.build_protocol(args, extra)
    assert min(study.setting_counts(protocol, "lt40")) >= study.MIN_TAIL
    args, extra = study.parse_args(["--pool", "100"])
    with pytest.raises(SystemExit, match="at least 4"):
        study.build_protocol(args, extra)


@pytest.mark.parametrize("ratio", [1.0, 10.0, 40.0])
def test_class_counts_are_what_mlkd_train_draws(ratio):
    try:  # where the corruption code lives (mlkd_fast.train is being split into modules)
        from mlkd_fast.train import corruption as D
    except ImportError:
        from mlkd_fast.train import data as D

    labels = torch.arange(10).repeat_interleave(200)
    keep = D.imbalance_indices(labels, ratio, seed=3) if ratio > 1 else torch.arange(len(labels))
    kept = labels[keep]
    held = D.validation_positions(kept, 0.2, seed=3)
    mask = torch.ones(len(kept), dtype=torch.bool)
    mask[held] = False
    assert torch.bincount(kept[mask], minlength=10).tolist() == study.class_counts(200, ratio, 0.2)


def _r(steps, lr, val, **kw):
    return {"steps": steps, "lr": lr, "val_top1": val, "failed": None, **kw}


def test_plateau_rule_and_choice_on_validation():
    rows = [_r(10, 0.1, 90.0), _r(10, 0.2, 92.0), _r(20, 0.1, 93.0), _r(20, 0.2, 93.4), _r(40, 0.2, 93.6)]
    p = study.plateau_steps(rows, (10, 20, 40))
    assert p["steps"] == 20 and p["plateaued"]  # 92 -> 93.4 gains 1.4; 93.4 -> 93.6 gains 0.2 < 1.0
    rising = [_r(10, 0.1, 80.0), _r(20, 0.1, 85.0), _r(40, 0.1, 90.0)]
    assert study.plateau_steps(rising, (10, 20, 40)) == {"steps": 40, "plateaued": False,
                                                         "validation_by_steps": {10: 80.0, 20: 85.0, 40: 90.0}}
    # the mean over seeds; a failed (non-finite) run scores below any; ties go to the smaller values
    rows = [_r(20, 0.2, 90.0), _r(20, 0.2, 94.0), _r(20, 0.8, 92.0), _r(20, 0.8, 92.0), _r(20, 0.05, 99.0),
            {**_r(20, 0.05, None), "failed": "non-finite"}]
    assert study.choose(rows, ("lr",)) == (0.2,)


def _rows(values):
    """Table rows from {(label, role, setting, seed): (test, val, curve)}."""
    out = []
    for (label, role, setting, seed), (test, val, curve) in values.items():
        out.append({"phase": "table", "label": label, "role": role, "method": label, "setting": setting, "seed": seed,
                    "top1": test, "val_top1": val, "curve": curve})
    return out


def test_best_control_family_and_claims_on_hand_made_rows():
    protocol = study.Protocol(data="mnist5k", student="cnn-tiny", teacher="cnn-large", pool=200, batch_size=64,
                              val_fraction=0.2, settings=("clean", "sym40"), seeds=tuple(range(11)),
                              calibration_seeds=(1000,), lr_grid=(0.2,), step_ladder=(1,), teacher_ladder=(1,),
                              weight_factors=(1.0,), family=("kd", "dkd"))
    values = {}
    for seed in range(11):
        for s in ("clean", "sym40"):
            # CE's curve: best validation at epoch 2 (test 70), last epoch test 60
            values[("ce", "base", s, seed)] = (60.0 + seed, 50.0, [[1, 40.0, 65.0], [2, 55.0, 70.0 + seed],
                                                                   [3, 50.0, 60.0 + seed]])
            values[("ls", "method", s, seed)] = (62.0 + seed, 52.0, [])
            values[("self-distillation", "sd", s, seed)] = (61.0 + seed, 51.0, [])
            values[("gce", "method", s, seed)] = (50.0 + seed, 40.0, [])
            values[("kd", "method", s, seed)] = (75.0 + seed + 0.01 * seed, 60.0, [])   # above the best control
            values[("dkd", "method", s, seed)] = (65.0 + seed - 0.01 * seed, 58.0, [])  # below it
            values[("teacher", "teacher", s, seed)] = (90.0, 80.0, [])
    stats = study.statistics_of(protocol, _rows(values))
    assert stats["best_control"]["sym40"] == "ce-es"  # validation 55 beats ls's 52
    fam = stats["confirmatory"]
    assert set(fam) == {"kd:sym40", "dkd:sym40"}  # clean is exploratory; 2 levels: no trend
    assert fam["kd:sym40"]["direction"] == "better" and fam["dkd:sym40"]["direction"] == "worse"
    assert fam["kd:sym40"]["mean"] == pytest.approx(5.05) and fam["kd:sym40"]["reference"] == "ce-es"
    result = {"statistics": stats}
    text = study.claims(result)
    assert "significantly better than the best control** — kd at sym40" in text
    assert "significantly worse than the best control** — dkd at sym40" in text
    explo = stats["exploratory_vs_ce"]
    assert explo["gce:sym40"]["direction"] == "worse" and "gce:sym40" in text


def test_the_plan_and_its_estimate_are_printed_before_anything_trains(capsys):
    result = study.main(["--plan"])
    printed = capsys.readouterr().out
    assert "runs planned" in printed and "estimated" in printed and "min" in printed
    assert result["plan"]["runs"] > 1000 and result["plan"]["minutes"] > 0


def test_the_sizing_pilot_fits_a_cost_model_that_the_estimate_reads(tmp_path, capsys):
    out = tmp_path / "pilot"
    result = study.main(["--quick", "--pilot", "--out", str(out)])
    assert {"teacher", "student", "distil", "cache", "overhead"} <= set(result["cost"])
    kinds = {r["kind"] for r in result["runs"]}
    assert kinds == {"teacher", "student", "distil", "cache"}
    labels = [r["label"] for r in result["runs"]]
    assert "self-distillation" in labels and {"cb", "gce", "ls"} <= set(labels)
    assert json.loads((out / "pilot.json").read_text())["cost"] == result["cost"]
    capsys.readouterr()
    study.main(["--quick", "--plan", "--out", str(out)])
    assert "this --out pilot.json" in capsys.readouterr().out


def test_the_severity_trend_is_in_the_family_with_three_levels():
    protocol = study.Protocol(data="mnist5k", student="cnn-tiny", teacher="cnn-small", pool=200, batch_size=128,
                              val_fraction=0.2, settings=("clean", "sym20", "sym40"), seeds=tuple(range(11)),
                              calibration_seeds=(1000,), lr_grid=(0.2,), step_ladder=(1,), teacher_ladder=(1,),
                              weight_factors=(1.0,), family=("kd",))
    assert study.family_hypotheses(protocol) == ["kd:sym20", "kd:sym40", "trend:kd:noise"]
    values = {}
    for seed in range(11):
        for s, severity in (("clean", 0), ("sym20", 20), ("sym40", 40)):
            values[("ce", "base", s, seed)] = (90.0 - severity / 2 + seed, 80.0, [[1, 80.0, 90.0 - severity / 2 + seed]])
            # kd's gain over CE: 0.05 points per point of noise, plus a seed effect the slope removes
            values[("kd", "method", s, seed)] = (90.0 - severity / 2 + seed + 0.05 * severity + 0.3 * seed
                                                 + 0.001 * seed * severity, 70.0, [])
    stats = study.statistics_of(protocol, _rows(values))
    trend = stats["confirmatory"]["trend:kd:noise"]
    assert trend["mean"] == pytest.approx(0.05 + 0.001 * 5) and trend["direction"] == "better"
    assert trend["severities"] == [0.0, 20.0, 40.0] and trend["n"] == 11
    assert "kd's gain over CE with increasing noise" in study.claims({"statistics": stats})


def test_a_non_finite_run_is_a_finished_failure_and_its_students_fail_untrained(tmp_path, capsys):
    import concurrent.futures as cf

    args, extra = study.parse_args(["--quick"])
    protocol = study.build_protocol(args, extra)
    runs = str(tmp_path / "runs")
    ce = study.Key("t", "clean", "base", study.BASELINE, 0, 1e9, 20)  # an lr that makes the loss NaN
    sd = study.method_key(protocol, "t", "clean", study.SELF_DISTILLATION, 0, 0.2, 20, 1.0, None, ce, sd=True)
    with cf.ThreadPoolExecutor(1) as pool:
        done = study.execute([ce, sd], protocol, runs, pool, 1, 1, "test", "t", {"start": 0.0})
    assert "non-finite" in done[ce]["failed"] and "its teacher failed" in done[sd]["failed"]
    assert study._finished(runs, ce)["failed"]  # kept: a second invocation does not retrain it
    rows = study._rows([ce, sd], done, runs, protocol)
    assert [r["top1"] for r in rows] == [None, None] and study._score(rows[0]) == -1.0


def test_choices_under_long_tail_read_the_balanced_validation_when_reported():
    plain = {"setting": "lt10", "val_top1": 90.0, "failed": None}
    assert study.validation(plain) == 90.0
    assert study.validation({**plain, study.BALANCED_VAL: 60.0}) == 60.0
    assert study.validation({**plain, "setting": "sym40", study.BALANCED_VAL: 60.0}) == 90.0


def test_each_seed_draws_its_own_pool_and_every_run_of_a_seed_shares_it(tmp_path):
    """mnist5k: --subset-seed is the run's seed for the teacher, its cache and the students (one draw per
    seed; the cache's data hash then matches the students'); digits (--quick) draws with --seed itself."""
    args, extra = study.parse_args([])
    protocol = study.build_protocol(args, extra)
    assert protocol.draws_pool
    choice = study.planned_choice(protocol)
    keys = [k for k in study.table_plan(protocol, choice) if k.seed == 3]
    assert {k.role for k in keys} >= {"teacher", "cache", "base", "method"}
    for k in keys:
        argv = study.argv_of(k, protocol, str(tmp_path))
        assert argv[argv.index("--subset-seed") + 1] == argv[argv.index("--seed") + 1] == "3"
        assert argv[argv.index("--train-per-class") + 1] == str(protocol.pool)
    text = study.protocol_text(protocol)
    assert "drawn per seed from each class's 400" in text and "Ratio 100 would leave 2" in text
    args, extra = study.parse_args(["--quick"])
    quick = study.build_protocol(args, extra)
    assert not quick.draws_pool and "--subset-seed" not in study.argv_of(study.ladder_plan(quick)[0], quick, "R")
    # a runs folder of the older protocol (the first images of each class for every seed) is refused
    old = tmp_path / "runs" / "calibration" / "clean" / "base-ce" / "lr0.1_s100" / "seed1000"
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"seed": 1000, "train_per_class": 200}))
    with pytest.raises(SystemExit, match="the first images of each class"):
        study.check_runs(str(tmp_path / "runs"), protocol)
    study.check_runs(str(tmp_path / "runs"), quick)  # digits: nothing drawn by --subset-seed, as recorded
    (old / "config.json").write_text(json.dumps({"seed": 1000, "subset_seed": 1000}))
    study.check_runs(str(tmp_path / "runs"), protocol)


def test_the_curve_under_long_tail_reads_the_balanced_validation(tmp_path):
    key = study.Key("table", "lt10", "base", "ce", 0, 0.1, 100)
    folder = tmp_path / key.folder
    folder.mkdir(parents=True)
    records = [{"phase": "student", "epoch": 1, "top1": 80.0, "val_top1": 90.0, study.BALANCED_VAL: 50.0},
               {"phase": "student", "epoch": 2, "top1": 85.0, "val_top1": 85.0, study.BALANCED_VAL: 70.0}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert study.curve(str(tmp_path), key) == [[1, 50.0, 80.0], [2, 70.0, 85.0]]
    values = study.table_values([{"phase": "table", "role": "base", "label": "ce", "setting": "lt10", "seed": 0,
                                  "top1": 85.0, "val_top1": 85.0, study.BALANCED_VAL: 70.0, "failed": None,
                                  "curve": study.curve(str(tmp_path), key)}])
    assert values[(study.EARLY_STOPPED, "lt10", 0)]["epoch"] == 2  # the best balanced epoch, not the plain one
    plain = study.Key("table", "sym40", "base", "ce", 0, 0.1, 100)
    (tmp_path / plain.folder).mkdir(parents=True)
    (tmp_path / plain.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert study.curve(str(tmp_path), plain) == [[1, 90.0, 80.0], [2, 85.0, 85.0]]


def test_the_claims_say_first_when_a_students_ladder_did_not_plateau():
    """A ladder still rising at its top is stated before any claim (the figures are at a budget, not at the
    end point); none is stated when every group plateaued."""
    fam = {"kd:sym40": {"direction": "none", "mean": 0.1, "reference": "ce"}}
    result = {"statistics": {"confirmatory": fam, "seeds": [0, 1], "exploratory_vs_ce": {}},
              "choice": {"student_plateau": {"clean": {"steps": 800, "plateaued": True},
                                             "imbalance": {"steps": 1600, "plateaued": False}}}}
    text = study.claims(result)
    assert text.startswith("**Not at the end point:**") and "imbalance (1600 steps)" in text and "clean (" not in text
    result["choice"]["student_plateau"]["imbalance"]["plateaued"] = True
    assert study.claims(result).startswith("Confirmatory family")
