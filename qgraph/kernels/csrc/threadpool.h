// A small fork-join pool for the BiQGEMM kernel, built so that a busy machine never stalls a call.
//
// OpenMP's join waits for every thread of the team, so when the cores are shared and a worker is not
// scheduled in time, each call waits for the OS to run it (measured: 2-thread medians of 12-26 ms for a
// 0.8 ms kernel while other processes kept both cores busy). Here the caller claims chunks like any
// worker and returns as soon as every chunk is done: a worker that wakes after all chunks are claimed
// does nothing, and the caller never waits for it. Per-job state is reference counted, so such a late
// worker only ever touches its own finished job. If a call still had to wait long for a preempted worker,
// the next calls run on the caller alone for a while (the machine is oversubscribed).
#ifndef QG_THREADPOOL_H
#define QG_THREADPOOL_H

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QG_PAUSE() _mm_pause()
#else
#define QG_PAUSE() std::this_thread::yield()
#endif

namespace qg {

// fn(ctx, slot, chunk): slot in [0, threads) is unique among the threads running chunks of one job.
using ChunkFn = void (*)(void* ctx, int slot, int64_t chunk);

class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool();  // stopped by shutdown(), never deleted
    return *pool;
  }

  // Stops and joins the workers (called when the library is unloaded, so no thread runs unmapped code).
  void shutdown() {
    std::vector<std::thread> workers;
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      workers.swap(workers_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    if (forked_child()) {  // the workers do not exist in a forked child
      for (auto& t : workers) t.detach();
      return;
    }
    for (auto& t : workers) t.join();
  }

  // Runs fn for every chunk in [0, nchunks) on the calling thread and up to threads-1 workers.
  void run(int threads, int64_t nchunks, ChunkFn fn, void* ctx) {
    if (nchunks <= 0) return;
    threads = static_cast<int>(std::min<int64_t>(std::max(threads, 1), nchunks));
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    // Inline: one thread, a nested or concurrent call, a forked child, or backing off after a call whose
    // workers were preempted by other processes (see below).
    if (threads == 1 || !busy.owns_lock() || forked_child() || backoff_ > 0) {
      if (busy.owns_lock() && backoff_ > 0) --backoff_;
      for (int64_t c = 0; c < nchunks; ++c) fn(ctx, 0, c);
      return;
    }
    const auto t_start = std::chrono::steady_clock::now();
    auto job = std::make_shared<Job>();
    job->fn = fn;
    job->ctx = ctx;
    job->nchunks = nchunks;
    job->workers = threads - 1;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stop_) {
        for (int64_t c = 0; c < nchunks; ++c) fn(ctx, 0, c);
        return;
      }
      while (static_cast<int>(workers_.size()) < job->workers) {
        const int id = static_cast<int>(workers_.size());
        workers_.emplace_back([this, id] { worker_main(id); });
      }
      job_ = job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(*job, 0);
    // Only chunks already claimed by a running worker are waited for.
    const auto t_own = std::chrono::steady_clock::now();
    for (int spins = 0; job->done.load(std::memory_order_acquire) < nchunks; ++spins) {
      if (spins < 20000)
        QG_PAUSE();
      else
        std::this_thread::yield();
    }
    // When the cores are oversubscribed, a worker preempted in the middle of a chunk makes the caller wait
    // for the OS to run it again (often milliseconds): then the next calls run on the caller alone, as a
    // single-threaded library would, and the pool is tried again after kBackoffCalls calls.
    const auto t_end = std::chrono::steady_clock::now();
    const std::chrono::nanoseconds own = t_own - t_start;
    if (t_end - t_own > std::max(kMinStall, own / 2)) backoff_ = kBackoffCalls;
    std::lock_guard<std::mutex> lk(mu_);
    if (job_ == job) job_.reset();
  }

 private:
  struct Job {
    ChunkFn fn = nullptr;
    void* ctx = nullptr;
    int64_t nchunks = 0;
    int workers = 0;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<int> slots{1};  // slot 0 is the caller's
  };

  ThreadPool() { pthread_atfork(nullptr, nullptr, [] { child_flag() = true; }); }

  static bool& child_flag() {
    static bool flag = false;
    return flag;
  }
  static bool forked_child() { return child_flag(); }

  static void work(Job& job, int slot) {
    int64_t c;
    while ((c = job.next.fetch_add(1, std::memory_order_relaxed)) < job.nchunks) {
      if (slot < 0) slot = job.slots.fetch_add(1, std::memory_order_relaxed);
      job.fn(job.ctx, slot, c);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  void worker_main(int id) {
    uint64_t seen = 0;
    for (;;) {
      // Spin a little (back-to-back calls, e.g. consecutive layers), then sleep.
      for (int spins = 0; gen_.load(std::memory_order_acquire) == seen && spins < 4000; ++spins) QG_PAUSE();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_relaxed) != seen; });
        if (stop_) return;
        seen = gen_.load(std::memory_order_relaxed);
        if (job_ && id < job_->workers) job = job_;
      }
      if (job) work(*job, -1);
    }
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> gen_{0};
  bool stop_ = false;
  int backoff_ = 0;  // calls left to run inline (guarded by run_mu_)
  static constexpr int kBackoffCalls = 64;
  static constexpr std::chrono::nanoseconds kMinStall{500000};
};

}  // namespace qg

#endif
