"""The JIT functions: which @triton.jit kernels the kernels package defines, and what a launch
compiles (every config its autotuner's pruner keeps, bound as the JIT binds it)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import sys
import textwrap

from .triton_internals import (
    Autotuner,
    GPUTarget,
    Heuristics,
    InterpretedFunction,
    JITFunction,
    create_function_from_signature,
    knobs,
    make_backend,
)

# The kernels package (this package's parent), which names the kernels' modules.
PACKAGE = __package__.rpartition(".")[0]


def _unwrap(kernel):
    """The JIT (or interpreted) function under autotuners and heuristics, or None."""
    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel if isinstance(kernel, (JITFunction, InterpretedFunction)) else None


def function_name(function) -> str:
    """module.function of a JIT function, the module relative to the kernels package."""
    return f"{function.fn.__module__.removeprefix(PACKAGE + '.')}.{function.fn.__qualname__}"


def kernel_modules() -> list:
    """Every module of the kernels package but this package, the compile suite (aot)."""
    package = importlib.import_module(PACKAGE)
    names = [info.name for info in pkgutil.iter_modules(package.__path__) if info.name != "aot"]
    return [importlib.import_module(f"{PACKAGE}.{name}") for name in names]


def defined_kernels() -> list[str]:
    """The @triton.jit kernels the package defines: its JIT functions that no JIT function of the
    package calls (those are device functions, compiled into their callers)."""
    functions = {}
    for module in kernel_modules():
        for value in vars(module).values():
            function = _unwrap(value)
            if function is not None and function.fn.__module__ == module.__name__:
                functions[function_name(function)] = function
    called = set()
    for function in functions.values():
        tree = ast.parse(textwrap.dedent(inspect.getsource(function.fn)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                callee = _unwrap(_resolve(node.func, function.fn.__globals__))
                if callee is not None:
                    called.add(function_name(callee))
    return sorted(set(functions) - called)


def _resolve(expression, namespace):
    """The object a call's function expression (a name or dotted attribute) refers to."""
    if isinstance(expression, ast.Name):
        return namespace.get(expression.id)
    if isinstance(expression, ast.Attribute):
        return getattr(_resolve(expression.value, namespace), expression.attr, None)
    return None


def launch_name(kernel) -> str:
    """The name the package binds a launched kernel (an autotuner or a JIT function) to, e.g.
    lora._forward_large for one of the autotuners of lora._forward_kernel."""
    function = _unwrap(kernel)
    module = sys.modules[function.fn.__module__]
    names = [name for name, value in vars(module).items() if value is kernel]
    name = function.fn.__qualname__ if function.fn.__qualname__ in names else names[0]
    return f"{module.__name__.removeprefix(PACKAGE + '.')}.{name}"


def variants(kernel, args, constants, config=None):
    """(JIT function, keyword arguments, (index, config)) of every compile a launch can cause: one
    per config the autotuner's pruner keeps (pruned as Autotuner.run prunes), heuristics applied."""
    if isinstance(kernel, Autotuner):
        configs = kernel.configs
        if len(configs) > 1:
            kernel.nargs = dict(zip(kernel.arg_names, args, strict=False))
            try:
                configs = kernel.prune_configs(constants)
            finally:
                kernel.nargs = None
        for chosen in configs:
            index = next((i for i, c in enumerate(kernel.configs) if c is chosen), -1)
            kwargs = {**constants, **chosen.all_kwargs()}
            yield from variants(kernel.fn, args, kwargs, (index, chosen))
    elif isinstance(kernel, Heuristics):
        kwargs = dict(constants)
        for name, rule in kernel.values.items():
            kwargs[name] = rule({**dict(zip(kernel.arg_names, args, strict=False)), **kwargs})
        yield from variants(kernel.fn, args, kwargs, config)
    else:
        yield kernel, constants, config


_binders = {}
_bound = {}


def bind(function, args, kwargs, arch: int):
    """(signature, constexprs, attrs, options) of the kernel the JIT would compile for this
    launch on `arch`, from Triton's own binder, as JITFunction.run binds (and, as the JIT's
    cache, once per specialization and keyword arguments)."""
    if (id(function), arch) not in _binders:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        binder = create_function_from_signature(function.signature, function.params, backend)
        _binders[id(function), arch] = backend, binder
    backend, binder = _binders[id(function), arch]
    kwargs = {**kwargs, "debug": kwargs.get("debug", function.debug) or knobs.runtime.debug}
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    bound, specialization, options = binder(*args, **kwargs)
    key = (id(function), arch, repr(specialization), repr(sorted(kwargs.items())))
    if key not in _bound:
        options, signature, constexprs, attrs = function._pack_args(
            backend, kwargs, bound, specialization, options
        )
        _bound[key] = signature, constexprs, attrs, options.__dict__
    return _bound[key]
