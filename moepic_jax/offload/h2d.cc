// Expert rows to the device by DMA, outside XLA's control flow: two XLA FFI calls (moepic_jax/offload/transfer.py).
//
// h2d_start(plan0, src0, tops0, plan1, src1, tops1) -> (dst0, dst1): queue the reads of the two copy plans after
//   the work XLA queued before it, and hand the layer to a worker thread; return at once. The worker waits for the
//   plans, then queues one cudaMemcpyAsync per planned segment on a private stream (H2D from the pinned stack, D2D
//   from the cache's top rows), then a write of the group's sequence number to a flag on the device. A plan row is
//   (source, index, first_row, n_rows) int32: source 0 = the pinned host stack (index = expert), 1 = the layer's
//   cache of top rows on the device (index = slot). Rows [first_row, first_row + n_rows) of the source land at the
//   same rows of the destination expert. Group 0 is this layer's experts, group 1 the next layer's predicted
//   experts (prefetch).
// h2d_wait(dst, plan, src, tops) -> dst (aliased): XLA's stream waits on the device until the flag reaches the
//   group's number (cuStreamWaitValue32). The host never waits for the GPU, so it queues layer after layer ahead
//   of the GPU. The plan, src and tops are operands only to keep XLA from reusing their memory before the copies
//   that read them are done.
// Where the driver refuses stream memory operations (or MOEPIC_JAX_DIRECT_SYNC=1), start reads the plans itself
// and waits for them (one host round trip per layer), and wait waits on an event.
//
// The stack's host address comes in as data (src: two int32 words), not as an attribute, so the compiled program
// does not depend on where the stack was allocated (the persistent compilation cache stays valid). The CPU build
// (no MOEPIC_CUDA) runs the same plans with memcpy, so the CPU tests cover the plans.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPlanCols = 4;

const char* HostAddress(const int32_t* words) {
  uint64_t a = static_cast<uint64_t>(static_cast<uint32_t>(words[0])) |
               (static_cast<uint64_t>(static_cast<uint32_t>(words[1])) << 32);
  return reinterpret_cast<const char*>(a);
}

// A buffer of `n` experts' (or slots') rows: [n, rows, ...], `bytes` in all.
struct Rows {
  char* data = nullptr;
  int64_t n = 0, rows = 0;
  size_t bytes = 0;
};

Rows RowsOf(const ffi::AnyBuffer& b) {
  auto d = b.dimensions();
  return {static_cast<char*>(const_cast<void*>(b.untyped_data())), d.size() ? d[0] : 0, d.size() > 1 ? d[1] : 0,
          b.size_bytes()};
}

struct Segment {
  char* dst;
  const char* src;
  size_t bytes;
  bool from_host;
};

// Checks that `dst` [n_dst, rows, ...] and the cache's `tops` [slots, tops_rows, ...] are row_bytes wide, so that no
// plan can read or write past them.
ffi::Error CheckShapes(const Rows& tops, const Rows& dst, int64_t rows, int64_t row_bytes) {
  if (static_cast<int64_t>(dst.bytes) != dst.n * rows * row_bytes ||
      (tops.n * tops.rows > 0 && static_cast<int64_t>(tops.bytes) != tops.n * tops.rows * row_bytes))
    return ffi::Error::InvalidArgument("h2d: the destination or the cache rows are not row_bytes wide");
  return ffi::Error::Success();
}

// The copies of one group: plan [n, kPlanCols] (on the host): plan rows [j * n / n_dst, (j + 1) * n / n_dst) fill
// destination expert j. Every row is checked against the buffers (CheckShapes first).
ffi::Error Segments(const int32_t* plan, int64_t n, const char* host, const Rows& tops, int64_t n_experts,
                    const Rows& dst, int64_t rows, int64_t row_bytes, std::vector<Segment>* out) {
  if (n == 0) return ffi::Error::Success();
  if (dst.n == 0 || n % dst.n != 0)
    return ffi::Error::InvalidArgument("h2d plan rows must be a multiple of the destination's experts");
  const int64_t per = n / dst.n;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* p = plan + i * kPlanCols;
    int64_t source = p[0], index = p[1], first = p[2], count = p[3];
    if (count == 0) continue;
    if (first < 0 || count < 0 || first + count > rows)
      return ffi::Error::InvalidArgument("h2d plan row " + std::to_string(i) + " leaves the expert's rows");
    char* d = dst.data + ((i / per) * rows + first) * row_bytes;
    if (source != 0 && source != 1) return ffi::Error::InvalidArgument("h2d plan: source must be 0 or 1");
    if (source == 0) {
      if (index < 0 || index >= n_experts) return ffi::Error::InvalidArgument("h2d plan: expert out of range");
      out->push_back({d, host + (index * rows + first) * row_bytes, static_cast<size_t>(count * row_bytes), true});
    } else {
      if (index < 0 || index >= tops.n || first + count > tops.rows)
        return ffi::Error::InvalidArgument("h2d plan: cache slot or rows out of range");
      out->push_back({d, tops.data + (index * tops.rows + first) * row_bytes, static_cast<size_t>(count * row_bytes),
                      false});
    }
  }
  return ffi::Error::Success();
}

// The calls' operands and attributes, after the platform's context (the CUDA stream, or none on the CPU).
template <typename B>
auto StartBinding(B b) {
  return std::move(b).template Arg<ffi::Buffer<ffi::S32>>()  // plan0
      .template Arg<ffi::Buffer<ffi::S32>>()      // src0
      .template Arg<ffi::AnyBuffer>()             // tops0
      .template Arg<ffi::Buffer<ffi::S32>>()      // plan1
      .template Arg<ffi::Buffer<ffi::S32>>()      // src1
      .template Arg<ffi::AnyBuffer>()             // tops1
      .template Ret<ffi::AnyBuffer>()             // dst0
      .template Ret<ffi::AnyBuffer>()             // dst1
      .template Attr<int64_t>("rows")
      .template Attr<int64_t>("row_bytes")
      .template Attr<int64_t>("n_experts")
      .template Attr<int64_t>("tag");
}

template <typename B>
auto WaitBinding(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>()  // dst
      .template Arg<ffi::AnyBuffer>()                  // plan (kept alive until the copies have read it)
      .template Arg<ffi::AnyBuffer>()                  // src (the same)
      .template Arg<ffi::AnyBuffer>()                  // tops (the same)
      .template Ret<ffi::AnyBuffer>()                  // dst (aliased)
      .template Attr<int64_t>("tag")
      .template Attr<int64_t>("group");
}

}  // namespace

#ifdef MOEPIC_CUDA
#include <dlfcn.h>

// The CUDA runtime that jaxlib loads resolves these (no CUDA headers or nvcc needed to build); the two stream
// memory operations come from the driver (libcuda), looked up at first use.
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
extern "C" {
int cudaMemcpyAsync(void*, const void*, size_t, int, cudaStream_t);
int cudaStreamSynchronize(cudaStream_t);
int cudaStreamCreateWithFlags(cudaStream_t*, unsigned);
int cudaStreamCreateWithPriority(cudaStream_t*, unsigned, int);
int cudaDeviceGetStreamPriorityRange(int*, int*);
int cudaEventCreateWithFlags(cudaEvent_t*, unsigned);
int cudaEventRecord(cudaEvent_t, cudaStream_t);
int cudaEventQuery(cudaEvent_t);
int cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned);
int cudaMallocHost(void**, size_t);
int cudaFreeHost(void*);
int cudaMalloc(void**, size_t);
int cudaGetDevice(int*);
int cudaSetDevice(int);
const char* cudaGetErrorString(int);
}
typedef int (*StreamValueFn)(cudaStream_t, unsigned long long, uint32_t, unsigned);  // cuStream{Wait,Write}Value32_v2
constexpr int kH2D = 1, kD2H = 2, kD2D = 3, kNotReady = 600;
constexpr unsigned kNonBlocking = 1, kDisableTiming = 2, kWaitGeq = 0;
constexpr int kJobs = 256;  // layers the host may queue ahead of the worker

namespace {

ffi::Error Check(int rc, const char* what) {
  if (rc == 0) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(rc));
}

// Where QueuePlanRead put a layer's two plans (n0, n1 plan rows) and the two stacks' host addresses.
struct Staged {
  const int32_t* plan[2];
  const char* host[2];
};
Staged Unstage(const int32_t* h, int64_t n0, int64_t n1) {
  const int32_t* src = h + kPlanCols * (n0 + n1);
  return {{h, h + kPlanCols * n0}, {HostAddress(src), HostAddress(src + 2)}};
}

// Queue the copies of `segs` on `stream`: 0, or the first failure's code.
int QueueSegments(const std::vector<Segment>& segs, cudaStream_t stream) {
  for (const Segment& s : segs) {
    int rc = cudaMemcpyAsync(s.dst, s.src, s.bytes, s.from_host ? kH2D : kD2D, stream);
    if (rc) return rc;
  }
  return 0;
}

// One layer's start, handed to the worker: where its plans land on the host, and what they may write.
struct Job {
  int32_t* staging = nullptr;  // pinned: plan0, plan1, src0 (2 words), src1 (2 words)
  size_t capacity = 0;         // words
  cudaEvent_t ready = nullptr;      // XLA's stream reached the start
  cudaEvent_t plan_read = nullptr;  // the plans are on the host
  int64_t n[2] = {0, 0};            // plan rows per group
  Rows tops[2], dst[2];
  int64_t rows = 0, row_bytes = 0, n_experts = 0;
  uint32_t seq[2] = {0, 0};
  bool busy = false;
};

// The private streams, the worker, and per call site (tag) and group the sequence number its wait waits for. A
// process drives one device through this path (the engine uses it with one device only).
struct State {
  std::mutex mu;
  std::condition_variable cv;
  int device = -1;
  bool async = false;
  cudaStream_t side = nullptr;    // the copies
  cudaStream_t reader = nullptr;  // the plans' reads: not queued behind copies still in flight
  uint32_t* flag = nullptr;       // device word: the last group whose copies are queued before it
  StreamValueFn wait_value = nullptr, write_value = nullptr;
  uint32_t seq = 0;
  std::unordered_map<int64_t, uint32_t> seqs;  // by 2 * tag + group
  std::vector<Job> jobs = std::vector<Job>(kJobs);
  int64_t next_job = 0;
  std::deque<Job*> queue;
  std::string error;  // the worker's first failure, reported (and cleared) by the next call
  std::unordered_map<int64_t, void*> dsts;  // by 2 * tag + group: the destination its start wrote to
  std::vector<int32_t*> retired;  // staging buffers outgrown in async mode: never freed (see Reserve)
  uint32_t abandoned = 0;  // the last sequence number queued when a failure was reported
  bool abandoned_any = false;
  cudaEvent_t drained = nullptr;  // synchronous mode: the copies queued so far (Drain)
  // synchronous mode
  cudaEvent_t ready = nullptr;
  std::unordered_map<int64_t, cudaEvent_t> done;
  int32_t* sync_staging = nullptr;
  size_t sync_capacity = 0;
};
State& state() {
  static State* s = new State();  // never destroyed: XLA may call into it until the process exits
  return *s;
}

// Stream memory operations from the driver, or nullptr where it has none (or MOEPIC_JAX_DIRECT_SYNC=1).
bool LoadStreamValueOps(State& st) {
  const char* sync = std::getenv("MOEPIC_JAX_DIRECT_SYNC");
  if (sync && std::string(sync) == "1") return false;
  void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (!h) h = dlopen("libcuda.so.1", RTLD_NOW);
  if (!h) return false;
  st.wait_value = reinterpret_cast<StreamValueFn>(dlsym(h, "cuStreamWaitValue32_v2"));
  st.write_value = reinterpret_cast<StreamValueFn>(dlsym(h, "cuStreamWriteValue32_v2"));
  if (!st.wait_value || !st.write_value) return false;
  if (cudaMalloc(reinterpret_cast<void**>(&st.flag), 4)) return false;
  // the first write zeroes the flag, in order with the copies' stream; one the driver refuses (no stream memory
  // operations on this device or driver) means synchronous mode
  if (st.write_value(st.side, reinterpret_cast<unsigned long long>(st.flag), 0, 0)) return false;
  return cudaStreamSynchronize(st.side) == 0;
}

void Fail(State& st, const std::string& what) {
  std::lock_guard<std::mutex> lock(st.mu);
  if (st.error.empty()) st.error = what;
}

// The worker: for each job in order, wait until its plans are on the host, queue its copies, then its flag writes.
// It writes the flags even after a failure, so that XLA's stream is never left waiting; the failure is reported by
// the next call.
void Worker(State* stp) {
  State& st = *stp;
  cudaSetDevice(st.device);
  for (;;) {
    Job* j;
    {
      std::unique_lock<std::mutex> lock(st.mu);
      st.cv.wait(lock, [&] { return !st.queue.empty(); });
      j = st.queue.front();
      st.queue.pop_front();
    }
    int rc;
    auto t0 = std::chrono::steady_clock::now();
    bool warned = false;
    while ((rc = cudaEventQuery(j->plan_read)) == kNotReady) {
      std::this_thread::yield();
      if (!warned && std::chrono::steady_clock::now() - t0 > std::chrono::seconds(20)) {
        warned = true;  // XLA's stream has not reached this layer's copies for 20 s: say what may be wrong
        std::fprintf(stderr, "moepic_jax direct copies: no progress for 20 s. If this process hangs, the copy "
                             "stream may share a hardware queue with XLA's: set CUDA_DEVICE_MAX_CONNECTIONS=32 "
                             "before JAX starts, or MOEPIC_JAX_DIRECT_SYNC=1, or use direct=False.\n");
      }
    }
    bool failed, abandoned;
    {
      std::lock_guard<std::mutex> lock(st.mu);
      // a job queued before a reported failure belongs to the run XLA abandoned: flags only, no new failure
      abandoned = st.abandoned_any && static_cast<int32_t>(j->seq[1] - st.abandoned) <= 0;
      failed = abandoned || !st.error.empty();  // after a failure, only the flags: the run is being abandoned
    }
    if (rc && !abandoned) Fail(st, std::string("reading the copy plan: ") + cudaGetErrorString(rc));
    Staged staged = Unstage(j->staging, j->n[0], j->n[1]);
    for (int g = 0; g < 2; ++g) {
      std::vector<Segment> segs;
      if (!rc && !failed) {
        ffi::Error err = Segments(staged.plan[g], j->n[g], staged.host[g], j->tops[g], j->n_experts, j->dst[g],
                                  j->rows, j->row_bytes, &segs);
        if (!err.success()) {
          Fail(st, err.message());
          segs.clear();
        }
      }
      if (int c = QueueSegments(segs, st.side)) Fail(st, std::string("cudaMemcpyAsync: ") + cudaGetErrorString(c));
      int c = st.write_value(st.side, reinterpret_cast<unsigned long long>(st.flag), j->seq[g], 0);
      if (c) Fail(st, "cuStreamWriteValue32 failed (" + std::to_string(c) + ")");
    }
    {
      std::lock_guard<std::mutex> lock(st.mu);
      j->busy = false;
    }
    st.cv.notify_all();
  }
}

// Streams, events and the mode, on the first call (st.mu held).
ffi::Error Init(State& st) {
  int device = -1;
  ffi::Error err;
  if (!(err = Check(cudaGetDevice(&device), "cudaGetDevice")).success()) return err;
  if (st.device >= 0 && device != st.device)
    return ffi::Error::InvalidArgument("direct copies drive one GPU per process (first used: " +
                                       std::to_string(st.device) + ", now: " + std::to_string(device) + ")");
  if (st.side) return ffi::Error::Success();
  st.device = device;
  int least = 0, greatest = 0;  // the copies and the plans' reads at the highest priority: compute waits for them
  if (!(err = Check(cudaDeviceGetStreamPriorityRange(&least, &greatest), "cudaDeviceGetStreamPriorityRange"))
           .success())
    return err;
  if (!(err = Check(cudaStreamCreateWithPriority(&st.side, kNonBlocking, greatest), "cudaStreamCreate")).success())
    return err;
  if (!(err = Check(cudaStreamCreateWithPriority(&st.reader, kNonBlocking, greatest), "cudaStreamCreate"))
           .success())
    return err;
  if (!(err = Check(cudaEventCreateWithFlags(&st.ready, kDisableTiming), "cudaEventCreate")).success()) return err;
  if (!(err = Check(cudaEventCreateWithFlags(&st.drained, kDisableTiming), "cudaEventCreate")).success()) return err;
  st.async = LoadStreamValueOps(st);
  if (st.async) std::thread(Worker, &st).detach();  // lives as long as the process, like the state
  return ffi::Error::Success();
}

// Room for `words` in a job's (or the synchronous mode's) pinned staging buffer. An outgrown buffer goes to
// `retired` when given, never freed: cudaFreeHost may wait for the whole device, and in async mode XLA's stream may
// be waiting for a flag that only the worker (blocked behind this call's lock) can write.
ffi::Error Reserve(int32_t** staging, size_t* capacity, size_t words, std::vector<int32_t*>* retired = nullptr) {
  if (words <= *capacity) return ffi::Error::Success();
  if (*staging && retired) retired->push_back(*staging);
  else if (*staging) cudaFreeHost(*staging);
  *staging = nullptr;
  size_t want = words < 4096 ? 4096 : 2 * words;
  ffi::Error err = Check(cudaMallocHost(reinterpret_cast<void**>(staging), 4 * want), "cudaMallocHost");
  *capacity = err.success() ? want : 0;
  return err;
}

// Queue the reads of both plans and both srcs into `h` on the reader stream, after XLA's work so far.
int QueuePlanRead(State& st, cudaStream_t stream, cudaEvent_t ready, int32_t* h, const ffi::Buffer<ffi::S32>& plan0,
                  const ffi::Buffer<ffi::S32>& plan1, const ffi::Buffer<ffi::S32>& src0,
                  const ffi::Buffer<ffi::S32>& src1) {
  size_t n0 = plan0.element_count(), n1 = plan1.element_count();
  int rc = cudaEventRecord(ready, stream);
  if (!rc) rc = cudaStreamWaitEvent(st.reader, ready, 0);
  if (!rc && n0) rc = cudaMemcpyAsync(h, plan0.typed_data(), 4 * n0, kD2H, st.reader);
  if (!rc && n1) rc = cudaMemcpyAsync(h + n0, plan1.typed_data(), 4 * n1, kD2H, st.reader);
  if (!rc) rc = cudaMemcpyAsync(h + n0 + n1, src0.typed_data(), 8, kD2H, st.reader);
  if (!rc) rc = cudaMemcpyAsync(h + n0 + n1 + 2, src1.typed_data(), 8, kD2H, st.reader);
  return rc;
}

// Synchronous mode: read the plans here (the host waits for XLA's work so far), queue the copies and an event.
ffi::Error StartSync(State& st, cudaStream_t stream, const ffi::Buffer<ffi::S32>& plan0,
                     const ffi::Buffer<ffi::S32>& src0, const Rows (&tops)[2], const ffi::Buffer<ffi::S32>& plan1,
                     const ffi::Buffer<ffi::S32>& src1, const Rows (&dsts)[2], int64_t rows, int64_t row_bytes,
                     int64_t n_experts, int64_t tag) {
  size_t n0 = plan0.element_count(), n1 = plan1.element_count();
  ffi::Error err = Reserve(&st.sync_staging, &st.sync_capacity, n0 + n1 + 4);
  if (!err.success()) return err;
  int rc = QueuePlanRead(st, stream, st.ready, st.sync_staging, plan0, plan1, src0, src1);
  if (!rc) rc = cudaStreamWaitEvent(st.side, st.ready, 0);
  if (!(err = Check(rc, "queueing the copy plan's read")).success()) return err;
  if (!(err = Check(cudaStreamSynchronize(st.reader), "reading the copy plan")).success()) return err;
  int64_t ns[2] = {static_cast<int64_t>(n0 / kPlanCols), static_cast<int64_t>(n1 / kPlanCols)};
  Staged staged = Unstage(st.sync_staging, ns[0], ns[1]);
  for (int g = 0; g < 2; ++g) {
    std::vector<Segment> segs;
    err = Segments(staged.plan[g], ns[g], staged.host[g], tops[g], n_experts, dsts[g], rows, row_bytes, &segs);
    if (!err.success()) return err;
    if (!(err = Check(QueueSegments(segs, st.side), "cudaMemcpyAsync")).success()) return err;
    cudaEvent_t& ev = st.done[2 * tag + g];
    if (!ev && !(err = Check(cudaEventCreateWithFlags(&ev, kDisableTiming), "cudaEventCreate")).success()) return err;
    if (!(err = Check(cudaEventRecord(ev, st.side), "cudaEventRecord")).success()) return err;
  }
  return ffi::Error::Success();
}

// The worker's failure, reported once (st.mu held); the jobs queued until now belong to the run XLA abandons.
ffi::Error Reported(State& st) {
  std::string what = std::move(st.error);
  st.error.clear();
  st.abandoned = st.seq;
  st.abandoned_any = true;
  return ffi::Error::Internal("direct copies: " + what);
}

// On any error (st.mu held): XLA abandons the run and frees its buffers in its stream's order, so its stream first
// waits for every copy queued so far, so that none still runs into a freed buffer.
void Drain(State& st, cudaStream_t stream) {
  if (!st.side) return;  // nothing was ever queued
  if (st.async) {
    st.wait_value(stream, reinterpret_cast<unsigned long long>(st.flag), st.seq, kWaitGeq);
  } else if (st.drained && !cudaEventRecord(st.drained, st.side)) {
    cudaStreamWaitEvent(stream, st.drained, 0);
  }
}

ffi::Error StartLocked(State& st, std::unique_lock<std::mutex>& lock, cudaStream_t stream,
                       ffi::Buffer<ffi::S32>& plan0, ffi::Buffer<ffi::S32>& src0, ffi::AnyBuffer& tops0,
                       ffi::Buffer<ffi::S32>& plan1, ffi::Buffer<ffi::S32>& src1, ffi::AnyBuffer& tops1,
                       ffi::Result<ffi::AnyBuffer>& dst0, ffi::Result<ffi::AnyBuffer>& dst1, int64_t rows,
                       int64_t row_bytes, int64_t n_experts, int64_t tag) {
  if (!st.error.empty()) return Reported(st);
  if (src0.element_count() != 2 || src1.element_count() != 2 || plan0.element_count() % kPlanCols ||
      plan1.element_count() % kPlanCols)
    return ffi::Error::InvalidArgument("h2d: src must be 2 words and plans whole rows");
  ffi::Error err = Init(st);
  if (!err.success()) return err;
  Rows tops[2] = {RowsOf(tops0), RowsOf(tops1)};
  Rows dsts[2] = {RowsOf(*dst0), RowsOf(*dst1)};
  for (int g = 0; g < 2; ++g) {
    if (!(err = CheckShapes(tops[g], dsts[g], rows, row_bytes)).success()) return err;
    st.dsts[2 * tag + g] = dsts[g].data;
  }
  if (!st.async) return StartSync(st, stream, plan0, src0, tops, plan1, src1, dsts, rows, row_bytes, n_experts, tag);

  // The next job, once the worker is done with it (the host runs at most kJobs layers ahead of the copies).
  Job& j = st.jobs[st.next_job++ % kJobs];
  st.cv.wait(lock, [&] { return !j.busy; });
  size_t n0 = plan0.element_count(), n1 = plan1.element_count();
  if (!(err = Reserve(&j.staging, &j.capacity, n0 + n1 + 4, &st.retired)).success()) return err;
  if (!j.ready) {
    if (!(err = Check(cudaEventCreateWithFlags(&j.ready, kDisableTiming), "cudaEventCreate")).success()) return err;
    if (!(err = Check(cudaEventCreateWithFlags(&j.plan_read, kDisableTiming), "cudaEventCreate")).success())
      return err;
  }
  int rc = QueuePlanRead(st, stream, j.ready, j.staging, plan0, plan1, src0, src1);
  if (!rc) rc = cudaEventRecord(j.plan_read, st.reader);
  if (!(err = Check(rc, "queueing the copy plan's read")).success()) return err;
  j.n[0] = n0 / kPlanCols;
  j.n[1] = n1 / kPlanCols;
  for (int g = 0; g < 2; ++g) {
    j.tops[g] = tops[g];
    j.dst[g] = dsts[g];
    j.seq[g] = ++st.seq;
    st.seqs[2 * tag + g] = j.seq[g];
  }
  j.rows = rows, j.row_bytes = row_bytes, j.n_experts = n_experts;
  j.busy = true;
  st.queue.push_back(&j);
  lock.unlock();
  st.cv.notify_all();
  return ffi::Error::Success();
}

ffi::Error Start(cudaStream_t stream, ffi::Buffer<ffi::S32> plan0, ffi::Buffer<ffi::S32> src0, ffi::AnyBuffer tops0,
                 ffi::Buffer<ffi::S32> plan1, ffi::Buffer<ffi::S32> src1, ffi::AnyBuffer tops1,
                 ffi::Result<ffi::AnyBuffer> dst0, ffi::Result<ffi::AnyBuffer> dst1, int64_t rows, int64_t row_bytes,
                 int64_t n_experts, int64_t tag) {
  State& st = state();
  std::unique_lock<std::mutex> lock(st.mu);
  ffi::Error err = StartLocked(st, lock, stream, plan0, src0, tops0, plan1, src1, tops1, dst0, dst1, rows, row_bytes,
                               n_experts, tag);
  if (!err.success()) Drain(st, stream);  // on success the lock is already released
  return err;
}

ffi::Error WaitLocked(State& st, cudaStream_t stream, const ffi::AnyBuffer& dst, int64_t tag, int64_t group) {
  if (!st.error.empty()) return Reported(st);
  auto d = st.dsts.find(2 * tag + group);
  if (d != st.dsts.end() && d->second != dst.untyped_data() && dst.size_bytes() > 0)
    // XLA copied the destination between start and wait: the copies land in the buffer it no longer reads
    return ffi::Error::Internal("direct copies: the destination of start " + std::to_string(tag) + " moved "
                                "before its wait");
  if (st.async) {
    auto it = st.seqs.find(2 * tag + group);
    if (it == st.seqs.end()) return ffi::Error::Success();  // nothing was started under this tag
    // cyclic >= comparison: the 32-bit numbers may wrap
    int rc = st.wait_value(stream, reinterpret_cast<unsigned long long>(st.flag), it->second, kWaitGeq);
    return rc ? ffi::Error::Internal("cuStreamWaitValue32 failed (" + std::to_string(rc) + ")")
              : ffi::Error::Success();
  }
  auto it = st.done.find(2 * tag + group);
  if (it == st.done.end()) return ffi::Error::Success();  // nothing was started under this tag
  return Check(cudaStreamWaitEvent(stream, it->second, 0), "cudaStreamWaitEvent");
}

ffi::Error Wait(cudaStream_t stream, ffi::AnyBuffer dst, ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer,
                ffi::Result<ffi::AnyBuffer>, int64_t tag, int64_t group) {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  ffi::Error err = WaitLocked(st, stream, dst, tag, group);
  if (!err.success()) Drain(st, stream);
  return err;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoepicH2DStart, Start,
                              StartBinding(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoepicH2DWait, Wait,
                              WaitBinding(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()));

// Whether this process's direct copies run asynchronously (1), synchronously (0), or have not started (-1).
extern "C" int MoepicH2DMode() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  return st.side ? static_cast<int>(st.async) : -1;
}

#else  // CPU: the same plans, copied with memcpy when waited for.

namespace {

// The CPU copies run in `Wait`, not in `Start`, as they land on a GPU only by then: a program that read a
// destination before its wait, or wrote a cache row that a started copy still reads, gives wrong results on the
// CPU too (the tests' exactness checks catch it), instead of only on a GPU.
struct Pending {
  std::mutex mu;
  std::unordered_map<int64_t, std::vector<Segment>> copies;  // by 2 * tag + group
};
Pending& pending() {
  static Pending* p = new Pending();  // never destroyed: XLA may call into it until the process exits
  return *p;
}

ffi::Error Start(ffi::Buffer<ffi::S32> plan0, ffi::Buffer<ffi::S32> src0, ffi::AnyBuffer tops0,
                 ffi::Buffer<ffi::S32> plan1, ffi::Buffer<ffi::S32> src1, ffi::AnyBuffer tops1,
                 ffi::Result<ffi::AnyBuffer> dst0, ffi::Result<ffi::AnyBuffer> dst1, int64_t rows, int64_t row_bytes,
                 int64_t n_experts, int64_t tag) {
  const ffi::Buffer<ffi::S32>* plans[2] = {&plan0, &plan1};
  const ffi::Buffer<ffi::S32>* srcs[2] = {&src0, &src1};
  Rows tops[2] = {RowsOf(tops0), RowsOf(tops1)};
  Rows dsts[2] = {RowsOf(*dst0), RowsOf(*dst1)};
  Pending& p = pending();
  std::lock_guard<std::mutex> lock(p.mu);
  for (int g = 0; g < 2; ++g) {
    if (srcs[g]->element_count() != 2 || plans[g]->element_count() % kPlanCols)
      return ffi::Error::InvalidArgument("h2d: src must be 2 words and plans whole rows");
    ffi::Error err = CheckShapes(tops[g], dsts[g], rows, row_bytes);
    if (!err.success()) return err;
    std::vector<Segment> segs;
    err = Segments(plans[g]->typed_data(), plans[g]->element_count() / kPlanCols, HostAddress(srcs[g]->typed_data()),
                   tops[g], n_experts, dsts[g], rows, row_bytes, &segs);
    if (!err.success()) return err;
    p.copies[2 * tag + g] = std::move(segs);
  }
  return ffi::Error::Success();
}

ffi::Error Wait(ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>,
                int64_t tag, int64_t group) {
  Pending& p = pending();
  std::lock_guard<std::mutex> lock(p.mu);
  auto it = p.copies.find(2 * tag + group);
  if (it == p.copies.end()) return ffi::Error::Success();  // nothing was started under this tag
  for (const Segment& s : it->second) std::memcpy(s.dst, s.src, s.bytes);
  p.copies.erase(it);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoepicH2DStart, Start, StartBinding(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoepicH2DWait, Wait, WaitBinding(ffi::Ffi::Bind()));

extern "C" int MoepicH2DMode() { return 0; }
#endif
