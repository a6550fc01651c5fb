"""The streaming merge end to end on tiny checkpoints: spec identities over whole models, both
key layouts, loading with transformers, untouched vision weights, determinism, caching, and
every error case leaving no output behind."""

import builtins
import errno
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusion.checkpoint import open_checkpoint
from fusion.errors import FusionError
from fusion.merge import RECIPE_FILE, REPORT_FILE, fuse, inspect_pair
from fusion.output import damage
from tiny_models import BASE_VOCAB, IMAGE_TOKEN, build_pair, load_llava, write_checkpoint

LAYOUTS = ["llava", "nested", "llm"]
SMALL_SHARDS = 24_000  # bytes: several output shards even for tiny models


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def lm_name(name: str) -> str | None:
    """Base-LLM name of a tensor in any layout (None: vision tower / projector)."""
    for prefix, repl in (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."), ("model.language_model.", "model.")):
        if name.startswith(prefix):
            return repl + name[len(prefix) :]
    if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")):
        return None
    return name


@pytest.fixture(scope="module", params=LAYOUTS)
def tiny(request, tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp(request.param), layout=request.param)


def merged(tiny, tmp_path, method, **params):
    return fuse(str(tiny.tuned), str(tiny.base), method, params, tmp_path / "out", shard_bytes=SMALL_SHARDS)


def assert_lm_equals(out: dict, reference: dict, tuned: dict):
    """Every language-model tensor of ``out`` equals ``reference`` (base names) on the base
    vocabulary rows, and everything else equals the tuned model."""
    for name, value in out.items():
        base_name = lm_name(name)
        if base_name is None:
            assert torch.equal(value, tuned[name]), name
            continue
        ref = reference[base_name]
        assert torch.equal(value[: ref.shape[0]], ref), name
        assert torch.equal(value[ref.shape[0] :], tuned[name][ref.shape[0] :]), name


def test_task_arithmetic_lambda_one_is_the_tuned_model_bit_for_bit(tiny, tmp_path):
    result = merged(tiny, tmp_path, "task_arithmetic", **{"lambda": 1})
    out, tuned = tensors(result.path), tensors(tiny.tuned)
    assert out.keys() == tuned.keys()
    assert all(torch.equal(out[k], tuned[k]) for k in out)
    assert len(list(result.path.glob("*.safetensors"))) > 2


def test_task_arithmetic_lambda_zero_is_the_base(tiny, tmp_path):
    result = merged(tiny, tmp_path, "task_arithmetic", **{"lambda": 0})
    assert_lm_equals(tensors(result.path), tensors(tiny.base), tensors(tiny.tuned))


def test_neuron_fusion_top_ratio_one_is_the_tuned_model(tiny, tmp_path):
    out, tuned = tensors(merged(tiny, tmp_path, "neuron_fusion", top_ratio=1).path), tensors(tiny.tuned)
    assert all(torch.equal(out[k], tuned[k]) for k in tuned)


@pytest.mark.parametrize("inner", ["task_arithmetic", "ties", "breadcrumbs"])
def test_neuron_fusion_nothing_located_no_change_is_the_base_in_the_tuned_shell(tiny, tmp_path, inner):
    result = merged(tiny, tmp_path, "neuron_fusion", top_ratio=0, suppress=0, inner=inner)
    assert_lm_equals(tensors(result.path), tensors(tiny.base), tensors(tiny.tuned))


def test_neuron_fusion_restores_exactly_the_planted_neurons(tiny, tmp_path):
    # 2 of 64 FFN neurons and 1 of 32 value neurons per layer were given a large change
    result = merged(tiny, tmp_path, "neuron_fusion", top_ratio=1 / 32, suppress=0, others="inner")
    out, base, tuned = tensors(result.path), tensors(tiny.base), tensors(tiny.tuned)
    by_base = {lm_name(k): k for k in out if lm_name(k)}
    for base_name, hot in tiny.hot.items():
        axis = 1 if base_name.endswith(("down_proj.weight", "o_proj.weight")) else 0
        value, tuned_value = out[by_base[base_name]], tuned[by_base[base_name]]
        changed = [i for i in range(value.shape[axis]) if not torch.equal(value.select(axis, i), base[base_name].select(axis, i))]
        assert changed == hot, base_name
        assert all(torch.equal(value.select(axis, i), tuned_value.select(axis, i)) for i in hot)
    report = json.loads((result.path / REPORT_FILE).read_text())["kinds"]
    ffn = [k for k in report if k["kind"] == "ffn"]
    assert [k["located"] for k in ffn] == [2, 2] and all(k["neurons"] == 64 for k in ffn)


@pytest.mark.parametrize("method", ["neuron_fusion", "neu-p-bread", "ties", "breadcrumbs", "dare", "della"])
def test_vision_tower_and_projector_bytes_untouched(tiny, tmp_path, method):
    result = merged(tiny, tmp_path, method)
    out, tuned = tensors(result.path), tensors(tiny.tuned)
    vision = [k for k in tuned if lm_name(k) is None]
    if "llm" in str(tiny.tuned):
        assert vision == []
    else:
        suffixes = ("embeddings.patch_embedding.weight", "multi_modal_projector.linear_1.weight")
        assert all(any(k.endswith(suffix) for k in vision) for suffix in suffixes)
    assert all(torch.equal(out[k], tuned[k]) for k in vision)
    assert out.keys() == tuned.keys()
    assert all(out[k].dtype == tuned[k].dtype and out[k].shape == tuned[k].shape for k in out)
    changed = [k for k in out if lm_name(k) and not torch.equal(out[k], tuned[k])]
    assert len(changed) > len(out) // 4  # the language model really was merged


def test_merged_llava_loads_and_generates(tmp_path_factory):
    for layout in ("llava", "nested"):
        pair = build_pair(tmp_path_factory.mktemp(f"gen-{layout}"), layout=layout)
        result = fuse(str(pair.tuned), str(pair.base), "neu-p-taska", out=pair.tuned.parent / "fused", shard_bytes=SMALL_SHARDS)
        model = load_llava(result.path).eval()
        lm_head = tensors(result.path)["language_model.lm_head.weight" if layout == "llava" else "lm_head.weight"]
        torch.testing.assert_close(model.get_output_embeddings().weight, lm_head)
        image_tokens = (28 // 14) ** 2  # one token per vision patch
        ids = torch.tensor([[1] + [IMAGE_TOKEN] * image_tokens + [5, 7, 9]])
        pixels = torch.randn(1, 3, 28, 28, dtype=model.dtype)
        with torch.no_grad():
            text_only = model.generate(input_ids=torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
            with_image = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, do_sample=False)
        assert text_only.shape == (1, 7) and with_image.shape == (1, ids.shape[1] + 4)
        assert int(text_only.max()) < BASE_VOCAB + 4


@pytest.mark.parametrize("method", ["dare", "della", "neu-p-bread"])
def test_same_seed_same_bytes_other_seed_other_bytes(tiny, tmp_path, method):
    paths = [fuse(str(tiny.tuned), str(tiny.base), method, {}, tmp_path / name, seed=seed, shard_bytes=SMALL_SHARDS).path for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    files = sorted(p.name for p in paths[0].glob("*.safetensors"))
    assert files and files == sorted(p.name for p in paths[1].glob("*.safetensors"))
    read = [b"".join((p / f).read_bytes() for f in files) for p in paths]
    assert read[0] == read[1]
    if method != "neu-p-bread":  # breadcrumbs draws nothing at random
        assert read[0] != read[2]


def test_recipe_recorded_and_output_reused(tiny, tmp_path):
    first = merged(tiny, tmp_path, "ties", density=0.3)
    recipe = json.loads((first.path / RECIPE_FILE).read_text())
    assert recipe["method"] == "ties" and recipe["params"] == {"density": 0.3, "lambda": 1.0}
    assert recipe["tuned"] == str(tiny.tuned) and recipe["version"]
    header = (first.path / sorted(p.name for p in first.path.glob("*.safetensors"))[0]).read_bytes()
    meta = json.loads(header[8 : 8 + struct.unpack("<Q", header[:8])[0]])["__metadata__"]
    assert meta["format"] == "pt" and json.loads(meta["fusion_recipe"])["params"]["density"] == 0.3
    assert (first.path / "config.json").read_text() == (tiny.tuned / "config.json").read_text()
    again = merged(tiny, tmp_path, "ties", density=0.3)
    assert again.reused and again.path == first.path
    with pytest.raises(FusionError, match="already exists and holds something else"):
        merged(tiny, tmp_path, "ties", density=0.4)


def test_cache_dir_keys_by_recipe(tiny, tmp_path):
    a = fuse(str(tiny.tuned), str(tiny.base), "dare", cache_dir=tmp_path)
    b = fuse(str(tiny.tuned), str(tiny.base), "dare", cache_dir=tmp_path)
    c = fuse(str(tiny.tuned), str(tiny.base), "dare", seed=1, cache_dir=tmp_path)
    assert b.reused and a.path == b.path and c.path != a.path and not c.reused
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.path.name, c.path.name])


def test_inspect_reports_every_layer_and_kind(tiny):
    report = inspect_pair(str(tiny.tuned), str(tiny.base), {"top_ratio": 1 / 32})
    kinds = {(k["layer"], k["kind"]) for k in report["kinds"]}
    assert {(0, "ffn"), (1, "ffn"), (0, "attn_v"), (1, "attn_q"), (None, "embed_tokens")} <= kinds
    assert report["summary"]["located"] == sum(k["located"] for k in report["kinds"])
    assert 0 < report["summary"]["located_share"] < 1


def test_grouped_query_attention_pair_merges(tmp_path):
    pair = build_pair(tmp_path, layout="llava", kv_heads=2)
    result = fuse(str(pair.tuned), str(pair.base), "neuron_fusion", {"top_ratio": 1}, tmp_path / "out")
    assert {k["kind"] for k in result.report} >= {"attn_v", "attn_o"}
    out, tuned = tensors(result.path), tensors(pair.tuned)
    assert all(torch.equal(out[k], tuned[k]) for k in tuned)


# --- errors: a clear message, and nothing left behind ---------------------------------------


def expect_error(root: Path, tuned: Path, base: Path, fragment: str, method="ties", **params):
    """The merge into ``root/out`` fails with ``fragment`` in its message and adds nothing to
    ``root`` (no output, no staging directory)."""
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(FusionError) as err:
        fuse(str(tuned), str(base), method, params, root / "out")
    assert fragment in str(err.value)
    assert sorted(p.name for p in root.iterdir()) == before
    return str(err.value)


@pytest.fixture
def fresh(tmp_path):
    return build_pair(tmp_path, layout="llava")


def test_error_hidden_size_differs(fresh, tmp_path):
    other = build_pair(tmp_path / "other", layout="llm")
    cfg = json.loads((other.base / "config.json").read_text())
    cfg["hidden_size"] = 64
    (other.base / "config.json").write_text(json.dumps(cfg))
    message = expect_error(tmp_path, fresh.tuned, other.base, "differ in hidden_size")
    assert "64" in message and "config.json" in message


def test_error_architecture_differs(fresh, tmp_path):
    cfg = json.loads((fresh.base / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (fresh.base / "config.json").write_text(json.dumps(cfg))
    expect_error(tmp_path, fresh.tuned, fresh.base, "differ in model_type")


def test_error_language_model_tensor_missing_in_base(fresh, tmp_path):
    base = open_checkpoint(str(fresh.base))
    kept = {k: base.get(k).clone() for k in base.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    write_checkpoint(tmp_path / "base2", kept, base.config)
    message = expect_error(tmp_path, fresh.tuned, tmp_path / "base2", "model.layers.1.mlp.up_proj.weight")
    assert "language_model.model.layers.1.mlp.up_proj.weight" in message


def test_error_irreconcilable_shapes(fresh, tmp_path):
    base = open_checkpoint(str(fresh.base))
    tensors_ = {k: base.get(k).clone() for k in base.keys()}
    tensors_["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32, dtype=torch.bfloat16)
    write_checkpoint(tmp_path / "base2", tensors_, base.config)
    expect_error(tmp_path, fresh.tuned, tmp_path / "base2", "cannot reconcile the shape of 'language_model.model.layers.0.self_attn.q_proj.weight'")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_error_corrupt_or_truncated_safetensors(fresh, tmp_path, damage):
    shard = sorted(fresh.tuned.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    expect_error(tmp_path, fresh.tuned, fresh.base, shard.name)


def test_error_parameter_out_of_range_writes_nothing(fresh, tmp_path):
    expect_error(tmp_path, fresh.tuned, fresh.base, "'density' of method 'ties' is 1.5", density=1.5)


def pickled_base(fresh, root: Path) -> Path:
    """The tiny base as one pickle ``pytorch_model.bin`` (as Vicuna v1.5 ships its weights)."""
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((fresh.base / "config.json").read_text())
    base = open_checkpoint(str(fresh.base))
    torch.save({k: base.get(k).clone() for k in base.keys()}, pickled / "pytorch_model.bin")
    return pickled


def test_pickle_weights_are_read_tensors_only_with_a_notice(fresh, tmp_path, caplog):
    pickled = pickled_base(fresh, tmp_path)
    with caplog.at_level("WARNING", logger="fusion"):
        result = fuse(str(fresh.tuned), str(pickled), "ties", out=tmp_path / "ok")
    assert any("pytorch_model.bin" in r.getMessage() and "weights_only" in r.getMessage() for r in caplog.records)
    reference = fuse(str(fresh.tuned), str(fresh.base), "ties", out=tmp_path / "reference")
    out, expected = tensors(result.path), tensors(reference.path)
    assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in out)


def test_error_pickle_refused_when_turned_off(fresh, tmp_path):
    pickled = pickled_base(fresh, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FusionError, match="--no-pickle") as err:
        fuse(str(fresh.tuned), str(pickled), "ties", out=tmp_path / "out", allow_pickle=False)
    assert "pytorch_model.bin" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


class _RunsCode:
    """A pickle that would call a function when unpickled (what weights_only refuses)."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_error_pickle_that_runs_code_is_refused(fresh, tmp_path, capsys):
    pickled = pickled_base(fresh, tmp_path)
    torch.save({"model.embed_tokens.weight": _RunsCode()}, pickled / "pytorch_model.bin")
    message = expect_error(tmp_path, fresh.tuned, pickled, "pytorch_model.bin")
    assert "this ran while loading" not in capsys.readouterr().out
    assert "refused: it asks for 'print', which is not a tensor or plain type and could run code when loaded" in message
    assert "convert the checkpoint to safetensors" in message and "\n" not in message


def test_a_damaged_pickle_is_called_damaged(fresh, tmp_path):
    import io
    import zipfile

    pickled = pickled_base(fresh, tmp_path)
    whole = (pickled / "pytorch_model.bin").read_bytes()
    damaged = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(whole)) as zin, zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data[:10] + bytes(b ^ 0x5A for b in data[10:30]) + data[30:] if info.filename.endswith("data.pkl") else data)
    (pickled / "pytorch_model.bin").write_bytes(damaged.getvalue())
    message = expect_error(tmp_path, fresh.tuned, pickled, "not a readable PyTorch weights file (corrupt or truncated?")
    assert "run code" not in message


def test_error_shard_listed_in_the_index_is_missing(fresh, tmp_path):
    shard = sorted(fresh.tuned.glob("*.safetensors"))[1]
    shard.unlink()
    message = expect_error(tmp_path, fresh.tuned, fresh.base, f"lists shard {shard.name}, which is missing")
    assert "model.safetensors.index.json" in message


def test_files_outside_the_index_are_ignored(fresh, tmp_path):
    from safetensors.torch import save_file

    save_file({"language_model.model.stray.weight": torch.ones(3)}, str(fresh.tuned / "stray.safetensors"))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.ones(3)}, str(fresh.base / "consolidated.safetensors"))
    result = fuse(str(fresh.tuned), str(fresh.base), "ties", out=tmp_path / "out")
    assert not any("stray" in k for k in tensors(result.path))


def test_error_index_names_a_tensor_its_shard_lacks(fresh, tmp_path):
    index_file = fresh.tuned / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(f for f in set(index["weight_map"].values()) if f != shard)
    index["weight_map"][name] = other
    index_file.write_text(json.dumps(index))
    expect_error(tmp_path, fresh.tuned, fresh.base, f"lists tensor '{name}'")


def test_error_unreachable_hub_without_local_copy(fresh, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, local_files_only=False, **kwargs):
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        raise ConnectionError("connection refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    message = expect_error(tmp_path, fresh.tuned, Path("lmsys/vicuna-7b-v1.5"), "cannot fetch 'lmsys/vicuna-7b-v1.5'")
    assert "connection refused" in message and "local Hugging Face cache" in message


def test_error_not_a_model_reference(fresh, tmp_path):
    expect_error(tmp_path, fresh.tuned, tmp_path / "no" / "such" / "dir", "no such directory")


def test_failure_midway_removes_the_partial_output(fresh, tmp_path, monkeypatch):
    import fusion.merge

    real, calls = fusion.merge._merge_tensor, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise FusionError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(fusion.merge, "_merge_tensor", failing)
    expect_error(tmp_path, fresh.tuned, fresh.base, "disk full")
    assert len(calls) == 6


# --- the output: verified reuse, leftovers of killed merges, one builder, one-line I/O errors --


def assert_complete(result, reference: Path) -> None:
    """``result`` holds every file its recipe records, with its size, and the same tensors as the
    ``reference`` output."""
    recipe = json.loads((result.path / RECIPE_FILE).read_text())
    assert damage(result.path, recipe["files"]) is None
    assert set(recipe["files"]) | {RECIPE_FILE} == {p.name for p in result.path.iterdir()}
    out, expected = tensors(result.path), tensors(reference)
    assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in out)


def tree(root: Path) -> list[str]:
    """Everything under ``root``, hidden files included: what a failure must leave as it was."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("where", ["out", "cache"])
@pytest.mark.parametrize("harm", ["truncate", "delete"])
def test_damaged_output_is_rebuilt_not_served(fresh, tmp_path, where, harm, caplog):
    target = {"out": tmp_path / "out"} if where == "out" else {"cache_dir": tmp_path / "cache"}
    first = fuse(str(fresh.tuned), str(fresh.base), "ties", shard_bytes=SMALL_SHARDS, **target)
    (tmp_path / "reference").mkdir()
    for file in first.path.iterdir():
        (tmp_path / "reference" / file.name).write_bytes(file.read_bytes())
    shard = sorted(first.path.glob("*.safetensors"))[1]
    if harm == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.unlink()
    with caplog.at_level("WARNING", logger="fusion"):
        again = fuse(str(fresh.tuned), str(fresh.base), "ties", shard_bytes=SMALL_SHARDS, **target)
    assert not again.reused and again.path == first.path
    assert any(shard.name in r.getMessage() and "building it again" in r.getMessage() for r in caplog.records)
    assert_complete(again, tmp_path / "reference")
    load_llava(again.path)
    assert fuse(str(fresh.tuned), str(fresh.base), "ties", shard_bytes=SMALL_SHARDS, **target).reused


@pytest.mark.parametrize("other", ["foreign-file", "no-file-list"])
def test_damaged_output_holding_other_files_is_left_to_its_owner(fresh, tmp_path, other):
    out = fuse(str(fresh.tuned), str(fresh.base), "ties", {}, tmp_path / "out", shard_bytes=SMALL_SHARDS).path
    if other == "foreign-file":
        sorted(out.glob("*.safetensors"))[0].unlink()
        (out / "notes.txt").write_text("mine")
    else:  # as written before outputs listed their files
        recipe = json.loads((out / RECIPE_FILE).read_text())
        (out / RECIPE_FILE).write_text(json.dumps({k: v for k, v in recipe.items() if k != "files"}))
    before = tree(out)
    with pytest.raises(FusionError, match="unverified .* and files its recipe does not list") as err:
        fuse(str(fresh.tuned), str(fresh.base), "ties", {}, out, shard_bytes=SMALL_SHARDS)
    assert str(out) in str(err.value) and tree(out) == before


KILLED_MERGE = """
import sys, time
from fusion.merge import fuse

def pause(progress):
    if progress.done:  # the first tensor is on its way to disk
        print("paused", flush=True)
        time.sleep(600)

fuse(sys.argv[1], sys.argv[2], "ties", {}, sys.argv[3], shard_bytes=24_000, progress=pause)
"""


@pytest.mark.parametrize("existing", [False, True], ids=["beside", "inside-existing-dir"])
def test_merge_killed_midway_leaves_nothing_the_next_merge_does_not_remove(fresh, tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_MERGE, str(fresh.tuned), str(fresh.base), str(out)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout.readline() == "paused\n"
    finally:
        proc.kill()
        proc.wait()
    staged = list((out if existing else tmp_path).glob(".out.partial-*"))
    assert len(staged) == 1 and json.loads((staged[0] / ".owner.json").read_text())["pid"] == proc.pid
    result = fuse(str(fresh.tuned), str(fresh.base), "ties", {}, out, shard_bytes=SMALL_SHARDS)
    assert not result.reused and not staged[0].exists()
    assert not [p.name for p in (*tmp_path.iterdir(), *out.iterdir()) if p.name.startswith(".")]  # nor the lock
    reference = fuse(str(fresh.tuned), str(fresh.base), "ties", {}, tmp_path / "reference", shard_bytes=SMALL_SHARDS)
    assert_complete(result, reference.path)


@pytest.mark.parametrize("where", ["out", "cache"])
def test_concurrent_merges_of_one_output_build_it_once(fresh, tmp_path, where):
    target = {"out": tmp_path / "out"} if where == "out" else {"cache_dir": tmp_path / "cache"}
    start, results, errors = threading.Barrier(2), [], []

    def merge():
        start.wait()
        try:  # a slow merge, so the second one arrives while the first is building
            results.append(fuse(str(fresh.tuned), str(fresh.base), "ties", shard_bytes=SMALL_SHARDS, progress=lambda p: time.sleep(0.01), **target))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=merge) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.reused for r in results) == [False, True] and results[0].path == results[1].path
    assert not [p.name for p in results[0].path.parent.iterdir() if p.name.startswith(".")]  # no staging, no lock


def test_merge_into_an_existing_empty_directory_keeps_that_directory(fresh, tmp_path, monkeypatch):
    mount = tmp_path / "mnt"
    mount.mkdir()
    inode, real_rename = mount.stat().st_ino, os.rename

    def rename(src, dst, *args, **kwargs):  # a mount point cannot be renamed over
        if Path(dst) == mount:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(dst))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    result = fuse(str(fresh.tuned), str(fresh.base), "ties", {}, mount, shard_bytes=SMALL_SHARDS)
    assert result.path == mount and mount.stat().st_ino == inode
    assert not [p.name for p in (*tmp_path.iterdir(), *mount.iterdir()) if p.name.startswith(".")]
    monkeypatch.undo()
    assert_complete(result, fuse(str(fresh.tuned), str(fresh.base), "ties", {}, tmp_path / "reference", shard_bytes=SMALL_SHARDS).path)


def refuse_opening(monkeypatch, code: int, where) -> None:
    """Opening a file for which ``where(path)`` holds fails with ``code``, as on a read-only or
    full disk (as root, file modes stop nothing)."""
    real = builtins.open

    def guarded(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and where(Path(file)):
            raise OSError(code, os.strerror(code), str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)


def read_only(monkeypatch, directory: Path) -> None:
    """``directory`` takes no new files: mode 0o555 (undone by the test), and as root, whom modes
    do not stop, a simulated EROFS."""
    directory.chmod(0o555)
    if os.geteuid() == 0:
        refuse_opening(monkeypatch, errno.EROFS, lambda path: path.is_relative_to(directory))


class _FullOnClose:
    """A shard whose last buffered bytes the disk refuses: only ``close`` fails."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def write(self, data) -> int:
        return self.handle.write(data)

    def close(self) -> None:
        self.handle.close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_on_last_close(monkeypatch, tmp: Path) -> None:
    """The last output shard fails as it is closed, after the writer's loop: an error there must
    not be lost (the output would be published as complete)."""
    real = builtins.open

    def opening(file, mode="r", *args, **kwargs):
        handle = real(file, mode, *args, **kwargs)
        parts = Path(file).stem.split("-")  # model-0000i-of-0000n
        last = Path(file).name == "model.safetensors" or (len(parts) == 4 and parts[1] == parts[3])
        return _FullOnClose(handle) if "w" in mode and last and tmp in Path(file).parents else handle

    monkeypatch.setattr(builtins, "open", opening)


IO_FAILURES = {
    # case: (how, out below tmp_path, what the message says)
    "read-only": (lambda tmp, mp: read_only(mp, tmp / "ro"), "ro/out", ("Read-only file system", "Permission denied")),
    "disk-full": (lambda tmp, mp: refuse_opening(mp, errno.ENOSPC, lambda path: path.suffix == ".safetensors" and tmp in path.parents), "out",
                  ("No space left",)),
    "disk-full-on-close": (lambda tmp, mp: full_on_last_close(mp, tmp), "out", ("No space left",)),
    "name-too-long": (lambda tmp, mp: None, "n" * 300, ("File name too long",)),
    "symlink": (lambda tmp, mp: (tmp / "link").symlink_to(tmp / "ro"), "link", ("is a symbolic link",)),
    "file-in-the-way": (lambda tmp, mp: (tmp / "file").write_text("x"), "file", ("is a file, not a directory",)),
    "file-in-the-way-of-parent": (lambda tmp, mp: (tmp / "file").write_text("x"), "file/out", ("is a file, in the way",)),
}


@pytest.mark.parametrize("case", IO_FAILURES)
def test_io_failures_are_one_line_naming_the_path_and_leave_nothing(fresh, tmp_path, monkeypatch, case):
    how, name, reasons = IO_FAILURES[case]
    (tmp_path / "ro").mkdir()
    how(tmp_path, monkeypatch)
    out, before = tmp_path / name, tree(tmp_path)
    try:
        with pytest.raises(FusionError) as err:
            fuse(str(fresh.tuned), str(fresh.base), "ties", {}, out, shard_bytes=SMALL_SHARDS)
    finally:
        (tmp_path / "ro").chmod(0o755)
    message = str(err.value)
    assert "\n" not in message and str(out) in message and any(r in message for r in reasons), message
    assert tree(tmp_path) == before


def test_reports_are_strict_json_even_with_nan_weights(fresh, tmp_path):
    tuned = open_checkpoint(str(fresh.tuned))
    weights = {k: tuned.get(k).clone() for k in tuned.keys()}
    weights["language_model.model.layers.0.mlp.up_proj.weight"][3, 0] = float("nan")
    write_checkpoint(tmp_path / "nan", weights, tuned.config)
    result = fuse(str(tmp_path / "nan"), str(fresh.base), "neu-p-taska", {}, tmp_path / "out", allow_nonfinite=True)

    def strict(text: str):
        return json.loads(text, parse_constant=lambda word: pytest.fail(f"{word} is not JSON"))

    kinds = strict((result.path / REPORT_FILE).read_text())["kinds"]
    nan_kind = next(k for k in kinds if k["layer"] == 0 and k["kind"] == "ffn")
    assert nan_kind["sum_sq"] is None and None in nan_kind["quantiles"].values()  # NaN scores, written as null
    strict((result.path / RECIPE_FILE).read_text())
    assert fuse(str(tmp_path / "nan"), str(fresh.base), "neu-p-taska", {}, tmp_path / "out", allow_nonfinite=True).report == kinds
