"""Explorer timings (run by hand): feature-store build and page loads.

    python benchmarks/bench_explorer.py [--device cuda] [--build-only] [--quick]

(a) build: `build_feature_store` over the whole held-out split for the shipped SAE of the tiny DLM
    (2,048 latents) and for a random 4,096-latent SAE at the same hook, side by side with the bare
    work it cannot avoid (the forward passes and the SAE encode of the same batches): the ratio is
    what the statistics, sorting and writing add.
(b) pages: each page's script run under Streamlit's AppTest (the server side: everything but the
    browser drawing), beside AppTest's own floor (a one-line page), cold (first run in the process, imports and store open included) and warm
    (median of repetitions), for both stores. The denoising view and the steering playground are
    timed opened and run (sampler included) separately.
(c) a feature page's data (top examples, quantile groups, histogram, logits) read from the store vs
    recomputed live from the model (forward + encode over the held-out split, then top-k).
Writes benchmarks/results/explorer[_DEVICE].json.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dlmscope.analysis.features import FeatureStore, FeatureStoreConfig, build_feature_store, encoded_batches
from dlmscope.data import heldout_rows
from dlmscope.io_utils import atomic_write_json
from dlmscope.models import load_model
from dlmscope.sae import SAE, SAEConfig, load_sae, save_sae

APP = str(Path(__file__).resolve().parents[1] / "apps" / "explorer.py")
SHIPPED = "tiny-dlm-L3-k32"


def median_time(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def bare_pass(lm, sae, rows, cfg: FeatureStoreConfig) -> None:
    """The forward passes and encode the build needs, nothing else (the build's own pass, its outputs unused)."""
    for _ in encoded_batches(lm, sae, sae.cfg.hook_name, rows, cfg):
        pass
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def live_feature(lm, sae, rows, cfg: FeatureStoreConfig, f: int) -> None:
    """What a page would do without a store: encode everything, then find the feature's top activations."""
    torch.cat([lat[:, f].cpu() for *_, lat in encoded_batches(lm, sae, sae.cfg.hook_name, rows, cfg)]).topk(10)


def page_times(store: Path, feature: int, reps: int) -> dict:
    """Each page's AppTest run; `floor` is AppTest running a one-line page (its own fixed cost)."""
    from streamlit.testing.v1 import AppTest

    os.environ["DLMSCOPE_STORE"] = str(store)
    floor = median_time(lambda: AppTest.from_string("import streamlit as st\nst.header('x')").run(), reps)
    print(f"  AppTest floor (a one-line page) {floor:.3f} s", flush=True)
    cases = {"list": {}, "feature": {"feature": feature}, "summary": {}, "denoise (open)": {"feature": feature},
             "steer (open)": {"feature": feature}, "denoise (run sampler, 32 steps)": {"feature": feature, "run": 1},
             "steer (run, 2 x 32 steps)": {"feature": feature, "run": 1}}
    out = {}
    for name, query in cases.items():
        def once():
            at = AppTest.from_file(APP, default_timeout=600)
            at.query_params["page"] = name.split(" ")[0]
            for k, v in query.items():
                at.query_params[k] = str(v)
            at.run()
            assert not at.exception and not at.error, (name, at.exception, at.error)

        first = median_time(once, 1)
        out[name] = {"first_s": first, "warm_median_s": median_time(once, 2 if "run" in query else reps)}
        print(f"  page {name:34s} first {first:6.3f} s   warm {out[name]['warm_median_s']:6.3f} s", flush=True)
    return {"apptest_floor_s": floor, **out}


def readme_cell(res: dict) -> str:
    """The README summary's cell: the shipped store's feature data from the store vs live, and its build cost."""
    s = next(v for k, v in res["stores"].items() if k.startswith(SHIPPED))
    return (f"{s['feature_data_from_store_s']:.4f} s vs {s['feature_data_live_s']:.2f} s "
            f"({s['live_over_store_ratio']:.0f}x); store build {s['build_over_bare_ratio']:.2f}x the bare forward + encode")


def main() -> dict:
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cpu"
    quick, build_only = "--quick" in sys.argv, "--build-only" in sys.argv
    lm = load_model("dlmscope-tiny-dlm", device=device)
    rows = heldout_rows(lm.tokenizer, 128)
    cfg = FeatureStoreConfig(n_seqs=32 if quick else None)
    rows = rows[: cfg.n_seqs] if cfg.n_seqs else rows
    shipped = load_sae(SHIPPED, device=device)
    big = SAE(SAEConfig(lm.d_model, 4096, 32, metadata=dict(shipped.cfg.metadata)), seed=1).to(device)
    res = {"machine": f"{platform.node()} · {os.cpu_count()} CPUs · torch threads {torch.get_num_threads()} · "
                      f"load average {os.getloadavg()[0]:.1f} at start", "device": device,
           "tokens": int(rows.numel()), "stores": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench_explorer."))
    for name, sae in ((f"{SHIPPED} (2048 latents)", shipped), ("random 4096-latent SAE", big)):
        sae_ref = SHIPPED if sae is shipped else str(save_sae(sae.cpu(), tmp / "sae4096"))
        sae = sae.to(device)
        out = tmp / f"store{sae.cfg.n_latents}"
        bare = median_time(lambda: bare_pass(lm, sae, rows, cfg), 1 if quick else 3)
        build = median_time(lambda: build_feature_store(lm, sae, rows, out, cfg, sae_name=sae_ref), 1 if quick else 3)
        store = FeatureStore.open(out)
        f = int(store.stats()["density"].argmax())
        open_s = median_time(lambda: FeatureStore.open(out), 5)
        data_s = median_time(lambda: (store.top_examples(f), store.quantile_groups(f), store.histogram(f),
                                      store.logits(f)), 5)
        live_s = median_time(lambda: live_feature(lm, sae, rows, cfg, f), 1 if quick else 3)
        size = sum(p.stat().st_size for p in out.iterdir())
        entry = {"build_s": build, "forward_and_encode_only_s": bare, "build_over_bare_ratio": build / bare,
                 "store_bytes": size, "open_s": open_s, "feature_data_from_store_s": data_s,
                 "feature_data_live_s": live_s, "live_over_store_ratio": live_s / data_s, "busiest_feature": f}
        print(f"{name}: build {build:.2f} s (forward+encode alone {bare:.2f} s, ratio {build / bare:.2f}); store "
              f"{size / 1e6:.1f} MB, open {open_s * 1e3:.1f} ms; feature data {data_s * 1e3:.1f} ms from the store vs "
              f"{live_s:.2f} s live ({live_s / data_s:.0f}x)", flush=True)
        if not build_only and device == "cpu":
            entry["pages"] = page_times(out, f, 3 if quick else 5)
        res["stores"][name] = entry
    suffix = "" if device == "cpu" else f"_{device}"
    path = Path(os.environ.get("BENCH_OUT", Path(__file__).parent / "results")) / f"explorer{suffix}.json"
    atomic_write_json(path, res)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
