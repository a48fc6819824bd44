// Development only (not part of _bsattn_cuda): exports the backward handler as a plain C symbol so that a
// standalone shared library can be registered from Python without nanobind:
//   lib = ctypes.CDLL("libbsattn_bwd_dev.so")
//   jax.ffi.register_ffi_target("bsattn_bwd_cuda", jax.ffi.pycapsule(lib.bsattn_bwd_cuda_dev), platform="CUDA")
#include "xla/ffi/api/c_api.h"

namespace bsattn {
namespace cuda {
XLA_FFI_Handler* bwd_handler();
}  // namespace cuda
}  // namespace bsattn

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* bsattn_bwd_cuda_dev(XLA_FFI_CallFrame* frame) {
  return bsattn::cuda::bwd_handler()(frame);
}
