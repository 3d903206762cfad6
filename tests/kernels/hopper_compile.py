"""Compile for an H100/H200 (sm_90), and for sm_80 (A100; the feature set of the Ampere and Ada cards
quantized models are made to fit), every kernel launch that the interpreter ran, on a host without a
GPU.

Triton's interpreter runs a kernel's Python body, so it accepts code that Triton's compiler refuses
(a loop-carried variable whose shape changes, a dot of unsupported shapes, ...): such kernels pass
the CPU checks and fail only on the GPU. `record(path)` (in the interpreter's process) notes each
launch: the kernel, its arguments' types, its constexprs and launch options; `python
hopper_compile.py PATH` (a process without the interpreter) compiles each distinct launch for each
of TARGETS with Triton's own compiler and ptxas, and exits non-zero with the compiler's message on
the first that fails (inline PTX that only a newer GPU takes fails here). float16 tensors are
compiled as bfloat16, the GPU checks' dtype (the interpreter has no bf16 dots, so the CPU checks run
in float16), and a kernel's PTX constexpr as True (on a GPU the kernel runs inline PTX where the
interpreter runs Triton ops that emulate it). Arguments are specialised as Triton's launcher does on
a GPU: an integer equal to 1 becomes the constant 1, and a tensor whose address or an integer whose
value is a multiple of 16 is marked so (`tt.divisibility`), which lets the compiler vectorise loads;
without the marks it compiles other code than the GPU runs (the grouped GEMM's tiles spill registers
to memory, with them not).
"""
import atexit
import inspect
import itertools
import json
import os
import sys

LAUNCH_OPTIONS = ("num_warps", "num_stages")
IGNORED_OPTIONS = ("launch_pdl", "num_ctas", "maxnreg")
TARGETS = (90, 80)  # compute capabilities
GPU_CONSTEXPRS = {"PTX": True}  # what a GPU launch passes where the interpreter runs Triton ops instead of inline PTX
TENSOR_TYPES = {"float32": "fp32", "float16": "bf16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
                "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _argument_type(value):
    """Triton's signature type of a runtime argument (None: a constexpr, as Triton treats it)."""
    if value is None:
        return "constexpr"
    if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
        return "*" + TENSOR_TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no signature type for an argument of type {type(value).__name__}")


def launch_record(fn, args, kwargs) -> dict:
    """The kernel `fn` (a Python function) launched with `args` / `kwargs`: its module and name, the
    signature type of each runtime argument, the value of each constexpr (integer arguments equal to 1
    among them), the arguments aligned to 16 (bytes for tensors, a multiple for integers), the launch
    options."""
    params = inspect.signature(fn).parameters
    values = dict(zip(params, args))
    values.update((k, v) for k, v in kwargs.items() if k not in LAUNCH_OPTIONS + IGNORED_OPTIONS)
    signature, constexprs, aligned = {}, {}, []
    for name, param in params.items():
        value = values.get(name, param.default)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        constant = "constexpr" in str(param.annotation) or is_int and value == 1
        signature[name] = "constexpr" if constant else _argument_type(value)
        if signature[name] == "constexpr":  # None included
            constexprs[name] = value.value if hasattr(value, "value") else value
        elif is_int and value % 16 == 0 or hasattr(value, "data_ptr") and value.data_ptr() % 16 == 0:
            aligned.append(name)
    module = fn.__module__
    if module == "__main__":  # a kernel of the checks' own script, importable by its file's name
        module = os.path.splitext(os.path.basename(sys.modules["__main__"].__file__))[0]
    return dict(module=module, kernel=fn.__name__, signature=signature, constexprs=constexprs,
                aligned=aligned, options={k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs})


def record(path: str) -> None:
    """In the interpreter's process: note every kernel launch, written to `path` (JSON) at exit."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        entry = launch_record(self.fn, args, kwargs)
        launches[json.dumps(entry, sort_keys=True)] = entry
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    def write():
        with open(path, "w") as file:
            json.dump(list(launches.values()), file)

    InterpretedFunction.run = recording
    atexit.register(write)


def compile_all(path: str) -> int:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    with open(path) as file:
        launches = json.load(file)
    for entry, arch in itertools.product(launches, TARGETS):
        kernel = getattr(importlib.import_module(entry["module"]), entry["kernel"])
        names = list(entry["signature"])
        constexprs = {(names.index(name),): GPU_CONSTEXPRS.get(name, value)
                      for name, value in entry["constexprs"].items()}
        attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in entry["aligned"]}
        try:
            triton.compile(ASTSource(fn=kernel, signature=entry["signature"], constexprs=constexprs, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options=entry["options"])
        except Exception as error:
            print(f"{entry['module']}.{entry['kernel']} does not compile for sm_{arch} with constexprs "
                  f"{entry['constexprs']}, options {entry['options']}:\n{error}", flush=True)
            return 1
    print(f"compiled {len(launches)} launches for " + ", ".join(f"sm_{arch}" for arch in TARGETS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(compile_all(sys.argv[1]))
