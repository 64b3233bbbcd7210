// The scheduler of the CUDA emulation (lossforge_emulate.h): the threads of a block run as fibers
// on the calling thread, switched at barriers and warp collectives; blocks run one after another.
// On x86-64 a fiber switch is a few instructions (callee-saved registers and the stack pointer);
// elsewhere, and under AddressSanitizer (which follows ucontext's stack switches), it is swapcontext,
// whose signal-mask system call made it several times slower. A launch whose threads can make no
// progress (a barrier or collective that some thread never reaches) is stopped with an exception that
// says who waits where.
#include "lossforge_emulate.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define LOSSFORGE_FAST_SWITCH 1
// lf_emu_switch(&save, to): saves the callee-saved registers, the SSE and x87 control words and the
// stack pointer into *save, and resumes the fiber whose stack pointer is `to`.
extern "C" void lf_emu_switch(void** save, void* to);
asm(R"(
  .text
  .globl lf_emu_switch
  .hidden lf_emu_switch
  .type lf_emu_switch, @function
lf_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lf_emu_switch, .-lf_emu_switch
)");
#endif

namespace lossforge {
namespace emulate {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmem = 232448;    // an H100's opt-in limit per block
constexpr size_t kStackBytes = 256 * 1024;   // per thread (ASan's redzones need room)

enum class State { kReady, kBarrier, kWarp, kDone };

struct Site {
  const char* what = nullptr;
  const char* file = nullptr;
  int line = 0;
};

std::string where(const Site& s) {
  std::ostringstream o;
  const char* slash = s.file ? std::strrchr(s.file, '/') : nullptr;
  o << s.what << " at " << (slash ? slash + 1 : s.file ? s.file : "?") << ":" << s.line;
  return o.str();
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0 && std::strcmp(a.what, b.what) == 0;
}

struct Thread {
#ifdef LOSSFORGE_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  State state = State::kReady;
  Site site;
};

struct Warp {
  int waiting = 0;
  unsigned mask = 0;
  uint32_t gen = 0;
  Site site;
  uint64_t slots[2][kWarp];
  uint32_t fragments[2][kWarp][6];  // mma: a[0..3], b[0..1] of each lane
};

struct Block {
  int n = 0, at_barrier = 0, done = 0, current = 0;
  uint32_t barrier_gen = 0;
  int reduced[2] = {0, 0};
  Site barrier_site;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::string error;
#ifdef LOSSFORGE_FAST_SWITCH
  void* scheduler = nullptr;
#else
  ucontext_t scheduler;
#endif
};

std::mutex g_launch_mutex;  // one launch at a time: the built-in variables are global
Block* g_block = nullptr;
Body g_body = nullptr;
void* g_closure = nullptr;
std::vector<unsigned char> g_smem;
std::map<const void*, int> g_max_dynamic_smem;
std::mutex g_attr_mutex;

// Fiber stacks, kept between launches: [guard page][stack] per thread.
struct Stacks {
  char* base = nullptr;
  size_t count = 0, stride = 0;

  char* get(int i) {
    return base + i * stride + page();
  }
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  void reserve(size_t n) {
    if (n <= count) return;
    if (base) munmap(base, count * stride);
    stride = kStackBytes + page();
    void* p = mmap(nullptr, n * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("CUDA emulation: cannot map the threads' stacks");
    base = static_cast<char*>(p);
    count = n;
    for (size_t i = 0; i < n; ++i) mprotect(base + i * stride, page(), PROT_NONE);  // overflow faults
  }
} g_stacks;

// This module's TLS block in the calling OS thread: the static __shared__ variables of every kernel
// (tests/test_cuda_emulation.py checks that nothing else lives there).
struct TlsBlock {
  void* data = nullptr;
  size_t bytes = 0;
};

thread_local char g_tls_anchor;  // touched first, so that this thread's block is allocated

// The TLS block of the module whose code holds `module_tls` (found by address: the main program's
// name is empty in the loader's list).
TlsBlock module_tls() {
  g_tls_anchor = 1;
  struct Search {
    uintptr_t code;
    TlsBlock found;
  } search{reinterpret_cast<uintptr_t>(&module_tls), {}};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* arg) {
        auto* s = static_cast<Search*>(arg);
        bool mine = false;
        TlsBlock tls;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          const uintptr_t start = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && s->code >= start && s->code < start + ph.p_memsz) mine = true;
          if (ph.p_type == PT_TLS) tls = {info->dlpi_tls_data, ph.p_memsz};
        }
        if (mine) s->found = tls;
        return mine ? 1 : 0;
      },
      &search);
  return search.found;
}

TlsBlock g_tls;  // of the launching thread, found once per launch (not in TLS: it is overwritten)

// Unwritten shared memory reads as 0xff bytes (NaN as a float): dynamic and static alike.
void poison_shared_memory() {
  std::fill(g_smem.begin(), g_smem.end(), 0xff);
  if (g_tls.data != nullptr) std::memset(g_tls.data, 0xff, g_tls.bytes);
}

Thread& me() { return g_block->threads[g_block->current]; }

#ifdef LOSSFORGE_FAST_SWITCH
void yield() { lf_emu_switch(&me().sp, g_block->scheduler); }
void resume(Thread& t) { lf_emu_switch(&g_block->scheduler, t.sp); }
#else
void yield() { swapcontext(&me().ctx, &g_block->scheduler); }
void resume(Thread& t) { swapcontext(&g_block->scheduler, &t.ctx); }
#endif

void fail(const std::string& msg) {
  if (g_block->error.empty()) g_block->error = msg;
}

void thread_main() {
  g_body(g_closure);
  me().state = State::kDone;
  ++g_block->done;
#ifdef LOSSFORGE_FAST_SWITCH
  void* unused;
  lf_emu_switch(&unused, g_block->scheduler);  // never resumed
  __builtin_unreachable();
#endif
}  // (with ucontext: returns to the scheduler through uc_link)

// A fiber that starts in thread_main on the stack [base, base + bytes).
void start(Thread& t, char* base, size_t bytes) {
#ifdef LOSSFORGE_FAST_SWITCH
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(base + bytes) & ~uintptr_t{15});
  *--sp = 0;                                          // thread_main's return address (it never returns)
  *--sp = reinterpret_cast<uint64_t>(&thread_main);   // where lf_emu_switch's ret goes
  for (int i = 0; i < 6; ++i) *--sp = 0;              // rbp, rbx, r12-r15
  uint64_t control = 0;                               // this thread's SSE and x87 control words
  asm volatile("stmxcsr %0\n\tfnstcw 4+%0" : "=m"(control));
  *--sp = control;
  t.sp = sp;
#else
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = base;
  t.ctx.uc_stack.ss_size = bytes;
  t.ctx.uc_link = &g_block->scheduler;
  makecontext(&t.ctx, thread_main, 0);
#endif
}

// Arrive at the block barrier; the last arrival releases everyone.
uint32_t arrive_block(const Site& site) {
  Block& b = *g_block;
  if (b.at_barrier == 0) {
    b.barrier_site = site;
  } else if (!same_site(site, b.barrier_site)) {
    fail("threads of one block wait at different barriers: " + where(b.barrier_site) + " and " + where(site) +
         " (every thread of a block must reach the same __syncthreads)");
  }
  me().state = State::kBarrier;
  me().site = site;
  const uint32_t gen = b.barrier_gen;
  if (++b.at_barrier == b.n) {
    for (Thread& t : b.threads) t.state = State::kReady;
    b.at_barrier = 0;
    ++b.barrier_gen;
  }
  return gen;
}

// Arrive at a warp collective with `value`; returns the lanes' values once every lane of `mask` is in.
const uint64_t* arrive_warp(unsigned mask, uint64_t value, const Site& site) {
  Block& b = *g_block;
  const int lane = lane_id(), w = b.current / kWarp;
  Warp& warp = b.warps[w];
  if (!((mask >> lane) & 1u)) {
    fail(where(site) + ": lane " + std::to_string(lane) + " of warp " + std::to_string(w) +
         " calls it with a mask that leaves itself out");
  }
  if (warp.waiting == 0) {
    warp.mask = mask;
    warp.site = site;
  } else if (warp.mask != mask || !same_site(site, warp.site)) {
    fail("the lanes of warp " + std::to_string(w) + " meet at different collectives or masks: " + where(warp.site) +
         " and " + where(site));
  }
  const uint32_t gen = warp.gen;
  warp.slots[gen & 1][lane] = value;
  me().state = State::kWarp;
  me().site = site;
  if (++warp.waiting == __builtin_popcount(mask)) {
    for (int l = 0; l < kWarp; ++l) {
      const int t = w * kWarp + l;
      if (((mask >> l) & 1u) && t < b.n) b.threads[t].state = State::kReady;
    }
    warp.waiting = 0;
    ++warp.gen;
  }
  yield();
  return warp.slots[gen & 1];
}

std::string block_name() {
  std::ostringstream o;
  o << "block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z << ")";
  return o.str();
}

// No thread can run and some have not finished: say who waits where.
std::string stall_report(const Block& b) {
  std::ostringstream o;
  o << "CUDA emulation: the threads of " << block_name() << " cannot go on: ";
  for (size_t w = 0; w < b.warps.size(); ++w) {
    const Warp& warp = b.warps[w];
    if (warp.waiting == 0) continue;
    o << where(warp.site) << " in warp " << w << " waits for lanes";
    for (int l = 0; l < kWarp; ++l) {
      const int t = static_cast<int>(w) * kWarp + l;
      if (!((warp.mask >> l) & 1u)) continue;
      if (t >= b.n) {
        o << " " << l << " (not in the block)";
      } else if (b.threads[t].state == State::kDone) {
        o << " " << l << " (exited)";
      } else if (b.threads[t].state == State::kBarrier) {
        o << " " << l << " (waits at " << where(b.threads[t].site) << ")";
      }
    }
    o << " that never join it; ";
  }
  if (b.at_barrier > 0) {
    o << where(b.barrier_site) << " is reached by " << b.at_barrier << " of " << b.n << " threads (";
    int exited = 0, in_warp = 0;
    for (const Thread& t : b.threads) {
      exited += t.state == State::kDone;
      in_warp += t.state == State::kWarp;
    }
    o << exited << " exited, " << in_warp << " wait in a warp collective)";
  }
  return o.str();
}

void run_block(int n, const dim3& block) {
  Block& b = *g_block;
  b.n = n;
  b.at_barrier = b.done = 0;
  b.barrier_gen = 0;
  b.error.clear();
  b.threads.assign(n, Thread{});
  b.warps.assign((n + kWarp - 1) / kWarp, Warp{});
  for (int i = 0; i < n; ++i) start(b.threads[i], g_stacks.get(i), kStackBytes);
  poison_shared_memory();
  while (b.done < n) {
    bool ran = false;
    for (int i = 0; i < n; ++i) {
      if (b.threads[i].state != State::kReady) continue;
      b.current = i;
      const unsigned u = static_cast<unsigned>(i);
      threadIdx = {u % block.x, (u / block.x) % block.y, u / (block.x * block.y)};
      resume(b.threads[i]);
      ran = true;
      if (!b.error.empty()) throw std::runtime_error("CUDA emulation: " + b.error + " (" + block_name() + ")");
    }
    if (!ran) throw std::runtime_error(stall_report(b));
  }
}

}  // namespace

void sync_block(const char* file, int line) {
  arrive_block({"__syncthreads", file, line});
  yield();
}

int sync_block_reduce(int value, int op, const char* file, int line) {
  Block& b = *g_block;
  const int slot = b.barrier_gen & 1;
  if (b.at_barrier == 0) b.reduced[slot] = op == 1 ? 1 : 0;
  b.reduced[slot] = op == 0 ? (b.reduced[slot] | value) : op == 1 ? (b.reduced[slot] & value) : b.reduced[slot] + value;
  arrive_block({op == 0 ? "__syncthreads_or" : op == 1 ? "__syncthreads_and" : "__syncthreads_count", file, line});
  yield();
  return b.reduced[slot];
}

uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane, const char* what, const char* file, int line) {
  const uint64_t* slots = arrive_warp(mask, value, {what, file, line});
  if (!((mask >> src_lane) & 1u)) {
    fail(where({what, file, line}) + ": lane " + std::to_string(lane_id()) + " reads lane " +
         std::to_string(src_lane) + ", which is not in the mask");
  }
  return slots[src_lane];
}

unsigned warp_ballot(unsigned mask, bool pred, const char* file, int line) {
  const uint64_t* slots = arrive_warp(mask, pred ? 1 : 0, {"__ballot_sync", file, line});
  unsigned bits = 0;
  for (int l = 0; l < kWarp; ++l) {
    if (((mask >> l) & 1u) && slots[l]) bits |= 1u << l;
  }
  return bits;
}

namespace {

float operand_value(int operand, uint32_t word, int high) {
  const uint16_t bits = static_cast<uint16_t>(high ? word >> 16 : word & 0xffffu);
  return operand == 0 ? static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()))
                      : static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// The m16n8k16 fragments (PTX ISA): A(r, k) is in lane (r % 8) * 4 + (k % 8) / 2, register
// (r >= 8) + 2 (k >= 8); B(k, n) in lane n * 4 + (k % 8) / 2, register 4 + (k >= 8); the low half
// of a register holds the even k.
float a_at(const uint32_t (*f)[6], int operand, int r, int k) {
  return operand_value(operand, f[(r % 8) * 4 + (k % 8) / 2][(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
}
float b_at(const uint32_t (*f)[6], int operand, int k, int n) {
  return operand_value(operand, f[n * 4 + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)], k & 1);
}

// Each lane's D elements from the whole warp's fragments: D(r, n) = C(r, n) + sum_k A(r, k) B(k, n),
// `a_elem(f, r, k)` and `b_elem(f, k, n)` reading the posted fragments. The products are exact in fp32 (8-,
// 11- or 10-bit significands) and added in k order with fp32 rounding; the hardware's order and
// rounding of the additions are not documented: this is one fp32 order.
template <int K, class A, class B>
void warp_mma(const char* what, float* d, const uint32_t* a, const uint32_t* b, A a_elem, B b_elem, const char* file,
              int line) {
  Warp& warp = g_block->warps[g_block->current / kWarp];
  const int lane = lane_id();
  const uint32_t gen = warp.gen;
  uint32_t* mine = warp.fragments[gen & 1][lane];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  for (int i = 0; i < 2; ++i) mine[4 + i] = b[i];
  arrive_warp(0xffffffffu, 0, {what, file, line});
  const uint32_t (*f)[6] = warp.fragments[gen & 1];
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < K; ++k) acc += a_elem(f, r, k) * b_elem(f, k, n);
    d[i] = acc;
  }
}

}  // namespace

void warp_mma_m16n8k16(int operand, float* d, const uint32_t* a, const uint32_t* b, const char* file, int line) {
  warp_mma<16>(operand == 0 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16", d, a, b,
               [operand](const uint32_t (*f)[6], int r, int k) { return a_at(f, operand, r, k); },
               [operand](const uint32_t (*f)[6], int k, int n) { return b_at(f, operand, k, n); }, file, line);
}

// m16n8k8 tf32 (PTX ISA): A(r, k) in lane (r % 8) * 4 + k % 4, register (r >= 8) + 2 (k >= 4); B(k, n)
// in lane n * 4 + k % 4, register 4 + (k >= 4). The hardware ignores a word's low 13 bits.
void warp_mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b, const char* file, int line) {
  auto tf32 = [](uint32_t word) { return from_bits<float>(word & 0xffffe000u); };
  warp_mma<8>("mma.m16n8k8.tf32", d, a, b,
              [tf32](const uint32_t (*f)[6], int r, int k) {
                return tf32(f[(r % 8) * 4 + k % 4][(r >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]);
              },
              [tf32](const uint32_t (*f)[6], int k, int n) { return tf32(f[n * 4 + k % 4][4 + (k >= 4 ? 1 : 0)]); },
              file, line);
}

void* dynamic_smem_base() { return g_smem.data(); }

void set_max_dynamic_smem(const void* kernel, int bytes) {
  const std::lock_guard<std::mutex> lock(g_attr_mutex);
  g_max_dynamic_smem[kernel] = bytes;
}

void run_grid(dim3 grid, dim3 block, size_t smem, const void* kernel, Body body, void* closure) {
  const int64_t n = int64_t{block.x} * block.y * block.z;
  if (n < 1 || n > kMaxThreads || block.z > 64) {
    throw std::runtime_error("CUDA emulation: invalid launch: " + std::to_string(n) +
                             " threads per block (1 to 1024, z at most 64)");
  }
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error("CUDA emulation: invalid launch: grid (" + std::to_string(grid.x) + ", " +
                             std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")");
  }
  int allowed = static_cast<int>(kDefaultDynamicSmem);
  {
    const std::lock_guard<std::mutex> lock(g_attr_mutex);
    const auto it = g_max_dynamic_smem.find(kernel);
    if (it != g_max_dynamic_smem.end()) allowed = std::max(allowed, it->second);
  }
  if (smem > static_cast<size_t>(allowed) || smem > kMaxDynamicSmem) {
    throw std::runtime_error("CUDA emulation: invalid launch: " + std::to_string(smem) +
                             " bytes of dynamic shared memory, the kernel allows " + std::to_string(allowed) +
                             " (above 48 KiB it must opt in with cudaFuncSetAttribute)");
  }
  const std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_stacks.reserve(static_cast<size_t>(n));
  g_smem.assign(std::max<size_t>(smem, 16), 0xff);
  g_tls = module_tls();
  Block b;
  g_block = &b;
  g_body = body;
  g_closure = closure;
  blockDim = block;
  gridDim = grid;
  struct Reset {
    ~Reset() { g_block = nullptr; }
  } reset;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        run_block(static_cast<int>(n), block);
      }
    }
  }
}

}  // namespace emulate
}  // namespace lossforge
