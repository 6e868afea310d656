import dlmscope


def test_top_level_api():
    assert all(hasattr(dlmscope, name) for name in dlmscope.__all__)
    assert dlmscope.load_sae is dlmscope.sae.load_sae
    sae = dlmscope.load_sae("tiny-dlm-L1-k32")
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.n_latents == 2048
