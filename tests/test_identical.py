"""The merge maths gives the same bytes as before the methods became (sparsifier, combiner) pairs.

The hashes below were recorded once from the code as it stood before that refactor (methods as
hand-written functions, Neuron-Restore inside ``fusion.merge``). Any change to the arithmetic,
its float32 rounding, the order of operations or of random draws changes a hash. Whole merges
cover one tuned model through ``fuse``; the tensor-level cases cover two tuned models, which
``fuse`` never passes but the methods accept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fusion.merge import fuse
from fusion.registry import resolve
from tiny_models import build_pair

SEED = 7  # the merge seed: the random methods (and Neuron-Fusion over them) use it

# case name -> (method, parameters); the six methods at their defaults, the two aliases, and
# Neuron-Fusion over a random and a trimming inner method
MERGES: dict[str, tuple[str, dict[str, Any]]] = {
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "breadcrumbs": ("breadcrumbs", {}),
    "dare": ("dare", {}),
    "della": ("della", {}),
    "neuron_fusion": ("neuron_fusion", {}),
    "neu-p-taska": ("neu-p-taska", {}),
    "neu-p-bread": ("neu-p-bread", {}),
    "neuron_fusion inner=della": ("neuron_fusion", {"inner": "della"}),
    "neuron_fusion inner=ties others=inner": ("neuron_fusion", {"inner": "ties", "others": "inner"}),
}

MERGE_HASHES: dict[tuple[str, str], str] = {
    ("llava", "task_arithmetic"): "543253ba5fadba0b1018bbbaab3a5a0beb9f08c2d668c09ecdb87c49a0a11ab4",
    ("llava", "ties"): "380ab8a272dd3ae17c36db57c356160d7833d789b81ccae1a90df5594eef919d",
    ("llava", "breadcrumbs"): "10fcc753eba7ced4583982b47383fc1cb1ab1dd7f902dacdeb6e139e14290c8f",
    ("llava", "dare"): "8809fb5c02d20c2dc78a6f0da8c83fc3ae770b451fcb9e3cb930ac2117d39f51",
    ("llava", "della"): "35a467a58cabde91530f765e658eefb0067b25b9b8077193bde8af3dcee585d9",
    ("llava", "neuron_fusion"): "fd9d563a322874b9dcbaf3c390a02e257d66ebadbd0ce1c670d8bef92d642dc6",
    ("llava", "neu-p-taska"): "fd9d563a322874b9dcbaf3c390a02e257d66ebadbd0ce1c670d8bef92d642dc6",
    ("llava", "neu-p-bread"): "e36dd833b6ee57315dd87049541a374447af9bb81a216d26bdb9b6bdcebc86dd",
    ("llava", "neuron_fusion inner=della"): "172aba2563450bedb97b79c218c9618b012a8b61f6e6469381d30bac762b5270",
    ("llava", "neuron_fusion inner=ties others=inner"): "51878fc664a387b4dae21b028c83840569e21213c492f670379768420fbdf16b",
    ("llm", "task_arithmetic"): "9964113b883b3a5ba3bf72e3aa3edd50a52e6f93adad43e34f464aef1b47b633",
    ("llm", "ties"): "0ab3602d2d3f8e6966ecaf075d1e9c7905fb845df827e84deb301a8f96d30b7b",
    ("llm", "breadcrumbs"): "a525d47956aa990fbf2216970536dd4c9f7257ab3bd4bc36077a72bf8180723e",
    ("llm", "dare"): "5d5301977a864334edde8db6de0ed09d8e70c3ad7abcc8ace75c653b3c32bd4a",
    ("llm", "della"): "4ddc78a60f5a57226e6c4dc5de1efa9469a16e73e203779afced39636802eaec",
    ("llm", "neuron_fusion"): "426c90923124717c25c143b1d0bb3eee68d048a0b91aef8cc0bd967c15420998",
    ("llm", "neu-p-taska"): "426c90923124717c25c143b1d0bb3eee68d048a0b91aef8cc0bd967c15420998",
    ("llm", "neu-p-bread"): "990dd22dd024456638454a7902825ad0b4816bc02c41d0635a0617c789190f3e",
    ("llm", "neuron_fusion inner=della"): "66a996ea75725d2d9df82721b71ae441a6dcd480570fb0e7746cd28e73945ea6",
    ("llm", "neuron_fusion inner=ties others=inner"): "26ae5a91fb6690f65becc5a7a6cc4c989ae89d9394d1eaf1c956e73f6615655e",
}

TENSOR_HASHES: dict[tuple[str, str], str] = {
    ("task_arithmetic", "float32"): "341b02e8ee206cc7cfdb5eb8aef00762cccd540327a33b193d13c4d8c7d47249",
    ("task_arithmetic", "bfloat16"): "9876d8137b66f849f435000f6ee2244d967b457fa5e1699ff9f2fe9ac3f41e1c",
    ("ties", "float32"): "894129f4c203a44a9a08e9b55e32074f3b386158c52ddaa20e0ac1b37a2d2723",
    ("ties", "bfloat16"): "67b99efed5fb4079b691691e5d2fcd1e0ddfda2d1a65993b5ce5fee2cc7ff7c9",
    ("breadcrumbs", "float32"): "068f4ac11e48fbc5ca660ed5eead46968f9f53358644f61eeb06b7321ae05e14",
    ("breadcrumbs", "bfloat16"): "e42548cca6e3bf41cfa2aef524d2dbaf6205baa9363a8610d2995a7efb15295e",
    ("dare", "float32"): "b076d0d3768e33c45ff8397040053534ccbfbe5a1da583849f3731747bf1dc0c",
    ("dare", "bfloat16"): "85494bbf66b3d646a7babc65c34b3586904ab71f2e5e158421e2e7b0b2aaac77",
    ("della", "float32"): "2ea2c47fa8cf4ae7dc4a29ae6569052548e5ca47b4be3fdbd8c24e1018cdc1df",
    ("della", "bfloat16"): "1fa5bed5b1a367bd828764a8708472bda722406f3abb4edd126d90efcdbd69ff",
    ("restore", "float32"): "86a6ac551ea824cb42bcebc0dda51faf71db6278897eb2a3cd99f7f52fc5f923",
    ("restore", "bfloat16"): "6f406c79f1a039d7e4bf63e367cf470e47783b8525f37f86fe53b11f7545b12e",
}


def digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_output(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in directory.glob("*.safetensors"):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module", params=["llava", "llm"])
def tiny(request, tmp_path_factory):
    return request.param, build_pair(tmp_path_factory.mktemp(request.param), layout=request.param, seed=0)


@pytest.mark.parametrize("case", MERGES)
def test_whole_merge_bytes_unchanged(tiny, tmp_path, case):
    layout, pair = tiny
    method, params = MERGES[case]
    result = fuse(str(pair.tuned), str(pair.base), method, params, tmp_path / "out", seed=SEED)
    assert digest(read_output(result.path)) == MERGE_HASHES[(layout, case)]


def two_tuned(dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(33, 50, generator=g)
    return base.to(dtype), [(base + 0.05 * torch.randn(33, 50, generator=g)).to(dtype) for _ in range(2)]


def merge_tensors(method: str, base: torch.Tensor, tuned: list[torch.Tensor]) -> torch.Tensor:
    """One tensor through a baseline at its defaults, or (``restore``) through Neuron-Fusion's
    suppress-then-restore of rows 2, 5 and 31."""
    recipe = resolve(method if method != "restore" else "neuron_fusion", {}, SEED)
    located = (0, torch.tensor([2, 5, 31])) if method == "restore" else None
    return recipe.merge(base, tuned, torch.Generator().manual_seed(SEED), located)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "dare", "della", "restore"])
def test_two_tuned_models_bytes_unchanged(method, dtype):
    base, tuned = two_tuned(getattr(torch, dtype))
    assert digest({method: merge_tensors(method, base, tuned)}) == TENSOR_HASHES[(method, dtype)]
