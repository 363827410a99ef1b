#include "threadpool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SF_PAUSE() _mm_pause()
#else
#define SF_PAUSE() ((void)0)
#endif

namespace sf {
namespace {

constexpr auto kSpin = std::chrono::microseconds(200);

int default_threads() {
  if (const char* env = std::getenv("SPARSEFORGE_NUM_THREADS")) {
    if (*env) {
      char* end = nullptr;
      long n = std::strtol(env, &end, 10);
      if (*end != '\0' || n < 1 || n > 1024) {
        throw std::invalid_argument(std::string("SPARSEFORGE_NUM_THREADS='") + env +
                                    "' must be a whole number from 1 to 1024");
      }
      return static_cast<int>(n);
    }
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
#endif
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

class Pool {
 public:
  explicit Pool(int n) { start(n); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int n) {
    std::lock_guard<std::mutex> job(job_mutex_);
    stop();
    start(n);
  }

  void run(int64_t ntasks, TaskFn fn, void* ctx, bool parallel, AfterJob after) {
    if (ntasks <= 0) return;
    std::lock_guard<std::mutex> job(job_mutex_);
    const bool park = after == AfterJob::park;
    if (!parallel || workers_.empty() || ntasks == 1) {
      // the workers still polling after an earlier job go to sleep now
      if (park) park_gen_.store(gen_.load(std::memory_order_relaxed), std::memory_order_release);
      for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t, 0);
      return;
    }
    fn_ = fn;
    ctx_ = ctx;
    ntasks_ = ntasks;
    next_.store(0, std::memory_order_relaxed);
    uint64_t g;
    {
      std::lock_guard<std::mutex> lk(m_);
      g = gen_.load(std::memory_order_relaxed) + 1;
      if (park) park_gen_.store(g, std::memory_order_release);  // applies to the waits after this job, not before it
      state_.store(job_state(g), std::memory_order_release);  // open, nobody joined yet
      gen_.store(g, std::memory_order_release);
    }
    cv_.notify_all();
    work(0);
    // Every task has been handed out. Close the job: a worker that wakes up from now on skips it
    // without touching fn_ / ctx_, so only the workers that joined (and may still run a task)
    // are waited for, not the ones the OS has not scheduled yet (waiting for every worker to
    // check in cost a scheduler slice per call on a loaded machine).
    uint64_t st = state_.fetch_or(kClosed, std::memory_order_acq_rel) | kClosed;
    auto t0 = std::chrono::steady_clock::now();
    unsigned spins = 0;
    while ((st & kCount) != 0) {
      SF_PAUSE();
      if ((++spins & 63) == 0 && std::chrono::steady_clock::now() - t0 > kSpin) {
        std::unique_lock<std::mutex> lk(done_m_);
        done_cv_.wait(lk, [&] { return (state_.load(std::memory_order_acquire) & kCount) == 0; });
      }
      st = state_.load(std::memory_order_acquire);
    }
  }

  void hold(bool on) {
    if (on) {
      holders_.fetch_add(1, std::memory_order_acq_rel);
    } else if (holders_.fetch_sub(1, std::memory_order_acq_rel) <= 0) {
      holders_.fetch_add(1, std::memory_order_acq_rel);
      throw std::logic_error("thread pool: hold(false) without a matching hold(true)");
    }
  }
  int holders() const { return holders_.load(std::memory_order_acquire); }

  WaitCounts counts() const {
    return {spun_.load(std::memory_order_relaxed), parked_.load(std::memory_order_relaxed)};
  }

 private:
  void start(int n) {
    stop_flag_ = false;
    // the generation is read here, not in the new thread: a thread that starts late must still
    // see the first job published after start() as new
    const uint64_t g0 = gen_.load(std::memory_order_acquire);
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i, g0] { loop(i, g0); });
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_flag_ = true;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  void work(int worker) {
    for (;;) {
      int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks_) break;
      fn_(ctx_, t, worker);
    }
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      auto t0 = std::chrono::steady_clock::now();
      unsigned spins = 0;
      bool polling = holders_.load(std::memory_order_acquire) > 0 || park_gen_.load(std::memory_order_acquire) != seen;
      (polling ? spun_ : parked_).fetch_add(1, std::memory_order_relaxed);
      while (gen_.load(std::memory_order_acquire) == seen) {
        if (polling) {
          SF_PAUSE();
          if ((++spins & 63) != 0) continue;
          polling = holders_.load(std::memory_order_acquire) > 0 ||
                    (std::chrono::steady_clock::now() - t0 <= kSpin && park_gen_.load(std::memory_order_acquire) != seen);
          if (polling) continue;
        }
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_flag_) return;
      if (!join(seen)) continue;  // that job is closed (or a newer one is being set up): wait for the next
      work(id);
      const uint64_t left = state_.fetch_sub(1, std::memory_order_acq_rel) - 1;
      if ((left & kCount) == 0 && (left & kClosed)) {
        std::lock_guard<std::mutex> lk(done_m_);
        done_cv_.notify_one();
      }
    }
  }

  // Job state: generation (upper 32 bits), closed flag, count of workers inside the job.
  static constexpr uint64_t kClosed = uint64_t{1} << 31;
  static constexpr uint64_t kCount = kClosed - 1;
  static uint64_t job_state(uint64_t gen) { return (gen & 0xffffffffu) << 32; }

  // Enter job `gen` if it is still open; the acquire pairs with the release that published fn_.
  bool join(uint64_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      if ((s >> 32) != (gen & 0xffffffffu) || (s & kClosed)) return false;
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return true;
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_mutex_;  // one job at a time
  std::mutex m_;
  std::condition_variable cv_;
  std::mutex done_m_;
  std::condition_variable done_cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> state_{kClosed};  // see job_state
  std::atomic<uint64_t> park_gen_{~uint64_t{0}};  // generation after which the workers sleep at once (park)
  std::atomic<uint64_t> spun_{0}, parked_{0};
  std::atomic<int> holders_{0};  // hold(): while > 0 the workers poll between jobs
  bool stop_flag_ = false;
  int64_t ntasks_ = 0;
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
};

std::mutex g_pool_mutex;
Pool* g_pool = nullptr;  // leaked on purpose: never joined during interpreter shutdown

void after_fork_in_child() {
  // the worker threads do not exist in the child: forget the old pool (leak it) and start anew
  g_pool = nullptr;
  new (&g_pool_mutex) std::mutex();
}

Pool& pool() {
  std::lock_guard<std::mutex> lk(g_pool_mutex);
  if (!g_pool) {
    static bool registered = false;
    if (!registered) {
      pthread_atfork(nullptr, nullptr, after_fork_in_child);
      registered = true;
    }
    g_pool = new Pool(default_threads());
  }
  return *g_pool;
}

}  // namespace

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
  if (n < 1 || n > 1024) throw std::invalid_argument("number of threads must be from 1 to 1024");
  Pool& p = pool();
  if (p.size() != n) p.resize(n);
}

void run_tasks(int64_t ntasks, TaskFn fn, void* ctx, bool parallel, AfterJob after) {
  pool().run(ntasks, fn, ctx, parallel, after);
}

WaitCounts wait_counts() { return pool().counts(); }

void hold(bool on) { pool().hold(on); }

int holders() { return pool().holders(); }

}  // namespace sf
