"""`load`: mlx-lm's loader, with every layer's FFN replaced by a `FlashFFN` on the
store."""

import ctypes
import hashlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes, load_config, load_model, load_tokenizer

from . import parallel
from .budget import default_budget, parse_budget, resident_bytes
from .disk_embedding import DiskEmbedding
from .read_tuning import load_probe, reader_settings
from .errors import FlashError, ReadError
from .flash_setup import setup
from .kv_cache import DEFAULT_CONTEXT, bounded_caches, default_context, kv_cache_bytes
from .options import FlashOptions
from .sparse_ffn import FlashFFN
from .stats import FlashStats
from .streamed import dense_tensors, holding
from .store.format import DENSE_NAME
from .store.writer import convert
from .store.aligned_safetensors import without_pads
from .store.sources import locate
from .store.store import BundleStore, is_current, is_store, read_manifest


def get_classes(config: dict):
    """Model and ModelArgs classes: mlx-lm's, or ours where mlx-lm has none (OPT)."""
    if config.get("model_type") == "opt":
        from .models import opt

        return opt.Model, opt.ModelArgs
    return _get_classes(config)


def flash_classes(store: BundleStore, stats: FlashStats):
    """A `get_model_classes` for mlx-lm's `load_model` that builds FlashFFN layers.

    The FFN is replaced in the constructor, before any weight is loaded: mlx-lm's dense
    FFN weights are created lazily and never evaluated, so they never take memory.
    """

    def get_model_classes(config: dict):
        model_class, args_class = get_classes(config)

        class FlashModel(model_class):
            def __init__(self, args):
                super().__init__(args)
                for i, layer in enumerate(self.layers):
                    layer.mlp = FlashFFN(store, i, stats)

            def setup_flash(self, options, budget, tuning, config):
                """The compute dtype, the DRAM plan, what streams and every layer's
                selector and cache (`flash_setup.setup`), on weights not yet read;
                the model keeps them as attributes."""
                name = options.compute_dtype
                dtype = getattr(mx, name) if name else default_compute_dtype(self)
                self.set_dtype(dtype)
                parallel.set_threads(options.compute_threads)
                parallel.parallel_modules(self)
                self.flash_options = options
                if options.max_kv_size is None:
                    self.flash_context = default_context(self, budget)
                self.flash_plan = setup(
                    self,
                    store,
                    options,
                    dtype,
                    budget,
                    tuning.gap_bytes,
                    kv_cache_bytes(self),
                    options.max_kv_size or self.flash_context,
                    config,
                    stats,
                    tuning.threads,
                )
                table = disk_table(self)
                if isinstance(table, DiskEmbedding):
                    table.compute_dtype, table.stats = dtype, stats
                if budget is not None:  # MLX would keep freed buffers for reuse
                    # beside the next layer's (its cache held 58 MiB more than the
                    # plan on Qwen2.5-Coder-1.5B); without it: no measurable cost on
                    # the CPU backend (465-478 vs 485 ms/token)
                    mx.set_cache_limit(0)
                self.flash_tuning, self.flash_stats = tuning, stats
                self.flash_store = store

            def __call__(self, inputs: mx.array, cache=None, **kwargs):
                """mlx-lm's forward; a prompt longer than the plan's prefill step
                (with a cache to carry it) goes through in steps of that many tokens,
                each evaluated into the cache before the next, so one step's
                activations are what the plan holds whatever step the caller took
                (mlx-lm's default is 2,048 tokens)."""
                plan = getattr(self, "flash_plan", None)
                step = plan.prefill_step if plan is not None else None
                L = inputs.shape[1]
                if step is None or cache is None or kwargs or L <= step:
                    return super().__call__(inputs, cache=cache, **kwargs)
                out = []
                for a in range(0, L, step):
                    out.append(super().__call__(inputs[:, a : a + step], cache=cache))
                    mx.eval([c.state for c in cache])
                return mx.concatenate(out, axis=1)

            def make_cache(self, context: Optional[int] = None):
                """The model's KV caches, bounded by the context the plan holds
                (or `context` tokens)."""
                own = getattr(super(), "make_cache", None)
                base = own() if own else [KVCache() for _ in self.layers]
                limit = getattr(self, "flash_options", None)
                context = context or getattr(self, "flash_context", DEFAULT_CONTEXT)
                return bounded_caches(self, base, limit and limit.max_kv_size, context)

            def sanitize(self, weights):
                weights = without_pads(weights)  # the dense part's alignment
                if hasattr(super(), "sanitize"):
                    weights = super().sanitize(weights)
                return weights

        FlashModel.__name__ = FlashModel.__qualname__ = model_class.__name__
        return FlashModel, args_class

    return get_model_classes


def release_memory() -> None:
    """Hand the C allocator's free pages back to the OS. glibc keeps what a load freed
    (a Qwen tokenizer's load peaks ~110 MB above what it keeps, and RSS then varies by
    100 MB from run to run); macOS's allocator returns it by itself. The one
    OS-specific memory call."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


# what a fast tokenizer keeps only from its construction: the Python vocabulary and
# merges its Rust tokenizer was built from (transformers 5's Qwen2Tokenizer and kin)
BUILD_TABLES = ("_vocab", "_merges")


def drop_build_tables(tokenizer) -> None:
    """Free the Python copies of the tables a fast tokenizer was built from (Qwen's:
    48 of its 116 MiB). Encoding, decoding, `vocab` and chat templates go through its
    Rust tokenizer; a tokenizer without one keeps them."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # inside mlx-lm's wrapper
    if getattr(hf, "_tokenizer", None) is None:
        return
    for name in BUILD_TABLES:
        if isinstance(getattr(hf, name, None), (dict, list)):
            setattr(hf, name, None)


def disk_table(model: nn.Module):
    """The model's token embedding module (a DiskEmbedding when it stays on disk)."""
    inner = getattr(model, "model", None)
    inner = getattr(inner, "decoder", inner)  # OPT
    return getattr(inner, "embed_tokens", None)


def default_compute_dtype(model: nn.Module) -> mx.Dtype:
    """float32 on the CPU backend (its float16/bfloat16 kernels are pathologically
    slow); on a GPU (Metal), the model's own float dtype. The one device-specific
    choice."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    for _, p in nn.utils.tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return p.dtype
    return mx.float16


def cache_root() -> Path:
    if os.environ.get("MLX_FLASH_CACHE"):
        return Path(os.environ["MLX_FLASH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx_flash"


def resolve_store(
    path_or_hf_repo: Union[str, Path],
    revision: Optional[str] = None,
    progress: bool = True,
) -> Path:
    """A store path for a store, or for any source converted once into the cache."""
    path = Path(path_or_hf_repo).expanduser()
    if is_store(path):
        return path
    path = locate(path_or_hf_repo, revision).resolve()  # owner/name: from the hub
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(f"{path}|{stamp}".encode()).hexdigest()[:12]
    target = cache_root() / "stores" / f"{path.stem}-{key}"
    if not is_store(target) or not is_current(target):
        # (a store of an older format in the cache is converted again, from its source)
        if progress:
            print(f"[mlx_flash] converting {path} into {target} (once)", flush=True)
        try:
            convert(path, target, overwrite=target.exists(), progress=progress)
        except FlashError:
            if not is_current(target):  # another process may have finished it first
                raise
    return target


def load(
    path_or_hf_repo: str,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    *,
    options: Optional[FlashOptions] = None,
    progress: bool = True,
    **flash: Any,
) -> Union[
    Tuple[nn.Module, TokenizerWrapper],
    Tuple[nn.Module, TokenizerWrapper, Dict[str, Any]],
]:
    """Load a model whose FFN stays on the SSD, as `mlx_lm.load` loads a dense one.

    Args:
        path_or_hf_repo: a store, or a Hugging Face / MLX directory, hub id or .gguf
            file (converted into the cache on first use).
        tokenizer_config, model_config, adapter_path, lazy, return_config, revision,
            trust_remote_code: as in `mlx_lm.load`.
        options: the flash options (`FlashOptions`): how neurons are selected,
            cached and read, and the DRAM budget.
        progress: show conversion progress (and the DRAM plan).
        **flash: the same options as keywords instead (``selector="gate"``,
            ``dram_budget="2GiB"``, ``compute_dtype=mx.float32``, ...); see
            `FlashOptions` for each one's meaning and default.

    Returns:
        ``(model, tokenizer)``, or ``(model, tokenizer, config)`` with
        ``return_config``; the model carries ``flash_plan``, ``flash_stats``,
        ``flash_tuning`` and ``flash_store``.
    """
    options = flash_options(options, flash)
    if (model_config or {}).get("quantize_activations"):
        raise FlashError(
            "activation quantization does not apply: the FFN is computed from bundles",
            fix="drop --quantize-activations",
        )
    store_path = resolve_store(path_or_hf_repo, revision, progress)
    # checks config.json (and refuses model code) before anyone parses it
    manifest = read_manifest(store_path)
    # first: its load's transient peak then stacks on nothing the plan holds
    process = resident_bytes()
    tokenizer = load_tokenizer(
        store_path,
        {"trust_remote_code": trust_remote_code, **(tokenizer_config or {})},
        eos_token_ids=load_config(store_path).get("eos_token_id"),
    )
    drop_build_tables(tokenizer)
    release_memory()
    after = resident_bytes()
    model, config = load_flash_model(store_path, manifest, options, lazy, model_config)
    if process is not None and after is not None:  # what the plan cannot hold
        model.flash_plan.outside = {"process": process, "tokenizer": after - process}
    if progress and (options.dram_budget is not None or options.selector != "all"):
        print(model.flash_plan.describe(), flush=True)
    if adapter_path is not None:
        _load_adapters(model, adapter_path)
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def flash_options(
    options: Optional[FlashOptions], flash: Dict[str, Any]
) -> FlashOptions:
    """`load`'s options: given whole, or as keywords (an MLX dtype may name the
    compute dtype); every value is checked here, before anything is converted."""
    if options is not None and flash:
        raise FlashError(
            f"give the flash options either as options= or as keywords, not both "
            f"({', '.join(flash)})"
        )
    dtype = flash.get("compute_dtype")
    if isinstance(dtype, mx.Dtype):
        flash = {**flash, "compute_dtype": str(dtype).removeprefix("mlx.core.")}
    unknown = sorted(set(flash) - set(FlashOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"load() got unexpected keyword arguments {unknown}")
    return options or FlashOptions(**flash)


def load_flash_model(
    store_path: Path,
    manifest,
    options: FlashOptions,
    lazy: bool = False,
    model_config: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """mlx-lm's `load_model` on a store: the dense part loaded, every FFN a FlashFFN
    on the opened store, then the model's own flash setup (its plan and caches)."""
    bundle_bytes = manifest.layers[0].bundle_bytes()
    tuning = reader_settings(load_probe(store_path), bundle_bytes)
    if options.threads is not None:
        tuning = replace(
            tuning, threads=options.threads, source=tuning.source + "; threads given"
        )
    if options.gap is not None:
        tuning = replace(
            tuning,
            gap_bytes=options.gap * bundle_bytes,
            source=tuning.source + "; gap given",
        )
    store = BundleStore(
        store_path, tuning.threads, options.reader, options.verify, manifest
    )
    stats = FlashStats()
    try:
        model, config = load_model(  # lazily: the plan decides what is read
            store_path,
            True,
            model_config=model_config,
            get_model_classes=flash_classes(store, stats),
        )
    except ValueError as e:  # weights that do not fit the config's shapes
        raise FlashError(
            f"the dense part does not match config.json ({e})",
            store_path / DENSE_NAME,
            "convert the model again",
        ) from None
    budget = parse_budget(options.dram_budget, store_bytes(store_path))
    if budget is None and not options.naive:
        budget = default_budget()
    model.setup_flash(options, budget, tuning, config)
    if not lazy:  # the resident weights (streamed ones hold nothing), one at a
        # time: each tensor's stored copy is freed as soon as it is converted
        for _, p in tree_flatten(model.parameters()):
            mx.eval(p)
        check_resident(model, store)
    release_memory()
    return model, config


def check_resident(model: nn.Module, store: BundleStore) -> None:
    """The dense tensors loaded whole at load, checked against their blocks'
    checksums now (what is streamed is checked when first read): a damaged one
    refuses the load, naming the tensor."""
    checker = store.checkers.get(DENSE_NAME)
    if checker is None:
        return
    tensors = dense_tensors(store.path / DENSE_NAME)
    held = [  # not in the file (made at load), or streamed (a placeholder)
        tensors[name]
        for name, p in tree_flatten(model.parameters())
        if name in tensors and p.size > 0
    ]
    fd = os.open(store.path / DENSE_NAME, os.O_RDONLY)
    try:
        for t in held:
            try:
                checker.check_file(fd, t.offset, t.offset + t.nbytes)
            except ReadError as e:
                raise e.within(holding(held, e.offset)) from None
    finally:
        os.close(fd)


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def _load_adapters(model: nn.Module, adapter_path: str) -> None:
    from mlx_lm.tuner.utils import load_adapters

    path = Path(adapter_path)
    weights = path / "adapters.safetensors"
    if not weights.is_file():
        raise FlashError("no adapters.safetensors", path)
    touched = [
        k for k in mx.load(str(weights)) if ".mlp." in k or ".fc1." in k or ".fc2." in k
    ]
    if touched:
        raise FlashError(
            f"the adapter changes the FFN ({touched[0]}, ...), "
            "which lives in the store",
            path,
            "fuse the adapter into the model (mlx_lm.fuse) and convert that",
        )
    load_adapters(model, str(path))
    model.eval()
