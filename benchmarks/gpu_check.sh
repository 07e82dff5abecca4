#!/usr/bin/env bash
# The one prepared run for a GPU host with a short time budget (one H200, 16 cores, no network), started as
#
#     CGD_DEPS=.deps CGD_PYTHON=python3 ./run.sh gpu-check DEST
#
# run.sh hands over the interpreter in CGD_CHECK_PYTHON. One run has to show everything, so no part stops the ones
# after it: each runs under its own timeout with its own log, and DEST receives only summary.md and
# gpu-check.tar.gz (every log, XML and report) because the host returns at most 8 files. The exit status is 0
# whatever failed (summary.md says what) and non-zero only when DEST cannot be written.
#
# Without a GPU (no nvidia-smi, or torch sees no device) the same command is a dry run that proves the plumbing:
# CUDA is not required, the sanitizers are skipped and the benchmarks run at tiny CPU sizes.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -eq 1 ] || { echo "usage: ./run.sh gpu-check DEST" >&2; exit 2; }
PY=${CGD_CHECK_PYTHON:-python3}
# Its own build directory, so ./build keeps its configuration.
BUILD=$ROOT/build-gpu-check
HOST_BUDGET_S=420

say() { printf '[gpu-check] %s\n' "$*" >&2; }

# Find out now, not after seven minutes, that nothing could be brought back.
if ! mkdir -p "$1" 2>/dev/null || [ ! -w "$1" ]; then say "error: cannot write to $1"; exit 1; fi
DEST=$(cd "$1" && pwd)
SCRATCH=$(mktemp -d) || { say "error: no scratch folder"; exit 1; }
WORK=$SCRATCH/gpu-check
mkdir -p "$WORK"
START=$SECONDS
# Taken once, at the start: HEAD may move while the check runs. The host gets the tree without .git, so the
# fingerprint of the sources is what identifies the code that ran there.
COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "unknown (no git repository)")
FINGERPRINT=$(cd "$ROOT" && find CMakeLists.txt run.sh capi kernels torch_ext python/cgd tests benchmarks -type f \
    \( -name '*.[ch]' -o -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.py' -o -name '*.sh' \
    -o -name '*.txt' \) ! -path '*/_lib/*' ! -path '*/results/*' | LC_ALL=C sort | xargs sha256sum | sha256sum |
    cut -c1-16)

if ! command -v nvidia-smi >/dev/null; then
    NO_GPU="nvidia-smi not found"
elif ! timeout 10 nvidia-smi -L >/dev/null 2>&1; then
    NO_GPU="nvidia-smi lists no GPU"
elif ! timeout 30 "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; then
    NO_GPU="torch.cuda.is_available() is not True"
else
    NO_GPU=""
fi
if [ -z "$NO_GPU" ]; then
    SCALE=1
    REQUIRE=(CGD_REQUIRE_CUDA=1)  # a CUDA case that skips fails instead (tests/c/test_support.h, conftest.py)
else
    SCALE=3  # this 2-core CPU machine is several times slower than the host; the host's limits are the real ones
    REQUIRE=()
fi

# Seconds per part on the host, summing to 400 of the 420 a run may take (the GPU probe and the summary take the
# rest). The estimates behind them, from this project's 2-core CPU machine: the whole sm_90 build takes ~60 s here,
# ~130 s of compiling of which the Torch shim's ~17 s is the longest file, so ~40 s with 16 cores; pytest takes
# ~65 s here and the host adds the cuda cases; a sanitizer slows the 23 CUDA cases 10-50x; each benchmark is
# sized to ~10 s of GPU time plus ~5-10 s of torch start-up, and prints its rows as it goes (a timeout keeps them).
declare -A LIMIT=([env]=10 [build]=80 [gtest]=15 [c_example]=5 [pytest]=110 [memcheck]=40 [racecheck]=40
                  [step_time]=25 [matrix_step_time]=35 [eigensolvers]=40)
PARTS=(env build gtest c_example pytest memcheck racecheck step_time matrix_step_time eigensolvers)
declare -A RESULT SECS RC NOTE

# Whatever the parts' own limits, results must be packed before the host's time is up: nothing comes back from a
# run that is killed.
DEADLINE=$((START + (HOST_BUDGET_S - 15) * SCALE))

# part NAME COMMAND...: runs COMMAND under NAME's limit, output in NAME.log (or $LOG), and records the outcome.
part() {
    local name=$1 limit=$((LIMIT[$1] * SCALE)) log=$WORK/${LOG:-$1.log} t0=$SECONDS rc=0
    shift
    [ "$limit" -le $((DEADLINE - SECONDS)) ] || limit=$((DEADLINE - SECONDS))
    if [ "$limit" -le 0 ]; then
        RESULT[$name]=TIMEOUT SECS[$name]=0 NOTE[$name]="not started: the run's time was up"
        return
    fi
    say "$name (limit ${limit}s)"
    timeout -k 2 "$limit" "$@" >"$log" 2>&1 </dev/null || rc=$?
    SECS[$name]=$((SECONDS - t0))
    RC[$name]=$rc
    case $rc in 0) RESULT[$name]=PASS ;; 124 | 137) RESULT[$name]=TIMEOUT ;; *) RESULT[$name]=FAIL ;; esac
    say "$name: ${RESULT[$name]} in ${SECS[$name]}s (exit $rc)"
}

skip() { RESULT[$1]=SKIPPED SECS[$1]=0 NOTE[$1]=$2; say "$1: skipped ($2)"; }

# shellcheck disable=SC2317  # run through `bash -c` so that it gets a timeout like every part
collect_env() {
    echo "## date -u"; date -u
    echo "## hostname"; hostname
    echo "## git commit (git rev-parse HEAD), then uncommitted changes"
    echo "$COMMIT"
    git -C "$ROOT" status --short 2>/dev/null
    echo "## source fingerprint (sha256 of the sources' sha256sum list)"
    echo "$FINGERPRINT"
    echo "## nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    echo "## nvcc --version"
    local nvcc
    nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    "$nvcc" --version 2>&1 || echo "nvcc: not available"
    echo "## compute-sanitizer --version"; "$SANITIZER" --version 2>&1 || echo "compute-sanitizer: not available"
    echo "## cmake --version"; cmake --version 2>&1 | head -1
    echo "## nproc, memory"; nproc; free -g 2>&1 | head -2
    echo "## python, torch"
    "$PY" -c 'import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "built with CUDA", torch.version.cuda)
print("torch.cuda.is_available()", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())' 2>&1
}

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
export ROOT PY SANITIZER COMMIT FINGERPRINT
export -f collect_env
LOG=env.txt part env bash -c collect_env

part build env CGD_BUILD_DIR="$BUILD" CGD_CUDA=ON CGD_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90" \
    "$ROOT/run.sh" build
cp "$BUILD/configure.log" "$WORK/configure.log" 2>/dev/null
[ "${RESULT[build]}" != PASS ] || NOTE[build]="CGD_CUDA=ON, sm_90; $(tr '\n' ' ' <"$BUILD/build_info.txt")"

# The package as built above, for pytest and the benchmarks.
export PYTHONPATH=$ROOT/python${PYTHONPATH:+:$PYTHONPATH} CGD_LIBRARY_DIR=$BUILD

part gtest env "${REQUIRE[@]}" "$BUILD/cgd_tests" --gtest_output="xml:$WORK/gtest.xml"
part c_example "$BUILD/cgd_c_example"

part pytest env "${REQUIRE[@]}" "$PY" -m pytest "$ROOT/tests/python" -q -rs -p no:cacheprovider --durations=15 \
    --junitxml="$WORK/pytest.xml"

# Only the CUDA cases: the instances of the device-parameterised suites (Devices/<Suite>.<Case>/CUDA) and the graph
# capture test; the CPU cases would only slow the sanitizer down, and HugeTensorsCuda (86 GB) would take minutes.
if [ -z "$NO_GPU" ]; then
    for tool in memcheck racecheck; do
        part $tool env CGD_REQUIRE_CUDA=1 "$SANITIZER" --tool $tool --error-exitcode 1 --print-limit 50 \
            "$BUILD/cgd_tests" --gtest_filter='*/CUDA:BlockStepCuda.*'
    done
else
    skip memcheck "dry run: no GPU"
    skip racecheck "dry run: no GPU"
fi

if [ -z "$NO_GPU" ]; then
    # 1e9 parameters is where the bandwidth figure means something; GPT-2 small's 148 tensors come by default.
    part step_time "$PY" "$ROOT/benchmarks/step_time.py" --device cuda --sizes 1e7 1e8 1e9 --steps 20 \
        --out "$WORK/step_time.md"
    # A short window: block CGD refreshes every step, and no GPU time of it exists yet to size a longer one.
    part matrix_step_time "$PY" "$ROOT/benchmarks/matrix_step_time.py" --device cuda --shapes gpt2 --window 10 --pool 4 \
        --out "$WORK/matrix_step_time.md"
    # Its one argument is the largest n (8, 16, ... up to it). 256 covers block CGD's B <= 64 and the smaller kron
    # factors; from 512 on its host-side set-up (an O(n^3) loop per matrix, 64 matrices) and syevj's 256-matrix
    # batches take tens of seconds more.
    # shellcheck disable=SC2016
    part eigensolvers bash -c '"$1" 256 >"$2"' _ "$BUILD/eigensolvers_bench" "$WORK/eigensolvers.md"
else
    part step_time "$PY" "$ROOT/benchmarks/step_time.py" --device cpu --sizes 1e5 --no-gpt2 --steps 2 \
        --out "$WORK/step_time.md"
    part matrix_step_time "$PY" "$ROOT/benchmarks/matrix_step_time.py" --device cpu --shapes char-gpt --window 2 --pool 4 \
        --only "block B=8" "kron refresh=10" --out "$WORK/matrix_step_time.md"
    skip eigensolvers "dry run: no GPU ($([ -x "$BUILD/eigensolvers_bench" ] && echo "binary built" ||
        echo "binary missing"))"
fi

# ---- summary ----

# "P passed, F failed, S skipped", then the failing tests' names, from a GoogleTest or JUnit XML report.
xml_counts() {
    [ -s "$1" ] || { echo "no XML report"; return; }
    "$SUMMARY_PY" - "$1" <<'EOF' 2>/dev/null || echo "unreadable XML report"
import sys
import xml.etree.ElementTree as ET

counts, failing = {"passed": 0, "failed": 0, "skipped": 0}, []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    name = f"{case.get('classname')}.{case.get('name')}"
    if case.find("failure") is not None or case.find("error") is not None:
        counts["failed"] += 1
        failing.append(name)
    elif case.find("skipped") is not None or case.get("result") == "skipped" or case.get("status") == "notrun":
        counts["skipped"] += 1
    else:
        counts["passed"] += 1
print(", ".join(f"{v} {k}" for k, v in counts.items()))
for name in failing:
    print(name)
EOF
}

# The Markdown table rows of a report, or those printed to its log as they were measured when it never finished.
table_of() {
    if [ -s "$WORK/$1.md" ]; then grep '^|' "$WORK/$1.md"
    elif [ -s "$WORK/$1.log" ]; then echo "(no report: rows from $1.log)"; grep '^| ' "$WORK/$1.log"
    else echo "(no report, no log)"; fi
}

SUMMARY_PY=$(command -v "$PY" || command -v python3)
FAILING=()
for suite in gtest pytest; do
    [ -s "$WORK/$suite.xml" ] || continue  # killed before writing it: the log's last line says more
    mapfile -t lines < <(xml_counts "$WORK/$suite.xml")
    NOTE[$suite]=${lines[0]}
    for name in "${lines[@]:1}"; do FAILING+=("$suite: $name"); done
done
for tool in memcheck racecheck; do
    [ -s "$WORK/$tool.log" ] || continue
    NOTE[$tool]=$(grep -ho -e 'ERROR SUMMARY: [0-9]* errors\?' -e 'RACECHECK SUMMARY: .*' \
        -e '\[  \(PASSED\|FAILED\)  \] [0-9]* tests\?' "$WORK/$tool.log" | awk '!seen[$0]++' | paste -sd ';')
done
# A part that failed without saying more gets its log's last line.
for p in "${PARTS[@]}"; do
    if [[ ${RESULT[$p]} =~ FAIL|TIMEOUT ]] && [ -z "${NOTE[$p]:-}" ]; then
        NOTE[$p]=$(grep -v '^[[:space:]]*$' "$WORK/$p.log" 2>/dev/null | tail -1 | cut -c1-80 | tr '|' '/')
    fi
done
DEVICE=$(timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)

{
    echo "# gpu-check $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname)"
    echo
    echo "Commit ${COMMIT:0:12}, sources $FINGERPRINT (env.txt lists uncommitted changes)."
    if [ -n "$NO_GPU" ]; then
        echo "**dry run: no GPU** ($NO_GPU): CGD_REQUIRE_CUDA unset, sanitizers skipped,"
        echo "benchmarks at tiny CPU sizes, limits x$SCALE."
    else
        echo "GPU: $DEVICE. CGD_REQUIRE_CUDA=1: a CUDA case that cannot run fails."
    fi
    echo "Total $((SECONDS - START)) s (the host run may take $HOST_BUDGET_S s). Logs: gpu-check.tar.gz."
    echo
    echo "| part | result | s | detail |"
    echo "|---|---|---|---|"
    for p in "${PARTS[@]}"; do
        rc=${RC[$p]:-0}
        echo "| $p | ${RESULT[$p]:-?} | ${SECS[$p]:-} | $([ "$rc" = 0 ] || echo "exit $rc; ")${NOTE[$p]:-} |"
    done
    if [ ${#FAILING[@]} -gt 0 ]; then
        echo
        echo "Failing tests (${#FAILING[@]}; the first 8):"
        printf -- '- %s\n' "${FAILING[@]:0:8}"
    fi
    echo
    echo "## step_time (first and last case; cgd.CGD, InducedMetric, AdamW)"
    grep -ho 'Device-to-device copy: [0-9.]* GB/s' "$WORK/step_time.md" "$WORK/step_time.log" 2>/dev/null | head -1
    table_of step_time | awk -F'|' '
        !/^\|/ || /^\| parameters/ || /^\|---/ { if (!shown[$0]++) print; next }
        { o = $4; gsub(/^ +| +$/, "", o)
          if (o !~ /^(cgd\.CGD|cgd\.InducedMetric rms|AdamW fused|AdamW foreach)$/ || seen_row[$0]++) next
          row[++n] = $0; which[n] = $2; if (!($2 in known)) { known[$2] = 1; cases[++k] = $2 } }
        END { for (i = 1; i <= n; i++) if (which[i] == cases[1] || which[i] == cases[k]) print row[i] }'
    echo
    echo "## matrix_step_time"
    table_of matrix_step_time | awk '!seen[$0]++' | cut -c1-116
    echo
    echo "## eigensolvers"
    if [ "${RESULT[eigensolvers]}" = SKIPPED ]; then echo "${NOTE[eigensolvers]}"; else table_of eigensolvers; fi
} >"$WORK/summary.md"

# Keeps the tarball under the host's 16 MiB per file even if a sanitizer reports without end.
find "$WORK" -type f -size +8M | while read -r big; do
    { head -c 2M "$big"; printf '\n[... cut by gpu_check.sh ...]\n'; tail -c 2M "$big"; } >"$big.cut" &&
        mv "$big.cut" "$big"
done

if tar -czf "$DEST/gpu-check.tar.gz" -C "$SCRATCH" gpu-check && cp "$WORK/summary.md" "$DEST/summary.md"; then
    cat "$WORK/summary.md"
    rm -rf "$SCRATCH"
    exit 0
fi
say "error: could not write $DEST (the work is still in $WORK)"
exit 1
