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

// The copies of one group: plan [n, kPlanCols] (already on the host), dst [n_dst, rows, ...]: plan rows
// [j * n / n_dst, (j + 1) * n / n_dst) fill destination expert j.
ffi::Error Segments(const int32_t* plan, int64_t n, const char* host, const char* tops, int64_t tops_rows,
                    int64_t tops_slots, int64_t n_experts, char* dst, int64_t n_dst, int64_t rows, int64_t row_bytes,
                    std::vector<Segment>* out) {
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
const char* cudaGetErrorString(int);
}
constexpr int kH2D = 1, kD2H = 2, kD2D = 3;
constexpr unsigned kNonBlocking = 1, kDisableTiming = 2;

namespace {

// One private stream, its events (per call site tag and group) and a pinned staging buffer for the plans. A
// process drives one device through this path (the engine uses it with one device only).
struct State {
  std::mutex mu;
  cudaStream_t side = nullptr;
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
  if (!st.side) {
    if (!(err = Check(cudaStreamCreateWithFlags(&st.side, kNonBlocking), "cudaStreamCreate")).success()) return err;
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
  int32_t* h = st.staging;
  cudaEventRecord(st.ready, stream);
  cudaStreamWaitEvent(st.side, st.ready, 0);
  cudaMemcpyAsync(h, plan0.typed_data(), 4 * n0, kD2H, st.side);
  cudaMemcpyAsync(h + n0, plan1.typed_data(), 4 * n1, kD2H, st.side);
  cudaMemcpyAsync(h + n0 + n1, src0.typed_data(), 8, kD2H, st.side);
  cudaMemcpyAsync(h + n0 + n1 + 2, src1.typed_data(), 8, kD2H, st.side);
  if (!(err = Check(cudaStreamSynchronize(st.side), "reading the copy plan")).success()) return err;
  const int32_t* plans[2] = {h, h + n0};
  const int32_t* srcs[2] = {h + n0 + n1, h + n0 + n1 + 2};
  size_t ns[2] = {n0 / kPlanCols, n1 / kPlanCols};
  ffi::AnyBuffer* tops[2] = {&tops0, &tops1};
  char* dsts[2] = {static_cast<char*>(dst0->untyped_data()), static_cast<char*>(dst1->untyped_data())};
  int64_t n_dst[2] = {dst0->dimensions().size() ? dst0->dimensions()[0] : 0,
                      dst1->dimensions().size() ? dst1->dimensions()[0] : 0};
  for (int g = 0; g < 2; ++g) {
    std::vector<Segment> segs;
    auto dims = tops[g]->dimensions();
    int64_t slots = dims.size() ? dims[0] : 0, tops_rows = dims.size() > 1 ? dims[1] : 0;
    err = Segments(plans[g], ns[g], HostAddress(srcs[g]), static_cast<const char*>(tops[g]->untyped_data()),
                   tops_rows, slots, n_experts, dsts[g], n_dst[g], rows, row_bytes, &segs);
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

#else  // CPU: the same plans, copied at once with memcpy.

namespace {

ffi::Error Start(ffi::Buffer<ffi::S32> plan0, ffi::Buffer<ffi::S32> src0, ffi::AnyBuffer tops0,
                 ffi::Buffer<ffi::S32> plan1, ffi::Buffer<ffi::S32> src1, ffi::AnyBuffer tops1,
                 ffi::Result<ffi::AnyBuffer> dst0, ffi::Result<ffi::AnyBuffer> dst1, int64_t rows, int64_t row_bytes,
                 int64_t n_experts, int64_t tag) {
  const ffi::Buffer<ffi::S32>* plans[2] = {&plan0, &plan1};
  const ffi::Buffer<ffi::S32>* srcs[2] = {&src0, &src1};
  ffi::AnyBuffer* tops[2] = {&tops0, &tops1};
  char* dsts[2] = {static_cast<char*>(dst0->untyped_data()), static_cast<char*>(dst1->untyped_data())};
  int64_t n_dst[2] = {dst0->dimensions().size() ? dst0->dimensions()[0] : 0,
                      dst1->dimensions().size() ? dst1->dimensions()[0] : 0};
  for (int g = 0; g < 2; ++g) {
    std::vector<Segment> segs;
    auto dims = tops[g]->dimensions();
    int64_t slots = dims.size() ? dims[0] : 0, tops_rows = dims.size() > 1 ? dims[1] : 0;
    ffi::Error err = Segments(plans[g]->typed_data(), plans[g]->element_count() / kPlanCols,
                              HostAddress(srcs[g]->typed_data()), static_cast<const char*>(tops[g]->untyped_data()),
                              tops_rows, slots, n_experts, dsts[g], n_dst[g], rows, row_bytes, &segs);
    if (!err.success()) return err;
    for (const Segment& s : segs) std::memcpy(s.dst, s.src, s.bytes);
  }
  return ffi::Error::Success();
}

ffi::Error Wait(ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>, int64_t, int64_t) { return ffi::Error::Success(); }

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoepicH2DStart, Start, StartBinding(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoepicH2DWait, Wait, WaitBinding(ffi::Ffi::Bind()));
#endif
