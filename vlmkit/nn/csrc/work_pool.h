// Chunked work sharing without a barrier: work is cut into chunks that the calling thread and helper
// threads claim from a shared counter; the caller returns as soon as every chunk is done. Unlike a
// fork-join barrier, a helper that the OS has not scheduled (a busy machine) is simply not waited for.
#pragma once

#include <cstdint>
#include <functional>

namespace vlmkit {

// fn(chunk) for every chunk in [0, chunks), on this thread and up to torch's thread count - 1 helpers.
void parallel_chunks(int64_t chunks, const std::function<void(int64_t)>& fn);

}  // namespace vlmkit
