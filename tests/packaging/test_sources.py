"""The package's sources checked without building it (``make test``; ``test_deb.py`` builds
and installs it under ``make test-deb``): the sample node.conf stays in step with what
qvdctl accepts, and the maintainer scripts parse."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from qvdctl import nodeconf
from tests.support import REPO

pytestmark = pytest.mark.timeout(60)

DEBIAN = REPO / "packaging" / "debian"


def test_the_sample_node_conf_is_accepted_with_its_examples_filled_in(tmp_path: Path) -> None:
    sample = (DEBIAN / "node.conf").read_text()
    assert nodeconf.load(DEBIAN / "node.conf").settings == {}  # all of it commented out
    # Every example line, uncommented: `#key = value` with no space after the '#'. The
    # database comes either as parts or as one URL, so the URL line is tried on its own.
    examples = re.findall(r"^#(\w[\w.-]* = .*)$", sample, re.M)
    url = [line for line in examples if line.startswith("database.url")]
    assert len(url) == 1
    parts = tmp_path / "parts.conf"
    parts.write_text("\n".join(line for line in examples if line not in url) + "\n")
    loaded = nodeconf.load(parts)
    assert loaded.settings["nodename"] == "node1"
    assert loaded.settings["path.storage.root"] == "/var/lib/qvd/storage"
    assert loaded.database_url == "postgresql+psycopg://qvd:secret@db.example.org:5432/qvd"
    alone = tmp_path / "url.conf"
    alone.write_text(url[0] + "\n")
    assert nodeconf.load(alone).database_url is not None


@pytest.mark.parametrize("script", ["qvd-node.postinst", "qvd-node.postrm"])
def test_the_maintainer_scripts_parse(script: str) -> None:
    done = subprocess.run(["sh", "-n", str(DEBIAN / script)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
