"""cpu_functions must match F.convolution, F.deconvolution, F.instance_normalization and
F.spectral_norm: output and all gradients."""

import ctypes
import subprocess
import sys
from functools import partial
from pathlib import Path

import nnabla as nn
import nnabla.functions as F
import numpy as np
import pytest
import scipy

import models
from args import get_args
from conftest import ROOT
from cpu_engine import functions as cpu_functions
from runtime.device import set_context

# (in_ch, out_ch, kernel, pad, stride, output_padding, (h, w)), as used by the models.
CONV_CONFIGS = [
    (3, 8, 7, 0, 1, None, (15, 13)),  # generator stem on a reflect-padded image
    (12, 3, 7, 0, 1, None, (37, 25)),  # generator head (fewer outputs: dual form)
    (8, 1, 7, 0, 1, None, (16, 14)),
    (6, 10, 3, 1, 2, None, (37, 25)),  # downsampling
    (9, 9, 3, 0, 1, None, (11, 9)),  # residual block on a reflect-padded map
    (4, 8, 4, 1, 2, None, (17, 12)),  # discriminator
    (8, 16, 4, 1, 1, None, (9, 7)),
    (16, 1, 4, 1, 1, None, (9, 8)),  # discriminator head (dual form)
    (5, 7, 3, 1, 1, None, (6, 41)),  # stride 1 on a map wider than _MAX_RUNS_WIDTH
]
DECONV_CONFIGS = [
    (12, 6, 3, 1, 2, 1, (9, 7)),  # upsampling
    (16, 5, 3, 1, 2, 1, (10, 13)),
]
CONFIGS = CONV_CONFIGS + DECONV_CONFIGS


def _outputs_and_grads(func, x, w, b, two_branches):
    """Run func(x, w, b) through nnabla forward/backward; return [y, dx, dw, db].

    The function gets intermediates rather than leaves, so clearing buffers
    drops any input data it forgets to declare as needed by its backward.
    With `two_branches` it is called twice on the same inputs, so the second
    backward call must accumulate into the gradients (accum=True).
    """
    leaves = [nn.Variable.from_numpy_array(a, need_grad=True) for a in (x, w, b) if a is not None]
    x_in, w_in, b_in = [v * 1.0 for v in leaves] + [None] * (3 - len(leaves))
    y = func(x_in, w_in, b_in)
    y.persistent = True  # keep its data for the comparison
    # Non-uniform output gradient so every gradient path is actually checked.
    dy = np.random.RandomState(1).randn(*y.shape).astype(np.float32)
    loss = F.sum(y * nn.Variable.from_numpy_array(dy))
    if two_branches:
        loss = loss + F.sum(F.tanh(func(x_in, w_in, b_in)))
    for v in leaves:
        v.grad.zero()
    loss.forward(clear_no_need_grad=True)
    loss.backward(clear_buffer=True)
    return [y.d.copy()] + [v.g.copy() for v in leaves]


def _nnabla_and_blas(in_ch, out_ch, k, pad, stride, output_padding, hw, batch, use_bias, two_branches):
    rng = np.random.RandomState(0)
    transposed = output_padding is not None
    x = rng.randn(batch, in_ch, *hw).astype(np.float32)
    w_shape = (in_ch, out_ch, k, k) if transposed else (out_ch, in_ch, k, k)
    w = (rng.randn(*w_shape) / np.sqrt(in_ch * k * k)).astype(np.float32)
    b = rng.randn(out_ch).astype(np.float32) if use_bias else None
    kwargs = dict(pad=(pad, pad), stride=(stride, stride))
    if transposed:
        kwargs['output_padding'] = (output_padding, output_padding)
        ref, ours = F.deconvolution, cpu_functions.deconvolution
    else:
        ref, ours = F.convolution, cpu_functions.convolution
    return (
        _outputs_and_grads(partial(ref, **kwargs), x, w, b, two_branches),
        _outputs_and_grads(partial(ours, **kwargs), x, w, b, two_branches),
    )


def _assert_close(expected, actual):
    for name, e, a in zip(['y', 'dx', 'dw', 'db'], expected, actual):
        assert a.shape == e.shape, name
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize('batch', [1, 2])
@pytest.mark.parametrize('config', CONFIGS)
def test_matches_nnabla(config, batch):
    _assert_close(*_nnabla_and_blas(*config, batch=batch, use_bias=True, two_branches=False))


@pytest.mark.parametrize('config', [CONV_CONFIGS[0], CONV_CONFIGS[1], DECONV_CONFIGS[0]])
def test_matches_nnabla_with_32_bit_blas_integers(config):
    """Most BLAS builds other than numpy's wheels take 32-bit integers; the C passes call such
    a cblas_sgemm through its own signature (here scipy's bundled one)."""
    library = next(Path(scipy.__file__).parent.parent.glob('scipy.libs/libscipy_openblas*.so'))
    sgemm = ctypes.cast(ctypes.CDLL(str(library)).scipy_cblas_sgemm, ctypes.c_void_p).value
    cpu_functions.kernels().use_sgemm(sgemm, 4, cpu_functions._CORES)
    try:
        _assert_close(*_nnabla_and_blas(*config, batch=2, use_bias=True, two_branches=True))
    finally:
        cpu_functions.use_numpy_blas(cpu_functions.kernels())


@pytest.mark.parametrize('config', CONFIGS)
def test_passes_shared_between_more_cores(config):
    """Five cores sharing every pass: uneven shares of output rows and input channels, shares
    of one channel or row, and fewer channels than cores."""
    cores = cpu_functions._CORES
    cpu_functions._CORES = 5  # each core its own part of the im2col buffer
    address, integer_bytes, _ = cpu_functions.numpy_sgemm()
    cpu_functions.kernels().use_sgemm(address, integer_bytes, 5)
    try:
        _assert_close(*_nnabla_and_blas(*config, batch=2, use_bias=True, two_branches=True))
    finally:  # in this order: never more threads than the buffers are sized for
        cpu_functions._CORES = cores
        cpu_functions.use_numpy_blas(cpu_functions.kernels())


def test_no_blas_found_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_functions, '_blas_libraries', lambda: [])
    with pytest.raises(cpu_functions.KernelsUnavailable, match='no cblas_sgemm .* --cpu-conv nnabla'):
        cpu_functions.numpy_sgemm()


@pytest.mark.parametrize(
    'reflect, config',
    [
        ((3, 3), (3, 8, 7, 0, 1, None, (15, 13))),  # generator stem and heads: 7x7 on a 3-pixel border
        ((3, 3), (12, 3, 7, 0, 1, None, (10, 9))),  # (dual form)
        ((1, 1), (9, 9, 3, 0, 1, None, (11, 9))),  # residual blocks
        ((2, 1), (5, 6, 3, 0, 2, None, (9, 8))),  # strided, different pads
        ((2, 2), (4, 6, 3, 1, 2, None, (7, 8))),  # reflection and zero padding together
    ],
)
@pytest.mark.parametrize('accumulate', [False, True])
@pytest.mark.parametrize('chunked', [False, True])
def test_reflect_pad_matches_f_pad(reflect, config, accumulate, chunked, monkeypatch):
    """convolution(reflect_pad=p) is F.convolution of F.pad(mode='reflect'), gradients too,
    also when the output rows come in chunks of one."""
    if chunked:
        monkeypatch.setattr(cpu_functions, '_CHUNK_FLOATS', 1)
    in_ch, out_ch, k, pad, stride, _, hw = config
    rng = np.random.RandomState(0)
    x = rng.randn(2, in_ch, *hw).astype(np.float32)
    w = (rng.randn(out_ch, in_ch, k, k) / np.sqrt(in_ch * k * k)).astype(np.float32)
    b = rng.randn(out_ch).astype(np.float32)
    kwargs = dict(pad=(pad, pad), stride=(stride, stride))

    def reference(x, w, b):
        return F.convolution(F.pad(x, (reflect[0],) * 2 + (reflect[1],) * 2, mode='reflect'), w, b, **kwargs)

    ours = partial(cpu_functions.convolution, reflect_pad=reflect, **kwargs)
    _assert_close(
        _outputs_and_grads(reference, x, w, b, accumulate), _outputs_and_grads(ours, x, w, b, accumulate)
    )


@pytest.mark.parametrize('config', CONFIGS)
def test_row_chunking(config, monkeypatch):
    # A tiny chunk budget splits even these small maps into several row
    # chunks, most with a shorter last chunk.
    monkeypatch.setattr(cpu_functions, '_CHUNK_FLOATS', 2000)
    _assert_close(*_nnabla_and_blas(*config, batch=2, use_bias=True, two_branches=False))


@pytest.mark.parametrize('config', CONFIGS)
def test_accumulates_gradients(config):
    _assert_close(*_nnabla_and_blas(*config, batch=2, use_bias=True, two_branches=True))


@pytest.mark.parametrize('config', [CONV_CONFIGS[1], CONV_CONFIGS[3], DECONV_CONFIGS[0]])
def test_without_bias(config):
    _assert_close(*_nnabla_and_blas(*config, batch=1, use_bias=False, two_branches=False))


def test_repeated_backward_accumulates_without_zeroing():
    x = nn.Variable.from_numpy_array(
        np.random.RandomState(0).randn(1, 3, 9, 7).astype(np.float32), need_grad=True
    )
    w = nn.Variable.from_numpy_array(
        np.random.RandomState(1).randn(4, 3, 3, 3).astype(np.float32), need_grad=True
    )
    grads = {}
    for name, conv in [('nnabla', F.convolution), ('blas', cpu_functions.convolution)]:
        loss = F.sum(conv(x, w, None, pad=(1, 1), stride=(2, 2)) ** 2)
        x.grad.zero()
        w.grad.zero()
        loss.forward()
        loss.backward()
        loss.backward()
        grads[name] = (x.g.copy(), w.g.copy())
    for expected, actual in zip(grads['nnabla'], grads['blas']):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_network_with_cleared_buffers():
    """conv -> relu -> deconv -> tanh -> conv, with buffers cleared as in training."""
    rng = np.random.RandomState(0)
    arrays = [rng.randn(2, 3, 12, 10), rng.randn(8, 3, 3, 3), rng.randn(8, 6, 3, 3), rng.randn(1, 6, 4, 4)]

    def loss_and_grads(conv, deconv):
        x, w1, w2, w3 = [
            nn.Variable.from_numpy_array(0.3 * a.astype(np.float32), need_grad=True) for a in arrays
        ]
        h = F.relu(conv(x, w1, None, pad=(1, 1), stride=(2, 2)))
        h = F.tanh(deconv(h, w2, None, pad=(1, 1), stride=(2, 2), output_padding=(1, 1)))
        loss = F.mean(conv(h, w3, None, pad=(1, 1), stride=(1, 1)) ** 2)
        for v in (x, w1, w2, w3):
            v.grad.zero()
        loss.forward(clear_no_need_grad=True)
        loss.backward(clear_buffer=True)
        return [loss.d.copy()] + [v.g.copy() for v in (x, w1, w2, w3)]

    expected = loss_and_grads(F.convolution, F.deconvolution)
    actual = loss_and_grads(cpu_functions.convolution, cpu_functions.deconvolution)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(e).max())))


@pytest.mark.parametrize(
    'call',
    [
        lambda: cpu_functions.convolution(nn.Variable((1, 3, 8, 8)), nn.Variable((4, 2, 3, 3))),
        lambda: cpu_functions.convolution(nn.Variable((1, 3, 8)), nn.Variable((4, 3, 3))),
        lambda: cpu_functions.convolution(
            nn.Variable((1, 3, 8, 8)), nn.Variable((4, 3, 3, 3)), nn.Variable((3,))
        ),
        lambda: cpu_functions.convolution(
            nn.Variable((1, 3, 8, 8)), nn.Variable((4, 3, 3, 3)), stride=(0, 1)
        ),
        lambda: cpu_functions.deconvolution(
            nn.Variable((1, 3, 8, 8)), nn.Variable((3, 4, 3, 3)), stride=(2, 2), output_padding=(2, 2)
        ),
    ],
)
def test_rejects_unsupported_arguments(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize('shape', [(1, 3, 5, 7), (2, 16, 9, 6), (3, 1, 4, 4)])
@pytest.mark.parametrize('accumulate', [False, True])
@pytest.mark.parametrize('split', [False, True])
def test_instance_normalization_matches_nnabla(shape, accumulate, split, monkeypatch):
    """With `split`, the rows are shared out between threads, as for big arrays."""
    if split:
        monkeypatch.setattr(cpu_functions, '_SPLIT_ELEMENTS', 0)
    x = np.random.RandomState(0).randn(*shape).astype(np.float32) * 3 + 1

    def reference(x, w, b):
        return F.instance_normalization(x, None, None)

    def ours(x, w, b):
        return cpu_functions.instance_normalization(x)

    _assert_close(
        _outputs_and_grads(reference, x, None, None, accumulate),
        _outputs_and_grads(ours, x, None, None, accumulate),
    )


@pytest.mark.parametrize('activation, slope', [(F.relu, 0.0), (partial(F.leaky_relu, alpha=0.2), 0.2)])
@pytest.mark.parametrize('accumulate', [False, True])
def test_instance_normalization_with_activation_matches_nnabla(activation, slope, accumulate):
    """The activation folded into the normalisation (slope 0: ReLU; 0.2: the discriminator's
    leaky ReLU), values and gradients."""
    x = np.random.RandomState(1).randn(2, 5, 6, 7).astype(np.float32) * 2 - 0.5

    def reference(x, w, b):
        return activation(F.instance_normalization(x, None, None))

    def ours(x, w, b):
        return cpu_functions.instance_normalization(x, slope=slope)

    _assert_close(
        _outputs_and_grads(reference, x, None, None, accumulate),
        _outputs_and_grads(ours, x, None, None, accumulate),
    )


@pytest.mark.parametrize('activation', [F.relu, partial(F.leaky_relu, alpha=0.2), lambda h: h])
def test_accelerate_folds_activations_into_instance_norm(activation):
    """accelerate builds one function for activation(models.instance_norm(.)), and the graph
    computes what the F.* graph does."""
    rng = np.random.RandomState(2)
    x = nn.Variable.from_numpy_array(rng.randn(2, 3, 6, 5).astype(np.float32), need_grad=True)
    w = nn.Variable.from_numpy_array(rng.randn(4, 3, 3, 3).astype(np.float32), need_grad=True)
    losses = [F.sum(activation(models.instance_norm(F.convolution(x, w, pad=(1, 1)))) ** 2) for _ in range(2)]
    cpu_functions.accelerate(losses[1])
    kinds = []
    losses[1].visit(lambda function: kinds.append(function.info.type_name))
    assert kinds.count('CpuInstanceNormalization') == 1
    assert not {'ReLU', 'LeakyReLU', 'Div2'} & set(kinds)
    results = []
    for loss in losses:
        x.grad.zero()
        w.grad.zero()
        loss.forward()
        loss.backward()
        results.append((loss.d.copy(), x.g.copy(), w.g.copy()))
    for expected, actual in zip(*results):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('mean, std', [(0.0, 1.0), (5.0, 0.1), (1.0, 1e-3)])
def test_instance_normalization_is_accurate_for_offset_inputs(mean, std):
    """Against float64: NNabla's own kernel loses most digits when the mean is large
    compared with the spread (E[x^2] - E[x]^2); this one centres first."""
    rng = np.random.RandomState(0)
    x = (rng.randn(2, 4, 9, 7) * std + mean).astype(np.float32)
    dy = rng.randn(*x.shape).astype(np.float32)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    centred = x64 - x64.mean(axis=(2, 3), keepdims=True)
    inverse_std = 1 / np.sqrt(np.mean(centred**2, axis=(2, 3), keepdims=True) + 1e-5)
    y64 = centred * inverse_std
    dx64 = inverse_std * (
        dy64 - dy64.mean(axis=(2, 3), keepdims=True) - y64 * np.mean(dy64 * y64, axis=(2, 3), keepdims=True)
    )
    variable = nn.Variable.from_numpy_array(x, need_grad=True)
    y = cpu_functions.instance_normalization(variable)
    variable.grad.zero()
    y.forward()
    y.backward(dy)
    np.testing.assert_allclose(y.d, y64, atol=1e-4)
    np.testing.assert_allclose(variable.g, dx64, atol=1e-5 * np.abs(dx64).max())


@pytest.mark.parametrize('shape', [(6, 3, 4, 4), (1, 16, 4, 4), (8, 2, 3, 3), (128, 64, 4, 4)])
@pytest.mark.parametrize('accumulate', [False, True])
def test_spectral_norm_matches_nnabla(shape, accumulate):
    """Same normalised weight, same update of u, same gradient of the weight; with `accumulate`
    the weight feeds a second normalisation (its own u), whose gradient adds to the first."""
    rng = np.random.RandomState(0)
    weight, u_start = rng.randn(*shape).astype(np.float32), rng.randn(shape[0]).astype(np.float32)
    dy, dy_second = rng.randn(2, *shape).astype(np.float32)
    results = []
    for normalise in [F.spectral_norm, cpu_functions.spectral_norm]:
        w = nn.Variable.from_numpy_array(weight, need_grad=True)
        u = nn.Variable.from_numpy_array(u_start.copy())
        x = w * 1.0
        y = normalise(x, u)
        y.persistent = True
        loss = F.sum(y * nn.Variable.from_numpy_array(dy))
        if accumulate:
            second = normalise(x, nn.Variable.from_numpy_array(u_start[::-1].copy()))
            loss += F.sum(second * nn.Variable.from_numpy_array(dy_second))
        w.grad.zero()
        loss.forward()
        loss.backward()
        results.append((y.d.copy(), u.d.copy(), w.g.copy()))
    for expected, actual in zip(*results):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)
    assert np.abs(results[1][1] - u_start).max() > 1e-3  # u moved


def test_no_import_searches_while_running(monkeypatch):
    """nnabla's compiled code tries relative imports of modules that do not exist on every data
    access and PythonFunction call; accelerate registers those names so none reaches the import
    system's search (each search cost about 20 us of disk lookups)."""
    searched = []

    class RecordingFinder:
        def find_spec(self, name, path, target=None):
            searched.append(name)

    x = nn.Variable.from_numpy_array(np.ones((1, 2, 5, 5), np.float32), need_grad=True)
    w = nn.Variable.from_numpy_array(np.ones((3, 2, 3, 3), np.float32), need_grad=True)
    loss = F.sum(models.instance_norm(F.convolution(x, w)) ** 2)
    cpu_functions.accelerate(loss)
    monkeypatch.setattr(sys, 'meta_path', [RecordingFinder()] + sys.meta_path)
    loss.forward()
    loss.backward()
    assert x.d.sum() == 50 and np.isfinite(w.g).all()
    assert searched == []


def test_import_names_are_registered_by_accelerate_only():
    """Importing models or train (a GPU run, --cpu-conv nnabla) leaves Python's import state as
    it is; the work-around comes with the CPU functions."""
    code = (
        'import sys, nnabla as nn, nnabla.functions as F, models, train\n'
        'from cpu_engine import functions as cpu_functions\n'
        "print('nnabla.nnabla' in sys.modules)\n"
        'cpu_functions.accelerate(F.convolution(nn.Variable((1, 1, 4, 4)), '
        'nn.Variable((1, 1, 3, 3))))\n'
        "print(sys.modules.get('nnabla.nnabla') is nn)\n"
    )
    run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ['False', 'True']


@pytest.mark.parametrize(
    'flags, convolution', [([], 'BlasConvolution'), (['--cpu-conv', 'nnabla'], 'Convolution')]
)
def test_set_context_chooses_the_engine(flags, convolution):
    """The one place that decides: the CPU functions on the CPU unless --cpu-conv nnabla
    (or a GPU) asks for the graph as models.py builds it."""
    args = get_args(['--context', 'cpu'] + flags)
    _, accelerate = set_context(args.context, args.device_id, args.type_config, args.cpu_conv)
    y = F.convolution(nn.Variable((1, 1, 4, 4)), nn.Variable((1, 1, 3, 3)))
    accelerate(y)
    assert y.parent.info.type_name == convolution


@pytest.mark.parametrize(
    'shape,pad',
    [((3, 5, 4), (1, 1)), ((2, 7, 9), (3, 3)), ((1, 4, 7), (3, 2)), ((2, 6, 5), (0, 4)), ((2, 6, 5), (5, 0))],
)
def test_reflect_pad_matches_numpy(shape, pad):
    image = np.random.RandomState(0).randn(*shape).astype(np.float32)
    expected = np.pad(image, ((0, 0), (pad[0],) * 2, (pad[1],) * 2), mode='reflect')
    padded = np.empty_like(expected)
    cpu_functions.kernels().reflect_pad(image.ctypes.data, *shape, *pad, padded.ctypes.data)
    np.testing.assert_array_equal(padded, expected)


@pytest.mark.parametrize(
    'make, shapes',
    [
        (partial(F.convolution, pad=(1, 1)), [(2, 3, 6, 5), (4, 3, 3, 3), (4,)]),
        (
            partial(F.deconvolution, pad=(1, 1), stride=(2, 2), output_padding=(1, 1)),
            [(2, 3, 4, 5), (3, 4, 3, 3), (4,)],
        ),
        (models.instance_norm, [(2, 3, 6, 5)]),
        (lambda x: F.leaky_relu(models.instance_norm(x), 0.2), [(2, 3, 6, 5)]),
        (lambda w, u: F.spectral_norm(w, u), [(4, 3, 2, 2), (4,)]),
    ],
)
def test_arrays_held_in_float64_are_converted(make, shapes):
    """nnabla keeps an array in the dtype it was last set in: data set from float64 numpy
    arrays, gradients accumulated into float64 ones and a float64 output gradient must be read
    and written as float32 values, as F.* does, not reinterpreted (which gave NaNs)."""
    rng = np.random.RandomState(3)
    values = [rng.randn(*shape) for shape in shapes]
    start_grads = [rng.randn(*shape) for shape in shapes]
    output_grad = None
    results = []
    for engine in ('nnabla', 'blas'):
        leaves = [nn.Variable(shape, need_grad=True) for shape in shapes]
        for leaf, value, grad in zip(leaves, values, start_grads):
            leaf.d, leaf.g = value, grad  # float64: nnabla holds them as float64
        y = make(*leaves)
        if engine == 'blas':
            cpu_functions.accelerate(y)
        y.forward()
        if output_grad is None:
            output_grad = rng.randn(*y.shape)
        y.backward(output_grad)
        results.append([y.d.astype(np.float32)] + [leaf.g.astype(np.float32) for leaf in leaves])
    for expected, actual in zip(*results):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
