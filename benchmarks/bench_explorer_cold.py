"""The explorer's cold feature page in a real browser (run by hand): a fresh server per repetition.

    python benchmarks/bench_explorer_cold.py [--reps 3]

Builds the shipped SAE's feature store once (`dlmscope features build`), then per repetition starts a fresh
`dlmscope explore --store ...` (a new Python process: torch, plotly and the store are imported and opened on
the first page), opens `?page=feature&feature=F` in headless Debian Chromium and polls every 50 ms for
(a) Streamlit's frontend up (its app container), (b) our loading spinner (Streamlit shows a spinner only after
0.5 s of running, and a poll can miss a short one: then it is null), and (c) the page complete (top examples,
both charts, Streamlit idle). Times are from the navigation. The OS file cache is warm after the first repetition (it
cannot be emptied without root), so "cold" means a cold process, not a cold disk.
Writes benchmarks/results/explorer_cold.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "apps"))
from browser import Browser, free_port, wait_port  # noqa: E402  (the browser tests' DevTools client)

from dlmscope.io_utils import atomic_write_json  # noqa: E402

SAE = "tiny-dlm-L3-k32"
FRONTEND = "!!document.querySelector('[data-testid=stApp]')"
SPINNER = "!!document.querySelector('[data-testid=stSpinner]')"
DONE = ("document.body.innerText.includes('Top activating examples') && "
        "document.querySelectorAll('.js-plotly-plot').length >= 2 && "
        "!document.querySelector('[data-testid=stStatusWidget]') && !document.querySelector('[data-testid=stSpinner]')")


def cold_page(browser: Browser, store: Path, feature: int, work: Path, timeout: float = 300) -> dict:
    """One fresh server, one navigation: seconds to the spinner and to the complete page."""
    port = free_port()
    log = open(work / "explore.log", "a")
    server = subprocess.Popen([shutil.which("dlmscope"), "explore", "--store", str(store), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
    try:
        wait_port(port, server, seconds=180)
        browser.call("Page.navigate", url=f"http://127.0.0.1:{port}/?page=feature&feature={feature}")
        start, frontend, spinner = time.perf_counter(), None, None
        while time.perf_counter() - start < timeout:
            now = time.perf_counter() - start
            if frontend is None and browser.js(FRONTEND):
                frontend = now
            if spinner is None and browser.js(SPINNER):
                spinner = now
            if browser.js(DONE):
                return {"frontend_s": frontend, "spinner_s": spinner, "complete_s": now}
            time.sleep(0.05)
        raise TimeoutError(f"feature page not complete after {timeout} s")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    from dlmscope.analysis.features import FeatureStore

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = work / "store"
        subprocess.run([shutil.which("dlmscope"), "features", "build", "--sae", SAE, "--out", str(store)], check=True,
                       stdout=subprocess.DEVNULL)
        feature = int(FeatureStore.open(store).stats()["density"].argmax())
        load = os.getloadavg()[0]
        browser = Browser(work / "profile")
        try:
            runs = [cold_page(browser, store, feature, work) for _ in range(args.reps)]
        finally:
            browser.close()
    res = {"machine": f"{platform.node()} · {os.cpu_count()} CPUs · load average {load:.1f} at start",
           "load_average": round(load, 1), "sae": SAE, "feature": feature, "runs": runs,
           "frontend_median_s": statistics.median(r["frontend_s"] for r in runs),
           "spinner_median_s": statistics.median(r["spinner_s"] for r in runs if r["spinner_s"] is not None),
           "complete_median_s": statistics.median(r["complete_s"] for r in runs)}
    out = ROOT / "benchmarks" / "results" / "explorer_cold.json"
    atomic_write_json(out, res)
    print(res)


if __name__ == "__main__":
    main()
