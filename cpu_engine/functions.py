"""Convolutions and normalisations on every core (numpy's BLAS and the C loops of
kernels.c), for training on a CPU.

Why: NNabla's CPU kernels run on one thread, its convolutions at about 15-25 GFLOP/s, which
makes training InstaGAN on a CPU impractically slow. When:
runtime.device.set_context picks it for --context cpu with --cpu-conv blas (the CPU default), and
`accelerate(outputs)` then swaps, in place, the F.convolution (with the reflection padding
before it), F.deconvolution, F.spectral_norm and models.instance_norm (with the ReLU or
leaky ReLU after it) of the graphs built by models.py for the PythonFunctions below. The
graph stays an NNabla graph with the same parameters; GPU graphs never meet this module.

How: every pass of a (transposed) convolution is lowered to float32 GEMMs over an im2col
matrix, built a few output rows at a time in a buffer of at most `_CHUNK_FLOATS` floats (a full
one for a 7x7 kernel over 192 channels at 300x200 would take 2.2 GB). Stride-1 layers that shrink
the channel count (e.g. the generator's last 7x7 conv, 192 -> 1) lower to a much smaller matrix
as the equivalent transposed convolution with a rotated kernel (the "dual" form), so each pass
picks whichever form has the smaller matrix. A pass over an image is one call into
kernels.c, in which every core (OpenMP) takes its own output rows or input channels, builds
their chunks (im2col, or col2im after the product) and multiplies them with numpy's own
cblas_sgemm, which this module sets to one thread. The bias and its gradient, reflection
padding, the dual form's kernel rotation, instance normalisation and the spectral norm are C
loops too. This module compiles kernels.c with the system's C compiler the first time it
is used.
"""

import ctypes
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
from functools import cache, partial
from pathlib import Path

import nnabla.function as nnabla_function
import nnabla.functions as F
import numpy as np
from nnabla.ext_utils import get_extension_context
from nnabla.function import PythonFunction

# 4M floats = 16 MB: big enough for efficient GEMMs, small enough to stay
# far below the training step's memory budget.
_CHUNK_FLOATS = 1 << 22
# The cores a pass is shared between, each with its own part of the im2col buffer: those this
# process may run on (macOS cannot say which, only how many there are).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1

_KERNELS_SOURCE = Path(__file__).with_name('kernels.c')
_KERNELS_FOLDER = Path(__file__).with_name('build')
# -march=native: the library is built on the machine that runs it (and named after its CPU).
# The reassociation flags let the compiler vectorise the sums; NaNs still propagate. OpenMP
# shares each pass between the cores.
_COMPILE = [
    '-fopenmp',
    '-O3',
    '-march=native',
    '-fno-math-errno',
    '-fno-trapping-math',
    '-fno-signed-zeros',
    '-fassociative-math',
    '-std=c99',
    '-shared',
    '-fPIC',
]
# The three convolution passes share their arguments up to the im2col buffer.
_CONV_PASS = [ctypes.c_void_p] + [ctypes.c_long] * 12 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
_SIGNATURES = {
    'use_sgemm': [ctypes.c_void_p, ctypes.c_int, ctypes.c_int],
    'conv_forward': _CONV_PASS + [ctypes.c_float, ctypes.c_void_p],
    'conv_weight_grad': _CONV_PASS + [ctypes.c_float, ctypes.c_void_p],
    'conv_input_grad': _CONV_PASS + [ctypes.c_void_p, ctypes.c_float],
    'add_bias': [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p],
    'bias_grad': [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_int, ctypes.c_void_p],
    'rotate_kernel': [ctypes.c_void_p] + [ctypes.c_long] * 4 + [ctypes.c_float, ctypes.c_void_p],
    'reflect_pad': [ctypes.c_void_p] + [ctypes.c_long] * 5 + [ctypes.c_void_p],
    'reflect_pad_adjoint': [ctypes.c_void_p] + [ctypes.c_long] * 5 + [ctypes.c_int, ctypes.c_void_p],
    'instance_norm_forward': [
        ctypes.c_void_p,
        ctypes.c_long,
        ctypes.c_long,
        ctypes.c_double,
        ctypes.c_float,
        ctypes.c_int,
    ]
    + [ctypes.c_void_p] * 3,
    'instance_norm_backward': [ctypes.c_void_p] * 4
    + [ctypes.c_long, ctypes.c_long, ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_void_p],
    'spectral_norm_forward': [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_double]
    + [ctypes.c_void_p] * 3,
    'spectral_norm_backward': [ctypes.c_void_p] * 4
    + [ctypes.c_long, ctypes.c_long, ctypes.c_float, ctypes.c_int, ctypes.c_void_p],
}

_RETURNS = {'spectral_norm_forward': ctypes.c_float}  # the others return nothing


class KernelsUnavailable(OSError):
    """kernels.c could not be compiled or loaded."""


def _cpu_signature():
    """What -march=native compiles for: the CPU model and its instruction sets."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(('model name', 'flags'))]
        return ''.join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(compiler, library):
    """Compile kernels.c into `library`, under a temporary name and then renamed, so that a
    build interrupted or run by two processes at once never leaves half a library."""
    try:
        _KERNELS_FOLDER.mkdir(exist_ok=True)
        handle, partial_path = tempfile.mkstemp(suffix='.so.partial', dir=_KERNELS_FOLDER)
        os.close(handle)
        try:
            subprocess.run(
                [compiler] + _COMPILE + [str(_KERNELS_SOURCE), '-o', partial_path],
                check=True,
                capture_output=True,
                text=True,
            )
            os.replace(partial_path, library)
        finally:
            if os.path.exists(partial_path):
                os.remove(partial_path)
    except subprocess.CalledProcessError as error:
        reason = (error.stderr.strip().splitlines() or [f'exit status {error.returncode}'])[-1]
    except OSError as error:
        reason = str(error)
    else:
        return
    raise KernelsUnavailable(
        f'cannot compile cpu_engine/{_KERNELS_SOURCE.name} into {_KERNELS_FOLDER} with '
        f'{compiler} ({reason}): install a C compiler with OpenMP (or '
        'name one in CC), or use --cpu-conv nnabla'
    )


# cblas_sgemm's names, with the bytes of its integers: numpy's wheels bundle an OpenBLAS with
# 64-bit integers and suffixed names; other builds (conda, distributions) mostly have 32-bit ones.
_SGEMM_SYMBOLS = [
    ('cblas_sgemm64_', 8),
    ('scipy_cblas_sgemm64_', 8),
    ('cblas_sgemm_64', 8),
    ('cblas_sgemm', 4),
]
# How OpenBLAS's builds name the function that sets its thread count.
_SET_THREADS_SYMBOLS = [
    'openblas_set_num_threads64_',
    'scipy_openblas_set_num_threads64_',
    'openblas_set_num_threads_64',
    'openblas_set_num_threads',
]


def _blas_libraries():
    """Paths of the libraries that may hold numpy's BLAS: those its wheel bundles first, then any
    BLAS the process has loaded (numpy is imported, so its BLAS is)."""
    numpy_folder = Path(np.__file__).parent
    bundled = sorted(numpy_folder.parent.glob('numpy.libs/*blas*')) + sorted(
        numpy_folder.glob('.dylibs/*blas*')
    )
    try:
        with open('/proc/self/maps') as maps:
            loaded = sorted({line.split()[-1] for line in maps if 'blas' in line or 'mkl' in line})
    except OSError:
        loaded = []
    return bundled + loaded


def numpy_sgemm():
    """(address, integer bytes, thread setter) of cblas_sgemm in numpy's BLAS, so that C calls
    the BLAS np.matmul uses; the setter is that BLAS's function that sets its thread count
    (None where it has none)."""
    for path in _blas_libraries():
        try:
            library = ctypes.CDLL(str(path))
        except OSError:
            continue
        for symbol, integer_bytes in _SGEMM_SYMBOLS:
            if hasattr(library, symbol):
                set_threads = next(
                    (getattr(library, name) for name in _SET_THREADS_SYMBOLS if hasattr(library, name)), None
                )
                return (
                    ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value,
                    integer_bytes,
                    set_threads,
                )
    raise KernelsUnavailable(
        "found no cblas_sgemm in numpy's BLAS (looked in "
        f'{", ".join(map(str, _blas_libraries())) or "nothing loaded"}): '
        'use --cpu-conv nnabla'
    )


def use_numpy_blas(lib):
    """Have the C passes call numpy's cblas_sgemm, with every core this process may use taking
    its share of a pass, each on its own rows or channels and a one-thread BLAS. That leaves
    numpy's BLAS on one thread for the rest of the process. A BLAS whose thread count cannot be
    set keeps its threads, and a pass then runs on one core."""
    address, integer_bytes, set_threads = numpy_sgemm()
    if set_threads is None:
        threads = 1
    else:
        set_threads(1)
        threads = _CORES
    lib.use_sgemm(address, integer_bytes, threads)


@cache
def kernels():
    """kernels.c as a loaded library, compiled into build/ unless it already is there for
    this source, this compiler and flags and this CPU."""
    compiler = os.environ.get('CC', 'cc')
    key = hashlib.sha256(
        b'\0'.join(
            [
                _KERNELS_SOURCE.read_bytes(),
                ' '.join([compiler] + _COMPILE).encode(),
                _cpu_signature().encode(),
            ]
        )
    ).hexdigest()[:16]
    library = _KERNELS_FOLDER / f'cpu_kernels-{key}.so'
    if not library.exists():
        _compile(compiler, library)
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as error:
        raise KernelsUnavailable(
            f'cannot load {library} ({error}): delete it to have it built again, or use --cpu-conv nnabla'
        ) from None
    for name, arguments in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, _RETURNS.get(name)
    use_numpy_blas(lib)
    return lib


def _address(array):
    """The address of the first element of a numpy array."""
    return array.__array_interface__['data'][0]


# Instance norms smaller than this go in one piece: sharing them out costs more than it saves.
_SPLIT_ELEMENTS = 1 << 20


def _conv_out_hw(in_hw, kernel_hw, pad, stride):
    return tuple((n + 2 * p - k) // s + 1 for n, k, p, s in zip(in_hw, kernel_hw, pad, stride))


# Buffers kept from call to call: a new one of a few MB would cost more in page faults than
# the loop that fills it. Every use ends before the function that made it returns, and the
# graph runs one function at a time. Functions size them when they are set up; a call reads
# the address each time, since a later set-up may have grown them.
_buffers = {}
_buffer_addresses = {}


def _reserve(name, size):
    """Make the kept buffer `name` hold at least `size` floats."""
    if name not in _buffers or _buffers[name].size < size:
        _buffers[name] = np.empty(size, np.float32)
        _buffer_addresses[name] = _address(_buffers[name])


def _chunk_rows(channels, kernel_hw, out_hw):
    """(rows, floats): how many output rows a chunk of a pass takes so that their im2col matrix
    fits in _CHUNK_FLOATS (evened out over the chunks), and the size of that matrix."""
    col_rows = channels * kernel_hw[0] * kernel_hw[1]
    out_h, out_w = out_hw
    rows = max(1, _CHUNK_FLOATS // (col_rows * out_w))
    rows = min(out_h, -(-out_h // -(-out_h // rows)))  # the same number of chunks, evened out
    return rows, col_rows * rows * out_w


# A stride-1 conv with weight w and pad p equals the transposed conv with
# the rotated weight (_rotate) and pad k-1-p. Each pass of the direct form lowers to a
# matrix of in_ch*kh*kw rows by |y| columns; in the dual form x and y swap
# roles (out_ch*kh*kw by |x|), so the dual wins when out_ch*|x| < in_ch*|y|.


def _use_dual(w_shape, x_hw, pad, stride):
    out_ch, in_ch, kh, kw = w_shape
    y_hw = _conv_out_hw(x_hw, (kh, kw), pad, stride)
    return (
        stride == (1, 1)
        and pad[0] < kh
        and pad[1] < kw
        and out_ch * x_hw[0] * x_hw[1] < in_ch * y_hw[0] * y_hw[1]
    )


def _rotate(weight, shape, beta, out):
    """out (b, a, kh, kw) = weight (a, b, kh, kw) with its two first axes swapped and its kernel
    turned by 180 degrees, + beta out (beta 0 or 1)."""
    kernels().rotate_kernel(weight, *shape, beta, out)


class _Lowering:
    """y = conv(x, w) of one image, x (C, H, W), w (Cout, C, kh, kw), y (Cout, H', W'), and
    its two gradients as C passes, each with its fixed arguments worked out once. Every array
    is an address.

    The passes are those of a "source" image lowered to im2col and a "target" it maps to: x and
    y in the direct form; in the dual form y and x, with the rotated kernel."""

    def __init__(self, channels, in_hw, w_shape, pad, stride):
        out_ch, _, kh, kw = w_shape
        out_hw = _conv_out_hw(in_hw, (kh, kw), pad, stride)
        self.dual = _use_dual(w_shape, in_hw, pad, stride)
        if self.dual:
            source, self._target_channels, target_hw = (out_ch, *out_hw), channels, in_hw
            pad = tuple(k - 1 - p for k, p in zip((kh, kw), pad))
            _reserve('rotated weight', math.prod(w_shape))
            _reserve('dual weight gradient', math.prod(w_shape))
        else:
            source, self._target_channels, target_hw = (channels, *in_hw), out_ch, out_hw
        rows, floats = _chunk_rows(source[0], (kh, kw), target_hw)
        _reserve('columns', _CORES * floats)
        self._w_shape = tuple(w_shape)
        self._fixed = (*source, kh, kw, *pad, *stride, *target_hw, rows)

    def weight(self, w):
        """The weight the passes take: w, or in the dual form w rotated."""
        if not self.dual:
            return w
        rotated = _buffer_addresses['rotated weight']
        _rotate(w, self._w_shape, 0, rotated)
        return rotated

    def _apply(self, source, w, target, beta):
        kernels().conv_forward(
            source, *self._fixed, _buffer_addresses['columns'], w, self._target_channels, beta, target
        )

    def _adjoint(self, target, w, source, beta):
        kernels().conv_input_grad(
            source, *self._fixed, _buffer_addresses['columns'], target, self._target_channels, w, beta
        )

    def forward(self, x, w, y, beta=0.0):
        """y = conv(x, w) + beta y, w from weight()."""
        (self._adjoint if self.dual else self._apply)(x, w, y, beta)

    def input_grad(self, dy, w, dx, beta=0.0):
        """dx = the gradient for dy with respect to x + beta dx, w from weight()."""
        (self._apply if self.dual else self._adjoint)(dy, w, dx, beta)

    def weight_grad(self, x, dy, dw, beta=0.0):
        """dw (Cout, C, kh, kw) = the gradient for dy with respect to w + beta dw."""
        columns = _buffer_addresses['columns']
        if not self.dual:
            kernels().conv_weight_grad(x, *self._fixed, columns, dy, self._target_channels, beta, dw)
            return
        grad = _buffer_addresses['dual weight gradient']
        kernels().conv_weight_grad(dy, *self._fixed, columns, x, self._target_channels, 0, grad)
        _rotate(grad, self._w_shape[1::-1] + self._w_shape[2:], beta, dw)


_CPU = get_extension_context('cpu')


def _pointer(array, overwrite=False):
    """The address of an nnabla NdArray's values as float32. nnabla holds an array in the dtype
    it was last set in (float64 after `v.d = numpy float64 values`); asking for float32 converts
    it where reading `.data` would hand the float64 values to float32 code. With `overwrite`,
    for a caller that writes them all (nothing is converted)."""
    return array.data_ptr(np.float32, _CPU, overwrite)


class _BlasConvolution(PythonFunction):
    """y = conv(x, w) + b, or with `transposed` y = conv^T(x, w) + b (F.deconvolution).

    Inputs are (x, w) or (x, w, b). A deconvolution is the adjoint of the
    convolution with the same weight, so its three passes are the
    convolution's passes with the roles of input and output swapped.
    Batches are processed one image at a time so that every temporary is
    only single-image sized.
    """

    def __init__(self, pad, stride, transposed, output_padding=(0, 0), reflect_pad=(0, 0)):
        super().__init__()
        kernels()  # compiled now, before the graph runs, or refused with its reason
        self._pad = tuple(pad)
        self._stride = tuple(stride)
        self._transposed = transposed
        self._output_padding = tuple(output_padding)
        # Reflection padding done here saves F.pad's slow kernel and its stored output.
        self._reflect_pad = tuple(reflect_pad)

    @property
    def name(self):
        return 'BlasDeconvolution' if self._transposed else 'BlasConvolution'

    def min_outputs(self):
        return 1

    def setup_impl(self, inputs, outputs):
        batch, channels, h, w = inputs[0].shape
        seen_hw = h + 2 * self._reflect_pad[0], w + 2 * self._reflect_pad[1]
        w_shape = inputs[1].shape
        if self._transposed:
            out_hw = tuple(
                s * (n - 1) - 2 * p + k + op
                for n, k, p, s, op in zip(seen_hw, w_shape[2:], self._pad, self._stride, self._output_padding)
            )
            out_ch = w_shape[1]
            # The convolution this is the adjoint of maps the output to the input.
            self._lowering = _Lowering(out_ch, out_hw, w_shape, self._pad, self._stride)
        else:
            out_hw = _conv_out_hw(seen_hw, w_shape[2:], self._pad, self._stride)
            out_ch = w_shape[0]
            self._lowering = _Lowering(channels, seen_hw, w_shape, self._pad, self._stride)
        outputs[0].reset_shape((batch, out_ch) + out_hw, True)
        self._x_shape = (channels, h, w)
        if any(self._reflect_pad):
            _reserve('padded', channels * math.prod(seen_hw))
            _reserve('padded gradient', channels * math.prod(seen_hw))
        # Bytes from one image to the next.
        self._x_step, self._y_step = 4 * channels * h * w, 4 * out_ch * math.prod(out_hw)
        self._bias_shape = (batch, out_ch, math.prod(out_hw))

    def _seen(self, x):
        """The image the convolution sees: x with its reflection padding, if any."""
        if not any(self._reflect_pad):
            return x
        padded = _buffer_addresses['padded']
        kernels().reflect_pad(x, *self._x_shape, *self._reflect_pad, padded)
        return padded

    def forward_impl(self, inputs, outputs):
        lowering = self._lowering
        x, w = _pointer(inputs[0].data), lowering.weight(_pointer(inputs[1].data))
        y = _pointer(outputs[0].data, overwrite=True)
        for n in range(inputs[0].shape[0]):
            x_image, y_image = x + n * self._x_step, y + n * self._y_step
            if self._transposed:
                lowering.input_grad(x_image, w, y_image)
            else:
                lowering.forward(self._seen(x_image), w, y_image)
        if len(inputs) == 3:
            kernels().add_bias(y, *self._bias_shape, _pointer(inputs[2].data))

    def backward_impl(self, inputs, outputs, propagate_down, accum):
        lowering, batch = self._lowering, inputs[0].shape[0]
        dy = _pointer(outputs[0].grad)
        if propagate_down[0]:
            w = lowering.weight(_pointer(inputs[1].data))
            dx = _pointer(inputs[0].grad, overwrite=not accum[0])
            beta = float(accum[0])
            for n in range(batch):
                dy_image, dx_image = dy + n * self._y_step, dx + n * self._x_step
                if self._transposed:
                    lowering.forward(dy_image, w, dx_image, beta)
                elif any(self._reflect_pad):
                    grad = _buffer_addresses['padded gradient']
                    lowering.input_grad(dy_image, w, grad)
                    kernels().reflect_pad_adjoint(
                        grad, *self._x_shape, *self._reflect_pad, int(accum[0]), dx_image
                    )
                else:
                    lowering.input_grad(dy_image, w, dx_image, beta)
        if propagate_down[1]:
            x = _pointer(inputs[0].data)
            dw = _pointer(inputs[1].grad, overwrite=not accum[1])
            for n in range(batch):
                x_image, dy_image = x + n * self._x_step, dy + n * self._y_step
                beta = float(accum[1] or n > 0)
                if self._transposed:
                    lowering.weight_grad(dy_image, x_image, dw, beta)
                else:
                    lowering.weight_grad(self._seen(x_image), dy_image, dw, beta)
        if len(inputs) == 3 and propagate_down[2]:
            kernels().bias_grad(
                dy, *self._bias_shape, int(accum[2]), _pointer(inputs[2].grad, overwrite=not accum[2])
            )

    def grad_depends_output_data(self, i, o):
        return False

    def grad_depends_input_data(self, i, j):
        # dx needs w, dw needs x, db needs neither.
        return (i, j) in ((0, 1), (1, 0))


def _pair(name, value, minimum):
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or any(not isinstance(v, (int, np.integer)) or v < minimum for v in value)
    ):
        raise ValueError(f'{name} must be two integers >= {minimum}, got {value!r}')
    return tuple(value)


def _check_args(x, weight, bias, x_channel_axis, out_channel_axis):
    if len(x.shape) != 4 or len(weight.shape) != 4:
        raise ValueError(
            f'only 2-D NCHW inputs (x 4-D, weight 4-D) are supported, got x {x.shape}, weight {weight.shape}'
        )
    if weight.shape[x_channel_axis] != x.shape[1]:
        raise ValueError(
            f'weight {weight.shape} does not match {x.shape[1]} input channels '
            '(grouped convolution is not supported)'
        )
    out_ch = weight.shape[out_channel_axis]
    if bias is not None and tuple(bias.shape) != (out_ch,):
        raise ValueError(f'bias must have shape ({out_ch},), got {bias.shape}')


def convolution(x, weight, bias=None, pad=(0, 0), stride=(1, 1), reflect_pad=(0, 0)):
    """Same as F.convolution(x, weight, bias, base_axis=1, pad=pad, stride=stride); with
    reflect_pad, same as F.convolution(F.pad(x, reflect_pad * 2, mode='reflect'), ...)."""
    _check_args(x, weight, bias, x_channel_axis=1, out_channel_axis=0)
    pad, stride = _pair('pad', pad, 0), _pair('stride', stride, 1)
    reflect_pad = _pair('reflect_pad', reflect_pad, 0)
    if any(p >= n for p, n in zip(reflect_pad, x.shape[2:])):
        raise ValueError(f'reflect_pad {reflect_pad} must be smaller than the input {x.shape}')
    seen_hw = tuple(n + 2 * p for n, p in zip(x.shape[2:], reflect_pad))
    if min(_conv_out_hw(seen_hw, weight.shape[2:], pad, stride)) < 1:
        raise ValueError(f'kernel {weight.shape[2:]} does not fit into padded input {x.shape}')
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return _BlasConvolution(pad, stride, transposed=False, reflect_pad=reflect_pad)(*inputs)


def deconvolution(x, weight, bias=None, pad=(0, 0), stride=(1, 1), output_padding=(0, 0)):
    """Same as F.deconvolution(x, weight, bias, base_axis=1, pad=pad, stride=stride,
    output_padding=output_padding); weight is (in channels, out channels, kh, kw)."""
    _check_args(x, weight, bias, x_channel_axis=0, out_channel_axis=1)
    pad, stride = _pair('pad', pad, 0), _pair('stride', stride, 1)
    output_padding = _pair('output_padding', output_padding, 0)
    if any(op >= s for op, s in zip(output_padding, stride)):
        raise ValueError(f'output_padding {output_padding} must be smaller than stride {stride}')
    if min(s * (n - 1) - 2 * p + k for n, k, p, s in zip(x.shape[2:], weight.shape[2:], pad, stride)) < 1:
        raise ValueError(f'pad {pad} is too large for input {x.shape} and kernel {weight.shape[2:]}')
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return _BlasConvolution(pad, stride, transposed=True, output_padding=output_padding)(*inputs)


class _ShapePreserving(PythonFunction):
    """A function of one output shaped like its first input."""

    def min_outputs(self):
        return 1

    def setup_impl(self, inputs, outputs):
        outputs[0].reset_shape(inputs[0].shape, True)


class _InstanceNormalization(_ShapePreserving):
    """(x - mean) / sqrt(var + eps) over H, W of every sample and channel, without affine, and
    then a leaky ReLU of `slope` (1: none, 0: ReLU), in one pass over the data.

    The backward recomputes the normalised values from x, so the function keeps x and nothing
    the size of its output; the activation then costs neither a call nor a buffer of its own.
    """

    def __init__(self, eps, slope):
        super().__init__()
        kernels()
        self._eps, self._slope = eps, slope

    @property
    def name(self):
        return 'CpuInstanceNormalization'

    def setup_impl(self, inputs, outputs):
        super().setup_impl(inputs, outputs)
        shape = inputs[0].shape
        self._rows, self._size = shape[0] * shape[1], math.prod(shape[2:])
        # Each row's mean and inverse standard deviation, from the forward for the backward.
        self._statistics = np.empty((2, self._rows), np.float32)
        self._mean, self._inverse_std = (_address(row) for row in self._statistics)
        self._split = int(self._rows > 1 and self._rows * self._size >= _SPLIT_ELEMENTS)

    # Addresses rather than numpy arrays: this function runs after every convolution, on maps
    # small enough at the small sizes that the numpy views cost more than the loops.
    def forward_impl(self, inputs, outputs):
        kernels().instance_norm_forward(
            _pointer(inputs[0].data),
            self._rows,
            self._size,
            self._eps,
            self._slope,
            self._split,
            _pointer(outputs[0].data, overwrite=True),
            self._mean,
            self._inverse_std,
        )

    def backward_impl(self, inputs, outputs, propagate_down, accum):
        if not propagate_down[0]:
            return
        kernels().instance_norm_backward(
            _pointer(inputs[0].data),
            _pointer(outputs[0].grad),
            self._mean,
            self._inverse_std,
            self._rows,
            self._size,
            self._slope,
            int(accum[0]),
            self._split,
            _pointer(inputs[0].grad, overwrite=not accum[0]),
        )

    def grad_depends_output_data(self, i, o):
        return False

    def grad_depends_input_data(self, i, j):
        return True


def instance_normalization(x, eps=1e-5, slope=1.0):
    """Same as F.instance_normalization(x, None, None, channel_axis=1, batch_axis=0, eps=eps),
    followed by F.leaky_relu(alpha=slope) unless slope is 1 (slope 0: F.relu)."""
    if len(x.shape) < 3:
        raise ValueError(f'instance normalisation needs (B, C, ...) inputs, got {x.shape}')
    return _InstanceNormalization(eps, slope)(x)


class _SpectralNorm(_ShapePreserving):
    """w / sigma(w), sigma from one power iteration on the vector u, which it updates in place.

    As in Miyato et al.'s code and the InstaGAN original, u and v count as constants, so the
    gradient is dw = dy / sigma - sum(dy * w) / sigma^2 * u v^T.
    """

    def __init__(self, eps):
        super().__init__()
        kernels()
        self._eps = eps
        self._sigma = None

    @property
    def name(self):
        return 'CpuSpectralNorm'

    def setup_impl(self, inputs, outputs):
        super().setup_impl(inputs, outputs)
        self._rows = inputs[0].shape[0]
        self._columns = math.prod(inputs[0].shape[1:])
        # u and v of the last forward, for the backward.
        self._u, self._v = np.empty(self._rows, np.float32), np.empty(self._columns, np.float32)

    def forward_impl(self, inputs, outputs):
        u = _pointer(inputs[1].data)  # read, then updated in place
        self._sigma = kernels().spectral_norm_forward(
            _pointer(inputs[0].data),
            self._rows,
            self._columns,
            self._eps,
            u,
            _address(self._v),
            _pointer(outputs[0].data, overwrite=True),
        )
        ctypes.memmove(_address(self._u), u, 4 * self._rows)

    def backward_impl(self, inputs, outputs, propagate_down, accum):
        if not propagate_down[0]:
            return
        kernels().spectral_norm_backward(
            _pointer(inputs[0].data),
            _pointer(outputs[0].grad),
            _address(self._u),
            _address(self._v),
            self._rows,
            self._columns,
            self._sigma,
            int(accum[0]),
            _pointer(inputs[0].grad, overwrite=not accum[0]),
        )

    def grad_depends_output_data(self, i, o):
        return False

    def grad_depends_input_data(self, i, j):
        return i == 0 and j == 0


def spectral_norm(weight, u, eps=1e-12):
    """Like F.spectral_norm(weight, u, dim=0, itr=1, eps=eps) in training mode."""
    return _SpectralNorm(eps)(weight, u)


# nnabla 1.39's compiled modules first try implicit relative imports, 'nnabla.nnabla' several
# times per PythonFunction call and 'nnabla.nnabla_ext.cpu' on every NdArray.data, and then the
# absolute ones. The relative names do not exist and Python does not remember a failed import,
# so every try searched the disk: 0.1 s of a 0.5 s small training step. Registering them as the
# modules the absolute imports give makes the first try succeed at once; None for the parent
# makes it fail at once for the other backends (nnabla_ext.cuda, ...). Done by `accelerate`
# only, so that a run without this module keeps Python's import state as it is.
def _register_nnabla_relative_imports():
    import nnabla
    import nnabla_ext.cpu

    sys.modules.setdefault('nnabla.nnabla', nnabla)
    sys.modules.setdefault('nnabla.nnabla_ext', None)
    sys.modules.setdefault('nnabla.nnabla_ext.cpu', nnabla_ext.cpu)


def _made_by(variable, type_name, **args):
    """The function of `type_name`, called with these arguments, that computes `variable`; None
    if another function does or `variable` is None."""
    function = None if variable is None else variable.parent
    if function is None or function.info.type_name != type_name:
        return None
    if any(function.info.args[name] != value for name, value in args.items()):
        return None
    return function


def _first_input(function):
    return None if function is None else function.inputs[0]


def _spatial_mean_of(mean):
    """v, if `mean` is models.instance_norm's mean of v over H and W; else None."""
    over_rows = _made_by(mean, 'Mean', axes=[2], keep_dims=True)
    return _first_input(_made_by(_first_input(over_rows), 'Mean', axes=[3], keep_dims=True))


def _instance_norm_of(division):
    """(x, eps), if the F.div2 `division` ends models.instance_norm(x, eps). That is a composite
    of nine F.* functions, matched here whole:
    centred = x - mean(x); centred / pow_scalar(mean(centred * centred) + eps, 0.5)."""
    centred, deviation = division.inputs
    subtraction = _made_by(centred, 'Sub2')
    epsilon = _made_by(_first_input(_made_by(deviation, 'PowScalar', val=0.5)), 'AddScalar')
    square = _made_by(_spatial_mean_of(_first_input(epsilon)), 'Mul2')
    if subtraction is None or square is None:
        return None
    x, mean = subtraction.inputs
    mean_of = _spatial_mean_of(mean)
    if mean_of is None or not mean_of == x or not all(v == centred for v in square.inputs):
        return None
    return x, epsilon.info.args['val']


def _numpy_version(function):
    """(inputs, make): make(*inputs) builds this module's version of `function`. None where
    there is none."""
    kind, args, inputs = function.info.type_name, function.info.args, function.inputs
    plain = (
        kind in ('Convolution', 'Deconvolution')
        and len(inputs[0].shape) == 4
        and (args['base_axis'], args['dilation'], args['group'], args['channel_last'])
        == (1, [1, 1], 1, False)
    )
    if kind == 'Convolution' and plain:
        x, reflect_pad = inputs[0], (0, 0)
        padding = _made_by(x, 'Pad', mode='reflect')
        widths = padding.info.args['pad_width'] if padding else []
        if len(widths) == 4 and widths[0] == widths[1] and widths[2] == widths[3]:
            x, reflect_pad = padding.inputs[0], (widths[0], widths[2])
        return [x] + inputs[1:], partial(
            convolution, pad=args['pad'], stride=args['stride'], reflect_pad=reflect_pad
        )
    if kind == 'Deconvolution' and plain:
        return inputs, partial(
            deconvolution, pad=args['pad'], stride=args['stride'], output_padding=args['output_padding']
        )
    if kind == 'SpectralNorm' and (args['dim'], args['itr'], args['test'], args['output_u']) == (
        0,
        1,
        False,
        False,
    ):
        return inputs, partial(spectral_norm, eps=args['eps'])
    normalised, slope = None, 1.0
    if kind == 'Div2':
        normalised = _instance_norm_of(function)
    elif kind in ('ReLU', 'LeakyReLU') and not args['inplace']:
        # A (leaky) ReLU of an instance norm takes the norm in; the norm alone is then not built
        # unless something else reads it.
        division = _made_by(inputs[0], 'Div2')
        normalised = division and _instance_norm_of(division)
        slope = args.get('alpha', 0.0)
    if normalised:
        x, eps = normalised
        return [x], partial(instance_normalization, eps=eps, slope=slope)
    return None


def _copy(function):
    """(inputs, make): make(*inputs) builds another nnabla function like `function`."""
    kind = getattr(nnabla_function, function.info.type_name, None)
    if kind is None:
        raise ValueError(
            f'{function.info.type_name} is not an nnabla function: accelerate each '
            'graph once, with all its outputs'
        )

    def make(*inputs):
        return kind(function.context, **function.info.args)(
            *inputs, n_outputs=len(function.outputs), auto_forward=False
        )

    return function.inputs, make


def accelerate(*outputs):
    """Rebuild the graph that computes `outputs` on this module's functions in place of
    F.convolution (taking in an F.pad(mode='reflect') before it), F.deconvolution,
    F.spectral_norm and models.instance_norm. The outputs and the graph's persistent variables,
    the ones a caller reads, stay the same objects, now computed by the new graph; the other
    variables stay with the old one. Call it once per graph, with all its outputs.

    The graph is built anew rather than patched because nnabla 1.39 mishandles a variable
    given a new parent (rewire_on): it sets up again every function downstream, which crashes
    on a PythonFunction, and it no longer frees the inputs of the new parent."""
    _register_nnabla_relative_imports()
    functions = []
    F.sink(*outputs).visit(functions.append)
    functions.pop()  # the sink
    plans = {function: _numpy_version(function) or _copy(function) for function in functions}
    # Not built: what only the replaced functions read (a folded pad, the instance norm's
    # parts). nnabla would keep every input of such a left-over function, never run.
    needed, unvisited = set(), list(outputs)
    while unvisited:
        function = unvisited.pop().parent
        if function is not None and function not in needed:
            needed.add(function)
            unvisited += plans[function][0]
    kept = set(outputs)
    current = {}  # a variable of the old graph -> the one standing for it in the new graph
    for function in functions:
        if function not in needed:
            continue
        inputs, make = plans[function]
        new_outputs = make(*[current.get(v, v) for v in inputs])
        if not isinstance(new_outputs, tuple):
            new_outputs = (new_outputs,)
        for old, new in zip(function.outputs, new_outputs):
            need_grad = old.need_grad
            if old.persistent or old in kept:
                old.rewire_on(new)
                new = old
            if new.need_grad != need_grad:  # set by hand (models.instance_exists)
                new.need_grad = need_grad
            current[old] = new
    # visit's closure is a reference cycle that holds `functions`, and with it the old graph,
    # until Python's cyclic collector runs.
    functions.clear()
