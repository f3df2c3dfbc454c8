// fastclip GPU kernels that accumulate in float64 ("wide"), for fastclip.distributed.
//
// Compiled appended to kernels.cu (see _gpu/_modules.py), whose element access
// (ld, AccOf), combine and block_reduce they use.  Driver: _gpu/_wide.py.

// ------------------------------------------- float64 accumulation ("wide")
//
// For norms that must not depend on how the data is split among arrays
// (fastclip.distributed: one model split 2 or 4 ways).  chunk_pow_sum above
// sums float32 and 16-bit data in float32 per thread, and which elements share
// a thread depends on the arrays' sizes, so its rounding does too; here every
// element is widened to double before it is added, for every ord and dtype,
// so two splits differ by float64 rounding only.  Overflow-free as the CPU
// route's robust_norm (fastclip/_formulas.py), without a host synchronisation:
// where a float64 power sum can leave (safe_lo, safe_hi) (ord_code 3; L2 with
// float64 data: decided by the host) two gated passes follow, whose blocks
// return at once unless the device found the sum out of range:
//   mode 0   partials[c] = sum of widened |x|^p of chunk c (max |x| for ord_code 0)
//   stage 1  state = [total, -1 if total is outside (safe_lo, safe_hi) else 0]
//   mode 1   partials[c] = max |x| of chunk c, only where state[1] != 0
//   stage 2  state[1] = inv = 2^k with max * inv near 1 (pow2_inverse) where
//            0 < max < inf, else 0 (zero, NaN and inf keep the plain norm)
//   mode 2   partials[c] = sum (|x| * inv)^p of chunk c, only where inv > 0
//   stage 3  norm = root(sum of partials) / inv where inv > 0, else root(total)
// Without rescaling one stage-0 finish writes root(total).  inv is a power of
// two, so scaling by it is exact (as on the CPU route).

// |x| (already widened to double) times inv, to the power ord_code says.
__device__ __forceinline__ double wide_term(double a, int ord_code, double p, double inv) {
    a = fabs(a) * inv;
    if (ord_code == 2) return a * a;
    if (ord_code == 1 || ord_code == 0) return a;
    return pow(a, p);
}

// wide_term as thread_reduce's term: every element widened to double first.
struct WideTerm {
    int ord_code;
    double p, inv;
    template <typename X>
    __device__ __forceinline__ double operator()(X x) const {
        return wide_term((double)x, ord_code, p, inv);
    }
};

// One thread's float64 power sum (max for ord_code 0) over elements tid, tid +
// stride, ... of s[0:n], every element widened to double before it is added.
template <typename T>
__device__ double thread_pow_sum_wide(const T* s, i64 n, int ord_code, double p, double inv) {
    return thread_reduce<double>(s, n, ord_code, WideTerm{ord_code, p, inv});
}

// partials[c] = float64 power sum of chunk c of the tensor table (mode: see above;
// the gate reads device memory, so every thread of the grid takes the same branch).
template <typename T>
__global__ void fastclip_partial_pow_sum_wide(const u64* ptrs, const i64* sizes,
                                              const i64* chunk_tensor, const i64* chunk_start,
                                              i64 n_chunks, i64 chunk_size, int ord_code,
                                              double p, int mode, const double* state,
                                              double* partials) {
    double inv = 1.0;
    if (mode == 1) {
        if (state[1] == 0.0) return;
        ord_code = 0;
    } else if (mode == 2) {
        inv = state[1];
        if (!(inv > 0.0)) return;
    }
    for (i64 c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        i64 t = chunk_tensor[c];
        i64 start = chunk_start[c];
        i64 end = min(start + chunk_size, sizes[t]);
        const T* base = reinterpret_cast<const T*>(ptrs[t]);
        double v = thread_pow_sum_wide<T>(base + start, end - start, ord_code, p, inv);
        v = block_reduce(v, ord_code);
        if (threadIdx.x == 0) partials[c] = v;
    }
}

// One block, fastclip_finish's combine of the wide partials (stage: see above).
template <typename N>
__global__ void fastclip_finish_wide(const double* partials, i64 n, int ord_code, double p,
                                     int stage, double safe_lo, double safe_hi, double* state,
                                     N* norm_out) {
    if (stage == 2 && state[1] == 0.0) return;  // the total was in range: no max pass ran
    if (stage == 3 && !(state[1] > 0.0)) {      // not rescaled: the plain total's norm
        if (threadIdx.x == 0) {
            double v = state[0];
            norm_out[0] = (N)(ord_code == 2 ? sqrt(v) : pow(v, 1.0 / p));
        }
        return;
    }
    const int oc = (stage == 2) ? 0 : ord_code;
    double v = 0.0;
    for (i64 i = threadIdx.x; i < n; i += blockDim.x) v = combine(v, partials[i], oc);
    v = block_reduce(v, oc);
    if (threadIdx.x != 0) return;
    if (stage == 0) {
        double norm;
        if (ord_code == 0 || ord_code == 1) norm = v;
        else if (ord_code == 2) norm = sqrt(v);
        else norm = pow(v, 1.0 / p);
        norm_out[0] = (N)norm;
    } else if (stage == 1) {
        state[0] = v;
        state[1] = (safe_lo < v && v < safe_hi) ? 0.0 : -1.0;  // NaN: marked (its max is NaN)
    } else if (stage == 2) {
        int e = 0;
        frexp(v, &e);
        state[1] = (v > 0.0 && isfinite(v)) ? ldexp(1.0, max(-1022, min(1023, -e))) : 0.0;
    } else {
        norm_out[0] = (N)((ord_code == 2 ? sqrt(v) : pow(v, 1.0 / p)) / state[1]);
    }
}
