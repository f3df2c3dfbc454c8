// fastclip fused SPAM and Stable-SPAM steps (CUDA C++, compiled lazily by
// cupy.RawModule per device): the GPU twins of seg_spam, seg_stable_spam and
// seg_clipped_sq in fastclip/_cpu/_spam_kernels.py, for fastclip.torch.SPAMAdamW
// and StableSPAMAdamW on CUDA tensors (Stable-SPAM: see its section below).
//
// Compiled appended to kernels.cu and optim_kernels.cu (see _gpu/_modules.py):
// their i64/u64, AccOf, ld/st, Vec/aligned16 element access and the correctly
// rounded, never fused arithmetic (mul, add, dvd, sqrt_rn, fused) are used here.
//
// Multi-tensor layout (as optim_kernels.cu): one int64 device table per dtype,
//   [ptrs of param | grad | exp_avg | exp_avg_sq | sizes | chunk_tensor | chunk_start]
// and one float64 row per tensor in `hparams`, in the columns of
// fastclip._spam_hparams.P_* (the FC_P_* defines below).  One pass: each
// element of the parameter, the gradient and both moments is read once and
// each written element stored once.
//
// Per element, with v the previous second moment (SPAMAdamW's docstring):
//   reset: m = v = 0;
//   clip:  where g*g > theta*v, g = sign(g) * sqrt(theta*v) (the reference's masked
//          assignment: a NaN gradient is never clipped);
//   m = m*b1 + g*(1-b1); v = v*b2 + (1-b2)*g*g;
//   p = p + alpha * m / (sqrt(v) + eps); decay: p = p + p * (-lr*wd).
// The operations and their order are the CPU kernel's (explicit fma where torch
// fuses, correctly rounded everywhere else), so CPU and GPU agree to the last
// bit for identical rows.

// Columns of the SPAM rows (= fastclip._spam_hparams.P_*).
#define FC_P_BETA1 0
#define FC_P_W1 1
#define FC_P_BETA2 2
#define FC_P_W2 3
#define FC_P_EPS 4
#define FC_P_ALPHA 5
#define FC_P_DECAY 6
#define FC_P_THETA 7
#define FC_P_CLIP 8
#define FC_P_RESET 9
#define FC_P_COLS 10

template <typename A>
struct Spam {
    A b1, w1, b2, w2, eps, alpha, decay, theta;
    bool clips, reset, decays;

    // seg_spam of _spam_kernels.py, operation by operation.
    __device__ __forceinline__ void apply(A& p, A g, A& m, A& v) const {
        const A zero = (A)0;
        A mi = reset ? zero : m;
        A vi = reset ? zero : v;
        A gi = g;
        if (clips) {
            A bound = mul(vi, theta);
            A root = sqrt_rn(bound);
            A clipped = gi > zero ? root : -root;
            if (mul(gi, gi) > bound) gi = clipped;
        }
        mi = fused(gi, w1, mul(mi, b1));
        vi = fused(mul(w2, gi), gi, mul(vi, b2));
        A den = add(sqrt_rn(vi), eps);
        A pi = add(p, dvd(mul(alpha, mi), den));  // addcdiv: not fused
        if (decays) pi = fused(pi, decay, pi);
        p = pi;
        m = mi;
        v = vi;
    }
};

template <typename T>
__global__ void fastclip_spam(const u64* ptrs, i64 n_tensors, const i64* sizes,
                              const i64* chunk_tensor, const i64* chunk_start, i64 n_chunks,
                              i64 chunk_size, const double* hparams) {
    typedef typename AccOf<T>::type A;
    const int V = Vec<T>::V;
    for (i64 k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        i64 t = chunk_tensor[k];
        i64 start = chunk_start[k];
        i64 n = min(start + chunk_size, sizes[t]) - start;
        const double* row = hparams + t * FC_P_COLS;
        Spam<A> f;
        f.b1 = (A)row[FC_P_BETA1];
        f.w1 = (A)row[FC_P_W1];
        f.b2 = (A)row[FC_P_BETA2];
        f.w2 = (A)row[FC_P_W2];
        f.eps = (A)row[FC_P_EPS];
        f.alpha = (A)row[FC_P_ALPHA];
        f.decay = (A)row[FC_P_DECAY];
        f.theta = (A)row[FC_P_THETA];
        f.clips = row[FC_P_CLIP] != 0.0;
        f.reset = row[FC_P_RESET] != 0.0;
        f.decays = row[FC_P_DECAY] != 0.0;
        T* p = reinterpret_cast<T*>(ptrs[t]) + start;
        const T* g = reinterpret_cast<const T*>(ptrs[n_tensors + t]) + start;
        T* m = reinterpret_cast<T*>(ptrs[2 * n_tensors + t]) + start;
        T* v = reinterpret_cast<T*>(ptrs[3 * n_tensors + t]) + start;
        i64 done = 0;
        if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
            i64 nv = n / V;
            for (i64 i = threadIdx.x; i < nv; i += blockDim.x) {
                Vec<T> vp, vg, vm, vv;
                vp.load(p + i * V);
                vg.load(g + i * V);
                vm.load(m + i * V);
                vv.load(v + i * V);
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    A pj = ld(vp.u.v, j), mj = ld(vm.u.v, j), vj = ld(vv.u.v, j);
                    f.apply(pj, ld(vg.u.v, j), mj, vj);
                    st(vp.u.v, j, pj);
                    st(vm.u.v, j, mj);
                    st(vv.u.v, j, vj);
                }
                vp.store(p + i * V);
                vm.store(m + i * V);
                vv.store(v + i * V);
            }
            done = nv * V;
        }
        for (i64 i = done + threadIdx.x; i < n; i += blockDim.x) {
            A pj = ld(p, i), mj = ld(m, i), vj = ld(v, i);
            f.apply(pj, ld(g, i), mj, vj);
            st(p, i, pj);
            st(m, i, mj);
            st(v, i, vj);
        }
    }
}

// ------------------------------------------------------------ Stable-SPAM
//
// The GPU twin of seg_stable_spam / seg_clipped_sq in _spam_kernels.py, for
// fastclip.torch.StableSPAMAdamW on CUDA tensors.  The per-tensor scalars
// (AdaClip's hat and shrink, AdaGN's factor) are computed on the host in
// float64 from two per-tensor reductions, exactly as the CPU route does
// (fastclip/torch/_spam_fused.py): max |g| (kernels.cu's
// fastclip_partial_pow_sum with ord_code 0, then fastclip_tensor_norms) and the
// sum of squares after AdaClip (fastclip_clipped_sq below, then
// fastclip_tensor_norms with ord_code 1); then one fastclip_stable_spam pass.
//
// Table: [ptrs of param | grad | exp_avg | exp_avg_sq | max_exp_avg_sq | sizes |
// chunk_tensor | chunk_start]; without amsgrad the max_exp_avg_sq pointers are
// the params' (placeholders, never read or written).  Rows: fastclip._spam_hparams.Q_*
// (the FC_Q_* defines below).  Per element (StableSPAMAdamW's docstring):
//   decay: p = p * (1 - lr*wd);  AdaClip: g = g * shrink where |g| > hat;
//   AdaGN: g = g * factor;  m = m*b1 + g*(1-b1);  v = v*b2 + (1-b2)*g*g;
//   amsgrad: vmax = max(vmax, v) (NaN in v propagates);
//   p = p + neg_step * m / (sqrt(v or vmax) / sqrt(1-b2^k) + eps);
//   reset: m = v = 0 after the update.

// Columns of the Stable-SPAM rows (= fastclip._spam_hparams.Q_*).
#define FC_Q_HAT 0
#define FC_Q_SHRINK 1
#define FC_Q_FACTOR 2
#define FC_Q_DECAY 3
#define FC_Q_USE_DECAY 4
#define FC_Q_B1 5
#define FC_Q_W1 6
#define FC_Q_BETA2 7
#define FC_Q_W2 8
#define FC_Q_BC2_SQRT 9
#define FC_Q_EPS 10
#define FC_Q_NEG_STEP 11
#define FC_Q_RESET 12
#define FC_Q_COLS 13

// AdaClip's result for one element (abs(NaN) > hat is false: NaN passes unscaled,
// as the reference's masked assignment).
template <typename A>
__device__ __forceinline__ A ada_clip(A g, A hat, A shrink) {
    return fabs(g) > hat ? mul(g, shrink) : g;
}

template <typename A>
struct StableSpam {
    A hat, shrink, factor, decay, b1, w1, b2, w2, bc2, eps, neg_step;
    bool decays, reset, amsgrad;

    // seg_stable_spam of _spam_kernels.py, operation by operation.
    __device__ __forceinline__ void apply(A& p, A g, A& m, A& v, A& x) const {
        const A zero = (A)0;
        A pi = decays ? mul(p, decay) : p;
        A gi = mul(ada_clip(g, hat, shrink), factor);
        A mi = fused(gi, w1, mul(m, b1));
        A vi = fused(mul(w2, gi), gi, mul(v, b2));
        A vd = vi;
        if (amsgrad) {
            A vm = x;
            if (!(vm >= vi)) vm = vi;  // torch.maximum: NaN in vi propagates
            x = vm;
            vd = vm;
        }
        A den = add(dvd(sqrt_rn(vd), bc2), eps);
        p = add(pi, dvd(mul(neg_step, mi), den));  // addcdiv: not fused
        m = reset ? zero : mi;
        v = reset ? zero : vi;
    }
};

template <typename T>
__global__ void fastclip_stable_spam(const u64* ptrs, i64 n_tensors, const i64* sizes,
                                     const i64* chunk_tensor, const i64* chunk_start,
                                     i64 n_chunks, i64 chunk_size, const double* hparams,
                                     int amsgrad) {
    typedef typename AccOf<T>::type A;
    const int V = Vec<T>::V;
    for (i64 k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        i64 t = chunk_tensor[k];
        i64 start = chunk_start[k];
        i64 n = min(start + chunk_size, sizes[t]) - start;
        const double* row = hparams + t * FC_Q_COLS;
        StableSpam<A> f;
        f.hat = (A)row[FC_Q_HAT];
        f.shrink = (A)row[FC_Q_SHRINK];
        f.factor = (A)row[FC_Q_FACTOR];
        f.decay = (A)row[FC_Q_DECAY];
        f.b1 = (A)row[FC_Q_B1];
        f.w1 = (A)row[FC_Q_W1];
        f.b2 = (A)row[FC_Q_BETA2];
        f.w2 = (A)row[FC_Q_W2];
        f.bc2 = (A)row[FC_Q_BC2_SQRT];
        f.eps = (A)row[FC_Q_EPS];
        f.neg_step = (A)row[FC_Q_NEG_STEP];
        f.decays = row[FC_Q_USE_DECAY] != 0.0;
        f.reset = row[FC_Q_RESET] != 0.0;
        f.amsgrad = amsgrad != 0;
        T* p = reinterpret_cast<T*>(ptrs[t]) + start;
        const T* g = reinterpret_cast<const T*>(ptrs[n_tensors + t]) + start;
        T* m = reinterpret_cast<T*>(ptrs[2 * n_tensors + t]) + start;
        T* v = reinterpret_cast<T*>(ptrs[3 * n_tensors + t]) + start;
        T* x = reinterpret_cast<T*>(ptrs[4 * n_tensors + t]) + start;  // amsgrad only
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

// partials[c] = the float64 sum of squares of chunk c after AdaClip (seg_clipped_sq):
// the clipped value in the storage's arithmetic type, its square and the sum in
// float64 (each rounded, as the CPU kernel; only the order of the sum differs).  clip_rows: [hat, shrink] per tensor.  fastclip_tensor_norms (ord_code 1)
// then sums each tensor's chunks.
template <typename T>
__global__ void fastclip_clipped_sq(const u64* ptrs, const i64* sizes, const i64* chunk_tensor,
                                    const i64* chunk_start, i64 n_chunks, i64 chunk_size,
                                    const double* clip_rows, double* partials) {
    typedef typename AccOf<T>::type A;
    const int V = Vec<T>::V;
    for (i64 k = blockIdx.x; k < n_chunks; k += gridDim.x) {
        i64 t = chunk_tensor[k];
        i64 start = chunk_start[k];
        i64 n = min(start + chunk_size, sizes[t]) - start;
        const A hat = (A)clip_rows[2 * t], shrink = (A)clip_rows[2 * t + 1];
        const T* g = reinterpret_cast<const T*>(ptrs[t]) + start;
        double acc = 0.0;
        i64 done = 0;
        if (aligned16(g)) {
            i64 nv = n / V;
            for (i64 i = threadIdx.x; i < nv; i += blockDim.x) {
                Vec<T> vg;
                vg.load(g + i * V);
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    double c = (double)ada_clip((A)ld(vg.u.v, j), hat, shrink);
                    acc = add(acc, mul(c, c));
                }
            }
            done = nv * V;
        }
        for (i64 i = done + threadIdx.x; i < n; i += blockDim.x) {
            double c = (double)ada_clip((A)ld(g, i), hat, shrink);
            acc = add(acc, mul(c, c));
        }
        double s = block_reduce(acc, 1);
        if (threadIdx.x == 0) partials[k] = s;
    }
}
