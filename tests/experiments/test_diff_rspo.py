"""The diffing study: its text mix holds the stated task share, the paper-rule count, the checkpoints a run needs,
and the narrow Countdown fine-tune of the positive control."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import diff_rspo  # noqa: E402


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_mixed_text_has_the_stated_task_share(monkeypatch, tmp_path, share):
    import dlmscope.data
    from dlmscope.data import builtin_corpus
    from dlmscope.models import load_model

    prose = builtin_corpus("train")[:300]
    monkeypatch.setattr(dlmscope.data, "load_texts", lambda name, split, *a: prose if split == "train" else [])
    path = diff_rspo.mixed_text(tmp_path, share)
    assert path.name == f"diff_mixed_task{share:g}.txt"
    tok = load_model("dlmscope-tiny-dlm").tokenizer
    docs = path.read_text().strip().split("\n\n")
    counts = {"countdown": 0, "sudoku": 0, "prose": 0}
    for doc, ids in zip(docs, tok(docs)["input_ids"]):
        counts[diff_rspo._is_task_text(doc) or "prose"] += len(ids)
    total = sum(counts.values())
    assert counts["countdown"] / total == pytest.approx(share / 2, abs=0.01)
    assert counts["sudoku"] / total == pytest.approx(share / 2, abs=0.01)
    assert sorted(d for d in docs if diff_rspo._is_task_text(d) is None) == sorted(p.replace("\n\n", "\n") for p in prose)


def _hand_built():
    """Latent 0 lives only in B (specific to it), latent 1 is shared, latent 2 only in A but never fires."""
    import torch

    from dlmscope.sae.crosscoder import CrossCoder, CrossCoderConfig

    e, z = torch.eye(4), torch.zeros(4)
    cc = CrossCoder(CrossCoderConfig(4, 3, 1, ["A", "B"]))
    with torch.no_grad():
        cc.W_dec.copy_(torch.stack([torch.stack([z, e[1], e[2]]), torch.stack([e[0], e[1], z])]))
        cc.W_enc.copy_(torch.stack([torch.cat([z, e[0]]), torch.cat([e[1], e[1]]), torch.cat([-e[3], z])], dim=1))
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        cc.threshold.fill_(0.0)
    return cc, e


def _text(acts):
    import torch

    from dlmscope.analysis.diffing import PairedText

    n = acts.shape[0]
    return PairedText(torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n, dtype=torch.long),
                      torch.zeros(1, n, dtype=torch.bool), acts)


KINDS = ["prose"] * 3 + ["sudoku"] + ["countdown"] * 4


def test_paper_rule_counts_alive_latents_and_the_kinds_of_their_top_examples():
    import torch

    cc, e = _hand_built()
    # 8 tokens: B's e0 strength grows along the sequence; e1 everywhere
    acts = torch.stack([torch.cat([e[1], (i / 8) * e[0] + e[1]]) for i in range(8)])
    out = diff_rspo._paper_rule(cc, _text(acts), KINDS)
    assert out["later"] == 1 and out["base"] == 0
    assert out["examples_later"] == {"countdown": 4, "sudoku": 1, "prose": 0}
    assert out["examples_base"] == {"countdown": 0, "sudoku": 0, "prose": 0}


def test_most_leaning_ranks_alive_latents_by_relative_norm():
    """With one latent per side: the later side is latent 0 (B only), the base side the shared latent 1, since
    latent 2 (A only) never fires; e1 fades along the sequence, so latent 1's top examples are the first five."""
    import torch

    cc, e = _hand_built()
    acts = torch.stack([torch.cat([(1 - i / 8) * e[1], (i / 8) * e[0] + (1 - i / 8) * e[1]]) for i in range(8)])
    out = diff_rspo._most_leaning(cc, _text(acts), KINDS, n=1)
    assert out["later"]["relative_norm"] == [1.0, 1.0]
    assert out["later"]["examples"] == {"countdown": 4, "sudoku": 1, "prose": 0}
    assert out["base"]["relative_norm"] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert out["base"]["examples"] == {"countdown": 1, "sudoku": 1, "prose": 3}
    assert out["all"] == {"countdown": 5, "sudoku": 2, "prose": 3}


def test_pair_checkpoints_keeps_only_what_the_pairs_need():
    default = {p: diff_rspo.PAIRS[p] for p in diff_rspo.DEFAULT_PAIRS}
    assert default == {"base_vs_base": (0, 0), "base_vs_rspo": (0, 1), "base_vs_countdown": (0, 2)}
    assert diff_rspo.pair_checkpoints(list(diff_rspo.DEFAULT_PAIRS)) == ((0, 1, 2), default)
    assert diff_rspo.pair_checkpoints(["base_vs_countdown"]) == ((0, 2), {"base_vs_countdown": (0, 1)})
    assert diff_rspo.pair_checkpoints(["base_vs_base"]) == ((0,), {"base_vs_base": (0, 0)})
    assert diff_rspo.pair_checkpoints(["base_vs_spg", "base_vs_diffu_grpo"]) == (
        (0, 3, 4), {"base_vs_spg": (0, 1), "base_vs_diffu_grpo": (0, 2)})
    assert [diff_rspo.CHECKPOINTS[i] for i in (3, 4)] == ["spg", "diffu_grpo"]


def test_study_setup_takes_the_rl_checkpoints_it_is_given_and_no_countdown_finetune(monkeypatch, tmp_path):
    """The other RL methods' pairs read --spg / --diffu-grpo, say which checkpoint is missing and how to make it,
    and do not fine-tune the Countdown control they do not use."""
    import argparse

    p = argparse.ArgumentParser()
    diff_rspo.add_study_options(p, total_tokens=1000, expansion=1, k=4)
    spg, grpo = tmp_path / "spg", tmp_path / "grpo"
    args = p.parse_args(["--spg", str(spg), "--diffu-grpo", str(grpo)])
    assert args.rspo == diff_rspo.ROOT / "runs" / "rl-rspo" / "checkpoint-00030"
    monkeypatch.setattr(diff_rspo, "ROOT", tmp_path)
    monkeypatch.setattr(diff_rspo, "mixed_text", lambda folder, share: folder / "mixed.txt")
    monkeypatch.setattr(diff_rspo, "finetune_countdown", lambda *a, **k: pytest.fail("fine-tuned an unused control"))
    spg.mkdir()
    (spg / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=f"missing diffu-grpo checkpoint {grpo}; run: dlmscope rspo --algo diffu-grpo"):
        diff_rspo.study_setup(args, "t", eval_every=10, used=(0, 3, 4))
    ckpts, data, cfg, config = diff_rspo.study_setup(args, "t", eval_every=10, used=(0, 3))
    assert ckpts == config["checkpoints"] == ["dlmscope-tiny-dlm", str(spg)]
    assert data == tmp_path / "runs" / "mixed.txt" and config["finetune"] is None and cfg.total_tokens == 1000


def test_ft_tag_leaves_the_full_finetune_folder_name_unchanged():
    assert diff_rspo._ft_tag("all", 0.0) == ""
    assert diff_rspo._ft_tag("model.layers.0.mlp,model.layers.1.mlp", 10.0) == "-L0.mlp_L1.mlp-keep10"
    assert diff_rspo._ft_tag("model.layers.0.mlp", 10.0, "prose,sudoku") == "-L0.mlp-keep10-prose_sudoku"


def test_drift_is_the_relative_squared_change():
    import torch

    base = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert diff_rspo._drift(base, base).item() == 0.0
    assert diff_rspo._drift(base + torch.tensor([[0.0, 0.0], [1.0, 2.0]]), base).item() == pytest.approx(5 / 25)


def test_narrow_finetune_changes_only_the_named_weights_and_records_its_effect(tmp_path):
    import torch

    from dlmscope.models import load_model

    out = diff_rspo.finetune_countdown(tmp_path / "ft", steps=2, lr=1e-2, params="model.layers.1.mlp", preserve=1.0,
                                       preserve_on="prose,sudoku")
    base, ft = (dict(load_model(m).module.named_parameters()) for m in ("dlmscope-tiny-dlm", str(out)))
    changed = sorted(n for n in base if not torch.equal(base[n], ft[n]))
    assert changed == [f"model.layers.1.mlp.{w}_proj.weight" for w in ("down", "gate", "up")]
    info = json.loads((out / "finetune.json").read_text())
    assert info["n_trained"] == 3 * 768 * 256 and info["params"] == "model.layers.1.mlp" and info["drift_last10"] > 0
    assert info["preserve_on"] == "prose,sudoku"
    for kind in ("prose", "countdown", "sudoku"):
        e = info["eval"][kind]
        assert e["rows"] == 64 and e["drift"] > 0 and e["loss_ft"] != e["loss_base"]
    with pytest.raises(SystemExit, match="names no parameter"):
        diff_rspo.finetune_countdown(tmp_path / "bad", steps=1, lr=1e-2, params="model.layers.9")
    with pytest.raises(SystemExit, match="allowed: prose or prose,sudoku"):
        diff_rspo.finetune_countdown(tmp_path / "bad", steps=1, lr=1e-2, preserve=1.0, preserve_on="sudoku")
