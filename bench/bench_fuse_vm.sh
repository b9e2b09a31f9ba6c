#!/usr/bin/env bash
# bench_fuse_vm.sh - FUSE over io_uring against the /dev/fuse threads, both
# through the loop device, in one boot of the 7.x guest kernel (the build
# machine's kernel may lack the ring or have it switched off): fio 4 KiB
# random at queue depth 32 and 1 MiB sequential, the transports
# alternating (bench/vm_guest_fuse_bench.sh).  Prints each figure, the
# ring/threads ratio per repetition and their median, the server's CPU
# time per I/O, and how busy the guest's CPUs were (a guest that is not
# CPU-bound waits on a chain of hand-offs, not on the server's CPU).
# Aims (issue 13): >= 1.5x at 4 KiB QD32, >= 1.0x at 1 MiB.
#
#   bench/bench_fuse_vm.sh [repetitions, default 2] [seconds per job, default 5]
# Env: VM_BUILD (default build-release-vm), VM_KERNEL (default the 7.x
# kernel of scripts/guest-kernels.sh), BENCH_ARGS (more `devio serve`
# options in the guest, e.g. "--depth 32"), BENCH_VARIANTS (default
# "uring,dev"; more variants such as uring-deep, each with its options
# and environment in BENCH_VAR_deep="--depth,32"; every variant's
# ratio is printed against dev, all in the same boot).
set -uo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-2}
SECS=${2:-5}
OUT=$(mktemp /tmp/devio-bench-fuse-vm.XXXXXX)
trap 'rm -f "$OUT"' EXIT
KERNEL=${VM_KERNEL:-$(scripts/guest-kernels.sh)} || { echo "no 7.x guest kernel" >&2; exit 1; }
VM_KERNEL=$KERNEL VM_BUILD=${VM_BUILD:-$PWD/build-release-vm} VM_BUILDTYPE=release VM_EXTRA_BINS=fio \
  VM_MEM=${VM_MEM:-1536M} VM_ENV="BENCH_REPS=$REPS BENCH_SECS=$SECS ${BENCH_ARGS:+BENCH_ARGS=${BENCH_ARGS// /,}}
    ${BENCH_VARIANTS:+BENCH_VARIANTS=$BENCH_VARIANTS} $(env | grep '^BENCH_VAR_' | tr ' ' ,)" \
  tests/vm/run.sh --script bench/vm_guest_fuse_bench.sh --timeout 1200 >"$OUT" 2>&1
/usr/bin/python3 - "$OUT" <<'PY'
import statistics, sys
res = {}  # (workload, rep) -> {variant: (value, cpu)}
order, variants = [], []
for line in open(sys.argv[1]):
    f = line.split()
    if f and f[0] in ("FAIL", "INFO") and "module" not in line:
        print(line.rstrip())
    if len(f) == 8 and f[0] == "BENCH":
        tr, w, rep, v, cpu, busy, gus = f[1], f[2], f[3], float(f[4]), f[5], f[6], f[7]
        res.setdefault((w, rep), {})[tr] = (v, cpu, busy, gus)
        if w not in order:
            order.append(w)
        if tr not in variants and tr != "dev":
            variants.append(tr)
if not res:
    print("no results (tests/vm/run.sh output follows)")
    print(open(sys.argv[1]).read())
    sys.exit(1)
aim = {"randread-4k-qd32": 1.5, "randwrite-4k-qd32": 1.5, "seqread-1M": 1.0, "seqwrite-1M": 1.0}
for tr in variants:
    print(f"== {tr} against dev (the /dev/fuse threads)")
    print(f"{'workload':<20}{'rep':>4}{tr:>12}{'threads':>12}{'ratio':>7}{'us/io':>8}{'thr':>7}"
          f"{'busy%':>6}{'thr':>5}{'guest us/io':>12}{'thr':>7}")
    for w in order:
        ratios = []
        for (ww, rep), d in sorted(res.items()):
            if ww != w or tr not in d or "dev" not in d:
                continue
            (a, ca, ba, ga), (b, cb, bb, gb) = d[tr], d["dev"]
            r = a / b if b else float("nan")
            ratios.append(r)
            print(f"{w:<20}{rep:>4}{a:>12.1f}{b:>12.1f}{r:>7.2f}{ca:>8}{cb:>7}{ba:>6}{bb:>5}{ga:>12}{gb:>7}")
        if ratios:
            m = statistics.median(ratios)
            ok = "met" if m >= aim.get(w, 1.0) else "NOT met"
            print(f"{w:<20}{'med':>4}{'':>24}{m:>8.2f}   aim >= {aim.get(w, 1.0)}x: {ok}")
print("(4 KiB: IOPS; 1 MiB: MiB/s; us/io: the server's user+system CPU per I/O; busy%: the guest's CPUs"
      " busy during the job; guest us/io: the guest's busy CPU time per I/O, the server's included)")
PY
