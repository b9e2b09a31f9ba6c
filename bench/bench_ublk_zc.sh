#!/usr/bin/env bash
# bench_ublk_zc.sh - ublk zero copy against the loop device and user copy
# in one guest boot (bench/vm_guest_ublk_zc.sh): interleaved rounds, and
# per workload the median MiB/s and the median of the per-round ratios;
# BENCH_BUILDS="NAME=path/to/devio ..." runs other builds' zero copy in
# the same rounds as zero-NAME (A/B); BENCH_FS=ext4 puts the file on ext4
# instead of tmpfs.  Zero copy needs the 7.x kernel:
#
#   VM_KERNEL=$(scripts/guest-kernels.sh) [BENCH_BUILDS="old=../old/devio"] [BENCH_FS=ext4] bench/bench_ublk_zc.sh [MiB, default 64] [rounds, default 5]
set -uo pipefail
cd "$(dirname "$0")/.."
MB=${1:-64}
ROUNDS=${2:-5}
TMP=$(mktemp -d /tmp/devio-bench-zc.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
EXTRA=
command -v fio >/dev/null && EXTRA=fio
mkdir -p "$TMP/bin"
for nb in ${BENCH_BUILDS:-}; do # NAME=PATH: packed as /usr/bin/devio-NAME
  cp "${nb#*=}" "$TMP/bin/devio-${nb%%=*}" || exit 1
  EXTRA="$EXTRA devio-${nb%%=*}"
done
PATH=$TMP/bin:$PATH VM_BUILD=${VM_BUILD:-$PWD/build-release-vm} VM_BUILDTYPE=release \
  VM_ENV="BENCH_MB=$MB BENCH_REPS=$ROUNDS BENCH_FS=${BENCH_FS:-tmpfs}" VM_EXTRA_BINS=$EXTRA \
  VM_LOG=$TMP/serial.log tests/vm/run.sh --script bench/vm_guest_ublk_zc.sh --timeout 1800 >"$TMP/out" 2>&1
grep -E '^(FAIL|INFO)' "$TMP/out"
tr -d '\r' <"$TMP/serial.log" >"$TMP/lines" 2>/dev/null # the guest's RUN/CTXT/DIAG lines
/usr/bin/python3 - "$TMP/lines" <<'PY'
import sys, statistics as st
runs, ctxt, diag = {}, {}, []
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) == 5 and f[0] in ("RUN", "CTXT"):
        try:
            (runs if f[0] == "RUN" else ctxt).setdefault((f[2], f[3]), {})[int(f[1])] = float(f[4])
        except ValueError:
            pass
    elif f and f[0] == "DIAG":
        print(line.rstrip())
if not runs:
    print("no results"); print(open(sys.argv[1]).read()[-3000:]); sys.exit(1)
devs = list(dict.fromkeys(d for d, _ in runs))
wls = list(dict.fromkeys(w for _, w in runs))
print("\nMiB/s, median of the rounds [min-max]; guest context switches (median) per MiB (dd) or per run (fio)")
for w in wls:
    print(f"  {w}")
    for d in devs:
        v = runs.get((d, w))
        if v:
            c = ctxt.get((d, w), {})
            print(f"    {d:<10} {st.median(v.values()):8.1f} [{min(v.values()):.1f}-{max(v.values()):.1f}]"
                  f"  ctxt {st.median(c.values()) if c else 0:.0f}")
def ratio(a, b, w):
    x, y = runs.get((a, w), {}), runs.get((b, w), {})
    rs = [x[r] / y[r] for r in x if r in y and y[r] > 0]
    return f"{st.median(rs):5.2f}x" if rs else "   - "
others = [d for d in devs if d.startswith("zero-") and d != "zero-512k"]
pairs = [("zero", "loop"), ("zero", "user"), ("zero-512k", "loop")] + [(o, "loop") for o in others] + \
        [("zero", o) for o in others] + [("user", "loop")]
pairs = [(a, b) for a, b in pairs if a in devs and b in devs]
print("\nmedian of the per-round ratios")
print(f"  {'workload':<20}" + "".join(f"{a + '/' + b:>18}" for a, b in pairs))
for w in wls:
    print(f"  {w:<20}" + "".join(f"{ratio(a, b, w):>18}" for a, b in pairs))
PY
