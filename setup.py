"""Builds the compiled steady-state lane (``dbgov_sidecar._lane``); everything else is in
pyproject.toml. The lane is optional: without a C compiler the install still succeeds and the
proxy runs every statement through the Python session (slower, the same behaviour)."""

import warnings

from setuptools import Extension, setup

# setuptools notes on every editable install that folders named like a package could shadow it;
# none here are (the packages live under sidecar/ and operator/), and a user cannot act on it.
warnings.filterwarnings("ignore", message="Editable installation")

try:
    from Cython.Build import cythonize
except ImportError:  # building without Cython: the pure-Python proxy
    extensions = []
else:
    extensions = cythonize(
        [
            Extension(
                "dbgov_sidecar._lane",
                ["sidecar/dbgov_sidecar/_lane.pyx"],
                libraries=["crypto"],  # OpenSSL's SHA-256 for the audit hash chain (as hashlib's)
                define_macros=[("OPENSSL_SUPPRESS_DEPRECATED", "1")],
                optional=True,
            )
        ],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=extensions)
