#!/usr/bin/env bash
# bench_vm.sh - ublk and kernel-nbd throughput inside a guest kernel,
# relative to a loop device on the same tmpfs file in the same guest, plus
# the ublk server's io_uring_enter calls per request, and ublk zero copy
# against user copy.  Boots the guest through tests/vm/run.sh with a
# release build and fio packed; TCG makes absolute numbers small, the
# ratios within one boot are what to compare.  Zero copy and batched
# commands (against the per-tag ones) need the 7.x kernel; BENCH_SET=batch
# runs only the loop device and the batch/per-tag rows:
#
#   VM_KERNEL=$(scripts/guest-kernels.sh) bench/bench_vm.sh [MiB per sequential run, default 128] [repetitions, default 3]
set -uo pipefail
cd "$(dirname "$0")/.."
MB=${1:-128}
REPS=${2:-3}
OUT=$(mktemp /tmp/devio-bench-vm.XXXXXX)
trap 'rm -f "$OUT"' EXIT
VM_BUILD=${VM_BUILD:-$PWD/build-release-vm} VM_BUILDTYPE=release VM_ENV="BENCH_MB=$MB BENCH_REPS=$REPS BENCH_SET=${BENCH_SET:-all}" VM_EXTRA_BINS=fio \
  tests/vm/run.sh --script bench/vm_guest_bench.sh --timeout 900 >"$OUT" 2>&1
/usr/bin/python3 - "$OUT" <<'PY'
import sys
rows, sysc, order = {}, [], []
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) == 4 and f[0] == "BENCH":
        try:
            rows.setdefault(f[1], {})[f[2]] = float(f[3])
        except ValueError:
            continue
        if f[2] not in order:
            order.append(f[2])
    elif f and f[0] == "BENCH-SYSCALLS":
        sysc.append(" ".join(f[1:]))
    elif f and f[0] in ("FAIL", "BENCH") :
        print(line.rstrip())
if "loop" not in rows:
    print("no results (see tests/vm/run.sh output)"); sys.exit(1)
print("MiB/s inside the guest, best of the repetitions (ratio to the loop device on tmpfs)")
print(f"{'device':<24}" + "".join(f"{w:>22}" for w in order))
for dev, r in rows.items():
    cells = []
    for w in order:
        v, base = r.get(w), rows["loop"].get(w)
        cells.append(f"{v:9.1f} ({v / base:5.2f}x)" if v is not None and base else f"{'-':>17}")
    print(f"{dev:<24}" + "".join(f"{c:>22}" for c in cells))
print()
zc, uc = rows.get("ublk-file-zero"), rows.get("ublk-file-user")
if zc and uc:
    print("ublk zero copy against user copy and loop, same file, same boot:")
    for w in order:
        if w in zc and uc.get(w) and rows["loop"].get(w):
            print(f"  {w:<20} zero/user {zc[w] / uc[w]:5.2f}x   zero/loop {zc[w] / rows['loop'][w]:5.2f}x")
    print()
pairs = [(b, b + "-pertag") for b in ("ublk-file-zero", "ublk-ram") if b + "-pertag" in rows]
if pairs:
    print("ublk batched commands (UBLK_F_BATCH_IO) against per-tag FETCH/COMMIT_AND_FETCH, same boot:")
    for b, p in pairs:
        cells = [f"{w} {rows[b][w] / rows[p][w]:5.2f}x" for w in order if rows[b].get(w) and rows[p].get(w)]
        print(f"  {b:<16} batch/per-tag: " + ", ".join(cells))
    print()
print("ublk server system calls (io_uring_enter; user copy adds one pread/pwrite per read/write):")
for s in sysc:
    print("  " + s)
PY
