"""Property tests for onnx_admm.structured: exact group counts, whole groups, idempotence, ties, optimality;
N:M: the exact pattern, the Euclidean projection (brute force), the conv run layout, ADMM with it."""

from __future__ import annotations

import itertools

import pytest
import torch

from onnx_admm.admm import ADMM, FixedSupport, RhoSchedule
from onnx_admm.projections import Constraint, Within, keep_count
from onnx_admm.structured import NM, Block, Column, Heads, group_keep_count, nm_runtimes, rounded_keep

SHAPES = [(4, 3), (3, 2, 2, 2), (5, 7), (6, 4, 1, 3)]
BLOCKS = [(1, 1), (2, 2), (2, 3), (4, 4), (8, 8)]


def _random(shape, seed, quantize=False):
    g = torch.Generator().manual_seed(seed)
    if quantize:  # few distinct values: many ties between groups
        return torch.randint(-1, 2, shape, generator=g).float()
    return torch.randn(shape, generator=g)


def _column_ids(shape):
    """Group id of every entry for Column: its column of the [out, rest] view."""
    out = shape[0]
    return torch.arange(Column.n_groups(shape)).repeat(out).reshape(shape)


def _block_ids(block: Block, shape):
    """Group id of every entry for Block: row-major tile number."""
    out, rest = shape[0], Column.n_groups(shape)
    _, grid_cols = block.grid(shape)
    rows = torch.arange(out).unsqueeze(1) // block.rows
    cols = torch.arange(rest).unsqueeze(0) // block.cols
    return (rows * grid_cols + cols).reshape(shape)


def _constraints(shape, fraction):
    n = Column.n_groups(shape)
    yield Column(int(fraction * n)), _column_ids(shape)
    for rows, cols in BLOCKS:
        probe = Block(rows, cols, 0)
        yield Block(rows, cols, int(fraction * probe.n_groups(shape))), _block_ids(probe, shape)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_exact_group_count_whole_groups_idempotent(fraction):
    for seed, shape in itertools.product(range(6), SHAPES):
        w = _random(shape, seed, quantize=seed % 2 == 0)
        for constraint, ids in _constraints(shape, fraction):
            assert isinstance(constraint, Constraint)
            mask = constraint.support(w)
            assert mask.dtype == torch.bool and mask.shape == w.shape
            n_groups = int(ids.max()) + 1
            kept = torch.zeros(n_groups, dtype=torch.bool).index_put_((ids[mask],), torch.tensor(True))
            assert int(kept.sum()) == constraint.keep_groups, constraint
            # whole groups: a group is either entirely kept or entirely zeroed
            assert torch.equal(mask, kept[ids]), constraint
            projected = constraint.project(w)
            assert torch.equal(projected, torch.where(mask, w, torch.zeros(())))
            assert torch.equal(constraint.project(projected), projected)
            assert torch.equal(constraint.support(projected), mask)


def test_column_is_one_kernel_position_across_all_filters():
    w = torch.ones(3, 2, 2, 2)
    w[:, 1, 0, 1] = 5.0  # column 1*4 + 0*2 + 1 = 5
    w[:, 0, 1, 1] = 4.0  # column 3
    mask = Column(2).support(w)
    assert mask[:, 1, 0, 1].all() and mask[:, 0, 1, 1].all()
    assert int(mask.sum()) == 2 * 3


def test_ties_lower_group_wins():
    w = torch.ones(4, 6)
    assert Column(2).support(w)[0].tolist() == [True, True, False, False, False, False]
    tiles = Block(2, 2, 3).support(w)  # 2x3 grid of tiles; first three in row-major order
    assert tiles[:2].all() and not tiles[2:].any()
    # sign does not matter, only the norm
    w = torch.tensor([[1.0, -2.0, 2.0], [1.0, 2.0, -2.0]])
    assert Column(1).support(w)[0].tolist() == [False, True, False]


def test_block_edge_tiles_are_ranked_by_their_own_size():
    # 3x3 with 2x2 tiles: tile (0,0) has 4 entries, the corner tile (1,1) one entry.
    w = torch.full((3, 3), 1.0)
    w[2, 2] = 1.5  # corner: norm 1.5 / sqrt(1) beats 2 / sqrt(4) = 1
    mask = Block(2, 2, 1).support(w)
    assert mask.tolist() == [[False] * 3, [False] * 3, [False, False, True]]


def test_zero_and_all_groups():
    w = _random((5, 3, 2, 2), 3)
    for constraint_type in (lambda k: Column(k), lambda k: Block(2, 3, k)):
        assert not constraint_type(0).support(w).any()
        assert torch.equal(constraint_type(0).project(w), torch.zeros_like(w))
    assert Column(Column.n_groups(w.shape)).support(w).all()
    assert Block(2, 3, Block(2, 3, 0).n_groups(w.shape)).support(w).all()
    with pytest.raises(ValueError, match="keep must be in"):
        Column(13).support(w)
    with pytest.raises(ValueError, match="keep must be in"):
        Block(2, 3, Block(2, 3, 0).n_groups(w.shape) + 1).support(w)


def test_bad_arguments():
    with pytest.raises(ValueError, match="keep_count|n_groups"):
        Column(-1)
    with pytest.raises(ValueError, match="tile size"):
        Block(0, 2, 1)
    with pytest.raises(ValueError, match=r"\[out, in\*kh\*kw\]"):
        Column(1).support(torch.ones(4))
    with pytest.raises(ValueError, match="allowed must be a bool tensor"):
        Block(2, 2, 1).support(torch.ones(4, 4), torch.ones(4, 4))


def _brute_force_best(w, ids, keep, allowed=None):
    """Smallest ||w - P(w)||^2 over every choice of ``keep`` eligible groups."""
    n_groups = int(ids.max()) + 1
    eligible = [g for g in range(n_groups) if allowed is None or allowed[ids == g].any()]
    target = w if allowed is None else torch.where(allowed, w, torch.zeros(()))
    best = None
    for chosen in itertools.combinations(eligible, keep):
        mask = torch.isin(ids, torch.tensor(chosen, dtype=ids.dtype))
        if allowed is not None:
            mask &= allowed
        dist = float(((w - torch.where(mask, target, torch.zeros(()))) ** 2).sum())
        best = dist if best is None else min(best, dist)
    return best


def test_euclidean_optimal_for_equal_groups():
    # Equal group sizes: every column; blocks that tile the matrix exactly.
    for seed in range(8):
        for shape, constraint_of in [
            ((3, 2, 1, 3), lambda k: Column(k)),
            ((4, 6), lambda k: Column(k)),
            ((4, 6), lambda k: Block(2, 2, k)),
            ((4, 6), lambda k: Block(1, 3, k)),
            ((6, 2, 2), lambda k: Block(3, 2, k)),
        ]:
            w = _random(shape, seed)
            probe = constraint_of(0)
            ids = _column_ids(shape) if isinstance(probe, Column) else _block_ids(probe, shape)
            n_groups = int(ids.max()) + 1
            allowed = _random(shape, seed + 100) > -0.3 if seed % 2 else None
            n_eligible = n_groups if allowed is None else len({int(i) for i in ids[allowed]})
            for keep in range(0, n_eligible + 1):
                constraint = constraint_of(keep)
                projected = constraint.project(w, allowed)
                dist = float(((w - projected) ** 2).sum())
                assert dist == pytest.approx(_brute_force_best(w, ids, keep, allowed), rel=1e-6, abs=1e-9)


def test_allowed_nests_and_within():
    for seed, shape in itertools.product(range(4), SHAPES):
        w = _random(shape, seed)
        for constraint, ids in _constraints(shape, 0.5):
            first = constraint.support(w)
            smaller = type(constraint)(**{**constraint.__dict__, "keep_groups": constraint.keep_groups // 2})
            second = smaller.support(w, first)
            assert not (second & ~first).any()
            assert torch.equal(Within(smaller, first).support(w), second)
            # allowed exact zeros beat large values outside allowed
            big_outside = torch.where(first, torch.zeros(()), w * 100)
            assert not (smaller.support(big_outside, first) & ~first).any()


def test_group_keep_count():
    assert group_keep_count(20, 0.5) == 10
    assert group_keep_count(20, 0.75) == 5
    assert group_keep_count(3, 0.9) == 1  # never empties the layer by default
    assert group_keep_count(3, 0.9, min_keep=0) == keep_count(3, 0.9) == 0
    assert group_keep_count(0, 0.5) == 0
    assert group_keep_count(7, 0.0) == 7
    with pytest.raises(ValueError):
        group_keep_count(7, 1.0)



# (shape, axis): Linear [out, in], Conv [out, in, kh, kw], MatMul [in, out] (runs along axis 0).
NM_SHAPES = [((4, 8), 1), ((3, 8, 2, 2), 1), ((16, 3), 0), ((2, 16, 1, 3), 1)]
PATTERNS = [(2, 4), (4, 8), (1, 4), (1, 2)]


def _run_ids(shape, axis, m):
    """Run id of every entry, by hand: entries that share every index but ``axis`` and ``index // m`` there."""
    index = torch.stack(torch.meshgrid(*[torch.arange(d) for d in shape], indexing="ij"))
    index[axis] //= m
    flat = torch.zeros(shape, dtype=torch.long)
    for k in range(len(shape)):
        flat = flat * (shape[k] // m if k == axis else shape[k]) + index[k]
    return flat


def test_nm_exact_pattern_and_idempotent():
    for (shape, axis), (n, m), seed in itertools.product(NM_SHAPES, PATTERNS, range(4)):
        w = _random(shape, seed)
        constraint = NM(n, m, axis)
        assert isinstance(constraint, Constraint)
        mask = constraint.support(w)
        ids = _run_ids(shape, axis, m)
        per_run = torch.bincount(ids[mask], minlength=int(ids.max()) + 1)
        assert per_run.tolist() == [n] * (w.numel() // m), (shape, n, m)  # exactly n free entries per run
        projected = constraint.project(w)
        assert torch.equal(projected, torch.where(mask, w, torch.zeros(())))
        assert constraint.max_nonzeros(projected) == n
        assert torch.equal(constraint.project(projected), projected)  # idempotent
        assert torch.equal(constraint.support(projected), mask)
        # the kept entries of a run are its n largest |w|
        for run in range(int(ids.max()) + 1):
            values = w[ids == run].abs()
            assert values[mask[ids == run]].min() >= values[~mask[ids == run]].max()


def test_conv_runs_go_along_input_channels_at_each_kernel_position():
    # [out, in, kh, kw] = [1, 4, 1, 2]: the runs are w[0, :, 0, 0] and w[0, :, 0, 1], not four consecutive
    # entries of the flattened OIHW weight (which would mix kernel positions).
    w = torch.tensor([[[[1.0, 8.0]], [[2.0, 7.0]], [[3.0, 6.0]], [[4.0, 5.0]]]])
    mask = NM(2, 4).support(w)
    assert mask[0, :, 0, 0].tolist() == [False, False, True, True]
    assert mask[0, :, 0, 1].tolist() == [True, True, False, False]
    # a MatMul weight [in, out] runs down its columns
    matmul = torch.tensor([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]])
    assert NM(1, 4, axis=0).support(matmul).tolist() == [[False, True], [False, False], [False, False], [True, False]]


def _brute_force_nm(w, ids, n, allowed=None):
    """Smallest ||w - x||^2 over every x with at most n nonzeros per run (zero outside ``allowed``)."""
    flat, run = w.reshape(-1), ids.reshape(-1)
    free = torch.ones_like(flat, dtype=torch.bool) if allowed is None else allowed.reshape(-1)
    size = flat.numel()
    masks = ((torch.arange(2**size)[:, None] >> torch.arange(size)) & 1).bool() & free  # every support
    counts = torch.zeros(masks.shape[0], int(run.max()) + 1, dtype=torch.long).index_add_(1, run, masks.long())
    valid = masks[(counts <= n).all(dim=1)]
    return float(torch.where(valid, torch.zeros(()), flat.square()).sum(dim=1).min())


def test_nm_is_the_euclidean_projection():
    for seed in range(6):
        for shape, axis, (n, m) in [((2, 8), 1, (2, 4)), ((2, 4, 1, 2), 1, (2, 4)), ((1, 8), 1, (4, 8)),
                                    ((8, 2), 0, (1, 4)), ((2, 8), 1, (3, 4))]:
            w = _random(shape, seed, quantize=seed % 3 == 2)  # some seeds: many ties
            allowed = _random(shape, seed + 50) > -0.5 if seed % 2 else None
            projected = NM(n, m, axis).project(w, allowed)
            ids = _run_ids(shape, axis, m)
            if allowed is not None:
                assert not projected[~allowed].any()
            dist = float(((w - projected) ** 2).sum())
            assert dist == pytest.approx(_brute_force_nm(w, ids, n, allowed), rel=1e-6, abs=1e-9), (shape, n, m)


def test_nm_ties_allowed_and_nesting():
    w = torch.ones(1, 8)
    assert NM(2, 4).support(w).tolist() == [[True, True, False, False] * 2]  # ties: the lower index
    # allowed entries first, even exact zeros against large entries outside it
    allowed = torch.tensor([[False, False, True, True, True, False, False, False]])
    big = torch.tensor([[9.0, 9.0, 0.0, 0.0, 1.0, 9.0, 9.0, 9.0]])
    assert NM(2, 4).support(big, allowed).tolist() == [[False, False, True, True, True, False, False, False]]
    # a run with fewer allowed entries than n keeps only those: nothing outside the previous support
    for seed, (shape, axis) in itertools.product(range(4), NM_SHAPES):
        w = _random(shape, seed)
        first = NM(2, 4, axis).support(w)
        second = NM(1, 4, axis).support(w, first)
        assert not (second & ~first).any() and NM(1, 4, axis).max_nonzeros(torch.where(second, w, 0.0)) == 1
        assert torch.equal(Within(NM(1, 4, axis), first).support(w), second)
        assert torch.equal(NM(2, 4, axis).support(w, first), first)  # the same pattern again: the same support


def test_nm_with_admm_and_masked_retraining():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    target = x @ torch.randn(16, 8, generator=g)
    w = torch.nn.Parameter(torch.randn(8, 16, generator=g))
    constraint = NM(2, 4)
    admm = ADMM({"w": w}, {"w": constraint}, RhoSchedule(1e-2, 1.3, 1.0))
    opt = torch.optim.SGD([w], lr=0.05)
    for _ in range(10):
        for _ in range(10):
            opt.zero_grad()
            ((x @ w.T - target) ** 2).mean().backward()
            admm.add_penalty_grad()
            opt.step()
        admm.update()
    supports = admm.hard_project()
    assert constraint.max_nonzeros(w.detach()) <= 2 and int(supports["w"].sum()) == w.numel() // 2
    fixed = FixedSupport({"w": w}, supports)
    for _ in range(5):
        opt.zero_grad()
        ((x @ w.T - target) ** 2).mean().backward()
        fixed.mask_grads()
        opt.step()
        fixed.apply(opt)
    assert constraint.max_nonzeros(w.detach()) <= 2 and not (w.detach()[~supports["w"]]).any()


def test_nm_bad_arguments_and_runtimes():
    with pytest.raises(ValueError, match="1 <= n < m"):
        NM(4, 4)
    with pytest.raises(ValueError, match="1 <= n < m"):
        NM(0, 4)
    with pytest.raises(ValueError, match="Python int"):
        NM(2.0, 4)
    with pytest.raises(ValueError, match="multiples of 4; axis 1 of shape \\(8, 3, 3, 3\\) holds 3"):
        NM(2, 4).support(torch.ones(8, 3, 3, 3))
    with pytest.raises(ValueError, match="lacks"):
        NM(2, 4, axis=2).support(torch.ones(4, 8))
    assert NM(2, 4).pattern == "2:4"
    assert nm_runtimes(2, 4)[0].startswith("TensorRT 8+ on NVIDIA Ampere")
    assert nm_runtimes(1, 8)[0].startswith("TensorRT")  # 1:8 implies 2:4
    assert nm_runtimes(4, 8)[0].startswith("none known: 4:8 does not imply 2:4")
    assert all("onnxruntime" in r[1] and "no speed-up" in r[1] for r in (nm_runtimes(2, 4), nm_runtimes(4, 8)))


@pytest.mark.parametrize("keep", [0, 1, 3, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_heads_keep_whole_heads_of_a_fused_qkv_weight(keep, dim):
    """4 heads of head_dim 2 in a fused [3 * 8] axis: head h owns rows q*8 + 2h + i of each third."""
    heads = Heads(keep, dim=dim, outer=3, inner=2)
    w = _random((24, 5) if dim == 0 else (5, 24), seed=keep)
    support = heads.support(w)
    rows = support.any(dim=1 - dim)
    per_head = rows.reshape(3, 4, 2)
    kept = per_head[0, :, 0]
    assert int(kept.sum()) == keep
    assert torch.equal(per_head, kept[None, :, None].expand(3, 4, 2))  # all rows of a head, in every third
    assert bool(support.any(dim=dim).all()) == (keep > 0)  # a kept row keeps every entry
    projected = heads.project(w)
    assert torch.equal(heads.project(projected), projected)
    # The heads kept have the largest norms over all their rows
    norms = w.movedim(dim, 0).reshape(3, 4, 2, -1).transpose(0, 1).reshape(4, -1).norm(dim=1)
    if 0 < keep < 4:
        assert norms[kept].min() >= norms[~kept].max()


def test_heads_within_a_previous_support_and_bad_arguments():
    w = _random((12, 3), seed=1)
    allowed = torch.ones(12, 3, dtype=torch.bool)
    allowed[torch.tensor([0, 1, 6, 7])] = False  # head 0 of the 2-block layout (outer 2, 3 heads of 2)
    support = Heads(2, dim=0, outer=2, inner=2).support(w * 100, allowed)
    assert not support[torch.tensor([0, 1, 6, 7])].any() and int(support.any(dim=1).sum()) == 8
    with pytest.raises(ValueError, match=r"Heads\(inner=...\) is a block count >= 1"):
        Heads(1, dim=0, inner=0)
    with pytest.raises(ValueError, match=r"does not divide dim 0"):
        Heads(1, dim=0, outer=5, inner=2).support(w)


@pytest.mark.parametrize("keep, n, multiple, expected", [
    (10, 16, 8, 8), (19, 32, 8, 16), (38, 64, 8, 40), (5, 64, 8, 8),  # nearest, at least one multiple
    (22, 32, 8, 24), (45, 64, 8, 48), (90, 128, 8, 88),
    (86, 90, 8, 88), (89, 90, 8, 88), (90, 90, 8, 90),  # never above the layer's count; a whole layer stays
    (3, 8, 8, 3), (5, 6, 8, 5),  # a layer of no more than `multiple` filters keeps its share
    (0, 64, 8, 0), (10, 16, 1, 10),  # an emptied layer, or no rounding
    # More than an eighth of the layer's filters away: the nearest multiple of half as many, down to exact.
    (11, 16, 8, 12), (12, 16, 8, 12),  # 8 / 16 would move 3 / 4 filters of 16
    (3, 16, 8, 4),  # 8 (at least one multiple) would keep more than twice the share
    (1, 16, 8, 2),  # 2 is within 2 of one filter of 16
    (1, 6, 4, 1),  # no multiple of 4 or 2 within 6 / 8 of one filter: the exact share
    (22, 40, 16, 24),  # 16 is 6 away (> 40 / 8): the nearest multiple of 8
])
def test_rounded_keep(keep, n, multiple, expected):
    assert rounded_keep(keep, n, multiple) == expected
    if multiple > 1 and 0 < keep < n and n > multiple:
        assert abs(expected - keep) <= n / 8
