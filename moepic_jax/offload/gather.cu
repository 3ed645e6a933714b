// The copy kernel of direct copies (h2d.cc, "kernel" mode): one launch per copy group reads the group's plan on the
// device and copies its rows, from the pinned host stack (read through PCIe: pinned memory is mapped into the GPU's
// address space) or from the layer's cache of top rows. Nothing waits on the host: the plan never leaves the device.
// Plan rows as in h2d.cc: (source, index, first_row, n_rows) int32, `per` plan rows per destination expert. A row
// that leaves its buffers is skipped and raises `err` (mapped host memory) to the launch's number `gen`, so that the
// host can tell a failure of the run it abandoned from a new one; the next start or wait reports it.
//
// Shipped as PTX (gather.ptx, made by `nvcc -ptx`) so that no CUDA compiler is needed where it runs; the driver
// compiles the PTX for the GPU at first use. Its first line holds the sha256 of this file.
#include <stdint.h>

template <typename T>
__device__ void copy_words(char* d, const char* s, long long bytes, long long tid, long long stride) {
  // four loads in flight per thread: a PCIe read takes ~1 us, so the link needs many at once
  const T* s4 = reinterpret_cast<const T*>(s);
  T* d4 = reinterpret_cast<T*>(d);
  const long long m = bytes / static_cast<long long>(sizeof(T));
  long long k = tid;
  for (; k + 3 * stride < m; k += 4 * stride) {
    T a = s4[k], b = s4[k + stride], c = s4[k + 2 * stride], e = s4[k + 3 * stride];
    d4[k] = a;
    d4[k + stride] = b;
    d4[k + 2 * stride] = c;
    d4[k + 3 * stride] = e;
  }
  for (; k < m; k += stride) d4[k] = s4[k];
}

extern "C" __global__ void __launch_bounds__(1024) moepic_gather(const int32_t* plan, long long n, long long per, const int32_t* src_words,
                                         const char* tops, long long tops_n, long long tops_rows, char* dst,
                                         long long rows, long long row_bytes, long long n_experts, unsigned* err, unsigned gen) {
  const char* host = reinterpret_cast<const char*>(static_cast<unsigned long long>(static_cast<uint32_t>(src_words[0])) |
                                                   (static_cast<unsigned long long>(static_cast<uint32_t>(src_words[1])) << 32));
  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = 0; i < n; ++i) {
    const long long source = plan[4 * i], index = plan[4 * i + 1], first = plan[4 * i + 2], count = plan[4 * i + 3];
    if (count == 0) continue;
    bool ok = first >= 0 && count > 0 && first + count <= rows;
    const char* s = nullptr;
    if (source == 0) {
      ok = ok && index >= 0 && index < n_experts;
      s = host + (index * rows + first) * row_bytes;
    } else if (source == 1) {
      ok = ok && index >= 0 && index < tops_n && first + count <= tops_rows;
      s = tops + (index * tops_rows + first) * row_bytes;
    } else {
      ok = false;
    }
    if (!ok) {
      if (tid == 0) atomicMax(err, gen);
      continue;
    }
    char* d = dst + ((i / per) * rows + first) * row_bytes;
    const long long bytes = count * row_bytes;
    const unsigned long long align = reinterpret_cast<unsigned long long>(s) | reinterpret_cast<unsigned long long>(d) |
                                     static_cast<unsigned long long>(bytes);
    if ((align & 15) == 0) copy_words<uint4>(d, s, bytes, tid, stride);
    else if ((align & 3) == 0) copy_words<uint32_t>(d, s, bytes, tid, stride);
    else copy_words<char>(d, s, bytes, tid, stride);
  }
}
