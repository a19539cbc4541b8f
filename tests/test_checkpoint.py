"""Orbax model checkpoints: bit-exact round trips, atomic saves, and clear errors for broken checkpoints;
the trainer's checkpoint store ignores interrupted (temporary) step directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from jspec.checkpoint import orbax_store
from jspec.checkpoint.hf import save_hf
from jspec.tokenizer import ByteTokenizer
from jspec.train import data as data_lib
from conftest import tiny_model

# Reading a deliberately truncated orbax file leaves a tensorstore callback for an asyncio loop that orbax has
# already closed; Python reports it at some later garbage collection. Harmless, and not what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _bits(leaf) -> np.ndarray:
    array = np.asarray(leaf)
    return array.view(np.uint16 if array.dtype.itemsize == 2 else np.uint32)


def assert_bit_equal(a: jspec.Model, b: jspec.Model) -> None:
    assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(_bits(x), _bits(y))


@pytest.fixture(scope="module")
def hf_tokenizer():
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass  # héllo\n"] * 5
    return data_lib.train_tokenizer(texts, vocab_size=300, min_frequency=1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_round_trip_is_bit_exact(tmp_path, dtype, family, hf_tokenizer):
    model = tiny_model(family, dtype=dtype, vocab_size=300, eos_token_ids=hf_tokenizer.eos_token_ids)
    model = model.replace(tokenizer=hf_tokenizer)
    orbax_store.save(model, tmp_path / "ckpt")
    restored = orbax_store.restore(tmp_path / "ckpt")
    assert_bit_equal(model, restored)
    assert restored.config == model.config
    assert restored.tokenizer == hf_tokenizer
    assert restored.tokenizer.eos_token_ids == hf_tokenizer.eos_token_ids
    text = "x = 'ünïcødé ✓'\n"
    assert restored.tokenizer.decode(restored.tokenizer.encode(text)) == text
    assert orbax_store.is_checkpoint(tmp_path / "ckpt")
    # The restored model computes the same logits.
    tokens = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    positions = jnp.arange(4)[None]
    np.testing.assert_array_equal(model.forward(tokens, positions)[0], restored.forward(tokens, positions)[0])


def test_byte_tokenizer_and_dtype_cast(tmp_path):
    model = tiny_model("llama", vocab_size=259).replace(tokenizer=ByteTokenizer())
    orbax_store.save(model, tmp_path / "ckpt")
    restored = orbax_store.restore(tmp_path / "ckpt", dtype="bfloat16")
    assert isinstance(restored.tokenizer, ByteTokenizer)
    assert restored.config.dtype == "bfloat16"
    for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(restored.params)):
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(_bits(x.astype(jnp.bfloat16)), _bits(y))
    no_tokenizer = tiny_model("llama")
    orbax_store.save(no_tokenizer, tmp_path / "bare")
    assert orbax_store.restore(tmp_path / "bare").tokenizer is None


def test_existing_path_needs_overwrite(tmp_path):
    model = tiny_model("llama")
    orbax_store.save(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="already exists and is not empty.*overwrite=True"):
        orbax_store.save(model, tmp_path / "ckpt")
    other = tiny_model("llama", seed=1)
    orbax_store.save(other, tmp_path / "ckpt", overwrite=True)
    assert_bit_equal(other, orbax_store.restore(tmp_path / "ckpt"))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or old directories left


class Interrupted(Exception):
    pass


def _interrupt(tmp: Path) -> None:
    assert (tmp / "manifest.json").is_file()  # everything is written, only the rename is missing
    raise Interrupted


def test_interrupted_save_leaves_nothing_that_restores(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(Interrupted):
        orbax_store.save(model, tmp_path / "ckpt", _before_rename=_interrupt)
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory was cleaned up
    with pytest.raises(ValueError, match="does not exist"):
        orbax_store.restore(tmp_path / "ckpt")


def test_killed_save_leftovers_never_restore(tmp_path):
    """A process killed before the rename leaves a temporary sibling (no cleanup runs); the target path
    does not exist, and the half-written directory itself lacks the manifest until the very end."""
    model = tiny_model("llama")
    leftovers = []

    def kill(tmp: Path) -> None:
        copy = tmp_path / "leftover"
        shutil.copytree(tmp, copy)
        (copy / "manifest.json").unlink()  # killed before the manifest (the last file) was written
        leftovers.append(copy)
        raise Interrupted

    with pytest.raises(Interrupted):
        orbax_store.save(model, tmp_path / "ckpt", _before_rename=kill)
    with pytest.raises(ValueError, match="does not exist"):
        orbax_store.restore(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="no manifest.json"):
        orbax_store.restore(leftovers[0])


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path):
    old = tiny_model("llama", seed=0)
    orbax_store.save(old, tmp_path / "ckpt")
    with pytest.raises(Interrupted):
        orbax_store.save(tiny_model("llama", seed=1), tmp_path / "ckpt", overwrite=True, _before_rename=_interrupt)
    assert_bit_equal(old, orbax_store.restore(tmp_path / "ckpt"))


# --- nothing a user saved is destroyed: save / save_hf refuse a non-empty directory, and replace atomically -------


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (hidden ones included), by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _foreign(directory: Path) -> dict[str, bytes]:
    """A directory of someone's files (a notes file, a nested folder, a config.json that is not ours)."""
    (directory / "sub").mkdir(parents=True)
    (directory / "notes.txt").write_text("my notes\n")
    (directory / "config.json").write_text('{"mine": true}\n')
    (directory / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return _snapshot(directory)


WRITERS = {"save": orbax_store.save, "jspec.save": jspec.save, "save_hf": save_hf}  # jspec.load reads both formats


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_writers_refuse_a_non_empty_directory_and_leave_it_intact(tmp_path, writer):
    before = _foreign(tmp_path / "mine")
    with pytest.raises(ValueError, match=r"^path: directory '.*mine' already exists and is not empty .*overwrite=True"):
        WRITERS[writer](tiny_model("llama"), tmp_path / "mine")
    assert _snapshot(tmp_path / "mine") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary directory left behind


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_writers_fill_an_empty_directory_and_refuse_a_file(tmp_path, writer):
    model = tiny_model("llama")
    (tmp_path / "empty").mkdir()
    WRITERS[writer](model, tmp_path / "empty")
    assert_bit_equal(model, jspec.load(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="^path: .*is a file, not a directory"):
        WRITERS[writer](model, tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"


def test_save_hf_never_writes_into_a_jspec_checkpoint(tmp_path):
    """The known bug: save_hf into a jspec.save directory overwrote its config.json; the checkpoint stopped loading."""
    old, new = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    jspec.save(old, tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="^path: .*ckpt' already exists and is not empty"):
        save_hf(new, tmp_path / "ckpt")
    assert _snapshot(tmp_path / "ckpt") == before
    assert_bit_equal(old, jspec.load(tmp_path / "ckpt"))
    save_hf(new, tmp_path / "ckpt", overwrite=True)  # asked: the directory becomes the HF model, nothing of the old
    assert not orbax_store.is_checkpoint(tmp_path / "ckpt") and not (tmp_path / "ckpt" / "params").exists()
    assert_bit_equal(new, jspec.load(tmp_path / "ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_overwrite_replaces_a_foreign_directory_whole(tmp_path, writer):
    _foreign(tmp_path / "mine")
    model = tiny_model("llama", seed=2)
    WRITERS[writer](model, tmp_path / "mine", overwrite=True)
    assert not (tmp_path / "mine" / "notes.txt").exists() and not (tmp_path / "mine" / "sub").exists()
    assert_bit_equal(model, jspec.load(tmp_path / "mine"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # the old content and the temporary are gone


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_interrupted_swap_keeps_the_old_content(tmp_path, writer, monkeypatch):
    """An error between the two renames of the swap (the old directory moved aside, the new one not yet in
    place) moves the old directory back: it loads as before and nothing else is left."""
    from jspec.checkpoint import directories

    old = tiny_model("llama", seed=0)
    WRITERS[writer](old, tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    swap = directories.replace_directory

    def interrupted_swap(source, destination):
        def interrupt():
            assert not destination.exists()  # really between the renames
            raise Interrupted

        swap(source, destination, _between_renames=interrupt)

    monkeypatch.setattr(directories, "replace_directory", interrupted_swap)
    with pytest.raises(Interrupted):
        WRITERS[writer](tiny_model("llama", seed=1), tmp_path / "ckpt", overwrite=True)
    assert _snapshot(tmp_path / "ckpt") == before
    assert_bit_equal(old, jspec.load(tmp_path / "ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_overwrite_refuses_the_working_directory(tmp_path, monkeypatch):
    _foreign(tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(ValueError, match="holds the current working directory"):
        jspec.save(tiny_model("llama"), tmp_path, overwrite=True)
    with pytest.raises(ValueError, match="holds the current working directory"):
        jspec.save(tiny_model("llama"), ".", overwrite=True)
    assert (tmp_path / "here" / "notes.txt").is_file()


@pytest.fixture
def saved(tmp_path, hf_tokenizer) -> Path:
    model = tiny_model("llama", vocab_size=300).replace(tokenizer=hf_tokenizer)
    return orbax_store.save(model, tmp_path / "ckpt")


def _data_files(path: Path) -> list[Path]:
    files = [p for p in (path / "params").rglob("*") if p.is_file() and p.stat().st_size > 0]
    big = [p for p in files if p.parent.name == "d" or "ocdbt" in str(p.parent)]
    return sorted(big or files, key=lambda p: -p.stat().st_size)


def test_truncated_params_file_raises(saved):
    target = _data_files(saved)[0]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="checkpoint .*(could not be read|checksum)"):
        orbax_store.restore(saved)


def test_corrupted_params_bytes_raise(saved):
    target = _data_files(saved)[0]
    data = bytearray(target.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 64):
        data[offset] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checkpoint .*(could not be read|checksum)"):
        orbax_store.restore(saved)


def test_deleted_params_raise(saved):
    shutil.rmtree(saved / "params")
    with pytest.raises(ValueError, match="params/ directory is missing"):
        orbax_store.restore(saved)


def test_corrupted_manifest_raises(saved):
    (saved / "manifest.json").write_text('{"format": "jspec-orbax-model", "vers')
    with pytest.raises(ValueError, match="manifest.json is unreadable or corrupted"):
        orbax_store.restore(saved)


def test_wrong_format_version_raises(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["version"] = 999
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 999"):
        orbax_store.restore(saved)


def test_mismatched_config_raises(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["config"]["hidden_size"] = 48
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="config.json differs from the manifest in \\['hidden_size'\\]"):
        orbax_store.restore(saved)
    (saved / "config.json").write_text(json.dumps(manifest["config"]))
    with pytest.raises(ValueError, match="leaf 'embed' has shape"):
        orbax_store.restore(saved)


def test_tampered_checksum_and_tokenizer_raise(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["leaves"][3]["sha256"] = "0" * 64
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"leaf {manifest['leaves'][3]['path']!r} fails its checksum"):
        orbax_store.restore(saved)
    assert orbax_store.restore(saved, verify=False) is not None


def test_tampered_tokenizer_raises(saved):
    text = (saved / "tokenizer.json").read_text()
    (saved / "tokenizer.json").write_text(text.replace('"<|endoftext|>"', '"<|eot|>"', 1))
    with pytest.raises(ValueError, match="tokenizer.json fails its checksum"):
        orbax_store.restore(saved)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        orbax_store.restore(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no manifest.json"):
        orbax_store.restore(tmp_path / "empty")
    assert not orbax_store.is_checkpoint(tmp_path / "empty")


def test_trainer_store_ignores_interrupted_steps(tmp_path):
    from jspec.train.trainer import CheckpointStore, TrainState

    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3)}
    state = TrainState(step=jnp.asarray(5, jnp.int32), params=params, opt_state={"m": jnp.ones(3)})
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    store.save(state, {"step": 5, "data_position": 5})
    # What a save killed before orbax's final rename leaves behind: a temporary step directory.
    (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234567").mkdir()
    (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234567" / "junk").write_text("partial")
    assert store.latest_step() == 5
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored, meta = store.restore(abstract)
    assert int(restored.step) == 5 and meta["data_position"] == 5
    np.testing.assert_array_equal(restored.params["w"], params["w"])
    for step in (6, 7, 8):
        store.save(state.replace(step=jnp.asarray(step, jnp.int32)), {"step": step, "data_position": step})
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [7, 8]  # max_to_keep
    store.close()
