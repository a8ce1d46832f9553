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
