"""Builds the native extension thaw._native with only a C compiler (no CUDA headers)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "thaw._native",
            sources=[
                "native/module.c",
                "native/errors.c",
                "native/io.c",
                "native/readhash.c",
                "native/readdevice.c",
                "native/memcpy.c",
                "native/checksum.c",
                "native/xxh.c",
                "native/xxh_avx2.c",
                "native/residency.c",
            ],
            include_dirs=["native", "native/third_party"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-fvisibility=hidden"],
            libraries=["pthread"],
        )
    ]
)
