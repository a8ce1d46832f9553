"""mlx_flash: run language models larger than DRAM, with the FFN streamed from the SSD.

A drop-in for mlx-lm: ``from mlx_flash import load, generate, stream_generate``.
"""

import warnings

# Importing a submodule sets the package attribute of its name: load the `generate`
# command module first, then bind the name to mlx-lm's function (as `convert` is), so
# that a later `import mlx_flash.generate` cannot replace the function.
from . import generate as _generate_command  # noqa: F401, I001
from mlx_lm.generate import batch_generate, generate, stream_generate  # noqa: E402

from .convert import convert
from .errors import FlashError
from .utils import load

# `python -m mlx_flash.convert` runs a module this package already imported (for the
# `convert` function, as mlx-lm does); runpy's warning about that is noise for users.
warnings.filterwarnings(
    "ignore",
    message=r".*'mlx_flash\.\w+' found in sys.modules",
    category=RuntimeWarning,
)

__version__ = "0.1.0"
__all__ = [
    "load",
    "generate",
    "stream_generate",
    "batch_generate",
    "convert",
    "FlashError",
]
