import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.analysis import attribution as at
from dlmscope.models import load_model
from dlmscope.sae import SAEConfig, build_sae


def _transcoders(lm, n_latents=96, seed=0, architecture="skip_transcoder"):
    """Random (skip) transcoders for every layer, with non-zero biases, scales and skip weights (every linear
    path of the replacement model carries something)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(lm.n_layers):
        meta = {"model_name": lm.name, "hook_name": f"blocks.{i}.hook_mlp_in", "hook_name_out": f"blocks.{i}.hook_mlp_out"}
        tc = build_sae(SAEConfig(lm.d_model, n_latents, 8, architecture, meta))
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(tc.W_enc.shape, generator=gen) / lm.d_model ** 0.5)
            tc.W_dec.copy_(torch.randn(tc.W_dec.shape, generator=gen) * 0.1)
            tc.b_enc.copy_(torch.randn(n_latents, generator=gen) * 0.1)
            tc.b_dec.copy_(torch.randn(lm.d_model, generator=gen) * 0.1)
            tc.threshold.fill_(0.05)
            tc.input_scale.fill_(1.3)
            tc.out_scale.fill_(0.7)
            if architecture == "skip_transcoder":
                tc.W_skip.copy_(torch.randn(tc.W_skip.shape, generator=gen) * 0.05)
        out.append(tc.eval())
    return out


@pytest.fixture(scope="module", params=["llada", "dream"])
def setup(request, tiny_dirs):
    lm = load_model(tiny_dirs[request.param])
    ids = torch.randint(4, 200, (12,), generator=torch.Generator().manual_seed(1))
    ids[[3, 7, 8]] = lm.mask_id
    return lm, _transcoders(lm), ids


def test_frozen_model_reproduces_logits(setup, one_thread):
    lm, tcs, ids = setup
    fs = at.FrozenStep(lm, tcs, ids)
    with torch.no_grad():
        real = lm.forward(ids[None])[0].float()
    assert torch.allclose(fs.linear_logits(), real, atol=1e-4)
    assert len(fs.features) > 0 and (fs.activations > 0).all()
    # the replacement model's features are the transcoders' own on the real MLP inputs
    assert torch.allclose(fs.linear_preacts(fs.activations), fs.preacts, atol=1e-4)


def test_completeness_every_row(setup, one_thread):
    lm, tcs, ids = setup
    g = at.attribute(lm, tcs, ids, at.Target(7, 42, contrast=5), batch_size=17)
    rows = list(range(g.n_features)) + [g.logit_index]
    total = g.adjacency[rows].sum(1) + g.bias[rows]
    assert torch.allclose(total, g.value[rows], atol=1e-3, rtol=1e-4)
    with torch.no_grad():
        real = lm.forward(ids[None])[0, at.read_position(lm, 7)]
    assert abs(float(g.value[-1]) - float(real[42] - real[5])) < 1e-4
    # error and token rows are leaves; a layer's features never feed its own layer
    assert not g.adjacency[g.n_features:-1].any()
    f = g.features
    same = f[:, 0][:, None] <= f[:, 0][None]
    assert not g.adjacency[:g.n_features, :g.n_features][same].any()
    n_layer = torch.bincount(f[:, 0], minlength=lm.n_layers)
    assert g.info["backward_passes"] == 1 + sum(-(-int(c) // 17) for c in n_layer)


def test_edge_is_the_finite_difference_of_the_frozen_model(setup, one_thread):
    """Edge s -> t = act_s * d(pre_t)/d(act_s) in the frozen model, from its forward (not the backward)."""
    lm, tcs, ids = setup
    g = at.attribute(lm, tcs, ids, at.Target(3, 11))
    fs = at.FrozenStep(lm, tcs, ids)
    t = int((g.features[:, 0] == lm.n_layers - 1).nonzero()[0])
    cols = g.adjacency[t, :g.n_features].abs().topk(3).indices
    for s in cols.tolist():
        eps = 1e-2
        up, down = fs.activations.clone(), fs.activations.clone()
        up[s] += eps
        down[s] -= eps
        fd = (fs.linear_preacts(up)[t] - fs.linear_preacts(down)[t]) / (2 * eps) * fs.activations[s]
        assert abs(float(fd) - float(g.adjacency[t, s])) < 1e-3 * max(1.0, abs(float(fd)))
    s = int(g.adjacency[-1, :g.n_features].abs().argmax())
    up = fs.activations.clone()
    up[s] *= 1.01
    p = at.read_position(lm, 3)
    fd = (fs.linear_logits(up)[p, 11] - fs.linear_logits()[p, 11]) / 0.01
    assert abs(float(fd) - float(g.adjacency[-1, s])) < 1e-3 * max(1.0, abs(float(fd)))


def test_plain_transcoders_and_causal_model(tiny_dirs, one_thread):
    lm = load_model(tiny_dirs["causal"])
    tcs = _transcoders(lm, architecture="transcoder")
    ids = torch.randint(4, 200, (10,), generator=torch.Generator().manual_seed(2))
    g = at.attribute(lm, tcs, ids, at.Target(9, 17))
    rows = list(range(g.n_features)) + [g.logit_index]
    assert torch.allclose(g.adjacency[rows].sum(1) + g.bias[rows], g.value[rows], atol=1e-3)
    # causal attention: the token at the target position (after the read position) cannot reach the logit
    assert not g.adjacency[-1, g.token_index(9)]


def test_bad_inputs(setup, tiny_dirs):
    lm, tcs, ids = setup
    with pytest.raises(DLMScopeError, match="not masked"):
        at.attribute(lm, tcs, ids, at.Target(4, 11))
    with pytest.raises(DLMScopeError, match="outside the vocabulary"):
        at.attribute(lm, tcs, ids, at.Target(3, lm.vocab_size))
    with pytest.raises(DLMScopeError, match="outside the input"):
        at.attribute(lm, tcs, ids, at.Target(40, 11))
    with pytest.raises(DLMScopeError, match="missing \\[1\\]"):
        at.check_transcoders(lm, tcs[:1])
    other = load_model(tiny_dirs["causal"])
    wide = _transcoders(other)
    with pytest.raises(DLMScopeError, match="d_in"):
        wide[0].cfg.d_in = 32
        at.check_transcoders(lm, [wide[0]])


def test_prune_json_and_figure(setup, tokenizer, one_thread):
    lm, tcs, ids = setup
    g = at.attribute(lm, tcs, ids, at.Target(8, 30))
    full = at.prune(g, 1.0, 1.0)
    tight = at.prune(g, 0.5, 0.9)
    assert tight.node_mask.sum() < full.node_mask.sum() <= g.adjacency.shape[0]
    assert tight.node_mask[g.token_index(0):].all()  # tokens and the logit always stay
    assert not (tight.edge_mask & ~tight.node_mask[None]).any() and not (tight.edge_mask & ~tight.node_mask[:, None]).any()
    # influence: the logit's direct inputs share one unit; a node's influence sums its paths
    direct = at._normalised(g.adjacency)[-1]
    assert torch.all(tight.influence >= direct - 1e-6)
    data = at.graph_json(g, full, tokenizer, slug="t", scan="random", node_threshold=1.0, edge_threshold=1.0)
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert data["metadata"]["masked"] == (ids == lm.mask_id).tolist() and data["metadata"]["target_position"] == 8
    kinds = {v["feature_type"] for v in data["nodes"]}
    assert {at.FEATURE_TYPE, at.TOKEN_TYPE, at.LOGIT_TYPE} <= kinds
    ids_ = {v["node_id"] for v in data["nodes"]}
    assert len(ids_) == len(data["nodes"]) and all(x["source"] in ids_ and x["target"] in ids_ for x in data["links"])
    logit = [v for v in data["nodes"] if v["is_target_logit"]]
    assert len(logit) == 1 and logit[0]["node_id"] == f"{lm.n_layers + 1}_30_8" and logit[0]["masked"]
    weights = {(x["source"], x["target"]): x["weight"] for x in data["links"]}
    f = next(v for v in data["nodes"] if v["feature_type"] == at.FEATURE_TYPE and (v["node_id"], logit[0]["node_id"]) in weights)
    layer, latent, pos = map(int, f["node_id"].split("_"))
    row = next(i for i, r in enumerate(g.features.tolist()) if r == [layer, pos, latent])
    assert weights[(f["node_id"], logit[0]["node_id"])] == pytest.approx(float(g.adjacency[-1, row]))
    fig = at.graph_figure([data, data], hover={f["node_id"]: "top examples here"})
    assert any("top examples here" in t for tr in fig.data if tr.text for t in tr.text)
    with pytest.raises(DLMScopeError, match="node_threshold"):
        at.prune(g, 1.5)
    empty = at.AttributionGraph(**{**g.__dict__, "adjacency": torch.zeros_like(g.adjacency)})
    with pytest.raises(DLMScopeError, match="empty after pruning"):
        at.prune(empty)


def test_total_effects_match_the_frozen_model(setup, one_thread):
    """Switching a feature off in the frozen model with its downstream features following their pre-activations
    (the linearisation the graph describes) changes the logit by the predicted total effect."""
    lm, tcs, ids = setup
    g = at.attribute(lm, tcs, ids, at.Target(7, 12))
    fs = at.FrozenStep(lm, tcs, ids)
    pred = at.total_effects(g)
    p = at.read_position(lm, 7)
    s = int((g.features[:, 0] == 0).nonzero()[0])
    # solve the linearised model layer by layer: later features move with their pre-activations
    act = fs.activations.clone()
    act[s] = 0
    for _ in range(lm.n_layers):
        pre = fs.linear_preacts(act)
        later = g.features[:, 0] > 0
        act[later] = pre[later]
    act[s] = 0
    real = fs.linear_logits(act)[p, 12] - fs.linear_logits()[p, 12]
    assert float(pred[s]) == pytest.approx(float(real), rel=1e-3, abs=1e-4)
    moved = at.ablate_in_model(lm, tcs, g, [s])
    assert moved.shape == (1,) and torch.isfinite(moved).all()


@pytest.fixture(scope="module")
def tc_dir(tiny_dirs, tmp_path_factory):
    from dlmscope.sae import save_sae

    lm = load_model(tiny_dirs["llada"])
    root = tmp_path_factory.mktemp("tcs")
    for i, tc in enumerate(_transcoders(lm, n_latents=64)):
        save_sae(tc, root / f"layer{i}")
    return root


def test_cli_attribute_across_steps(tiny_dirs, tc_dir, tmp_path, capsys, one_thread):
    import json

    from dlmscope.cli import main

    out = tmp_path / "attr"
    main(["attribute", "--model", str(tiny_dirs["llada"]), "--transcoders", str(tc_dir), "-p", "a b c", "--position", "3",
          "--gen-length", "6", "--steps", "6", "--links", "2", "--node-threshold", "0.9", "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads((out / "attribution.json").read_text())
    first = res["graphs"][0]["metadata"]
    pos = res["prompt_length"] + 3
    assert first["target_position"] == pos and first["step"] == res["reveal_step"][str(pos)]
    assert first["masked"][pos] and sum(first["masked"]) == 6 - first["step"]  # one token per step
    assert 1 <= len(res["graphs"]) <= 3 and len(res["cross_links"]) == len(res["graphs"]) - 1
    for link, g in zip(res["cross_links"], res["graphs"][1:]):
        q = g["metadata"]["target_position"]
        assert g["metadata"]["step"] == res["reveal_step"][str(q)] < first["step"]  # committed before the traced step
        assert link["source"] in {v["node_id"] for v in res["graphs"][0]["nodes"]}
        assert link["target"] in {v["node_id"] for v in g["nodes"]}
    assert (out / "attribution.html").stat().st_size > 1000
    assert len(list(out.glob("graph_step*_pos*.json"))) == len(res["graphs"])
    assert printed.count("backward passes") == len(res["graphs"])
    # --step: an earlier step (still masked there) works; a later one is one line, exit 2
    main(["attribute", "--model", str(tiny_dirs["llada"]), "--transcoders", str(tc_dir), "-p", "a b c", "--position", "3",
          "--gen-length", "6", "--steps", "6", "--step", "0", "--max-feature-nodes", "20", "--out", str(out)])
    m = json.loads((out / "attribution.json").read_text())["graphs"][0]["metadata"]
    assert m["step"] == 0 and m["computed_features"] == 20
    capsys.readouterr()
    if first["step"] < 5:
        with pytest.raises(SystemExit) as e:
            main(["attribute", "--model", str(tiny_dirs["llada"]), "--transcoders", str(tc_dir), "-p", "a b c", "--position", "3",
                  "--gen-length", "6", "--steps", "6", "--step", "5", "--out", str(out)])
        assert e.value.code == 2 and "not masked at step 5" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--token", "99999"], "outside the vocabulary"),
    (["--position", "9"], "not a generated token"),
    (["--step", "2", "--reveal-step"], "give one of them"),
    (["--node-threshold", "0.0", "--edge-threshold", "0.0"], None),
    (["--transcoders", "NONE"], "unknown SAE"),
    (["-p", "b"], "one prompt"),
])
def test_cli_attribute_bad_input(args, message, tiny_dirs, tc_dir, tmp_path, capsys):
    from dlmscope.cli import main

    base = ["attribute", "--model", str(tiny_dirs["llada"]), "--transcoders", str(tc_dir), "-p", "a", "--gen-length", "4",
            "--steps", "4", "--out", str(tmp_path / "o")]
    if message is None:  # thresholds of 0 keep the single strongest node and edge: still a graph
        main(base + args)
        assert "edges" in capsys.readouterr().out
        return
    with pytest.raises(SystemExit) as e:
        main(base + args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_cli_attribute_transcoders_that_do_not_fit(tiny_dirs, tmp_path, capsys):
    from dlmscope.cli import main
    from dlmscope.sae import save_sae

    lm = load_model(tiny_dirs["llada"])
    save_sae(_transcoders(lm)[0], tmp_path / "only0" / "l0")
    with pytest.raises(SystemExit) as e:
        main(["attribute", "--model", str(tiny_dirs["llada"]), "--transcoders", str(tmp_path / "only0"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "missing [1]" in capsys.readouterr().err


def test_shipped_transcoders_predict_real_ablations(one_thread):
    """On the built-in DLM with its shipped transcoders: removing each of a graph's 20 most influential features
    from the real model (nothing frozen) moves the target logit the way the graph predicts, mostly."""
    from dlmscope.data import builtin_corpus, pack

    lm = load_model("dlmscope-tiny-dlm")
    tcs = at.load_transcoders(lm, "tiny-dlm-tc")
    rows = pack(lm.tokenizer, builtin_corpus("heldout"), 20).input_ids
    agree, n, rhos = 0, 0, []
    for r in range(3):
        x0 = rows[r]
        m = torch.rand(20, generator=torch.Generator().manual_seed(r)) < 0.3
        m[0], m[10] = False, True
        g = at.attribute(lm, tcs, torch.where(m, torch.full_like(x0, lm.mask_id), x0), at.Target(10, int(x0[10])))
        pr = at.prune(g)
        top = pr.influence[:g.n_features].argsort(descending=True)[:20].tolist()
        pred, real = at.total_effects(g)[top], at.ablate_in_model(lm, tcs, g, top)
        agree += int(((pred > 0) == (real > 0)).sum())
        n += len(top)
        rank = lambda v: v.argsort().argsort().float()  # noqa: E731
        rhos.append(float(torch.corrcoef(torch.stack([rank(pred), rank(real)]))[0, 1]))
    assert agree / n >= 0.75 and sum(rhos) / len(rhos) > 0.2, (agree, n, rhos)


def test_feature_budget_computes_the_most_influential_rows(setup, one_thread):
    lm, tcs, ids = setup
    full = at.attribute(lm, tcs, ids, at.Target(7, 12), batch_size=64)
    every = at.attribute(lm, tcs, ids, at.Target(7, 12), batch_size=64, max_feature_nodes=10**6)
    rows = every.computed.nonzero().squeeze(1)
    assert torch.allclose(every.adjacency[rows], full.adjacency[rows], atol=1e-5)  # mixed-layer batches, same rows
    # it stops when the features left cannot reach the target (e.g. last-layer features off the target position)
    left = ~every.computed
    assert left.any() and not at.prune(full, 1.0, 1.0).influence[:full.n_features][left].any()
    some = at.attribute(lm, tcs, ids, at.Target(7, 12), batch_size=16, max_feature_nodes=40)
    rows = some.computed.nonzero().squeeze(1)
    assert some.info["computed_features"] == 40 == rows.numel() and some.info["backward_passes"] == 1 + 3
    assert torch.allclose(some.adjacency[rows], full.adjacency[rows], atol=1e-5)
    assert not some.adjacency[:some.n_features][~some.computed].any()
    # the first batch is the features with the largest direct effect on the logit
    direct = at._normalised(full.adjacency)[-1, :full.n_features]
    assert set(direct.topk(16).indices.tolist()) <= set(rows.tolist())
