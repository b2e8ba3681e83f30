"""Build pyrl and its compiled extension ``pyrl._C``.

setuptools hands the extension to CMake (``CMakeLists.txt``, ninja generator), which finds the
*installed* PyTorch through ``torch.utils.cmake_prefix_path``. Because the extension links against
that exact torch, install torch first and build with ``pip install --no-build-isolation``.

The extension holds CPU kernels only (CUDA tensors run pyrl's Triton kernels).

Environment:
  PYRL_SKIP_EXT=1       do not build the extension (CPU tensors then use the PyTorch reference)
  PYRL_STRICT_BUILD=1   fail the install when the extension does not build (CI sets this);
                        otherwise pyrl installs without ``_C`` and falls back to PyTorch.
  MAX_JOBS=N            parallel compile jobs
"""
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    import torch
except ImportError:
    sys.exit(
        "pyrl builds its C++ extension against your installed PyTorch, but torch is not importable.\n"
        "Install torch first (CPU: `pip install torch==2.13.0`), then build without isolation:\n"
        "    pip install setuptools wheel ninja cmake pybind11\n"
        "    pip install --no-build-isolation .\n"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        if os.environ.get("PYRL_SKIP_EXT") == "1":  # e.g. GPU-only machines: CUDA tensors use Triton
            print("*** pyrl: PYRL_SKIP_EXT=1, the C++ extension pyrl._C is not built.", file=sys.stderr)
            return
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - reported and optionally re-raised
            if os.environ.get("PYRL_STRICT_BUILD") == "1":
                raise
            print(
                f"\n*** pyrl: the C++ extension pyrl._C failed to build ({exc}).\n"
                "*** pyrl is installed without it: backend='auto' falls back to PyTorch.\n"
                "*** Set PYRL_STRICT_BUILD=1 to make this an error.\n",
                file=sys.stderr,
            )

    def build_extension(self, ext):
        import pybind11

        extdir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_temp = os.path.abspath(self.build_temp)
        os.makedirs(build_temp, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}",
            f"-DPYRL_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DPYRL_TORCH_VERSION={torch.__version__}",
        ]
        if shutil.which("ninja"):
            cmake_args.append("-GNinja")
        print(f"pyrl: building pyrl._C (CPU kernels) against torch {torch.__version__}", file=sys.stderr)
        subprocess.run(["cmake", HERE, *cmake_args], cwd=build_temp, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


setup(ext_modules=[CMakeExtension("pyrl._C")], cmdclass={"build_ext": CMakeBuild})
