import pytest
from checkpoints import write_tiny, write_tokenizer
from opt_reference import write_tiny_opt

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Conversions on first use go into the test's own cache, never the user's."""
    monkeypatch.setenv("MLX_FLASH_CACHE", str(tmp_path / "flash_cache"))


def make_checkpoint(path, arch, **kwargs):
    """A tiny random checkpoint of `arch` in its exact Hugging Face layout."""
    if arch == "opt":
        config = write_tiny_opt(path, **kwargs)
        write_tokenizer(path, config["vocab_size"])
        return config
    return write_tiny(path, arch, **kwargs)


def traced_decoding(model, prompt, steps):
    """Decode `steps` one token at a time after `prompt`, every layer's FFN
    recording its selections (`FlashFFN.trace`); the stats count those tokens only
    (the replay tests step the cache simulator through the traces)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    for layer in model.layers:
        layer.mlp.trace = []
    cache = make_prompt_cache(model)
    model(mx.array([prompt]), cache=cache)
    model.flash_stats.reset()
    for t in steps:
        model(mx.array([[t]]), cache=cache)


def stepwise_logits(model, prompt, steps):
    """Prefill `prompt`, then one token of `steps` at a time: the last position's
    logits of every call, float32 numpy rows."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array([prompt]), cache=cache)[:, -1]]
    for t in steps:
        out.append(model(mx.array([[t]]), cache=cache)[:, -1])
    return np.concatenate([np.array(o, np.float32) for o in out])
