#!/usr/bin/env bash
# test.sh - the project's one test command (README, .ci/run): installs what
# it needs, builds with ASan+UBSan and warnings as errors, runs the unit
# tests, the integration tests against real peers, every fuzz target for a
# bounded time and the guest-kernel scenarios (6.12 and 7.x), then prints one closing line
# "N passed, N failed".  Needs root (FUSE, loop devices, mounts).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
PASS=0
FAIL=0
FAILED=()

count() { # count NAME STATUS
  if [ "$2" = pass ]; then PASS=$((PASS + 1)); else FAIL=$((FAIL + 1)); FAILED+=("$1"); fi
}

bash scripts/deps.sh || { echo "deps: installing packages failed"; echo "0 passed, 1 failed"; exit 1; }

echo "== build (ASan+UBSan, -Werror)"
if [ ! -f build-test/build.ninja ]; then
  meson setup build-test -Db_sanitize=address,undefined -Db_lundef=false -Dwerror=true -Dtests=enabled >/dev/null
fi
if ! ninja -C build-test; then
  count build fail
  echo "$PASS passed, $FAIL failed"
  exit 1
fi
count build pass
export DEVIO="$ROOT/build-test/devio"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

echo "== unit tests"
meson test -C build-test --suite unit --print-errorlogs >/dev/null 2>&1
while read -r name status; do
  count "unit:$name" "$status"
done < <(/usr/bin/python3 - "$ROOT/build-test/meson-logs/testlog.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    t = json.loads(line)
    print(t["name"], "pass" if t["result"] == "OK" else "fail")
PY
)

echo "== integration tests (pytest)"
/usr/bin/python3 -m pytest tests/integration -q -p no:cacheprovider \
  --junitxml="$ROOT/build-test/pytest.xml" ${PYTEST_ARGS:-}
while read -r name status; do
  count "$name" "$status"
done < <(/usr/bin/python3 - "$ROOT/build-test/pytest.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print("pytest-did-not-run fail"); sys.exit()
for tc in root.iter("testcase"):
    kinds = {c.tag for c in tc}
    if "skipped" in kinds:
        continue
    status = "fail" if kinds & {"failure", "error"} else "pass"
    print(f'{tc.get("classname")}.{tc.get("name")}'.replace(" ", "_"), status)
PY
)

echo "== fuzz targets (${FUZZ_SECONDS}s each)"
if [ ! -f build-fuzz/build.ninja ]; then
  CC=clang meson setup build-fuzz -Dfuzz=true -Dtests=disabled -Db_sanitize=address,undefined -Db_lundef=false >/dev/null
fi
if ninja -C build-fuzz >/dev/null; then
  for f in build-fuzz/fuzz/fuzz_*; do
    [ -f "$f" ] && [ -x "$f" ] || continue
    name=$(basename "$f")
    corpus="fuzz/corpus/${name#fuzz_}"
    mkdir -p "build-fuzz/corpus-$name"
    if "$f" -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=0 -artifact_prefix="build-fuzz/$name-" \
        "build-fuzz/corpus-$name" $( [ -d "$corpus" ] && echo "$corpus" ) >"build-fuzz/$name.log" 2>&1; then
      echo "$name: ok"; count "fuzz:$name" pass
    else
      echo "$name: FAILED (build-fuzz/$name.log)"; tail -40 "build-fuzz/$name.log"; count "fuzz:$name" fail
    fi
  done
else
  count fuzz-build fail
fi

# run_vm LABEL KERNEL: the guest scenarios on one kernel, counted as LABEL:name.
run_vm() {
  local label=$1 kernel=$2 log=build-test/vm-$1.log serial=$ROOT/build-test/vm-$1-serial.log
  echo "== guest-kernel scenarios on $label ($kernel)"
  while read -r status name; do
    case "$status" in
      PASS) count "$label:$name" pass ;;
      FAIL) count "$label:$name" fail ;;
    esac
  done < <(VM_KERNEL="$kernel" DEVIO_BUILD="$ROOT/build-test" VM_LOG="$serial" tests/vm/run.sh --timeout 900 2>&1 \
             | tee "$log" | grep -E '^(PASS|FAIL) ')
  if grep -q '^FAIL' "$log"; then
    echo "-- guest serial console ($serial), last 80 lines:"
    tail -n 80 "$serial"
  fi
}

if [ -x tests/vm/run.sh ]; then
  # Debian 12's 6.12 (scripts/deps.sh) and the newest 7.x from
  # trixie-backports, fetched into a cache (scripts/guest-kernels.sh).
  k612=$(ls /boot/vmlinuz-6.12.*-amd64 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$k612" ]; then run_vm vm-6.12 "$k612"; else count "vm-6.12:kernel-missing" fail; fi
  if k7=$(bash scripts/guest-kernels.sh 2>build-test/guest-kernels.log) && [ -n "$k7" ]; then
    run_vm vm-7.x "$k7"
  else
    echo "guest-kernels: no 7.x kernel (build-test/guest-kernels.log):"; tail -5 build-test/guest-kernels.log
    count "vm-7.x:kernel-missing" fail
  fi
fi

if [ $FAIL -gt 0 ]; then
  echo "failed: ${FAILED[*]}"
fi
echo "$PASS passed, $FAIL failed"
[ $FAIL -eq 0 ]
