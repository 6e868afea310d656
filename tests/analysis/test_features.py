"""The explorer's feature store: statistics against a brute-force recomputation, layout, errors."""

import json

import pytest
import torch

from dlmscope.analysis.features import FeatureStore, FeatureStoreConfig, build_feature_store
from dlmscope.errors import DLMScopeError
from dlmscope.hooks import run_with_cache
from dlmscope.sae import SAEConfig, SAE
from dlmscope.sae.metrics import fvu

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def rows(tokenizer):
    from dlmscope.data import heldout_rows

    return heldout_rows(tokenizer, 32, n=12)


@pytest.fixture(scope="module")
def built(llada, tiny_sae, rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("fs") / "store"
    build_feature_store(llada, tiny_sae, rows, out, FeatureStoreConfig(batch_size=5), sae_name="tiny")
    return FeatureStore.open(out)


def _dense_latents(lm, sae, store):
    """Recompute every latent from the recorded tokens and mask flags."""
    tokens, masked = store.t["tokens"].long(), store.t["masked"].bool()
    xt = tokens.masked_fill(masked, lm.mask_id)
    acts = run_with_cache(lm, xt, [HOOK])[HOOK].flatten(0, 1)
    return acts, sae.encode(acts), masked.flatten()


def test_statistics_match_brute_force(llada, tiny_sae, built):
    acts, dense, masked = _dense_latents(llada, tiny_sae, built)
    fired = dense > 0
    s = built.stats()
    torch.testing.assert_close(s["density"], fired.float().mean(0))
    torch.testing.assert_close(s["max_act"], dense.max(0).values)
    torch.testing.assert_close(s["mean_act"], dense.sum(0) / fired.sum(0).clamp_min(1))
    torch.testing.assert_close(s["masked_rate"], fired[masked].float().mean(0))
    torch.testing.assert_close(s["visible_rate"], fired[~masked].float().mean(0))
    m = built.manifest
    assert m["l0"] == pytest.approx(fired.sum(1).float().mean().item())
    assert m["dead_fraction"] == pytest.approx((fired.sum(0) == 0).float().mean().item())
    assert m["fvu"] == pytest.approx(fvu(acts, tiny_sae.decode(dense)), rel=1e-4)
    assert m["fvu_masked"] == pytest.approx(fvu(acts[masked], tiny_sae.decode(dense[masked])), rel=1e-4)
    # per-feature activations: every non-zero latent, largest first
    f = int(s["density"].argmax())
    pos, val = built.activations(f)
    assert torch.equal(pos.sort().values, fired[:, f].nonzero().flatten())
    assert torch.all(val[:-1] >= val[1:]) and torch.allclose(val, dense[pos, f])
    assert int(built.t["hist"][f].sum()) == fired[:, f].sum()


def test_masking_is_dlmscope_style(built, rows):
    masked = built.t["masked"].bool()
    assert torch.equal(built.t["tokens"].long(), rows)  # the original tokens are shown, masks are flags
    assert not masked[:, 0].any()  # BOS kept
    frac = masked[:, 1:].float().mean(1)
    assert 0.0 < frac.mean() < 0.6 and built.manifest["n_masked"] == int(masked.sum())
    assert built.manifest["config"]["t_low"] == 0.05 and built.manifest["config"]["t_high"] == 0.5


def test_examples_quantiles_and_logits(llada, tiny_sae, built):
    s = built.stats()
    f = int(s["density"].argmax())
    top = built.top_examples(f, 10)
    assert len(top) == 10 and top[0]["value"] == pytest.approx(float(s["max_act"][f]))
    for ex in top:
        assert len(ex["tokens"]) == len(ex["acts"]) == len(ex["masked"]) <= 11
        assert ex["acts"][ex["center"]] == pytest.approx(ex["value"])
        assert ex["tokens"][ex["center"]] == built.manifest["vocab"][int(built.t["tokens"][ex["seq"], ex["pos"]])]
    groups = built.quantile_groups(f)
    assert len(groups) == 10 and sum(g["count"] for g in groups) == int(s["count"][f])
    assert all(a["low"] >= b["high"] for a, b in zip(groups, groups[1:]))
    direction = tiny_sae.W_dec.detach() / tiny_sae.input_scale * llada.module.model.norm.weight.detach()
    effect = direction @ llada.module.lm_head.weight.detach().t()
    logits = built.logits(f)
    assert [v for _, v in logits["top"]] == pytest.approx(effect[f].topk(10).values.tolist(), rel=1e-4)
    assert [v for _, v in logits["bottom"]] == pytest.approx((-effect[f]).topk(10).values.neg().tolist(), rel=1e-4)
    assert built.top_tokens(f) and len(built.top_tokens(f)) <= 5
    centres, counts = built.histogram(f)
    assert len(centres) == len(counts) == 40 and centres[-1] < float(s["max_act"][f])


def test_rebuild_is_atomic_and_leaves_no_temporaries(llada, tiny_sae, rows, tmp_path):
    out = tmp_path / "store"
    cfg = FeatureStoreConfig(n_seqs=4)
    build_feature_store(llada, tiny_sae, rows, out, cfg)
    build_feature_store(llada, tiny_sae, rows, out, FeatureStoreConfig(n_seqs=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert FeatureStore.open(out).manifest["n_seqs"] == 3


def test_mismatches_and_bad_input_are_one_line_errors(llada, tiny_sae, rows, tmp_path):
    other_model = SAE(SAEConfig(64, 32, 4, metadata={"model_name": "some-other-model", "hook_name": HOOK}))
    with pytest.raises(DLMScopeError, match="trained on model 'some-other-model'"):
        build_feature_store(llada, other_model, rows, tmp_path / "a")
    wide = SAE(SAEConfig(128, 32, 4, metadata={"model_name": llada.name, "hook_name": HOOK}))
    with pytest.raises(DLMScopeError, match="d_in=128"):
        build_feature_store(llada, wide, rows, tmp_path / "a")
    no_hook = SAE(SAEConfig(64, 32, 4, metadata={"model_name": llada.name}))
    with pytest.raises(DLMScopeError, match="hook_name"):
        build_feature_store(llada, no_hook, rows, tmp_path / "a")
    with pytest.raises(DLMScopeError, match="no held-out tokens"):
        build_feature_store(llada, tiny_sae, rows[:0], tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(DLMScopeError, match="not a feature store"):
        FeatureStore.open(tmp_path)


def test_store_checks_feature_range_version_and_sae(built, tmp_path):
    with pytest.raises(DLMScopeError, match="out of range"):
        built.activations(built.n_latents)
    with pytest.raises(DLMScopeError, match="out of range"):
        built.check_feature(-1)
    other = SAE(SAEConfig(64, 32, 4, metadata={"model_name": "llada", "hook_name": HOOK}))
    with pytest.raises(DLMScopeError, match="rebuild it for this SAE"):
        built.check_matches(other)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"version": 1}))
    (folder / "store.safetensors").write_bytes(b"")
    with pytest.raises(DLMScopeError, match="unreadable|version"):
        FeatureStore.open(folder)


def test_empty_store_and_causal_models(tiny_dirs, rows, tmp_path):
    from dlmscope.models import load_model

    causal = load_model(tiny_dirs["causal"])
    sae = SAE(SAEConfig(64, 48, 4, metadata={"model_name": causal.name, "hook_name": HOOK}))
    store = FeatureStore.open(build_feature_store(causal, sae, rows, tmp_path / "c", FeatureStoreConfig(n_seqs=4)))
    assert not store.manifest["diffusion"] and store.manifest["n_masked"] == 0
    assert not store.t["masked"].any() and store.manifest["fvu_masked"] is None
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)  # nothing fires
    store = FeatureStore.open(build_feature_store(causal, sae, rows, tmp_path / "e", FeatureStoreConfig(n_seqs=2)))
    assert store.empty and store.manifest["dead_fraction"] == 1.0
    assert store.top_examples(0) == [] and store.quantile_groups(0) == []


def test_build_out_refuses_what_is_not_a_store(llada, tiny_dirs, tiny_sae, rows, tmp_path, capsys):
    """`features build --out X`: a file or a folder of other things is never deleted; an unwritable X is one line."""
    from dlmscope.cli import main
    from dlmscope.sae import save_sae

    sae_dir = save_sae(tiny_sae, tmp_path / "sae")
    notes, paper = tmp_path / "notes", tmp_path / "paper.txt"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    paper.write_text("keep me too")
    for out, needle in ((notes, "non-empty folder that is not a feature store"), (paper, "exists and is not a folder"),
                        ("/proc/x", "cannot write the feature store '/proc/x'")):
        with pytest.raises(SystemExit) as e:
            main(["features", "build", "--sae", str(sae_dir), "--model", str(tiny_dirs["llada"]), "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert (notes / "mine.txt").read_text() == "keep me" and paper.read_text() == "keep me too"
    (tmp_path / "empty").mkdir()
    build_feature_store(llada, tiny_sae, rows, tmp_path / "empty", FeatureStoreConfig(n_seqs=2))
    assert FeatureStore.open(tmp_path / "empty").manifest["n_seqs"] == 2
    with pytest.raises(DLMScopeError, match="not a feature store"):
        build_feature_store(llada, tiny_sae, rows, notes, FeatureStoreConfig(n_seqs=2))
