// reusable_empty: large CPU buffers (a request's KV cache) whose memory waits for the next request once
// the last tensor viewing it is gone. Memory allocated afresh at this size (above glibc's 32 MiB mmap
// threshold it is mapped anew every time) is faulted in and zeroed by the kernel page by page as it is
// first written: ~30 ms of every first token of a 1B model with a 700-token prompt. Up to kKeptBlocks
// freed blocks, kKeptBytes in all, are kept; a request takes the smallest that fits and is at most
// kMostWasted times its size (a short request would otherwise hold a long one's block, and the next long
// request map its memory afresh beside it).
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <mutex>

#include "ops.h"

namespace vlmkit {
namespace {

constexpr size_t kKeptBlocks = 4;
constexpr size_t kKeptBytes = size_t{1} << 30;
constexpr size_t kMostWasted = 2;

struct Block {
  void* address;
  size_t bytes;
};

class KeptBlocks {
 public:
  static KeptBlocks& get() {
    static KeptBlocks* kept = new KeptBlocks();  // never destroyed: tensors may be freed at exit
    return *kept;
  }

  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = blocks_.end();
      for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
        const bool fits = it->bytes >= bytes && it->bytes / kMostWasted <= bytes;
        if (fits && (best == blocks_.end() || it->bytes < best->bytes)) best = it;
      }
      if (best != blocks_.end()) {
        const Block block = *best;
        blocks_.erase(best);
        total_ -= block.bytes;
        return block;
      }
    }
    void* address = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(address != MAP_FAILED, "vlmkit::reusable_empty: out of memory for ", bytes, " bytes");
    return Block{address, bytes};
  }

  void give_back(Block block) {
    std::lock_guard<std::mutex> lock(mutex_);
    blocks_.push_back(block);
    total_ += block.bytes;
    while (!blocks_.empty() && (blocks_.size() > kKeptBlocks || total_ > kKeptBytes)) {  // the oldest go
      munmap(blocks_.front().address, blocks_.front().bytes);
      total_ -= blocks_.front().bytes;
      blocks_.pop_front();
    }
  }

 private:
  std::mutex mutex_;
  std::deque<Block> blocks_;
  size_t total_ = 0;
};

}  // namespace

at::Tensor reusable_empty(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "vlmkit::reusable_empty: a positive size");
  const Block block = KeptBlocks::get().take(static_cast<size_t>(bytes));
  return at::from_blob(
      block.address, {bytes}, [block](void*) { KeptBlocks::get().give_back(block); },
      at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

}  // namespace vlmkit
