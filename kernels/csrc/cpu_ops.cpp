// CPU kernels of prefix-serve, built at first use by kernels/cpu_ops.py (torch's JIT C++
// extension loader, -O3 -march=native, OpenMP through ATen's parallel_for).
//
// prefix_attention: the semantics of kernels/torch_attention.py, reading keys and values
// straight from the paged pool (no gather into a dense tensor):
//
//     keys(b)    = K[prefix slots 0..P_b-1] ++ K[own slots 0..n_b-1]
//     allowed(k) = k < P_b + (n_b - q_b) + j + 1          for new token j of request b
//     out[t, h]  = softmax(scale * q[t, h] . keys[allowed]^T) @ values[allowed]
//
// Scores, softmax and the weighted sum are float32 whatever the cache dtype. One work item
// is (request, kv head, a tile of its query rows): the query heads that share a kv head are
// done together, so every key and value row is read once per tile.
//
// The elementwise ops (rms_norm, add_rms_norm, rotary, silu_and_mul) round where HF's
// modules round, so a bfloat16 model computes what HF computes, in one pass per op.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
inline float load(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bf16_to_float(reinterpret_cast<const uint16_t*>(p)[i]);
  } else {
    return static_cast<float>(p[i]);
  }
}

// Round a float to T as torch does (round to nearest even for bfloat16 and half). For
// bfloat16 in integer arithmetic that vectorizes: bits + 0x7fff + (lowest kept bit), NaN kept.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (x != x) ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
}

template <typename T>
inline T round_to(float x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return c10::BFloat16(bf16_bits(x), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(x);
  }
}

// p[i] = x rounded to T.
template <typename T>
inline void store(T* p, int64_t i, float x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    reinterpret_cast<uint16_t*>(p)[i] = bf16_bits(x);
  } else {
    p[i] = static_cast<T>(x);
  }
}

constexpr int64_t kRowsPerTile = 8;

// exp(x) in float32 within ~1 ulp (Cephes' expf): x = n ln2 + r with n rounded by the
// 1.5 * 2^23 trick, exp(r) by a degree-6 polynomial, 2^n from the exponent bits. Plain
// arithmetic only (no floor, no calls), so loops over it vectorize. inf above 88.72, 0
// below -87.3 (where expf is denormal).
inline float exp_f32(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const float nc = n < -126.f ? -126.f : (n > 128.f ? 128.f : n);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(nc) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float out = y * scale;
  return x > 88.72283f ? std::numeric_limits<float>::infinity() : (x < -87.33654f ? 0.f : out);
}

// Softmax over scores[0..n) in place (float32), then scaled to sum to 1; returns the
// log-sum-exp of the scores.
inline float softmax_inplace(float* sg, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < n; ++k) m = std::max(m, sg[k]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) {
    sg[k] = exp_f32(sg[k] - m);
    sum += sg[k];
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) sg[k] *= inv;
  return m + std::log(sum);
}

// One query row's `group` heads (those sharing one kv head) against `visible` key rows:
// out_g = softmax(scale * q_g . K^T) @ V, all in float32.
template <typename T>
void attend_row_generic(const T* const* qrows, const T* const* krows, const T* const* vrows, int64_t visible,
                        int64_t group, int64_t head_dim, float scale, float* scores, int64_t cap, float* acc,
                        float* row, T* const* orows) {
  for (int64_t k = 0; k < visible; ++k) {
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) row[d] = load(krows[k], d);
    for (int64_t g = 0; g < group; ++g) {
      const T* qg = qrows[g];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += load(qg, d) * row[d];
      scores[g * cap + k] = dot * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) softmax_inplace(scores + g * cap, visible);
  std::fill(acc, acc + group * head_dim, 0.f);
  for (int64_t k = 0; k < visible; ++k) {
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) row[d] = load(vrows[k], d);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * cap + k];
      float* ag = acc + g * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) ag[d] += p * row[d];
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d) orows[g][d] = round_to<T>(acc[g * head_dim + d]);
}

template <typename T>
void attend_row(const T* const* qrows, const T* const* krows, const T* const* vrows, int64_t visible,
                int64_t group, int64_t head_dim, float scale, float* scores, int64_t cap, float* acc, float* row,
                T* const* orows) {
  attend_row_generic(qrows, krows, vrows, visible, group, head_dim, scale, scores, cap, acc, row, orows);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// bfloat16 with AVX512-BF16: q . k by vdpbf16ps (32 pairs of bf16 a step, float32 sums), the
// values widened to float32 16 at a time. Head dims that are a multiple of 32.
inline __m512 widen_bf16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p))), 16));
}

template <>
void attend_row<c10::BFloat16>(const c10::BFloat16* const* qrows, const c10::BFloat16* const* krows,
                               const c10::BFloat16* const* vrows, int64_t visible, int64_t group, int64_t head_dim,
                               float scale, float* scores, int64_t cap, float* acc, float* row,
                               c10::BFloat16* const* orows) {
  if (head_dim % 32 != 0 || head_dim > 256 || group > 16) {
    attend_row_generic(qrows, krows, vrows, visible, group, head_dim, scale, scores, cap, acc, row, orows);
    return;
  }
  const int64_t chunks = head_dim / 32;
  __m512bh q[16][8];
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < chunks; ++c) q[g][c] = (__m512bh)_mm512_loadu_si512(qrows[g] + 32 * c);
  for (int64_t k = 0; k < visible; ++k) {
    if (k + 8 < visible) {  // the rows are scattered over the pool: fetch ahead of the hardware
      _mm_prefetch(reinterpret_cast<const char*>(krows[k + 8]), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(krows[k + 8]) + 64, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(vrows[k + 8]), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(vrows[k + 8]) + 64, _MM_HINT_T0);
    }
    __m512bh kv[8];
    for (int64_t c = 0; c < chunks; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(krows[k] + 32 * c);
    for (int64_t g = 0; g < group; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) s = _mm512_dpbf16_ps(s, q[g][c], kv[c]);
      scores[g * cap + k] = _mm512_reduce_add_ps(s) * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) softmax_inplace(scores + g * cap, visible);
  const int64_t vecs = head_dim / 16;
  __m512 a[16][16];
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < vecs; ++c) a[g][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < visible; ++k) {
    __m512 v[16];
    for (int64_t c = 0; c < vecs; ++c) v[c] = widen_bf16(vrows[k] + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * cap + k]);
      for (int64_t c = 0; c < vecs; ++c) a[g][c] = _mm512_fmadd_ps(p, v[c], a[g][c]);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* ag = acc + g * head_dim;
    for (int64_t c = 0; c < vecs; ++c) _mm512_storeu_ps(ag + 16 * c, a[g][c]);
    for (int64_t d = 0; d < head_dim; ++d) orows[g][d] = round_to<c10::BFloat16>(ag[d]);
  }
}
#endif


template <typename T>
void prefix_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& cu_seqlens_q, const at::Tensor& prefix_lens,
                           const at::Tensor& prefix_tables, const at::Tensor& seq_lens,
                           const at::Tensor& block_tables, double scale, int64_t max_q_len, at::Tensor& out) {
  const int64_t num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t batch = prefix_lens.size(0);
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* plens = prefix_lens.data_ptr<int32_t>();
  const int32_t* slens = seq_lens.data_ptr<int32_t>();
  const int32_t* ptab = prefix_tables.data_ptr<int32_t>();
  const int32_t* otab = block_tables.data_ptr<int32_t>();
  const int64_t ptab_stride = prefix_tables.stride(0), otab_stride = block_tables.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t q_stride_t = q.stride(0), q_stride_h = q.stride(1);
  const int64_t o_stride_t = out.stride(0), o_stride_h = out.stride(1);
  const int64_t kv_block_stride = k_cache.stride(0), kv_slot_stride = k_cache.stride(1);
  const int64_t kv_head_stride = k_cache.stride(2);

  // Work items: (request, kv head, first query row of a tile).
  std::vector<int64_t> items;
  int64_t max_ctx = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q_len = cu[b + 1] - cu[b];
    if (q_len > max_q_len) continue;  // left to the caller (a long prefill chunk: matmuls do it better)
    max_ctx = std::max<int64_t>(max_ctx, plens[b] + slens[b]);
    for (int64_t h = 0; h < num_kv_heads; ++h)
      for (int64_t r = 0; r < q_len; r += kRowsPerTile) items.push_back((b * num_kv_heads + h) << 32 | r);
  }
  // Requests that read one prefix, one kv head after another: the second reads the prefix's
  // keys and values from the cache the first brought them into, not from memory again.
  auto first_block = [&](int64_t item) {
    const int64_t b = (item >> 32) / num_kv_heads;
    return plens[b] > 0 ? static_cast<int64_t>(ptab[b * ptab_stride]) : -1 - b;
  };
  std::stable_sort(items.begin(), items.end(), [&](int64_t x, int64_t y) {
    const int64_t px = first_block(x), py = first_block(y);
    if (px != py) return px < py;
    return ((x >> 32) % num_kv_heads) < ((y >> 32) % num_kv_heads);
  });

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> krows(max_ctx), vrows(max_ctx);
    std::vector<float> scores(group * max_ctx), acc(group * head_dim), row(head_dim);
    std::vector<const T*> qrows(group);
    std::vector<T*> orows(group);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t bh = items[it] >> 32, r0 = items[it] & 0xffffffff;
      const int64_t b = bh / num_kv_heads, kvh = bh % num_kv_heads;
      const int64_t q_start = cu[b], q_len = cu[b + 1] - cu[b];
      const int64_t plen = plens[b], slen = slens[b];
      // The rows of this request's keys and values, prefix segment then own segment.
      // Block by block: no division per slot (an integer division by the runtime block size
      // per row cost more than the attention itself over a 1,000-token prefix).
      auto fill = [&](const int32_t* table, int64_t n, int64_t first) {
        for (int64_t blk = 0; blk * block_size < n; ++blk) {
          const T* kb = kp + table[blk] * kv_block_stride + kvh * kv_head_stride;
          const T* vb = vp + table[blk] * kv_block_stride + kvh * kv_head_stride;
          const int64_t s0 = blk * block_size, s1 = std::min(n, s0 + block_size);
          for (int64_t s = s0; s < s1; ++s) {
            krows[first + s] = kb + (s - s0) * kv_slot_stride;
            vrows[first + s] = vb + (s - s0) * kv_slot_stride;
          }
        }
      };
      fill(ptab + b * ptab_stride, plen, 0);
      fill(otab + b * otab_stride, slen, plen);
      const int64_t r1 = std::min(q_len, r0 + kRowsPerTile);
      for (int64_t j = r0; j < r1; ++j) {
        const int64_t t = q_start + j;
        const int64_t visible = plen + (slen - q_len) + j + 1;  // keys this row may see
        for (int64_t g = 0; g < group; ++g) {
          qrows[g] = qp + t * q_stride_t + (kvh * group + g) * q_stride_h;
          orows[g] = op + t * o_stride_t + (kvh * group + g) * o_stride_h;
        }
        attend_row<T>(qrows.data(), krows.data(), vrows.data(), visible, group, head_dim, static_cast<float>(scale),
                      scores.data(), max_ctx, acc.data(), row.data(), orows.data());
      }
    }
  });
}

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t dim, float eps) {
  // HF's LlamaRMSNorm: x32 = x.float(); y = (x32 * rsqrt(mean(x32^2) + eps)).to(T); w * y (in T)
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * dim;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < dim; ++d) {
        const float v = load(xr, d);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
      T* yr = y + r * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) {
        const float normed = static_cast<float>(round_to<T>(load(xr, d) * inv));
        store(yr, d, load(w, d) * normed);
      }
    }
  });
}

template <typename T>
void silu_and_mul_rows(const T* gp, T* op, int64_t tokens, int64_t inter) {
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> act(inter);
    for (int64_t t = begin; t < end; ++t) {
      const T* g = gp + t * 2 * inter;
      const T* u = g + inter;
      T* o = op + t * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float x = load(g, i);
        act[i] = x / (1.f + exp_f32(-x));
      }
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) store(o, i, static_cast<float>(round_to<T>(act[i])) * load(u, i));
    }
  });
}

template <typename T>
void argmax_rows_impl(const T* x, int64_t* out, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * cols;
      float best = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : best)
      for (int64_t i = 0; i < cols; ++i) best = std::max(best, load(row, i));
      int64_t idx = 0;  // the first index holding the maximum (argmax's tie rule)
      for (int64_t i = 0; i < cols; ++i) {
        if (load(row, i) == best) {
          idx = i;
          break;
        }
      }
      out[r] = idx;
    }
  });
}

}  // namespace

void prefix_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& cu_seqlens_q, const at::Tensor& prefix_lens, const at::Tensor& prefix_tables,
                      const at::Tensor& seq_lens, const at::Tensor& block_tables, double scale, int64_t max_q_len,
                      at::Tensor& out) {
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.strides() == v_cache.strides(),
              "the KV caches must share a layout, contiguous in head_dim");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "q and out must be contiguous in head_dim");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == out.scalar_type(),
              "q, the caches and out must share a dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefix_attention", [&] {
    prefix_attention_impl<scalar_t>(q, k_cache, v_cache, cu_seqlens_q, prefix_lens, prefix_tables, seq_lens,
                                    block_tables, scale, max_q_len, out);
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm needs contiguous tensors");
  at::Tensor y = at::empty_like(x);
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, dim,
                            static_cast<float>(eps));
  });
  return y;
}

// residual += x (rounded to the dtype, as HF's `residual + x` is); returns rms_norm(residual).
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous(), "add_rms_norm needs contiguous tensors");
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    scalar_t* res = residual.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, rows * dim, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) res[i] = round_to<scalar_t>(load(res, i) + load(xp, i));
    });
  });
  return rms_norm(residual, weight, eps);
}

// x: [T, heads, head_dim] (a view with any stride over T and heads), cos, sin: [T, head_dim].
// In place: x = x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype
// (HF's apply_rotary_pos_emb in that dtype).
void rotary(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.stride(2) == 1 && cos.is_contiguous() && sin.is_contiguous(), "rotary: bad layout");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t st = x.stride(0), sh = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(dim);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* xr = xp + t * st + h * sh;
          for (int64_t d = 0; d < dim; ++d) row[d] = load(xr, d);
          for (int64_t d = 0; d < dim; ++d) {
            const float rot = d < half ? -row[d + half] : row[d - half];
            const float a = static_cast<float>(round_to<scalar_t>(row[d] * load(cp + t * dim, d)));
            const float b = static_cast<float>(round_to<scalar_t>(rot * load(sp + t * dim, d)));
            xr[d] = round_to<scalar_t>(a + b);
          }
        }
      }
    });
  });
}

// k: [T, Hkv, hd] (any strides over T and heads), v likewise: rotates k in place (as
// rotary does), then writes k and v to the pool rows slot_mapping[t] of the caches
// [num_blocks, block_size, Hkv, hd] (any layout with head_dim contiguous).
void rotary_and_store(at::Tensor& k, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                      at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  rotary(k, cos, sin);
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type(),
              "rotary_and_store: k, v and the caches must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && k_cache.strides() == v_cache.strides() && k.stride(2) == 1 &&
              v.stride(2) == 1, "rotary_and_store: bad layout");
  const int64_t tokens = k.size(0), heads = k.size(1), dim = k.size(2), block_size = k_cache.size(1);
  const int64_t cb = k_cache.stride(0), cs = k_cache.stride(1), ch = k_cache.stride(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t elem = k.element_size();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = (slots[t] / block_size) * cb + (slots[t] % block_size) * cs;
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(kc + (row + h * ch) * elem, kp + (t * k.stride(0) + h * k.stride(1)) * elem, dim * elem);
        std::memcpy(vc + (row + h * ch) * elem, vp + (t * v.stride(0) + h * v.stride(1)) * elem, dim * elem);
      }
    }
  });
}

// gate_up: [T, 2 * inter] (gate, then up) -> [T, inter] = act(gate) * up, rounded as HF rounds.
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous(), "silu_and_mul needs a contiguous tensor");
  const int64_t tokens = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({tokens, inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), tokens, inter);
  });
  return out;
}

// scores: [rows, n] contiguous -> (probs [rows, n] in the scores' dtype, lse [rows] float32):
// probs = softmax(scale * scores) in float32, rounded to the dtype (HF's eager attention:
// softmax(dtype=float32).to(dtype)), lse = log(sum(exp(scale * scores))). One pass per row.
template <typename T>
void softmax_lse_rows(const T* s, T* p, float* lse, int64_t rows, int64_t n, float scale) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> e(n);
    for (int64_t r = begin; r < end; ++r) {
      const T* sr = s + r * n;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) e[k] = load(sr, k) * scale;
      lse[r] = softmax_inplace(e.data(), n);
      T* pr = p + r * n;
      for (int64_t k = 0; k < n; ++k) store(pr, k, e[k]);
    }
  });
}

std::vector<at::Tensor> softmax_lse(const at::Tensor& scores, double scale) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous(), "softmax_lse needs a contiguous [rows, n] tensor");
  at::Tensor probs = at::empty_like(scores);
  at::Tensor lse = at::empty({scores.size(0)}, scores.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "softmax_lse", [&] {
    softmax_lse_rows<scalar_t>(scores.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                               scores.size(0), scores.size(1), static_cast<float>(scale));
  });
  return {probs, lse};
}

// x: [rows, cols] -> [rows] int64: the first index of each row's maximum (greedy decoding on
// logits in their own dtype: argmax of bfloat16 values equals argmax of their float32 copies).
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "argmax_rows needs a contiguous [rows, cols] tensor");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "argmax_rows", [&] {
    argmax_rows_impl<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), x.size(0), x.size(1));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prefix_attention", &prefix_attention,
        "paged prefix attention (varlen, GQA) into out, for the requests with at most max_q_len new tokens");
  m.def("rms_norm", &rms_norm, "HF LlamaRMSNorm");
  m.def("add_rms_norm", &add_rms_norm, "residual += x; return rms_norm(residual)");
  m.def("rotary", &rotary, "rotary position embedding, in place");
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up");
  m.def("argmax_rows", &argmax_rows, "first index of each row's maximum");
  m.def("softmax_lse", &softmax_lse, "softmax of scale * scores rounded to their dtype, and the log-sum-exp");
  m.def("rotary_and_store", &rotary_and_store, "rotary on k in place, then k and v into the paged caches");
}
