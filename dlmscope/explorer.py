"""The Streamlit feature explorer (`dlmscope explore`, or `streamlit run apps/explorer.py -- --store DIR`).

Pages read a feature store (`dlmscope features build`); the denoising view and the steering
playground also load the model and SAE the store was built for (or `--model` / `--sae`). It lives
in the package so `dlmscope explore` works from any install: Streamlit runs this file as a script
(`__main__`, no parent package), so every import here is absolute. `apps/explorer.py` is the same app.
Query parameters open a page directly: `?page=feature&feature=12`, `?page=denoise&feature=12&run=1`.
Bad input (a missing or empty store, an SAE that does not match the model or the store, a feature
out of range) is shown with `st.error`, never as a traceback. Corpus text goes out through `st.html`
(HTML-escaped, never through Markdown), so no `_`, `*`, backtick, `$` or tag in a token changes the page.
Chart titles sit above the charts as text, where plotly's toolbar cannot cover them.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from pathlib import Path

PAGES = {"list": "Feature list", "feature": "Feature", "denoise": "Denoising view", "steer": "Steering playground",
         "summary": "SAE summary", "experts": "Expert routing", "circuits": "Circuits",
         "attribution": "Attribution graph"}
SPLICE_FILE = "splice.json"
EXPERTS_FILE = "experts.json"
CIRCUITS_FILE = "circuits.json"
ATTRIBUTION_FILE = "attribution.json"
COLD_START = "Loading (the first page after a start imports torch and reads the store)"


def _args() -> argparse.Namespace:
    """Flags after `--`, else DLMSCOPE_STORE / _MODEL / _SAE / _SPLICE from the environment."""
    env = os.environ.get
    p = argparse.ArgumentParser(prog="explorer")
    p.add_argument("--store", default=env("DLMSCOPE_STORE"), help="feature store folder")
    p.add_argument("--model", default=env("DLMSCOPE_MODEL"), help="model (default: the store's)")
    p.add_argument("--sae", default=env("DLMSCOPE_SAE"), help="SAE name or folder (default: the store's)")
    p.add_argument("--splice", default=env("DLMSCOPE_SPLICE"), help="splice JSON (`dlmscope eval-splice --out`)")
    p.add_argument("--experts", default=env("DLMSCOPE_EXPERTS"), help="experts.json (`dlmscope experts --out`)")
    p.add_argument("--circuits", default=env("DLMSCOPE_CIRCUITS"),
                   help="patching result: circuits_sudoku.json or `dlmscope patch --out`'s patch.json")
    p.add_argument("--attribution", default=env("DLMSCOPE_ATTRIBUTION"),
                   help="attribution.json (`dlmscope attribute --out`)")
    p.add_argument("--attribution-stores", default=env("DLMSCOPE_ATTRIBUTION_STORES"),
                   help="comma-separated feature stores of the graph's transcoders (hover: top examples)")


    p.add_argument("--diff", default=env("DLMSCOPE_DIFF"), help="model-diffing report (`dlmscope diff`: diff.json)")
    args, _ = p.parse_known_args(sys.argv[1:])
    return args


def _int_param(value, default: int = 0) -> int:
    from dlmscope.errors import DLMScopeError

    try:
        return int(value if value is not None else default)
    except ValueError:
        raise DLMScopeError(f"feature={value!r} in the address is not an integer") from None


def colour_tokens(ex: dict, scale: float) -> str:
    """Tokens as HTML spans: orange by activation, masked positions with a dashed blue underline. For `st.html`
    only: the text is HTML-escaped, not Markdown-escaped."""
    spans = []
    for i, (tok, act, masked) in enumerate(zip(ex["tokens"], ex["acts"], ex["masked"])):
        alpha = min(1.0, max(0.0, act / scale)) if scale > 0 else 0.0
        style = f"background:rgba(255,120,0,{alpha:.2f});padding:1px 0;"
        if masked:
            style += "border-bottom:2px dashed #3366cc;"
        if i == ex.get("center"):
            style += "outline:1px solid #888;"
        title = f"{act:.3f}" + (" (masked)" if masked else "")
        text = html.escape(tok).replace(" ", "&nbsp;").replace("\n", "⏎")
        spans.append(f'<span class="tok{" masked" if masked else ""}" title="{title}" style="{style}">{text}</span>')
    return "<span style='font-family:monospace'>" + "".join(spans) + "</span>"


def _chart(container, fig, title: str) -> None:
    """A plotly chart with its title as bold text above it, so the toolbar (top right) never covers the title
    (escaped HTML: titles name models and tokens)."""
    fig.update_layout(title=None, margin=dict(fig.layout.margin.to_plotly_json(), t=30))
    container.html(f'<b class="chart-title">{html.escape(title)}</b>')
    container.plotly_chart(fig)


def _splice_rows(result: dict) -> list[dict]:
    from dlmscope.errors import DLMScopeError

    try:
        return [{"t bin": k, "clean CE": v["clean"]["ce"][0], "spliced CE": v["sae"]["ce"][0], "ΔCE": v["delta_ce"][0],
                 "ΔCE low": v["delta_ce"][1], "ΔCE high": v["delta_ce"][2], "recovered (zero abl.)": v["recovered"]["zero"],
                 "recovered (mean abl.)": v["recovered"]["mean"]} for k, v in result["bins"].items()]
    except (KeyError, TypeError, IndexError, AttributeError):
        raise DLMScopeError("the splice JSON is not a `dlmscope eval-splice --out` result") from None


def main() -> None:
    import streamlit as st

    st.set_page_config(page_title="dlmscope explorer", layout="wide")
    # The spinner comes first: the first page after a start imports dlmscope (torch) and opens the store.
    with st.spinner(COLD_START, show_time=True):
        from dlmscope.errors import DLMScopeError

        try:
            _run(st)
        except DLMScopeError as e:
            st.error(str(e))
        except Exception as e:  # the page shows a message, never a traceback
            st.error(f"unexpected error: {type(e).__name__}: {e}")


def _run(st) -> None:
    from dlmscope.analysis.features import FeatureStore
    from dlmscope.errors import DLMScopeError

    args = _args()
    if args.diff:
        return _diff_page(st, args.diff)

    @st.cache_resource(show_spinner=False)
    def open_store(path: str, mtime: float):
        return FeatureStore.open(path)

    if not args.store:
        raise DLMScopeError("no feature store given: pass --store DIR (build one with `dlmscope features build`)")
    manifest = Path(args.store) / "manifest.json"
    store = open_store(args.store, manifest.stat().st_mtime if manifest.is_file() else 0.0)
    m = store.manifest
    q = st.query_params
    keys = list(PAGES)
    page_key = q.get("page", "list")
    if page_key not in PAGES:
        raise DLMScopeError(f"page={page_key!r} in the address; allowed: {', '.join(PAGES)}")
    st.sidebar.title("dlmscope explorer")
    st.sidebar.caption(f"{m['model']} · {m['hook']} · {m['n_latents']} latents, k={m['k']} · "
                       f"{m['n_tokens']:,} held-out tokens")
    page = st.sidebar.radio("page", keys, index=keys.index(page_key), format_func=PAGES.get)
    feature = int(st.sidebar.number_input("feature", value=_int_param(q.get("feature")), step=1))
    if page != page_key and "run" in q:
        del q["run"]  # `run=1` in an address starts the sampler on the page it was written for only
    q["page"], q["feature"] = page, str(feature)
    {"list": _feature_list, "feature": _feature_page, "denoise": _denoising_view, "steer": _steering,
     "summary": _summary, "experts": _experts, "circuits": _circuits,
     "attribution": _attribution}[page](st, store, feature, args)


def _model_and_sae(st, store, args):
    """The model and SAE, loaded once per session and checked against each other and the store."""
    from dlmscope.errors import DLMScopeError

    model, sae = args.model or store.manifest["model_ref"], args.sae or store.manifest["sae"]
    if not sae:
        raise DLMScopeError("the store does not name its SAE; pass --sae NAME_OR_FOLDER")

    @st.cache_resource(show_spinner="loading model and SAE")
    def load(model: str, sae: str):
        from dlmscope.analysis.splice import check_sae_matches
        from dlmscope.models import load_model
        from dlmscope.sae import load_sae

        lm, s = load_model(model), load_sae(sae)
        check_sae_matches(lm, s)
        return lm, s

    lm, s = load(model, sae)
    store.check_matches(s, lm.name)
    built = store.manifest["sae"]
    if args.sae and built and built != args.sae:
        st.warning(f"the store was built with SAE {built!r}; the statistics on the other pages are for that SAE, "
                   f"this page uses {args.sae!r}")
    return lm, s


def _feature_list(st, store, feature, args) -> None:
    st.header("Features")
    if store.empty:
        st.error("the feature store is empty: no latent fired on the encoded text (rebuild it with more text, "
                 "or check the SAE)")
        return
    stats = store.stats()
    c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
    search = c1.text_input("search top tokens", placeholder="e.g. def")
    sort = c2.selectbox("sort by", ["density", "max activation", "masked/visible", "feature"])
    descending = c3.checkbox("descending", value=sort != "feature")
    show_dead = c4.checkbox("show dead features", value=False)
    table = _feature_table(st, store)
    rows = table if show_dead else table[table["density"] > 0]
    if search:
        rows = rows[rows["top tokens"].str.contains(search, case=False, regex=False)]
    rows = rows.sort_values(sort, ascending=not descending, na_position="last")
    n_dead = int((stats["density"] == 0).sum())
    st.caption(f"{len(rows)} of {store.n_latents} features shown" + ("" if show_dead else f" ({n_dead} dead hidden)")
               + ". Click a column header to re-sort; the link opens the feature page.")
    st.dataframe(rows, hide_index=True, height=560, column_config={
        "open": st.column_config.LinkColumn("open", display_text="open", width="small"),
        "density": st.column_config.NumberColumn(format="%.2e"),
        "masked rate": st.column_config.NumberColumn(format="%.2e"),
        "visible rate": st.column_config.NumberColumn(format="%.2e"),
        "max activation": st.column_config.NumberColumn(format="%.3f"),
        "mean activation": st.column_config.NumberColumn(format="%.3f"),
        "masked/visible": st.column_config.NumberColumn(format="%.2f"),
    })


def _feature_table(st, store):
    """One row per latent, built once per store (the only per-latent Python loop)."""

    @st.cache_resource(show_spinner=False)
    def build(_store, key: str):
        import pandas as pd
        import torch

        s = _store.stats()
        vocab = _store.manifest["vocab"]
        tops = [" | ".join(vocab[i] for i in row if i >= 0) for row in _store.t["top_tokens"].tolist()]
        ratio = s["masked_rate"].double() / s["visible_rate"].double()
        ratio = torch.where(s["density"] > 0, ratio, torch.nan)
        return pd.DataFrame({
            "feature": range(_store.n_latents),
            "open": [f"?page=feature&feature={i}" for i in range(_store.n_latents)],
            "density": s["density"].numpy(), "max activation": s["max_act"].numpy(),
            "mean activation": s["mean_act"].numpy(), "masked rate": s["masked_rate"].numpy(),
            "visible rate": s["visible_rate"].numpy(), "masked/visible": ratio.numpy(), "top tokens": tops})

    return build(store, f"{id(store)}")


def _feature_page(st, store, feature, args) -> None:
    import plotly.graph_objects as go

    f = store.check_feature(feature)
    stats = store.stats()
    m = store.manifest
    st.header(f"Feature {f}")
    density = float(stats["density"][f])
    tops = store.top_tokens(f)
    if tops:
        st.caption("top tokens: " + " | ".join(tops))
    cols = st.columns(5)
    cols[0].metric("density", f"{density:.2e}")
    cols[1].metric("max activation", f"{float(stats['max_act'][f]):.3f}")
    cols[2].metric("mean activation", f"{float(stats['mean_act'][f]):.3f}")
    cols[3].metric("fires on masked", f"{float(stats['masked_rate'][f]):.2e}" if m["diffusion"] else "n/a")
    cols[4].metric("fires on visible", f"{float(stats['visible_rate'][f]):.2e}")
    if int(stats["count"][f]) == 0:
        st.info(f"Feature {f} never fired on the {m['n_tokens']:,} held-out tokens (dead).")
        _logit_table(st, store, f)
        return
    scale = float(stats["max_act"][f])
    st.subheader("Top activating examples")
    st.caption("Orange: activation (hover for the value); dashed blue underline: masked position (the original token "
               "is shown); boxed: the example's centre.")
    st.html("<br>".join(f"<small>{ex['value']:.3f}</small>&nbsp; " + colour_tokens(ex, scale)
                        for ex in store.top_examples(f, 10)))
    left, mid, right = st.columns([2, 1, 2])
    centres, counts = store.histogram(f)
    fig = go.Figure(go.Bar(x=centres, y=counts, marker_color="#ff7800"))
    fig.update_layout(xaxis_title="activation", yaxis_title="count", height=320, margin=dict(b=40, l=40, r=10),
                      bargap=0.05)
    _chart(left, fig, f"Activation histogram (density {density:.2e})")
    fig = go.Figure(go.Bar(x=["masked", "visible"], y=[float(stats["masked_rate"][f]), float(stats["visible_rate"][f])],
                           marker_color=["#3366cc", "#999999"]))
    fig.update_layout(height=320, margin=dict(b=40, l=40, r=10))
    _chart(mid, fig, "Firing rate: masked vs visible")
    with right:
        _logit_table(st, store, f)
    st.subheader("Quantile groups")
    for g in store.quantile_groups(f):
        with st.expander(f"activations {g['low']:.3f} – {g['high']:.3f} ({g['count']} tokens)"):
            st.html("<br>".join(colour_tokens(ex, scale) for ex in g["examples"]))


def _logit_table(st, store, f: int) -> None:
    logits = store.logits(f)
    st.subheader("Logit effect")
    st.caption(store.manifest["logit_lens"])
    st.dataframe([{"top token": repr(a), "top": round(b, 3), "bottom token": repr(c), "bottom": round(d, 3)}
                  for (a, b), (c, d) in zip(logits["top"], logits["bottom"])], hide_index=True)


def _denoising_view(st, store, feature, args) -> None:
    import plotly.graph_objects as go
    import torch

    from dlmscope.errors import DLMScopeError

    st.header("Denoising view")
    f = store.check_feature(feature)
    if not store.manifest["diffusion"]:
        raise DLMScopeError(f"the store's model {store.manifest['model']!r} is autoregressive; the denoising view "
                            "needs a masked diffusion model")
    c1, c2, c3, c4, c5 = st.columns([4, 1, 1, 1, 1])
    prompt = c1.text_input("prompt", "The list type")
    gen_length = c2.selectbox("tokens", [16, 32, 64], index=1)
    steps = c3.selectbox("steps", [8, 16, 32, 64], index=2)
    block = c4.selectbox("block length", [8, 16, 32, 64], index=2)
    schedule = c5.selectbox("schedule", ["model's own", "linear", "dream"], help="tokens revealed per step")
    run = st.button("run sampler", type="primary")
    key = (prompt, gen_length, steps, block, schedule)
    if run or (st.query_params.get("run") == "1" and st.session_state.get("denoise_key") != key):
        from dlmscope.diffusion.sampler import generate
        from dlmscope.hooks import capture

        lm, sae = _model_and_sae(st, store, args)
        hook = store.manifest["hook"]
        with st.spinner("sampling"), capture(lm, [hook], to_cpu=True) as cache:
            out = generate(lm, [prompt], gen_length=gen_length, steps=steps, block_length=block, return_history=True,
                           schedule=None if schedule == "model's own" else schedule)
        vocab = store.manifest["vocab"]
        strings = lambda ids: ["▢" if t == lm.mask_id else vocab[t] for t in ids.tolist()]  # noqa: E731
        st.session_state["denoise"] = {  # activations, not latents: any feature is one small encode away
            "acts": torch.stack([a[0] for a in cache.acts[hook]]).float(), "P": out.prompt_length,
            "rows": [strings(rec.x[0]) for rec in out.history], "final": strings(out.sequences[0]),
            "text": (out.texts or [""])[0], "prompt": prompt}
        st.session_state["denoise_key"] = key
    run_ = st.session_state.get("denoise")
    if run_ is None:
        st.info("Type a prompt and press **run sampler**: every step's activations of the chosen feature are shown "
                "per generated position.")
        return
    lm, sae = _model_and_sae(st, store, args)
    start = 0 if st.checkbox("include prompt positions", value=False) else run_["P"]
    with torch.no_grad():
        heat = sae.encode(run_["acts"][:, start:].to(sae.device))[..., f].cpu()  # (steps, positions)
    rows = [r[start:] for r in run_["rows"]]
    n_steps, n_pos = heat.shape
    left, right = st.columns([3, 2])
    fig = go.Figure(go.Heatmap(z=heat.tolist(), x=list(range(start, start + n_pos)), y=list(range(n_steps)),
                               colorscale="Oranges", text=rows, texttemplate="%{text}", textfont={"size": 9},
                               hovertemplate="step %{y}, position %{x}: %{text}<br>activation %{z:.3f}<extra></extra>",
                               colorbar={"title": "act"}))
    fig.update_layout(xaxis_title="position" + ("" if start == 0 else f" (generation starts at {start})"),
                      yaxis_title="step", yaxis_autorange="reversed", height=max(360, 18 * n_steps + 120),
                      margin=dict(b=40, l=50, r=10))
    _chart(left, fig, f"Feature {f} across denoising steps (rows: steps, columns: positions)")
    right.subheader("Text as it unmasks")
    lines = [f"step {s:2d}: " + "".join(row) for s, row in enumerate(rows)] + ["final  : " + "".join(run_["final"][start:])]
    right.code("\n".join(lines), language=None)
    st.success(run_["prompt"] + run_["text"])


def _steering(st, store, feature, args) -> None:
    st.header("Steering playground")
    f = store.check_feature(feature)
    tops = store.top_tokens(f)
    st.caption(f"Feature {f}" + (" · top tokens: " + " | ".join(tops) if tops else " · dead on the held-out text"))
    c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
    prompt = c1.text_input("prompt", "The list type")
    strength = c2.slider("strength", -10.0, 10.0, 4.0, step=0.5)
    schedule = c3.selectbox("steps", ["all", "first:0.1", "first:0.25", "first:0.5"])
    positions = c4.selectbox("positions", ["all", "masked", "generated", "top:4"])
    c5, c6, c7 = st.columns(3)
    mode = c5.selectbox("mode", ["sae", "direction"], help="sae: A[f] += strength * max(A), keep the error; "
                                                          "direction: h += strength * W_dec[f]")
    gen_length = c6.selectbox("tokens", [16, 32, 64], index=1)
    seed = int(c7.number_input("seed", value=0, step=1))
    if st.button("generate", type="primary") or st.query_params.get("run") == "1":
        from dlmscope.analysis.steering import SteeringSpec, steered_generate

        lm, sae = _model_and_sae(st, store, args)
        spec = SteeringSpec(f, strength, mode=mode, steps=schedule, positions=positions)
        with st.spinner("generating"):
            base = steered_generate(lm, sae, None, [prompt], gen_length, gen_length, seed=seed)
            steered = steered_generate(lm, sae, spec, [prompt], gen_length, gen_length, seed=seed)
        a, b = st.columns(2)
        a.subheader("unsteered")
        a.code(prompt + base[0], language=None, wrap_lines=True)
        b.subheader(f"steered (feature {f}, strength {strength:g}, steps {schedule}, positions {positions})")
        b.code(prompt + steered[0], language=None, wrap_lines=True)


def _summary(st, store, feature, args) -> None:
    import plotly.graph_objects as go
    import torch


    m = store.manifest
    st.header("SAE summary")
    st.caption(f"{m['sae'] or 'SAE'} on {m['model']} at {m['hook']}: {m['n_latents']} latents, {m['architecture']} "
               f"k={m['k']}; measured on {m['n_tokens']:,} held-out tokens "
               + (f"({m['n_masked']:,} masked, t ~ U[{m['config']['t_low']}, {m['config']['t_high']}])"
                  if m["diffusion"] else "(uncorrupted)"))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    cols = st.columns(5)
    cols[0].metric("L0", f"{m['l0']:.1f}")
    cols[1].metric("FVU", fmt(m["fvu"]))
    cols[2].metric("FVU masked", fmt(m["fvu_masked"]))
    cols[3].metric("FVU visible", fmt(m["fvu_visible"]))
    cols[4].metric("dead fraction", f"{m['dead_fraction']:.3f}")
    dens = store.stats()["density"]
    live = dens[dens > 0]
    fig = go.Figure(go.Histogram(x=torch.log10(live).tolist(), nbinsx=40, marker_color="#ff7800"))
    fig.update_layout(xaxis_title="log10 density", yaxis_title="latents", height=320)
    _chart(st, fig, f"log10 feature density ({int((dens == 0).sum())} dead latents not shown)")
    path = Path(args.splice) if args.splice else Path(args.store) / SPLICE_FILE
    st.subheader("Splice ΔCE")
    result = _result_json(st, path, args.splice, "splice JSON", "No splice result found: pass --splice FILE (from "
                          f"`dlmscope eval-splice --out FILE`) or put it at {path}.")
    if result is not None:
        st.caption(f"from {path}: ΔCE = spliced - clean masked-token CE; recovered = (ablated - spliced) / "
                   "(ablated - clean)")
        st.dataframe(_splice_rows(result), hide_index=True)
    _evaluation(st, args.sae or m["sae"], args.store)


def _evaluation(st, sae: str, store: str) -> None:
    """The `dlmscope evaluate` result of this SAE, when one is stored beside it or in the feature store."""
    from dlmscope.analysis.evaluate import find_evaluation, summary_rows

    st.subheader("Evaluation (dlmscope evaluate)")
    path = find_evaluation(sae, store)
    if path is None:
        st.caption(f"No evaluation found: run `dlmscope evaluate --sae {sae} --out {store}`.")
        return
    result = json.loads(path.read_text())
    st.caption(f"from {path}: reconstruction per mask ratio on masked vs visible positions (a DLM SAE trained on "
               "masked positions reconstructs them far better than the visible ones); ΔCE of splicing at all positions")
    st.dataframe(summary_rows(result), hide_index=True)
    curves = result["t_curves"]
    cols = st.columns(3)
    cols[0].metric("latents mostly on masked positions", f"{curves['mostly_masked_fraction']:.2f}")
    cols[1].metric("latents mostly on visible positions", f"{curves['mostly_visible_fraction']:.2f}")
    absorption = result.get("absorption", {})
    cols[2].metric("first-letter absorption", f"{absorption['mean_absorption_fraction']:.3f}"
                   if "mean_absorption_fraction" in absorption else "n/a")
    probes = [{"label set": name, "residual": pr["residual"]["all"], **{f"SAE k={k}": v["all"] for k, v in pr["sae"].items()}}
              for name, pr in result.get("probing", {}).items() if "sae" in pr]
    if probes:
        st.caption("sparse probing test accuracy (all positions)")
        st.dataframe(probes, hide_index=True)


def _result_json(st, path: Path, given: str | None, what: str, missing: str, parse=lambda result: result):
    """A page's result file (`given` by its flag, else the store's default `path`): `parse` of its JSON; None after
    the `missing` caption when there is none. A given file that does not exist, or a file that cannot be read or
    parsed, is one line."""
    from dlmscope.errors import DLMScopeError

    if not path.is_file():
        if given:
            raise DLMScopeError(f"{what} {given!r} does not exist")
        st.caption(missing)
        return None
    try:
        return parse(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DLMScopeError(f"cannot read {what} {str(path)!r}: {e}") from None


def _experts(st, store, feature, args) -> None:
    """Expert routing across denoising steps of an MoE model, from `dlmscope experts --out DIR`."""
    from dlmscope.analysis.experts import expert_figure

    st.header("Expert routing")
    path = Path(args.experts) if args.experts else Path(args.store) / EXPERTS_FILE
    result = _result_json(st, path, args.experts, "experts JSON", "No expert routing result: run `dlmscope experts "
                          f"MODEL --out DIR` on an MoE model and pass --experts DIR/{EXPERTS_FILE}, or put it at {path}.",
                          lambda r: {**r, "layers": {int(k): v for k, v in r["layers"].items()}})
    if result is None:
        return
    layers = result["layers"]
    st.caption(f"{result['model']} ({result['family']}): {result['n_experts']} experts, {result['n_active']} active; "
               f"{result['steps']} steps over {result['gen_length']} generated tokens. Usage = share of routed "
               "slots per expert on masked vs visible positions; overlap = Jaccard of a position's experts with "
               "its final ones, by steps since it was unmasked.")
    st.dataframe([{"layer": i, "TV(masked, visible)": round(d["masked_vs_visible_tv"], 4),
                   "overlap across unmasking": round(d["unmask_overlap"], 4)} for i, d in layers.items()],
                 hide_index=True)
    layer = st.selectbox("layer", list(layers))
    fig = expert_figure(result, layer)
    _chart(st, fig, fig.layout.title.text)


def _heatmap(z, x, y, x_title: str, y_title: str, title: str, zmid: float | None = 0.0):
    import plotly.graph_objects as go

    fig = go.Figure(go.Heatmap(z=z, x=[str(v) for v in x], y=[str(v) for v in y], zmid=zmid, colorscale="RdBu",
                               reversescale=zmid is not None))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=380)
    fig.update_yaxes(autorange="reversed")
    return fig


def _plot(st, fig) -> None:
    _chart(st, fig, fig.layout.title.text)


def _mean(rows: list[list[float]]) -> list[float | None]:
    """Column means, NaNs skipped (None where a column has no value)."""
    cols = list(zip(*rows))
    return [sum(v for v in c if v == v) / n if (n := sum(1 for v in c if v == v)) else None for c in cols]


def _circuits(st, store, feature, args) -> None:
    """Activation patching results: a `dlmscope patch --out` sweep, or the Sudoku circuit study's items (mean
    restored fraction by layer and position role, by layer and head, by denoising step and layer; one cell's
    attention pattern across the steps)."""
    from dlmscope.errors import DLMScopeError

    st.header("Circuits")
    path = Path(args.circuits) if args.circuits else Path(args.store) / CIRCUITS_FILE
    result = _result_json(st, path, args.circuits, "circuits JSON", "No patching result: run `dlmscope patch ... "
                          "--out DIR` and pass --circuits DIR/patch.json, pass --circuits experiments/results/"
                          f"circuits_sudoku.json (`python experiments/circuits_sudoku.py`), or put one at {path}.")
    if result is None:
        return
    if "sweep" in result:
        from dlmscope.analysis.patching import sweep_figure

        st.caption(f"{result['model']}: {result['metric']} at position {result['target']} ({result['mode']} mode)")
        _plot(st, sweep_figure(result["sweep"]))
        return
    items = result.get("items") if isinstance(result, dict) else None
    if not items or "layer_position" not in items[0]:
        raise DLMScopeError(f"circuits JSON {str(path)!r} holds neither a `dlmscope patch` sweep nor circuit-study "
                            "items")
    task = st.selectbox("task", sorted({it["task"] for it in items}))
    its = [it for it in items if it["task"] == task]
    roles = list(dict.fromkeys(r for it in its for r in it["roles"]))
    per_role = [[_role_mean(its, layer, role) for role in roles] for layer in range(len(its[0]["layer_position"]))]
    st.caption(f"{len(its)} items; restored fraction of logit(a) - logit(b) at the masked cell, clean into corrupted "
               "(1 = fully restored), mean over items")
    _plot(st, _heatmap(per_role, roles, range(len(per_role)), "position role", "layer",
                             "resid_pre per position, by role (one denoising forward)"))
    if "layer_head" in its[0]:
        heads = [_mean([it["layer_head"][i] for it in its]) for i in range(len(its[0]["layer_head"]))]
        _plot(st, _heatmap(heads, range(len(heads[0])), range(len(heads)), "head", "layer",
                                 "attn.hook_z per head (all positions)"))
    flipped = [it for it in its if it["sampler"]["clean_token"] != it["sampler"]["corrupted_token"]]
    if flipped:
        layers = flipped[0]["sampler"]["layers"]
        steps = [_mean([[float(v) for v in it["sampler"]["restored"][s]] for it in flipped])
                 for s in range(len(flipped[0]["sampler"]["restored"]))]
        _plot(st, _heatmap(steps, layers, range(len(steps)), "layer patched", "patched from step",
                                 f"sampler: the clean puzzle's residual stream from step s on ({len(flipped)} items); "
                                 "share that ends with the clean digit", zmid=None))
    shown = [k for k, it in enumerate(its) if "patterns" in it]
    if not shown:
        return
    k = st.selectbox("cell", shown, format_func=lambda k: f"puzzle {its[k]['puzzle']}, cell {its[k]['cell']} "
                     f"(answer {its[k]['a']}, corrupted {its[k]['b']})")
    it = its[k]
    pattern = it["patterns"]
    layer = st.selectbox("layer", range(len(pattern[0])))
    head = st.selectbox("head", range(len(pattern[0][layer])))
    z = [step[layer][head] for step in pattern]
    _plot(st, _heatmap(z, [f"{i}:{t}" for i, t in enumerate(it["tokens"])], range(len(z)), "key position",
                             "denoising step", f"attention of cell {it['cell']} (query) across steps, layer {layer} "
                             f"head {head}", zmid=None))


def _role_mean(items: list[dict], layer: int, role: str) -> float | None:
    """Mean restored fraction over the positions of `role` at `layer`, averaged per item first."""
    per_item = []
    for it in items:
        vals = [v for v, r in zip(it["layer_position"][layer], it["roles"]) if r == role]
        if vals:
            per_item.append(sum(vals) / len(vals))
    return sum(per_item) / len(per_item) if per_item else None


def _example_text(ex: dict) -> str:
    """One top example as plain text: masked positions as [M](token), the firing token in brackets."""
    toks = [(f"[M]({t})" if m else t) for t, m in zip(ex["tokens"], ex["masked"])]
    toks[ex["center"]] = f"[[{toks[ex['center']]}]]"
    return f"{ex['value']:.2f}: " + "".join(toks).replace("\n", "\\n")


def _attribution(st, store, feature, args) -> None:
    """Attribution graphs from `dlmscope attribute --out DIR`: nodes by layer x position, one column per step;
    feature nodes' hover shows their top examples from the transcoders' feature stores; a pinned node lists its
    strongest edges."""
    from dlmscope.analysis.attribution import FEATURE_TYPE, graph_figure
    from dlmscope.analysis.features import FeatureStore

    st.header("Attribution graph")
    path = Path(args.attribution) if args.attribution else Path(args.store) / ATTRIBUTION_FILE
    result = _result_json(st, path, args.attribution, "attribution JSON", "No attribution graph: run `dlmscope "
                          "attribute MODEL -p PROMPT --position P --out DIR` and pass --attribution "
                          f"DIR/{ATTRIBUTION_FILE}, or put it at {path}.",
                          lambda r: {**r, "labels": [f"step {g['metadata']['step']}, position "
                                                     f"{g['metadata']['target_position']}" for g in r["graphs"]]})
    if result is None:
        return
    graphs, labels = result["graphs"], result["labels"]
    folders = [s.strip() for s in (args.attribution_stores or "").split(",") if s.strip()] + [args.store]
    stores = {}
    for folder in folders:
        fs = FeatureStore.open(folder) if folder != args.store else store
        hook = fs.manifest["hook"]
        if hook.endswith(".hook_mlp_in") and fs.manifest["model"] == result["model"]:
            stores[int(hook.split(".")[1])] = fs
    st.caption(f"{result['model']}, transcoders {result['transcoders']}: {result['text']!r}. Rows: token embeddings, "
               "layers, the target logit; squares are masked positions. Cross-step links join a token the graph "
               "reads to the graph that committed it." + (f" Top examples for layers {sorted(stores)}." if stores
                                                          else " Pass --attribution-stores for top examples."))
    view = st.selectbox("graph", ["all steps"] + labels) if len(graphs) > 1 else labels[0]
    shown = graphs if view == "all steps" else [graphs[labels.index(view)]]
    hover = {}
    for g in shown:
        for v in g["nodes"]:
            layer = int(v["layer"]) if v["layer"].isdigit() else -1
            if v["feature_type"] == FEATURE_TYPE and layer in stores:
                latent = int(v["node_id"].split("_")[1])
                hover[v["node_id"]] = "<br>".join(_example_text(ex) for ex in stores[layer].top_examples(latent, 3))
    event = st.plotly_chart(graph_figure(shown, hover), on_select="rerun", selection_mode="points", key="graph")
    ids = [v["node_id"] for g in shown for v in g["nodes"]]
    clicked = [p.get("customdata") for p in (event.selection.points if event and event.selection else [])]
    clicked = [c for c in clicked if c in ids]
    q = st.query_params
    default = clicked[0] if clicked else q.get("pinned")
    pinned = st.selectbox("pin a node", ["(none)"] + ids, index=(ids.index(default) + 1) if default in ids else 0)
    if result["cross_links"]:
        st.dataframe([{"token node": c["source"], "read at step": c["source_step"], "committed at step": c["target_step"],
                       "by logit": c["target"], "influence": round(c["weight"], 4)} for c in result["cross_links"]],
                     hide_index=True)
    if pinned == "(none)":
        return
    q["pinned"] = pinned
    node = next(v for g in shown for v in g["nodes"] if v["node_id"] == pinned)
    st.subheader(f"{pinned}: {node['feature_type']} at position {node['ctx_idx']}"
                 + (" (masked)" if node.get("masked") else ""))
    links = [x for g in shown for x in g["links"] if pinned in (x["source"], x["target"])]
    links.sort(key=lambda x: -abs(x["weight"]))
    st.dataframe([{"from": x["source"], "to": x["target"], "weight": round(x["weight"], 4)} for x in links[:20]],
                 hide_index=True)
    if pinned in hover:
        st.markdown("Top examples:<br>" + html.escape(hover[pinned]).replace("&lt;br&gt;", "<br>"),
                    unsafe_allow_html=True)


def _diff_page(st, path: str) -> None:
    """`dlmscope diff`'s report: per crosscoder and later checkpoint, the checkpoint-specific latents (both ways)
    with relative norm, Latent Scaling ratios and top held-out examples."""
    from dlmscope.errors import DLMScopeError

    try:
        report = json.loads(Path(path).read_text())
        crosscoders = report["crosscoders"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DLMScopeError(f"cannot read diff report {path!r} (a `dlmscope diff` diff.json): {e}") from None
    st.header("Model diffing: " + " vs ".join(report["checkpoints"]))
    if not crosscoders:
        raise DLMScopeError(f"diff report {path!r} holds no crosscoder")
    key = st.sidebar.selectbox("crosscoder", list(crosscoders))
    r = crosscoders[key]
    st.caption(f"{r['hook']}: {r['n_latents']} latents (k={r['k']}), {r['n_alive']} alive on {r['n_tokens']:,} held-out "
               f"tokens, FVU {r['fvu']:.3f}; specific = relative decoder norm beyond {r['threshold']}, robust = both "
               f"Latent Scaling ratios below {r['nu_max']}")
    for entry in r["per_checkpoint"]:
        for side, owner in (("later", entry["checkpoint"]), ("base", report["checkpoints"][0])):
            s = entry[f"specific_{side}"]
            st.subheader(f"Specific to {owner}: {s['count']} latents ({s['robust']} robust)")
            for lat in s["latents"]:
                with st.expander(f"latent {lat['latent']}: relative norm {lat['relative_norm']:.3f}, nu_error "
                                 f"{lat['nu_error']:.3f}, nu_reconstruction {lat['nu_reconstruction']:.3f}, density "
                                 f"{lat['density']:.4f}" + (" (robust)" if lat["robust"] else "")):
                    st.dataframe([{"activation": ex["activation"], "token": ex["token"], "masked": ex["masked"],
                                   **{f"contribution to {n}": c for n, c in zip(report["checkpoints"], ex["contribution"])},
                                   "context (input, [M] = masked)": ex["context"], "clean text": ex["clean_context"]}
                                  for ex in lat["examples"]], hide_index=True)


if __name__ == "__main__":
    main()
