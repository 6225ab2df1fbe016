// Output tensors of the CPU kernels, with transparent huge pages asked for.
//
// glibc serves a large allocation with fresh mmapped pages (unless dlkernels.cpu.
// reuse_large_allocations() is on), and the kernel's first write then faults once per 4 KiB page:
// here, first touch of a 51 MB tensor took 23 ms against the 2 ms of the elementwise kernel that
// writes it. With transparent huge pages in "madvise" mode (the common default), MADV_HUGEPAGE on
// the 2 MiB-aligned interior makes first touch fault once per 2 MiB (4-8 ms). Advice only: on a
// system without THP, or memory already faulted in (a reused block), it changes nothing.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <sys/mman.h>

#include <cstdint>

namespace dlk::cpu {

constexpr uintptr_t kHugePage = uintptr_t(2) << 20;

inline void advise_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  const auto bytes = static_cast<uintptr_t>(t.nbytes());
  if (bytes < 4 * kHugePage) return;  // small tensors: a syscall would cost more than it saves
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHugePage - 1) & ~(kHugePage - 1), end = (p + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // errors: no advice
#else
  (void)t;
#endif
}

// at::empty_like(like), the shape, dtype and strides of a kernel's output, advised as above.
inline at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
  advise_huge_pages(out);
  return out;
}

}  // namespace dlk::cpu
