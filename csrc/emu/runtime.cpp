// The emulator's scheduler, barriers, warp shuffles and launch check (device.h describes the model),
// plus the launch and sort counters that the tests read through ctypes (extern "C" at the end).
//
// Each CUDA thread of a block is a fiber (ucontext) on the launching OS thread, from a pool that
// lives as long as the process (launches are serialised by a mutex). The scheduler runs every
// runnable fiber, in thread order, until it waits at __syncthreads or __shfl_down_sync or returns,
// and releases a barrier once every live thread of the block (of the warp, for a shuffle) waits at
// it. Runs are deterministic, cost a context switch per wait instead of an OS thread per CUDA
// thread (under TSan, 0.25 s instead of 2.5 s for the standard case of the tools/cuda-emu proof,
// which ran one OS thread per CUDA thread, on 2 cores), and a wait that no release can end is
// reported as a deadlock (a hang on a GPU): its fibers are unwound by an exception.
//
// The sanitizers see the fibers as threads: AddressSanitizer through its fiber-switch annotations,
// ThreadSanitizer through __tsan_switch_to_fiber without synchronisation, so that the only
// happens-before edges between CUDA threads are the ones CUDA guarantees: launch -> every thread;
// arrival at a barrier -> departure from it (each waiter releases a token before waiting and
// acquires it after; two tokens alternate, so no thread acquires a later phase's releases; a
// returned thread releases nothing, as a barrier orders only the threads that reach it); every
// thread -> launch end. A missing __syncthreads is thus a data race for TSan, and in every variant
// a stale value, since the fixed schedule runs each thread as far as it can. Blocks run one after
// another and are ordered too, as their __shared__ arrays are the same statics (block k's threads ->
// block k+1's, through tokens alternating with the block's parity, so that no thread acquires what
// a thread of its own block released on returning); TSan cannot see races between blocks.
// Scheduler and fibers exchange control data through atomics only, which never race.
#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "device.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#endif

namespace emu {

constinit std::atomic<const ThreadCtx*> tctx{nullptr};

namespace {

constexpr int WARP = 32;
constexpr size_t STACK = 128 * 1024;  // per fiber; sanitizer reports are printed on it

enum State : int { RUNNABLE, AT_BARRIER, AT_WARP, DONE };

struct Exit {};  // thrown at the waits of a deadlocked block's fibers, to unwind them

struct Fiber {
  int tid;
  char* stack;
  ucontext_t uc;
  ThreadCtx ctx;  // written by this fiber only
  std::atomic<int> state{DONE};
  std::atomic<long> passed{0};  // barriers passed in the current block
  std::atomic<unsigned int> mask{0};
  void* tsan = nullptr;
  void* fake_stack = nullptr;
};

struct Launch {
  const char* name;
  dim3 grid, block;
  int threads, warps;
  void (*body)(void*);
  void* arg;
  std::atomic<long> phase{0};                       // barriers released in the current block
  std::unique_ptr<std::atomic<long>[]> warp_phase;  // [warps] shuffle barriers released
  std::vector<float> lanes;  // [threads] values offered to a shuffle (ordered by the warp tokens)
  // Happens-before tokens: only their addresses matter.
  char order_token[2];                 // blocks in order, by block parity: block k acquires the
                                       // token of parity k - 1 and releases that of parity k
  char barrier_token[2];               // __syncthreads, by phase parity
  std::unique_ptr<char[]> warp_token;  // [warps][2] shuffle barriers, by phase parity

  int warp_width(int w) const { return std::min(WARP, threads - WARP * w); }
};

// The fibers, and the scheduler's side of their switches (the launching OS thread's).
struct Pool {
  std::mutex launching;  // one launch at a time
  std::vector<std::unique_ptr<Fiber>> fibers;
  std::atomic<Launch*> launch{nullptr};
  std::atomic<Fiber*> running{nullptr};
  std::atomic<bool> unwinding{false};  // resumed fibers are to throw Exit
  std::atomic<long> block_index{0};    // of the block being run (read before any acquire)
  std::atomic<void*> sched_tsan{nullptr};
  ucontext_t sched_uc;
  void* sched_fake = nullptr;
  void* sched_stack = nullptr;
  size_t sched_stack_size = 0;

  ~Pool() {
    for (auto& f : fibers) {
#if defined(__SANITIZE_THREAD__)
      __tsan_destroy_fiber(f->tsan);
#endif
      munmap(f->stack, STACK);
    }
  }
};

Pool pool;

struct Counts {
  long launches = 0, blocks = 0;
};

std::mutex mutex;  // guards the three below
std::string pending_error;  // first problem found since the last launch check
std::map<std::string, Counts> kernel_counts;
long sort_counts[8] = {};  // [0]: single-tile sorts, [k]: sorts of k onesweep passes

void hb_release(void* token) {
#if defined(__SANITIZE_THREAD__)
  __tsan_release(token);
#else
  (void)token;
#endif
}

void hb_acquire(void* token) {
#if defined(__SANITIZE_THREAD__)
  __tsan_acquire(token);
#else
  (void)token;
#endif
}

std::string coords(dim3 d) {
  std::ostringstream os;
  os << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return os.str();
}

dim3 unflatten(long i, dim3 extent) {
  return dim3(i % extent.x, i / extent.x % extent.y, i / (long(extent.x) * extent.y));
}

void report(const std::string& msg) {
  std::lock_guard<std::mutex> lock(mutex);
  if (pending_error.empty()) pending_error = msg;
}

std::string where(const Launch& L) {
  return std::string(L.name) + ", block " + coords(unflatten(pool.block_index.load(), L.grid));
}

// ---- context switches -----------------------------------------------------------------------------
void switch_to(Fiber& f) {
  tctx.store(&f.ctx, std::memory_order_relaxed);
  pool.running.store(&f, std::memory_order_relaxed);
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&pool.sched_fake, f.stack, STACK);
#endif
  swapcontext(&pool.sched_uc, &f.uc);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(pool.sched_fake, nullptr, nullptr);
#endif
}

// Parks the calling fiber in `state` until the scheduler makes it runnable again; throws Exit if
// that is to unwind it.
void wait(Fiber& f, State state) {
  f.state.store(state, std::memory_order_relaxed);
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(pool.sched_tsan.load(std::memory_order_relaxed), __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&f.fake_stack, pool.sched_stack, pool.sched_stack_size);
#endif
  swapcontext(&f.uc, &pool.sched_uc);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
  if (pool.unwinding.load(std::memory_order_relaxed)) throw Exit{};
}

// A fiber runs its thread of one block per resumption, across all the launches of the process.
void fiber_main(unsigned int hi, unsigned int lo) {
  Fiber& f = *reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo));
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  for (;;) {
    Launch& L = *pool.launch.load(std::memory_order_relaxed);
    const long k = pool.block_index.load(std::memory_order_relaxed);
    try {
      hb_acquire(&L.order_token[(k + 1) % 2]);
      f.ctx = {unflatten(f.tid, L.block), unflatten(k, L.grid), L.block, L.grid};
      L.body(L.arg);
    } catch (const Exit&) {
    }
    hb_release(&L.order_token[k % 2]);
    wait(f, DONE);
  }
}

Fiber& fiber(int t) {
  while (static_cast<int>(pool.fibers.size()) <= t) {
    auto f = std::make_unique<Fiber>();
    f->tid = static_cast<int>(pool.fibers.size());
    void* stack = mmap(nullptr, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(stack != MAP_FAILED, "emulator: cannot map a fiber stack");
    f->stack = static_cast<char*>(stack);
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack;
    f->uc.uc_stack.ss_size = STACK;
    f->uc.uc_link = nullptr;  // fiber_main never returns
    const auto p = reinterpret_cast<uintptr_t>(f.get());
    makecontext(&f->uc, reinterpret_cast<void (*)()>(fiber_main), 2, static_cast<unsigned int>(p >> 32),
                static_cast<unsigned int>(p & 0xffffffffu));
    // Only makecontext reads the stack fields. Cleared, they stop AddressSanitizer's swapcontext
    // interceptor from wiping the shadow of the whole (live) stack at every switch into the fiber.
    f->uc.uc_stack.ss_sp = nullptr;
    f->uc.uc_stack.ss_size = 0;
#if defined(__SANITIZE_THREAD__)
    f->tsan = __tsan_create_fiber(0);
#endif
    pool.fibers.push_back(std::move(f));
  }
  return *pool.fibers[t];
}

// ---- the scheduler ----------------------------------------------------------------------------------
// Releases the barrier or warp shuffle that every live thread waits at; false if there is none.
bool release(Launch& L, int live, int at_barrier) {
  if (at_barrier == live) {
    L.phase.fetch_add(1, std::memory_order_relaxed);
    for (int t = 0; t < L.threads; ++t) {
      if (fiber(t).state.load(std::memory_order_relaxed) == AT_BARRIER) {
        fiber(t).state.store(RUNNABLE, std::memory_order_relaxed);
      }
    }
    return true;
  }
  bool released = false;
  for (int w = 0; w < L.warps; ++w) {
    const int width = L.warp_width(w);
    const unsigned int full = width == WARP ? 0xffffffffu : (1u << width) - 1u;
    int live_w = 0, at_w = 0;
    bool masks_ok = true;
    for (int t = WARP * w; t < WARP * w + width; ++t) {
      const int s = fiber(t).state.load(std::memory_order_relaxed);
      live_w += s != DONE;
      at_w += s == AT_WARP;
      masks_ok = masks_ok && (s != AT_WARP || fiber(t).mask.load(std::memory_order_relaxed) == full);
    }
    if (at_w == 0 || at_w != live_w) continue;
    if (live_w != width || !masks_ok) {
      report(where(L) + ", warp " + std::to_string(w) + ": __shfl_down_sync whose mask is not every lane of the " +
             "warp, or with " + std::to_string(width - live_w) + " lane(s) returned (every lane must take part)");
    }
    L.warp_phase[w].fetch_add(1, std::memory_order_relaxed);
    for (int t = WARP * w; t < WARP * w + width; ++t) {
      if (fiber(t).state.load(std::memory_order_relaxed) == AT_WARP) {
        fiber(t).state.store(RUNNABLE, std::memory_order_relaxed);
      }
    }
    released = true;
  }
  return released;
}

// Runs block `k` to its end; false (problem reported, fibers unwound) on a deadlock.
bool run_block(Launch& L, long k) {
  pool.block_index.store(k, std::memory_order_relaxed);
  L.phase.store(0, std::memory_order_relaxed);
  for (int w = 0; w < L.warps; ++w) L.warp_phase[w].store(0, std::memory_order_relaxed);
  for (int t = 0; t < L.threads; ++t) {
    fiber(t).passed.store(0, std::memory_order_relaxed);
    fiber(t).state.store(RUNNABLE, std::memory_order_relaxed);
  }
  for (;;) {
    int live = 0, at_barrier = 0;
    for (int t = 0; t < L.threads; ++t) {
      Fiber& f = fiber(t);
      if (f.state.load(std::memory_order_relaxed) == RUNNABLE) switch_to(f);
      const int s = f.state.load(std::memory_order_relaxed);
      live += s != DONE;
      at_barrier += s == AT_BARRIER;
    }
    if (live == 0) break;
    if (release(L, live, at_barrier)) continue;
    report(where(L) + ": deadlock, " + std::to_string(at_barrier) + " thread(s) wait at __syncthreads and " +
           std::to_string(live - at_barrier) + " at __shfl_down_sync, and none can go on");
    pool.unwinding.store(true, std::memory_order_relaxed);
    for (int t = 0; t < L.threads; ++t) {
      if (fiber(t).state.load(std::memory_order_relaxed) != DONE) switch_to(fiber(t));
    }
    pool.unwinding.store(false, std::memory_order_relaxed);
    return false;
  }
  // Every thread of a block must have passed the same number of barriers.
  const long first = fiber(0).passed.load(std::memory_order_relaxed);
  for (int t = 1; t < L.threads; ++t) {
    const long n = fiber(t).passed.load(std::memory_order_relaxed);
    if (n == first) continue;
    std::ostringstream os;
    os << where(L) << ": thread " << coords(unflatten(t, L.block)) << " passed " << n
       << " __syncthreads, thread (0, 0, 0) passed " << first
       << " (a thread returned before a barrier, or a barrier is in divergent code)";
    report(os.str());
    break;
  }
  return true;
}

// Launch limits of the CUDA runtime (compute capability 7.0 and later).
bool valid_config(const char* name, dim3 grid, dim3 block, size_t smem) {
  const long threads = long(block.x) * block.y * block.z;
  const bool ok = grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 &&
                  grid.z <= 65535 && threads >= 1 && threads <= 1024 && block.z <= 64 && smem <= 48 * 1024;
  if (!ok) {
    std::ostringstream os;
    os << name << ": invalid launch configuration, grid " << coords(grid) << ", block " << coords(block) << ", "
       << smem << " bytes of dynamic shared memory";
    report(os.str());
  }
  return ok;
}

}  // namespace

void launch(const char* name, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* arg) {
  if (!valid_config(name, grid, block, smem)) return;
  const long blocks = long(grid.x) * grid.y * grid.z;
  {
    std::lock_guard<std::mutex> lock(mutex);
    ++kernel_counts[name].launches;
    kernel_counts[name].blocks += blocks;
  }
  std::lock_guard<std::mutex> launching(pool.launching);
#if defined(__SANITIZE_THREAD__)
  pool.sched_tsan.store(__tsan_get_current_fiber(), std::memory_order_relaxed);
#endif
#if defined(__SANITIZE_ADDRESS__)
  pthread_attr_t attr;
  pthread_getattr_np(pthread_self(), &attr);
  pthread_attr_getstack(&attr, &pool.sched_stack, &pool.sched_stack_size);
  pthread_attr_destroy(&attr);
#endif
  Launch L;
  L.name = name;
  L.grid = grid;
  L.block = block;
  L.threads = static_cast<int>(block.x * block.y * block.z);
  L.warps = (L.threads + WARP - 1) / WARP;
  L.body = body;
  L.arg = arg;
  L.warp_phase = std::make_unique<std::atomic<long>[]>(L.warps);
  L.warp_token = std::make_unique<char[]>(2 * L.warps);
  L.lanes.assign(L.threads, 0.f);
  fiber(L.threads - 1);
  pool.launch.store(&L, std::memory_order_relaxed);
  hb_release(&L.order_token[1]);  // to block 0
  for (long k = 0; k < blocks && run_block(L, k); ++k) {
  }
  hb_acquire(&L.order_token[0]);
  hb_acquire(&L.order_token[1]);
  pool.launch.store(nullptr, std::memory_order_relaxed);
  pool.running.store(nullptr, std::memory_order_relaxed);
  tctx.store(nullptr, std::memory_order_relaxed);
}

void syncthreads() {
  Fiber& f = *pool.running.load(std::memory_order_relaxed);
  Launch& L = *pool.launch.load(std::memory_order_relaxed);
  f.passed.fetch_add(1, std::memory_order_relaxed);
  char* token = &L.barrier_token[L.phase.load(std::memory_order_relaxed) % 2];
  hb_release(token);
  wait(f, AT_BARRIER);
  hb_acquire(token);
}

namespace {

void warp_barrier(Fiber& f, Launch& L, unsigned int mask) {
  const int w = f.tid / WARP;
  char* token = &L.warp_token[2 * w + L.warp_phase[w].load(std::memory_order_relaxed) % 2];
  f.mask.store(mask, std::memory_order_relaxed);
  hb_release(token);
  wait(f, AT_WARP);
  hb_acquire(token);
}

}  // namespace

float shfl_down(unsigned int mask, float value, int delta) {
  Fiber& f = *pool.running.load(std::memory_order_relaxed);
  Launch& L = *pool.launch.load(std::memory_order_relaxed);
  const int lane = f.tid % WARP, width = L.warp_width(f.tid / WARP);
  L.lanes[f.tid] = value;
  warp_barrier(f, L, mask);
  const float out = delta >= 0 && lane + delta < width ? L.lanes[f.tid + delta] : value;
  warp_barrier(f, L, mask);  // every lane has read before any offers its next value
  return out;
}

void record_sort(int passes) {
  std::lock_guard<std::mutex> lock(mutex);
  ++sort_counts[passes < 8 ? passes : 7];
}

void check_launch(const char* file, int line) {
  std::string err;
  {
    std::lock_guard<std::mutex> lock(mutex);
    err.swap(pending_error);
  }
  TORCH_CHECK(err.empty(), "emulated kernel launch at ", file, ":", line, " failed: ", err);
}

void check_call(cudaError_t err, const char* expr, const char* file, int line) {
  TORCH_CHECK(err == cudaSuccess, expr, " at ", file, ":", line, " returned error ", err);
}

}  // namespace emu

extern "C" {

// Valid launches of the kernel named `name` (as written at its launch) since the last reset, and
// the blocks they ran.
long emu_launch_count(const char* name) {
  std::lock_guard<std::mutex> lock(emu::mutex);
  const auto it = emu::kernel_counts.find(name);
  return it == emu::kernel_counts.end() ? 0 : it->second.launches;
}

long emu_block_count(const char* name) {
  std::lock_guard<std::mutex> lock(emu::mutex);
  const auto it = emu::kernel_counts.find(name);
  return it == emu::kernel_counts.end() ? 0 : it->second.blocks;
}

// Sorts since the last reset that took CUB's single-tile path (passes = 0) or `passes` onesweep passes.
long emu_sort_count(int passes) {
  std::lock_guard<std::mutex> lock(emu::mutex);
  return passes >= 0 && passes < 8 ? emu::sort_counts[passes] : 0;
}

void emu_reset_counts() {
  std::lock_guard<std::mutex> lock(emu::mutex);
  emu::kernel_counts.clear();
  for (long& c : emu::sort_counts) c = 0;
}

}  // extern "C"
