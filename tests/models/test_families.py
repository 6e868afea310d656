import json
import shutil

import pytest

from dlmscope import DLMScopeError
from dlmscope.models import FAMILIES, detect_family, load_model, register_family


def test_every_family_is_registered_once():
    assert list(FAMILIES) == ["llada", "dream", "masked_lm", "causal", "transformer_lens", "lladamoe", "llada2"]
    with pytest.raises(ValueError, match="registered twice"):
        register_family("llada", ".llada:load_llada")


def test_detection_order_architecture_then_model_type_then_suffix():
    assert detect_family({"model_type": "dream", "architectures": ["DreamModel"]}) == "dream"
    assert detect_family({"model_type": "bert", "architectures": ["BertForMaskedLM"]}) == "masked_lm"
    assert detect_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == "causal"
    with pytest.raises(DLMScopeError, match="no model_type; pass family= one of llada, dream"):
        detect_family({})


def test_one_registration_call_adds_a_loadable_family(tiny_dirs, tmp_path):
    folder = tmp_path / "renamed"
    shutil.copytree(tiny_dirs["llada"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llada_renamed"}))
    register_family("llada_renamed", "dlmscope.models.llada:load_llada", model_types=("llada_renamed",))
    try:
        lm = load_model(folder)
        assert lm.n_layers == load_model(tiny_dirs["llada"]).n_layers and lm.is_diffusion
    finally:
        del FAMILIES["llada_renamed"]


def test_families_without_a_folder_loader_or_device_map_say_so(tiny_dirs):
    with pytest.raises(DLMScopeError, match="family 'transformer_lens' cannot be loaded from a folder"):
        load_model(tiny_dirs["causal"], family="transformer_lens")
    with pytest.raises(DLMScopeError, match="device_map is not supported for masked_lm models"):
        load_model(tiny_dirs["causal"], family="masked_lm", device_map="auto")
