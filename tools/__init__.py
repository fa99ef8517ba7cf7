"""Tooling for the demo and the tests, kept outside the installed packages.

- ``demo.py``: ``make demo``, the SPEC §5 workflow end to end;
- ``imagebuild.py``: bootable busybox images built from the host, no download;
- ``sandbox.py``: a private network namespace, and a scratch node in it, to run the whole
  controller in (the demo, the container tests and ``make bench-vm`` start from it).

A node never needs these: ``pip install`` ships ``qvdfs`` and ``qvdctl`` only.
They run from the checkout (``python -m tools.demo``), as ``benchmarks`` does.
"""
