#!/usr/bin/env bash
# Fetches and unpacks a Debian source package (default: memcached) into a stable cache
# dir, with a PRIVATE apt sources list and lists dir (the system's apt files are never
# touched), and installs the package's C build dependencies that the test needs.
#
#   .ci/setup-debian-src.sh [--orig] [PACKAGE] [CACHE_DIR]
#
# --orig unpacks the upstream tarball Debian ships (`*.orig.tar.*`) without Debian's
# patches, for programs whose Debian patches change the stock build (redis: system
# jemalloc, lua, hiredis). Its tree is `<PACKAGE>-<version>-orig`.
#
# Prints the path of the unpacked source tree on its last line. Exits non-zero (with a
# message on stderr) when the registry is unreachable or the fetch fails; the caller
# decides whether that is a skip.
set -euo pipefail
orig=
if [ "${1:-}" = "--orig" ]; then
  orig=1
  shift
fi
pkg="${1:-memcached}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${2:-$root/target/debian-src}"
apt_dir="${LIVECARE_APT_DIR:-/tmp/livecare-apt}"

# Build dependencies of the packages we know, from the system's own archive.
case "$pkg" in
  memcached) deps=(libevent-dev) ;;
  lighttpd | nginx) deps=(libpcre2-dev zlib1g-dev) ;;
  *) deps=() ;;
esac

# Debian's tree is <pkg>-<version>, the upstream one <pkg>-<version>-orig.
if [ -n "$orig" ]; then
  existing="$(find "$cache" -maxdepth 1 -mindepth 1 -type d -name "$pkg-*-orig" 2>/dev/null | sort | tail -n1 || true)"
else
  existing="$(find "$cache" -maxdepth 1 -mindepth 1 -type d -name "$pkg-*" ! -name '*-orig' 2>/dev/null | sort | tail -n1 || true)"
fi

missing=()
for d in "${deps[@]}"; do
  dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "install ok installed" || missing+=("$d")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing build dependencies: ${missing[*]}" >&2
  if ! { apt-get install -y -qq "${missing[@]}" >&2 2>/dev/null ||
         { apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2; }; }; then
    echo "setup-debian-src: could not install ${missing[*]}" >&2
    exit 1
  fi
fi

if [ -n "$existing" ] && [ -f "$existing/.livecare-unpacked" ]; then
  echo "$existing"
  exit 0
fi

# The same mirror host the system uses (deb822 URIs: or one-line deb entries).
mirror="$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
  grep -o -E 'https?://[^ ]+/debian/?' | head -n1 || true)"
mirror="${LIVECARE_DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}"
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"

mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$cache"
echo "deb-src $mirror $codename main" > "$apt_dir/sources.list"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::Cache::Archives=$apt_dir/archives"
  -o "Dir::Cache::pkgcache="
  -o "Dir::Cache::srcpkgcache="
  -o "Acquire::Retries=2"
  -o "Acquire::http::Timeout=30"
)
echo "fetching $pkg source from $mirror $codename" >&2
timeout 300 apt-get "${apt_opts[@]}" update -qq >&2
work="$(mktemp -d "$cache/.fetch-XXXXXX")"
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
if [ -n "$orig" ]; then
  (cd "$work" && timeout 300 apt-get "${apt_opts[@]}" source --download-only -qq "$pkg" >&2)
  tarball="$(find "$work" -maxdepth 1 -name "${pkg}_*.orig.tar.*" ! -name '*.asc' | head -n1)"
  [ -n "$tarball" ] || { echo "setup-debian-src: no $pkg upstream tarball" >&2; exit 1; }
  version="$(basename "$tarball" | sed -E "s/^${pkg}_(.*)\.orig\.tar\..*$/\1/")"
  mkdir "$work/unpack"
  tar -xf "$tarball" -C "$work/unpack"
  top="$(find "$work/unpack" -maxdepth 1 -mindepth 1 -type d | head -n1)"
  [ -n "$top" ] || { echo "setup-debian-src: empty $pkg tarball" >&2; exit 1; }
  tree="$work/$pkg-$version-orig"
  mv "$top" "$tree"
else
  (cd "$work" && timeout 300 apt-get "${apt_opts[@]}" source -qq "$pkg" >&2)
  tree="$(find "$work" -maxdepth 1 -mindepth 1 -type d -name "$pkg-*" | head -n1)"
fi
[ -n "$tree" ] || { echo "setup-debian-src: no unpacked $pkg tree" >&2; exit 1; }
name="$(basename "$tree")"
rm -rf "${cache:?}/$name"
mv "$tree" "$cache/$name"
touch "$cache/$name/.livecare-unpacked"
echo "$cache/$name"
