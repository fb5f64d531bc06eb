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

import dataclasses
import functools
import inspect
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
    stage: int = 0  # which stage of a staged statistics pass this call is (see Statistics.stages)
    # The engine will keep this slice's Statistics.fn(...)["partial"] for `Statistics.merge_from_partial`.
    wants_partial: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


MethodFn = Callable[..., torch.Tensor]
ParamsPredicate = Callable[[Mapping[str, Any]], bool]


# ---- Optional engine hooks, grouped by concern --------------------------------------------------------
# A simple method declares none of them. Each group's defaults are "nothing special".


@dataclass(frozen=True)
class Chunking:
    """How the engine may split a big tensor before handing it to the method."""

    # True when the result on any range of rows equals the same rows of the whole-tensor result given the
    # same ctx.stats: the engine may then split big tensors into chunks of rows. A callable of the
    # normalized params when that depends on them (TIES trimming with k < 1 needs the whole tensor).
    split_rows: bool | ParamsPredicate = True
    # True when the method works on whole rows and treats a 1-D tensor as one row (DELLA's ranks, NuSLERP
    # per row): the engine then never splits a 1-D tensor (rows of other tensors are never split anyway).
    whole_1d: bool = False


@dataclass(frozen=True)
class Statistics:
    """Whole-tensor (or whole-block) statistics the engine gathers before merging chunks of a tensor."""

    # Additive statistics: fn(models, base, ctx, **params) -> dict of float64 tensors whose sums over row
    # chunks equal the whole-tensor value. The method reads them from ctx.stats.
    fn: Callable[..., dict[str, torch.Tensor]] | None = None
    # When the statistics are needed, as a function of (params, shape of the whole tensor); None: always.
    needed: Callable[[Mapping[str, Any], tuple[int, ...]], bool] | None = None
    # Statistics gathered in successive passes, each seeing the sums of the earlier ones in ctx.stats (and
    # its number in ctx.stage): stages(params, compute dtype) -> number of passes; None: 1.
    # (An exact k-th magnitude for TIES trimming is a radix select: one histogram pass per 16 bits.)
    stages: Callable[[Mapping[str, Any], torch.dtype], int] | None = None
    # True when a statistic is NaN or inf whenever an input element is (Model Stock's τᵢ·τᵢ): the engine then
    # skips its own finite check of the inputs of a key whose statistics it gathers in memory, and makes it
    # only when a statistic is not finite (finite but huge inputs can overflow one: the check then decides).
    reveal_nonfinite: bool = False
    # Optional merge from a partial result of the statistics pass: asked with ctx.wants_partial, `fn` may
    # return "partial", a tensor of the slice's shape (the method's own, not summed); the engine keeps it and
    # later calls merge_from_partial(partial, base, ratio, ctx, **params) for that slice instead of the
    # method's fn, so the models are converted and turned into task vectors once instead of twice. Same bits.
    merge_from_partial: MethodFn | None = None
    # A statistic computed over each whole block by the analysis pass ("block" granularity of Model Stock),
    # when per_block(params) is true: the engine then passes ctx.stats["block_gram"], the block's float64
    # Gram matrix of the task vectors.
    per_block: ParamsPredicate | None = None
    # A statistic of the whole model, when model_wide_needed(params) is true (SuperMerger's cosineA / cosineB
    # rescale every key's similarities by the range found over all keys): the engine first streams every
    # merged key whole, calls model_wide(pairs, **params) once with an iterator of (models, base) in the
    # compute dtype, and passes the dict it returns to every key as ctx.stats["model_wide"].
    model_wide: Callable[..., dict[str, Any]] | None = None
    model_wide_needed: ParamsPredicate | None = None


@dataclass(frozen=True)
class Compiled:
    """Compiled forms over one slice's raw inputs (the files' dtypes, CPU, finite), tried before anything is
    converted: statistics(models, base, ctx, **params) -> the slice's statistics as Statistics.fn gives them;
    merge(models, base, out, ratio, ctx, **params) -> whether the merged slice it wrote into `out` (the output
    dtype) is all finite. Either returns None to decline (no compiled kernels here, a dtype or case they do
    not cover): the engine then runs the torch form. merge gives the same bits as the method's fn for the
    same statistics (see merge_methods/kernels.py)."""

    statistics: Callable[..., dict[str, torch.Tensor] | None] | None = None
    merge: Callable[..., bool | None] | None = None


# The positional arguments each function of a method takes before its declared parameters (**params).
CALLING_CONVENTIONS = {
    "fn": ("models", "base", "ratio", "ctx"),
    "statistics.fn": ("models", "base", "ctx"),
    "statistics.merge_from_partial": ("partial", "base", "ratio", "ctx"),
    "statistics.model_wide": ("pairs",),
    "compiled.statistics": ("models", "base", "ctx"),
    "compiled.merge": ("models", "base", "out", "ratio", "ctx"),
}


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: what its declaration says (name, summary, params, base, model counts, weights),
    then the optional engine hooks, each group defaulting to "nothing special"."""

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
    # Checks that need both the params and the number of models: check(params, n_models), ValueError if bad.
    check: Callable[[Mapping[str, Any], int], None] | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    # True when the result is model A's tensor unchanged: the engine copies A's bytes instead of computing.
    copies_first: bool = False
    # The optional engine hooks (see the classes above).
    chunking: Chunking = Chunking()
    statistics: Statistics = Statistics()
    compiled: Compiled = Compiled()

    def __post_init__(self) -> None:
        for name, kind in (("chunking", Chunking), ("statistics", Statistics), ("compiled", Compiled)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"merge method {self.name!r}: {name}= takes a {kind.__name__}(...), "
                                f"got {getattr(self, name)!r}")
        check_signatures(self)

    def functions(self) -> dict[str, Callable]:
        """The method's functions that take its declared parameters as keywords, by CALLING_CONVENTIONS name."""
        found = {"fn": self.fn, "statistics.fn": self.statistics.fn,
                 "statistics.merge_from_partial": self.statistics.merge_from_partial,
                 "statistics.model_wide": self.statistics.model_wide,
                 "compiled.statistics": self.compiled.statistics, "compiled.merge": self.compiled.merge}
        return {what: fn for what, fn in found.items() if fn is not None}

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
        split = self.chunking.split_rows
        return bool(split(params) if callable(split) else split)

    def keeps_whole(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of this shape must reach the method whole, even when the method is chunkable."""
        return self.chunking.whole_1d and len(shape) <= 1

    def needs_statistics(self, params: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
        """Whether a chunked run of a tensor of this shape needs the whole-tensor statistics first."""
        if self.statistics.fn is None:
            return False
        needed = self.statistics.needed
        return True if needed is None else bool(needed(params, tuple(shape)))

    def stages(self, params: Mapping[str, Any], dtype: torch.dtype) -> int:
        stages = self.statistics.stages
        return 1 if stages is None else int(stages(params, dtype))

    def uses_model_wide_statistics(self, params: Mapping[str, Any]) -> bool:
        needed = self.statistics.model_wide_needed
        return self.statistics.model_wide is not None and (needed is None or bool(needed(params)))

    def uses_block_statistics(self, params: Mapping[str, Any]) -> bool:
        per_block = self.statistics.per_block
        return per_block is not None and bool(per_block(params))

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


def _signature_text(fn: Callable, signature: inspect.Signature) -> str:
    """`name(a, b, c=1)`: the function's name and parameters, without the annotations."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    name = getattr(target, "__qualname__", None) or repr(target)
    bare = [p.replace(annotation=p.empty) for p in signature.parameters.values()]
    return f"{name}{signature.replace(parameters=bare, return_annotation=signature.empty)}"


def check_signatures(method: MergeMethod) -> None:
    """TypeError unless each function of `method` that takes its parameters (fn, and the statistics and
    compiled hooks it gives: see CALLING_CONVENTIONS) takes every declared Param as a keyword (or **params),
    and fn takes no parameter beyond its calling convention that no Param declares. Parameters bound by a
    functools.partial (a variant's `fixed` ones) count as given."""
    declared = [p.name for p in method.params]
    twice = sorted({n for n in declared if declared.count(n) > 1})
    if twice:
        raise TypeError(f"merge method {method.name!r}: parameter {twice[0]!r} declared twice")
    for what, fn in method.functions().items():
        leading = CALLING_CONVENTIONS[what]
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            continue  # no signature to read (a builtin): nothing to check
        text = _signature_text(fn, signature)
        parameters = list(signature.parameters.values())
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
        keyword_only = [p for p in parameters if p.kind is p.KEYWORD_ONLY]
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if any(p.kind is p.VAR_POSITIONAL for p in parameters):
            rest = keyword_only  # *args takes the calling convention's arguments
        elif len(positional) < len(leading):
            raise TypeError(f"merge method {method.name!r}: {what} {text} must take "
                            f"({', '.join(leading)}, **params)")
        else:
            rest = positional[len(leading):] + keyword_only
        keywords = {p.name for p in rest if p.kind is not p.POSITIONAL_ONLY}
        for name in declared:
            if name not in keywords and not takes_any:
                raise TypeError(f"merge method {method.name!r}: declared parameter {name!r} is not a keyword "
                                f"parameter of its {what} {text}")
        bound = set(fn.keywords) if isinstance(fn, functools.partial) else set()
        for p in rest:
            if p.name in declared or p.name in bound or (what != "fn" and p.default is not p.empty):
                continue
            raise TypeError(f"merge method {method.name!r}: its {what} {text} takes {p.name!r}, which no "
                            f"declared Param gives (declare Param({p.name!r}, ...) or remove it; "
                            f"the calling convention is ({', '.join(leading)}, **params))")


@dataclass(frozen=True)
class Variant:
    """Another method registered from the same declaration (a method family): the same function, hooks,
    base and model counts under its own name and summary, with other parameter defaults. `fixed` binds
    parameters to a value and leaves them out of the variant's own (della_linear is della with no sign
    election: fixed={"election": None}); the params-mapping hooks (check, chunking and statistics
    predicates) see them too, the recorded params do not."""

    name: str
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)


def _with_fixed(predicate: Callable | None, fixed: Mapping[str, Any]) -> Callable | None:
    """A hook of the params mapping, given the variant's fixed parameters as well."""
    if predicate is None or not callable(predicate) or not fixed:
        return predicate
    return lambda params, *rest: predicate({**params, **fixed}, *rest)


def variant_of(method: MergeMethod, variant: Variant) -> MergeMethod:
    """The MergeMethod `variant` declares from `method` (TypeError if it names a parameter `method` lacks)."""
    declared = {p.name: p for p in method.params}
    for what, names in (("defaults", variant.defaults), ("fixed", variant.fixed)):
        for name in names:
            if name not in declared:
                raise TypeError(f"merge method {variant.name!r}: its {what} name {name!r}, which is not a "
                                f"parameter of {method.name} ({', '.join(declared) or 'none'})")
    both = sorted(set(variant.defaults) & set(variant.fixed))
    if both:
        raise TypeError(f"merge method {variant.name!r}: parameter {both[0]!r} both fixed and given a default")
    for name, value in variant.defaults.items():
        try:
            declared[name].parse(value)
        except ValueError as error:
            raise TypeError(f"merge method {variant.name!r}: default of {name}: {error}") from None
    params = tuple(dataclasses.replace(p, default=variant.defaults[p.name]) if p.name in variant.defaults else p
                   for p in method.params if p.name not in variant.fixed)
    fixed = dict(variant.fixed)

    def bind(fn: Callable | None) -> Callable | None:
        return functools.partial(fn, **fixed) if fn is not None and fixed else fn

    statistics, chunking = method.statistics, method.chunking
    return dataclasses.replace(
        method, name=variant.name, summary=variant.summary, params=params, aliases=(), fn=bind(method.fn),
        check=_with_fixed(method.check, fixed),
        chunking=dataclasses.replace(chunking, split_rows=_with_fixed(chunking.split_rows, fixed)),
        statistics=dataclasses.replace(
            statistics, fn=bind(statistics.fn), merge_from_partial=bind(statistics.merge_from_partial),
            needed=_with_fixed(statistics.needed, fixed), stages=_with_fixed(statistics.stages, fixed),
            per_block=_with_fixed(statistics.per_block, fixed)),
        compiled=Compiled(statistics=bind(method.compiled.statistics), merge=bind(method.compiled.merge)),
    )


REGISTRY: dict[str, MergeMethod] = {}


def merge_method(name: str, *, summary: str, params: Sequence[Param] = (), variants: Sequence[Variant] = (),
                 **options) -> Callable[[MethodFn], MethodFn]:
    """Register `fn` as merge method `name` (mergekit-style registry, sd-mecha-style declared params), and
    each of `variants` from the same declaration. `options` are MergeMethod's other fields. A declaration
    whose Params do not match the function's keyword parameters raises TypeError here, at import."""

    def register(fn: MethodFn) -> MethodFn:
        method = MergeMethod(name=name, fn=fn, summary=summary, params=tuple(params), **options)
        family = [method, *(variant_of(method, v) for v in variants)]
        names = [alias for m in family for alias in (m.name, *m.aliases)]
        for alias in names:
            if alias in REGISTRY or names.count(alias) > 1:
                raise RuntimeError(f"merge method {alias!r} registered twice")
        for m in family:
            for alias in (m.name, *m.aliases):
                REGISTRY[alias] = m
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
