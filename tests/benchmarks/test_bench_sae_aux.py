"""bench_sae_aux.py's pieces run for real at a tiny shape: the planted share of positive dead activations, and both
AuxK routes, the loss without AuxK and the dense products timed, with the rule restored afterwards."""

import torch

from dlmscope.sae import SAE, SAEConfig, model


def test_planted_density_and_both_routes_timed(load_benchmark):
    bench = load_benchmark("bench_sae_aux")
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
    sae = SAE(SAEConfig(16, 128, 4))
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::4] = True
    reached = bench.plant_density(sae, x, dead.nonzero().squeeze(1), 0.2)
    assert abs(reached - 0.2) < 0.02
    rule = model._dense_aux
    ms = bench.time_routes(sae, x, dead, k_aux=8, repeats=2)
    assert set(ms) == {"ragged", "dense", "none", "products"} and all(v > 0 for v in ms.values())
    assert model._dense_aux is rule  # the forced routes are undone
