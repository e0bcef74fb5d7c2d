/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgring: a lock-free, io_uring-driven PostgreSQL connection pool.
 *
 * Overview
 *   A pool keeps up to max_size (+ max_overflow) libpq connections open and hands them out.
 *   Idle connections sit in per-CPU shards; a checkout takes one from the caller's CPU shard
 *   with one compare-and-swap, steals from the other shards when that is empty, and parks on
 *   a futex with a deadline when the whole pool is busy. A returned connection goes straight
 *   to the oldest waiter. Connects, pings, rollbacks and closes run on a manager thread that
 *   drives libpq's nonblocking API through its own io_uring ring, so no caller ever blocks on
 *   the network inside the pool.
 *
 * API
 *   pgr_config_init / pgr_pool_create / pgr_pool_drain / pgr_pool_destroy   pool lifetime
 *   pgr_acquire / PGR_ACQUIRE / pgr_try_acquire / pgr_release / pgr_discard   checkout
 *   PGR_SCOPED_CONN                                         checkout released at block end
 *   pgr_pool_stats / pgr_pool_prometheus / pgr_pool_histogram   observability
 *   pgr_pool_fd / pgr_pool_run                              the manager on the caller's loop
 *   pgr_loop_*                                              async calls on the caller's ring
 *   pgr_strerror / pgr_version                              error names, library version
 *   Each has a man page in section 3 (man pgr_acquire); man 3 pgring is the overview.
 *
 * Conventions
 *   Errors are negative: -errno values, or pgring's own codes negated (-PGR_E_*), so that
 *   `rc < 0` catches every failure.
 *   NULL: a function that returns int returns -EINVAL for a NULL handle or a NULL pointer
 *   argument it needs. The others say what they do with NULL; where they do not, passing
 *   NULL is undefined.
 *   Every function documents its errors, which threads may call it, whether it blocks, and
 *   the version that introduced it ("Since").
 *
 * ABI
 *   From 0.2 on, a program built against 0.N runs against any later 0.M (M >= N) with the
 *   same SONAME (libpgring.so.0) without being rebuilt: symbols are only added (each release
 *   in its own version node), existing functions keep their signatures, and the two structs
 *   a caller allocates, pgr_config and pgr_stats, only grow at their end. Their first member
 *   is their size as the caller's program saw it, so the library knows which fields exist.
 *   A field added later treats 0 as "the behaviour before this field existed".
 */
#ifndef PGRING_H
#define PGRING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(PGR_BUILDING) && defined(__GNUC__)
#define PGR_API __attribute__((visibility("default")))
#else
#define PGR_API
#endif

/* The version of this header. pgr_version() gives the library's, which may be newer. */
#define PGRING_VERSION_MAJOR  0
#define PGRING_VERSION_MINOR  2
#define PGRING_VERSION_PATCH  0
#define PGRING_VERSION_STRING "0.2.0"
/* One number that orders versions: 0xMMmmpp (0.2.0 is 0x000200). */
#define PGRING_VERSION_NUMBER                                                                      \
	((PGRING_VERSION_MAJOR << 16) | (PGRING_VERSION_MINOR << 8) | PGRING_VERSION_PATCH)

/*
 * The version of the library the program runs against, as PGRING_VERSION_NUMBER encodes it,
 * and as a "major.minor.patch" string (static, never NULL). A program may compare it with the
 * header's to require a newer library at run time. Threads: any. Blocks: no. Since 0.2.
 */
PGR_API unsigned pgr_version(void);
PGR_API const char *pgr_version_string(void);

typedef struct pgr_pool pgr_pool;
typedef struct pgr_conn pgr_conn;
typedef struct pgr_runtime pgr_runtime;

/* pgring's own error codes, reserved range far above errno values; returned negated. */
enum {
	PGR_E_BASE = 10000,
	PGR_E_TOO_MANY_WAITERS = PGR_E_BASE, /* max_waiters callers already wait */
	PGR_E_CONNECT_FAILED,                /* the server refused or failed the connect */
	PGR_E_NOT_OWNED,   /* the handle is not a connection the caller has checked out now
	                      (released or discarded already, or from an earlier checkout) */
	PGR_E_FORKED,      /* the pool was created by the parent of this forked process */
	PGR_E_UNSUPPORTED, /* the kernel lacks an io_uring operation pgring needs */
	PGR_E_LAST = PGR_E_UNSUPPORTED,
};

enum pgr_event_type {
	PGR_EV_CONN_OPENED = 1, /* a connection is open and ready (conn_id set) */
	PGR_EV_CONN_CLOSED,     /* a connection was closed (reason set) */
	PGR_EV_CONNECT_FAILED,  /* a connect attempt failed (message: libpq's text) */
	PGR_EV_POOL_EXHAUSTED,  /* every connection is in use and a caller must wait */
	PGR_EV_WAITER_REJECTED, /* a caller was refused: max_waiters already wait */
	PGR_EV_LEAK_SUSPECTED,  /* held longer than leak_threshold_ms (file/line/func set) */
	PGR_EV_CONFIG_ERROR,    /* pgr_pool_create rejected a field (field set) */
	PGR_EV_ACQUIRE_TIMEOUT, /* an acquire timed out (message: pool state, last error) */
	PGR_EV_MISUSE,          /* an API call broke its contract (message says which; the call
	                           returned an error and the pool is unchanged) */
	PGR_EV_POOLER_DETECTED, /* a connection pooler (PgBouncer, ...) answers for the server;
	                           once per pool, the message says what was turned off (0.2) */
};

typedef struct pgr_event {
	enum pgr_event_type type;
	const char *message; /* human text, never contains a password; never NULL */
	const char *reason;  /* CONN_CLOSED: why ("max_lifetime", "broken", ...), else NULL */
	const char *field;   /* CONFIG_ERROR: the pgr_config field at fault, else NULL */
	uint32_t conn_id;    /* connection slot, or UINT32_MAX when none */
	int64_t held_ms;     /* LEAK_SUSPECTED: how long the connection has been held */
	const char *file;    /* LEAK_SUSPECTED: where it was acquired, or NULL */
	int line;
	const char *func;
	const char *pool; /* the pool's name (pgr_config.name) */
} pgr_event;

/*
 * Event callback. Runs on the pool's manager thread for connection events (on the thread that
 * calls pgr_pool_run when manager_thread is false) and on the calling thread for acquire
 * events (exhausted, rejected, timeout) and config errors. It must not call back into the pool
 * with a blocking call, and must be quick. ev and its strings are valid during the call only.
 * Since 0.1.
 */
typedef void (*pgr_event_fn)(const pgr_event *ev, void *user_data);

/*
 * Called on the manager thread right after a connection opens, before it is handed out.
 * Return 0 to accept the connection, anything else to close it (counted as a failed connect).
 * It may run short blocking statements (SET ...); the manager waits for it. Since 0.1.
 */
typedef int (*pgr_connect_fn)(PGconn *pg, void *user_data);

/*
 * A ready-made pgr_event_fn that prints one line per event to stderr (user_data unused; a NULL
 * ev prints nothing). Threads: any. Blocks: on the write to stderr only. Since 0.1.
 */
PGR_API void pgr_event_log_stderr(const pgr_event *ev, void *user_data);

/*
 * Pool configuration: fill it with pgr_config_init, then set fields. New fields are only ever
 * appended. Since 0.1; struct_size since 0.2.
 */
typedef struct pgr_config {
	size_t struct_size;          /* sizeof(pgr_config) as the caller's program was built;
	                                set by pgr_config_init, never by hand */
	const char *conninfo;        /* libpq conninfo string or URI; required */
	const char *name;            /* pool label in metrics and logs; default "default" */
	uint32_t min_idle;           /* connections kept open when unused; default 0 */
	uint32_t max_size;           /* steady upper bound; default 10 */
	uint32_t max_overflow;       /* burst above max_size, closed on return; default 0 */
	uint32_t max_waiters;        /* callers that may wait at once; default 1024 */
	uint32_t max_connecting;     /* connects in flight at once; default 4 */
	uint32_t shards;             /* idle-connection shards; 0 = one per online CPU */
	int64_t acquire_timeout_ms;  /* pgr_acquire's default deadline; default 30000 */
	int64_t connect_timeout_ms;  /* per host, TLS and auth included; 10000 (README) */
	int64_t max_lifetime_ms;     /* 0 = unlimited; default 1800000 (30 min) */
	int64_t lifetime_jitter_ms;  /* up to this much is taken off each lifetime; 0 = none */
	int64_t idle_timeout_ms;     /* close idle connections above min_idle; 0 = never; 600000 */
	int64_t ping_after_idle_ms;  /* ping at checkout when idle this long; 0 = always,
	                                -1 = never; default 30000 */
	int64_t check_after_idle_ms; /* zero-round-trip socket check at checkout when idle this
	                                long; 0 = every checkout; default 1 */
	int64_t ping_timeout_ms;     /* deadline of one ping; default 5000 */
	int64_t reset_timeout_ms;    /* deadline of a rollback or reset_sql on return; 5000 */
	int64_t keepalive_interval_ms; /* background ping of idle connections; 0 = off */
	int64_t leak_threshold_ms;     /* report connections held longer; 0 = off */
	int64_t backoff_min_ms;        /* first reconnect delay after a failure; default 100 */
	int64_t backoff_max_ms;        /* cap of the exponential backoff; default 10000 */
	int64_t tcp_user_timeout_ms;   /* TCP_USER_TIMEOUT unless conninfo sets it (libpq sets it
	                                  only with keepalives on); default 30000 */
	const char *reset_sql;         /* run on every return when set, e.g. "DISCARD ALL" */
	bool metrics;        /* record acquire-wait and hold histograms; default true (counters
	                        and the connect histogram are always kept) */
	bool manager_thread; /* true (default): the pool runs its manager on a thread of its
	                        own. false: no thread; the caller's event loop calls
	                        pgr_pool_run() whenever pgr_pool_fd() is readable (see below) */
	/*
	 * pgr_loop_exec (see below). These are pool-wide rather than per loop: the prepared cache
	 * belongs to the connections, which every loop and holder of the pool shares, and what the
	 * server in front can keep (PgBouncer in transaction mode before 1.21 cannot keep named
	 * statements) is a property of the pool's conninfo. The bounds size each loop's engine the
	 * same way and are validated once, at pgr_pool_create, with the field named.
	 */
	uint32_t exec_pipeline_depth; /* statements in flight per connection; 0 = default 16 */
	uint32_t exec_max_pending;    /* statements queued or in flight per loop; 0 = 256 */
	uint32_t exec_max_conns;      /* connections a loop holds for exec; 0 = default 4 */
	int64_t exec_idle_release_ms; /* a loop gives back a connection idle this long; 1000 */
	int32_t prepare_threshold;    /* a text is prepared on a connection at its use number
	                                 threshold + 1; 0 = at once, -1 = never; default 5 */
	uint32_t prepare_cache_size;  /* prepared statements kept per connection (LRU, evicted
	                                 ones DEALLOCATEd); 0 = default 64 */
	pgr_connect_fn on_connect;
	pgr_event_fn on_event;
	void *user_data;      /* passed to on_connect and on_event */
	pgr_runtime *runtime; /* NULL (default): the pool runs its own manager (a thread, or the
	                         caller's loop per manager_thread). Set: the pool's manager runs on
	                         this shared runtime, and manager_thread is ignored */
	/* Since 0.2 (added after its first fields; 0 = the default). */
	uint32_t max_capacity; /* connection slots allocated at create: the most that
	                          pgr_pool_resize may set max_size + max_overflow to;
	                          0 = max_size + max_overflow (no growth); at most 4096 */
	/*
	 * Replica pools (since 0.2): a replication-lag bound and rebalancing over the hosts of a
	 * multi-host conninfo. README "Running in a fleet" describes how lag is measured and what
	 * the measurement cannot see (an idle primary, clock skew, the interval).
	 */
	int64_t max_replica_lag_ms;      /* connections to a standby whose replay lags more are
	                                    not handed out; 0 = off (default) */
	int64_t replica_lag_interval_ms; /* how often the manager measures each host's lag (one
	                                    statement on an idle connection); default 1000 */
	int64_t replica_lag_grace_ms;    /* a connection held back for lag is closed after this
	                                    long (reason replica_lag) when another host is fit to
	                                    take its place; default 10000 */
	int64_t rebalance_interval_ms;   /* replica pools (several hosts, target_session_attrs
	                                    read-only / standby / prefer-standby): how often the
	                                    manager checks the spread over hosts and moves an idle
	                                    connection from the busiest host to one that has too
	                                    few (reason rebalance); 0 = never; default 5000 */
	uint32_t prepare_loop_query;     /* 1: pgr_loop_query goes through the connection's
	                                    prepared-statement cache too (prepare_threshold,
	                                    prepare_cache_size); 0 (default): it sends every text
	                                    unnamed */
	/*
	 * A pooler in front (since 0.2). The pool detects one at its first connect
	 * (pgr_stats.pooler, PGR_EV_POOLER_DETECTED) and then never prepares statements by name, as
	 * a pooler in transaction mode would send the next transaction to another server connection
	 * (PgBouncer before 1.21 keeps no prepared statements). README "Running in a fleet".
	 */
	bool pooler_keeps_prepared; /* true: the pooler keeps each client's prepared statements
	                               (PgBouncer 1.21+ with max_prepared_statements, or session
	                               pooling): prepare_threshold applies behind it too;
	                               default false */
	uint32_t exec_sync_group;   /* pgr_loop_exec: up to this many statements sent on one
	                               connection in a turn share one sync point (one commit,
	                               one round of the server's flush); the caller still sees
	                               each statement on its own (see pgr_loop_exec); 0 or 1
	                               (default): a sync point after every statement; at most
	                               1024 */
} pgr_config;

/*
 * A snapshot of a pool (pgr_pool_stats). New fields are only ever appended. Since 0.1;
 * struct_size since 0.2.
 */
typedef struct pgr_stats {
	size_t struct_size; /* set by pgr_pool_stats: the bytes of this struct the library filled
	                       (a newer program on an older library sees the older size, and
	                       the fields past it read 0) */
	/* gauges */
	uint32_t size; /* open connections (idle + in use + being checked/reset) */
	uint32_t idle;
	uint32_t in_use;
	uint32_t overflow_in_use; /* open connections above max_size */
	uint32_t waiting;         /* callers parked in the wait queue */
	uint32_t connecting;
	uint32_t max_size;
	uint32_t max_overflow;
	/* counters, monotonic since create */
	uint64_t acquires;             /* successful checkouts */
	uint64_t acquired_immediately; /* without waiting */
	uint64_t steals;               /* taken from another CPU's shard */
	uint64_t handoffs;             /* handed straight from a return to a waiter */
	uint64_t waits;                /* checkouts that had to wait */
	uint64_t timeouts;
	uint64_t rejected; /* refused: too many waiters */
	uint64_t connects_ok;
	uint64_t connects_failed;
	uint64_t pings;
	uint64_t pings_failed;
	uint64_t checks_failed; /* zero-round-trip check found a dead socket */
	uint64_t rollbacks;     /* returned in a transaction and rolled back */
	uint64_t resets;        /* reset_sql runs */
	uint64_t resets_failed;
	uint64_t leaks;                /* leak reports */
	uint64_t closes;               /* all closes; by reason below */
	uint64_t closes_by_reason[16]; /* index: enum pgr_close_reason */
	/* Since 0.2 (added after its first fields). */
	uint32_t pooler; /* enum pgr_pooler: is a connection pooler in front of the server */
} pgr_stats;

/*
 * pgr_stats.pooler: whether a connection pooler (PgBouncer, ...) answers for the server. Until
 * the pool knows, and once one is detected, statements are not prepared by name unless
 * pooler_keeps_prepared is set. Since 0.2.
 */
enum pgr_pooler {
	PGR_POOLER_UNKNOWN = 0, /* no connection has answered the check yet */
	PGR_POOLER_NONE,        /* the pool's connections reach the server itself */
	PGR_POOLER_DETECTED,    /* a pooler stands between them */
};

/* Why a connection was closed; names from pgr_close_reason_name(). Since 0.1. */
enum pgr_close_reason {
	PGR_CLOSE_MAX_LIFETIME = 0,
	PGR_CLOSE_IDLE_TIMEOUT,
	PGR_CLOSE_BROKEN, /* bad status seen at return or by a check */
	PGR_CLOSE_PING_FAILED,
	PGR_CLOSE_RESET_FAILED,
	PGR_CLOSE_OVERFLOW,     /* returned while the pool already held max_size */
	PGR_CLOSE_DISCARDED,    /* pgr_discard */
	PGR_CLOSE_SERVER_ERROR, /* FATAL / admin shutdown / read-only server */
	PGR_CLOSE_ACTIVE_QUERY, /* returned with a query still running */
	PGR_CLOSE_POOL_CLOSING,
	PGR_CLOSE_CONNECT_FAILED, /* on_connect refused or setup failed after connect */
	PGR_CLOSE_RESIZED,        /* surplus after pgr_pool_resize lowered the limits (0.2) */
	PGR_CLOSE_ROLE_CHANGED,   /* the server no longer has the role target_session_attrs
	                             asks for: a standby promoted, a primary turned read-only
	                             (0.2) */
	PGR_CLOSE_REPLICA_LAG,    /* its standby lagged past max_replica_lag_ms for longer than
	                             replica_lag_grace_ms (0.2) */
	PGR_CLOSE_REBALANCE,      /* moved to a host with fewer of the pool's connections, such
	                             as a standby that came back (0.2) */
	PGR_CLOSE_REASONS,
};
/*
 * The reason's name as in events and the Prometheus reason label ("max_lifetime", ...), static;
 * "unknown" for a value outside the enum. Threads: any. Blocks: no. Since 0.1.
 */
PGR_API const char *pgr_close_reason_name(enum pgr_close_reason reason);

/* Latency histograms kept by the pool. Since 0.1. */
enum pgr_hist_kind {
	PGR_HIST_ACQUIRE_WAIT = 0, /* time a checkout waited (0 for an immediate checkout) */
	PGR_HIST_CONNECT,          /* connect attempt, start to ready */
	PGR_HIST_HOLD,             /* checkout to return */
	PGR_HIST_KINDS,
};

typedef struct pgr_hist_summary {
	uint64_t count;
	uint64_t sum_ns;
	uint64_t p50_ns, p90_ns, p99_ns, p999_ns, max_ns;
} pgr_hist_summary;

/*
 * Fill cfg with every default and set cfg->struct_size; conninfo must still be set.
 * pgr_config_init is inline so that the size is the caller's sizeof(pgr_config): a program
 * built against this header and run against a later library, whose pgr_config is larger,
 * passes its own size, and the library writes only that many bytes. pgr_config_init_size is
 * the call for bindings that cannot use the inline (pass the size of the struct they
 * allocated). Threads: any. Blocks: no. Since 0.2 (0.1 had pgr_config_init as a function).
 */
PGR_API void pgr_config_init_size(pgr_config *cfg, size_t size);
static inline void pgr_config_init(pgr_config *cfg)
{
	pgr_config_init_size(cfg, sizeof(*cfg));
}

/*
 * Validate and copy cfg (strings are copied; cfg may be freed afterwards), start the manager
 * thread (unless cfg->manager_thread is false) and begin opening min_idle connections in the
 * background. Only the first cfg->struct_size bytes of cfg are read; fields past them (a
 * program built against an older header) keep their defaults.
 * Returns 0 and sets *out, or: -EINVAL for a NULL argument, a struct_size that pgr_config_init
 * did not set, fields this library does not know set to non-zero (a program built against a
 * newer header), or a bad field (each also reported as a PGR_EV_CONFIG_ERROR event naming the
 * field);
 * -ENOMEM; -PGR_E_FORKED when cfg->runtime was created by the parent of this forked process;
 * or the error of io_uring setup or thread creation.
 * Threads: any. Blocks: no network wait (the conninfo is parsed, nothing is connected).
 * Since 0.1.
 */
PGR_API int pgr_pool_create(const pgr_config *cfg, pgr_pool **out);

/*
 * Stop handing out connections, wake every waiter with -ESHUTDOWN, wait up to drain_ms for
 * checked-out connections to come back, then close every connection (in-flight io_uring
 * operations are cancelled first). Connections still checked out after the deadline are
 * closed under their holders' feet only at pgr_pool_destroy, and one returned after the
 * deadline stays open until then too (the manager has stopped). Returns 0 (also for a second
 * call), -ETIMEDOUT when some were still out at the deadline (checked out, or held by a
 * pgr_loop that was not driven meanwhile), -PGR_E_FORKED in a forked child, -EINVAL for a NULL
 * pool. Threads: one thread; the thread that drives the runtime when it has no manager thread.
 * Blocks: up to drain_ms (saturating: INT64_MAX is "until they are back") plus the time the
 * manager takes to close what it holds (one io_uring cancel round trip per connection, at most
 * 5 s in all). Since 0.1.
 */
PGR_API int pgr_pool_drain(pgr_pool *pool, int64_t drain_ms);

/*
 * pgr_pool_drain(pool, 0) if not drained yet, then free everything. Connections still checked
 * out are closed; using them afterwards is undefined. Callers already blocked in pgr_acquire
 * are woken with -ESHUTDOWN and destroy waits for them to leave; calls that start after destroy
 * has begun are undefined. Returns 0; -EBUSY (nothing done, a PGR_EV_MISUSE event says so)
 * while a pgr_loop is still bound to the pool: destroy the loops first; -EINVAL for NULL. In a
 * forked child it frees the child's copy without sending anything on the parent's connections.
 * Threads: one thread, as pgr_pool_drain. Blocks: as pgr_pool_drain(pool, 0), then until woken
 * waiters have left (no network wait). Since 0.1 (returns int since 0.2).
 */
PGR_API int pgr_pool_destroy(pgr_pool *pool);

/*
 * Check out a connection, waiting up to timeout_ms (negative: the configured
 * acquire_timeout_ms; 0: do not wait). Returns 0 and sets *out; -ETIMEDOUT (when the server is
 * failing the error is -PGR_E_CONNECT_FAILED instead, and pgr_pool_last_error() explains);
 * -EAGAIN (timeout_ms 0 and nothing idle); -PGR_E_TOO_MANY_WAITERS; -ESHUTDOWN once the pool
 * is draining; -EINVAL for a NULL pool or out.
 * Threads: any (not from an event callback). Blocks: up to the deadline when no connection is
 * idle; never on the network. Since 0.1.
 */
PGR_API int pgr_acquire(pgr_pool *pool, int64_t timeout_ms, pgr_conn **out);
/*
 * pgr_acquire that also records where the connection was acquired (file, line, func; static
 * strings, not copied): leak reports (leak_threshold_ms) name it. Use it through PGR_ACQUIRE,
 * which passes the call site at no cost. Same errors, threads and blocking as pgr_acquire.
 * Since 0.1.
 */
PGR_API int pgr_acquire_at(pgr_pool *pool, int64_t timeout_ms, pgr_conn **out, const char *file,
                           int line, const char *func);
#define PGR_ACQUIRE(pool, timeout_ms, out)                                                         \
	pgr_acquire_at((pool), (timeout_ms), (out), __FILE__, __LINE__, __func__)

/*
 * pgr_acquire with a zero timeout: -EAGAIN at once when none is idle (the manager is asked to
 * open one if the pool is below max_size). Same other errors and threads as pgr_acquire.
 * Blocks: no. Since 0.1.
 */
PGR_API int pgr_try_acquire(pgr_pool *pool, pgr_conn **out);

/*
 * Return a connection. An idle, healthy connection goes back to the CPU's cache or an idle
 * shard with no system call and no lock while nobody waits; with callers waiting, to the oldest
 * once it has waited 1 ms (200 us per caller waiting when it came, if longer), else to a shard with
 * that caller woken to compete (the wait queue's lock only for a hand-off or an oldest caller
 * found awake; at most one FUTEX_WAKE). One left in a transaction is
 * rolled back by the manager first; one left in pipeline mode with nothing pending leaves it;
 * one with a query running or a broken socket is closed.
 * Returns 0, or (nothing changed, a PGR_EV_MISUSE event reports it) -PGR_E_NOT_OWNED when conn
 * is not checked out by this handle (released or discarded already, or a handle kept from an
 * earlier checkout), -EBUSY while a pgr_loop_query / pgr_loop_pipeline is in flight on it,
 * -PGR_E_FORKED in a forked child, -EINVAL for NULL. Every build type checks; releasing one
 * handle from two threads at the same instant is a race the pool cannot see.
 * Threads: any (a connection may be released by another thread than the one that acquired
 * it). Blocks: no. Since 0.1 (returns int since 0.2).
 */
PGR_API int pgr_release(pgr_conn *conn);

/*
 * Return a connection the caller knows is unusable: it is closed (reason "discarded"), never
 * reused. Errors, threads and blocking as pgr_release. Since 0.1 (returns int since 0.2).
 */
PGR_API int pgr_discard(pgr_conn *conn);

/*
 * The libpq connection of a checked-out connection; valid until pgr_release/pgr_discard. NULL
 * for NULL or a handle that is no longer checked out. The caller may use it with libpq's
 * blocking or nonblocking calls but must not PQfinish or PQreset it.
 * Threads: the holder's. Blocks: no. Since 0.1.
 */
PGR_API PGconn *pgr_conn_pg(pgr_conn *conn);
/*
 * Stable slot number of a connection, as in events (conn_id); UINT32_MAX for a NULL conn.
 * Threads: the holder's. Blocks: no. Since 0.1.
 */
PGR_API uint32_t pgr_conn_id(const pgr_conn *conn);

/*
 * Change the limits of a live pool: min_idle, max_size and max_overflow, as in pgr_config and
 * with its rules (max_size >= 1, min_idle <= max_size), and max_size + max_overflow at most
 * cfg.max_capacity, the slots allocated at create (tables indexed by slot stay where they
 * are, so a pool cannot grow past them; set max_capacity to allow growth). Growing wakes the
 * manager at once: callers parked waiting for a connection get new ones without waiting for
 * a return. Shrinking never touches a connection in use: idle connections above the new
 * max_size + max_overflow are closed now, in-use ones above it when they come back (both with
 * reason "resized"); connections between max_size and max_size + max_overflow follow the
 * overflow rule on return; min_idle's surplus goes by idle_timeout_ms as usual. pgr_pool_stats
 * reports the new max_size and max_overflow at once. Returns 0; -EINVAL for a NULL pool or a
 * value that breaks a rule (a PGR_EV_CONFIG_ERROR event names the field; nothing changes);
 * -ESHUTDOWN once the pool drains; -PGR_E_FORKED. Threads: any, concurrently with every
 * other call (concurrent resizes: the last one wins, whole). Blocks: no. Since 0.2.
 */
PGR_API int pgr_pool_resize(pgr_pool *pool, uint32_t min_idle, uint32_t max_size,
                            uint32_t max_overflow);

/*
 * Snapshot of the pool's gauges and counters into *out (each value read atomically, the set
 * not as one). pgr_pool_stats is inline so that the size is the caller's sizeof(pgr_stats):
 * the library fills at most that many bytes, zeroes any it does not know, and sets
 * out->struct_size to the bytes it filled. The size travels as an argument rather than as a
 * field the caller sets, because a caller that forgot to set it would pass stack garbage as
 * the size of the buffer the library writes. pgr_pool_stats_size is the call for bindings.
 * Returns 0, or -EINVAL for a NULL pool or out, or a size below that of 0.2's pgr_stats.
 * Threads: any. Blocks: no (no lock). Since 0.2 (0.1 had pgr_pool_stats as a function).
 */
PGR_API int pgr_pool_stats_size(pgr_pool *pool, pgr_stats *out, size_t size);
static inline int pgr_pool_stats(pgr_pool *pool, pgr_stats *out)
{
	return pgr_pool_stats_size(pool, out, sizeof(*out));
}

/*
 * Summary of one latency histogram; all zero for a NULL pool or a kind outside the enum.
 * out must not be NULL. Threads: any. Blocks: no (no lock). Since 0.1.
 */
PGR_API void pgr_pool_histogram(pgr_pool *pool, enum pgr_hist_kind kind, pgr_hist_summary *out);

/*
 * Prometheus text exposition of stats and histograms, names pgring_*, label pool="<name>".
 * Like snprintf: writes at most len bytes (NUL included) and returns the length the whole
 * text needs, excluding the NUL; buf may be NULL when len is 0. A NULL pool gives "" (0).
 * Threads: any. Blocks: no (no lock). Since 0.1.
 */
PGR_API size_t pgr_pool_prometheus(pgr_pool *pool, char *buf, size_t len);

/*
 * Copy into buf (snprintf-like, returns the needed length) the reason of the most recent
 * failure the pool saw: the last connect error with libpq's text (never the password), or the
 * state at the last acquire timeout; "" when none. A NULL pool gives "" (0). Threads: any.
 * Blocks: only on a mutex held for the copy of at most 512 bytes. Since 0.1.
 */
PGR_API size_t pgr_pool_last_error(pgr_pool *pool, char *buf, size_t len);

/*
 * Driving the manager from the caller's event loop (cfg.manager_thread = 0): the pool's
 * network work (connects, pings, rollbacks, resets, closes, the periodic maintenance) then
 * runs on the caller's thread, inside pgr_pool_run, never blocking it.
 *
 * pgr_pool_fd returns an eventfd that becomes readable whenever the manager has something to
 * do (a completion on its io_uring ring, including its own 10 ms tick); poll it from any loop
 * (epoll, or an io_uring POLL_ADD on the caller's ring) and call pgr_pool_run, which does one
 * nonblocking round and re-arms the notification. Call both from one thread. -EINVAL when the
 * pool has a manager thread. pgr_pool_drain / pgr_pool_destroy must then be called from that
 * same thread: they run the manager themselves while they wait.
 */
/*
 * pgr_pool_fd: the eventfd (owned by the pool; do not close it), or -EINVAL for a NULL pool or
 * a pool with a manager thread. pgr_pool_run: 0, -EINVAL likewise, or -ESHUTDOWN once
 * pgr_pool_drain has stopped the manager. Threads: the loop's thread. Blocks: no. Since 0.1.
 */
PGR_API int pgr_pool_fd(pgr_pool *pool);
PGR_API int pgr_pool_run(pgr_pool *pool);

/*
 * ---- Runtimes: one manager for many pools ----
 *
 * A runtime is one io_uring ring, one eventfd and (with manager_thread) one thread that run the
 * manager of every pool created with cfg.runtime pointing at it: a thousand tenant pools cost
 * one thread. Pools on one runtime stay independent (one's failing server, backoff or drain does
 * not delay another's connects or pings; name resolution is the exception: give hostaddr=). The
 * manager is tickless: it sleeps until something is due (a lifetime, an idle timeout, a
 * keepalive, a leak threshold, a backoff) or a caller needs it.
 *
 * pgr_runtime_create: manager_thread true starts the thread; false: the caller's loop polls
 * pgr_runtime_fd and calls pgr_runtime_run from one thread (then pgr_pool_drain/destroy of its
 * pools must be called from that thread). Returns 0, -EINVAL, -ENOMEM or io_uring's error.
 * pgr_runtime_destroy: -EBUSY while pools created on it are not destroyed yet, 0 once freed,
 * -EINVAL for NULL. pgr_runtime_fd: the eventfd to poll (-EINVAL with a thread). pgr_runtime_run:
 * one nonblocking round (-EINVAL with a thread). All: -PGR_E_FORKED in a forked child (destroy
 * frees the child's copy). Threads: create/destroy any; fd/run the one driving thread. Blocks:
 * destroy joins the thread; nothing else blocks. Since 0.2.
 */
PGR_API int pgr_runtime_create(bool manager_thread, pgr_runtime **out);
PGR_API int pgr_runtime_destroy(pgr_runtime *rt);
PGR_API int pgr_runtime_fd(pgr_runtime *rt);
PGR_API int pgr_runtime_run(pgr_runtime *rt);

/*
 * Name of an error code returned by pgring: a negative errno or a negated PGR_E_* code
 * (positive values are accepted too). Static text, never NULL. Threads: any (unlike
 * strerror). Blocks: no. Since 0.1.
 */
PGR_API const char *pgr_strerror(int err);

/*
 * ---- Async checkout and queries on a caller-owned io_uring ring ----
 *
 * A pgr_loop binds a pool to one io_uring ring that the caller owns and drives from one thread
 * (an event loop). pgring prepares SQEs on that ring, only from the loop's thread and only
 * inside the pgr_loop_* calls; it never submits, never waits on the ring and
 * never reads a CQE it did not produce. The caller:
 *   - submits as it normally does (pgring's SQEs ride along with the caller's),
 *   - hands every CQE whose user_data satisfies pgr_loop_owns(user_data) to
 *     pgr_loop_handle_cqe() and marks it seen as usual; every other CQE is the caller's.
 * pgring's user_data values have 0x7067 in their top 16 bits; user-space pointers on x86-64
 * and arm64 never do, so a loop that stores pointers in user_data needs no other rule.
 * Every SQE pgring prepares produces exactly one CQE that pgring consumes.
 *
 * Callbacks run on the loop's thread, from pgr_loop_handle_cqe, or from the async call itself
 * when the result is known at once (an idle connection was there). They may call any pgring
 * function that does not block (release, discard, more async calls).
 *
 * Every pgr_loop_* function is called from the loop's thread only and never blocks; all are
 * since 0.1 (the pgr_loop_ names since 0.2). pgr_loop_owns is inline: any thread, NULL-free.
 */
typedef struct pgr_loop pgr_loop;
struct io_uring;
struct io_uring_cqe;

#define PGR_LOOP_UD_TAG 0x7067ull
static inline int pgr_loop_owns(uint64_t user_data)
{
	return (user_data >> 48) == PGR_LOOP_UD_TAG;
}

/*
 * Bind pool to ring for async calls, with room for max_ops operations in flight (acquires
 * waiting plus queries running; 0 = 1024). Returns 0, or -EINVAL for a NULL argument, or
 * -ENOMEM. The ring must outlive the loop; the loop must be destroyed before the pool.
 */
PGR_API int pgr_loop_create(pgr_pool *pool, struct io_uring *ring, uint32_t max_ops,
                            pgr_loop **out);
/*
 * Free the loop. Operations still in flight are completed first with -ECANCELED through their
 * callbacks: destroy prepares cancel SQEs and returns -EBUSY while any operation or CQE is
 * outstanding; keep submitting and reaping, and call it again. After the first call, new async
 * calls on the loop return -ESHUTDOWN.
 */
PGR_API int pgr_loop_destroy(pgr_loop *loop);
/*
 * Handle one of pgring's CQEs (callbacks may run from here). Returns 1 when it was pgring's,
 * 0 when not (left untouched). The caller still marks the CQE seen.
 */
PGR_API int pgr_loop_handle_cqe(pgr_loop *loop, const struct io_uring_cqe *cqe);
/* Operations in flight on the loop (acquires waiting, queries running, CQEs owed); 0 for NULL. */
PGR_API uint32_t pgr_loop_pending(const pgr_loop *loop);
/*
 * Prepare the SQEs that found the SQ ring full. pgring never fails an operation because the
 * caller's SQ is full: an SQE it cannot get is queued inside the loop and prepared at the start
 * of the next pgr_loop_* call on the loop (handle_cqe, acquire, query, pipeline, release,
 * flush, destroy). A loop that can fill its SQ calls this after each io_uring_submit, so that
 * queued waits are armed even when no pgring CQE is due. Returns how many still wait for room.
 */
PGR_API uint32_t pgr_loop_flush(pgr_loop *loop);

typedef void (*pgr_loop_acquire_cb)(pgr_loop *loop, int err, pgr_conn *conn, void *arg);
/*
 * Check out a connection without blocking the loop. Returns 0 when cb will be called (perhaps
 * already was, with an idle connection); or a negative error, cb not called: -ESHUTDOWN,
 * -PGR_E_TOO_MANY_WAITERS, -EBUSY (max_ops operations in flight; a full SQ ring is not an
 * error: see pgr_loop_flush), -EAGAIN (timeout_ms 0 and nothing idle that needs no round
 * trip), -EINVAL, -PGR_E_FORKED. cb gets err 0 and the
 * connection, or -ETIMEDOUT / -PGR_E_CONNECT_FAILED / -ESHUTDOWN / -ECANCELED, or
 * -PGR_E_TOO_MANY_WAITERS when the connection it got failed its pre-ping or checks and the
 * wait it went back to found max_waiters callers already waiting. Waits in the
 * same FIFO as pgr_acquire: a release serves blocking and async waiters in arrival order.
 * A connection that needs its pre-ping (ping_after_idle_ms) is pinged on the loop's ring.
 */
PGR_API int pgr_loop_acquire(pgr_loop *loop, int64_t timeout_ms, pgr_loop_acquire_cb cb, void *arg);

#define PGR_PIPELINE_MAX 16
typedef void (*pgr_loop_pipeline_cb)(pgr_loop *loop, int err, PGresult **results, int n, void *arg);
/*
 * Send n (1..PGR_PIPELINE_MAX) parameterised statements in one round trip (libpq pipeline
 * mode) and deliver their results together: results[i] is statement i's last result (its first
 * error if it failed; PGRES_PIPELINE_ABORTED for statements after a failed one). cb owns every
 * results[i] (PQclear each); the array itself is valid only during the call. nparams and params
 * may be NULL (no parameters); params[i] holds statement i's text parameters. err: 0, or
 * -ETIMEDOUT / -EIO with every results[i] NULL (the connection is then closed on return). The
 * statements run in one implicit transaction unless they contain their own BEGIN/COMMIT.
 * Returns 0, or a negative error with cb not called.
 */
PGR_API int pgr_loop_pipeline(pgr_loop *loop, pgr_conn *conn, int n, const char *const *sql,
                              const int *nparams, const char *const *const *params,
                              int64_t timeout_ms, pgr_loop_pipeline_cb cb, void *arg);

/*
 * Return a connection from the loop's thread. Like pgr_release (same errors), except that a
 * rollback (it was returned inside a transaction) or reset_sql runs on the loop's ring instead
 * of the manager's.
 */
PGR_API int pgr_loop_release(pgr_loop *loop, pgr_conn *conn);

typedef void (*pgr_loop_query_cb)(pgr_loop *loop, int err, PGresult *res, void *arg);
/*
 * Send a parameterised query (text parameters) on a checked-out connection and deliver its
 * result through the loop. cb owns res (PQclear it); res is the last result of the query, or
 * the first error result. err: 0 (check PQresultStatus), -ETIMEDOUT when timeout_ms (< 0: no
 * deadline) passed: the query is then cancelled from a helper thread (PostgreSQL 15's cancel
 * blocks) and the connection is marked so that its release closes it instead of handing it out
 * with a query still running; -EIO when the connection failed (res may say why).
 * Returns 0, or a negative error with cb not called (-EBUSY, -EINVAL, -EIO if the send failed,
 * -ENOMEM). One query at a time per connection.
 *
 * With cfg.prepare_loop_query set, texts used often on the connection go through its
 * prepared-statement cache, the one pgr_loop_exec uses (prepare_threshold, prepare_cache_size):
 * prepared once, then executed by name, in pipeline mode for that statement. A stale plan
 * (0A000, e.g. after ALTER TABLE) or a name the server no longer knows (26000, e.g. after the
 * holder's DISCARD ALL) is prepared again and the query re-sent once, transparently, when the
 * connection was outside a transaction block; inside one the error is the caller's (it aborted
 * their transaction) and the text's next use prepares it again. That re-send needs text and
 * parameters after the call: they are then copied into the loop's own record, a buffer kept for
 * reuse (no allocation once it is large enough). reset_sql makes the cache forget.
 */
PGR_API int pgr_loop_query(pgr_loop *loop, pgr_conn *conn, const char *sql, int nparams,
                           const char *const *params, int64_t timeout_ms, pgr_loop_query_cb cb,
                           void *arg);

typedef void (*pgr_loop_exec_cb)(pgr_loop *loop, int err, PGresult *res, void *arg);
/*
 * Run one parameterised autocommit statement on the pool, without checking out a connection.
 * pgring sends it on a connection the loop already holds for such statements, in pipeline
 * mode behind the others in flight there, each with its own sync point: one statement's error
 * never aborts another's. It takes another connection from the pool (never more than
 * exec_max_conns per loop) when every held one has exec_pipeline_depth statements in flight,
 * and gives connections back once idle for exec_idle_release_ms, or at pgr_loop_destroy.
 *
 * Autocommit only: each statement is its own transaction. BEGIN / START / COMMIT / ROLLBACK /
 * SAVEPOINT, SET / RESET / DISCARD, PREPARE / DEALLOCATE, LISTEN, DECLARE / FETCH, COPY and
 * LOCK (as the first keyword) are refused with -EINVAL and a PGR_EV_MISUSE event: transactions
 * and session state need a checked-out connection. What the text does not show (set_config()
 * inside a SELECT) is not caught: do not.
 *
 * sql and params are copied: they need not outlive the call. timeout_ms (< 0: none) bounds the
 * whole statement, the wait for a connection included; waiting for a connection is also bounded
 * by acquire_timeout_ms. Texts used often on a connection are prepared there (prepare_threshold;
 * see README) transparently, including a re-prepare when the plan's result type changed.
 *
 * exec_sync_group N > 1 (opt-in): up to N statements sent on one connection in one batch share
 * a sync point, so the server commits and answers once for them; only statements whose first
 * keyword is SELECT, INSERT, UPDATE, DELETE, MERGE, WITH, VALUES or TABLE join a group (the
 * rest, VACUUM or CREATE INDEX CONCURRENTLY among them, get a sync point of their own). The
 * caller still sees each statement on its own: results are held until the group's sync point
 * and delivered in order when it committed; when one statement failed, the server rolled back
 * the group, so that one gets its error and every other one runs again alone, with the rest of
 * its deadline, and completes after statements sent later. Re-running repeats only what a
 * rollback does not undo (nextval(), session advisory locks, dblink...). A deadlock (40P01) or
 * serialization failure (40001), which grouping itself can cause, and an error at the group's
 * commit (a deferred constraint) re-run the whole group.
 * Within a group the statements see one transaction: one now(), locks held to its end, and,
 * above read committed, one snapshot. A result comes no earlier than its group's last one.
 *
 * Returns 0 when cb will be called (perhaps already was), or, cb not called: -EBUSY (the loop
 * has exec_max_pending statements queued or in flight: back-pressure, retry after some
 * complete), -EINVAL (NULL, bad nparams, a refused statement), -ESHUTDOWN (loop destroyed or
 * pool draining), -ENOMEM, -PGR_E_FORKED.
 *
 * cb runs on the loop's thread and owns res (PQclear it). err: 0 (check PQresultStatus: an SQL
 * error is a PGRES_FATAL_ERROR result with err 0); -ETIMEDOUT (deadline passed, res NULL);
 * -EIO (the connection failed with the statement sent on it; res says why; the statement may or
 * may not have run); -ECANCELED (pgr_loop_destroy); -ESHUTDOWN (the pool began draining before
 * the statement was sent); or the error of the acquire that found no connection for it
 * (-ETIMEDOUT, -PGR_E_CONNECT_FAILED, -PGR_E_TOO_MANY_WAITERS). Callbacks of statements sent on
 * one connection run in the order sent (a statement re-run after its group failed counts as
 * sent again); statements on different connections complete independently. Threads: the
 * loop's. Never blocks. Since 0.2.
 */
PGR_API int pgr_loop_exec(pgr_loop *loop, const char *sql, int nparams, const char *const *params,
                          int64_t timeout_ms, pgr_loop_exec_cb cb, void *arg);

/*
 * Scoped checkout: the connection is released when the variable leaves scope (the cleanup
 * attribute of GCC and Clang, in C and C++).
 *
 *   PGR_SCOPED_CONN(c);
 *   if (pgr_acquire(pool, 100, &c) == 0) { ... PQexec(pgr_conn_pg(c), ...) ... }
 *   // released here, on every path out of the block
 *
 * pgr__conn_cleanup is the cleanup function the macro names: it releases *conn when it is not
 * NULL and sets it to NULL; not for direct use. Threads and blocking as pgr_release. Since 0.1.
 */
PGR_API void pgr__conn_cleanup(pgr_conn **conn);
#define PGR_SCOPED_CONN(var) pgr_conn *var __attribute__((cleanup(pgr__conn_cleanup))) = NULL

#ifdef __cplusplus
}
#endif
#endif /* PGRING_H */
