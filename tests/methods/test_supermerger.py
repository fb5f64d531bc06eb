"""SuperMerger's calculation modes and sd-mecha's add-opposite merges (merge_methods/supermerger.py): golden
values from NumPy (or scipy.ndimage, which SuperMerger's smoothAdd calls) written straight from the
published formulas (hako-mikan/sd-webui-supermerger 0b1c4915, scripts/mergers/mergers.py), edge cases, and
cross-checks against sd-mecha 1.1.8's own functions called on the same tensors."""

import numpy as np
import pytest
import torch

import merge_lab_methods as methods

M = methods
SHAPES = [(7,), (5, 6), (4, 3, 3, 3)]


def rand(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def abc(shape, seed=0, dtype=torch.float64):
    return [rand(shape, seed + i, dtype) for i in range(3)]


def run(name, models, base=None, ratio=0.5, **params):
    method = M.get_method(name)
    if name.startswith("cosine_"):  # on tensors alone: the range from the parameters (the model's: engine test)
        params.setdefault("sim_range", "params")
    ctx = M.KeyContext(key="model.diffusion_model.x.weight", shape=tuple(models[0].shape))
    return method(models, base, ratio, ctx, **params)


def np_(t):
    return t.detach().to(torch.float64).numpy()


# ---- NumPy references, written from the published formulas ---------------------------------------------

def ref_train_difference(a, b, c, alpha):
    diff = b - c
    d0, d1 = np.abs(b - c), np.abs(b - a)
    total = d0 + d1
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(total != 0, d1 / total, 0.0)
    new_diff = np.sign(diff) * np.abs(scale) * np.abs(diff)
    return a + new_diff * (alpha * 1.8)


def ref_add_opposite(a, b, c, alpha):
    num, den = np.abs(a - b), np.abs(a - b) + np.abs(a + b - 2 * c)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.nan_to_num(num / den, nan=0.0)
    return a + (b - c) * (alpha * 2 * m)


def ref_add_strict_opposite(a, b, c, alpha):
    t = np.maximum(np.abs(a - c), np.abs(b - c))
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.clip(np.nan_to_num((c - a) * (b - c) / t ** 2, nan=0.0), 0, None)
    return a + (b - c) * (alpha * 2 * m)


def ref_cos0(x, y):
    """Cosine along axis 0: one per column (the rest of the shape)."""
    return (x * y).sum(0) / (np.sqrt((x * x).sum(0)) * np.sqrt((y * y).sum(0)))


def ref_cosine(a, b, alpha, variant, lo=0.0, hi=1.0):
    if variant == "A":
        a_n, b_n = a / np.sqrt((a * a).sum(0)), b / np.sqrt((b * b).sum(0))
    else:
        a_n, b_n = a, b
    sim = ref_cos0(a_n, b_n)
    mag = (a_n * b_n).sum() / (np.linalg.norm(a_n) * np.linalg.norm(b_n))
    k = ((sim + mag) / 2 - lo) / (hi - lo) - (abs(alpha) if variant == "A" else alpha)
    k = np.clip(k, 0, 1)
    return b * (1 - k) + a * k


def ref_swap(a, b, alpha, beta, second=False):
    """SuperMerger `tensormerge` by hand: slices with python's int() and slicing."""
    a, b = a.copy(), b.copy()
    along_1 = second and a.ndim > 1
    n = a.shape[1] if along_1 and a.shape[1] > 100 else a.shape[0]
    if alpha + beta <= 1:
        s, e = int(n * beta), int(n * (alpha + beta))
        out, src = a, b
    else:
        s, e = int(n * (alpha + beta - 1)), int(n * beta)
        out, src = b, a
    if along_1:
        out[:, s:e] = src[:, s:e]
    else:
        out[s:e] = src[s:e]
    return out


def ref_extract(base, b, c, alpha, beta, gamma):
    x, y = b - base, c - base
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    d = ((np.clip(cos, -1, 1)[..., None] + 1) / 2) ** gamma
    return base + (x + alpha * (y - x)) * (d + beta * (1 - 2 * d))


# ---- golden tests ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name, ref", [("train_difference", ref_train_difference),
                                       ("add_opposite", ref_add_opposite),
                                       ("add_strict_opposite", ref_add_strict_opposite)])
def test_difference_modes_golden(shape, name, ref):
    a, b, c = abc(shape, 1)
    for alpha in (1.0, 0.35, -0.5, 2.0):
        got = run(name, [a, b, c], ratio=alpha)
        np.testing.assert_allclose(np_(got), ref(np_(a), np_(b), np_(c), alpha), rtol=1e-12, atol=1e-12)
    # A B with --base C is A B C
    assert torch.equal(run(name, [a, b], c, 0.7), run(name, [a, b, c], None, 0.7))
    # α = 0 gives A; B = C adds nothing
    assert torch.equal(run(name, [a, b, c], ratio=0.0), a)
    if name != "add_opposite":  # add_opposite's B − C = 0 too, but the mask's ratio is defined: still A
        assert torch.equal(run(name, [a, c, c], ratio=1.0), a)
    assert torch.equal(run("add_opposite", [a, c, c], ratio=1.0), a)


def test_difference_modes_where_nothing_moved():
    """0/0 entries (A = B = C for train_difference's distances, A = B = C for the masks) give a mask of 0."""
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([1.0, 5.0, 3.0])
    c = torch.tensor([1.0, 1.0, 3.0])
    for name in ("train_difference", "add_opposite", "add_strict_opposite"):
        got = run(name, [a, b, c], ratio=1.0)
        assert torch.isfinite(got).all() and got[0] == 1.0 and got[2] == 3.0, name
    # train_difference by hand: entry 1: |B − A| = 3, |B − C| = 4, s = 3/7, A + 1.8·(3/7)·4
    assert run("train_difference", [a, b, c], ratio=1.0)[1].item() == pytest.approx(2 + 1.8 * 3 / 7 * 4, rel=1e-6)
    # strict: added only where A and B moved from C in opposite directions, 2α where equal and opposite
    a2, b2, c2 = torch.tensor([0.0, -1.0, 1.0]), torch.tensor([2.0, 1.0, 3.0]), torch.tensor([1.0, 0.0, 0.0])
    got = run("add_strict_opposite", [a2, b2, c2], ratio=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0 + 1.0 * 1.0, -1.0 + 1.0 * 1.0, 1.0]))


@pytest.mark.parametrize("shape", SHAPES)
def test_triple_sum_and_sum_twice_golden(shape):
    a, b, c = abc(shape, 4)
    A, B, C = map(np_, (a, b, c))
    for alpha, beta in ((0.5, 0.25), (0.1, 0.7), (1.2, -0.3)):
        np.testing.assert_allclose(np_(run("triple_sum", [a, b, c], ratio=alpha, beta=beta)),
                                   A * (1 - alpha - beta) + B * alpha + C * beta, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np_(run("sum_twice", [a, b, c], ratio=alpha, beta=beta)),
                                   (A * (1 - alpha) + B * alpha) * (1 - beta) + C * beta, rtol=1e-12, atol=1e-12)
    # α = β = 0: A; β = 0: weighted sum of A and B; sum twice with α = 0: weighted sum of A and C
    assert torch.equal(run("triple_sum", [a, b, c], ratio=0.0, beta=0.0), a)
    torch.testing.assert_close(run("sum_twice", [a, b, c], ratio=0.3, beta=0.0), torch.lerp(a, b, 0.3))
    torch.testing.assert_close(run("sum_twice", [a, b, c], ratio=0.0, beta=0.4), torch.lerp(a, c, 0.4))
    assert torch.equal(run("triple_sum", [a, b], c, 0.3), run("triple_sum", [a, b, c], None, 0.3))


@pytest.mark.parametrize("shape", [(7,), (1,), (3,), (5, 6), (2, 9), (4, 3, 3, 3), (3, 2, 1, 1), (6, 1, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_smooth_add_is_scipys_median_then_gaussian(shape, dtype):
    ndimage = pytest.importorskip("scipy.ndimage")
    a, b, c = abc(shape, 7, dtype)
    diff = (b - c).numpy()
    filtered = ndimage.gaussian_filter(ndimage.median_filter(diff, size=3), sigma=1)
    assert filtered.dtype == diff.dtype
    expected = a.numpy() + 0.8 * filtered
    got = run("smooth_add", [a, b, c], ratio=0.8)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(got.numpy(), expected, rtol=tol, atol=tol)
    # the filters on their own
    np.testing.assert_allclose(M.supermerger.median_filter3(b - c).numpy(), ndimage.median_filter(diff, size=3),
                               rtol=0, atol=0)
    assert torch.equal(run("smooth_add", [a, b, c], ratio=0.0), a)


def test_smooth_add_median_in_pieces(monkeypatch):
    """The median runs in pieces of rows (halo rows reflected at the ends): the same values whole."""
    ndimage = pytest.importorskip("scipy.ndimage")
    x = rand((9, 4, 3, 3), 2, torch.float32)
    monkeypatch.setattr(M.supermerger, "MEDIAN_PIECE", 81 * 6 * 5 * 5 * 2)  # 2 rows a piece
    np.testing.assert_array_equal(M.supermerger.median_filter3(x).numpy(), ndimage.median_filter(x.numpy(), size=3))


def test_smooth_add_of_a_constant_difference_is_plain_add_difference():
    a = rand((4, 5), 0)
    c = rand((4, 5), 1)
    b = c + 0.25
    torch.testing.assert_close(run("smooth_add", [a, b, c], ratio=2.0), a + 0.5, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(7,), (5, 6), (4, 3, 3, 3)])
@pytest.mark.parametrize("variant", ["A", "B"])
def test_cosine_golden(shape, variant):
    a = rand(shape, 3)
    b = a + 0.6 * rand(shape, 4)  # similar models: similarities spread over (0, 1)
    name = f"cosine_{variant.lower()}"
    for alpha, lo, hi in ((0.5, 0.0, 1.0), (0.2, 0.3, 0.95), (-0.3, 0.0, 1.0), (1.0, 0.0, 1.0)):
        got = run(name, [a, b], ratio=alpha, sim_min=lo, sim_max=hi)
        np.testing.assert_allclose(np_(got), ref_cosine(np_(a), np_(b), alpha, variant, lo, hi), rtol=1e-10,
                                   atol=1e-12)
    # α ≥ 1 (and s ≤ s_max) gives B; a huge range with α ≤ 0 pushes k to 0 or 1 depending on s only
    torch.testing.assert_close(run(name, [a, b], ratio=1.0), b)
    torch.testing.assert_close(run(name, [a, a.clone()], ratio=0.0), a)  # s = 1: k = 1, A


def test_cosine_range_is_checked_and_0d_tensors_merge():
    method = M.get_method("cosine_b")
    with pytest.raises(ValueError, match="sim_max"):
        method.check_params(method.normalize_params({"sim_range": "params", "sim_min": 0.5, "sim_max": 0.5}), 2)
    method.check_params(method.normalize_params({"sim_min": 0.5, "sim_max": 0.5}), 2)  # unused: the model's
    with pytest.raises(ValueError, match="model-wide similarity range"):
        method(torch.ones(3), None, 0.5, M.KeyContext(), **method.normalize_params({}))
    got = run("cosine_b", [torch.tensor(2.0), torch.tensor(3.0)], ratio=0.25)
    assert got.shape == () and got.item() == pytest.approx(3.0 * 0.25 + 2.0 * 0.75)  # s = 1: k = 0.75


def test_similarity_range_is_supermergers_precosine():
    pairs = []
    for i, shape in enumerate([(40, 30), (64,), (8, 6, 3, 3), (20, 20)]):
        a = rand(shape, 10 + i, torch.float32)
        pairs.append((a, a + 0.8 * rand(shape, 20 + i, torch.float32)))
    for variant in ("A", "B"):
        sims = []
        for a, b in pairs:
            x, y = np_(a), np_(b)
            if variant == "A":
                x, y = x / np.sqrt((x * x).sum(0)), y / np.sqrt((y * y).sum(0))
                sims.append(np.ravel(ref_cos0(x, y)))
            else:
                mag = (x * y).sum() / (np.linalg.norm(x) * np.linalg.norm(y))
                sims.append(np.ravel((ref_cos0(x, y) + mag) / 2))
        s = np.concatenate(sims)
        s = s[s >= np.percentile(s, 1, method="midpoint")]
        s = s[s <= np.percentile(s, 99, method="midpoint")]
        lo, hi = M.supermerger.similarity_range(pairs, variant)
        assert lo == pytest.approx(s.min(), abs=1e-6) and hi == pytest.approx(s.max(), abs=1e-6)
        assert 0 < lo < hi < 1


@pytest.mark.parametrize("shape", [(10,), (8, 5), (12, 3, 3, 3), (4, 200), (6, 128, 1, 1), (320, 4, 3, 3)])
@pytest.mark.parametrize("alpha, beta", [(0.5, 0.25), (0.3, 0.3), (0.6, 0.7), (0.0, 0.4), (1.0, 0.0),
                                         (1.0, 0.25), (0.37, 0.11)])
def test_tensor_swaps_golden(shape, alpha, beta):
    a, b = rand(shape, 5), rand(shape, 6)
    for name, second in (("tensor_swap", False), ("tensor_swap2", True)):
        got = run(name, [a, b], ratio=alpha, beta=beta)
        np.testing.assert_array_equal(np_(got), ref_swap(np_(a), np_(b), alpha, beta, second))
    if alpha == 0.0:
        assert torch.equal(run("tensor_swap", [a, b], ratio=0.0, beta=beta), a)
    if alpha == 1.0:
        assert torch.equal(run("tensor_swap", [a, b], ratio=1.0, beta=beta), b)


def swap_start(n, alpha, beta):
    return M.supermerger.swap_bounds(n, alpha, beta)[0]


def test_tensor_swap_edges():
    a, b = torch.arange(10.0), -torch.arange(10.0)
    # rows 2..6 from B
    assert torch.equal(run("tensor_swap", [a, b], ratio=0.5, beta=0.25)[2:7], b[2:7])
    # α + β > 1 wraps: B with A's rows ⌊10·0.25⌋ = 2 … ⌊10·0.5⌋ − 1 = 4
    got = run("tensor_swap", [a, b], ratio=0.75, beta=0.5)
    assert torch.equal(got[2:5], a[2:5]) and torch.equal(got[:2], b[:2]) and torch.equal(got[5:], b[5:])
    # the bounds are truncated products in floating point, as SuperMerger's int(n·(α+β−1)): 0.6 + 0.6 − 1 is
    # 0.19999999999999996, so the slice starts at row 1, not 2
    assert swap_start(10, 0.6, 0.6) == 1
    # 0-d tensors stay A
    assert run("tensor_swap", [torch.tensor(1.0), torch.tensor(2.0)], ratio=1.0).item() == 1.0
    # tensor2 on a conv with few input channels: the bounds from dim 0 (320) clip to nothing: A
    conv_a, conv_b = rand((320, 4, 3, 3), 1), rand((320, 4, 3, 3), 2)
    assert torch.equal(run("tensor_swap2", [conv_a, conv_b], ratio=0.5, beta=0.25), conv_a)


@pytest.mark.parametrize("shape", [(9,), (5, 6), (4, 3, 3, 3)])
def test_extract_golden(shape):
    base = rand(shape, 30)
    b = base + rand(shape, 31)
    c = base + 0.5 * (b - base) + rand(shape, 32)
    for alpha, beta, gamma in ((0.5, 0.25, 0.3), (0.0, 0.0, 1.0), (1.0, 1.0, 10.0), (0.3, 0.8, 0.0)):
        got = run("extract", [base, b, c], ratio=alpha, beta=beta, gamma=gamma)
        np.testing.assert_allclose(np_(got), ref_extract(np_(base), np_(b), np_(c), alpha, beta, gamma),
                                   rtol=1e-10, atol=1e-12)
    # B C with --base A is A B C
    assert torch.equal(run("extract", [b, c], base, 0.4), run("extract", [base, b, c], None, 0.4))
    # β = 0.5: (A + lerp(B, C, α))/2 whatever γ (SuperMerger's calcmode_en.md)
    torch.testing.assert_close(run("extract", [base, b, c], ratio=0.0, beta=0.5, gamma=3.0), (base + b) / 2)
    # γ = 0: d = 1, β = 0 adds the whole lerp of the differences: B at α = 0, C at α = 1
    torch.testing.assert_close(run("extract", [base, b, c], ratio=0.0, beta=0.0, gamma=0.0), b)
    torch.testing.assert_close(run("extract", [base, b, c], ratio=1.0, beta=0.0, gamma=0.0), c)


def test_extract_checks_and_0d():
    with pytest.raises(ValueError, match="beta"):
        M.get_method("extract").normalize_params({"beta": 1.5})
    x = [torch.ones(3), torch.ones(3), torch.ones(3)]
    with pytest.raises(ValueError, match="ratio"):
        run("extract", x, ratio=1.5)
    got = run("extract", [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)], ratio=0.5, beta=0.0, gamma=1.0)
    assert got.shape == () and got.item() == pytest.approx(1.0 + 1.5)  # cos = 1: d = 1


@pytest.mark.parametrize("name, n, base", [("train_difference", 3, False), ("smooth_add", 3, False),
                                           ("add_opposite", 3, False), ("add_strict_opposite", 3, False),
                                           ("triple_sum", 3, False), ("sum_twice", 3, False),
                                           ("cosine_a", 2, False), ("cosine_b", 2, False),
                                           ("tensor_swap", 2, False), ("tensor_swap2", 2, False),
                                           ("extract", 2, True)])
def test_inputs_are_left_alone_and_declarations(name, n, base):
    models = [rand((6, 4), 40 + i, torch.float32) for i in range(n)]
    b = rand((6, 4), 50, torch.float32) if base else None
    before = [m.clone() for m in models]
    out = run(name, models, b, 0.5)
    assert out.shape == (6, 4) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(torch.equal(m, x) for m, x in zip(models, before))
    method = M.get_method(name)
    assert not method.takes_weights
    with pytest.raises(ValueError):
        method.check_inputs(1, False)


# ---- cross-checks against sd-mecha 1.1.8 (its merge functions called directly on tensors) ------------------

def mecha(name):
    """sd-mecha's builtin merge method `name` as the plain function under its @merge_method (the method object
    builds recipe nodes for files; `__wrapped__` is the tensor function itself)."""
    builtin = pytest.importorskip("sd_mecha.extensions.builtin.merge_methods")
    module = builtin.slicing if name == "tensor_sum" else builtin  # the package's tensor_sum is a recipe wrapper
    return getattr(module, name).__wrapped__


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ours, theirs", [("train_difference", "train_difference_mask"),
                                          ("add_opposite", "add_opposite_mask"),
                                          ("add_strict_opposite", "add_strict_opposite_mask")])
def test_masks_match_sd_mecha(shape, ours, theirs):
    """sd-mecha's merge: A + (B − C)·mask(A, B, C, α) (its add_difference of the mask as alpha)."""
    mask = mecha(theirs)
    a, b, c = abc(shape, 60, torch.float32)
    for alpha in (1.0, 0.4):
        expected = a + (b - c) * mask(a, b, c, torch.tensor(alpha))
        torch.testing.assert_close(run(ours, [a, b, c], ratio=alpha), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_cosine_b_defaults_match_sd_mecha(shape):
    """[s_min, s_max] = [0, 1] (our default) is sd-mecha's add_cosine_b: lerp(A, B, 1 − clamp(s − α, 0, 1))."""
    a = rand(shape, 70, torch.float32)
    b = a + 0.6 * rand(shape, 71, torch.float32)
    for alpha in (0.0, 0.3, 0.5, 0.9):
        expected = mecha("add_cosine_b")(a, b, torch.tensor(alpha))
        torch.testing.assert_close(run("cosine_b", [a, b], ratio=alpha), expected, rtol=1e-6, atol=1e-6)


def test_cosine_a_matches_sd_mecha_where_the_definitions_coincide():
    """sd-mecha's add_cosine_a takes s = the per-column cosine alone (SuperMerger: its mean with the whole-tensor
    cosine). They coincide on 1-D tensors (one column) and on tensors whose columns have the same cosine."""
    fn = mecha("add_cosine_a")
    a = rand((16,), 72, torch.float32)
    b = a + 0.7 * rand((16,), 73, torch.float32)
    for alpha in (0.0, 0.2, 0.6):
        torch.testing.assert_close(run("cosine_a", [a, b], ratio=alpha), fn(a, b, torch.tensor(alpha)),
                                   rtol=1e-6, atol=1e-6)
    # 2-D: the columns' cosines differ, so do the results (the documented difference)
    a2 = rand((8, 5), 74, torch.float32)
    b2 = a2 + 0.7 * rand((8, 5), 75, torch.float32)
    assert not torch.allclose(run("cosine_a", [a2, b2], ratio=0.2), fn(a2, b2, torch.tensor(0.2)))


@pytest.mark.parametrize("shape", [(8,), (8, 5), (8, 3, 3, 3)])
@pytest.mark.parametrize("alpha, beta", [(0.5, 0.25), (0.25, 0.5), (0.75, 0.5), (1.0, 0.0), (0.0, 0.5)])
def test_tensor_swap_matches_sd_mecha_tensor_sum(shape, alpha, beta):
    """sd-mecha's tensor_sum(width = α, offset = β) rounds the bounds where SuperMerger truncates them: equal
    when n·β and n·(α + β) are integers (here n = 8 and quarter steps)."""
    a, b = rand(shape, 80, torch.float32), rand(shape, 81, torch.float32)
    expected = mecha("tensor_sum")(a.clone(), b.clone(), alpha, beta)  # it writes into its inputs
    assert torch.equal(run("tensor_swap", [a, b], ratio=alpha, beta=beta), expected)


@pytest.mark.parametrize("variant", ["A", "B"])
def test_cosine_takes_supermergers_range_over_the_whole_model_pair(variant, tmp_path):
    """By default (sim_range=model) the engine's first pass pools every merged key's similarities of the two
    files (SuperMerger's precosine) and each key is merged with that one range: the same as the method on
    the key's tensors with sim_range=params and the pooled range, and not the unscaled [0, 1]."""
    from safetensors.torch import load_file

    from merge_lab.archs import layout_for
    from merge_lab.demo.models import base_state_dict, finetune_state_dict, save_state_dict
    from merge_lab.engine import Recipe, merge_to_state_dict, prepare
    from merge_lab_methods.supermerger import similarity_range

    base = base_state_dict(layout_for("sd1", width=8, vocab=256), seed=5, dtype=torch.float32)
    paths = [save_state_dict(base, tmp_path / "a.safetensors"),
             save_state_dict(finetune_state_dict(base, 1, 0), tmp_path / "b.safetensors")]
    recipe = Recipe(models=[str(p) for p in paths], method=f"cosine_{variant.lower()}", alpha=0.3)
    merged = merge_to_state_dict(recipe).state_dict
    a, b = (load_file(str(p)) for p in paths)
    keys = [t.key for t in prepare(recipe, hash_inputs=False).tasks if t.action == "merge"]
    assert len(keys) > 100
    lo, hi = similarity_range(((a[k], b[k]) for k in keys), variant)
    assert (lo, hi) != (0.0, 1.0) and hi > lo
    unscaled = 0
    for key in keys:
        want = run(f"cosine_{variant.lower()}", [a[key], b[key]], ratio=0.3, sim_min=lo, sim_max=hi)
        torch.testing.assert_close(merged[key], want, rtol=1e-6, atol=1e-7, msg=key)
        unscaled += not torch.allclose(merged[key], run(f"cosine_{variant.lower()}", [a[key], b[key]], ratio=0.3))
    assert unscaled > len(keys) // 4



def test_beta_per_block_is_supermergers_weights_b(tmp_path, run_cli):
    """`beta_blocks` (--beta-blocks, the tab's β block ratios): each key's β is its block's value from the
    26-value string (SD1: BASE, IN00–IN11, M00, OUT00–OUT11), as SuperMerger's "weights B"; recorded in the
    output; refused for a method without a beta parameter."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from merge_lab.archs import layout_for
    from merge_lab.demo.models import base_state_dict, finetune_state_dict, save_state_dict
    from merge_lab.engine import Recipe, merge_to_state_dict
    from merge_lab.errors import RecipeError

    base = base_state_dict(layout_for("sd1", width=8, vocab=256), seed=7, dtype=torch.float32)
    paths = [str(save_state_dict(s, tmp_path / f"m{i}.safetensors"))
             for i, s in enumerate((base, finetune_state_dict(base, 1, 0), finetune_state_dict(base, 2, 0)))]
    betas = [round(0.01 * i, 2) for i in range(26)]  # BASE 0, IN00 0.01, …, M00 0.13, …, OUT11 0.25
    text = ",".join(f"{b:g}" for b in betas)
    recipe = Recipe(models=paths, method="triple_sum", alpha=0.3, beta_blocks=text)
    merged = merge_to_state_dict(recipe).state_dict
    a, b, c = (load_file(p) for p in paths)
    for key, beta in (("model.diffusion_model.input_blocks.4.1.proj_in.weight", betas[5]),
                      ("model.diffusion_model.middle_block.1.proj_out.weight", betas[13]),
                      ("model.diffusion_model.output_blocks.11.0.in_layers.2.weight", betas[25]),
                      ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", betas[0])):
        want = (1 - 0.3 - beta) * a[key] + 0.3 * b[key] + beta * c[key]
        torch.testing.assert_close(merged[key], want, rtol=1e-6, atol=1e-6, msg=key)
    # the same through the command line, recorded in the output
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli("merge", "--models", *paths, "--method", "sum_twice", "--alpha", "0.3",
                           "--beta-blocks", text, "--out", out, "--no-progress")
    assert code == 0, err
    with safe_open(out, "pt") as f:
        record = json.loads(f.metadata()["sd_merge_recipe"])
    assert record["beta_blocks"] == text and record["beta_ratios"]["OUT11"] == 0.25
    key = "model.diffusion_model.output_blocks.11.0.in_layers.2.weight"
    torch.testing.assert_close(load_file(str(out))[key], (0.7 * a[key] + 0.3 * b[key]) * 0.75 + 0.25 * c[key],
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(RecipeError, match="weighted_sum has no beta parameter"):
        Recipe(models=paths[:2], method="weighted_sum", beta_blocks=text).validate()
