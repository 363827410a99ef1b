// A small persistent thread pool for the kernels (no OpenMP: torch ships its own libgomp, and a
// second OpenMP runtime in the process fights it for the cores).
//
// run(ntasks, fn) executes fn(task, worker) for task in [0, ntasks) on the caller plus the
// workers, handing out tasks one at a time from an atomic counter (dynamic scheduling, so a core
// slowed by another process just takes fewer tasks). Jobs from different Python threads are
// serialised. After a job the workers wait for the next one as the job says (AfterJob): `spin`
// keeps polling for ~0.2 ms before sleeping, so back-to-back kernel calls (the layers of a decode
// step) do not pay a wake-up each; `park` sleeps at once, for a job whose caller hands the cores
// to other threads next (torch's own, e.g. the matmuls between MoE decode steps), which a
// spinning worker would hold for those 0.2 ms. While the pool is held (hold(true) ... hold(false), counted) the
// workers poll between jobs without a time limit, after parking jobs too: for a caller that runs short single-
// threaded work between kernel calls (a decode step's norms and rotary between its matmuls), where a worker that
// fell asleep would wake late and leave the start of the next call to the caller alone. Size: SPARSEFORGE_NUM_THREADS at first use, else the CPUs this process
// may run on; set_num_threads() changes it. A forked child gets a fresh pool.
#pragma once

#include <cstdint>
#include <utility>

namespace sf {

using TaskFn = void (*)(void* ctx, int64_t task, int worker);

enum class AfterJob : int { spin = 0, park = 1 };

// How the workers have waited so far (counts since the process started; for tests and tuning):
// `spun` waits began by polling, `parked` went to sleep at once.
struct WaitCounts {
  uint64_t spun = 0, parked = 0;
};

int num_threads();               // caller included
void set_num_threads(int n);     // n >= 1; throws std::invalid_argument otherwise
void run_tasks(int64_t ntasks, TaskFn fn, void* ctx, bool parallel = true, AfterJob after = AfterJob::spin);
WaitCounts wait_counts();
void hold(bool on);  // on: one more holder (workers keep polling); off: one fewer
int holders();

// parallel_for(ntasks, [&](int64_t task, int worker) {...}); worker is in [0, num_threads()).
template <class F>
void parallel_for(int64_t ntasks, F&& f, bool parallel = true, AfterJob after = AfterJob::spin) {
  auto tramp = [](void* ctx, int64_t task, int worker) { (*static_cast<F*>(ctx))(task, worker); };
  run_tasks(ntasks, tramp, static_cast<void*>(&f), parallel, after);
}

}  // namespace sf
