"""The numba side of `kernels`: imported only through `kernels.compiled()` (ImportError without numba).

Every kernel runs with the GIL released (the engine's worker threads merge slices side by side) and is
cached on disk after its first compilation. Element-wise results use the torch form's operations in its
order, in float32, with no fused multiply-add (numba's default: LLVM does not contract without fastmath),
so they are the same bits; only the Gram matrix's dot products use reassociation (vectorized sums).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

JIT = {"nogil": True, "cache": True}
# Sums may be reordered (vectorized), nothing else: NaN and inf must still come out NaN and inf.
SUMS = {"reassoc", "contract"}
# Task vectors are built this many elements at a time into a scratch that stays in the L1/L2 cache.
BLOCK = 2048


@intrinsic
def _half_to_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _float_to_half(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _bits_to_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _float_to_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c rounded once (LLVM's llvm.fma: the FMA instruction, or an exact software form)."""
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        values = [context.cast(builder, v, t, types.float32) for v, t in zip(args, signature.args)]
        return builder.call(fn, values)
    return types.float32(a, b, c), codegen


E4M3FN_MAX = np.float32(448.0)
E5M2_MAX = np.float32(57344.0)


# 1.5 · 2^23: x + ROUNDER − ROUNDER rounds a float32 0 ≤ x < 2^22 to an integer, nearest even (the FPU's own
# rounding; LLVM keeps it without fastmath), so the subnormal case needs no call and no branch.
ROUNDER = np.float32(12582912.0)


@njit(inline="always")
def _select(condition, if_true, if_false):
    """condition ? if_true : if_false over uint32 bits, as arithmetic: a ternary is control flow to numba
    (which also mis-scopes it when inlined), and a branch per element keeps LLVM from vectorizing."""
    mask = types.uint32(0) - types.uint32(condition)
    return (types.uint32(if_true) & mask) | (types.uint32(if_false) & ~mask)


@njit(inline="always")
def _encode_fp8(value, limit, mantissa_bits, bias, least_normal, subnormal_scale):
    """float32 → the bits of an fp8 format with mantissa_bits and bias, as the engine's to_output_dtype does:
    saturated at ±limit (inf too), then rounded to nearest, ties to even; NaN as S.1111111 (e4m3fn's NaN;
    for e5m2 a NaN too). Both the normal and the subnormal case are computed and one selected, so LLVM
    vectorizes the loops that store fp8."""
    word = _float_to_bits(value)
    sign = (word >> types.uint32(24)) & types.uint32(0x80)
    magnitude = abs(value)
    below_limit = magnitude < limit  # False for NaN and ±inf (saturated; NaN replaced at the end)
    a = _bits_to_float(_select(below_limit, _float_to_bits(magnitude), _float_to_bits(limit)))
    # subnormal (or rounding up to the least normal): m · 2^(1-bias-mb), rounded by the FPU
    subnormal = types.uint32(types.int32((a * subnormal_scale + ROUNDER) - ROUNDER))
    w = _float_to_bits(a)
    shift = types.uint32(23 - mantissa_bits)
    w = w + ((types.uint32(1) << (shift - types.uint32(1))) - types.uint32(1)) + ((w >> shift) & types.uint32(1))
    exponent = (w >> types.uint32(23)) - types.uint32(127 - bias)  # wraps below the normals: not selected
    normal = (exponent << types.uint32(mantissa_bits)) | ((w >> shift) & types.uint32((1 << mantissa_bits) - 1))
    bits = sign | _select(a < least_normal, subnormal, normal)
    return _select(value != value, types.uint32(0x7F), bits)


@njit(inline="always")
def _decode_e4m3fn(bits):
    """fp8 e4m3fn bits → float32 by arithmetic (a table lookup is a gather, which does not vectorize):
    S.EEEE.MMM is 2^(E−7)·(1 + M/8) for E > 0, M·2^−9 for E = 0, NaN for S.1111.111 (no inf)."""
    x = types.uint32(bits) & types.uint32(0x7F)
    normal = (x << types.uint32(20)) + types.uint32(120 << 23)
    subnormal = _float_to_bits(np.float32(types.int32(x)) * np.float32(2.0 ** -9))
    magnitude = _select(x == types.uint32(0x7F), types.uint32(0x7FC00000),
                        _select(x < types.uint32(8), subnormal, normal))
    return _bits_to_float(magnitude | ((types.uint32(bits) & types.uint32(0x80)) << types.uint32(24)))


def load(array, i):
    """array[i] as float32 (the array's dtype names its format: see kernels.bits_view)."""


@overload(load, inline="always")
def _load(array, i):
    if array.dtype == types.uint16:
        return lambda array, i: _half_to_float(array[i])
    if array.dtype == types.int16:
        return lambda array, i: _bits_to_float(types.uint32(types.uint16(array[i])) << types.uint32(16))
    if array.dtype == types.float32:
        return lambda array, i: array[i]
    if array.dtype == types.uint8:  # fp8 e4m3fn
        return lambda array, i: _decode_e4m3fn(array[i])
    if array.dtype == types.int8:  # fp8 e5m2: the upper byte of an fp16
        return lambda array, i: _half_to_float(types.uint16(types.uint8(array[i])) << types.uint16(8))
    return None


def store(array, i, value):
    """array[i] = value (float32) rounded to the array's format; returns whether the stored value is
    NaN or inf (an fp16 overflow shows here, after the rounding)."""


@overload(store, inline="always")
def _store(array, i, value):
    if array.dtype == types.uint16:
        def fp16(array, i, value):
            bits = _float_to_half(value)
            array[i] = bits
            return (bits & 0x7C00) == 0x7C00
        return fp16
    if array.dtype == types.int16:
        def bf16(array, i, value):
            # torch's round-to-nearest-even, NaN as 0x7FC0
            word = _float_to_bits(value)
            if value != value:
                bits = types.uint16(0x7FC0)
            else:
                bits = types.uint16((word + ((word >> types.uint32(16)) & types.uint32(1))
                                     + types.uint32(0x7FFF)) >> types.uint32(16))
            array[i] = types.int16(bits)
            return (bits & 0x7F80) == 0x7F80
        return bf16
    if array.dtype == types.float32:
        def fp32(array, i, value):
            array[i] = value
            return (_float_to_bits(value) & types.uint32(0x7F800000)) == types.uint32(0x7F800000)
        return fp32
    if array.dtype == types.uint8:
        def e4m3fn(array, i, value):
            array[i] = types.uint8(_encode_fp8(value, E4M3FN_MAX, 3, 7, np.float32(2.0 ** -6), np.float32(512.0)))
            return value != value
        return e4m3fn
    if array.dtype == types.int8:
        def e5m2(array, i, value):
            array[i] = types.int8(types.uint8(_encode_fp8(value, E5M2_MAX, 2, 15, np.float32(2.0 ** -14),
                                                         np.float32(65536.0))))
            return value != value
        return e5m2
    return None


@njit(**JIT)
def lerp_from_start(a, b, weight, out):
    """out = fma(w, b − a, a) in float32: torch.lerp(a, b, w) for |w| < 0.5, as ATen's vectorized lerp
    computes it. Returns False when an output value is NaN or inf (after rounding to out's format)."""
    w = np.float32(weight)
    bad = False
    for i in range(out.size):
        x = load(a, i)
        bad |= store(out, i, _fma(w, load(b, i) - x, x))
    return not bad


@njit(**JIT)
def lerp_from_end(a, b, weight, out):
    """out = fma(w − 1, b − a, b): torch.lerp(a, b, w) for |w| ≥ 0.5. (Two kernels, one store each: numba
    mis-scopes an inlined store that appears twice in one function.)"""
    c = np.float32(weight) - np.float32(1.0)
    bad = False
    for i in range(out.size):
        y = load(b, i)
        bad |= store(out, i, _fma(c, y - load(a, i), y))
    return not bad


@njit(**JIT)
def bits_all_finite(bits, mask):
    """Whether no byte of an fp8 tensor (its uint8 view) has every bit of `mask` set: the NaN pattern
    S.1111.111 of e4m3fn (mask 0x7F; it has no inf), the all-ones exponent of e5m2's inf and NaN (0x7C).
    A branch-free OR over the bytes, which LLVM vectorizes."""
    bad = 0
    m = types.uint8(mask)
    for i in range(bits.size):
        bad |= (bits[i] & m) == m
    return bad == 0


@njit(**JIT)
def to_float32(src, dst):
    for i in range(src.size):
        dst[i] = load(src, i)


@njit(**JIT)
def from_float32(src, dst):
    for i in range(src.size):
        store(dst, i, src[i])


@njit(fastmath=SUMS, **JIT)
def _dot(a, b, size):
    total = np.float32(0.0)
    for i in range(size):
        total += a[i] * b[i]
    return total


@njit(**JIT)
def gram(models, base, out):
    """out[i, j] += Σ τᵢ·τⱼ over the slice (τᵢ = models[i] − base in float32; float32 dot products over
    blocks of BLOCK elements, summed in float64, as the torch form's `gram_for_cosines` but on shorter
    blocks). `models`: a tuple of flat arrays of one format, `base` the same format."""
    n = len(models)
    size = base.size
    scratch = np.empty((n, BLOCK), np.float32)
    base_block = np.empty(BLOCK, np.float32)
    for start in range(0, size, BLOCK):
        stop = min(start + BLOCK, size)
        # the task vectors of this block (written here, not in a helper: a call per block that takes the
        # 2-D scratch ran at half the speed); the base converted once per block, not once per model
        # (indices from 0 into block views: numba cannot prove `i - start` non-negative and wraps it, which
        # keeps LLVM from vectorizing the loop: 2.6x slower)
        width = stop - start
        part = base[start:stop]
        for i in range(width):
            base_block[i] = load(part, i)
        for m in range(n):
            x = models[m][start:stop]
            row = scratch[m]
            for i in range(width):
                row[i] = load(x, i) - base_block[i]
        for i in range(n):
            for j in range(i, n):
                out[i, j] += _dot(scratch[i], scratch[j], stop - start)
    for i in range(n):
        for j in range(i):
            out[i, j] = out[j, i]


@njit(**JIT)
def base_plus_scaled_sum(models, base, coefficient, out):
    """out = round((Σ (models[m] − base)) · coefficient + base), the sum taken in model order, each
    operation rounded to float32 as the torch form's sum_ and apply_to_base do. Returns False when an
    output value is NaN or inf (after rounding to out's format)."""
    n = len(models)
    bad = False
    c = np.float32(coefficient)
    for i in range(base.size):
        b = load(base, i)
        total = load(models[0], i) - b
        for m in range(1, n):
            total += load(models[m], i) - b
        bad |= store(out, i, total * c + b)
    return not bad


@njit(inline="always")
def _sign(value):
    return np.float32(value > 0) - np.float32(value < 0)


@njit(**JIT)
def ties_disjoint_mean(models, base, weights, masks, use_masks, mass, coefficient, out, lo, hi):
    """TIES without trimming over elements [lo, hi), the torch form's operations in its order (see
    task_vectors.ties_merge): τᵢ = (θᵢ − θ_base)·wᵢ (·maskᵢ, masks[:, i − lo], when use_masks: a drop),
    the elected sign sgn Σ τᵢ (mass) or sgn Σ sgn τᵢ (count), the mean of the τᵢ whose sign equals it,
    out = round(mean · coefficient + θ_base). Returns False when an output value is NaN or inf."""
    n = len(models)
    c = np.float32(coefficient)
    taus = np.empty((n, BLOCK), np.float32)
    votes = np.empty(BLOCK, np.float32)
    total = np.empty(BLOCK, np.float32)
    count = np.empty(BLOCK, np.float32)
    bad = False
    for start in range(lo, hi, BLOCK):
        width = min(BLOCK, hi - start)
        for m in range(n):
            x = models[m]
            row = taus[m]
            w = weights[m]
            if use_masks:
                keep = masks[m]
                for i in range(width):
                    row[i] = ((load(x, start + i) - load(base, start + i)) * w) * np.float32(keep[start - lo + i])
            else:
                for i in range(width):
                    row[i] = (load(x, start + i) - load(base, start + i)) * w
        for i in range(width):
            votes[i] = taus[0, i] if mass else _sign(taus[0, i])
        for m in range(1, n):
            row = taus[m]
            for i in range(width):
                votes[i] += row[i] if mass else _sign(row[i])
        for i in range(width):
            votes[i] = _sign(votes[i])
            agrees = np.float32(_sign(taus[0, i]) == votes[i])
            count[i] = agrees
            total[i] = taus[0, i] * agrees
        for m in range(1, n):
            row = taus[m]
            for i in range(width):
                agrees = np.float32(_sign(row[i]) == votes[i])
                count[i] += agrees
                total[i] += row[i] * agrees
        for i in range(width):
            mean = total[i] / max(count[i], np.float32(1.0))
            bad |= store(out, start + i, mean * c + load(base, start + i))
    return not bad
