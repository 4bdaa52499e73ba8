#!/usr/bin/env bash
# Idempotent set-up of a fresh machine of this kind (Debian 12, root): apt packages, kernel
# headers for bcc, tracefs, the virtualenv at .venv and an editable build of vfmig.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "bootstrap: $*" >&2; }

APT_PKGS=(python3-bpfcc linux-headers-amd64 qemu-system-x86 systemtap-sdt-dev linux-perf trace-cmd
          gcc binutils make iproute2 util-linux clang libclang-rt-14-dev libzstd-dev pkg-config)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        say "missing packages ${missing[*]}; run as root to install them"; exit 1
    fi
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# bcc compiles against kernel headers. None match this kernel, but Debian's linux-headers-amd64
# work for tracepoints and USDT (checked, see docs/host-facts.md).
kdir=/lib/modules/$(uname -r)
if [ "$(id -u)" = 0 ] && [ ! -e "$kdir/build" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1 || true)
    if [ -n "$hdr" ]; then
        mkdir -p "$kdir"
        ln -sfn "$hdr" "$kdir/build"
        [ -n "$common" ] && ln -sfn "$common" "$kdir/source"
        say "linked $kdir/build -> $hdr"
    fi
fi
# Shared-memory THP on request only ("advise"): vfmig asks for huge pages on guest RAM, which
# makes populating a destination's RAM ~10x cheaper; nothing that does not ask is affected.
thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
if [ "$(id -u)" = 0 ] && [ -w "$thp" ] && grep -q '\[never\]' "$thp"; then
    echo advise > "$thp" && say "shmem THP: never -> advise"
fi
if [ "$(id -u)" = 0 ] && [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PATH="$(pwd)/.venv/bin:$PATH"
req_stamp=.venv/.vfmig-deps
deps="meson-python>=0.15 meson>=1.2 ninja cython>=3.0 pytest pytest-timeout ruff mypy pyroute2"
if [ ! -f "$req_stamp" ] || [ "$(cat "$req_stamp")" != "$deps" ]; then
    say "installing Python build and test dependencies"
    $VPY -m pip install -q --disable-pip-version-check $deps
    echo "$deps" > "$req_stamp"
fi

# Debian's bcc is pure Python over libbcc: expose just that package to the venv.
site=$($VPY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ]; then
    mkdir -p .venv/bcc-only
    ln -sfn /usr/lib/python3/dist-packages/bcc .venv/bcc-only/bcc
    echo "$(pwd)/.venv/bcc-only" > "$site/vfmig-bcc.pth"
fi

# Absolute tool paths, so the import-time rebuild works without the venv on PATH.
native=.venv/meson-native.ini
printf "[binaries]\ncython = '%s'\n" "$(pwd)/.venv/bin/cython" > "$native.new"
cmp -s "$native.new" "$native" && rm "$native.new" || mv "$native.new" "$native"

# Editable install: meson-python rebuilds changed C/Cython on import.
if [ ! -f build/.vfmig-editable ] || ! $VPY -c 'import vfmig._core' 2>/dev/null; then
    say "building vfmig (editable)"
    rm -rf build
    $VPY -m pip install -q --disable-pip-version-check --no-build-isolation -Cbuild-dir=build \
        -Csetup-args=--native-file="$(pwd)/$native" -e .
    touch build/.vfmig-editable
fi
say "ready"
