"""The SSD probe: tiny real runs, the scratch file always removed, refusals, tuning."""

import errno
import json
import shutil
import sys
from collections import namedtuple

import pytest

from mlx_flash import FlashError, probe, read_tuning
from mlx_flash.probe import parse_list, parse_size, run_probe
from mlx_flash.read_tuning import ReadSettings, load_probe, reader_settings, save_probe

KiB, MiB = 1 << 10, 1 << 20
TINY = {
    "size": 4 * MiB,
    "chunks": [4 * KiB, 64 * KiB],
    "threads": [1, 2],
    "seconds": 0.05,
}
MEASUREMENT = {
    "chunk",
    "threads",
    "reads",
    "bytes",
    "seconds",
    "gbps",
    "iops",
    "trials_gbps",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("probe")
    result = run_probe(directory, **TINY, progress=False)
    return directory, result


def listing(path):
    return sorted(p.name for p in path.iterdir())


def check_schema(result, chunks, threads):
    assert result["schema"] == "mlx-flash-probe" and result["version"] == 1
    for key in ("created", "host", "platform", "directory"):
        assert isinstance(result[key], str)
    assert isinstance(result["device"], int) and result["file_bytes"] > 0
    assert result["chunks"] == chunks and result["threads"] == threads
    assert isinstance(result["direct"], bool) and isinstance(result["evicted"], bool)
    assert isinstance(result["filesystem"], str)
    assert isinstance(result["warnings"], list)
    grid = {(m["chunk"], m["threads"]) for m in result["random"]}
    assert grid == {(c, t) for c in chunks for t in threads}
    assert [m["threads"] for m in result["sequential"]] == threads
    for kind in ("mmap", "buffered"):
        assert [(m["chunk"], m["threads"]) for m in result[kind]] == [
            (c, max(threads)) for c in chunks
        ]
    for kind in ("random", "sequential", "mmap", "buffered"):
        for m in result[kind]:
            assert set(m) == MEASUREMENT
            assert m["reads"] >= 1 and m["bytes"] == m["reads"] * m["chunk"]
            assert m["gbps"] > 0 and m["iops"] > 0
            assert len(m["trials_gbps"]) == 3 and m["gbps"] in m["trials_gbps"]
    assert set(result["reread"]) == {
        "chunk",
        "threads",
        "first_gbps",
        "second_gbps",
        "cached",
    }


def test_tiny_probe(tiny):
    directory, result = tiny
    check_schema(result, TINY["chunks"], TINY["threads"])
    assert result["directory"] == str(directory.resolve())
    assert result["file_bytes"] == 4 * MiB
    assert result["direct"]  # tmp_path is on a disk that takes O_DIRECT
    assert listing(directory) == []
    json.dumps(result)  # JSON as it is


def test_table_and_settings_of_a_real_run(tiny):
    _, result = tiny
    table = probe.format_table(result)
    assert "| 4 KiB |" in table and "| 64 KiB |" in table
    assert "Sequential" in table and "Re-read" in table
    s = reader_settings(result, 4 * KiB)
    assert s.threads in (1, 2) and 0 <= s.gap_bytes <= read_tuning.MAX_GAP


def test_read_failure_removes_the_scratch_file(tmp_path, monkeypatch):
    def fail(fd, view, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(probe, "pread_into", fail)
    with pytest.raises(FlashError, match="Input/output error"):
        run_probe(tmp_path, **TINY, progress=False)
    assert listing(tmp_path) == []


def test_a_failure_in_one_thread_stops_the_others(tmp_path, monkeypatch):
    real, calls = probe.pread_into, []

    def fail_once(fd, view, offset):
        calls.append(offset)
        if len(calls) == 50:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, view, offset)

    monkeypatch.setattr(probe, "pread_into", fail_once)
    with pytest.raises(FlashError):
        run_probe(tmp_path, **{**TINY, "threads": [4]}, progress=False)
    assert listing(tmp_path) == []


def test_ctrl_c_removes_the_scratch_file(tmp_path, monkeypatch):
    def interrupt(fd, view, offset):
        raise KeyboardInterrupt

    monkeypatch.setattr(probe, "pread_into", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_probe(tmp_path, **TINY, progress=False)
    assert listing(tmp_path) == []


def test_refuses_without_free_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * MiB, 0, 10 * MiB))
    with pytest.raises(FlashError, match="not enough free space") as e:
        run_probe(tmp_path, **TINY, progress=False)
    assert e.value.fix and e.value.path == tmp_path.resolve()
    assert listing(tmp_path) == []


@pytest.mark.parametrize("name", ["missing", "file"])
def test_refuses_a_missing_directory(tmp_path, name):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FlashError, match="does not exist|is not a directory"):
        run_probe(tmp_path / name, **TINY, progress=False)
    assert listing(tmp_path) == ["file"]


def test_never_touches_an_existing_file(tmp_path, monkeypatch):
    (tmp_path / "taken").write_bytes(b"keep me")
    names = iter(["taken", "fresh"])
    monkeypatch.setattr(probe, "scratch_name", lambda: next(names))
    run_probe(tmp_path, **TINY, progress=False)
    assert listing(tmp_path) == ["taken"]
    assert (tmp_path / "taken").read_bytes() == b"keep me"

    monkeypatch.setattr(probe, "scratch_name", lambda: "taken")
    with pytest.raises(FlashError, match="exists"):
        run_probe(tmp_path, **TINY, progress=False)
    assert (tmp_path / "taken").read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunks": [6000]},  # not a multiple of 4 KiB
        {"chunks": [8 * MiB]},  # larger than the file
        {"threads": [0]},
        {"seconds": 0},
    ],
)
def test_refuses_bad_arguments(tmp_path, kwargs):
    with pytest.raises(FlashError):
        run_probe(tmp_path, **{**TINY, **kwargs}, progress=False)
    assert listing(tmp_path) == []


def test_parse_size_and_lists():
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("4K") == parse_size("4KiB") == parse_size("4kb") == 4096
    assert parse_size("1.5M") == 3 << 19 and parse_size("123") == 123
    assert parse_list("4K,...,64K", parse_size) == [4096 << i for i in range(5)]
    assert parse_list("32, 1,4 ,16") == [1, 4, 16, 32]
    for bad in ("abc", "-4K", "0"):
        with pytest.raises(FlashError):
            parse_size(bad)
    for bad in ("...,4K", "4K,...", "x,2"):
        with pytest.raises(FlashError):
            parse_list(bad, parse_size if "K" in bad else probe.parse_count)


def synthetic(iops, bandwidth=2e9, direct=True):
    """A result whose 4 KiB row has `iops[t]` and whose 64 KiB and 1 MiB rows read
    at `bandwidth` B/s with every thread count."""
    rows = []
    for t, n in iops.items():
        rows.append({"chunk": 4096, "threads": t, "iops": n, "gbps": n * 4096 / 1e9})
        for chunk in (64 * KiB, MiB):
            rows.append(
                {
                    "chunk": chunk,
                    "threads": t,
                    "iops": bandwidth / chunk,
                    "gbps": bandwidth / 1e9,
                }
            )
    return {"random": rows, "direct": direct, "file": "/cache/probe/1.json"}


def test_reader_settings_defaults():
    assert reader_settings(None, 4096) == ReadSettings(4, 24 << 10, "defaults")
    assert reader_settings({"random": []}, 4096).source == "defaults"
    buffered = synthetic({1: 10e3, 16: 65e3}, direct=False)
    assert reader_settings(buffered, 4096).source == "defaults"


def test_reader_settings_ignore_memory():
    result = {**synthetic({1: 10e3, 16: 65e3}), "filesystem": "tmpfs"}
    assert reader_settings(result, 4096).source == "defaults"
    base = {"direct": True, "evicted": True, "reread": {"cached": False}}
    assert probe.caveats({**base, "filesystem": "ext4"}) == []
    assert "RAM" in probe.caveats({**base, "filesystem": "tmpfs"})[0]
    worst = {"direct": False, "evicted": False, "reread": {"cached": True}}
    assert len(probe.caveats({**worst, "filesystem": "tmpfs"})) == 4


def test_reader_settings_rule():
    result = synthetic({1: 10e3, 4: 40e3, 16: 65e3, 32: 66e3})
    s = reader_settings(result, 4096)
    assert s.threads == 16  # 32 threads add under 5%
    assert s.gap_bytes == int(2e9 / 65e3 - 4096)  # B / IOPS(s0) - s0
    assert s.source == "probe /cache/probe/1.json"
    assert "16 threads" in s.describe()


def test_reader_settings_bundle_size_picks_the_row():
    result = synthetic({1: 10e3, 16: 65e3})
    # 10 KB bundles: the 64 KiB row, which reads at the full bandwidth: no overhead
    assert reader_settings(result, 10_000).gap_bytes == 0
    assert reader_settings(result, 4 * MiB).gap_bytes == 0  # larger than any chunk


def test_reader_settings_caps():
    s = reader_settings(synthetic({16: 60e3, 64: 90e3}), 4096)
    assert s.threads == 16  # 64 threads are over the cap
    s = reader_settings(synthetic({4: 1e3}, bandwidth=4e9), 4096)
    assert s.gap_bytes == read_tuning.MAX_GAP
    s = reader_settings(synthetic({4: 1e6}, bandwidth=1e9), 4096)
    assert s.gap_bytes == 0  # small reads as fast as large ones


def test_save_and_load(tmp_path, tiny):
    _, result = tiny
    assert load_probe(tmp_path) is None
    path = save_probe({**result, "directory": str(tmp_path)})
    assert path.parent.name == "probe" and path.stem == str(tmp_path.stat().st_dev)
    loaded = load_probe(tmp_path)
    assert loaded["file"] == str(path) and loaded["random"] == result["random"]
    assert reader_settings(loaded, 4096).source == f"probe {path}"
    path.write_text(json.dumps({**result, "version": 99}))
    assert load_probe(tmp_path) is None
    path.write_text("{not json")
    assert load_probe(tmp_path) is None


def test_cli(tmp_path, capsys):
    out = tmp_path / "out.json"
    directory = tmp_path / "d"
    directory.mkdir()
    argv = ["--path", str(directory), "--size", "4MiB", "--chunks", "4K,...,16K"]
    argv += ["--threads", "1,2", "--seconds", "0.03", "--json", str(out), "--quiet"]
    probe.main(argv)
    text = capsys.readouterr().out
    assert "| 8 KiB |" in text and "reader settings" in text and "saved" in text
    result = json.loads(out.read_text())
    check_schema(result, [4096, 8192, 16384], [1, 2])
    assert listing(directory) == []
    assert load_probe(directory)["created"] == result["created"]


def test_cli_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        probe.main(["--path", str(tmp_path / "nope"), "--quick", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err


def test_plot(tmp_path, tiny):
    pytest.importorskip("matplotlib")
    _, result = tiny
    assert probe.plot(result, tmp_path / "probe.png")
    assert (tmp_path / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert listing(tmp_path) == ["probe.png"]


def test_plot_without_matplotlib(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not probe.plot(tiny[1], tmp_path / "probe.png")
    assert "pip install matplotlib" in capsys.readouterr().err
    assert listing(tmp_path) == []


def test_load_takes_its_reader_settings_from_the_probe(tmp_path, capsys):
    from conftest import make_checkpoint

    from mlx_flash import convert, load
    from mlx_flash.generate import print_stats

    make_checkpoint(tmp_path / "llama", "llama")
    store = convert(tmp_path / "llama", tmp_path / "store", progress=False)
    model, _ = load(str(store), progress=False)
    assert model.flash_tuning == ReadSettings(4, 24 << 10, "defaults")
    result = {
        **synthetic({1: 10e3, 4: 40e3, 16: 65e3}),
        "schema": read_tuning.SCHEMA,
        "version": read_tuning.VERSION,
        "directory": str(store),
    }
    path = save_probe(result)
    model, _ = load(str(store), progress=False)
    assert model.flash_tuning.source == f"probe {path}"
    assert model.flash_store.reader.threads == model.flash_tuning.threads == 16
    model, _ = load(str(store), threads=2, progress=False)
    assert model.flash_store.reader.threads == 2
    assert model.flash_tuning.source.endswith("threads given")
    print_stats(model)
    assert "reader: 2 threads" in capsys.readouterr().out
