"""The import graph of the project's packages has no circle (see tools/imports.py)."""

from __future__ import annotations

import pytest

from tools import imports

pytestmark = pytest.mark.timeout(30)


def test_no_package_imports_itself_through_a_circle() -> None:
    edges = imports.graph()
    assert edges["qvdfs.union.tree"], "the graph is read from the sources"
    assert imports.circle(edges) is None


def test_a_circle_is_found_when_there_is_one() -> None:
    found = imports.circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert found is not None and set(found) == {"a", "b", "c"}


def test_qvdfs_and_qvdctl_never_import_each_other_and_sit_above_the_shared_packages() -> None:
    edges = imports.graph()
    for module, imported in edges.items():
        top = module.split(".")[0]
        above = {"qvdfs": {"qvdctl"}, "qvdctl": {"qvdfs"},
                 "qvdproc": {"qvdfs", "qvdctl", "qvdformat"},
                 "qvdformat": {"qvdfs", "qvdctl", "qvdproc"}}[top]
        assert not {name.split(".")[0] for name in imported} & above, module
