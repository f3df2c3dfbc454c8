// fastclip fused SPAM step (CUDA C++, compiled lazily by cupy.RawModule per
// device): the GPU twin of seg_spam in fastclip/_cpu/_spam_kernels.py, for
// fastclip.torch.SPAMAdamW on CUDA tensors.
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
