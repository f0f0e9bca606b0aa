#!/usr/bin/env bash
# Prepares the Debian root file systems that hold the modern Nix versions the
# tests run against: Debian trixie's nix-bin (2.26) and sid's (2.34). Debian
# 12's own glibc is too old for them, so they run chrooted in these roots
# (the test harness binds each host's /nix, /etc/nix, /proc, /dev and /tmp
# into the root). The roots are kept in a cache directory: a second run
# reuses them.
#
# Usage: nix-roots.sh [SUITE...]   (default: trixie sid)
# Environment: NIXMESH_NIX_ROOTS (cache dir, default /var/cache/nixmesh-test/roots),
#              NIXMESH_DEBIAN_MIRROR (default: debootstrap's own).
set -euo pipefail

cache=${NIXMESH_NIX_ROOTS:-/var/cache/nixmesh-test/roots}
suites=("$@")
((${#suites[@]})) || suites=(trixie sid)
mirror=(${NIXMESH_DEBIAN_MIRROR:+"$NIXMESH_DEBIAN_MIRROR"})
mkdir -p "$cache"

command -v debootstrap >/dev/null || {
    echo "nix-roots: debootstrap is missing (apt-get install debootstrap)" >&2
    exit 1
}

build_root() {
    local suite=$1 dir=$2 work=$2.partial
    # A partial root from an interrupted run: start again. Its /proc and
    # /dev may still be mounted if that run was killed mid-way.
    if [ -e "$work" ]; then
        umount -R "$work/proc" "$work/dev" 2>/dev/null || true
        rm -rf --one-file-system "$work"
    fi
    echo "== nix-roots: debootstrap $suite (a few minutes, once)"
    debootstrap --variant=minbase "$suite" "$work" "${mirror[@]}" >"$cache/$suite.log" 2>&1 || {
        tail -n 30 "$cache/$suite.log" >&2
        echo "nix-roots: debootstrap of $suite failed (log: $cache/$suite.log)" >&2
        return 1
    }
    mount -t proc proc "$work/proc"
    mount --rbind /dev "$work/dev"
    local rc=0
    # The archive's Release files may be past their Valid-Until in a snapshot.
    chroot "$work" sh -c 'export DEBIAN_FRONTEND=noninteractive
        apt-get -q -o Acquire::Check-Valid-Until=false update &&
        apt-get install -y -q --no-install-recommends nix-bin &&
        apt-get clean' >>"$cache/$suite.log" 2>&1 || rc=$?
    # Nix reads /proc/self/exe even for --version.
    ((rc)) || chroot "$work" nix --version >"$work/.nix-version" 2>>"$cache/$suite.log" || rc=$?
    umount -R "$work/dev" "$work/proc" || umount -lR "$work/dev" "$work/proc" || true
    if ((rc)); then
        tail -n 30 "$cache/$suite.log" >&2
        echo "nix-roots: installing nix-bin in $suite failed (log: $cache/$suite.log)" >&2
        return 1
    fi
    mv "$work" "$dir"
}

# What the tests need in a root beyond nix-bin; idempotent, so roots cached
# by an older version of this script are brought up to date.
LAYOUT=2
finish_root() {
    local dir=$1
    # Mount points the tests bind over.
    mkdir -p "$dir/nix" "$dir/etc/nix" "$dir/tmp"
    # Sandboxed builds in a chroot store (tests/) need build users: without
    # them Nix wants a user namespace, which the kernel refuses to a
    # chrooted process. These users exist only in the root's /etc/passwd.
    if ! chroot "$dir" getent group nixbld >/dev/null; then
        chroot "$dir" groupadd --system nixbld
        for i in $(seq 1 8); do
            chroot "$dir" useradd --system --gid nixbld --groups nixbld --no-create-home \
                --home-dir /var/empty --shell /usr/sbin/nologin "nixbld$i"
        done
    fi
    # Modern Nix refuses a build dir below a world-writable one (/tmp),
    # where the tests' chroot stores live; builds go here instead.
    mkdir -p "$dir/var/lib/nixmesh-test-builds"
    chmod 0755 "$dir/var/lib/nixmesh-test-builds"
    echo "$LAYOUT" >"$dir/.nixmesh-layout"
}

# The suites are made side by side: most of the time goes to downloads.
pids=()
for suite in "${suites[@]}"; do
    dir="$cache/$suite"
    if ! [ -x "$dir/usr/bin/nix" ] || ! [ -s "$dir/.nix-version" ]; then
        build_root "$suite" "$dir" &
        pids+=($!)
    fi
done
failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
done
((failed == 0)) || exit 1
for suite in "${suites[@]}"; do
    dir="$cache/$suite"
    [ "$(cat "$dir/.nixmesh-layout" 2>/dev/null)" = "$LAYOUT" ] || finish_root "$dir"
    echo "== nix-roots: $suite ready ($(cat "$dir/.nix-version"))"
done
