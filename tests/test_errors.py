"""Bad input gets a clear exception that names the argument, what was expected
and what was given, raised before any kernel runs.

The bad-input tests build their tensors on the CPU (the default device) on every
machine, on purpose: the argument checks run before anything is computed and
before a backend is chosen (``nothing_computed`` fails any test that gets
further), so they take the same path on every device, and the messages they
match, quoted in docs/errors.md, name the CPU. The tests of odd but valid
input compute results and take their device from the ``device`` fixture.
"""

import pytest
import torch
from conftest import simulated_environment

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


def test_reflect_padding_larger_than_input(backend, device):
    model = ConvGRU1d(2, 3, 5, dilation=2, padding_mode="reflect", backend=backend, device=device)  # padding 4
    with pytest.raises(ValueError, match=r"padding_mode='reflect' needs every spatial size of input larger than the padding 4, got spatial size \(4,\)"):
        model(torch.randn(3, 1, 2, 4, device=device))
    out, _ = model(torch.randn(3, 1, 2, 5, device=device))  # the smallest size it pads
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


# ----------------------------------------------------------------------------
# The table of docs/errors.md, "Errors and numerics": every bad input, the exception
# it gets and its message, raised before anything is computed.
# ----------------------------------------------------------------------------

import os  # noqa: E402

import convgru_triton  # noqa: E402
import convgru_triton._backend as _backend_module  # noqa: E402
import convgru_triton.functional as _functional  # noqa: E402

ERRORS_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "errors.md")


def _seq(backend="auto", **kwargs):
    args = dict(input_channels=2, hidden_channels=3, kernel_size=3, num_layers=2, backend=backend)
    args.update(kwargs)
    return ConvGRU(**args)


def _x(*shape, **kwargs):
    return torch.randn(*(shape or (4, 2, 2, 5, 6)), **kwargs)


def _weights(c_in=2, hidden=3, k=3, dtype=torch.float32):
    return torch.randn(3 * hidden, c_in, k, k, dtype=dtype), torch.randn(3 * hidden, hidden, k, k, dtype=dtype)


def _cell_call(backend, input, hx, bias_ih, bias_hh):
    w_ih, w_hh = _weights()
    return conv_gru_cell(input, hx, w_ih, w_hh, bias_ih, bias_hh, backend=backend)


def _under_bfloat16_autocast(call):
    """``call()`` inside CPU bfloat16 autocast (where this file's tensors are)."""
    with torch.autocast(_x(1).device.type, dtype=torch.bfloat16):
        return call()


def _with_env(name, value, call):
    """``call()`` with the settings as if the environment variable ``name`` had
    held ``value`` when the package was imported."""
    with simulated_environment(**{name: value}):
        return call()


def _override(**changes):
    with convgru_triton.override_settings(**changes):
        pass


# (row, call(backend), exception type, the message as the docs/errors.md table shows it)
BAD_INPUTS = [
    # --- settings: the environment is read at import; a bad value raises at the first call ---
    ("CONVGRU_TRITON_FUSED_STEP unknown (sequence)", lambda b: _with_env(
        "CONVGRU_TRITON_FUSED_STEP", "yes", lambda: _seq(b)(_x())), ValueError,
     "environment variable CONVGRU_TRITON_FUSED_STEP must be one of 'auto', '1', '0' ('1': the fused "
     "convolution-and-gate step; '0': cuDNN + the gate kernels; 'auto': the tuning registry decides), got 'yes'"),
    ("CONVGRU_TRITON_FUSED_STEP unknown (cell)", lambda b: _with_env(
        "CONVGRU_TRITON_FUSED_STEP", "yes", lambda: _cell_call(b, _x(4, 2, 5, 6), None, None, None)), ValueError,
     "environment variable CONVGRU_TRITON_FUSED_STEP must be one of 'auto', '1', '0' ('1': the fused "
     "convolution-and-gate step; '0': cuDNN + the gate kernels; 'auto': the tuning registry decides), got 'yes'"),
    ("CONVGRU_TRITON_LAYOUT unknown", lambda b: _with_env(
        "CONVGRU_TRITON_LAYOUT", "nhwc", lambda: _seq(b)(_x())), ValueError,
     "environment variable CONVGRU_TRITON_LAYOUT must be one of 'auto', 'channels_last', 'keep' (the memory "
     "format the package computes in), got 'nhwc'"),
    ("CONVGRU_TRITON_BACKEND unknown", lambda b: _with_env(
        "CONVGRU_TRITON_BACKEND", "gpu", lambda: _seq(b)(_x())), ValueError,
     "environment variable CONVGRU_TRITON_BACKEND must be one of 'auto', 'torch', 'triton' (the gate math's "
     "backend where a module's backend argument is 'auto'), got 'gpu'"),
    ("CONVGRU_TRITON_DIRECT_LAUNCH unknown", lambda b: _with_env(
        "CONVGRU_TRITON_DIRECT_LAUNCH", "yes", lambda: _seq(b)(_x())), ValueError,
     "environment variable CONVGRU_TRITON_DIRECT_LAUNCH must be one of '1', '0' ('1': compiled kernels are "
     "called directly after their first launch; '0': every launch goes through Triton's argument binder), "
     "got 'yes'"),
    ("override_settings: unknown value", lambda b: _override(fused_step="yes"), ValueError,
     "fused_step (CONVGRU_TRITON_FUSED_STEP) must be one of 'auto', '1', '0' ('1': the fused "
     "convolution-and-gate step; '0': cuDNN + the gate kernels; 'auto': the tuning registry decides), got 'yes'"),
    ("override_settings: unknown setting", lambda b: _override(fused=1), TypeError,
     "override_settings() got unknown settings ['fused']; the settings are ['backend', 'direct_launch', "
     "'fused_step', 'layout', 'tuning_dir']"),
    # --- under autocast: dtypes compared after autocast's cast, which leaves float64 as it is ---
    ("autocast: float64 input, float32 weights", lambda b: _under_bfloat16_autocast(
        lambda: _seq(b)(_x(dtype=torch.float64))), ValueError,
     "input must have the same dtype as weight_ih after autocast's cast to torch.bfloat16 (which leaves "
     "float64 as it is), got input torch.float64 and weight_ih torch.float32"),
    # --- constructor arguments ---
    ("kernel_size 0", lambda b: _seq(b, kernel_size=0), ValueError,
     "kernel_size entries must be positive, got 0"),
    ("kernel_size wrong length", lambda b: _seq(b, kernel_size=(3, 3, 3)), ValueError,
     "kernel_size must have 2 entries for a 2-d ConvGRU, got (3, 3, 3)"),
    ("kernel_size not int", lambda b: _seq(b, kernel_size=2.5), TypeError,
     "kernel_size must be an int or a tuple of 2 ints, got float"),
    ("dilation 0", lambda b: _seq(b, dilation=(1, 0)), ValueError,
     "dilation entries must be positive, got (1, 0)"),
    ("padding_mode", lambda b: _seq(b, padding_mode="same"), ValueError,
     "padding_mode must be one of ('zeros', 'reflect', 'replicate', 'circular'), got 'same'"),
    ("padding argument", lambda b: _seq(b, padding=1), TypeError,
     "ConvGRU2d() got an unexpected keyword argument 'padding': padding is always 'same' (the state keeps its "
     "spatial size); padding_mode chooses how"),
    ("stride argument", lambda b: _seq(b, stride=2), TypeError,
     "ConvGRU2d() got an unexpected keyword argument 'stride': a ConvGRU's convolutions have stride 1 and "
     "'same' padding, so the state keeps the input's spatial size from step to step; downsample the input "
     "before the ConvGRU instead"),
    ("hidden_channels 0", lambda b: _seq(b, hidden_channels=0), ValueError,
     "hidden_channels must be positive, got 0"),
    ("input_channels negative", lambda b: _seq(b, input_channels=-2), ValueError,
     "input_channels must be positive, got -2"),
    ("input_channels float", lambda b: _seq(b, input_channels=2.0), TypeError,
     "input_channels must be an int, got float"),
    ("num_layers 0", lambda b: _seq(b, num_layers=0), ValueError,
     "num_layers must be positive, got 0"),
    ("dropout > 1", lambda b: _seq(b, dropout=1.5), ValueError,
     "dropout must be a number in [0, 1], got 1.5"),
    ("dropout < 0", lambda b: _seq(b, dropout=-0.1), ValueError,
     "dropout must be a number in [0, 1], got -0.1"),
    ("backend name", lambda b: _seq(backend="cuda"), ValueError,
     "backend must be one of ('auto', 'torch', 'triton'), got 'cuda'"),
    # --- the input ---
    ("input dims (sequence)", lambda b: _seq(b)(_x(2, 5, 6)), ValueError,
     "input must have 5 dims (T, N, C_in, *spatial) or 4 dims unbatched (T, C_in, *spatial) for a 2-D "
     "ConvGRU, got shape (2, 5, 6)"),
    ("input dims (cell)", lambda b: ConvGRUCell(2, 3, 3, backend=b)(_x(5, 6)), ValueError,
     "input must have 4 dims (N, C_in, *spatial) or 3 dims unbatched for a 2-D ConvGRU "
     "cell, got shape (5, 6)"),
    ("input channels", lambda b: _seq(b)(_x(4, 2, 3, 5, 6)), ValueError,
     "input must have 2 channels, got 3 (shape (4, 2, 3, 5, 6))"),
    ("input not a tensor", lambda b: _seq(b)([1.0, 2.0]), TypeError,
     "input must be a torch.Tensor, got list"),
    ("input integer", lambda b: _seq(b)(torch.ones(4, 2, 2, 5, 6, dtype=torch.int64)), TypeError,
     "input must be a floating-point tensor, got dtype torch.int64"),
    ("input complex", lambda b: _seq(b)(torch.ones(4, 2, 2, 5, 6, dtype=torch.complex64)), TypeError,
     "input must be a floating-point tensor, got dtype torch.complex64"),
    ("input dtype vs weights", lambda b: _seq(b)(_x(dtype=torch.float64)), ValueError,
     "input must have the same dtype as weight_ih (torch.float32), got torch.float64: convert the input "
     "(input.to(torch.float32)) or the parameters (module.to(torch.float64))"),
    ("input device vs weights", lambda b: _seq(b)(_x(device="meta")), ValueError,
     "input must be on the same device as weight_ih (cpu), got meta"),
    ("sequence length 0", lambda b: _seq(b)(_x(0, 2, 2, 5, 6)), ValueError,
     "input must hold at least one time step, got sequence length 0"),
    ("spatial size 0", lambda b: _seq(b)(_x(4, 2, 2, 0, 6)), ValueError,
     "input must have every spatial size positive, got spatial size (0, 6)"),
    ("reflect padding >= size", lambda b: ConvGRU1d(2, 3, 5, dilation=2, padding_mode="reflect", backend=b)(
        _x(3, 1, 2, 4)), ValueError,
     "padding_mode='reflect' needs every spatial size of input larger than the padding 4, got spatial size (4,)"),
    ("circular padding > size", lambda b: ConvGRU1d(2, 3, 5, dilation=3, padding_mode="circular", backend=b)(
        _x(3, 1, 2, 5)), ValueError,
     "padding_mode='circular' needs every spatial size of input at least the padding 6, got spatial size (5,)"),
    # --- the initial state ---
    ("hx batch", lambda b: _seq(b)(_x(), _x(2, 3, 3, 5, 6)), ValueError,
     "hx must have shape (2, 2, 3, 5, 6), got (2, 3, 3, 5, 6)"),
    ("hx spatial size", lambda b: _seq(b)(_x(), _x(2, 2, 3, 5, 7)), ValueError,
     "hx must have shape (2, 2, 3, 5, 6), got (2, 2, 3, 5, 7)"),
    ("hx layers", lambda b: _seq(b)(_x(), _x(1, 2, 3, 5, 6)), ValueError,
     "hx must have shape (2, 2, 3, 5, 6), got (1, 2, 3, 5, 6)"),
    ("hx dims (unbatched input)", lambda b: _seq(b)(_x(4, 2, 5, 6), _x(2, 1, 3, 5, 6)), ValueError,
     "hx must have 4 dims for unbatched input, got shape (2, 1, 3, 5, 6)"),
    ("hx shape (cell)", lambda b: ConvGRUCell(2, 3, 3, backend=b)(_x(2, 2, 5, 6), _x(2, 3, 6, 5)), ValueError,
     "hx must have shape (2, 3, 5, 6), got (2, 3, 6, 5)"),
    ("hx dtype", lambda b: _seq(b)(_x(), _x(2, 2, 3, 5, 6, dtype=torch.float64)), ValueError,
     "hx must have the same dtype as input (torch.float32), got torch.float64"),
    ("hx dtype (cell)", lambda b: ConvGRUCell(2, 3, 3, backend=b)(_x(2, 2, 5, 6), _x(2, 3, 5, 6).half()),
     ValueError, "hx must have the same dtype as input (torch.float32), got torch.float16"),
    ("hx device", lambda b: _seq(b)(_x(), _x(2, 2, 3, 5, 6, device="meta")), ValueError,
     "hx must be on the same device as input (cpu), got meta"),
    ("hx device (cell)", lambda b: ConvGRUCell(2, 3, 3, backend=b)(_x(2, 2, 5, 6), _x(2, 3, 5, 6, device="meta")),
     ValueError, "hx must be on the same device as input (cpu), got meta"),
    ("hx integer", lambda b: _seq(b)(_x(), torch.zeros(2, 2, 3, 5, 6, dtype=torch.int32)), TypeError,
     "hx must be a floating-point tensor, got dtype torch.int32"),
    ("hx complex (cell)", lambda b: ConvGRUCell(2, 3, 3, backend=b)(
        _x(2, 2, 5, 6), torch.zeros(2, 3, 5, 6, dtype=torch.complex64)), TypeError,
     "hx must be a floating-point tensor, got dtype torch.complex64"),
    # --- functional forms: the weights ---
    ("weights with 0 channels", lambda b: conv_gru_cell(
        _x(1, 2, 4, 4), None, torch.randn(0, 2, 3, 3), torch.randn(0, 0, 3, 3), backend=b), ValueError,
     "weight_ih and weight_hh must have at least one input and one hidden channel, got shapes (0, 2, 3, 3) "
     "and (0, 0, 3, 3)"),
    ("weight shapes", lambda b: conv_gru_cell(
        _x(1, 2, 4, 4), None, torch.randn(9, 2, 3, 3), torch.randn(9, 4, 3, 3), backend=b), ValueError,
     "weight_hh must have shape (3*hidden, hidden, *kernel) and weight_ih (3*hidden, input_channels, *kernel), "
     "got (9, 4, 3, 3) and (9, 2, 3, 3)"),
    ("weight kernel sizes", lambda b: conv_gru_cell(
        _x(1, 2, 4, 4), None, torch.randn(9, 2, 3, 3), torch.randn(9, 3, 5, 5), backend=b), ValueError,
     "weight_ih and weight_hh must share the kernel size, got (3, 3) and (5, 5)"),
    ("weight dtypes", lambda b: conv_gru_cell(
        _x(1, 2, 4, 4), None, torch.randn(9, 2, 3, 3), torch.randn(9, 3, 3, 3, dtype=torch.float64), backend=b),
     ValueError, "weight_hh must have the same dtype as weight_ih (torch.float32), got torch.float64"),
    ("integer weights", lambda b: conv_gru_cell(
        _x(1, 2, 4, 4), None, torch.ones(9, 2, 3, 3, dtype=torch.int64), torch.randn(9, 3, 3, 3), backend=b),
     TypeError, "weight_ih must be a floating-point tensor, got dtype torch.int64"),
    ("one bias only", lambda b: _cell_call(b, _x(1, 2, 4, 4), None, torch.zeros(9), None), ValueError,
     "bias_ih and bias_hh must both be given or both be None"),
    ("bias shape", lambda b: _cell_call(b, _x(1, 2, 4, 4), None, torch.zeros(9), torch.zeros(3)), ValueError,
     "bias_hh must have shape (9,), got (3,)"),
    ("params count", lambda b: conv_gru(
        _x(1, 1, 2, 4, 4), None, [_weights() + (None, None)], bidirectional=True, backend=b), ValueError,
     "params must hold num_layers * num_directions = 2 tuples, got 1"),
    ("functional dropout", lambda b: conv_gru(
        _x(1, 1, 2, 4, 4), None, [_weights() + (None, None)], dropout=2.0, backend=b), ValueError,
     "dropout must be in [0, 1], got 2.0"),
    ("functional num_layers", lambda b: conv_gru(
        _x(1, 1, 2, 4, 4), None, [_weights() + (None, None)], num_layers=0, backend=b), ValueError,
     "num_layers must be a positive int, got 0"),
]


@pytest.fixture
def nothing_computed(monkeypatch):
    """Fail if a bad input got as far as a convolution or the sequence operator
    (and so the gate kernels): every check runs before any work is done."""

    def reached(*args, **kwargs):
        raise AssertionError("a bad input reached the convolutions / the ConvGRU operator")

    monkeypatch.setattr(_functional, "conv_gru_sequence", reached)
    monkeypatch.setattr(_functional, "conv_same", reached)


@pytest.mark.parametrize("row, call, error, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_table(row, call, error, message, backend, nothing_computed):
    with pytest.raises(error) as info:
        call(backend)
    assert message in str(info.value)


def test_forced_triton_without_interpreter_fails_before_computing(monkeypatch, nothing_computed):
    """CPU tensors on the Triton backend without the interpreter: a RuntimeError
    that says what to do (the subprocess version is in test_backend.py)."""
    monkeypatch.setattr(_backend_module, "_interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match=r"need CUDA tensors; to run them on the CPU .* set TRITON_INTERPRET=1"):
        _seq("triton")(_x())


def test_errors_doc_table_lists_every_bad_input():
    """Every message of BAD_INPUTS appears in the table of docs/errors.md (the
    README links it), and every row of that table is a message tested here or a
    documented non-error."""
    text = open(ERRORS_DOC, encoding="utf-8").read()
    section = text
    for row, _, error, message in BAD_INPUTS:
        assert f"`{message}`" in section, f"docs/errors.md table lacks the row for {row!r}: {message}"
        line = next(line for line in section.splitlines() if f"`{message}`" in line)
        assert error.__name__ in line, f"docs/errors.md row for {row!r} does not name {error.__name__}"


# --- inputs that look odd but are valid: exact results, no error ---------------


def test_expanded_input_and_state(backend, device):
    """Stride-0 (expanded) input, initial state and incoming gradient: the
    kernels only read them (every output is freshly allocated), so the result
    and the gradients equal those of dense copies."""
    torch.manual_seed(0)
    model = ConvGRU(2, 3, 3, num_layers=2, bidirectional=True, dtype=torch.float64, backend=backend, device=device)
    x0 = torch.randn(1, 1, 2, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    h0 = torch.randn(1, 1, 3, 1, 6, dtype=torch.float64, device=device, requires_grad=True)
    x = x0.expand(3, 2, 2, 5, 6)  # every step and sample the same frame
    hx = h0.expand(4, 2, 3, 5, 6)  # one row broadcast over layers, batch and height
    out, h_n = model(x, hx)
    (out.sum() + h_n.sum()).backward()  # expanded incoming gradients
    grads = [x0.grad, h0.grad] + [p.grad for p in model.parameters()]

    x0_ref, h0_ref = x0.detach().clone().requires_grad_(True), h0.detach().clone().requires_grad_(True)
    ref_model = ConvGRU(2, 3, 3, num_layers=2, bidirectional=True, dtype=torch.float64, backend="torch",
                        device=device)
    ref_model.load_state_dict(model.state_dict())
    out_ref, h_n_ref = ref_model(x0_ref.expand(3, 2, 2, 5, 6).contiguous(), h0_ref.expand(4, 2, 3, 5, 6).contiguous())
    (out_ref.sum() + h_n_ref.sum()).backward()
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(h_n, h_n_ref)
    ref_grads = [x0_ref.grad, h0_ref.grad] + [p.grad for p in ref_model.parameters()]
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("reset_after", [False, True], ids=["reset_before", "reset_after"])
def test_expanded_tensors_straight_into_the_kernels(reset_after, device):
    """The gate pre-activations, the state and the gradient arriving at the
    operator all expanded (stride 0 over steps, batch and space) go into the
    kernels as they are; results equal the reference on dense copies."""
    from convgru_triton._conv import ConvSpec
    from convgru_triton.ops.sequence.op import conv_gru_sequence
    from convgru_triton.ops.sequence.naive import conv_gru_cell_ref

    gen = torch.Generator().manual_seed(3)

    def leaf(*shape, scale=1.0):  # drawn on the CPU (the same values on every device), used on the device
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device).requires_grad_(True)

    hidden, spec = 2, ConvSpec.create(2, 3)
    gx_row = leaf(1, 1, 3 * hidden, 1, 5)
    h_col = leaf(1, hidden, 4, 1)
    w = leaf(3 * hidden, hidden, 3, 3, scale=0.3)
    b_ih, b_hh = leaf(3 * hidden), leaf(3 * hidden)
    gates_x, h0 = gx_row.expand(3, 2, 3 * hidden, 4, 5), h_col.expand(2, hidden, 4, 5)
    assert 0 in gates_x.stride() and 0 in h0.stride()

    states = conv_gru_sequence(gates_x, h0, w, b_ih, b_hh, spec, reset_after, False, True)
    leaves = (gx_row, h_col, w, b_ih, b_hh)
    grads = torch.autograd.grad(states.sum(), leaves)  # the incoming gradient is expanded too

    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    gx_ref = ref_leaves[0].expand(3, 2, 3 * hidden, 4, 5).contiguous()
    h = ref_leaves[1].expand(2, hidden, 4, 5).contiguous()
    ref_states = []
    for t in range(3):
        h = conv_gru_cell_ref(gx_ref[t], h, ref_leaves[2], ref_leaves[3], ref_leaves[4], spec, reset_after)
        ref_states.append(h)
    ref_states = torch.stack(ref_states)
    ref_grads = torch.autograd.grad(ref_states.sum(), ref_leaves)
    torch.testing.assert_close(states, ref_states)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bias_view", ["sliced", "expanded"])
def test_non_dense_biases(bias_view, backend, device):
    """A bias that is a strided slice or an expanded scalar is read correctly
    (the kernels read biases as dense vectors; the functional form densifies)."""
    gen = torch.Generator().manual_seed(1)

    def rand(*shape):  # drawn on the CPU (the same values on every device), used on the device
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)

    x = rand(2, 3, 7)
    w_ih = rand(6, 3, 3)
    w_hh = rand(6, 2, 3)
    if bias_view == "sliced":
        base = rand(12).requires_grad_(True)
        b_ih, b_hh = base[::2], base[1::2]
    else:
        base = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
        b_ih, b_hh = base.expand(6), (-base).expand(6)
    out = conv_gru_cell(x, None, w_ih, w_hh, b_ih, b_hh, backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), base)
    base_ref = base.detach().clone().requires_grad_(True)
    if bias_view == "sliced":
        dense = base_ref[::2].contiguous(), base_ref[1::2].contiguous()
    else:
        dense = base_ref.expand(6).contiguous(), (-base_ref).expand(6).contiguous()
    out_ref = conv_gru_cell(x, None, w_ih, w_hh, *dense, backend="torch")
    (grad_ref,) = torch.autograd.grad(out_ref.sum(), base_ref)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.triton_kernels  # the check belongs to the Triton backend, which must be usable to get there
@pytest.mark.parametrize("kind", ["sequence", "cell"])
def test_sample_too_large_for_the_kernels(kind, nothing_computed, device):
    """A sample whose gates (3 x hidden x spatial) reach 2**31 elements, which
    the fused kernels address with 32-bit offsets: a ValueError before the
    (possibly huge) input convolution runs, on the Triton backend only."""
    x = torch.zeros(1, 1, 1, 1024, 1024, device=device)  # 3 x 1024 x 2**20 = 3 x 2**30 gate elements
    if kind == "sequence":
        call = lambda: ConvGRU(1, 1024, 1, backend="triton", device=device)(x)  # noqa: E731
    else:
        call = lambda: ConvGRUCell(1, 1024, 1, backend="triton", device=device)(x[0])  # noqa: E731
    with pytest.raises(ValueError, match=r"one sample's gate pre-activations have 3 x 1073741824 elements .* "
                                         r"the fused kernels support fewer than 2\*\*31 per sample"):
        call()
