"""The method registry: each merge method is a small pure function over tensors with declared parameters.

Calling convention (every method)::

    fn(models, base, ratio, ctx, **params) -> Tensor

- ``models``: the input tensors of one key (or of one chunk of rows of it), already in the compute dtype
  (float32, or float64 on request), same shape;
- ``base``: the base model's tensor for task-vector methods, else ``None``;
- ``ratio``: α_b, the ratio of the key's block. Interpolation methods use it as the interpolation ratio;
  task-vector methods return ``base + ratio * τ*`` so that ratio 0 leaves the base untouched;
- ``ctx``: a :class:`KeyContext` (key name, seed, where this chunk sits in the whole tensor, per-model
  weights, precomputed statistics);
- ``params``: the method's declared hyper-parameters, already validated and defaulted.

Functions modify nothing they are given, except the input tensors when ``ctx.inputs_writable`` is true
(the engine passes freshly read tensors it never uses again, so methods may work in place and save
memory); they do no I/O and keep no state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Param:
    """A declared hyper-parameter: its name says what it does (no inverted booleans)."""

    name: str
    kind: type  # float, int, bool or str
    default: Any
    help: str = ""
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, value: Any) -> Any:
        """Convert a value (a string from the CLI, or JSON/YAML data) and check it; ValueError if invalid."""
        kind = self.kind
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes", "on"):
                    value = True
                elif lowered in ("false", "0", "no", "off"):
                    value = False
                else:
                    raise ValueError(f"{self.name} must be true or false, got {value!r}")
            elif not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
        elif kind in (int, float):
            if isinstance(value, bool):
                raise ValueError(f"{self.name} must be a number, got {value!r}")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{self.name} must be a number, got {value!r}") from None
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError(f"{self.name} must be finite, got {value!r}")
            if kind is int:
                if number != int(number):
                    raise ValueError(f"{self.name} must be an integer, got {value!r}")
                value = int(number)
            else:
                value = number
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"{self.name} must be >= {self.minimum}, got {value}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"{self.name} must be <= {self.maximum}, got {value}")
        else:
            value = str(value).strip()
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        return value

    def describe(self) -> str:
        extra = f" ({'|'.join(map(str, self.choices))})" if self.choices else ""
        return f"{self.name}={self.default}{extra}: {self.help}"


@dataclass(frozen=True)
class KeyContext:
    """What a method may know about the key it is merging, beyond the tensors themselves."""

    key: str = ""
    seed: int = 0
    shape: tuple[int, ...] = ()  # shape of the whole tensor (the inputs may be a chunk of its rows)
    offset: int = 0  # flat index, in the whole tensor, of the chunk's first element
    weights: tuple[float, ...] | None = None  # per-model weights from the recipe, None when not given
    stats: Mapping[str, Any] | None = None  # whole-tensor (or whole-block) statistics for chunked runs
    inputs_writable: bool = False  # the method may overwrite `models` and `base` (the engine's fresh copies)
    stage: int = 0  # which stage of a staged statistics pass this call is (see MergeMethod.statistics_stages)
    # The engine will keep this slice's statistics()["partial"] for `MergeMethod.merge_from_partial`.
    wants_partial: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


MethodFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MethodFn
    summary: str
    params: tuple[Param, ...] = ()
    base: str = "never"  # "never" | "required" | "optional": whether the method takes a base model
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False  # uses seeded drop masks, so the seed is part of the result
    # The global ratio α when the recipe gives none: the value that reproduces the method as published
    # (1 for task-vector methods and Model Stock, whose own t then scales the mean task vector; 0.5, the
    # midpoint, for the interpolations).
    default_ratio: float = 1.0
    # False when the method takes no per-model weights (the recipe's `weights` are then refused).
    takes_weights: bool = True
    # True when the weights are barycentric (an average's weights): none negative, not all 0. Otherwise a
    # negative weight is allowed (task negation in the task-vector methods).
    nonnegative_weights: bool = False
    # True when the result on any range of rows equals the same rows of the whole-tensor result given the
    # same ctx.stats: the engine may then split big tensors into chunks of rows. A callable of the
    # normalized params when that depends on them (TIES trimming with k < 1 needs the whole tensor).
    elementwise: bool | Callable[[Mapping[str, Any]], bool] = True
    # True when the method works on whole rows and treats a 1-D tensor as one row (DELLA's ranks, NuSLERP
    # per row): the engine then never splits a 1-D tensor (rows of other tensors are never split anyway).
    whole_1d: bool = False
    # Optional additive whole-tensor statistics: statistics(models, base, ctx, **params) -> dict of float64
    # tensors whose sums over row chunks equal the whole-tensor value. The method reads them from ctx.stats.
    statistics: Callable[..., dict[str, torch.Tensor]] | None = None
    # When the statistics are needed, as a function of (params, shape of the whole tensor); None: always.
    statistics_needed: Callable[[Mapping[str, Any], tuple[int, ...]], bool] | None = None
    # Statistics gathered in successive passes, each seeing the sums of the earlier ones in ctx.stats (and
    # its number in ctx.stage): statistics_stages(params, compute dtype) -> number of passes; None: 1.
    # (An exact k-th magnitude for TIES trimming is a radix select: one histogram pass per 16 bits.)
    statistics_stages: Callable[[Mapping[str, Any], torch.dtype], int] | None = None
    # Statistic computed over each whole block by the analysis pass ("block" granularity of Model Stock):
    # the engine then passes ctx.stats["block_gram"], the block's float64 Gram matrix of the task vectors.
    needs_block_statistics: Callable[[Mapping[str, Any]], bool] | None = None
    # True when a statistic is NaN or inf whenever an input element is (Model Stock's τᵢ·τᵢ): the engine then
    # skips its own finite check of the inputs of a key whose statistics it gathers in memory, and makes it
    # only when a statistic is not finite (finite but huge inputs can overflow one: the check then decides).
    statistics_reveal_nonfinite: bool = False
    # Optional merge from a partial result of the statistics pass: asked with ctx.wants_partial, a method's
    # statistics may return "partial", a tensor of the slice's shape (the method's own, not summed); the engine
    # keeps it and later calls merge_from_partial(partial, base, ratio, ctx, **params) for that slice instead
    # of fn, so the models are converted and turned into task vectors once instead of twice. Same bits as fn.
    merge_from_partial: MethodFn | None = None
    # Optional compiled forms over one slice's raw inputs (the files' dtypes, CPU, finite), which the engine
    # tries before converting anything: raw_statistics(models, base, ctx, **params) -> the slice's statistics
    # as `statistics` gives them, and raw_merge(models, base, out, ratio, ctx, **params) -> whether the merged
    # slice it wrote into `out` (the output dtype) is all finite. Either returns None to decline (no compiled
    # kernels here, a dtype or case they do not cover): the engine then runs the torch form. raw_merge gives
    # the same bits as fn for the same statistics (see merge_methods/kernels.py).
    raw_statistics: Callable[..., dict[str, torch.Tensor] | None] | None = None
    raw_merge: Callable[..., bool | None] | None = None
    # Checks that need both the params and the number of models: check(params, n_models), ValueError if bad.
    check: Callable[[Mapping[str, Any], int], None] | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        valid = ", ".join(p.name for p in self.params) or "none"
        raise ValueError(f"method {self.name} has no parameter {name!r} (valid: {valid})")

    def normalize_params(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        out = {p.name: p.default for p in self.params}
        for name, value in (given or {}).items():
            out[name] = self.param(name).parse(value)
        return out

    def check_params(self, params: Mapping[str, Any], n_models: int) -> None:
        """Check normalized params against the number of models (ValueError if they do not fit)."""
        if self.check is not None:
            self.check(params, n_models)

    def chunkable(self, params: Mapping[str, Any]) -> bool:
        """Whether the engine may split a tensor into chunks of rows for these (normalized) params."""
        return bool(self.elementwise(params) if callable(self.elementwise) else self.elementwise)

    def keeps_whole(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of this shape must reach the method whole, even when the method is chunkable."""
        return self.whole_1d and len(shape) <= 1

    def needs_statistics(self, params: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
        """Whether a chunked run of a tensor of this shape needs the whole-tensor statistics first."""
        if self.statistics is None:
            return False
        return True if self.statistics_needed is None else bool(self.statistics_needed(params, tuple(shape)))

    def stages(self, params: Mapping[str, Any], dtype: torch.dtype) -> int:
        return 1 if self.statistics_stages is None else int(self.statistics_stages(params, dtype))

    def uses_block_statistics(self, params: Mapping[str, Any]) -> bool:
        return self.needs_block_statistics is not None and bool(self.needs_block_statistics(params))

    def check_weights(self, weights: Sequence[float]) -> None:
        if self.nonnegative_weights and (any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(f"method {self.name} takes barycentric weights: none negative, not all 0 "
                             f"(got {', '.join(f'{w:g}' for w in weights)})")

    def check_inputs(self, n_models: int, has_base: bool, has_weights: bool = False) -> None:
        if has_weights and not self.takes_weights:
            raise ValueError(f"method {self.name} takes no per-model weights")
        if self.base == "required" and not has_base:
            raise ValueError(f"method {self.name} needs a base model (--base)")
        if self.base == "never" and has_base:
            raise ValueError(f"method {self.name} takes no base model")
        if n_models < self.min_models:
            what = "fine-tuned models besides the base" if self.base == "required" else "models"
            raise ValueError(f"method {self.name} needs at least {self.min_models} {what}, got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            noun = "model" if self.max_models == 1 else "models"
            raise ValueError(f"method {self.name} takes at most {self.max_models} {noun}, got {n_models}")

    def __call__(self, models: Sequence[torch.Tensor], base: torch.Tensor | None = None, ratio: float = 1.0,
                 ctx: KeyContext | None = None, **params) -> torch.Tensor:
        full = self.normalize_params(params)
        return self.fn(list(models), base, float(ratio), ctx or KeyContext(shape=tuple(models[0].shape)), **full)


REGISTRY: dict[str, MergeMethod] = {}


def merge_method(name: str, *, summary: str, params: Sequence[Param] = (), **options) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` as merge method `name` (mergekit-style registry, sd-mecha-style declared params)."""

    def register(fn: MethodFn) -> MethodFn:
        method = MergeMethod(name=name, fn=fn, summary=summary, params=tuple(params), **options)
        for alias in (name, *method.aliases):
            if alias in REGISTRY:
                raise RuntimeError(f"merge method {alias!r} registered twice")
            REGISTRY[alias] = method
        fn.method = method
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r} (valid: {', '.join(method_names())})") from None


def method_names() -> list[str]:
    return sorted({m.name for m in REGISTRY.values()})
