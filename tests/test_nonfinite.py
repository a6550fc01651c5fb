"""NaN and infinite values in the tensors being merged: an error naming the tensor and its
checkpoint, with nothing left behind, unless the caller opts out (``allow_nonfinite``,
``--allow-nonfinite``)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion.cli import main
from fusion.errors import FusionError
from fusion.merge import fuse, inspect_pair
from fusion.methods import NonFinite, check_finite
from fusion.registry import resolve
from tiny_models import build_pair

# (checkpoint, tensor as named there, value): an Inf in the base and a NaN in the tuned model,
# in different layers; the base's comes first in output order
INF_IN_BASE = ("base", "model.layers.0.self_attn.q_proj.weight", float("inf"))
NAN_IN_TUNED = ("tuned", "language_model.model.layers.1.mlp.up_proj.weight", float("nan"))
# one method per code path: the fused lerp, a streamed Sub with a threshold pass, a random Sub,
# and Neuron-Fusion scoring its kinds inside the merge over both
METHODS = ["task_arithmetic", "ties", "dare", "neuron_fusion", "neu-p-bread"]


def plant(checkpoint: Path, name: str, value: float) -> None:
    """Set one entry of tensor ``name`` to ``value``, in the shard that holds it."""
    for shard in checkpoint.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name].view(-1)[7] = value
            save_file(tensors, str(shard), metadata={"format": "pt"})
            return
    raise AssertionError(f"{name} is in no shard of {checkpoint}")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Pairs with the Inf and the NaN planted, both or one."""
    built = {}
    for key, planted in {"both": [INF_IN_BASE, NAN_IN_TUNED], "nan": [NAN_IN_TUNED]}.items():
        pair = build_pair(tmp_path_factory.mktemp(key), layout="llava")
        for which, name, value in planted:
            plant(getattr(pair, which), name, value)
        built[key] = pair
    return built


def merge_error(root: Path, pair, method: str) -> str:
    """The merge into ``root/out`` fails with a FusionError and adds nothing to ``root``."""
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(FusionError) as err:
        fuse(str(pair.tuned), str(pair.base), method, {}, root / "out", seed=1)
    assert sorted(p.name for p in root.iterdir()) == before
    return str(err.value)


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_input_is_an_error_naming_tensor_and_checkpoint(pairs, tmp_path, method):
    message = merge_error(tmp_path, pairs["both"], method)
    assert "'model.layers.0.self_attn.q_proj.weight'" in message and str(pairs["both"].base) in message
    assert "1 NaN or infinite value(s)" in message and "--allow-nonfinite" in message


@pytest.mark.parametrize("method", ["task_arithmetic", "neuron_fusion"])
def test_nan_in_the_tuned_model_names_its_tensor(pairs, tmp_path, method):
    message = merge_error(tmp_path, pairs["nan"], method)
    assert "'language_model.model.layers.1.mlp.up_proj.weight'" in message and str(pairs["nan"].tuned) in message


@pytest.mark.parametrize("method", METHODS)
def test_opting_out_merges_anyway(pairs, tmp_path, method):
    result = fuse(str(pairs["both"].tuned), str(pairs["both"].base), method, {}, tmp_path / "out", seed=1, allow_nonfinite=True)
    out = {}
    for shard in result.path.glob("*.safetensors"):
        out.update(load_file(shard))
    assert not torch.isfinite(out["language_model.model.layers.1.mlp.up_proj.weight"].float()).all()
    assert torch.isfinite(out["language_model.model.layers.1.mlp.gate_proj.weight"].float()).all()


def test_inspect_names_the_tensor_unless_told_otherwise(pairs):
    pair = pairs["nan"]
    with pytest.raises(FusionError, match="'language_model.model.layers.1.mlp.up_proj.weight'"):
        inspect_pair(str(pair.tuned), str(pair.base))
    assert inspect_pair(str(pair.tuned), str(pair.base), allow_nonfinite=True)["kinds"]


def test_cli_flag_for_merge_and_inspect(pairs, tmp_path, capsys):
    pair = pairs["both"]
    common = ["--tuned", str(pair.tuned), "--base", str(pair.base)]
    assert main(["merge", *common, "--method", "ties", "--out", str(tmp_path / "refused"), "--quiet"]) == 2
    assert "q_proj" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert main(["merge", *common, "--method", "ties", "--out", str(tmp_path / "merged"), "--quiet", "--allow-nonfinite"]) == 0
    assert main(["inspect", *common]) == 2
    assert main(["inspect", *common, "--allow-nonfinite"]) == 0


def test_large_finite_values_are_not_taken_for_nonfinite_ones():
    """fp16 entries of 60000 overflow an fp16 sum, yet are finite: the check must not say otherwise."""
    base = torch.full((64, 64), 60000.0, dtype=torch.float16)
    tuned = base.clone()
    tuned[3, 5] = 1.0
    check_finite([base, tuned])
    for method in ("task_arithmetic", "ties", "neuron_fusion"):
        merged = resolve(method).merge(base, [tuned], torch.Generator().manual_seed(0), check=True)
        assert merged.shape == base.shape
    tuned[0, 0] = float("-inf")
    with pytest.raises(NonFinite) as err:
        check_finite([base, tuned])
    assert err.value.which == 1
    tuned[0, 0], base[1, 1] = 1.0, float("nan")
    with pytest.raises(NonFinite) as err:
        check_finite([base, tuned])
    assert err.value.which == 0


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_inputs_are_checked_too(dtype):
    """float8 has no min/max kernel on the CPU: the check widens it rather than fail."""
    base = torch.randn(64, 32).to(dtype)
    tuned = (base.float() + 0.25).to(dtype)
    check_finite([base, tuned])
    merged = resolve("ties").merge(base, [tuned], torch.Generator().manual_seed(0), check=True)
    assert merged.dtype == dtype and merged.shape == base.shape
    tuned = tuned.float()
    tuned[2, 3] = float("nan")
    with pytest.raises(NonFinite) as err:
        check_finite([base, tuned.to(dtype)])
    assert err.value.which == 1
