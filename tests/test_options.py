from dataclasses import fields

import pytest

from dlmscope.errors import DLMScopeError
from dlmscope.options import load_config_file
from dlmscope.sae import TrainConfig
from dlmscope.sae.train import JumpReLUConfig, OptimiserConfig
from dlmscope.training import DiffConfig, TrainSAEConfig

TRAINER_SETTINGS = ("warmup_steps", "aux_coef", "k_aux", "dead_tokens", "b_dec_init", "l0_warmup", "target_l0",
                    "decay_fraction")


@pytest.mark.parametrize("bad,message", [
    (dict(batch_size=-5), "batch_size=-5 must be an integer >= 1"),
    (dict(device="banana"), "device='banana' is not a torch device"),
    (dict(site="nowhere"), "site='nowhere'; allowed: pre, mid, post, mlp_in, mlp_out"),
    (dict(t_min=0.7), "t_max=0.5 must be a finite number in [0.7, 1]"),
    (dict(optimizer="sgd"), "optimizer='sgd'; allowed: adam, signum_sf"),
    (dict(warmup_steps=-1), "warmup_steps=-1"),
    (dict(specific_threshold=0.4), "specific_threshold=0.4"),
    (dict(checkpoints="a"), "at least two comma-separated checkpoints"),
    (dict(k="0"), "k=0 must be an integer >= 1"),
])
def test_diff_config_runs_the_checks_of_every_part(bad, message):
    """The issue's example (`checkpoints="a,b", batch_size=-5, device="banana", site="nowhere"`) fails on each."""
    with pytest.raises(DLMScopeError) as e:
        DiffConfig(**{"checkpoints": "a,b", **bad})
    assert message in str(e.value)


def test_diff_config_is_checkpoints_data_dictionary_optimiser_and_run():
    names = {f.name for f in fields(DiffConfig)}
    assert not names & {"model", "architecture", "l0_coef", "prefix_sizes", "target_site", "bandwidth"}
    assert set(TRAINER_SETTINGS) - {"l0_warmup", "target_l0"} <= names
    cfg = DiffConfig(checkpoints="a, b", lr=None, optimizer="signum_sf")
    assert cfg.model == "a" and cfg.checkpoint_list() == ["a", "b"] and cfg.run_name() == "diff-a_vs_b-L1-k32"
    assert TrainConfig.of(cfg).optimizer == "signum_sf" and TrainConfig.of(cfg).batch_size == 256


def test_every_trainer_setting_is_a_train_sae_setting_once():
    names = [f.name for f in fields(TrainSAEConfig)]
    assert len(names) == len(set(names))
    shared = {f.name for f in fields(OptimiserConfig)} | {f.name for f in fields(JumpReLUConfig)}
    assert set(TRAINER_SETTINGS) <= shared <= set(names)
    cfg = TrainSAEConfig(warmup_steps=7, aux_coef=0.5, k_aux=3, dead_tokens=99, b_dec_init="mean", l0_warmup=0.3,
                         target_l0=5, decay_fraction=0.5, total_tokens=2048, batch_size=256)
    tcfg = TrainConfig.of(cfg)
    assert [getattr(tcfg, n) for n in TRAINER_SETTINGS] == [7, 0.5, 3, 99, "mean", 0.3, 5, 0.5]
    assert (tcfg.total_tokens, tcfg.batch_size) == (2048, 256)


def test_types_are_checked_from_the_hints():
    with pytest.raises(DLMScopeError, match="lr='fast' must be a finite number"):
        TrainSAEConfig(lr="fast")
    with pytest.raises(DLMScopeError, match="progress='no' must be true or false"):
        TrainSAEConfig(progress="no")
    with pytest.raises(DLMScopeError, match="b_dec_init='median'; allowed: geometric_median, mean"):
        TrainConfig(b_dec_init="median")
    cfg = TrainSAEConfig(k=32, policy="", lr=1)  # a YAML number for a text field; "" was how unset was written
    assert cfg.k == "32" and cfg.policy is None and cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_renamed_config_keys(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("cache: acts\nthreshold: 0.8\n")
    values = load_config_file(tmp_path / "c.yaml", DiffConfig)
    assert values == {"activation_cache": "acts", "specific_threshold": 0.8}
    assert capsys.readouterr().err.count("is deprecated") == 2
