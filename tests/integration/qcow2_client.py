"""qcow2_client.py - NBD client workloads for test_qcow2.py, run with the
system Python (libnbd's module lives there):

  qcow2_client.py random URI REF SEED OPS WORKERS CLUSTER ZERO_TRIM
      random writes, zeroes and trims from several connections at once,
      each on its own 1 MiB stripes, applied to the raw file REF as well;
      ZERO_TRIM=1: a trimmed whole cluster must read back as zeroes.
  qcow2_client.py crash URI SLOT SEED
      a stream of writes (each to a new slot of SLOT bytes) and ZEROes of
      slots written earlier, a FLUSH every few; prints "op SLOT KIND" for
      each request sent and "flushed N" when the flush after the first N
      ops is acknowledged, until the server dies.
"""
import random
import sys
import threading

import nbd

STRIPE = 1 << 20


def pattern(seed, n):
    rnd = random.Random(seed)
    return rnd.randbytes(n)


def random_worker(uri, ref, seed, ops, k, workers, cluster, zero_trim, errors, lock):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    stripes = [s for s in range(size // STRIPE) if s % workers == k]
    rnd = random.Random(seed * 100 + k)
    try:
        for i in range(ops):
            base = rnd.choice(stripes) * STRIPE
            off = base + rnd.randrange(0, STRIPE // 512) * 512
            n = min(rnd.choice([512, 4096, 65536, 3 * cluster // 2, cluster]), base + STRIPE - off)
            kind = rnd.random()
            if kind < 0.7:
                data = pattern(seed * 1000003 + k * 1009 + i, n)
                h.pwrite(data, off)
            elif kind < 0.85:
                data = bytes(n)
                h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.3 else 0)
            else:
                # a trim of whole clusters (at least one) inside the stripe
                off = (off + cluster - 1) // cluster * cluster
                n = cluster * rnd.randint(1, 3)
                if off >= base + STRIPE or off + n > base + STRIPE:
                    continue
                h.trim(n, off)
                got = h.pread(n, off)
                if zero_trim and got != bytes(n):
                    raise AssertionError(f"trim of {n} at {off} does not read back as zeroes")
                data = got  # TRIM leaves the contents undefined: take what is there
            with lock:
                ref.seek(off)
                ref.write(data)
        h.flush()
    except Exception as e:  # reported by the main thread
        errors.append(f"worker {k}: {e!r}")
    finally:
        h.shutdown()


def run_random(uri, ref_path, seed, ops, workers, cluster, zero_trim):
    errors, lock = [], threading.Lock()
    with open(ref_path, "r+b") as ref:
        threads = [threading.Thread(target=random_worker,
                                    args=(uri, ref, seed, ops, k, workers, cluster, zero_trim, errors, lock))
                   for k in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        sys.exit(1)


def run_crash(uri, slot, seed):
    h = nbd.NBD()
    h.connect_uri(uri)
    nslots = h.get_size() // slot
    rnd = random.Random(seed)
    order = list(range(nslots))
    rnd.shuffle(order)
    written, sent = [], 0
    out = sys.stdout
    try:
        for s in order:
            if written and rnd.random() < 0.2:
                z = written.pop(rnd.randrange(len(written)))
                print(f"op {z} zero", file=out, flush=True)
                h.zero(slot, z * slot)
            else:
                print(f"op {s} write", file=out, flush=True)
                h.pwrite(pattern(s, slot), s * slot)
                written.append(s)
            sent += 1
            if sent % 7 == 0:
                h.flush()
                print(f"flushed {sent}", file=out, flush=True)
    except Exception as e:
        print(f"stopped: {e!r}", file=out, flush=True)


def main():
    mode = sys.argv[1]
    if mode == "random":
        uri, ref, seed, ops, workers, cluster, zt = sys.argv[2:9]
        run_random(uri, ref, int(seed), int(ops), int(workers), int(cluster), zt == "1")
    elif mode == "crash":
        uri, slot, seed = sys.argv[2:5]
        run_crash(uri, int(slot), int(seed))
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
