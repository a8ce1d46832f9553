"""The benchmark harness's fair-race rules (benchmarks/race.py) and how the report
names them (benchmarks/report.py): pure functions on plain numbers and rows."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


def bench_module(name: str):
    """benchmarks/NAME.py, importable by its plain name as the harness imports it."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


race = bench_module("race")
report = bench_module("report")  # (imports race)

MiB = race.MiB


def row(config, status="ok", ms=None, engine="llama_cpp", **extra):
    r = {"config": config, "status": status, "engine": engine, **extra}
    if ms is not None:
        r.update(ms_per_token=ms, disk_mb_per_token=ms / 10)
    return r


def test_one_limit_for_every_engine_whatever_their_idle_footprints():
    budget = race.budget_bytes(0.5, 1_117_320_768)
    assert budget == 558_660_384
    limit = race.memory_limit(budget)
    assert limit == budget + race.RUNTIME_ALLOWANCE == budget + 200 * MiB
    assert race.memory_limit(budget, 80 * MiB) == budget + 80 * MiB


def test_idle_footprints_over_the_allowance_are_named():
    idle = {"mlx": 250 * MiB, "llama_cpp": 92 * MiB}
    assert race.over_allowance(idle, 200 * MiB) == {"mlx": 50 * MiB}
    assert race.over_allowance(idle, 300 * MiB) == {}


def test_a_budget_says_what_it_is_a_fraction_of_and_how_mlx_flash_gets_it():
    words = race.budget_words(0.5, 491_400_064)
    assert words.startswith("budget 50% of the 491 MB GGUF file = 234 MiB")
    assert "passed to mlx_flash as bytes" in words
    assert "budget + 200 MiB runtime allowance" in race.limit_words(
        234 * MiB, race.RUNTIME_ALLOWANCE
    )
    assert race.limit_words(234 * MiB, race.RUNTIME_ALLOWANCE).startswith(
        "memory limit 434 MiB for every engine"
    )


def test_mlx_flash_plans_the_limit_less_its_measured_idle_footprint():
    limit = race.memory_limit(234 * MiB)
    assert (
        race.planned_budget(limit, 150 * MiB, race.RUNTIME_ALLOWANCE)
        == (234 + 200 - 150) * MiB
    )
    assert race.planned_budget(limit, None, race.RUNTIME_ALLOWANCE) == 234 * MiB
    words = race.budget_words(0.5, 491_400_064, 284 * MiB)
    assert words.startswith("budget 50% of the 491 MB GGUF file = 234 MiB")
    assert "mlx_flash's --dram-budget 284 MiB (bytes)" in words
    assert "idle footprint" in words


def test_llama_rows_under_a_limit_and_their_repacking():
    assert race.llama_limited("llama.cpp mmap, no limit") is None
    assert race.llama_limited("q4 naive") is None
    assert race.llama_limited("llama.cpp mmap, limit (repack on)") is True
    assert race.llama_limited("llama.cpp mmap, limit (repack off)") is False
    assert race.llama_limited("llama.cpp mmap, limit") is True  # before issue #14


def test_the_better_llama_row_is_the_faster_that_completed():
    on = row("llama.cpp mmap, limit (repack on)", ms=3600)
    off = row("llama.cpp mmap, limit (repack off)", ms=1270)
    rows = [row("llama.cpp mmap, no limit", ms=68), on, off]
    assert race.better_llama(rows) is off
    killed = row("llama.cpp mmap, limit (repack off)", "OOM-killed")
    assert race.better_llama([on, killed]) is on
    both = [row("llama.cpp mmap, limit (repack on)", "OOM-killed"), killed]
    assert race.better_llama(both) is both[0]
    assert race.better_llama([row("q4 naive", ms=1500, engine="flash")]) is None


def test_others_cores_leave_out_the_benchmarks_own_cpu_time():
    start, end = (100.0, 50.0, 10.0), (110.0, 68.0, 20.0)  # (t, machine, own)
    assert race.others_cores(start, end) == pytest.approx(0.8)
    assert race.others_cores((0.0, None, 0.0), end) is None  # no /proc/stat
    assert race.others_cores(end, end) is None
    # own time counted after the machine's sample can't make others negative
    assert race.others_cores((0.0, 0.0, 0.0), (1.0, 1.0, 2.0)) == 0.0


def test_busy_is_more_than_half_the_cores_used_by_others():
    assert race.busy_threshold(2) == 1.0
    assert race.is_busy(1.01, 2) and not race.is_busy(1.0, 2)
    assert not race.is_busy(None, 2)
    assert race.is_busy(3.0, 8, share=0.25) and not race.is_busy(3.0, 8)


def test_the_minute_before_a_run_starts_at_the_latest_sample_a_minute_old():
    samples = [(0.0, 0, 0), (30.0, 0, 0), (50.0, 0, 0), (95.0, 0, 0)]
    assert race.window_start(samples, 100.0) == (30.0, 0, 0)
    assert race.window_start(samples, 40.0) == (0.0, 0, 0)  # younger than a minute


def test_cpu_meter_measures_a_run_and_flags_it():
    meter = race.CpuMeter()
    before = meter.start()
    assert set(before) == {"load_1m", "others_cores_before"}
    after = meter.end(before, cores=2)
    assert after["busy"] in (True, False)
    assert "others_cores_during" in after and after["load_1m"] == before["load_1m"]


def test_status_words():
    assert report.status_word("ok 2/3") == "ok"
    assert report.status_word("OOM-killed") == "OOM-killed"
    assert report.status_word("timeout (400 s)") == "timeout"
    refused = "failed: FlashError: x: a DRAM budget of 533 MiB is too small: ..."
    assert report.status_word(refused) == "refused"
    naive = "failed: needs 801 MiB (...): more than the 533 MiB budget"
    assert report.status_word(naive) == "refused"
    assert report.status_word("failed: RuntimeError: boom") == "failed"


def result(budgets, allowance=race.RUNTIME_ALLOWANCE):
    return {
        "model": "m",
        "file_bytes": 100 * 10**6,
        "allowance_bytes": allowance,
        "idle_footprint_bytes": {"mlx": 100 * MiB, "llama_cpp": 60 * MiB},
        "budgets": [
            {"fraction": f, "budget_bytes": int(f * 100 * 10**6), "rows": rows}
            for f, rows in budgets
        ],
    }


def test_the_summary_keeps_llamas_better_row_and_names_its_repacking():
    rows = [
        row("llama.cpp mmap, no limit", ms=10),
        row("llama.cpp mmap, limit (repack on)", ms=3600),
        row("llama.cpp mmap, limit (repack off)", ms=1270, busy_rounds=[0]),
        row("q4 naive", "failed: needs 9 MiB: more than the 5 MiB budget", None, "f"),
    ]
    text = report.summary([result([(0.5, rows)])])
    assert "| llama.cpp mmap, limit (repack off) | 1270 (127) † |" in text
    assert "repack on) |" not in text
    assert "| q4 naive | refused |" in text
    assert "50% = 48 MiB, limit 248 MiB for every engine" in text


def test_the_summary_says_which_repacking_won_where_they_differ():
    first = [
        row("llama.cpp mmap, limit (repack on)", ms=5),
        row("llama.cpp mmap, limit (repack off)", ms=6),
    ]
    second = [
        row("llama.cpp mmap, limit (repack on)", "OOM-killed"),
        row("llama.cpp mmap, limit (repack off)", ms=900),
    ]
    text = report.summary([result([(0.5, first), (0.75, second)])])
    line = "| llama.cpp mmap, limit (the better of repack on/off) | 5 (0) [on] "
    assert line + "| 900 (90) [off] |" in text


def test_results_from_before_issue_14_keep_their_per_engine_limits():
    old = result([(0.5, [])])
    del old["allowance_bytes"]
    words = report.limits_words(old, old["budgets"][0])
    assert "each engine's own idle footprint" in words
    assert "mlx 148 MiB, llama_cpp 108 MiB" in words


def test_a_store_with_a_float16_q6k_dense_part_is_rebuilt(tmp_path):
    """Cached benchmark stores converted before Q6_K dense tensors were re-quantized
    by default (no entry in the config's quantization) are stale; those of an older
    format too, and those whose down was re-laid at another width."""
    import json

    from mlx_flash.store.components import DOWN_BITS
    from mlx_flash.store.format import FORMAT_VERSION

    models = bench_module("models")

    def store(name, quantization, version=FORMAT_VERSION):
        path = tmp_path / name
        path.mkdir()
        origin = {"kind": "Q6_K", "exact": False, "note": "", "error": None}
        manifest = {
            "format_version": version,
            "dense": {"lm_head": origin, "model.norm": {"kind": "F32"}},
        }
        (path / "flash_config.json").write_text(json.dumps(manifest))
        (path / "config.json").write_text(json.dumps({"quantization": quantization}))
        return path

    q6 = {"group_size": 32, "bits": 6, "mode": "affine"}
    assert models.stale(store("float16", None))
    assert not models.stale(store("q6", {"lm_head": q6}))
    assert models.stale(store("old", {"lm_head": q6}, version=1))
    # and stores whose down was re-laid per neuron at another width than today's
    for bits in (8, DOWN_BITS):
        path = store(f"down{bits}", {"lm_head": q6})
        manifest = json.loads((path / "flash_config.json").read_text())
        note = "dequantized, transposed, stored per neuron as affine"
        down = {"encoding": {"bits": bits}, "origin": {"kind": "Q6_K", "note": note}}
        manifest.update(
            column="down_proj", layers=[{"components": {"down_proj": down}}]
        )
        (path / "flash_config.json").write_text(json.dumps(manifest))
        assert models.stale(path) == (bits != DOWN_BITS)
    # and columns stores whose columns are bundled (planar since 2026-12-08)
    for part in (None, "packed"):
        path = store(f"columns-{part}", {"lm_head": q6})
        manifest = json.loads((path / "flash_config.json").read_text())
        section = {"components": ["gate_proj"], "offset": 4096, "bundle_bytes": 8}
        layer = {"sections": [{**section, **({"part": part} if part else {})}]}
        extension = {"name": "columns", "meta": {"layers": [layer]}}
        manifest.update(extensions=[extension])
        (path / "flash_config.json").write_text(json.dumps(manifest))
        assert models.stale(path) == (part is None)


def test_frontier_rows_added_into_an_earlier_run_of_the_same_text(tmp_path):
    """`frontier.py --into`: a later run's rows join the earlier frontier (a method's
    row replaced, the run's load average recorded); a run of another text, store or
    budget, or whose dense perplexity moved (the store changed), is refused."""
    import json

    frontier = bench_module("frontier")
    same = dict(model="m", store="/s", budget_bytes=10, tokens=2048, skip=0)

    def run(rows, load):
        rows = [{"method": m, "ppl_wikitext": p} for m, p in rows]
        return {**same, "rows": rows, "decode_checks": [], "load_average": [load]}

    old = tmp_path / "frontier-m.json"
    old.write_text(json.dumps(run([("dense", 10.0), ("input 0.3", 11.0)], 1.0)))
    new = run([("dense", 10.0), ("input 0.3", 11.5), ("lowrank 0.3", 12.0)], 2.0)
    out = frontier.merged(old, new)
    assert [(r["method"], r["ppl_wikitext"]) for r in out["rows"]] == [
        ("dense", 10.0),
        ("input 0.3", 11.5),
        ("lowrank 0.3", 12.0),
    ]
    assert out["added"] == [
        {"methods": ["input 0.3", "lowrank 0.3"], "load_average": [2.0]}
    ]
    with pytest.raises(SystemExit, match="tokens"):
        frontier.merged(old, {**new, "tokens": 1024})
    with pytest.raises(SystemExit, match="dense perplexity"):  # the store changed
        frontier.merged(old, run([("dense", 10.5)], 2.0))
