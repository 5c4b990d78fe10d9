"""Fuzz harnesses for mpmultifd, kept out of the installed package.

- :mod:`fuzz.harness`: captures real migration streams, mutates them and
  replays them into fresh destinations (slow, end to end); driven by
  ``tools/fuzz.py`` and ``tests/test_fuzz.py``.
- :mod:`fuzz.fast`: in-process, coverage-guided fuzzing of every decoder of
  peer or file bytes; driven by ``tools/fuzz_fast.py`` and
  ``tests/test_fastfuzz.py``.

Import them with the repository root on ``sys.path`` (``python -m pytest``
from the root does that; the tools add it themselves).
"""
