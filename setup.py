"""Builds the native kernels (jaxopt_serve/native/*.cc) against the XLA FFI headers that jaxlib ships.

Everything else about the package is in pyproject.toml. The extension is optional: without a C++
compiler the install still succeeds, with a warning, and the quantized runtime uses XLA's own
integer ops (``jaxopt_serve.native.load_error()`` says why).
"""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildNative(build_ext):
    def build_extensions(self) -> None:
        import jaxlib  # a build requirement (pyproject.toml): its include/ holds xla/ffi/api/*.h

        include = Path(jaxlib.__file__).parent / "include"
        for ext in self.extensions:
            ext.include_dirs.append(str(include))
        # The sources compile in parallel (the kernels' qgemm.cc alone takes about 7 s): one compiler run each.
        compile_one = self.compiler.compile

        def compile_all(sources, *args, **kwargs):
            with ThreadPoolExecutor(max(1, min(len(sources), os.cpu_count() or 1))) as pool:
                objects = pool.map(lambda source: compile_one([source], *args, **kwargs), sources)
                return [obj for part in objects for obj in part]

        self.compiler.compile = compile_all
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - any compiler failure leaves the XLA fallback
            print(
                f"WARNING: jaxopt_serve's native kernels were not built ({err}); quantized models will run on "
                "XLA's integer ops. Install a C++ compiler (g++ or clang++) and reinstall to get them."
            )


setup(
    ext_modules=[
        Extension(
            "jaxopt_serve.native._qgemm",
            ["jaxopt_serve/native/qgemm.cc", "jaxopt_serve/native/attention.cc"],
            depends=["jaxopt_serve/native/pool.h"],
            language="c++",
            # No contraction of a product and a sum into one FMA (attention.cc asks for it where it wants it):
            # the int8 epilogues round like XLA's separate multiply and add.
            extra_compile_args=["-O3", "-std=c++17", "-pthread", "-ffp-contract=off"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
