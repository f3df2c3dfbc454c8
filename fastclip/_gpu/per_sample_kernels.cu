// fastclip per-sample clipping kernels (DP-SGD), CUDA C++.
//
// This file is compiled *appended to kernels.cu* (see _per_sample.source()): it
// reuses its element access (ld/st, 16-byte Vec loads, AccOf), its power-sum
// reduction chunk_pow_sum (float32 per thread with a float64 redo on overflow,
// float64 for float64 data and general p) and block_reduce.
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

#define FASTCLIP_PS_ROW_BLOCK 64

// ------------------------------------------------------------------ pass 1

// partials[b * n_chunks + c] = power sum (or max |x|) of elements
// [c * chunk, min((c + 1) * chunk, cols)) of row b of a contiguous [rows, cols] array.
template <typename T>
__global__ void fastclip_ps_pow_partials(const T* x, i64 rows, i64 cols, i64 chunk,
                                         i64 n_chunks, int pcode, double p,
                                         double* partials) {
    const i64 n_items = rows * n_chunks;
    for (i64 w = blockIdx.x; w < n_items; w += gridDim.x) {
        const i64 b = w / n_chunks;
        const i64 start = (w - b * n_chunks) * chunk;
        const i64 n = min(chunk, cols - start);
        double v = chunk_pow_sum<T>(x + b * cols + start, n, pcode, p);
        if (threadIdx.x == 0) partials[w] = v;
    }
}

// ----------------------------------------------------------------- factors

__device__ __forceinline__ double ps_root(double v, int pcode, double p) {
    if (pcode == 0 || pcode == 1) return v;
    if (pcode == 2) return sqrt(v);
    return pow(v, 1.0 / p);
}

// min(1, bound / (norm + eps)); 1 for a zero norm; NaN stays NaN (NaN >= 1 is false).
__device__ __forceinline__ double ps_factor(double norm, double bound, double eps) {
    double r = bound / (norm + eps);
    double f = (r >= 1.0) ? 1.0 : r;
    return (norm == 0.0) ? 1.0 : f;
}

// Power sum of row b of one array from its chunk partials (in chunk order).
__device__ __forceinline__ double ps_row_sum(const double* partials, i64 offset, i64 n_chunks,
                                             i64 b, int pcode) {
    const double* q = partials + offset + b * n_chunks;
    double s = 0.0;
    for (i64 c = 0; c < n_chunks; ++c) s = combine(s, q[c], pcode);
    return s;
}

// One block.  table = [offset_k (K) | n_chunks_k (K) | bound_k as float64 bits (K)]:
// array k's partials are partials[offset_k + b * n_chunks_k + c].
// per_layer == 0: norms[b], factors[b] (bound_0 used); per_layer != 0:
// norms[k * rows + b], factors[k * rows + b].  n_clipped[0] = number of samples
// with a factor < 1 (per layer: with at least one), as a float64.
template <typename N>
__global__ void fastclip_ps_factors(const double* partials, const i64* table, i64 n_arrays,
                                    i64 rows, int pcode, double p, double eps, int per_layer,
                                    N* norms, double* factors, double* n_clipped) {
    const i64* offsets = table;
    const i64* chunks = table + n_arrays;
    const double* bounds = reinterpret_cast<const double*>(table + 2 * n_arrays);
    double count = 0.0;
    for (i64 b = threadIdx.x; b < rows; b += blockDim.x) {
        bool clipped = false;
        if (per_layer) {
            for (i64 k = 0; k < n_arrays; ++k) {
                double norm = ps_root(ps_row_sum(partials, offsets[k], chunks[k], b, pcode), pcode, p);
                double f = ps_factor(norm, bounds[k], eps);
                norms[k * rows + b] = (N)norm;
                factors[k * rows + b] = f;
                clipped = clipped || (f < 1.0);
            }
        } else {
            double s = 0.0;
            for (i64 k = 0; k < n_arrays; ++k)
                s = combine(s, ps_row_sum(partials, offsets[k], chunks[k], b, pcode), pcode);
            double norm = ps_root(s, pcode, p);
            double f = ps_factor(norm, bounds[0], eps);
            norms[b] = (N)norm;
            factors[b] = f;
            clipped = (f < 1.0);
        }
        count += clipped ? 1.0 : 0.0;
    }
    count = block_reduce(count, 1);
    if (threadIdx.x == 0) n_clipped[0] = count;
}

// ------------------------------------------------------------------ pass 2

// acc64[j] = sum_{b in [b0, b1)} f[b] * x[b, d + j] for j < W (W == 1: scalar
// loads; else one 16-byte vector of W elements per row).
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
            const A c = (A)f[b];
            const T* row = x + b * cols + d;
            if (W == 1) {
                acc[0] += (A)ld(row, 0) * c;
            } else {
                Vec<T> v;
                v.load(row);
#pragma unroll
                for (int j = 0; j < W; ++j) acc[j] += (A)ld(v.u.v, j) * c;
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
// (blockIdx.y: rows, grid-stride; 16-byte vectors when both rows are aligned).
template <typename T>
__global__ void fastclip_ps_scale_rows(const T* x, i64 rows, i64 cols, const double* f,
                                       T* out) {
    typedef typename AccOf<T>::type A;
    const int V = Vec<T>::V;
    const bool vec = aligned16(x) && aligned16(out) && (cols % V) == 0;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    for (i64 b = blockIdx.y; b < rows; b += gridDim.y) {
        const A c = (A)f[b];
        const T* s = x + b * cols;
        T* o = out + b * cols;
        if (vec) {
            for (i64 i = first; i < cols / V; i += stride) {
                Vec<T> in, res;
                in.load(s + i * V);
#pragma unroll
                for (int j = 0; j < V; ++j) st(res.u.v, j, (A)ld(in.u.v, j) * c);
                res.store(o + i * V);
            }
        } else {
            for (i64 i = first; i < cols; i += stride) st(o, i, (A)ld(s, i) * c);
        }
    }
}
