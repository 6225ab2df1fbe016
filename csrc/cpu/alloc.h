// Outputs of the CPU kernels that are large enough for page faults to matter. glibc maps every
// large block fresh from the OS (unless dlkernels.cpu.reuse_large_allocations is on), and on a
// VM each 4 KiB page's first-touch fault costs ~2 us: writing a fresh 51 MB tensor took 28 ms
// against 8 ms into reused memory on the development machine. Advising transparent huge pages
// (madvise(MADV_HUGEPAGE), honoured where THP is "madvise" or "always") makes those faults 2 MiB
// each: 8 ms fresh as well. Advice only: a kernel without THP ignores it, values never change.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dlk::cpu {

// Below this a tensor has few pages to fault, and an madvise call would cost more than it saves.
constexpr int64_t kHugePageAdviceBytes = int64_t(4) << 20;

// Advise huge pages for the memory of the dense tensor t (whole 4 KiB pages inside it only).
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * int64_t(t.element_size());
  if (bytes < kHugePageAdviceBytes) return;
  constexpr uintptr_t kPage = 4096;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kPage - 1) & ~(kPage - 1), end = (p + uintptr_t(bytes)) & ~(kPage - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty_like(t), advised huge pages when large.
inline at::Tensor empty_output_like(const at::Tensor& t) {
  at::Tensor out = at::empty_like(t);
  advise_huge_pages(out);
  return out;
}

}  // namespace dlk::cpu
