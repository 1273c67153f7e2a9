"""C++ source of gentool's CPU kernel for packed-weight linear layers (built by models/qkernel.py on first use).

One op, `gentool_qk::qmm(x, codes, scale, offset?, group, bits, lut?, zero, act) -> y`: y[m, n] = Σ_k x[m, k]·w[n, k]
with w[n, k] = v(c[n, k])·scale[n, k/group] + offset[n, k/group], where v(c) = c - zero, or lut[c] with a 16-entry
table (NF4). Codes are unsigned: bits = 4: nibbles, 16 bytes per 32 weights, byte j = code j | code j+16 << 4;
bits = 8: bytes. The offsets multiply the group sums of x, computed once per call.

Two arithmetics for one to four rows of x (decoding), both reading the packed codes once per call:
- act = 32 (exact): x stays float32; the codes are widened to float in registers and multiplied by x, and each
  group's sum is scaled once. The result is x·dequant(W)ᵀ up to float32 summation order.
- act = 8 (llama.cpp's integer arithmetic, AVX-512 VNNI only): x is rounded to 8 bits per run of 4 values (x ≈
  q·d, d = max|x|/127 over the run, round to nearest even), and 64 weights at a time are multiplied with integer
  dot products (vpdpbusd: unsigned codes times signed activations, the zero folded into the accumulator's start as
  -zero·Σq), each 32-bit lane (4 products) then scaled by its d times the group's scale in float32. The result is
  Q8(x)·dequant(W)ᵀ up to float32 rounding, so each output is within ½·Σ_runs d_r·Σ_{k in r} |w[n, k]| of the exact
  one. llama.cpp rounds x per block of 32 (Q8_0); a run of 4 costs nothing more here and is more accurate where
  one activation is far larger than its neighbours. Layers it does not take (a table, K not a multiple of 64) use
  act = 32.
For more than 4 rows (prefill) a tile of 32 weight rows is decoded into a thread's buffer and multiplied by at::mm
(float32 activations). SOURCE is followed by models/qkernel_int8_src.py's (the 8-bit activations and the row
functions the whole-step decoder of models/decode_src.py also uses), then by TAIL (the op).
"""

SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <vector>
#include <cstring>
#include <cmath>

namespace {
constexpr int MB = 4;  // rows of x handled in one pass over the codes

#if defined(__AVX512F__)
constexpr int W = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vset(float s) { return _mm512_set1_ps(s); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
// 32 nibble codes (16 bytes) -> values of weights 0..15 and 16..31
template <bool LUT> inline void load4(const uint8_t* p, const vf* lut, int zero, vf& lo, vf& hi) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  __m512i l = _mm512_and_si512(v, _mm512_set1_epi32(15)), h = _mm512_srli_epi32(v, 4);
  if (LUT) { lo = _mm512_permutexvar_ps(l, lut[0]); hi = _mm512_permutexvar_ps(h, lut[0]); }
  else {
    const __m512i z = _mm512_set1_epi32(zero);
    lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(l, z)); hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(h, z));
  }
}
inline vf load8(const uint8_t* p, int zero) {
  return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)),
                                             _mm512_set1_epi32(zero)));
}
inline void make_lut(const float* t, vf* lut) { lut[0] = _mm512_loadu_ps(t); }
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int W = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vset(float s) { return _mm256_set1_ps(s); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
template <bool LUT> inline vf lookup(__m256i c, const vf* lut, int zero) {
  if (!LUT) return _mm256_cvtepi32_ps(_mm256_sub_epi32(c, _mm256_set1_epi32(zero)));
  vf a = _mm256_permutevar8x32_ps(lut[0], c), b = _mm256_permutevar8x32_ps(lut[1], c);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));  // bit 3 selects the table half
}
// 16 nibble codes (8 bytes) -> values of 8 low-nibble and 8 high-nibble weights
template <bool LUT> inline void load4(const uint8_t* p, const vf* lut, int zero, vf& lo, vf& hi) {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  lo = lookup<LUT>(_mm256_and_si256(v, _mm256_set1_epi32(15)), lut, zero);
  hi = lookup<LUT>(_mm256_srli_epi32(v, 4), lut, zero);
}
inline vf load8(const uint8_t* p, int zero) {
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)),
                                             _mm256_set1_epi32(zero)));
}
inline void make_lut(const float* t, vf* lut) { lut[0] = _mm256_loadu_ps(t); lut[1] = _mm256_loadu_ps(t + 8); }
#else
#error "gentool's CPU kernel needs AVX2 and FMA"
#endif

// One linear layer's weight as the row functions read it. bits 32: `codes` is a dense float32 (N, K) weight.
struct QW {
  const uint8_t* codes = nullptr;
  const float *scale = nullptr, *offset = nullptr, *lut = nullptr, *bias = nullptr;
  int64_t N = 0, K = 0;
  int g = 0, bits = 32, zero = 0;
};

inline float dot_f32(const float* a, const float* b, int64_t K) {
  vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
  int64_t k = 0;
  for (; k + 4 * W <= K; k += 4 * W) {
    a0 = vfma(vload(a + k), vload(b + k), a0); a1 = vfma(vload(a + k + W), vload(b + k + W), a1);
    a2 = vfma(vload(a + k + 2 * W), vload(b + k + 2 * W), a2); a3 = vfma(vload(a + k + 3 * W), vload(b + k + 3 * W), a3);
  }
  for (; k + W <= K; k += W) a0 = vfma(vload(a + k), vload(b + k), a0);
  float s = vsum(vadd(vadd(a0, a1), vadd(a2, a3)));
  for (; k < K; ++k) s += a[k] * b[k];
  return s;
}

// float32 activations: y[m, n] for n in [n0, n1) and nm rows of x; gsum: (nm, G) group sums of x (offsets)
template <int BITS, bool LUT, int nm>
void gemv_rows(const float* x, const QW& w, const float* gsum, float* y, int64_t ystride, int64_t n0, int64_t n1) {
  vf lut[2];
  if (LUT) make_lut(w.lut, lut);
  const int64_t K = w.K, g = w.g, G = K / g, row_bytes = BITS == 4 ? K / 2 : K;
  const int zero = w.zero;
  const float* xr[nm];
  for (int m = 0; m < nm; ++m) xr[m] = x + m * K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = w.codes + n * row_bytes;
    const float* s = w.scale + n * G;
    vf acc[nm], acc2[nm];  // even and odd groups: two dependency chains
    for (int m = 0; m < nm; ++m) acc[m] = acc2[m] = vzero();
    for (int64_t gi = 0; gi < G; ++gi) {
      const int64_t k0 = gi * g;
      vf ga[nm], gb[nm];
      for (int m = 0; m < nm; ++m) ga[m] = gb[m] = vzero();
      if (BITS == 4) {
        for (int64_t k = k0; k < k0 + g; k += 32) {
#if defined(__AVX512F__)
          vf lo, hi;
          load4<LUT>(c + k / 2, lut, zero, lo, hi);
          for (int m = 0; m < nm; ++m) { ga[m] = vfma(lo, vload(xr[m] + k), ga[m]); gb[m] = vfma(hi, vload(xr[m] + k + 16), gb[m]); }
#else
          vf lo0, hi0, lo1, hi1;
          load4<LUT>(c + k / 2, lut, zero, lo0, hi0);
          load4<LUT>(c + k / 2 + 8, lut, zero, lo1, hi1);
          for (int m = 0; m < nm; ++m) {
            ga[m] = vfma(hi0, vload(xr[m] + k + 16), vfma(lo0, vload(xr[m] + k), ga[m]));
            gb[m] = vfma(hi1, vload(xr[m] + k + 24), vfma(lo1, vload(xr[m] + k + 8), gb[m]));
          }
#endif
        }
      } else {
        int64_t k = k0;
        for (; k + 2 * W <= k0 + g; k += 2 * W) {
          const vf w0 = load8(c + k, zero), w1 = load8(c + k + W, zero);
          for (int m = 0; m < nm; ++m) { ga[m] = vfma(w0, vload(xr[m] + k), ga[m]); gb[m] = vfma(w1, vload(xr[m] + k + W), gb[m]); }
        }
        for (; k < k0 + g; k += W) {
          const vf w0 = load8(c + k, zero);
          for (int m = 0; m < nm; ++m) ga[m] = vfma(w0, vload(xr[m] + k), ga[m]);
        }
      }
      const vf sv = vset(s[gi]);
      if (gi & 1) for (int m = 0; m < nm; ++m) acc2[m] = vfma(sv, vadd(ga[m], gb[m]), acc2[m]);
      else for (int m = 0; m < nm; ++m) acc[m] = vfma(sv, vadd(ga[m], gb[m]), acc[m]);
    }
    for (int m = 0; m < nm; ++m) {
      float r = vsum(vadd(acc[m], acc2[m]));
      if (w.offset) r += dot_f32(w.offset + n * G, gsum + m * G, G);  // Σ_g offset[n, g]·Σ_{k in g} x[m, k]
      if (w.bias) r += w.bias[n];
      y[m * ystride + n] = r;
    }
  }
}

// group sums of a float32 row: out[g] = Σ_{k in group g} x[k]
inline void group_sums(const float* x, int64_t K, int64_t g, float* out) {
  for (int64_t gi = 0; gi < K / g; ++gi) {
    float s = 0.f;
    for (int64_t k = gi * g; k < (gi + 1) * g; ++k) s += x[k];
    out[gi] = s;
  }
}

"""

TAIL = r"""
// weight rows [n0, n1) decoded into out (n1 - n0, K) float32
template <int BITS, bool LUT>
void decode_rows(const QW& w, int64_t n0, int64_t n1, float* out) {
  vf lut[2];
  if (LUT) make_lut(w.lut, lut);
  const int64_t K = w.K, g = w.g, G = K / g, row_bytes = BITS == 4 ? K / 2 : K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = w.codes + n * row_bytes;
    float* o = out + (n - n0) * K;
    for (int64_t gi = 0; gi < G; ++gi) {
      const vf sv = vset(w.scale[n * G + gi]), ov = vset(w.offset ? w.offset[n * G + gi] : 0.f);
      for (int64_t k = gi * g; k < (gi + 1) * g; k += 32) {
        if (BITS == 4) {
#if defined(__AVX512F__)
          vf lo, hi;
          load4<LUT>(c + k / 2, lut, w.zero, lo, hi);
          vstore(o + k, vfma(lo, sv, ov)); vstore(o + k + 16, vfma(hi, sv, ov));
#else
          vf lo0, hi0, lo1, hi1;
          load4<LUT>(c + k / 2, lut, w.zero, lo0, hi0);
          load4<LUT>(c + k / 2 + 8, lut, w.zero, lo1, hi1);
          vstore(o + k, vfma(lo0, sv, ov)); vstore(o + k + 8, vfma(lo1, sv, ov));
          vstore(o + k + 16, vfma(hi0, sv, ov)); vstore(o + k + 24, vfma(hi1, sv, ov));
#endif
        } else {
          for (int j = 0; j < 32 && k + j < (gi + 1) * g; j += W) vstore(o + k + j, vfma(load8(c + k + j, w.zero), sv, ov));
        }
      }
    }
  }
}

template <int BITS, bool LUT>
void run(const at::Tensor& x, const QW& w, bool int8, at::Tensor& y) {
  const int64_t M = x.size(0), K = w.K, N = w.N;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M <= MB && int8 && int8_ok(w)) {
    std::vector<Act> acts(M);
    for (int64_t m = 0; m < M; ++m) { acts[m].set(xp + m * K, K, true); acts[m].prepare(w); }
    for (int64_t m = 0; m < M; ++m) { Job j{&w, &acts[m], yp + m * N}; run_jobs(&j, 1); }
    return;
  }
  if (M <= MB) {
    std::vector<float> gs(w.offset ? M * (K / w.g) : 0);
    for (int64_t m = 0; m < M && w.offset; ++m) group_sums(xp + m * K, K, w.g, gs.data() + m * (K / w.g));
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      switch (M) {
        case 1: gemv_rows<BITS, LUT, 1>(xp, w, gs.data(), yp, N, n0, n1); break;
        case 2: gemv_rows<BITS, LUT, 2>(xp, w, gs.data(), yp, N, n0, n1); break;
        case 3: gemv_rows<BITS, LUT, 3>(xp, w, gs.data(), yp, N, n0, n1); break;
        default: gemv_rows<BITS, LUT, 4>(xp, w, gs.data(), yp, N, n0, n1);
      }
    });
    return;
  }
  constexpr int64_t T = 32;  // weight rows decoded at a time
  at::parallel_for(0, (N + T - 1) / T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(T * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * T, n1 = std::min(N, n0 + T);
      decode_rows<BITS, LUT>(w, n0, n1, buf.data());
      at::Tensor wt = at::from_blob(buf.data(), {n1 - n0, K}, x.options());
      y.narrow(1, n0, n1 - n0).copy_(at::mm(x, wt.t()));
    }
  });
}

// A layer's tensors as a QW (checked); `keep` holds converted tensors alive while the QW is used
QW make_qw(const at::Tensor& codes, const c10::optional<at::Tensor>& scale_, const c10::optional<at::Tensor>& offset_,
           const c10::optional<at::Tensor>& lut_, const c10::optional<at::Tensor>& bias_, int64_t group, int64_t bits,
           int64_t zero, int64_t K, std::vector<at::Tensor>& keep) {
  QW w;
  w.K = K; w.N = codes.size(0); w.bits = (int)bits; w.zero = (int)zero; w.g = (int)group;
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 2, "qmm: codes must be a contiguous 2-D tensor");
  if (bits == 32) {
    TORCH_CHECK(codes.scalar_type() == at::kFloat && codes.size(1) == K, "qmm: a dense weight must be float32 (N, K)");
    w.codes = (const uint8_t*)codes.data_ptr();
  } else {
    TORCH_CHECK(bits == 4 || bits == 8, "qmm: bits must be 4, 8 or 32");
    TORCH_CHECK(codes.scalar_type() == at::kByte && codes.size(1) == (bits == 4 ? K / 2 : K), "qmm: codes shape");
    TORCH_CHECK(group > 0 && group % (bits == 4 ? 32 : 16) == 0 && K % group == 0, "qmm: group ", group,
                " does not fit K ", K);
    w.codes = codes.data_ptr<uint8_t>();
    TORCH_CHECK(scale_.has_value(), "qmm: a scale is needed");
    keep.push_back(scale_->contiguous().to(at::kFloat));
    TORCH_CHECK(keep.back().numel() == w.N * (K / group), "qmm: scale shape");
    w.scale = keep.back().data_ptr<float>();
    if (offset_.has_value()) {
      keep.push_back(offset_->contiguous().to(at::kFloat));
      TORCH_CHECK(keep.back().numel() == w.N * (K / group), "qmm: offset shape");
      w.offset = keep.back().data_ptr<float>();
    }
    if (lut_.has_value()) {
      keep.push_back(lut_->contiguous().to(at::kFloat));
      TORCH_CHECK(keep.back().numel() == 16 && bits == 4, "qmm: a table needs 16 entries and 4-bit codes");
      w.lut = keep.back().data_ptr<float>();
    }
  }
  if (bias_.has_value()) {
    keep.push_back(bias_->contiguous().to(at::kFloat));
    TORCH_CHECK(keep.back().numel() == w.N, "qmm: bias shape");
    w.bias = keep.back().data_ptr<float>();
  }
  return w;
}

at::Tensor qmm(const at::Tensor& x_, const at::Tensor& codes, const at::Tensor& scale,
               const c10::optional<at::Tensor>& offset, int64_t group, int64_t bits,
               const c10::optional<at::Tensor>& lut, int64_t zero, int64_t act) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "qmm: x must be a 2-D float32 tensor");
  TORCH_CHECK(bits == 4 || bits == 8, "qmm: bits must be 4 or 8");
  const at::Tensor x = x_.contiguous();
  std::vector<at::Tensor> keep;
  const QW w = make_qw(codes, scale, offset, lut, c10::nullopt, group, bits, zero, x.size(1), keep);
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  if (bits == 8) run<8, false>(x, w, act == 8, y);
  else if (w.lut) run<4, true>(x, w, act == 8, y);
  else run<4, false>(x, w, act == 8, y);
  return y;
}

bool has_vnni() { return HAVE_VNNI; }

#if defined(__AVX512F__)
inline __m512 exp_neg(__m512 x) {  // e^x for x <= 0: 2^n·e^f with |f| <= ln2/2, a degree-7 polynomial (rel. 2e-7)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif

// Σ exp(x - mx) over a row whose largest value mx is finite
inline double sum_exp_below(const float* x, int64_t V, float mx) {
  double sum = 0.0;
  int64_t v = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; v + 16 <= V; v += 16) acc = _mm512_add_ps(acc, exp_neg(_mm512_sub_ps(_mm512_loadu_ps(x + v), _mm512_set1_ps(mx))));
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; v < V; ++v) sum += std::exp((double)x[v] - mx);
  return sum;
}

// Greedy choice per row of logits (B, V): the first index of the largest value and its log-softmax value
std::tuple<at::Tensor, at::Tensor> greedy(const at::Tensor& logits_) {
  TORCH_CHECK(logits_.dim() == 2 && logits_.scalar_type() == at::kFloat, "greedy: logits must be float32 (B, V)");
  const at::Tensor logits = logits_.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor idx = at::empty({B}, logits.options().dtype(at::kLong)), lp = at::empty({B}, logits.options());
  int64_t* ip = idx.data_ptr<int64_t>();
  float* lpp = lp.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* x = logits.data_ptr<float>() + b * V;
    float mx = x[0];
    int64_t v = 0;
#if defined(__AVX512F__)
    if (V >= 16) {
      __m512 m = _mm512_loadu_ps(x);
      __mmask16 nan = 0;
      for (v = 0; v + 16 <= V; v += 16) {
        const __m512 xv = _mm512_loadu_ps(x + v);
        m = _mm512_max_ps(m, xv);
        nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
      }
      mx = nan ? NAN : _mm512_reduce_max_ps(m);
    }
#endif
    for (; v < V; ++v) mx = std::isnan(mx) || std::isnan(x[v]) ? NAN : std::max(mx, x[v]);
    int64_t best = 0;
    if (std::isfinite(mx)) {
#if defined(__AVX512F__)
      const __m512 mv = _mm512_set1_ps(mx);
      for (; best + 16 <= V; best += 16) {
        const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + best), mv, _CMP_EQ_OQ);
        if (eq) { best += __builtin_ctz(eq); break; }
      }
#endif
      while (x[best] != mx) ++best;
    } else {  // inf or NaN: torch.argmax's order (NaN first, then the largest)
      for (int64_t u = 1; u < V; ++u) if (x[u] > x[best] || (std::isnan(x[u]) && !std::isnan(x[best]))) best = u;
      ip[b] = best;
      lpp[b] = NAN;  // as log_softmax gives where the largest logit is NaN or inf
      continue;
    }
    ip[b] = best;
    lpp[b] = (float)(-std::log(sum_exp_below(x, V, mx)));
  }
  return {idx, lp};
}
}  // namespace
"""

REGISTER = r"""
TORCH_LIBRARY(gentool_qk, m) {
  m.def("qmm(Tensor x, Tensor codes, Tensor scale, Tensor? offset, int group, int bits, Tensor? lut, int zero, "
        "int act) -> Tensor");
  m.def("has_vnni() -> bool", &has_vnni);
  m.def("greedy(Tensor logits) -> (Tensor, Tensor)");
  m.def("qrows(Tensor codes, Tensor scale, Tensor? offset, int group, int bits, Tensor? lut, int zero, Tensor ids) -> Tensor");
  DECODE_CLASS
}
TORCH_LIBRARY_IMPL(gentool_qk, CPU, m) { m.impl("qmm", &qmm); m.impl("greedy", &greedy); m.impl("qrows", &qrows); }
"""
