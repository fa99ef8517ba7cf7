#!/usr/bin/env bash
# Runs the project's Python, as the unprivileged user nobody, with the arguments given:
#   scripts/unprivileged.sh -m pytest -q tests/union
# The virtual environment's interpreter is used when nobody may run it. Where it links to
# an interpreter nobody cannot reach (a pyenv Python under /root), the system's Python of
# the same version runs instead, with the environment's packages on its path.
set -euo pipefail
cd "$(dirname "$0")/.."

# nobody can write neither the tree (so no bytecode) nor a home of its own (it has none).
as_nobody=(setpriv --reuid=nobody --regid=nogroup --clear-groups --reset-env
           /usr/bin/env HOME=/tmp PYTHONDONTWRITEBYTECODE=1)
if ! "${as_nobody[@]}" test -r "$PWD/Makefile"; then
    # A folder above the checkout is closed to others (a clone under /root): show the
    # checkout to nobody at an open path, in a mount namespace of this run alone.
    if [ -z "${QVD_UNPRIVILEGED_BOUND:-}" ]; then
        open_path=$(mktemp -d /tmp/qvd-unprivileged.XXXXXX)
        chmod 755 "$open_path"
        trap 'rmdir "$open_path"' EXIT
        unshare --mount --propagation private env QVD_UNPRIVILEGED_BOUND=1 bash -c \
            'mount --bind "$1" "$2" && cd "$2" && exec scripts/unprivileged.sh "${@:3}"' \
            bound "$PWD" "$open_path" "$@"
        exit $?
    fi
    echo "unprivileged.sh: nobody cannot read $PWD, even bound at an open path" >&2
    exit 1
fi
python=(.venv/bin/python)
if ! "${as_nobody[@]}" "${python[@]}" -c 'import ctypes' 2>/dev/null; then
    version=$(sed -n 's/^version = \([0-9]*\.[0-9]*\).*/\1/p' .venv/pyvenv.cfg)
    python=(PYTHONPATH="$PWD:$PWD/.venv/lib/python$version/site-packages"
            "/usr/bin/python$version")
fi
exec "${as_nobody[@]}" "${python[@]}" "$@"
