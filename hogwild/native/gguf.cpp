// hogwild's GGUF block kernels: y = x @ W^T where W is a GGUF tensor's own blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
// Q4_K, Q5_K, Q6_K, F16, BF16, F32; llama.cpp's layouts, ggml-common.h), read where they lie (a memory-mapped file)
// and never converted to float.
//
// A call quantizes each activation row once, the way the weights' block type needs it (the "activation layouts"
// below), then splits the weight rows over torch's threads by bytes (a call under 64 KB stays on its thread). Each
// weight row's blocks are decoded once in registers and dotted, in integers, against up to kTile activation rows
// (8 with AVX-512, 4 with AVX2). A decode step is one such pass: every weight byte is read from memory once, for
// all its rows. With more rows than a tile (a prompt), or rows so long that a tile's activations would not stay
// in L1, a chunk of weight rows is kept in L2 while every tile of rows passes through it a block of K at a time,
// each (weight row, activation row) keeping its 16 partial sums between blocks; the next chunk is prefetched into L2
// as one is read (a K block's short run of each row defeats the hardware prefetchers: without it 2 rows of a
// K = 8960 Q4_K matrix took 3x one row's time, with it 1.3x). A decode step of rows that long takes this path too.
//
// The integer products are all u8 x s8 (`vpdpbusd` with AVX-512 VNNI; `vpmaddubsw` + `vpmaddwd` with AVX2):
// - 32-element blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): activations are int8 per block of 32 with a float scale d and
//   the block's sum s. Four blocks make a group: one 512-bit register holds 16 elements of each, one block per
//   128-bit lane, so two `vpdpbusd` leave each block's dot product spread over its lane's four int32s, and the
//   float work (convert, scale, accumulate) is one instruction per four blocks. Offsets come out of the sums:
//   Q4_0's q - 8 is sum(q a) - 8 s (the accumulator starts at -8 s), Q5_0's -16 likewise, Q8_0 is read as u8
//   (q + 128) less 128 s; Q4_1/Q5_1's min m adds m * d_a * s.
// - K-quants (Q4_K, Q5_K, Q6_K): int8 per super-block of 256 with one float scale and the sums of each sub-block,
//   the elements stored in the order the weights' nibbles come out of their loads, so four `vpdpbusd` dot a
//   super-block with each 128-bit lane on one sub-block; the sums (int16-sized) are packed in pairs and multiplied
//   by the sub-blocks' integer scales in one `vpmaddwd`, and the float work is once per super-block. Q4_K/Q5_K's
//   mins come from the 32-element sums, Q6_K's -32 from the 16-element ones.
// - F16, BF16, F32: float activations, converted weights, FMA.
//
// A row's result is the same alone or among any number of rows: its sums run in one fixed order whatever the tile
// or block of K it lands in (the file is compiled with -ffp-contract=off, and every fused multiply-add is written
// out). On Zen 4 the vector pipes are the scarce resource and the scalar ones idle, so fields that need gathering
// from several blocks (scales, Q5's fifth bits) are assembled with scalar loads and shifts.
//
// Base flags are AVX2/FMA/F16C; the AVX-512 functions carry target attributes and run only where the CPU reports
// AVX-512 F/BW/VL/VNNI (`HOGWILD_KERNEL_ISA=avx2`, or `set_isa("avx2")`, forces the AVX2 ones).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <pybind11/stl.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Formats

enum : int64_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

enum class Layout { Float, B32, KQ4, KQ6 };  // the activation layout a block type reads

struct Format {
  int64_t type;
  const char* name;
  int64_t block;  // elements per block
  int64_t bytes;  // bytes per block
  Layout layout;
};

constexpr Format kFormats[] = {
    {F32, "F32", 1, 4, Layout::Float},     {F16, "F16", 1, 2, Layout::Float},     {BF16, "BF16", 1, 2, Layout::Float},
    {Q4_0, "Q4_0", 32, 18, Layout::B32},   {Q4_1, "Q4_1", 32, 20, Layout::B32},   {Q5_0, "Q5_0", 32, 22, Layout::B32},
    {Q5_1, "Q5_1", 32, 24, Layout::B32},   {Q8_0, "Q8_0", 32, 34, Layout::B32},   {Q4_K, "Q4_K", 256, 144, Layout::KQ4},
    {Q5_K, "Q5_K", 256, 176, Layout::KQ4}, {Q6_K, "Q6_K", 256, 210, Layout::KQ6},
};

const Format& format(int64_t type) {
  for (const Format& f : kFormats)
    if (f.type == type) return f;
  TORCH_CHECK(false, "GGML type ", type,
              " is not one hogwild's block kernels read: F32=0, F16=1, Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8, "
              "Q4_K=12, Q5_K=13, Q6_K=14, BF16=30");
}

inline uint16_t u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline float half(const uint8_t* p) { return _cvtsh_ss(u16(p)); }

// Q4_K/Q5_K's 12 scale bytes -> 16 bytes: eight 6-bit scales, then eight 6-bit mins. Bytes 0-3 hold scales 0-3 in
// their low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7 take their low 4 bits from bytes 8-11 (low and high
// nibble) and their top 2 bits from the spare top bits of bytes 0-3 and 4-7.
inline void k_scales(const uint8_t* p, uint32_t out[4]) {
  uint32_t a = u32(p), b = u32(p + 4), c = u32(p + 8);
  out[0] = a & 0x3f3f3f3f;
  out[1] = (c & 0x0f0f0f0f) | (((a >> 6) & 0x03030303) << 4);
  out[2] = b & 0x3f3f3f3f;
  out[3] = ((c >> 4) & 0x0f0f0f0f) | (((b >> 6) & 0x03030303) << 4);
}

// ---------------------------------------------------------------------------------------------------------------
// Activation layouts: one row's activations, quantized for one family of block types

// Four 32-element blocks of a row (the last group of a row may hold fewer; the rest is zeros).
struct alignas(64) B32Group {
  int8_t q[128];     // elements 0-15 of blocks 0-3 (16 bytes each), then elements 16-31 of blocks 0-3
  float d[16];       // block c's scale in lanes 4c..4c+3
  int32_t nsum[16];  // minus block c's sum of q in lanes 4c..4c+3
  float dsum[16];    // d * sum(q) of block c in lane 4c, 0 in the other three
};

// One 256-element super-block of a row.
struct alignas(64) KGroup {
  int8_t q[256];  // Q4_K/Q5_K: four 64-byte quarters, 16 bytes of sub-block 2c (or 2c + 1) in lane c of each:
                  // [sb 2c, elements 0-15], [sb 2c, 16-31], [sb 2c + 1, 0-15], [sb 2c + 1, 16-31]; Q6_K: in order
  float d[16];    // the scale, in every lane
  union {
    float dsum[16];    // Q4_K/Q5_K: d * the sum of q over sub-block j (j < 8), then 0
    int16_t nsum[32];  // Q6_K: minus the sum of q over 16-element sub-block j (j < 16), then 0
  };
};

static_assert(sizeof(B32Group) == 320 && sizeof(KGroup) == 384, "activation layouts are whole cache lines");


inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Symmetric int8 for n (a multiple of 32) floats: d = max|x| / 127, q = x * (1 / d) rounded half to even, every step
// in float32 (the tests' reference does the same). Returns d.
float quantize_block(const float* x, int n, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  const float d = hmax8(amax) / 127.0f;
  const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int i = 0; i < n; i += 32) {
    __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), id));  // MXCSR: round half to even
    __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), id));
    __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), id));
    __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), id));
    __m256i ab = _mm256_packs_epi32(a, b), ce = _mm256_packs_epi32(c, e);
    __m256i v = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, ce), order);  // undo the lane interleave
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), v);
  }
  return d;
}

inline int32_t sum_q(const int8_t* q, int n) {
  int32_t s = 0;
  for (int i = 0; i < n; ++i) s += q[i];
  return s;
}

void prepare_b32(const float* x, int64_t k, B32Group* out) {
  const int64_t blocks = k / 32, groups = (blocks + 3) / 4;
  alignas(32) int8_t q[32];
  for (int64_t g = 0; g < groups; ++g) {
    B32Group& G = out[g];
    std::memset(&G, 0, sizeof G);
    for (int c = 0; c < 4 && 4 * g + c < blocks; ++c) {
      const float d = quantize_block(x + 32 * (4 * g + c), 32, q);
      const int32_t s = sum_q(q, 32);
      std::memcpy(G.q + 16 * c, q, 16);
      std::memcpy(G.q + 64 + 16 * c, q + 16, 16);
      for (int e = 0; e < 4; ++e) G.d[4 * c + e] = d, G.nsum[4 * c + e] = -s;
      G.dsum[4 * c] = d * static_cast<float>(s);
    }
  }
}

void prepare_k(const float* x, int64_t k, Layout layout, KGroup* out) {
  alignas(32) int8_t q[256];
  for (int64_t b = 0; b < k / 256; ++b) {
    KGroup& G = out[b];
    const float d = quantize_block(x + 256 * b, 256, q);
    for (int e = 0; e < 16; ++e) G.d[e] = d;
    std::memset(G.nsum, 0, sizeof G.nsum);
    if (layout == Layout::KQ4) {
      for (int c = 0; c < 4; ++c)
        for (int part = 0; part < 4; ++part)  // part: (odd sub-block, second half)
          std::memcpy(G.q + 64 * part + 16 * c, q + 32 * (2 * c + part / 2) + 16 * (part % 2), 16);
      for (int j = 0; j < 8; ++j) G.dsum[j] = d * static_cast<float>(sum_q(q + 32 * j, 32));
    } else {
      std::memcpy(G.q, q, 256);
      for (int j = 0; j < 16; ++j) G.nsum[j] = static_cast<int16_t>(-sum_q(q + 16 * j, 16));
    }
  }
}

int64_t layout_bytes(Layout layout, int64_t k) {  // one row's layout
  switch (layout) {
    case Layout::B32: return (k / 32 + 3) / 4 * static_cast<int64_t>(sizeof(B32Group));
    case Layout::KQ4:
    case Layout::KQ6: return k / 256 * static_cast<int64_t>(sizeof(KGroup));
    case Layout::Float: return 0;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels: one call multiplies `rows` weight rows by R activation rows

struct Tile {
  const uint8_t* w;    // weight row 0's blocks
  int64_t w_stride;    // bytes between weight rows
  int64_t rows;        // weight rows
  int64_t groups;      // a row's B32 groups of four blocks, K-quant super-blocks, or (float types) elements
  int64_t tail;        // B32: blocks in the last group (1-4)
  int64_t g0, g1;      // this call's part of the row: groups [g0, g1)
  float* acc;          // when the row is split (g0 > 0 or g1 < groups): each (weight row m, activation row r)'s
                       // 16 partial sums at acc[(m * R + r) * 16], kept between the calls
  const uint8_t* pf;   // when the row is split: the next chunk's weight row 0 (else nullptr), prefetched into L2 as this
                       // chunk is read, the same bytes of the same row, so its first K block does not wait on memory
  const uint8_t* act;  // activation row 0's layout (float types: its floats)
  int64_t act_stride;  // bytes between activation rows' layouts
  float* y;            // y[r * ldy + m]: activation row r, weight row m
  int64_t ldy;
};

using Kernel = void (*)(const Tile&);

// The 32-element block types' fields: block bytes, where qs (and qh, m) start, and Q4_0/Q5_0/Q8_0's offset as a
// shift of the sum (8 = 4 lanes << 1, 16 = 4 << 2, 128 = 4 << 5); 0 for the types with a min.
template <int64_t T>
struct B32Type;
template <>
struct B32Type<Q4_0> { static constexpr int bytes = 18, qs = 2, qh = -1, m = -1, shift = 1; };
template <>
struct B32Type<Q4_1> { static constexpr int bytes = 20, qs = 4, qh = -1, m = 2, shift = 0; };
template <>
struct B32Type<Q5_0> { static constexpr int bytes = 22, qs = 6, qh = 2, m = -1, shift = 2; };
template <>
struct B32Type<Q5_1> { static constexpr int bytes = 24, qs = 8, qh = 4, m = 2, shift = 0; };
template <>
struct B32Type<Q8_0> { static constexpr int bytes = 34, qs = 2, qh = -1, m = -1, shift = 5; };

// A row's last group of 1-3 blocks reads its missing blocks here: zero weights with a zero scale, so they add
// nothing (the activations there are zero too). A copy of the short group on the stack instead cost a 135M step
// (K = 576: 18 blocks) half its linears' time in store-forwarding stalls.
alignas(64) constexpr uint8_t kZeroBlock[64] = {};

// The four blocks of a group: `n` (1-4) of them at p, `bytes` apart, the rest kZeroBlock.
struct Blocks4 {
  const uint8_t* at[4];
  Blocks4(const uint8_t* p, int bytes, int n = 4) {
    for (int c = 0; c < 4; ++c) at[c] = c < n ? p + c * bytes : kZeroBlock;
  }
};

// four float16 fields at offset `o` of the four blocks, as a packed 64-bit value
inline uint64_t halves4(const Blocks4& b, int o) {
  return static_cast<uint64_t>(u16(b.at[0] + o)) | static_cast<uint64_t>(u16(b.at[1] + o)) << 16 |
         static_cast<uint64_t>(u16(b.at[2] + o)) << 32 | static_cast<uint64_t>(u16(b.at[3] + o)) << 48;
}

// the next chunk's copy of row m's `bytes` at `at` (see Tile::pf)
inline void prefetch_next(const Tile& t, int64_t m, int64_t at, int64_t bytes) {
  if (t.pf == nullptr) return;
  const char* p = reinterpret_cast<const char*>(t.pf + m * t.w_stride + at);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T1);
}

// ---- AVX-512 (F, BW, VL, VNNI)

#define HW_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

// A kernel's accumulators: zero at a row's first group, else the partial sums an earlier call left; at its last
// group summed into y, else left for the next call. The order of every row's sums is the same either way.
template <int R>
HW_AVX512 inline void acc_start_512(const Tile& t, int64_t m, __m512* acc) {
  for (int r = 0; r < R; ++r) acc[r] = t.g0 > 0 ? _mm512_load_ps(t.acc + (m * R + r) * 16) : _mm512_setzero_ps();
}

template <int R>
HW_AVX512 inline void acc_end_512(const Tile& t, int64_t m, const __m512* acc) {
  for (int r = 0; r < R; ++r) {
    if (t.g1 < t.groups)
      _mm512_store_ps(t.acc + (m * R + r) * 16, acc[r]);
    else
      t.y[r * t.ldy + m] = _mm512_reduce_add_ps(acc[r]);
  }
}

struct B32Weights512 {
  __m512i w0, w1;  // u8: elements 0-15 and 16-31 of four blocks, a block per 128-bit lane
  __m512 d, m;     // each block's scale (and min) in its lane
};

HW_AVX512 inline __m512i load4x16(const Blocks4& b, int o) {  // 16 bytes at offset o of each block
  auto at = [&](int c) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.at[c] + o)); };
  __m512i v = _mm512_castsi128_si512(at(0));
  v = _mm512_inserti32x4(v, at(1), 1);
  v = _mm512_inserti32x4(v, at(2), 2);
  return _mm512_inserti32x4(v, at(3), 3);
}

HW_AVX512 inline __m512 spread4(uint64_t halves) {  // four float16 -> each in four lanes
  const __m512i index = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m128 f = _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<int64_t>(halves)));
  return _mm512_permutexvar_ps(index, _mm512_castps128_ps512(f));
}

template <int64_t T>
HW_AVX512 inline B32Weights512 b32_decode_512(const Blocks4& p) {
  using F = B32Type<T>;
  B32Weights512 r;
  if constexpr (T == Q8_0) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // s8 -> u8 + 128
    r.w0 = _mm512_xor_si512(load4x16(p, 2), flip);
    r.w1 = _mm512_xor_si512(load4x16(p, 18), flip);
  } else {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i packed = load4x16(p, F::qs);  // low nibbles: elements 0-15, high: 16-31
    r.w0 = _mm512_and_si512(packed, low);
    r.w1 = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
    if constexpr (F::qh >= 0) {  // bit j of the block's qh is element j's fifth bit
      uint64_t first = 0, second = 0;
      for (int c = 0; c < 4; ++c) {
        const uint32_t h = u32(p.at[c] + F::qh);
        first |= static_cast<uint64_t>(h & 0xFFFF) << (16 * c);
        second |= static_cast<uint64_t>(h >> 16) << (16 * c);
      }
      const __m512i sixteen = _mm512_set1_epi8(16);
      r.w0 = _mm512_mask_add_epi8(r.w0, first, r.w0, sixteen);
      r.w1 = _mm512_mask_add_epi8(r.w1, second, r.w1, sixteen);
    }
  }
  r.d = spread4(halves4(p, 0));
  r.m = F::m >= 0 ? spread4(halves4(p, F::m)) : _mm512_setzero_ps();
  return r;
}

template <int64_t T, int R>
HW_AVX512 inline void b32_group_512(const B32Weights512& w, const uint8_t* act, int64_t stride, int64_t g,
                                    __m512* acc) {
  using F = B32Type<T>;
  for (int r = 0; r < R; ++r) {
    const B32Group* a = reinterpret_cast<const B32Group*>(act + r * stride) + g;
    __m512i s = F::shift ? _mm512_slli_epi32(_mm512_load_si512(a->nsum), F::shift) : _mm512_setzero_si512();
    s = _mm512_dpbusd_epi32(s, w.w0, _mm512_load_si512(a->q));
    s = _mm512_dpbusd_epi32(s, w.w1, _mm512_load_si512(a->q + 64));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(w.d, _mm512_load_ps(a->d)), acc[r]);
    if constexpr (F::m >= 0) acc[r] = _mm512_fmadd_ps(w.m, _mm512_load_ps(a->dsum), acc[r]);
  }
}

template <int64_t T, int R>
HW_AVX512 void b32_512(const Tile& t) {
  using F = B32Type<T>;
  const int64_t full = std::min(t.g1, t.tail == 4 ? t.groups : t.groups - 1);
  for (int64_t m = 0; m < t.rows; ++m) {
    const uint8_t* row = t.w + m * t.w_stride;
    __m512 acc[R];
    acc_start_512<R>(t, m, acc);
    for (int64_t g = t.g0; g < full; ++g) {
      const B32Weights512 w = b32_decode_512<T>(Blocks4(row + g * 4 * F::bytes, F::bytes));
      b32_group_512<T, R>(w, t.act, t.act_stride, g, acc);
    }
    if (full < t.g1) {  // a last group of 1-3 blocks
      const B32Weights512 w = b32_decode_512<T>(Blocks4(row + full * 4 * F::bytes, F::bytes, t.tail));
      b32_group_512<T, R>(w, t.act, t.act_stride, full, acc);
    }
    acc_end_512<R>(t, m, acc);
  }
}

template <int64_t T, int R>
HW_AVX512 void kq4_512(const Tile& t) {  // Q4_K and Q5_K
  constexpr int64_t bytes = T == Q4_K ? 144 : 176, qs_at = T == Q4_K ? 16 : 48;
  const __m512i low = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
  // vpshufb of the 16 bytes of scales and mins in every lane: lane c's words are sub-block 2c's scale four times,
  // then 2c + 1's (0x80 zeroes a word's high byte), matching vpackssdw of the even and odd sums below
  const __m512i pick_scales = _mm512_setr_epi32(
      0x80008000, 0x80008000, 0x80018001, 0x80018001, 0x80028002, 0x80028002, 0x80038003, 0x80038003,
      0x80048004, 0x80048004, 0x80058005, 0x80058005, 0x80068006, 0x80068006, 0x80078007, 0x80078007);
  const __m128i pick_mins = _mm_setr_epi8(8, 9, 10, 11, 12, 13, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  // Q5_K: bit j of qh byte l is sub-block j's element l; lane c holds sub-block 2c (or 2c + 1)
  const __m512i bit_even = _mm512_setr_epi32(0x01010101, 0x01010101, 0x01010101, 0x01010101, 0x04040404, 0x04040404,
                                             0x04040404, 0x04040404, 0x10101010, 0x10101010, 0x10101010, 0x10101010,
                                             0x40404040, 0x40404040, 0x40404040, 0x40404040);
  const __m512i bit_odd = _mm512_slli_epi32(bit_even, 1);
  for (int64_t m = 0; m < t.rows; ++m) {
    const uint8_t* row = t.w + m * t.w_stride;
    __m512 acc[R];
    acc_start_512<R>(t, m, acc);
    for (int64_t s = t.g0; s < t.g1; ++s) {
      const uint8_t* p = row + s * bytes;
      prefetch_next(t, m, s * bytes, bytes);
      alignas(16) uint32_t sm[4];
      k_scales(p + 4, sm);
      const __m512i both = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(sm)));
      const __m512i scales = _mm512_shuffle_epi8(both, pick_scales);
      // [d, dmin] in every pair of lanes
      const __m512 dd = _mm512_cvtph_ps(_mm256_set1_epi32(static_cast<int>(u32(p))));
      const __m512 d = _mm512_permute_ps(dd, 0x00);
      const __m512 mins = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm512_castsi512_si128(both), pick_mins))),
          _mm512_permute_ps(dd, 0x55));  // dmin * min of sub-block j in lane j < 8, then 0
      // qs: four 32-byte chunks, chunk c's low nibbles sub-block 2c, its high nibbles 2c + 1. Regrouped so that lane
      // c of every vector is chunk c: its bytes 0-15 (first) and 16-31 (second)
      const __m512i p0 = _mm512_loadu_si512(p + qs_at), p1 = _mm512_loadu_si512(p + qs_at + 64);
      const __m512i first = _mm512_shuffle_i64x2(p0, p1, _MM_SHUFFLE(2, 0, 2, 0));
      const __m512i second = _mm512_shuffle_i64x2(p0, p1, _MM_SHUFFLE(3, 1, 3, 1));
      __m512i W[4] = {_mm512_and_si512(first, low), _mm512_and_si512(second, low),
                      _mm512_and_si512(_mm512_srli_epi16(first, 4), low),
                      _mm512_and_si512(_mm512_srli_epi16(second, 4), low)};
      if constexpr (T == Q5_K) {
        const __m512i h0 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
        const __m512i h1 = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32)));
        W[0] = _mm512_mask_add_epi8(W[0], _mm512_test_epi8_mask(h0, bit_even), W[0], sixteen);
        W[1] = _mm512_mask_add_epi8(W[1], _mm512_test_epi8_mask(h1, bit_even), W[1], sixteen);
        W[2] = _mm512_mask_add_epi8(W[2], _mm512_test_epi8_mask(h0, bit_odd), W[2], sixteen);
        W[3] = _mm512_mask_add_epi8(W[3], _mm512_test_epi8_mask(h1, bit_odd), W[3], sixteen);
      }
      for (int r = 0; r < R; ++r) {
        const KGroup* a = reinterpret_cast<const KGroup*>(t.act + r * t.act_stride) + s;
        const __m512i zero = _mm512_setzero_si512();
        // each int32 sums 8 products of at most 31 * 127: int16, so the even and odd sums pack into one register
        __m512i e = _mm512_dpbusd_epi32(zero, W[0], _mm512_load_si512(a->q));
        e = _mm512_dpbusd_epi32(e, W[1], _mm512_load_si512(a->q + 64));
        __m512i o = _mm512_dpbusd_epi32(zero, W[2], _mm512_load_si512(a->q + 128));
        o = _mm512_dpbusd_epi32(o, W[3], _mm512_load_si512(a->q + 192));
        const __m512i v = _mm512_madd_epi16(_mm512_packs_epi32(e, o), scales);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(d, _mm512_set1_ps(a->d[0])), acc[r]);
        acc[r] = _mm512_fnmadd_ps(mins, _mm512_load_ps(a->dsum), acc[r]);
      }
    }
    acc_end_512<R>(t, m, acc);
  }
}

template <int64_t T, int R>  // T: Q6_K
HW_AVX512 void q6k_512(const Tile& t) {
  const __m512i low = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  // qh bit pairs 0-1, 2-3 go to quarters 0, 1 (the low nibbles of a half), 4-5, 6-7 to quarters 2, 3 (the high):
  // shifted to bits 4-5 of each byte
  const __m512i up = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i down = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
  // W_k (k = 2h + high) lane i is 16-element sub-block 4k + i. Its vpdpbusd sums (four int32 of at most
  // 4 * 63 * 127, so int16) are packed in pairs, W_0 with W_1 and W_2 with W_3: lane i's eight words are four sums
  // of sub-block 4k + i and four of 4k + 4 + i, each multiplied by its scale by one vpmaddwd
  __m512i pick[2];
  for (int k = 0; k < 2; ++k) {
    alignas(64) int16_t idx[32];
    for (int w = 0; w < 32; ++w) idx[w] = static_cast<int16_t>(8 * k + w / 8 + (w % 8 < 4 ? 0 : 4));
    pick[k] = _mm512_load_si512(idx);
  }
  for (int64_t m = 0; m < t.rows; ++m) {
    const uint8_t* row = t.w + m * t.w_stride;
    __m512 acc[R];
    acc_start_512<R>(t, m, acc);
    for (int64_t s = t.g0; s < t.g1; ++s) {
      const uint8_t* p = row + s * 210;
      prefetch_next(t, m, s * 210, 210);
      const __m512i sc = _mm512_zextsi256_si512(
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192))));
      const __m512i S0 = _mm512_permutexvar_epi16(pick[0], sc), S1 = _mm512_permutexvar_epi16(pick[1], sc);
      const __m512i offset = _mm512_slli_epi16(sc, 5);  // 32 * scale: with minus the 16-element sums, the -32
      const __m512 d = _mm512_set1_ps(half(p + 208));
      __m512i W[4];
      for (int h = 0; h < 2; ++h) {
        const __m512i ql = _mm512_loadu_si512(p + 64 * h);
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h)));
        // (a & low) | (b & top): 0xF8 is A | (B & C)
        W[2 * h] = _mm512_ternarylogic_epi32(_mm512_and_si512(ql, low), _mm512_sllv_epi16(qh, up), top, 0xF8);
        W[2 * h + 1] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low),
                                                 _mm512_srlv_epi16(qh, down), top, 0xF8);
      }
      for (int r = 0; r < R; ++r) {
        const KGroup* a = reinterpret_cast<const KGroup*>(t.act + r * t.act_stride) + s;
        const __m512i zero = _mm512_setzero_si512();
        const __m512i d0 = _mm512_dpbusd_epi32(zero, W[0], _mm512_load_si512(a->q));
        const __m512i d1 = _mm512_dpbusd_epi32(zero, W[1], _mm512_load_si512(a->q + 64));
        const __m512i d2 = _mm512_dpbusd_epi32(zero, W[2], _mm512_load_si512(a->q + 128));
        const __m512i d3 = _mm512_dpbusd_epi32(zero, W[3], _mm512_load_si512(a->q + 192));
        __m512i v = _mm512_madd_epi16(_mm512_packs_epi32(d0, d1), S0);
        v = _mm512_dpwssd_epi32(v, _mm512_packs_epi32(d2, d3), S1);
        v = _mm512_dpwssd_epi32(v, offset, _mm512_load_si512(a->nsum));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(d, _mm512_set1_ps(a->d[0])), acc[r]);
      }
    }
    acc_end_512<R>(t, m, acc);
  }
}

template <int64_t T>
HW_AVX512 inline __m512 load_float_512(const uint8_t* p, __mmask16 mask) {  // 16 weights (fewer: masked)
  if constexpr (T == F32) return _mm512_maskz_loadu_ps(mask, p);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  if constexpr (T == F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16: a float's top half
}

template <int64_t T, int R>
HW_AVX512 void float_512(const Tile& t) {
  constexpr int64_t size = T == F32 ? 4 : 2;
  for (int64_t m = 0; m < t.rows; ++m) {
    const uint8_t* row = t.w + m * t.w_stride;
    __m512 acc[R];
    acc_start_512<R>(t, m, acc);
    for (int64_t i = t.g0; i < t.g1; i += 16) {
      const __mmask16 mask = t.g1 - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (t.g1 - i)) - 1);
      const __m512 w = load_float_512<T>(row + i * size, mask);
      for (int r = 0; r < R; ++r) {
        const float* x = reinterpret_cast<const float*>(t.act + r * t.act_stride) + i;
        acc[r] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, x), acc[r]);
      }
    }
    acc_end_512<R>(t, m, acc);
  }
}

// ---- AVX2

inline __m256i bytes_from_bits(uint32_t x) {  // bit i of x -> byte i = 0xFF or 0
  const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(x)), spread);  // byte i <- byte i / 8 of x
  v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));  // every bit but bit i % 8
  return _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R>
inline void acc_start_256(const Tile& t, int64_t m, __m256* acc) {
  for (int r = 0; r < R; ++r) acc[r] = t.g0 > 0 ? _mm256_load_ps(t.acc + (m * R + r) * 16) : _mm256_setzero_ps();
}

template <int R>
inline void acc_end_256(const Tile& t, int64_t m, const __m256* acc) {
  for (int r = 0; r < R; ++r) {
    if (t.g1 < t.groups)
      _mm256_store_ps(t.acc + (m * R + r) * 16, acc[r]);
    else
      t.y[r * t.ldy + m] = hsum8(acc[r]);
  }
}

inline __m256i load2x16(const uint8_t* a, const uint8_t* b) {  // [16 bytes at a | 16 bytes at b]
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1);
}

// A group as two 256-bit halves (blocks 0-1, blocks 2-3): the same lanes as the AVX-512 group's two halves
template <int64_t T, int R>
inline void b32_group_256(const Blocks4& p, const uint8_t* act, int64_t stride, int64_t g, __m256* acc) {
  using F = B32Type<T>;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* b0 = p.at[2 * h];
    const uint8_t* b1 = p.at[2 * h + 1];
    __m256i lo, hi;  // elements 0-15 and 16-31 of blocks 2h, 2h + 1
    if constexpr (T == Q8_0) {
      lo = load2x16(b0 + 2, b1 + 2);
      hi = load2x16(b0 + 18, b1 + 18);
    } else {
      const __m256i packed = load2x16(b0 + F::qs, b1 + F::qs);
      lo = _mm256_and_si256(packed, low);
      hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
      if constexpr (F::qh >= 0) {
        const uint32_t h0 = u32(b0 + F::qh), h1 = u32(b1 + F::qh);
        const __m256i fifth = _mm256_set1_epi8(16);
        lo = _mm256_or_si256(lo, _mm256_and_si256(bytes_from_bits((h0 & 0xFFFF) | (h1 << 16)), fifth));
        hi = _mm256_or_si256(hi, _mm256_and_si256(bytes_from_bits((h0 >> 16) | (h1 & 0xFFFF0000u)), fifth));
      }
    }
    const __m256 d = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(half(b0))), _mm_set1_ps(half(b1)), 1);
    __m256 mn = _mm256_setzero_ps();
    if constexpr (F::m >= 0)
      mn = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(half(b0 + F::m))), _mm_set1_ps(half(b1 + F::m)), 1);
    __m256i alo = lo, ahi = hi;
    if constexpr (T == Q8_0) alo = _mm256_sign_epi8(lo, lo), ahi = _mm256_sign_epi8(hi, hi);  // |q| as u8
    for (int r = 0; r < R; ++r) {
      const B32Group* a = reinterpret_cast<const B32Group*>(act + r * stride) + g;
      const __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(a->q + 32 * h));
      const __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(a->q + 64 + 32 * h));
      __m256i s;
      if constexpr (T == Q8_0) {  // signs moved onto the activations: |q| x (a * sign q), no offset
        s = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(alo, _mm256_sign_epi8(x0, lo)), ones),
                             _mm256_madd_epi16(_mm256_maddubs_epi16(ahi, _mm256_sign_epi8(x1, hi)), ones));
      } else {
        s = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1)), ones);
        if constexpr (F::shift > 0)
          s = _mm256_add_epi32(
              s, _mm256_slli_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(a->nsum + 8 * h)), F::shift));
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, _mm256_load_ps(a->d + 8 * h)), acc[r]);
      if constexpr (F::m >= 0) acc[r] = _mm256_fmadd_ps(mn, _mm256_load_ps(a->dsum + 8 * h), acc[r]);
    }
  }
}

template <int64_t T, int R>
void b32_256(const Tile& t) {
  using F = B32Type<T>;
  const int64_t full = std::min(t.g1, t.tail == 4 ? t.groups : t.groups - 1);
  for (int64_t m = 0; m < t.rows; ++m) {
    const uint8_t* row = t.w + m * t.w_stride;
    __m256 acc[R];
    acc_start_256<R>(t, m, acc);
    for (int64_t g = t.g0; g < full; ++g)
      b32_group_256<T, R>(Blocks4(row + g * 4 * F::bytes, F::bytes), t.act, t.act_stride, g, acc);
    if (full < t.g1)  // a last group of 1-3 blocks
      b32_group_256<T, R>(Blocks4(row + full * 4 * F::bytes, F::bytes, t.tail), t.act, t.act_stride, full, acc);
    acc_end_256<R>(t, m, acc);
  }
}

template <int64_t T, int R>
void kq4_256(const Tile& t) {  // Q4_K and Q5_K
  constexpr int64_t bytes = T == Q4_K ? 144 : 176, qs_at = T == Q4_K ? 16 : 48;
  const __m256i low = _mm256_set1_epi8(0x0F), fifth = _mm256_set1_epi8(16);
  for (int64_t m = 0; m < t.rows; ++m) {
    const uint8_t* row = t.w + m * t.w_stride;
    __m256 acc[R];
    acc_start_256<R>(t, m, acc);
    for (int64_t s = t.g0; s < t.g1; ++s) {
      const uint8_t* p = row + s * bytes;
      prefetch_next(t, m, s * bytes, bytes);
      alignas(16) uint32_t sm[4];
      k_scales(p + 4, sm);
      const uint8_t* scale = reinterpret_cast<const uint8_t*>(sm);
      const __m256 mins = _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sm + 2)))),
          _mm256_set1_ps(half(p + 2)));
      const __m256 d = _mm256_set1_ps(half(p));
      __m256i v[R];
      for (int r = 0; r < R; ++r) v[r] = _mm256_setzero_si256();
      for (int g = 0; g < 2; ++g) {  // chunks 2g, 2g + 1: sub-blocks 4g .. 4g + 3, the AVX-512 layout's lanes 2g, 2g + 1
        const uint8_t* qs = p + qs_at + 64 * g;
        const __m256i first = load2x16(qs, qs + 32), second = load2x16(qs + 16, qs + 48);
        __m256i W[4] = {_mm256_and_si256(first, low), _mm256_and_si256(second, low),
                        _mm256_and_si256(_mm256_srli_epi16(first, 4), low),
                        _mm256_and_si256(_mm256_srli_epi16(second, 4), low)};
        if constexpr (T == Q5_K) {  // bit j of qh byte l: sub-block j's element l; W[k] lanes: sub-blocks 4g + (k >= 2) + {0, 2}
          for (int k = 0; k < 4; ++k) {
            const int j = 4 * g + (k >= 2);
            const __m256i qh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 + 16 * (k & 1))));
            const __m256i bit = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi8(static_cast<char>(1 << j))),
                                                        _mm_set1_epi8(static_cast<char>(1 << (j + 2))), 1);
            W[k] = _mm256_or_si256(W[k], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), fifth));
          }
        }
        const __m256i se = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(scale[4 * g])),
                                                   _mm_set1_epi16(scale[4 * g + 2]), 1);
        const __m256i so = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(scale[4 * g + 1])),
                                                   _mm_set1_epi16(scale[4 * g + 3]), 1);
        for (int r = 0; r < R; ++r) {
          const int8_t* q = (reinterpret_cast<const KGroup*>(t.act + r * t.act_stride) + s)->q + 32 * g;
          auto x = [q](int part) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 64 * part)); };
          const __m256i pe = _mm256_add_epi16(_mm256_maddubs_epi16(W[0], x(0)), _mm256_maddubs_epi16(W[1], x(1)));
          const __m256i po = _mm256_add_epi16(_mm256_maddubs_epi16(W[2], x(2)), _mm256_maddubs_epi16(W[3], x(3)));
          v[r] = _mm256_add_epi32(v[r], _mm256_add_epi32(_mm256_madd_epi16(pe, se), _mm256_madd_epi16(po, so)));
        }
      }
      for (int r = 0; r < R; ++r) {
        const KGroup* a = reinterpret_cast<const KGroup*>(t.act + r * t.act_stride) + s;
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v[r]), _mm256_mul_ps(d, _mm256_load_ps(a->d)), acc[r]);
        acc[r] = _mm256_fnmadd_ps(mins, _mm256_load_ps(a->dsum), acc[r]);
      }
    }
    acc_end_256<R>(t, m, acc);
  }
}

template <int64_t T, int R>  // T: Q6_K
void q6k_256(const Tile& t) {
  const __m256i low = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30);
  for (int64_t m = 0; m < t.rows; ++m) {
    const uint8_t* row = t.w + m * t.w_stride;
    __m256 acc[R];
    acc_start_256<R>(t, m, acc);
    for (int64_t s = t.g0; s < t.g1; ++s) {
      const uint8_t* p = row + s * 210;
      prefetch_next(t, m, s * 210, 210);
      const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
      const __m256i offset =
          _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc))), 5);
      const __m256 d = _mm256_set1_ps(half(p + 208));
      __m256i v[R];
      for (int r = 0; r < R; ++r) {
        const KGroup* a = reinterpret_cast<const KGroup*>(t.act + r * t.act_stride) + s;
        v[r] = _mm256_madd_epi16(offset, _mm256_load_si256(reinterpret_cast<const __m256i*>(a->nsum)));
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h));
        for (int j = 0; j < 4; ++j) {  // quarter j: elements 32j..32j + 31 of the half
          const __m256i ql = j & 1 ? ql1 : ql0;
          const __m256i nib = j < 2 ? _mm256_and_si256(ql, low) : _mm256_and_si256(_mm256_srli_epi16(ql, 4), low);
          const __m256i hb = j < 2 ? _mm256_slli_epi16(qh, 4 - 2 * j) : _mm256_srli_epi16(qh, 2 * j - 4);
          const __m256i w = _mm256_or_si256(nib, _mm256_and_si256(hb, top));
          const int sb = 8 * h + 2 * j;  // its two 16-element sub-blocks
          const __m256i scale = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(sc[sb])),
                                                        _mm_set1_epi16(sc[sb + 1]), 1);
          for (int r = 0; r < R; ++r) {
            const KGroup* a = reinterpret_cast<const KGroup*>(t.act + r * t.act_stride) + s;
            const __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(a->q + 128 * h + 32 * j));
            v[r] = _mm256_add_epi32(v[r], _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), scale));
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const KGroup* a = reinterpret_cast<const KGroup*>(t.act + r * t.act_stride) + s;
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v[r]), _mm256_mul_ps(d, _mm256_load_ps(a->d)), acc[r]);
      }
    }
    acc_end_256<R>(t, m, acc);
  }
}

template <int64_t T>
inline __m256 load_float_256(const uint8_t* p) {  // 8 weights
  if constexpr (T == F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (T == F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int64_t T, int R>
void float_256(const Tile& t) {
  constexpr int64_t size = T == F32 ? 4 : 2;
  const int64_t k = t.groups, whole = std::min(t.g1, k / 8 * 8);
  for (int64_t m = 0; m < t.rows; ++m) {
    const uint8_t* row = t.w + m * t.w_stride;
    __m256 acc[R];
    acc_start_256<R>(t, m, acc);
    for (int64_t i = t.g0; i < whole; i += 8) {
      const __m256 w = load_float_256<T>(row + i * size);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(reinterpret_cast<const float*>(t.act + r * t.act_stride) + i), acc[r]);
    }
    if (whole < t.g1) {  // the last 1-7 elements, through zero-padded copies
      alignas(32) uint8_t wpad[32] = {};
      alignas(32) float xpad[8] = {};
      std::memcpy(wpad, row + whole * size, (k - whole) * size);
      const __m256 w = load_float_256<T>(wpad);
      for (int r = 0; r < R; ++r) {
        std::memcpy(xpad, reinterpret_cast<const float*>(t.act + r * t.act_stride) + whole, (k - whole) * 4);
        acc[r] = _mm256_fmadd_ps(w, _mm256_load_ps(xpad), acc[r]);
      }
    }
    acc_end_256<R>(t, m, acc);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch

enum class Isa { Avx2, Avx512 };

// Activation rows a kernel call takes (16 with AVX-512 measured slower: spills, and shorter K blocks). AVX2's 16
// registers hold 4 rows' sums; 8 rows spill their float sums (touched once a super-block) and halve the weight
// decoding a row: a prompt's Q4_K and Q6_K products 11% and 15% faster
constexpr int kTile = 8;

// kernels(isa, type)[r - 1] multiplies r activation rows
#define HW_TILES8(K, T) K<T, 1>, K<T, 2>, K<T, 3>, K<T, 4>, K<T, 5>, K<T, 6>, K<T, 7>, K<T, 8>

const Kernel* kernels(Isa isa, int64_t type) {
  static_assert(kTile == 8, "the tables below have one kernel per tile size");
  static const Kernel k512_q4_0[] = {HW_TILES8(b32_512, Q4_0)}, k256_q4_0[] = {HW_TILES8(b32_256, Q4_0)};
  static const Kernel k512_q4_1[] = {HW_TILES8(b32_512, Q4_1)}, k256_q4_1[] = {HW_TILES8(b32_256, Q4_1)};
  static const Kernel k512_q5_0[] = {HW_TILES8(b32_512, Q5_0)}, k256_q5_0[] = {HW_TILES8(b32_256, Q5_0)};
  static const Kernel k512_q5_1[] = {HW_TILES8(b32_512, Q5_1)}, k256_q5_1[] = {HW_TILES8(b32_256, Q5_1)};
  static const Kernel k512_q8_0[] = {HW_TILES8(b32_512, Q8_0)}, k256_q8_0[] = {HW_TILES8(b32_256, Q8_0)};
  static const Kernel k512_q4_k[] = {HW_TILES8(kq4_512, Q4_K)}, k256_q4_k[] = {HW_TILES8(kq4_256, Q4_K)};
  static const Kernel k512_q5_k[] = {HW_TILES8(kq4_512, Q5_K)}, k256_q5_k[] = {HW_TILES8(kq4_256, Q5_K)};
  static const Kernel k512_q6_k[] = {HW_TILES8(q6k_512, Q6_K)}, k256_q6_k[] = {HW_TILES8(q6k_256, Q6_K)};
  static const Kernel k512_f32[] = {HW_TILES8(float_512, F32)}, k256_f32[] = {HW_TILES8(float_256, F32)};
  static const Kernel k512_f16[] = {HW_TILES8(float_512, F16)}, k256_f16[] = {HW_TILES8(float_256, F16)};
  static const Kernel k512_bf16[] = {HW_TILES8(float_512, BF16)}, k256_bf16[] = {HW_TILES8(float_256, BF16)};
  const bool wide = isa == Isa::Avx512;
  switch (type) {
    case Q4_0: return wide ? k512_q4_0 : k256_q4_0;
    case Q4_1: return wide ? k512_q4_1 : k256_q4_1;
    case Q5_0: return wide ? k512_q5_0 : k256_q5_0;
    case Q5_1: return wide ? k512_q5_1 : k256_q5_1;
    case Q8_0: return wide ? k512_q8_0 : k256_q8_0;
    case Q4_K: return wide ? k512_q4_k : k256_q4_k;
    case Q5_K: return wide ? k512_q5_k : k256_q5_k;
    case Q6_K: return wide ? k512_q6_k : k256_q6_k;
    case F32: return wide ? k512_f32 : k256_f32;
    case F16: return wide ? k512_f16 : k256_f16;
    case BF16: return wide ? k512_bf16 : k256_bf16;
  }
  TORCH_CHECK(false, "no kernel for GGML type ", type);
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

Isa initial_isa() {
  const char* forced = std::getenv("HOGWILD_KERNEL_ISA");
  if (forced != nullptr && std::string(forced) == "avx2") return Isa::Avx2;
  return cpu_has_avx512() ? Isa::Avx512 : Isa::Avx2;
}

std::atomic<Isa> g_isa{initial_isa()};

const char* isa_name(Isa isa) { return isa == Isa::Avx512 ? "avx512-vnni" : "avx2"; }

// ---------------------------------------------------------------------------------------------------------------
// The matrix product

// Weight bytes below which a call runs on the calling thread alone: a parallel region costs a few microseconds,
// about what 64 KB take to stream.
constexpr int64_t kSerialBytes = 1 << 16;
// With more activation rows than fit in L1 at once (more than a tile, or one tile of long rows), a chunk of weight
// rows this large stays in L2 while every tile of activation rows passes through it, a block of K at a time small
// enough that the tile's part of the activations stays in L1.
constexpr int64_t kChunkBytes = 1 << 16;
constexpr int64_t kL1Activations = 20 << 10;

struct Part {  // one weight matrix of a call
  const uint8_t* w;
  int64_t w_stride, rows, row_bytes;
  const Format* format;
  float* y;  // its first output column
};

struct Prepared {  // the activation layouts one call needs
  const uint8_t* data[4] = {};  // by Layout
  int64_t stride[4] = {};
};

uint8_t* scratch(int64_t bytes) {  // the calling thread's activation buffer, 64-byte aligned
  thread_local std::vector<uint8_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < bytes + 64) buffer.resize(bytes + 64);
  const uintptr_t at = (reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63};
  return reinterpret_cast<uint8_t*>(at);
}

Prepared prepare(const float* x, int64_t x_stride, int64_t n, int64_t k, const std::vector<Part>& parts) {
  Prepared p;
  bool needed[4] = {};
  for (const Part& part : parts) needed[static_cast<int>(part.format->layout)] = true;
  p.data[0] = reinterpret_cast<const uint8_t*>(x);
  p.stride[0] = x_stride * 4;
  int64_t total = 0, offset[4] = {};
  for (int l = 1; l < 4; ++l) {
    if (!needed[l]) continue;
    p.stride[l] = layout_bytes(static_cast<Layout>(l), k);
    offset[l] = total;
    total += n * p.stride[l];
  }
  if (total == 0) return p;
  uint8_t* base = scratch(total);
  for (int l = 1; l < 4; ++l)
    if (needed[l]) p.data[l] = base + offset[l];
  auto rows = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = x + i * x_stride;
      if (needed[1]) prepare_b32(xi, k, reinterpret_cast<B32Group*>(base + offset[1] + i * p.stride[1]));
      if (needed[2]) prepare_k(xi, k, Layout::KQ4, reinterpret_cast<KGroup*>(base + offset[2] + i * p.stride[2]));
      if (needed[3]) prepare_k(xi, k, Layout::KQ6, reinterpret_cast<KGroup*>(base + offset[3] + i * p.stride[3]));
    }
  };
  if (n * k >= (1 << 16) && n > 1)
    at::parallel_for(0, n, 1, rows);
  else
    rows(0, n);
  return p;
}

// rows [begin, end) of one part, all n activation rows
void run_rows(Isa isa, const Part& part, int64_t begin, int64_t end, const Prepared& act, int64_t n, int64_t k,
              int64_t ldy) {
  const Format& f = *part.format;
  const Kernel* kern = kernels(isa, f.type);
  const int l = static_cast<int>(f.layout);
  Tile t;
  t.w_stride = part.w_stride;
  t.act_stride = act.stride[l];
  t.ldy = ldy;
  t.acc = nullptr;
  t.pf = nullptr;
  int64_t group_bytes;  // one activation row's bytes per group
  if (f.layout == Layout::B32) {
    const int64_t blocks = k / 32;
    t.groups = (blocks + 3) / 4;
    t.tail = blocks - 4 * (t.groups - 1);
    group_bytes = sizeof(B32Group);
  } else if (f.layout == Layout::Float) {
    t.groups = k;
    t.tail = 4;
    group_bytes = 4;
  } else {
    t.groups = k / 256;
    t.tail = 4;
    group_bytes = sizeof(KGroup);
  }
  const int64_t rows_at_once = std::min<int64_t>(kTile, n);
  if (n <= kTile && rows_at_once * t.groups * group_bytes <= kL1Activations) {  // one pass: a decode step
    t.rows = end - begin;
    t.w = part.w + begin * part.w_stride;
    t.act = act.data[l];
    t.y = part.y + begin;
    t.g0 = 0;
    t.g1 = t.groups;
    kern[n - 1](t);
    return;
  }
  // groups per block of K (float types: a multiple of 64 elements, so only the row's end is ragged)
  int64_t block = std::max<int64_t>(1, kL1Activations / (rows_at_once * group_bytes));
  if (f.layout == Layout::Float) block = std::max<int64_t>(64, block / 64 * 64);
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / part.row_bytes);
  thread_local std::vector<float> sums;  // this thread's partial sums: [chunk rows][tile rows][16]
  if (static_cast<int64_t>(sums.size()) < chunk * kTile * 16 + 16) sums.resize(chunk * kTile * 16 + 16);
  t.acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(sums.data()) + 63) & ~uintptr_t{63});
  for (int64_t m = begin; m < end; m += chunk) {
    t.rows = std::min(chunk, end - m);
    t.w = part.w + m * part.w_stride;
    t.pf = m + chunk < end ? t.w + chunk * part.w_stride : nullptr;
    for (int64_t r = 0; r < n; r += kTile) {
      const int64_t rows = std::min<int64_t>(kTile, n - r);
      t.act = act.data[l] + r * act.stride[l];
      t.y = part.y + r * ldy + m;
      for (t.g0 = 0; t.g0 < t.groups; t.g0 = t.g1) {
        t.g1 = std::min(t.groups, t.g0 + block);
        kern[rows - 1](t);
      }
    }
  }
}

void run(const float* x, int64_t x_stride, int64_t n, int64_t k, const std::vector<Part>& parts, int64_t ldy) {
  const Isa isa = g_isa.load(std::memory_order_relaxed);
  const Prepared act = prepare(x, x_stride, n, k, parts);
  int64_t total = 0;
  for (const Part& p : parts) total += p.rows * p.row_bytes;
  const int threads = at::get_num_threads();
  if (threads <= 1 || total < kSerialBytes || at::in_parallel_region()) {
    for (const Part& p : parts) run_rows(isa, p, 0, p.rows, act, n, k, ldy);
    return;
  }
  // thread i takes the rows that start in bytes [i * total / threads, (i + 1) * total / threads) of all parts. A
  // bare OpenMP region on torch's runtime (the same libgomp): at::parallel_for's set-up cost a 135M decode step
  // 4 us a call, 0.5 ms of its 6.4
#pragma omp parallel num_threads(threads)
  {
    const int64_t i = omp_get_thread_num(), lo = total * i / threads, hi = total * (i + 1) / threads;
    int64_t start = 0;
    for (const Part& p : parts) {
      const int64_t bytes = p.rows * p.row_bytes;
      auto row_at = [&](int64_t b) { return std::clamp<int64_t>((b - start + p.row_bytes - 1) / p.row_bytes, 0, p.rows); };
      const int64_t begin = row_at(lo), end = row_at(hi);
      if (begin < end) run_rows(isa, p, begin, end, act, n, k, ldy);
      start += bytes;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Python API

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "x must be a float32 CPU matrix [N, K], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " columns, the weights take K = ", k);
  TORCH_CHECK(x.size(0) >= 1, "x has no rows");
}

Part check_w(const at::Tensor& w, int64_t type, int64_t k) {
  const Format& f = format(type);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2,
              "w must be a uint8 CPU matrix [M, row bytes] of ", f.name, " blocks, got ", w.scalar_type(), " ",
              w.sizes());
  TORCH_CHECK(k > 0 && k % f.block == 0, "K = ", k, " is not a whole number of ", f.name, " blocks of ", f.block);
  const int64_t row_bytes = k / f.block * f.bytes;
  TORCH_CHECK(w.size(1) == row_bytes, "a row of ", k, " ", f.name, " elements is ", row_bytes, " bytes, w has ",
              w.size(1));
  TORCH_CHECK(w.stride(1) == 1 && (w.size(0) <= 1 || w.stride(0) >= row_bytes),
              "w's rows must each be contiguous bytes");
  return Part{w.data_ptr<uint8_t>(), w.size(0) <= 1 ? row_bytes : w.stride(0), w.size(0), row_bytes, &f, nullptr};
}

at::Tensor contiguous_rows(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

at::Tensor mm_out(const at::Tensor& x_in, const at::Tensor& w, int64_t type, int64_t k, at::Tensor out) {
  check_x(x_in, k);
  Part part = check_w(w, type, k);
  const at::Tensor x = contiguous_rows(x_in);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == x.size(0) &&
                  out.size(1) == part.rows && out.stride(1) == 1,
              "out must be float32 [", x.size(0), ", ", part.rows, "] with unit column stride");
  part.y = out.data_ptr<float>();
  run(x.data_ptr<float>(), x.stride(0), x.size(0), k, {part}, out.size(0) > 1 ? out.stride(0) : part.rows);
  return out;
}

at::Tensor mm(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t k) {
  check_x(x, k);
  return mm_out(x, w, type, k, at::empty({x.size(0), w.size(0)}, x.options()));
}

at::Tensor mm_many(const at::Tensor& x_in, const std::vector<std::tuple<at::Tensor, int64_t>>& weights, int64_t k) {
  check_x(x_in, k);
  TORCH_CHECK(!weights.empty(), "mm_many needs at least one weight matrix");
  const at::Tensor x = contiguous_rows(x_in);
  std::vector<Part> parts;
  int64_t columns = 0;
  for (const auto& [w, type] : weights) {
    parts.push_back(check_w(w, type, k));
    columns += parts.back().rows;
  }
  at::Tensor out = at::empty({x.size(0), columns}, x.options());
  int64_t at_column = 0;
  for (Part& p : parts) {
    p.y = out.data_ptr<float>() + at_column;
    at_column += p.rows;
  }
  run(x.data_ptr<float>(), x.stride(0), x.size(0), k, parts, columns);
  return out;
}

// Dequantization, in gguf's reference order of float32 operations (so the results are bit-identical to it). Each
// loop is a run of elements that share their scales and shifts, which the compiler turns into vector code.

void dequantize_b32(const uint8_t* p, int64_t type, float* y) {  // one block of 32
  const float d = half(p);
  switch (type) {
    case Q4_0:
      for (int i = 0; i < 16; ++i) y[i] = d * static_cast<float>((p[2 + i] & 15) - 8);
      for (int i = 0; i < 16; ++i) y[16 + i] = d * static_cast<float>((p[2 + i] >> 4) - 8);
      return;
    case Q4_1: {
      const float m = half(p + 2);
      for (int i = 0; i < 16; ++i) y[i] = d * static_cast<float>(p[4 + i] & 15) + m;
      for (int i = 0; i < 16; ++i) y[16 + i] = d * static_cast<float>(p[4 + i] >> 4) + m;
      return;
    }
    case Q5_0:
    case Q5_1: {
      const bool min = type == Q5_1;
      const float m = min ? half(p + 2) : 0.0f;
      const uint32_t qh = u32(p + (min ? 4 : 2));
      const uint8_t* qs = p + (min ? 8 : 6);
      int32_t q[32];
      for (int i = 0; i < 16; ++i) q[i] = (qs[i] & 15) | static_cast<int32_t>(((qh >> i) & 1) << 4);
      for (int i = 0; i < 16; ++i) q[16 + i] = (qs[i] >> 4) | static_cast<int32_t>(((qh >> (16 + i)) & 1) << 4);
      if (min)
        for (int i = 0; i < 32; ++i) y[i] = d * static_cast<float>(q[i]) + m;
      else
        for (int i = 0; i < 32; ++i) y[i] = d * static_cast<float>(q[i] - 16);
      return;
    }
    case Q8_0:
      for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(static_cast<int8_t>(p[2 + i])) * d;
      return;
  }
}

void dequantize_kq4(const uint8_t* p, bool five, float* y) {  // one Q4_K or Q5_K super-block
  alignas(16) uint32_t sm[4];
  k_scales(p + 4, sm);
  const uint8_t* scale = reinterpret_cast<const uint8_t*>(sm);
  const float d = half(p), dmin = half(p + 2);
  const uint8_t* qs = p + (five ? 48 : 16);
  const uint8_t* qh = p + 16;
  for (int j = 0; j < 8; ++j) {
    const float ds = d * static_cast<float>(scale[j]), dm = dmin * static_cast<float>(scale[8 + j]);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j & 1);
    float* out = y + 32 * j;
    if (five)
      for (int l = 0; l < 32; ++l)
        out[l] = ds * static_cast<float>(((q[l] >> shift) & 15) | (((qh[l] >> j) & 1) << 4)) - dm;
    else
      for (int l = 0; l < 32; ++l) out[l] = ds * static_cast<float>((q[l] >> shift) & 15) - dm;
  }
}

void dequantize_q6k(const uint8_t* p, float* y) {  // one Q6_K super-block
  const float d = half(p + 208);
  const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
  for (int h = 0; h < 2; ++h)
    for (int j = 0; j < 4; ++j) {  // 32 elements: low bits from a nibble of ql, high bits from a bit pair of qh
      const uint8_t* ql = p + 64 * h + 32 * (j & 1);
      const uint8_t* qh = p + 128 + 32 * h;
      const int shift = 4 * (j >> 1), pair = 2 * j;
      for (int half16 = 0; half16 < 2; ++half16) {
        const float ds = d * static_cast<float>(sc[8 * h + 2 * j + half16]);
        float* out = y + 128 * h + 32 * j + 16 * half16;
        for (int l = 16 * half16; l < 16 * half16 + 16; ++l)
          out[l - 16 * half16] =
              ds * static_cast<float>((((ql[l] >> shift) & 15) | (((qh[l] >> pair) & 3) << 4)) - 32);
      }
    }
}

void dequantize_row(const uint8_t* p, const Format& f, int64_t k, float* y) {
  switch (f.type) {
    case F32: std::memcpy(y, p, k * 4); return;
    case F16: {
      int64_t i = 0;
      for (; i + 8 <= k; i += 8)
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * i))));
      for (; i < k; ++i) y[i] = half(p + 2 * i);
      return;
    }
    case BF16:
      for (int64_t i = 0; i < k; ++i) {
        const uint32_t bits = static_cast<uint32_t>(u16(p + 2 * i)) << 16;
        std::memcpy(y + i, &bits, 4);
      }
      return;
  }
  for (int64_t b = 0; b < k / f.block; ++b, p += f.bytes, y += f.block) {
    if (f.layout == Layout::B32)
      dequantize_b32(p, f.type, y);
    else if (f.type == Q6_K)
      dequantize_q6k(p, y);
    else
      dequantize_kq4(p, f.type == Q5_K, y);
  }
}

at::Tensor dequantize(const at::Tensor& w, int64_t type, int64_t k) {
  const Part part = check_w(w, type, k);
  at::Tensor out = at::empty({part.rows, k}, at::kFloat);
  float* y = out.data_ptr<float>();
  at::parallel_for(0, part.rows, std::max<int64_t>(1, (1 << 16) / k), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) dequantize_row(part.w + m * part.w_stride, *part.format, k, y + m * k);
  });
  return out;
}

at::Tensor get_rows(const at::Tensor& w, int64_t type, int64_t k, const at::Tensor& ids_in) {
  const Part part = check_w(w, type, k);
  TORCH_CHECK(ids_in.scalar_type() == at::kLong && ids_in.dim() == 1, "ids must be int64 [n]");
  const at::Tensor ids = ids_in.contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.size(0); ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < part.rows, "row ", id[i], " is outside the ", part.rows, " rows of w");
  at::Tensor out = at::empty({ids.size(0), k}, at::kFloat);
  float* y = out.data_ptr<float>();
  at::parallel_for(0, ids.size(0), std::max<int64_t>(1, (1 << 16) / k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dequantize_row(part.w + id[i] * part.w_stride, *part.format, k, y + i * k);
  });
  return out;
}

std::string isa() { return isa_name(g_isa.load()); }

std::string set_isa(const std::string& name) {
  const std::string previous = isa();
  if (name == "avx2") {
    g_isa = Isa::Avx2;
  } else if (name == "avx512-vnni") {
    TORCH_CHECK(cpu_has_avx512(), "this CPU lacks AVX-512 F/BW/VL/VNNI");
    g_isa = Isa::Avx512;
  } else {
    TORCH_CHECK(false, "unknown kernel ISA '", name, "': avx2 or avx512-vnni");
  }
  return previous;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hogwild's GGUF block kernels: x @ W^T on a GGUF tensor's own blocks (see gguf.cpp)";
  // the products run without the GIL: a server's other threads go on while a step multiplies
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("mm", &mm, "x float32 [N, K] @ W^T, W uint8 [M, row bytes] of GGML type `type` -> float32 [N, M]",
        py::arg("x"), py::arg("w"), py::arg("type"), py::arg("k"), nogil);
  m.def("mm_out", &mm_out, "mm into `out` (float32 [N, M], any row stride: a column slice of a wider matrix)",
        py::arg("x"), py::arg("w"), py::arg("type"), py::arg("k"), py::arg("out"), nogil);
  m.def("mm_many", &mm_many, "x @ [W_1; W_2; ...]^T for [(w, type), ...] sharing K, in one parallel region",
        py::arg("x"), py::arg("weights"), py::arg("k"), nogil);
  m.def("dequantize", &dequantize, "W's blocks -> float32 [M, K], bit-identical to gguf's dequantizer", py::arg("w"),
        py::arg("type"), py::arg("k"), nogil);
  m.def("get_rows", &get_rows, "rows `ids` of W -> float32 [n, K]", py::arg("w"), py::arg("type"), py::arg("k"),
        py::arg("ids"), nogil);
  m.def("isa", &isa, "which kernels run: 'avx512-vnni' or 'avx2'");
  m.def("set_isa", &set_isa, "run the 'avx2' or 'avx512-vnni' kernels from now on; returns the previous",
        py::arg("name"));
}
