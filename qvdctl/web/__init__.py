"""``qvdctl web``: the web admin, on the same database and the same actions as the CLI.

``accounts.py`` (admins, argon2 hashes, sessions, lock-out) has no web imports, so
``qvdctl admin add`` loads none; ``app.py`` is the Starlette application, ``pages.py``
what each page shows, ``actions.py`` what its buttons do, ``server.py`` runs it
under uvicorn. Templates and static files are in this package: nothing is fetched
at run time.
"""
