"""C++ source of gentool's CPU kernel for packed-weight linear layers (built by models/qkernel.py on first use).

One op, `gentool_qk::qmm(x, codes, scale, offset?, group, bits, lut?) -> y`: y[m, n] = Σ_k x[m, k]·w[n, k] with
w[n, k] = v(c[n, k])·scale[n, k/group] + offset[n, k/group], where v(c) = c, or lut[c] with a 16-entry table (NF4).
Codes: bits = 4: unsigned nibbles, 16 bytes per 32 weights, byte j = code j | code j+16 << 4; bits = 8: int8.
The activations stay float32 (no rounding of x): the codes are widened to float in registers and multiplied by x,
and the group's sum is scaled once; the offsets multiply the group sums of x, computed once per call. The packed
codes are read once per call (a decode step), and no dense float weight exists: for more than 4 rows of x
(prefill) a tile of 32 weight rows is decoded into a thread's buffer and multiplied by at::mm.
"""

SOURCE = r"""
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <vector>
#include <cstring>

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
template <bool LUT> inline void load4(const uint8_t* p, const vf* lut, vf& lo, vf& hi) {
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  __m512i l = _mm512_and_si512(v, _mm512_set1_epi32(15)), h = _mm512_srli_epi32(v, 4);
  if (LUT) { lo = _mm512_permutexvar_ps(l, lut[0]); hi = _mm512_permutexvar_ps(h, lut[0]); }
  else { lo = _mm512_cvtepi32_ps(l); hi = _mm512_cvtepi32_ps(h); }
}
inline vf load8(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
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
template <bool LUT> inline vf lookup(__m256i c, const vf* lut) {
  if (!LUT) return _mm256_cvtepi32_ps(c);
  vf a = _mm256_permutevar8x32_ps(lut[0], c), b = _mm256_permutevar8x32_ps(lut[1], c);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));  // bit 3 selects the table half
}
// 16 nibble codes (8 bytes) -> values of 8 low-nibble and 8 high-nibble weights
template <bool LUT> inline void load4(const uint8_t* p, const vf* lut, vf& lo, vf& hi) {
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  lo = lookup<LUT>(_mm256_and_si256(v, _mm256_set1_epi32(15)), lut);
  hi = lookup<LUT>(_mm256_srli_epi32(v, 4), lut);
}
inline vf load8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
inline void make_lut(const float* t, vf* lut) { lut[0] = _mm256_loadu_ps(t); lut[1] = _mm256_loadu_ps(t + 8); }
#else
#error "gentool's CPU kernel needs AVX2 and FMA"
#endif

// y[m0 + m, n] for n in [n0, n1) and nm rows of x; everything in locals, so that the accumulators stay in registers
template <int BITS, bool LUT, int nm>
void gemv_rows(const float* x, int64_t m0, int64_t K, const uint8_t* codes, const float* scale,
               int g, const float* lut_table, float* y, int64_t N, int64_t n0, int64_t n1) {
  vf lut[2];
  if (LUT) make_lut(lut_table, lut);
  const int64_t G = K / g, row_bytes = BITS == 4 ? K / 2 : K;
  const float* xr[nm];
  for (int m = 0; m < nm; ++m) xr[m] = x + (m0 + m) * K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = codes + n * row_bytes;
    const float* s = scale + n * G;
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
          load4<LUT>(c + k / 2, lut, lo, hi);
          for (int m = 0; m < nm; ++m) { ga[m] = vfma(lo, vload(xr[m] + k), ga[m]); gb[m] = vfma(hi, vload(xr[m] + k + 16), gb[m]); }
#else
          vf lo0, hi0, lo1, hi1;
          load4<LUT>(c + k / 2, lut, lo0, hi0);
          load4<LUT>(c + k / 2 + 8, lut, lo1, hi1);
          for (int m = 0; m < nm; ++m) {
            ga[m] = vfma(hi0, vload(xr[m] + k + 16), vfma(lo0, vload(xr[m] + k), ga[m]));
            gb[m] = vfma(hi1, vload(xr[m] + k + 24), vfma(lo1, vload(xr[m] + k + 8), gb[m]));
          }
#endif
        }
      } else {
        const int8_t* c8 = (const int8_t*)c;
        int64_t k = k0;
        for (; k + 2 * W <= k0 + g; k += 2 * W) {
          const vf w0 = load8(c8 + k), w1 = load8(c8 + k + W);
          for (int m = 0; m < nm; ++m) { ga[m] = vfma(w0, vload(xr[m] + k), ga[m]); gb[m] = vfma(w1, vload(xr[m] + k + W), gb[m]); }
        }
        for (; k < k0 + g; k += W) {
          const vf w0 = load8(c8 + k);
          for (int m = 0; m < nm; ++m) ga[m] = vfma(w0, vload(xr[m] + k), ga[m]);
        }
      }
      const vf sv = vset(s[gi]);
      if (gi & 1) for (int m = 0; m < nm; ++m) acc2[m] = vfma(sv, vadd(ga[m], gb[m]), acc2[m]);
      else for (int m = 0; m < nm; ++m) acc[m] = vfma(sv, vadd(ga[m], gb[m]), acc[m]);
    }
    for (int m = 0; m < nm; ++m) y[(m0 + m) * N + n] = vsum(vadd(acc[m], acc2[m]));
  }
}

// weight rows [n0, n1) decoded into out (n1 - n0, K) float32
template <int BITS, bool LUT>
void decode_rows(int64_t K, const uint8_t* codes, const float* scale, const float* offset, int g,
                 const float* lut_table, int64_t n0, int64_t n1, float* out) {
  vf lut[2];
  if (LUT) make_lut(lut_table, lut);
  const int64_t G = K / g, row_bytes = BITS == 4 ? K / 2 : K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = codes + n * row_bytes;
    float* o = out + (n - n0) * K;
    for (int64_t gi = 0; gi < G; ++gi) {
      const vf sv = vset(scale[n * G + gi]), ov = vset(offset ? offset[n * G + gi] : 0.f);
      for (int64_t k = gi * g; k < (gi + 1) * g; k += 32) {
        if (BITS == 4) {
#if defined(__AVX512F__)
          vf lo, hi;
          load4<LUT>(c + k / 2, lut, lo, hi);
          vstore(o + k, vfma(lo, sv, ov)); vstore(o + k + 16, vfma(hi, sv, ov));
#else
          vf lo0, hi0, lo1, hi1;
          load4<LUT>(c + k / 2, lut, lo0, hi0);
          load4<LUT>(c + k / 2 + 8, lut, lo1, hi1);
          vstore(o + k, vfma(lo0, sv, ov)); vstore(o + k + 8, vfma(lo1, sv, ov));
          vstore(o + k + 16, vfma(hi0, sv, ov)); vstore(o + k + 24, vfma(hi1, sv, ov));
#endif
        } else {
          for (int j = 0; j < 32 && k + j < (gi + 1) * g; j += W)
            vstore(o + k + j, vfma(load8((const int8_t*)c + k + j), sv, ov));
        }
      }
    }
  }
}

template <int BITS, bool LUT>
void run(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const float* off, int g,
         const float* lut, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  const float* xp = x.data_ptr<float>();
  const uint8_t* cp = (const uint8_t*)codes.data_ptr();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M <= MB) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      switch (M) {
        case 1: gemv_rows<BITS, LUT, 1>(xp, 0, K, cp, sp, g, lut, yp, N, n0, n1); break;
        case 2: gemv_rows<BITS, LUT, 2>(xp, 0, K, cp, sp, g, lut, yp, N, n0, n1); break;
        case 3: gemv_rows<BITS, LUT, 3>(xp, 0, K, cp, sp, g, lut, yp, N, n0, n1); break;
        default: gemv_rows<BITS, LUT, 4>(xp, 0, K, cp, sp, g, lut, yp, N, n0, n1);
      }
    });
    if (off) {  // + Σ_g offset[n, g]·(Σ_{k in g} x[m, k]): one small matrix product for all rows
      at::Tensor offset = at::from_blob((void*)off, {N, K / g}, x.options());
      y.addmm_(x.view({M, K / g, g}).sum(2), offset.t());
    }
    return;
  }
  constexpr int64_t T = 32;  // weight rows decoded at a time
  at::parallel_for(0, (N + T - 1) / T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(T * K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * T, n1 = std::min(N, n0 + T);
      decode_rows<BITS, LUT>(K, cp, sp, off, g, lut, n0, n1, buf.data());
      at::Tensor w = at::from_blob(buf.data(), {n1 - n0, K}, x.options());
      y.narrow(1, n0, n1 - n0).copy_(at::mm(x, w.t()));
    }
  });
}

at::Tensor qmm(const at::Tensor& x_, const at::Tensor& codes, const at::Tensor& scale_,
               const c10::optional<at::Tensor>& offset_, int64_t group, int64_t bits,
               const c10::optional<at::Tensor>& lut_) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "qmm: x must be a 2-D float32 tensor");
  TORCH_CHECK(bits == 4 || bits == 8, "qmm: bits must be 4 or 8");
  const at::Tensor x = x_.contiguous();
  const int64_t K = x.size(1), N = codes.size(0);
  TORCH_CHECK(group % (bits == 4 ? 32 : 16) == 0 && K % group == 0, "qmm: group ", group, " does not fit K ", K);
  TORCH_CHECK(codes.is_contiguous() && codes.size(1) == (bits == 4 ? K / 2 : K), "qmm: codes shape");
  const at::Tensor scale = scale_.contiguous().to(at::kFloat);
  TORCH_CHECK(scale.numel() == N * (K / group), "qmm: scale shape");
  at::Tensor offset;
  if (offset_.has_value()) {
    offset = offset_->contiguous().to(at::kFloat);
    TORCH_CHECK(offset.numel() == N * (K / group), "qmm: offset shape");
  }
  const float* off = offset.defined() ? offset.data_ptr<float>() : nullptr;
  at::Tensor lut;
  if (lut_.has_value()) { lut = lut_->contiguous().to(at::kFloat); TORCH_CHECK(lut.numel() == 16 && bits == 4); }
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  if (bits == 8) run<8, false>(x, codes, scale, off, (int)group, nullptr, y);
  else if (lut.defined()) run<4, true>(x, codes, scale, off, (int)group, lut.data_ptr<float>(), y);
  else run<4, false>(x, codes, scale, off, (int)group, nullptr, y);
  return y;
}
}  // namespace

TORCH_LIBRARY(gentool_qk, m) {
  m.def("qmm(Tensor x, Tensor codes, Tensor scale, Tensor? offset, int group, int bits, Tensor? lut) -> Tensor");
}
TORCH_LIBRARY_IMPL(gentool_qk, CPU, m) { m.impl("qmm", &qmm); }
"""
