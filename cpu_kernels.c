/* The memory-bound loops of cpu_functions.py: im2col and col2im, reflection padding and
 * instance normalisation. numpy's BLAS does the products; these replace the dozens of numpy
 * slicing calls each of them took, whose per-call cost dominated the small training step.
 *
 * Every function works on a range of channels (or rows) that the caller hands it, so that
 * Python threads can split one call between cores: ctypes releases the GIL while C runs.
 * Arrays are float32, C-contiguous; sizes are longs. cpu_functions.py compiles this file
 * the first time it is needed and loads it with ctypes.
 */
#include <math.h>
#include <string.h>

/* The output columns q in [*first, *last) whose input column q * stride + offset lies in
 * [0, width). */
static void inside(long offset, long stride, long width, long out_w, long *first, long *last)
{
    long lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
    long hi = offset < width ? (width - 1 - offset) / stride + 1 : 0;
    *first = lo < out_w ? lo : out_w;
    *last = hi < out_w ? hi : out_w;
    if (*last < *first)
        *last = *first;
}

/* The im2col matrix of output rows [row0, row0 + rows): row (c, i, j), column (r, q) holds
 * input pixel (row0 + r) * sh - ph + i, q * sw - pw + j of channel c, or 0 in the padding. */
void im2col(const float *x, long channels, long height, long width, long kh, long kw,
            long ph, long pw, long sh, long sw, long out_w, long row0, long rows, float *col)
{
    long n = rows * out_w;
    for (long c = 0; c < channels; ++c)
        for (long i = 0; i < kh; ++i)
            for (long j = 0; j < kw; ++j) {
                float *dst = col + ((c * kh + i) * kw + j) * n;
                long first, last, offset = j - pw;
                inside(offset, sw, width, out_w, &first, &last);
                for (long r = 0; r < rows; ++r, dst += out_w) {
                    long y = (row0 + r) * sh - ph + i;
                    /* Plain loops, not memcpy and memset: rows are often only 16 floats. */
                    if (y < 0 || y >= height) {
                        for (long q = 0; q < out_w; ++q)
                            dst[q] = 0;
                        continue;
                    }
                    const float *src = x + (c * height + y) * width + offset;
                    for (long q = 0; q < first; ++q)
                        dst[q] = 0;
                    if (sw == 1)
                        for (long q = first; q < last; ++q)
                            dst[q] = src[q];
                    else
                        for (long q = first; q < last; ++q)
                            dst[q] = src[q * sw];
                    for (long q = last; q < out_w; ++q)
                        dst[q] = 0;
                }
            }
}

/* The adjoint of im2col: adds every entry of `col` to the pixel of x it was read from. The
 * same arguments in the same order as im2col. */
void col2im(float *x, long channels, long height, long width, long kh, long kw,
            long ph, long pw, long sh, long sw, long out_w, long row0, long rows,
            const float *col)
{
    long n = rows * out_w;
    for (long c = 0; c < channels; ++c)
        for (long i = 0; i < kh; ++i)
            for (long j = 0; j < kw; ++j) {
                const float *src = col + ((c * kh + i) * kw + j) * n;
                long first, last, offset = j - pw;
                inside(offset, sw, width, out_w, &first, &last);
                for (long r = 0; r < rows; ++r, src += out_w) {
                    long y = (row0 + r) * sh - ph + i;
                    if (y < 0 || y >= height)
                        continue;
                    float *dst = x + (c * height + y) * width + offset;
                    if (sw == 1)
                        for (long q = first; q < last; ++q)
                            dst[q] += src[q];
                    else
                        for (long q = first; q < last; ++q)
                            dst[q * sw] += src[q];
                }
            }
}

/* Index k of a reflection-padded axis of n pixels, padded by p, in the unpadded axis. */
static long mirrored(long k, long p, long n)
{
    k -= p;
    if (k < 0)
        return -k;
    return k < n ? k : 2 * (n - 1) - k;
}

/* out (C, H + 2ph, W + 2pw) = x (C, H, W) reflection-padded; pads smaller than H and W. */
void reflect_pad(const float *x, long channels, long height, long width, long ph, long pw,
                 float *out)
{
    long out_w = width + 2 * pw;
    for (long c = 0; c < channels; ++c)
        for (long y = 0; y < height + 2 * ph; ++y) {
            const float *src = x + (c * height + mirrored(y, ph, height)) * width;
            float *dst = out + (c * (height + 2 * ph) + y) * out_w;
            for (long k = 0; k < pw; ++k) {
                dst[k] = src[pw - k];
                dst[pw + width + k] = src[width - 2 - k];
            }
            memcpy(dst + pw, src, width * sizeof(float));
        }
}

/* The adjoint of reflect_pad: dx (C, H, W) = (or +=, with accumulate) the sum of the entries
 * of grad (C, H + 2ph, W + 2pw) over the padded pixels that mirror each pixel. */
void reflect_pad_adjoint(const float *grad, long channels, long height, long width, long ph,
                         long pw, int accumulate, float *dx)
{
    long grad_w = width + 2 * pw;
    if (!accumulate)
        memset(dx, 0, channels * height * width * sizeof(float));
    for (long c = 0; c < channels; ++c)
        for (long y = 0; y < height + 2 * ph; ++y) {
            const float *src = grad + (c * (height + 2 * ph) + y) * grad_w;
            float *dst = dx + (c * height + mirrored(y, ph, height)) * width;
            for (long k = 0; k < width; ++k)
                dst[k] += src[pw + k];
            for (long k = 0; k < pw; ++k) {
                dst[pw - k] += src[k];
                dst[width - 2 - k] += src[pw + width + k];
            }
        }
}

/* Instance normalisation of `rows` rows of `size` values followed by a leaky ReLU of
 * `slope`: y = (x - mean) * inverse_std, with inverse_std = 1 / sqrt(mean squared deviation
 * + eps), and z = y where y > 0, slope * y elsewhere (slope 1: no activation, 0: ReLU).
 * Keeps each row's mean and inverse_std for the backward. Sums run in double: a float32 sum
 * over a whole 300x200 map loses digits on the near two-level maps of mask features. */
void instance_norm_forward(const float *x, long rows, long size, double eps, float slope,
                           float *z, float *mean, float *inverse_std)
{
    for (long r = 0; r < rows; ++r, x += size, z += size) {
        double sum = 0;
        for (long k = 0; k < size; ++k)
            sum += x[k];
        float centre = (float)(sum / size);
        double squares = 0;
        for (long k = 0; k < size; ++k) {
            float centred = x[k] - centre;
            squares += (double)centred * centred;
        }
        float scale = (float)(1 / sqrt(squares / size + eps));
        for (long k = 0; k < size; ++k) {
            float y = (x[k] - centre) * scale;
            z[k] = y > 0 ? y : slope * y;
        }
        mean[r] = centre;
        inverse_std[r] = scale;
    }
}

/* Its gradient, from the input x (y is recomputed, bit for bit): with g = dz where y > 0 and
 * slope * dz elsewhere, dx = (g - mean(g) - y mean(g y)) * inverse_std; written to dx, or added
 * with accumulate. */
void instance_norm_backward(const float *x, const float *dz, const float *mean,
                            const float *inverse_std, long rows, long size, float slope,
                            int accumulate, float *dx)
{
    for (long r = 0; r < rows; ++r, x += size, dz += size, dx += size) {
        float centre = mean[r], scale = inverse_std[r];
        double sum = 0, product = 0;
        for (long k = 0; k < size; ++k) {
            float y = (x[k] - centre) * scale;
            float g = y > 0 ? dz[k] : slope * dz[k];
            sum += g;
            product += (double)g * y;
        }
        float g_mean = (float)(sum / size), correlation = (float)(product / size);
        for (long k = 0; k < size; ++k) {
            float y = (x[k] - centre) * scale;
            float g = y > 0 ? dz[k] : slope * dz[k];
            float grad = (g - g_mean - y * correlation) * scale;
            dx[k] = accumulate ? dx[k] + grad : grad;
        }
    }
}
