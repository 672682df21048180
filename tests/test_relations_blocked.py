"""The relational losses (sp, pkt, rkd's distance, cc) evaluated in row blocks: the same values and
gradients as one block, gradients through the checkpointed blocks right (gradcheck, fp64), and the
B x B matrices never held whole (the autograd graph saves only O(B * D) tensors)."""
import pytest
import torch

from mlkd_fast.methods import cc_loss, pkt_loss, rkd_distance_loss, rkd_loss, sp_loss

LOSSES = {
    "sp": lambda s, t, chunk: sp_loss(s, t, chunk=chunk),
    "sp_stages": lambda s, t, chunk: sp_loss([s, s[:, :5]], [t, t[:, 2:]], chunk=chunk),
    "pkt": lambda s, t, chunk: pkt_loss(s, t, chunk=chunk),
    "rkd_distance": lambda s, t, chunk: rkd_distance_loss(s, t, chunk=chunk),
    "rkd": lambda s, t, chunk: rkd_loss(s, t, distance_chunk=chunk, angle_chunk=chunk),
    "cc": lambda s, t, chunk: cc_loss(s, t, chunk=chunk),
}


def _pair(b=37, ds=11, dt=7, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, ds, generator=gen, dtype=dtype).requires_grad_()
    t = torch.randn(b, dt, generator=gen, dtype=dtype).requires_grad_()
    return s, t


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("chunk", [1, 5, 36])
def test_row_blocks_give_the_one_block_value_and_gradients(name, chunk):
    s, t = _pair()
    whole = LOSSES[name](s, t, 37)
    g_whole = torch.autograd.grad(whole, (s, t))
    blocked = LOSSES[name](s, t, chunk)
    g_blocked = torch.autograd.grad(blocked, (s, t))
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-15)
    for a, b in zip(g_blocked, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", LOSSES)
def test_row_blocks_gradcheck(name):
    s, t = _pair(b=7, ds=4, dt=3, seed=1)
    assert torch.autograd.gradcheck(lambda a, b: LOSSES[name](a, b, 3), (s, t))


@pytest.mark.parametrize("name", LOSSES)
def test_row_blocks_in_fp32_and_without_a_graph(name):
    s, t = _pair(b=40, dtype=torch.float32)
    with torch.no_grad():
        plain = LOSSES[name](s, t, None)
        blocked = LOSSES[name](s, t, 6)
    torch.testing.assert_close(blocked, plain, rtol=1e-5, atol=1e-7)
    assert blocked.dtype == torch.float32


def _saved_elements(fn) -> int:
    """The largest tensor autograd saves for the backward while ``fn`` builds its graph."""
    largest = 0

    def pack(x):
        nonlocal largest
        largest = max(largest, x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return largest


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd_distance", "cc"])
def test_large_batches_never_save_a_batch_by_batch_matrix(name):
    b, d = 2048, 16
    s, t = _pair(b=b, ds=d, dt=d, dtype=torch.float32)
    assert _saved_elements(lambda: LOSSES[name](s, t, None)) < b * b // 4  # default blocks at this batch
    assert _saved_elements(lambda: LOSSES[name](s[:64], t[:64], None)) >= 64 * 64  # one block: the plain graph


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_chunk_must_be_a_positive_int(bad):
    s, t = _pair(b=4)
    for fn in (lambda: sp_loss(s, t, chunk=bad), lambda: pkt_loss(s, t, chunk=bad),
               lambda: rkd_distance_loss(s, t, chunk=bad), lambda: cc_loss(s, t, chunk=bad)):
        with pytest.raises(ValueError, match="chunk must be a positive int or None"):
            fn()
    with pytest.raises(ValueError, match="distance_chunk must be a positive int or None"):
        rkd_loss(s, t, distance_chunk=bad)
