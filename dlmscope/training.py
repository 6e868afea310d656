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
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal
from pathlib import Path

import torch

from . import checks
from .activations import ActivationSource, CachedSource, Prefetcher, ShuffleBuffer
from .errors import DLMScopeError
from .io_utils import atomic_write_json, atomic_write_text
from .runtime import torch_threads
from .runstate import Run, check_name, rng_state, set_rng_state
from .options import DataPart, DictionaryPart, ModelPart, Options, RunPart, SAEPart, SitePart, safe_name, unset
from .sae import SAEConfig, SAETrainer, TrainConfig, save_sae
from .sae.train import JumpReLUConfig, NonFiniteError, OptimiserConfig
from .sae.metrics import log10_density_histogram


@dataclass
class TrainSAEConfig(RunPart, OptimiserConfig, JumpReLUConfig, SAEPart, DictionaryPart, DataPart, SitePart, ModelPart):
    """Everything a train-sae run needs, composed of parts (`dlmscope.options`); every field is a CLI flag
    and a config-file key, and every value is checked here, before any model loads."""

    renamed: ClassVar[dict[str, str]] = {"cache": "activation_cache"}

    def run_name(self) -> str:
        return self.name or safe_name(f"{Path(self.model).name}-L{self.layers}-k{self.k}")


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

    def close(self) -> None:
        """End the process group together (a barrier, then destroy): a rank that exits while a peer still
        tears its group down can make that peer abort."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


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


class DictionaryRun(Run):
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

    resumable = RESUMABLE_CHANGES

    def __init__(self, cfg: TrainSAEConfig | DiffConfig, lm=None):
        self.lm = lm
        """A model already in memory (e.g. `load_model(hooked_transformer, mask_id=...)`); None loads `cfg.model`."""
        self.dist = _Dist(cfg.device)
        super().__init__(cfg, Path(cfg.out) / check_name(cfg.run_name()), self.dist.main)
        self.hooks = [cfg.hook(i, cfg.site) for i in cfg.layer_list()]
        self.targets: dict[str, str] = {}
        """Input hook -> the hook a trainer predicts, where that differs (transcoders)."""
        self.trainers: dict = {}
        self.routes: dict[str, str] = {}
        self.history: list[dict] = []
        self.steps_done = 0
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

    def device_for(self, i: int) -> str:
        """The device of the i-th dictionary: --sae-devices round-robin, else this process's device."""
        devices = self.cfg.sae_device_list(self.dist.device)
        return devices[i % len(devices)]

    def activation_source(self, lm, rows: torch.Tensor, doc_ids: torch.Tensor, **kwargs):
        """The source of training (and held-out) batches when running the model; crosscoders pair checkpoints."""
        return ActivationSource(lm, self.hooks, rows, doc_ids, **kwargs)

    # ------------------------------------------------------------------------------------------ steps
    def run(self) -> RunResult:
        """The whole run; `cfg.threads` holds for the run only (the caller's thread count is restored)."""
        with torch_threads(self.cfg.threads), self.lock():
            saved = self.read_checkpoint() if self.cfg.resume else None  # before the expensive setup
            try:
                self.setup()
                if saved is not None:
                    self.resume(saved)
                with self.signals():
                    self.train()
            finally:
                if self.prefetcher is not None:
                    self.prefetcher.close()
            if self.signal:
                self.checkpoint()
                if self.dist.main:
                    print(f"interrupted at step {self.steps_done}/{self.total_steps}; checkpoint written, "
                          "continue with --resume")
                result = RunResult(self.folder, {}, {}, True, self.history, self.signal)
            else:
                result = self.finish()
            self.dist.close()
            return result

    def setup(self) -> None:
        from .data import pack
        from .diffusion.sampler import check_context_length
        from .models import load_model

        cfg, dist = self.cfg, self.dist
        if cfg.activation_cache:  # the last shard is held out for metrics; the others are split across processes
            eval_src = CachedSource(cfg.activation_cache, shards=slice(-1, None))
            missing = [h for h in self.hooks if h not in eval_src.hooks]
            if missing:
                raise DLMScopeError(f"cache {cfg.activation_cache!r} lacks hooks {missing}; it has {eval_src.hooks}")
            n_shards = len(eval_src.manifest["shards"])
            if n_shards < 1 + dist.world:
                raise DLMScopeError(f"cache {cfg.activation_cache!r} has {n_shards} shard(s); training needs at least "
                                    f"{1 + dist.world} (one held out, one per process)")
            cached = CachedSource(cfg.activation_cache, shards=list(range(n_shards - 1))[dist.rank::dist.world])
            train_src: CachedSource | ActivationSource | Prefetcher = cached
            tokens = sum(s["tokens"] for s in cached.shards)
            if tokens < cfg.batch_size // dist.world:
                raise DLMScopeError(f"cache {cfg.activation_cache!r} holds {tokens} training vectors (the last shard "
                                    f"is held out), fewer than one batch of {cfg.batch_size}; lower --batch-size or "
                                    "cache more batches")
            model_name, d_model, policy = eval_src.manifest["model"], None, eval_src.policy
        else:
            train_texts, heldout_texts = split_texts(cfg.dataset, cfg.column)  # a bad dataset fails before the model
            lm = self.lm if self.lm is not None else load_model(cfg.model, device=dist.device, dtype=cfg.dtype)
            for h in self.hooks:
                lm.site(h)
            if lm.tokenizer is None:
                raise DLMScopeError(f"model {cfg.model!r} has no tokenizer; train from a cache (--activation-cache) instead")
            check_context_length(lm, cfg.context_length)
            train_rows = pack(lm.tokenizer, train_texts, cfg.context_length)
            eval_rows = pack(lm.tokenizer, heldout_texts, cfg.context_length)
            common = dict(policy=cfg.policy, t_range=(cfg.t_min, cfg.t_max), seqs_per_batch=cfg.seqs_per_forward)
            live = self.activation_source(lm, train_rows.input_ids, train_rows.doc_ids, seed=cfg.seed,
                                          rank=dist.rank, world=dist.world, **common)
            train_src = live
            eval_src = self.activation_source(lm, eval_rows.input_ids, eval_rows.doc_ids, seed=cfg.seed + 1,
                                              **{**common, "seqs_per_batch": min(cfg.seqs_per_forward, eval_rows.input_ids.shape[0])})
            model_name, d_model, policy = lm.name, lm.d_model, live.policy
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
        state = self.load()
        self.check_resume(state["config"])
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
        bar = self.progress(total=self.total_steps * cfg.batch_size, initial=self.steps_done * cfg.batch_size,
                            unit="tok", unit_scale=True, desc=f"train-sae {len(self.trainers)} SAE(s)")
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
                if self.stop_requested():
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
        logs = {}
        for key, tr in self.trainers.items():
            try:
                logs[key] = tr.step(self.inputs(key, batch.acts), reduce, **self.target_kwargs(key, batch.acts))
            except NonFiniteError as e:
                raise DLMScopeError(f"training stopped: {key}: {e}; {self._non_finite_source(tr, batch.acts)}; "
                                    f"{self.kept()}") from None
        self.steps_done += 1
        return logs

    def _non_finite_source(self, trainer, acts: dict[str, torch.Tensor]) -> str:
        """Where NaN / inf came from: the activations (cache or model) or the optimisation (its options)."""
        bad = checks.non_finite({h: a.float().pow(2).sum(-1) for h, a in acts.items()})
        if bad is not None:
            origin = f"cache {self.cfg.activation_cache!r}" if self.cfg.activation_cache else \
                f"model {self.cfg.model!r} ({self.cfg.dtype})"
            return f"the input activations from {origin} hold NaN/inf or overflow float32 (squared norms of {bad})"
        options = f"lr={trainer.lr:g}"
        if self.cfg.architecture == "jumprelu":
            options += f", l0_coef={self.cfg.l0_coef:g}, bandwidth={self.cfg.bandwidth:g}"
        return f"the inputs are finite, so the optimisation diverged ({options}): lower --lr"

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
        ranks: list = [mine]
        if self.dist.world > 1:
            import torch.distributed as tdist

            ranks = [None] * self.dist.world
            tdist.all_gather_object(ranks, mine)
        if self.dist.main:
            weights = {f"{k}.{n}": p for k, t in self.trainers.items() for n, p in t.sae.state_dict().items()}
            checks.finite_tensors(f"refusing to checkpoint {str(self.folder)!r}", weights)
            atomic_write_json(self.folder / "config.json", asdict(self.cfg))
            self.save({
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
    def stop_requested(self) -> bool:
        """Whether any process got a signal (agreed across torchrun processes, so all stop at the same step)."""
        if self.dist.world == 1:
            return bool(self.signal)
        if float(self.dist.mean(torch.tensor(float(self.signal)))) > 0:
            self.signal = self.signal or signal.SIGTERM
        return bool(self.signal)


class SAERun(DictionaryRun):
    """SAEs of any architecture (transcoders included), one per (layer, k)."""

    def __init__(self, cfg: TrainSAEConfig, lm=None):
        super().__init__(cfg, lm)
        if not cfg.k_list():
            raise DLMScopeError("give at least one k")
        self.reads = list(self.hooks)
        if cfg.target_site:
            self.targets = {h: cfg.hook(i, cfg.target_site) for h, i in zip(self.reads, cfg.layer_list())}
            self.hooks += list(self.targets.values())

    def build_trainers(self, d_in: int, meta: dict) -> None:
        cfg = self.cfg
        tcfg = TrainConfig.of(cfg, autocast_bf16=cfg.device.startswith("cuda") and cfg.dtype != "float32")
        for h in self.reads:
            out = {"hook_name_out": self.targets[h]} if h in self.targets else {}
            for k in cfg.k_list():
                key = f"{h}-k{k}"
                self.trainers[key] = SAETrainer(SAEConfig(d_in, cfg.expansion * d_in, k, cfg.architecture,
                                                          {**meta, "hook_name": h, **out}, cfg.prefix_list()),
                                                tcfg, self.device_for(len(self.routes)))
                self.routes[key] = h

    def save_output(self, key: str, trainer: SAETrainer, density: torch.Tensor) -> Path:
        with trainer.averaged():
            return save_sae(trainer.sae, self.folder / "saes" / key.replace(".", "_"), density=density)


class CrossCoderRun(DictionaryRun):
    """BatchTopK crosscoders (`dlmscope.sae.crosscoder`), one per (layer, k), over the paired activations of
    `checkpoints` (cfg.model is the first): every checkpoint runs on the identical corrupted batch. A cache
    written from a `PairedActivationSource` (concatenated activations) works as --cache."""

    def __init__(self, cfg: TrainSAEConfig | DiffConfig, checkpoints: list[str]):
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
        n = len(self.checkpoints)
        width = next(iter(self.eval_set.values())).shape[1]
        if width % n:
            raise DLMScopeError(f"paired activations of width {width} do not split into {n} checkpoints")
        self.add_crosscoders("", self.checkpoints, width // n, meta)

    def add_crosscoders(self, suffix: str, names: list[str], d: int, meta: dict) -> None:
        """One crosscoder trainer over `names` per (hook, k), keyed "{hook}-k{k}{suffix}"."""
        from .sae.crosscoder import CrossCoderConfig, CrossCoderTrainer

        cfg, tcfg = self.cfg, self.train_config(d)
        init, resample = self.decoder_options()
        for h in self.hooks:
            for k in cfg.k_list():
                key = f"{h}-k{k}{suffix}"
                self.trainers[key] = CrossCoderTrainer(CrossCoderConfig(d, cfg.expansion * d, k, names,
                                                                        {**meta, "hook_name": h}, init), tcfg,
                                                       self.device_for(len(self.routes)), resample)
                self.routes[key] = h

    def train_config(self, d_in: int) -> TrainConfig:
        return TrainConfig.of(self.cfg)

    def decoder_options(self) -> tuple[Literal["shared", "independent"], int]:
        """The crosscoders' decoder starts and resampling interval: shared starts, no resampling (`diff` has flags)."""
        return "shared", 0

    def save_output(self, key: str, trainer, density: torch.Tensor) -> Path:
        from .sae.crosscoder import save_crosscoder

        with trainer.averaged():
            return save_crosscoder(trainer.sae, self.folder / "crosscoders" / key.replace(".", "_"), density=density)


@dataclass
class DiffPart(Options):
    checkpoints: str
    """Comma-separated checkpoints (built-in names or folders), the base first; at least two."""
    specific_threshold: float = 0.9
    """Relative decoder norm above which a latent is specific to the later checkpoint (below 1 - it: to the base)."""
    nu_max: float = 0.3
    """Latent Scaling: a specific latent is robust when both ratios nu_error and nu_reconstruction are below this."""
    diff_sae: bool = False
    """Also train a diff-SAE (Top-K) on the activation differences (last checkpoint minus the base)."""
    decoder_init: Literal["shared", "independent"] = "independent"
    """Crosscoder decoder starts: independent (a random direction per checkpoint) or shared (the same in every
    checkpoint: identical checkpoints then give relative norms of exactly 0.5, the pipeline's exact check)."""
    resample_every: int = 100
    """Crosscoders: every this many steps in the first half of training, re-initialise the dead latents from tokens
    drawn by reconstruction error (0: never; AuxK alone)."""
    null_control: bool = False
    """Also train the base-vs-base crosscoder (the base's activations twice, same settings) and test every pair's
    relative-norm distribution against it (Kolmogorov-Smirnov and a permutation test of the spread)."""
    n_seqs: int = 64
    """Held-out sequences the report reads (scaling, top examples)."""
    n_examples: int = 6
    """Top examples per specific latent in the report."""

    def check(self) -> None:
        if len(self.checkpoint_list()) < 2:
            raise DLMScopeError(f"checkpoints={self.checkpoints!r}: model diffing needs at least two comma-separated "
                                "checkpoints (base first)")
        checks.number("specific_threshold", self.specific_threshold, 0.5, 1.0, low_open=True, high_open=True)
        checks.number("nu_max", self.nu_max, 0.0, low_open=True)
        checks.positive("n_seqs", self.n_seqs)
        checks.positive("n_examples", self.n_examples)
        checks.non_negative("resample_every", self.resample_every)

    def checkpoint_list(self) -> list[str]:
        return [c.strip() for c in self.checkpoints.split(",") if c.strip()]


@dataclass
class DiffConfig(RunPart, OptimiserConfig, DictionaryPart, DataPart, SitePart, DiffPart):
    """A `dlmscope diff` run: a BatchTopK crosscoder per (layer, k) over the checkpoints (the first is the base
    and supplies the tokenizer), then the diffing report (`analysis.diffing`). Composed of the checkpoints,
    site, data, dictionary, optimiser and run parts."""

    renamed: ClassVar[dict[str, str]] = {"cache": "activation_cache", "threshold": "specific_threshold"}
    layers: str = "1"
    """Comma-separated layer indices (hook blocks.{i}.hook_resid_{site}, or blocks.{i}.hook_{site} for MLP sites)."""
    total_tokens: int = 100_000
    """Training tokens per crosscoder."""
    batch_size: int = 256
    """Paired activation vectors per crosscoder step."""
    lr: float | None = field(default=3e-3, metadata=unset("the optimiser's default, which barely moves the decoders "
                                                          "in a short run"))
    """Learning rate."""
    # Crosscoder defaults from the dead-latent measurement (README, experiments/diff_dead_latents.py): on the tiny
    # DLM's layer-1 stream, 512 latents at 150k tokens leave 4.1% dead on held-out text with this AuxK and resampling
    # every 100 steps (8.0% with the SAE's AuxK defaults); 1,024 latents at 300k tokens leave 33-40% dead whatever the
    # AuxK and resampling. The help texts stay the SAE's.
    expansion: int = 2
    """Latents per input dimension (n_latents = expansion * d_model)."""
    aux_coef: float = 1 / 8
    """AuxK loss coefficient (0 turns AuxK off)."""
    k_aux: int | None = field(default=None, metadata=unset("d_in"))
    """Dead latents per token in the AuxK prediction."""
    dead_tokens: int | None = 10_000
    """Tokens without firing before a latent counts as dead (10M is the published window, scaled down so
    short runs can still see and revive dead latents)."""

    @property
    def model(self) -> str:
        """The base checkpoint (activations are paired with it; its tokenizer packs the text)."""
        return self.checkpoint_list()[0]

    def run_name(self) -> str:
        tag = "_vs_".join(Path(c).name for c in self.checkpoint_list())
        return self.name or safe_name(f"diff-{tag}-L{self.layers}-k{self.k}")[:120]


class DiffRun(CrossCoderRun):
    """The crosscoders, plus (with --diff-sae) one Top-K SAE per (layer, k) on last-minus-base differences."""

    def __init__(self, cfg: DiffConfig):
        super().__init__(cfg, cfg.checkpoint_list())

    def build_trainers(self, d_in: int, meta: dict) -> None:
        super().build_trainers(d_in, meta)
        d = next(iter(self.eval_set.values())).shape[1] // len(self.checkpoints)
        if self.cfg.null_control:  # the base against itself: relative_norm_test's null
            self.add_crosscoders("-null", [self.checkpoints[0], self.checkpoints[0] + "-copy"], d, meta)
        if not self.cfg.diff_sae:
            return
        tcfg = self.train_config(d)
        for h in self.hooks:
            for k in self.cfg.k_list():
                key = f"{h}-k{k}-diffsae"
                self.trainers[key] = SAETrainer(SAEConfig(d, self.cfg.expansion * d, k, "topk",
                                                          {**meta, "hook_name": h, "diff_of": self.checkpoints}),
                                                tcfg, self.device_for(len(self.routes)))
                self.routes[key] = h

    def decoder_options(self) -> tuple[Literal["shared", "independent"], int]:
        return self.cfg.decoder_init, self.cfg.resample_every

    def train_config(self, d_in: int) -> TrainConfig:
        """k_aux unset means d_in here (twice an SAE's default: what the dead-latent measurement used); the optimiser
        unset means adam (what diff's studies measured; the grid that made signum_sf the Top-K default did not)."""
        return TrainConfig.of(self.cfg, k_aux=self.cfg.k_aux or d_in, optimizer=self.cfg.optimizer or "adam")

    def inputs(self, key: str, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        x = acts[self.routes[key]]
        d = x.shape[1] // len(self.checkpoints)
        if key.endswith("-null"):
            return torch.cat([x[:, :d], x[:, :d]], dim=1)
        if not key.endswith("-diffsae"):
            return x
        return x[:, -d:] - x[:, :d]

    def save_output(self, key: str, trainer, density: torch.Tensor) -> Path:
        if key.endswith("-diffsae"):
            with trainer.averaged():
                return save_sae(trainer.sae, self.folder / "diffsaes" / key.replace(".", "_"), density=density)
        return super().save_output(key, trainer, density)


def train_sae(cfg: TrainSAEConfig, lm=None) -> RunResult:
    """Train one SAE per (layer, k) from a shared activation stream; see the module docstring.

    `lm`: a `LoadedModel` already in memory to train on instead of loading `cfg.model` (a converted
    `HookedTransformer`, say); the SAEs then record its name.
    """
    return SAERun(cfg, lm).run()


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
