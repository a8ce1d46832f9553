"""An mlx-lm user's habits: paths, hub errors, convert's keywords, checked flags."""

import inspect

import httpx2
import huggingface_hub
import pytest
import requests
from conftest import make_checkpoint
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from mlx_lm.convert import QUANT_RECIPES
from mlx_lm.convert import convert as mlx_lm_convert

import mlx_flash.store.writer as writer
from mlx_flash import FlashError, convert, load
from mlx_flash.budget import parse_budget
from mlx_flash.chat import main as chat_main
from mlx_flash.convert import main as convert_main
from mlx_flash.convert import setup_arg_parser as convert_parser
from mlx_flash.generate import main as generate_main
from mlx_flash.generate import setup_arg_parser as generate_parser
from mlx_flash.server import main as server_main
from mlx_flash.store.format import FFN_FORMATS
from mlx_flash.store.sources import _looks_like_repo, open_source
from mlx_flash.store.store import is_store

LOCAL = ["./nope", "../nope/model", "~/models/typo.gguf", "/abs/nope", "a/b/c"]
LOCAL += ["org/model.gguf", "org/model.safetensors", "nope", "org/"]


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub call fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Paths -------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOCAL)
def test_a_missing_local_path_is_no_such_file(home, no_hub, name):
    with pytest.raises(FlashError, match="no such file or directory") as e:
        open_source(name)
    assert "fix:" in str(e.value)
    assert str(e.value.path).endswith(name.lstrip("~./").rstrip("/"))
    assert e.value.path.is_absolute()  # where it looked, ~ expanded


@pytest.mark.parametrize("name", ["./nope", "~/models/typo.gguf", "org/model.gguf"])
def test_load_of_a_missing_local_path_is_no_such_file(home, no_hub, name):
    with pytest.raises(FlashError, match="no such file or directory"):
        load(name, progress=False)


@pytest.mark.parametrize(
    "name,repo",
    [
        ("org/name", True),
        ("Qwen/Qwen2.5-0.5B-Instruct", True),
        ("mlx-community/SmolLM2-135M-Instruct-8bit", True),
        ("org/name.gguf", False),
        ("org/na me", False),
        ("org--x/name", False),
        ("./org/name", False),
        ("~org/name", False),
        ("name", False),
    ],
)
def test_only_owner_name_looks_like_a_repo(name, repo):
    assert _looks_like_repo(name) is repo


def test_a_hub_id_goes_to_the_hub(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "snapshot", "llama")
    asked = []

    def snapshot_download(repo, revision=None, allow_patterns=None):
        asked.append((repo, revision))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert open_source("tiny-org/tiny-llama", revision="v1").config["model_type"]
    assert asked == [("tiny-org/tiny-llama", "v1")]


# Hub failures ------------------------------------------------------------------

RESPONSE = httpx2.Response(
    404, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/name")
)
HUB_ERRORS = {
    RepositoryNotFoundError: lambda: RepositoryNotFoundError(
        "404 Client Error. Repository Not Found", response=RESPONSE
    ),
    GatedRepoError: lambda: GatedRepoError(
        "403 Access to model is restricted", response=RESPONSE
    ),
    RevisionNotFoundError: lambda: RevisionNotFoundError(
        "404 Client Error. Revision Not Found", response=RESPONSE
    ),
    LocalEntryNotFoundError: lambda: LocalEntryNotFoundError(
        "Cannot find the requested files in the disk cache"
    ),
    HFValidationError: lambda: HFValidationError("Repo id must be in the form"),
    requests.ConnectionError: lambda: requests.ConnectionError("Max retries exceeded"),
    httpx2.ConnectError: lambda: httpx2.ConnectError("Connection refused"),
}


def failing_hub(monkeypatch, cls):
    error = HUB_ERRORS[cls]()

    def snapshot_download(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return error


@pytest.mark.parametrize("cls", list(HUB_ERRORS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("entry", ["open_source", "load", "convert"])
def test_a_hub_failure_is_a_flash_error_and_the_hubs_own(
    tmp_path, monkeypatch, cls, entry
):
    original = failing_hub(monkeypatch, cls)
    monkeypatch.chdir(tmp_path)
    calls = {
        "open_source": lambda: open_source("org/name"),
        "load": lambda: load("org/name", progress=False),
        "convert": lambda: convert("org/name", tmp_path / "out", progress=False),
    }
    with pytest.raises(cls) as caught:  # what an mlx-lm user's except clause names
        calls[entry]()
    e = caught.value
    assert isinstance(e, FlashError) and isinstance(e, cls)
    assert type(e).__name__ == f"Flash{cls.__name__}"
    assert "'org/name'" in str(e) and "fix:" in str(e) and str(original) in str(e)
    assert e.fix and "check the repo id" in e.fix
    if hasattr(original, "response"):  # the hub's details stay readable
        assert e.response is original.response
    assert not (tmp_path / "out").exists()


def test_hub_error_classes_are_made_once(monkeypatch):
    classes = set()
    for _ in range(2):
        failing_hub(monkeypatch, RepositoryNotFoundError)
        with pytest.raises(FlashError) as e:
            open_source("org/name")
        classes.add(type(e.value))
    assert len(classes) == 1


def test_a_hub_failure_names_the_revision(monkeypatch):
    failing_hub(monkeypatch, RevisionNotFoundError)
    with pytest.raises(RevisionNotFoundError, match="at revision 'v9'"):
        open_source("org/name", revision="v9")


def test_the_convert_command_reports_a_hub_failure(monkeypatch, capsys):
    failing_hub(monkeypatch, RepositoryNotFoundError)
    with pytest.raises(SystemExit) as e:
        convert_main(["org/name", "--quiet"])
    assert e.value.code == 2
    assert "cannot get 'org/name' from the Hugging Face hub" in capsys.readouterr().err


# convert: mlx-lm's keywords ----------------------------------------------------


def test_convert_takes_mlx_lm_convert_parameters():
    ours = inspect.signature(convert).parameters
    for name, p in inspect.signature(mlx_lm_convert).parameters.items():
        assert name in ours, name
        assert list(ours).index(name) == list(
            inspect.signature(mlx_lm_convert).parameters
        ).index(name)
        if name != "hf_path":  # ours may come as `source` instead
            assert ours[name].default == p.default, name


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """The store writer's arguments, with nothing written."""
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return tmp_path / "store"

    monkeypatch.setattr(writer, "convert", fake)
    return calls


def test_convert_maps_mlx_lm_keywords_onto_the_store_writer(captured):
    recipe = "mixed_3_6"
    convert(
        hf_path="org/name",
        mlx_path="out",
        quantize=True,
        q_group_size=32,
        q_bits=3,
        dtype="bfloat16",
        revision="v1",
        quant_predicate=recipe,
        trust_remote_code=True,
        progress=False,
    )
    (kwargs,) = captured
    assert kwargs["source"] == "org/name" and kwargs["out"] == "out"
    assert kwargs["dtype"] == "bfloat16" and kwargs["revision"] == "v1"
    assert kwargs["quantization"] == {
        "bits": 3,
        "group_size": 32,
        "mode": "affine",
        "predicate": recipe,
    }
    assert "dequantize" not in kwargs


def test_convert_positional_arguments_are_mlx_lm_s(captured):
    convert("src", "out", True, 64, 8)
    (kwargs,) = captured
    assert kwargs["quantization"]["bits"] == 8
    assert kwargs["quantization"]["group_size"] == 64


def test_convert_keeps_its_own_keywords(captured):
    convert(source="src", out="o", ffn_format="q8", layout="gate", overwrite=True)
    (kwargs,) = captured
    assert (kwargs["source"], kwargs["out"]) == ("src", "o")
    assert kwargs["ffn_format"] == "q8" and kwargs["layout"] == "gate"
    assert kwargs["overwrite"] is True
    assert not {"dtype", "quantization", "dequantize"} & set(kwargs)


def test_convert_dequantize(captured):
    convert("src", "out", dequantize=True, dtype="float16")
    (kwargs,) = captured
    assert kwargs["dequantize"] is True and kwargs["dtype"] == "float16"
    assert "quantization" not in kwargs


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(hf_path="src", upload_repo="me/model"), "uploading to the hub"),
        (dict(hf_path="src", quantize=True, dequantize=True), "either quantize"),
        (dict(hf_path="src", dtype="float64"), "unknown dtype"),
        (dict(hf_path="src", source="other"), "disagree"),
        (dict(hf_path="src", mlx_path="a", out="b"), "disagree"),
        (dict(), "give hf_path"),
        (dict(hf_path="src", quantize=True, q_bits=7), "7 bits"),
        (dict(hf_path="src", quantize=True, q_mode="mxfp8", q_bits=4), "mxfp8"),
        (dict(hf_path="src", quantize=True, quant_predicate="mixed_1_2"), "recipe"),
    ],
)
def test_convert_refuses_clearly(captured, kwargs, message):
    with pytest.raises(FlashError, match=message):
        convert(**kwargs)
    assert captured == []  # before the writer reads anything


def test_convert_with_mlx_lm_keywords_writes_a_store(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    out = convert(
        hf_path=str(tmp_path / "hf"), mlx_path=str(tmp_path / "store"), progress=False
    )
    assert is_store(out)


# The convert command -----------------------------------------------------------


def test_convert_command_formats_are_the_stores():
    parser = convert_parser()
    for dest in ("ffn_format", "down_format"):
        action = next(a for a in parser._actions if a.dest == dest)
        assert tuple(action.choices) == FFN_FORMATS
    recipes = next(a for a in parser._actions if a.dest == "quant_predicate")
    assert list(recipes.choices) == QUANT_RECIPES


def test_convert_command_takes_mlx_lm_flags(captured, capsys):
    convert_main(
        ["--hf-path", "src", "--mlx-path", "out", "-q", "--q-bits", "6"]
        + ["--q-group-size", "32", "--dtype", "float16", "--quant-predicate"]
        + ["mixed_4_6", "--trust-remote-code", "--quiet"]
    )
    (kwargs,) = captured
    assert (kwargs["source"], kwargs["out"], kwargs["dtype"]) == (
        "src",
        "out",
        "float16",
    )
    assert kwargs["quantization"] == {
        "bits": 6,
        "group_size": 32,
        "mode": "affine",
        "predicate": "mixed_4_6",
    }
    convert_main(["src", "-d", "--quiet"])
    assert captured[1]["dequantize"] is True


@pytest.mark.parametrize(
    "argv,message",
    [
        (["./nope"], "no such file or directory"),
        (["~/models/typo.gguf"], "no such file or directory"),
        (["src", "--upload-repo", "me/model"], "uploading to the hub"),
        (["src", "-q", "-d"], "either quantize or dequantize"),
        (["src", "-q", "--q-bits", "7"], "7 bits"),
        (["src", "-q", "--q-mode", "nvfp4", "--q-group-size", "32"], "nvfp4"),
        (["src", "--q-mode", "int4"], "invalid choice: 'int4'"),
        (["src", "--ffn-format", "q7"], "invalid choice: 'q7'"),
        (["src", "--quant-predicate", "mixed"], "invalid choice: 'mixed'"),
        (["src", "--hf-path", "other"], "not both"),
        ([], "give a SOURCE"),
    ],
)
def test_convert_command_errors_exit_2(home, no_hub, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        convert_main(argv + ["--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# Flags at the boundary ---------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("8GiB", 8 << 30),
        ("500MB", 500 << 20),
        ("1.5G", 3 << 29),
        ("4096B", 4096),
        ("123456", 123456),
        (123456, 123456),
        ("0.5", 500),
        (0.5, 500),
        ("1", 1000),
        (1, 1000),
        ("125%", 1250),
        ("50 %", 500),
    ],
)
def test_parse_budget_reads_every_accepted_form(text, expected):
    assert parse_budget(text, 1000) == expected


BAD_BUDGETS = ["2.5", 2.5, "-5", -5, 0, "0", "0%", "-5%", "abc", "nan", "inf"]
BAD_BUDGETS += [float("nan"), float("inf"), "GiB", "500I", "1e9", "", True, 2e9]


@pytest.mark.parametrize("text", BAD_BUDGETS, ids=repr)
def test_parse_budget_refuses_everything_else(text):
    with pytest.raises(FlashError, match="cannot read the DRAM budget") as e:
        parse_budget(text, 1000)
    assert "125%" in e.value.fix and "(0, 1]" in e.value.fix


BAD_FLAGS = [
    (["--dram-budget", "2.5"], "--dram-budget: cannot read '2.5'"),
    (["--dram-budget", "-5"], "--dram-budget: cannot read '-5'"),
    (["--dram-budget", "0"], "--dram-budget: cannot read '0'"),
    (["--dram-budget", "abc"], "--dram-budget: cannot read 'abc'"),
    (["--dram-budget", "nan"], "--dram-budget: cannot read 'nan'"),
    (["--fraction", "1.5"], "--fraction: must be a share in (0, 1]"),
    (["--fraction", "0"], "--fraction: must be a share in (0, 1]"),
    (["--recall", "1"], "--recall: must be a share in (0, 1)"),
    (["--window", "0"], "--window: must be a whole number of tokens, at least 1"),
    (["--window", "2.5"], "--window: must be a whole number"),
    (["--threads", "0"], "--threads: must be a whole number, at least 1"),
    (["--gap", "-1"], "--gap: must be a whole number of neurons, at least 0"),
    (["--threshold", "inf"], "--threshold: must be a finite number"),
]


@pytest.mark.parametrize("command", ["generate", "chat", "server"])
@pytest.mark.parametrize("flag,message", BAD_FLAGS, ids=lambda x: " ".join(x))
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, command, flag, message):
    main = {"generate": generate_main, "chat": chat_main, "server": server_main}
    argv = ["--model", str(tmp_path / "nope")] + flag
    with pytest.raises(SystemExit) as e:
        main[command](argv + (["--prompt", "x"] if command == "generate" else []))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert [line for line in err.splitlines() if "error" in line] == [
        line for line in err.splitlines() if message in line
    ]


def test_good_flags_reach_load_unchanged():
    args = generate_parser().parse_args(
        ["--dram-budget", "125%", "--fraction", "0.25", "--window", "4"]
        + ["--threads", "2", "--recall", "0.9", "--gap", "0", "--threshold", "-1"]
    )
    assert args.dram_budget == "125%"  # load() scales it by the store's size
    assert (args.fraction, args.window, args.threads) == (0.25, 4, 2)
    assert (args.recall, args.gap, args.threshold) == (0.9, 0, -1.0)


def test_dram_budget_help_says_what_a_fraction_is_of():
    action = next(a for a in generate_parser()._actions if a.dest == "dram_budget")
    assert "fraction in (0, 1] of the store's size on disk" in action.help
    assert "125%" in action.help


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dram_budget=2.5), "cannot read the DRAM budget"),
        (dict(dram_budget="-5"), "cannot read the DRAM budget"),
        (dict(fraction=1.5), "fraction must be a share in"),
        (dict(fraction=float("nan")), "fraction must be"),
        (dict(recall=0.0), "recall must be"),
        (dict(window=0), "window must be"),
        (dict(window=2.0), "window must be a whole number"),
        (dict(threads=0), "threads must be"),
        (dict(threads=True), "threads must be"),
        (dict(gap=-1), "gap must be"),
        (dict(threshold=float("inf")), "threshold must be a finite number"),
    ],
)
def test_load_refuses_bad_options_before_reading_anything(
    tmp_path, no_hub, kwargs, message
):
    with pytest.raises(FlashError, match=message) as e:
        load(str(tmp_path / "nope"), progress=False, **kwargs)  # not "no such file"
    assert "fix:" in str(e.value)
