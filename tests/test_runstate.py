import hashlib
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from dlmscope import DLMScopeError
from dlmscope.runstate import (RunFolder, check_name, clean_tmp, load_state, rng_state, save_state,
                               set_rng_state)


def test_names_are_names():
    for good in ("run", "a-b_c.1", "LLaDA-8B.L1"):
        assert check_name(good) == good
    for bad in ("../../x", "a/b", "", ".", "..", "a b", "/abs"):
        with pytest.raises(DLMScopeError, match="is not a name"):
            check_name(bad)


HOLD = """
import sys, time
from dlmscope.runstate import RunFolder
with RunFolder(sys.argv[1], resume=True):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_process_refused_and_dead_holder_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (folder / ".lock").read_text().strip() == str(holder.pid)
        with pytest.raises(DLMScopeError, match=rf"in use by another process \(pid {holder.pid}\)"):
            RunFolder(folder, resume=True).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / ".lock").exists()  # a killed holder leaves its lock file: stale, taken over
    with RunFolder(folder) as run:
        assert (folder / ".lock").read_text().strip() == str(os.getpid())
        (run.path / "config.json").write_text("{}")
    assert not (folder / ".lock").exists() and (folder / "config.json").exists()


def test_existing_folder_needs_resume_and_leftovers_are_cleaned(tmp_path):
    folder = tmp_path / "run"
    (folder / "saes").mkdir(parents=True)
    (folder / "state.json").write_text("{}")
    (folder / ".checkpoint.abc.safetensors.x1y2.tmp").write_bytes(b"\0" * 100)
    (folder / "saes" / ".sae_weights.safetensors.q.tmp").write_bytes(b"\0")
    with pytest.raises(DLMScopeError, match="already exists; pass --resume"):
        RunFolder(folder).acquire()
    assert (folder / "state.json").exists() and not (folder / ".lock").exists()
    with RunFolder(folder, resume=True):
        assert sorted(p.name for p in folder.rglob("*")) == [".lock", "saes", "state.json"]
    (folder / ".x.tmp").write_text("")
    assert clean_tmp(folder) == [folder / ".x.tmp"]


def test_failed_run_removes_only_a_folder_it_created_and_left_empty(tmp_path):
    with pytest.raises(RuntimeError):
        with RunFolder(tmp_path / "a" / "run"):
            (tmp_path / "a" / "run" / ".half.tmp").write_text("x")
            raise RuntimeError("model failed to load")
    assert not (tmp_path / "a" / "run").exists()
    with pytest.raises(RuntimeError):
        with RunFolder(tmp_path / "b"):
            (tmp_path / "b" / "state.json").write_text("{}")
            raise RuntimeError
    assert (tmp_path / "b" / "state.json").exists()
    (tmp_path / "c").mkdir()
    with pytest.raises(RuntimeError):
        with RunFolder(tmp_path / "c"):
            raise RuntimeError
    assert (tmp_path / "c").is_dir()  # the user's own empty folder stays


def test_unwritable_folder_is_one_line(tmp_path):
    with pytest.raises(DLMScopeError, match="cannot write to output folder '/proc/nope/run'"):
        RunFolder("/proc/nope/run").acquire()


def test_state_round_trip_is_exact(tmp_path):
    state = {"step": 7, "lr": 0.1 + 0.2, "nan": float("nan"), "name": "x", "none": None, "flag": True,
             "ints": {0: torch.arange(3), 5: (0.9, 0.999)}, "__odd": [1, (2, 3)],
             "t": torch.randn(4, 3, dtype=torch.float64), "b": torch.tensor([True, False]),
             "h": torch.randn(2).bfloat16(), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 5),
             "view": torch.arange(10.0)[::2]}
    save_state(tmp_path, "ck", state)
    got = load_state(tmp_path, "ck")
    assert set(got) == set(state) and got["ints"][5] == (0.9, 0.999) and got["__odd"] == [1, (2, 3)]
    assert got["lr"] == 0.1 + 0.2 and got["nan"] != got["nan"] and got["none"] is None and got["flag"] is True
    for k in ("t", "b", "h", "scalar", "empty", "view"):
        assert got[k].dtype == state[k].dtype and torch.equal(got[k], state[k])
    assert torch.equal(got["ints"][0], torch.arange(3))
    save_state(tmp_path, "ck", {"step": 8})  # the previous tensors file goes once the new JSON is in place
    assert len(list(tmp_path.glob("ck.*.safetensors"))) == 1 and load_state(tmp_path, "ck") == {"step": 8}
    with pytest.raises(TypeError, match="cannot store a set"):
        save_state(tmp_path, "bad", {"s": {1}})


def _one_line(tmp_path, message):
    with pytest.raises(DLMScopeError, match=message) as e:
        load_state(tmp_path, "ck")
    assert "\n" not in str(e.value)


def test_flipped_bytes_and_crafted_files_are_refused(tmp_path):
    save_state(tmp_path, "ck", {"w": torch.randn(64, 64), "step": 3})
    data = next(tmp_path.glob("ck.*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0x10  # one flipped bit in a float
    data.write_bytes(bytes(raw))
    _one_line(tmp_path, r"ck\..*\.safetensors' is corrupt \(checksum mismatch\)")
    save_state(tmp_path, "ck", {"w": torch.randn(64, 64), "step": 3})
    meta = tmp_path / "ck.json"
    meta.write_text(meta.read_text().replace('"step": 3', '"step": 4'))
    _one_line(tmp_path, r"ck.json' is corrupt \(checksum mismatch\)")
    meta.write_text("\x80not json")
    _one_line(tmp_path, "ck.json' is corrupt")
    body = {"format": "dlmscope-state/1", "tensors": {"file": "../../etc/passwd", "sha256": "0"}, "state": {}}
    body["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    meta.write_text(json.dumps(body))
    _one_line(tmp_path, "is not a name")
    with pytest.raises(DLMScopeError, match="does not exist"):
        load_state(tmp_path, "other")


def test_optimizer_and_rng_resume_bit_exact(tmp_path):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))

    def steps(model, opt, n):
        for _ in range(n):
            x = torch.randn(16, 8)
            loss = (model(x) - random.random() - float(np.random.rand())).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    model, opt = make()
    steps(model, opt, 3)
    save_state(tmp_path, "ck", {"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng_state()})
    steps(model, opt, 4)
    expected = [p.detach().clone() for p in model.parameters()]

    model, opt = make()
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    state = load_state(tmp_path, "ck")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    set_rng_state(state["rng"])
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    steps(model, opt, 4)
    for a, b in zip(expected, model.parameters()):
        assert torch.equal(a, b)
