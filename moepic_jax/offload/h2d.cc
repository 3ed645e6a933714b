// Expert rows to the device by DMA, outside XLA's control flow: two XLA FFI calls (moepic_jax/offload/transfer.py).
//
// h2d_start(plan0, src0, tops0, plan1, src1, tops1) -> (dst0, dst1): after the work XLA queued before it, read the
//   two copy plans to the host (one wait per call: the only host round trip of a layer), then queue one
//   cudaMemcpyAsync per planned segment on a private stream, so the copies run on the copy engines while XLA's
//   stream computes. A plan row is (source, index, first_row, n_rows) int32: source 0 = the pinned host stack
//   (index = expert), 1 = the layer's cache of top rows on the device (index = slot). Rows [first_row,
//   first_row + n_rows) of the source land at the same rows of the destination expert. Group 0 is this layer's
//   experts, group 1 the next layer's predicted experts (prefetch); each group records its own event.
// h2d_wait(dst) -> dst (aliased): XLA's stream waits for that group's copies.
//
// The stack's host address comes in as data (src: two int32 words), not as an attribute, so the compiled program
// does not depend on where the stack was allocated (the persistent compilation cache stays valid). The CPU build
// (no MOEPIC_CUDA) runs the same plan with memcpy, so the CPU tests cover the plans.
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
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

struct Segment {
  char* dst;
  const char* src;
  size_t bytes;
  bool from_host;
};

// The copies of one group: plan [n, kPlanCols] (already on the host), the cache's tops [slots, tops_rows, ...] and
// dst [n_dst, rows, ...]: plan rows [j * n / n_dst, (j + 1) * n / n_dst) fill destination expert j. The buffers'
// sizes are checked against row_bytes, so a plan can never read or write past them.
ffi::Error Segments(const int32_t* plan, int64_t n, const char* host, const ffi::AnyBuffer& tops_buf,
                    int64_t n_experts, ffi::Result<ffi::AnyBuffer>& dst_buf, int64_t rows, int64_t row_bytes,
                    std::vector<Segment>* out) {
  auto tdims = tops_buf.dimensions();
  int64_t tops_slots = tdims.size() ? tdims[0] : 0, tops_rows = tdims.size() > 1 ? tdims[1] : 0;
  int64_t n_dst = dst_buf->dimensions().size() ? dst_buf->dimensions()[0] : 0;
  const char* tops = static_cast<const char*>(tops_buf.untyped_data());
  char* dst = static_cast<char*>(dst_buf->untyped_data());
  if (static_cast<int64_t>(dst_buf->size_bytes()) != n_dst * rows * row_bytes ||
      (tops_slots * tops_rows > 0 && static_cast<int64_t>(tops_buf.size_bytes()) != tops_slots * tops_rows * row_bytes))
    return ffi::Error::InvalidArgument("h2d: the destination or the cache rows are not row_bytes wide");
  if (n == 0) return ffi::Error::Success();
  if (n_dst == 0 || n % n_dst != 0)
    return ffi::Error::InvalidArgument("h2d plan rows must be a multiple of the destination's experts");
  const int64_t per = n / n_dst;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* p = plan + i * kPlanCols;
    int64_t source = p[0], index = p[1], first = p[2], count = p[3];
    if (count == 0) continue;
    if (first < 0 || count < 0 || first + count > rows)
      return ffi::Error::InvalidArgument("h2d plan row " + std::to_string(i) + " leaves the expert's rows");
    char* d = dst + ((i / per) * rows + first) * row_bytes;
    if (source != 0 && source != 1) return ffi::Error::InvalidArgument("h2d plan: source must be 0 or 1");
    if (source == 0) {
      if (index < 0 || index >= n_experts) return ffi::Error::InvalidArgument("h2d plan: expert out of range");
      out->push_back({d, host + (index * rows + first) * row_bytes, static_cast<size_t>(count * row_bytes), true});
    } else {
      if (index < 0 || index >= tops_slots || first + count > tops_rows)
        return ffi::Error::InvalidArgument("h2d plan: cache slot or rows out of range");
      out->push_back({d, tops + (index * tops_rows + first) * row_bytes, static_cast<size_t>(count * row_bytes),
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
      .template Ret<ffi::AnyBuffer>()                  // dst (aliased)
      .template Attr<int64_t>("tag")
      .template Attr<int64_t>("group");
}

}  // namespace

#ifdef MOEPIC_CUDA
// The CUDA runtime that jaxlib loads resolves these (no CUDA headers or nvcc needed to build).
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
extern "C" {
int cudaMemcpyAsync(void*, const void*, size_t, int, cudaStream_t);
int cudaStreamSynchronize(cudaStream_t);
int cudaStreamCreateWithFlags(cudaStream_t*, unsigned);
int cudaEventCreateWithFlags(cudaEvent_t*, unsigned);
int cudaEventRecord(cudaEvent_t, cudaStream_t);
int cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned);
int cudaMallocHost(void**, size_t);
int cudaFreeHost(void*);
int cudaGetDevice(int*);
const char* cudaGetErrorString(int);
}
constexpr int kH2D = 1, kD2H = 2, kD2D = 3;
constexpr unsigned kNonBlocking = 1, kDisableTiming = 2;

namespace {

// The private streams, their events (per call site tag and group) and a pinned staging buffer for the plans. A
// process drives one device through this path (the engine uses it with one device only).
struct State {
  std::mutex mu;
  int device = -1;
  cudaStream_t side = nullptr;    // the copies
  cudaStream_t reader = nullptr;  // the plans' reads: not queued behind copies still in flight
  cudaEvent_t ready = nullptr;
  std::unordered_map<int64_t, cudaEvent_t> done;
  int32_t* staging = nullptr;
  size_t staging_words = 0;
};
State& state() {
  static State* s = new State();  // never destroyed: XLA may call into it until the process exits
  return *s;
}

ffi::Error Check(int rc, const char* what) {
  if (rc == 0) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(rc));
}

ffi::Error Start(cudaStream_t stream, ffi::Buffer<ffi::S32> plan0, ffi::Buffer<ffi::S32> src0, ffi::AnyBuffer tops0,
                 ffi::Buffer<ffi::S32> plan1, ffi::Buffer<ffi::S32> src1, ffi::AnyBuffer tops1,
                 ffi::Result<ffi::AnyBuffer> dst0, ffi::Result<ffi::AnyBuffer> dst1, int64_t rows, int64_t row_bytes,
                 int64_t n_experts, int64_t tag) {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  ffi::Error err;
  if (src0.element_count() != 2 || src1.element_count() != 2 || plan0.element_count() % kPlanCols ||
      plan1.element_count() % kPlanCols)
    return ffi::Error::InvalidArgument("h2d: src must be 2 words and plans whole rows");
  int device = -1;
  if (!(err = Check(cudaGetDevice(&device), "cudaGetDevice")).success()) return err;
  if (st.device >= 0 && device != st.device)
    return ffi::Error::InvalidArgument("direct copies drive one GPU per process (first used: " +
                                       std::to_string(st.device) + ", now: " + std::to_string(device) + ")");
  st.device = device;
  if (!st.side) {
    if (!(err = Check(cudaStreamCreateWithFlags(&st.side, kNonBlocking), "cudaStreamCreate")).success()) return err;
    if (!(err = Check(cudaStreamCreateWithFlags(&st.reader, kNonBlocking), "cudaStreamCreate")).success())
      return err;
    if (!(err = Check(cudaEventCreateWithFlags(&st.ready, kDisableTiming), "cudaEventCreate")).success()) return err;
  }
  size_t n0 = plan0.element_count(), n1 = plan1.element_count(), words = n0 + n1 + 4;
  if (words > st.staging_words) {
    if (st.staging) cudaFreeHost(st.staging);
    st.staging = nullptr;
    size_t want = words < 4096 ? 4096 : 2 * words;
    if (!(err = Check(cudaMallocHost(reinterpret_cast<void**>(&st.staging), 4 * want), "cudaMallocHost")).success())
      return err;
    st.staging_words = want;
  }
  // The plans are computed by XLA's stream just before: read them after that work, then wait (host round trip).
  // The read has its own stream, so the host waits for XLA's work only, not for copies queued earlier (a
  // prefetch still in flight); the copies wait for XLA's work too (their destinations are XLA's buffers).
  int32_t* h = st.staging;
  int rc = cudaEventRecord(st.ready, stream);
  if (!rc) rc = cudaStreamWaitEvent(st.reader, st.ready, 0);
  if (!rc) rc = cudaStreamWaitEvent(st.side, st.ready, 0);
  if (!rc && n0) rc = cudaMemcpyAsync(h, plan0.typed_data(), 4 * n0, kD2H, st.reader);
  if (!rc && n1) rc = cudaMemcpyAsync(h + n0, plan1.typed_data(), 4 * n1, kD2H, st.reader);
  if (!rc) rc = cudaMemcpyAsync(h + n0 + n1, src0.typed_data(), 8, kD2H, st.reader);
  if (!rc) rc = cudaMemcpyAsync(h + n0 + n1 + 2, src1.typed_data(), 8, kD2H, st.reader);
  if (!(err = Check(rc, "queueing the copy plan's read")).success()) return err;
  if (!(err = Check(cudaStreamSynchronize(st.reader), "reading the copy plan")).success()) return err;
  const int32_t* plans[2] = {h, h + n0};
  const int32_t* srcs[2] = {h + n0 + n1, h + n0 + n1 + 2};
  size_t ns[2] = {n0 / kPlanCols, n1 / kPlanCols};
  const ffi::AnyBuffer* tops[2] = {&tops0, &tops1};
  ffi::Result<ffi::AnyBuffer>* dsts[2] = {&dst0, &dst1};
  for (int g = 0; g < 2; ++g) {
    std::vector<Segment> segs;
    err = Segments(plans[g], ns[g], HostAddress(srcs[g]), *tops[g], n_experts, *dsts[g], rows, row_bytes, &segs);
    if (!err.success()) return err;
    for (const Segment& s : segs)
      if (!(err = Check(cudaMemcpyAsync(s.dst, s.src, s.bytes, s.from_host ? kH2D : kD2D, st.side),
                        "cudaMemcpyAsync")).success())
        return err;
    cudaEvent_t& ev = st.done[2 * tag + g];
    if (!ev && !(err = Check(cudaEventCreateWithFlags(&ev, kDisableTiming), "cudaEventCreate")).success()) return err;
    if (!(err = Check(cudaEventRecord(ev, st.side), "cudaEventRecord")).success()) return err;
  }
  return ffi::Error::Success();
}

ffi::Error Wait(cudaStream_t stream, ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>, int64_t tag, int64_t group) {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  auto it = st.done.find(2 * tag + group);
  if (it == st.done.end()) return ffi::Error::Success();  // nothing was started under this tag
  return Check(cudaStreamWaitEvent(stream, it->second, 0), "cudaStreamWaitEvent");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoepicH2DStart, Start,
                              StartBinding(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoepicH2DWait, Wait,
                              WaitBinding(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()));

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
  const ffi::AnyBuffer* tops[2] = {&tops0, &tops1};
  ffi::Result<ffi::AnyBuffer>* dsts[2] = {&dst0, &dst1};
  Pending& p = pending();
  std::lock_guard<std::mutex> lock(p.mu);
  for (int g = 0; g < 2; ++g) {
    if (srcs[g]->element_count() != 2 || plans[g]->element_count() % kPlanCols)
      return ffi::Error::InvalidArgument("h2d: src must be 2 words and plans whole rows");
    std::vector<Segment> segs;
    ffi::Error err = Segments(plans[g]->typed_data(), plans[g]->element_count() / kPlanCols,
                              HostAddress(srcs[g]->typed_data()), *tops[g], n_experts, *dsts[g], rows, row_bytes,
                              &segs);
    if (!err.success()) return err;
    p.copies[2 * tag + g] = std::move(segs);
  }
  return ffi::Error::Success();
}

ffi::Error Wait(ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>, int64_t tag, int64_t group) {
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
#endif
