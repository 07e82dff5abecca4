#!/usr/bin/env bash
# torch-cgd's one entry point. It installs what it needs (Debian build packages when missing, Python packages
# into a virtual environment outside the clone), builds with CMake, then runs the command:
#
#   ./run.sh compare [args]   main job: CGD's matrix modes vs AdamW and Muon on a character GPT (GPU when there is one)
#   ./run.sh test             build, then every test: GoogleTest (C/CUDA layer), and pytest (Python layer) against
#                             a wheel of this clone installed into a fresh virtual environment
#   ./run.sh build            configure and build only
#   ./run.sh bench [args]     optimizer step-time benchmark (benchmarks/step_time.py)
#   ./run.sh suite [args]     every comparison vs AdamW and Muon, CPU or GPU scale (benchmarks/suite.py)
#   ./run.sh python [args]    the project's Python, with the cgd package importable
#   ./run.sh fetch-deps       download and unpack the Debian build packages into .deps, for an offline machine
#   ./run.sh gpu-check DEST   the one prepared GPU-host run: sm_90 build, every test with CUDA required, sanitizers,
#                             benchmarks; DEST gets summary.md and gpu-check.tar.gz (benchmarks/gpu_check.sh)
#
# Environment:
#   CGD_VENV       virtual environment (default: ~/.cache/torch-cgd/venv)
#   CGD_TEST_VENV  the fresh environment `test` installs the wheel into (default: test-venv beside CGD_VENV)
#   CGD_PYTHON     use this interpreter as it is and install nothing (a machine without network, e.g. the GPU host)
#   CGD_BUILD_DIR  CMake build directory (default: ./build)
#   CGD_CUDA       AUTO (default), ON (fail if the CUDA kernels cannot be built) or OFF
#   CGD_DEPS       a folder made by fetch-deps: use the build packages from there instead of the system
#   CGD_CMAKE_ARGS more CMake configure arguments, split on spaces (e.g. -DCMAKE_CUDA_ARCHITECTURES=90)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=${CGD_BUILD_DIR:-$ROOT/build}
VENV=${CGD_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/torch-cgd/venv}

say() { printf '[run.sh] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Debian packages the build needs beyond a compiler: an optimised LAPACK/BLAS for the CPU eigensolvers (OpenBLAS,
# its OpenMP variant: it shares torch's libgomp and runs single-threaded inside the kernels' own parallel regions),
# GoogleTest for the C tests.
DEPS_PACKAGES=(libopenblas0-openmp libopenblas-openmp-dev libgfortran5 libgtest-dev)

# On a machine without network (the GPU host) the packages travel unpacked: `./run.sh fetch-deps` here, then
# carry .deps and run with CGD_DEPS=.deps. This puts them on the compiler's and the loader's paths.
use_carried_deps() {
    [ -n "${CGD_DEPS:-}" ] || return 0
    DEPS=$(cd "$CGD_DEPS" && pwd)
    CMAKE_DEPS_ARGS=(-DCMAKE_PREFIX_PATH="$DEPS/root/usr" -DCMAKE_LIBRARY_PATH="$DEPS/lib")
    export LD_LIBRARY_PATH="$DEPS/lib:$DEPS/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

fetch_deps() {
    local dir=$ROOT/.deps
    rm -rf "$dir" && mkdir -p "$dir/debs" "$dir/root" "$dir/lib"
    (cd "$dir/debs" && apt-get download "${DEPS_PACKAGES[@]}")
    for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$dir/root"; done
    # Copies, so the folder survives being carried to another path; CMake and the loader find them in lib/. The
    # linker's name is a relative link beside the soname the loader asks for (libopenblas.so.0): one 37 MB copy.
    local arch=$dir/root/usr/lib/x86_64-linux-gnu
    cp -L "$arch/openblas-openmp/libopenblas.so" "$dir/lib/libopenblas.so.0"
    ln -s libopenblas.so.0 "$dir/lib/libopenblas.so"
    cp -L "$arch/libgfortran.so.5" "$dir/lib/"
    # Keep it well under a device call's 64 MiB: the copies above replace the originals; no docs, no archives
    # but GoogleTest's.
    rm -rf "$dir/debs" "$dir/root/usr/share" "$arch/openblas-openmp" "$arch"/libgfortran.so*
    find "$dir/root" -name '*.a' ! -name 'libg*test*.a' -delete
    say "unpacked ${DEPS_PACKAGES[*]} into $dir: carry it and set CGD_DEPS=.deps"
}

ensure_system_packages() {
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v ninja >/dev/null || missing+=(ninja-build)
    command -v g++ >/dev/null || missing+=(g++)
    if [ -z "${CGD_DEPS:-}" ]; then
        [ -f /usr/include/gtest/gtest.h ] || missing+=(libgtest-dev)
        compgen -G "/usr/lib/*/openblas-openmp/libopenblas.so" >/dev/null || missing+=(libopenblas-openmp-dev)
    fi
    [ ${#missing[@]} -eq 0 ] && return
    if [ -n "${CGD_PYTHON:-}" ]; then
        die "missing build packages: ${missing[*]}; on a machine without network run './run.sh fetch-deps' where "\
"there is one, carry .deps, and set CGD_DEPS=.deps"
    fi
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

CMAKE_DEPS_ARGS=()

build() {
    use_carried_deps
    ensure_system_packages
    ensure_python
    if ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
        export CUDACXX=/usr/local/cuda/bin/nvcc
    fi
    local extra=()
    read -r -a extra <<<"${CGD_CMAKE_ARGS:-}"
    mkdir -p "$BUILD"
    # Torch's CMake package warns about things that do not concern us (kineto, arch lists): keep the log, show
    # it only when configuring fails.
    if ! cmake -S "$ROOT" -B "$BUILD" -G Ninja -DPython3_EXECUTABLE="$PY" -DCGD_CUDA="${CGD_CUDA:-AUTO}" \
            "${CMAKE_DEPS_ARGS[@]}" "${extra[@]}" >"$BUILD/configure.log" 2>&1; then
        cat "$BUILD/configure.log" >&2
        die "CMake configuration failed (log: $BUILD/configure.log)"
    fi
    grep '^-- torch-cgd:' "$BUILD/configure.log" >&2 || true
    cmake --build "$BUILD" --parallel
}

# The package from the sources, with the operator library from the build folder (python/cgd/_ops.py).
run_python() {
    PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" CGD_LIBRARY_DIR=$BUILD "$PY" "$@"
}

# The Python suite runs against the package as a user gets it: a wheel built from this clone with pip, installed
# into a fresh virtual environment outside the clone. That environment sees the project environment's packages
# (torch, pytest, ...) through a .pth file rather than a second multi-GB copy of torch.
test_installed() {
    local wheels=$BUILD/wheels tvenv=${CGD_TEST_VENV:-$(dirname "$VENV")/test-venv} site tsite
    rm -rf "$wheels"
    say "building the wheel (pip wheel --no-build-isolation)"
    CMAKE_ARGS="-DCGD_CUDA=${CGD_CUDA:-AUTO} ${CMAKE_DEPS_ARGS[*]} ${CGD_CMAKE_ARGS:-}" \
        "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$wheels" "$ROOT"
    "$PY" -m venv --clear "$tvenv"
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    tsite=$("$tvenv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$site" >"$tsite/torch_cgd_project_env.pth"
    "$tvenv/bin/python" -m pip install -q --no-deps --no-index "$wheels"/torch_cgd-*.whl
    (cd "$tvenv" && "$tvenv/bin/python" -c "import cgd, sys; assert cgd.__file__.startswith(sys.prefix), cgd.__file__; \
print('[run.sh] testing cgd', cgd.__version__, 'installed at', cgd.__file__)")
    (cd "$tvenv" && "$tvenv/bin/python" -m pytest "$ROOT/tests/python" -q -p no:cacheprovider "$@")
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    compare) build && run_python "$ROOT/benchmarks/compare.py" "$@" ;;
    test)
        build
        ctest --test-dir "$BUILD" --output-on-failure
        test_installed "$@"
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
    fetch-deps) fetch_deps ;;
    gpu-check)
        [ $# -eq 1 ] || die "usage: ./run.sh gpu-check DEST"
        use_carried_deps
        [ -z "${DEPS:-}" ] || export CGD_DEPS=$DEPS  # absolute: the check's own build runs this script again
        # An interpreter that cannot import torch is one more failure for the check's summary to report, not a
        # reason to bring nothing back from the host.
        PY=${CGD_PYTHON:-}
        if [ -z "$PY" ] || "$PY" -c "import torch" 2>/dev/null; then ensure_python; fi
        CGD_CHECK_PYTHON=$PY exec bash "$ROOT/benchmarks/gpu_check.sh" "$1"
        ;;
    *) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; [ -z "$cmd" ] || exit 2 ;;
esac
