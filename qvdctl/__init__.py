"""qvdctl: the node side of QVD's LXC path, driven by an admin's command line.

Where things are:

- ``cli.py``: the ``qvdctl`` entry point, argument grammar, one-line errors;
  ``commands/``: one module per object (config, osf, di, user, vm, host);
  ``output.py`` / ``progress.py``: tables, JSON, progress bars on a terminal.
- ``db/``: the node's state (SQLAlchemy Core): ``schema.py`` tables,
  ``migrations.py`` versions, ``engine.py`` SQLite set-up, ``store.py`` queries.
- ``settings.py``: the known settings, defaults and validation; ``node.py``
  ties database, settings and storage root together.
- ``storage.py``: the folder layout and names; ``images/``: importing tarballs
  (``importer.py``) and extracting them once, safely (``extract.py``).
- ``mounting.py``: mounting a VM root with qvdfs, unionfs-fuse or overlayfs;
  ``vm/``: a VM's states and their one transition table (``state.py``), its start,
  stop and health check, several at once (``parallel.py``).
- ``container/`` and ``network/``: LXC containers and their network.
"""
