// Chunked work sharing without a barrier: work is cut into chunks that the calling thread and helper
// threads claim from a shared counter; the caller returns as soon as every chunk is done. Unlike a
// fork-join barrier, a helper that the OS has not scheduled (a busy machine) is simply not waited for.
#pragma once

#include <cstdint>
#include <functional>

namespace vlmkit {

// fn(chunk) for every chunk in [0, chunks), on this thread and up to torch's thread count - 1 helpers.
void parallel_chunks(int64_t chunks, const std::function<void(int64_t)>& fn);

// The same, each thread taking a run of consecutive chunks in order: [0, chunks) cut into one run per thread,
// each taken from the front by the thread that joins for it and, once a thread's own run is done, from the
// back of the others'. Chunks that follow each other in memory (a weight's rows) are then one sequential
// stream per thread, which memory serves faster than chunks dealt out in turn; a helper that the OS has not
// scheduled still holds nothing up.
void parallel_runs(int64_t chunks, const std::function<void(int64_t)>& fn);

// The same as parallel_chunks on torch's own threads (its OpenMP team), for work that runs between torch's parallel ops (a
// prefill's attention and norms between its GEMMs): torch's threads keep spinning for a while after each
// GEMM, and vlmkit's helpers beside them would leave more busy threads than cores.
void parallel_chunks_on_torch_threads(int64_t chunks, const std::function<void(int64_t)>& fn);

}  // namespace vlmkit
