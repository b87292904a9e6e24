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

  // fn(chunk) for every chunk in [0, chunks), on this thread and up to threads - 1 helpers.
  void run(int64_t chunks, int threads, const std::function<void(int64_t)>& fn) {
    if (threads <= 1 || chunks <= 1) {
      for (int64_t c = 0; c < chunks; ++c) fn(c);
      return;
    }
    auto job = std::make_shared<Job>(chunks, &fn);
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
  struct Job {
    Job(int64_t chunks, const std::function<void(int64_t)>* fn) : chunks(chunks), fn(fn) {}
    std::atomic<int64_t> next{0}, done{0};
    const int64_t chunks;
    const std::function<void(int64_t)>* fn;  // valid until done == chunks
  };

  static WorkPool*& instance() {
    static WorkPool* pool = new WorkPool();  // never destroyed: helpers run until the process ends
    return pool;
  }

  static void work(Job& job) {
    for (;;) {
      const int64_t chunk = job.next.fetch_add(1, std::memory_order_relaxed);
      if (chunk >= job.chunks) return;
      (*job.fn)(chunk);
      job.done.fetch_add(1, std::memory_order_release);
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
  WorkPool::get().run(chunks, at::get_num_threads(), fn);
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
