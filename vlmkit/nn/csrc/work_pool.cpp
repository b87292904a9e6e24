// The helper threads behind parallel_chunks (work_pool.h).
#include "work_pool.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace vlmkit {
namespace {

class WorkPool {
 public:
  static WorkPool& get() {
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { instance() = new WorkPool(); }); });
    return *instance();
  }

  // fn(chunk) for every chunk in [0, chunks), on this thread and up to threads - 1 helpers; in_runs: each
  // thread first takes the chunks of its own run in order (parallel_runs in work_pool.h).
  void run(int64_t chunks, int threads, const std::function<void(int64_t)>& fn, bool in_runs) {
    if (threads <= 1 || chunks <= 1) {
      for (int64_t c = 0; c < chunks; ++c) fn(c);
      return;
    }
    auto job = std::make_shared<Job>(chunks, &fn, in_runs ? std::min<int64_t>(threads, chunks) : 0);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(helpers_.size()) < threads - 1) helpers_.emplace_back([this] { helper_loop(); });
      current_ = job;
      published_.store(++generation_, std::memory_order_release);
    }
    wake_.notify_all();
    work(*job);
    for (int spins = 0; job->done.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 4096) {
        _mm_pause();
      } else {
        std::this_thread::yield();  // a helper mid-chunk may need this core
      }
    }
  }

 private:
  // Chunks [front, back) of one run not yet taken, in one word so that its owner (from the front) and
  // the others (from the back) never take the same chunk.
  class Run {
   public:
    void reset(int64_t begin, int64_t end) { left_.store(pack(begin, end), std::memory_order_relaxed); }
    // the next chunk from the front (from_front) or the back; -1 once none is left
    int64_t take(bool from_front) {
      uint64_t seen = left_.load(std::memory_order_relaxed);
      for (;;) {
        const int64_t front = static_cast<int64_t>(seen >> 32), back = static_cast<int64_t>(seen & 0xFFFFFFFFu);
        if (front >= back) return -1;
        const uint64_t taken = from_front ? pack(front + 1, back) : pack(front, back - 1);
        if (left_.compare_exchange_weak(seen, taken, std::memory_order_relaxed)) return from_front ? front : back - 1;
      }
    }

   private:
    static uint64_t pack(int64_t front, int64_t back) {  // chunk numbers below 2^32
      return static_cast<uint64_t>(front) << 32 | static_cast<uint64_t>(back);
    }
    std::atomic<uint64_t> left_{0};
  };

  struct Job {
    Job(int64_t chunks, const std::function<void(int64_t)>* fn, int64_t runs) : chunks(chunks), fn(fn), runs(runs) {
      for (int64_t r = 0; r < runs; ++r) run_of[r].reset(r * chunks / runs, (r + 1) * chunks / runs);
    }
    std::atomic<int64_t> next{0}, done{0}, joined{0};
    const int64_t chunks;
    const std::function<void(int64_t)>* fn;  // valid until done == chunks
    const int64_t runs;  // 0: chunks taken in one shared order
    std::unique_ptr<Run[]> run_of{runs > 0 ? new Run[runs] : nullptr};  // none for a shared order
  };

  static WorkPool*& instance() {
    static WorkPool* pool = new WorkPool();  // never destroyed: helpers run until the process ends
    return pool;
  }

  static void work(Job& job) {
    if (job.runs > 0) return work_runs(job);
    for (;;) {
      const int64_t chunk = job.next.fetch_add(1, std::memory_order_relaxed);
      if (chunk >= job.chunks) return;
      (*job.fn)(chunk);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  // This thread's own run from the front, then what is left of the others' from their backs.
  static void work_runs(Job& job) {
    const int64_t own = job.joined.fetch_add(1, std::memory_order_relaxed);
    for (int64_t r = own; r < own + job.runs; ++r) {
      Run& run = job.run_of[r % job.runs];
      for (int64_t chunk = run.take(r == own); chunk >= 0; chunk = run.take(r == own)) {
        (*job.fn)(chunk);
        job.done.fetch_add(1, std::memory_order_release);
      }
    }
  }

  void helper_loop() {
    uint64_t seen = 0;
    for (;;) {
      // decode steps call back to back: spin a little before sleeping
      for (int i = 0; i < 2000 && published_.load(std::memory_order_acquire) == seen; ++i) _mm_pause();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = current_;
      }
      work(*job);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> current_;
  uint64_t generation_ = 0;
  std::atomic<uint64_t> published_{0};
  std::vector<std::thread> helpers_;
};

}  // namespace

void parallel_chunks(int64_t chunks, const std::function<void(int64_t)>& fn) {
  WorkPool::get().run(chunks, at::get_num_threads(), fn, false);
}

void parallel_runs(int64_t chunks, const std::function<void(int64_t)>& fn) {
  WorkPool::get().run(chunks, at::get_num_threads(), fn, true);
}

void parallel_chunks_on_torch_threads(int64_t chunks, const std::function<void(int64_t)>& fn) {
#ifndef _OPENMP
  parallel_chunks(chunks, fn);  // built without OpenMP: at::parallel_for would run on this thread alone
#else
  std::atomic<int64_t> next{0};  // chunks claimed one at a time, as in parallel_chunks: uneven ones balance
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t chunk = next.fetch_add(1, std::memory_order_relaxed); chunk < chunks;
         chunk = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(chunk);
    }
  });
#endif
}

}  // namespace vlmkit
