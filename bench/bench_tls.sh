#!/usr/bin/env bash
# bench_tls.sh - NBD over TLS: the devio server with --tls require against
# nbdkit --tls=require on the same certificates (made here with certtool),
# and devio without TLS, in one run on this machine: fio's nbd engine
# (libnbd, nbds:// URIs) over TCP on loopback, a fully written file on
# tmpfs behind each server.  Prints IOPS and MiB/s per job, devio-tls vs
# nbdkit-tls, the cost of TLS for devio (devio-tls vs devio-plain), and
# each server's CPU time per request (utime + stime over the job divided
# by the requests served), which the client cannot hide.
#
#   bench/bench_tls.sh                  # release build in build-release-tls
#   RUNTIME=5 SIZE=256M bench/bench_tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNTIME=${RUNTIME:-4}
SIZE=${SIZE:-256M}
BUILD=${BUILD:-build-release-tls}
PY=/usr/bin/python3

BENCH=bench_tls
. bench/lib.sh
bench_need fio nbdkit nbdinfo certtool
bench_build "$BUILD"

WORK=$(mktemp -d /dev/shm/devio-bench-tls.XXXXXX)
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
SERVERS="devio-tls nbdkit-tls devio-plain"

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
  esac
  PID[$name]=$!
  for _ in $(seq 100); do
    HOME=$WORK nbdinfo --size "${URI[$name]}" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench_tls: $name did not come up on ${URI[$name]}" >&2
  return 1
}

cleanup() {
  for name in "${!PID[@]}"; do
    kill "${PID[$name]}" 2>/dev/null || true
    wait "${PID[$name]}" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# run_job SERVER JOB RW BS IODEPTH: a row "JOB SERVER IOPS MiB/s CPU" (lib.sh)
run_job() {
  HOME=$WORK fio_nbd_row "$2"$'\t'"$1" "${PID[$1]}" "${URI[$1]}" "$2" "$3" "$4" "$5"
}

make_certs
echo "bench_tls: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), ${RUNTIME}s per job, size $SIZE," \
  "$(fio --version), nbdkit $(nbdkit --version | awk '{print $2}'), GnuTLS $(certtool --version | awk 'NR==1{print $NF}')"
for name in $SERVERS; do
  start_server "$name"
done
for j in "${JOBS[@]}"; do
  for name in $SERVERS; do   # each job against each server in turn: fair under noise
    run_job "$name" $j
  done
done

$PY - "$RESULTS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {}
for job, server, iops, mibs, cpu in rows:
    by.setdefault(job, {})[server] = (float(iops), float(mibs), float(cpu))
print()
print(f"{'job':18} {'server':12} {'IOPS':>9} {'MiB/s':>8} {'CPU us/req':>10}")
for job, s in by.items():
    for name, (iops, mibs, cpu) in s.items():
        print(f"{job:18} {name:12} {iops:9.0f} {mibs:8.1f} {cpu:10.2f}")
print()
print(f"{'job':18} {'devio-tls/nbdkit-tls':>21} {'devio-tls/devio-plain':>22} {'TLS CPU cost us/req':>20}")
for job, s in by.items():
    t, k, p = s.get("devio-tls"), s.get("nbdkit-tls"), s.get("devio-plain")
    vs_kit = f"{t[0] / k[0]:.2f}x" if t and k and k[0] else "-"
    vs_plain = f"{t[0] / p[0]:.2f}x" if t and p and p[0] else "-"
    cost = f"{t[2] - p[2]:+.2f}" if t and p else "-"
    print(f"{job:18} {vs_kit:>21} {vs_plain:>22} {cost:>20}")
PY
