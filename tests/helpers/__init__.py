"""Test helpers (not tests): tiny components, run folders, distributed scripts. ``tests/`` is on ``sys.path``
through ``tests/conftest.py``, so tests import them as ``helpers.<module>``."""
