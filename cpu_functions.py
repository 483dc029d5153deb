"""Convolutions and normalisations on every core (numpy's BLAS and the C loops of
cpu_kernels.c), for training on a CPU.

Why: NNabla's CPU kernels run on one thread, its convolutions at about 15-25 GFLOP/s, which
makes training InstaGAN on a CPU impractically slow; numpy's BLAS uses every core. When:
train.set_context picks it for --context cpu with --cpu-conv blas (the default on a CPU), and
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
cpu_kernels.c, which builds each chunk (im2col, or col2im after the product) and calls numpy's
own cblas_sgemm on it; the bias and its gradient, reflection padding, instance normalisation
and the spectral norm's weight gradient are C loops too. This module compiles cpu_kernels.c
with the system's C compiler the first time it is used.
"""
import ctypes
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from pathlib import Path

import nnabla.function as nnabla_function
import nnabla.functions as F
import numpy as np
from nnabla.ext_utils import get_extension_context
from nnabla.function import PythonFunction

# 4M floats = 16 MB: big enough for efficient GEMMs, small enough to stay
# far below the training step's memory budget.
_CHUNK_FLOATS = 1 << 22

_KERNELS_SOURCE = Path(__file__).with_name('cpu_kernels.c')
_KERNELS_FOLDER = Path(__file__).with_name('build')
# -march=native: the library is built on the machine that runs it (and named after its CPU).
# The reassociation flags let the compiler vectorise the sums; NaNs still propagate.
_COMPILE = ['-O3', '-march=native', '-fno-math-errno', '-fno-trapping-math', '-fno-signed-zeros',
            '-fassociative-math', '-std=c99', '-shared', '-fPIC']
# The three convolution passes share their arguments up to the im2col buffer.
_CONV_PASS = [ctypes.c_void_p] + [ctypes.c_long] * 12 + [ctypes.c_void_p, ctypes.c_void_p,
                                                         ctypes.c_long]
_SIGNATURES = {
    'use_sgemm': [ctypes.c_void_p, ctypes.c_int],
    'conv_forward': _CONV_PASS + [ctypes.c_float, ctypes.c_void_p],
    'conv_weight_grad': _CONV_PASS + [ctypes.c_float, ctypes.c_void_p],
    'conv_input_grad': _CONV_PASS + [ctypes.c_void_p, ctypes.c_float],
    'add_bias': [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p],
    'bias_grad': [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_int, ctypes.c_void_p],
    'reflect_pad': [ctypes.c_void_p] + [ctypes.c_long] * 5 + [ctypes.c_void_p],
    'reflect_pad_adjoint': [ctypes.c_void_p] + [ctypes.c_long] * 5 + [ctypes.c_int,
                                                                       ctypes.c_void_p],
    'instance_norm_forward': [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_double,
                              ctypes.c_float] + [ctypes.c_void_p] * 3,
    'instance_norm_backward': [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long,
                                                       ctypes.c_float, ctypes.c_int,
                                                       ctypes.c_void_p],
    'spectral_norm_backward': [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long,
                                                       ctypes.c_float, ctypes.c_int,
                                                       ctypes.c_void_p],
}


class KernelsUnavailable(OSError):
    """cpu_kernels.c could not be compiled or loaded."""


def _cpu_signature():
    """What -march=native compiles for: the CPU model and its instruction sets."""
    try:
        with open('/proc/cpuinfo') as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(('model name', 'flags'))]
        return ''.join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(compiler, library):
    """Compile cpu_kernels.c into `library`, under a temporary name and then renamed, so that a
    build interrupted or run by two processes at once never leaves half a library."""
    try:
        _KERNELS_FOLDER.mkdir(exist_ok=True)
        handle, partial_path = tempfile.mkstemp(suffix='.so.partial', dir=_KERNELS_FOLDER)
        os.close(handle)
        try:
            subprocess.run([compiler] + _COMPILE + [str(_KERNELS_SOURCE), '-o', partial_path],
                           check=True, capture_output=True, text=True)
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
    raise KernelsUnavailable(f'cannot compile {_KERNELS_SOURCE.name} into {_KERNELS_FOLDER} with '
                             f'{compiler} ({reason}): install a C compiler (or name one in CC), '
                             'or use --cpu-conv nnabla')


# cblas_sgemm's names, with the bytes of its integers: numpy's wheels bundle an OpenBLAS with
# 64-bit integers and suffixed names; other builds (conda, distributions) mostly have 32-bit ones.
_SGEMM_SYMBOLS = [('cblas_sgemm64_', 8), ('scipy_cblas_sgemm64_', 8), ('cblas_sgemm_64', 8),
                  ('cblas_sgemm', 4)]


def _blas_libraries():
    """Paths of the libraries that may hold numpy's BLAS: those its wheel bundles first, then any
    BLAS the process has loaded (numpy is imported, so its BLAS is)."""
    numpy_folder = Path(np.__file__).parent
    bundled = sorted(numpy_folder.parent.glob('numpy.libs/*blas*')) + \
        sorted(numpy_folder.glob('.dylibs/*blas*'))
    try:
        with open('/proc/self/maps') as maps:
            loaded = sorted({line.split()[-1] for line in maps if 'blas' in line or 'mkl' in line})
    except OSError:
        loaded = []
    return bundled + loaded


def numpy_sgemm():
    """(address, integer bytes) of cblas_sgemm in numpy's BLAS, so that C calls the BLAS, and
    with it the threads, that np.matmul uses."""
    for path in _blas_libraries():
        try:
            library = ctypes.CDLL(str(path))
        except OSError:
            continue
        for symbol, integer_bytes in _SGEMM_SYMBOLS:
            if hasattr(library, symbol):
                return ctypes.cast(getattr(library, symbol), ctypes.c_void_p).value, integer_bytes
    raise KernelsUnavailable("found no cblas_sgemm in numpy's BLAS (looked in "
                             f"{', '.join(map(str, _blas_libraries())) or 'nothing loaded'}): "
                             'use --cpu-conv nnabla')


@lru_cache(maxsize=None)
def kernels():
    """cpu_kernels.c as a loaded library, compiled into build/ unless it already is there for
    this source, this compiler and flags and this CPU."""
    compiler = os.environ.get('CC', 'cc')
    key = hashlib.sha256(b'\0'.join([_KERNELS_SOURCE.read_bytes(),
                                     ' '.join([compiler] + _COMPILE).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    library = _KERNELS_FOLDER / f'cpu_kernels-{key}.so'
    if not library.exists():
        _compile(compiler, library)
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as error:
        raise KernelsUnavailable(f'cannot load {library} ({error}): delete it to have it built '
                                 'again, or use --cpu-conv nnabla') from None
    for name, arguments in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, None
    lib.use_sgemm(*numpy_sgemm())
    return lib


def _address(array, offset=0):
    """The address of element `offset` of the C-contiguous float32 `array`."""
    return array.__array_interface__['data'][0] + 4 * offset


# The C loops release the GIL, so threads split a call's channels or rows between cores.
_threads = ThreadPoolExecutor(max_workers=os.cpu_count())
# Arrays smaller than this go in one piece: handing them out costs more than it saves.
_SPLIT_ELEMENTS = 1 << 20


def _in_row_chunks(function, rows, size):
    """Run function(lo, hi) on slices of range(rows), one per core, and wait for all."""
    if size < _SPLIT_ELEMENTS or rows < 2:
        function(0, rows)
        return
    bounds = np.linspace(0, rows, _threads._max_workers + 1).astype(int).tolist()
    for job in [_threads.submit(function, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        job.result()


def _conv_out_hw(in_hw, kernel_hw, pad, stride):
    return tuple((n + 2 * p - k) // s + 1
                 for n, k, p, s in zip(in_hw, kernel_hw, pad, stride))


# Buffers kept from call to call: a new one of a few MB would cost more in page faults than
# the loop that fills it. Every use ends before the function that made it returns, and the
# graph runs one function at a time.
_buffers = {}


def _buffer(name, shape):
    """An uninitialised float32 array of `shape` in the kept buffer `name`."""
    size = math.prod(shape)
    if name not in _buffers or _buffers[name].size < size:
        _buffers[name] = np.empty(size, np.float32)
    return _buffers[name][:size].reshape(shape)


def _columns(channels, kernel_hw, out_hw):
    """(rows, col): how many output rows a chunk of a pass takes so that their im2col matrix
    fits in _CHUNK_FLOATS (evened out over the chunks), and a buffer for that matrix."""
    col_rows = channels * kernel_hw[0] * kernel_hw[1]
    out_h, out_w = out_hw
    rows = max(1, _CHUNK_FLOATS // (col_rows * out_w))
    rows = -(-out_h // -(-out_h // rows))  # the same number of chunks, evened out
    return min(rows, out_h), _buffer('columns', (col_rows * min(rows, out_h) * out_w,))


def _conv_pass(name, image, kernel_hw, pad, stride, out_hw, *rest):
    """Run the C pass `name` over the C-contiguous float32 image (C, H, W) for output rows
    out_hw; `rest`: its arrays and numbers after the im2col buffer."""
    rows, col = _columns(image.shape[0], kernel_hw, out_hw)
    getattr(kernels(), name)(
        _address(image), *image.shape, *kernel_hw, *pad, *stride, *out_hw, rows, _address(col),
        *[_address(value) if isinstance(value, np.ndarray) else value for value in rest])


def _im2col_conv(x, w, pad, stride, out, accumulate=False):
    """out (Cout, H', W') = (or += with accumulate) conv(x, w): x (C, H, W) zero-padded."""
    _conv_pass('conv_forward', x, w.shape[2:], pad, stride, out.shape[1:], w, w.shape[0],
               float(accumulate), out)


def _im2col_weight_grad(x, dy, kernel_hw, pad, stride, out, accumulate=False):
    """out (Cout, C * kh * kw) = (or += with accumulate) the gradient of conv(x, w) with
    respect to w, for dy."""
    _conv_pass('conv_weight_grad', x, kernel_hw, pad, stride, dy.shape[1:], dy, dy.shape[0],
               float(accumulate), out)


def _col2im_input_grad(dy, w, pad, stride, out, accumulate=False):
    """out (C, H, W) = (or += with accumulate) the gradient of conv(x, w) for dy."""
    _conv_pass('conv_input_grad', out, w.shape[2:], pad, stride, dy.shape[1:], dy, w.shape[0],
               w, float(accumulate))


# A stride-1 conv with weight w and pad p equals the transposed conv with
# weight _rotated(w) and pad k-1-p. Each pass of the direct form lowers to a
# matrix of in_ch*kh*kw rows by |y| columns; in the dual form x and y swap
# roles (out_ch*kh*kw by |x|), so the dual wins when out_ch*|x| < in_ch*|y|.

def _rotated(w):
    return np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])


def _dual_pad(kernel_hw, pad):
    return tuple(k - 1 - p for k, p in zip(kernel_hw, pad))


def _use_dual(w_shape, x_hw, pad, stride):
    out_ch, in_ch, kh, kw = w_shape
    y_hw = _conv_out_hw(x_hw, (kh, kw), pad, stride)
    return (stride == (1, 1) and pad[0] < kh and pad[1] < kw
            and out_ch * x_hw[0] * x_hw[1] < in_ch * y_hw[0] * y_hw[1])


def _conv(x, w, pad, stride, out, accumulate=False):
    """out (Cout, H', W') = (or +=) conv(x, w) of one image x (C, H, W)."""
    if _use_dual(w.shape, x.shape[1:], pad, stride):
        _col2im_input_grad(x, _rotated(w), _dual_pad(w.shape[2:], pad), stride, out, accumulate)
    else:
        _im2col_conv(x, w, pad, stride, out, accumulate)


def _conv_input_grad(dy, w, pad, stride, out, accumulate=False):
    """out (C, H, W) = (or +=) the gradient of conv(x, w) with respect to x, for dy."""
    if _use_dual(w.shape, out.shape[1:], pad, stride):
        _im2col_conv(dy, _rotated(w), _dual_pad(w.shape[2:], pad), stride, out, accumulate)
    else:
        _col2im_input_grad(dy, w, pad, stride, out, accumulate)


def _conv_weight_grad(x, dy, kernel_hw, pad, stride, out, accumulate=False):
    """out (Cout, C, kh, kw) = (or +=) the gradient of conv(x, w) with respect to w, for dy."""
    if _use_dual(out.shape, x.shape[1:], pad, stride):
        grad = np.empty((out.shape[1], out.shape[0] * kernel_hw[0] * kernel_hw[1]), np.float32)
        _im2col_weight_grad(dy, x, kernel_hw, _dual_pad(kernel_hw, pad), stride, grad)
        _store(out, _rotated(grad.reshape(out.shape[1], out.shape[0], *kernel_hw)), accumulate)
    else:
        _im2col_weight_grad(x, dy, kernel_hw, pad, stride, out.reshape(out.shape[0], -1),
                            accumulate)


def _reflect_pad(image, pad):
    """np.pad(image, ((0, 0), (ph, ph), (pw, pw)), mode='reflect') for pads smaller than H, W,
    in the kept buffer 'padded'."""
    channels, height, width = image.shape
    out = _buffer('padded', (channels, height + 2 * pad[0], width + 2 * pad[1]))
    kernels().reflect_pad(_address(image), channels, height, width, *pad, _address(out))
    return out


def _reflect_pad_adjoint(grad, pad, out, accumulate):
    """out (C, H, W) = (or +=) the gradient of _reflect_pad for `grad` (C, H+2ph, W+2pw):
    every border pixel folded onto the pixel it mirrors."""
    channels, height, width = out.shape
    kernels().reflect_pad_adjoint(_address(grad), channels, height, width, *pad,
                                   int(accumulate), _address(out))


def _read(array):
    """An nnabla NdArray's values as a float32 numpy array. nnabla holds an array in the dtype
    it was last set in (float64 after `v.d = numpy float64 values`); asking for float32
    converts it where reading `.data` would hand the float64 array to float32 code."""
    return array.get_data('r', np.float32)


_CPU = get_extension_context('cpu')


def _pointer(array, overwrite=False):
    """The address of an nnabla NdArray's values as float32, converted like _read's; with
    `overwrite`, for a caller that writes them all (nothing is converted)."""
    return array.data_ptr(np.float32, _CPU, overwrite)


def _writable(array, accumulate=False):
    """An nnabla NdArray as a float32 numpy array to overwrite whole or, with `accumulate`, to
    add to."""
    return array.get_data('rw' if accumulate else 'w', np.float32)


def _store(dst, value, accum):
    if accum:
        dst += value
    else:
        dst[...] = value


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
        return "BlasDeconvolution" if self._transposed else "BlasConvolution"

    def min_outputs(self):
        return 1

    def _seen(self, x_img):
        """The image the convolution sees: with its reflection padding, if any."""
        return _reflect_pad(x_img, self._reflect_pad) if any(self._reflect_pad) else x_img

    def setup_impl(self, inputs, outputs):
        batch, _, h, w = inputs[0].shape
        h, w = h + 2 * self._reflect_pad[0], w + 2 * self._reflect_pad[1]
        w_shape = inputs[1].shape
        if self._transposed:
            out_hw = tuple(s * (n - 1) - 2 * p + k + op for n, k, p, s, op in zip(
                (h, w), w_shape[2:], self._pad, self._stride, self._output_padding))
            out_ch = w_shape[1]
        else:
            out_hw = _conv_out_hw((h, w), w_shape[2:], self._pad, self._stride)
            out_ch = w_shape[0]
        outputs[0].reset_shape((batch, out_ch) + out_hw, True)

    def _image_forward(self, x, w, out):
        if self._transposed:
            _conv_input_grad(x, w, self._pad, self._stride, out)
        else:
            _conv(x, w, self._pad, self._stride, out)

    def _image_input_grad(self, dy, w, out, accumulate):
        if self._transposed:
            _conv(dy, w, self._pad, self._stride, out, accumulate)
        else:
            _conv_input_grad(dy, w, self._pad, self._stride, out, accumulate)

    def _image_weight_grad(self, x, dy, out, accumulate):
        if self._transposed:
            _conv_weight_grad(dy, x, out.shape[2:], self._pad, self._stride, out, accumulate)
        else:
            _conv_weight_grad(x, dy, out.shape[2:], self._pad, self._stride, out, accumulate)

    def forward_impl(self, inputs, outputs):
        x, w = _read(inputs[0].data), _read(inputs[1].data)
        y = _writable(outputs[0].data)
        for x_img, y_img in zip(x, y):
            self._image_forward(self._seen(x_img), w, y_img)
        if len(inputs) == 3:
            kernels().add_bias(_address(y), *y.shape[:2], y[0, 0].size, _pointer(inputs[2].data))

    def backward_impl(self, inputs, outputs, propagate_down, accum):
        dy = _read(outputs[0].grad)
        if propagate_down[0]:
            w, dx = _read(inputs[1].data), _writable(inputs[0].grad, accum[0])
            (ph, pw), (channels, h, wd) = self._reflect_pad, dx.shape[1:]
            for dy_img, dx_img in zip(dy, dx):
                if ph or pw:
                    grad = _buffer('padded gradient', (channels, h + 2 * ph, wd + 2 * pw))
                    self._image_input_grad(dy_img, w, grad, accumulate=False)
                    _reflect_pad_adjoint(grad, self._reflect_pad, dx_img, accum[0])
                else:
                    self._image_input_grad(dy_img, w, dx_img, accum[0])
        if propagate_down[1]:
            x, dw = _read(inputs[0].data), _writable(inputs[1].grad, accum[1])
            for n, (x_img, dy_img) in enumerate(zip(x, dy)):
                self._image_weight_grad(self._seen(x_img), dy_img, dw, accum[1] or n > 0)
        if len(inputs) == 3 and propagate_down[2]:
            kernels().bias_grad(_address(dy), *dy.shape[:2], dy[0, 0].size, int(accum[2]),
                                _pointer(inputs[2].grad, overwrite=not accum[2]))

    def grad_depends_output_data(self, i, o):
        return False

    def grad_depends_input_data(self, i, j):
        # dx needs w, dw needs x, db needs neither.
        return (i, j) in ((0, 1), (1, 0))


def _pair(name, value, minimum):
    if not isinstance(value, (tuple, list)) or len(value) != 2 or \
            any(not isinstance(v, (int, np.integer)) or v < minimum for v in value):
        raise ValueError(f"{name} must be two integers >= {minimum}, got {value!r}")
    return tuple(value)


def _check_args(x, weight, bias, x_channel_axis, out_channel_axis):
    if len(x.shape) != 4 or len(weight.shape) != 4:
        raise ValueError("only 2-D NCHW inputs (x 4-D, weight 4-D) are supported, got "
                         f"x {x.shape}, weight {weight.shape}")
    if weight.shape[x_channel_axis] != x.shape[1]:
        raise ValueError(f"weight {weight.shape} does not match {x.shape[1]} input channels "
                         "(grouped convolution is not supported)")
    out_ch = weight.shape[out_channel_axis]
    if bias is not None and tuple(bias.shape) != (out_ch,):
        raise ValueError(f"bias must have shape ({out_ch},), got {bias.shape}")


def convolution(x, weight, bias=None, pad=(0, 0), stride=(1, 1), reflect_pad=(0, 0)):
    """Same as F.convolution(x, weight, bias, base_axis=1, pad=pad, stride=stride); with
    reflect_pad, same as F.convolution(F.pad(x, reflect_pad * 2, mode='reflect'), ...)."""
    _check_args(x, weight, bias, x_channel_axis=1, out_channel_axis=0)
    pad, stride = _pair("pad", pad, 0), _pair("stride", stride, 1)
    reflect_pad = _pair("reflect_pad", reflect_pad, 0)
    if any(p >= n for p, n in zip(reflect_pad, x.shape[2:])):
        raise ValueError(f"reflect_pad {reflect_pad} must be smaller than the input {x.shape}")
    seen_hw = tuple(n + 2 * p for n, p in zip(x.shape[2:], reflect_pad))
    if min(_conv_out_hw(seen_hw, weight.shape[2:], pad, stride)) < 1:
        raise ValueError(f"kernel {weight.shape[2:]} does not fit into padded input {x.shape}")
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return _BlasConvolution(pad, stride, transposed=False, reflect_pad=reflect_pad)(*inputs)


def deconvolution(x, weight, bias=None, pad=(0, 0), stride=(1, 1), output_padding=(0, 0)):
    """Same as F.deconvolution(x, weight, bias, base_axis=1, pad=pad, stride=stride,
    output_padding=output_padding); weight is (in channels, out channels, kh, kw)."""
    _check_args(x, weight, bias, x_channel_axis=0, out_channel_axis=1)
    pad, stride = _pair("pad", pad, 0), _pair("stride", stride, 1)
    output_padding = _pair("output_padding", output_padding, 0)
    if any(op >= s for op, s in zip(output_padding, stride)):
        raise ValueError(f"output_padding {output_padding} must be smaller than stride {stride}")
    if min(s * (n - 1) - 2 * p + k
           for n, k, p, s in zip(x.shape[2:], weight.shape[2:], pad, stride)) < 1:
        raise ValueError(f"pad {pad} is too large for input {x.shape} and kernel "
                         f"{weight.shape[2:]}")
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
        return "CpuInstanceNormalization"

    def setup_impl(self, inputs, outputs):
        super().setup_impl(inputs, outputs)
        shape = inputs[0].shape
        self._rows, self._size = shape[0] * shape[1], math.prod(shape[2:])
        # Each row's mean and inverse standard deviation, from the forward for the backward.
        self._mean, self._inverse_std = np.empty((2, self._rows), np.float32)

    # Addresses rather than numpy arrays: this function runs after every convolution, on maps
    # small enough at the small sizes that the numpy views cost more than the loops.
    def forward_impl(self, inputs, outputs):
        x, z, size = _pointer(inputs[0].data), _pointer(outputs[0].data, overwrite=True), self._size

        def normalise(lo, hi):
            kernels().instance_norm_forward(
                x + 4 * lo * size, hi - lo, size, self._eps, self._slope, z + 4 * lo * size,
                _address(self._mean, lo), _address(self._inverse_std, lo))

        _in_row_chunks(normalise, self._rows, self._rows * size)

    def backward_impl(self, inputs, outputs, propagate_down, accum):
        if not propagate_down[0]:
            return
        x, dz, size = _pointer(inputs[0].data), _pointer(outputs[0].grad), self._size
        dx = _pointer(inputs[0].grad, overwrite=not accum[0])

        def gradient(lo, hi):
            kernels().instance_norm_backward(
                x + 4 * lo * size, dz + 4 * lo * size, _address(self._mean, lo),
                _address(self._inverse_std, lo), hi - lo, size, self._slope, int(accum[0]),
                dx + 4 * lo * size)

        _in_row_chunks(gradient, self._rows, self._rows * size)

    def grad_depends_output_data(self, i, o):
        return False

    def grad_depends_input_data(self, i, j):
        return True


def instance_normalization(x, eps=1e-5, slope=1.0):
    """Same as F.instance_normalization(x, None, None, channel_axis=1, batch_axis=0, eps=eps),
    followed by F.leaky_relu(alpha=slope) unless slope is 1 (slope 0: F.relu)."""
    if len(x.shape) < 3:
        raise ValueError(f"instance normalisation needs (B, C, ...) inputs, got {x.shape}")
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
        self._sigma = self._u = self._v = None

    @property
    def name(self):
        return "CpuSpectralNorm"

    def forward_impl(self, inputs, outputs):
        weight = _read(inputs[0].data)
        matrix = weight.reshape(weight.shape[0], -1)
        u = _writable(inputs[1].data, accumulate=True)  # read, then updated in place
        v = matrix.T @ u
        v /= np.sqrt(np.sum(v * v) + self._eps)
        product = matrix @ v
        u_new = product / np.sqrt(np.sum(product * product) + self._eps)
        u[...] = u_new
        self._u, self._v = u_new, v
        self._sigma = float(u_new @ product)
        np.divide(weight, self._sigma, out=_writable(outputs[0].data))

    def backward_impl(self, inputs, outputs, propagate_down, accum):
        if not propagate_down[0]:
            return
        rows, columns = self._u.size, self._v.size
        kernels().spectral_norm_backward(
            _pointer(inputs[0].data), _pointer(outputs[0].grad), _address(self._u),
            _address(self._v), rows, columns, self._sigma, int(accum[0]),
            _pointer(inputs[0].grad, overwrite=not accum[0]))

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
    plain = kind in ('Convolution', 'Deconvolution') and len(inputs[0].shape) == 4 and \
        (args['base_axis'], args['dilation'], args['group'], args['channel_last']) == \
        (1, [1, 1], 1, False)
    if kind == 'Convolution' and plain:
        x, reflect_pad = inputs[0], (0, 0)
        padding = _made_by(x, 'Pad', mode='reflect')
        widths = padding.info.args['pad_width'] if padding else []
        if len(widths) == 4 and widths[0] == widths[1] and widths[2] == widths[3]:
            x, reflect_pad = padding.inputs[0], (widths[0], widths[2])
        return [x] + inputs[1:], partial(convolution, pad=args['pad'], stride=args['stride'],
                                         reflect_pad=reflect_pad)
    if kind == 'Deconvolution' and plain:
        return inputs, partial(deconvolution, pad=args['pad'], stride=args['stride'],
                               output_padding=args['output_padding'])
    if kind == 'SpectralNorm' and (args['dim'], args['itr'], args['test'], args['output_u']) \
            == (0, 1, False, False):
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
        raise ValueError(f'{function.info.type_name} is not an nnabla function: accelerate each '
                         'graph once, with all its outputs')

    def make(*inputs):
        return kind(function.context, **function.info.args)(
            *inputs, n_outputs=len(function.outputs), auto_forward=False)
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
