#!/usr/bin/env bash
# Builds the node's Debian package, dist/qvd-node_VERSION_amd64.deb (`make deb`), from the
# tracked files of this checkout: packaging/debian/ is the package's debian/ folder, the
# version is pyproject.toml's. The build runs in build/deb/, a copy holding only what the
# package needs (dpkg-buildpackage writes beside its source folder, and a checkout's .venv
# or test leftovers must not leak in). Build dependencies come from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
out=dist/qvd-node_${version}_amd64.deb
build=build/deb
source=$build/qvd-node-$version

# pip's usual cache would hand over wheels that another interpreter on this machine built
# (a pyenv's, say, with its library path baked in); this one only ever sees Debian's
# python3, which the package runs on. It outlives build/deb/: rebuilds compile nothing.
export PIP_CACHE_DIR=$PWD/build/pip-cache

rm -rf "$build"
mkdir -p "$source" dist
git ls-files -z -- pyproject.toml README.md qvdformat qvdfs qvdctl qvdproc \
    | tar --null -T - -cf - | tar -xf - -C "$source"
cp -r packaging/debian "$source/debian"
maintainer=$(sed -n 's/^Maintainer: //p' packaging/debian/control)
# Dated now, not at the last commit: dpkg-deb clamps file times to this date, and pip's
# .pyc files must keep matching their sources' times or Python rewrites them at run time.
cat > "$source/debian/changelog" <<CHANGES
qvd-node ($version) bookworm; urgency=medium

  * Built from commit $(git rev-parse --short HEAD) of qvdfs.

 -- $maintainer  $(date -R)
CHANGES

# The man pages are the programs' own --help, so they say what the programs do.
help2man --no-info --no-discard-stderr --version-string "$version" \
    --name "a union filesystem for QVD desktops, a drop-in for unionfs-fuse" \
    --output "$source/debian/qvdfs.1" .venv/bin/qvdfs
help2man --no-info --no-discard-stderr --version-string "$version" \
    --name "the QVD node controller and admin CLI" \
    --output "$source/debian/qvdctl.1" .venv/bin/qvdctl
(cd "$source" && dpkg-buildpackage -b -us -uc)
mv "$build/qvd-node_${version}_amd64.deb" "$out"
echo "built $out ($(du -h "$out" | cut -f1))"
