#!/usr/bin/env bash
# torch-cgd's one entry point. It installs what it needs (Debian build packages when missing, Python packages
# into a virtual environment outside the clone), builds with CMake, then runs the command:
#
#   ./run.sh compare [args]   short training comparison: CGD vs Adam vs AdamW (on the GPU when there is one)
#   ./run.sh test             build, then every test: GoogleTest (C/CUDA layer) and pytest (Python layer)
#   ./run.sh build            configure and build only
#   ./run.sh bench [args]     optimizer step-time benchmark (benchmarks/step_time.py)
#   ./run.sh suite [args]     every comparison vs AdamW and Muon, CPU or GPU scale (benchmarks/suite.py)
#   ./run.sh python [args]    the project's Python, with the cgd package importable
#
# Environment:
#   CGD_VENV       virtual environment (default: ~/.cache/torch-cgd/venv)
#   CGD_PYTHON     use this interpreter as it is and install nothing (a machine without network, e.g. the GPU host)
#   CGD_BUILD_DIR  CMake build directory (default: ./build)
#   CGD_CUDA       AUTO (default), ON (fail if the CUDA kernels cannot be built) or OFF
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=${CGD_BUILD_DIR:-$ROOT/build}
VENV=${CGD_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/torch-cgd/venv}

say() { printf '[run.sh] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

ensure_system_packages() {
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v ninja >/dev/null || missing+=(ninja-build)
    command -v g++ >/dev/null || missing+=(g++)
    [ -f /usr/include/gtest/gtest.h ] || missing+=(libgtest-dev)
    compgen -G "/usr/lib/*/liblapack.so" >/dev/null || [ -f /usr/lib/liblapack.so ] || missing+=(liblapack-dev)
    [ ${#missing[@]} -eq 0 ] && return
    if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        die "missing build packages: ${missing[*]} (install them, e.g. sudo apt-get install ${missing[*]})"
    fi
}

# Sets PY to an interpreter that has the pinned requirements.
ensure_python() {
    if [ -n "${CGD_PYTHON:-}" ]; then
        PY=$CGD_PYTHON
        "$PY" -c "import torch" 2>/dev/null || die "CGD_PYTHON=$PY cannot import torch"
        return
    fi
    local want have=""
    want=$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)
    [ -f "$VENV/.requirements.sha256" ] && have=$(cat "$VENV/.requirements.sha256")
    if [ ! -x "$VENV/bin/python" ] || [ "$want" != "$have" ]; then
        say "preparing the virtual environment $VENV (first run: a few minutes)"
        python3 -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
        echo "$want" >"$VENV/.requirements.sha256"
    fi
    PY=$VENV/bin/python
}

build() {
    ensure_system_packages
    ensure_python
    if ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
        export CUDACXX=/usr/local/cuda/bin/nvcc
    fi
    mkdir -p "$BUILD"
    # Torch's CMake package warns about things that do not concern us (kineto, arch lists): keep the log, show
    # it only when configuring fails.
    if ! cmake -S "$ROOT" -B "$BUILD" -G Ninja -DPython3_EXECUTABLE="$PY" -DCGD_CUDA="${CGD_CUDA:-AUTO}" \
            >"$BUILD/configure.log" 2>&1; then
        cat "$BUILD/configure.log" >&2
        die "CMake configuration failed (log: $BUILD/configure.log)"
    fi
    grep '^-- torch-cgd:' "$BUILD/configure.log" >&2 || true
    cmake --build "$BUILD" --parallel
}

run_python() {
    PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$@"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    compare) build && run_python "$ROOT/benchmarks/compare.py" "$@" ;;
    test)
        build
        ctest --test-dir "$BUILD" --output-on-failure
        run_python -m pytest "$ROOT/tests/python" -q "$@"
        ;;
    build) build ;;
    bench) build && run_python "$ROOT/benchmarks/step_time.py" "$@" ;;
    suite)
        build
        # The text corpus lives next to the clone (../shared/data); pass --data to use another copy.
        data=()
        [ -f "$ROOT/../shared/data/tinyshakespeare.txt" ] && data=(--data "$ROOT/../shared/data/tinyshakespeare.txt")
        run_python "$ROOT/benchmarks/suite.py" "${data[@]}" "$@" ;;
    python) build >/dev/null && run_python "$@" ;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; [ -z "$cmd" ] || exit 2 ;;
esac
