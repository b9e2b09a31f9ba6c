#!/usr/bin/env bash
# bench_tls.sh - NBD over TLS: the devio server with --tls require against
# nbdkit --tls=require on the same certificates (made here with certtool),
# and devio without TLS, in one run on this machine: fio's nbd engine
# (libnbd, nbds:// URIs) over TCP on loopback, a fully written file on
# tmpfs behind each server.  Prints IOPS and MiB/s per job, devio-tls vs
# nbdkit-tls, the cost of TLS for devio (devio-tls vs devio-plain), and
# each server's CPU time per request (utime + stime over the job divided
# by the requests served), which the client cannot hide.  With REPEAT the
# whole round (every job against every server in turn) runs that many
# times and the medians are printed; OLD=REV adds devio-tls-old, that
# revision built in a temporary worktree, for an A/B in the same run.
#
#   bench/bench_tls.sh                  # release build in build-release-tls
#   RUNTIME=5 SIZE=256M bench/bench_tls.sh
#   REPEAT=5 OLD=main ONLY=4k bench/bench_tls.sh   # 4 KiB jobs, A/B against main
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${RUNTIME:-4}
SIZE=${SIZE:-256M}
BUILD=${BUILD:-build-release-tls}
REPEAT=${REPEAT:-1}
OLD=${OLD:-}
ONLY=${ONLY:-}   # run only the jobs whose name contains this
PY=/usr/bin/python3

BENCH=bench_tls
. bench/lib.sh
bench_need fio nbdkit nbdinfo certtool
bench_build "$BUILD"

WORK=$(mktemp -d /dev/shm/devio-bench-tls.XXXXXX)
OLD_TREE=
if [ -n "$OLD" ]; then
  OLD_TREE=$(mktemp -d /var/tmp/devio-bench-tls-old.XXXXXX)
  git worktree add -q --detach "$OLD_TREE/src" "$OLD"
  meson setup "$OLD_TREE/build" "$OLD_TREE/src" --buildtype=release -Dtests=disabled >/dev/null
  ninja -C "$OLD_TREE/build" devio >/dev/null
fi
RESULTS="$WORK/results.tsv"
# libnbd (fio's nbd engine) refuses tls-certificates= in a URI it did not
# get from its user; it reads $HOME/.pki/libnbd instead, so the clients
# here run with HOME=$WORK.
CERTS="$WORK/.pki/libnbd"
JOBS=(
  "1m-read-qd8 read 1m 8"
  "1m-write-qd8 write 1m 8"
  "4k-randread-qd32 randread 4k 32"
  "4k-randwrite-qd32 randwrite 4k 32"
)
SERVERS="devio-tls nbdkit-tls devio-plain${OLD:+ devio-tls-old devio-plain-old}"

make_certs() {
  mkdir -p "$CERTS"
  certtool --generate-privkey --key-type ecdsa --outfile "$CERTS/ca-key.pem" 2>/dev/null
  printf 'cn = bench CA\nca\ncert_signing_key\nexpiration_days = 2\n' >"$WORK/ca.info"
  certtool --generate-self-signed --load-privkey "$CERTS/ca-key.pem" --template "$WORK/ca.info" \
    --outfile "$CERTS/ca-cert.pem" 2>/dev/null
  certtool --generate-privkey --key-type ecdsa --outfile "$CERTS/server-key.pem" 2>/dev/null
  printf 'cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n' \
    >"$WORK/server.info"
  certtool --generate-certificate --load-ca-certificate "$CERTS/ca-cert.pem" --load-ca-privkey "$CERTS/ca-key.pem" \
    --load-privkey "$CERTS/server-key.pem" --template "$WORK/server.info" --outfile "$CERTS/server-cert.pem" 2>/dev/null
}

declare -A URI PID
start_server() {
  local name=$1 port img="$WORK/$1.img"
  port=$(free_port)
  dd if=/dev/urandom of="$img" bs=1M count=$(( $(numfmt --from=iec "$SIZE") >> 20 )) status=none
  case "$name" in
    devio-tls)   URI[$name]="nbds://localhost:$port/"
                 "$DEVIO" serve "$img" -q --nbd "tcp:127.0.0.1:$port" --tls require --tls-certificates "$CERTS" & ;;
    nbdkit-tls)  URI[$name]="nbds://localhost:$port/"
                 # its complaint about each fio exit without close_notify goes to a log
                 nbdkit -f -i 127.0.0.1 -p "$port" --tls=require --tls-certificates="$CERTS" file "$img" \
                   2>>"$WORK/nbdkit.log" & ;;
    devio-plain) URI[$name]="nbd://127.0.0.1:$port/"
                 "$DEVIO" serve "$img" -q --nbd "tcp:127.0.0.1:$port" & ;;
    devio-tls-old) URI[$name]="nbds://localhost:$port/"
                 "$OLD_TREE/build/devio" serve "$img" -q --nbd "tcp:127.0.0.1:$port" --tls require \
                   --tls-certificates "$CERTS" & ;;
    devio-plain-old) URI[$name]="nbd://127.0.0.1:$port/"
                 "$OLD_TREE/build/devio" serve "$img" -q --nbd "tcp:127.0.0.1:$port" & ;;
  esac
  PID[$name]=$!
  HOME=$WORK bench_wait_nbd "${URI[$name]}"
}

cleanup() {
  bench_stop "${PID[@]}"
  rm -rf "$WORK"
  if [ -n "$OLD_TREE" ]; then
    git worktree remove --force "$OLD_TREE/src" 2>/dev/null || true
    rm -rf "$OLD_TREE"
  fi
}
trap cleanup EXIT INT TERM

# run_job SERVER JOB RW BS IODEPTH: a row "JOB SERVER IOPS MiB/s CPU" (lib.sh)
run_job() {
  HOME=$WORK fio_nbd_row "$2"$'\t'"$1" "${PID[$1]}" "${URI[$1]}" "$2" "$3" "$4" "$5"
}

make_certs
echo "bench_tls: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ${RUNTIME}s per job, size $SIZE," \
  "$(fio --version), nbdkit $(nbdkit --version | awk '{print $2}'), GnuTLS $(certtool --version | awk 'NR==1{print $NF}')," \
  "$REPEAT round(s)${OLD:+, devio-tls-old = $OLD ($(git rev-parse --short "$OLD"))}"
for name in $SERVERS; do
  start_server "$name"
done
for _ in $(seq "$REPEAT"); do
  for j in "${JOBS[@]}"; do
    case "${j%% *}" in *"$ONLY"*) ;; *) continue ;; esac
    for name in $SERVERS; do   # each job against each server in turn: fair under noise
      run_job "$name" $j
    done
  done
done
echo "bench_tls: load at the end $(cut -d' ' -f1-3 /proc/loadavg)"

$PY - "$RESULTS" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
runs = {}
for job, server, iops, mibs, cpu in rows:
    runs.setdefault(job, {}).setdefault(server, []).append((float(iops), float(mibs), float(cpu)))
med = lambda xs: statistics.median(xs)
by = {job: {name: tuple(med([r[i] for r in rs]) for i in range(3)) for name, rs in s.items()} for job, s in runs.items()}
many = any(len(rs) > 1 for s in runs.values() for rs in s.values())
print()
print(f"{'job':18} {'server':15} {'IOPS':>9} {'MiB/s':>8} {'CPU us/req':>10}" + ("  (medians; IOPS of each round)" if many else ""))
for job, s in by.items():
    for name, (iops, mibs, cpu) in s.items():
        each = " ".join(f"{r[0]:.0f}" for r in runs[job][name]) if many else ""
        print(f"{job:18} {name:15} {iops:9.0f} {mibs:8.1f} {cpu:10.2f}  {each}")
print()
ratio = lambda a, b: f"{a / b:.2f}x" if a is not None and b else "-"
old = any("devio-tls-old" in s for s in by.values())
print(f"{'job':18} {'devio-tls/nbdkit-tls':>21} {'devio-tls/devio-plain':>22} {'TLS CPU cost us/req':>20}"
      + (f" {'new/old IOPS':>13} {'new/old CPU':>12} {'old/nbdkit-tls':>15} {'plain new/old IOPS':>19} {'CPU':>6}" if old else ""))
for job, s in by.items():
    t, k, p, o, po = (s.get(n) for n in ("devio-tls", "nbdkit-tls", "devio-plain", "devio-tls-old", "devio-plain-old"))
    g = lambda x, i: x[i] if x else None
    cost = f"{t[2] - p[2]:+.2f}" if t and p else "-"
    line = f"{job:18} {ratio(g(t, 0), g(k, 0)):>21} {ratio(g(t, 0), g(p, 0)):>22} {cost:>20}"
    if old:
        line += f" {ratio(g(t, 0), g(o, 0)):>13} {ratio(g(t, 2), g(o, 2)):>12} {ratio(g(o, 0), g(k, 0)):>15}"
        line += f" {ratio(g(p, 0), g(po, 0)):>19} {ratio(g(p, 2), g(po, 2)):>6}"
    print(line)
if many:
    print()
    print("IOPS ratios in each round:")
    for job, s in runs.items():
        for name, base in (("devio-tls", "nbdkit-tls"), ("devio-tls-old", "nbdkit-tls"),
                           ("devio-tls", "devio-tls-old"), ("devio-plain", "devio-plain-old")):
            if name in s and base in s:
                rs = [a[0] / b[0] for a, b in zip(s[name], s[base]) if b[0]]
                print(f"  {job:18} {name + '/' + base:31} " + " ".join(f"{x:.2f}" for x in rs)
                      + f"   median {med(rs):.2f}x")
PY
