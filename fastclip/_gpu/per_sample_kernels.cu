// fastclip per-sample clipping kernels (DP-SGD), CUDA C++.
//
// This file is compiled *appended to kernels.cu* (see _per_sample.source()): it
// reuses its element access (ld/st, 16-byte Vec loads, AccOf), its per-thread power
// sums thread_pow_sum and block_reduce; pass 1 uses its chunk_pow_sum (float32 per
// thread with a float64 redo on overflow or underflow, float64 for float64 data
// and general p).
//
// One [B, D] row-major (C-contiguous) per-sample gradient per launch; every
// index is 64-bit.  The flow for K arrays:
//
//   pass 1  fastclip_ps_pow_partials  (one launch per array): partials[b, c] =
//           power sum of chunk c of row b, one block per (row, chunk), so a
//           small batch of wide rows still fills the device.
//   factors fastclip_ps_factors       (one launch, one block): per-sample
//           norms and factors f = min(1, C / (n + eps)) (1 for a zero norm, NaN
//           propagates), flat (one norm over all arrays of a sample) or per
//           layer (one per array, its own C_k), and the number of clipped
//           samples, all written to device memory.
//   pass 2  fastclip_ps_weighted_sum  (one launch per array): out[d] = scale *
//           sum_b f_b x[b, d] without materialising the clipped rows; each
//           thread owns columns (a 16-byte vector of them when rows are
//           16-byte aligned) and loops over b, so a warp reads consecutive
//           addresses of one row.  16/32-bit data are added in float32 within
//           blocks of FASTCLIP_PS_ROW_BLOCK rows, block sums in float64.  When
//           there are too few columns to fill the device the batch is split
//           into row groups (blockIdx.y) that write float64 partial sums, and
//           fastclip_ps_combine adds them in a fixed order (deterministic).
//   or      fastclip_ps_scale_rows    (reduce=None): out[b, d] = f_b x[b, d].
//
// Rescaling (the CPU route's robust_norm rule, sample by sample): where the
// host knows a float64 power sum can leave the range in which it is exact
// (L2 with float64 data, any p other than 1, 2, inf), the factors kernel runs
// in three stages around two extra pass-1 launches per array that only touch
// the rows of marked samples (every other block returns at once):
//   stage 1  mark samples whose power sum is outside (safe_lo, safe_hi):
//            scale[s] = -1 (else 0);
//   fastclip_ps_pow_partials mode 1: max |x| chunk partials of marked rows;
//   stage 2  scale[s] = the sample's max |x| where it is finite and > 0, else 0
//            (zero, NaN and inf samples keep their plain norm);
//   fastclip_ps_pow_partials mode 2: sum (|x| / max)^p of rows with scale > 0;
//   stage 0  norms and factors, with norm = max * (sum (|x| / max)^p)^(1/p)
//            for samples with scale > 0.
// So gradients of 1e200 get their finite norm (not inf, and factor 0), and
// 1e-200 not 0, with no host synchronisation.

#define FASTCLIP_PS_ROW_BLOCK 64

// ------------------------------------------------------------------ pass 1

// Block-wide sum of (|s[i]| / m)^p over s[0:n], in float64 (dividing, not
// multiplying by 1 / m, so a subnormal max does not overflow the reciprocal).
template <typename T>
__device__ double chunk_scaled_pow_sum(const T* s, i64 n, double m, double p) {
    double acc = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) acc += pow(fabs((double)ld(s, i)) / m, p);
    return block_reduce(acc, 1);
}

// partials[b * n_chunks + c] = power sum (or max |x|) of elements
// [c * chunk, min((c + 1) * chunk, cols)) of row b of a contiguous [rows, cols] array.
// mode 0: every row, as ord_code says.  The rescaling passes (see the header) touch
// only the rows of marked samples, the sample of row b being s_offset + b:
// mode 1: max |x| where scale[s] != 0; mode 2: sum (|x| / scale[s])^p where
// scale[s] > 0.  Their other work items write nothing (those partials are never
// read).  The skip test depends on the work item only, so every thread of a
// block takes the same branch around block_reduce's barriers.
template <typename T>
__global__ void fastclip_ps_pow_partials(const T* x, i64 rows, i64 cols, i64 chunk,
                                         i64 n_chunks, int ord_code, double p, int mode,
                                         const double* scale, i64 s_offset,
                                         double* partials) {
    const i64 n_items = rows * n_chunks;
    for (i64 w = blockIdx.x; w < n_items; w += gridDim.x) {
        const i64 b = w / n_chunks;
        const double m = (mode == 0) ? 1.0 : scale[s_offset + b];
        if ((mode == 1 && m == 0.0) || (mode == 2 && !(m > 0.0))) continue;
        const i64 start = (w - b * n_chunks) * chunk;
        const i64 n = min(chunk, cols - start);
        const T* seg = x + b * cols + start;
        double v;
        if (mode == 2) v = chunk_scaled_pow_sum<T>(seg, n, m, p);
        else v = chunk_pow_sum<T>(seg, n, mode == 1 ? 0 : ord_code, p);
        if (threadIdx.x == 0) partials[w] = v;
    }
}

// ----------------------------------------------------------------- factors

__device__ __forceinline__ double ps_root(double v, int ord_code, double p) {
    if (ord_code == 0 || ord_code == 1) return v;
    if (ord_code == 2) return sqrt(v);
    return pow(v, 1.0 / p);
}

// min(1, bound / (norm + eps)), fastclip's one zero-norm rule (fastclip/_formulas.py):
// 1 where norm + eps == 0 (0 / 0: nothing to clip); NaN stays NaN (NaN >= 1 is false).
__device__ __forceinline__ double ps_factor(double norm, double bound, double eps) {
    double den = norm + eps;
    double r = bound / den;
    return (r >= 1.0 || den == 0.0) ? 1.0 : r;
}

// Power sum of row b of one array from its chunk partials (in chunk order).
__device__ __forceinline__ double ps_row_sum(const double* partials, i64 offset, i64 n_chunks,
                                             i64 b, int ord_code) {
    const double* q = partials + offset + b * n_chunks;
    double s = 0.0;
    for (i64 c = 0; c < n_chunks; ++c) s = combine(s, q[c], ord_code);
    return s;
}

// Power sum of sample s: per layer (s = k * rows + b) array k's row b, flat (s = b)
// all arrays' row b combined.
__device__ __forceinline__ double ps_sample_sum(const double* partials, const i64* offsets,
                                                const i64* chunks, i64 n_arrays, i64 rows,
                                                int per_layer, i64 s, int ord_code) {
    if (per_layer) {
        const i64 k = s / rows;
        return ps_row_sum(partials, offsets[k], chunks[k], s - k * rows, ord_code);
    }
    double v = 0.0;
    for (i64 k = 0; k < n_arrays; ++k)
        v = combine(v, ps_row_sum(partials, offsets[k], chunks[k], s, ord_code), ord_code);
    return v;
}

// One block.  table = [offset_k (K) | n_chunks_k (K) | bound_k as float64 bits (K)]:
// array k's partials are partials[offset_k + b * n_chunks_k + c] (max_partials and
// scaled_partials have the same layout).  Samples: s = b (flat) or s = k * rows + b
// (per_layer).  stage 1 and 2 only write scale[s] (see the header); stage 0
// writes norms[s] and factors[s] (flat: bound_0; per layer: bound_k) and
// n_clipped[0] = number of samples with a factor < 1 (per layer: with at least
// one), as a float64.  scale == nullptr in stage 0: no sample was rescaled.
template <typename N>
__global__ void fastclip_ps_factors(const double* partials, const i64* table, i64 n_arrays,
                                    i64 rows, int ord_code, double p, double eps, int per_layer,
                                    int stage, double safe_lo, double safe_hi,
                                    const double* max_partials, const double* scaled_partials,
                                    double* scale, N* norms, double* factors,
                                    double* n_clipped) {
    const i64* offsets = table;
    const i64* chunks = table + n_arrays;
    const double* bounds = reinterpret_cast<const double*>(table + 2 * n_arrays);
    const i64 n_samples = per_layer ? n_arrays * rows : rows;
    if (stage == 1) {
        for (i64 s = threadIdx.x; s < n_samples; s += blockDim.x) {
            double t = ps_sample_sum(partials, offsets, chunks, n_arrays, rows, per_layer, s, ord_code);
            scale[s] = (t > safe_lo && t < safe_hi) ? 0.0 : -1.0;
        }
        return;
    }
    if (stage == 2) {
        for (i64 s = threadIdx.x; s < n_samples; s += blockDim.x) {
            if (scale[s] == 0.0) continue;
            double m = ps_sample_sum(max_partials, offsets, chunks, n_arrays, rows, per_layer, s, 0);
            scale[s] = (m > 0.0 && isfinite(m)) ? m : 0.0;
        }
        return;
    }
    double count = 0.0;
    for (i64 b = threadIdx.x; b < rows; b += blockDim.x) {
        bool clipped = false;
        const i64 n_here = per_layer ? n_arrays : 1;
        for (i64 k = 0; k < n_here; ++k) {
            const i64 s = per_layer ? k * rows + b : b;
            double norm;
            if (scale != nullptr && scale[s] > 0.0) {
                double t = ps_sample_sum(scaled_partials, offsets, chunks, n_arrays, rows,
                                         per_layer, s, 1);
                norm = scale[s] * ps_root(t, 3, p);
            } else {
                double t = ps_sample_sum(partials, offsets, chunks, n_arrays, rows, per_layer, s,
                                         ord_code);
                norm = ps_root(t, ord_code, p);
            }
            double f = ps_factor(norm, bounds[k], eps);
            norms[s] = (N)norm;
            factors[s] = f;
            clipped = clipped || (f < 1.0);
        }
        count += clipped ? 1.0 : 0.0;
    }
    count = block_reduce(count, 1);
    if (threadIdx.x == 0) n_clipped[0] = count;
}

// ------------------------------------------------------------------ pass 2

// A factor the float32 arithmetic of 16/32-bit rows cannot take: below 2**-60 (the
// CPU route's threshold, fastclip/_cpu/_per_sample.py: _factors_in_range) x * f
// may leave float32's normal range although it is representable, and below 2**-149
// (float32 data of norm 1e20 clipped to 1e-25: f = 5e-46) (float)f is 0.  Such a
// row is multiplied in float64 instead (a branch uniform over the row's threads).
// Found by running this file compiled for the host
// (tests/gpu/emulated/test_gpu_per_sample_host_compiled.py): that sample's clipped
// rows came out 0, not 5e-26 (the CPU route's and the float64 oracle's), and a
// batch of such samples summed to 0.
__device__ __forceinline__ bool ps_tiny_factor(double f, int acc_bytes) {
    return acc_bytes == 4 && f > 0.0 && f < 8.673617379884035e-19;  // 2**-60
}

// acc64[j] = sum_{b in [b0, b1)} f[b] * x[b, d + j] for j < W (W == 1: scalar
// loads; else one 16-byte vector of W elements per row).  Rows of a tiny factor
// (ps_tiny_factor) go to the float64 sums directly.
template <typename T, int W>
__device__ __forceinline__ void ps_weighted_cols(const T* x, i64 cols, i64 b0, i64 b1, i64 d,
                                                 const double* f, double* acc64) {
    typedef typename AccOf<T>::type A;
#pragma unroll
    for (int j = 0; j < W; ++j) acc64[j] = 0.0;
    for (i64 r0 = b0; r0 < b1; r0 += FASTCLIP_PS_ROW_BLOCK) {
        const i64 r1 = min(r0 + (i64)FASTCLIP_PS_ROW_BLOCK, b1);
        A acc[W];
#pragma unroll
        for (int j = 0; j < W; ++j) acc[j] = 0;
#pragma unroll 4
        for (i64 b = r0; b < r1; ++b) {  // independent loads: unrolled to keep several in flight
            const double fd = f[b];
            const bool tiny = ps_tiny_factor(fd, (int)sizeof(A));
            const A c = (A)fd;
            const T* row = x + b * cols + d;
            if (W == 1) {
                if (tiny) acc64[0] += (double)ld(row, 0) * fd;
                else acc[0] += (A)ld(row, 0) * c;
            } else {
                Vec<T> v;
                v.load(row);
#pragma unroll
                for (int j = 0; j < W; ++j) {
                    if (tiny) acc64[j] += (double)ld(v.u.v, j) * fd;
                    else acc[j] += (A)ld(v.u.v, j) * c;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < W; ++j) acc64[j] += (double)acc[j];
    }
}

// Weighted column sums of a contiguous [rows, cols] array.  Row group s (of
// rows_per_split rows; blockIdx.y, grid-stride over n_splits) sums its rows;
// n_splits == 1: out[d] = (T)(scale * sum), else partials[s * cols + d] = sum.
template <typename T>
__global__ void fastclip_ps_weighted_sum(const T* x, i64 rows, i64 cols, const double* f,
                                         i64 rows_per_split, i64 n_splits, double scale, T* out,
                                         double* partials) {
    typedef typename AccOf<T>::type A;
    const int V = Vec<T>::V;
    const bool vec = aligned16(x) && (cols % V) == 0;
    const i64 units = vec ? cols / V : cols;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 s = blockIdx.y; s < n_splits; s += gridDim.y) {
        const i64 b0 = s * rows_per_split;
        const i64 b1 = min(b0 + rows_per_split, rows);
        for (i64 u = (i64)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += stride) {
            double acc[Vec<T>::V];
            int w = 1;
            i64 d = u;
            if (vec) {
                w = V;
                d = u * V;
                ps_weighted_cols<T, Vec<T>::V>(x, cols, b0, b1, d, f, acc);
            } else {
                ps_weighted_cols<T, 1>(x, cols, b0, b1, d, f, acc);
            }
            for (int j = 0; j < w; ++j) {
                if (n_splits == 1) st(out, d + j, (A)(acc[j] * scale));
                else partials[s * cols + d + j] = acc[j];
            }
        }
    }
}

// out[d] = (T)(scale * sum_s partials[s * cols + d]), row groups added in order.
template <typename T>
__global__ void fastclip_ps_combine(const double* partials, i64 n_splits, i64 cols,
                                    double scale, T* out) {
    typedef typename AccOf<T>::type A;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 d = (i64)blockIdx.x * blockDim.x + threadIdx.x; d < cols; d += stride) {
        double s = 0.0;
        for (i64 k = 0; k < n_splits; ++k) s += partials[k * cols + d];
        st(out, d, (A)(s * scale));
    }
}

// reduce=None: out[b, d] = x[b, d] * f[b] for a contiguous [rows, cols] array
// (blockIdx.y: rows, grid-stride; 16-byte vectors when both rows are aligned); in
// float64 for a row of a tiny factor (ps_tiny_factor).
template <typename T>
__global__ void fastclip_ps_scale_rows(const T* x, i64 rows, i64 cols, const double* f,
                                       T* out) {
    typedef typename AccOf<T>::type A;
    const int V = Vec<T>::V;
    const bool vec = aligned16(x) && aligned16(out) && (cols % V) == 0;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    for (i64 b = blockIdx.y; b < rows; b += gridDim.y) {
        const double fd = f[b];
        const bool tiny = ps_tiny_factor(fd, (int)sizeof(A));  // multiplied in float64
        const A c = (A)fd;
        const T* s = x + b * cols;
        T* o = out + b * cols;
        if (vec) {
            for (i64 i = first; i < cols / V; i += stride) {
                Vec<T> in, res;
                in.load(s + i * V);
#pragma unroll
                for (int j = 0; j < V; ++j)
                    st(res.u.v, j, tiny ? (A)((double)ld(in.u.v, j) * fd) : (A)ld(in.u.v, j) * c);
                res.store(o + i * V);
            }
        } else {
            for (i64 i = first; i < cols; i += stride)
                st(o, i, tiny ? (A)((double)ld(s, i) * fd) : (A)ld(s, i) * c);
        }
    }
}
