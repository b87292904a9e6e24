// rotary_bf16: the rotary position embedding of a prefill's queries or keys (many bf16 rows) in one pass,
// where torch's ops make five (two products, a negation, a concatenation, a sum), each with a temporary.
#include <ATen/ops/empty.h>

#include <algorithm>

#include "ops.h"
#include "rotary.h"
#include "work_pool.h"

namespace vlmkit {

// x [B, H, L, D] (last dimension contiguous), cos and sin [B, L, D] (last dimension contiguous): x rotated,
// [B, H, L, D] (memory laid out [B, L, H, D], as the projections leave queries and keys).
at::Tensor rotary_bf16(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* op = "vlmkit::rotary_bf16";
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16,
              op, " takes bf16 tensors");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && sin.sizes() == cos.sizes() && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(2) && cos.size(2) == x.size(3) && x.size(3) % 2 == 0,
              op, ": x [B, H, L, D], cos and sin [B, L, D] (D even)");
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(2) == 1 && sin.stride(2) == 1, op, ": rows must be contiguous");
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  at::Tensor out = at::empty({B, L, H, D}, x.options());
  const BFloat16* xp = x.const_data_ptr<BFloat16>();
  const BFloat16* cp = cos.const_data_ptr<BFloat16>();
  const BFloat16* sp = sin.const_data_ptr<BFloat16>();
  BFloat16* op_out = out.data_ptr<BFloat16>();
  constexpr int64_t kPositionsPerChunk = 16;
  parallel_chunks_on_torch_threads(B * ((L + kPositionsPerChunk - 1) / kPositionsPerChunk), [&](int64_t chunk) {
    const int64_t chunks_per_row = (L + kPositionsPerChunk - 1) / kPositionsPerChunk;
    const int64_t b = chunk / chunks_per_row, first = chunk % chunks_per_row * kPositionsPerChunk;
    for (int64_t l = first; l < std::min(L, first + kPositionsPerChunk); ++l) {
      const BFloat16* c = cp + b * cos.stride(0) + l * cos.stride(1);
      const BFloat16* s = sp + b * sin.stride(0) + l * sin.stride(1);
      for (int64_t h = 0; h < H; ++h) {
        const BFloat16* row = xp + b * x.stride(0) + h * x.stride(1) + l * x.stride(2);
        rotate(row, c, s, D, op_out + ((b * L + l) * H + h) * D);
      }
    }
  });
  return out.transpose(1, 2);
}

}  // namespace vlmkit
