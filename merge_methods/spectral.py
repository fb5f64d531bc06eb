"""Task-vector merges in each layer's singular value decomposition: Iso-C and TSV-Merge.

Both act on each 2-D weight as a matrix (a convolution [out, in, kh, kw] as [out, in·kh·kw], the reshape
kohya's LoRA extraction uses too), and on every other tensor (biases, norms, 1-D embeddings) as the mean of
the task vectors, as their reference implementations do (danielm1405/iso-merging: src/utils/iso.py `iso_c`,
src/utils/TSVM_utils.py `compute_and_sum_svd_mem_reduction`). Their `text_projection` exception is for
OpenCLIP's projection matrix in CLIP image classifiers; we treat every 2-D key alike (documented).

- Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
  Subspaces"): Δ = Σ τᵢ = U·diag(σ)·Vᵀ, Δ_iso = mean(σ)·U·Vᵀ — the summed task vector's spectrum made flat.
- TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging"):
  each τᵢ = Uᵢ·diag(σᵢ)·Viᵀ keeps its first k = ⌊r/N⌋ singular triplets (r = min(rows, cols)); the kept
  U's side by side [U₁…U_N] and V's stacked are each replaced by their nearest orthogonal matrix (the polar
  factor P·Qᵀ of their SVD P·S·Qᵀ), which decorrelates the tasks' subspaces, then Δ = U⊥·diag(σ₁…σ_N)·V⊥ᵀ.

θ = θ_base + α_b·Δ. The papers pick α on validation data over (0, 3]; as published runs merge at the chosen
α, our default is 1 (Δ as computed). The SVDs run in float64 on the CPU (float32 on CUDA), one thread
each: 0.2 s for 640 × 640, 1.3 s for 1280 × 1280, 4.4 s for SDXL's 1280 × 10240 feed-forward (through
its transpose: 17 s directly); the whole-model cost is in docs/methods.md.
"""

from __future__ import annotations

import torch

from .registry import Chunking, KeyContext, merge_method
from .task_vectors import apply_to_base, task_vectors, unchanged_base
from .tensors import sum_


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor | None:
    """The 2-D view a spectral method works on: a matrix as is, a convolution's filters flattened; None for
    biases, norms and other tensors of one dimension (and 0-d)."""
    if tensor.dim() < 2:
        return None
    return tensor.reshape(tensor.shape[0], -1)


def _svd_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.device.type == "cpu" else torch.float32


def _svd(matrix: torch.Tensor):
    """Thin SVD U, σ, Vᵀ; a wide matrix through its transpose (LAPACK on a 1280 × 10240 matrix takes 5× as
    long as on its 10240 × 1280 transpose here, and the factors are the same swapped)."""
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
    return uh.T, s, v.T


def _mean(taus: list[torch.Tensor]) -> torch.Tensor:
    return sum_(taus).div_(len(taus))


def iso_c_delta(taus: list[torch.Tensor]) -> torch.Tensor:
    """Δ_iso = mean(σ)·U·Vᵀ of Σ τᵢ for a matrix (or convolution); the mean of the τᵢ otherwise."""
    total = sum_(taus)
    matrix = _as_matrix(total)
    if matrix is None:
        return total.div_(len(taus))
    u, s, vh = _svd(matrix.to(_svd_dtype(matrix)))
    iso = (u * s.mean()) @ vh
    return iso.to(total.dtype).reshape(total.shape)


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix nearest to `matrix` (Frobenius): P·Qᵀ of its SVD P·S·Qᵀ."""
    p, _, qh = _svd(matrix)
    return p @ qh


def tsv_delta(taus: list[torch.Tensor]) -> torch.Tensor:
    """TSV-Merge's Δ for a matrix (or convolution); the mean of the τᵢ otherwise (module docstring)."""
    first = _as_matrix(taus[0])
    if first is None:
        return _mean(taus)
    n = len(taus)
    rows, cols = first.shape
    k = min(rows, cols) // n
    if k == 0:  # fewer singular triplets than tasks: nothing to keep (the reference gives 0 too)
        return torch.zeros_like(taus[0])
    dtype = _svd_dtype(first)
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = _svd(_as_matrix(tau).to(dtype))
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u_orth = _polar(torch.cat(us, dim=1))  # rows × N·k
    vh_orth = _polar(torch.cat(vhs, dim=0))  # N·k × cols
    delta = (u_orth * torch.cat(ss)) @ vh_orth
    return delta.to(taus[0].dtype).reshape(taus[0].shape)


def _spectral(delta_fn, models, base, ratio, ctx: KeyContext) -> torch.Tensor:
    if ratio == 0:
        return unchanged_base(base, ctx)
    delta = delta_fn(task_vectors(models, base, ctx))
    return apply_to_base(base, delta, ratio)


# A layer's SVD needs the whole matrix: never split into rows.
WHOLE = Chunking(split_rows=False)


@merge_method(
    "iso_c",
    summary="Iso-C: the summed task vector of each layer with its singular values replaced by their mean",
    base="required",
    min_models=1,
    chunking=WHOLE,
)
def iso_c(models, base, ratio, ctx: KeyContext):
    """θ_base + α_b·Δ_iso (module docstring); per-model weights scale each τᵢ before the sum."""
    return _spectral(iso_c_delta, models, base, ratio, ctx)


@merge_method(
    "tsv_merge",
    summary="TSV-Merge: each task vector's top ⌊r/N⌋ singular vectors, decorrelated (orthogonalized), summed",
    base="required",
    min_models=2,
    chunking=WHOLE,
)
def tsv_merge(models, base, ratio, ctx: KeyContext):
    """θ_base + α_b·Δ_TSV (module docstring); per-model weights scale each τᵢ before its SVD."""
    return _spectral(tsv_delta, models, base, ratio, ctx)
