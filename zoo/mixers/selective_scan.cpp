// The zoo's CPU selective scan (Mamba-1), forward and backward.
//
// Sequential in time, vectorised over channels: each task owns one batch row and a block of
// DB channels, keeps the (N x DB) state in registers/L1 and walks the sequence once. Forward
// saves the state at the start of every chunk; backward recomputes a chunk's states from it
// and runs the adjoint recurrence backwards through the chunk. Memory is O(L D) for inputs and
// O(L/chunk D N) for the saved states: the (B, L, D, N) tensor never exists.
//
// Layouts (contiguous): u, delta_raw, z, out: (B, L, D); A: (D, N); Bm, Cm: (B, L, N);
// Dv, bias: (D); states: (B, n_chunks, N, D).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t DB = 64;  // channels per task

// Built with -ffast-math, which lets the compiler assume no inf or NaN ever appears (and turns
// on glibc's vectorised exp, which the scan depends on). So no function below may form an infinity from
// finite input: exp only ever sees arguments <= 20 (softplus) or <= 0 (sigmoid, the scan's
// exp(delta A) with delta >= 0, A < 0). The textbook 1 / (1 + exp(-x)) overflowed for x < -88
// in fp32 and gave NaN under that assumption; exp(-|x|) underflows to 0 instead.
template <typename T> inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }
template <typename T> inline T sigmoid(T x) {
  const T e = std::exp(-std::abs(x));  // in (0, 1]
  const T s = T(1) / (T(1) + e);       // sigmoid(|x|)
  return x >= T(0) ? s : e * s;        // sigmoid(-|x|) = e / (1 + e)
}

template <typename T>
void load_A(const T* A, int64_t d0, int64_t nd, int64_t N, T* At) {  // At[n][d] = A[d0 + d][n]
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < DB; ++d) At[n * DB + d] = d < nd ? A[(d0 + d) * N + n] : T(0);
}

template <typename T>
void fwd_kernel(const T* u, const T* draw, const T* A, const T* Bm, const T* Cm, const T* Dv,
                const T* z, const T* bias, T* out, T* states, int64_t Bsz, int64_t L, int64_t D,
                int64_t N, int64_t chunk) {
  const int64_t nblk = (D + DB - 1) / DB, nc = (L + chunk - 1) / chunk;
  at::parallel_for(0, Bsz * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> h(N * DB), At(N * DB), delta(DB), du(DB), y(DB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, d0 = (task % nblk) * DB, nd = std::min(DB, D - d0);
      load_A(A, d0, nd, N, At.data());
      std::fill(h.begin(), h.end(), T(0));
      for (int64_t t = 0; t < L; ++t) {
        if (t % chunk == 0) {
          T* s = states + ((b * nc + t / chunk) * N) * D + d0;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t d = 0; d < nd; ++d) s[n * D + d] = h[n * DB + d];
        }
        const int64_t row = (b * L + t) * D + d0;
        for (int64_t d = 0; d < nd; ++d) {
          delta[d] = softplus(draw[row + d] + bias[d0 + d]);
          du[d] = delta[d] * u[row + d];
          y[d] = Dv[d0 + d] * u[row + d];
        }
        for (int64_t d = nd; d < DB; ++d) delta[d] = du[d] = y[d] = T(0);
        const T* Bt = Bm + (b * L + t) * N;
        const T* Ct = Cm + (b * L + t) * N;
        for (int64_t n = 0; n < N; ++n) {
          T* hn = h.data() + n * DB;
          const T* An = At.data() + n * DB;
          const T bn = Bt[n], cn = Ct[n];
#pragma omp simd
          for (int64_t d = 0; d < DB; ++d) {
            hn[d] = std::exp(delta[d] * An[d]) * hn[d] + du[d] * bn;
            y[d] += hn[d] * cn;
          }
        }
        for (int64_t d = 0; d < nd; ++d) {
          const T zt = z[row + d];
          out[row + d] = y[d] * zt * sigmoid(zt);
        }
      }
    }
  });
}

template <typename T>
void bwd_kernel(const T* u, const T* draw, const T* A, const T* Bm, const T* Cm, const T* Dv,
                const T* z, const T* bias, const T* states, const T* dout, T* du_out,
                T* ddraw_out, T* dz_out, T* dA_part, T* dB_part, T* dC_part, T* dD_part,
                T* dbias_part, int64_t Bsz, int64_t L, int64_t D, int64_t N, int64_t chunk) {
  const int64_t nblk = (D + DB - 1) / DB, nc = (L + chunk - 1) / chunk;
  at::parallel_for(0, Bsz * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> At(N * DB), hs((chunk + 1) * N * DB), as(chunk * N * DB), deltas(chunk * DB),
        ys(chunk * DB), us(chunk * DB), dh(N * DB), dA(N * DB), g(DB), ddelta(DB), du(DB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, blk = task % nblk, d0 = blk * DB, nd = std::min(DB, D - d0);
      load_A(A, d0, nd, N, At.data());
      std::fill(dh.begin(), dh.end(), T(0));
      std::fill(dA.begin(), dA.end(), T(0));
      for (int64_t c = nc - 1; c >= 0; --c) {
        const int64_t t0 = c * chunk, t1 = std::min(L, t0 + chunk);
        // Recompute the chunk: hs[j] is the state before step t0 + j.
        const T* s = states + ((b * nc + c) * N) * D + d0;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t d = 0; d < DB; ++d) hs[n * DB + d] = d < nd ? s[n * D + d] : T(0);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t j = t - t0, row = (b * L + t) * D + d0;
          T* dl = deltas.data() + j * DB;
          T* yj = ys.data() + j * DB;
          T* uj = us.data() + j * DB;
          for (int64_t d = 0; d < DB; ++d) {
            uj[d] = d < nd ? u[row + d] : T(0);
            dl[d] = d < nd ? softplus(draw[row + d] + bias[d0 + d]) : T(0);
            yj[d] = d < nd ? Dv[d0 + d] * uj[d] : T(0);
          }
          const T* Bt = Bm + (b * L + t) * N;
          const T* Ct = Cm + (b * L + t) * N;
          for (int64_t n = 0; n < N; ++n) {
            const T* hp = hs.data() + (j * N + n) * DB;
            T* hn = hs.data() + ((j + 1) * N + n) * DB;
            T* an = as.data() + (j * N + n) * DB;
            const T* An = At.data() + n * DB;
            const T bn = Bt[n], cn = Ct[n];
#pragma omp simd
            for (int64_t d = 0; d < DB; ++d) {
              an[d] = std::exp(dl[d] * An[d]);
              hn[d] = an[d] * hp[d] + dl[d] * uj[d] * bn;
              yj[d] += hn[d] * cn;
            }
          }
        }
        // The adjoint, backwards through the chunk.
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t j = t - t0, row = (b * L + t) * D + d0;
          const T* dl = deltas.data() + j * DB;
          const T* uj = us.data() + j * DB;
          for (int64_t d = 0; d < nd; ++d) {
            const T zt = z[row + d], sg = sigmoid(zt), go = dout[row + d];
            g[d] = go * zt * sg;
            dz_out[row + d] = go * ys[j * DB + d] * sg * (T(1) + zt * (T(1) - sg));
            dD_part[b * D + d0 + d] += g[d] * u[row + d];
            du[d] = g[d] * Dv[d0 + d];
            ddelta[d] = T(0);
          }
          for (int64_t d = nd; d < DB; ++d) g[d] = du[d] = ddelta[d] = T(0);
          const T* Bt = Bm + (b * L + t) * N;
          const T* Ct = Cm + (b * L + t) * N;
          T* dBt = dB_part + ((blk * Bsz + b) * L + t) * N;
          T* dCt = dC_part + ((blk * Bsz + b) * L + t) * N;
          for (int64_t n = 0; n < N; ++n) {
            const T* hp = hs.data() + (j * N + n) * DB;
            const T* hn = hs.data() + ((j + 1) * N + n) * DB;
            const T* an = as.data() + (j * N + n) * DB;
            const T* An = At.data() + n * DB;
            T* dhn = dh.data() + n * DB;
            T* dAn = dA.data() + n * DB;
            const T bn = Bt[n], cn = Ct[n];
            T dCn = 0, dBn = 0;
#pragma omp simd reduction(+ : dCn, dBn)
            for (int64_t d = 0; d < DB; ++d) {
              const T ud = uj[d];
              dhn[d] += g[d] * cn;  // now the whole adjoint of h_t
              dCn += g[d] * hn[d];
              const T w = dhn[d] * an[d] * hp[d];
              ddelta[d] += w * An[d] + dhn[d] * bn * ud;
              dAn[d] += w * dl[d];
              dBn += dhn[d] * dl[d] * ud;
              du[d] += dhn[d] * dl[d] * bn;
              dhn[d] *= an[d];  // carried to h_{t-1}
            }
            dBt[n] = dBn;
            dCt[n] = dCn;
          }
          for (int64_t d = 0; d < nd; ++d) {
            const T dr = ddelta[d] * sigmoid(draw[row + d] + bias[d0 + d]);
            ddraw_out[row + d] = dr;
            dbias_part[b * D + d0 + d] += dr;
            du_out[row + d] = du[d];
          }
        }
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t d = 0; d < nd; ++d) dA_part[(b * D + d0 + d) * N + n] = dA[n * DB + d];
    }
  });
}

std::vector<at::Tensor> forward(at::Tensor u, at::Tensor draw, at::Tensor A, at::Tensor Bm,
                                at::Tensor Cm, at::Tensor Dv, at::Tensor z, at::Tensor bias,
                                int64_t chunk) {
  const int64_t Bsz = u.size(0), L = u.size(1), D = u.size(2), N = A.size(1);
  const int64_t nc = (L + chunk - 1) / chunk;
  auto out = at::empty_like(u);
  auto states = at::empty({Bsz, nc, N, D}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "zoo_scan_fwd", [&] {
    fwd_kernel<scalar_t>(u.data_ptr<scalar_t>(), draw.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                         Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(), Dv.data_ptr<scalar_t>(),
                         z.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                         states.data_ptr<scalar_t>(), Bsz, L, D, N, chunk);
  });
  return {out, states};
}

std::vector<at::Tensor> backward(at::Tensor u, at::Tensor draw, at::Tensor A, at::Tensor Bm,
                                 at::Tensor Cm, at::Tensor Dv, at::Tensor z, at::Tensor bias,
                                 at::Tensor states, at::Tensor dout, int64_t chunk) {
  const int64_t Bsz = u.size(0), L = u.size(1), D = u.size(2), N = A.size(1);
  const int64_t nblk = (D + DB - 1) / DB;
  auto du = at::empty_like(u), ddraw = at::empty_like(u), dz = at::empty_like(u);
  auto dA = at::zeros({Bsz, D, N}, u.options());
  auto dB = at::zeros({nblk, Bsz, L, N}, u.options());
  auto dC = at::zeros({nblk, Bsz, L, N}, u.options());
  auto dD = at::zeros({Bsz, D}, u.options());
  auto dbias = at::zeros({Bsz, D}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "zoo_scan_bwd", [&] {
    bwd_kernel<scalar_t>(u.data_ptr<scalar_t>(), draw.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                         Bm.data_ptr<scalar_t>(), Cm.data_ptr<scalar_t>(), Dv.data_ptr<scalar_t>(),
                         z.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                         states.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
                         du.data_ptr<scalar_t>(), ddraw.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(),
                         dA.data_ptr<scalar_t>(), dB.data_ptr<scalar_t>(), dC.data_ptr<scalar_t>(),
                         dD.data_ptr<scalar_t>(), dbias.data_ptr<scalar_t>(), Bsz, L, D, N, chunk);
  });
  return {du, ddraw, dz, dA.sum(0), dB.sum(0), dC.sum(0), dD.sum(0), dbias.sum(0)};
}

// -- causal depthwise conv1d + SiLU, in the (B, L, D) layout of the scan ----------------------
// out[b, t, d] = silu(bias[d] + sum_j w[d, j] x[b, t + j - (K - 1), d]) (zero before t = 0): what
// Mamba's Conv1d(groups=D, padding=K-1)[..., :L] computes, without transposing x to (B, D, L)
// and back. x may be a strided view (row strides sb, sl; channels contiguous), as the x half of
// in_proj's output is. Backward recomputes the pre-activation; tasks own channel blocks of every
// batch row, so the weight and bias gradients need no reduction across tasks.
template <typename T>
void conv_fwd_kernel(const T* x, int64_t sb, int64_t sl, const T* w, const T* bias, T* out,
                     int64_t Bsz, int64_t L, int64_t D, int64_t K) {
  const int64_t nblk = (D + DB - 1) / DB;
  at::parallel_for(0, Bsz * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> wt(K * DB), acc(DB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nblk, d0 = (task % nblk) * DB, nd = std::min(DB, D - d0);
      for (int64_t j = 0; j < K; ++j)
        for (int64_t d = 0; d < DB; ++d) wt[j * DB + d] = d < nd ? w[(d0 + d) * K + j] : T(0);
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t d = 0; d < nd; ++d) acc[d] = bias[d0 + d];
        for (int64_t j = std::max<int64_t>(0, K - 1 - t); j < K; ++j) {
          const T* xr = x + b * sb + (t + j - (K - 1)) * sl + d0;
          const T* wj = wt.data() + j * DB;
#pragma omp simd
          for (int64_t d = 0; d < nd; ++d) acc[d] += wj[d] * xr[d];
        }
        T* o = out + (b * L + t) * D + d0;
        for (int64_t d = 0; d < nd; ++d) o[d] = acc[d] * sigmoid(acc[d]);
      }
    }
  });
}

template <typename T>
void conv_bwd_kernel(const T* x, int64_t sb, int64_t sl, const T* w, const T* bias, const T* g,
                     T* gx, T* gw, T* gbias, int64_t Bsz, int64_t L, int64_t D, int64_t K) {
  const int64_t nblk = (D + DB - 1) / DB;
  at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> wt(K * DB), gwt(K * DB), gp(DB), gb(DB);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t d0 = blk * DB, nd = std::min(DB, D - d0);
      for (int64_t j = 0; j < K; ++j)
        for (int64_t d = 0; d < DB; ++d) wt[j * DB + d] = d < nd ? w[(d0 + d) * K + j] : T(0);
      std::fill(gwt.begin(), gwt.end(), T(0));
      std::fill(gb.begin(), gb.end(), T(0));
      for (int64_t b = 0; b < Bsz; ++b) {
        for (int64_t t = 0; t < L; ++t) {
          const int64_t j0 = std::max<int64_t>(0, K - 1 - t);
          for (int64_t d = 0; d < nd; ++d) gp[d] = bias[d0 + d];
          for (int64_t j = j0; j < K; ++j) {
            const T* xr = x + b * sb + (t + j - (K - 1)) * sl + d0;
            for (int64_t d = 0; d < nd; ++d) gp[d] += wt[j * DB + d] * xr[d];
          }
          const T* gr = g + (b * L + t) * D + d0;
          for (int64_t d = 0; d < nd; ++d) {  // d silu(p) / dp = s (1 + p (1 - s))
            const T p = gp[d], sg = sigmoid(p);
            gp[d] = gr[d] * sg * (T(1) + p * (T(1) - sg));
            gb[d] += gp[d];
          }
          for (int64_t j = j0; j < K; ++j) {
            const int64_t tt = t + j - (K - 1);
            const T* xr = x + b * sb + tt * sl + d0;
            T* gxr = gx + (b * L + tt) * D + d0;
            T* gwj = gwt.data() + j * DB;
            const T* wj = wt.data() + j * DB;
#pragma omp simd
            for (int64_t d = 0; d < nd; ++d) {
              gxr[d] += wj[d] * gp[d];
              gwj[d] += gp[d] * xr[d];
            }
          }
        }
      }
      for (int64_t d = 0; d < nd; ++d) {
        gbias[d0 + d] = gb[d];
        for (int64_t j = 0; j < K; ++j) gw[(d0 + d) * K + j] = gwt[j * DB + d];
      }
    }
  });
}

at::Tensor conv_forward(at::Tensor x, at::Tensor w, at::Tensor bias) {  // x (B, L, D), w (D, K)
  const int64_t Bsz = x.size(0), L = x.size(1), D = x.size(2), K = w.size(1);
  TORCH_CHECK(x.stride(2) == 1, "conv_forward: channels must be contiguous");
  auto out = at::empty({Bsz, L, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "zoo_conv_fwd", [&] {
    conv_fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), w.data_ptr<scalar_t>(),
                              bias.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), Bsz, L, D, K);
  });
  return out;
}

std::vector<at::Tensor> conv_backward(at::Tensor x, at::Tensor w, at::Tensor bias, at::Tensor g) {
  const int64_t Bsz = x.size(0), L = x.size(1), D = x.size(2), K = w.size(1);
  auto gx = at::zeros({Bsz, L, D}, x.options());
  auto gw = at::empty({D, K}, x.options());
  auto gbias = at::empty({D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "zoo_conv_bwd", [&] {
    conv_bwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), w.data_ptr<scalar_t>(),
                              bias.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                              gw.data_ptr<scalar_t>(), gbias.data_ptr<scalar_t>(), Bsz, L, D, K);
  });
  return {gx, gw, gbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan forward (CPU)");
  m.def("backward", &backward, "selective scan backward (CPU)");
  m.def("conv_forward", &conv_forward, "causal depthwise conv1d + SiLU forward (CPU)");
  m.def("conv_backward", &conv_backward, "causal depthwise conv1d + SiLU backward (CPU)");
}
