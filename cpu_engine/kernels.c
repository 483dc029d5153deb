/* The loops of cpu_functions.py: the three passes of a convolution (im2col or col2im around
 * numpy's own cblas_sgemm) and its bias, reflection padding, the dual form's kernel rotation,
 * instance normalisation and the spectral norm. One call does a whole pass over an image,
 * which replaces the dozens of Python and numpy calls each took, whose per-call cost dominated
 * the small training step.
 *
 * Arrays are float32, C-contiguous; sizes are longs. cpu_functions.py compiles this file (with
 * OpenMP) the first time it is needed and loads it with ctypes.
 *
 * Every core takes a share of each convolution pass: its own output rows, or its own input
 * channels, lowered into its own part of `col` and multiplied there by a one-thread BLAS. The
 * matrix a core builds is the one it multiplies, so it never crosses to another core's cache:
 * at the small sizes, handing a freshly built matrix to BLAS's own threads cost as much as
 * building it.
 */
#include <math.h>
#include <omp.h>
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
static void im2col(const float *x, long channels, long height, long width, long kh, long kw,
                   long ph, long pw, long sh, long sw, long out_w, long row0, long rows,
                   float *col)
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
static void col2im(float *x, long channels, long height, long width, long kh, long kw,
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

/* numpy's BLAS, whose cblas_sgemm use_sgemm hands in: with 64-bit integers (the OpenBLAS
 * that numpy's wheels bundle) or 32-bit ones (most other builds). */
typedef void (*sgemm_64)(int, int, int, long, long, long, float, const float *, long,
                         const float *, long, float, float *, long);
typedef void (*sgemm_32)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
static void *sgemm;
static int sgemm_integer_bytes;
static int threads = 1; /* how many share a pass: 1 unless that BLAS runs on one thread */
enum { ROW_MAJOR = 101, NO_TRANSPOSE = 111, TRANSPOSE = 112 };

void use_sgemm(void *function, int integer_bytes, int pass_threads)
{
    sgemm = function;
    sgemm_integer_bytes = integer_bytes;
    threads = pass_threads;
}

/* How many cores share out `n` rows or channels: never more than there are. */
static int cores_for(long n)
{
    return n < threads ? (int)n : threads;
}

/* [*first, *last): this core's share of range(n), the shares as even as they can be. */
static void own_share(long n, long *first, long *last)
{
    int part = omp_get_thread_num(), parts = omp_get_num_threads();
    *first = n * part / parts;
    *last = n * (part + 1) / parts;
}

/* This core's part of `col`, which holds a chunk of k rows by chunk_rows out_w columns for
 * each core (cpu_functions sizes it so). */
static float *own_columns(float *col, long k, long chunk_rows, long out_w)
{
    return col + omp_get_thread_num() * k * chunk_rows * out_w;
}

/* c (m, n; row stride ldc) = a b + beta c, a (m, k) and b (k, n) row-major, each transposed
 * first with its flag. The sizes here stay far below 2^31 (a chunk of im2col holds at most
 * _CHUNK_FLOATS floats). */
static void gemm(int transpose_a, int transpose_b, long m, long n, long k, const float *a,
                 long lda, const float *b, long ldb, float beta, float *c, long ldc)
{
    int ta = transpose_a ? TRANSPOSE : NO_TRANSPOSE, tb = transpose_b ? TRANSPOSE : NO_TRANSPOSE;
    if (sgemm_integer_bytes == 8)
        ((sgemm_64)sgemm)(ROW_MAJOR, ta, tb, m, n, k, 1, a, lda, b, ldb, beta, c, ldc);
    else
        ((sgemm_32)sgemm)(ROW_MAJOR, ta, tb, (int)m, (int)n, (int)k, 1, a, (int)lda, b, (int)ldb,
                          beta, c, (int)ldc);
}

/* The three passes of y = conv(x, w) for one image x (C, H, W), w (Cout, C, kh, kw), y (Cout,
 * out_h, out_w), over chunks of `chunk_rows` output rows whose im2col matrix (C kh kw,
 * chunk_rows out_w) fits in one core's part of `col` (`col` holds one such part per thread).
 * The arguments from x to chunk_rows are the same for all three. */

/* y = conv(x, w) + beta y; each core its own output rows. */
void conv_forward(const float *x, long channels, long height, long width, long kh, long kw,
                  long ph, long pw, long sh, long sw, long out_h, long out_w, long chunk_rows,
                  float *col, const float *w, long out_channels, float beta, float *y)
{
    long k = channels * kh * kw;
#pragma omp parallel num_threads(cores_for(out_h))
    {
        long first, last;
        own_share(out_h, &first, &last);
        float *own = own_columns(col, k, chunk_rows, out_w);
        for (long row0 = first; row0 < last; row0 += chunk_rows) {
            long rows = last - row0 < chunk_rows ? last - row0 : chunk_rows, n = rows * out_w;
            im2col(x, channels, height, width, kh, kw, ph, pw, sh, sw, out_w, row0, rows, own);
            gemm(0, 0, out_channels, n, k, w, k, own, n, beta, y + row0 * out_w, out_h * out_w);
        }
    }
}

/* dw (Cout, C kh kw) = the gradient of conv(x, w) with respect to w, for dy, + beta dw; each
 * core the columns of its own input channels. */
void conv_weight_grad(const float *x, long channels, long height, long width, long kh, long kw,
                      long ph, long pw, long sh, long sw, long out_h, long out_w,
                      long chunk_rows, float *col, const float *dy, long out_channels,
                      float beta, float *dw)
{
    long k = channels * kh * kw;
#pragma omp parallel num_threads(cores_for(channels))
    {
        long first, last;
        own_share(channels, &first, &last);
        long own_k = (last - first) * kh * kw;
        float *own = own_columns(col, k, chunk_rows, out_w);
        float own_beta = beta;
        for (long row0 = 0; row0 < out_h; row0 += chunk_rows, own_beta = 1) {
            long rows = out_h - row0 < chunk_rows ? out_h - row0 : chunk_rows, n = rows * out_w;
            im2col(x + first * height * width, last - first, height, width, kh, kw, ph, pw, sh,
                   sw, out_w, row0, rows, own);
            gemm(0, 1, out_channels, own_k, n, dy + row0 * out_w, out_h * out_w, own, n,
                 own_beta, dw + first * kh * kw, k);
        }
    }
}

/* dx (C, H, W) = the gradient of conv(x, w) with respect to x, for dy, + beta dx (beta 0 or
 * 1); each core its own input channels. */
void conv_input_grad(float *dx, long channels, long height, long width, long kh, long kw,
                     long ph, long pw, long sh, long sw, long out_h, long out_w,
                     long chunk_rows, float *col, const float *dy, long out_channels,
                     const float *w, float beta)
{
    long k = channels * kh * kw;
#pragma omp parallel num_threads(cores_for(channels))
    {
        long first, last;
        own_share(channels, &first, &last);
        long own_k = (last - first) * kh * kw;
        float *own = own_columns(col, k, chunk_rows, out_w);
        float *own_dx = dx + first * height * width;
        if (beta == 0)
            memset(own_dx, 0, (last - first) * height * width * sizeof(float));
        for (long row0 = 0; row0 < out_h; row0 += chunk_rows) {
            long rows = out_h - row0 < chunk_rows ? out_h - row0 : chunk_rows, n = rows * out_w;
            gemm(1, 0, own_k, n, out_channels, w + first * kh * kw, k, dy + row0 * out_w,
                 out_h * out_w, 0, own, n);
            col2im(own_dx, last - first, height, width, kh, kw, ph, pw, sh, sw, out_w, row0,
                   rows, own);
        }
    }
}

/* y (batch, channels, size) += bias (channels), each channel its own value. */
void add_bias(float *y, long batch, long channels, long size, const float *bias)
{
    for (long n = 0; n < batch; ++n)
        for (long c = 0; c < channels; ++c, y += size)
            for (long k = 0; k < size; ++k)
                y[k] += bias[c];
}

/* The bias's gradient: db (channels) = the sum of dy (batch, channels, size) over batch and
 * size; written to db, or added with accumulate. */
void bias_grad(const float *dy, long batch, long channels, long size, int accumulate, float *db)
{
    for (long c = 0; c < channels; ++c) {
        double sum = 0;
        for (long n = 0; n < batch; ++n) {
            const float *row = dy + (n * channels + c) * size;
            for (long k = 0; k < size; ++k)
                sum += row[k];
        }
        db[c] = accumulate ? db[c] + (float)sum : (float)sum;
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
 * over a whole 300x200 map loses digits on the near two-level maps of mask features. With
 * `split`, the cores share the rows out. */
void instance_norm_forward(const float *x, long rows, long size, double eps, float slope,
                           int split, float *z, float *mean, float *inverse_std)
{
#pragma omp parallel for num_threads(split ? threads : 1)
    for (long r = 0; r < rows; ++r) {
        const float *in = x + r * size;
        float *out = z + r * size;
        double sum = 0;
        for (long k = 0; k < size; ++k)
            sum += in[k];
        float centre = (float)(sum / size);
        double squares = 0;
        for (long k = 0; k < size; ++k) {
            float centred = in[k] - centre;
            squares += (double)centred * centred;
        }
        float scale = (float)(1 / sqrt(squares / size + eps));
        for (long k = 0; k < size; ++k) {
            float y = (in[k] - centre) * scale;
            out[k] = y > 0 ? y : slope * y;
        }
        mean[r] = centre;
        inverse_std[r] = scale;
    }
}

/* Its gradient, from the input x (y is recomputed, bit for bit): with g = dz where y > 0 and
 * slope * dz elsewhere, dx = (g - mean(g) - y mean(g y)) * inverse_std; written to dx, or added
 * with accumulate. With `split`, the cores share the rows out. */
void instance_norm_backward(const float *x, const float *dz, const float *mean,
                            const float *inverse_std, long rows, long size, float slope,
                            int accumulate, int split, float *dx)
{
#pragma omp parallel for num_threads(split ? threads : 1)
    for (long r = 0; r < rows; ++r) {
        const float *in = x + r * size, *grad_in = dz + r * size;
        float *grad_out = dx + r * size;
        float centre = mean[r], scale = inverse_std[r];
        double sum = 0, product = 0;
        for (long k = 0; k < size; ++k) {
            float y = (in[k] - centre) * scale;
            float g = y > 0 ? grad_in[k] : slope * grad_in[k];
            sum += g;
            product += (double)g * y;
        }
        float g_mean = (float)(sum / size), correlation = (float)(product / size);
        for (long k = 0; k < size; ++k) {
            float y = (in[k] - centre) * scale;
            float g = y > 0 ? grad_in[k] : slope * grad_in[k];
            float grad = (g - g_mean - y * correlation) * scale;
            grad_out[k] = accumulate ? grad_out[k] + grad : grad;
        }
    }
}

/* The gradient of y = w / sigma with the power iteration's u and v held constant: dw = dy /
 * sigma - (sum(dy w) / sigma^2) u v^T, for w and dy (rows, cols); written to dw, or added with
 * accumulate. Two passes over the data, no temporaries. */
void spectral_norm_backward(const float *weight, const float *dy, const float *u, const float *v,
                            long rows, long cols, float sigma, int accumulate, float *dw)
{
    double dot = 0;
    for (long k = 0; k < rows * cols; ++k)
        dot += (double)dy[k] * weight[k];
    float coefficient = (float)(dot / ((double)sigma * sigma));
    for (long r = 0; r < rows; ++r, dy += cols, dw += cols) {
        float scaled_u = coefficient * u[r];
        for (long c = 0; c < cols; ++c) {
            float grad = dy[c] / sigma - scaled_u * v[c];
            dw[c] = accumulate ? dw[c] + grad : grad;
        }
    }
}

/* out (b, a, kh, kw) = w (a, b, kh, kw) with its first two axes swapped and each kernel turned
 * by 180 degrees, + beta out (beta 0 or 1): the weight of a convolution's dual form, and the
 * way back for its gradient. */
void rotate_kernel(const float *w, long a, long b, long kh, long kw, float beta, float *out)
{
    long size = kh * kw;
    for (long i = 0; i < a; ++i)
        for (long j = 0; j < b; ++j) {
            const float *src = w + (i * b + j) * size;
            float *dst = out + (j * a + i) * size;
            for (long k = 0; k < size; ++k)
                dst[k] = beta == 0 ? src[size - 1 - k] : dst[k] + src[size - 1 - k];
        }
}

/* One power iteration of the spectral norm of w (rows, cols) from u (rows), as F.spectral_norm
 * in training: v = normalised w^T u, u = normalised w v (updated in place), sigma = u . w v,
 * y = w / sigma. Keeps v and returns sigma for the backward; each vector's norm is
 * sqrt(squares + eps). */
float spectral_norm_forward(const float *w, long rows, long cols, double eps, float *u, float *v,
                            float *y)
{
    for (long c = 0; c < cols; ++c)
        v[c] = 0;
    for (long r = 0; r < rows; ++r) {
        const float *row = w + r * cols;
        float scale = u[r];
        for (long c = 0; c < cols; ++c)
            v[c] += scale * row[c];
    }
    double squares = 0;
    for (long c = 0; c < cols; ++c)
        squares += (double)v[c] * v[c];
    float inverse = (float)(1 / sqrt(squares + eps));
    for (long c = 0; c < cols; ++c)
        v[c] *= inverse;
    squares = 0;
    for (long r = 0; r < rows; ++r) {
        const float *row = w + r * cols;
        float product = 0;
        for (long c = 0; c < cols; ++c)
            product += row[c] * v[c];
        u[r] = product;
        squares += (double)product * product;
    }
    /* sigma = u_new . (w v) = |w v|^2 / sqrt(|w v|^2 + eps). */
    double norm = sqrt(squares + eps);
    float sigma = (float)(squares / norm);
    for (long r = 0; r < rows; ++r)
        u[r] = (float)(u[r] / norm);
    for (long k = 0; k < rows * cols; ++k)
        y[k] = w[k] / sigma;
    return sigma;
}
