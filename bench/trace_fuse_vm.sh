#!/usr/bin/env bash
# trace_fuse_vm.sh - where a FUSE request's time goes, per transport, in
# one boot of the 7.x guest: the fuse and sched_switch tracepoints
# (enabled on the kernel command line) during fio on the loop device
# (bench/vm_guest_fuse_trace.sh), then per transport: what each CPU ran
# (share of the traced time per task), each request's time queued in the
# kernel (send -> sent) and in the server (sent -> end), which CPU issued
# and which ended it, and for the ring how long each CPU idled while its
# own queue was empty and the other queue still held requests.  A
# diagnosis, not a benchmark (tracing costs time).
#
#   bench/trace_fuse_vm.sh [read|randread|write|randwrite] [BS, default 1M] [QD, default 8] [TRACE_US, default 1000000]
# Env: VM_BUILD (default build-release-vm), VM_KERNEL (default the 7.x
# kernel of scripts/guest-kernels.sh), TRACE_TRANSPORTS ("uring dev").
set -uo pipefail
cd "$(dirname "$0")/.."
RW=${1:-read} BS=${2:-1M} QD=${3:-8} US=${4:-1000000}
WORK=$(mktemp -d /tmp/devio-trace-fuse.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
KERNEL=${VM_KERNEL:-$(scripts/guest-kernels.sh)} || { echo "no 7.x guest kernel" >&2; exit 1; }
VM_KERNEL=$KERNEL VM_BUILD=${VM_BUILD:-$PWD/build-release-vm} VM_BUILDTYPE=release VM_EXTRA_BINS=fio \
  VM_MEM=${VM_MEM:-1536M} VM_LOG=$WORK/serial.log \
  VM_CMDLINE="trace_event=sched:sched_switch,fuse:fuse_request_send,fuse:fuse_request_sent,fuse:fuse_request_end trace_buf_size=16M" \
  VM_ENV="TRACE_RW=$RW TRACE_BS=$BS TRACE_QD=$QD TRACE_US=$US ${TRACE_TRANSPORTS:+TRACE_TRANSPORTS=${TRACE_TRANSPORTS// /,}}" \
  tests/vm/run.sh --script bench/vm_guest_fuse_trace.sh --timeout 900 >"$WORK/out" 2>&1
grep -E '^(FAIL|INFO)' "$WORK/out" | grep -v ' module '
tr -d '\r' <"$WORK/serial.log" | grep '^TRACE ' >"$WORK/trace"
/usr/bin/python3 - "$WORK/trace" <<'PY'
import collections, re, sys
LINE = re.compile(r'\s*(\S+)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (\w+): (.*)')
events = collections.defaultdict(list)  # transport -> [(ts, cpu, name, rest)]
for line in open(sys.argv[1]):
    _, tr, body = line.rstrip("\n").split(" ", 2)
    m = LINE.match(body)
    if m:
        events[tr].append((float(m.group(4)), int(m.group(3)), m.group(5), m.group(6)))
if not events:
    sys.exit("no trace lines (see the INFO/FAIL lines above)")
def task(s):  # one name per task kind: devio threads by pid, the rest without numbers
    comm, pid = re.search(r'prev_comm=(.*?) prev_pid=(\d+)', s).groups()
    return f"{comm}-{pid}" if comm == "devio" else re.sub(r'\d+', 'N', comm)
for tr, ev in events.items():
    ev.sort()
    cpus = sorted({e[1] for e in ev})
    t0 = max(min(e[0] for e in ev if e[1] == c) for c in cpus)  # every CPU's buffer has begun
    ev = [e for e in ev if e[0] >= t0]
    t1 = ev[-1][0]
    span = t1 - t0
    last = {c: t0 for c in cpus}; busy = collections.Counter(); reqs = {}
    idle = {c: False for c in cpus}; inq = collections.Counter(); owner = {}; starved = collections.Counter()
    prev = t0
    for ts, cpu, name, rest in ev:
        for c in cpus:  # idle time while only other queues hold requests
            if idle[c] and inq[c] == 0 and any(inq[o] for o in cpus if o != c):
                starved[c] += ts - prev
        prev = ts
        if name == "sched_switch":
            busy[(cpu, task(rest))] += ts - last[cpu]
            last[cpu] = ts
            idle[cpu] = "next_comm=swapper" in rest
            continue
        r = int(re.search(r'req (\d+)', rest).group(1))
        reqs.setdefault(r, {})[name] = (ts, cpu)
        if name == "fuse_request_send":
            owner[r] = cpu; inq[cpu] += 1
        elif name == "fuse_request_end" and r in owner:
            inq[owner.pop(r)] -= 1
    print(f"== {tr}: {span * 1000:.0f} ms traced")
    for c in cpus:
        top = sorted(((v, k[1]) for k, v in busy.items() if k[0] == c), reverse=True)[:6]
        print(f"  cpu{c}: " + ", ".join(f"{n} {100 * v / span:.0f}%" for v, n in top))
    q, s, where = [], [], collections.Counter()
    for d in reqs.values():
        if len(d) == 3:
            q.append(d["fuse_request_sent"][0] - d["fuse_request_send"][0])
            s.append(d["fuse_request_end"][0] - d["fuse_request_sent"][0])
            where[(d["fuse_request_send"][1], d["fuse_request_end"][1])] += 1
    if q:
        q.sort(); s.sort()
        print(f"  {len(q)} requests: queued in the kernel median {q[len(q) // 2] * 1e3:.2f} ms, "
              f"in the server median {s[len(s) // 2] * 1e3:.2f} ms")
        print("  (issuing cpu, ending cpu): " + ", ".join(f"{k}: {v}" for k, v in sorted(where.items())))
    if tr.startswith("uring"):
        print("  idle with its own queue empty while another queue held requests: " +
              ", ".join(f"cpu{c} {100 * starved[c] / span:.1f}%" for c in cpus))
PY
