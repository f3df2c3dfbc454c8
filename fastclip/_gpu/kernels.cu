// fastclip GPU kernels (CUDA C++, compiled lazily by cupy.RawModule per device).
//
// Multi-tensor layout (apex multi_tensor_apply / ATen _foreach_norm in spirit):
// a device table of data pointers and sizes, plus a chunk table (tensor index,
// first element) so one launch covers any number of tensors of one dtype.
// Every index is 64-bit; loops are grid-stride; 16-byte vector loads are used
// when a chunk's address is 16-byte aligned.
//
// Reductions produce float64 "power sums": sum |x|^p (ord_code 1, 2, 3) or
// max |x| (ord_code 0 = inf, NaN-propagating).  16- and 32-bit data accumulate in
// float32 per thread (float64 for float64 data and for general p); a thread
// whose float32 sum is not finite recomputes its share in float64, so |x| ~ 1e20
// never overflows.  Block results are combined in float64.
// The "wide" variant (wide_kernels.cu: fastclip_partial_pow_sum_wide,
// fastclip_finish_wide) widens every element to double before adding it, for norms
// that must not depend on how the data is split among arrays (fastclip.distributed).

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;
typedef unsigned long long u64;

// ------------------------------------------------------------ element access

template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ double ld(const double* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, i64 i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, i64 i) { return __bfloat162float(p[i]); }

__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(double* p, i64 i, double v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, i64 i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, i64 i, float v) { p[i] = __float2bfloat16_rn(v); }

// 16 bytes = V elements, loaded with one vector instruction.
template <typename T>
struct Vec {
    static const int V = 16 / sizeof(T);
    union { uint4 raw; T v[16 / sizeof(T)]; } u;
    __device__ __forceinline__ void load(const T* p) { u.raw = *reinterpret_cast<const uint4*>(p); }
    __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = u.raw; }
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<u64>(p) & 15ULL) == 0;
}

// ------------------------------------------------------------- reductions

// |a| for the max (ord_code 0) and L1, |a|**2 for L2, |a|**p otherwise.  The max
// must not fall through to pow: the drivers pass p = inf with ord_code 0, and
// pow(|a|, inf) is inf for every |a| > 1 (the host-compiled kernels gave the max
// norm of [0.5, -2, 1.5] as inf, tests/gpu/emulated/test_gpu_coef_host_compiled.py).
template <typename A>
__device__ __forceinline__ A pow_term(A a, int ord_code, double p) {
    a = fabs(a);
    if (ord_code == 2) return a * a;
    if (ord_code == 1 || ord_code == 0) return a;
    return (A)pow((double)a, p);
}

// max that lets NaN win (fmax would drop it)
__device__ __forceinline__ double max_nan(double a, double b) {
    if (a != a) return a;
    if (b != b) return b;
    return a > b ? a : b;
}

__device__ __forceinline__ double combine(double a, double b, int ord_code) {
    return ord_code == 0 ? max_nan(a, b) : a + b;
}

__device__ __forceinline__ double warp_reduce(double v, int ord_code) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v = combine(v, __shfl_down_sync(0xffffffffu, v, offset), ord_code);
    return v;
}

// Block-wide reduction; the result is valid in thread 0.  Identity 0 works for
// both the sum and the max of absolute values.
__device__ double block_reduce(double v, int ord_code) {
    __shared__ double shared[32];
    int lane = threadIdx.x & 31;
    int warp = threadIdx.x >> 5;
    v = warp_reduce(v, ord_code);
    __syncthreads();  // shared[] may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int nwarps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nwarps) ? shared[lane] : 0.0;
    if (warp == 0) v = warp_reduce(v, ord_code);
    return v;
}

// One thread's reduction over elements tid, tid + stride, ... of s[0:n]: the sum of
// term(x) in A (the max for ord_code 0, NaN winning), with 16-byte vector loads
// where s is aligned.  term gets each element as ld returns it (float for 16-bit
// data).  The one loop behind thread_pow_sum and wide_kernels.cu's
// thread_pow_sum_wide, which differ only in their term.
template <typename A, typename T, typename Term>
__device__ A thread_reduce(const T* s, i64 n, int ord_code, Term term) {
    const int V = Vec<T>::V;
    A acc = 0;
    i64 done = 0;
    if (aligned16(s)) {
        i64 nv = n / V;
        for (i64 i = threadIdx.x; i < nv; i += blockDim.x) {
            Vec<T> vec;
            vec.load(s + i * V);
#pragma unroll
            for (int j = 0; j < V; ++j) {
                A t = term(ld(vec.u.v, j));
                acc = (ord_code == 0) ? (A)max_nan((double)acc, (double)t) : acc + t;
            }
        }
        done = nv * V;
    }
    for (i64 i = done + threadIdx.x; i < n; i += blockDim.x) {
        A t = term(ld(s, i));
        acc = (ord_code == 0) ? (A)max_nan((double)acc, (double)t) : acc + t;
    }
    return acc;
}

// |x| to the power ord_code says, in the accumulator type A.
template <typename A>
struct PowTerm {
    int ord_code;
    double p;
    template <typename X>
    __device__ __forceinline__ A operator()(X x) const { return pow_term((A)x, ord_code, p); }
};

// One thread's power sum over elements tid, tid + stride, ... of s[0:n].
template <typename T, typename A>
__device__ A thread_pow_sum(const T* s, i64 n, int ord_code, double p) {
    return thread_reduce<A>(s, n, ord_code, PowTerm<A>{ord_code, p});
}

template <typename T>
__device__ double chunk_pow_sum(const T* s, i64 n, int ord_code, double p) {
    typedef typename AccOf<T>::type A;
    double d;
    if (ord_code == 3) {
        d = thread_pow_sum<T, double>(s, n, ord_code, p);
    } else {
        A acc = thread_pow_sum<T, A>(s, n, ord_code, p);
        d = (double)acc;
        // float32 overflow (or NaN/inf data), or a float32 sum of squares below 1e-30
        // that may have lost terms (squares of |x| < ~1e-19 are float32 subnormals,
        // below ~1e-23 they are 0; the CPU route's F32_TINY rule,
        // fastclip/_cpu/_elements.py): redo this thread's share in float64.  The
        // underflow redo was missing: compiled for the host, the global norm of 41
        // float32 values of 1e-23 came out 0 (tests/gpu/emulated/
        // test_gpu_coef_host_compiled.py); it costs one more read of an all-zero share.
        const bool tiny = ord_code == 2 && sizeof(A) == 4 && acc < (A)1e-30f;
        if ((ord_code != 0 && !isfinite(acc)) || tiny) d = thread_pow_sum<T, double>(s, n, ord_code, p);
    }
    return block_reduce(d, ord_code);
}

// partials[c] = power sum of chunk c of the tensor table.
template <typename T>
__global__ void fastclip_partial_pow_sum(const u64* ptrs, const i64* sizes,
                                         const i64* chunk_tensor, const i64* chunk_start,
                                         i64 n_chunks, i64 chunk_size, int ord_code, double p,
                                         double* partials) {
    for (i64 c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        i64 t = chunk_tensor[c];
        i64 start = chunk_start[c];
        i64 end = min(start + chunk_size, sizes[t]);
        const T* base = reinterpret_cast<const T*>(ptrs[t]);
        double v = chunk_pow_sum<T>(base + start, end - start, ord_code, p);
        if (threadIdx.x == 0) partials[c] = v;
    }
}

// The coefficient base of norm (mode 1: clip, 2: normalise; as the kernels
// below compute it) as two factors (c, c2), fastclip/_formulas.py's
// coefficient_parts with log2_split 1000, operation for operation: c2 is a power
// of two, 1 except where num / den (num = max_norm, 1 to normalise) lies beyond
// 2**+-1000.  One float64 factor there is subnormal, 0 or inf although the scaled
// data are representable (float64 data of norm 1e300 clipped to 1e-300 came out
// 0; data of subnormal norm normalised came out NaN and inf); (x * c) * c2 is
// exact up to one rounding, as |x| <= norm keeps x * c in range.
__device__ __forceinline__ void coefficient_parts(double norm, double max_norm, double eps,
                                                  int mode, double base, double* c,
                                                  double* c2) {
    const double big = 1.0715086071862673e301;  // 2**1000 exactly
    double den = norm + eps;
    double num = (mode == 2) ? 1.0 : max_norm;
    bool finite = (den == den) && den <= 1.7976931348623157e308;  // not NaN, below inf
    // num / den < 2**-1000: num * big cannot overflow (num < den / big)
    bool under = (num > 0.0) && finite && (den / big > num);
    // num / den > 2**1000: only a normalisation keeps it (a clip gives 1)
    bool over = (mode == 2) && (den > 0.0) && (den * big < num);
    if (under) {
        *c = (num * big) / den;
        *c2 = 1.0 / big;
    } else if (over) {
        *c = (num / big) / den;
        *c2 = 1.0 * big;
    } else {
        *c = base;
        *c2 = 1.0;
    }
}

// One block: total = combine(partials); writes the norm (or the given total
// norm) and the coefficient.  mode 0: none; 1 (clip) and 2 (normalise): one
// factor, coef_out[0] (the fused steps multiply it into their update); 3 (clip)
// and 4 (normalise): the two factors of coefficient_parts, coef_out[0] = c and
// coef_out[1] = c2, as fastclip_scale reads them.
template <typename N>
__global__ void fastclip_finish(const double* partials, i64 n, int ord_code, double p,
                                double max_norm, double eps, int mode,
                                const double* given_total, N* norm_out, double* coef_out) {
    double v = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) v = combine(v, partials[i], ord_code);
    v = block_reduce(v, ord_code);
    if (threadIdx.x == 0) {
        double norm;
        if (given_total != nullptr) norm = given_total[0];
        else if (ord_code == 0 || ord_code == 1) norm = v;
        else if (ord_code == 2) norm = sqrt(v);
        else norm = pow(v, 1.0 / p);
        if (norm_out != nullptr) norm_out[0] = (N)norm;
        if (coef_out != nullptr) {
            int m = (mode >= 3) ? mode - 2 : mode;
            double den = norm + eps;
            double r = (m == 2) ? 1.0 / den : max_norm / den;
            // clip: 1 when r >= 1, and for a zero norm with eps = 0 (0 / 0: nothing to clip)
            r = (m == 1 && (r >= 1.0 || den == 0.0)) ? 1.0 : r;
            if (mode >= 3) coefficient_parts(norm, max_norm, eps, m, r, coef_out, coef_out + 1);
            else coef_out[0] = r;
        }
    }
}

// norms_out[pos[t]] (norms_out[t] when pos is null) = the norm of tensor t of one
// table, from the partials fastclip_partial_pow_sum wrote for its chunks (chunk_tensor
// is sorted, so tensor t's chunks are one run, found by binary search): the
// per-tensor norms of global_norm(..., per_array=True) without a second read of
// the data.  Tensors without chunks (zero-size) get 0.
template <typename N>
__global__ void fastclip_tensor_norms(const double* partials, const i64* chunk_tensor,
                                      i64 n_chunks, i64 n_tensors, const i64* pos,
                                      int ord_code, double p, N* norms_out) {
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < n_tensors;
         t += (i64)gridDim.x * blockDim.x) {
        i64 lo = 0, hi = n_chunks;
        while (lo < hi) {
            i64 mid = lo + ((hi - lo) >> 1);
            if (chunk_tensor[mid] < t) lo = mid + 1; else hi = mid;
        }
        double v = 0.0;
        for (i64 c = lo; c < n_chunks && chunk_tensor[c] == t; ++c)
            v = combine(v, partials[c], ord_code);
        double norm;
        if (ord_code == 0 || ord_code == 1) norm = v;
        else if (ord_code == 2) norm = sqrt(v);
        else norm = pow(v, 1.0 / p);
        norms_out[pos == nullptr ? t : pos[t]] = (N)norm;
    }
}

// v * c with the coefficient kept in double and the product rounded once to the
// accumulator type: rounding c to float first flushes factors below ~1e-45 to 0
// and turns factors above ~3e38 into inf, though the products may be representable.
template <typename A>
__device__ __forceinline__ A scaled(A v, double c) { return (A)((double)v * c); }

// v rounded to the storage type T and widened back: the value a first pass of
// (x * c) * c2 leaves in memory (the CPU route scales by c2 in a second pass).
template <typename T, typename A>
__device__ __forceinline__ A stored(A v) {
    T t[1];
    st(t, 0, v);
    return (A)ld(t, 0);
}

// (x * c) * c2 as two passes over memory would give it: the c2 multiply only
// where c2 != 1 (one value per launch or per slice, so no divergence).
template <typename T, typename A>
__device__ __forceinline__ A scaled2(A v, double c, double c2) {
    A r = scaled<A>(v, c);
    return (c2 != 1.0) ? scaled<A>(stored<T, A>(r), c2) : r;
}

// dst_t = (src_t * coef[0]) * coef[1] for every tensor of the table (the two
// factors of fastclip_finish's modes 3 and 4, read on device; callers with one
// factor of their own pass coef[1] = 1).
template <typename T>
__global__ void fastclip_scale(const u64* src_ptrs, const u64* dst_ptrs, const i64* sizes,
                               const i64* chunk_tensor, const i64* chunk_start, i64 n_chunks,
                               i64 chunk_size, const double* coef) {
    typedef typename AccOf<T>::type A;
    const double c = coef[0];
    const double c2 = coef[1];
    const int V = Vec<T>::V;
    for (i64 k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        i64 t = chunk_tensor[k];
        i64 start = chunk_start[k];
        i64 n = min(start + chunk_size, sizes[t]) - start;
        const T* s = reinterpret_cast<const T*>(src_ptrs[t]) + start;
        T* d = reinterpret_cast<T*>(dst_ptrs[t]) + start;
        i64 done = 0;
        if (aligned16(s) && aligned16(d)) {
            i64 nv = n / V;
            for (i64 i = threadIdx.x; i < nv; i += blockDim.x) {
                Vec<T> in, out;
                in.load(s + i * V);
#pragma unroll
                for (int j = 0; j < V; ++j)
                    st(out.u.v, j, scaled2<T, A>(ld(in.u.v, j), c, c2));
                out.store(d + i * V);
            }
            done = nv * V;
        }
        for (i64 i = done + threadIdx.x; i < n; i += blockDim.x)
            st(d, i, scaled2<T, A>(ld(s, i), c, c2));
    }
}

// dst_t = clamp(src_t, lo, hi) for every tensor of the table; NaN stays NaN.
template <typename T>
__global__ void fastclip_clamp(const u64* src_ptrs, const u64* dst_ptrs, const i64* sizes,
                               const i64* chunk_tensor, const i64* chunk_start, i64 n_chunks,
                               i64 chunk_size, double lo, double hi) {
    typedef typename AccOf<T>::type A;
    const A a_lo = (A)lo, a_hi = (A)hi;
    for (i64 k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        i64 t = chunk_tensor[k];
        i64 start = chunk_start[k];
        i64 n = min(start + chunk_size, sizes[t]) - start;
        const T* s = reinterpret_cast<const T*>(src_ptrs[t]) + start;
        T* d = reinterpret_cast<T*>(dst_ptrs[t]) + start;
        for (i64 i = threadIdx.x; i < n; i += blockDim.x) {
            A v = (A)ld(s, i);
            if (v < a_lo) v = a_lo;
            if (v > a_hi) v = a_hi;
            st(d, i, v);
        }
    }
}

// ------------------------------------------------------------- along axes

// pow_sums[r] for each row of a contiguous [m, k] array (one block per row).
template <typename T>
__global__ void fastclip_rows_pow_sum(const T* x, i64 m, i64 k, int ord_code, double p,
                                      double* pow_sums) {
    for (i64 r = blockIdx.x; r < m; r += gridDim.x) {
        double v = chunk_pow_sum<T>(x + r * k, k, ord_code, p);
        if (threadIdx.x == 0) pow_sums[r] = v;
    }
}

// pow_sums[j] for each column of a contiguous [k, m] array (one thread per column:
// consecutive threads read consecutive addresses).  Accumulates in float64.
template <typename T>
__global__ void fastclip_cols_pow_sum(const T* x, i64 k, i64 m, int ord_code, double p,
                                      double* pow_sums) {
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < m; j += (i64)gridDim.x * blockDim.x) {
        double acc = 0.0;
        for (i64 r = 0; r < k; ++r) {
            double t = pow_term((double)ld(x, r * m + j), ord_code, p);
            acc = combine(acc, t, ord_code);
        }
        pow_sums[j] = acc;
    }
}

// norms and coefficients from power sums, elementwise (mode as in finish; modes
// 3 and 4 write the two factors, coefs[i] = c and coefs[n + i] = c2).
template <typename N>
__global__ void fastclip_axis_coefs(const double* pow_sums, i64 n, int ord_code, double p,
                                    double max_norm, double eps, int mode, N* norms_out,
                                    double* coefs) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        double v = pow_sums[i];
        double norm = (ord_code == 0 || ord_code == 1) ? v : (ord_code == 2 ? sqrt(v) : pow(v, 1.0 / p));
        norms_out[i] = (N)norm;
        if (coefs != nullptr) {
            int m = (mode >= 3) ? mode - 2 : mode;
            double den = norm + eps;
            double r = (m == 2) ? 1.0 / den : max_norm / den;
            // clip: the zero-norm rule of fastclip/_formulas.py (0 / 0 gives 1, not NaN)
            r = (m == 1 && (r >= 1.0 || den == 0.0)) ? 1.0 : r;
            if (mode >= 3) coefficient_parts(norm, max_norm, eps, m, r, coefs + i, coefs + n + i);
            else coefs[i] = r;
        }
    }
}

// dst[i] = (src[i] * coefs[j]) * coefs[outer + j], j = i / inner % outer: rows
// (inner = k, outer = m) or columns (inner = 1, outer = m) of a contiguous array
// of n elements, with the two factors fastclip_axis_coefs writes in modes 3 and 4.
template <typename T>
__global__ void fastclip_axis_scale(const T* src, T* dst, i64 n, i64 inner, i64 outer,
                                    const double* coefs) {
    typedef typename AccOf<T>::type A;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 j = (i / inner) % outer;
        st(dst, i, scaled2<T, A>(ld(src, i), coefs[j], coefs[outer + j]));
    }
}
