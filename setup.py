"""Build kt-sft and its CPU engine `kt_sft._engine`.

The engine is a plain pybind11 module (no torch headers, no libtorch), so one build serves any torch >= 2.4.
Each ISA kernel unit is compiled with its own target flags and nothing else ever gets them: the right unit is
picked at run time from CPUID (csrc/cpu_features.cpp), so no CPU can hit an instruction it lacks (no SIGILL,
no -march=native). `make wheel` (scripts/build_wheel.sh) turns this into manylinux wheels; what built a binary is
compiled into it (build_info, `python -m kt_sft env`).
"""
import json
import os
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pybind11
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel
from setuptools.extension import Extension

# -Wno-psabi: the kernels' 16-float vector helpers are static inline inside one unit, so the ABI note GCC gives
# for them on units without AVX512 never applies (GCC emits it without a location, past the in-file pragma).
BASE_FLAGS = ["-std=c++17", "-O3", "-march=x86-64", "-mtune=generic", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas",
              "-Wno-psabi"]
AVX512 = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16"]
ISA_UNITS = {  # source -> extra target flags, used for that translation unit only
    "csrc/kernels/isa_scalar.cpp": [],
    "csrc/kernels/isa_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/kernels/isa_avx512.cpp": AVX512,
    # AVX512-VBMI: the int4-GEMM lookups (every AMX CPU has it; cpu_features.cpp checks)
    "csrc/kernels/isa_amx.cpp": AVX512 + ["-mavx512vbmi", "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
}
HERE = os.path.dirname(os.path.abspath(__file__))
# libstdc++ linked in (only its used parts; its symbols stay hidden): the .so then needs glibc and libgcc_s only, so
# one wheel also runs in an environment whose libstdc++ is older than the build box's (conda; GCC 12's
# std::condition_variable::wait alone needs GLIBCXX_3.4.30). libgcc stays shared: its static unwinder would need
# glibc 2.35's _dl_find_object. csrc/glibc_compat.cpp keeps the floor at glibc 2.34 (auditwheel: manylinux_2_34).
LINK_FLAGS = ["-pthread", "-static-libstdc++", "-Wl,--exclude-libs,ALL"]
BASE_SOURCES = ["csrc/bindings.cpp", "csrc/env.cpp", "csrc/engine.cpp", "csrc/packing.cpp", "csrc/routing.cpp",
                "csrc/schedule.cpp", "csrc/lora_pack.cpp", "csrc/moe_layer.cpp", "csrc/forward.cpp",
                "csrc/backward.cpp", "csrc/cpu_features.cpp", "csrc/thread_pool.cpp", "csrc/numa.cpp",
                "csrc/glibc_compat.cpp", "csrc/shared_segment.cpp"]
HEADERS = ["csrc/common.h", "csrc/activations.h", "csrc/kernel_api.h", "csrc/buffer.h", "csrc/env.h", "csrc/engine.h", "csrc/formats.h",
           "csrc/packing.h", "csrc/routing.h", "csrc/schedule.h", "csrc/lora_pack.h", "csrc/moe_layer.h",
           "csrc/cpu_features.h", "csrc/thread_pool.h", "csrc/numa.h", "csrc/build_info.h",
           "csrc/shared_segment.h",
           "csrc/kernels/moe_kernels.inc", "csrc/kernels/moe_common.inc", "csrc/kernels/moe_lora.inc",
           "csrc/kernels/moe_float.inc", "csrc/kernels/moe_int8.inc", "csrc/kernels/moe_int8_gemm.inc", "csrc/kernels/moe_decoded.inc", "csrc/kernels/moe_fp8.inc",
           "csrc/kernels/moe_int4.inc", "csrc/kernels/moe_int4_gemm.inc",
           "csrc/kernels/moe_tasks.inc", "csrc/kernels/avx512_microkernels.h",
           "csrc/kernels/avx512_int4.h"]


def _run(*cmd: str) -> str:
    """First line of a command's output, or "" when it cannot run (no git in an sdist, no compiler --version)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=HERE)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except OSError:
        return ""


def git_commit() -> str:
    """KT_SFT_BUILD_COMMIT (scripts/build_wheel.sh builds from a copy without .git), else this checkout's HEAD,
    with "+dirty" when the working tree differs from it."""
    if os.environ.get("KT_SFT_BUILD_COMMIT"):
        return os.environ["KT_SFT_BUILD_COMMIT"]
    head = _run("git", "rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown"
    return head + ("+dirty" if _run("git", "status", "--porcelain") else "")


def build_info(compiler_cmd: list) -> dict:
    """What built this binary; compiled into it (csrc/build_info.h) and printed by `python -m kt_sft env`."""
    return {
        "commit": git_commit(),
        "compiler": _run(compiler_cmd[0], "--version") or compiler_cmd[0],
        "python": sysconfig.get_config_var("SOABI") or "",
        "pybind11": pybind11.__version__,
        "base_flags": BASE_FLAGS,
        "link_flags": LINK_FLAGS,
        "isa_units": {os.path.basename(src)[4:-4]: flags for src, flags in ISA_UNITS.items()},
    }


BUILD_INFO_CPP = """// Generated by setup.py (BuildEngine) for this build: what built the binary (csrc/build_info.h).
namespace kt_sft {
const char* build_info_json() { return R"ktinfo(%s)ktinfo"; }
}  // namespace kt_sft
"""


class BuildEngine(build_ext):
    """Compiles the ISA units (in parallel) with their own flags and the generated build-info unit, then links them
    into the extension."""

    def build_extension(self, ext):
        jobs = int(os.environ.get("KT_SFT_BUILD_JOBS", os.cpu_count() or 1))
        include = [pybind11.get_include(), "csrc"]
        info_src = self.write_build_info()

        def compile_unit(item):
            src, flags = item
            return self.compiler.compile([src], output_dir=self.build_temp, include_dirs=include,
                                         extra_postargs=BASE_FLAGS + ["-fPIC"] + flags, depends=HEADERS)

        units = list(ISA_UNITS.items()) + [(info_src, [])]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            ext.extra_objects = [o for objs in pool.map(compile_unit, units) for o in objs]
        self.parallel = jobs
        super().build_extension(ext)

    def write_build_info(self) -> str:
        """The generated build-info unit (rewritten each build: the commit changes); returns its path."""
        cxx = getattr(self.compiler, "compiler_so_cxx", None) or self.compiler.compiler_so  # older setuptools
        os.makedirs(self.build_temp, exist_ok=True)
        path = os.path.join(self.build_temp, "kt_sft_build_info.cpp")
        with open(path, "w") as f:
            f.write(BUILD_INFO_CPP % json.dumps(build_info(cxx)))
        return path


# The LLaMA-Factory hook: a .pth at the site-packages root runs this line at every interpreter start (torchrun
# children included). It costs one env lookup and one look at argv[0] unless USE_KT is set or the program is
# llamafactory-cli / lmf (then startup.on_start: the hook, or without USE_KT only the "set USE_KT=1" hint); the
# name sorts after `__editable__*.pth`, so an editable install's import finder is already in place when it runs.
HOOK_PTH = "kt_sft-llamafactory-hook.pth"
HOOK_LINE = ("import os, sys; (os.environ.get('USE_KT', '').strip().lower() in ('1', 'true', 'y', 'yes', 'on') or "
             "os.path.basename((getattr(sys, 'argv', None) or [''])[0]) in ('llamafactory-cli', 'lmf')) "
             "and __import__('kt_sft.llamafactory.startup').llamafactory.startup.on_start()\n")


class BuildPyWithHook(build_py):
    """Regular wheels: put the hook .pth at the root of build_lib, which installs to site-packages."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, HOOK_PTH)
        with open(target, "w") as f:
            f.write(HOOK_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, HOOK_PTH)]


class EditableWheelWithHook(editable_wheel):
    """Editable installs (PEP 660) ship only setuptools' own finder .pth; add ours to that wheel too."""

    def _select_strategy(self, name, tag, build_lib):
        return _StrategyWithHook(super()._select_strategy(name, tag, build_lib))


class _StrategyWithHook:
    """Wraps a setuptools editable strategy: its files, then the hook .pth."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(HOOK_PTH, HOOK_LINE.encode())


engine = Extension(
    "kt_sft._engine",
    sources=BASE_SOURCES,
    include_dirs=[pybind11.get_include(), "csrc"],
    extra_compile_args=BASE_FLAGS,
    extra_link_args=LINK_FLAGS,
    depends=HEADERS + list(ISA_UNITS),
    language="c++",
)

setup(
    name="kt-sft",
    version="0.1.0",
    description="LoRA fine-tuning of large MoE models with routed experts on a CPU engine (AMX/AVX512/AVX2)",
    packages=find_packages(include=["kt_sft", "kt_sft.*"]),
    package_data={"kt_sft.models": ["families/*.yaml"]},  # built-in rule overrides: regular installs need them
    ext_modules=[engine],
    cmdclass={"build_ext": BuildEngine, "build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook},
    python_requires=">=3.9",
    # torch is deliberately not listed: pip would pull a CUDA build onto CPU boxes. Bring your own torch >= 2.4.
    install_requires=[],
)
