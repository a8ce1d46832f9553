"""Write a bundle store (or a dense mlx-lm directory) from any supported source.

Every write goes into a hidden temporary directory beside the target, renamed into place
only when complete: an error, a full disk or Ctrl-C at any point leaves nothing behind.
A process killed outright (SIGKILL, power loss) cannot clean up: the next conversion
into the same place removes what such a process left.
"""

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from ..errors import FlashError
from .aligned_safetensors import write_aligned
from .archs import FFNArch, ffn_arch
from .checksums import build_table
from .format import (
    ALIGN,
    BUNDLES_NAME,
    DENSE_NAME,
    DTYPE_NAMES,
    FLOAT_DTYPES,
    HEADER_BYTES,
    MANIFEST_NAME,
    Component,
    Encoding,
    Extension,
    LayerEntry,
    Manifest,
    Origin,
    Section,
    Weight,
    align_up,
    dequantize,
    encode,
    pack_header,
    quant_params,
    to_bytes,
)
from .safety import check_safetensors, clean_config
from .sources import Source, open_source

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
    dtype: Optional[str] = None,
    quantization: Optional[dict] = None,
    dequantize: bool = False,
) -> Path:
    """Convert a model into a flash bundle store.

    Args:
        source: a Hugging Face or MLX model directory, a hub id, or a .gguf file.
        out: the store directory to create.
        ffn_format: bundle encoding of gate/up/fc1 rows: ``auto`` (the source's own,
            layer by layer: its float dtype, or its quantization kept bit for bit),
            or one of `FFN_FORMATS` (``float16``, ``q4``, ``mxfp4``, ...).
        down_format: encoding of the down/fc2 columns; ``auto`` is the source's own
            for a float source, and ``q8`` (affine, per neuron) for a quantized one,
            whose columns must be re-laid per neuron (a named lossy step;
            ``float32`` keeps them exact, ``float16`` within its rounding).
        group_size: group size for ``q1``-``q8`` (default 64; the source's for a
            quantized source).
        layout: ``bundled`` (one read brings a neuron's every component), ``split``
            (each component in its own run: the no-bundling ablation) or ``gate``
            (gate/fc1 rows apart, for the ``gate`` selector).
        dense_out: also write a plain mlx-lm directory holding exactly the values
            the store computes with (its reference).
        overwrite: replace an existing ``out``.
        revision: hub revision, for a hub id.
        progress: show a progress bar and the lossy steps taken.
        dtype: float dtype of the non-quantized tensors (mlx-lm's ``dtype``); GGUF
            types with no exact MLX form are dequantized to it (default float16).
        quantization: quantize the source first, as mlx-lm's convert does:
            ``{"bits", "group_size", "mode", "predicate"}``.
        dequantize: turn a quantized source into floats first (mlx-lm's
            ``dequantize``), in `dtype` or its scales' dtype.

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
    for name, fmt in (("ffn_format", ffn_format), ("down_format", down_format)):
        if fmt != "auto":
            Encoding.parse(fmt, group_size)  # a bad name fails before any read
    src = open_source(source, revision, **({"float_dtype": dtype} if dtype else {}))
    if dtype is not None or quantization is not None or dequantize:
        from .quantize import cast_source, dequantize_source, quantize_source

        src = cast_source(src, dtype) if dtype is not None else src
        src = dequantize_source(src, dtype) if dequantize else src
        src = quantize_source(src, **quantization) if quantization else src
    arch = ffn_arch(src.config, src.path)
    try:
        with contextlib.ExitStack() as stack:  # both written, or neither
            tmp = stack.enter_context(_staged(out, overwrite))
            manifest = write_store(
                tmp, src, arch, ffn_format, down_format, group_size, layout, progress
            )
            if dense_out:
                from .dense import export_dense

                dense_tmp = stack.enter_context(_staged(targets[1], overwrite))
                export_dense(tmp, dense_tmp)
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
    if progress:
        for line in manifest.lossy_steps():
            print(f"[mlx_flash] lossy: {line}", flush=True)
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
) -> Manifest:
    """Write every file of a store into the (empty) directory `path`: the FFN
    bundles layer by layer, the dense part, then the block checksums and header."""
    config, dense = src.config, dict(src.weights)
    n_layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    n_ff = int(config.get("intermediate_size") or config.get("ffn_dim"))
    manifest = Manifest(
        architecture=config["model_type"],
        activation=arch.activation(config),
        rows=list(arch.rows),
        column=arch.column,
        hidden_size=hidden,
        intermediate_size=n_ff,
        layout=layout,
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
            components, data = {}, {}
            formats = (ffn_format, down_format, group_size)
            for name, w in layer_weights(dense, arch, i).items():
                origin = src.origins.get(arch.name(i, name.removesuffix(".bias")))
                components[name], data[name] = encode_component(
                    name, w, arch, hidden, n_ff, formats, origin
                )
            sections = []
            for group in layout_sections(list(components), arch.rows[0], layout):
                block = np.concatenate([data[n] for n in group], axis=1)
                at = align_up(at)
                f.seek(at)
                f.write(block.tobytes())
                sections.append(Section(group, at, block.shape[1]))
                at += block.nbytes
            manifest.layers.append(LayerEntry(n_ff, components, sections))
            del data
        _write_model_dir(path, _store_config(config, arch), dense, src.tokenizer_files)
        manifest.dense = dense_origins(src, dense)
        # the checksums cover the bundles up to their own table, and the dense part
        table_at = align_up(at)
        dense_bytes = (path / DENSE_NAME).stat().st_size
        blocks = table_at // ALIGN + -(-dense_bytes // ALIGN)
        ext = Extension("checksums", table_at, 8 * blocks)
        manifest.extensions = [ext]
        manifest.file_bytes = align_up(table_at + ext.bytes)
        f.truncate(manifest.file_bytes)
        f.seek(0)
        f.write(pack_header(manifest))
        f.flush()
        ranges = [
            {"file": BUNDLES_NAME, "start": 0, "stop": table_at},
            {"file": DENSE_NAME, "start": 0, "stop": dense_bytes},
        ]
        table, ext.meta = build_table(path, ranges)
        f.seek(table_at)
        f.write(table)
    manifest.validate(path / MANIFEST_NAME)
    (path / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def encode_rows(w: Weight, enc: Encoding, length: int) -> Tuple[np.ndarray, float]:
    """Rows of a component as their stored bytes (n, nbytes) uint8, and the largest
    |Δw| the encoding cost (0.0: exact)."""
    parts, error = encode(w, enc, length)
    return to_bytes(parts), error


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


def encode_component(
    name: str,
    w: Weight,
    arch: FFNArch,
    hidden: int,
    n_ff: int,
    formats: Tuple[str, str, Optional[int]],
    source: Optional[Origin],
) -> Tuple[Component, np.ndarray]:
    """One component of one layer as stored: its Component and bytes (n_ff, B) uint8.

    `w` is the source's own weight: a row projection (n_ff, hidden), the output
    projection (hidden, n_ff), whose columns become rows (paper §3.2), or a bias.
    """
    ffn_format, down_format, group_size = formats
    # quantized in the source, even when read as floats (GGUF types with no MLX form)
    quantized = isinstance(w, tuple) or not _float_kind(source)
    relaid = name == arch.column and quantized
    if name.endswith(".bias"):
        length, enc, rows = 1, Encoding("float32"), w.reshape(-1, 1)
    elif name == arch.column:
        fmt = down_format
        if fmt == "auto" and not quantized:
            fmt = ffn_format  # a float source's columns follow the rows' format
        length, enc = hidden, column_encoding(w, n_ff, fmt, group_size, quantized)
        rows = dequantize(w, n_ff).T  # a quantized source is re-laid per neuron
    else:
        length, rows = hidden, w
        enc = row_encoding(w, hidden, ffn_format, group_size)
    enc.parts(length)  # a group size that does not divide the rows: a FlashError
    data, error = encode_rows(rows, enc, length)
    source = source or Origin(describe(w, n_ff if name == arch.column else length))
    return Component(name, length, enc, stored_origin(source, enc, error, relaid)), data


def row_encoding(
    w: Weight, length: int, fmt: str, group_size: Optional[int]
) -> Encoding:
    """A row projection's encoding: ``auto`` keeps the source's, bit for bit."""
    source = quant_params(w, length) if isinstance(w, tuple) else None
    if fmt != "auto":
        return Encoding.parse(fmt, group_size or (source and source.group_size))
    if source is not None:
        return source
    if w.dtype not in DTYPE_NAMES:
        raise FlashError(
            f"unsupported weight dtype {w.dtype}",
            fix="use float16, bfloat16 or float32 weights",
        )
    return Encoding(DTYPE_NAMES[w.dtype])


def column_encoding(
    w: Weight, n_ff: int, fmt: str, group_size: Optional[int], quantized: bool
) -> Encoding:
    """The output projection's encoding. A quantized source's groups run along the
    neuron axis, so its columns cannot be kept: ``auto`` stores them per neuron as
    affine 8-bit with float16 scales in the source's group size (32 where it had
    none MLX takes: a named lossy step; ``float32`` keeps them exact)."""
    if not quantized:
        return row_encoding(w, n_ff, fmt, group_size)
    group = 32
    if isinstance(w, tuple) and quant_params(w, n_ff).group_size in (64, 128):
        group = quant_params(w, n_ff).group_size
    if fmt == "auto":
        return Encoding("float16", 8, group_size or group)
    return Encoding.parse(fmt, group_size or group)


def _float_kind(origin: Optional[Origin]) -> bool:
    """Whether a source tensor was stored as floats (F16, bfloat16, ...), not as a
    quantized type read back as floats."""
    floats = {"F64", "F32", "F16", "BF16", "float64", *FLOAT_DTYPES}
    return origin is None or origin.kind in floats


def stored_origin(source: Origin, enc: Encoding, error: float, relaid: bool) -> Origin:
    """A stored component's origin: the source's, plus this store's own step when it
    changed a value (`error` > 0)."""
    steps = [source.note] if source.note else []
    if relaid:
        steps.append(f"dequantized, transposed, stored per neuron as {enc.describe()}")
    elif error > 0:
        steps.append(f"stored as {enc.describe()}")
    exact = source.exact and error == 0
    return Origin(
        source.kind,
        exact,
        "; ".join(steps) if not exact else source.note,
        error if error > 0 else source.error,
    )


def describe(w: Weight, length: int) -> str:
    """A source tensor's type, in the words of `Origin.kind`."""
    if isinstance(w, tuple):
        return quant_params(w, length).describe()
    return DTYPE_NAMES.get(w.dtype, str(w.dtype).removeprefix("mlx.core."))


def dense_origins(src: Source, dense: Dict[str, mx.array]) -> Dict[str, Origin]:
    """The origin of every dense tensor (by base name), the source's where it has one."""
    q = src.config.get("quantization") or {}
    out = {}
    for base in sorted({k.rsplit(".", 1)[0] for k in dense}):
        if base in src.origins:
            out[base] = src.origins[base]
        elif base + ".scales" in dense:
            params = q.get(base) if isinstance(q.get(base), dict) else q
            mode = params.get("mode", "affine")
            bits = params.get("bits", 4)
            out[base] = Origin(f"{mode} q{bits} g{params.get('group_size', 64)}")
        else:
            t = dense.get(base + ".weight", dense.get(base + ".bias"))
            out[base] = Origin(describe(t, 1) if t is not None else "float")
    return out


def layer_weights(
    weights: Dict[str, mx.array], arch: FFNArch, i: int
) -> Dict[str, Weight]:
    """Pop layer `i`'s FFN from `weights`: each projection as the source holds it
    (float, or an MLX-quantized tuple) and each row projection's bias. The output
    projection's bias, one vector per layer, stays in `weights` (the dense part)."""
    names = arch.rows + (arch.column,)
    out = {name: _take(weights, arch.name(i, name)) for name in names}
    for name in arch.rows:
        bias = weights.pop(arch.name(i, name) + ".bias", None)
        if bias is not None:
            out[name + ".bias"] = bias
    return out


def _take(weights: Dict[str, mx.array], name: str, dry: bool = False) -> Weight:
    get = weights.get if dry else weights.pop
    if name + ".weight" not in weights:
        raise FlashError(
            f"the checkpoint has no tensor {name}.weight",
            fix="is it a complete checkpoint?",
        )
    if name + ".global_scale" in weights:
        raise FlashError(
            f"{name} is nvfp4 with a global scale, which MLX's quantized_matmul "
            "does not take",
            fix="convert from the float model",
        )
    if name + ".scales" in weights:
        parts = [name + ".weight", name + ".scales"]
        parts += [name + ".biases"] if name + ".biases" in weights else []
        return tuple(get(p) for p in parts)  # affine, or a float mode (no biases)
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
        write_aligned(path / DENSE_NAME, weights, metadata={"format": "mlx"})
        check_safetensors(path / DENSE_NAME)  # complete? (a full disk may cut it)
    except (RuntimeError, ValueError, FlashError) as e:  # a failed write
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
