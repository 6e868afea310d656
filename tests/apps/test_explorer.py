"""The explorer: every page under Streamlit's AppTest on a tiny model, the CLI, and one real headless-Chromium run."""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

APP = str(Path(__file__).resolve().parents[2] / "apps" / "explorer.py")
HOOK = "blocks.1.hook_resid_post"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


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

    for k in ("DLMSCOPE_STORE", "DLMSCOPE_MODEL", "DLMSCOPE_SAE", "DLMSCOPE_SPLICE"):
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
    examples = at.markdown[0].value
    assert "background:rgba(255,120,0," in examples and examples.count("<br>") == 9
    assert "density" in json.loads(_charts(at)[0].proto.spec)["layout"]["title"]["text"]
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
    from dlmscope.sae import SAEConfig, TopKSAE, save_sae

    at = _app({"DLMSCOPE_STORE": str(tmp_path)}, monkeypatch)
    assert not at.exception and "not a feature store" in at.error[0].value
    # an SAE trained on another model
    other = save_sae(TopKSAE(SAEConfig(64, 256, 8, metadata={"model_name": "other", "hook_name": HOOK})), tmp_path / "o")
    at = _app(env, monkeypatch, {"DLMSCOPE_SAE": other}, page="denoise", run="1")
    assert not at.exception and "trained on model 'other'" in at.error[0].value
    # an SAE for this model that the store was not built for
    small = save_sae(TopKSAE(SAEConfig(64, 32, 4, metadata={"model_name": "llada", "hook_name": HOOK})), tmp_path / "s")
    at = _app(env, monkeypatch, {"DLMSCOPE_SAE": small}, page="steer", run="1")
    assert not at.exception and "rebuild it for this SAE" in at.error[0].value
    # an empty store: nothing fired
    lm = load_model(tiny_dirs["llada"])
    dead = TopKSAE(SAEConfig(64, 32, 4, metadata={"model_name": "llada", "hook_name": HOOK}))
    with torch.no_grad():
        dead.b_enc.fill_(-1e4)
    store = build_feature_store(lm, dead, heldout_rows(lm.tokenizer, 16, n=2), tmp_path / "empty", FeatureStoreConfig())
    at = _app({"DLMSCOPE_STORE": str(store)}, monkeypatch, page="list")
    assert not at.exception and "store is empty" in at.error[0].value
    at = _app(env, monkeypatch, page="nowhere")
    assert not at.exception and "page='nowhere'" in at.error[0].value


def test_cli_builds_the_store_and_launches_streamlit(env, tiny_dirs, tmp_path, monkeypatch, capsys):
    from dlmscope.analysis.features import FeatureStore
    from dlmscope.cli import main

    out = tmp_path / "built"
    main(["features", "build", "--sae", str(env["sae"]), "--model", str(tiny_dirs["llada"]), "--out", str(out),
          "--n-seqs", "3", "--context-length", "16"])
    assert FeatureStore.open(out).manifest["n_tokens"] == 48
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    import dlmscope.data

    few = dlmscope.data.heldout_rows
    monkeypatch.setattr(dlmscope.data, "heldout_rows", lambda tok, length: few(tok, 16, n=2))
    with pytest.raises(SystemExit) as e:
        main(["explore", "--sae", str(env["sae"]), "--model", str(tiny_dirs["llada"]), "--store", str(tmp_path / "new"),
              "--port", "8765"])
    assert e.value.code == 0 and (tmp_path / "new" / "manifest.json").is_file()  # built on first launch
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[cmd.index("--server.port") + 1] == "8765"
    assert cmd[cmd.index("--store") + 1] == str(tmp_path / "new")
    with pytest.raises(SystemExit) as e:
        main(["features", "build", "--sae", str(env["sae"]), "--model", str(tiny_dirs["causal"]), "--out", str(out)])
    assert e.value.code == 2 and "trained on model 'llada'" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port, proc, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on port {port} after {seconds} s")


class Browser:
    """Headless Debian Chromium over the DevTools protocol (no driver download, one websocket)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1400,1800"]

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        port = _free_port()
        self.proc = subprocess.Popen([CHROMIUM, *self.FLAGS, f"--user-data-dir={profile}",
                                      f"--remote-debugging-port={port}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(port, self.proc)
        tabs = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json").read())
        self.ws = connect([t for t in tabs if t["type"] == "page"][0]["webSocketDebuggerUrl"], max_size=None)
        self.n = 0

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                return msg.get("result", {})

    def js(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open_and_wait(self, url, ready_js, timeout=60):
        """Navigate and poll until `ready_js` is truthy and Streamlit has stopped running the script."""
        self.call("Page.navigate", url=url)
        deadline = time.time() + timeout
        while time.time() < deadline:
            time.sleep(0.3)
            if self.js(f"!!({ready_js}) && !document.querySelector('[data-testid=stStatusWidget]')"):
                time.sleep(0.5)  # let plotly finish drawing
                return True
        return False

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it; "
                                                         "locally: apt-get install chromium)")
def test_real_browser_renders_feature_page_and_denoising_view(env, tiny_dirs, tmp_path):
    shots = Path(os.environ.get("DLMSCOPE_SCREENSHOTS", tmp_path))  # never inside the repository by default
    shots.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true",
                               "--server.port", str(port), "--server.address", "127.0.0.1",
                               "--browser.gatherUsageStats", "false", "--", "--store", env["DLMSCOPE_STORE"]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    browser = None
    try:
        _wait_port(port, server)
        browser = Browser(tmp_path / "profile")
        f = _busiest(env)
        url = f"http://127.0.0.1:{port}/?page=feature&feature={f}"
        assert browser.open_and_wait(url, "document.querySelectorAll('.js-plotly-plot').length >= 2 && "
                                          "document.querySelectorAll('[data-testid=stExpander]').length == 10")
        body = browser.js("document.body.innerText")
        assert f"Feature {f}" in body and "Top activating examples" in body and "Logit effect" in body
        assert "Quantile groups" in body and "Activation histogram (density" in body
        assert browser.js("document.querySelectorAll('span.tok').length") >= 50
        assert browser.js("document.querySelectorAll('span.tok.masked').length") >= 1
        assert "Traceback" not in body
        assert browser.screenshot(shots / "feature.png").stat().st_size > 20_000
        url = f"http://127.0.0.1:{port}/?page=denoise&feature={f}&run=1"
        assert browser.open_and_wait(url, "document.querySelector('.js-plotly-plot .heatmaplayer, "
                                          ".js-plotly-plot .hm') && document.body.innerText.includes('step  0:')",
                                     timeout=60)
        body = browser.js("document.body.innerText")
        assert "Denoising view" in body and "Text as it unmasks" in body and "▢" in body and "Traceback" not in body
        assert browser.screenshot(shots / "denoise.png").stat().st_size > 20_000
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=30)
