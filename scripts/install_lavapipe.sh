#!/usr/bin/env bash
# Install a software Vulkan driver (Mesa 25 lavapipe) for LiteRT's GPU accelerator, privately.
#
# LiteRT 2.x's GPU accelerator is WebGPU (Dawn) on Vulkan. Debian 12's own lavapipe (Mesa 22.3) is
# refused by Dawn, so we take Mesa 25 from bookworm-backports and unpack it into
# <repo>/.cache/lavapipe without touching the system's Mesa or apt configuration:
#   - apt runs on a private sources list / list dir / cache (only `apt-get download`, no install);
#   - the .debs are unpacked with `dpkg-deb -x`;
#   - an ICD json pointing at the private libvulkan_lvp.so is written next to them.
# The one system change: the Vulkan loader (libvulkan1, stock bookworm) is apt-installed when missing
# and we are root; otherwise a private copy is unpacked too (then LD_LIBRARY_PATH must be set before
# the process starts, see docs/gpu.md).
#
# Idempotent: a second run only checks and prints what is there. Use --force to redo.
# Outputs: .cache/lavapipe/env.sh (source it), .cache/lavapipe/lvp_icd.x86_64.json,
#          .cache/lavapipe/preload.txt (private libraries in load order, read by sparselite.runtime.gpu).
set -euo pipefail
trap 'echo "[install_lavapipe] failed at line $LINENO: $BASH_COMMAND" >&2' ERR

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${SPARSELITE_LAVAPIPE_DIR:-$REPO/.cache/lavapipe}"
# Mirrors come from the machine's own apt configuration (deb822 .sources or one-line sources.list),
# so this script names no host of its own; override with the two variables.
system_uri() {  # $1: a suite the URI must serve, e.g. bookworm or bookworm-security
  # Either file kind may be absent; a missing file must not end the script (set -e + pipefail).
  cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v suite="$1" '
    /^URIs:/ {uri=$2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == suite) print uri}' || true
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | grep -E "^deb[[:space:]]" |
    sed -E 's/\[[^]]*\]//' | awk -v suite="$1" '$3 == suite {print $2}' || true
}
MIRROR="${SPARSELITE_DEBIAN_MIRROR:-$(system_uri bookworm | sed -n 1p)}"
SECURITY_MIRROR="${SPARSELITE_DEBIAN_SECURITY_MIRROR:-$(system_uri bookworm-security | sed -n 1p)}"
[ -n "$MIRROR" ] || { echo "[install_lavapipe] ERROR: no bookworm apt source found; set SPARSELITE_DEBIAN_MIRROR" >&2; exit 1; }
[ -n "$SECURITY_MIRROR" ] || SECURITY_MIRROR="$MIRROR-security"
export DEBIAN_FRONTEND=noninteractive
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

say() { echo "[install_lavapipe] $*"; }
die() { echo "[install_lavapipe] ERROR: $*" >&2; exit 1; }

[[ "$(uname -m)" == "x86_64" ]] || die "only x86_64 is supported (got $(uname -m))"
command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian 12 (bookworm)"
. /etc/os-release
[[ "${VERSION_CODENAME:-}" == "bookworm" ]] || say "warning: written for Debian 12 bookworm, this is '${VERSION_CODENAME:-?}'"

ROOTFS="$DEST/root"
LIBDIR="$ROOTFS/usr/lib/x86_64-linux-gnu"
ICD="$DEST/lvp_icd.x86_64.json"
STAMP="$DEST/.installed"

# --- 1. System Vulkan loader ------------------------------------------------------------------
have_system_loader() { ldconfig -p 2>/dev/null | grep 'libvulkan\.so\.1 ' >/dev/null; }
PRIVATE_LOADER=0
if have_system_loader; then
  say "system Vulkan loader present: $(ldconfig -p | awk '/libvulkan\.so\.1 /{print $NF; exit}')"
elif [[ $EUID -eq 0 ]]; then
  say "installing the system Vulkan loader (libvulkan1) with apt-get"
  if ! apt-get install -y -qq --no-install-recommends libvulkan1 >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends libvulkan1 >/dev/null
  fi
  have_system_loader || die "libvulkan1 installed but libvulkan.so.1 is not in the linker cache"
  say "installed libvulkan1"
else
  say "no system Vulkan loader and not root: a private libvulkan1 will be unpacked (set LD_LIBRARY_PATH before starting Python)"
  PRIVATE_LOADER=1
fi

# --- 2. Already done? ---------------------------------------------------------------------------
if [[ $FORCE -eq 0 && -f "$STAMP" && -f "$ICD" && -f "$DEST/preload.txt" ]] \
   && [[ -f "$(sed -n 's/.*"library_path": *"\([^"]*\)".*/\1/p' "$ICD")" ]] \
   && { [[ $PRIVATE_LOADER -eq 0 ]] || [[ -e "$LIBDIR/libvulkan.so.1" ]]; }; then
  say "already installed in $DEST ($(cat "$STAMP")); nothing to do (--force to redo)"
  say "use: source $DEST/env.sh   (or let sparselite.runtime.gpu find it)"
  exit 0
fi

# --- 3. Private apt: bookworm + backports, own lists and cache, system dpkg status --------------
APTDIR="$DEST/apt"
mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/sources.list.d" "$APTDIR/debs"
SIGNED=""
[[ -f "$KEYRING" ]] && SIGNED="[signed-by=$KEYRING] "
cat > "$APTDIR/sources.list" <<EOF
deb ${SIGNED}${MIRROR} bookworm main
deb ${SIGNED}${MIRROR} bookworm-updates main
deb ${SIGNED}${MIRROR} bookworm-backports main
deb ${SIGNED}${SECURITY_MIRROR} bookworm-security main
EOF
APT_OPTS=(
  -o "Dir::Etc::SourceList=$APTDIR/sources.list"
  -o "Dir::Etc::SourceParts=$APTDIR/sources.list.d"
  -o "Dir::State::Lists=$APTDIR/lists"
  -o "Dir::Cache=$APTDIR/cache"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=$(id -un)"
)
if [[ -n "$(find "$APTDIR/lists" -maxdepth 1 -name '*backports*Packages*' -mmin -1440 2>/dev/null)" ]]; then
  say "private apt lists are fresh (< 1 day): skipping apt-get update"
else
  say "apt-get update (private lists in $APTDIR, bookworm-backports added there only)"
  apt-get "${APT_OPTS[@]}" update -qq
fi

# Which packages: what `apt-get install -t bookworm-backports mesa-vulkan-drivers` would install or
# upgrade on this machine, restricted to mesa-vulkan-drivers' own dependency closure (so the GL
# stack that apt would drag along is left out).
CLOSURE="$(apt-cache "${APT_OPTS[@]}" -t bookworm-backports depends --recurse --no-recommends \
  --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances mesa-vulkan-drivers \
  | grep -v '^ ' | grep -v '^<' | sort -u)"
PLAN="$(apt-get "${APT_OPTS[@]}" -s -t bookworm-backports install --no-install-recommends mesa-vulkan-drivers libvulkan1 \
  | awk '/^Inst /{v=$0; sub(/^[^(]*\(/,"",v); sub(/ .*/,"",v); print $2"="v}')"
WANT=()
while IFS= read -r pv; do
  [[ -z "$pv" ]] && continue
  pkg="${pv%%=*}"
  grep -qx "$pkg" <<<"$CLOSURE" || continue
  if [[ "$pkg" == "libvulkan1" && $PRIVATE_LOADER -eq 0 ]]; then continue; fi
  WANT+=("$pv")
done <<<"$PLAN"
printf '%s\n' "${WANT[@]}" | grep -q '^mesa-vulkan-drivers=25\.\|^mesa-vulkan-drivers=2[6-9]\.' \
  || die "bookworm-backports did not offer Mesa >= 25 mesa-vulkan-drivers (plan: ${WANT[*]:-none})"

say "downloading ${#WANT[@]} packages: ${WANT[*]}"
(cd "$APTDIR/debs" && rm -f ./*.deb && apt-get "${APT_OPTS[@]}" download -qq "${WANT[@]}")

# --- 4. Unpack ----------------------------------------------------------------------------------
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
for deb in "$APTDIR/debs"/*.deb; do
  dpkg-deb -x "$deb" "$ROOTFS"
done
say "unpacked into $ROOTFS"

LVP="$LIBDIR/libvulkan_lvp.so"
[[ -f "$LVP" ]] || die "libvulkan_lvp.so missing after unpack"
SRC_ICD="$(ls "$ROOTFS"/usr/share/vulkan/icd.d/lvp_icd*.json | head -1)"
API="$(sed -n 's/.*"api_version": *"\([^"]*\)".*/\1/p' "$SRC_ICD")"
cat > "$ICD" <<EOF
{
    "ICD": {
        "api_version": "${API:-1.3.0}",
        "library_path": "$LVP"
    },
    "file_format_version": "1.0.0"
}
EOF
say "wrote ICD $ICD (api_version ${API:-?})"

# --- 5. Check the driver's libraries resolve; write the preload order ---------------------------
LDD="$(LD_LIBRARY_PATH="$LIBDIR" ldd "$LVP")"
if grep -q 'not found' <<<"$LDD"; then
  echo "$LDD" >&2
  die "libvulkan_lvp.so has unresolved libraries (see above)"
fi
# Private libraries lvp loads, ordered so that each comes after the private ones it needs (a library's
# private closure is strictly larger than that of any private library it depends on).
: > "$DEST/preload.txt.tmp"
while read -r lib; do
  n="$(LD_LIBRARY_PATH="$LIBDIR" ldd "$lib" | grep -c "$LIBDIR" || true)"
  echo "$n $lib" >> "$DEST/preload.txt.tmp"
done < <(grep -o "$LIBDIR/[^ ]*" <<<"$LDD" | sort -u)
sort -n "$DEST/preload.txt.tmp" | awk '{print $2}' > "$DEST/preload.txt"
rm -f "$DEST/preload.txt.tmp"
say "private libraries used by lavapipe: $(xargs -n1 basename < "$DEST/preload.txt" | tr '\n' ' ')"

cat > "$DEST/env.sh" <<EOF
# Generated by scripts/install_lavapipe.sh: software Vulkan (Mesa lavapipe) for LiteRT's GPU path.
export VK_DRIVER_FILES="$ICD"
export VK_ICD_FILENAMES="$ICD"
export LD_LIBRARY_PATH="$LIBDIR\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
MESA_VER="$(printf '%s\n' "${WANT[@]}" | sed -n 's/^mesa-vulkan-drivers=//p')"
echo "mesa-vulkan-drivers $MESA_VER" > "$STAMP"
say "done: Mesa lavapipe $MESA_VER in $DEST"
say "use: source $DEST/env.sh   (sparselite.runtime.gpu also finds it by itself)"
