"""One registry of merge methods: name → (sparsifier, combiner) pair and parameter schema.

The CLI builds its ``--set NAME=VALUE`` parsing from it and the app builds its controls from
it, so a method added here shows up everywhere. ``resolve`` turns a method name and raw values
into a checked ``Recipe`` once; everything downstream takes the Recipe. Ranges and defaults are
those of ``docs/methods.md``; the choices it marks *project choice* are parameters, not constants.

This module is pure data and must not import torch, so that listing methods and parsing
arguments stay fast: a method names its Sub and F, and ``fusion.methods`` binds the names to
tensor functions when something is merged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .errors import FusionError

if TYPE_CHECKING:
    from .methods import Merge


@dataclass(frozen=True)
class Param:
    """One tunable parameter: its public name (as in recipe files), type, default, range."""

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: ``low`` itself is not allowed
    choices: tuple[str, ...] = ()

    def parse(self, value: Any, method: str) -> Any:
        """Convert a CLI string or a Python value and check it; errors name method and value."""
        where = f"parameter '{self.name}' of method '{method}'"
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "yes")
                parsed = bool(value)
            elif self.kind is float and isinstance(value, bool):
                raise ValueError  # True/False as a number is a slip, not a value
            else:
                parsed = self.kind(value)
        except (TypeError, ValueError):
            raise FusionError(f"{where} must be a {self.kind.__name__}, got {value!r}") from None
        if self.kind is float and not math.isfinite(parsed):
            # NaN passes every range check, and inf or NaN would fill the merged model with NaN
            raise FusionError(f"{where} must be a finite number, got {value!r}")
        if self.choices and parsed not in self.choices:
            raise FusionError(f"{where} must be one of {', '.join(self.choices)}; got {parsed!r}")
        if self.low is not None and (parsed < self.low or (self.low_open and parsed == self.low)):
            raise FusionError(f"{where} is {parsed}, outside its range {self.range_text()}")
        if self.high is not None and parsed > self.high:
            raise FusionError(f"{where} is {parsed}, outside its range {self.range_text()}")
        return parsed

    def range_text(self) -> str:
        if self.kind is bool:
            return "{true, false}"
        if self.choices:
            return "{" + ", ".join(self.choices) + "}"
        if self.low is None:
            return "any"
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}]"


@dataclass(frozen=True)
class Method:
    """A merge method: θ_base + λ·F(Sub(Δ)) with the Sub and F named here (keys of
    ``fusion.sparsify.SPARSIFIERS`` and ``fusion.combine.COMBINERS``), its parameters, and
    whether its Sub draws random masks. Neuron-Fusion names neither: it runs its inner method's
    pair, then restores the neurons it located."""

    name: str
    sparsify: str | None
    combine: str | None
    params: tuple[Param, ...]
    help: str
    random: bool = False
    locates_neurons: bool = False
    check: Callable[[Mapping[str, Any]], str | None] = field(default=lambda p: None)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


def _lambda(default: float) -> Param:
    return Param("lambda", float, default, "scale of the combined task vector", -2.0, 2.0)


def _density(default: float, what: str) -> Param:
    return Param("density", float, default, what, 0.0, 1.0, low_open=True)


def _della_check(p: Mapping[str, Any]) -> str | None:
    if p["epsilon"] / 2 >= p["density"] or p["epsilon"] / 2 > 1 - p["density"]:
        return (
            f"epsilon = {p['epsilon']} spreads drop probabilities outside [0, 1) around "
            f"1 - density = {1 - p['density']:.3g}; need epsilon/2 < density and epsilon/2 <= 1 - density"
        )
    return None


def _breadcrumbs_check(p: Mapping[str, Any]) -> str | None:
    if p["density"] + p["gamma"] > 1:
        return f"density + gamma = {p['density'] + p['gamma']:.3g} exceeds 1: nothing is left to keep"
    return None


BASELINES: dict[str, Method] = {
    m.name: m
    for m in (
        Method("task_arithmetic", "all", "sum", (_lambda(0.5),), "θ_base + λ·ΣΔ"),
        Method(
            "ties",
            "magnitude",
            "sign_mean",
            (_density(0.2, "fraction of each task vector kept, by magnitude"), _lambda(1.0)),
            "trim to top density, elect signs, average agreeing entries",
        ),
        Method(
            "breadcrumbs",
            "band",
            "sum",
            (
                _density(0.9, "fraction of each task vector kept after dropping outliers"),
                Param("gamma", float, 0.01, "fraction of largest-magnitude entries dropped as outliers", 0.0, 1.0),
                _lambda(1.0),
            ),
            "drop outliers and smallest entries, then sum",
            check=_breadcrumbs_check,
        ),
        Method(
            "dare",
            "random",
            "sum",
            (_density(0.1, "probability of keeping each entry (kept ones rescaled by 1/density)"), _lambda(1.0)),
            "random drop and rescale, then sum",
            random=True,
        ),
        Method(
            "della",
            "ranked",
            "sign_mean",
            (
                _density(0.3, "mean keep probability per row"),
                Param("epsilon", float, 0.1, "spread of drop probabilities across magnitude ranks", 0.0, 1.0),
                _lambda(1.0),
            ),
            "magnitude-ranked random drop, sign election",
            random=True,
            check=_della_check,
        ),
    )
}

NEURON_FUSION_PARAMS: tuple[Param, ...] = (
    Param("top_ratio", float, 0.05, "fraction of neurons per layer and kind that keep their full change", 0.0, 1.0),
    Param("suppress", float, 0.1, "λ of the inner method for all other parameters (0 = base)", 0.0, 1.0),
    Param("inner", str, "task_arithmetic", "method that merges the non-located parameters", choices=tuple(BASELINES)),
    Param("neuron_unit", str, "tied", "score FFN/attention neurons across tied matrices, or each row alone", choices=("tied", "row")),
    Param("score_norm", str, "l2", "norm of a neuron's change", choices=("l2", "l1")),
    Param("relative", bool, False, "divide a neuron's change by the norm of its base weights"),
    Param(
        "others",
        str,
        "rows",
        "parameters outside FFN/attention neurons (embeddings, norms, lm_head): 'rows' locates "
        "their rows like neurons, 'inner' merges them by the inner method only",
        choices=("rows", "inner"),
    ),
)

NEURON_FUSION = Method(
    "neuron_fusion",
    None,
    None,
    NEURON_FUSION_PARAMS,
    "Locate-then-Merge: keep the most-changed neurons, suppress the rest",
    locates_neurons=True,
)

METHODS: dict[str, Method] = {**BASELINES, NEURON_FUSION.name: NEURON_FUSION}

# The paper's named configurations: neurons Preserved, the rest by Task Arithmetic / Breadcrumbs.
# Alias -> (method, the values it fixes).
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "neu-p-taska": ("neuron_fusion", {"inner": "task_arithmetic"}),
    "neu-p-bread": ("neuron_fusion", {"inner": "breadcrumbs"}),
}

METHOD_NAMES: tuple[str, ...] = (*METHODS, *ALIASES)


@dataclass(frozen=True)
class Recipe:
    """A fully resolved merge: canonical method name, every parameter with its checked value, and
    the seed. ``resolve`` makes it once; the merge takes it as it is and never looks a name up again."""

    method: str
    params: dict[str, Any]
    seed: int = 0

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def inner(self) -> Method:
        """The method whose Sub and F merge each tensor: the method itself, or Neuron-Fusion's
        inner method."""
        return BASELINES[self.params["inner"]] if self.spec.locates_neurons else self.spec

    @property
    def inner_params(self) -> dict[str, Any]:
        """Parameters for ``inner``'s Sub and F; Neuron-Fusion's ``suppress`` is the inner λ."""
        if not self.spec.locates_neurons:
            return self.params
        return {**self.params, "lambda": self.params["suppress"]}

    @property
    def random(self) -> bool:
        return self.inner.random

    @cached_property
    def merge(self) -> Merge:
        """The per-tensor merge, its functions bound once per Recipe. ``fusion.methods`` is
        imported here rather than at the top so that the registry loads without torch."""
        from .methods import bind

        return bind(self.inner.sparsify, self.inner.combine, self.inner_params)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params, "seed": self.seed}


def _lookup(method: str) -> tuple[Method, dict[str, Any]]:
    """The method a name or alias stands for, and the values the alias fixes."""
    name, fixed = ALIASES.get(method, (method, {}))
    if name not in METHODS:
        raise FusionError(f"unknown method '{method}'; choose one of {', '.join(METHOD_NAMES)}")
    return METHODS[name], fixed


def schema(method: str, inner: str | None = None) -> tuple[Param, ...]:
    """The parameters a method takes; for Neuron-Fusion, its own plus its inner method's (less
    λ, which ``suppress`` sets). Used by the CLI's help and the app's controls."""
    spec, fixed = _lookup(method)
    if not spec.locates_neurons:
        return spec.params
    own = tuple(replace(p, default=fixed[p.name]) if p.name in fixed else p for p in spec.params)
    inner_spec = BASELINES[inner or fixed.get("inner", spec.param("inner").default)]
    return own + tuple(p for p in inner_spec.params if p.name != "lambda")


def resolve(method: str, values: Mapping[str, Any] | None = None, seed: int = 0) -> Recipe:
    """Check a method name and raw parameter values (strings from the CLI or Python values)
    and fill in defaults. Raises FusionError naming the method and parameter at fault."""
    values = dict(values or {})
    spec, fixed = _lookup(method)
    if spec.locates_neurons:
        inner = spec.param("inner").parse(values.get("inner", fixed.get("inner", spec.param("inner").default)), method)
        values["inner"] = inner
    else:
        inner = None
    params_schema = schema(spec.name, inner)
    known = {p.name for p in params_schema}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FusionError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(repr(u) for u in unknown)} "
            f"for method '{method}'; it takes: {', '.join(p.name for p in params_schema)}"
        )
    params = {p.name: p.parse(values.get(p.name, p.default), method) for p in params_schema}
    for check in (spec.check, BASELINES[inner].check if inner else None):
        problem = check(params) if check else None
        if problem:
            raise FusionError(f"method '{method}': {problem}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise FusionError(f"seed must be a non-negative integer, got {seed!r}")
    return Recipe(spec.name, params, seed)


def as_recipe(method: str | Recipe, values: Mapping[str, Any] | None = None, seed: int = 0) -> Recipe:
    """What the public entry points accept: a Recipe as it is, or a method name (or alias) with
    raw values, resolved here, once."""
    if not isinstance(method, Recipe):
        return resolve(method, values, seed)
    if values or seed:
        raise FusionError("a Recipe carries its own parameters and seed: give them to resolve(), not alongside the Recipe")
    return method
