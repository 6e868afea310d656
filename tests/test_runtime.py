import io

import torch

from dlmscope.runtime import LogProgress, progress, torch_threads


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_logs_get_a_plain_line_every_five_percent():
    log = io.StringIO()
    bar = progress(total=2000, desc="train-sae", unit="tok", unit_scale=True, file=log)
    assert isinstance(bar, LogProgress)
    for _ in range(1000):
        bar.update(2)
        bar.set_postfix(fvu="0.100")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 20
    assert lines[0].startswith("train-sae:   5% (100/2.00k tok), ") and lines[0].endswith(", fvu=0.100")
    assert lines[-1].startswith("train-sae: 100% (2.00k/2.00k tok)")


def test_iteration_resume_and_interruption():
    log = io.StringIO()
    assert list(progress(range(10), desc="cache", file=log)) == list(range(10))
    assert log.getvalue().count("\n") == 20 // 2 and "cache: 100% (10/10 it)" in log.getvalue()
    log = io.StringIO()  # resumed at 50%: no lines for the part already done; stopped early: one last line
    bar = progress(range(5, 10), desc="rl", initial=5, total=10, file=log)
    for step in bar:
        if step == 7:
            break
    bar.close()
    assert log.getvalue().splitlines()[0].startswith("rl:  60% (6/10 it)")
    assert log.getvalue().splitlines()[-1].startswith("rl:  70% (7/10 it)") and log.getvalue().count("\n") == 2


def test_a_terminal_gets_tqdm():
    from tqdm import tqdm

    bar = progress(range(3), desc="x", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()


def test_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before


def test_train_sae_restores_the_callers_thread_count(tiny_dirs, tmp_path):
    from dlmscope.data import builtin_corpus
    from dlmscope.training import TrainSAEConfig, train_sae

    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(builtin_corpus("train")[:40]))
    before = torch.get_num_threads()
    cfg = TrainSAEConfig(model=str(tiny_dirs["llada"]), dataset=str(text), layers="1", k="4", expansion=2,
                         total_tokens=256 * 2, batch_size=256, buffer_tokens=1024, seqs_per_forward=8,
                         context_length=32, eval_tokens=256, out=str(tmp_path), progress=False, threads=before + 1)
    assert train_sae(cfg).saes and torch.get_num_threads() == before
