"""Our LoHa / LoKr ΔW against the LyCORIS package's own functional forms (lycoris.functional.loha / lokr
.diff_weight, torch backend), the trainer that defines these formats: plain, Tucker and convolution
factors, with and without alpha. lycoris-lora is a dev dependency (pyproject.toml): never skipped."""

from __future__ import annotations

import lycoris.functional as lycoris
import pytest
import torch

import merge_lab_methods.lora as lora_math


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", ["linear", "conv", "tucker"])
@pytest.mark.parametrize("alpha", [None, 1.0])
def test_loha_is_lycoris(case, alpha):
    r, out, cin, k = 3, 12, 10, 3
    if case == "linear":
        w1a, w1b, w2a, w2b = rand(out, r, seed=1), rand(r, cin, seed=2), rand(out, r, seed=3), rand(r, cin, seed=4)
        t1 = t2 = None
        shape = (out, cin)
    elif case == "conv":  # LyCORIS without tucker: hada_w_b (r, in·k·k)
        w1a, w1b, w2a, w2b = (rand(out, r, seed=1), rand(r, cin * k * k, seed=2), rand(out, r, seed=3),
                              rand(r, cin * k * k, seed=4))
        t1 = t2 = None
        shape = (out, cin, k, k)
    else:  # hada_t (r, r, k, k), hada_w_a (r, out), hada_w_b (r, in)
        w1a, w1b, w2a, w2b = rand(r, out, seed=1), rand(r, cin, seed=2), rand(r, out, seed=3), rand(r, cin, seed=4)
        t1, t2 = rand(r, r, k, k, seed=5), rand(r, r, k, k, seed=6)
        shape = (out, cin, k, k)
    ours = lora_math.loha_delta(w1a, w1b, w2a, w2b, alpha=alpha, t1=t1, t2=t2, shape=shape)
    gamma = 1.0 if alpha is None else alpha / r
    theirs = lycoris.loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=gamma, backend="torch")
    torch.testing.assert_close(ours, theirs.reshape(shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["w1_whole_w2_lowrank", "w1_lowrank_w2_whole", "both_whole", "conv_whole",
                                  "conv_lowrank", "conv_tucker"])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_lokr_is_lycoris(case, alpha):
    r, k = 2, 3
    w1 = w1a = w1b = w2 = w2a = w2b = t2 = None
    if case == "w1_whole_w2_lowrank":
        w1, w2a, w2b, shape = rand(2, 4, seed=1), rand(6, r, seed=2), rand(r, 5, seed=3), (12, 20)
    elif case == "w1_lowrank_w2_whole":
        w1a, w1b, w2, shape = rand(2, r, seed=1), rand(r, 4, seed=2), rand(6, 5, seed=3), (12, 20)
    elif case == "both_whole":
        w1, w2, shape = rand(3, 2, seed=1), rand(4, 5, seed=2), (12, 10)
    elif case == "conv_whole":
        w1, w2, shape = rand(2, 2, seed=1), rand(4, 3, k, k, seed=2), (8, 6, k, k)
    elif case == "conv_lowrank":  # w2_b (r, in·k·k)
        w1, w2a, w2b, shape = rand(2, 2, seed=1), rand(4, r, seed=2), rand(r, 3 * k * k, seed=3), (8, 6, k, k)
    else:  # lokr_t2 (r, r, k, k), w2_a (r, out), w2_b (r, in)
        w1, w2a, w2b, t2 = rand(2, 2, seed=1), rand(r, 4, seed=2), rand(r, 3, seed=3), rand(r, r, k, k, seed=4)
        shape = (8, 6, k, k)
    ours = lora_math.lokr_delta(w1=w1, w1a=w1a, w1b=w1b, w2=w2, w2a=w2a, w2b=w2b, t2=t2, alpha=alpha, shape=shape)
    decomposed = w1a is not None or w2a is not None
    # functional.lokr takes gamma = alpha and divides by the rank itself (1 for two whole factors)
    gamma = (alpha if alpha is not None else r) if decomposed else 1.0
    if t2 is not None:
        # its rank_scale reads the rank off w2a.shape[1], which in the Tucker layout (w2a: (r, out)) is the
        # output width; ComfyUI (comfy/weight_adapter/lokr.py: dim = w2_b.shape[0]) and LyCORIS's module
        # (alpha / lora_dim) divide by r, as we do: compare at the same scale
        gamma *= w2a.shape[1] / r
    theirs = lycoris.lokr.diff_weight(w1, w1a, w1b, w2, w2a, w2b, t2, gamma=gamma, backend="torch")
    torch.testing.assert_close(ours, theirs.reshape(shape), rtol=1e-5, atol=1e-5)
