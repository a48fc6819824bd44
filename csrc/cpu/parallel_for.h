// A minimal dynamic parallel-for on std::thread, started per call (no global pool, no global
// mutable state): `num_threads - 1` workers plus the calling thread pull item indices from a
// shared atomic counter. Every item must write disjoint outputs, so the result does not depend
// on the schedule.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace bsattn::cpu {

// Threads worth starting for `num_items` items of about `flops_total` work in all: never more
// than the hardware offers or than there are items, and about 4 MFLOP per thread at least, so
// that tiny calls do not pay for thread start-up.
inline int choose_num_threads(int64_t num_items, double flops_total) {
  const unsigned hw = std::thread::hardware_concurrency();
  int64_t n = hw == 0 ? 1 : static_cast<int64_t>(hw);
  n = std::min<int64_t>(n, std::max<int64_t>(1, static_cast<int64_t>(flops_total / 4.0e6)));
  n = std::min<int64_t>(n, std::max<int64_t>(1, num_items));
  return static_cast<int>(n);
}

// Calls body(thread_index, item) for every item in [0, num_items), thread_index in
// [0, num_threads). The first exception thrown by a body is rethrown here after all threads
// have joined (the remaining items are then abandoned).
template <class Body>
void parallel_for(int64_t num_items, int num_threads, Body&& body) {
  if (num_items <= 0) return;
  num_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, num_items)));
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&](int tid) {
    try {
      for (;;) {
        if (failed.load(std::memory_order_relaxed)) return;
        const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
        if (item >= num_items) return;
        body(tid, item);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(num_threads - 1);
  try {
    for (int t = 1; t < num_threads; ++t) threads.emplace_back(worker, t);
  } catch (...) {
    // Could not start a thread: the ones already running and this one finish the work.
  }
  worker(0);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace bsattn::cpu
