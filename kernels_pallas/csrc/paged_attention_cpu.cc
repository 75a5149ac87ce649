// Ragged paged attention for CPU, called from XLA through the FFI (see kernels_pallas/cpu.py).
//
// Same contract as the pure-jnp reference (kernels_pallas/ref.py): the step's tokens form one
// ragged stream; sequence s owns tokens cu_q_lens[s]..cu_q_lens[s+1], the last q_len positions of
// its kv_lens[s] context. New K/V are written into their pages first, then every token attends
// causally to its sequence's pages. The cache [L, pages, page_size, 2K, H] (keys in heads
// [0, K), values in [K, 2K)), float32 or bfloat16, is aliased to the second output and updated in
// place; q, k, v and the arithmetic are float32.
//
// Work is split over tokens (or token and KV head) with OpenMP; each cached key and value is read
// once for all G = N / K query heads of its group: decode is bound by memory, not FLOPs.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Cache elements: float, or bfloat16 stored as its upper 16 bits (uint16_t).
inline float Load(float x) { return x; }
inline float Load(uint16_t x) {
  uint32_t bits = uint32_t{x} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void Store(float x, float* dst) { *dst = x; }
inline void Store(float x, uint16_t* dst) {  // round to nearest even, as XLA converts
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits += 0x7FFF + ((bits >> 16) & 1);
  *dst = static_cast<uint16_t>(bits >> 16);
}

template <typename C>
inline float Dot(const float* __restrict a, const C* __restrict b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * Load(b[i]);
  return acc;
}

template <typename C>
inline void Axpy(float w, const C* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * Load(x[i]);
}

template <ffi::DataType CT>
ffi::Error PagedAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<CT> cache_in,
                          ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                          ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> distribution,
                          ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<CT> cache_out,
                          float sm_scale, int32_t sliding_window, float soft_cap, int64_t layer) {
  using C = ffi::NativeType<CT>;
  const auto qd = q.dimensions();
  const auto cd = cache_in.dimensions();
  const int64_t T = qd[0], N = qd[1], H = qd[2];
  const int64_t K = k.dimensions()[1];
  const int64_t G = N / K;
  const int64_t rank = cd.size();
  if (rank != 4 && rank != 5) return ffi::Error::InvalidArgument("kv_cache must be rank 4 or 5");
  const int64_t num_layers = rank == 5 ? cd[0] : 1;
  const int64_t num_pages = cd[rank - 4], page_size = cd[rank - 3];
  if (cd[rank - 2] != 2 * K || cd[rank - 1] != H)
    return ffi::Error::InvalidArgument("kv_cache last dims must be (2K, H)");
  if (layer < 0 || layer >= num_layers) return ffi::Error::InvalidArgument("layer out of range");
  if (page_size & (page_size - 1)) return ffi::Error::InvalidArgument("page size must be 2^k");
  const int64_t page_shift = __builtin_ctzll(page_size), page_mask = page_size - 1;
  const int64_t S = kv_lens.dimensions()[0];
  const int64_t P = page_indices.dimensions()[0] / S;

  C* cache = cache_out->typed_data();
  if (cache != cache_in.typed_data()) {
    std::memcpy(cache, cache_in.typed_data(), cache_in.size_bytes());
  }
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const int32_t* lens = kv_lens.typed_data();
  const int32_t* pages = page_indices.typed_data();
  const int32_t* cu = cu_q_lens.typed_data();
  const int64_t num_seqs = std::min<int64_t>(distribution.typed_data()[2], S);
  float* o = out->typed_data();
  const int64_t row = 2 * K * H;  // floats per cached token
  C* layer_base = cache + layer * num_pages * page_size * row;
  const int64_t num_tokens = num_seqs > 0 ? cu[num_seqs] : 0;

  // Token -> sequence and position, once.
  std::vector<int32_t> seq_of(num_tokens), pos_of(num_tokens);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int32_t q_len = cu[s + 1] - cu[s];
    for (int32_t i = cu[s]; i < cu[s + 1]; ++i) {
      seq_of[i] = static_cast<int32_t>(s);
      pos_of[i] = lens[s] - q_len + (i - cu[s]);
    }
  }

  auto slot_ptr = [&](int64_t s, int64_t pos) {
    const int64_t page = pages[s * P + (pos >> page_shift)];
    return layer_base + ((page << page_shift) + (pos & page_mask)) * row;
  };

  // 1. Write the new keys and values.
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < num_tokens; ++t) {
    C* dst = slot_ptr(seq_of[t], pos_of[t]);
    for (int64_t i = 0; i < K * H; ++i) Store(kp[t * K * H + i], dst + i);
    for (int64_t i = 0; i < K * H; ++i) Store(vp[t * K * H + i], dst + K * H + i);
  }

  // 2. Attend. A work item is one token and a run of its KV heads: all K heads when there are
  // enough tokens to keep the threads busy (each cached row is then read once, contiguously),
  // one head per item otherwise (a single decode still uses every thread).
  std::memset(o, 0, T * N * H * sizeof(float));
  const int64_t heads_per_item = num_tokens >= 8 ? K : 1;
  const int64_t items = num_tokens * (K / heads_per_item);
#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t t = item / (K / heads_per_item);
      const int64_t kh0 = (item % (K / heads_per_item)) * heads_per_item;
      const int64_t s = seq_of[t], pos = pos_of[t];
      const int64_t lo = sliding_window > 0 ? std::max<int64_t>(0, pos - sliding_window + 1) : 0;
      const int64_t n = pos - lo + 1;
      const int64_t heads = heads_per_item * G;  // query heads handled by this item
      scores.resize(heads * n);
      const float* qh = qp + (t * N + kh0 * G) * H;
      for (int64_t j = 0, p = lo; p <= pos; ++j, ++p) {
        const C* keys = slot_ptr(s, p) + kh0 * H;
        for (int64_t h = 0; h < heads; ++h) {
          float x = Dot(qh + h * H, keys + (h / G) * H, H) * sm_scale;
          if (soft_cap > 0.f) x = std::tanh(x / soft_cap) * soft_cap;
          scores[h * n + j] = x;
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* sc = scores.data() + h * n;
        float m = sc[0];
        for (int64_t j = 1; j < n; ++j) m = std::max(m, sc[j]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
          sc[j] = std::exp(sc[j] - m);
          sum += sc[j];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) sc[j] *= inv;
      }
      float* oh = o + (t * N + kh0 * G) * H;
      for (int64_t j = 0; j < n; ++j) {
        const C* vals = slot_ptr(s, lo + j) + (K + kh0) * H;
        for (int64_t h = 0; h < heads; ++h) Axpy(scores[h * n + j], vals + (h / G) * H, oh + h * H, H);
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

#define JAXSERVE_BIND(CT)                                                       \
  ffi::Ffi::Bind()                                                              \
      .Arg<ffi::Buffer<ffi::F32>>() /* q */                                     \
      .Arg<ffi::Buffer<ffi::F32>>() /* k */                                     \
      .Arg<ffi::Buffer<ffi::F32>>() /* v */                                     \
      .Arg<ffi::Buffer<CT>>()       /* kv_cache */                              \
      .Arg<ffi::Buffer<ffi::S32>>() /* kv_lens */                               \
      .Arg<ffi::Buffer<ffi::S32>>() /* page_indices */                          \
      .Arg<ffi::Buffer<ffi::S32>>() /* cu_q_lens */                             \
      .Arg<ffi::Buffer<ffi::S32>>() /* distribution */                          \
      .Ret<ffi::Buffer<ffi::F32>>() /* out */                                   \
      .Ret<ffi::Buffer<CT>>()       /* kv_cache, aliased */                     \
      .Attr<float>("sm_scale")                                                  \
      .Attr<int32_t>("sliding_window")                                          \
      .Attr<float>("soft_cap")                                                  \
      .Attr<int64_t>("layer")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedAttentionF32, PagedAttention<ffi::F32>,
                              JAXSERVE_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedAttentionBF16, PagedAttention<ffi::BF16>,
                              JAXSERVE_BIND(ffi::BF16));
