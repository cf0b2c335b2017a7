"""Bad input gets a clear exception that names the argument, what was expected
and what was given, raised before any kernel runs."""

import pytest
import torch

from convgru_triton import ConvGRU, ConvGRU1d, ConvGRU3d, ConvGRUCell, ConvGRUCell3d, conv_gru, conv_gru_cell

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(kernel_size=0), ValueError, r"kernel_size entries must be positive, got 0"),
        (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must have 2 entries .* got \(3, 3, 3\)"),
        (dict(kernel_size=2.5), TypeError, r"kernel_size must be an int or a tuple of 2 ints, got float"),
        (dict(kernel_size=(3, 1.0)), TypeError, r"kernel_size must contain ints"),
        (dict(dilation=0), ValueError, r"dilation entries must be positive"),
        (dict(padding_mode="same"), ValueError, r"padding_mode must be one of .* got 'same'"),
        (dict(hidden_channels=0), ValueError, r"hidden_channels must be positive, got 0"),
        (dict(input_channels=-2), ValueError, r"input_channels must be positive, got -2"),
        (dict(input_channels=2.0), TypeError, r"input_channels must be an int, got float"),
        (dict(dropout=1.5), ValueError, r"dropout must be a number in \[0, 1\], got 1.5"),
        (dict(dropout=-0.1), ValueError, r"dropout must be a number in \[0, 1\]"),
        (dict(num_layers=0), ValueError, r"num_layers must be positive, got 0"),
        (dict(backend="cuda"), ValueError, r"backend must be one of .* got 'cuda'"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, pattern):
    args = dict(input_channels=2, hidden_channels=3, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        ConvGRU(**args)


def test_cell_constructor_checks_too():
    with pytest.raises(ValueError, match=r"kernel_size must have 3 entries"):
        ConvGRUCell3d(2, 3, (3, 3))
    with pytest.raises(ValueError, match="hidden_channels must be positive"):
        ConvGRUCell(2, 0, 3)


def test_sequence_input_errors(backend):
    model = ConvGRU(2, 3, 3, num_layers=2, backend=backend)
    x = torch.randn(4, 2, 2, 5, 6)
    with pytest.raises(ValueError, match=r"input must have 5 dims \(T, N, C_in, \*spatial\) .* got shape \(2, 5, 6\)"):
        model(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match=r"input must have 2 channels, got 3"):
        model(torch.randn(4, 2, 3, 5, 6))
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got dtype torch.int64"):
        model(torch.ones(4, 2, 2, 5, 6, dtype=torch.long))
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor, got dtype torch.complex64"):
        model(torch.ones(4, 2, 2, 5, 6, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got list"):
        model([1.0, 2.0])
    with pytest.raises(ValueError, match=r"input must have the same dtype as weight_ih \(torch.float32\), got torch.float64"):
        model(x.double())
    with pytest.raises(ValueError, match="at least one time step, got sequence length 0"):
        model(torch.randn(0, 2, 2, 5, 6))


def test_sequence_hx_errors(backend):
    model = ConvGRU(2, 3, 3, num_layers=2, backend=backend)
    x = torch.randn(4, 2, 2, 5, 6)
    cases = [
        (torch.randn(1, 2, 3, 5, 6), r"hx must have shape \(2, 2, 3, 5, 6\), got \(1, 2, 3, 5, 6\)"),  # layers
        (torch.randn(2, 3, 3, 5, 6), r"hx must have shape \(2, 2, 3, 5, 6\), got \(2, 3, 3, 5, 6\)"),  # batch
        (torch.randn(2, 2, 3, 5, 7), r"hx must have shape \(2, 2, 3, 5, 6\), got \(2, 2, 3, 5, 7\)"),  # spatial
        (torch.randn(2, 2, 4, 5, 6), r"hx must have shape \(2, 2, 3, 5, 6\), got \(2, 2, 4, 5, 6\)"),  # hidden
    ]
    for hx, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            model(x, hx)
    with pytest.raises(ValueError, match=r"hx must have the same dtype as input \(torch.float32\), got torch.float64"):
        model(x, torch.randn(2, 2, 3, 5, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hx must be on the same device as input \(cpu\), got meta"):
        model(x, torch.randn(2, 2, 3, 5, 6, device="meta"))
    with pytest.raises(TypeError, match=r"hx must be a floating-point tensor"):
        model(x, torch.zeros(2, 2, 3, 5, 6, dtype=torch.int32))
    unbatched = torch.randn(4, 2, 5, 6)
    with pytest.raises(ValueError, match=r"hx must have 4 dims for unbatched input, got shape \(2, 1, 3, 5, 6\)"):
        model(unbatched, torch.randn(2, 1, 3, 5, 6))
    with pytest.raises(ValueError, match=r"hx must have shape \(2, 3, 5, 6\), got \(2, 3, 5, 7\)"):
        model(unbatched, torch.randn(2, 3, 5, 7))


def test_cell_input_errors(backend):
    cell = ConvGRUCell(2, 3, 3, backend=backend)
    x = torch.randn(2, 2, 5, 6)
    with pytest.raises(ValueError, match=r"input must have 4 dims \(N, C_in, \*spatial\) or 3 dims unbatched .* got shape \(5, 6\)"):
        cell(torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"input must have 2 channels"):
        cell(torch.randn(2, 4, 5, 6))
    with pytest.raises(ValueError, match=r"hx must have shape \(2, 3, 5, 6\), got \(2, 3, 6, 5\)"):
        cell(x, torch.randn(2, 3, 6, 5))
    with pytest.raises(ValueError, match=r"hx must have 3 dims for unbatched input, got shape \(1, 3, 5, 6\)"):
        cell(x[0], torch.randn(1, 3, 5, 6))
    with pytest.raises(TypeError, match="input must be a floating-point tensor, got dtype torch.bool"):
        cell(torch.ones(2, 2, 5, 6, dtype=torch.bool))


def test_reflect_padding_larger_than_input(backend):
    model = ConvGRU1d(2, 3, 5, dilation=2, padding_mode="reflect", backend=backend)  # padding 4 each side
    with pytest.raises(ValueError, match=r"padding_mode='reflect' needs every spatial size of input larger than the padding 4, got spatial size \(4,\)"):
        model(torch.randn(3, 1, 2, 4))
    out, _ = model(torch.randn(3, 1, 2, 5))
    assert out.shape == (3, 1, 3, 5)


def test_functional_weight_errors():
    x = torch.randn(1, 2, 4, 4)
    w_ih, w_hh = torch.randn(9, 2, 3, 3), torch.randn(9, 3, 3, 3)
    with pytest.raises(ValueError, match=r"weight_hh must have shape \(3\*hidden, hidden, \*kernel\)"):
        conv_gru_cell(x, None, w_ih, torch.randn(9, 4, 3, 3))
    with pytest.raises(ValueError, match=r"must share the kernel size, got \(3, 3\) and \(5, 5\)"):
        conv_gru_cell(x, None, w_ih, torch.randn(9, 3, 5, 5))
    with pytest.raises(ValueError, match="bias_ih and bias_hh must both be given or both be None"):
        conv_gru_cell(x, None, w_ih, w_hh, torch.zeros(9), None)
    with pytest.raises(ValueError, match=r"bias_hh must have shape \(9,\), got \(3,\)"):
        conv_gru_cell(x, None, w_ih, w_hh, torch.zeros(9), torch.zeros(3))
    with pytest.raises(ValueError, match=r"weight_ih must have 3, 4 or 5 dims"):
        conv_gru_cell(x, None, torch.randn(9, 2), w_hh)
    with pytest.raises(ValueError, match=r"params must hold num_layers \* num_directions = 2 tuples, got 1"):
        conv_gru(x[None], None, [(w_ih, w_hh, None, None)], num_layers=1, bidirectional=True)
    with pytest.raises(ValueError, match=r"params\[1\] must map 3 input channels to 3 hidden channels, got 2 -> 3"):
        conv_gru(x[None], None, [(w_ih, w_hh, None, None)] * 2, num_layers=2)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\]"):
        conv_gru(x[None], None, [(w_ih, w_hh, None, None)], dropout=2.0)


def test_3d_module_rejects_2d_input():
    with pytest.raises(ValueError, match=r"input must have 6 dims .* for a 3-D ConvGRU, got shape \(2, 2, 5, 6\)"):
        ConvGRU3d(2, 3, 3)(torch.randn(2, 2, 5, 6))
    # 5 dims is an unbatched 3-D sequence (T, C_in, D, H, W): here with 1 channel.
    with pytest.raises(ValueError, match=r"input must have 2 channels, got 1 \(shape \(2, 1, 2, 5, 6\)\)"):
        ConvGRU3d(2, 3, 3)(torch.randn(2, 1, 2, 5, 6))
