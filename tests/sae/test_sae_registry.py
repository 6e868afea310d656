import pytest

from dlmscope import DLMScopeError
from dlmscope.sae import load_sae, registry, save_sae
from dlmscope.sae.registry import REGISTRY


def test_registry_lives_in_the_package_and_lists_entries():
    assert REGISTRY.parent.name == "saes" and REGISTRY.parent.parent.name == "dlmscope"
    for name, entry in registry().items():
        assert {"path", "model", "hook", "k", "n_latents", "description"} <= set(entry), name


def test_load_by_name_or_folder(trained, tmp_path):
    save_sae(trained.sae, tmp_path / "mine")
    assert load_sae(tmp_path / "mine").cfg.hook_name == "blocks.0.hook_resid_post"
    assert load_sae(str(tmp_path / "mine")).cfg.k == 4
    for name, entry in registry().items():
        sae = load_sae(name)
        assert (sae.cfg.k, sae.cfg.n_latents, sae.cfg.hook_name) == (entry["k"], entry["n_latents"], entry["hook"])


def test_unknown_name_lists_known_names():
    with pytest.raises(DLMScopeError) as err:
        load_sae("nope")
    msg = str(err.value)
    assert msg.startswith("unknown SAE 'nope'") and "\n" not in msg
    for name in registry():
        assert name in msg
