"""Write a bundle store (or a dense mlx-lm directory) from any supported source.

Every write goes into a hidden temporary directory beside the target, renamed into place
only when complete: an error, a full disk or Ctrl-C at any point leaves nothing behind.
A process killed outright (SIGKILL, power loss) cannot clean up: the next conversion
into the same place removes what such a process left.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..errors import FlashError
from .archs import FFNArch, ffn_arch
from .format import (
    BUNDLES_NAME,
    DENSE_NAME,
    HEADER_BYTES,
    MANIFEST_NAME,
    Component,
    Encoding,
    LayerEntry,
    Manifest,
    Section,
    Weight,
    align_up,
    dequantize,
    encode_rows,
    pack_header,
    quant_params,
)
from .safety import check_safetensors, clean_config
from .sources import Source, open_source

DTYPE_NAMES = {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}
LAYOUTS = ("bundled", "split", "gate")


def convert(
    source: Union[str, Path],
    out: Union[str, Path],
    ffn_format: str = "auto",
    down_format: str = "auto",
    group_size: Optional[int] = None,
    layout: str = "bundled",
    dense_out: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    revision: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """Convert a model into a flash bundle store.

    Args:
        source: a Hugging Face or MLX model directory, a hub id, or a .gguf file.
        out: the store directory to create.
        ffn_format: bundle encoding of gate/up/fc1 rows: ``auto`` (the source's own:
            its float dtype, or its quantization kept without re-quantizing),
            ``float16``, ``bfloat16``, ``float32``, ``q4`` or ``q8``.
        down_format: encoding of the down/fc2 columns; ``auto`` is ``ffn_format``, or
            ``q8`` for a quantized source (its columns must be re-quantized per neuron).
        group_size: quantization group size for ``q4``/``q8`` (default 64; 32 for
            quantized sources).
        layout: ``bundled`` (one read brings a neuron's every component), ``split``
            (each component in its own run: the no-bundling ablation) or ``gate``
            (gate/fc1 rows apart, for the ``gate`` selector).
        dense_out: also write a plain mlx-lm directory of the same weights here.
        overwrite: replace an existing ``out``.
        revision: hub revision, for a hub id.
        progress: show a progress bar.

    Returns:
        The store path.
    """
    out = Path(out).expanduser()
    targets = [out] + ([Path(dense_out).expanduser()] if dense_out else [])
    for t in targets:
        if t.exists() and not overwrite:
            raise FlashError(
                "the output already exists",
                t,
                "pass --overwrite or choose another path",
            )
    if layout not in LAYOUTS:
        raise FlashError(
            f"unknown layout {layout!r}", fix="use " + " or ".join(LAYOUTS)
        )
    src = open_source(source, revision)
    arch = ffn_arch(src.config, src.path)
    try:
        with contextlib.ExitStack() as stack:  # both written, or neither
            tmp = stack.enter_context(_staged(out, overwrite))
            if dense_out:
                dense_tmp = stack.enter_context(_staged(targets[1], overwrite))
                _write_model_dir(
                    dense_tmp, src.config, src.weights, src.tokenizer_files
                )
            write_store(
                tmp, src, arch, ffn_format, down_format, group_size, layout, progress
            )
    except OSError as e:  # the disk is full, the directory not writable, ...
        full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        name = f"{Path(e.filename).name}: " if e.filename else ""
        raise FlashError(
            f"writing the store failed ({name}{e.strerror or e}); nothing was left "
            "behind",
            out,
            "free some disk space and run the conversion again"
            if full
            else "check the free disk space and that the output directory is "
            "writable, then run the conversion again",
        ) from None
    return out


def write_store(
    path: Path,
    src: Source,
    arch: FFNArch,
    ffn_format: str,
    down_format: str,
    group_size: Optional[int],
    layout: str,
    progress: bool,
) -> None:
    """Write every file of a store into the (empty) directory `path`."""
    config, dense = src.config, dict(src.weights)
    n_layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    n_ff = int(config.get("intermediate_size") or config.get("ffn_dim"))
    sample = _take(dense, arch.name(0, arch.rows[0]), dry=True)
    row_enc, col_enc = choose_encodings(
        sample, hidden, ffn_format, down_format, group_size
    )
    components = {name: Component(name, hidden, row_enc) for name in arch.rows}
    components[arch.column] = Component(arch.column, hidden, col_enc)
    for name in arch.rows:
        if arch.name(0, name) + ".bias" in dense:
            components[name + ".bias"] = Component(
                name + ".bias", 1, Encoding("float32")
            )
    order = list(components)
    groups = layout_sections(order, arch.rows[0], layout)

    manifest = Manifest(
        architecture=config["model_type"],
        activation=arch.activation(config),
        rows=list(arch.rows),
        column=arch.column,
        hidden_size=hidden,
        intermediate_size=n_ff,
        layout=layout,
        components=components,
        layers=[],
        out_bias=arch.name(0, arch.column) + ".bias" in dense,
        source={"path": str(src.path), "kind": src.kind},
    )
    at = HEADER_BYTES
    with open(path / BUNDLES_NAME, "wb") as f:
        f.write(b"\0" * HEADER_BYTES)
        for i in tqdm(
            range(n_layers), desc="converting FFN", unit="layer", disable=not progress
        ):
            rows = layer_rows(dense, arch, i, hidden, n_ff)
            sections = []
            for group in groups:
                data = np.concatenate(
                    [
                        encode_rows(
                            rows[n], components[n].encoding, components[n].length
                        )
                        for n in group
                    ],
                    axis=1,
                )
                at = align_up(at)
                f.seek(at)
                f.write(data.tobytes())
                sections.append(
                    Section(group, at, data.shape[1], hashlib.sha256(data).hexdigest())
                )
                at += data.nbytes
            manifest.layers.append(LayerEntry(data.shape[0], sections))
            del rows
        manifest.file_bytes = align_up(at)
        f.truncate(manifest.file_bytes)
        f.seek(0)
        f.write(pack_header(manifest))
    manifest.validate(path / MANIFEST_NAME)
    (path / MANIFEST_NAME).write_text(manifest.to_json())
    _write_model_dir(path, _store_config(config, arch), dense, src.tokenizer_files)


def layout_sections(order: List[str], first: str, layout: str) -> List[List[str]]:
    """Components per section: ``bundled`` one section; ``split`` one per component
    (the no-bundling ablation); ``gate`` the first row (gate/fc1, with its bias) apart,
    so it can stay resident while the rest of each bundle is read on demand."""
    if layout == "bundled":
        return [order]
    if layout == "split":
        return [[n] for n in order]
    head = [n for n in order if n in (first, first + ".bias")]
    return [head, [n for n in order if n not in head]]


def choose_encodings(
    sample: Weight,
    hidden: int,
    ffn_format: str,
    down_format: str,
    group_size: Optional[int],
) -> Tuple[Encoding, Encoding]:
    """The row and column encodings for a source whose first row weight is `sample`."""
    quantized = isinstance(sample, tuple)
    if ffn_format == "auto":
        if quantized:
            bits, gs = quant_params(sample, hidden)
            scales = sample[1]
            scale_dtype = DTYPE_NAMES.get(scales.dtype, "float16")
            row = Encoding(scale_dtype, bits, gs)
            col = (
                Encoding(scale_dtype, 8, gs)
                if down_format == "auto"
                else Encoding.parse(down_format, gs, scale_dtype)
            )
            return row, col
        if sample.dtype not in DTYPE_NAMES:
            raise FlashError(
                f"unsupported weight dtype {sample.dtype}",
                fix="use float16, bfloat16 or float32 weights",
            )
        row = Encoding(DTYPE_NAMES[sample.dtype])
    else:
        row = Encoding.parse(ffn_format, group_size or (32 if quantized else 64))
    col = (
        row
        if down_format == "auto"
        else Encoding.parse(down_format, row.group_size or group_size or 64)
    )
    return row, col


def layer_rows(
    weights: Dict[str, mx.array], arch: FFNArch, i: int, hidden: int, n_ff: int
) -> Dict[str, Weight]:
    """Pop layer `i`'s FFN from `weights` as per-neuron rows: (n_ff, hidden) each.

    The down/fc2 weight (hidden, n_ff) is transposed so that a neuron's column becomes a
    row (paper §3.2); its bias, one vector per layer, stays in `weights` (the dense part).
    """
    rows = {name: _take(weights, arch.name(i, name)) for name in arch.rows}
    rows[arch.column] = dequantize(_take(weights, arch.name(i, arch.column)), n_ff).T
    for name in arch.rows:
        bias = weights.pop(arch.name(i, name) + ".bias", None)
        if bias is not None:
            rows[name + ".bias"] = bias.reshape(-1, 1)
    return rows


def _take(weights: Dict[str, mx.array], name: str, dry: bool = False) -> Weight:
    get = weights.get if dry else weights.pop
    if name + ".weight" not in weights:
        raise FlashError(
            f"the checkpoint has no tensor {name}.weight",
            fix="is it a complete checkpoint?",
        )
    if name + ".scales" in weights:
        if name + ".biases" not in weights:
            raise FlashError(
                f"{name} is quantized without biases (mxfp4/nvfp4?): only MLX affine "
                "quantization is supported",
                fix="convert from the float or affine-quantized model",
            )
        return get(name + ".weight"), get(name + ".scales"), get(name + ".biases")
    return get(name + ".weight")


def _store_config(config: dict, arch: FFNArch) -> dict:
    """config.json of the store: Hugging Face-valid, without FFN entries in its quant map."""
    config = dict(config)
    if isinstance(config.get("quantization"), dict):
        ffn = arch.rows + (arch.column,)
        config["quantization"] = {
            k: v
            for k, v in config["quantization"].items()
            if not (isinstance(v, dict) and k.rsplit(".", 1)[-1] in ffn)
        }
    return config


def drop_none(obj):
    """`None` values break config loading under transformers 5: drop them, recursively."""
    if isinstance(obj, dict):
        return {k: drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [drop_none(v) for v in obj if v is not None]
    return obj


def _write_model_dir(
    path: Path, config: dict, weights: Dict[str, mx.array], tokenizer: Dict[str, bytes]
) -> None:
    """Write the dense part, config and tokenizer files; configs lose any key asking
    to run the model's own code or naming a file outside (`safety.clean_config`)."""
    try:
        mx.save_safetensors(str(path / DENSE_NAME), weights, metadata={"format": "mlx"})
        check_safetensors(path / DENSE_NAME)  # complete? (a full disk may cut it)
    except (RuntimeError, FlashError) as e:  # how MLX reports a failed write
        raise OSError(errno.EIO, str(e), str(path / DENSE_NAME)) from None
    config = clean_config(drop_none(config), path)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name, data in tokenizer.items():
        if name == "tokenizer_config.json":
            data = _clean_json_bytes(data, path)
        (path / name).write_bytes(data)


def _clean_json_bytes(data: bytes, path: Path) -> bytes:
    try:
        d = json.loads(data)
    except ValueError:
        return data  # not ours to judge here: the tokenizer will refuse it
    if not isinstance(d, dict):
        return data
    clean = clean_config(d, path)
    return data if clean == d else json.dumps(clean, indent=2).encode()


@contextlib.contextmanager
def _staged(target: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `target`, renamed onto it only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FlashError("the output appeared while converting", target)
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale(target: Path) -> None:
    """Remove what a killed conversion into `target` left: temporary directories
    whose process no longer runs (their names end with its pid)."""
    for pattern in (f".{target.name}.partial-*", f".{target.name}.old-*"):
        for tmp in target.parent.glob(pattern):
            pid = tmp.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier failed attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
