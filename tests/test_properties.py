"""Property tests (hypothesis) for the dynamic layer and the padding/cropping of weight matrices.

The dynamic layer is compared with its definition: sample b of a batch runs through a copy of
the layer whose weight is W + delta_b.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from ocdwrap.layer import DynamicLayer, FullDelta, LayerState, Rank1Delta
from ocdwrap.networks import UNetDenoiser, crop, pad_to, padded_shape

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (rtol, atol): bfloat16 keeps 8 bits of mantissa, and W + delta is rounded differently from
# W x + delta x, so its tolerance is loose
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10), torch.bfloat16: (5e-2, 1e-1)}
FEW = settings(max_examples=25, deadline=None)
MORE = settings(max_examples=60, deadline=None)


def _dynamic(layer: nn.Module, spec) -> DynamicLayer:
    state = LayerState()
    state.delta = spec
    return DynamicLayer(layer, state)


def _with_weight(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.weight.copy_(weight.to(other.weight.dtype))
    return other


@MORE
@given(
    batch=st.integers(1, 4),
    d_in=st.integers(1, 9),
    d_out=st.integers(1, 9),
    extra=st.lists(st.integers(1, 3), max_size=2),
    bias=st.booleans(),
    rank1=st.booleans(),
    flattened=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_linear_equals_per_sample_weights(
    batch, d_in, d_out, extra, bias, rank1, flattened, dtype, seed
) -> None:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    layer = layer.to(dtype)
    x = torch.randn(batch, *extra, d_in, generator=g).to(dtype)
    if rank1:
        spec = Rank1Delta(
            torch.randn(batch, d_out, generator=g), torch.randn(batch, d_in, generator=g)
        )
        deltas = spec.u.double().unsqueeze(2) * spec.v.double().unsqueeze(1)  # exact u vᵀ
    else:
        deltas = torch.randn(batch, d_out, d_in, generator=g)
        spec = FullDelta(deltas)
    # sequence models may flatten (B, T, F) to (B*T, F), sample-major, before a Linear
    x_in = x.reshape(-1, d_in) if flattened and extra else x
    got = _dynamic(layer, spec)(x_in).reshape(batch, *extra, d_out)
    want = torch.stack(
        [
            _with_weight(layer, layer.weight.double() + deltas[b].double())(x[b])
            for b in range(batch)
        ]
    )
    assert got.dtype == dtype and got.shape == want.shape
    rtol, atol = TOL[dtype]
    scale = 1 + float(want.detach().float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * scale)


@MORE
@given(
    batch=st.integers(1, 3),
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 3),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.just("same")),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    size=st.tuples(st.integers(5, 8), st.integers(5, 8)),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_conv2d_equals_per_sample_weights(
    batch, c_in, c_out, kernel, stride, padding, dilation, padding_mode, size, bias, dtype, seed
) -> None:
    if padding == "same":
        stride = (1, 1)  # torch allows padding="same" only with stride 1
    g = torch.Generator().manual_seed(seed)
    layer = nn.Conv2d(
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=padding_mode,
        bias=bias,
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    layer = layer.to(dtype)
    x = torch.randn(batch, c_in, *size, generator=g).to(dtype)
    deltas = torch.randn(batch, *layer.weight.shape, generator=g)
    got = _dynamic(layer, FullDelta(deltas))(x)
    want = torch.cat(
        [
            _with_weight(layer, layer.weight.double() + deltas[b].double())(x[b : b + 1])
            for b in range(batch)
        ]
    )
    assert got.dtype == dtype and got.shape == want.shape
    rtol, atol = TOL[dtype]
    scale = 1 + float(want.detach().float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * scale)


@FEW
@given(
    conv=st.booleans(),
    batch=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_zero_delta_and_no_delta_are_the_base_layer_exactly(conv, batch, dtype, seed) -> None:
    torch.manual_seed(seed)
    layer = (nn.Conv2d(2, 3, 3, padding=1) if conv else nn.Linear(5, 4)).to(dtype)
    x = torch.randn(batch, 2, 6, 6) if conv else torch.randn(batch, 5)
    x = x.to(dtype)
    base = layer(x)
    assert torch.equal(_dynamic(layer, None)(x), base)
    zero = FullDelta(torch.zeros(batch, *layer.weight.shape))
    assert torch.equal(_dynamic(layer, zero)(x), base)


@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), max_size=2),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    mult=st.sampled_from([1, 2, 4, 8, 16, 32]),
    dtype=st.sampled_from(DTYPES),
)
def test_pad_to_padded_shape_then_crop_is_the_identity(lead, h, w, mult, dtype) -> None:
    x = (torch.randn(*lead, h, w) + 1).to(dtype)
    p = pad_to(x, padded_shape((h, w), mult))  # what UNetDenoiser pads its input to
    H, W = p.shape[-2:]
    assert p.shape[:-2] == x.shape[:-2] and p.dtype == dtype
    assert H % mult == 0 and W % mult == 0  # a size the UNet accepts
    assert h <= H < h + mult and w <= W < w + mult  # the smallest such size
    assert torch.equal(p[..., :h, :w], x)
    assert not p[..., h:, :].any() and not p[..., :, w:].any()  # zeros outside
    assert torch.equal(crop(p, (h, w)), x)


@settings(max_examples=8, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    channels=st.sampled_from([(4,), (4, 8), (4, 8, 8)]),
    batch=st.integers(1, 2),
)
@example(h=1, w=1, channels=(4, 8), batch=1)  # once found: a 1 x 1 deepest level
@example(h=3, w=2, channels=(4, 8, 8), batch=1)
def test_unet_denoiser_pads_to_an_accepted_size_and_crops_back(h, w, channels, batch) -> None:
    torch.manual_seed(0)
    net = UNetDenoiser((h, w), channels, 1, False, 0.0).eval()
    mult = max(2 ** (len(channels) - 1), 2)  # at least 2: GroupNorm never sees a single pixel
    assert net.mult == mult
    expected = [-(-s // mult) * mult for s in (h, w)]  # the next multiples of mult
    if len(channels) > 1 and expected == [mult, mult]:  # the deepest level would be 1 x 1
        expected[0] *= 2
    assert net.padded == tuple(expected)
    assert tuple(net.unet.config.sample_size) == net.padded
    seen = []
    net.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(batch, h, w)
    t = torch.randint(0, 1000, (batch,))
    c = torch.randn(batch, net.emb_dim)
    with torch.no_grad():
        out = net(x, t, c)
    assert out.shape == (batch, h, w) and torch.isfinite(out).all()
    (img,) = seen  # what the UNet saw: the matrix, zero-padded to the accepted size
    assert img.shape == (batch, 1, *net.padded)
    assert (
        torch.equal(img[:, 0, :h, :w], x) and not img[:, 0, h:].any() and not img[:, 0, :, w:].any()
    )
