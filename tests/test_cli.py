import json

import pytest

from dlmscope.cli import main


def test_info_and_generate_default_model(capsys):
    main(["info"])
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "dlmscope-tiny-dlm" and info["family"] == "llada" and info["n_layers"] == 6
    main(["generate", "--prompt", "The list type", "--gen-length", "8", "--steps", "8", "--block-length", "8", "--history"])
    out = capsys.readouterr().out
    assert out.count("[step") == 8 and out.strip().splitlines()[-1].startswith("The list type")


def test_info_and_generate_on_checkpoint_folders(tiny_dirs, capsys):
    main(["info", "--model", str(tiny_dirs["dream"])])
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "dream" and info["shifted_logits"] and info["n_layers"] == 2 and info["d_model"] == 64
    assert info["hook_names"] == "blocks.{0..1}.hook_{resid_pre,attn_out,resid_mid,mlp_in,mlp_out,resid_post}" and info["parameters"] > 0
    assert info["attention_hook_names"] == "blocks.{0..1}.attn.hook_{q,k,v,rot_q,rot_k,pattern,z}"
    main(["info", "--model", str(tiny_dirs["causal"]), "--dtype", "bfloat16"])
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "causal" and not info["diffusion"] and info["mask_id"] is None
    main(["generate", "--model", str(tiny_dirs["llada"]), "-p", "a b", "-p", "c", "--gen-length", "8", "--steps", "4",
          "--block-length", "4", "--remasking", "entropy", "--history"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("[step") for line in lines) == 4 * 2 and len(lines) == 4 * 2 + 2


def test_console_script_runs_as_a_module():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dlmscope", "generate", "--steps", "500", "--gen-length", "32"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "out of range" in done.stderr


@pytest.mark.parametrize("args,message", [
    (["info", "--model", "/no/such/model"], "neither a checkpoint folder"),
    (["info", "--dtype", "int3"], "unknown dtype"),
    (["generate", "--block-length", "0", "--gen-length", "8"], "block_length=0 must be an integer >= 1"),
    (["generate", "--model", "/no/such/model"], "neither a checkpoint folder"),
    (["generate", "--gen-length", "10", "--block-length", "4"], "not divisible"),
    (["generate", "--steps", "500", "--gen-length", "32"], "out of range"),
    (["generate", "--remasking", "best"], "unknown remasking"),
    (["steer", "--sae", "tiny-dlm-L1-k32", "--feature", "99999"], "out of range"),
    (["steer", "--sae", "tiny-ar-L1-k32", "--model", "dlmscope-tiny-dlm", "--feature", "1"], "trained on model"),
    (["eval-splice", "--sae", "nope"], "unknown SAE"),
    (["train-sae", "--progress", "false"], "unexpected extra argument"),
    (["generate", "--steps", "many"], "Invalid value for '--steps'"),
    (["no-such-command"], "No such command"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_analysis_commands_smoke(tmp_path, capsys):
    main(["eval-splice", "--sae", "tiny-dlm-L1-k32", "--t-bins", "0.5", "--n-seqs", "4", "--out", str(tmp_path / "s.json")])
    assert "| 0.5 |" in capsys.readouterr().out and (tmp_path / "s.json").is_file()
    main(["steer", "--sae", "tiny-dlm-L3-k32", "--feature", "100", "--strength", "4", "--gen-length", "8", "--steps", "8"])
    assert "steered  :" in capsys.readouterr().out
    main(["order", "--sae", "tiny-dlm-L3-k32", "--strategies", "low_confidence,sae_stability", "--n", "4",
          "--step-budgets", "8", "--gen-length", "16", "-p", "The list type"])
    assert "sae_stability" in capsys.readouterr().out
    main(["stability", "--sae", "tiny-dlm-L1-k32", "--checkpoints", "dlmscope-tiny-dlm,dlmscope-tiny-dlm", "--n-seqs", "4",
          "--saes", "tiny-dlm-L1-k32,tiny-dlm-L1-k32", "--control-sae", "tiny-dlm-L1-k32", "--out", str(tmp_path / "stab")])
    assert "(other seed: control) | 1.000 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "stab" / "report.json").read_text())
    assert report["features"][1]["mean_correlation"] > 0.999 and (tmp_path / "stab" / "report.html").is_file()


SAE = ["--sae", "tiny-dlm-L3-k32"]
BAD_INPUT = {  # class of input -> (args, substring of the one error line); {file} {dir} {tmp} are filled in
    "device": [(["info", "--device", "banana"], "'banana' is not a torch device"),
               (["train-sae", "--device", "cuda:99"], "device='cuda:99'"),
               (["eval-splice", *SAE, "--device", "cuda:99"], "--device='cuda:99'")],
    "finite number in range": [(["train-sae", "--lr", "nan"], "lr=nan must be a finite number"),
                               (["train-sae", "--lr", "-1"], "lr=-1.0"),
                               (["train-sae", "--t-min", "0.6"], "t_max=0.5"),
                               (["cache", "--out", "{tmp}/c", "--t-max", "2"], "--t-max=2.0")],
    "count": [(["train-sae", "--eval-every", "0"], "eval_every=0"),
              (["train-sae", "--checkpoint-every", "0"], "checkpoint_every=0"),
              (["train-sae", "--seqs-per-forward", "0"], "seqs_per_forward=0"),
              (["train-sae", "--eval-tokens", "0"], "eval_tokens=0"),
              (["train-sae", "--expansion", "0"], "expansion=0"),
              (["train-sae", "--threads", "-1"], "threads=-1 must be an integer >= 0"),
              (["eval-splice", *SAE, "--n-seqs", "-4"], "n_seqs=-4"),
              (["cache", "--out", "{tmp}/c", "--batches", "-3"], "--batches=-3"),
              (["order", *SAE, "--n", "0"], "--n=0"),
              (["order", *SAE, "--heldout", "-1"], "--heldout=-1"),
              (["order", *SAE, "--gen-length", "0"], "--gen-length=0"),
              (["order", *SAE, "--step-budgets", "4,32"], "--step-budgets=32 must be an integer >= 1 and <= 16"),
              (["stability", *SAE, "--checkpoints", "a,b", "--n-seqs", "0"], "--n-seqs=0")],
    "comma list": [(["cache", "--out", "{tmp}/c", "--layers", "x"], "--layers='x' must be comma-separated integers"),
                   (["order", "--sae", ","], "--sae=',' names nothing"),
                   (["order", *SAE, "--strategies", "origin,best"], "--strategies='best'"),
                   (["stability", *SAE, "--checkpoints", ","], "--checkpoints=',' names nothing"),
                   (["stability", *SAE, "--checkpoints", "a"], "give at least two"),
                   (["eval-splice", *SAE, "--t-bins", "0.5,0"], "--t-bins=0.0"),
                   (["steer", *SAE, "--feature", "1", "--seeds", "1,a"], "--seeds='1,a'"),
                   (["train-sae", "--k", "8,0"], "k=0 must be an integer >= 1")],
    "output path": [(["cache", "--out", "{file}"], "--out='{file}' is a file"),
                    (["cache", "--out", "/proc/dlmscope/c"], "--out='/proc/dlmscope/c' is not writable"),
                    (["eval-splice", *SAE, "--out", "{dir}"], "--out='{dir}' is a folder"),
                    (["eval-splice", *SAE, "--out", "/proc/dlmscope.json"], "is not writable"),
                    (["eval-splice", *SAE, "--out", "{file}/s.json"], "is a file, not a folder"),
                    (["order", *SAE, "--out", "{dir}"], "is a folder"),
                    (["steer", *SAE, "--feature", "1", "--out", "{dir}"], "is a folder"),
                    (["stability", *SAE, "--checkpoints", "a,b", "--out", "{file}"], "--out='{file}' is a file"),
                    (["eval-splice", *SAE, "--out", "{file}"], "--out='{file}' exists and is not a result"),
                    (["steer", *SAE, "--feature", "1", "--out", "{file}"], "exists and is not a result this command"),
                    (["order", *SAE, "--out", "{file}"], "exists and is not a result this command"),
                    (["stability", *SAE, "--checkpoints", "a,b", "--out", "{tmp}/mine"],
                     "report.json' exists and is not a result this command"),
                    (["evaluate", "--sae", "tiny-dlm-L3-k32", "--out", "{file}"], "--out='{file}' is a file"),
                    (["experts", "--model", "/no/such/moe", "--out", "{file}"], "--out='{file}' is a file")],
    "config file": [(["train-sae", "--config", "{tmp}/broken.yaml"], "is not valid YAML/JSON at line 2"),
                    (["train-sae", "--config", "{tmp}/typed.yaml"], "lr='fast' must be a finite number"),
                    (["train-sae", "--config", "{tmp}/list.yaml"], "must hold a mapping"),
                    (["train-sae", "--config", "{tmp}/flag.yaml"], "progress='no' must be true or false")],
    "activation cache": [(["cache", "--out", "{tmp}/truncated"], "is unreadable or truncated"),
                         (["cache", "--out", "{tmp}/shardless"], "it needs model, hooks, policy and shards")],
    "step schedule": [(["steer", *SAE, "--feature", "1", "--steer-steps", "100", "--steps", "8", "--gen-length", "8"],
                       "steps=[100]: the run has steps 0..7")],
}


@pytest.mark.parametrize("args,message", [case for cases in BAD_INPUT.values() for case in cases],
                         ids=[f"{kind}:{' '.join(a[:2])}" for kind, cases in BAD_INPUT.items() for a, _ in cases])
def test_bad_values_one_line_exit_2_nothing_written(args, message, tmp_path, monkeypatch, capsys):
    """Every class of bad value fails at the boundary: exit 2, one line naming it, no output created."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "broken.yaml").write_text("layers: '1'\n  k: 8\n")
    (tmp_path / "typed.yaml").write_text("lr: fast\n")
    (tmp_path / "list.yaml").write_text("- layers\n- k\n")
    (tmp_path / "flag.yaml").write_text("progress: 'no'\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.json").write_text("my own report")
    for name, text in (("truncated", '{"model": "m", "hooks": ["blocks.1.hook_res'), ("shardless", '{"model": "m"}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
    fill = dict(tmp=tmp_path, file=tmp_path / "file", dir=tmp_path / "dir")
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.chdir(tmp_path)  # default outputs (runs/, stability/) would land here
    with pytest.raises(SystemExit) as e:
        main([a.format(**fill) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message.format(**fill) in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_rspo_command_both_algorithms_and_resume(tmp_path, capsys):
    """The README's RL commands on a tiny budget (tests/test_readme.py runs the README block itself with -m slow)."""
    budget = ["--task", "sudoku", "--group-size", "2", "--prompts-per-step", "1", "--eval-n", "2"]
    main(["rspo", "--algo", "rspo", "--rl-steps", "1", "--lam", "0.1", "--out", str(tmp_path / "rspo"), *budget])
    assert (tmp_path / "rspo" / "checkpoint-00001" / "config.json").is_file()
    main(["rspo", "--algo", "diffu-grpo", "--rl-steps", "1", "--out", str(tmp_path / "grpo"), *budget])
    main(["rspo", "--algo", "diffu-grpo", "--rl-steps", "2", "--out", str(tmp_path / "grpo"), "--resume", *budget])
    log = json.loads((tmp_path / "grpo" / "log.json").read_text())
    assert [e["step"] for e in log["steps"]] == [1, 2]  # step 2 continued the run of step 1
    assert (tmp_path / "grpo" / "checkpoint-00002").is_dir() and "checkpoints in" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--sampler-schedule", "cosine"], "unknown schedule 'cosine'"),
    (["--temperature", "inf"], "temperature=inf"),
    (["--temperature", "nan"], "temperature=nan"),
    (["--temperature", "-1"], "temperature=-1.0"),
    (["--cfg-scale", "nan"], "--cfg-scale=nan"),
    (["--cfg-scale", "-2"], "cfg_scale=-2.0"),
    (["--top-p", "1.5"], "top_p=1.5"),
    (["--top-k", "-3"], "top_k=-3"),
    (["--alg-temp", "-1"], "alg_temp=-1.0"),
    (["--gen-length", "5000"], "exceeds"),
    (["-p", "the list type " * 2000], "exceeds"),
])
def test_generate_sampler_options_bad_input(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_generate_sampler_options(tiny_dirs, capsys):
    """Dream's options on the command line reach the sampler: the dream schedule's counts show in the history."""
    main(["generate", "--model", str(tiny_dirs["dream"]), "-p", "a b", "--gen-length", "24", "--steps", "6", "--remasking",
          "maskgit_plus", "--history"])
    rows = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[step")]
    assert [24 - row.split().count("_") for row in rows] == [0, 3, 7, 11, 15, 19]  # Dream's 3, 4, 4, 4, 4, 5
    main(["generate", "--model", str(tiny_dirs["dream"]), "-p", "a b", "--gen-length", "24", "--steps", "6", "--sampler-schedule",
          "linear", "--history"])
    rows = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[step")]
    assert [24 - row.split().count("_") for row in rows] == [0, 4, 8, 12, 16, 20]  # LLaDA's 4 each
    main(["generate", "--gen-length", "8", "--steps", "4", "--sampler-schedule", "dream", "--remasking", "entropy",
          "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--alg-temp", "0.5", "--eps", "0.01"])
    assert capsys.readouterr().out.strip().startswith("The list type")


@pytest.mark.parametrize("args", [
    ["steer", "--sae", "tiny-dlm-L1-k32", "--feature", "1", "--sampler-schedule", "cosine"],
    ["order", "--sae", "tiny-dlm-L1-k32", "--sampler-schedule", "cosine"],
    ["rspo", "--sampler-schedule", "cosine"],
])
def test_sampling_commands_reject_unknown_schedules(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "unknown schedule 'cosine'; allowed: linear, dream" in err and len(err.splitlines()) == 1


def test_info_on_moe_and_block_models(tmp_path, capsys):
    import json as _json

    from dlmscope.models.tiny import write_tiny_llada2, write_tiny_lladamoe

    main(["info", "--model", str(write_tiny_llada2(tmp_path / "l2"))])
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["experts"], info["active_experts"], info["block_size"]) == ("llada2", 8, 2, 4)
    assert info["moe_layers"] == [1, 2] and info["hook_names"] == "blocks.{0..2}.hook_{resid_pre,attn_out,resid_mid,mlp_in,mlp_out,resid_post}"
    folder = write_tiny_lladamoe(tmp_path / "lm")
    main(["info", "--model", str(folder)])
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["experts"], info["moe_layers"]) == ("lladamoe", 8, [0, 1]) and "block_size" not in info
    cfg = _json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(_json.dumps({**cfg, "moe_router_score_function": "sparsemax"}))
    with pytest.raises(SystemExit) as e:
        main(["info", "--model", str(folder)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "moe_router_score_function='sparsemax'" in err


def test_generate_blocks_command(tmp_path, tokenizer, capsys):
    from dlmscope.models.tiny import write_tiny_llada2, write_tiny_lladamoe

    folder = write_tiny_llada2(tmp_path / "l2", vocab_size=len(tokenizer), tokenizer=tokenizer,
                               mask_id=tokenizer.mask_token_id)
    main(["generate-blocks", "--model", str(folder), "-p", "def f", "--max-new-tokens", "6", "--steps-per-block", "2",
          "--threshold", "0.5"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("def f") and lines[-1].endswith("positions]") and "forwards" in lines[-1]
    dense = write_tiny_lladamoe(tmp_path / "lm")
    with pytest.raises(SystemExit) as e:
        main(["generate-blocks", "--model", str(dense)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "not a block-diffusion model" in err and len(err.splitlines()) == 1


def test_block_models_sample_with_their_own_sampler_from_the_cli(tmp_path, tokenizer, capsys):
    """`generate` on a LLaDA 2.x folder runs its block sampler (the API's default too); `generate-blocks` takes the
    block length, LLaDA 2.1's editing sampler and the EOS early stop."""
    import dlmscope
    from dlmscope.diffusion.blocks import generate_blocks
    from dlmscope.diffusion.editing import generate_editing
    from dlmscope.models.tiny import write_tiny_llada2

    folder = write_tiny_llada2(tmp_path / "l2", vocab_size=len(tokenizer), tokenizer=tokenizer,
                               mask_id=tokenizer.mask_token_id)
    lm = dlmscope.load_model(folder)
    main(["info", "--model", str(folder)])
    info = json.loads(capsys.readouterr().out)
    assert (info["mask_id"], info["pad_id"], info["eos_id"]) == (lm.mask_id, lm.pad_id, lm.eos_id)
    assert info["block_size"] == 4
    # 3 blocks of 4 (the prompt's last and two more), 4 steps each
    main(["generate", "--model", str(folder), "-p", "def f", "--gen-length", "8", "--steps", "12"])
    expected = generate_blocks(lm, ["def f"], max_new_tokens=8, steps_per_block=4, cache=None).texts[0]
    assert capsys.readouterr().out.strip() == f"def f{expected}"
    assert dlmscope.generate(lm, ["def f"], gen_length=8, steps=12).texts[0] == expected
    main(["generate-blocks", "--model", str(folder), "-p", "def f", "--max-new-tokens", "6", "--editing-threshold",
          "0.5", "--block-length", "8", "--eos-early-stop"])
    lines = capsys.readouterr().out.strip().splitlines()
    edited = generate_editing(lm, ["def f"], max_new_tokens=6, editing_threshold=0.5, block_length=8,
                              eos_early_stop=True)
    assert lines[0] == f"def f{edited.texts[0]}" and lines[-1].startswith(f"[{edited.n_forwards} forwards")


@pytest.mark.parametrize("args,message", [
    (["generate", "--mask-id", "-1"], "mask_id=-1 must be an integer >= 0"),
    (["generate-blocks", "--model", "tests/fixtures/llada2_tiny", "--editing-threshold", "2"],
     "--editing-threshold=2.0"),
    (["generate-blocks", "--model", "tests/fixtures/llada2_tiny", "--block-length", "0"], "--block-length=0"),
    (["generate-blocks", "--model", "tests/fixtures/llada2_tiny", "--max-post-steps", "-1"], "--max-post-steps=-1"),
    (["generate-blocks", "--model", "tests/fixtures/llada2_tiny", "--threshold", "1.5"], "--threshold=1.5"),
])
def test_released_checkpoint_options_bad_input(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------ the CLI surface as a whole

def _commands():
    """(command words, click command) for every command and subcommand, help texts as written."""
    import typer

    from dlmscope.cli import app

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    return list(walk(typer.main.get_command(app), []))


def _kind(param) -> str:
    """What a flag takes on the command line: int, float, bool, str, list or choice."""
    shown = param.display_type(None) if hasattr(param, "display_type") else param.type.name
    shown = {"integer": "int", "text": "str", "boolean": "bool"}.get(shown, shown).strip("<>")
    return "choice" if "|" in shown else "list" if shown.startswith("list") or param.multiple else shown


def _visible_options():
    for path, cmd in _commands():
        for p in cmd.params:
            if not p.hidden and p.opts and p.opts[0].startswith("-"):
                yield path, p


def test_every_flag_has_help_a_shown_default_and_its_real_type(capsys, monkeypatch):
    from dlmscope.options import allowed_values, split_optional, type_hints
    from dlmscope.rl import RLConfig
    from dlmscope.training import DiffConfig, TrainSAEConfig

    for path, p in _visible_options():
        where = f"{' '.join(path)} {p.opts[0]}"
        assert p.help and p.help.strip(), f"{where} has no help"
        assert p.required or isinstance(p.show_default, str) or (p.default is not None and p.show_default), \
            f"{where} shows no default"
        default = p.default
        if isinstance(default, bool):
            assert _kind(p) == "bool", where
        elif isinstance(default, (int, float)):
            assert _kind(p) == type(default).__name__, f"{where}: default {default!r} but type {_kind(p)}"
    kinds = {int: "int", float: "float", bool: "bool", str: "str"}
    for name, cls in (("train-sae", TrainSAEConfig), ("diff", DiffConfig), ("rspo", RLConfig)):
        params = {p.name: p for path, p in _visible_options() if path == [name]}
        hints = type_hints(cls)
        for f in __import__("dataclasses").fields(cls):
            want = "choice" if allowed_values(f, hints[f.name]) else kinds[split_optional(hints[f.name])[0]]
            assert _kind(params[f.name]) == want, f"{name} --{f.name}: {_kind(params[f.name])}, field is {want}"
        assert set(params) == {f.name for f in __import__("dataclasses").fields(cls)} | {"config"}
    assert split_optional(type_hints(RLConfig)["threshold"]) == (float, True)  # unset, not "0 = off"
    assert split_optional(type_hints(TrainSAEConfig)["lr"]) == (float, True)  # unset, not "0 = default"
    # the rendered help keeps every text and default (no Rich markup swallowed)
    monkeypatch.setenv("COLUMNS", "400")
    for path, cmd in _commands():
        try:
            main([*path, "--help"])
        except SystemExit as e:
            assert e.code == 0
        out = capsys.readouterr().out
        for p in cmd.params:
            if p.hidden or not p.opts[0].startswith("-"):
                continue
            line = next(line for line in out.splitlines() if f" {p.opts[0]} " in line)
            assert "[default:" in line or "[required]" in line, f"{path} {p.opts[0]}: {line}"
            assert " ".join(p.help.split()) in " ".join(line.split()), f"{path} {p.opts[0]}: {line}"
        if path == ["steer"]:
            assert "(add W_dec[f])" in out


GLOSSARY = {  # a flag several commands share -> what every one of its help texts says (its one meaning)
    "--model": "Model", "-m": "Model", "--sae": "SAE", "--device": "Torch device", "--dtype": "Model dtype",
    "--out": "Output", "--seed": "eed", "--steps": "Denoising steps", "--threshold": "confidence",
    "--lr": "earning rate", "--n-seqs": "Held-out sequences", "--context-length": "Tokens per",
    "--layers": "ayer", "--batch-size": "ctivation vectors per", "--checkpoint-every": "between checkpoints",
    "--eval-every": "valuat", "--resume": "Continue", "--gen-length": "Tokens to generate",
    "--temperature": "emperature", "--t-min": "Lowest mask ratio", "--t-max": "Highest mask ratio",
    "--dataset": "Text source", "--checkpoints": "Comma-separated checkpoints", "--positions": "ositions",
    "--block-length": "block length", "--total-tokens": "Training tokens per", "--seqs-per-forward": "Rows per",
    "--policy": "Positions whose activations", "--task": "Verifiable task", "--kv-cache": "KV cache",
    "--sampler-schedule": "Sampler schedule", "--feature": "Latent index", "--prompt": "Prompt text",
    "-p": "Prompt text",
}


def test_a_flag_has_one_type_and_one_meaning_across_commands():
    uses: dict[str, list] = {}
    for path, p in _visible_options():
        for opt in p.opts:
            uses.setdefault(opt, []).append((" ".join(path), _kind(p), " ".join(p.help.split())))
    for opt, found in uses.items():
        assert len({kind for _, kind, _ in found}) == 1, f"{opt} takes different types: {found}"
        if len({text for _, _, text in found}) > 1:
            assert opt in GLOSSARY, f"{opt} has different help texts in {[c for c, _, _ in found]}: give it one " \
                                    "meaning and add it to GLOSSARY"
            assert all(GLOSSARY[opt] in text for _, _, text in found), f"{opt}: {found}"
    for old in ("--cache", "--schedule", "--t-low", "--t-high"):
        assert old not in uses, f"{old} is still a visible flag"
    commands_with_model = {c for c, _, _ in uses["--model"]}
    assert {"info", "generate", "generate-blocks", "experts"} <= commands_with_model  # no positional MODEL


@pytest.mark.parametrize("old,new,message", [
    (["rspo", "--steps", "0"], ["rspo", "--rl-steps", "0"], "rl_steps=0 must be an integer >= 1"),
    (["rspo", "--schedule", "cosine"], ["rspo", "--sampler-schedule", "cosine"], "unknown schedule 'cosine'"),
    (["rspo", "--cache", "full"], ["rspo", "--kv-cache", "full"], "cache='full'"),
    (["diff", "--checkpoints", "a,b", "--threshold", "0.2"], ["diff", "--checkpoints", "a,b", "--specific-threshold", "0.2"],
     "specific_threshold=0.2"),
    (["train-sae", "--cache", "x", "--total-tokens", "0"], ["train-sae", "--activation-cache", "x", "--total-tokens", "0"],
     "total_tokens=0"),
    (["order", "--sae", "tiny-dlm-L3-k32", "--steps", "4,32"], ["order", "--sae", "tiny-dlm-L3-k32", "--step-budgets", "4,32"],
     "--step-budgets=32 must be"),
    (["order", "--sae", "tiny-dlm-L3-k32", "--schedule", "cosine"],
     ["order", "--sae", "tiny-dlm-L3-k32", "--sampler-schedule", "cosine"], "unknown schedule 'cosine'"),
    (["cache", "{tmp}/c", "--dtype", "int3"], ["cache", "--out", "{tmp}/c", "--store-dtype", "int3"], "unknown dtype"),
    (["evaluate", "nope"], ["evaluate", "--sae", "nope"], "unknown SAE"),
    (["features", "build", "--t-low", "0.6", "--t-high", "0.5", "--out", "{tmp}/s"],
     ["features", "build", "--t-min", "0.6", "--t-max", "0.5", "--out", "{tmp}/s"], "0.6"),
    (["info", "/no/such/model"], ["info", "--model", "/no/such/model"], "neither a checkpoint folder"),
    (["generate", "--cache", "full"], ["generate", "--kv-cache", "full"], "cache='full'"),
    (["steer", "--sae", "tiny-dlm-L3-k32", "--feature", "1", "--schedule", "100", "--steps", "8", "--gen-length", "8"],
     ["steer", "--sae", "tiny-dlm-L3-k32", "--feature", "1", "--steer-steps", "100", "--steps", "8", "--gen-length", "8"],
     "steps=[100]: the run has steps 0..7"),
])
def test_deprecated_spellings_warn_and_work(old, new, message, tmp_path, capsys):
    """An old spelling means what it meant (the same error as its new spelling) after one warning line."""
    errors = []
    for args in (new, old):
        with pytest.raises(SystemExit) as e:
            main([a.format(tmp=tmp_path) for a in args])
        assert e.value.code == 2
        errors.append(capsys.readouterr().err.strip().splitlines())
    fresh, deprecated = errors
    assert len(fresh) == 1 and message in fresh[0]
    assert len(deprecated) >= 2 and deprecated[-1] == fresh[0]
    assert all(line.startswith("warning: ") and "deprecated" in line for line in deprecated[:-1])


def test_deprecated_spellings_run_like_the_new_ones(capsys):
    main(["generate", "--gen-length", "8", "--steps", "4", "--sampler-schedule", "linear", "--kv-cache", "prefix"])
    fresh = capsys.readouterr()
    main(["generate", "--gen-length", "8", "--steps", "4", "--schedule", "linear", "--cache", "prefix"])
    old = capsys.readouterr()
    assert old.out == fresh.out and fresh.err == "" and old.err.count("warning:") == 2


def test_config_file_keys_of_older_releases_are_read(tmp_path, capsys):
    (tmp_path / "old.yaml").write_text("cache: somewhere\ntotal_tokens: 0\n")
    with pytest.raises(SystemExit) as e:
        main(["train-sae", "--config", str(tmp_path / "old.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "config key 'cache' is deprecated; it is now 'activation_cache'" in err[0]
    assert "total_tokens=0" in err[1]


def test_sae_commands_default_to_the_model_the_sae_records(capsys):
    """The AR SAE runs on the AR model without --model (it used to fall back to the tiny DLM)."""
    main(["eval-splice", "--sae", "tiny-ar-L1-k32", "--t-bins", "0.5", "--n-seqs", "2"])
    out = capsys.readouterr().out
    assert out.startswith("dlmscope-tiny-ar ") and "| clean |" in out  # the AR model's clean-text row


def test_eval_splice_out_replaces_only_its_own_result(tmp_path, capsys):
    """`eval-splice --out notes.txt` never overwrites a user's file; its own earlier result it replaces."""
    notes, result = tmp_path / "notes.txt", tmp_path / "splice.json"
    notes.write_text("my notes")
    argv = ["eval-splice", "--sae", "tiny-dlm-L1-k32", "--t-bins", "0.5", "--n-seqs", "2", "--context-length", "16"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(notes)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "exists and is not a result this command wrote" in err and len(err.splitlines()) == 1
    assert notes.read_text() == "my notes"
    main([*argv, "--out", str(result)])
    main([*argv, "--seed", "1", "--out", str(result)])
    assert json.loads(result.read_text())["config"]["seed"] == 1
