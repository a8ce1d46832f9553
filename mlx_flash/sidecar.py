"""Files written beside a store after conversion (predictors, the neuron profile):
a safetensors file and its JSON manifest, which names the weights' SHA-256."""

import hashlib
import json
import os
from pathlib import Path
from typing import Dict

import mlx.core as mx


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sidecar(
    store: Path,
    weights_name: str,
    manifest_name: str,
    tensors: Dict[str, mx.array],
    manifest: dict,
) -> None:
    """Write `tensors` and `manifest` (with the tensors' ``weights_sha256`` added)
    into `store` under temporary names, renamed into place, the manifest last: a
    reader sees both files or the ones before."""
    store = Path(store)
    tmp_w = store / ("tmp." + weights_name)  # save_safetensors keeps this suffix
    tmp_m = store / (manifest_name + ".tmp")
    try:
        mx.save_safetensors(str(tmp_w), tensors)
        body = {**manifest, "weights_sha256": sha256_file(tmp_w)}
        tmp_m.write_text(json.dumps(body, indent=1))
        os.replace(tmp_w, store / weights_name)
        os.replace(tmp_m, store / manifest_name)
    finally:
        for t in (tmp_w, tmp_m):
            t.unlink(missing_ok=True)
