import json
import math

import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.analysis import evaluate as E
from dlmscope.cli import main
from dlmscope.sae.metrics import fvu


def test_stats_match_the_textbook_metrics():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(50, 8, generator=gen) + 3
    y_hat = y + 0.3 * torch.randn(50, 8, generator=gen)
    lat = torch.zeros(50, 6)
    lat[:, 0] = 1.0  # always on: dense
    lat[:5, 1] = 2.0  # 10% of tokens: not dense (> 10% needed)
    st = E._Stats(6)
    st.add(y[:20], y_hat[:20], lat[:20])
    st.add(y[20:], y_hat[20:], lat[20:])
    r = st.result()
    assert r["fvu"] == pytest.approx(fvu(y, y_hat), rel=1e-9)
    assert r["l0"] == pytest.approx(1.1) and r["dead_fraction"] == pytest.approx(4 / 6)
    assert r["dense_fraction"] == pytest.approx(1 / 6)
    mean_only = E._Stats(6)
    mean_only.add(y, y.mean(0).expand_as(y), lat)
    assert mean_only.result()["fvu"] == pytest.approx(1.0)
    assert E._Stats(6).result() == {"n_tokens": 0}


def test_token_classes():
    assert [E.token_class(s) for s in [" 12", "def", " foo_1", "):", " ", "→"]] == [0, 1, 2, 3, -1, -1]


def test_sparse_probe_finds_the_latent_that_carries_the_label():
    gen = torch.Generator().manual_seed(0)
    n = 400
    Y = torch.randint(0, 2, (n,), generator=gen)
    Z = torch.rand(n, 30, generator=gen)
    Z[:, 7] = Y * 2.0  # latent 7 fires exactly on class 1
    X = torch.randn(n, 5, generator=gen)
    X[:, 0] += 4 * Y  # the residual also separates the classes
    M = torch.arange(n) % 2 == 0
    assert E.top_mean_diff(Z, Y, 1).tolist() == [7]
    cfg = E.EvaluateConfig(probe_k=(1, 2), probe_examples=150)
    r = E.sparse_probing(X, Z, Y, M, ("a", "b"), cfg)
    assert r["sae"]["1"]["all"] == 1.0 and r["residual"]["all"] > 0.95
    assert r["classes"]["a"]["n_train"] == 2 * 120
    assert set(r["sae"]["2"]) == {"all", "masked", "visible"}


def test_sparse_probe_split_keeps_each_group_on_one_side():
    """A label that only a group's identity predicts (every position of a group shares it) is learnable when
    groups straddle the split, and at chance when the split is by group."""
    gen = torch.Generator().manual_seed(0)
    groups = torch.arange(400) // 4  # 100 groups of 4 positions, each group one random point in 128 dimensions
    Y = torch.randint(0, 2, (100,), generator=gen)[groups]
    X = torch.randn(100, 128, generator=gen)[groups] + 0.01 * torch.randn(400, 128, generator=gen)
    Z, M = X.clamp_min(0), torch.arange(400) % 2 == 0
    cfg = E.EvaluateConfig(probe_k=(16,), probe_examples=200)
    leaky = E.sparse_probing(X, Z, Y, M, ("a", "b"), cfg)
    split = E.sparse_probing(X, Z, Y, M, ("a", "b"), cfg, groups=groups)
    assert leaky["residual"]["all"] > 0.9 and split["residual"]["all"] < 0.7, (leaky["residual"], split["residual"])


def test_absorption_scores_on_constructed_latents():
    probe = torch.tensor([2.0, 0.0, 0.0])
    W_dec = torch.tensor([[1.0, 0.0, 0.0],  # main latent, on the probe
                          [0.6, 0.8, 0.0],  # absorber: cos 0.6
                          [0.0, 0.0, 1.0]])  # unrelated
    x = torch.tensor([[3.0, 0.0, 0.0]] * 3)  # probe projection 3
    lat = torch.tensor([[3.0, 0.0, 0.0],  # main carries everything: no absorption
                        [0.0, 5.0, 1.0],  # main silent, absorber projects 3: full absorption
                        [1.5, 2.5, 0.0]])  # main 1.5, absorber 1.5: half
    frac, full = E.absorption_scores(x, lat, probe, [0], W_dec)
    assert frac == pytest.approx([0.0, 1.0, 0.5]) and full == [False, True, False]


def test_logistic_regression_separates_and_is_in_raw_coordinates():
    X = torch.tensor([[0.0, 10.0], [1.0, 10.0], [3.0, 10.0], [4.0, 10.0]])
    w, b = E.fit_logistic(X, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert ((X.double() @ w + b) > 0).tolist() == [False, False, True, True]
    assert float(-b / w[0]) == pytest.approx(2.0, abs=0.2)


def test_bad_config_one_line():
    for kw, match in [({"probes": ("colour",)}, "unknown label set 'colour'"), ({"t_bins": (0.0,)}, "t_bins")]:
        with pytest.raises(DLMScopeError, match=match) as e:
            E.EvaluateConfig(**kw)
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def suite(llada, tiny_sae):
    rows = torch.randint(4, 200, (6, 16), generator=torch.Generator().manual_seed(0))
    cfg = E.EvaluateConfig(n_seqs=6, t_bins=(0.2, 0.6), splice_seqs=4, probes=("token_class",), probe_k=(1, 5),
                           probe_examples=40, absorption=True, batch_size=3)
    return E.evaluate_sae_suite(llada, tiny_sae, rows, cfg), rows


def test_suite_core_agrees_with_fvu_on_the_same_masked_tokens(llada, tiny_sae, suite):
    from dlmscope.analysis.splice import draw_masks
    from dlmscope.hooks import run_with_cache

    result, rows = suite
    hook = tiny_sae.cfg.hook_name
    xs, ms = [], []
    for s in (0, 3):
        _, xt, c = draw_masks(llada, rows[s:s + 3], 0.6, 0, 1, s)
        xs.append(run_with_cache(llada, xt, [hook])[hook].flatten(0, 1))
        ms.append(c.mask.flatten())
    x, m = torch.cat(xs), torch.cat(ms)
    masked = result["core"]["0.6"]["masked"]
    with torch.no_grad():  # draw 0 has the masks of a single-draw run; the bin pools 3 draws
        assert masked["fvu_draws"][0] == pytest.approx(fvu(x[m], tiny_sae.reconstruct(x[m])), rel=1e-5)
    assert len(masked["fvu_draws"]) == 3 and len(set(masked["fvu_draws"])) == 3
    assert masked["fvu_ci"][1] <= min(masked["fvu_draws"]) <= max(masked["fvu_draws"]) <= masked["fvu_ci"][2]
    n_tokens = result["core"]["0.6"]["visible"]["n_tokens"] + masked["n_tokens"]
    assert n_tokens == result["core"]["0.6"]["all"]["n_tokens"] == 3 * x.shape[0]
    assert result["core"]["0.2"]["all"]["l0"] == pytest.approx(8.0)
    curves = result["t_curves"]
    assert len(curves["rate_by_bin"]) == 256 and len(curves["rate_by_bin"][0]) == 2
    alive = [s for s in curves["masked_share"] if not math.isnan(s)]
    assert len(alive) == round(curves["alive_fraction"] * 256)
    assert curves["mostly_masked_fraction"] == pytest.approx(sum(s > 0.8 for s in alive) / len(alive))
    assert set(result["splice"]) == {"all", "masked", "visible"} and "0.2" in result["splice"]["masked"]
    assert "residual" in result["probing"]["token_class"] or "skipped" in result["probing"]["token_class"]
    assert "skipped" in result["absorption"] or 0 <= result["absorption"]["mean_absorption_fraction"] <= 1


def test_report_files_and_cli_errors(suite, tmp_path, capsys):
    result, _ = suite
    path = E.write_report(result, tmp_path / "ev")
    assert json.loads(path.read_text())["sae"]["architecture"] == "topk"
    assert "plotly" in (tmp_path / "ev" / "evaluation.html").read_text()[:200_000].lower()
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--sae", "tiny-dlm-L3-k32", "--probes", "token_class,colour"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "unknown label set 'colour'" in err and "\n" not in err


def test_registered_evaluations_exist_and_show_the_masked_visible_gap():
    from dlmscope.sae.registry import REGISTRY, registry

    evaluated = {n: e for n, e in registry().items() if "evaluation" in e}
    assert {"tiny-dlm-L1-k32", "tiny-dlm-L3-k32"} <= set(evaluated)
    for name, entry in evaluated.items():
        path = E.find_evaluation(name)
        assert path == REGISTRY.parent / entry["evaluation"]
        result = json.loads(path.read_text())
        assert result["sae"]["hook"] == entry["hook"] and result["config"]["n_seqs"] == 64
    l3 = json.loads(E.find_evaluation("tiny-dlm-L3-k32").read_text())["core"]
    assert all(e["masked"]["fvu"] < 0.2 and e["visible"]["fvu"] > 0.45 for e in l3.values())
    assert 0.08 < l3["0.5"]["masked"]["fvu"] < 0.11 and 0.45 < l3["0.5"]["visible"]["fvu"] < 0.55
