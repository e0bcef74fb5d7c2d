# SPDX-License-Identifier: PostgreSQL
"""pgr_bench peer: psycopg 3's psycopg_pool.ConnectionPool or SQLAlchemy's QueuePool (over
psycopg2), run by pgr_bench as a child process: `python3 py_peer.py psycopg_pool|sqlalchemy`.

Protocol (bench/README.md, "Peers"): the server comes in the environment (PGR_PEER_CONNINFO, a
libpq conninfo string); the peer prints one line, "ready <versions>" or "skip <reason>", then
answers each "run <query> <threads> <conns> <hold_ns> <warmup_s> <secs> <sample_every>" line on
stdin with "ok <ops> <errors> <secs> <sum_ns> <max_ns> <hist>" or "fail <reason>", and exits at
"quit" or end of input.

Threads: one Python thread per harness thread, the same loop as the C harness's worker_main.
The GIL lets one of them run Python code at a time; the drivers release it while they wait on
the network, so in the query sections threads overlap their round trips.
"""
import os
import random
import sys
import threading
import time

PHASE_WARMUP, PHASE_MEASURE, PHASE_STOP = 0, 1, 2
LOOKUP_ROWS = 10000
LOOKUP_SQL = "SELECT name FROM pgr_bench_users WHERE id = %s"
# pgring's log-linear histogram (src/hist.h): 16 linear buckets, then 4 per power of two up to
# 2^44 ns. The harness merges the counts into its own snapshot.
HIST_BUCKETS = 16 + (44 - 4 + 1) * 4
now_ns = time.monotonic_ns  # CLOCK_MONOTONIC, the clock the C harness reads


def bucket(v):
    if v < 16:
        return max(v, 0)
    e = v.bit_length() - 1
    if e > 44:
        return HIST_BUCKETS - 1
    return 16 + (e - 4) * 4 + ((v >> (e - 2)) & 3)


class PsycopgPool:
    """psycopg_pool.ConnectionPool; autocommit connections, so that a query is one round trip
    and a return needs no rollback."""

    def __init__(self, conninfo, conns):
        import psycopg_pool

        self.pool = psycopg_pool.ConnectionPool(
            conninfo, min_size=conns, max_size=conns, kwargs={"autocommit": True},
            timeout=10.0, open=True)
        # Opened in the background by the pool's workers: wait until all are there.
        self.pool.wait(timeout=20.0)

    def acquire(self):
        return self.pool.getconn(timeout=10.0)

    def release(self, conn):
        self.pool.putconn(conn)

    @staticmethod
    def query(conn, sql, params):
        return len(conn.execute(sql, params).fetchall())

    def close(self):
        self.pool.close()


class SqlalchemyPool:
    """sqlalchemy.pool.QueuePool over psycopg2, autocommit connections (reset on return is
    then a rollback that psycopg2 skips without a round trip)."""

    def __init__(self, conninfo, conns):
        import psycopg2
        from sqlalchemy.pool import QueuePool

        def creator():
            c = psycopg2.connect(conninfo)
            c.autocommit = True
            return c

        self.pool = QueuePool(creator, pool_size=conns, max_overflow=0, timeout=10.0)
        # QueuePool opens connections on demand: check out all of them once.
        held = [self.pool.connect() for _ in range(conns)]
        for c in held:
            c.close()

    def acquire(self):
        return self.pool.connect()

    def release(self, conn):
        conn.close()

    @staticmethod
    def query(conn, sql, params):
        cur = conn.cursor()
        try:
            cur.execute(sql, params)
            return len(cur.fetchall())
        finally:
            cur.close()

    def close(self):
        self.pool.dispose()


POOLS = {"psycopg_pool": PsycopgPool, "sqlalchemy": SqlalchemyPool}


def versions(kind):
    if kind == "psycopg_pool":
        import psycopg
        import psycopg_pool

        return "psycopg_pool %s, psycopg %s" % (psycopg_pool.__version__, psycopg.__version__)
    import psycopg2
    import sqlalchemy

    return "SQLAlchemy %s, psycopg2 %s" % (sqlalchemy.__version__,
                                           psycopg2.__version__.split(" ")[0])


class Round:
    def __init__(self, pool, query, hold_ns, sample_every):
        self.pool = pool
        self.query = query
        self.hold_ns = hold_ns
        self.sample_every = sample_every
        self.phase = PHASE_WARMUP
        self.lock = threading.Lock()
        self.ops = self.errors = self.sum = self.max = 0
        self.hist = {}

    def worker(self, barrier, seed):
        pool, query, hold_ns = self.pool, self.query, self.hold_ns
        rnd = random.Random(seed)
        sample_p = 1.0 / self.sample_every
        ops = errors = total = mx = 0
        hist = {}
        barrier.wait()
        ph = self.phase
        while ph != PHASE_STOP:
            timed = sample_p >= 1.0 or rnd.random() < sample_p
            t0 = now_ns() if timed else 0
            lat = 0
            try:
                conn = pool.acquire()
            except Exception:
                ph = self.phase
                if ph == PHASE_MEASURE:
                    errors += 1
                time.sleep(0.001)
                continue
            ok = True
            if query is None and (timed or hold_ns):
                t1 = now_ns()
                lat = t1 - t0
                while hold_ns and now_ns() - t1 < hold_ns:
                    pass
            if query is not None:
                sql, params = query(rnd)
                try:
                    ok = pool.query(conn, sql, params) == 1
                except Exception:
                    ok = False
            try:
                pool.release(conn)
            except Exception:
                ok = False
            if timed and query is not None:
                lat = now_ns() - t0
            ph = self.phase
            if ph == PHASE_MEASURE:
                if not ok:
                    errors += 1
                else:
                    ops += 1
                    if timed:
                        b = bucket(lat)
                        hist[b] = hist.get(b, 0) + 1
                        total += lat
                        if lat > mx:
                            mx = lat
        with self.lock:
            self.ops += ops
            self.errors += errors
            self.sum += total
            self.max = max(self.max, mx)
            for b, n in hist.items():
                self.hist[b] = self.hist.get(b, 0) + n


def sleep_secs(s):
    until = now_ns() + int(s * 1e9)
    while True:
        left = until - now_ns()
        if left <= 0:
            return
        time.sleep(left / 1e9)


def select1(rnd):
    return "SELECT 1", None


def lookup(rnd):
    return LOOKUP_SQL, (rnd.randrange(LOOKUP_ROWS) + 1,)


QUERIES = {"none": None, "select1": select1, "lookup": lookup}


def run_round(kind, args):
    query = QUERIES[args[0]]
    threads, conns, hold_ns = int(args[1]), int(args[2]), int(args[3])
    warmup_s, secs, sample_every = float(args[4]), float(args[5]), int(args[6])
    pool = POOLS[kind](os.environ.get("PGR_PEER_CONNINFO", ""), conns)
    try:
        r = Round(pool, query, hold_ns, sample_every)
        barrier = threading.Barrier(threads + 1)
        ths = [threading.Thread(target=r.worker, args=(barrier, random.getrandbits(64)))
               for _ in range(threads)]
        for t in ths:
            t.start()
        barrier.wait()
        sleep_secs(warmup_s)
        t0 = now_ns()
        r.phase = PHASE_MEASURE
        sleep_secs(secs)
        r.phase = PHASE_STOP
        t1 = now_ns()
        for t in ths:
            t.join()
    finally:
        pool.close()
    hist = ",".join("%d:%d" % (b, n) for b, n in sorted(r.hist.items())) or "-"
    return "ok %d %d %.6f %d %d %s" % (r.ops, r.errors, (t1 - t0) / 1e9, r.sum, r.max, hist)


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in POOLS:
        print("fail usage: py_peer.py %s" % "|".join(POOLS), flush=True)
        return 2
    kind = sys.argv[1]
    try:
        desc = versions(kind)
    except ImportError as e:
        print("skip %s (%s)" % ("python3-psycopg-pool not installed" if kind == "psycopg_pool"
                                else "python3-sqlalchemy / python3-psycopg2 not installed", e),
              flush=True)
        return 0
    print("ready %s, Python %s" % (desc, sys.version.split(" ")[0]), flush=True)
    for line in sys.stdin:
        a = line.split()
        if not a or a[0] == "quit":
            break
        if a[0] != "run" or len(a) != 8 or a[1] not in QUERIES:
            reply = "fail bad command: " + line.strip()
        else:
            try:
                reply = run_round(kind, a[1:])
            except Exception as e:
                reply = "fail %s: %s" % (type(e).__name__, str(e).replace("\n", " "))
        print(reply, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
