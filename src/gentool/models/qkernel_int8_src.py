"""C++ source of the 8-bit-activation path of gentool's CPU kernel and the row functions shared by `qmm` and the
whole-step decoder (compiled between models/qkernel_src.py's SOURCE and TAIL).

`QX` rounds one row of activations to 8 bits per run of 4 values and lays the codes out as the weight codes are
unpacked; `vnni_rows` multiplies 64 weights per vpdpbusd instruction (4-bit codes: 128 per 64-byte load; see
models/qkernel_src.py for the arithmetic and its bound). `Act` holds one row in the forms the rows need (float32 with group sums for offsets, and 8-bit),
`rows` picks the arithmetic per layer, and `run_jobs` splits the rows of several layers over the threads in one
parallel region (q/k/v, gate/up).
"""

SOURCE = r"""
#if defined(__AVX512VNNI__)
constexpr bool HAVE_VNNI = true;
// One row of activations rounded to 8 bits per run of 4 (x ≈ q·d, d = max|x|/127 over the 4): vpdpbusd sums the
// products of 4 codes per 32-bit lane and each lane is scaled on its own, so a scale per 4 activations costs nothing
// over one per 32 (llama.cpp's Q8_0) and keeps an outlier from coarsening its 31 neighbours. Stored in the orders
// the codes need: natural for 8-bit codes, and for 4-bit codes the order their nibbles are unpacked in (`src4`).
// Per 64 codes (one vector): 16 lane scales and 16 lane sums of the codes (for the zero correction).
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
    for (int64_t p = 0; p < K / 16; ++p) {  // 4-bit order: pieces of 16 codes (4 lanes) moved whole
      const int64_t from = src4(16 * p);
      std::memcpy(q[1].data() + 16 * p, q[0].data() + from, 16);
      std::memcpy(ld[1].data() + 4 * p, d4.data() + from / 4, 4 * sizeof(float));
    }
    std::memcpy(ld[0].data(), d4.data(), (K / 4) * sizeof(float));
    const __m512i ones = _mm512_set1_epi8(1);
    for (int o = 0; o < 2; ++o)
      for (int64_t c = 0; c < C; ++c)  // lane sums: the 4 codes of each lane times 1
        _mm512_storeu_si512((void*)(ls[o].data() + 16 * c), _mm512_dpbusd_epi32(
            _mm512_setzero_si512(), ones, _mm512_loadu_si512((const void*)(q[o].data() + 64 * c))));
  }
  // 4-bit order: a chunk of 128 weights (64 bytes of nibbles, blocks b0-b3), or of 64 at the end, is unpacked as the
  // low nibbles of all its bytes (weights 0-15 of each block), then the high ones (16-31 of each block)
  int64_t src4(int64_t i) const {
    const int64_t base = i / 128 * 128, p = i % 128, nb = base + 128 <= K ? 4 : 2, piece = p / 16;
    return base + 32 * (piece % nb) + 16 * (piece / nb) + p % 16;
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

// lane -> group of one 64-lane vector: 8-bit codes (natural order) g 16, 32, a multiple of 64; 4-bit codes:
// `lane_scales4` (a vector of 16 weights from each of 4 blocks: g 32, 64, a multiple of 128)
template <int GC>
inline __m512 lane_scales8(const float* s, int64_t c, int64_t g) {
  if (GC >= 64) return _mm512_set1_ps(s[(c * 64) / g]);
  if (GC == 32)
    return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)(s + 2 * c)))));
  return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                               _mm512_castps128_ps512(_mm_loadu_ps(s + 4 * c)));
}
// chunk S of 128 weights (blocks 4S..4S+3), or the 64-weight tail (blocks 4S, 4S+1: lanes 0-3, 4-7, 8-11, 12-15
// are blocks 0, 1, 0, 1)
template <int GC>
inline __m512 lane_scales4(const float* s, int64_t S, int64_t g, bool tail) {
  if (GC >= 128) return _mm512_set1_ps(s[(S * 128) / g]);
  if (GC == 64) return tail ? _mm512_set1_ps(s[2 * S]) :
    _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                          _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)(s + 2 * S)))));
  if (tail)
    return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)(s + 4 * S)))));
  return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                               _mm512_castps128_ps512(_mm_loadu_ps(s + 4 * S)));
}

#ifndef PREFETCH
#define PREFETCH 2048  // bytes ahead of the codes being read: enough loads in flight to stream a large layer
#endif
// One weight row (two at a time, sharing the activations' loads, measured slower on large layers)
template <int BITS, int GC>
inline void vnni_row(const QW& w, int64_t n, int64_t C, int64_t G, int64_t row_bytes, const int8_t* xq,
                     const float* xd, const int32_t* zs, const float* gs, __m512i m4, float* y) {
  const uint8_t* row = w.codes + n * row_bytes;
  const float* s = w.scale + n * G;
  auto start = [&](int64_t v) {  // -zero·Σq of each lane: the zero code folded into the integer sum
    return w.zero ? _mm512_loadu_si512((const void*)(zs + 16 * v)) : _mm512_setzero_si512();
  };
  auto dot = [&](int64_t v, __m512i codes) {  // one vector of 64 products, as float32
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start(v), codes, _mm512_loadu_si512((const void*)(xq + 64 * v))));
  };
  __m512 acc = _mm512_setzero_ps();
  if constexpr (BITS == 4) {
    for (int64_t S = 0; S < (w.K + 64) / 128; ++S) {  // chunks of 128 weights, and a tail of 64
      const uint8_t* c = row + 64 * S;
      _mm_prefetch((const char*)c + PREFETCH, _MM_HINT_T0);
      if (128 * S + 128 <= w.K) {
        const __m512i b = _mm512_loadu_si512((const void*)c);
        const __m512 sv = lane_scales4<GC>(s, S, w.g, false);
        acc = _mm512_fmadd_ps(dot(2 * S, _mm512_and_si512(b, m4)), _mm512_mul_ps(_mm512_loadu_ps(xd + 32 * S), sv), acc);
        acc = _mm512_fmadd_ps(dot(2 * S + 1, _mm512_and_si512(_mm512_srli_epi16(b, 4), m4)),
                              _mm512_mul_ps(_mm512_loadu_ps(xd + 32 * S + 16), sv), acc);
      } else {
        const __m256i b = _mm256_loadu_si256((const __m256i*)c);
        const __m512i lo = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1), m4);
        acc = _mm512_fmadd_ps(dot(2 * S, lo), _mm512_mul_ps(_mm512_loadu_ps(xd + 32 * S), lane_scales4<GC>(s, S, w.g, true)), acc);
      }
    }
  } else {
    for (int64_t ci = 0; ci < C; ++ci) {
      const uint8_t* c = row + 64 * ci;
      _mm_prefetch((const char*)c + PREFETCH, _MM_HINT_T0);
      const __m512 f = _mm512_mul_ps(_mm512_loadu_ps(xd + 16 * ci), lane_scales8<GC>(s, ci, w.g));
      acc = _mm512_fmadd_ps(dot(ci, _mm512_loadu_si512((const void*)c)), f, acc);
    }
  }
  float v = _mm512_reduce_add_ps(acc);
  if (gs) v += dot_f32(w.offset + n * G, gs, G);
  if (w.bias) v += w.bias[n];
  y[n] = v;
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
  for (int64_t n = n0; n < n1; ++n) vnni_row<BITS, GC>(w, n, C, G, row_bytes, xq, xd, zs, gs, m4, y);
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
  if (!HAVE_VNNI || w.lut || w.K % 64) return false;
  if (w.bits == 4) return w.g == 32 || w.g == 64 || w.g % 128 == 0;
  return w.bits == 8 && (w.g == 16 || w.g == 32 || w.g % 64 == 0);
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
      if (w.g == 32) vnni_rows<4, 32>(w, a.qx, y, n0, n1);
      else if (w.g == 64) vnni_rows<4, 64>(w, a.qx, y, n0, n1);
      else vnni_rows<4, 128>(w, a.qx, y, n0, n1);
    } else {
      if (w.g == 16) vnni_rows<8, 16>(w, a.qx, y, n0, n1);
      else if (w.g == 32) vnni_rows<8, 32>(w, a.qx, y, n0, n1);
      else vnni_rows<8, 64>(w, a.qx, y, n0, n1);
    }
    return;
  }
#endif
  const float* gs = w.offset ? a.fsum(w.g) : nullptr;
  if (w.bits == 8) gemv_rows<8, false, 1>(a.x, w, gs, y, 0, n0, n1);
  else if (w.lut) gemv_rows<4, true, 1>(a.x, w, gs, y, 0, n0, n1);
  else gemv_rows<4, false, 1>(a.x, w, gs, y, 0, n0, n1);
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

"""
