import json
from pathlib import Path

import torch

from dlmscope.data import heldout_rows
from dlmscope.diffusion.loss import next_token_ce, token_ce
from dlmscope.diffusion.noise import corrupt
from dlmscope.models import load_model
from dlmscope.models.zoo import ZOO_DIR


def test_shipped_twins_load_and_stay_under_loss_bounds():
    card = json.loads((ZOO_DIR / "model_card.json").read_text())
    dlm, ar = load_model("dlmscope-tiny-dlm"), load_model("dlmscope-tiny-ar")
    assert dlm.family == "llada" and ar.family == "causal" and dlm.n_params() == ar.n_params()
    rows = heldout_rows(dlm.tokenizer, 128, 16)
    with torch.no_grad():
        c = corrupt(rows, dlm.mask_id, 0.5, generator=torch.Generator().manual_seed(0))
        ce = float((token_ce(dlm.denoise_logits(c.xt), rows) * c.mask).sum() / c.mask.sum())
        ar_ce = float(next_token_ce(ar.forward(rows), rows).mean())
    # Bounds: the model card's held-out numbers plus a margin for the different held-out rows; broken weights give ~8.3.
    assert ce < card["dlm"]["masked_ce_per_t"]["0.5"] + 1.0
    assert ar_ce < card["ar"]["next_token_ce"] + 1.0
    assert card["sudoku"]["exact_solve"] > 0.5
