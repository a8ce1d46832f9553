"""Model sources the converter reads: a Hugging Face or MLX directory, a hub id, a GGUF
file.

Every source becomes the same thing: a Hugging Face config dict, weights under Hugging
Face names (quantized ones as MLX affine triples), and tokenizer files.
"""

import functools
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
    path_or_repo: Union[str, Path],
    revision: Optional[str] = None,
    float_dtype: str = "float16",
) -> Source:
    """Read a model from a local directory, a GGUF file or a Hugging Face hub id."""
    path = locate(path_or_repo, revision)
    if path.is_file() and path.suffix == ".gguf":
        return _open_gguf(path, float_dtype)
    if path.is_dir():
        return _open_dir(path)
    raise FlashError(
        "not a model: expected a directory with config.json and safetensors, or a "
        ".gguf file",
        path,
    )


def locate(path_or_repo: Union[str, Path], revision: Optional[str] = None) -> Path:
    """The local file or directory a user named, or a hub id's downloaded snapshot.

    Only an ``owner/name`` id goes to the hub; anything else that does not exist is a
    FlashError ("no such file or directory") naming the path, never a hub lookup.
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    if _looks_like_repo(str(path_or_repo)):
        return download(str(path_or_repo), revision)
    raise FlashError(
        "no such file or directory",
        path.absolute(),
        "check the path (a hub id is owner/name, e.g. "
        "mlx-community/SmolLM2-135M-Instruct-8bit)",
    )


def download(repo: str, revision: Optional[str] = None) -> Path:
    """Fetch a hub repository's config, tokenizer and safetensors (or find it cached).

    Raises:
        FlashError: that is also the exception huggingface_hub raised
            (`RepositoryNotFoundError`, `GatedRepoError`, `RevisionNotFoundError`,
            `LocalEntryNotFoundError`, ...), so that code written for mlx-lm, which
            lets those through, still catches it.
    """
    import huggingface_hub

    try:
        snapshot = huggingface_hub.snapshot_download(
            repo, revision=revision, allow_patterns=HUB_PATTERNS
        )
    except Exception as e:  # offline, unknown repo, gated repo: all the same to a user
        at = f" at revision {revision!r}" if revision else ""
        raise hub_error(
            e,
            f"cannot get {repo!r}{at} from the Hugging Face hub "
            f"({type(e).__name__}: {e})",
            f"no local file or directory {repo!r} exists either: check the repo id, "
            "the revision, your access (huggingface-cli login) and the network, or "
            "pass a local directory or .gguf file",
        ) from None
    return Path(snapshot)


def hub_error(error: Exception, message: str, fix: str) -> FlashError:
    """A FlashError that is also an instance of `error`'s class, with its state.

    The hub's constructors want HTTP responses, so the instance is made without them:
    it takes `error`'s attributes, and FlashError's message, path, fix and text.
    """
    plain = FlashError(message, fix=fix)
    try:
        cls = _flash_class(type(error))
        flash = cls.__new__(cls)
    except TypeError:  # a class that cannot be combined with FlashError
        return plain
    flash.__dict__.update(error.__dict__)
    flash.__dict__.update(plain.__dict__)
    flash.args = plain.args
    if isinstance(error, OSError):
        flash.errno, flash.strerror, flash.filename = (
            error.errno,
            error.strerror,
            error.filename,
        )
    return flash


@functools.cache
def _flash_class(cls: type) -> type:
    """`Flash<Name>`: a subclass of both FlashError and the exception class `cls`,
    whose text is FlashError's (OSError's would print only its errno)."""
    if issubclass(cls, FlashError):
        return cls
    return type(
        f"Flash{cls.__name__}",
        (FlashError, cls),
        {"__module__": FlashError.__module__, "__str__": BaseException.__str__},
    )


# file names, never hub ids: "org/model.gguf" is a local path that does not exist
FILE_SUFFIXES = frozenset(
    {".gguf", ".safetensors", ".json", ".bin", ".pt", ".pth", ".ckpt", ".pkl"}
    | {".npz", ".npy", ".onnx", ".h5", ".txt", ".model", ".msgpack", ".gz", ".zip"}
)


def _looks_like_repo(text: str) -> bool:
    """True for a hub id ``owner/name``: one slash, hub characters, no file suffix."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1 or text.startswith((".", "~")) or "\\" in text:
        return False
    if Path(text).suffix.lower() in FILE_SUFFIXES:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return all(text.split("/"))


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
                f"only PyTorch pickle weights ({Path(pickles[0]).name}): "
                "mlx_flash never loads pickles, since they can run code",
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


def _open_gguf(path: Path, float_dtype: str = "float16") -> Source:
    from .gguf_file import read_gguf

    g = read_gguf(path, float_dtype)
    files = {
        k: v.encode() if isinstance(v, str) else v for k, v in g.tokenizer_files.items()
    }
    weights = normalize_names(g.config, g.weights)  # renames OPT only: not a GGUF arch
    return Source(path, "gguf", g.config, weights, files, g.origins)


def normalize_names(config: dict, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Weight names as Hugging Face's *ForCausalLM saves them, unused buffers
    dropped."""
    out = {}
    for k, v in weights.items():
        if "rotary_emb.inv_freq" in k:
            continue
        if config.get("model_type") == "opt" and k.startswith("decoder."):
            k = "model." + k
        out[k] = v
    return out
