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
from typing import Dict, List, Optional, Tuple, Union

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
    COLUMNS,
    DENSE_NAME,
    HEADER_BYTES,
    MANIFEST_NAME,
    Encoding,
    Extension,
    LayerEntry,
    Manifest,
    Section,
    Weight,
    align_up,
    layer_dict,
    pack_columns_header,
    pack_header,
)
from .safety import check_safetensors, clean_config
from .components import channel_columns, dense_origins, encode_component
from .sources import Source, open_source
from .staging import _staged

LAYOUTS = ("bundled", "split", "gate", "columns", "planar")
# each part of each component in its own section (format 3): a run of neurons (or of
# channels) read into the staging buffer is the matrix computed from
PLANAR = ("planar", "columns")


def convert(
    source: Union[str, Path],
    out: Union[str, Path],
    ffn_format: str = "auto",
    down_format: str = "auto",
    group_size: Optional[int] = None,
    layout: str = "planar",
    dense_out: Optional[Union[str, Path]] = None,
    overwrite: bool = False,
    revision: Optional[str] = None,
    progress: bool = True,
    dtype: Optional[str] = None,
    quantization: Optional[dict] = None,
    dequantize: bool = False,
    column_format: str = "auto",
    dense_format: str = "auto",
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
        layout: ``planar`` (the default: each part of each component in its own
            run, so the exact default computes a streamed layer from the buffer it
            was read into), ``bundled`` (one read brings a neuron's every component:
            for the sparse selectors), ``split`` (each component in its own run: the
            no-bundling ablation), ``gate``
            (gate/fc1 rows apart, for the ``gate`` selector) or ``columns`` (planar
            rows, and gate/up also by input channel, planar too, for the ``input``
            selector: docs/FORMAT.md §7.1).
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
        column_format: with ``layout="columns"``, the encoding of the gate/up
            columns (re-quantized along the neuron axis where quantized): ``auto``
            is a float model's own dtype, or for quantized rows one bit more than
            theirs (`components.column_bits`), or one of `FFN_FORMATS`.
        dense_format: the dense tensors a GGUF holds in a type with no exact MLX
            form: ``auto`` (Q6_K re-quantized to affine q6 g32, the others kept as
            floats), ``float`` (all kept as floats) or ``q4``/``q5``/``q6``/``q8``
            (all re-quantized): `quantize.requantize_dense`. With ``dequantize``,
            ``auto`` keeps them as floats.

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
    formats = ("ffn_format", ffn_format), ("down_format", down_format)
    for name, fmt in formats + (("column_format", column_format),):
        if fmt != "auto":
            Encoding.parse(fmt, group_size)  # a bad name fails before any read
    from .quantize import check_dense_format, requantize_dense

    check_dense_format(dense_format)
    if dequantize and dense_format not in ("auto", "float"):
        raise FlashError(
            f"dequantize and dense_format={dense_format!r} ask for opposite things",
            fix="drop one of them",
        )
    src = open_source(source, revision, **({"float_dtype": dtype} if dtype else {}))
    if dtype is not None or quantization is not None or dequantize:
        from .quantize import cast_source, dequantize_source, quantize_source

        src = cast_source(src, dtype) if dtype is not None else src
        src = dequantize_source(src, dtype) if dequantize else src
        src = quantize_source(src, **quantization) if quantization else src
    if not dequantize:  # asked for floats: a dense Q6_K stays float too
        src = requantize_dense(src, dense_format)
    arch = ffn_arch(src.config, src.path)
    try:
        with contextlib.ExitStack() as stack:  # both written, or neither
            tmp = stack.enter_context(_staged(out, overwrite))
            manifest = write_store(
                tmp,
                src,
                arch,
                (ffn_format, down_format, group_size, column_format),
                layout,
                progress,
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
            f"free space on {disk_of(out)} and run the conversion again"
            if full
            else f"check the free space on {disk_of(out)} and that the output "
            "directory is writable, then run the conversion again",
        ) from None
    if progress:
        for line in manifest.lossy_steps():
            print(f"[mlx_flash] lossy: {line}", flush=True)
    return out


def disk_of(path: Path) -> str:
    """The filesystem `path` is written to, for a user to free: its mount point,
    device and free bytes ("the filesystem mounted at /data (/dev/sdb1; 12.0 MiB
    free)")."""
    at = Path(path).absolute()
    while not at.exists() and at != at.parent:
        at = at.parent
    mount, device = at, None
    try:
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == str(mount):
                device = fields[0]
        free = shutil.disk_usage(at).free
    except OSError:
        return f"the disk holding {at}"
    dev = f"{device}; " if device else ""
    return f"the filesystem mounted at {mount} ({dev}{free / 2**20:.1f} MiB free)"


def write_store(
    path: Path,
    src: Source,
    arch: FFNArch,
    formats: Tuple[str, str, Optional[int], str],
    layout: str,
    progress: bool,
) -> Manifest:
    """Write every file of a store into the (empty) directory `path`: the FFN
    bundles layer by layer, the dense part, then the extensions (the columns, with
    ``layout="columns"``; the block checksums) and the header. `formats`: the
    rows', down's and columns' formats and the group size (`convert`'s)."""
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
    if layout == "columns" and (len(arch.rows) != 2 or _row_biases(dense, arch)):
        raise FlashError(
            "--layout columns is for gated FFNs (gate_proj and up_proj) without biases",
            src.path,
            "use --layout bundled for this model",
        )
    at = HEADER_BYTES
    columns = [] if layout == "columns" else None  # per layer: (entry, bytes file)
    with open(path / BUNDLES_NAME, "wb") as f:
        f.write(b"\0" * HEADER_BYTES)
        for i in tqdm(
            range(n_layers), desc="converting FFN", unit="layer", disable=not progress
        ):
            components, data = {}, {}
            weights = layer_weights(dense, arch, i)
            for name, w in weights.items():
                origin = src.origins.get(arch.name(i, name.removesuffix(".bias")))
                components[name], data[name] = encode_component(
                    name, w, arch, hidden, n_ff, formats[:3], origin
                )
            if columns is not None:
                columns.append(
                    _spill(
                        path, i, channel_columns(weights, arch, src, i, formats, hidden)
                    )
                )
            sections = []
            for group in layout_sections(list(components), arch.rows[0], layout):
                block = np.concatenate([data[n] for n in group], axis=1)
                for part, piece in section_parts(components[group[0]], block, layout):
                    at = align_up(at)
                    f.seek(at)
                    f.write(np.ascontiguousarray(piece).tobytes())
                    sections.append(Section(group, at, piece.shape[1], part))
                    at += piece.nbytes
            manifest.layers.append(LayerEntry(n_ff, components, sections))
            del data
        _write_model_dir(path, _store_config(config, arch), dense, src.tokenizer_files)
        manifest.dense = dense_origins(src, dense)
        if columns is not None:
            at = _write_columns(f, manifest, columns, align_up(at))
        # the checksums cover the bundles up to their own table, and the dense part
        table_at = align_up(at)
        dense_bytes = (path / DENSE_NAME).stat().st_size
        blocks = table_at // ALIGN + -(-dense_bytes // ALIGN)
        ext = Extension("checksums", table_at, 8 * blocks)
        manifest.extensions = manifest.extensions + [ext]
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


def layout_sections(order: List[str], first: str, layout: str) -> List[List[str]]:
    """Components per section: ``bundled`` one section; ``split`` and the planar
    layouts one per component (the no-bundling ablation; planar then splits each
    into its parts: `section_parts`; ``columns`` is planar, so the ``input``
    selector reads the output projection's rows alone); ``gate`` the first row
    (gate/fc1, with its bias) apart, so it can stay resident while the rest of each
    bundle is read on demand."""
    if layout == "bundled":
        return [order]
    if layout == "split" or layout in PLANAR:
        return [[n] for n in order]
    head = [n for n in order if n in (first, first + ".bias")]
    return [head, [n for n in order if n not in head]]


def section_parts(component, block: np.ndarray, layout: str) -> list:
    """``(part, bytes)`` of each section a group's bundles `block` (n, bytes) makes:
    the whole block (part None), or with a planar layout one section per part of
    its one `component` (packed words, scales, biases: each a row-major matrix as
    computed with, so a run of neurons is read straight into the buffer it is
    computed from, docs/FORMAT.md §3)."""
    if layout not in PLANAR:
        return [(None, block)]
    names, sizes = zip(*component.parts)
    return list(zip(names, np.split(block, np.cumsum(sizes)[:-1], axis=1)))


def _row_biases(weights: Dict[str, mx.array], arch: FFNArch) -> bool:
    return any(arch.name(0, r) + ".bias" in weights for r in arch.rows)


def _spill(path: Path, i: int, encoded) -> tuple:
    """Layer `i`'s encoded columns, to a scratch file until the layers are written
    (an extension follows them): (components, file, bundle bytes)."""
    components, block = encoded
    scratch = path / f".columns-{i}.tmp"
    scratch.write_bytes(block.tobytes())
    return components, scratch, block.shape[1]


def _write_columns(f, manifest: Manifest, columns: list, start: int) -> int:
    """The columns extension at `start` (§7.1): its header block, then each layer's
    channel bundles, planar (each part of each component a section: a run of
    channels read is the matrix computed from); returns its end."""
    hidden, layers, at = manifest.hidden_size, [], start + HEADER_BYTES
    for components, scratch, width in columns:
        block = np.fromfile(scratch, np.uint8).reshape(hidden, width)
        scratch.unlink()
        sections, first = [], 0
        for name, c in components.items():
            own = block[:, first : first + c.nbytes]
            for part, piece in section_parts(c, own, "columns"):
                at = align_up(at)
                f.seek(at)
                f.write(np.ascontiguousarray(piece).tobytes())
                sections.append(Section([name], at, piece.shape[1], part))
                at += piece.nbytes
            first += c.nbytes
        layers.append(LayerEntry(hidden, components, sections))
    ext = Extension(COLUMNS, start, at - start, required=False)
    ext.meta = {"layers": [layer_dict(l) for l in layers]}
    manifest.extensions = [ext]
    f.seek(start)
    f.write(pack_columns_header(manifest))
    return at


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
    """config.json of the store: Hugging Face-valid, without FFN entries in its quant
    map."""
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
    """`None` values break config loading under transformers 5: drop them,
    recursively."""
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
