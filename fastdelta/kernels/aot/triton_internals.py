"""The private APIs of Triton that the compile suite uses, imported in one place: written against
Triton 3.9; where a release of Triton moved them, importing fastdelta.kernels.aot says so."""

import triton

try:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.cache import get_cache_manager
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError as error:
    raise ImportError(
        f"fastdelta.kernels.aot uses private APIs of Triton 3.9 that Triton {triton.__version__} "
        f"moved ({error}); update the imports at the top of kernels/aot/triton_internals.py"
    ) from error
if not hasattr(JITFunction, "_pack_args"):
    raise ImportError(
        f"fastdelta.kernels.aot binds arguments with JITFunction._pack_args (Triton 3.9), which "
        f"Triton {triton.__version__} does not have; follow JITFunction.run in "
        f"triton/runtime/jit.py and update bind() in kernels/aot/jit_functions.py"
    )

__all__ = [
    "ASTSource",
    "Autotuner",
    "GPUTarget",
    "Heuristics",
    "InterpretedFunction",
    "JITFunction",
    "create_function_from_signature",
    "get_cache_manager",
    "get_ptxas",
    "knobs",
    "make_backend",
    "sm_arch_from_capability",
]
