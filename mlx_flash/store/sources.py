"""Model sources the converter reads: a Hugging Face or MLX directory, a hub id, a GGUF file.

Every source becomes the same thing: a Hugging Face config dict, weights under Hugging
Face names (quantized ones as MLX affine triples), and tokenizer files.
"""

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import mlx.core as mx

from ..errors import FlashError
from .encoding import Origin  # noqa: F401  (re-exported: sources fill it)
from .safety import check_safetensors, read_json_object

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass
class Source:
    path: Path
    kind: str  # "hf" (float safetensors), "mlx" (MLX-quantized safetensors) or "gguf"
    config: dict
    weights: Dict[str, mx.array]
    tokenizer_files: Dict[str, bytes] = field(default_factory=dict)
    # keyed by tensor base name ("model.layers.0.mlp.gate_proj": no .weight/.scales)
    origins: Dict[str, Origin] = field(default_factory=dict)


def open_source(
    path_or_repo: Union[str, Path], revision: Optional[str] = None
) -> Source:
    """Read a model from a local directory, a GGUF file or a Hugging Face hub id."""
    path = Path(path_or_repo).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _open_gguf(path)
    if path.is_dir():
        return _open_dir(path)
    if path.exists():
        raise FlashError(
            "not a model: expected a directory with config.json and safetensors, or a .gguf file",
            path,
        )
    if _looks_like_repo(str(path_or_repo)):
        return _open_dir(download(str(path_or_repo), revision))
    raise FlashError(
        "no such file or directory", path, "check the path or give a hub id (org/name)"
    )


def download(repo: str, revision: Optional[str] = None) -> Path:
    """Fetch a hub repository's config, tokenizer and safetensors (or find it cached)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS)
        )
    except Exception as e:  # offline, unknown repo, gated repo: all the same to a user
        raise FlashError(
            f"cannot get {repo!r} from the Hugging Face hub ({type(e).__name__}: {e})",
            fix="check the repo id and the network, or pass a local directory or .gguf file",
        ) from None


def _looks_like_repo(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def _open_dir(path: Path) -> Source:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FlashError("no config.json: not a Hugging Face model directory", path)
    config = read_json_object(config_path, "use the model's original config.json")
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        pickles = [p for pat in PICKLES for p in glob.glob(str(path / pat))]
        if pickles:
            raise FlashError(
                f"only PyTorch pickle weights ({Path(pickles[0]).name}): mlx_flash never "
                "loads pickles, since they can run code",
                path,
                "use the model's safetensors release, or convert it with "
                "transformers' save_pretrained(safe_serialization=True)",
            )
        raise FlashError("no .safetensors weights", path)
    weights = {}
    for f in files:
        check_safetensors(f, "download the model again (an incomplete download?)")
        try:
            weights.update(mx.load(f))
        except Exception as e:
            raise FlashError(f"cannot read the safetensors file ({e})", f) from None
    weights = normalize_names(config, weights)
    kind = "mlx" if "quantization" in config else "hf"
    tokenizer = {
        n: (path / n).read_bytes() for n in TOKENIZER_FILES if (path / n).is_file()
    }
    return Source(path, kind, config, weights, tokenizer)


def _open_gguf(path: Path) -> Source:
    from .gguf import read_gguf

    g = read_gguf(path)
    files = {
        k: v.encode() if isinstance(v, str) else v for k, v in g.tokenizer_files.items()
    }
    return Source(path, "gguf", g.config, normalize_names(g.config, g.weights), files)


def normalize_names(config: dict, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Weight names as Hugging Face's *ForCausalLM saves them, unused buffers dropped."""
    out = {}
    for k, v in weights.items():
        if "rotary_emb.inv_freq" in k:
            continue
        if config.get("model_type") == "opt" and k.startswith("decoder."):
            k = "model." + k
        out[k] = v
    return out
