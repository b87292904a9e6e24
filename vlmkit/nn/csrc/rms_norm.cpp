// rms_norm_bf16: RMSNorm of many bf16 rows (a prefill's hidden states) in one pass over them, the twin of
// vlmkit/nn/norms.py's RMSNorm (tests/test_cpu_kernels.py keeps them equal). torch runs the module's
// formula as seven ops, each a pass over the rows with a temporary of their size (two in fp32): on a
// 705 x 2048 prefill that took 4 ms a norm, 0.2 s of a Janus-Pro-1B first token. The row's arithmetic:
// rms_norm.h.
#include <ATen/ops/empty.h>

#include <algorithm>

#include "ops.h"
#include "rms_norm.h"
#include "work_pool.h"

namespace vlmkit {

// x [..., D] bf16, weight [D] bf16: weight * bf16(x * rsqrt(mean(x^2) + eps)), bf16, the shape of x.
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "vlmkit::rms_norm_bf16";
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, op, " takes bf16 tensors");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight [D] for x [..., D]");
  const at::Tensor input = x.contiguous(), w = weight.contiguous();
  const int64_t D = input.size(-1), rows = D == 0 ? 0 : input.numel() / D;
  at::Tensor out = at::empty(input.sizes(), input.options());
  const BFloat16* xp = input.const_data_ptr<BFloat16>();
  const BFloat16* wp = w.const_data_ptr<BFloat16>();
  BFloat16* result = out.data_ptr<BFloat16>();
  const float epsilon = static_cast<float>(eps);
  constexpr int64_t kRowsPerChunk = 8;
  parallel_chunks_on_torch_threads((rows + kRowsPerChunk - 1) / kRowsPerChunk, [&](int64_t chunk) {
    for (int64_t r = chunk * kRowsPerChunk; r < std::min(rows, (chunk + 1) * kRowsPerChunk); ++r) {
      rms_norm_row(xp + r * D, D, wp, epsilon, result + r * D);
    }
  });
  return out;
}

}  // namespace vlmkit
