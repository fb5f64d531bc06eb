"""sd-mecha (PyPI) running the benchmark's recipes, for `merge-lab bench` (a measured child process).

The calls are the ones that work in sd-mecha 1.1.x (see its merge methods); each mirrors one of ours:
weighted_sum ↔ weighted_sum; model_stock ↔ n_model_stock (sd-mecha averages the cosines of consecutive
pairs, we of all pairs: the same work); ties_soup ↔ base + ties_sum(k=1); tsd ↔ base +
ties_sum_with_dropout(probability = 1 − p, no rescale).
"""

from __future__ import annotations

import torch


def build_recipe(spec: dict):
    import sd_mecha

    models = [sd_mecha.model(p) for p in spec["models"]]
    method = spec["method"]
    if method == "weighted_sum":
        a, b = models
        return sd_mecha.weighted_sum(a, b, alpha=float(spec.get("alpha", 0.5)))
    base = sd_mecha.model(spec["base"])
    deltas = [m - base for m in models]
    if method == "model_stock":
        return sd_mecha.n_model_stock(base, *models)
    if method == "ties_soup":
        return base + sd_mecha.ties_sum(*deltas, k=1.0)
    if method == "tsd":
        p = float(spec.get("params", {}).get("p", 0.1))
        return base + sd_mecha.ties_sum_with_dropout(*deltas, probability=1.0 - p, rescale=False, k=1.0,
                                                     seed=int(spec.get("seed", 0)))
    raise ValueError(f"no sd-mecha equivalent for {method}")


def output_dtype(path: str) -> torch.dtype:
    """The dtype of the first model's largest tensor (sd-mecha writes one dtype for every key; ours keeps
    each key's): F16 for the SD bench files, F8_E4M3 for the Flux ones."""
    from merge_lab.io.header import read_header

    largest = max(read_header(path).tensors.values(), key=lambda t: t.nbytes)
    return largest.torch_dtype


def run_mecha(spec: dict, out: str) -> None:
    import sd_mecha

    sd_mecha.merge(build_recipe(spec), output=out, merge_device=spec.get("device", "cpu"),
                   output_dtype=output_dtype(spec["models"][0]), tqdm=_no_tqdm)


def _no_tqdm(iterable=None, *args, **kwargs):
    class _Bar:
        def __init__(self, it):
            self.it = it

        def __iter__(self):
            return iter(self.it)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, *a, **k):
            pass

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            pass

    return _Bar(iterable if iterable is not None else [])
