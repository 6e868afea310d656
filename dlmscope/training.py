"""`dlmscope train-sae`: several SAEs (layers x k) from one pass over a model, with run management.

A run lives in `runs/<name>/`: `config.json`, `metrics.json`, `report.html`, one SAELens-format
folder per SAE under `saes/`, and `checkpoint.pt` (written atomically every `checkpoint_every`
steps and on SIGINT/SIGTERM). `--resume` continues to the same result as an uninterrupted run.
Under `torchrun` each process generates activations for its share of the data and gradients are
averaged across processes; rank 0 writes the outputs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .activations import ActivationSource, CachedSource, ShuffleBuffer
from .errors import DLMScopeError
from .io_utils import atomic_torch_save, atomic_write_json, atomic_write_text
from .models.zoo import DEFAULT_MODEL
from .sae import SAEConfig, SAETrainer, TrainConfig, evaluate_sae, save_sae
from .sae.metrics import log10_density_histogram


@dataclass
class TrainSAEConfig:
    """Everything a train-sae run needs; every field is a CLI flag and a config-file key."""

    model: str = DEFAULT_MODEL
    """Built-in model name or local checkpoint folder."""
    layers: str = "1,3"
    """Comma-separated layer indices (hook blocks.{i}.hook_resid_{site}, or blocks.{i}.hook_{site} for MLP sites)."""
    site: str = "post"
    """Site the SAE reads: pre, mid or post (residual stream), mlp_in or mlp_out."""
    k: str = "32"
    """Comma-separated k values; one SAE per layer and k."""
    expansion: int = 8
    """Latents per input dimension (n_latents = expansion * d_model)."""
    architecture: str = "topk"
    """topk, batchtopk, jumprelu, matryoshka, transcoder or skip_transcoder."""
    target_site: str = ""
    """Transcoders: the site they predict in the same layer (e.g. --site mlp_in --target-site mlp_out)."""
    prefix_sizes: str = ""
    """Matryoshka: comma-separated nested prefix sizes (default n_latents/16, n_latents/4; the width is added)."""
    l0_coef: float = 1e-3
    """JumpReLU: initial L0 penalty coefficient (steered so the L0 tracks k)."""
    bandwidth: float = 0.05
    """JumpReLU: rectangle-kernel bandwidth of the straight-through threshold gradient."""
    policy: str = ""
    """Position policy: mask, unmask, all or clean (default: mask for DLMs, clean for causal models)."""
    t_min: float = 0.05
    """Lowest mask ratio drawn per batch."""
    t_max: float = 0.5
    """Highest mask ratio drawn per batch."""
    dataset: str = "builtin"
    """Text source: builtin, a .txt/.jsonl/.parquet file or a local datasets name."""
    column: str = "text"
    """Text column for jsonl/parquet/datasets sources."""
    cache: str = ""
    """Train from an activation cache folder written by `dlmscope cache` instead of running the model."""
    context_length: int = 128
    """Tokens per packed row."""
    seqs_per_forward: int = 32
    """Rows per model forward."""
    total_tokens: int = 600_000
    """Training tokens per SAE (the default finishes in about 3-4 minutes on a 2-core CPU)."""
    batch_size: int = 1024
    """Activation vectors per SAE step."""
    buffer_tokens: int = 65536
    """Shuffle-buffer capacity in tokens."""
    lr: float = 0.0
    """Learning rate (0 = 2e-4 / sqrt(n_latents / 2^14))."""
    eval_tokens: int = 8192
    """Held-out activation vectors used for metrics."""
    eval_every: int = 50
    """Steps between held-out evaluations."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
    out: str = "runs"
    """Folder holding runs."""
    name: str = ""
    """Run name (default: model and layers)."""
    resume: bool = False
    """Continue the run's checkpoint."""
    device: str = "cpu"
    """Torch device (cuda for GPUs; torchrun sets one per process)."""
    sae_devices: str = ""
    """Comma-separated devices the SAEs are spread over round-robin (e.g. cuda:1,cuda:2); default: --device."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default; 1 is fastest on a machine busy with other work)."""
    seed: int = 0
    """Seed for data order, masks and SAE initialisation."""
    progress: bool = True
    """Show a progress bar."""

    def layer_list(self) -> list[int]:
        try:
            return [int(v) for v in self.layers.split(",") if v.strip()]
        except ValueError:
            raise DLMScopeError(f"layers={self.layers!r} must be comma-separated integers") from None

    def k_list(self) -> list[int]:
        try:
            return [int(v) for v in self.k.split(",") if v.strip()]
        except ValueError:
            raise DLMScopeError(f"k={self.k!r} must be comma-separated integers") from None

    def hook(self, layer: int, site: str) -> str:
        return f"blocks.{layer}.hook_{site if site.startswith('mlp') else 'resid_' + site}"

    def prefix_list(self) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in self.prefix_sizes.split(",") if v.strip())
        except ValueError:
            raise DLMScopeError(f"prefix_sizes={self.prefix_sizes!r} must be comma-separated integers") from None

    def sae_device_list(self, default: str) -> list[str]:
        return [d.strip() for d in self.sae_devices.split(",") if d.strip()] or [default]

    def run_name(self) -> str:
        return self.name or f"{Path(self.model).name}-L{self.layers.replace(',', '_')}-k{self.k.replace(',', '_')}"


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config whose keys are TrainSAEConfig fields."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DLMScopeError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(TrainSAEConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DLMScopeError(f"unknown config keys {unknown} in {str(path)!r}; allowed: {', '.join(sorted(known))}")
    return data


SITES = ("pre", "mid", "post", "mlp_in", "mlp_out")
"""Hook sites an SAE can read (and a transcoder predict)."""

RESUMABLE_CHANGES = ("resume", "progress", "device", "sae_devices", "checkpoint_every", "threads")
"""Options that may differ between a run and its --resume (they do not change the result)."""


class _Dist:
    """torch.distributed when launched by torchrun, a no-op otherwise."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            if device.startswith("cuda"):
                self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(self.device)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class RunResult:
    folder: Path
    saes: dict[str, Path]
    metrics: dict
    interrupted: bool = False
    history: list = field(default_factory=list)


def split_texts(dataset: str, column: str) -> tuple[list[str], list[str]]:
    """Training and held-out documents: the built-in corpus has both splits; any other source holds out its
    last 5% of documents (at least one), so held-out metrics never see training text."""
    from .data import load_texts

    if dataset == "builtin":
        return load_texts("builtin", "train"), load_texts("builtin", "heldout")
    texts = load_texts(dataset, "train", column)
    if len(texts) < 2:
        raise DLMScopeError(f"dataset {dataset!r} has {len(texts)} document(s); at least 2 are needed "
                            "(training text plus a held-out document)")
    n = max(1, len(texts) // 20)
    return texts[:-n], texts[-n:]


def _eval_set(source, n_tokens: int) -> dict[str, torch.Tensor]:
    acts: dict[str, list[torch.Tensor]] = {}
    got, i = 0, 0
    while got < n_tokens and i < len(source):
        b = source.batch(0, i)
        for h, a in b.acts.items():
            acts.setdefault(h, []).append(a)
        got, i = got + len(b), i + 1
    return {h: torch.cat(a)[:n_tokens] for h, a in acts.items()}


def train_sae(cfg: TrainSAEConfig) -> RunResult:
    """Train one SAE per (layer, k) from a shared activation stream; see the module docstring."""
    from .data import pack
    from .models import load_model

    dist = _Dist(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    layers, ks = cfg.layer_list(), cfg.k_list()
    if not layers or not ks:
        raise DLMScopeError("give at least one layer and one k")
    if cfg.site not in SITES or (cfg.target_site and cfg.target_site not in SITES):
        raise DLMScopeError(f"site={cfg.site!r}, target_site={cfg.target_site!r}; allowed: {', '.join(SITES)}")
    transcoder = cfg.architecture.endswith("transcoder")
    if transcoder != bool(cfg.target_site) or cfg.target_site == cfg.site:
        raise DLMScopeError(f"target_site={cfg.target_site!r} with site={cfg.site!r}: transcoders (and only they) "
                            "need a target site other than the site they read")
    folder = Path(cfg.out) / cfg.run_name()
    ckpt_path = folder / "checkpoint.pt"
    if dist.main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / ".write-test").touch()
            (folder / ".write-test").unlink()
        except OSError as e:
            raise DLMScopeError(f"cannot write to output folder {str(folder)!r}: {e.strerror}") from None
        if ckpt_path.exists() and not cfg.resume:
            raise DLMScopeError(f"run {str(folder)!r} already exists; pass --resume to continue it or choose --name")
    hooks = [cfg.hook(i, cfg.site) for i in layers]
    targets = {h: cfg.hook(i, cfg.target_site) for h, i in zip(hooks, layers)} if transcoder else {}
    hooks += list(targets.values())

    if cfg.cache:  # the last shard is held out for metrics; the others are split across processes
        eval_src = CachedSource(cfg.cache, shards=slice(-1, None))
        missing = [h for h in hooks if h not in eval_src.hooks]
        if missing:
            raise DLMScopeError(f"cache {cfg.cache!r} lacks hooks {missing}; it has {eval_src.hooks}")
        n_shards = len(eval_src.manifest["shards"])
        if n_shards < 1 + dist.world:
            raise DLMScopeError(f"cache {cfg.cache!r} has {n_shards} shard(s); training needs at least "
                                f"{1 + dist.world} (one held out, one per process)")
        train_src = CachedSource(cfg.cache, shards=list(range(n_shards - 1))[dist.rank::dist.world])
        model_name, d_model, policy = eval_src.manifest["model"], None, eval_src.policy
    else:
        lm = load_model(cfg.model, device=dist.device, dtype=cfg.dtype)
        for h in hooks:
            lm.site(h)
        if lm.tokenizer is None:
            raise DLMScopeError(f"model {cfg.model!r} has no tokenizer; train from a cache (--cache) instead")
        train_texts, heldout_texts = split_texts(cfg.dataset, cfg.column)
        train_rows = pack(lm.tokenizer, train_texts, cfg.context_length)
        eval_rows = pack(lm.tokenizer, heldout_texts, cfg.context_length)
        common = dict(policy=cfg.policy or None, t_range=(cfg.t_min, cfg.t_max), seqs_per_batch=cfg.seqs_per_forward)
        train_src = ActivationSource(lm, hooks, train_rows.input_ids, train_rows.doc_ids, seed=cfg.seed,
                                     rank=dist.rank, world=dist.world, **common)
        eval_src = ActivationSource(lm, hooks, eval_rows.input_ids, eval_rows.doc_ids, seed=cfg.seed + 1,
                                    **{**common, "seqs_per_batch": min(cfg.seqs_per_forward, eval_rows.input_ids.shape[0])})
        model_name, d_model, policy = lm.name, lm.d_model, train_src.policy

    local_batch = cfg.batch_size // dist.world
    buffer = ShuffleBuffer(train_src, max(cfg.buffer_tokens // dist.world, 2 * local_batch), local_batch, seed=cfg.seed + dist.rank)
    eval_set = _eval_set(eval_src, cfg.eval_tokens)
    d_in = next(iter(eval_set.values())).shape[1] if d_model is None else d_model
    tcfg = TrainConfig(total_tokens=cfg.total_tokens, batch_size=cfg.batch_size, lr=cfg.lr or None, seed=cfg.seed,
                       autocast_bf16=cfg.device.startswith("cuda") and cfg.dtype != "float32", l0_coef=cfg.l0_coef,
                       bandwidth=cfg.bandwidth)
    trainers: dict[str, SAETrainer] = {}
    sae_devices = cfg.sae_device_list(dist.device)
    for h in hooks[:len(layers)]:
        for k in ks:
            meta = {"model_name": model_name, "hook_name": h, "masking_policy": policy,
                    "t_range": [cfg.t_min, cfg.t_max], "dataset_path": cfg.dataset, "context_size": cfg.context_length,
                    **({"hook_name_out": targets[h]} if transcoder else {})}
            sae_cfg = SAEConfig(d_in, cfg.expansion * d_in, k, cfg.architecture, meta, cfg.prefix_list())
            trainers[f"{h}-k{k}"] = SAETrainer(sae_cfg, tcfg, sae_devices[len(trainers) % len(sae_devices)])
    history: list[dict] = []
    step = 0
    if cfg.resume:
        if not ckpt_path.is_file():
            raise DLMScopeError(f"--resume given but {str(ckpt_path)!r} does not exist")
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise DLMScopeError(f"checkpoint {str(ckpt_path)!r} is corrupt: {e}") from None
        changed = [k for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES and state["config"].get(k) != v]
        if changed:
            raise DLMScopeError(f"--resume with changed options {changed}; the checkpoint was written with "
                                f"{ {k: state['config'].get(k) for k in changed} }")
        saved_world = len(state["buffers"]) if state["buffers"] else 1
        if saved_world != dist.world:
            raise DLMScopeError(f"the checkpoint was written by {saved_world} process(es); resume it with "
                                f"the same number, not {dist.world}")
        for key, tr in trainers.items():
            tr.load_state_dict(state["trainers"][key])
        buffer.load_state_dict(state["buffers"][dist.rank] if dist.world > 1 else state["buffer"])
        step, history = state["step"], state["history"]
    if dist.main:
        atomic_write_json(folder / "config.json", asdict(cfg))

    stop = {"flag": False}

    def on_signal(signum, frame):  # finish the step, checkpoint, exit
        stop["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint() -> None:
        buffers = None
        if dist.world > 1:
            import torch.distributed as tdist

            buffers = [None] * dist.world
            tdist.all_gather_object(buffers, buffer.state_dict())
        if dist.main:
            atomic_torch_save(ckpt_path, {"step": step, "history": history, "config": asdict(cfg),
                                          "trainers": {k: t.state_dict() for k, t in trainers.items()},
                                          "buffer": buffer.state_dict(), "buffers": buffers})

    total_steps = tcfg.steps
    bar = None
    if cfg.progress and dist.main:
        from tqdm import tqdm
        bar = tqdm(total=total_steps * cfg.batch_size, initial=step * cfg.batch_size, unit="tok", unit_scale=True,
                   desc=f"train-sae {len(trainers)} SAE(s)")
    reduce = dist.mean if dist.world > 1 else None
    t0 = time.time()
    interrupted = False
    try:
        while step < total_steps:
            batch = buffer.next()
            logs = {key: tr.step(batch.acts[h], reduce, **({"target": batch.acts[targets[h]]} if h in targets else {}))
                    for key, tr in trainers.items() for h in [key.rsplit("-k", 1)[0]]}
            step += 1
            if step % cfg.eval_every == 0 or step == total_steps:
                entry = {"step": step, "tokens": step * cfg.batch_size, "seconds": time.time() - t0}
                for key, tr in trainers.items():
                    h = key.rsplit("-k", 1)[0]
                    ev = evaluate_sae(tr.sae, eval_set[h], target=eval_set.get(targets.get(h)))
                    entry[key] = {**{m: v for m, v in ev.items() if m != "density"}, "train_loss": logs[key]["loss"],
                                  "dead_fraction_train": logs[key]["dead_fraction"]}
                history.append(entry)
            if bar is not None:
                bar.update(cfg.batch_size)
                first = logs[next(iter(logs))]
                bar.set_postfix(fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}", dead=f"{first['dead_fraction']:.2f}")
            if step % cfg.checkpoint_every == 0 and step < total_steps:
                checkpoint()
            stop_now = torch.tensor(float(stop["flag"]))
            if dist.world > 1:
                stop_now = dist.mean(stop_now)
            if float(stop_now) > 0:
                checkpoint()
                interrupted = True
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()
    if interrupted:
        if dist.main:
            print(f"interrupted at step {step}/{total_steps}; checkpoint written, continue with --resume")
        return RunResult(folder, {}, {}, True, history)

    saes, final = {}, {}
    if dist.main:
        for key, tr in trainers.items():
            h = key.rsplit("-k", 1)[0]
            ev = evaluate_sae(tr.sae, eval_set[h], target=eval_set.get(targets.get(h)))
            final[key] = {m: v for m, v in ev.items() if m != "density"}
            final[key]["density_histogram"] = log10_density_histogram(ev["density"])
            saes[key] = save_sae(tr.sae, folder / "saes" / key.replace(".", "_"), density=ev["density"])
        atomic_write_json(folder / "metrics.json", {"final": final, "history": history, "steps": step,
                                                    "seconds": time.time() - t0})
        write_report(folder, final, history)
    checkpoint()  # collective under torchrun: every rank takes part
    return RunResult(folder, saes, final, False, history)


def write_report(folder: Path, final: dict, history: list) -> Path:
    """Plotly HTML: held-out FVU, L0 and dead fraction over training, and density histograms."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    keys = list(final)
    fig = make_subplots(rows=2, cols=2, subplot_titles=("held-out FVU", "L0", "dead fraction",
                                                        "log10 feature density"))
    for key in keys:
        steps = [h["tokens"] for h in history if key in h]
        for (r, c), metric in zip(((1, 1), (1, 2), (2, 1)), ("fvu", "l0", "dead_fraction")):
            fig.add_trace(go.Scatter(x=steps, y=[h[key][metric] for h in history if key in h], name=f"{key} {metric}",
                                     legendgroup=key), row=r, col=c)
        hist = final[key]["density_histogram"]
        fig.add_trace(go.Bar(x=hist["edges"][:-1], y=hist["counts"], name=f"{key} density", legendgroup=key),
                      row=2, col=2)
    fig.update_xaxes(title_text="tokens", row=1, col=1)
    fig.update_layout(height=800, title=f"dlmscope train-sae: {folder.name}")
    return atomic_write_text(folder / "report.html", fig.to_html(include_plotlyjs=True))
