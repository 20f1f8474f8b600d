// hogwild's fused CPU kernels: the small per-layer work of a decode step in one pass each, where the same work
// in torch ops costs a dispatch and a TensorIterator per op (microseconds each, ~1,500 ops a step).
//
// - rms_norm: optional residual add, RMSNorm in float32, cast to the model's dtype, one pass per row.
// - silu_mul: silu(gate) * up from the fused gate/up projection's output.
// - argmax_logsumexp, near_best: the passes over the vocabulary after the logits (the sampler's argmax and
//   log-normalizer, the decoder's candidates to recompute in float32), where torch takes ~100 us a pass on one
//   row of a 152k vocabulary.
// - Plan: one step's concurrent attention over the shared blocks (see hogwild/attention.py for the maths). Per
//   layer it rotates the new keys at block-local positions and writes K/V into their blocks, then reads every
//   block once per kv head for all the query slots that see it (queries rotated per slot, softmax scale folded
//   in), keeping a partial softmax (max, sum, weighted values) per slot, and merges each token's partials exactly.
//
// Compiled with AVX2 and FMA (every x86-64 CPU hogwild runs its quantized kernels on); vectors are GCC vector
// extensions, eight floats wide.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
using bf16 = c10::BFloat16;

inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline v8 load8(const bf16* p) {  // bf16 is the top half of a float
  v8h h;
  std::memcpy(&h, p, sizeof h);
  v8u u = __builtin_convertvector(h, v8u) << 16;
  v8 v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }

inline void store8(bf16* p, v8 v) {  // round to nearest even, as c10 does
  for (int i = 0; i < 8; ++i) p[i] = bf16(v[i]);
}

inline float sum8(v8 v) {
  __m128 lo = _mm256_castps256_ps128((__m256)v), hi = _mm256_extractf128_ps((__m256)v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// the eight sums of a[0..7] in one vector: [sum(a0), ..., sum(a7)]
inline v8 sums8(const v8* a) {
  __m256 s01 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), s23 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
  __m256 s45 = _mm256_hadd_ps((__m256)a[4], (__m256)a[5]), s67 = _mm256_hadd_ps((__m256)a[6], (__m256)a[7]);
  __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return (v8)_mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// e^x, relative error ~2e-7 (Cephes' polynomial); inputs are clamped to where float32 e^x is finite and normal
inline v8 exp8(v8 x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.3f) ? splat(88.3f) : x;
  v8 n = (x * splat(1.44269504f) + splat(12582912.f)) - splat(12582912.f);  // round(x / ln 2)
  v8 r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return static_cast<float>(x); }

template <typename T>
inline T from_float(float x) {
  return static_cast<T>(x);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name, " must be float32 or bf16");
}

// ---------------------------------------------------------------------------------------------------------------
// x: [N, hidden] float32, updated in place by `residual` when given; -> weight * x / rms(x) in `dtype`

template <typename R, typename O>
void rms_norm_rows(float* x, const R* residual, int64_t residual_stride, const float* w, O* out, int64_t rows,
                   int64_t hidden, float eps) {
  for (int64_t n = 0; n < rows; ++n) {
    float* xr = x + n * hidden;
    O* o = out + n * hidden;
    v8 ss = splat(0.f);
    int64_t i = 0;
    for (; i + 8 <= hidden; i += 8) {
      v8 v = load8(xr + i);
      if (residual) {
        v += load8(residual + n * residual_stride + i);
        store8(xr + i, v);
      }
      ss += v * v;
    }
    float tail = 0.f;
    for (; i < hidden; ++i) {
      if (residual) xr[i] += to_float(residual[n * residual_stride + i]);
      tail += xr[i] * xr[i];
    }
    const float inv = 1.f / std::sqrt((sum8(ss) + tail) / static_cast<float>(hidden) + eps);
    for (i = 0; i + 8 <= hidden; i += 8) store8(o + i, load8(xr + i) * splat(inv) * load8(w + i));
    for (; i < hidden; ++i) o[i] = from_float<O>(xr[i] * inv * w[i]);
  }
}

at::Tensor rms_norm(at::Tensor x, std::optional<at::Tensor> residual, at::Tensor weight, double eps,
                    at::ScalarType dtype) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x must be [N, hidden] float32");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == x.size(1),
              "weight must be [hidden] float32");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "rms_norm writes float32 or bf16");
  const int64_t rows = x.size(0), hidden = x.size(1);
  at::Tensor out = at::empty({rows, hidden}, x.options().dtype(dtype));
  const float e = static_cast<float>(eps);
  auto run = [&](auto* o) {
    if (!residual) {
      rms_norm_rows<float>(x.data_ptr<float>(), nullptr, 0, weight.data_ptr<float>(), o, rows, hidden, e);
      return;
    }
    const at::Tensor& r = *residual;
    check_cpu(r, "residual");
    TORCH_CHECK(r.dim() == 2 && r.size(0) == rows && r.size(1) == hidden && r.stride(1) == 1,
                "residual must be [N, hidden] with contiguous rows");
    if (r.scalar_type() == at::kFloat)
      rms_norm_rows(x.data_ptr<float>(), r.data_ptr<float>(), r.stride(0), weight.data_ptr<float>(), o, rows,
                    hidden, e);
    else
      rms_norm_rows(x.data_ptr<float>(), r.data_ptr<bf16>(), r.stride(0), weight.data_ptr<float>(), o, rows,
                    hidden, e);
  };
  if (dtype == at::kFloat)
    run(out.data_ptr<float>());
  else
    run(out.data_ptr<bf16>());
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// gate_up: [N, 2 * I] (gate, then up) -> silu(gate) * up: [N, I], same dtype, computed in float32

template <typename T>
void silu_mul_rows(const T* in, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* gate = in + n * 2 * inter;
      const T* up = gate + inter;
      T* o = out + n * inter;
      int64_t i = 0;
      for (; i + 8 <= inter; i += 8) {
        v8 g = load8(gate + i);
        store8(o + i, g / (splat(1.f) + exp8(-g)) * load8(up + i));
      }
      for (; i < inter; ++i) {
        float g = to_float(gate[i]);
        o[i] = from_float<T>(g / (1.f + std::exp(-g)) * to_float(up[i]));
      }
    }
  });
}

at::Tensor silu_mul(at::Tensor gate_up) {
  check_cpu(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be [N, 2 * intermediate], contiguous");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat)
    silu_mul_rows(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, inter);
  else
    silu_mul_rows(gate_up.data_ptr<bf16>(), out.data_ptr<bf16>(), rows, inter);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// The vocabulary's passes: logits [R, V] float32, rows in parallel

inline float hmax(v8 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// a row's largest value, NaN where it holds one (as torch.amax has it)
float row_max(const float* x, int64_t n) {
  int64_t i = 0;
  v8 best[4] = {splat(-std::numeric_limits<float>::infinity()), best[0], best[0], best[0]};
  __m256 nan = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32)
    for (int j = 0; j < 4; ++j) {
      const __m256 v = (__m256)load8(x + i + 8 * j);
      best[j] = (v8)_mm256_max_ps((__m256)best[j], v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
  float top = hmax((v8)_mm256_max_ps(_mm256_max_ps((__m256)best[0], (__m256)best[1]),
                                     _mm256_max_ps((__m256)best[2], (__m256)best[3])));
  bool any_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < n; ++i) top = std::max(top, x[i]), any_nan = any_nan || std::isnan(x[i]);
  return any_nan ? std::numeric_limits<float>::quiet_NaN() : top;
}

// the first index of a row's largest value `top` (`row_max`; NaN counts as largest, as torch.argmax has it)
int64_t row_argmax(const float* x, int64_t n, float top) {
  if (std::isnan(top)) {
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(x[j])) return j;
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // the first vector holding it, then its lane
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps((__m256)load8(x + i), _mm256_set1_ps(top), _CMP_EQ_OQ));
    if (mask != 0) return i + __builtin_ctz(mask);
  }
  for (; i < n; ++i)
    if (x[i] == top) return i;
  return 0;  // every value -inf
}

// log(sum(exp(x))) of a row whose largest value is `top`: exp(x - top) summed in float32 a chunk at a time, the
// chunks in double
float row_logsumexp(const float* x, int64_t n, float top) {
  if (std::isinf(top) || std::isnan(top)) return top;
  constexpr int64_t CHUNK = 1024;
  double total = 0;
  for (int64_t c = 0; c < n; c += CHUNK) {
    const int64_t end = std::min(n, c + CHUNK);
    v8 acc[2] = {};
    int64_t i = c;
    for (; i + 16 <= end; i += 16) {
      acc[0] += exp8(load8(x + i) - splat(top));
      acc[1] += exp8(load8(x + i + 8) - splat(top));
    }
    for (; i + 8 <= end; i += 8) acc[0] += exp8(load8(x + i) - splat(top));
    float part = sum8(acc[0] + acc[1]);
    for (; i < end; ++i) part += std::exp(x[i] - top);
    total += part;
  }
  return top + static_cast<float>(std::log(total));
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.is_contiguous() && logits.size(1) > 0,
              "logits must be a contiguous float32 CPU matrix [rows, vocab]");
}

// -> (argmax [R] int64 of `choice` (the logits when not given: a masked copy of them), logsumexp [R] float32 of
// the logits)
std::tuple<at::Tensor, at::Tensor> argmax_logsumexp(at::Tensor logits, std::optional<at::Tensor> choice) {
  check_logits(logits);
  const at::Tensor& pick = choice.has_value() ? *choice : logits;
  check_logits(pick);
  TORCH_CHECK(pick.sizes() == logits.sizes(), "choice must have the logits' shape");
  const int64_t rows = logits.size(0), n = logits.size(1);
  at::Tensor index = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor norm = at::empty({rows}, logits.options());
  const float* x = logits.data_ptr<float>();
  const float* c = pick.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  float* np = norm.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float top = row_max(x + r * n, n);
      ip[r] = c == x ? row_argmax(x + r * n, n, top) : row_argmax(c + r * n, n, row_max(c + r * n, n));
      np[r] = row_logsumexp(x + r * n, n, top);
    }
  });
  return {index, norm};
}

// -> (rows, cols) int64: every entry within `margin` of its row's largest value, row by row, columns ascending
std::tuple<at::Tensor, at::Tensor> near_best(at::Tensor logits, double margin) {
  check_logits(logits);
  const int64_t rows = logits.size(0), n = logits.size(1);
  const float* x = logits.data_ptr<float>();
  std::vector<std::vector<int64_t>> found(rows);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * n;
      const float floor = row_max(row, n) - static_cast<float>(margin);
      int64_t i = 0;
      for (; i + 8 <= n; i += 8) {
        int mask = _mm256_movemask_ps(_mm256_cmp_ps((__m256)load8(row + i), _mm256_set1_ps(floor), _CMP_GE_OQ));
        for (; mask != 0; mask &= mask - 1) found[r].push_back(i + __builtin_ctz(mask));
      }
      for (; i < n; ++i)
        if (row[i] >= floor) found[r].push_back(i);
    }
  });
  int64_t total = 0;
  for (const auto& f : found) total += static_cast<int64_t>(f.size());
  at::Tensor out_rows = at::empty({total}, logits.options().dtype(at::kLong));
  at::Tensor out_cols = at::empty({total}, logits.options().dtype(at::kLong));
  int64_t* rp = out_rows.data_ptr<int64_t>();
  int64_t* cp = out_cols.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (const int64_t c : found[r]) *rp++ = r, *cp++ = c;
  return {out_rows, out_cols};
}

// ---------------------------------------------------------------------------------------------------------------
// A step's concurrent attention. Blocks: kv [layers, 2, kv_heads, capacity, D], contiguous, keys rotated at
// block-local positions. A slot is one token of one row reading one block: its query is rotated by `delta` (the
// token's flat position minus the block's offset in the row's view) and sees the block's first `limit` keys.

struct Read {  // one span of a block's keys, [first, first + length), and the slots that read it
  at::Tensor kv;
  int64_t first, length;
  int64_t start, end;  // its slots
};

// keys per span: a block longer than this is read as several spans, each with partials of its own, so that the
// threads share a long prompt's keys instead of one thread reading all of them
constexpr int64_t SPAN = 256;

struct Write {  // a row's new tokens: flat indices [start, start + count) go to positions [offset, ...) of kv
  at::Tensor kv;
  int64_t start, count, offset;
};

class Plan {
 public:
  Plan(int64_t heads, int64_t kv_heads, int64_t head_dim, at::Tensor cos, at::Tensor signed_sin,
       std::vector<at::Tensor> write_kv, std::vector<int64_t> write_start, std::vector<int64_t> write_count,
       std::vector<int64_t> write_offset, std::vector<at::Tensor> read_kv, std::vector<int64_t> read_length,
       std::vector<int64_t> read_start, std::vector<int64_t> read_end, std::vector<int64_t> slot_token,
       std::vector<int64_t> slot_delta, std::vector<int64_t> slot_limit, int64_t tokens, at::ScalarType out_dtype)
      : H_(heads), KV_(kv_heads), D_(head_dim), G_(heads / kv_heads), N_(tokens), cos_(cos), sin_(signed_sin) {
    TORCH_CHECK(heads % kv_heads == 0, "heads must be a multiple of kv_heads");
    TORCH_CHECK(head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128,
                "the fused attention takes head_dim 16, 32, 64 or 128");
    check_cpu(cos, "cos");
    TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.size(1) == head_dim &&
                    signed_sin.scalar_type() == cos.scalar_type() && signed_sin.sizes() == cos.sizes(),
                "rope tables must be [positions, head_dim], contiguous, one dtype");
    dtype_ = cos.scalar_type();
    const int64_t positions = cos.size(0);
    auto check_kv = [&](const at::Tensor& kv) {
      TORCH_CHECK(kv.scalar_type() == dtype_ && kv.is_contiguous() && kv.dim() == 5 && kv.size(1) == 2 &&
                      kv.size(2) == kv_heads && kv.size(4) == head_dim,
                  "block storage must be [layers, 2, kv_heads, capacity, head_dim], contiguous, in the cache dtype");
    };
    for (size_t r = 0; r < write_kv.size(); ++r) {
      check_kv(write_kv[r]);
      TORCH_CHECK(write_offset[r] + write_count[r] <= write_kv[r].size(3), "a row's block has no room reserved");
      TORCH_CHECK(write_offset[r] + write_count[r] <= positions, "a row overflows the rope tables");
      TORCH_CHECK(write_start[r] >= 0 && write_start[r] + write_count[r] <= tokens, "a row's tokens are out of range");
      writes_.push_back({write_kv[r], write_start[r], write_count[r], write_offset[r]});
    }
    const int64_t given = static_cast<int64_t>(slot_token.size());
    TORCH_CHECK(slot_delta.size() == static_cast<size_t>(given) && slot_limit.size() == static_cast<size_t>(given),
                "one delta and one limit per slot");
    for (int64_t s = 0; s < given; ++s) {
      TORCH_CHECK(0 <= slot_token[s] && slot_token[s] < tokens, "a slot's token is out of range");
      TORCH_CHECK(0 <= slot_delta[s] && slot_delta[s] < positions, "a slot's rotation is out of the rope tables");
    }
    // the reads, cut into spans of SPAN keys: a span's slots are its read's, limits cut to the span
    for (size_t r = 0; r < read_kv.size(); ++r) {
      check_kv(read_kv[r]);
      TORCH_CHECK(0 <= read_start[r] && read_start[r] < read_end[r] && read_end[r] <= given, "bad slot range");
      TORCH_CHECK(read_length[r] <= read_kv[r].size(3), "a read runs past its block's storage");
      for (int64_t first = 0; first < read_length[r]; first += SPAN) {
        const int64_t length = std::min(SPAN, read_length[r] - first), start = slot_token_.size();
        bool seen = false;
        for (int64_t s = read_start[r]; s < read_end[r]; ++s) {
          TORCH_CHECK(0 <= slot_limit[s] && slot_limit[s] <= read_length[r], "a slot's limit runs past its read");
          const int64_t limit = std::clamp<int64_t>(slot_limit[s] - first, 0, length);
          slot_token_.push_back(slot_token[s]);
          slot_delta_.push_back(slot_delta[s]);
          slot_limit_.push_back(limit);
          seen = seen || limit > 0;
        }
        if (seen)
          reads_.push_back({read_kv[r], first, length, start, static_cast<int64_t>(slot_token_.size())});
        else  // no slot sees a key of this span
          for (auto* v : {&slot_token_, &slot_delta_, &slot_limit_}) v->resize(start);
      }
    }
    const int64_t slots = static_cast<int64_t>(slot_token_.size());
    // each token's slots, for the merge
    token_slots_.assign(tokens + 1, 0);
    for (int64_t s = 0; s < slots; ++s) ++token_slots_[slot_token_[s] + 1];
    for (int64_t n = 0; n < tokens; ++n) token_slots_[n + 1] += token_slots_[n];
    slot_order_.resize(slots);
    std::vector<int64_t> fill(token_slots_.begin(), token_slots_.end() - 1);
    for (int64_t s = 0; s < slots; ++s) slot_order_[fill[slot_token_[s]]++] = s;
    // partials: per slot and head, the max score, the sum of exp, and the exp-weighted values
    at::TensorOptions f32 = at::TensorOptions().dtype(at::kFloat);
    partial_max_ = at::empty({slots, heads}, f32);
    partial_sum_ = at::empty({slots, heads}, f32);
    partial_out_ = at::empty({slots, heads, head_dim}, f32);
    out_ = at::empty({tokens, heads * head_dim}, f32.dtype(out_dtype));
    TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16, "attention writes float32 or bf16");
  }

  // q: [N, heads, D], k, v: [N, kv_heads, D], float32 or bf16 (one dtype), rows of each may be strided (views of
  // the fused qkv projection) -> [N, heads * D] in the output dtype; the returned tensor is reused by the next layer
  at::Tensor attend(int64_t layer, at::Tensor q, at::Tensor k, at::Tensor v) {
    for (const at::Tensor* t : {&q, &k, &v}) {
      TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->dim() == 3 && t->size(0) == N_ && t->size(2) == D_ &&
                      t->stride(2) == 1,
                  "q, k, v must be [N, heads, head_dim] in one dtype, head_dim contiguous");
    }
    check_cpu(q, "q");
    TORCH_CHECK(q.size(1) == H_ && k.size(1) == KV_ && v.size(1) == KV_, "q, k, v head counts");
    Input in{q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
             v.stride(0), v.stride(1)};
    return dispatch(layer, in, q.scalar_type());
  }

  // qkv: [N, (heads + 2 * kv_heads) * D], the fused projection's output as it comes (float32 or bf16)
  at::Tensor attend_qkv(int64_t layer, at::Tensor qkv) {
    check_cpu(qkv, "qkv");
    TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == N_ && qkv.size(1) == (H_ + 2 * KV_) * D_ && qkv.stride(1) == 1,
                "qkv must be [N, (heads + 2 * kv_heads) * head_dim] with contiguous rows");
    const int64_t row = qkv.stride(0), size = qkv.element_size();
    const char* base = static_cast<const char*>(qkv.data_ptr());
    Input in{base, base + H_ * D_ * size, base + (H_ + KV_) * D_ * size, row, D_, row, D_, row, D_};
    return dispatch(layer, in, qkv.scalar_type());
  }

 private:
  struct Input {  // q, k, v: element strides between tokens and between heads
    const void *q, *k, *v;
    int64_t q_row, q_head, k_row, k_head, v_row, v_head;
  };

  at::Tensor dispatch(int64_t layer, const Input& in, at::ScalarType input) {
    const bool f = input == at::kFloat;
    if (dtype_ == at::kFloat)
      f ? run<float, float>(layer, in) : run<float, bf16>(layer, in);
    else
      f ? run<bf16, float>(layer, in) : run<bf16, bf16>(layer, in);
    return out_;
  }

  // T: the cache's dtype; I: the new q, k, v's
  template <typename T, typename I>
  void run(int64_t layer, const Input& in) {
    write_new<T, I>(layer, in);
    const int64_t items = KV_ * static_cast<int64_t>(reads_.size());
    // items differ in size (spans of a few keys to SPAN): threads take the next one as they finish
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items)))
    for (int64_t item = 0; item < items; ++item) {
      const int64_t h = item % KV_;
      const Read& read = reads_[item / KV_];
      switch (D_) {
        case 16: read_block<T, I, 16>(layer, h, read, in); break;
        case 32: read_block<T, I, 32>(layer, h, read, in); break;
        case 64: read_block<T, I, 64>(layer, h, read, in); break;
        default: read_block<T, I, 128>(layer, h, read, in); break;
      }
    }
    if (out_.scalar_type() == at::kFloat)
      merge(out_.data_ptr<float>());
    else
      merge(out_.data_ptr<bf16>());
  }

  // the new tokens' keys rotated at their block-local positions, and their values, into their blocks
  template <typename T, typename I>
  void write_new(int64_t layer, const Input& in) {
    const T* cs = cos_.data_ptr<T>();
    const T* sn = sin_.data_ptr<T>();
    const I* kp = static_cast<const I*>(in.k);
    const I* vp = static_cast<const I*>(in.v);
    const int64_t half = D_ / 2;
    for (const Write& w : writes_) {
      T* base = w.kv.data_ptr<T>();
      const int64_t capacity = w.kv.size(3);
      for (int64_t t = 0; t < w.count; ++t) {
        const int64_t token = w.start + t, position = w.offset + t;
        const T* c = cs + position * D_;
        const T* s = sn + position * D_;
        for (int64_t h = 0; h < KV_; ++h) {
          const I* key = kp + token * in.k_row + h * in.k_head;
          const I* value = vp + token * in.v_row + h * in.v_head;
          T* keys = base + ((layer * 2 * KV_ + h) * capacity + position) * D_;
          T* values = base + ((layer * 2 * KV_ + KV_ + h) * capacity + position) * D_;
          for (int64_t d = 0; d < D_; ++d) {
            const int64_t other = d < half ? d + half : d - half;
            keys[d] = from_float<T>(to_float(key[d]) * to_float(c[d]) + to_float(key[other]) * to_float(s[d]));
            values[d] = from_float<T>(to_float(value[d]));
          }
        }
      }
    }
  }

  // one kv head of one block for all of its slots: queries [Q = slots * group, D] against the block's keys
  template <typename T, typename I, int D>
  void read_block(int64_t layer, int64_t h, const Read& read, const Input& in) {
    const int64_t slots = read.end - read.start, Q = slots * G_, L = read.length;
    const int64_t capacity = read.kv.size(3);
    const T* base = read.kv.data_ptr<T>();
    const T* keys = base + ((layer * 2 * KV_ + h) * capacity + read.first) * D;
    const T* values = base + ((layer * 2 * KV_ + KV_ + h) * capacity + read.first) * D;
    thread_local std::vector<float> qf, kf, vf, scores;  // per thread, reused
    qf.resize(Q * D);
    const int64_t Lpad = (L + 7) / 8 * 8;
    scores.resize(Q * Lpad);

    // queries rotated by their slot's delta, the softmax scale folded in
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    const I* qp = static_cast<const I*>(in.q);
    const T* cs = cos_.data_ptr<T>();
    const T* sn = sin_.data_ptr<T>();
    for (int64_t s = 0; s < slots; ++s) {
      const int64_t slot = read.start + s, token = slot_token_[slot], delta = slot_delta_[slot];
      const T* c = cs + delta * D;
      const T* sgn = sn + delta * D;
      for (int64_t j = 0; j < G_; ++j) {
        const I* src = qp + token * in.q_row + (h * G_ + j) * in.q_head;
        float* dst = qf.data() + (s * G_ + j) * D;
        for (int d = 0; d < D / 2; d += 8) {  // the halves swap: x * cos + (x2, x1) * signed sin
          const v8 x1 = load8(src + d), x2 = load8(src + D / 2 + d);
          store8(dst + d, (x1 * load8(c + d) + x2 * load8(sgn + d)) * splat(scale));
          store8(dst + D / 2 + d, (x2 * load8(c + D / 2 + d) + x1 * load8(sgn + D / 2 + d)) * splat(scale));
        }
      }
    }
    // keys and values in tiles of TILE that stay in L1 while every query reads them (as float32: a bf16 cache
    // converts each tile once)
    constexpr int64_t TILE = 64;
    kf.resize(TILE * D);
    vf.resize(TILE * D);
    auto tile = [&](const T* src, int64_t from, int64_t count) -> const float* {
      if constexpr (std::is_same_v<T, float>) {
        return src + from * D;
      } else {
        float* dst = (src == keys ? kf : vf).data();
        for (int64_t i = 0; i < count * D; i += 8) store8(dst + i, load8(src + from * D + i));
        return dst;
      }
    };
    // scores [Q, L]: eight keys at a time, eight independent sums, added across lanes together
    for (int64_t l0 = 0; l0 < L; l0 += TILE) {
      const int64_t count = std::min(TILE, L - l0);
      const float* kt = tile(keys, l0, count);
      for (int64_t i = 0; i < Q; ++i) {
        const float* qr = qf.data() + i * D;
        float* row = scores.data() + i * Lpad + l0;
        int64_t l = 0;
        for (; l + 8 <= count; l += 8) {
          v8 acc[8] = {};
          for (int d = 0; d < D; d += 8) {
            const v8 qd = load8(qr + d);
            for (int j = 0; j < 8; ++j) acc[j] += qd * load8(kt + (l + j) * D + d);
          }
          store8(row + l, sums8(acc));
        }
        for (; l < count; ++l) {
          v8 a = {};
          for (int d = 0; d < D; d += 8) a += load8(qr + d) * load8(kt + l * D + d);
          row[l] = sum8(a);
        }
      }
    }
    // per query: softmax over its first `limit` keys, unnormalized (the merge divides)
    float* pmax = partial_max_.data_ptr<float>();
    float* psum = partial_sum_.data_ptr<float>();
    float* pout = partial_out_.data_ptr<float>();
    for (int64_t s = 0; s < slots; ++s) {
      const int64_t slot = read.start + s, limit = slot_limit_[slot];
      for (int64_t j = 0; j < G_; ++j) {
        float* row = scores.data() + (s * G_ + j) * Lpad;
        const int64_t at = slot * H_ + h * G_ + j;
        std::memset(pout + at * D, 0, D * sizeof(float));
        if (limit == 0) {
          pmax[at] = -std::numeric_limits<float>::infinity();
          psum[at] = 0.f;
          continue;
        }
        v8 tops = splat(-std::numeric_limits<float>::infinity());
        int64_t l = 0;
        for (; l + 8 <= limit; l += 8) {
          const v8 x = load8(row + l);
          tops = x > tops ? x : tops;
        }
        float top = tops[0];
        for (int i = 1; i < 8; ++i) top = std::max(top, tops[i]);
        for (; l < limit; ++l) top = std::max(top, row[l]);
        v8 total = splat(0.f);
        for (l = 0; l + 8 <= limit; l += 8) {
          v8 p = exp8(load8(row + l) - splat(top));
          store8(row + l, p);
          total += p;
        }
        float tail = 0.f;
        for (; l < limit; ++l) {
          row[l] = std::exp(row[l] - top);
          tail += row[l];
        }
        pmax[at] = top;
        psum[at] = sum8(total) + tail;
      }
    }
    // the weighted values, tile by tile: out[i] += p[i, l] * v[l] over each query's visible keys
    for (int64_t l0 = 0; l0 < L; l0 += TILE) {
      const int64_t count = std::min(TILE, L - l0);
      const float* vt = tile(values, l0, count);
      for (int64_t i = 0; i < Q; ++i) {
        const int64_t slot = read.start + i / G_, end = std::min(count, slot_limit_[slot] - l0);
        if (end <= 0) continue;
        const float* p = scores.data() + i * Lpad + l0;
        float* out = pout + (slot * H_ + h * G_ + i % G_) * D;
        v8 acc[D / 8];
        for (int d = 0; d < D / 8; ++d) acc[d] = load8(out + d * 8);
        for (int64_t l = 0; l < end; ++l) {
          const v8 w = splat(p[l]);
          for (int d = 0; d < D / 8; ++d) acc[d] += w * load8(vt + l * D + d * 8);
        }
        for (int d = 0; d < D / 8; ++d) store8(out + d * 8, acc[d]);
      }
    }
  }

  // each token's output: its slots' partial softmaxes merged exactly (rescaled to the largest max)
  template <typename O>
  void merge(O* out) {
    const float* pmax = partial_max_.data_ptr<float>();
    const float* psum = partial_sum_.data_ptr<float>();
    const float* pout = partial_out_.data_ptr<float>();
    std::vector<float> acc(D_);
    for (int64_t n = 0; n < N_; ++n) {
      for (int64_t head = 0; head < H_; ++head) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t i = token_slots_[n]; i < token_slots_[n + 1]; ++i)
          top = std::max(top, pmax[slot_order_[i] * H_ + head]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float total = 0.f;
        for (int64_t i = token_slots_[n]; i < token_slots_[n + 1]; ++i) {
          const int64_t at = slot_order_[i] * H_ + head;
          if (psum[at] == 0.f) continue;
          const float weight = std::exp(pmax[at] - top);
          total += weight * psum[at];
          const float* o = pout + at * D_;
          for (int64_t d = 0; d < D_; ++d) acc[d] += weight * o[d];
        }
        O* dst = out + (n * H_ + head) * D_;
        const float inv = 1.f / total;
        for (int64_t d = 0; d < D_; ++d) dst[d] = from_float<O>(acc[d] * inv);
      }
    }
  }

  int64_t H_, KV_, D_, G_, N_;
  at::ScalarType dtype_;
  at::Tensor cos_, sin_;
  std::vector<Write> writes_;
  std::vector<Read> reads_;
  std::vector<int64_t> slot_token_, slot_delta_, slot_limit_;
  std::vector<int64_t> token_slots_, slot_order_;
  at::Tensor partial_max_, partial_sum_, partial_out_, out_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hogwild's fused CPU kernels: RMSNorm, silu * up, the vocabulary's passes, a decode step's attention";
  m.def("rms_norm", &rms_norm, "x += residual (when given); weight * x / rms(x) in dtype", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"), py::arg("dtype"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused [N, 2 * I] gate/up output", py::arg("gate_up"));
  m.def("argmax_logsumexp", &argmax_logsumexp,
        "per row of float32 logits [R, V]: (argmax of choice, else of the logits; logsumexp of the logits)",
        py::arg("logits"), py::arg("choice") = py::none());
  m.def("near_best", &near_best, "(rows, cols) of the logits within margin of their row's largest",
        py::arg("logits"), py::arg("margin"));
  py::class_<Plan>(m, "Plan")
      .def(py::init<int64_t, int64_t, int64_t, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<int64_t>,
                    std::vector<int64_t>, std::vector<int64_t>, std::vector<at::Tensor>, std::vector<int64_t>,
                    std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                    std::vector<int64_t>, int64_t, at::ScalarType>(),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("cos"), py::arg("signed_sin"),
           py::arg("write_kv"), py::arg("write_start"), py::arg("write_count"), py::arg("write_offset"),
           py::arg("read_kv"), py::arg("read_length"), py::arg("read_start"), py::arg("read_end"),
           py::arg("slot_token"), py::arg("slot_delta"), py::arg("slot_limit"), py::arg("tokens"),
           py::arg("out_dtype"))
      .def("attend", &Plan::attend)
      .def("attend_qkv", &Plan::attend_qkv);
}
