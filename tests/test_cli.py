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


@pytest.mark.parametrize("args,message", [
    (["generate", "/no/such/model"], "neither a checkpoint folder"),
    (["generate", "--gen-length", "10", "--block-length", "4"], "not divisible"),
    (["generate", "--steps", "500", "--gen-length", "32"], "out of range"),
    (["generate", "--remasking", "best"], "unknown remasking"),
    (["steer", "--sae", "tiny-dlm-L1-k32", "--feature", "99999"], "out of range"),
    (["steer", "--sae", "tiny-ar-L1-k32", "--feature", "1"], "trained on model"),
    (["eval-splice", "--sae", "nope"], "unknown SAE"),
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
