"""`dlmscope train-sae`: several SAEs (layers x k) from one pass over a model, with run management.

A run lives in `runs/<name>/` (names are names, not paths): `config.json`, `metrics.json`, `report.html`,
one SAELens-format folder per SAE under `saes/`, and the resume state `checkpoint.json` +
`checkpoint.<digest>.safetensors` (`dlmscope.runstate`: no pickle, checksummed; written every
`checkpoint_every` steps and on SIGINT/SIGTERM, after which the CLI exits 130/143). `--resume` continues
to the same result as an uninterrupted run. The folder is locked while a run uses it.
Under `torchrun` each process generates activations for its share of the data and gradients are
averaged across processes; rank 0 writes the outputs.
"""

from __future__ import annotations

import os
import re
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import checks
from .activations import ActivationSource, CachedSource, Prefetcher, ShuffleBuffer
from .errors import DLMScopeError
from .io_utils import atomic_write_json, atomic_write_text
from .models.zoo import DEFAULT_MODEL
from .runtime import progress, torch_threads
from .runstate import RunFolder, check_name, has_state, load_state, rng_state, save_state, set_rng_state
from .sae import SAEConfig, SAETrainer, TrainConfig, save_sae
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
    """Training tokens per SAE (the default finishes in about 4-5 minutes on a 2-core CPU)."""
    batch_size: int = 1024
    """Activation vectors per SAE step."""
    buffer_tokens: int = 65536
    """Shuffle-buffer capacity in tokens."""
    prefetch: bool = True
    """Make activations in a background thread while the SAEs train (same batches, same order as without)."""
    lr: float = 0.0
    """Learning rate (0 = the optimiser's default: adam 2e-4, signum_sf 5e-3, over sqrt(n_latents / 2^14))."""
    optimizer: str = "adam"
    """adam (warm-up, linear decay) or signum_sf (sign descent with schedule-free averaging)."""
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

    def __post_init__(self) -> None:
        """Every value checked here, before any model loads (config files, flags and Python alike)."""
        from .activations import POLICIES
        from .models.checkpoint import resolve_dtype
        from .sae.model import ARCHITECTURES
        from .sae.optim import OPTIMIZERS

        for f in fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "str":
                setattr(self, f.name, checks.text(f.name, value))
            elif kind == "bool" and not isinstance(value, bool):
                raise DLMScopeError(f"{f.name}={value!r} must be true or false")
        for name in ("expansion", "context_length", "seqs_per_forward", "total_tokens", "batch_size", "buffer_tokens",
                     "eval_tokens", "eval_every", "checkpoint_every"):
            checks.positive(name, getattr(self, name))
        checks.non_negative("threads", self.threads)
        checks.integer("seed", self.seed)
        checks.number("lr", self.lr, 0.0)
        checks.number("t_min", self.t_min, 0.0, 1.0)
        checks.number("t_max", self.t_max, self.t_min, 1.0)
        self.layer_list()
        self.k_list()
        checks.choice("site", self.site, SITES)
        if self.target_site:
            checks.choice("target_site", self.target_site, SITES)
        checks.choice("architecture", self.architecture, ARCHITECTURES)
        if ARCHITECTURES[self.architecture].transcodes != bool(self.target_site) or self.target_site == self.site:
            raise DLMScopeError(f"target_site={self.target_site!r} with site={self.site!r}: transcoders (and only they) "
                                "need a target site other than the site they read")
        self.prefix_list()
        checks.choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        checks.choice("policy", self.policy, ("", *POLICIES))
        checks.device("device", self.device)
        for d in self.sae_device_list(self.device):
            checks.device("sae_devices", d)
        resolve_dtype(self.dtype)

    def layer_list(self) -> list[int]:
        return checks.int_list("layers", self.layers, 0)

    def k_list(self) -> list[int]:
        return checks.int_list("k", self.k, 1)

    def hook(self, layer: int, site: str) -> str:
        return f"blocks.{layer}.hook_{site if site.startswith('mlp') else 'resid_' + site}"

    def prefix_list(self) -> tuple[int, ...]:
        return tuple(checks.int_list("prefix_sizes", self.prefix_sizes)) if self.prefix_sizes.strip() else ()

    def sae_device_list(self, default: str) -> list[str]:
        return [d.strip() for d in self.sae_devices.split(",") if d.strip()] or [default]

    def run_name(self) -> str:
        if self.name:
            return self.name
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{Path(self.model).name}-L{self.layers}-k{self.k}".replace(",", "_"))


def load_config_file(path: str | Path, cls: type = TrainSAEConfig) -> dict:
    """Read a YAML or JSON config whose keys are fields of the dataclass `cls` (its values are checked by `cls`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DLMScopeError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise DLMScopeError(f"config file {str(path)!r} is not valid YAML/JSON{at}") from None
    if not isinstance(data, dict):
        raise DLMScopeError(f"config file {str(path)!r} must hold a mapping of option: value, "
                            f"not a {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(key) for key in set(data) - known)
    if unknown:
        raise DLMScopeError(f"unknown config keys {unknown} in {str(path)!r}; allowed: {', '.join(sorted(known))}")
    return data


SITES = ("pre", "mid", "post", "mlp_in", "mlp_out")
"""Hook sites an SAE can read (and a transcoder predict)."""

RESUMABLE_CHANGES = ("resume", "progress", "device", "sae_devices", "checkpoint_every", "threads", "prefetch")
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
    signal: int = 0
    """The signal (SIGINT/SIGTERM) that stopped an interrupted run; the CLI exits 128 + signal."""


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


class DictionaryRun:
    """One run training several dictionaries on a shared activation stream, in steps other dictionary types
    (crosscoders, other SAE architectures) reuse by subclassing:

    - `setup()`: activation sources (model or cache; split across torchrun processes), shuffle buffer,
      held-out set, then `build_trainers(d_in, meta)` (subclass) fills `trainers` and `routes`.
    - `read_checkpoint()` (before setup) and `resume(state)`: restore what `checkpoint()` wrote
      (`dlmscope.runstate`: safetensors + JSON, checksummed).
    - `step()`: one optimiser step of every trainer on the next batch; `inputs(key, acts)` picks a trainer's
      input (default: the activations of its hook in `routes`).
    - `evaluate()`: held-out metrics of every trainer, appended to `history`.
    - `checkpoint()`: config.json and the resume state (collective under torchrun; rank 0 writes).
    - `finish()`: final metrics, `save_output(key, trainer, density)` (subclass), metrics.json, report.html.

    A trainer has `step(x, reduce) -> logs` (with loss, fvu, l0, dead_fraction), `evaluate(x) -> metrics`
    (with density), `state_dict()` and `load_state_dict()`. The run folder is locked for the whole run
    (`runstate.RunFolder`); SIGINT/SIGTERM finish the step, checkpoint and stop (`RunResult.signal`).
    """

    state_name = "checkpoint"

    def __init__(self, cfg: TrainSAEConfig):
        self.cfg = cfg
        self.dist = _Dist(cfg.device)
        self.folder = Path(cfg.out) / check_name(cfg.run_name())
        self.hooks = [cfg.hook(i, cfg.site) for i in cfg.layer_list()]
        self.targets: dict[str, str] = {}
        """Input hook -> the hook a trainer predicts, where that differs (transcoders)."""
        self.trainers: dict = {}
        self.routes: dict[str, str] = {}
        self.history: list[dict] = []
        self.steps_done = 0
        self.signal = 0
        self.prefetcher: Prefetcher | None = None
        self.wait_seconds = 0.0
        """Wall time the steps spent waiting for their batch (activations not ready yet)."""

    # ----------------------------------------------------------------------------------- subclass API
    def build_trainers(self, d_in: int, meta: dict) -> None:
        raise NotImplementedError

    def save_output(self, key: str, trainer, density: torch.Tensor) -> Path:
        raise NotImplementedError

    def inputs(self, key: str, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        return acts[self.routes[key]]

    def target_kwargs(self, key: str, acts: dict[str, torch.Tensor]) -> dict:
        """`target=` for a trainer that predicts another hook than it reads (transcoders), else nothing."""
        out = self.targets.get(self.routes[key])
        return {"target": acts[out]} if out else {}

    def activation_source(self, lm, rows: torch.Tensor, doc_ids: torch.Tensor, **kwargs):
        """The source of training (and held-out) batches when running the model; crosscoders pair checkpoints."""
        return ActivationSource(lm, self.hooks, rows, doc_ids, **kwargs)

    # ------------------------------------------------------------------------------------------ steps
    def run(self) -> RunResult:
        """The whole run; `cfg.threads` holds for the run only (the caller's thread count is restored)."""
        lock = RunFolder(self.folder, self.cfg.resume) if self.dist.main else nullcontext()
        with torch_threads(self.cfg.threads), lock:
            saved = self.read_checkpoint() if self.cfg.resume else None  # before the expensive setup
            try:
                self.setup()
                if saved is not None:
                    self.resume(saved)
                with self._signals():
                    self.train()
            finally:
                if self.prefetcher is not None:
                    self.prefetcher.close()
            if self.signal:
                self.checkpoint()
                if self.dist.main:
                    print(f"interrupted at step {self.steps_done}/{self.total_steps}; checkpoint written, "
                          "continue with --resume")
                return RunResult(self.folder, {}, {}, True, self.history, self.signal)
            return self.finish()

    def setup(self) -> None:
        from .data import pack
        from .models import load_model

        cfg, dist = self.cfg, self.dist
        if cfg.cache:  # the last shard is held out for metrics; the others are split across processes
            eval_src = CachedSource(cfg.cache, shards=slice(-1, None))
            missing = [h for h in self.hooks if h not in eval_src.hooks]
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
            for h in self.hooks:
                lm.site(h)
            if lm.tokenizer is None:
                raise DLMScopeError(f"model {cfg.model!r} has no tokenizer; train from a cache (--cache) instead")
            train_texts, heldout_texts = split_texts(cfg.dataset, cfg.column)
            train_rows = pack(lm.tokenizer, train_texts, cfg.context_length)
            eval_rows = pack(lm.tokenizer, heldout_texts, cfg.context_length)
            common = dict(policy=cfg.policy or None, t_range=(cfg.t_min, cfg.t_max), seqs_per_batch=cfg.seqs_per_forward)
            train_src = self.activation_source(lm, train_rows.input_ids, train_rows.doc_ids, seed=cfg.seed,
                                               rank=dist.rank, world=dist.world, **common)
            eval_src = self.activation_source(lm, eval_rows.input_ids, eval_rows.doc_ids, seed=cfg.seed + 1,
                                              **{**common, "seqs_per_batch": min(cfg.seqs_per_forward, eval_rows.input_ids.shape[0])})
            model_name, d_model, policy = lm.name, lm.d_model, train_src.policy
        local_batch = cfg.batch_size // dist.world
        if cfg.prefetch:  # half a buffer ahead: what one refill takes
            train_src = self.prefetcher = Prefetcher(train_src, max(cfg.buffer_tokens // dist.world // 2, local_batch))
        self.buffer = ShuffleBuffer(train_src, max(cfg.buffer_tokens // dist.world, 2 * local_batch), local_batch,
                                    seed=cfg.seed + dist.rank)
        self.eval_set = _eval_set(eval_src, cfg.eval_tokens)
        d_in = next(iter(self.eval_set.values())).shape[1] if d_model is None else d_model
        self.build_trainers(d_in, {"model_name": model_name, "masking_policy": policy, "t_range": [cfg.t_min, cfg.t_max],
                                   "dataset_path": cfg.dataset, "context_size": cfg.context_length})
        self.total_steps = cfg.total_tokens // cfg.batch_size

    def read_checkpoint(self) -> dict:
        """The verified resume state, with the options it was written with checked against ours."""
        if not has_state(self.folder, self.state_name):
            legacy = " (checkpoint.pt files of older versions are not loaded: they are pickles)" \
                if (self.folder / "checkpoint.pt").exists() else ""
            raise DLMScopeError(f"--resume given but {str(self.folder / (self.state_name + '.json'))!r} does not "
                                f"exist{legacy}")
        state = load_state(self.folder, self.state_name)
        saved = state["config"]
        defaults = {f.name: f.default for f in fields(self.cfg)}  # options added since the checkpoint was written
        changed = [k for k, v in asdict(self.cfg).items()
                   if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v]
        if changed:
            raise DLMScopeError(f"--resume with changed options {changed}; the checkpoint was written with "
                                f"{ {k: saved.get(k) for k in changed} }")
        if len(state["ranks"]) != self.dist.world:
            raise DLMScopeError(f"the checkpoint was written by {len(state['ranks'])} process(es); resume it with "
                                f"the same number, not {self.dist.world}")
        return state

    def resume(self, state: dict) -> None:
        """Continue from `read_checkpoint()`'s state: trainers, shuffle buffer, RNG, step and history."""
        for key, tr in self.trainers.items():
            tr.load_state_dict(state["trainers"][key])
        mine = state["ranks"][self.dist.rank]
        self.buffer.load_state_dict(mine["buffer"])
        set_rng_state(mine["rng"])
        self.steps_done, self.history = state["step"], state["history"]

    def train(self) -> None:
        cfg = self.cfg
        bar = None
        if cfg.progress and self.dist.main:
            bar = progress(total=self.total_steps * cfg.batch_size, initial=self.steps_done * cfg.batch_size, unit="tok",
                       unit_scale=True, desc=f"train-sae {len(self.trainers)} SAE(s)")
        self.t0 = time.time()
        try:
            while self.steps_done < self.total_steps:
                logs = self.step()
                if self.steps_done % cfg.eval_every == 0 or self.steps_done == self.total_steps:
                    self.evaluate(logs)
                if bar is not None:
                    bar.update(cfg.batch_size)
                    first = logs[next(iter(logs))]
                    bar.set_postfix(fvu=f"{first['fvu']:.3f}", l0=f"{first['l0']:.1f}", dead=f"{first['dead_fraction']:.2f}")
                if self._stop_requested():
                    return
                if self.steps_done % cfg.checkpoint_every == 0 and self.steps_done < self.total_steps:
                    self.checkpoint()
        finally:
            if bar is not None:
                bar.close()

    def step(self) -> dict[str, dict]:
        t = time.perf_counter()
        batch = self.buffer.next()
        self.wait_seconds += time.perf_counter() - t
        reduce = self.dist.mean if self.dist.world > 1 else None
        logs = {key: tr.step(self.inputs(key, batch.acts), reduce, **self.target_kwargs(key, batch.acts))
                for key, tr in self.trainers.items()}
        self.steps_done += 1
        return logs

    def evaluate(self, logs: dict[str, dict]) -> None:
        entry = {"step": self.steps_done, "tokens": self.steps_done * self.cfg.batch_size,
                 "seconds": time.time() - self.t0}
        for key, tr in self.trainers.items():
            ev = tr.evaluate(self.inputs(key, self.eval_set), **self.target_kwargs(key, self.eval_set))
            entry[key] = {**{m: v for m, v in ev.items() if m != "density"}, "train_loss": logs[key]["loss"],
                          "dead_fraction_train": logs[key]["dead_fraction"]}
        self.history.append(entry)

    def checkpoint(self) -> None:
        mine = {"buffer": self.buffer.state_dict(), "rng": rng_state()}
        ranks = [mine]
        if self.dist.world > 1:
            import torch.distributed as tdist

            ranks = [None] * self.dist.world
            tdist.all_gather_object(ranks, mine)
        if self.dist.main:
            atomic_write_json(self.folder / "config.json", asdict(self.cfg))
            save_state(self.folder, self.state_name, {
                "step": self.steps_done, "history": self.history, "config": asdict(self.cfg), "ranks": ranks,
                "trainers": {k: t.state_dict() for k, t in self.trainers.items()}})

    def finish(self) -> RunResult:
        outputs, final = {}, {}
        if self.dist.main:
            for key, tr in self.trainers.items():
                ev = tr.evaluate(self.inputs(key, self.eval_set), **self.target_kwargs(key, self.eval_set))
                final[key] = {m: v for m, v in ev.items() if m != "density"}
                final[key]["density_histogram"] = log10_density_histogram(ev["density"])
                outputs[key] = self.save_output(key, tr, ev["density"])
            atomic_write_json(self.folder / "metrics.json", {"final": final, "history": self.history,
                                                             "steps": self.steps_done, "seconds": time.time() - self.t0,
                                                             "input_wait_seconds": self.wait_seconds})
            write_report(self.folder, final, self.history)
        self.checkpoint()  # collective under torchrun: every rank takes part
        return RunResult(self.folder, outputs, final, False, self.history)

    # ---------------------------------------------------------------------------------------- helpers
    @contextmanager
    def _signals(self):
        def on_signal(signum, frame):  # finish the step, checkpoint, stop
            self.signal = signum

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _stop_requested(self) -> bool:
        """Whether any process got a signal (agreed across torchrun processes, so all stop at the same step)."""
        if self.dist.world == 1:
            return bool(self.signal)
        if float(self.dist.mean(torch.tensor(float(self.signal)))) > 0:
            self.signal = self.signal or signal.SIGTERM
        return bool(self.signal)


class SAERun(DictionaryRun):
    """Top-K / BatchTopK SAEs, one per (layer, k)."""

    def __init__(self, cfg: TrainSAEConfig):
        super().__init__(cfg)
        if not cfg.k_list():
            raise DLMScopeError("give at least one k")
        self.reads = list(self.hooks)
        if cfg.target_site:
            self.targets = {h: cfg.hook(i, cfg.target_site) for h, i in zip(self.reads, cfg.layer_list())}
            self.hooks += list(self.targets.values())

    def build_trainers(self, d_in: int, meta: dict) -> None:
        cfg = self.cfg
        tcfg = TrainConfig(total_tokens=cfg.total_tokens, batch_size=cfg.batch_size, lr=cfg.lr or None, seed=cfg.seed,
                           optimizer=cfg.optimizer, l0_coef=cfg.l0_coef, bandwidth=cfg.bandwidth,
                           autocast_bf16=cfg.device.startswith("cuda") and cfg.dtype != "float32")
        devices = cfg.sae_device_list(self.dist.device)
        for h in self.reads:
            out = {"hook_name_out": self.targets[h]} if h in self.targets else {}
            for k in cfg.k_list():
                key = f"{h}-k{k}"
                self.trainers[key] = SAETrainer(SAEConfig(d_in, cfg.expansion * d_in, k, cfg.architecture,
                                                          {**meta, "hook_name": h, **out}, cfg.prefix_list()),
                                                tcfg, devices[len(self.routes) % len(devices)])
                self.routes[key] = h

    def save_output(self, key: str, trainer: SAETrainer, density: torch.Tensor) -> Path:
        with trainer.averaged():
            return save_sae(trainer.sae, self.folder / "saes" / key.replace(".", "_"), density=density)


class CrossCoderRun(DictionaryRun):
    """BatchTopK crosscoders (`dlmscope.sae.crosscoder`), one per (layer, k), over the paired activations of
    `checkpoints` (cfg.model is the first): every checkpoint runs on the identical corrupted batch. A cache
    written from a `PairedActivationSource` (concatenated activations) works as --cache."""

    def __init__(self, cfg: TrainSAEConfig, checkpoints: list[str]):
        super().__init__(cfg)
        if len(checkpoints) < 2:
            raise DLMScopeError(f"model diffing needs at least two checkpoints; got {checkpoints}")
        if not cfg.k_list():
            raise DLMScopeError("give at least one k")
        self.checkpoints = list(checkpoints)

    def activation_source(self, lm, rows: torch.Tensor, doc_ids: torch.Tensor, **kwargs):
        from .activations import PairedActivationSource
        from .analysis.stability import check_compatible
        from .models import load_model

        if not hasattr(self, "others"):
            self.others = [load_model(c, device=self.dist.device, dtype=self.cfg.dtype) for c in self.checkpoints[1:]]
            for other in self.others:
                check_compatible(lm, other)
        return PairedActivationSource([lm, *self.others], self.hooks, rows, doc_ids, **kwargs)

    def build_trainers(self, d_in: int, meta: dict) -> None:
        from .sae.crosscoder import CrossCoderConfig, CrossCoderTrainer

        cfg, n = self.cfg, len(self.checkpoints)
        width = next(iter(self.eval_set.values())).shape[1]
        if width % n:
            raise DLMScopeError(f"paired activations of width {width} do not split into {n} checkpoints")
        d = width // n
        tcfg = TrainConfig(total_tokens=cfg.total_tokens, batch_size=cfg.batch_size, lr=cfg.lr or None, seed=cfg.seed)
        for h in self.hooks:
            for k in cfg.k_list():
                key = f"{h}-k{k}"
                self.trainers[key] = CrossCoderTrainer(CrossCoderConfig(d, cfg.expansion * d, k, self.checkpoints,
                                                                        {**meta, "hook_name": h}), tcfg, self.dist.device)
                self.routes[key] = h

    def save_output(self, key: str, trainer, density: torch.Tensor) -> Path:
        from .sae.crosscoder import save_crosscoder

        return save_crosscoder(trainer.sae, self.folder / "crosscoders" / key.replace(".", "_"), density=density)


def train_sae(cfg: TrainSAEConfig) -> RunResult:
    """Train one SAE per (layer, k) from a shared activation stream; see the module docstring."""
    return SAERun(cfg).run()


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
