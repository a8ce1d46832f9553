"""load() from stores, sources and the hub cache; the generate/convert/inspect
commands."""

import shutil

import huggingface_hub
import mlx.core as mx
import mlx_lm
import pytest
from conftest import make_checkpoint

from mlx_flash import FlashError, generate, load, stream_generate
from mlx_flash.convert import main as convert_main
from mlx_flash.generate import main as generate_main
from mlx_flash.inspect import main as inspect_main
from mlx_flash.store.format import BUNDLES_NAME
from mlx_flash.store.reader import BundleReader, MmapReader
from mlx_flash.store.store import is_store
from mlx_flash.utils import cache_root

PROMPT = "the cat sat on the mat"


def test_load_converts_a_source_once_into_the_cache(tmp_path):
    make_checkpoint(tmp_path / "hf", "qwen3")
    model, tokenizer = load(str(tmp_path / "hf"), progress=False)
    stores = list((cache_root() / "stores").iterdir())
    assert len(stores) == 1 and is_store(stores[0])
    first = generate(model, tokenizer, PROMPT, max_tokens=8)
    model, tokenizer = load(str(tmp_path / "hf"), progress=False)  # reused, not redone
    assert list((cache_root() / "stores").iterdir()) == stores
    assert generate(model, tokenizer, PROMPT, max_tokens=8) == first


def test_hub_id_from_a_prefilled_offline_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    repo = hub / "models--tiny-org--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    make_checkpoint(repo / "snapshots" / revision, "llama")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    # What HF_HUB_CACHE=... HF_HUB_OFFLINE=1 set before start-up would do.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tokenizer, config = load(
        "tiny-org/tiny-llama", return_config=True, progress=False
    )
    assert config["model_type"] == "llama"
    assert len(generate(model, tokenizer, PROMPT, max_tokens=4)) > 0
    with pytest.raises(FlashError, match="cannot get 'tiny-org/absent'"):
        load("tiny-org/absent", progress=False)


def test_stream_generate_is_mlx_lms(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    model, tokenizer = load(str(tmp_path / "hf"), progress=False)
    dense, dense_tokenizer = mlx_lm.load(str(tmp_path / "hf"))
    dense.set_dtype(mx.float32)
    ours = list(stream_generate(model, tokenizer, PROMPT, max_tokens=6))
    theirs = list(mlx_lm.stream_generate(dense, dense_tokenizer, PROMPT, max_tokens=6))
    assert type(ours[-1]) is type(theirs[-1])
    assert [r.token for r in ours] == [r.token for r in theirs]
    assert ours[-1].finish_reason == theirs[-1].finish_reason


def test_generate_command(tmp_path, capsys):
    make_checkpoint(tmp_path / "hf", "llama")
    convert_main(
        [
            str(tmp_path / "hf"),
            "-o",
            str(tmp_path / "store"),
            "--ffn-format",
            "q8",
            "--quiet",
        ]
    )
    inspect_main([str(tmp_path / "store")])
    assert "matches its checksum" in capsys.readouterr().out
    argv = [
        "--model",
        str(tmp_path / "store"),
        "--prompt",
        PROMPT,
        "-m",
        "5",
        "--temp",
        "0",
    ]
    generate_main(argv + ["--stats", "--ignore-chat-template"])
    out = capsys.readouterr().out
    assert "Generation:" in out and "[mlx_flash] read" in out and "direct I/O" in out
    # A dense mlx-lm draft model with the same tokenizer.
    generate_main(argv + ["--draft-model", str(tmp_path / "hf")])
    assert "Generation:" in capsys.readouterr().out


@pytest.mark.parametrize("flag", [["--image", "x.png"], ["--quantize-activations"]])
def test_generate_command_refuses_inapplicable_flags(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        generate_main(["--model", str(tmp_path), "--prompt", "x"] + flag)
    assert e.value.code == 2
    assert "does not apply" in capsys.readouterr().err


def test_adapter_touching_the_ffn_is_refused(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    mx.save_safetensors(
        str(adapter / "adapters.safetensors"),
        {"model.layers.1.mlp.down_proj.lora_a": mx.zeros((4, 4))},
    )
    with pytest.raises(FlashError, match="changes the FFN"):
        load(str(tmp_path / "hf"), adapter_path=str(adapter), progress=False)


def test_convert_command_reports_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert_main([str(tmp_path / "absent"), "-o", str(tmp_path / "out")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["disk", "shm", "mmap"])
def test_reader_returns_exact_bytes_at_any_offset(tmp_path, where):
    base = tmp_path if where != "shm" else None
    if base is None:
        if not shutil.os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        import tempfile

        base = __import__("pathlib").Path(tempfile.mkdtemp(dir="/dev/shm"))
    data = bytes(range(256)) * 4096 + b"tail"  # not a multiple of 4 KiB
    path = base / BUNDLES_NAME
    path.write_bytes(data)
    reader = (MmapReader if where == "mmap" else BundleReader)(
        path, len(data) + 8192, 3
    )
    for offset, n in [
        (0, 10),
        (4095, 2),
        (5000, 3 << 20 // 3),
        (len(data) - 4, 4),
        (123, len(data) - 123),
    ]:
        assert bytes(reader.read(offset, n)) == data[offset : offset + n]
    reader.close()
    if where == "shm":
        shutil.rmtree(base)


@pytest.mark.parametrize("kind", [BundleReader, MmapReader])
def test_reader_reports_truncation(tmp_path, kind):
    path = tmp_path / BUNDLES_NAME
    path.write_bytes(b"x" * 8192)
    reader = kind(path, 1 << 16)
    with pytest.raises(FlashError, match="truncated"):
        reader.read(4096, 20000)
    reader.close()
