"""The explorer: every page under Streamlit's AppTest on a tiny model, and `dlmscope explore` launched as a user
does (the installed console script, fresh cache) with every page opened in a real headless Chromium."""

import json
import os
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch
from browser import CHROMIUM, Browser, free_port, wait_port

APP = str(Path(__file__).resolve().parents[2] / "dlmscope" / "explorer.py")  # the file `dlmscope explore` runs
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def env(tiny_dirs, llada, tiny_sae, tokenizer, tmp_path_factory):
    """A store for the tiny LLaDA and its SAE (saved to a folder, as the app reloads it), with a splice result."""
    from dlmscope.analysis.features import FeatureStoreConfig, build_feature_store
    from dlmscope.analysis.splice import SpliceConfig, splice_eval
    from dlmscope.data import heldout_rows
    from dlmscope.io_utils import atomic_write_json
    from dlmscope.sae import load_sae, save_sae

    root = tmp_path_factory.mktemp("explorer")
    sae_dir = save_sae(tiny_sae, root / "sae")
    rows = heldout_rows(tokenizer, 32, n=12)
    store = build_feature_store(llada, load_sae(sae_dir), rows, root / "store", FeatureStoreConfig(),
                                sae_name=str(sae_dir), model_ref=str(tiny_dirs["llada"]))
    atomic_write_json(store / "splice.json", splice_eval(llada, tiny_sae, rows, SpliceConfig(t_bins=(0.5,), n_seqs=2)))
    return {"DLMSCOPE_STORE": str(store), "root": root, "sae": sae_dir}


def _app(env, monkeypatch, extra_env=None, **query):
    from streamlit.testing.v1 import AppTest

    for k in ("DLMSCOPE_STORE", "DLMSCOPE_MODEL", "DLMSCOPE_SAE", "DLMSCOPE_SPLICE", "DLMSCOPE_EXPERTS", "DLMSCOPE_CIRCUITS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DLMSCOPE_STORE", env["DLMSCOPE_STORE"])
    for k, v in (extra_env or {}).items():
        monkeypatch.setenv(k, str(v))
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def _busiest(env):
    from dlmscope.analysis.features import FeatureStore

    return int(FeatureStore.open(env["DLMSCOPE_STORE"]).stats()["density"].argmax())


def _charts(at):
    return at.get("plotly_chart")


def test_feature_list_sorts_searches_and_hides_dead(env, monkeypatch):
    from dlmscope.analysis.features import FeatureStore

    store = FeatureStore.open(env["DLMSCOPE_STORE"])
    live = int((store.stats()["density"] > 0).sum())
    at = _app(env, monkeypatch, page="list")
    assert not at.exception and not at.error and at.header[0].value == "Features"
    table = at.dataframe[0].value
    assert len(table) == live and list(table["density"]) == sorted(table["density"], reverse=True)
    at.selectbox[0].set_value("max activation").run()
    table = at.dataframe[0].value
    assert list(table["max activation"]) == sorted(table["max activation"], reverse=True)
    token = store.top_tokens(_busiest(env))[0]
    at.text_input[0].input(token).run()
    table = at.dataframe[0].value
    assert 0 < len(table) <= live and all(token.lower() in t.lower() for t in table["top tokens"])
    at.text_input[0].input("").run()
    at.checkbox[1].check().run()
    assert len(at.dataframe[0].value) == store.n_latents


def test_feature_page(env, monkeypatch):
    f = _busiest(env)
    at = _app(env, monkeypatch, page="feature", feature=str(f))
    assert not at.exception and not at.error and at.header[0].value == f"Feature {f}"
    assert [s.value for s in at.subheader] == ["Top activating examples", "Logit effect", "Quantile groups"]
    assert [m.label for m in at.metric][:2] == ["density", "max activation"]
    assert len(at.expander) == 10 and len(_charts(at)) == 2
    html = [h.proto.body for h in at.get("html")]
    assert "background:rgba(255,120,0," in html[0] and html[0].count("<br>") == 9  # corpus text: st.html, no Markdown
    assert "Activation histogram (density" in html[1] and "Firing rate" in html[2]
    assert not json.loads(_charts(at)[0].proto.spec)["layout"].get("title")  # no title under plotly's toolbar
    assert len(at.dataframe[0].value) == 10  # top/bottom logits


@pytest.mark.parametrize("feature, message", [("99999", "out of range"), ("-3", "out of range"),
                                              ("abc", "not an integer")])
def test_bad_feature_is_an_error_not_a_traceback(env, monkeypatch, feature, message):
    at = _app(env, monkeypatch, page="feature", feature=feature)
    assert not at.exception and message in at.error[0].value


def test_denoising_view(env, monkeypatch):
    f = _busiest(env)
    at = _app(env, monkeypatch, page="denoise", feature=str(f), run="1")
    assert not at.exception and not at.error and at.header[0].value == "Denoising view"
    heat = json.loads(_charts(at)[0].proto.spec)["data"][0]
    assert heat["type"] == "heatmap" and len(heat["z"]) == 32 and len(heat["z"][0]) == 32  # steps x positions
    lines = at.code[0].value.splitlines()
    assert lines[0].startswith("step  0: ") and lines[0].count("▢") == 32 and "▢" not in lines[-1]
    at.sidebar.number_input[0].set_value((f + 1) % 256).run()  # another feature: the cached run, no resampling
    assert not at.exception and len(_charts(at)) == 1 and at.code[0].value.splitlines() == lines
    at.checkbox[0].check().run()
    assert len(json.loads(_charts(at)[0].proto.spec)["data"][0]["z"][0]) > 32  # prompt positions added


def test_steering_playground(env, monkeypatch):
    at = _app(env, monkeypatch, page="steer", feature=str(_busiest(env)), run="1")
    assert not at.exception and not at.error
    subs = [s.value for s in at.subheader]
    assert subs[0] == "unsteered" and subs[1].startswith("steered (feature") and len(at.code) == 2


def test_summary_with_splice_table(env, monkeypatch):
    at = _app(env, monkeypatch, page="summary")
    assert not at.exception and not at.error
    assert [m.label for m in at.metric] == ["L0", "FVU", "FVU masked", "FVU visible", "dead fraction"]
    assert list(at.dataframe[0].value["t bin"]) == ["0.5", "dlmscope"] and len(_charts(at)) == 1
    at = _app(env, monkeypatch, {"DLMSCOPE_SPLICE": env["root"] / "nope.json"}, page="summary")
    assert not at.exception and "does not exist" in at.error[0].value


def test_expert_routing_page(env, monkeypatch, tmp_path, tokenizer):
    from dlmscope.analysis.experts import expert_dynamics, write_expert_report
    from dlmscope.models import load_model
    from dlmscope.models.tiny import write_tiny_lladamoe

    at = _app(env, monkeypatch, page="experts")
    assert not at.exception and not at.error and "No expert routing result" in at.caption[0].value
    moe = load_model(write_tiny_lladamoe(tmp_path / "moe", vocab_size=len(tokenizer), tokenizer=tokenizer,
                                         mask_id=tokenizer.mask_token_id))
    json_path, _ = write_expert_report(expert_dynamics(moe, ["def f"], gen_length=4, steps=4), tmp_path / "rep")
    at = _app(env, monkeypatch, {"DLMSCOPE_EXPERTS": json_path}, page="experts")
    assert not at.exception and not at.error
    assert list(at.dataframe[0].value["layer"]) == [0, 1] and len(_charts(at)) == 1
    at = _app(env, monkeypatch, {"DLMSCOPE_EXPERTS": tmp_path / "nope.json"}, page="experts")
    assert "does not exist" in at.error[0].value


def test_circuits_page(env, monkeypatch, tmp_path, tiny_dirs):
    """The study's committed result (heatmaps, one cell's attention across steps) and a `dlmscope patch` sweep."""
    from dlmscope.cli import main

    at = _app(env, monkeypatch, page="circuits")
    assert not at.exception and not at.error and "No patching result" in at.caption[0].value
    study = Path(__file__).resolve().parents[2] / "experiments" / "results" / "circuits_sudoku.json"
    at = _app(env, monkeypatch, {"DLMSCOPE_CIRCUITS": study}, page="circuits")
    assert not at.exception and not at.error
    assert [s.label for s in at.selectbox] == ["task", "cell", "layer", "head"]
    assert len(_charts(at)) == 4  # roles x layers, heads x layers, steps x layers, the cell's pattern
    at.selectbox[0].select("control").run()
    assert not at.exception and not at.error and len(_charts(at)) >= 3
    main(["patch", "--model", str(tiny_dirs["llada"]), "--clean", "a b c d", "--change", "1=#7", "--answer", "#5",
          "--metric", "logprob", "--gen-length", "2", "--out", str(tmp_path)])
    at = _app(env, monkeypatch, {"DLMSCOPE_CIRCUITS": tmp_path / "patch.json"}, page="circuits")
    assert not at.exception and not at.error and len(_charts(at)) == 1 and "logprob at position" in at.caption[0].value
    (tmp_path / "other.json").write_text('{"items": []}')
    for bad, message in (("other.json", "holds neither"), ("nope.json", "does not exist")):
        at = _app(env, monkeypatch, {"DLMSCOPE_CIRCUITS": tmp_path / bad}, page="circuits")
        assert not at.exception and message in at.error[0].value


def test_summary_shows_the_evaluation(env, monkeypatch, tmp_path, llada, tiny_sae):
    from dlmscope.analysis.evaluate import EvaluateConfig, evaluate_sae_suite, write_report

    store = tmp_path / "store"
    shutil.copytree(env["DLMSCOPE_STORE"], store)
    rows = torch.randint(4, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = EvaluateConfig(n_seqs=4, t_bins=(0.3, 0.7), splice_seqs=2, probes=(), absorption=False, batch_size=2)
    write_report(evaluate_sae_suite(llada, tiny_sae, rows, cfg), store)
    at = _app(env, monkeypatch, {"DLMSCOPE_STORE": store}, page="summary")
    assert not at.exception and not at.error
    assert "Evaluation (dlmscope evaluate)" in [s.value for s in at.subheader]
    assert "latents mostly on masked positions" in [m.label for m in at.metric]
    table = at.dataframe[1].value
    assert list(table["t"]) == [0.3, 0.7] and (table["fvu_masked"] > 0).all()


def test_bad_input_shows_errors(env, monkeypatch, tmp_path, tiny_dirs):
    from dlmscope.analysis.features import FeatureStoreConfig, build_feature_store
    from dlmscope.data import heldout_rows
    from dlmscope.models import load_model
    from dlmscope.sae import SAEConfig, SAE, save_sae

    at = _app({"DLMSCOPE_STORE": str(tmp_path)}, monkeypatch)
    assert not at.exception and "not a feature store" in at.error[0].value
    # an SAE trained on another model
    other = save_sae(SAE(SAEConfig(64, 256, 8, metadata={"model_name": "other", "hook_name": HOOK})), tmp_path / "o")
    at = _app(env, monkeypatch, {"DLMSCOPE_SAE": other}, page="denoise", run="1")
    assert not at.exception and "trained on model 'other'" in at.error[0].value
    # an SAE for this model that the store was not built for
    small = save_sae(SAE(SAEConfig(64, 32, 4, metadata={"model_name": "llada", "hook_name": HOOK})), tmp_path / "s")
    at = _app(env, monkeypatch, {"DLMSCOPE_SAE": small}, page="steer", run="1")
    assert not at.exception and "rebuild it for this SAE" in at.error[0].value
    # an empty store: nothing fired
    lm = load_model(tiny_dirs["llada"])
    dead = SAE(SAEConfig(64, 32, 4, metadata={"model_name": "llada", "hook_name": HOOK}))
    with torch.no_grad():
        dead.b_enc.fill_(-1e4)
    store = build_feature_store(lm, dead, heldout_rows(lm.tokenizer, 16, n=2), tmp_path / "empty", FeatureStoreConfig())
    at = _app({"DLMSCOPE_STORE": str(store)}, monkeypatch, page="list")
    assert not at.exception and "store is empty" in at.error[0].value
    at = _app(env, monkeypatch, page="nowhere")
    assert not at.exception and "page='nowhere'" in at.error[0].value


def test_cli_features_build(env, tiny_dirs, tmp_path, capsys):
    from dlmscope.analysis.features import FeatureStore
    from dlmscope.cli import main

    out = tmp_path / "built"
    main(["features", "build", "--sae", str(env["sae"]), "--model", str(tiny_dirs["llada"]), "--out", str(out),
          "--n-seqs", "3", "--context-length", "16"])
    assert FeatureStore.open(out).manifest["n_tokens"] == 48
    with pytest.raises(SystemExit) as e:
        main(["features", "build", "--sae", str(env["sae"]), "--model", str(tiny_dirs["causal"]), "--out", str(out)])
    assert e.value.code == 2 and "trained on model 'llada'" in capsys.readouterr().err


def _serve(root: Path, *options: str):
    """`dlmscope explore OPTIONS` from PATH on a free port with an empty cache under `root`; yields the port.
    The whole process group is stopped afterwards (streamlit is its child)."""
    port = free_port()
    log = open(root / "explore.log", "w")
    server = subprocess.Popen([shutil.which("dlmscope"), "explore", *options, "--port", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "DLMSCOPE_CACHE": str(root / "cache")},
                              cwd=root, start_new_session=True)
    try:
        wait_port(port, server, seconds=180)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def explore(tmp_path_factory):
    """`dlmscope explore` with no options: it builds the shipped SAE's feature store, then serves."""
    root = tmp_path_factory.mktemp("explore")
    for port in _serve(root):
        yield {"port": port, "cache": root / "cache", "log": root / "explore.log"}


def test_explore_builds_the_default_store_and_serves(explore):
    from dlmscope.analysis.features import FeatureStore

    (store,) = (explore["cache"] / "stores").iterdir()
    assert store.name == "dlmscope-tiny-dlm__tiny-dlm-L3-k32" and FeatureStore.open(store).n_latents == 2048
    assert "feature store for tiny-dlm-L3-k32" in explore["log"].read_text()
    health = urllib.request.urlopen(f"http://127.0.0.1:{explore['port']}/_stcore/health", timeout=10).read()
    assert health == b"ok"


# page -> (extra query, JavaScript that is true once the page has rendered)
TEXT = "document.body.innerText.includes({!r})".format
PLOTS = "document.querySelectorAll('.js-plotly-plot').length >= {}".format
PAGES = {"list": ("", TEXT("Features")),
         "feature": ("", f"{TEXT('Top activating examples')} && {PLOTS(2)} && "
                         "document.querySelectorAll('[data-testid=stExpander]').length == 10"),
         "denoise": ("&run=1", f"{TEXT('step  0:')} && document.querySelector('.js-plotly-plot .heatmaplayer, "
                               ".js-plotly-plot .hm')"),
         "steer": ("&run=1", TEXT("steered (feature")), "summary": ("", TEXT("dead fraction"))}
ERRORS = "document.querySelectorAll('[data-testid=stException], [data-testid=stAlertContentError]').length"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it; "
                                                         "locally: apt-get install chromium chromium-driver)")
def test_real_browser_renders_every_page_of_dlmscope_explore(explore, tmp_path):
    from dlmscope.analysis.features import FeatureStore

    shots = Path(os.environ.get("DLMSCOPE_SCREENSHOTS", tmp_path))  # never inside the repository by default
    shots.mkdir(parents=True, exist_ok=True)
    (store,) = (explore["cache"] / "stores").iterdir()
    f = int(FeatureStore.open(store).stats()["density"].argmax())
    browser = Browser(tmp_path / "profile")
    try:
        for page, (extra, ready) in PAGES.items():
            url = f"http://127.0.0.1:{explore['port']}/?page={page}&feature={f}{extra}"
            ok = browser.open_and_wait(url, f"({ready}) || {ERRORS}")
            body = browser.js("document.body.innerText")
            assert ok and browser.js(ERRORS) == 0 and "Traceback" not in body, f"page {page}: {body[-2000:]}"
            assert browser.screenshot(shots / f"{page}.png").stat().st_size > 20_000
            if page == "feature":
                assert f"Feature {f}" in body and "Logit effect" in body and "Quantile groups" in body
                assert browser.js("document.querySelectorAll('span.tok').length") >= 50
                assert browser.js("document.querySelectorAll('span.tok.masked').length") >= 1
            if page == "denoise":
                assert "Text as it unmasks" in body and "▢" in body
    finally:
        browser.close()


MARKUP = "x_1 = a*b*c; `code` <b>bold</b> costs $5 and $x$; __init__ **s** _i_ <script>alert(1)</script>\n"
"""Corpus text that Markdown, KaTeX or HTML would turn into something else if it reached them."""
EXAMPLES_JS = """(() => { const box = document.querySelector('span.tok').closest('[data-testid=stHtml], [data-testid=stMarkdownContainer]');
  return {tokens: [...box.querySelectorAll('span.tok')].map(s => s.textContent),
          markup: box.querySelectorAll('em, strong, i, b, code, script, .katex, mjx-container').length,
          text: box.innerText}; })()"""
OVERLAPS_JS = """(() => { const hit = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  const bars = [...document.querySelectorAll('.modebar-container')].map(m => m.getBoundingClientRect());
  const inner = [...document.querySelectorAll('.js-plotly-plot .gtitle')].filter(t => t.textContent.trim());
  const titles = [...inner, ...document.querySelectorAll('b.chart-title')].map(t => t.getBoundingClientRect());
  return {titles: document.querySelectorAll('b.chart-title').length, plot_titles: inner.length, bars: bars.length,
          overlaps: titles.filter(t => bars.some(b => hit(t, b))).length}; })()"""


@pytest.fixture(scope="module")
def markup_store(llada, tiny_sae, tiny_dirs, tokenizer, tmp_path_factory):
    """A store built on text full of Markdown, KaTeX and HTML syntax, and the feature firing most on it."""
    from dlmscope.analysis.features import FeatureStore, FeatureStoreConfig, build_feature_store
    from dlmscope.data import pack
    from dlmscope.sae import save_sae

    root = tmp_path_factory.mktemp("markup")
    sae_dir = save_sae(tiny_sae, root / "sae")
    rows = pack(tokenizer, [MARKUP * 3] * 8, 32).input_ids
    store = build_feature_store(llada, tiny_sae, rows, root / "store", FeatureStoreConfig(), sae_name=str(sae_dir),
                                model_ref=str(tiny_dirs["llada"]))
    opened = FeatureStore.open(store)

    def covered(f: int) -> int:
        text = "".join(t for ex in opened.top_examples(f, 10) for t in ex["tokens"])
        return sum(c in text for c in "_*<`$")

    live = [int(f) for f in (opened.stats()["count"] > 0).nonzero().flatten()]
    f = max(live, key=lambda f: (covered(f), int(opened.stats()["count"][f])))
    return {"root": root, "store": store, "sae": sae_dir, "feature": f}


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
def test_real_browser_shows_markup_in_tokens_as_text(markup_store, tiny_dirs, tmp_path):
    from dlmscope.analysis.features import FeatureStore

    f = markup_store["feature"]
    examples = FeatureStore.open(markup_store["store"]).top_examples(f, 10)
    tokens = [t for ex in examples for t in ex["tokens"]]
    assert all(any(c in t for t in tokens) for c in "_*<`$"), tokens  # the feature's examples hold every one
    shown = [t.replace(" ", "\u00a0").replace("\n", "⏎") for t in tokens]  # colour_tokens' two substitutions
    browser = Browser(tmp_path / "profile")
    try:
        for port in _serve(markup_store["root"], "--store", str(markup_store["store"]), "--sae",
                           str(markup_store["sae"]), "--model", str(tiny_dirs["llada"])):
            ok = browser.open_and_wait(f"http://127.0.0.1:{port}/?page=feature&feature={f}",
                                       f"({TEXT('Top activating examples')} && {PLOTS(2)}) || {ERRORS}")
            assert ok and browser.js(ERRORS) == 0, browser.js("document.body.innerText")[-2000:]
            got = browser.js(EXAMPLES_JS)
            assert got["tokens"] == shown and got["markup"] == 0  # every token verbatim, nothing turned into markup
            charts = browser.js(OVERLAPS_JS)
            assert charts == {"titles": 2, "plot_titles": 0, "bars": 2, "overlaps": 0}
            browser.screenshot(tmp_path / "markup.png")
    finally:
        browser.close()


def test_explorer_has_no_relative_imports():
    """Streamlit runs dlmscope/explorer.py as a script (no parent package): a relative import anywhere in it,
    even inside one page's function, breaks that page with an ImportError."""
    import ast

    tree = ast.parse(Path(APP).read_text())
    relative = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, f"relative imports at lines {relative}"


def test_diff_page_lists_specific_latents_with_examples(llada, tokenizer, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from dlmscope.analysis.diffing import crosscoder_report, paired_text
    from dlmscope.data import heldout_rows
    from dlmscope.io_utils import atomic_write_json
    from dlmscope.sae.crosscoder import CrossCoder, CrossCoderConfig

    cc = CrossCoder(CrossCoderConfig(64, 128, 4, ["base", "tuned"], {"hook_name": HOOK}))
    with torch.no_grad():
        cc.W_dec[0, :3] = 0  # latents 0-2 decode only into "tuned"
    text = paired_text([llada, llada], HOOK, heldout_rows(tokenizer, 32, n=4))
    report = {"checkpoints": ["base", "tuned"], "crosscoders": {"cc": crosscoder_report(cc, text, llada, n_examples=2)}}
    atomic_write_json(tmp_path / "diff.json", report)
    monkeypatch.setenv("DLMSCOPE_DIFF", str(tmp_path / "diff.json"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception and not at.error
    assert "Specific to tuned: 3 latents" in [s.value for s in at.subheader][0]
    assert len(at.dataframe) == 3 and len(at.dataframe[0].value) == 2
    monkeypatch.setenv("DLMSCOPE_DIFF", str(tmp_path / "nope.json"))
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert "cannot read diff report" in at.error[0].value


def test_attribution_graph_page(env, monkeypatch, tiny_dirs, llada, tokenizer, tmp_path):
    """`dlmscope attribute`'s output on the page: one column per step, top examples in the hover, a pinned node's
    edges; a missing file is an error line."""
    from dlmscope.analysis.attribution import AttributeConfig, attribute_run
    from dlmscope.analysis.features import FeatureStoreConfig, build_feature_store
    from dlmscope.data import heldout_rows
    from dlmscope.sae import SAEConfig, build_sae, save_sae

    tcs = []
    for i in range(llada.n_layers):
        meta = {"model_name": llada.name, "hook_name": f"blocks.{i}.hook_mlp_in", "hook_name_out": f"blocks.{i}.hook_mlp_out"}
        tc = build_sae(SAEConfig(64, 64, 8, "skip_transcoder", meta, ()), seed=i)
        tcs.append(save_sae(tc, tmp_path / "tcs" / f"l{i}"))
    attribute_run(AttributeConfig(model=str(tiny_dirs["llada"]), transcoders=str(tmp_path / "tcs"), prompt="a b",
                                  position=2, gen_length=4, steps=4, links=1, node_threshold=1.0, edge_threshold=1.0,
                                  out=str(tmp_path / "attr")))
    from dlmscope.sae import load_sae

    store = build_feature_store(llada, load_sae(tcs[1]), heldout_rows(tokenizer, 32, n=4), tmp_path / "store1",
                                FeatureStoreConfig(), sae_name=str(tcs[1]), model_ref=str(tiny_dirs["llada"]))
    at = _app(env, monkeypatch, {"DLMSCOPE_ATTRIBUTION": tmp_path / "attr" / "attribution.json",
                                 "DLMSCOPE_ATTRIBUTION_STORES": store}, page="attribution")
    assert not at.exception and not at.error
    assert "Top examples for layers [1]" in at.caption[0].value
    fig = json.loads(_charts(at)[0].proto.spec)
    hovers = [t for tr in fig["data"] for t in (tr.get("text") or [])]
    assert any("[[" in t for t in hovers)  # a layer-1 feature's top examples
    multi = len(at.selectbox) == 2
    if multi:  # linked graphs: the cross-step view has one subplot per step
        assert at.selectbox[0].value == "all steps" and sum(k.startswith("xaxis") for k in fig["layout"]) >= 2
    node = next(o for o in at.selectbox[-1].options if o.startswith("1_"))
    at = at.selectbox[-1].select(node).run()
    assert not at.exception and at.subheader[0].value.startswith(node) and len(at.dataframe[-1].value) > 0
    assert at.query_params["pinned"] == [node] or at.query_params["pinned"] == node
    at = _app(env, monkeypatch, {"DLMSCOPE_ATTRIBUTION": tmp_path / "nope.json"}, page="attribution")
    assert "does not exist" in at.error[0].value


def test_damaged_store_is_a_page_error(env, monkeypatch, tmp_path):
    """A flipped bit in the store's arrays (or an edited manifest) is an error on the page, never a traceback."""
    store = Path(shutil.copytree(env["DLMSCOPE_STORE"], tmp_path / "store"))
    manifest = json.loads((store / "manifest.json").read_text())
    arrays = store / manifest["arrays"]["file"]
    raw = bytearray(arrays.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    arrays.write_bytes(bytes(raw))
    at = _app(env, monkeypatch, {"DLMSCOPE_STORE": store}, page="feature", feature="3")
    assert not at.exception and "is damaged (checksum mismatch)" in at.error[0].value
    (store / "manifest.json").write_text(json.dumps({**manifest, "vocab": manifest["vocab"][:5]}))
    at = _app(env, monkeypatch, {"DLMSCOPE_STORE": store}, page="list")
    assert not at.exception and "manifest.json' is damaged" in at.error[0].value
