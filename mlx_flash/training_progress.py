"""Training that survives an interruption: each layer's predictor is saved as it is
trained, and a run given the same arguments takes up where the last one stopped.

Training predictors on 128k tokens takes hours on a laptop CPU; a closed lid or a
Ctrl-C must not lose them. `Progress` keeps one directory beside the store's other
files, `predictors.partial/`: `run.json` (what the run was asked: the text's SHA-256,
the tokens, ranks, target and optimiser settings) and, per finished layer,
`layer-NNN.safetensors` with `layer-NNN.json` (its metrics), each written under a
temporary name and renamed, the metrics last. A new run with the same arguments loads
the finished layers and trains the rest (earlier layers still run, densely, to bring
the text's hidden states to the first unfinished one: minutes, not hours); one with
other arguments is refused, naming the flag that discards the progress. The final
save removes the directory.
"""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .errors import FlashError
from .predictor import LayerMetrics, Predictor

PARTIAL_NAME = "predictors.partial"
VERSION = 1


class Progress:
    """The finished layers of one training run, in `store`/predictors.partial.

    Args:
        store: the store directory.
        run: what the run was asked (JSON-able); a different one refuses to resume.
        restart: discard any progress first.
    """

    def __init__(self, store: Path, run: dict, restart: bool = False):
        self.path = Path(store) / PARTIAL_NAME
        self.run = {"version": VERSION, **run}
        if restart and self.path.exists():
            shutil.rmtree(self.path)
        saved = self.path / "run.json"
        if saved.is_file():
            try:
                before = json.loads(saved.read_text())
            except (OSError, ValueError):
                before = None
            if before != self.run:
                differ = sorted(
                    k
                    for k in set(self.run) | set(before or {})
                    if (before or {}).get(k) != self.run.get(k)
                )
                raise FlashError(
                    "an interrupted training of other arguments is in progress "
                    f"(they differ in: {', '.join(differ) or 'its record'})",
                    self.path,
                    "give the same arguments to resume it, or --restart to discard it",
                )
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            _write(saved, json.dumps(self.run, indent=1).encode())

    def finished(self) -> int:
        """How many layers are saved (layers 0 .. n - 1)."""
        n = 0
        while (self.path / f"layer-{n:03d}.json").is_file():
            n += 1
        return n

    def load(
        self, layer: int, dims: int, neurons: int, activation: str
    ) -> Optional[Tuple[Predictor, LayerMetrics]]:
        """Layer `layer`'s saved predictor and metrics, or None if not saved."""
        meta = self.path / f"layer-{layer:03d}.json"
        if not meta.is_file():
            return None
        weights = self.path / f"layer-{layer:03d}.safetensors"
        try:
            metrics = LayerMetrics(**json.loads(meta.read_text()))
            p = Predictor(dims, metrics.rank, neurons, activation)
            p.load_weights(str(weights))
        except (OSError, ValueError, TypeError) as e:
            raise FlashError(
                f"layer {layer}'s saved progress cannot be read ({e})",
                weights,
                "--restart to discard the progress and train again",
            ) from None
        return p, metrics

    def save(self, layer: int, p: Predictor, metrics: LayerMetrics) -> None:
        weights = self.path / f"layer-{layer:03d}.safetensors"
        tmp = self.path / f"tmp.layer-{layer:03d}.safetensors"
        try:
            mx.save_safetensors(str(tmp), dict(nn.utils.tree_flatten(p.parameters())))
            os.replace(tmp, weights)
        finally:
            tmp.unlink(missing_ok=True)
        meta = json.dumps(asdict(metrics)).encode()
        _write(self.path / f"layer-{layer:03d}.json", meta)  # last: the layer is done

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
