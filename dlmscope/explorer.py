"""The Streamlit feature explorer (`dlmscope explore`, or `streamlit run apps/explorer.py -- --store DIR`).

Pages read a feature store (`dlmscope features build`); the denoising view and the steering
playground also load the model and SAE named in the store. Bad input shows `st.error`, never a
traceback. Query parameters `?page=feature&feature=12` open a page directly.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from pathlib import Path

PAGES = ("Feature list", "Feature", "Denoising view", "Steering playground", "SAE summary")


def _args() -> argparse.Namespace:
    """Command-line flags after `--`, or DLMSCOPE_STORE / _MODEL / _SAE / _SPLICE in the environment."""
    env = os.environ.get
    p = argparse.ArgumentParser()
    p.add_argument("--store", default=env("DLMSCOPE_STORE"))
    p.add_argument("--model", default=env("DLMSCOPE_MODEL"))
    p.add_argument("--sae", default=env("DLMSCOPE_SAE"))
    p.add_argument("--splice", default=env("DLMSCOPE_SPLICE"), help="splice JSON from `dlmscope eval-splice --out`")
    args, _ = p.parse_known_args(sys.argv[1:])
    return args


def _colour_tokens(ex: dict, scale: float) -> str:
    """Tokens as HTML spans, background by activation, masked positions underlined."""
    spans = []
    for tok, act, masked in zip(ex["tokens"], ex["acts"], ex["masked"]):
        alpha = min(1.0, act / scale) if scale > 0 else 0.0
        style = f"background: rgba(255,120,0,{alpha:.2f}); padding:1px;"
        if masked:
            style += " border-bottom: 2px dashed #3366cc;"
        spans.append(f'<span title="{act:.3f}" style="{style}">{html.escape(tok).replace(" ", "&nbsp;")}</span>')
    return "<div style='font-family:monospace'>" + "".join(spans) + "</div>"


def main() -> None:
    import plotly.graph_objects as go
    import streamlit as st
    import torch

    from dlmscope.analysis.features import FeatureStore
    from dlmscope.errors import DLMScopeError

    st.set_page_config(page_title="dlmscope explorer", layout="wide")
    args = _args()

    @st.cache_resource
    def open_store(path: str):
        return FeatureStore.open(path)

    @st.cache_resource
    def open_model_and_sae(model: str, sae: str):
        from dlmscope.analysis.splice import check_sae_matches
        from dlmscope.models import load_model
        from dlmscope.sae import load_sae

        lm, s = load_model(model), load_sae(sae)
        check_sae_matches(lm, s)
        return lm, s

    if not args.store:
        st.error("no feature store given: pass --store DIR (build one with `dlmscope features build`)")
        return
    try:
        store = open_store(args.store)
    except DLMScopeError as e:
        st.error(str(e))
        return
    m = store.manifest
    st.sidebar.title("dlmscope")
    st.sidebar.caption(f"{m['model']} · {m['hook']} · {m['n_latents']} latents, k={m['k']}")
    q = st.query_params
    default_page = {"list": 0, "feature": 1, "denoise": 2, "steer": 3, "summary": 4}.get(q.get("page", "list"), 0)
    page = st.sidebar.radio("page", PAGES, index=default_page)
    feature = st.sidebar.number_input("feature", min_value=0, value=int(q.get("feature", 0)), step=1)
    stats = store.stats()

    if page == "Feature list":
        st.header("Features")
        show_dead = st.checkbox("show dead features", value=False)
        search = st.text_input("search top tokens")
        sort = st.selectbox("sort by", ["density", "max_act", "masked/visible"])
        ratio = stats["masked_rate"] / stats["visible_rate"].clamp_min(1e-9)
        key = {"density": stats["density"], "max_act": stats["max_act"], "masked/visible": ratio}[sort]
        ids = [i for i in key.argsort(descending=True).tolist() if show_dead or stats["density"][i] > 0]
        rows = []
        for i in ids:
            if len(rows) >= 200:
                break
            tokens = store.top_tokens(i, 3) if stats["density"][i] > 0 else []
            if search and not any(search.lower() in t.lower() for t in tokens):
                continue
            rows.append({"feature": i, "density": float(stats["density"][i]), "max act": float(stats["max_act"][i]),
                         "masked/visible": float(ratio[i]), "top tokens": " | ".join(tokens)})
        st.dataframe(rows, use_container_width=True, hide_index=True)
        st.caption(f"{len(ids)} features shown (first 200 rows)")

    elif page == "Feature":
        try:
            store.check_feature(int(feature))
        except DLMScopeError as e:
            st.error(str(e))
            return
        f = int(feature)
        st.header(f"Feature {f}")
        pos, val = store.activations(f)
        c1, c2, c3, c4 = st.columns(4)
        c1.metric("density", f"{float(stats['density'][f]):.2e}")
        c2.metric("max activation", f"{float(stats['max_act'][f]):.3f}")
        c3.metric("fires on masked", f"{float(stats['masked_rate'][f]):.2e}")
        c4.metric("fires on visible", f"{float(stats['visible_rate'][f]):.2e}")
        if val.numel() == 0:
            st.info("This feature never fired on the held-out text (dead).")
            return
        scale = float(val.max())
        st.subheader("Top activating examples (masked positions underlined)")
        for ex in store.top_examples(f, 10):
            st.markdown(_colour_tokens(ex, scale) + f"<small>max {ex['value']:.3f}</small>", unsafe_allow_html=True)
        left, right = st.columns(2)
        fig = go.Figure(go.Histogram(x=val.tolist(), nbinsx=40))
        fig.update_layout(title=f"activation histogram (density {float(stats['density'][f]):.2e})", height=300)
        left.plotly_chart(fig, use_container_width=True)
        logits = store.logits(f)
        right.subheader("Logit effect")
        right.dataframe([{"top token": a, "top": round(b, 3), "bottom token": c, "bottom": round(d, 3)}
                         for (a, b), (c, d) in zip(logits["top"], logits["bottom"])], hide_index=True)
        st.subheader("Quantile groups")
        for g in store.quantile_groups(f):
            with st.expander(f"activations {g['low']:.3f} - {g['high']:.3f}"):
                for ex in g["examples"]:
                    st.markdown(_colour_tokens(ex, scale), unsafe_allow_html=True)

    elif page == "Denoising view":
        st.header("Denoising view")
        prompt = st.text_input("prompt", "The list type")
        steps = st.slider("steps", 4, 32, 16, step=4)
        if st.button("run sampler") or q.get("run") == "1":
            try:
                lm, sae = open_model_and_sae(args.model or m["model"], args.sae or m["sae"])
                store.check_feature(int(feature))
            except DLMScopeError as e:
                st.error(str(e))
                return
            from dlmscope.diffusion.sampler import generate
            from dlmscope.hooks import capture

            with capture(lm, [m["hook"]], to_cpu=True) as cache:
                out = generate(lm, [prompt], gen_length=steps, steps=steps, block_length=steps, return_history=True)
            P = out.prompt_length
            heat = torch.stack([sae.encode(a[0, P:].float())[:, int(feature)] for a in cache.acts[m["hook"]]])
            fig = go.Figure(go.Heatmap(z=heat.tolist(), colorscale="Oranges"))
            fig.update_layout(title=f"feature {int(feature)}: steps x generated positions", xaxis_title="position",
                              yaxis_title="step", height=420)
            st.plotly_chart(fig, use_container_width=True)
            st.subheader("Text as it unmasks")
            for rec in out.history:
                ids = rec.x[0, P:].tolist()
                text = " ".join("▢" if t == lm.mask_id else lm.to_text([t], skip_special=False) for t in ids)
                st.text(f"step {rec.step:2d}: {text}")
            st.success(prompt + out.texts[0])

    elif page == "Steering playground":
        st.header("Steering playground")
        prompt = st.text_input("prompt", "The list type")
        strength = st.slider("strength", 0.0, 10.0, 2.0)
        schedule = st.selectbox("steps", ["all", "first:0.1", "first:0.25", "first:0.5"])
        positions = st.selectbox("positions", ["all", "masked", "generated"])
        if st.button("generate") or q.get("run") == "1":
            try:
                lm, sae = open_model_and_sae(args.model or m["model"], args.sae or m["sae"])
                from dlmscope.analysis.steering import SteeringSpec, steered_generate

                spec = SteeringSpec(int(feature), strength, steps=schedule, positions=positions)
                base = steered_generate(lm, sae, None, [prompt], 32, 32)
                steered = steered_generate(lm, sae, spec, [prompt], 32, 32)
            except DLMScopeError as e:
                st.error(str(e))
                return
            a, b = st.columns(2)
            a.subheader("unsteered")
            a.write(prompt + base[0])
            b.subheader(f"steered (feature {int(feature)}, strength {strength})")
            b.write(prompt + steered[0])

    else:
        st.header("SAE summary")
        c1, c2, c3 = st.columns(3)
        c1.metric("L0", f"{m['l0']:.1f}")
        c2.metric("dead fraction", f"{m['dead_fraction']:.3f}")
        c3.metric("tokens", f"{m['n_seqs'] * m['context_length']:,}")
        dens = torch.log10(stats["density"].clamp_min(1e-7))
        fig = go.Figure(go.Histogram(x=dens.tolist(), nbinsx=40))
        fig.update_layout(title="log10 feature density", height=320)
        st.plotly_chart(fig, use_container_width=True)
        if args.splice and Path(args.splice).is_file():
            result = json.loads(Path(args.splice).read_text())
            st.subheader("Splice ΔCE")
            st.dataframe([{"t bin": k, "clean CE": v["clean"]["ce"][0], "spliced CE": v["sae"]["ce"][0],
                           "ΔCE": v["delta_ce"][0], "recovered": v["recovered"]} for k, v in result["bins"].items()],
                         hide_index=True)
        else:
            st.caption("No splice result given (pass --splice FILE from `dlmscope eval-splice --out`).")


if __name__ == "__main__":
    main()
