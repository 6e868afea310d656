"""Activation patching: a planted copy circuit is found exactly where it is, step patching follows the sampler,
attribution patching agrees with exact patching, and bad input is one line."""

import pytest
import torch

from dlmscope.analysis.patching import Patch, Patcher, PatchSetup, agreement, sweep_figure
from dlmscope.errors import DLMScopeError

V, MASK, SRC, COPY = 32, 31, 2, range(10, 20)  # vocabulary, mask id, source position, copyable tokens
PROMPT = [1, 2, 12, 4, 5]  # token 12 at SRC; the corrupted prompt holds 15 there


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 2-layer LLaDA whose layer-0 head 0 copies the one copyable token into the masked position.

    Embeddings are one-hot (d 0..31); head 0's query reads the mask token and its key every copyable token on
    the slowest rotary pair (dims 7 / 15 of the head, theta 1e12: no rotation), its value carries the token's
    identity and its output writes it to d 32..41, the only dims the unembedding reads (d 32+j -> token 10+j).
    Heads 1-3 of both layers attend and write too, but into d 48..63, which nothing reads; MLPs are zero.
    """
    from dlmscope.models import load_model
    from dlmscope.models.llada import save_llada
    from dlmscope.models.tiny import tiny_llama

    m = tiny_llama(d_model=64, n_layers=2, n_heads=4, d_mlp=32, vocab_size=V, seed=0, rope_theta=1e12)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.model.embed_tokens.weight[:, :V] = torch.eye(V)
        m.model.norm.weight.fill_(1.0)
        for j, t in enumerate(COPY):
            m.lm_head.weight[t, 32 + j] = 4.0
        for i, layer in enumerate(m.model.layers):
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            attn = layer.self_attn
            for h in range(1, 4):  # distractor heads: random attention, output into unread dims
                rows = slice(16 * h, 16 * h + 16)
                for w in (attn.q_proj, attn.k_proj, attn.v_proj):
                    w.weight[rows, :V] = torch.randn(16, V, generator=gen)
                attn.o_proj.weight[48:64, rows] = 0.01 * torch.randn(16, 16, generator=gen)
            if i == 0:
                attn.q_proj.weight[7, MASK] = 3.0
                attn.k_proj.weight[7, list(COPY)] = 3.0
                for j, t in enumerate(COPY):
                    attn.v_proj.weight[j, t] = 1.0
                    attn.o_proj.weight[32 + j, j] = 1.0
    folder = save_llada(m, tmp_path_factory.mktemp("planted") / "m", mask_id=MASK)
    return load_model(folder)


def setup(**kw) -> PatchSetup:
    corrupted = list(PROMPT)
    corrupted[SRC] = 15
    return PatchSetup(PROMPT, corrupted, target=-1, answer=12, wrong=15, gen_length=1, **kw)


def test_planted_copy_head_and_position_are_found_and_nothing_else(planted, one_thread):
    r = Patcher(planted, setup(batch_size=4)).sweep("layer_position", attribution=True)
    clean, corrupted = r.clean, r.corrupted
    assert clean > 5 and corrupted < -5
    n = r.normalised
    assert r.rows == [0, 1] and r.cols == list(range(6))
    # the copied token's own position at layer 0, and the target after the copy (layer 1's input)
    assert n[0, SRC] == pytest.approx(1.0, abs=1e-3) and n[1, 5] == pytest.approx(1.0, abs=1e-3)
    others = n.clone()
    others[0, SRC] = others[1, 5] = 0
    assert others.abs().max() < 0.01  # distractor heads only move the final norm a little
    # batched: 12 patched rows at 4 per forward, after the clean and the corrupted forward; attribution: 1 more
    assert (r.forwards, r.sequences) == (2 + 3 + 1, 2 + 12 + 1)
    # attribution patching: one forward + backward, and it points at the same two cells
    assert r.agreement["top_overlap"] >= 0.4 and r.agreement["pearson"] > 0.9 and r.agreement["sign_agreement"] == 1.0
    attr = r.attribution / (clean - corrupted)
    assert attr[0, SRC] > 0.3 and attr[1, 5] > 0.3  # a linear estimate through the norms: not exact
    assert set(attr.flatten().abs().topk(2).indices.tolist()) == {SRC, 6 + 5}


def test_planted_head_is_the_only_head_that_matters(planted, one_thread):
    from dlmscope.hooks import run_with_cache

    p = Patcher(planted, setup(batch_size=8))
    r = p.sweep("layer_head", attribution=True)
    assert r.rows == [0, 1] and r.cols == [0, 1, 2, 3] and (r.forwards, r.sequences) == (2 + 1 + 1, 2 + 8 + 1)
    n = r.normalised
    assert n[0, 0] == pytest.approx(1.0, abs=0.01)  # the distractors still read the corrupted token
    others = n.clone()
    others[0, 0] = 0
    assert others.abs().max() < 0.01
    assert int(r.attribution.abs().argmax()) == 0 and r.agreement["pearson"] > 0.9
    # head 0 at the source position only does nothing: its output at the target is what carries the answer
    only = p.run([Patch("blocks.0.attn.hook_z", positions=(SRC,), head=0),
                  Patch("blocks.0.attn.hook_z", positions=(-1,), head=0)]).metric
    assert only[0] == pytest.approx(r.corrupted, abs=1e-4) and only[1] == pytest.approx(r.effect[0, 0].item(), abs=1e-4)
    # and its pattern: the masked target attends to the copied token
    ids = p._ids(PROMPT, 1)
    pattern = run_with_cache(planted, ids, ["blocks.0.attn.hook_pattern"])["blocks.0.attn.hook_pattern"]
    assert pattern[0, 0, -1, SRC] > 0.99


def test_a_model_without_attention_internals_is_one_line(tiny_dirs, capsys):
    from dlmscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(["patch", "--model", str(tiny_dirs["causal"]), "--backend", "remote", "--family", "llada",
              "--clean", "a b c", "--change", "1=#7", "--answer", "#5", "--metric", "logprob", "--gen-length", "2", "--sweep", "layer_head"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own loading bar
    assert e.value.code == 2 and err.startswith("error: hook 'blocks.0.attn.hook_z'") and "no attention" in err


def test_mlp_and_single_patches_find_nothing_where_nothing_is(planted):
    p = Patcher(planted, setup())
    out = p.run([Patch("blocks.0.hook_mlp_out"), Patch("blocks.1.hook_resid_pre", positions=(-1,)),
                 Patch("blocks.0.hook_resid_post", positions=(0, 1, 3, 4, 5))])
    clean, corrupted = p.baseline("clean").metric.item(), p.baseline("corrupted").metric.item()
    assert out.metric[0] == pytest.approx(corrupted, abs=1e-4)  # MLPs are zero
    # after the copy the target carries the answer (layer 1's distractors still read the other positions)
    assert out.metric[1] == pytest.approx(clean, rel=0.01) and out.metric[2] == pytest.approx(clean, rel=0.01)


def test_sae_feature_patch_moves_only_that_feature(llada, tiny_sae, tokenizer):
    ids = llada.to_tokens("The list type is")[0]
    other = list(ids)
    other[2] = ids[3]
    p = Patcher(llada, PatchSetup(ids, other, target=-1, answer=5, metric="logprob", gen_length=2), sae=tiny_sae)
    hook = tiny_sae.cfg.hook_name
    from dlmscope.hooks import run_with_cache

    corrupted_act = run_with_cache(llada, p._ids(other, 1), [hook])[hook][0, -1]
    gap = tiny_sae.encode(p.source(hook)[0][0, -1]) - tiny_sae.encode(corrupted_act)
    f = int(gap.abs().argmax())
    r = p.run([Patch(hook, feature=f, positions=(-1,)), Patch(hook, positions=(-1,)), Patch(hook, feature=f,
                                                                                            positions=(0,))])
    clean, corrupted = p.baseline("clean").metric.item(), p.baseline("corrupted").metric.item()
    assert abs(r.metric[0] - corrupted) > 1e-3  # the feature that differs most at the target moves the answer
    assert r.metric[1] == pytest.approx(clean, abs=1e-4)  # the whole activation restores it (last layer)
    assert abs(r.metric[0] - clean) > 1e-3  # one feature is not the whole activation
    assert r.metric[2] == pytest.approx(corrupted, abs=1e-5)  # the last layer's other positions do not matter


def test_step_patching_under_the_sampler(llada, one_thread):
    ids = llada.to_tokens("The list type")[0]
    other = list(ids)
    other[1] = ids[2]
    base = PatchSetup(ids, other, target=-3, answer=7, metric="logprob", mode="sampler", gen_length=4, steps=4)
    p = Patcher(llada, base)
    r = p.sweep("step_layer", site="resid_pre", layers=[0])
    clean, corrupted = p.baseline("clean"), p.baseline("corrupted")
    assert r.rows == [0, 1, 2, 3] and r.cols == [0]
    # the embeddings of every position from step 0 on: the corrupted run becomes the clean run
    assert r.effect[0, 0] == pytest.approx(clean.metric.item(), abs=1e-4)
    # the corrupted run reveals the target at step 0 (the clean one at 3): patching from step 1 on is too late
    assert (int(corrupted.reveal_step), int(clean.reveal_step)) == (0, 3)
    assert torch.allclose(r.effect[1:, 0], corrupted.metric, atol=1e-5)
    assert r.forwards == 4 * 2 + 4 * 1  # two unpatched runs and one batched run of 4 rows, 4 steps each
    fig = sweep_figure(r)
    assert fig.data[0].z is not None and len(fig.data) == 1


def test_agreement_is_perfect_for_identical_maps():
    x = torch.tensor([[1.0, 0.0], [0.2, -3.0]])
    a = agreement(x, x, top=2)
    assert a["pearson"] == pytest.approx(1.0) and a["sign_agreement"] == 1.0 and a["top_overlap"] == 1.0


@pytest.mark.parametrize("kw, patch, message", [
    ({}, Patch("blocks.0.hook_nowhere"), "unknown hook 'blocks.0.hook_nowhere'"),
    ({}, Patch("blocks.9.hook_resid_pre"), "out of range"),
    ({}, Patch("blocks.0.hook_resid_pre", steps=(1,)), "step 1 is past the trajectory"),
    ({"mode": "sampler", "steps": 1}, Patch("blocks.0.hook_resid_pre", steps=(3,)), "step 3 is past the trajectory"),
    ({}, Patch("blocks.0.hook_resid_pre", head=0), "head=0 needs an attention site"),
    ({}, Patch("blocks.0.hook_resid_pre", positions=(6,)), "position 6 is out of range"),
    ({}, Patch("blocks.0.hook_resid_pre", feature=3), "feature=3 needs an SAE"),
])
def test_bad_patches_are_one_line(planted, kw, patch, message):
    with pytest.raises(DLMScopeError, match=message) as e:
        Patcher(planted, setup(**kw)).run([patch])
    assert "\n" not in str(e.value)


def test_bad_setups_are_one_line(planted):
    with pytest.raises(DLMScopeError, match="differ in length"):
        PatchSetup([1, 2, 3], [1, 2], target=-1, answer=1, wrong=2)
    with pytest.raises(DLMScopeError, match="prompt position"):
        PatchSetup([1, 2, 3], [1, 2, 4], target=1, answer=1, wrong=2)
    with pytest.raises(DLMScopeError, match="needs the corrupted answer"):
        PatchSetup([1, 2, 3], [1, 2, 4], target=-1, answer=1)
    with pytest.raises(DLMScopeError, match="outside the vocabulary"):
        Patcher(planted, PatchSetup([1, 2, 3], [1, 2, 4], target=-1, answer=99, wrong=2))
    with pytest.raises(DLMScopeError, match="needs mode='sampler'"):
        Patcher(planted, setup()).sweep("step_layer")
    with pytest.raises(DLMScopeError, match="attribution patching needs mode='forward'"):
        Patcher(planted, setup(mode="sampler", steps=1)).sweep("layer_position", attribution=True)


SUDOKU = "Sudoku: 3204402310402400\nSolution: "  # 24 tokens; token 4 is the first given (3), cell 2's answer is 1


def test_cli_patch_sweep_writes_json_and_heatmap(tmp_path, capsys, one_thread):
    import json

    from dlmscope.cli import main

    main(["patch", "--clean", SUDOKU, "--change", "4=1", "--target", "-14", "--answer", "1", "--wrong", "2",
          "--layers", "0,5", "--positions", "4,20,24,26", "--attribution", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "layer_position sweep, logit_diff at position 26" in out and "attribution patching vs exact" in out
    report = json.loads((tmp_path / "patch.json").read_text())
    s = report["sweep"]
    assert s["rows"] == [0, 5] and s["cols"] == [4, 20, 24, 26] and len(s["attribution"]) == 2
    # layer 0: only the changed token differs between the runs, and patching it back restores the clean run
    assert s["normalised"][0] == pytest.approx([1.0, 0.0, 0.0, 0.0], abs=1e-4)
    assert s["forwards"] == 2 + 1 + 1 and s["sequences"] == 2 + 8 + 1
    assert "plotly" in (tmp_path / "patch.html").read_text()


def test_cli_patch_single_patches_under_the_sampler(capsys, one_thread):
    from dlmscope.cli import main

    main(["patch", "--clean", SUDOKU, "--corrupted", SUDOKU.replace("3204", "3104"), "--target", "26",
          "--answer", "1", "--metric", "logprob", "--through", "sampler", "--steps", "4", "--sweep", "none",
          "--hooks", "blocks.0.hook_resid_pre,blocks.2.hook_mlp_out", "--patch-steps", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("logprob at position 26: clean")
    assert "blocks.0.hook_resid_pre | steps 0..0: " in lines[1] and "(restored +1.000)" in lines[1]
    assert lines[2].startswith("  blocks.2.hook_mlp_out | steps 0..0: ")


@pytest.mark.parametrize("args, message", [
    ({"--hooks": "blocks.0.hook_nowhere", "--sweep": "none"}, "unknown hook 'blocks.0.hook_nowhere'"),
    ({"--hooks": "blocks.0.attn.hook_z", "--sweep": "none", "--heads": "4"}, "head=4 is out of range"),
    ({"--sweep-site": "resid_sideways"}, "unknown hook 'blocks.0.hook_resid_sideways'"),
    ({"--hooks": "blocks.0.hook_resid_pre", "--sweep": "none", "--heads": "0"}, "head=0 needs an attention site"),
    ({"--hooks": "blocks.0.hook_resid_pre", "--sweep": "none", "--patch-steps": "1"}, "step 1 is past the trajectory"),
    ({"--through": "sampler", "--steps": "4", "--sweep": "step_layer", "--patch-steps": "4"},
     "step 4 is past the trajectory"),
    ({"--layers": "6"}, "layer 6 is out of range"),
    ({"--change": None, "--corrupted": "Sudoku: 3204402310402400\nSolution:"}, "differ in length"),
    ({"--change": "3=12"}, "change='12' is 2 tokens"),
    ({"--change": "x"}, "must be INDEX=TEXT"),
    ({"--target": "3"}, "target=3 is a prompt position"),
    ({"--target": "99"}, "target=99 is outside the sequence"),
    ({"--metric": "nats"}, "'nats' is not one of 'logit_diff', 'logprob'"),
    ({"--sweep": "step_layer"}, "needs --through sampler"),
    ({"--wrong": None}, "needs --wrong"),
    ({"--feature": "3"}, "--feature and --sae go together"),
    ({"--model": "/no/such/model"}, "neither a checkpoint folder"),
])
def test_cli_patch_bad_input_one_line_exit_2(args, message, capsys):
    from dlmscope.cli import main

    options = {"--clean": SUDOKU, "--change": "4=1", "--answer": "1", "--wrong": "2", "--target": "-14"} | args
    with pytest.raises(SystemExit) as e:
        main(["patch"] + [x for k, v in options.items() if v is not None for x in (k, v)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
