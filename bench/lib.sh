# bench/lib.sh - what the NBD benchmarks share (sourced by bench_nbd.sh,
# bench_formats.sh, bench_tls.sh, bench_devio_tls.sh, bench_rbd.sh after
# they set BENCH, ROOT, RUNTIME, SIZE, WORK, RESULTS): the tools check, the
# release build, a free TCP port, waiting for an NBD server, stopping the
# servers, their CPU time, and one fio job over fio's nbd engine with the
# servers' CPU time per request.

PY=${PY:-/usr/bin/python3}

# bench_need TOOL...: stop with a message when a tool is missing.
bench_need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "$BENCH: $tool is missing (scripts/deps.sh installs it)"; exit 1; }
  done
}

# bench_build DIR: a release build of devio in DIR (set up once); sets DEVIO.
bench_build() {
  [ -f "$1/build.ninja" ] || meson setup "$1" --buildtype=release >/dev/null
  ninja -C "$1" >/dev/null
  DEVIO="$ROOT/$1/devio"
}

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# bench_wait_nbd URI [TRIES]: wait (TRIES x 0.1 s, default 100) until an
# NBD server answers at URI; a message and failure when it does not.
bench_wait_nbd() {
  local _
  for _ in $(seq "${2:-100}"); do
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$BENCH: nothing came up on $1" >&2
  return 1
}

# bench_stop PID...: stop these background processes and reap them (for
# the cleanup traps; a process gone already is no error).
bench_stop() {
  local p
  for p in "$@"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}

# cpu_ticks PID...: utime + stime of every thread of these processes, in
# clock ticks.
cpu_ticks() { local p; for p in "$@"; do cat "/proc/$p/stat"; done | awk '{ s += $14 + $15 } END { print s }'; }

# fio_nbd_row LABELS PIDS URI JOB RW BS IODEPTH [NUMJOBS]: one fio job (nbd
# engine, RUNTIME seconds after a 1 s ramp, over SIZE bytes; NUMJOBS
# connections reported as their sum) against URI, served by the processes
# PIDS (one pid, or several separated by spaces: a server and its proxy).
# Appends to $RESULTS the row "LABELS<tab>IOPS<tab>MiB/s<tab>CPU us/req":
# LABELS (tab-separated words that name the row), then the servers'
# utime + stime over the whole job (ramp included) divided by the
# requests they served in that time (fio's IOPS x (ramp + runtime)), a
# figure the client cannot hide when it saturates first.  A failed fio
# is reported and gives no row.
fio_nbd_row() {
  local labels=$1 pids=$2 uri=$3 job=$4 t0 t1
  # shellcheck disable=SC2086 # PIDS splits into its pids
  t0=$(cpu_ticks $pids)
  fio --name="$job" --ioengine=nbd --uri="$uri" --rw="$5" --bs="$6" --iodepth="$7" \
    --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 --numjobs="${8:-1}" --group_reporting \
    --randrepeat=0 --norandommap --output-format=json >"$WORK/fio.json" 2>"$WORK/fio.err" ||
    { echo "$BENCH: fio failed for ${labels//$'\t'/ }: $(tail -3 "$WORK/fio.err")" >&2; return 0; }
  # shellcheck disable=SC2086
  t1=$(cpu_ticks $pids)
  $PY - "$WORK/fio.json" "$labels" "$((t1 - t0))" "$(getconf CLK_TCK)" "$((RUNTIME + 1))" >>"$RESULTS" <<'PY'
import json, sys
path, labels, ticks, hz, secs = sys.argv[1:]
text = open(path).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
io = j["read"] if j["read"]["io_bytes"] else j["write"]
reqs = io["iops"] * float(secs)
cpu_us = int(ticks) / int(hz) * 1e6 / reqs if reqs else 0
print(f"{labels}\t{io['iops']:.0f}\t{io['bw'] / 1024:.1f}\t{cpu_us:.2f}")
PY
}
