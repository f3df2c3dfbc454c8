// fastclip fused clip-and-step optimizer kernels (CUDA C++, compiled lazily by
// cupy.RawModule per device): the GPU twins of fastclip/_cpu/_optim_kernels.py.
//
// Multi-tensor layout (as kernels.cu): one int64 device table per dtype group,
//   [ptrs of list 0 | ... | ptrs of list L-1 | sizes | chunk_tensor | chunk_start]
// with L = 5 for AdamW (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq) and
// L = 3 for SGD (param, grad, momentum_buffer); ptrs[k * n_tensors + t] is
// tensor t of list k.  One launch covers any number of tensors of one dtype;
// blocks walk the (tensor, chunk) table grid-stride, threads walk a chunk with
// 16-byte vector loads/stores when every array's chunk is 16-byte aligned.
// Every index is 64-bit.
//
// Clip coefficient: c = coef_host * (coef_dev ? coef_dev[0] : 1).  coef_dev is
// the float64 device scalar written by kernels.cu's fastclip_finish
// (min(1, max_norm / (norm + eps))), so the host never waits for the norm;
// coef_host carries the sign (maximize: -1) or the whole coefficient when it
// is known on the host.  The gradient is multiplied by c inside the update and
// never written: in float32 for 16/32-bit data while c is a normal float32 (as
// torch), else in float64 rounded once (times_coef, as the CPU kernels).
//
// Non-finite policy "skip" without a host sync: guard_mode says what *guard
// points to and every thread checks it before any write, returning early so
// that params and state stay untouched:
//   0: no guard; 1: skip if the float32 norm *guard is NaN/inf;
//   2: skip if the float64 norm *guard is NaN/inf; 3: skip unless the float64
//   coefficient *guard is >= 0 (a given clip_coef: NaN or negative).
//
// Hyper-parameters are host scalars (bias corrections computed in float64 on
// the host, exactly as the CPU path does), passed as kernel arguments; when
// they differ between tensors (per-tensor step counts, several parameter
// groups) `hparams` points to a device matrix of rows in the CPU kernels' column
// order (_optim_kernels.A_* / S_*) and the scalar arguments are ignored.
//
// Arithmetic: float32 for float16/bfloat16/float32 storage, float64 for
// float64, one rounding on load (widen) and one on store (narrow), and the
// same operations in the same order as the CPU kernels, which follow torch's
// CPU code: explicit fma() where torch fuses (lerp, addcmul, add with alpha)
// and correctly rounded __*_rn intrinsics everywhere else, so the compiler
// cannot contract or reorder (independent of -fmad) and CPU and GPU agree to
// the last bit for identical coefficients.

// Compiled appended to kernels.cu (see _gpu/_optim.py): its includes, i64/u64,
// AccOf, ld/st and Vec/aligned16 element access are used here as they are.

// ------------------------------------------- correctly rounded, never fused

__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float dvd(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double dvd(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }
__device__ __forceinline__ float fused(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fused(double a, double b, double c) { return __fma_rn(a, b, c); }

// ------------------------------------------------------------ shared parts

// True when the "skip" guard (see the header) says this step must write nothing.
__device__ __forceinline__ bool guard_skips(int guard_mode, const void* guard) {
    if (guard_mode == 1) return !isfinite(*reinterpret_cast<const float*>(guard));
    if (guard_mode == 2) return !isfinite(*reinterpret_cast<const double*>(guard));
    if (guard_mode == 3) return !(*reinterpret_cast<const double*>(guard) >= 0.0);
    return false;
}

// The clip coefficient (see the header), signed, in float64.
__device__ __forceinline__ double clip_coef(const double* coef_dev, double coef_host) {
    return coef_dev != nullptr ? coef_host * coef_dev[0] : coef_host;
}

// Whether the float64 coefficient c, as cw in the arithmetic type, kept its value
// to within rounding (the CPU route's normal_in_type): equal (float64 data, 0,
// inf), NaN, or a normal float32 -- not flushed to 0, not a subnormal that lost
// digits, not overflowed to inf.
__device__ __forceinline__ bool coef_in_range(float cw, double c) {
    const double a = fabs((double)cw);
    return (double)cw == c || c != c || (a >= 1.1754943508222875e-38 && a <= 3.4028234663852886e38);
}
__device__ __forceinline__ bool coef_in_range(double, double) { return true; }

// The clipped gradient g * c: the product in the arithmetic type (torch's float32
// clip_grad_norm_ then step) while c is representable there, else in float64
// rounded once, as the CPU kernels do.  These kernels once always multiplied by c
// rounded to float32: 1e30 gradients clipped to 1e-30 (c = 1e-60) came out 0 where
// the CPU route gives 1e-30, a subnormal c lost digits, and c = 1e39 turned zero
// gradients into NaN (0 * inf); found by compiling this file for the host and
// comparing the CPU route bit for bit
// (tests/gpu/emulated/test_gpu_optim_host_compiled.py).
template <typename A>
__device__ __forceinline__ A times_coef(A g, A c, double c64, bool in_range) {
    return in_range ? mul(g, c) : (A)mul((double)g, c64);
}

// Columns of the AdamW hyper-parameter rows (= _optim_kernels.A_*).
#define FC_A_DECAY 0
#define FC_A_W1 1
#define FC_A_BETA2 2
#define FC_A_W2 3
#define FC_A_EPS 4
#define FC_A_NEG_STEP 5
#define FC_A_BC2_SQRT 6
#define FC_A_COLS 7

// Columns of the SGD hyper-parameter rows (= _optim_kernels.S_*).
#define FC_S_WD 0
#define FC_S_MOMENTUM 1
#define FC_S_DAMP1 2
#define FC_S_NEG_LR 3
#define FC_S_MODE 4
#define FC_S_NESTEROV 5
#define FC_S_COLS 6

// ------------------------------------------------------------------ AdamW

template <typename A>
struct AdamW {
    A c, decay, w1, w1m, b2, w2, eps, neg_step, bc2;
    double c64;
    bool in_range, small, amsgrad;

    // seg_adamw / seg_adamw_amsgrad of _optim_kernels.py, operation by operation.
    __device__ __forceinline__ void apply(A& p, A g, A& m, A& v, A& vmax) const {
        A gi = times_coef(g, c, c64, in_range);
        A mi = m;
        if (small) mi = fused(w1, sub(gi, mi), mi);
        else mi = fused(w1m, sub(gi, mi), gi);
        A vi = mul(v, b2);
        vi = fused(mul(w2, gi), gi, vi);
        A vd = vi;
        if (amsgrad) {
            A vm = vmax;
            if (!(vm >= vi)) vm = vi;  // torch.maximum: NaN in vi propagates
            vmax = vm;
            vd = vm;
        }
        A den = add(dvd(sqrt_rn(vd), bc2), eps);
        A pi = mul(p, decay);
        p = add(pi, dvd(mul(neg_step, mi), den));  // addcdiv: not fused
        m = mi;
        v = vi;
    }
};

template <typename T>
__global__ void fastclip_adamw(const u64* ptrs, i64 n_tensors, const i64* sizes,
                               const i64* chunk_tensor, const i64* chunk_start, i64 n_chunks,
                               i64 chunk_size, const double* coef_dev, double coef_host,
                               int guard_mode, const void* guard, const double* hparams,
                               double decay, double w1, double beta2, double w2, double eps,
                               double neg_step, double bc2_sqrt, int amsgrad) {
    typedef typename AccOf<T>::type A;
    if (guard_skips(guard_mode, guard)) return;  // "skip": nothing is written
    const double c64 = clip_coef(coef_dev, coef_host);
    const A c = (A)c64;
    const bool in_range = coef_in_range(c, c64);
    const int V = Vec<T>::V;
    for (i64 k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        i64 t = chunk_tensor[k];
        i64 start = chunk_start[k];
        i64 n = min(start + chunk_size, sizes[t]) - start;
        double h_w1 = w1;
        AdamW<A> f;
        if (hparams != nullptr) {
            const double* row = hparams + t * FC_A_COLS;
            h_w1 = row[FC_A_W1];
            f.decay = (A)row[FC_A_DECAY];
            f.b2 = (A)row[FC_A_BETA2];
            f.w2 = (A)row[FC_A_W2];
            f.eps = (A)row[FC_A_EPS];
            f.neg_step = (A)row[FC_A_NEG_STEP];
            f.bc2 = (A)row[FC_A_BC2_SQRT];
        } else {
            f.decay = (A)decay;
            f.b2 = (A)beta2;
            f.w2 = (A)w2;
            f.eps = (A)eps;
            f.neg_step = (A)neg_step;
            f.bc2 = (A)bc2_sqrt;
        }
        f.c = c;
        f.c64 = c64;
        f.in_range = in_range;
        f.w1 = (A)h_w1;
        f.w1m = sub(f.w1, (A)1);
        f.small = h_w1 < 0.5;
        f.amsgrad = amsgrad != 0;
        T* p = reinterpret_cast<T*>(ptrs[t]) + start;
        const T* g = reinterpret_cast<const T*>(ptrs[n_tensors + t]) + start;
        T* m = reinterpret_cast<T*>(ptrs[2 * n_tensors + t]) + start;
        T* v = reinterpret_cast<T*>(ptrs[3 * n_tensors + t]) + start;
        T* x = reinterpret_cast<T*>(ptrs[4 * n_tensors + t]) + start;  // params when unused
        i64 done = 0;
        if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v) &&
            (!f.amsgrad || aligned16(x))) {
            i64 nv = n / V;
            for (i64 i = threadIdx.x; i < nv; i += blockDim.x) {
                Vec<T> vp, vg, vm, vv, vx;
                vp.load(p + i * V);
                vg.load(g + i * V);
                vm.load(m + i * V);
                vv.load(v + i * V);
                if (f.amsgrad) vx.load(x + i * V);
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    A pj = ld(vp.u.v, j), mj = ld(vm.u.v, j), vj = ld(vv.u.v, j);
                    A xj = f.amsgrad ? (A)ld(vx.u.v, j) : (A)0;
                    f.apply(pj, ld(vg.u.v, j), mj, vj, xj);
                    st(vp.u.v, j, pj);
                    st(vm.u.v, j, mj);
                    st(vv.u.v, j, vj);
                    if (f.amsgrad) st(vx.u.v, j, xj);
                }
                vp.store(p + i * V);
                vm.store(m + i * V);
                vv.store(v + i * V);
                if (f.amsgrad) vx.store(x + i * V);
            }
            done = nv * V;
        }
        for (i64 i = done + threadIdx.x; i < n; i += blockDim.x) {
            A pj = ld(p, i), mj = ld(m, i), vj = ld(v, i);
            A xj = f.amsgrad ? (A)ld(x, i) : (A)0;
            f.apply(pj, ld(g, i), mj, vj, xj);
            st(p, i, pj);
            st(m, i, mj);
            st(v, i, vj);
            if (f.amsgrad) st(x, i, xj);
        }
    }
}

// -------------------------------------------------------------------- SGD

template <typename A>
struct Sgd {
    A c, wd, mom, damp1, neg_lr;
    double c64;
    int mode;  // 0 no momentum, 1 first step (buffer = grad), 2 momentum
    bool in_range, nesterov, use_wd;

    // seg_sgd of _optim_kernels.py, operation by operation.
    __device__ __forceinline__ void apply(A& p, A g, A& buf) const {
        A pi = p;
        if (mode == 0) {
            A gi = times_coef(g, c, c64, in_range);
            if (use_wd) gi = fused(pi, wd, gi);
            p = fused(gi, neg_lr, pi);
            return;
        }
        A gi = times_coef(g, c, c64, in_range);
        if (use_wd) gi = fused(pi, wd, gi);
        A bi;
        if (mode == 1) {
            bi = gi;
        } else {
            bi = mul(buf, mom);
            bi = fused(gi, damp1, bi);
        }
        buf = bi;
        gi = nesterov ? fused(bi, mom, gi) : bi;
        p = fused(gi, neg_lr, pi);
    }
};

template <typename T>
__global__ void fastclip_sgd(const u64* ptrs, i64 n_tensors, const i64* sizes,
                             const i64* chunk_tensor, const i64* chunk_start, i64 n_chunks,
                             i64 chunk_size, const double* coef_dev, double coef_host,
                             int guard_mode, const void* guard, const double* hparams, double wd,
                             double momentum, double damp1, double neg_lr, int mode,
                             int nesterov) {
    typedef typename AccOf<T>::type A;
    if (guard_skips(guard_mode, guard)) return;  // "skip": nothing is written
    const double c64 = clip_coef(coef_dev, coef_host);
    const A c = (A)c64;
    const bool in_range = coef_in_range(c, c64);
    const int V = Vec<T>::V;
    for (i64 k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        i64 t = chunk_tensor[k];
        i64 start = chunk_start[k];
        i64 n = min(start + chunk_size, sizes[t]) - start;
        Sgd<A> f;
        double h_wd = wd;
        if (hparams != nullptr) {
            const double* row = hparams + t * FC_S_COLS;
            h_wd = row[FC_S_WD];
            f.mom = (A)row[FC_S_MOMENTUM];
            f.damp1 = (A)row[FC_S_DAMP1];
            f.neg_lr = (A)row[FC_S_NEG_LR];
            f.mode = (int)row[FC_S_MODE];
            f.nesterov = row[FC_S_NESTEROV] != 0.0;
        } else {
            f.mom = (A)momentum;
            f.damp1 = (A)damp1;
            f.neg_lr = (A)neg_lr;
            f.mode = mode;
            f.nesterov = nesterov != 0;
        }
        f.c = c;
        f.c64 = c64;
        f.in_range = in_range;
        f.wd = (A)h_wd;
        f.use_wd = h_wd != 0.0;
        T* p = reinterpret_cast<T*>(ptrs[t]) + start;
        const T* g = reinterpret_cast<const T*>(ptrs[n_tensors + t]) + start;
        T* b = reinterpret_cast<T*>(ptrs[2 * n_tensors + t]) + start;  // params when unused
        const bool use_b = f.mode != 0;
        i64 done = 0;
        if (aligned16(p) && aligned16(g) && (!use_b || aligned16(b))) {
            i64 nv = n / V;
            for (i64 i = threadIdx.x; i < nv; i += blockDim.x) {
                Vec<T> vp, vg, vb;
                vp.load(p + i * V);
                vg.load(g + i * V);
                if (f.mode == 2) vb.load(b + i * V);  // mode 1 ignores the old buffer
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    A pj = ld(vp.u.v, j);
                    A bj = f.mode == 2 ? (A)ld(vb.u.v, j) : (A)0;
                    f.apply(pj, ld(vg.u.v, j), bj);
                    st(vp.u.v, j, pj);
                    if (use_b) st(vb.u.v, j, bj);
                }
                vp.store(p + i * V);
                if (use_b) vb.store(b + i * V);
            }
            done = nv * V;
        }
        for (i64 i = done + threadIdx.x; i < n; i += blockDim.x) {
            A pj = ld(p, i);
            A bj = f.mode == 2 ? (A)ld(b, i) : (A)0;
            f.apply(pj, ld(g, i), bj);
            st(p, i, pj);
            if (use_b) st(b, i, bj);
        }
    }
}
