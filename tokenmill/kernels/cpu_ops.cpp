// Fused CPU kernels of the tokenmill engine, registered as torch.ops.tokenmill.*.
//
// Eager PyTorch spends most of a small model's decode step dispatching tiny
// operators (an RMSNorm is five of them, rotary embeddings seven) and gathering
// each sequence's keys out of the paged cache before attention. These kernels do
// the same arithmetic in one pass each, reading the paged cache in place.
//
// Numerics follow the eager code they replace (tokenmill/models/layers/): sums
// and transcendental functions in float32, and a rounding to the activation
// dtype wherever the eager code holds an intermediate in that dtype. So bf16
// results match eager bf16 up to the last bit of a few values, and float32
// results match up to summation order.
//
// AVX-512 (F + BW) only: the loader does not build this file on other CPUs, and
// the engine keeps its eager path there. Work is split across threads with
// at::parallel_for (torch's own OpenMP runtime).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__)
#error "tokenmill's fused CPU kernels need AVX-512 F and BW"
#endif

namespace {

using BF16 = c10::BFloat16;

// ---- 16-lane float vectors, loaded from and stored to float or bf16 ----------------
inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << remaining) - 1u);
}

inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load(const BF16* p, __mmask16 m) {
  const __m256i half = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// Round to nearest even, as c10::BFloat16 does; NaN stays a quiet NaN.
inline __m512 round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
  rounded = _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(rounded);
}

inline void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store(BF16* p, __m512 v, __mmask16 m) {
  const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(round_bf16(v)), 16);
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(bits));
}

// The value `v` takes once held in T (identity for float).
template <typename T>
inline __m512 through(__m512 v) { return v; }
template <>
inline __m512 through<BF16>(__m512 v) { return round_bf16(v); }

// exp in float32: 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 (in two parts),
// p Cephes' degree-6 expf polynomial; about 1 ulp. Inputs are clamped to the finite range.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3365478515625f)), _mm512_set1_ps(88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline float exp1(float x) { return _mm512_cvtss_f32(exp16(_mm512_set1_ps(x))); }

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

bool supported_dtype(at::ScalarType type) { return type == at::kFloat || type == at::kBFloat16; }

// ---- RMSNorm ---------------------------------------------------------------------------
// gemma: out = T(x_hat * (1 + w)), x_hat in float32 (Gemma's RMSNorm).
// else:  out = T(w * T(x_hat))                      (Llama's RMSNorm).
template <typename T>
void norm_row(const T* x, const T* weight, T* out, int64_t dim, float eps, bool gemma) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < dim; j += 16) {
    const __m512 v = load(x + j, tail_mask(dim - j));
    sum = _mm512_fmadd_ps(v, v, sum);
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(sum) / static_cast<float>(dim) + eps);
  const __m512 scale = _mm512_set1_ps(inv), one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < dim; j += 16) {
    const __mmask16 m = tail_mask(dim - j);
    const __m512 normed = _mm512_mul_ps(load(x + j, m), scale);
    const __m512 w = load(weight + j, m);
    store(out + j, gemma ? _mm512_mul_ps(normed, _mm512_add_ps(one, w)) : _mm512_mul_ps(w, through<T>(normed)), m);
  }
}

template <typename T>
void rms_norm_impl(const T* x, T* residual, const T* add, const T* weight, T* out, int64_t rows, int64_t dim,
                   float eps, bool gemma) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* src = x + r * dim;
      if (residual != nullptr) {  // residual = T(residual + add), then normalize it
        T* row = residual + r * dim;
        for (int64_t j = 0; j < dim; j += 16) {
          const __mmask16 m = tail_mask(dim - j);
          store(row + j, _mm512_add_ps(load(row + j, m), load(add + r * dim + j, m)), m);
        }
        src = row;
      }
      norm_row(src, weight, out + r * dim, dim, eps, gemma);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(supported_dtype(x.scalar_type()), "rms_norm: float32 or bfloat16 only");
  TORCH_CHECK(weight.numel() == dim && weight.scalar_type() == x.scalar_type(), "weight must be [dim] in x's dtype");
  auto out = at::empty_like(x);
  const int64_t rows = x.numel() / dim;
  if (x.scalar_type() == at::kFloat) {
    rms_norm_impl<float>(x.data_ptr<float>(), nullptr, nullptr, weight.data_ptr<float>(), out.data_ptr<float>(), rows,
                         dim, static_cast<float>(eps), gemma);
  } else {
    rms_norm_impl<BF16>(x.data_ptr<BF16>(), nullptr, nullptr, weight.data_ptr<BF16>(), out.data_ptr<BF16>(), rows,
                        dim, static_cast<float>(eps), gemma);
  }
  return out;
}

// residual = T(residual + x) in place; returns its RMSNorm.
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps, bool gemma) {
  check_cpu(x, "x");
  check_cpu(residual, "residual");
  check_cpu(weight, "weight");
  TORCH_CHECK(supported_dtype(x.scalar_type()), "add_rms_norm: float32 or bfloat16 only");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type(),
              "x and residual must have the same shape and dtype");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(weight.numel() == dim && weight.scalar_type() == x.scalar_type(), "weight must be [dim] in x's dtype");
  auto out = at::empty_like(x);
  const int64_t rows = x.numel() / dim;
  if (x.scalar_type() == at::kFloat) {
    rms_norm_impl<float>(nullptr, residual.data_ptr<float>(), x.data_ptr<float>(), weight.data_ptr<float>(),
                         out.data_ptr<float>(), rows, dim, static_cast<float>(eps), gemma);
  } else {
    rms_norm_impl<BF16>(nullptr, residual.data_ptr<BF16>(), x.data_ptr<BF16>(), weight.data_ptr<BF16>(),
                        out.data_ptr<BF16>(), rows, dim, static_cast<float>(eps), gemma);
  }
  return out;
}

// ---- q/k norms and rotary embeddings -------------------------------------------------
// qkv: [tokens, (H + 2 KV) * D] from the fused projection; cos, sin: [tokens, D] tables in
// qkv's dtype (both halves equal, as the eager code builds them). Returns q [tokens, H, D]
// and k [tokens, KV, D], each optionally RMS-normalized per head, then rotated
// (rotate-half): T(T(x * cos) + T(rotate_half(x) * sin)).
template <typename T>
void norm_rope_head(const T* src, T* dst, const T* weight, int64_t dim, float eps, bool gemma, const T* cos_row,
                    const T* sin_row) {
  T normed[1024];
  const T* x = src;
  if (weight != nullptr) {
    norm_row(src, weight, normed, dim, eps, gemma);
    x = normed;
  }
  const int64_t half = dim / 2;
  for (int64_t j = 0; j < half; j += 16) {
    const __mmask16 m = tail_mask(half - j);
    const __m512 x1 = load(x + j, m), x2 = load(x + half + j, m);
    const __m512 c = load(cos_row + j, m), s = load(sin_row + j, m);
    const __m512 neg_x2 = _mm512_sub_ps(_mm512_setzero_ps(), x2);
    store(dst + j, _mm512_add_ps(through<T>(_mm512_mul_ps(x1, c)), through<T>(_mm512_mul_ps(neg_x2, s))), m);
    store(dst + half + j, _mm512_add_ps(through<T>(_mm512_mul_ps(x2, c)), through<T>(_mm512_mul_ps(x1, s))), m);
  }
}

template <typename T>
void qk_norm_rope_impl(const at::Tensor& qkv, const T* qw, const T* kw, const at::Tensor& cos, const at::Tensor& sin,
                       int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float eps, bool gemma,
                       at::Tensor& q, at::Tensor& k) {
  const int64_t tokens = qkv.size(0), width = qkv.size(1);
  const T* src = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* qp = q.data_ptr<T>();
  T* kp = k.data_ptr<T>();
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = src + t * width;
      const T* c = cp + t * head_dim;
      const T* s = sp + t * head_dim;
      for (int64_t h = 0; h < num_heads; ++h)
        norm_rope_head(row + h * head_dim, qp + (t * num_heads + h) * head_dim, qw, head_dim, eps, gemma, c, s);
      for (int64_t h = 0; h < num_kv_heads; ++h)
        norm_rope_head(row + (num_heads + h) * head_dim, kp + (t * num_kv_heads + h) * head_dim, kw, head_dim, eps,
                       gemma, c, s);
    }
  });
}

std::vector<at::Tensor> qk_norm_rope(const at::Tensor& qkv, const c10::optional<at::Tensor>& q_weight,
                                     const c10::optional<at::Tensor>& k_weight, const at::Tensor& cos,
                                     const at::Tensor& sin, int64_t num_heads, int64_t num_kv_heads,
                                     int64_t head_dim, double eps, bool gemma) {
  check_cpu(qkv, "qkv");
  check_cpu(cos, "cos");
  check_cpu(sin, "sin");
  TORCH_CHECK(supported_dtype(qkv.scalar_type()), "qk_norm_rope: float32 or bfloat16 only");
  TORCH_CHECK(head_dim % 2 == 0 && head_dim <= 1024, "head_dim must be even and at most 1024");
  const int64_t tokens = qkv.size(0);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "qkv must be [tokens, (H + 2 KV) * D]");
  TORCH_CHECK(cos.numel() == tokens * head_dim && sin.numel() == tokens * head_dim &&
                  cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "cos and sin must be [tokens, D] tables in qkv's dtype");
  TORCH_CHECK(q_weight.has_value() == k_weight.has_value(), "give both q and k norm weights or neither");
  for (const auto* w : {&q_weight, &k_weight}) {
    if (w->has_value()) {
      check_cpu(w->value(), "norm weight");
      TORCH_CHECK(w->value().numel() == head_dim && w->value().scalar_type() == qkv.scalar_type(),
                  "q/k norm weights must be [head_dim] in qkv's dtype");
    }
  }
  auto q = at::empty({tokens, num_heads, head_dim}, qkv.options());
  auto k = at::empty({tokens, num_kv_heads, head_dim}, qkv.options());
  if (qkv.scalar_type() == at::kFloat) {
    qk_norm_rope_impl<float>(qkv, q_weight ? q_weight->data_ptr<float>() : nullptr,
                             k_weight ? k_weight->data_ptr<float>() : nullptr, cos, sin, num_heads, num_kv_heads,
                             head_dim, static_cast<float>(eps), gemma, q, k);
  } else {
    qk_norm_rope_impl<BF16>(qkv, q_weight ? q_weight->data_ptr<BF16>() : nullptr,
                            k_weight ? k_weight->data_ptr<BF16>() : nullptr, cos, sin, num_heads, num_kv_heads,
                            head_dim, static_cast<float>(eps), gemma, q, k);
  }
  return {q, k};
}

// ---- gated activations ----------------------------------------------------------------
// gate_up: [tokens, 2 I] (gate then up). Returns T(T(act(gate)) * up).
inline __m512 gelu_tanh16(__m512 x) {
  // tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits at both ends, absolute error ~1e-7.
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  const __m512 e = exp16(_mm512_add_ps(u, u));
  const __m512 tanh_u = _mm512_sub_ps(_mm512_set1_ps(1.f), _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.f), tanh_u));
}
inline __m512 silu16(__m512 x) {
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

template <typename T>
void gated_impl(const T* src, T* dst, int64_t rows, int64_t inter, bool gelu) {
  at::parallel_for(0, rows * inter, 2048, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {  // within one row at a time: [i, row_end)
      const int64_t r = i / inter, row_end = std::min(end, (r + 1) * inter);
      const T* gate = src + r * 2 * inter;
      const T* up = gate + inter;
      T* out = dst + r * inter;
      for (int64_t j = i - r * inter; j < row_end - r * inter; j += 16) {
        const __mmask16 m = tail_mask(row_end - r * inter - j);
        const __m512 g = load(gate + j, m);
        const __m512 a = through<T>(gelu ? gelu_tanh16(g) : silu16(g));
        store(out + j, _mm512_mul_ps(a, load(up + j, m)), m);
      }
      i = row_end;
    }
  });
}

at::Tensor gated_activation(const at::Tensor& gate_up, const std::string& activation) {
  check_cpu(gate_up, "gate_up");
  TORCH_CHECK(supported_dtype(gate_up.scalar_type()), "gated_activation: float32 or bfloat16 only");
  const int64_t width = gate_up.size(-1);
  TORCH_CHECK(width % 2 == 0, "gate_up must have an even last dimension");
  const bool gelu = activation == "gelu_tanh";
  TORCH_CHECK(gelu || activation == "silu", "activation must be gelu_tanh or silu");
  const int64_t inter = width / 2, rows = gate_up.numel() / width;
  auto sizes = gate_up.sizes().vec();
  sizes.back() = inter;
  auto out = at::empty(sizes, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    gated_impl<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, inter, gelu);
  } else {
    gated_impl<BF16>(gate_up.data_ptr<BF16>(), out.data_ptr<BF16>(), rows, inter, gelu);
  }
  return out;
}

// ---- decode attention over the paged cache ---------------------------------------------
// q: [seqs, H, D]; caches: [blocks, block_size, KV, D]; block_tables: [seqs, max_blocks]
// int64; context_lens: [seqs] int64 (keys 0..ctx-1 are valid, the query sits at ctx-1).
// Head h of sequence s attends to keys lo..ctx-1 of KV head h / (H / KV), with
// lo = ctx - window when window > 0. Softmax in float32, online block by block.
constexpr int64_t kMaxGroup = 8;  // query heads whose dot products are accumulated together
constexpr int64_t kTile = 16;     // keys per tile (and per online-softmax update)

// Scores of G query heads (g0..g0+G-1) for a full tile of 16 keys, four keys at a time:
// 4 x G independent accumulators, so no FMA waits for the previous one.
template <typename T, int G>
inline void qk_full_tile(const float* query, int64_t chunks, int64_t dim, const T* k_first, int64_t stride,
                         int64_t g0, float* scores) {
  for (int i0 = 0; i0 < kTile; i0 += 4) {
    __m512 acc[4][G];
    for (int j = 0; j < 4; ++j)
      for (int g = 0; g < G; ++g) acc[j][g] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __mmask16 m = tail_mask(dim - c * 16);
      __m512 qv[G];
      for (int g = 0; g < G; ++g) qv[g] = _mm512_loadu_ps(query + ((g0 + g) * chunks + c) * 16);
      for (int j = 0; j < 4; ++j) {
        const __m512 kv = load(k_first + (i0 + j) * stride + c * 16, m);
        for (int g = 0; g < G; ++g) acc[j][g] = _mm512_fmadd_ps(qv[g], kv, acc[j][g]);
      }
    }
    for (int j = 0; j < 4; ++j)
      for (int g = 0; g < G; ++g) scores[(g0 + g) * 16 + i0 + j] = _mm512_reduce_add_ps(acc[j][g]);
  }
}

// acc[g] += sum_i weights[g][i] * v[i] over a full tile: the tile's 16 value chunks sit in
// registers while every head of the group accumulates them, two chains per head.
template <typename T>
inline void pv_full_tile(const float* weights, int64_t group, int64_t chunks, int64_t dim, const T* v_first,
                         int64_t stride, float* acc) {
  for (int64_t c = 0; c < chunks; ++c) {
    const __mmask16 m = tail_mask(dim - c * 16);
    __m512 vv[kTile];
    for (int i = 0; i < kTile; ++i) vv[i] = load(v_first + i * stride + c * 16, m);
    for (int64_t g = 0; g < group; ++g) {
      float* slot = acc + (g * chunks + c) * 16;
      const float* w = weights + g * 16;
      __m512 a0 = _mm512_loadu_ps(slot), a1 = _mm512_setzero_ps();
      for (int i = 0; i < kTile; i += 2) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[i]), vv[i], a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(w[i + 1]), vv[i + 1], a1);
      }
      _mm512_storeu_ps(slot, _mm512_add_ps(a0, a1));
    }
  }
}

template <typename T>
inline void qk_full_tile_heads(const float* query, int64_t group, int64_t chunks, int64_t dim, const T* k_first,
                               int64_t stride, float* scores) {
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    switch (std::min<int64_t>(4, group - g0)) {
      case 4: qk_full_tile<T, 4>(query, chunks, dim, k_first, stride, g0, scores); break;
      case 3: qk_full_tile<T, 3>(query, chunks, dim, k_first, stride, g0, scores); break;
      case 2: qk_full_tile<T, 2>(query, chunks, dim, k_first, stride, g0, scores); break;
      default: qk_full_tile<T, 1>(query, chunks, dim, k_first, stride, g0, scores); break;
    }
  }
}

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens, float scale,
                           int64_t window, at::Tensor& out) {
  const int64_t seqs = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = key_cache.size(1), kv_heads = key_cache.size(2);
  const int64_t group = heads / kv_heads, max_blocks = block_tables.size(1);
  const int64_t chunks = (dim + 15) / 16;
  const T* qp = q.data_ptr<T>();
  const T* kp = key_cache.data_ptr<T>();
  const T* vp = value_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * chunks * 16), acc(group * chunks * 16), scores(group * 16);
    std::vector<float> best(group), total(group);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kv_heads, kvh = task % kv_heads;
      const int64_t ctx = lens[s];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, ctx - window) : 0;
      for (int64_t g = 0; g < group; ++g) {
        const T* src = qp + (s * heads + kvh * group + g) * dim;
        for (int64_t c = 0; c < chunks; ++c) {
          const __mmask16 m = tail_mask(dim - c * 16);
          _mm512_storeu_ps(query.data() + (g * chunks + c) * 16, _mm512_mul_ps(load(src + c * 16, m), _mm512_set1_ps(scale)));
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
      std::fill(total.begin(), total.end(), 0.f);
      // Keys in tiles of at most 16 consecutive positions inside one block.
      for (int64_t first = lo, last; first < ctx; first = last) {
        const int64_t b = first / block_size;
        last = std::min({ctx, (b + 1) * block_size, first + 16});
        const int64_t count = last - first;
        const int64_t block = tables[s * max_blocks + b];
        const int64_t stride = kv_heads * dim;  // between tokens of a block
        const T* k_first = kp + (block * block_size * kv_heads + kvh) * dim + (first - b * block_size) * stride;
        const T* v_first = vp + (block * block_size * kv_heads + kvh) * dim + (first - b * block_size) * stride;
        // Scores of every head of the group for the block's keys: each key row is read once.
        if (count == kTile) {
          qk_full_tile_heads<T>(query.data(), group, chunks, dim, k_first, stride, scores.data());
        } else {
        for (int64_t i = 0; i < count; ++i) {
          const T* key = k_first + i * stride;
          for (int64_t g0 = 0; g0 < group; g0 += kMaxGroup) {
            const int64_t g1 = std::min(group, g0 + kMaxGroup);
            __m512 dot[kMaxGroup];
            for (int64_t g = g0; g < g1; ++g) dot[g - g0] = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c) {
              const __m512 kv = load(key + c * 16, tail_mask(dim - c * 16));
              for (int64_t g = g0; g < g1; ++g)
                dot[g - g0] = _mm512_fmadd_ps(_mm512_loadu_ps(query.data() + (g * chunks + c) * 16), kv, dot[g - g0]);
            }
            for (int64_t g = g0; g < g1; ++g) scores[g * 16 + i] = _mm512_reduce_add_ps(dot[g - g0]);
          }
        }
        }
        // Online softmax, one block at a time: rescale the sums when the maximum grows.
        const __mmask16 valid = tail_mask(count);
        for (int64_t g = 0; g < group; ++g) {
          const __m512 sg = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), valid,
                                                 scores.data() + g * 16);
          const float block_max = _mm512_reduce_max_ps(sg);
          if (block_max > best[g]) {
            const float correction = _mm512_cvtss_f32(exp16(_mm512_set1_ps(best[g] - block_max)));  // 0 at first
            total[g] *= correction;
            float* ag = acc.data() + g * chunks * 16;
            const __m512 corr = _mm512_set1_ps(correction);
            for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(ag + c * 16, _mm512_mul_ps(_mm512_loadu_ps(ag + c * 16), corr));
            best[g] = block_max;
          }
          const __m512 weights = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(sg, _mm512_set1_ps(best[g]))));
          total[g] += _mm512_reduce_add_ps(weights);
          _mm512_storeu_ps(scores.data() + g * 16, weights);
        }
        // Weighted values: each value row is read once for the whole group.
        if (count == kTile) {
          pv_full_tile<T>(scores.data(), group, chunks, dim, v_first, stride, acc.data());
          continue;
        }
        for (int64_t i = 0; i < count; ++i) {
          const T* value = v_first + i * stride;
          for (int64_t c = 0; c < chunks; ++c) {
            const __m512 vv = load(value + c * 16, tail_mask(dim - c * 16));
            for (int64_t g = 0; g < group; ++g) {
              float* slot = acc.data() + (g * chunks + c) * 16;
              _mm512_storeu_ps(slot, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * 16 + i]), vv, _mm512_loadu_ps(slot)));
            }
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* dst = op + (s * heads + kvh * group + g) * dim;
        const __m512 inv = _mm512_set1_ps(total[g] > 0.f ? 1.f / total[g] : 0.f);
        const float* ag = acc.data() + g * chunks * 16;
        for (int64_t c = 0; c < chunks; ++c)
          store(dst + c * 16, _mm512_mul_ps(_mm512_loadu_ps(ag + c * 16), inv), tail_mask(dim - c * 16));
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window) {
  check_cpu(q, "q");
  check_cpu(key_cache, "key_cache");
  check_cpu(value_cache, "value_cache");
  check_cpu(block_tables, "block_tables");
  check_cpu(context_lens, "context_lens");
  TORCH_CHECK(supported_dtype(q.scalar_type()), "paged_decode_attention: float32 or bfloat16 only");
  TORCH_CHECK(q.dim() == 3 && key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(),
              "q [seqs, H, D] and caches [blocks, block_size, KV, D] expected");
  TORCH_CHECK(q.size(2) == key_cache.size(3) && q.size(1) % key_cache.size(2) == 0, "head shapes do not match");
  TORCH_CHECK(q.scalar_type() == key_cache.scalar_type() && q.scalar_type() == value_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.numel() == q.size(0), "one row per sequence");
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kFloat) {
    decode_attention_impl<float>(q, key_cache, value_cache, block_tables, context_lens, static_cast<float>(scale),
                                 window, out);
  } else {
    decode_attention_impl<BF16>(q, key_cache, value_cache, block_tables, context_lens, static_cast<float>(scale),
                                window, out);
  }
  return out;
}

// ---- weight-only int8 matmul for a few rows --------------------------------------------
// out[m, n] = T(sx[m] * scale[n] * sum_k xq[m, k] * w[n, k] + bias[n]): each activation
// row is first quantized to int16 with its own scale (sx = absmax / 32767; its rounding
// error is far below that of the bf16 activation itself), then multiplied with the
// int8 weights in 16-bit integer pairs accumulated in int32 (exact: a lane sums at most
// K / 16 products of |xq| <= 32767 and |w| <= 127, so K <= 8192 cannot overflow).
// Converting int8 weights to float for float FMAs costs more than reading them; the
// pairwise integer multiply (`vpdpwssd` with AVX-512 VNNI) keeps a decode step of a few
// sequences bound by memory. Eight weight rows at a time, so eight load streams overlap;
// each row is read from memory once (from L1 for the later pairs of activation rows).
constexpr int64_t kInt8Rows = 8;
constexpr int64_t kInt8MaxK = 8192;

inline __m512i dot_pairs(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// `ahead`: a later block of R rows (R * K contiguous bytes) to prefetch while this one
// is multiplied, R * 32 bytes of it per step (all of it by the end), or null. The
// hardware prefetcher alone does not ramp up on runs of only K bytes per row.
template <int MM, int R>
inline void int8_rows(const int16_t* xq, int64_t K, const int8_t* w, const int8_t* ahead, float* sums /* [MM][R] */) {
  __m512i acc[MM][R];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 32) {
    if (ahead != nullptr) {
      for (int64_t line = 0; line < R * 32; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + R * k + line), _MM_HINT_T0);
    }
    __m512i wv[R];
    for (int r = 0; r < R; ++r)
      wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k)));
    for (int m = 0; m < MM; ++m) {
      const __m512i xv = _mm512_loadu_si512(xq + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = dot_pairs(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < R; ++r) sums[m * R + r] = _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[m][r]));
}

template <typename T, int R>
void int8_block(const int16_t* xq, const float* xs, int64_t M, int64_t K, int64_t N, const int8_t* w, int64_t n0,
                const float* scales, const T* bias, T* out) {
  float sums[2 * R];
  const int8_t* ahead = n0 + 3 * R <= N ? w + (n0 + 2 * R) * K : nullptr;  // two blocks on
  for (int64_t m = 0; m < M; m += 2) {
    const int pair = M - m >= 2 ? 2 : 1;
    if (pair == 2) {
      int8_rows<2, R>(xq + m * K, K, w + n0 * K, m == 0 ? ahead : nullptr, sums);
    } else {
      int8_rows<1, R>(xq + m * K, K, w + n0 * K, m == 0 ? ahead : nullptr, sums);
    }
    for (int i = 0; i < pair; ++i) {
      for (int r = 0; r < R; ++r) {
        float v = sums[i * R + r] * xs[m + i] * scales[n0 + r];
        if (bias != nullptr) v += static_cast<float>(bias[n0 + r]);
        out[(m + i) * N + n0 + r] = static_cast<T>(v);
      }
    }
  }
}

template <typename T>
void int8_linear_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M);
  const T* xp = x.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m) {
    float absmax = 0.f;
    for (int64_t k = 0; k < K; ++k) absmax = std::max(absmax, std::abs(static_cast<float>(xp[m * K + k])));
    const float inv = absmax > 0.f ? 32767.f / absmax : 0.f;
    xs[m] = absmax / 32767.f;
    for (int64_t k = 0; k < K; ++k)
      xq[m * K + k] = static_cast<int16_t>(std::nearbyint(static_cast<float>(xp[m * K + k]) * inv));
  }
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  const T* b = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* o = out.data_ptr<T>();
  const int64_t blocks = N / kInt8Rows;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk)
      int8_block<T, kInt8Rows>(xq.data(), xs.data(), M, K, N, w, blk * kInt8Rows, sc, b, o);
  });
  for (int64_t n = blocks * kInt8Rows; n < N; ++n) int8_block<T, 1>(xq.data(), xs.data(), M, K, N, w, n, sc, b, o);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  check_cpu(scales, "scales");
  TORCH_CHECK(supported_dtype(x.scalar_type()), "int8_linear: float32 or bfloat16 activations only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "int8_linear: shapes do not match");
  TORCH_CHECK(weight.scalar_type() == at::kChar, "int8_linear: the weight must be int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == weight.size(0),
              "int8_linear: one float32 scale per output row");
  TORCH_CHECK(x.size(1) % 32 == 0 && x.size(1) <= kInt8MaxK,
              "int8_linear: the input width must be a multiple of 32, at most ", kInt8MaxK);
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == weight.size(0),
                "int8_linear: the bias must match the output rows and the activation dtype");
  }
  auto out = at::empty({x.size(0), weight.size(0)}, x.options());
  if (x.scalar_type() == at::kFloat) {
    int8_linear_impl<float>(x, weight, scales, bias, out);
  } else {
    int8_linear_impl<BF16>(x, weight, scales, bias, out);
  }
  return out;
}

// ---- this step's keys and values into their cache slots ---------------------------------
// k, v: [tokens, kv_heads, head_dim], rows may be strided (views into the fused q/k/v
// projection), each head's head_dim contiguous; caches: [blocks, block_size, kv_heads,
// head_dim] contiguous; slots: [tokens] int64 flat slot of each token. One call for
// both caches, a memcpy per token and head, instead of two index_copy_ calls.
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& key_cache, at::Tensor& value_cache,
              const at::Tensor& slots) {
  check_cpu(key_cache, "key_cache");
  check_cpu(value_cache, "value_cache");
  check_cpu(slots, "slots");
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu(), "store_kv: CPU tensors only");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "store_kv: k and v must both be [tokens, kv_heads, head_dim]");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes() && key_cache.size(2) == k.size(1) &&
                  key_cache.size(3) == k.size(2),
              "store_kv: the caches must be [blocks, block_size, kv_heads, head_dim] matching k and v");
  TORCH_CHECK(k.scalar_type() == key_cache.scalar_type() && v.scalar_type() == value_cache.scalar_type(),
              "store_kv: k and v must have the caches' dtype");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "store_kv: head_dim must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == k.size(0), "store_kv: one int64 slot per token");
  const int64_t tokens = k.size(0), kv_heads = k.size(1), dim = k.size(2);
  const int64_t num_slots = key_cache.size(0) * key_cache.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "store_kv: slot out of range");
  const int64_t item = k.element_size();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(key_cache.data_ptr());
  char* vc = static_cast<char*>(value_cache.data_ptr());
  const int64_t row = kv_heads * dim * item;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::memcpy(kc + sp[t] * row + h * dim * item, kp + (t * k.stride(0) + h * k.stride(1)) * item, dim * item);
      std::memcpy(vc + sp[t] * row + h * dim * item, vp + (t * v.stride(0) + h * v.stride(1)) * item, dim * item);
    }
  }
}

}  // namespace

TORCH_LIBRARY(tokenmill, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool gemma) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps, bool gemma) -> Tensor", &add_rms_norm);
  m.def("qk_norm_rope(Tensor qkv, Tensor? q_weight, Tensor? k_weight, Tensor cos, Tensor sin, "
        "int num_heads, int num_kv_heads, int head_dim, float eps, bool gemma) -> Tensor[]", &qk_norm_rope);
  m.def("gated_activation(Tensor gate_up, str activation) -> Tensor", &gated_activation);
  m.def("paged_decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window) -> Tensor", &paged_decode_attention);
  m.def("store_kv(Tensor k, Tensor v, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slots) -> ()",
        &store_kv);
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, Tensor? bias) -> Tensor", &int8_linear);
}
