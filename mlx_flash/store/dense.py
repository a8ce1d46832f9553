"""A plain mlx-lm directory from a store: its dense part plus its own FFN, dequantized.

The exactness reference for quantized bundles (re-quantizing `down` per neuron changes
the weights, so the original checkpoint is not the reference), and the baseline that
benchmarks run through mlx-lm.
"""

import json
import shutil
from pathlib import Path
from typing import Union

import mlx.core as mx

from .archs import ffn_arch
from .convert import _staged
from .format import DENSE_NAME, dequantize
from .sources import TOKENIZER_FILES
from .store import BundleStore


def export_dense(
    store_path: Union[str, Path], out: Union[str, Path], dtype=mx.float32
) -> Path:
    """Write `out`, an mlx-lm model directory with the store's weights, FFN in `dtype`."""
    store_path, out = Path(store_path), Path(out)
    store = BundleStore(store_path)
    config = json.loads((store_path / "config.json").read_text())
    arch, m = ffn_arch(config, store_path), store.manifest
    weights = mx.load(str(store_path / DENSE_NAME))
    for i in range(store.num_layers):
        rows = store.read_layer(i, dtype)
        for name in m.rows + [m.column]:
            w = dequantize(rows[name], m.hidden_size).astype(dtype)
            weights[arch.name(i, name) + ".weight"] = w.T if name == m.column else w
            if name + ".bias" in rows:
                weights[arch.name(i, name) + ".bias"] = rows[name + ".bias"].reshape(-1)
        mx.eval(weights)
    store.close()
    with _staged(out, overwrite=False) as tmp:
        mx.save_safetensors(str(tmp / DENSE_NAME), weights, metadata={"format": "mlx"})
        for name in ("config.json",) + TOKENIZER_FILES:
            if (store_path / name).is_file():
                shutil.copy(store_path / name, tmp / name)
    return out
