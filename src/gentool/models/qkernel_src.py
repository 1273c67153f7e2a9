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
(float32 activations). The same row functions serve the whole-step decoder (models/decode_src.py).
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

// Σ_g offset[n, g]·gsum[g]
inline float offset_dot(const float* off, const float* gsum, int64_t G) { return dot_f32(off, gsum, G); }

// float32 activations: y[m0 + m, n] for n in [n0, n1) and nm rows of x; gsum: (nm, G) group sums of x (offsets)
template <int BITS, bool LUT, int nm>
void gemv_rows(const float* x, int64_t m0, const QW& w, const float* gsum, float* y, int64_t ystride,
               int64_t n0, int64_t n1) {
  vf lut[2];
  if (LUT) make_lut(w.lut, lut);
  const int64_t K = w.K, g = w.g, G = K / g, row_bytes = BITS == 4 ? K / 2 : K;
  const int zero = w.zero;
  const float* xr[nm];
  for (int m = 0; m < nm; ++m) xr[m] = x + (m0 + m) * K;
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
      if (w.offset) r += offset_dot(w.offset + n * G, gsum + m * G, G);
      if (w.bias) r += w.bias[n];
      y[(m0 + m) * ystride + n] = r;
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

#if defined(__AVX512VNNI__)
constexpr bool HAVE_VNNI = true;
// One row of activations rounded to 8 bits per run of 4 (x ≈ q·d, d = max|x|/127 over the 4): vpdpbusd sums the
// products of 4 codes per 32-bit lane and each lane is scaled on its own, so a scale per 4 activations costs nothing
// over one per 32 (llama.cpp's Q8_0) and keeps an outlier from coarsening its 31 neighbours. Stored in the orders
// the codes need: natural for 8-bit codes, and for 4-bit codes the order of a 64-weight chunk's nibbles as they are
// unpacked: the low nibbles of bytes 0-15 (weights 0-15), of bytes 16-31 (weights 32-47), then the high nibbles
// (16-31, 48-63). Per chunk of 64: 16 lane scales and 16 lane sums of the codes (for the zero correction).
struct QX {
  int64_t K = 0;
  std::vector<float> d4, s4;               // per run of 4: d, and d·Σq
  std::vector<int8_t> q[2];                // [0] natural order, [1] the 4-bit order
  std::vector<float> ld[2];                // per chunk of 64: 16 lane scales
  std::vector<int32_t> ls[2];              // per chunk: 16 lane sums
  std::vector<int32_t> zs[2]; int zs_zero[2] = {-1, -1};  // -zero·lane sums for one zero
  std::vector<std::pair<int64_t, std::vector<float>>> gs;  // per group size: Σ over the group of d·q
  void build(const float* x, int64_t K_) {
    K = K_;
    const int64_t C = K / 64;
    d4.resize(K / 4); s4.resize(K / 4);
    for (int o = 0; o < 2; ++o) { q[o].resize(K); ld[o].resize(C * 16); ls[o].resize(C * 16); zs_zero[o] = -1; }
    gs.clear();
    alignas(64) float amax[16];
    alignas(64) int32_t qi[16];
    for (int64_t i = 0; i < K; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      __m512 a = _mm512_abs_ps(v);
      a = _mm512_max_ps(a, _mm512_permute_ps(a, 0xB1));  // max over each run of 4 (a 128-bit lane)
      a = _mm512_max_ps(a, _mm512_permute_ps(a, 0x4E));
      const __m512 id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ),
                                            _mm512_set1_ps(127.f), a);
      const __m512i q32 = _mm512_cvtps_epi32(_mm512_mul_ps(v, id));  // round to nearest even
      _mm_storeu_si128((__m128i*)(q[0].data() + i), _mm512_cvtsepi32_epi8(q32));
      _mm512_store_ps(amax, a);
      _mm512_store_si512((void*)qi, q32);
      for (int j = 0; j < 4; ++j) {
        const float d = amax[4 * j] / 127.f;
        d4[i / 4 + j] = d;
        s4[i / 4 + j] = d * (float)(qi[4 * j] + qi[4 * j + 1] + qi[4 * j + 2] + qi[4 * j + 3]);
      }
    }
    static const int src[4] = {0, 32, 16, 48};  // 4-bit order: the 16-weight pieces of a chunk
    for (int64_t c = 0; c < C; ++c) {
      for (int p = 0; p < 4; ++p) std::memcpy(q[1].data() + 64 * c + 16 * p, q[0].data() + 64 * c + src[p], 16);
      for (int o = 0; o < 2; ++o)
        for (int l = 0; l < 16; ++l) {
          const int8_t* qq = q[o].data() + 64 * c + 4 * l;
          ls[o][16 * c + l] = qq[0] + qq[1] + qq[2] + qq[3];
          const int64_t run = o == 0 ? 16 * c + l : 16 * c + src[l / 4] / 4 + l % 4;
          ld[o][16 * c + l] = d4[run];
        }
    }
  }
  void prepare(const QW& w) {  // the zero correction and group sums this layer needs (before the threads start)
    const int o = w.bits == 4 ? 1 : 0;
    if (zs_zero[o] != w.zero) {
      zs[o].resize(ls[o].size());
      for (size_t i = 0; i < ls[o].size(); ++i) zs[o][i] = -w.zero * ls[o][i];
      zs_zero[o] = w.zero;
    }
    if (w.offset && !gsum(w.g)) {
      std::vector<float> s(K / w.g, 0.f);
      for (int64_t r = 0; r < K / 4; ++r) s[r * 4 / w.g] += s4[r];
      gs.emplace_back(w.g, std::move(s));
    }
  }
  const float* gsum(int64_t g) const {
    for (auto& p : gs) if (p.first == g) return p.second.data();
    return nullptr;
  }
};

// lane -> group within a 64-weight chunk, per (order, group size): 4-bit order g 32; natural order g 32, g 16
template <int BITS, int GC>
inline __m512 lane_scales(const float* s, int64_t c, int64_t g) {
  if (GC >= 64) return _mm512_set1_ps(s[(c * 64) / g]);
  if (GC == 32) {
    const __m512i idx = BITS == 4 ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                                  : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)(s + 2 * c)))));
  }
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(s + 4 * c)));
}

template <int BITS, int GC>
void vnni_rows(const QW& w, const QX& x, float* y, int64_t n0, int64_t n1) {
  const int64_t K = w.K, C = K / 64, G = K / w.g, row_bytes = BITS == 4 ? K / 2 : K;
  const int o = BITS == 4 ? 1 : 0;
  const int8_t* xq = x.q[o].data();
  const float* xd = x.ld[o].data();
  const int32_t* zs = x.zs[o].data();
  const float* gs = w.offset ? x.gsum(w.g) : nullptr;
  const __m512i m4 = _mm512_set1_epi8(15);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* c = w.codes + n * row_bytes;
    const float* s = w.scale + n * G;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t ci = 0; ci < C; ++ci) {
      __m512i wv;
      if (BITS == 4) {
        const __m256i b = _mm256_loadu_si256((const __m256i*)(c + 32 * ci));
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
        wv = _mm512_and_si512(both, m4);
      } else {
        wv = _mm512_loadu_si512((const void*)(c + 64 * ci));
      }
      const __m512i start = w.zero ? _mm512_loadu_si512((const void*)(zs + 16 * ci)) : _mm512_setzero_si512();
      const __m512i dot = _mm512_dpbusd_epi32(start, wv, _mm512_loadu_si512((const void*)(xq + 64 * ci)));
      const __m512 f = _mm512_mul_ps(_mm512_loadu_ps(xd + 16 * ci), lane_scales<BITS, GC>(s, ci, w.g));
      if (ci & 1) acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, acc1);
      else acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, acc0);
    }
    float r = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    if (gs) r += offset_dot(w.offset + n * G, gs, G);
    if (w.bias) r += w.bias[n];
    y[n] = r;
  }
}
#else
constexpr bool HAVE_VNNI = false;
struct QX {
  void build(const float*, int64_t) {}
  void prepare(const QW&) {}
};
#endif

// Whether a layer runs on 8-bit activations (when asked and the CPU has VNNI)
inline bool int8_ok(const QW& w) {
  return HAVE_VNNI && (w.bits == 4 || w.bits == 8) && !w.lut && w.K % 64 == 0 && (w.g % 64 == 0 || w.g == 32 ||
         (w.g == 16 && w.bits == 8));
}

// One row of activations in the forms the row functions take: float32 (with group sums for offsets), and 8-bit
struct Act {
  const float* x = nullptr;
  int64_t K = 0;
  bool int8 = false;
  QX qx;
  std::vector<std::pair<int64_t, std::vector<float>>> fs;  // float group sums per group size
  void set(const float* x_, int64_t K_, bool int8_) {
    x = x_; K = K_; int8 = int8_ && HAVE_VNNI && K_ % 64 == 0; fs.clear();
    if (int8) qx.build(x, K);
  }
  bool uses_int8(const QW& w) const { return int8 && int8_ok(w); }
  void prepare(const QW& w) {
    if (uses_int8(w)) { qx.prepare(w); return; }
    if (w.bits != 32 && w.offset && !fsum(w.g)) {
      std::vector<float> s(K / w.g);
      group_sums(x, K, w.g, s.data());
      fs.emplace_back(w.g, std::move(s));
    }
  }
  const float* fsum(int64_t g) const {
    for (auto& p : fs) if (p.first == g) return p.second.data();
    return nullptr;
  }
};

// y[n] for n in [n0, n1): one row of activations times rows n0..n1 of a layer (bias included)
void rows(const QW& w, const Act& a, float* y, int64_t n0, int64_t n1) {
  if (w.bits == 32) {
    const float* wf = (const float*)w.codes;
    for (int64_t n = n0; n < n1; ++n) y[n] = dot_f32(wf + n * w.K, a.x, w.K) + (w.bias ? w.bias[n] : 0.f);
    return;
  }
#if defined(__AVX512VNNI__)
  if (a.uses_int8(w)) {
    if (w.bits == 4) {
      if (w.g == 32) vnni_rows<4, 32>(w, a.qx, y, n0, n1); else vnni_rows<4, 64>(w, a.qx, y, n0, n1);
    } else {
      if (w.g == 16) vnni_rows<8, 16>(w, a.qx, y, n0, n1);
      else if (w.g == 32) vnni_rows<8, 32>(w, a.qx, y, n0, n1);
      else vnni_rows<8, 64>(w, a.qx, y, n0, n1);
    }
    return;
  }
#endif
  const float* gs = w.offset ? a.fsum(w.g) : nullptr;
  if (w.bits == 8) gemv_rows<8, false, 1>(a.x, 0, w, gs, y, 0, n0, n1);
  else if (w.lut) gemv_rows<4, true, 1>(a.x, 0, w, gs, y, 0, n0, n1);
  else gemv_rows<4, false, 1>(a.x, 0, w, gs, y, 0, n0, n1);
}

// Several layers over their own activations in one parallel region (q/k/v, gate/up): rows split across threads
struct Job { const QW* w; const Act* a; float* y; };
void run_jobs(const Job* jobs, int nj) {
  int64_t total = 0, off[8];
  for (int j = 0; j < nj; ++j) { off[j] = total; total += jobs[j].w->N; }
  const int64_t step = 16;
  at::parallel_for(0, (total + step - 1) / step, 1, [&](int64_t b0, int64_t b1) {
    for (int j = 0; j < nj; ++j) {
      const int64_t lo = std::max(b0 * step, off[j]), hi = std::min(std::min(b1 * step, total), off[j] + jobs[j].w->N);
      if (lo < hi) rows(*jobs[j].w, *jobs[j].a, jobs[j].y, lo - off[j], hi - off[j]);
    }
  });
}

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
  if (M <= MB && int8 && HAVE_VNNI && int8_ok(w)) {
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
        case 1: gemv_rows<BITS, LUT, 1>(xp, 0, w, gs.data(), yp, N, n0, n1); break;
        case 2: gemv_rows<BITS, LUT, 2>(xp, 0, w, gs.data(), yp, N, n0, n1); break;
        case 3: gemv_rows<BITS, LUT, 3>(xp, 0, w, gs.data(), yp, N, n0, n1); break;
        default: gemv_rows<BITS, LUT, 4>(xp, 0, w, gs.data(), yp, N, n0, n1);
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
}  // namespace
"""

REGISTER = r"""
TORCH_LIBRARY(gentool_qk, m) {
  m.def("qmm(Tensor x, Tensor codes, Tensor scale, Tensor? offset, int group, int bits, Tensor? lut, int zero, "
        "int act) -> Tensor");
  m.def("has_vnni() -> bool", &has_vnni);
  DECODE_CLASS
}
TORCH_LIBRARY_IMPL(gentool_qk, CPU, m) { m.impl("qmm", &qmm); }
"""
