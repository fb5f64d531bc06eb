"""Cross-checks against sd-mecha 1.1.8 (PyPI) where the definitions coincide (docs/methods.md), on random tiny
checkpoints written to files and merged by both programs.

- model_stock, row granularity, 2 fine-tunes = sd-mecha `n_model_stock` (cosines along the last dimension:
  the same rows for 1-D and 2-D keys; for 4-D convolution weights sd-mecha's "rows" are kernel columns, ours
  output channels, so there we compare with sd-mecha's math applied to the output-channel rows);
- ties_soup with k = 1 = sd-mecha `ties_sum` default (count vote, no trimming);
- ties / ties_soup with k < 1 = `ties_sum(k, vote_sgn=True / False)` (the same trimming rule).
"""

import pytest
import sd_mecha
import torch

from merge_lab.archs import layout_for
from merge_lab.demo.models import base_state_dict, finetune_state_dict, save_state_dict
from merge_lab.engine import Recipe, merge_to_state_dict


class _NoProgress:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def _chosen(key: str) -> bool:
    """A sample of every kind of tensor: 4-D convolutions, 1×1 convolutions, linear, 1-D, embeddings (and the
    first and last input blocks, by which the architecture is recognised)."""
    return any(part in key for part in (
        "input_blocks.0.0.", "input_blocks.1.", "input_blocks.11.0.in_layers.0", "middle_block.1.proj_in", "output_blocks.2.1.conv", "time_embed.",
        "first_stage_model.encoder.down.0.block.0.", "encoder.layers.0.self_attn", "encoder.layers.0.layer_norm1",
        "token_embedding", "position_embedding"))


@pytest.fixture(scope="module")
def peers_family(tmp_path_factory):
    """base + 2 fine-tunes (fp32) sharing a strong direction, so that every row's cosine is positive (where
    our guard t = 0 for c ≤ 0 departs from the peers); a sample of keys keeps sd-mecha's per-key cost low."""
    folder = tmp_path_factory.mktemp("peers")
    base = base_state_dict(layout_for("sd1", width=8, vocab=256), seed=5, dtype=torch.float32)
    base = {k: v for k, v in base.items() if _chosen(k)}
    paths = [save_state_dict(base, folder / "base.safetensors")]
    for i in (1, 2):
        paths.append(save_state_dict(finetune_state_dict(base, i, seed=5, shared=1.0, own=0.3),
                                     folder / f"ft{i}.safetensors"))
    return [str(p) for p in paths]


def _mecha(recipe):
    out = sd_mecha.merge(recipe, output_dtype=torch.float32, threads=0, tqdm=_NoProgress)
    out.pop("__metadata__", None)
    return out


def _ours(paths, method, **params):
    base, *models = paths
    recipe = Recipe(models=models, base=base, method=method, alpha=1.0, params=params, dtype="fp32")
    return merge_to_state_dict(recipe).state_dict


def _models(paths):
    return [sd_mecha.model(p, config="sd1-ldm") for p in paths]


def _float_keys(state):
    return [k for k, v in state.items() if v.is_floating_point() and not k.endswith("position_ids")]


def test_model_stock_row_equals_n_model_stock(peers_family):
    base, a, b = _models(peers_family)
    theirs = _mecha(sd_mecha.n_model_stock(base, a, b))
    ours = _ours(peers_family, "model_stock", granularity="row")
    wrapped = sd_mecha.model_stock.__wrapped__
    from safetensors.torch import load_file

    B, A, C = (load_file(p) for p in peers_family)
    compared = {"direct": 0, "rows of a 4-D key": 0}
    for key in _float_keys(B):
        ta, tc = A[key] - B[key], C[key] - B[key]
        rows = ta.reshape(ta.shape[0], -1) if ta.dim() > 1 else ta.reshape(1, -1)
        cos = torch.nn.functional.cosine_similarity(rows, tc.reshape(rows.shape), dim=-1)
        assert bool((cos > 0).all()), key  # the precondition under which the definitions coincide
        if ta.dim() <= 2:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
            compared["direct"] += 1
        else:
            expected = B[key] + wrapped(rows, tc.reshape(rows.shape), cos_eps=1e-6).reshape(ta.shape)
            torch.testing.assert_close(ours[key], expected, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(theirs[key], expected, rtol=1e-5, atol=1e-6)  # kernel columns differ
            compared["rows of a 4-D key"] += 1
    assert compared["direct"] > 30 and compared["rows of a 4-D key"] > 3


@pytest.mark.parametrize("k, vote_sgn, method", [(1.0, False, "ties_soup"), (0.5, False, "ties_soup"),
                                                 (0.3, True, "ties")])
def test_ties_equals_sd_mecha_ties_sum(peers_family, k, vote_sgn, method):
    base, a, b = _models(peers_family)
    recipe = base + (sd_mecha.ties_sum(a - base, b - base) if (k, vote_sgn) == (1.0, False) else
                     sd_mecha.ties_sum(a - base, b - base, k=k, vote_sgn=vote_sgn))
    theirs = _mecha(recipe)
    ours = _ours(peers_family, method, k=k)
    keys = _float_keys(ours)
    assert len(keys) > 40
    for key in keys:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
