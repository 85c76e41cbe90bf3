// parallel_for on XLA's intra-op thread pool, for the XLA FFI kernels of llmx (llmx/native.py builds them).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace llmx {

// Runs fn(0 .. n-1) on the calling thread and on XLA's intra-op threads. The caller takes units too,
// so the call never waits for a pool thread that is busy elsewhere; a pool task that starts after all
// units are taken returns at once (it shares only the counters, through the shared_ptr).
struct Work {
  std::atomic<long> next{0};
  std::atomic<long> done{0};
  long n = 0;
  std::mutex mu;
  std::condition_variable cv;
};

inline void parallel_for(xla::ffi::ThreadPool& pool, long n, const std::function<void(long)>& fn) {
  auto work = std::make_shared<Work>();
  work->n = n;
  auto run = [work](const std::function<void(long)>* body) {
    long done_here = 0;
    for (long i; (i = work->next.fetch_add(1)) < work->n;) {
      (*body)(i);
      ++done_here;
    }
    if (done_here && work->done.fetch_add(done_here) + done_here == work->n) {
      std::lock_guard<std::mutex> lock(work->mu);
      work->cv.notify_all();
    }
  };
  int helpers = std::min<long>(pool.num_threads(), n - 1);
  for (int t = 0; t < helpers; ++t) pool.Schedule([run, &fn]() { run(&fn); });
  run(&fn);
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done.load() == work->n; });
}
// (A helper scheduled after the units ran out never dereferences `fn`: its loop exits before the body.)

}  // namespace llmx
