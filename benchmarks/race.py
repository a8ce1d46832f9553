"""The rules that keep the race fair (issue #14, "A fair race"), as small pure functions
beside one sampler of CPU time.

- One memory limit per budget, the same for every engine: the budget plus one stated
  runtime allowance (`RUNTIME_ALLOWANCE`). Each engine's idle footprint is measured and
  reported, but no longer sets its limit.
- Budgets are fractions of the source GGUF file. mlx_flash, which plans its own
  memory, is passed as bytes (its own `--dram-budget 0.5` means half of the *store*)
  the limit less its idle footprint measured in the same run (`planned_budget`): what
  the others leave free goes to llama.cpp's page cache by itself.
- llama.cpp runs under a limit with its CPU repacking on and off; the faster row that
  completed stands for llama.cpp in the summaries.
- A run is flagged busy when processes other than the benchmark used more than
  `BUSY_SHARE` of the machine's cores in the minute before it started or while it ran.
"""

import os
import resource
import time

MiB = 2**20
# What every engine gets on top of the budget: the interpreter, its libraries and the
# model's tokenizer (the budget is a budget for weights). 200 MiB covers the largest
# idle footprint measured on 2026-11-26 (MLX + mlx-lm + mlx_flash + the Qwen
# tokenizer: 195 MiB; llama.cpp: 62-92 MiB) and is the figure at which the issue's
# independent check ran both engines.
RUNTIME_ALLOWANCE = 200 * MiB
BUSY_SHARE = 0.5  # of the machine's cores, used by other processes: "busy"
BUSY_WINDOW = 60.0  # seconds before a run's start, as the 1-minute load average
LLAMA_LIMIT = "llama.cpp mmap, limit"  # the prefix of llama.cpp's limited rows
REPACK = {True: "repack on", False: "repack off"}


def budget_bytes(fraction: float, file_bytes: int) -> int:
    """The DRAM budget in bytes for `fraction` of the GGUF file."""
    return int(fraction * file_bytes)


def memory_limit(budget: int, allowance: int = RUNTIME_ALLOWANCE) -> int:
    """The cgroup limit of every engine's run at `budget`: the same for all."""
    return budget + allowance


def planned_budget(limit: int, idle: int | None, allowance: int) -> int:
    """mlx_flash's DRAM budget under `limit`: the limit less its idle footprint
    measured in the same run (the interpreter, its libraries, the tokenizer), or
    less the allowance where none was measured. It plans its own memory, so this is
    it configured at its best; llama.cpp's page cache takes whatever is free by
    itself."""
    return limit - (allowance if idle is None else idle)


def budget_words(fraction: float, file_bytes: int, planned: int | None = None) -> str:
    """How a budget reads in a table header: what it is a fraction of and how mlx_flash
    receives it (as bytes; its own `--dram-budget 0.5` would mean half of the
    store): the budget itself, or with `planned` the limit less its idle
    footprint."""
    words = (
        f"budget {fraction:.0%} of the {file_bytes / 1e6:.0f} MB GGUF file = "
        f"{budget_bytes(fraction, file_bytes) / MiB:.0f} MiB"
    )
    if planned is None:
        return words + ", passed to mlx_flash as bytes"
    return (
        f"{words}; mlx_flash's --dram-budget {planned / MiB:.0f} MiB (bytes): the "
        "limit less its measured idle footprint"
    )


def limit_words(budget: int, allowance: int) -> str:
    """The memory limit of a budget, as a table header says it."""
    return (
        f"memory limit {memory_limit(budget, allowance) / MiB:.0f} MiB for every "
        f"engine = budget + {allowance / MiB:.0f} MiB runtime allowance"
    )


def over_allowance(idle: dict[str, int], allowance: int) -> dict[str, int]:
    """{engine: bytes} by which an engine's idle footprint (imports + tokenizer)
    exceeds the allowance: what that engine's weights lose of the budget."""
    return {k: v - allowance for k, v in idle.items() if v > allowance}


def llama_limited(name: str) -> bool | None:
    """None for a row that is not llama.cpp under a limit; else whether it repacks
    (results from before issue #14 have one such row, repacking: llama.cpp's
    default)."""
    if not name.startswith(LLAMA_LIMIT):
        return None
    return REPACK[False] not in name


def better_llama(rows: list[dict]) -> dict | None:
    """Of llama.cpp's rows under a limit (repack on / off), the one that stands for it
    in the summaries: the faster of those that completed, else the first."""
    limited = [r for r in rows if llama_limited(r["config"]) is not None]
    done = [r for r in limited if r["status"].startswith("ok") and "ms_per_token" in r]
    if done:
        return min(done, key=lambda r: r["ms_per_token"])
    return limited[0] if limited else None


def busy_threshold(cores: int, share: float = BUSY_SHARE) -> float:
    """Cores other processes may use before a run counts as started on a busy
    machine."""
    return share * cores


def is_busy(others: float | None, cores: int, share: float = BUSY_SHARE) -> bool:
    """Whether `others` (cores used by processes other than the benchmark) exceeds
    the threshold; unknown (None) is not busy."""
    return others is not None and others > busy_threshold(cores, share)


def others_cores(start: tuple, end: tuple) -> float | None:
    """Cores used by processes other than the benchmark between two `cpu_sample()`s:
    the machine's busy CPU seconds less the benchmark's own, over the wall time."""
    (t0, busy0, own0), (t1, busy1, own1) = start, end
    if busy0 is None or busy1 is None or t1 <= t0:
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)


def window_start(samples: list[tuple], t: float, window: float = BUSY_WINDOW):
    """The sample to measure the last `window` seconds before `t` from: the latest
    taken at least `window` earlier, else the earliest there is."""
    older = [s for s in samples if s[0] <= t - window]
    return older[-1] if older else samples[0]


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine's processes have spent running (user, nice,
    system in /proc/stat: interrupts are left out, as the benchmark's own disk
    interrupts would otherwise count as another's); None without /proc/stat
    (macOS)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system = map(int, fields[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its waited-for children (every worker and
    probe the benchmark ran so far)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_sample() -> tuple[float, float | None, float]:
    """(monotonic time, machine busy CPU seconds, the benchmark's own CPU seconds).
    Take it between runs, when no worker is running (its CPU time counts once it has
    been waited for)."""
    return time.monotonic(), machine_busy_seconds(), own_seconds()


class CpuMeter:
    """CPU samples taken between runs, to tell how busy the rest of the machine was in
    the minute before each run and while it ran."""

    def __init__(self):
        self.samples = [cpu_sample()]
        self.started = None

    def start(self) -> dict:
        """At a run's start: the 1-minute load average (information: it counts the
        benchmark's own threads, I/O waits included) and the cores other processes
        used in the minute before."""
        self.started = now = cpu_sample()
        first = window_start(self.samples, now[0])
        self.samples = self.samples[self.samples.index(first) :] + [now]
        return {
            "load_1m": os.getloadavg()[0],
            "others_cores_before": others_cores(first, now),
        }

    def end(self, before: dict, cores: int) -> dict:
        """At a run's end (`before`: what `start` returned): the cores other processes
        used while it ran, and whether the run counts as busy."""
        now = cpu_sample()
        self.samples.append(now)
        during = others_cores(self.started, now)
        busy = is_busy(before["others_cores_before"], cores) or is_busy(during, cores)
        return {**before, "others_cores_during": during, "busy": busy}
