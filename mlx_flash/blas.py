"""MLX's Linux CPU wheel links the reference BLAS: a float32 GEMM of 1024 tokens by one
SmolLM2 FFN matrix takes 0.44 s with it and 5 ms with the system's OpenBLAS preloaded
(measured here). The commands restart themselves with OpenBLAS preloaded when the
system has it: the offline ones that push whole texts through the model (training
predictors, evaluating perplexity), and the decoding ones (generate, chat, server),
where float GEMVs gain: a float16 store's compute on SmolLM2 160 vs 190 ms/token;
quantized stores run MLX's own kernels and are unchanged.
"""

import argparse
import os
import sys
from typing import Any, Callable, List, Optional

OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def prefer_fast_blas(hint: bool = True) -> None:
    """On Linux, re-execute this command with OpenBLAS preloaded, once, if present
    (else, with `hint`, say how to install it). A no-op elsewhere, when already
    preloaded, or with MLX_FLASH_NO_PRELOAD=1."""
    if not sys.platform.startswith("linux") or os.environ.get("MLX_FLASH_NO_PRELOAD"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = next((p for p in OPENBLAS if os.path.exists(p)), None)
    if lib is None:
        if not hint:
            return
        print(
            "[mlx_flash] hint: MLX's CPU wheel uses a slow reference BLAS; installing "
            "OpenBLAS (apt-get install libopenblas0) makes this command ~50x faster",
            file=sys.stderr,
        )
        return
    env = dict(os.environ, LD_PRELOAD=lib, MLX_FLASH_NO_PRELOAD="1")
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def run_offline(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Any],
    argv: Optional[List[str]] = None,
) -> None:
    """An offline command's `main`: run as a command (`argv` None), it first restarts
    with OpenBLAS (`prefer_fast_blas`); bad input exits with its one-line error."""
    from .errors import exit_on_error

    if argv is None:  # a command, not a call from Python
        prefer_fast_blas()
    args = parser.parse_args(argv)
    with exit_on_error():
        run(args)
