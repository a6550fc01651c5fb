"""The merge maths against the identities in docs/methods.md and against independent, sort-based
reference implementations written here from its tables; and the registry's checking of names
and values."""

import math
import subprocess
import sys

import pytest
import torch

from fusion import methods, sparsify
from fusion.combine import COMBINERS
from fusion.errors import FusionError
from fusion.registry import BASELINES, METHOD_NAMES, as_recipe, resolve, schema


def pair(shape=(64, 48), n=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    tuned = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]
    return base, tuned


def merge(method, base, tuned, generator=None, **values):
    """One tensor merged the way ``fusion.merge`` does it: through the resolved Recipe."""
    return resolve(method, values).merge(base, tuned, generator)


# --- references: plain sorts, one element at a time where it helps readability ----------------


def ref_keep_top(delta, density):
    flat = delta.flatten()
    keep = round(density * flat.numel())
    order = flat.abs().argsort(descending=True)
    out = torch.zeros_like(flat)
    out[order[:keep]] = flat[order[:keep]]
    return out.view_as(delta)


def ref_band(delta, density, gamma):
    flat = delta.flatten()
    top, keep = round(gamma * flat.numel()), round(density * flat.numel())
    order = flat.abs().argsort(descending=True)
    out = torch.zeros_like(flat)
    chosen = order[top : top + keep]
    out[chosen] = flat[chosen]
    return out.view_as(delta)


def ref_sign_mean(deltas):
    stacked = torch.stack(deltas)
    sign = stacked.sum(0).sign()
    agree = (stacked.sign() == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_task_arithmetic_endpoints_are_exact(dtype):
    base, tuned = pair(dtype=dtype)
    assert torch.equal(merge("task_arithmetic", base, tuned, **{"lambda": 1.0}), tuned[0])
    assert torch.equal(merge("task_arithmetic", base, tuned, **{"lambda": 0.0}), base)


def test_task_arithmetic_multi_task_sum():
    base, tuned = pair(n=3)
    got = merge("task_arithmetic", base, tuned, **{"lambda": 0.3})
    want = base + 0.3 * sum(t - base for t in tuned)
    torch.testing.assert_close(got, want)


def test_task_arithmetic_half_precision_rounds_float32_result():
    base, tuned = pair(dtype=torch.bfloat16)
    got = merge("task_arithmetic", base, tuned, **{"lambda": 0.3})
    want = (base.float() + 0.3 * (tuned[0].float() - base.float())).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])
def test_ties_matches_reference(n, density):
    base, tuned = pair(n=n, seed=n)
    got = merge("ties", base, tuned, density=density, **{"lambda": 0.7})
    deltas = [ref_keep_top(t - base, density) for t in tuned]
    torch.testing.assert_close(got, base + 0.7 * ref_sign_mean(deltas))


@pytest.mark.parametrize("n", [1, 2])
def test_breadcrumbs_matches_reference(n):
    base, tuned = pair(n=n, seed=4)
    got = merge("breadcrumbs", base, tuned, density=0.6, gamma=0.1)
    want = base + sum(ref_band(t - base, 0.6, 0.1) for t in tuned)
    torch.testing.assert_close(got, want)


def test_magnitude_at_rank_agrees_with_sort():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g) * torch.logspace(-6, 3, 5000)
    ordered = x.abs().sort(descending=True).values
    for rank in (1, 2, 17, 2500, 4999, 5000):
        assert sparsify.magnitude_at_rank(x, rank) == float(ordered[rank - 1])


def _ranked(values, ranks):
    ordered = values.abs().flatten().sort(descending=True).values
    return [float(ordered[r - 1]) for r in ranks]


@pytest.mark.parametrize("make", ["gaussian", "equal_runs", "sample_unlike_the_rest"])
def test_magnitudes_at_ranks_is_exact_whichever_pass_finds_them(make, monkeypatch):
    """The one-pass search (brackets placed by a sample) and its two-pass fallback (a
    histogram) give the sorted answer; a sample that misrepresents the vector makes the
    brackets miss, and the fallback must then answer, not the brackets."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 197, generator=g)
    if make == "equal_runs":  # many ties, so that a rank falls inside a run of equal values
        x = torch.randint(-6, 7, (300, 197), generator=g).float()
    monkeypatch.setattr(sparsify, "SAMPLE_ENTRIES", 1000)
    at = sparsify.sample_positions(x.shape, 1000)
    if make == "sample_unlike_the_rest":  # the sampled entries are tiny, every other entry large
        flat = x.view(-1)
        flat.mul_(100.0)
        flat[at] *= 1e-4
    histogrammed = []
    real = sparsify._histogrammed
    monkeypatch.setattr(sparsify, "_histogrammed", lambda v, r: histogrammed.append(list(r)) or real(v, r))
    ranks = [1, 17, x.numel() // 5, x.numel() // 2, x.numel() - 3, x.numel()]
    for vector in (sparsify.Held(x.clone()), sparsify.TaskVector(torch.zeros_like(x), x)):
        histogrammed.clear()
        assert sparsify.magnitudes_at_ranks(vector, ranks) == _ranked(x, ranks)
        if make == "sample_unlike_the_rest":
            assert histogrammed and histogrammed[0]  # the brackets missed: the fallback answered
        else:
            assert histogrammed == []  # found in one pass
    assert at.numel() < x.numel() and sparsify.magnitudes_at_ranks(sparsify.Held(x[:3, :5].clone()), [4]) == _ranked(x[:3, :5], [4])


@pytest.mark.parametrize("shape", [(5632, 2048), (2048, 5632), (32000, 2048), (3, 1000003)])
def test_a_sample_is_spread_over_rows_and_columns(shape):
    at = sparsify.sample_positions(shape, 1 << 16)
    n, width = shape[0] * shape[1], shape[1]
    assert at.numel() == 1 << 16 and at.unique().numel() == at.numel() and int(at.max()) < n
    starts = at[:: sparsify.SAMPLE_RUN]
    assert int(starts[-1]) > n * 0.99  # to the end of the tensor
    assert starts.remainder(width).unique().numel() == min(starts.numel(), width)  # a different column each run
    assert sparsify.sample_positions((10, 10), 1000) is None  # small: all of it


def test_nan_ranks_above_everything_whichever_pass_finds_it(monkeypatch):
    """With --allow-nonfinite a NaN takes the place the histogram gives it, above +inf, in the
    one-pass search too: the threshold must not depend on which pass answered."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 300, generator=g)
    x.view(-1)[torch.randperm(x.numel(), generator=g)[:50]] = float("nan")
    monkeypatch.setattr(sparsify, "SAMPLE_ENTRIES", 1000)
    ranks = [10, 1000, 24000, 60000]
    got = sparsify.magnitudes_at_ranks(sparsify.Held(x), ranks)
    want = sparsify._histogrammed(sparsify.Held(x), ranks)
    assert str(got) == str(want) and math.isnan(got[0]) and not math.isnan(got[1])


@pytest.mark.parametrize("fill", [0.0, 1.5])
def test_a_vector_of_one_value_is_answered_in_one_pass_without_collecting_it(fill, monkeypatch):
    """A frozen tensor's Δ is all zeros: its bracket is one value, which counts answer."""
    x = torch.full((400, 300), fill)
    x[7, 9] = 3.0
    monkeypatch.setattr(sparsify, "SAMPLE_ENTRIES", 1000)
    monkeypatch.setattr(sparsify, "BRACKET_LIMIT", 5000)  # collecting the bracket would overflow this
    monkeypatch.setattr(sparsify, "_histogrammed", lambda v, r: pytest.fail("the fallback ran"))
    assert sparsify.magnitudes_at_ranks(sparsify.Held(x), [2, 24000, x.numel()]) == [fill, fill, fill]


def test_a_bracket_that_collects_too_much_gives_way_to_the_histogram(monkeypatch):
    x = torch.ones(400, 300)
    x[0, 0] = 2.0  # all but one entry equal: any bracket around rank 100 holds nearly all of them
    monkeypatch.setattr(sparsify, "SAMPLE_ENTRIES", 1000)
    monkeypatch.setattr(sparsify, "BRACKET_LIMIT", 5000)
    assert sparsify.magnitudes_at_ranks(sparsify.Held(x), [1, 100]) == [2.0, 1.0]


def test_dare_mask_statistics_and_fixed_mask_result():
    base, tuned = pair(shape=(400, 250), seed=5)
    got = merge("dare", base, tuned, torch.Generator().manual_seed(9), density=0.3)
    delta = tuned[0] - base
    kept = (got - base).abs() > 1e-7
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    # the same draw, done here: the result is exact for that mask
    mask = torch.rand(delta.shape, generator=torch.Generator().manual_seed(9)) < 0.3
    torch.testing.assert_close(got, base + delta * mask / 0.3)


def ref_della_keep_prob(width, density, epsilon):
    """Keep probability by magnitude rank (0 = largest)."""
    ranks = torch.arange(width, dtype=torch.float32)
    drop = (1 - density) - epsilon / 2 + epsilon * ranks / (width - 1)
    return 1 - drop


def test_della_fixed_mask_result():
    base, tuned = pair(shape=(30, 40), seed=6)
    density, epsilon = 0.4, 0.2
    got = merge("della", base, tuned, torch.Generator().manual_seed(2), density=density, epsilon=epsilon)
    delta = tuned[0] - base
    draw = torch.rand(delta.shape, generator=torch.Generator().manual_seed(2))
    keep_p = torch.empty_like(delta)
    for r in range(delta.shape[0]):
        order = delta[r].abs().argsort(descending=True)
        keep_p[r, order] = ref_della_keep_prob(delta.shape[1], density, epsilon)
    want = base + torch.where(draw >= 1 - keep_p, delta / keep_p, torch.zeros_like(delta))
    torch.testing.assert_close(got, want)


def test_della_keep_probability_falls_with_rank():
    density, epsilon, width = 0.3, 0.2, 10
    delta = torch.linspace(1, 2, width).repeat(20000, 1)  # column 9 largest in every row
    kept = sparsify.ranked(delta.clone(), {"density": density, "epsilon": epsilon}, torch.Generator().manual_seed(0)) != 0
    rate = kept.float().mean(0)
    expected = ref_della_keep_prob(width, density, epsilon).flip(0)
    assert (rate - expected).abs().max() < 0.015
    assert abs(rate.mean().item() - density) < 0.005


def test_restore_takes_rows_and_columns_from_full():
    base, full = torch.zeros(4, 5), torch.arange(20.0).view(4, 5)
    merged = torch.zeros(4, 5)
    methods.restore(merged, base, [full], (0, torch.tensor([1, 3])))
    assert torch.equal(merged[1], full[1]) and torch.equal(merged[3], full[3]) and merged[0].abs().sum() == 0
    merged = torch.zeros(4, 5)
    methods.restore(merged, base, [full], (1, torch.tensor([2])))
    assert torch.equal(merged[:, 2], full[:, 2]) and merged[:, [0, 1, 3, 4]].abs().sum() == 0


@pytest.mark.parametrize("inner", ["task_arithmetic", "ties"])
def test_neuron_fusion_restores_the_full_change_of_several_models(inner):
    base, tuned = pair(n=3, seed=8)
    located = torch.tensor([0, 7, 40])
    got = resolve("neuron_fusion", {"inner": inner, "suppress": 0.2}).merge(base, tuned, None, (0, located))
    suppressed = merge(inner, base, tuned, **{"lambda": 0.2})
    full = base + sum(t - base for t in tuned)
    others = torch.ones(base.shape[0], dtype=torch.bool)
    others[located] = False
    torch.testing.assert_close(got[located], full[located])
    assert torch.equal(got[others], suppressed[others])


def test_neuron_fusion_one_model_located_rows_are_the_tuned_rows_bit_for_bit():
    base, tuned = pair(dtype=torch.bfloat16, seed=9)
    got = resolve("neuron_fusion", {"suppress": 0.0}).merge(base, tuned, None, (1, torch.tensor([3, 4])))
    assert torch.equal(got[:, [3, 4]], tuned[0][:, [3, 4]])
    assert torch.equal(got[:, :3], base[:, :3]) and torch.equal(got[:, 5:], base[:, 5:])


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_is_a_bound_pair_made_once_per_recipe(method):
    recipe = resolve(method)
    assert recipe.merge is recipe.merge  # bound once, not per tensor
    inner = recipe.inner
    assert inner.name in BASELINES and recipe.merge.sparsify is sparsify.SPARSIFIERS[inner.sparsify]
    assert recipe.merge.combine is COMBINERS[inner.combine]
    assert recipe.random == (inner.sparsify in ("random", "ranked"))


@pytest.mark.parametrize(
    "method, values, fragment",
    [
        ("ties", {"density": 0}, "outside its range (0.0, 1.0]"),
        ("ties", {"density": "lots"}, "must be a float"),
        ("task_arithmetic", {"lambda": 5}, "'lambda' of method 'task_arithmetic' is 5.0"),
        ("breadcrumbs", {"density": 0.95, "gamma": 0.1}, "density + gamma"),
        ("della", {"density": 0.05, "epsilon": 0.2}, "epsilon"),
        ("neuron_fusion", {"top_ratio": 1.5}, "'top_ratio'"),
        ("neuron_fusion", {"inner": "magic"}, "must be one of"),
        ("dare", {"gama": 0.1}, "unknown parameter 'gama'"),
        ("average", {}, "unknown method 'average'"),
    ],
)
def test_bad_parameters_are_named(method, values, fragment):
    with pytest.raises(FusionError, match=None) as err:
        resolve(method, values)
    assert fragment in str(err.value)


def test_aliases_and_schema():
    recipe = resolve("neu-p-bread", {"density": "0.8"})
    assert recipe.method == "neuron_fusion" and recipe.params["inner"] == "breadcrumbs"
    assert recipe.params["density"] == 0.8 and recipe.inner_params["lambda"] == recipe.params["suppress"]
    assert {p.name for p in schema("neu-p-bread")} >= {"top_ratio", "suppress", "density", "gamma"}
    assert "lambda" not in {p.name for p in schema("neu-p-bread")}
    assert set(METHOD_NAMES) == {"task_arithmetic", "ties", "breadcrumbs", "dare", "della", "neuron_fusion", "neu-p-taska", "neu-p-bread"}


@pytest.mark.parametrize(
    "method, name, value",
    [
        ("task_arithmetic", "lambda", "nan"),
        ("task_arithmetic", "lambda", float("nan")),
        ("ties", "density", "inf"),
        ("breadcrumbs", "lambda", "-Infinity"),
        ("dare", "density", "1e999"),
        ("della", "epsilon", float("inf")),
        ("neuron_fusion", "suppress", "NaN"),
        ("neu-p-bread", "gamma", float("-inf")),
        ("neu-p-taska", "top_ratio", "nan"),
    ],
)
def test_non_finite_parameters_are_refused_naming_parameter_and_method(method, name, value):
    with pytest.raises(FusionError) as err:
        resolve(method, {name: value})
    message = str(err.value)
    assert f"parameter '{name}' of method '{method}' must be a finite number" in message and "\n" not in message


def test_booleans_are_not_numbers():
    with pytest.raises(FusionError, match="'density' of method 'ties' must be a float, got True"):
        resolve("ties", {"density": True})


@pytest.mark.parametrize("seed", [-1, 1.0, 2.5, True, "3", float("nan")])
def test_seed_must_be_a_non_negative_int(seed):
    with pytest.raises(FusionError, match="seed must be a non-negative integer"):
        resolve("dare", {}, seed)


def test_a_recipe_is_taken_as_it_is_and_not_mixed_with_raw_values():
    recipe = resolve("neu-p-bread", {"density": 0.8}, seed=4)
    assert as_recipe(recipe) is recipe
    assert as_recipe("neu-p-bread", {"density": "0.8"}, 4) == recipe
    with pytest.raises(FusionError, match="a Recipe carries its own parameters and seed"):
        as_recipe(recipe, {"density": 0.5})
    with pytest.raises(FusionError, match="a Recipe carries its own parameters and seed"):
        as_recipe(recipe, seed=1)


def test_registry_imports_no_torch():
    code = "import fusion.registry, sys; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"
