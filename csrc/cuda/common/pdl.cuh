// Programmatic dependent launch (Hopper): a kernel launched with launch_kernel<true> or launch_dependent
// (common/launch.cuh) may have its CTAs start while the kernel before it in the stream is still running, so that a
// short kernel's launch and set-up overlap the previous one's tail (a decode step is two short kernels back to back:
// the forward and its combine). Such a kernel calls pdl_wait() before it reads anything the previous kernels wrote and
// before it writes anything; pdl_launch_dependents() lets the next kernel's CTAs start early (they wait in their own
// pdl_wait until this grid has finished and its writes are visible). Both are no-ops where the kernel was launched
// plainly, and before sm_90.
#pragma once

namespace bsattn {
namespace cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

}  // namespace cuda
}  // namespace bsattn
