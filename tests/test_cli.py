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
    main(["info", str(tiny_dirs["dream"])])
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "dream" and info["shifted_logits"] and info["n_layers"] == 2 and info["d_model"] == 64
    assert info["hook_names"] == "blocks.{0..1}.hook_{resid_pre,resid_mid,mlp_in,mlp_out,resid_post}" and info["parameters"] > 0
    main(["info", str(tiny_dirs["causal"]), "--dtype", "bfloat16"])
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "causal" and not info["diffusion"] and info["mask_id"] is None
    main(["generate", str(tiny_dirs["llada"]), "-p", "a b", "-p", "c", "--gen-length", "8", "--steps", "4",
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
    (["info", "/no/such/model"], "neither a checkpoint folder"),
    (["info", "--dtype", "int3"], "unknown dtype"),
    (["generate", "--block-length", "0", "--gen-length", "8"], "not divisible"),
    (["generate", "/no/such/model"], "neither a checkpoint folder"),
    (["generate", "--gen-length", "10", "--block-length", "4"], "not divisible"),
    (["generate", "--steps", "500", "--gen-length", "32"], "out of range"),
    (["generate", "--remasking", "best"], "unknown remasking"),
    (["steer", "--sae", "tiny-dlm-L1-k32", "--feature", "99999"], "out of range"),
    (["steer", "--sae", "tiny-ar-L1-k32", "--feature", "1"], "trained on model"),
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
          "--steps", "8", "--gen-length", "16", "-p", "The list type"])
    assert "sae_stability" in capsys.readouterr().out
    main(["stability", "--sae", "tiny-dlm-L1-k32", "--checkpoints", "dlmscope-tiny-dlm,dlmscope-tiny-dlm", "--n-seqs", "4",
          "--saes", "tiny-dlm-L1-k32,tiny-dlm-L1-k32", "--control-sae", "tiny-dlm-L1-k32", "--out", str(tmp_path / "stab")])
    assert "(other seed: control) | 1.000 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "stab" / "report.json").read_text())
    assert report["features"][1]["mean_correlation"] > 0.999 and (tmp_path / "stab" / "report.html").is_file()
