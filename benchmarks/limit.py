"""Run a command under a real DRAM limit: a cgroup v1 memory limit, which counts the
page cache (so a mmapped model really is re-read from the disk), with the child moved
into the cgroup after fork and before exec. Linux, as root. On macOS nothing can cap a
process's DRAM: commands run unlimited after `purge` (the page cache emptied), and
only mlx_flash's own budget holds (`unenforced()` says so).

Per run it records: the cgroup's peak memory (RSS + page cache), limit hits (failcnt)
and OOM kills, the bytes the cgroup read from the block device (blkio, all its threads
and page faults included), the bytes the
whole device read meanwhile (/sys/block/<dev>/stat: includes other processes), wall time
and the exit status. The page cache is dropped before each run.

    python benchmarks/limit.py [--limit 200MB] [--no-drop] -- CMD ...
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
MEMORY, BLKIO = ROOT / "memory", ROOT / "blkio"
SECTOR = 512


class LimitError(RuntimeError):
    pass


def available() -> str | None:
    """None when cgroup v1 memory limits can be used here, else why not."""
    if not sys.platform.startswith("linux"):
        return "not Linux (use `purge` and the runtime's own budget on macOS)"
    if os.geteuid() != 0:
        return "not root: cgroup limits and drop_caches need root"
    if not (MEMORY / "memory.limit_in_bytes").exists():
        return (
            "no cgroup v1 memory controller: mkdir -p /sys/fs/cgroup/memory && "
            "mount -t cgroup -o memory none /sys/fs/cgroup/memory"
        )
    return None


def unenforced() -> bool:
    """macOS: runs are measured but no memory limit can be set."""
    return sys.platform == "darwin"


def drop_caches() -> bool:
    """sync; echo 3 > /proc/sys/vm/drop_caches, or `purge` on macOS (False where not
    permitted)."""
    os.sync()
    if unenforced():  # purge needs root: sudo -n fails at once rather than ask
        cmd = ["purge"] if os.geteuid() == 0 else ["sudo", "-n", "purge"]
        return subprocess.run(cmd, capture_output=True, check=False).returncode == 0
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def block_device(path: str) -> str:
    """The /sys/block name of the disk holding `path` (partitions -> their disk)."""
    dev = os.stat(path).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sys_dev.exists():
        return ""
    real = sys_dev.resolve()
    return real.parent.name if (real / "partition").exists() else real.name


def device_read_bytes(dev: str) -> int:
    """Bytes read by the whole device so far (field 3 of /sys/block/<dev>/stat)."""
    try:
        return int(Path(f"/sys/block/{dev}/stat").read_text().split()[2]) * SECTOR
    except (OSError, IndexError):
        return 0


def _read(path: Path, default: str = "0") -> str:
    try:
        return path.read_text()
    except OSError:
        return default


def _blkio_read_bytes(group: Path) -> dict[str, int]:
    """{"major:minor": bytes read} from blkio.throttle.io_service_bytes."""
    out = {}
    for line in _read(group / "blkio.throttle.io_service_bytes", "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            out[parts[0]] = out.get(parts[0], 0) + int(parts[2])
    return out


def _make(parent: Path, name: str) -> Path | None:
    if not parent.is_dir():
        return None
    group = parent / name
    group.mkdir(exist_ok=True)
    return group


def _remove(group: Path | None) -> None:
    if group is None or not group.exists():
        return
    for _ in range(50):  # the last task may take a moment to leave
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def run(
    cmd: list[str],
    limit: int | None = None,
    name: str | None = None,
    drop: bool = True,
    timeout: float | None = None,
    device_of: str = ".",
    env: dict | None = None,
) -> dict:
    """Run `cmd` in a fresh memory (+ blkio) cgroup limited to `limit` bytes (None: no
    limit, still measured). Returns the child's stdout/stderr and the measurements."""
    if unenforced():
        return _run_plain(cmd, drop, timeout, env)
    why = available()
    if why:
        raise LimitError(why)
    name = name or f"mlx_flash_bench_{os.getpid()}_{time.monotonic_ns()}"
    mem, blk = _make(MEMORY, name), _make(BLKIO, name)
    try:
        (mem / "memory.swappiness").write_text("0")
        (mem / "memory.limit_in_bytes").write_text(str(limit if limit else -1))
        if limit:  # with swap present, swap must not lift the limit either
            try:
                (mem / "memory.memsw.limit_in_bytes").write_text(str(limit))
            except OSError:
                pass
        procs = [str(g / "cgroup.procs") for g in (mem, blk) if g is not None]

        def enter():  # in the child, after fork, before exec
            for p in procs:
                with open(p, "w") as f:
                    f.write(str(os.getpid()))

        dev = block_device(device_of)
        if blk is not None and dev:  # blk-throttle counts a group's bytes only where
            # it has a rule: one far above any disk's speed (1 TB/s) throttles nothing
            majmin = _read(Path(f"/sys/block/{dev}/dev"), "").strip()
            try:
                (blk / "blkio.throttle.read_bps_device").write_text(
                    f"{majmin} {1 << 40}"
                )
            except OSError:
                pass
        dropped = drop_caches() if drop else False
        dev_before = device_read_bytes(dev)
        tic = time.perf_counter()
        try:
            res = subprocess.run(
                cmd,
                check=False,
                preexec_fn=enter,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
            rc, stdout, stderr = res.returncode, res.stdout, res.stderr
        except subprocess.TimeoutExpired as e:
            rc, stdout, stderr = "timeout", e.stdout or "", e.stderr or ""
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
            stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
        wall = time.perf_counter() - tic
        oom = dict(
            line.split()
            for line in _read(mem / "memory.oom_control", "").splitlines()
            if len(line.split()) == 2
        )
        blkio = _blkio_read_bytes(blk) if blk is not None else {}
        result = {
            "returncode": rc,
            "wall_s": wall,
            "limit_bytes": limit,
            "peak_bytes": int(_read(mem / "memory.max_usage_in_bytes")),
            "failcnt": int(_read(mem / "memory.failcnt")),
            "oom_kills": int(oom.get("oom_kill", 0)),
            "cgroup_read_bytes": sum(blkio.values()),
            "device": dev,
            "device_read_bytes": device_read_bytes(dev) - dev_before,
            "caches_dropped": dropped,
            "stdout": stdout,
            "stderr": stderr,
        }
        result["killed"] = result["oom_kills"] > 0 or rc == -9
        try:  # uncharge what the group still holds (page cache) before removing it
            (mem / "memory.force_empty").write_text("0")
        except OSError:
            pass
        return result
    finally:
        _remove(mem)
        _remove(blk)


def _run_plain(cmd, drop, timeout, env) -> dict:
    """macOS: the command after `purge`, no limit; peak memory is the worker's own."""
    dropped = drop_caches() if drop else False
    tic = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
        rc, stdout, stderr = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired:
        rc, stdout, stderr = "timeout", "", ""
    return {
        "returncode": rc,
        "wall_s": time.perf_counter() - tic,
        "limit_bytes": None,
        "limit_enforced": False,
        "oom_kills": 0,
        "killed": rc == -9,
        "caches_dropped": dropped,
        "stdout": stdout,
        "stderr": stderr,
    }


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(float(t))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--limit", default=None, help="e.g. 200MB (binary units); none: no limit"
    )
    p.add_argument("--no-drop", action="store_true", help="Keep the page cache")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("give a command after --")
    limit = parse_size(args.limit) if args.limit else None
    r = run(cmd, limit, drop=not args.no_drop)
    sys.stdout.write(r.pop("stdout"))
    sys.stderr.write(r.pop("stderr"))
    print(json.dumps(r, indent=1), file=sys.stderr)
    sys.exit(0 if r["returncode"] == 0 else 1)


if __name__ == "__main__":
    main()
