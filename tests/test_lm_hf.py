"""mlkd_fast.lm with Hugging Face transformers (issue #34 deliverable 1): tiny Llama-config models built
locally, the loss against Hugging Face's own and against the materialised logits, local-only loading, the
vocabulary and softcap handling, and the DistillationTrainer (live and cached teachers, gradient
accumulation, bf16, checkpoint/resume, 2-process DDP on CPU with the weights of one process)."""
import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason='mlkd_fast.lm needs transformers: pip install "mlkd_fast[lm]"')

from mlkd_fast import LinearKDLoss  # noqa: E402
from mlkd_fast.lm import (MissingDependency, collate_lm, head_of, lm_distill_loss, load_causal_lm,  # noqa: E402
                          load_tokenizer, shift_labels)

ROOT = pathlib.Path(__file__).resolve().parents[1]
V, SEQ = 96, 12
needs_accelerate = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                      reason='the Trainer needs accelerate: pip install "mlkd_fast[lm]"')


def tiny_llama(seed, hidden=32, vocab=V, **extra):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, **extra)
    return transformers.LlamaForCausalLM(config)


def batch_of(n=3, seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                      # left padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A student (hidden 32) and a teacher (hidden 48) saved to local folders and loaded back."""
    root = tmp_path_factory.mktemp("models")
    tiny_llama(0).save_pretrained(root / "student")
    tiny_llama(1, hidden=48).save_pretrained(root / "teacher")
    return root / "student", root / "teacher"


def test_load_from_a_local_folder(folders):
    student_dir, _ = folders
    model = load_causal_lm(student_dir)
    reference = tiny_llama(0)
    assert type(model).__name__ == "LlamaForCausalLM"
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_causal_lm(str(student_dir), dtype=torch.float64).lm_head.weight.dtype == torch.float64


def test_tokenizer_from_a_local_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok")("a b c")["input_ids"] == [1, 2, 0]


def test_hub_id_refused_without_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("a network access was attempted")

    env_before = os.environ.get("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(ValueError, match="local folders only; download it yourself and pass the folder") as e:
            load("meta-llama/Llama-3.2-1B")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a local folder"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(ValueError, match="local_files_only must stay True"):
        load_causal_lm(tmp_path, local_files_only=False)
    assert os.environ.get("HF_HUB_OFFLINE") == env_before   # set for the call only


def test_missing_transformers_says_what_to_install():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import mlkd_fast.lm as lm\n"
            "try:\n    lm.load_causal_lm('.')\nexcept lm.MissingDependency as e:\n    print('MSG', e)\n"
            "try:\n    lm.DistillationTrainer\nexcept ImportError as e:\n    print('MSG', e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    lines = [l for l in run.stdout.splitlines() if l.startswith("MSG")]
    assert len(lines) == 2 and all('pip install "mlkd_fast[lm]"' in l for l in lines), run.stdout
    assert issubclass(MissingDependency, ImportError)


def test_shift_labels_is_hf_shift():
    labels = torch.tensor([[5, 6, -100, 7], [1, 2, 3, 4]])
    assert shift_labels(labels).tolist() == [[6, -100, 7, -100], [2, 3, 4, -100]]
    assert shift_labels(labels, ignore_index=-1)[:, -1].tolist() == [-1, -1]


def test_ce_equals_hf_loss():
    student, batch = tiny_llama(0), batch_of()
    loss = lm_distill_loss(student, batch, LinearKDLoss(kd_weight=0.0, ce_weight=1.0))
    hf = student(**batch).loss
    assert torch.allclose(loss, hf, atol=1e-5, rtol=0), (loss, hf)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    student(**batch).loss.backward()
    for n, p in student.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-5), n


def test_kd_equals_materialised_kl_and_no_logits(folders):
    student, teacher = load_causal_lm(folders[0]), load_causal_lm(folders[1])
    batch = batch_of()
    shapes = []
    handle = student.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    kd = lm_distill_loss(student, batch, LinearKDLoss(temperature=2.0), teacher=teacher)
    handle.remove()
    assert shapes == [(3, 0, V)]                        # the head saw an empty slice: no logits
    kd.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    z_s = student(**inputs).logits
    with torch.no_grad():
        z_t = teacher(**inputs).logits
    kl = F.kl_div((z_s / 2).log_softmax(-1), (z_t / 2).log_softmax(-1), log_target=True, reduction="none").sum(-1)
    counted = shift_labels(batch["labels"]) != -100
    reference = 4.0 * kl[counted].mean()
    assert torch.allclose(kd, reference, atol=1e-5), (kd, reference)
    reference.backward()
    for n, p in student.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-5), n


def test_loss_gemms_stay_fp32_under_autocast(folders):
    """Under bf16 autocast the models' forwards run in bf16, the loss's GEMMs in fp32: the loss equals
    linear_kd_loss outside autocast on the hidden states the autocast forwards produce."""
    from mlkd_fast.functional import linear_kd_loss
    from mlkd_fast.lm import head_inputs

    student, teacher = load_causal_lm(folders[0]), load_causal_lm(folders[1])
    batch, crit = batch_of(), LinearKDLoss(ce_weight=1.0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = lm_distill_loss(student, batch, crit, teacher=teacher)
        h_s = head_inputs(student, inputs)
        with torch.no_grad():
            h_t = head_inputs(teacher, inputs)
    outside = linear_kd_loss(h_s, student.lm_head.weight, teacher_hidden=h_t, teacher_weight=teacher.lm_head.weight,
                             labels=shift_labels(batch["labels"]), ce_weight=1.0)
    assert torch.allclose(under, outside, atol=1e-6, rtol=0), (under, outside)


def test_cached_teacher_topk(folders):
    student, teacher = load_causal_lm(folders[0]), load_causal_lm(folders[1])
    batch = batch_of()
    live = lm_distill_loss(student, batch, LinearKDLoss(ce_weight=0.5), teacher=teacher)
    with torch.no_grad():
        logp = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits.log_softmax(-1)
    full = logp.topk(V, dim=-1)                          # k = V: the cache of the whole distribution
    cached = lm_distill_loss(student, {**batch, "teacher_topk": (full.indices, full.values)},
                             LinearKDLoss(ce_weight=0.5))
    assert torch.allclose(live, cached, atol=1e-5), (live, cached)
    top8 = logp.topk(8, dim=-1)
    rest = torch.log1p(-top8.values.exp().sum(-1).clamp(max=1 - 1e-6))
    part = lm_distill_loss(student, {**batch, "teacher_topk": {"indices": top8.indices, "logprobs": top8.values,
                                                                "rest_logmass": rest}}, LinearKDLoss())
    assert torch.isfinite(part) and part > 0
    with pytest.raises(ValueError, match="pass one"):
        lm_distill_loss(student, {**batch, "teacher_topk": (top8.indices, top8.values)}, LinearKDLoss(),
                        teacher=teacher)
    with pytest.raises(ValueError, match="no teacher"):
        lm_distill_loss(student, batch, LinearKDLoss())


def test_vocab_mismatch_refused():
    student, teacher = tiny_llama(0, vocab=96), tiny_llama(1, vocab=128)
    batch = batch_of()
    with pytest.raises(ValueError, match=r"128-id head.*96-id head.*vocab='shared'") as e:
        lm_distill_loss(student, batch, LinearKDLoss(), teacher=teacher)
    assert "\n" not in str(e.value)
    assert torch.isfinite(lm_distill_loss(student, batch, LinearKDLoss(vocab="shared"), teacher=teacher))


def _softcap_model(cap):
    if hasattr(transformers, "Gemma2Config"):
        torch.manual_seed(0)
        config = transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           max_position_embeddings=64, final_logit_softcapping=cap,
                                           attn_logit_softcapping=None, sliding_window=8)
        return transformers.Gemma2ForCausalLM(config)
    return tiny_llama(0, final_logit_softcapping=cap)


def test_softcap_and_logit_scale_from_config():
    model = _softcap_model(2.0)
    head = head_of(model)
    assert head.softcap == 2.0 and head.logit_scale == 1.0 and head.weight is model.lm_head.weight
    batch = batch_of()
    ce = lm_distill_loss(model, batch, LinearKDLoss(kd_weight=0.0, ce_weight=1.0))
    hf = model(**batch).loss                             # Gemma 2 softcaps its logits before its loss
    if hasattr(transformers, "Gemma2Config"):
        assert torch.allclose(ce, hf, atol=1e-5), (ce, hf)
    assert head_of(tiny_llama(0)).softcap is None
    if hasattr(transformers, "CohereConfig"):
        torch.manual_seed(0)
        cohere = transformers.CohereForCausalLM(transformers.CohereConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, logit_scale=0.25, max_position_embeddings=64))
        assert head_of(cohere).logit_scale == 0.25
        ce = lm_distill_loss(cohere, batch, LinearKDLoss(kd_weight=0.0, ce_weight=1.0))
        assert torch.allclose(ce, cohere(**batch).loss, atol=1e-5)


def test_collate_lm():
    rows = [{"input_ids": torch.arange(4), "labels": torch.arange(4),
             "teacher_topk": (torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2))} for _ in range(3)]
    batch = collate_lm(rows)
    assert batch["input_ids"].shape == (3, 4) and batch["teacher_topk"][0].shape == (3, 4, 2)
    assert collate_lm([(torch.arange(4), torch.arange(4))] * 2)["labels"].shape == (2, 4)
    with pytest.raises(ValueError, match="different shapes"):
        collate_lm([{"input_ids": torch.arange(4)}, {"input_ids": torch.arange(5)}])


# ---------------------------------------------------------------------------------------------
# the Trainer
# ---------------------------------------------------------------------------------------------
class LMData(torch.utils.data.Dataset):
    """Fixed-length examples, some with -100 labels (unequal counted tokens), optionally a teacher's top-k."""

    def __init__(self, n=8, teacher=None, k=8):
        g = torch.Generator().manual_seed(123)
        self.ids = torch.randint(0, V, (n, SEQ), generator=g)
        self.labels = self.ids.clone()
        for i in range(n):
            self.labels[i, : (i * 3) % 7] = -100
        self.topk = None
        if teacher is not None:
            with torch.no_grad():
                top = teacher(input_ids=self.ids).logits.log_softmax(-1).topk(k, dim=-1)
            self.topk = (top.indices, top.values)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        row = {"input_ids": self.ids[i], "labels": self.labels[i]}
        if self.topk is not None:
            row["teacher_topk"] = (self.topk[0][i], self.topk[1][i])
        return row


def _args(out, **kw):
    options = dict(per_device_train_batch_size=2, max_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                   save_strategy="no", optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                   disable_tqdm=True, seed=0, dataloader_num_workers=0)
    options.update(kw)
    return transformers.TrainingArguments(str(out), **options)


def _trainer(student, out, *, teacher=None, data=None, loss=None, **kw):
    from mlkd_fast.lm import DistillationTrainer

    return DistillationTrainer(model=student, args=_args(out, **kw), train_dataset=data or LMData(),
                               teacher_model=teacher, loss=loss or LinearKDLoss(ce_weight=0.5))


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a, b, atol):
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), (name, (a[name] - b[name]).abs().max())


@needs_accelerate
def test_trainer_live_and_cached(tmp_path, folders):
    teacher = load_causal_lm(folders[1])
    for data, kwargs in ((LMData(), {"teacher": teacher}), (LMData(teacher=teacher), {})):
        student = load_causal_lm(folders[0])
        before = _weights(student)
        trainer = _trainer(student, tmp_path, data=data, max_steps=3, **kwargs)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert len(logs) == 3
        for h in logs:
            assert {"kd", "ce"} <= set(h) and h["kd"] > 0 and h["ce"] > 0
            assert abs(h["kd"] + h["ce"] - h["loss"]) < 1e-3 * h["loss"]
        assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())
    assert next(teacher.parameters()).requires_grad is False and not teacher.training


@needs_accelerate
def test_gradient_accumulation_equals_the_large_batch(tmp_path, folders):
    teacher = load_causal_lm(folders[1])
    runs = []
    for batch, accumulate in ((4, 1), (2, 2)):
        student = load_causal_lm(folders[0])
        _trainer(student, tmp_path / f"ga{accumulate}", teacher=teacher, per_device_train_batch_size=batch,
                 gradient_accumulation_steps=accumulate, max_steps=2).train()
        runs.append(_weights(student))
    _assert_same(runs[0], runs[1], atol=2e-6)


@needs_accelerate
def test_bf16_autocast(tmp_path, folders):
    teacher = load_causal_lm(folders[1])
    losses = {}
    for bf16 in (False, True):
        try:
            trainer = _trainer(load_causal_lm(folders[0]), tmp_path / str(bf16), teacher=teacher, bf16=bf16,
                               max_steps=1)
        except (ValueError, RuntimeError) as exc:  # pragma: no cover - depends on the CPU
            pytest.skip(f"bf16 is not available on this CPU: {exc}")
        trainer.train()
        losses[bf16] = trainer.state.log_history[0]["loss"]
    assert abs(losses[True] - losses[False]) < 0.05 * losses[False], losses


@needs_accelerate
def test_checkpoint_resume_equals_uninterrupted(tmp_path, folders):
    teacher = load_causal_lm(folders[1])
    common = dict(teacher=teacher, max_steps=4, optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="linear")
    student = load_causal_lm(folders[0])
    _trainer(student, tmp_path / "a", save_strategy="steps", save_steps=2, **common).train()
    uninterrupted = _weights(student)
    assert (tmp_path / "a" / "checkpoint-2").is_dir()
    resumed = tiny_llama(7)                             # other weights: the checkpoint replaces them
    _trainer(resumed, tmp_path / "b", **common).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    _assert_same(uninterrupted, _weights(resumed), atol=1e-6)


def _one_ddp_step(student_dir, teacher_dir, out, per_device):
    """One SGD step of a DistillationTrainer on the 4 examples of LMData(n=4): under torchrun each rank
    gets per_device of them; alone, all 4 at once."""
    distributed = "LOCAL_RANK" in os.environ
    student, teacher = load_causal_lm(student_dir), load_causal_lm(teacher_dir)
    trainer = _trainer(student, out, teacher=teacher, data=LMData(n=4), per_device_train_batch_size=per_device,
                       max_steps=1, loss=LinearKDLoss(ce_weight=0.5, divergence="jsd"),
                       **({"ddp_backend": "gloo"} if distributed else {}))
    trainer.train()
    return trainer, {"world": trainer.args.world_size, "weights": _weights(student), "log": trainer.state.log_history[0]}


DDP_WORKER = r'''
import sys, torch
sys.path.insert(0, sys.argv[4])
import test_lm_hf as t

trainer, result = t._one_ddp_step(*sys.argv[1:4], per_device=2)
if trainer.is_world_process_zero():
    torch.save(result, sys.argv[3] + "/result.pt")
# end the process group before the interpreter exits: gloo's threads torn down at exit aborted a rank
# ("terminate called without an active exception", exit -6) in one CI run
import torch.distributed as dist
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
'''


@needs_accelerate
def test_ddp_two_processes_equal_one(tmp_path, folders):
    """torchrun, 2 CPU processes (gloo), 2 examples each with unequal counted tokens, one SGD step: the
    weights equal one process's step on the 4 examples."""
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "world2"
    out.mkdir()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(folders[0]), str(folders[1]), str(out), str(ROOT / "tests")],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    results = {2: torch.load(out / "result.pt"), 1: _one_ddp_step(*folders, tmp_path / "world1", per_device=4)[1]}
    assert results[2]["world"] == 2 and results[1]["world"] == 1
    _assert_same(results[1]["weights"], results[2]["weights"], atol=1e-6)
    before = _weights(load_causal_lm(folders[0]))
    assert any(not torch.equal(before[n], results[2]["weights"][n]) for n in before)  # it did step
    assert abs(results[1]["log"]["loss"] - results[2]["log"]["loss"]) < 1e-5
