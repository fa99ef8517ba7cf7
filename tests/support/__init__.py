"""What the tests share: mounts, the CLI on a throwaway root, consoles, branch trees, fixtures.

``tests/conftest.py`` turns these into pytest fixtures; test modules import the rest.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
