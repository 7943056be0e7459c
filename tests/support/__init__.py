"""Helpers the tests (and the scripts under benchmarks/ and examples/) share; not part of the package.

pytest puts tests/ on sys.path, so tests import `support.server`; a script
adds the repo's tests/ folder to sys.path first.
"""
