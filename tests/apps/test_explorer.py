"""The explorer's pages under Streamlit's AppTest, and one real headless-Chromium render."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

APP = str(Path(__file__).resolve().parents[2] / "apps" / "explorer.py")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from dlmscope.analysis.features import build_feature_store
    from dlmscope.data import heldout_rows
    from dlmscope.models import load_model
    from dlmscope.sae import load_sae

    lm = load_model("dlmscope-tiny-dlm")
    folder = tmp_path_factory.mktemp("store") / "s"
    return build_feature_store(lm, load_sae("tiny-dlm-L3-k32"), heldout_rows(lm.tokenizer, 64), folder, n_seqs=16,
                               sae_name="tiny-dlm-L3-k32")


def _app(store, monkeypatch, **query):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("DLMSCOPE_STORE", str(store))
    at = AppTest.from_file(APP, default_timeout=120)
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def _busiest_feature(store):
    from dlmscope.analysis.features import FeatureStore

    return int(FeatureStore.open(store).stats()["density"].argmax())


def test_feature_list(store, monkeypatch):
    at = _app(store, monkeypatch, page="list")
    assert not at.exception and at.header[0].value == "Features" and len(at.dataframe) == 1


def test_feature_page(store, monkeypatch):
    f = _busiest_feature(store)
    at = _app(store, monkeypatch, page="feature", feature=str(f))
    assert not at.exception and at.header[0].value == f"Feature {f}"
    assert any("Top activating" in s.value for s in at.subheader)


def test_feature_out_of_range_is_an_error_not_a_traceback(store, monkeypatch):
    at = _app(store, monkeypatch, page="feature", feature="99999")
    assert not at.exception and "out of range" in at.error[0].value


def test_denoising_and_steering_pages(store, monkeypatch):
    at = _app(store, monkeypatch, page="denoise", feature=str(_busiest_feature(store)), run="1")
    assert not at.exception and any(t.value.startswith("step") for t in at.text)
    at = _app(store, monkeypatch, page="steer", feature="3", run="1")
    assert not at.exception and [s.value for s in at.subheader][0] == "unsteered"


def test_summary_and_bad_store(store, monkeypatch, tmp_path):
    at = _app(store, monkeypatch, page="summary")
    assert not at.exception and at.metric[0].label == "L0"
    at = _app(tmp_path, monkeypatch)
    assert "not a feature store" in at.error[0].value


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """Headless Debian Chromium driven over the DevTools protocol (no downloaded driver)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1600"]

    def __init__(self, profile):
        import json
        import urllib.request

        from websockets.sync.client import connect

        port = _free_port()
        self.proc = subprocess.Popen(["chromium", *self.FLAGS, f"--user-data-dir={profile}",
                                      f"--remote-debugging-port={port}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                tabs = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json").read())
                break
            except OSError:
                time.sleep(0.2)
        self.ws = connect([t for t in tabs if t["type"] == "page"][0]["webSocketDebuggerUrl"], max_size=None)
        self.n = 0

    def call(self, method, **params):
        import json

        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                return msg.get("result", {})

    def open_and_wait(self, url, text, timeout=90):
        self.call("Page.navigate", url=url)
        body = ""
        for _ in range(int(timeout / 0.5)):
            time.sleep(0.5)
            body = self.call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)["result"].get("value", "")
            if text in body:
                return body
        return body

    def screenshot(self, path):
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_real_browser_renders_feature_page_and_denoising_view(store, tmp_path):
    port = _free_port()
    env = {**os.environ, "DLMSCOPE_STORE": str(store)}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true",
                               "--server.port", str(port), "--server.address", "127.0.0.1",
                               "--browser.gatherUsageStats", "false"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    browser = None
    try:
        for _ in range(60):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        browser = Browser(tmp_path / "profile")
        f = _busiest_feature(store)
        body = browser.open_and_wait(f"http://127.0.0.1:{port}/?page=feature&feature={f}", "Quantile groups")
        assert f"Feature {f}" in body and "Top activating examples" in body and "Logit effect" in body
        time.sleep(2)
        browser.screenshot(tmp_path / "feature.png")
        body = browser.open_and_wait(f"http://127.0.0.1:{port}/?page=denoise&feature={f}&run=1", "Text as it unmasks")
        assert "Denoising view" in body and "step  0" in body
        time.sleep(2)
        browser.screenshot(tmp_path / "denoise.png")
        assert (tmp_path / "feature.png").stat().st_size > 10_000 and (tmp_path / "denoise.png").stat().st_size > 10_000
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=30)
