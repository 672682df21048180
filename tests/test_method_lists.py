"""Lists generated from the method registry (mlkd_fast.train.method_lists): the methods a teacher cache
serves, those needing its features, and the optional gather hooks; a newly registered method appears
in them with nothing else changed, and they agree with the cache's own refusal of a built method."""
import pytest
import torch

from mlkd_fast import methods as M
from mlkd_fast.methods import registry
from mlkd_fast.methods.base import Distiller, Needs
from mlkd_fast.train import method_lists as L
from mlkd_fast.train.cache import checks
from mlkd_fast.train.errors import InputError


def test_the_lists_are_the_ones_once_written_by_hand():
    assert set(L.cache_served_methods()) == {"kd", "dkd", "dist", "crd", "pkt", "rkd", "cc", "mlkd", "paper"}
    assert set(L.cache_feature_methods()) == {"crd", "pkt", "rkd", "cc", "mlkd", "paper"}
    hooks = L.gather_hooks()
    assert set(hooks) == {"correlation", "supcon"} and {"mlkd", "paper"} <= set(hooks["correlation"])
    assert L.gather_hook_dests() == ("global_correlation", "global_supcon")
    assert "bank" in L.gather_hooks(optional_only=False)  # crd's, set in every multi-process run


@pytest.mark.parametrize("name", M.available() + list(M.presets()))
def test_each_method_is_listed_as_the_cache_refuses_it(name):
    """The generated list and the check of a built method (TeacherCache.check_method) agree."""
    refusal = L.cache_refusal(name)
    if refusal == "trains without a teacher":
        assert not M.method_class(name).needs_teacher
        return
    distiller = L._probe(name)
    if refusal is None:
        checks.check_method("c", True, distiller, name)  # served with features
        if name not in L.cache_feature_methods():
            checks.check_method("c", False, distiller, name)  # and without
        else:
            with pytest.raises(InputError, match="--features"):
                checks.check_method("c", False, distiller, name)
    else:
        with pytest.raises(InputError, match=refusal):
            checks.check_method("c", True, distiller, name)


def test_a_new_method_appears_in_the_lists_by_registering(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Echo(Distiller):
        family = "outputs"
        gather_hooks = {"echo_bank": False}

        @property
        def needs(self) -> Needs:
            return Needs(feats=True)

        def loss_terms(self, student, teacher, target, **context):
            return {"echo": torch.zeros(())}

    registry.register("echo")(Echo)
    L._probe.cache_clear()
    try:
        assert "echo" in L.cache_served_methods() and "echo" in L.cache_feature_methods()
        assert L.gather_hooks()["echo_bank"] == ["echo"] and "global_echo_bank" in L.gather_hook_dests()
        import argparse

        parser = argparse.ArgumentParser()
        L.add_gather_hook_arguments(parser.add_argument_group("x"))
        assert parser.parse_args(["--global-echo-bank"]).global_echo_bank
    finally:
        L._probe.cache_clear()


def test_mlkd_train_flags_config_fields_and_resume_settings_follow_the_hooks():
    """mlkd-train declares one --global-<hook> flag per optional hook (add_gather_hook_arguments), its
    TrainConfig has a field for each (a hook a new method adds fails here until the field is added) and
    a resume checks each; the misuse error names the methods that have the hook."""
    import dataclasses

    from mlkd_fast.train import cli, run
    from mlkd_fast.train.config import TrainConfig

    dests = set(L.gather_hook_dests())
    fields = {f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("global_")}
    assert fields == dests
    assert dests <= set(run.RESUME_SETTINGS)
    help_text = cli.build_parser().format_help()
    for hook in L.gather_hooks():
        assert f"--global-{hook.replace('_', '-')}" in help_text
    with pytest.raises(SystemExit):
        cli.parse_args(["--method", "kd", "--global-supcon"])
