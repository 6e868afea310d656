import math

import pytest

from dlmscope import checks
from dlmscope.errors import DLMScopeError


@pytest.mark.parametrize("call,message", [
    (lambda: checks.positive("n", 0), "n=0 must be an integer >= 1"),
    (lambda: checks.positive("n", True), "n=True must be an integer >= 1"),  # a bool is not a count
    (lambda: checks.non_negative("n", -1), "n=-1 must be an integer >= 0"),
    (lambda: checks.integer("n", 9, 1, 8), "n=9 must be an integer >= 1 and <= 8"),
    (lambda: checks.number("lr", math.nan, 0.0), r"lr=nan must be a finite number in \[0, inf\)"),
    (lambda: checks.number("lr", math.inf), "lr=inf must be a finite number in"),
    (lambda: checks.number("t", 0.0, 0.0, 1.0, low_open=True), r"t=0.0 must be a finite number in \(0, 1\]"),
    (lambda: checks.number("t", "0.5", 0.0, 1.0), "t='0.5' must be a finite number"),
    (lambda: checks.choice("site", "attn", ("pre", "post")), "site='attn'; allowed: pre, post"),
    (lambda: checks.names("--sae", " , "), "--sae=' , ' names nothing"),
    (lambda: checks.int_list("--layers", "1,x"), "--layers='1,x' must be comma-separated integers"),
    (lambda: checks.int_list("--steps", "4,0", 1), "--steps=0 must be an integer >= 1"),
    (lambda: checks.float_list("--t-bins", "0.5,1.5", 0.0, 1.0), "--t-bins=1.5 must be a finite number"),
    (lambda: checks.text("name", ["a"]), "name=\\['a'\\] must be a string"),
    (lambda: checks.device("--device", "banana"), "'banana' is not a torch device"),
    (lambda: checks.device("--device", "cuda:99"), "--device='cuda:99' but"),
])
def test_bad_values_raise_one_line_naming_them(call, message):
    with pytest.raises(DLMScopeError, match=message) as e:
        call()
    assert "\n" not in str(e.value)


def test_good_values_come_back():
    assert checks.positive("n", 3) == 3 and checks.number("lr", 1, 0.0) == 1.0 and checks.text("k", 32) == "32"
    assert checks.int_list("k", " 4, 8 ,") == [4, 8] and checks.float_list("t", "0.5,1", 0.0, 1.0) == [0.5, 1.0]
    assert checks.device("--device", "cpu") == "cpu"


def test_output_paths_are_checked_without_writing(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "new" / "deeper" / "r.json"
    assert checks.writable_file("--out", target) == target
    assert checks.writable_folder("--out", tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe leaves nothing behind
    for call, message in ((lambda: checks.writable_file("--out", tmp_path), "is a folder"),
                          (lambda: checks.writable_file("--out", tmp_path / "file" / "r.json"), "is a file, not a"),
                          (lambda: checks.writable_folder("--out", tmp_path / "file"), "is a file; give a folder"),
                          (lambda: checks.writable_folder("--out", "/proc/dlmscope-run"), "is not writable")):
        with pytest.raises(DLMScopeError, match=message):
            call()
