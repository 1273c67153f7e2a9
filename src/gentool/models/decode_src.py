"""C++ source of gentool's whole-step CPU decoder (compiled with models/qkernel_src.py into one library).

`torch.classes.gentool_qk.Decoder` holds a Transformer's weights (pointers into the model's own tensors: dense
float32 weights, or the packed layouts of models/qkernel.py) and its static KV cache, and `step(x, cos, sin, pos,
act)` runs one token through every block and the output layer in C++: RMSNorm, q/k/v (one parallel pass over the
three layers), rotary embedding, the cache write, grouped-query attention over positions 0..pos, o, RMSNorm,
gate/up (one pass), SiLU·up, down, residuals, the final norm and the logits. Batch-1 decoding of a small model is
bound by per-operation overhead in eager PyTorch (a 30-block model runs ~700 operations per token); here a token
costs one call, and the threads split each layer's rows. It computes what Transformer.forward does for one token
(models/decode.py's decode_forward; the tests compare them): the same float32 arithmetic, in another order, and for
act = 8 the quantized layers' 8-bit activations (models/qkernel_src.py).
"""

SOURCE = r"""
#include <torch/custom_class.h>

namespace {
// Rows `ids` of a packed weight as float32: an embedding lookup in a quantized table
at::Tensor qrows(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& offset,
                 int64_t group, int64_t bits, const c10::optional<at::Tensor>& lut, int64_t zero, const at::Tensor& ids_) {
  TORCH_CHECK(bits == 4 || bits == 8, "qrows: bits must be 4 or 8");
  const int64_t K = bits == 4 ? 2 * codes.size(1) : codes.size(1);
  std::vector<at::Tensor> keep;
  const QW w = make_qw(codes, scale, offset, lut, c10::nullopt, group, bits, zero, K, keep);
  const at::Tensor ids = ids_.contiguous().to(at::kLong);
  at::Tensor out = at::empty({ids.numel(), K}, scale.options().dtype(at::kFloat));
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(0 <= ip[i] && ip[i] < w.N, "qrows: id ", ip[i], " is not a row of ", w.N);
    float* o = out.data_ptr<float>() + i * K;
    if (bits == 8) decode_rows<8, false>(w, ip[i], ip[i] + 1, o);
    else if (w.lut) decode_rows<4, true>(w, ip[i], ip[i] + 1, o);
    else decode_rows<4, false>(w, ip[i], ip[i] + 1, o);
  }
  return out;
}

void rmsnorm(const float* x, const float* w, int64_t D, float eps, float* out) {
  const float r = 1.f / std::sqrt(dot_f32(x, x, D) / (float)D + eps);
  for (int64_t k = 0; k < D; ++k) out[k] = w[k] * (x[k] * r);  // transformers: weight · (x · rsqrt(mean x² + eps))
}

void rope(float* v, const float* cos, const float* sin, int64_t E) {  // v·cos + rotate_half(v)·sin
  const int64_t h = E / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = v[i], b = v[i + h];
    v[i] = a * cos[i] - b * sin[i];
    v[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

inline uint32_t mix32(uint32_t h) {  // lm/sample.py's _mix32 (its int64 products, masked to 32 bits)
  h = ((h >> 16) ^ h) * 0x45D9F3Bu;
  h = ((h >> 16) ^ h) * 0x45D9F3Bu;
  return (h >> 16) ^ h;
}

// A token drawn from one row of raw logits l as lm/sample.py's process_logits + sample_tokens draw it: l / T, top-k,
// top-p, min-p, then the Gumbel-max trick over gumbel_noise's noise (a hash of the row key, the step and the token
// id; its logarithms through ATen, as torch computes them). That noise lies in [-2.85, 17.33] (24-bit uniforms), so
// only tokens within 20.2 of the largest scaled logit m can win: only they are drawn. top-k and top-p look at the
// tokens within 30 of m (the others hold less than V·e⁻³⁰ of the probability, below float32 rounding). `top`: the
// index of the largest raw logit, which is finite (greedy's).
struct Near { std::vector<int32_t> idx; std::vector<float> x; };

int64_t sample_row(const float* l, int64_t V, float T, int64_t top_k, double top_p, double min_p, uint32_t key,
                   int64_t step, int64_t top, Near& nr) {
  const float m = l[top] / T, lo = m - 30.f;
  nr.idx.resize(V); nr.x.resize(V);
  int64_t n = 0, i = 0;
#if defined(__AVX512F__)
  const __m512 it = _mm512_set1_ps(T), lov = _mm512_set1_ps(lo);
  for (__m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); i + 16 <= V;
       i += 16, ids = _mm512_add_epi32(ids, _mm512_set1_epi32(16))) {
    const __m512 v = _mm512_div_ps(_mm512_loadu_ps(l + i), it);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, lov, _CMP_GE_OQ);
    _mm512_mask_compressstoreu_epi32(nr.idx.data() + n, keep, ids);
    _mm512_mask_compressstoreu_ps(nr.x.data() + n, keep, v);
    n += __builtin_popcount(keep);
  }
#endif
  for (; i < V; ++i) {
    const float v = l[i] / T;
    if (v >= lo) { nr.idx[n] = (int32_t)i; nr.x[n++] = v; }
  }
  float* x = nr.x.data();
  const int32_t* idx = nr.idx.data();
  if (top_k > 0 && top_k <= n) {  // else the k-th largest lies below m - 30: no near token goes
    std::vector<float> v(x, x + n);
    std::nth_element(v.begin(), v.begin() + (top_k - 1), v.end(), std::greater<float>());
    const float kth = v[top_k - 1];
    for (int64_t j = 0; j < n; ++j) if (x[j] < kth) x[j] = -INFINITY;
  }
  if (top_p < 1.0) {  // keep the tokens whose mass strictly before them (largest first) is below top_p: buckets of
    constexpr int NB = 512;  // x by 30/512 in descending order; only the bucket where the mass crosses top_p is sorted
    at::Tensor e = at::from_blob(x, {n}, at::kFloat).sub(m).exp_();
    const float* ep = e.data_ptr<float>();
    std::vector<double> mass(NB, 0.0);
    std::vector<int> bucket(n);
    double z = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      bucket[j] = x[j] == -INFINITY ? -1 : std::min(NB - 1, (int)((m - x[j]) * (NB / 30.f)));
      if (bucket[j] >= 0) { mass[bucket[j]] += ep[j]; z += ep[j]; }
    }
    double before = 0.0;
    int cross = 0;
    while (cross < NB && before + mass[cross] / z < top_p) before += mass[cross++] / z;
    std::vector<int64_t> tie;
    for (int64_t j = 0; j < n; ++j) {
      if (bucket[j] > cross) x[j] = -INFINITY;
      else if (bucket[j] == cross) tie.push_back(j);
    }
    std::sort(tie.begin(), tie.end(), [&](int64_t a, int64_t b) { return x[a] > x[b]; });
    for (int64_t j : tie) {
      if (before >= top_p) x[j] = -INFINITY;
      before += ep[j] / z;
    }
  }
  const float reach = min_p > 0 ? std::max(m - 20.5f, m + (float)std::log(min_p) - 1e-3f) : m - 20.5f;
  int64_t d = 0;  // the near tokens still in and within reach of the largest, moved to the front
  for (int64_t j = 0; j < n; ++j)
    if (x[j] >= reach && !(min_p > 0 && std::exp((double)x[j] - m) < min_p)) {  // min-p: p < min_p·p_max
      nr.idx[d] = idx[j]; x[d++] = x[j];
    }
  if (!d) return 0;  // nothing kept (top_p 0): argmax over -inf everywhere
  const uint32_t per_step = mix32(key ^ mix32((uint32_t)(step + 0x7FEB352D)));
  at::Tensor u = at::empty({d}, at::kFloat);
  float* up = u.data_ptr<float>();
  for (int64_t j = 0; j < d; ++j)
    up[j] = ((float)(mix32(per_step ^ mix32((uint32_t)idx[j] + 0x165667B1u)) >> 8) + 0.5f) * (1.f / 16777216.f);
  const float* g = u.log_().neg_().log_().neg_().data_ptr<float>();  // -log(-log u)
  float best = -INFINITY;
  int64_t arg = 0;
  for (int64_t j = 0; j < d; ++j) {
    const float score = x[j] + g[j];
    if (score > best) { best = score; arg = idx[j]; }
  }
  return arg;
}

struct Decoder : torch::CustomClassHolder {
  int64_t L, D, H, KV, E, I, S, V;
  double eps;
  std::vector<at::Tensor> keep;
  std::vector<QW> ws;  // per block q, k, v, o, gate, up, down; then the output layer
  std::vector<const float*> norms;
  std::vector<float*> kc, vc;
  std::vector<float> xr, xn, qkv, att, tmp, gu, hid;
  Act a_in, a_att, a_hid;
  at::Tensor embedding, inv_freq;  // for advance (set_input): a dense table, or empty
  bool has_input = false, own_rows = false;
  QW row_w;  // set_rows: a quantized embedding's rows in the kernel's layout
  bool has_row_w = false;
  Near near;

  // lists: tensors per layer (an empty tensor for None); ints per layer: group, bits, zero
  Decoder(std::vector<at::Tensor> norm_w, std::vector<at::Tensor> k_cache, std::vector<at::Tensor> v_cache,
          std::vector<at::Tensor> codes, std::vector<at::Tensor> scales, std::vector<at::Tensor> offsets,
          std::vector<at::Tensor> luts, std::vector<at::Tensor> biases, std::vector<int64_t> meta,
          int64_t n_heads, int64_t n_kv, double eps_) {
    L = (int64_t)k_cache.size();
    TORCH_CHECK(L > 0 && (int64_t)codes.size() == 7 * L + 1 && (int64_t)norm_w.size() == 2 * L + 1 &&
                (int64_t)v_cache.size() == L && (int64_t)meta.size() == 3 * (7 * L + 1), "Decoder: list lengths");
    H = n_heads; KV = n_kv; eps = eps_;
    D = norm_w[0].numel();
    TORCH_CHECK(k_cache[0].dim() == 4 && k_cache[0].size(0) == 1 && k_cache[0].size(1) == KV, "Decoder: cache shape");
    S = k_cache[0].size(2); E = k_cache[0].size(3);
    auto opt = [](const at::Tensor& t) { return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
    for (int64_t i = 0; i < 7 * L + 1; ++i) {
      const int64_t bits = meta[3 * i + 1];
      const int64_t K = bits == 4 ? 2 * codes[i].size(1) : codes[i].size(1);
      keep.push_back(codes[i]);
      ws.push_back(make_qw(codes[i], opt(scales[i]), opt(offsets[i]), opt(luts[i]), opt(biases[i]), meta[3 * i],
                           bits, meta[3 * i + 2], K, keep));
    }
    I = ws[4].N; V = ws[7 * L].N;
    for (int64_t l = 0; l < L; ++l) {
      const QW* w = &ws[7 * l];
      TORCH_CHECK(w[0].K == D && w[0].N == H * E && w[1].N == KV * E && w[2].N == KV * E && w[3].K == H * E &&
                  w[3].N == D && w[4].N == I && w[5].N == I && w[6].K == I && w[6].N == D, "Decoder: layer shapes");
      for (auto* c : {&k_cache[l], &v_cache[l]})
        TORCH_CHECK(c->is_contiguous() && c->scalar_type() == at::kFloat && c->sizes() == k_cache[0].sizes(),
                    "Decoder: the KV cache must be float32, contiguous, one shape");
      kc.push_back(k_cache[l].data_ptr<float>()); vc.push_back(v_cache[l].data_ptr<float>());
      keep.push_back(k_cache[l]); keep.push_back(v_cache[l]);
    }
    for (auto& t : norm_w) {
      keep.push_back(t.contiguous().to(at::kFloat));
      TORCH_CHECK(keep.back().numel() == D, "Decoder: norm shape");
      norms.push_back(keep.back().data_ptr<float>());
    }
    xr.resize(D); xn.resize(D); qkv.resize((H + 2 * KV) * E); att.resize(H * E); tmp.resize(D);
    gu.resize(2 * I); hid.resize(I);
  }

  void attention(int64_t l, int64_t pos) {
    const float scale = 1.f / std::sqrt((float)E);
    const int64_t group = H / KV;
    at::parallel_for(0, H, (pos + 1) * E * H >= 65536 ? 1 : H, [&](int64_t h0, int64_t h1) {
      std::vector<float> p(pos + 1);
      for (int64_t h = h0; h < h1; ++h) {
        const float* q = qkv.data() + h * E;
        const float* k = kc[l] + (h / group) * S * E;
        const float* v = vc[l] + (h / group) * S * E;
        float mx = -INFINITY;
        for (int64_t s = 0; s <= pos; ++s) { p[s] = dot_f32(q, k + s * E, E) * scale; mx = std::max(mx, p[s]); }
        float sum = 0.f;
        for (int64_t s = 0; s <= pos; ++s) { p[s] = std::exp(p[s] - mx); sum += p[s]; }
        float* o = att.data() + h * E;
        std::fill(o, o + E, 0.f);
        for (int64_t s = 0; s <= pos; ++s) {
          const float c = p[s] / sum;
          const float* vs = v + s * E;
          for (int64_t e = 0; e < E; ++e) o[e] += c * vs[e];
        }
      }
    });
  }

  at::Tensor step(at::Tensor x, at::Tensor cos, at::Tensor sin, int64_t pos, int64_t act) {
    TORCH_CHECK(x.numel() == D && x.scalar_type() == at::kFloat, "Decoder.step: x must be float32 with ", D, " values");
    TORCH_CHECK(cos.numel() == E && sin.numel() == E && 0 <= pos && pos < S, "Decoder.step: position or rotary shape");
    x = x.contiguous(); cos = cos.contiguous().to(at::kFloat); sin = sin.contiguous().to(at::kFloat);
    const bool int8 = act == 8;
    std::memcpy(xr.data(), x.data_ptr<float>(), D * sizeof(float));
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    float *q = qkv.data(), *k = q + H * E, *v = k + KV * E;
    for (int64_t l = 0; l < L; ++l) {
      const QW* w = &ws[7 * l];
      rmsnorm(xr.data(), norms[2 * l], D, (float)eps, xn.data());
      a_in.set(xn.data(), D, int8);
      for (int j = 0; j < 3; ++j) a_in.prepare(w[j]);
      const Job qkv_jobs[3] = {{&w[0], &a_in, q}, {&w[1], &a_in, k}, {&w[2], &a_in, v}};
      run_jobs(qkv_jobs, 3);
      for (int64_t h = 0; h < H; ++h) rope(q + h * E, cp, sp, E);
      for (int64_t h = 0; h < KV; ++h) {
        rope(k + h * E, cp, sp, E);
        std::memcpy(kc[l] + (h * S + pos) * E, k + h * E, E * sizeof(float));
        std::memcpy(vc[l] + (h * S + pos) * E, v + h * E, E * sizeof(float));
      }
      attention(l, pos);
      a_att.set(att.data(), H * E, int8);
      a_att.prepare(w[3]);
      const Job o_job{&w[3], &a_att, tmp.data()};
      run_jobs(&o_job, 1);
      for (int64_t i = 0; i < D; ++i) xr[i] += tmp[i];
      rmsnorm(xr.data(), norms[2 * l + 1], D, (float)eps, xn.data());
      a_in.set(xn.data(), D, int8);
      a_in.prepare(w[4]); a_in.prepare(w[5]);
      const Job gu_jobs[2] = {{&w[4], &a_in, gu.data()}, {&w[5], &a_in, gu.data() + I}};
      run_jobs(gu_jobs, 2);
      for (int64_t i = 0; i < I; ++i) { const float g = gu[i]; hid[i] = g / (1.f + std::exp(-g)) * gu[I + i]; }
      a_hid.set(hid.data(), I, int8);
      a_hid.prepare(w[6]);
      const Job d_job{&w[6], &a_hid, tmp.data()};
      run_jobs(&d_job, 1);
      for (int64_t i = 0; i < D; ++i) xr[i] += tmp[i];
    }
    rmsnorm(xr.data(), norms[2 * L], D, (float)eps, xn.data());
    a_in.set(xn.data(), D, int8);
    a_in.prepare(ws[7 * L]);
    at::Tensor logits = at::empty({1, V}, x.options());
    const Job head{&ws[7 * L], &a_in, logits.data_ptr<float>()};
    run_jobs(&head, 1);
    return logits;
  }

  // The rotary frequencies (E/2) and whether advance reads a token's input row itself (rows): from a dense
  // embedding table (any float dtype), or, given none (empty), from set_rows' layout.
  void set_input(at::Tensor emb, at::Tensor freq, bool rows) {
    TORCH_CHECK(freq.numel() * 2 == E, "Decoder.set_input: ", E / 2, " rotary frequencies expected");
    TORCH_CHECK(!emb.numel() || (emb.dim() == 2 && emb.size(1) == D), "Decoder.set_input: embedding shape");
    TORCH_CHECK(!rows || emb.numel() || has_row_w, "Decoder.set_input: no table to read rows from (set_rows)");
    embedding = emb; inv_freq = freq.contiguous().to(at::kFloat).clone(); has_input = true; own_rows = rows;
  }

  // A quantized embedding's rows in the kernel's layout (a tied output layer's own, or a copy), for set_input's rows
  void set_rows(at::Tensor codes, at::Tensor scale, at::Tensor offset, at::Tensor lut, int64_t group, int64_t bits,
                int64_t zero) {
    TORCH_CHECK(bits == 4 || bits == 8, "Decoder.set_rows: bits must be 4 or 8");
    const int64_t K = bits == 4 ? 2 * codes.size(1) : codes.size(1);
    TORCH_CHECK(K == D, "Decoder.set_rows: rows of ", D, " expected");
    auto opt = [](const at::Tensor& t) { return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
    keep.push_back(codes);
    row_w = make_qw(codes, scale, opt(offset), opt(lut), c10::nullopt, group, bits, zero, K, keep);
    has_row_w = true;
  }

  // One token for batch 1 with DecodeState.advance's choice and bookkeeping (models/cpu_step.py): reads token (1, 1),
  // pos (1,) and the row key; draws greedily (temperature <= 0) or with sample_row; writes out[0, count] (fill once
  // done) and logprobs[0, count], marks done on an EOS id (check_eos), feeds the choice back as token and moves pos
  // and count on by one. No Python between tokens.
  // x: the token's input row, or empty where the decoder reads it itself (set_input's rows).
  void advance(at::Tensor x, at::Tensor token, at::Tensor pos, at::Tensor count, at::Tensor out, at::Tensor logprobs,
               at::Tensor done, at::Tensor eos, at::Tensor fill, at::Tensor keys, bool check_eos, int64_t act,
               double temperature, int64_t top_k, double top_p, double min_p) {
    TORCH_CHECK(has_input, "Decoder.advance: call set_input first");
    for (auto* t : {&token, &pos, &count, &out, &eos, &fill, &keys})
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "Decoder.advance: int64 state expected");
    TORCH_CHECK(logprobs.scalar_type() == at::kFloat && logprobs.is_contiguous() && done.scalar_type() == at::kBool &&
                out.size(0) == 1 && logprobs.sizes() == out.sizes(), "Decoder.advance: state of batch 1 expected");
    int64_t* tp = token.data_ptr<int64_t>();
    int64_t* pp = pos.data_ptr<int64_t>();
    int64_t* cp = count.data_ptr<int64_t>();
    const int64_t c = cp[0];
    TORCH_CHECK(0 <= c && c < out.size(1), "Decoder.advance: count out of range");
    TORCH_CHECK(x.numel() == D || (!x.numel() && own_rows), "Decoder.advance: an input row of ", D, " expected");
    if (x.numel()) {
      x = x.reshape({D}).to(at::kFloat).contiguous();
    } else {
      TORCH_CHECK(0 <= tp[0] && tp[0] < (embedding.numel() ? embedding.size(0) : row_w.N),
                  "Decoder.advance: token out of range");
      if (embedding.numel()) {
        x = embedding.select(0, tp[0]).to(at::kFloat).contiguous();
      } else {
        x = at::empty({D}, out.options().dtype(at::kFloat));
        if (row_w.bits == 8) decode_rows<8, false>(row_w, tp[0], tp[0] + 1, x.data_ptr<float>());
        else if (row_w.lut) decode_rows<4, true>(row_w, tp[0], tp[0] + 1, x.data_ptr<float>());
        else decode_rows<4, false>(row_w, tp[0], tp[0] + 1, x.data_ptr<float>());
      }
    }
    at::Tensor cs = at::empty({2, E}, x.options());
    float* cosp = cs.data_ptr<float>();
    float* sinp = cosp + E;
    const float* f = inv_freq.data_ptr<float>();
    for (int64_t i = 0; i < E / 2; ++i) {  // as torch: float(pos)·inv_freq in float32, the two halves alike
      const float a = (float)pp[0] * f[i];
      cosp[i] = cosp[i + E / 2] = std::cos(a);
      sinp[i] = sinp[i + E / 2] = std::sin(a);
    }
    const at::Tensor logits = step(x, cs[0], cs[1], pp[0], act);
    const auto [idx, lp] = greedy(logits);  // the largest logit and log Σ exp (the chosen token's log-probability)
    const int64_t top = idx.data_ptr<int64_t>()[0];
    int64_t choice = top;
    float chosen = lp.data_ptr<float>()[0];
    const float* l = logits.data_ptr<float>();
    if (temperature > 0 && std::isfinite(l[top])) {  // else NaN or inf: the first of them, as torch.argmax picks
      choice = sample_row(l, V, (float)temperature, top_k, top_p, min_p, (uint32_t)keys.data_ptr<int64_t>()[0], c,
                          top, near);
      chosen += l[choice] - l[top];
    }
    bool* d = done.data_ptr<bool>();
    const int64_t nxt = d[0] ? fill.data_ptr<int64_t>()[0] : choice;
    out.data_ptr<int64_t>()[c] = nxt;
    logprobs.data_ptr<float>()[c] = chosen;
    if (check_eos)
      for (int64_t i = 0; i < eos.numel(); ++i) d[0] = d[0] || eos.data_ptr<int64_t>()[i] == nxt;
    tp[0] = nxt; pp[0] += 1; cp[0] += 1;
  }
};
}  // namespace

#define DECODE_CLASS \
  m.class_<Decoder>("Decoder") \
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, \
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, \
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, int64_t, int64_t, \
                       double>()) \
      .def("step", &Decoder::step) \
      .def("set_input", &Decoder::set_input) \
      .def("set_rows", &Decoder::set_rows) \
      .def("advance", &Decoder::advance);
"""
