# shellcheck shell=bash
# Common helpers for sealvm's build scripts: the cache, logging, hashing and
# the project-local apt configuration used to reach Debian sid's sources.
set -euo pipefail

SEALVM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SEALVM_CACHE=${SEALVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sealvm}
export SEALVM_ROOT SEALVM_CACHE

# Pinned sources.
QEMU_SRC_PKG=qemu
QEMU_UPSTREAM_VERSION=10.2.2+ds
QEMU_ORIG_SHA256=be05230fe47a6937cd29f28f562932c8125f9c93c2a82c625198f7a4aa601dfb
LINUX_BIN_PKG=linux-source-7.2
LINUX_DEB_VERSION=7.2.13-1
LINUX_DEB_SHA256=30a8c5fc63f9028a62e6d7b3f7f43bee67425dbce2a05fceba83f9b87c92083d

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# verify_sha256 FILE EXPECTED: fail loudly on mismatch.
verify_sha256() {
    local got
    got=$(sha256_of "$1")
    [ "$got" = "$2" ] || die "sha256 mismatch for $1: expected $2, got $got"
}

# Hash of a list of files and strings, used for content-addressed keys.
# Arguments: KEY=VALUE strings and file paths prefixed with '@'.
cache_key() {
    local item
    for item in "$@"; do
        if [ "${item#@}" != "$item" ]; then
            printf 'file %s\n' "$(basename "${item#@}")"
            cat "${item#@}"
        else
            printf 'str %s\n' "$item"
        fi
    done | sha256sum | cut -c1-16
}

# The Debian archive URI this machine's apt already uses (deb822 or one-line
# format), so the project-local configuration reaches the same mirror.
debian_mirror() {
    local uri
    uri=$(apt-get indextargets --format '$(REPO_URI)' 2>/dev/null |
          grep -v -e security -e updates | grep -m1 '/debian/\?$' || true)
    if [ -z "$uri" ]; then
        uri=$(grep -h -o -E 'https?://[^ ]+/debian/?' \
              /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
              /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 || true)
    fi
    [ -n "$uri" ] || die "no Debian mirror found in this machine's apt configuration"
    printf '%s\n' "${uri%/}"
}

# Project-local apt: own sources list (sid, deb + deb-src), own lists and
# archives directories.  The system's apt configuration is never edited.
APT_DIR=$SEALVM_CACHE/apt
apt_local_setup() {
    local mirror keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    mirror=$(debian_mirror)
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/archives/partial" "$APT_DIR/sourceparts"
    cat > "$APT_DIR/sources.list" <<SRC
deb [signed-by=$keyring] $mirror sid main
deb-src [signed-by=$keyring] $mirror sid main
SRC
    cat > "$APT_DIR/apt.conf" <<CONF
Dir::Etc::SourceList "$APT_DIR/sources.list";
Dir::Etc::SourceParts "$APT_DIR/sourceparts";
Dir::State::Lists "$APT_DIR/lists";
Dir::Cache::Archives "$APT_DIR/archives";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT::Get::List-Cleanup "false";
Acquire::Languages "none";
APT::Sandbox::User "root";
Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled "false";
CONF
}

apt_local() { APT_CONFIG=$APT_DIR/apt.conf apt-get -q "$@"; }
apt_local_cache() { APT_CONFIG=$APT_DIR/apt.conf apt-cache "$@"; }

# Refresh the project-local lists once a day at most.
apt_local_update() {
    apt_local_setup
    local stamp=$APT_DIR/lists/.updated
    if [ -z "$(find "$stamp" -mmin -1440 2>/dev/null)" ]; then
        log "updating project-local apt lists (sid, deb-src) in $APT_DIR"
        apt_local update >&2 || die "apt-get update with the project-local configuration failed"
        touch "$stamp"
    fi
}

# fetch_qemu_source: download qemu_$QEMU_UPSTREAM_VERSION (orig, debian
# tarball, dsc) into $SEALVM_CACHE/dl and print that directory.  The orig
# tarball is checked against the pinned sha256; the debian tarball is
# verified by apt against the signed sid index.
fetch_qemu_source() {
    local dl=$SEALVM_CACHE/dl/qemu-$QEMU_UPSTREAM_VERSION orig
    orig=$dl/qemu_${QEMU_UPSTREAM_VERSION}.orig.tar.xz
    if [ -f "$dl/.complete" ]; then
        verify_sha256 "$orig" "$QEMU_ORIG_SHA256"
        printf '%s\n' "$dl"
        return
    fi
    apt_local_update
    local version
    version=$(apt_local_cache showsrc "$QEMU_SRC_PKG" 2>/dev/null |
              sed -n 's/^Version: //p' | grep -F ":$QEMU_UPSTREAM_VERSION-" |
              sort -V | tail -n1 || true)
    [ -n "$version" ] || die "Debian sid no longer carries source package" \
        "$QEMU_SRC_PKG $QEMU_UPSTREAM_VERSION (checked with $APT_DIR/apt.conf);" \
        "the pinned source cannot be fetched from the registry"
    mkdir -p "$dl"
    log "downloading source $QEMU_SRC_PKG=$version"
    (cd "$dl" && apt_local source --download-only "$QEMU_SRC_PKG=$version" >&2) ||
        die "apt-get source $QEMU_SRC_PKG=$version failed"
    [ -f "$orig" ] || die "the registry did not provide $(basename "$orig")"
    verify_sha256 "$orig" "$QEMU_ORIG_SHA256"
    touch "$dl/.complete"
    printf '%s\n' "$dl"
}

# fetch_linux_source: download linux-source-7.2 (a binary package holding
# the source tarball), verify the pinned sha256 and print the .deb's path.
fetch_linux_source() {
    local dl=$SEALVM_CACHE/dl deb
    deb=$dl/${LINUX_BIN_PKG}_${LINUX_DEB_VERSION}_all.deb
    if [ ! -f "$deb" ]; then
        apt_local_update
        apt_local_cache show "$LINUX_BIN_PKG=$LINUX_DEB_VERSION" >/dev/null 2>&1 ||
            die "Debian sid no longer carries $LINUX_BIN_PKG $LINUX_DEB_VERSION;" \
                "the pinned kernel source cannot be fetched from the registry"
        mkdir -p "$dl"
        log "downloading $LINUX_BIN_PKG=$LINUX_DEB_VERSION (~160 MB)"
        (cd "$dl" && apt_local download "$LINUX_BIN_PKG=$LINUX_DEB_VERSION" >&2) ||
            die "apt-get download $LINUX_BIN_PKG=$LINUX_DEB_VERSION failed"
    fi
    verify_sha256 "$deb" "$LINUX_DEB_SHA256"
    printf '%s\n' "$deb"
}
