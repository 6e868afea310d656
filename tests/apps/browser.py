"""Headless Debian Chromium for the explorer's browser tests and its cold-start benchmark (no driver download)."""

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, seconds=30):
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

        port = free_port()
        self.proc = subprocess.Popen([CHROMIUM, *self.FLAGS, f"--user-data-dir={profile}",
                                      f"--remote-debugging-port={port}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, self.proc)
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
