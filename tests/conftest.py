import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def temporary_cache(tmp_path_factory):
    """Tests (and the commands they start) never write to the user's ~/.cache/dlmscope."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DLMSCOPE_CACHE", str(tmp_path_factory.mktemp("dlmscope-cache")))
        yield


@pytest.fixture(scope="session")
def tokenizer():
    from dlmscope.data import builtin_corpus
    from dlmscope.tokenizer import train_tokenizer

    return train_tokenizer(builtin_corpus("train")[:500], vocab_size=300)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    from dlmscope.models.tiny import write_tiny_causal, write_tiny_dream, write_tiny_llada

    root = tmp_path_factory.mktemp("models")
    kw = dict(vocab_size=len(tokenizer), tokenizer=tokenizer)
    return {"llada": write_tiny_llada(root / "llada", mask_id=tokenizer.mask_token_id, **kw),
            "dream": write_tiny_dream(root / "dream", mask_id=tokenizer.mask_token_id, **kw),
            "causal": write_tiny_causal(root / "causal", **kw)}


@pytest.fixture(scope="session")
def llada(tiny_dirs):
    from dlmscope.models import load_model

    return load_model(tiny_dirs["llada"])


@pytest.fixture(scope="session")
def tiny_sae(llada):
    """A small SAE on the tiny LLaDA's layer 1, trained for a few steps."""
    from dlmscope.hooks import run_with_cache
    from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

    torch.manual_seed(0)
    ids = torch.randint(4, llada.vocab_size, (16, 16))
    acts = run_with_cache(llada, ids, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"].reshape(-1, 64)
    tr = SAETrainer(SAEConfig(64, 256, 8, "topk", {"model_name": llada.name, "hook_name": "blocks.1.hook_resid_post"}),
                    TrainConfig(total_tokens=256 * 20, batch_size=256, optimizer="adam"))  # what the tests were written on
    for _ in range(20):
        tr.step(acts)
    return tr.sae.eval()


@pytest.fixture(scope="session")
def tiny_transcoder(llada):
    """A skip transcoder on the tiny LLaDA's layer-1 MLP (input -> output), trained for a few steps."""
    from dlmscope.hooks import run_with_cache
    from dlmscope.sae import SAEConfig, SAETrainer, TrainConfig

    hooks = ["blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]
    ids = torch.randint(4, llada.vocab_size, (16, 16), generator=torch.Generator().manual_seed(0))
    x, y = (a.reshape(-1, 64) for a in run_with_cache(llada, ids, hooks).values())
    meta = {"model_name": llada.name, "hook_name": hooks[0], "hook_name_out": hooks[1]}
    tr = SAETrainer(SAEConfig(64, 256, 8, "skip_transcoder", meta), TrainConfig(total_tokens=256 * 20, batch_size=256))
    for _ in range(20):
        tr.step(x, target=y)
    return tr.sae.eval()


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster and immune to OpenMP spin-waits on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
