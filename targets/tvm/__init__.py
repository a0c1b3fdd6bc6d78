"""TVM CPU target: ahead-of-time compiled kernels for the linear ops (gemv.py), built into ONE shared
library that the runtime loads with `tvm_ffi.load_module` alone (apache-tvm is needed to compile, not
to run; this package imports tvm only inside the functions that compile).

The generated code calls the TVM backend entry points for parallel launches and workspace through
function pointers that libtvm_runtime fills in when it is loaded; the runtime does not load it. So
the library links a small shim (_BACKEND_CC) that fills them at load: an OpenMP parallel launch
(libgomp: with torch imported, the process already has torch's copy, and both share one thread pool,
sized by torch.set_num_threads / OMP_NUM_THREADS) and a workspace allocator that reuses one block
per thread. (Loaded into a process where tvm is imported, TVM's own runtime takes over: also fine.)
"""

import os
import tempfile

_BACKEND_CC = r"""
// The TVM backend entry points the kernels call (parallel launch, workspace), for a library loaded
// by tvm_ffi alone: OpenMP (libgomp; with torch loaded, torch's own copy and thread pool).
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
extern "C" {
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
extern void* __TVMBackendParallelLaunch __attribute__((weak));
extern void* __TVMBackendParallelBarrier __attribute__((weak));
extern void* __TVMBackendAllocWorkspace __attribute__((weak));
extern void* __TVMBackendFreeWorkspace __attribute__((weak));
}
static int v4c_parallel_launch(FTVMParallelLambda f, void* cdata, int num_task) {
  int n = num_task > 0 ? num_task : omp_get_max_threads(), err = 0;
#pragma omp parallel num_threads(n) reduction(| : err)
  {
    TVMParallelGroupEnv env = {nullptr, omp_get_num_threads()};
    err |= f(omp_get_thread_num(), &env, cdata);
  }
  return err;
}
static int v4c_parallel_barrier(int, TVMParallelGroupEnv*) {
#pragma omp barrier
  return 0;
}
// One cached block per thread: the per-call activation buffer is reused, not malloc'ed each call.
static thread_local void* cached = nullptr;
static thread_local size_t cached_size = 0;
static thread_local bool cached_busy = false;
static void* v4c_alloc(int, int, uint64_t nbytes, int, int) {
  size_t size = (nbytes + 63) / 64 * 64;
  if (cached_busy) return aligned_alloc(64, size);
  if (cached_size < size) {
    free(cached);
    cached = aligned_alloc(64, size);
    cached_size = cached ? size : 0;
  }
  cached_busy = cached != nullptr;
  return cached;
}
static int v4c_free(int, int, void* ptr) {
  if (ptr == cached) cached_busy = false; else free(ptr);
  return 0;
}
__attribute__((constructor)) static void v4c_install() {
  if (&__TVMBackendParallelLaunch) __TVMBackendParallelLaunch = (void*)v4c_parallel_launch;
  if (&__TVMBackendParallelBarrier) __TVMBackendParallelBarrier = (void*)v4c_parallel_barrier;
  if (&__TVMBackendAllocWorkspace) __TVMBackendAllocWorkspace = (void*)v4c_alloc;
  if (&__TVMBackendFreeWorkspace) __TVMBackendFreeWorkspace = (void*)v4c_free;
}
"""


def host_target(num_cores=None):
    """The LLVM target of this machine's CPU, as a JSON-style dict."""
    from tvm.target import codegen
    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": num_cores or os.cpu_count()}


def build_library(funcs, path, target=None):
    """Compile PrimFuncs (a list; or a dict name -> PrimFunc, renaming them) into one shared library at
    `path`, loadable with `tvm_ffi.load_module(path)` alone. `target`: an LLVM target dict (default:
    host_target()). Returns `path`."""
    import tvm

    if isinstance(funcs, dict):
        funcs = {name: f.with_attr("global_symbol", name) for name, f in funcs.items()}
    else:
        funcs = {str(f.attrs["global_symbol"]): f for f in funcs}
    lib = tvm.compile(tvm.IRModule(funcs), target=tvm.target.Target(target or host_target()))
    with tempfile.TemporaryDirectory() as tmp:
        shim = os.path.join(tmp, "v4c_tvm_backend.cc")
        with open(shim, "w") as f:
            f.write(_BACKEND_CC)
        lib.export_library(str(path), addons=[shim], options=["-fopenmp", "-O2"])
    return path
