"""Builds the compiled data plane (shim/_core.pyx, issue 17) with the package's normal
install (``pip install -e .`` / ``make venv``); everything else is in pyproject.toml.

The extension is optional: where no C compiler exists the install still succeeds, and the
shim runs its pure-Python data path (shim.fastpath reports the core as unavailable).
libzmq is not linked: the core resolves its functions at import time from the libzmq
that pyzmq has loaded (so it drives the same sockets), hence no zmq.h is needed.
"""

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # no Cython (an sdist built elsewhere): the pure-Python path
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("shim._core", ["shim/_core.pyx"], optional=True,
                   extra_compile_args=["-O2"], libraries=["dl"])],
        compiler_directives={"language_level": "3"}, quiet=True)

setup(ext_modules=ext_modules)
