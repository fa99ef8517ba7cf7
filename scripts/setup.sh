#!/usr/bin/env bash
# Installs everything qvdfs and qvdctl need on a Debian machine, idempotently:
# the Debian packages (FUSE, LXC, the stock union filesystems we compare against)
# and a virtual environment at .venv holding the project and its Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    fuse3 libfuse3-dev pkg-config          # pyfuse3 builds against libfuse3
    python3-dev gcc libc6-dev               # libc6-dev: tests build a static probe too
    libcap2-bin                            # setcap: tests give a file capability
    lxc lxc-dev                            # liblxc, and headers for python-lxc
    libarchive13                           # python-libarchive-c loads it
    unionfs-fuse fuse-overlayfs            # the programs we replace and compare with
    busybox-static                         # the userland of the demo and test images
    mmdebstrap                             # builds the cached Debian image (tools/debian_image.py)
    attr acl fio iproute2 bridge-utils kmod
    postgresql                             # a fleet's shared database; tests start their own
    nftables                               # make chaos cuts a node off from its database
    chromium chromium-driver               # the web admin's tests drive a real headless browser
    dh-virtualenv debhelper dpkg-dev lintian help2man   # make deb: the package, its check, man pages
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The package starts a default cluster on port 5432; nothing here uses it (tests run
    # their own servers on Unix sockets in temporary folders), so it does not stay up.
    if [[ " ${missing[*]} " == *" postgresql "* ]] && command -v pg_lsclusters >/dev/null; then
        pg_lsclusters -h 2>/dev/null | while read -r version cluster _ status _; do
            [ "$status" = online ] && pg_ctlcluster "$version" "$cluster" stop || true
        done
        command -v systemctl >/dev/null && systemctl disable --now postgresql >/dev/null 2>&1 || true
    fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last successful install.
stamp=.venv/.qvd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing the project into .venv"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test,bench]'
    touch "$stamp"
fi
