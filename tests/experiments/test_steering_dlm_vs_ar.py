"""The steering study compares the twins on equally many top-ranked features and tests every success metric."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import steering_dlm_vs_ar as st  # noqa: E402


def _partial(model: str, features: list[int], finished: int, shift: float) -> dict:
    """A twin's partial result: `features` ranked, the first `finished` with every run, made-up per-text metrics."""
    per_text = {k: [0.1, 0.2] for k in st.SUCCESS}
    runs = [{"model": model, "feature": f, "schedule": sched, "strength": 4.0, "texts": ["a", "b"],
             **{k: [v + shift * (1 + i) for v in (0.3, 0.5)] for k in st.METRICS[:4]},
             "perplexity": [4.0, 5.0], "dlm_nll": [3.0, 3.5]}
            for i, f in enumerate(features[:finished]) for sched in ("all", "late")]
    return {"config": {"features": len(features)}, "features": {model: {str(f): {} for f in features}},
            "dla_overlap": {model: {str(f): {"output": 0.1, "logit": 1.0, "input": 0.05} for f in features}},
            "unsteered": {model: {"perplexity": [4.0, 4.0], "dlm_nll": [3.0, 3.0],
                                  "per_feature": {str(f): per_text for f in features}}}, "runs": runs}


def test_first_complete_keeps_the_features_both_twins_finished_and_tests_each_metric():
    dlm, ar = (_partial(m, [5, 7, 9], done, shift) for m, done, shift in
               ((st.MODELS[0][0], 3, 0.1), (st.MODELS[1][0], 2, 0.0)))
    res = dlm | {k: dlm[k] | ar[k] for k in ("features", "dla_overlap", "unsteered")}
    res["runs"] = dlm["runs"] + ar["runs"]
    res = st.first_complete(res)
    assert res["config"]["features"] == 2 and {r["feature"] for r in res["runs"]} == {5, 7}
    assert res["ranking"][st.MODELS[0][0]] == [5, 7, 9] and list(res["features"][st.MODELS[0][0]]) == ["5", "7"]
    tests = st.dlm_vs_ar(res)
    assert [t["metric"] for t in tests] == list(st.TESTED) * 2  # two schedules
    assert all(t["p_holm"] >= t["p"] for t in tests)
    assert "concept rate, output" in st.readme_table(res)


def test_summary_counts_holm_survivors_per_strength():
    dlm, ar = (_partial(m, [5, 7, 9], 3, shift) for m, shift in ((st.MODELS[0][0], 0.1), (st.MODELS[1][0], 0.0)))
    res = dlm | {k: dlm[k] | ar[k] for k in ("features", "dla_overlap", "unsteered")}
    res["runs"] = dlm["runs"] + ar["runs"] + [r | {"strength": 8.0} for r in dlm["runs"] + ar["runs"]]
    s = st.summary(st.first_complete(res), {m: (4.0, 3.0) for m, _ in st.MODELS})
    assert s["n_tests"] == 12 and list(s["holm_survivors_by_strength"]) == ["4", "8"]
    by_strength = {k: sum(n[k] for n in s["holm_survivors_by_strength"].values()) for k in st.TESTED}
    assert by_strength == s["holm_survivors"]


def test_join_seeds_appends_the_next_seeds_texts():
    def combined(shift: float, first_seed: int) -> dict:
        dlm, ar = (_partial(m, [5, 7], 2, s) for m, s in ((st.MODELS[0][0], shift), (st.MODELS[1][0], 0.0)))
        res = dlm | {k: dlm[k] | ar[k] for k in ("features", "dla_overlap", "unsteered")}
        res["runs"] = dlm["runs"] + ar["runs"]
        res["config"] = {"features": 2, "seeds": 1, "first_seed": first_seed}
        for u in res["unsteered"].values():
            u["texts"] = ["a", "b"]
        return st.first_complete(res)

    joined = st.join_seeds(combined(0.1, 0), combined(0.2, 1))
    assert joined["config"]["seeds"] == 2
    run = joined["runs"][0]
    assert run["feature_activation"] == pytest.approx([0.4, 0.6, 0.5, 0.7]) and run["texts"] == ["a", "b", "a", "b"]
    assert joined["unsteered"][st.MODELS[0][0]]["per_feature"]["5"]["feature_activation"] == [0.1, 0.2] * 2
    with pytest.raises(SystemExit, match="seed 2"):
        st.join_seeds(joined, combined(0.2, 1))
