"""Iso-C and TSV-Merge against a direct NumPy (float64) computation of the published formulas on small
matrices, convolutions and 1-D tensors; their edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import merge_lab_methods as M


def _tensors(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def _call(name, models, base, ratio=1.0, weights=None):
    ctx = M.KeyContext(key="k", shape=tuple(base.shape), weights=tuple(weights) if weights else None)
    return M.get_method(name)(list(models), base, ratio, ctx)


def _numpy_iso_c(taus):
    total = sum(t.double().numpy() for t in taus)
    if total.ndim < 2:
        return total / len(taus)
    matrix = total.reshape(total.shape[0], -1)
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return (s.mean() * u @ vh).reshape(total.shape)


def _numpy_tsv(taus):
    arrays = [t.double().numpy() for t in taus]
    if arrays[0].ndim < 2:
        return sum(arrays) / len(arrays)
    mats = [a.reshape(a.shape[0], -1) for a in arrays]
    k = min(mats[0].shape) // len(mats)
    parts = [np.linalg.svd(m, full_matrices=False) for m in mats]
    u_cat = np.concatenate([u[:, :k] for u, _, _ in parts], axis=1)
    s_cat = np.concatenate([s[:k] for _, s, _ in parts])
    v_cat = np.concatenate([vh[:k] for _, _, vh in parts], axis=0)
    p, _, q = np.linalg.svd(u_cat, full_matrices=False)
    u_orth = p @ q
    p, _, q = np.linalg.svd(v_cat, full_matrices=False)
    v_orth = p @ q
    return (u_orth @ np.diag(s_cat) @ v_orth).reshape(arrays[0].shape)


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (8, 4, 3, 3), (16,)])
@pytest.mark.parametrize("n", [2, 3])
def test_iso_c_golden(shape, n):
    base, models = _tensors(shape, n)
    taus = [m - base for m in models]
    got = _call("iso_c", models, base, ratio=0.7)
    want = base.double().numpy() + 0.7 * _numpy_iso_c(taus)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_iso_c_flattens_the_spectrum():
    base, models = _tensors((24, 24), 3, seed=1)
    delta = _call("iso_c", models, base) - base
    s = torch.linalg.svdvals(delta.double())
    total = torch.linalg.svdvals(sum(m - base for m in models).double())
    assert torch.allclose(s, torch.full_like(s, float(total.mean())), rtol=1e-4)


@pytest.mark.parametrize("shape", [(12, 20), (21, 9), (8, 4, 3, 3), (16,)])
@pytest.mark.parametrize("n", [2, 3])
def test_tsv_merge_golden(shape, n):
    base, models = _tensors(shape, n, seed=2)
    taus = [m - base for m in models]
    got = _call("tsv_merge", models, base, ratio=1.3)
    want = base.double().numpy() + 1.3 * _numpy_tsv(taus)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_tsv_merge_of_orthogonal_tasks_is_their_sum():
    """Task vectors of rank r/N in disjoint row and column subspaces are already decorrelated: Δ = Σ τᵢ."""
    base = torch.zeros(8, 8)
    g = torch.Generator().manual_seed(5)
    t1 = torch.zeros(8, 8)
    t1[:4, :4] = torch.randn(4, 4, generator=g)
    t2 = torch.zeros(8, 8)
    t2[4:, 4:] = torch.randn(4, 4, generator=g)
    got = _call("tsv_merge", [t1, t2], base)
    assert torch.allclose(got, t1 + t2, atol=1e-6)


def test_weights_ratio_and_edges():
    base, models = _tensors((10, 6), 2, seed=3)
    assert torch.equal(_call("iso_c", models, base, ratio=0.0), base)
    weighted = _call("iso_c", models, base, weights=[1.0, 0.5])
    scaled = [models[0], base + 0.5 * (models[1] - base)]
    assert torch.allclose(weighted, _call("iso_c", scaled, base), atol=1e-6)
    # a matrix with fewer singular triplets than tasks keeps none (as the reference implementation)
    base, models = _tensors((2, 5), 3, seed=4)
    assert torch.equal(_call("tsv_merge", models, base), base)
    with pytest.raises(ValueError):
        M.get_method("tsv_merge").check_inputs(1, True, False)
