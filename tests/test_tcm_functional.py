"""The functional TCM term against the naive per-pair reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from naive_tcm import naive_tcm

from pml_tcm.functional import tcm_hard_pairs, tcm_loss


@st.composite
def tcm_batches(draw):
    """A batch, optional references and pairs, and margins (ties have measure zero)."""
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(1, 24))
    dim = draw(st.integers(1, 9))
    num_classes = draw(st.integers(1, 6))
    # A margin within rounding of +-1 would tie with identical pairs (S = 1 +- ulp): the
    # ends themselves are tested, the last ulps before them are not meaningful.
    margins = st.floats(-1.0, 1.0).filter(lambda m: abs(m) == 1.0 or abs(m) < 1 - 1e-9)
    neg_margin = draw(margins)
    pos_margin = draw(margins.filter(lambda m: m >= neg_margin))
    weights = (draw(st.floats(0.0, 3.0)), draw(st.floats(0.0, 3.0)))
    mode = draw(st.sampled_from(["self", "ref", "pairs", "ref+pairs"]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    ref = ref_y = pairs = None
    if "ref" in mode:
        m = draw(st.integers(1, 24))
        ref = torch.randn(m, dim, generator=gen, dtype=torch.float64)
        ref_y = torch.randint(0, num_classes, (m,), generator=gen)
    if "pairs" in mode:
        m = n if ref is None else ref.shape[0]
        num_pairs = draw(st.integers(0, 40))
        # duplicates allowed: a pair listed twice counts twice
        pairs = tuple(torch.randint(0, size, (num_pairs,), generator=gen) for size in (n, m, n, m))
    return x, y, ref, ref_y, pairs, (pos_margin, neg_margin), weights


@settings(max_examples=250, deadline=None)
@given(tcm_batches())
def test_matches_naive_reference_value_and_gradient(batch):
    x, y, ref, ref_y, pairs, (pos_margin, neg_margin), (pos_weight, neg_weight) = batch
    kwargs = dict(
        pos_margin=pos_margin, neg_margin=neg_margin, pos_weight=pos_weight, neg_weight=neg_weight
    )
    inputs = [x.clone().requires_grad_()] + (
        [ref.clone().requires_grad_()] if ref is not None else []
    )
    ours = tcm_loss(
        inputs[0], y, inputs[1] if ref is not None else None, ref_y, pairs=pairs, **kwargs
    )
    naive_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    expected = naive_tcm(
        naive_inputs[0],
        y,
        naive_inputs[1] if ref is not None else None,
        ref_y,
        pairs=pairs,
        **kwargs,
    )
    assert ours.dtype == torch.float64
    assert abs(ours.item() - expected.item()) <= 1e-9
    our_grads = torch.autograd.grad(ours, inputs, allow_unused=True)
    naive_grads = torch.autograd.grad(expected, naive_inputs, allow_unused=True)
    for ours_g, naive_g in zip(our_grads, naive_grads, strict=True):
        ours_g = torch.zeros_like(inputs[0]) if ours_g is None else ours_g
        naive_g = torch.zeros_like(ours_g) if naive_g is None else naive_g
        torch.testing.assert_close(ours_g, naive_g, atol=1e-9, rtol=0)


def _away_from_margins(x, y, pos_margin, neg_margin, gap=1e-3):
    xn = torch.nn.functional.normalize(x, dim=1)
    sims = xn @ xn.T
    return bool(((sims - pos_margin).abs() > gap).all() and ((sims - neg_margin).abs() > gap).all())


def test_gradcheck():
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        x = torch.randn(10, 4, dtype=torch.float64, generator=gen)
        if _away_from_margins(x, None, 0.6, 0.1):
            break
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tcm_loss(t, y, pos_margin=0.6, neg_margin=0.1), (x,))
    ref = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    ref_y = torch.tensor([0, 1, 2, 3, 0, 1, 4])
    assert torch.autograd.gradcheck(
        lambda a, b: tcm_loss(a, y, b, ref_y, pos_margin=0.6, neg_margin=0.1), (x, ref)
    )


def test_margins_are_inclusive():
    # cosine similarities are exactly 0 here: a positive at m+ = 0 and a negative at
    # m- = 0 are both hard, each contributing 0 but counted.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    a1, p, a2, n = tcm_hard_pairs(x, y, pos_margin=0.0, neg_margin=0.0)
    assert sorted(zip(a1.tolist(), p.tolist())) == [(0, 1), (1, 0), (2, 3), (3, 2)]
    # negatives with S = 0 and with S = 1 are all >= 0
    assert len(a2) == len(n) == 8
    # positive part: mean of (0 - 0) = 0; negative part: mean of four 1s and four 0s
    assert tcm_loss(x, y, pos_margin=0.0, neg_margin=0.0).item() == 0.5


def test_empty_parts_are_zero_with_zero_gradient():
    cases = {
        "one class, all similar": (torch.tensor([[1.0, 0.0], [1.0, 0.01]]), torch.tensor([3, 3])),
        "one sample": (torch.tensor([[0.3, 0.4]]), torch.tensor([0])),
        "no hard pairs": (
            torch.tensor([[1.0, 0.0], [1.0, 0.001], [-1.0, 0.0], [-1.0, 0.001]]),
            torch.tensor([0, 0, 1, 1]),
        ),
    }
    for name, (x, y) in cases.items():
        x = x.clone().requires_grad_()
        loss = tcm_loss(x, y)
        (grad,) = torch.autograd.grad(loss, x)
        assert loss.item() == 0.0, name
        assert torch.equal(grad, torch.zeros_like(x)), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    y = torch.randint(0, 5, (64,), generator=gen)
    low = x.to(dtype).requires_grad_()
    loss = tcm_loss(low, y, pos_margin=0.5, neg_margin=0.0)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert low.grad.dtype == dtype and torch.isfinite(low.grad).all()
    reference = tcm_loss(low.detach().double(), y, pos_margin=0.5, neg_margin=0.0)
    assert abs(loss.item() - reference.item()) < 1e-2


def test_memory_is_one_similarity_matrix_not_per_pair_rows():
    # Autograd keeps O(N*M) scalars for backward, never an (num_pairs, D) gather.
    x = torch.randn(128, 64, requires_grad=True)
    y = torch.randint(0, 4, (128,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tcm_loss(x, y)
    assert max(saved) <= 128 * 128
    assert sum(saved) <= 128 * 128 + 8 * 128 * 64


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_runs_on_device(device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=gen)
    expected = naive_tcm(x, y, pos_margin=0.3, neg_margin=0.0)
    on_device = x.to(device).requires_grad_()
    loss = tcm_loss(on_device, y.to(device), pos_margin=0.3, neg_margin=0.0)
    loss.backward()
    assert loss.device.type == device and on_device.grad.device.type == device
    assert abs(loss.item() - expected.item()) < 1e-9
    pairs = tcm_hard_pairs(on_device.detach(), y.to(device), pos_margin=0.3, neg_margin=0.0)
    assert all(t.device.type == device for t in pairs)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(backend):
    """fullgraph=True fails on any host sync (.item(), data-dependent Python branch)."""
    torch._dynamo.reset()
    compiled = torch.compile(tcm_loss, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 8, generator=gen, requires_grad=True)
    y = torch.randint(0, 4, (40,), generator=gen)
    loss = compiled(x, y, pos_margin=0.4, neg_margin=0.1)
    loss.backward()
    expected = naive_tcm(x.detach().double(), y, pos_margin=0.4, neg_margin=0.1)
    assert abs(loss.item() - expected.item()) < 1e-5
    assert torch.isfinite(x.grad).all()


def test_count_true_in_row_blocks_matches_a_plain_count():
    from pml_tcm.functional.tcm import count_true

    gen = torch.Generator().manual_seed(5)
    for shape in ((3000, 2000), (5, 7), (0, 4), (1, 1 << 23)):
        mask = torch.rand(shape, generator=gen) > 0.4
        assert int(count_true(mask)) == int(mask.numpy().sum())
