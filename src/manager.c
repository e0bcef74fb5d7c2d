/*
 * The manager: one thread per pool with its own io_uring ring. It owns every network step of
 * a connection except the caller's own queries: connect, ping, rollback, reset, liveness check
 * and close; it keeps min_idle, opens connections for waiters, retires connections past their
 * lifetime or idle timeout, pings idle ones in the background and reports leaks.
 *
 * Concurrency: callers hand slots to the manager through a lock-free stack (push by CAS, the
 * manager takes the whole stack with one exchange, so there is no ABA) and wake it with an
 * eventfd that a READ on the ring completes. Everything below that is manager-only state.
 *
 * io_uring rules (PITFALLS.md 1, 2, 5): one one-shot POLL_ADD per connection at a time, on the
 * fd PQsocket() returns right now (libpq may switch sockets during connect), linked to an
 * absolute CLOCK_MONOTONIC timeout that is the operation's deadline; user_data carries
 * (slot, generation, tag), never a pointer; a connection is PQfinish'ed only once its poll has
 * completed, because a pending poll keeps the socket open and its CQE would name a dead slot.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <libpq-events.h>
#include <openssl/ssl.h>

#include "pool.h"

enum {
	TAG_POLL = 1,
	TAG_LTO,
	TAG_CANCEL,
	TAG_EVENTFD,
	TAG_TICK
};
enum {
	AFTER_KEEPALIVE = 100
}; /* op_after value for background pings */

static inline uint64_t tag(uint32_t id, uint32_t gen, unsigned t)
{
	return ((uint64_t)gen << 32) | ((uint64_t)id << 8) | t;
}

static struct io_uring_sqe *get_sqe(pgr_pool *p, unsigned need)
{
	/* Never split a linked pair across a submit. */
	if (io_uring_sq_space_left(&p->ring) < need)
		io_uring_submit(&p->ring);
	return io_uring_get_sqe(&p->ring);
}

static void ns_to_ts(int64_t ns, struct __kernel_timespec *ts)
{
	ts->tv_sec = ns / 1000000000;
	ts->tv_nsec = ns % 1000000000;
}

/* Arm the one poll of c, bounded by its operation's deadline. */
static int arm(pgr_pool *p, struct pgr_conn *c, unsigned events)
{
	int fd = PQsocket(c->pg);
	if (fd < 0)
		return -EBADF;
	struct io_uring_sqe *s = get_sqe(p, 2);
	io_uring_prep_poll_add(s, fd, events);
	s->flags |= IOSQE_IO_LINK;
	c->io_gen++;
	io_uring_sqe_set_data64(s, tag(c->id, c->io_gen, TAG_POLL));
	ns_to_ts(c->op_deadline_ns, &c->ts);
	s = io_uring_get_sqe(&p->ring);
	io_uring_prep_link_timeout(s, &c->ts, IORING_TIMEOUT_ABS);
	io_uring_sqe_set_data64(s, tag(c->id, c->io_gen, TAG_LTO));
	c->inflight += 2;
	c->armed = 1;
	return 0;
}

static void cancel_poll(pgr_pool *p, struct pgr_conn *c)
{
	struct io_uring_sqe *s = get_sqe(p, 1);
	io_uring_prep_cancel64(s, tag(c->id, c->io_gen, TAG_POLL), 0);
	io_uring_sqe_set_data64(s, tag(c->id, c->io_gen, TAG_CANCEL));
	c->inflight++;
}

static void arm_eventfd(pgr_pool *p)
{
	struct io_uring_sqe *s = get_sqe(p, 1);
	io_uring_prep_read(s, p->efd, &p->efd_buf, sizeof(p->efd_buf), 0);
	io_uring_sqe_set_data64(s, tag(0, 0, TAG_EVENTFD));
}

static void arm_tick(pgr_pool *p);

static uint64_t rnd(pgr_pool *p)
{
	/* xorshift64*: manager-only, seeded per pool; jitter needs spread, not secrecy. */
	p->rng ^= p->rng >> 12;
	p->rng ^= p->rng << 25;
	p->rng ^= p->rng >> 27;
	return p->rng * 2685821657736338717ull;
}

/* ---- close ---- */

static void finish_close(pgr_pool *p, struct pgr_conn *c)
{
	int reason = c->close_reason;
	if (c->pg) {
		PQfinish(c->pg);
		c->pg = NULL;
	}
	c->op = PGR__OP_NONE;
	atomic_fetch_add_explicit(&p->c_closes[reason], 1, memory_order_relaxed);
	pgr__emitf(p, PGR_EV_CONN_CLOSED, c->id, "connection %u closed: %s", c->id,
	           pgr_close_reason_name(reason));
	pgr__conn_move(c, PGR__FREE);
	if (c->uncounted)
		c->uncounted = 0;
	else
		atomic_fetch_sub_explicit(&p->nopen, 1, memory_order_relaxed);
}

/* Close c (manager-owned). Waits for its poll to complete first if one is in flight. */
static void close_conn(pgr_pool *p, struct pgr_conn *c, int reason)
{
	c->close_reason = (uint8_t)reason;
	unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
	if (st != PGR__CLOSING)
		pgr__conn_move(c, PGR__CLOSING);
	if (c->armed) {
		cancel_poll(p, c);
		return; /* finish_close runs when the poll's CQE arrives */
	}
	finish_close(p, c);
}

/* Hand a manager-owned, healthy connection back to callers (or close it if the pool closes). */
static void republish(pgr_pool *p, struct pgr_conn *c)
{
	c->op = PGR__OP_NONE;
	if (atomic_load_explicit(&p->closing, memory_order_relaxed)) {
		close_conn(p, c, PGR_CLOSE_POOL_CLOSING);
		return;
	}
	pgr__publish(p, c);
}

/* ---- connect ---- */

static void backoff_after_failure(pgr_pool *p, int64_t now_ms)
{
	p->consecutive_failures++;
	if (p->consecutive_failures == 1)
		p->backoff_ms = p->cfg.backoff_min_ms;
	else if (p->backoff_ms < p->cfg.backoff_max_ms / 2)
		p->backoff_ms *= 2;
	else
		p->backoff_ms = p->cfg.backoff_max_ms;
	/* Equal jitter: half fixed, half random, so pools that failed together do not retry
	 * together. */
	int64_t half = p->backoff_ms / 2;
	p->next_connect_ms = now_ms + half + (int64_t)(rnd(p) % (uint64_t)(half + 1));
}

static void connect_failed(pgr_pool *p, struct pgr_conn *c, const char *why)
{
	char msg[512];
	snprintf(msg, sizeof(msg), "%s", why && why[0] ? why : "connection failed");
	size_t n = strlen(msg);
	while (n && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
		msg[--n] = 0;
	for (char *q = msg; *q; q++)
		if (*q == '\n')
			*q = ' ';
	pgr__scrub(p, msg);
	atomic_fetch_add_explicit(&p->c_connects_failed, 1, memory_order_relaxed);
	atomic_store_explicit(&p->connect_failing, 1, memory_order_relaxed);
	pgr__set_last_error(p, msg);
	pgr__emitf(p, PGR_EV_CONNECT_FAILED, c->id, "connect failed: %s", msg);
	backoff_after_failure(p, pgr__now_ms(p));
	atomic_fetch_sub_explicit(&p->nconnecting, 1, memory_order_relaxed);
	if (c->pg) {
		PQfinish(c->pg);
		c->pg = NULL;
	}
	c->op = PGR__OP_NONE;
	pgr__conn_move(c, PGR__FREE);
	if (c->uncounted)
		c->uncounted = 0;
	else
		atomic_fetch_sub_explicit(&p->nopen, 1, memory_order_relaxed);
}

/* Marks a connection that saw an error meaning "this server is no longer what you wanted". */
static int result_watch(PGEventId id, void *info, void *pass)
{
	if (id == PGEVT_RESULTCREATE) {
		const PGresult *r = ((PGEventResultCreate *)info)->result;
		if (PQresultStatus(r) == PGRES_FATAL_ERROR) {
			const char *ss = PQresultErrorField(r, PG_DIAG_SQLSTATE);
			const char *sev = PQresultErrorField(r, PG_DIAG_SEVERITY_NONLOCALIZED);
			bool gone = (sev && (!strcmp(sev, "FATAL") || !strcmp(sev, "PANIC"))) ||
			            (ss && (!strcmp(ss, "57P01") || !strcmp(ss, "57P02") ||
			                    !strcmp(ss, "57P03") || !strcmp(ss, "25006")));
			if (gone)
				atomic_store_explicit(&((struct pgr_conn *)pass)->server_error, 1,
				                      memory_order_relaxed);
		}
	}
	return 1;
}

static void connected(pgr_pool *p, struct pgr_conn *c)
{
	PQsetnonblocking(c->pg, 1);
	if (!PQregisterEventProc(c->pg, result_watch, "pgring", c)) {
		connect_failed(p, c, "could not register the result watcher");
		return;
	}
	if (p->cfg.on_connect && p->cfg.on_connect(c->pg, p->cfg.user_data) != 0) {
		connect_failed(p, c, "on_connect callback rejected the connection");
		return;
	}
	int64_t now_ns = pgr__mono_ns(), now = now_ns / 1000000;
	int64_t life = p->cfg.max_lifetime_ms;
	int64_t expire = INT64_MAX;
	if (life > 0) {
		/* Jitter drawn once, at birth: connections opened together expire apart. */
		int64_t j = p->cfg.lifetime_jitter_ms;
		expire = now + life - (j > 0 ? (int64_t)(rnd(p) % (uint64_t)(j + 1)) : 0);
	}
	atomic_store_explicit(&c->expire_ms, expire, memory_order_relaxed);
	atomic_store_explicit(&c->idle_since_ms, now, memory_order_relaxed);
	atomic_store_explicit(&c->server_error, 0, memory_order_relaxed);
	atomic_store_explicit(&c->fresh, 1, memory_order_relaxed);
	c->last_keepalive_ms = now;
	pgr__hist_add(&c->hist[PGR_HIST_CONNECT], (uint64_t)(now_ns - c->op_start_ns));
	atomic_fetch_add_explicit(&p->c_connects_ok, 1, memory_order_relaxed);
	atomic_store_explicit(&p->connect_failing, 0, memory_order_relaxed);
	p->consecutive_failures = 0;
	p->backoff_ms = 0;
	atomic_fetch_sub_explicit(&p->nconnecting, 1, memory_order_relaxed);
	c->op = PGR__OP_NONE;
	pgr__emitf(p, PGR_EV_CONN_OPENED, c->id, "connection %u opened (backend pid %d)", c->id,
	           PQbackendPID(c->pg));
	if (atomic_load_explicit(&p->closing, memory_order_relaxed)) {
		close_conn(p, c, PGR_CLOSE_POOL_CLOSING);
		return;
	}
	pgr__publish(p, c);
}

static void connect_step(pgr_pool *p, struct pgr_conn *c)
{
	switch (PQconnectPoll(c->pg)) {
	case PGRES_POLLING_READING:
		if (arm(p, c, POLLIN) < 0)
			connect_failed(p, c, PQerrorMessage(c->pg));
		return;
	case PGRES_POLLING_WRITING:
		if (arm(p, c, POLLOUT) < 0)
			connect_failed(p, c, PQerrorMessage(c->pg));
		return;
	case PGRES_POLLING_OK:
		connected(p, c);
		return;
	default:
		connect_failed(p, c, PQerrorMessage(c->pg));
		return;
	}
}

static struct pgr_conn *free_slot(pgr_pool *p)
{
	for (uint32_t i = 0; i < p->cap; i++)
		if (atomic_load_explicit(&p->conns[i].state, memory_order_relaxed) == PGR__FREE)
			return &p->conns[i];
	return NULL;
}

static void start_connect(pgr_pool *p, struct pgr_conn *c)
{
	atomic_fetch_add_explicit(&p->nopen, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&p->nconnecting, 1, memory_order_relaxed);
	pgr__conn_move(c, PGR__CONNECTING);
	c->op = PGR__OP_CONNECT;
	c->op_start_ns = pgr__mono_ns();
	c->op_deadline_ns = c->op_start_ns + p->cfg.connect_timeout_ms * 1000000;
	/* Name resolution happens inside this call; hostaddr= avoids it (README). */
	c->pg = PQconnectStartParams(p->kw, p->val, 0);
	if (!c->pg) {
		connect_failed(p, c, "out of memory starting a connection");
		return;
	}
	if (PQstatus(c->pg) == CONNECTION_BAD) {
		connect_failed(p, c, PQerrorMessage(c->pg));
		return;
	}
	/* libpq: behave as if the last PQconnectPoll returned PGRES_POLLING_WRITING. */
	if (arm(p, c, POLLOUT) < 0)
		connect_failed(p, c, PQerrorMessage(c->pg));
}

/* ---- exec: ping, rollback, reset ---- */

static void exec_done(pgr_pool *p, struct pgr_conn *c, bool ok);

static void exec_read(pgr_pool *p, struct pgr_conn *c)
{
	for (;;) {
		if (!PQconsumeInput(c->pg)) {
			exec_done(p, c, false);
			return;
		}
		while (!PQisBusy(c->pg)) {
			PGresult *r = PQgetResult(c->pg);
			if (!r) {
				exec_done(p, c, !c->exec_failed);
				return;
			}
			ExecStatusType st = PQresultStatus(r);
			if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK &&
			    st != PGRES_EMPTY_QUERY)
				c->exec_failed = 1;
			PQclear(r);
		}
		/*
		 * OpenSSL may hold the rest of a record already read off the socket; a poll would
		 * then wait for bytes that never come (PITFALLS.md 2). Read again instead of
		 * arming.
		 */
		if (PQsslInUse(c->pg)) {
			SSL *ssl = PQsslStruct(c->pg, "OpenSSL");
			if (ssl && SSL_has_pending(ssl))
				continue;
		}
		break;
	}
	if (arm(p, c, POLLIN) < 0)
		exec_done(p, c, false);
}

static void exec_step(pgr_pool *p, struct pgr_conn *c, int revents)
{
	int f = PQflush(c->pg);
	if (f < 0) {
		exec_done(p, c, false);
		return;
	}
	if (f == 1) {
		/* Still sending: also wait for input, which the server may need us to read first.
		 */
		if ((revents & POLLIN) && !PQconsumeInput(c->pg)) {
			exec_done(p, c, false);
			return;
		}
		if (arm(p, c, POLLOUT | POLLIN) < 0)
			exec_done(p, c, false);
		return;
	}
	exec_read(p, c);
}

static void start_exec(pgr_pool *p, struct pgr_conn *c, const char *sql, int64_t timeout_ms,
                       int after)
{
	unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
	if (st != PGR__MANAGED)
		pgr__conn_move(c, PGR__MANAGED);
	c->op = PGR__OP_EXEC;
	c->op_after = (uint8_t)after;
	c->exec_failed = 0;
	c->op_start_ns = pgr__mono_ns();
	c->op_deadline_ns = c->op_start_ns + timeout_ms * 1000000;
	if (!PQsendQuery(c->pg, sql)) {
		exec_done(p, c, false);
		return;
	}
	exec_step(p, c, 0);
}

static void exec_done(pgr_pool *p, struct pgr_conn *c, bool ok)
{
	int after = c->op_after;
	c->op = PGR__OP_NONE;
	if (ok && PQtransactionStatus(c->pg) != PQTRANS_IDLE)
		ok = false;
	if (ok && atomic_load_explicit(&c->server_error, memory_order_relaxed))
		ok = false;
	int64_t now = pgr__mono_ns() / 1000000;
	switch (after) {
	case PGR__REQ_PING:
	case AFTER_KEEPALIVE:
		atomic_fetch_add_explicit(&p->c_pings, 1, memory_order_relaxed);
		if (!ok) {
			atomic_fetch_add_explicit(&p->c_pings_failed, 1, memory_order_relaxed);
			close_conn(p, c, PGR_CLOSE_PING_FAILED);
			return;
		}
		c->last_keepalive_ms = now;
		/*
		 * A pre-ping restarts the idle clock: the connection is on its way to a caller. A
		 * background keepalive must not, or idle_timeout_ms would never fire whenever
		 * keepalive_interval_ms is the shorter of the two.
		 */
		if (after == PGR__REQ_PING) {
			atomic_store_explicit(&c->idle_since_ms, now, memory_order_relaxed);
			atomic_store_explicit(&c->fresh, 1, memory_order_relaxed);
		}
		republish(p, c);
		return;
	case PGR__REQ_ROLLBACK:
		if (!ok) {
			atomic_fetch_add_explicit(&p->c_resets_failed, 1, memory_order_relaxed);
			close_conn(p, c, PGR_CLOSE_RESET_FAILED);
			return;
		}
		atomic_fetch_add_explicit(&p->c_rollbacks, 1, memory_order_relaxed);
		if (p->cfg.reset_sql) {
			start_exec(p, c, p->cfg.reset_sql, p->cfg.reset_timeout_ms, PGR__REQ_RESET);
			return;
		}
		republish(p, c);
		return;
	case PGR__REQ_CHECK:
		if (!ok) {
			atomic_fetch_add_explicit(&p->c_checks_failed, 1, memory_order_relaxed);
			close_conn(p, c, PGR_CLOSE_BROKEN);
			return;
		}
		/* Verified for the caller that found it readable, like a pre-ping. */
		atomic_store_explicit(&c->idle_since_ms, now, memory_order_relaxed);
		atomic_store_explicit(&c->fresh, 1, memory_order_relaxed);
		republish(p, c);
		return;
	case PGR__REQ_RESET:
		if (!ok) {
			atomic_fetch_add_explicit(&p->c_resets_failed, 1, memory_order_relaxed);
			close_conn(p, c, PGR_CLOSE_RESET_FAILED);
			return;
		}
		atomic_fetch_add_explicit(&p->c_resets, 1, memory_order_relaxed);
		republish(p, c);
		return;
	default:
		close_conn(p, c, PGR_CLOSE_BROKEN);
	}
}

/* The socket of an idle connection was readable: read what came and decide. */
static void check_conn(pgr_pool *p, struct pgr_conn *c)
{
	/* The first read hands a FATAL to the notice processor; only the second sees EOF. */
	for (int i = 0; i < 2 && PQstatus(c->pg) == CONNECTION_OK; i++) {
		if (!PQconsumeInput(c->pg))
			break;
		PGnotify *n;
		while ((n = PQnotifies(c->pg)) != NULL)
			PQfreemem(n);
		while (!PQisBusy(c->pg)) {
			PGresult *r = PQgetResult(c->pg);
			if (!r)
				break;
			PQclear(r);
		}
	}
	struct pollfd pfd = {.fd = PQsocket(c->pg), .events = POLLRDHUP};
	bool hup = pfd.fd < 0 || (poll(&pfd, 1, 0) > 0 && pfd.revents);
	if (PQstatus(c->pg) != CONNECTION_OK || hup ||
	    atomic_load_explicit(&c->server_error, memory_order_relaxed)) {
		atomic_fetch_add_explicit(&p->c_checks_failed, 1, memory_order_relaxed);
		close_conn(p, c, PGR_CLOSE_BROKEN);
		return;
	}
	/*
	 * Looking alive proves little here: libpq gives an ErrorResponse that arrives while idle
	 * (the FATAL of a terminated backend) to the notice processor and stays CONNECTION_OK, and
	 * the backend closes its socket only after it has left pg_stat_activity, so the EOF may not
	 * have come yet. Whatever woke the socket (NOTIFY, ParameterStatus or that FATAL), one
	 * round trip settles it: a dying backend never answers.
	 */
	start_exec(p, c, "", p->cfg.ping_timeout_ms, PGR__REQ_CHECK);
}

/* ---- requests from callers ---- */

void pgr__manager_wake(pgr_pool *p)
{
	uint64_t one = 1;
	ssize_t r = write(p->efd, &one, sizeof(one));
	(void)r; /* EAGAIN means the counter is already non-zero: the manager will wake anyway. */
}

void pgr__manager_push(pgr_pool *p, struct pgr_conn *c, enum pgr__req req, int reason)
{
	c->req = (uint8_t)req;
	c->close_reason = (uint8_t)reason;
	uint32_t head = atomic_load_explicit(&p->req_head, memory_order_relaxed);
	do {
		atomic_store_explicit(&c->req_next, head, memory_order_relaxed);
		/* release: the manager's acquire exchange sees the slot as its owner left it. */
	} while (!atomic_compare_exchange_weak_explicit(
	    &p->req_head, &head, c->id, memory_order_release, memory_order_relaxed));
	pgr__manager_wake(p);
}

static void take_requests(pgr_pool *p)
{
	uint32_t id = atomic_exchange_explicit(&p->req_head, PGR__NONE, memory_order_acquire);
	while (id != PGR__NONE) {
		struct pgr_conn *c = &p->conns[id];
		id = atomic_load_explicit(&c->req_next, memory_order_relaxed);
		switch (c->req) {
		case PGR__REQ_ROLLBACK:
			start_exec(p, c, "ROLLBACK", p->cfg.reset_timeout_ms, PGR__REQ_ROLLBACK);
			break;
		case PGR__REQ_RESET:
			start_exec(p, c, p->cfg.reset_sql, p->cfg.reset_timeout_ms, PGR__REQ_RESET);
			break;
		case PGR__REQ_PING:
			start_exec(p, c, "", p->cfg.ping_timeout_ms, PGR__REQ_PING);
			break;
		case PGR__REQ_CHECK:
			pgr__conn_move(c, PGR__MANAGED);
			check_conn(p, c);
			break;
		default:
			close_conn(p, c, c->close_reason);
			break;
		}
	}
}

/* ---- completions ---- */

static void on_cqe(pgr_pool *p, struct io_uring_cqe *cqe)
{
	uint64_t ud = io_uring_cqe_get_data64(cqe);
	unsigned t = ud & 0xff;
	if (t == TAG_TICK) {
		if (!atomic_load_explicit(&p->mgr_stop, memory_order_relaxed))
			arm_tick(p);
		return;
	}
	if (t == TAG_EVENTFD) {
		if (!atomic_load_explicit(&p->mgr_stop, memory_order_relaxed))
			arm_eventfd(p);
		else
			p->efd_buf = UINT64_MAX; /* marks the read as reaped */
		return;
	}
	uint32_t id = (uint32_t)(ud >> 8) & 0xffffff;
	uint32_t gen = (uint32_t)(ud >> 32);
	if (id >= p->cap)
		return;
	struct pgr_conn *c = &p->conns[id];
	c->inflight--;
	if (t != TAG_POLL || gen != c->io_gen)
		return; /* link timeouts and cancels only balance inflight */
	c->armed = 0;
	unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
	if (st == PGR__CLOSING) {
		finish_close(p, c);
		return;
	}
	if (cqe->res == -ECANCELED) {
		/* The linked deadline fired. */
		if (c->op == PGR__OP_CONNECT) {
			char msg[128];
			snprintf(msg, sizeof(msg),
			         "timeout expired after %lld ms (connect_timeout_ms)",
			         (long long)p->cfg.connect_timeout_ms);
			connect_failed(p, c, msg);
		} else {
			exec_done(p, c, false);
		}
		return;
	}
	int revents = cqe->res < 0 ? POLLERR : cqe->res;
	if (c->op == PGR__OP_CONNECT)
		connect_step(p, c);
	else if (c->op == PGR__OP_EXEC)
		exec_step(p, c, revents);
}

/* ---- periodic work ---- */

static void maintain(pgr_pool *p, int64_t now)
{
	bool closing = atomic_load_explicit(&p->closing, memory_order_relaxed);
	uint32_t open = atomic_load_explicit(&p->nopen, memory_order_relaxed);
	const pgr_config *cfg = &p->cfg;
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
		if (st == PGR__IDLE) {
			int64_t idle_since =
			    atomic_load_explicit(&c->idle_since_ms, memory_order_relaxed);
			int reason = -1;
			bool ping = false;
			if (closing)
				reason = PGR_CLOSE_POOL_CLOSING;
			else if (now >= atomic_load_explicit(&c->expire_ms, memory_order_relaxed))
				reason = PGR_CLOSE_MAX_LIFETIME;
			else if (cfg->idle_timeout_ms > 0 && open > cfg->min_idle &&
			         now - idle_since >= cfg->idle_timeout_ms)
				reason = PGR_CLOSE_IDLE_TIMEOUT;
			else if (cfg->keepalive_interval_ms > 0 &&
			         now - (idle_since > c->last_keepalive_ms ? idle_since
			                                                  : c->last_keepalive_ms) >=
			             cfg->keepalive_interval_ms)
				ping = true;
			if ((reason < 0 && !ping) || !pgr__claim_idle(p, c))
				continue;
			if (ping) {
				start_exec(p, c, "", cfg->ping_timeout_ms, AFTER_KEEPALIVE);
			} else {
				if (reason == PGR_CLOSE_IDLE_TIMEOUT)
					open--;
				close_conn(p, c, reason);
			}
		} else if (st == PGR__IN_USE && cfg->leak_threshold_ms > 0) {
			/* Checkouts so far, + 1 so that 0 means "never reported". */
			uint64_t seq = atomic_load_explicit(&c->n_immediate, memory_order_relaxed) +
			               atomic_load_explicit(&c->n_waits, memory_order_relaxed) + 1;
			int64_t held =
			    now - atomic_load_explicit(&c->acquired_ms, memory_order_relaxed);
			if (held < cfg->leak_threshold_ms || seq == c->leak_seq_reported)
				continue;
			c->leak_seq_reported = seq;
			atomic_fetch_add_explicit(&p->c_leaks, 1, memory_order_relaxed);
			if (!cfg->on_event)
				continue;
			char msg[512];
			const char *file = atomic_load_explicit(&c->acq_file, memory_order_relaxed);
			const char *func = atomic_load_explicit(&c->acq_func, memory_order_relaxed);
			int line = atomic_load_explicit(&c->acq_line, memory_order_relaxed);
			snprintf(
			    msg, sizeof(msg),
			    "connection %u held for %lld ms (leak_threshold_ms %lld), acquired at "
			    "%s:%d (%s)",
			    c->id, (long long)held, (long long)cfg->leak_threshold_ms,
			    file ? file : "?", line, func ? func : "?");
			pgr_event ev = {.type = PGR_EV_LEAK_SUSPECTED,
			                .message = msg,
			                .conn_id = c->id,
			                .held_ms = held,
			                .file = file,
			                .line = line,
			                .func = func};
			cfg->on_event(&ev, cfg->user_data);
		}
	}
}

/* Open connections for waiters, for min_idle and for try_acquire callers, within limits. */
static void grow(pgr_pool *p, int64_t now)
{
	if (atomic_load_explicit(&p->closing, memory_order_relaxed) || now < p->next_connect_ms)
		return;
	/* While the server fails, probe with one connect at a time: no storm. */
	uint32_t limit = p->consecutive_failures ? 1 : p->cfg.max_connecting;
	uint32_t idle = pgr__idle_count(p);
	for (;;) {
		uint32_t connecting = atomic_load_explicit(&p->nconnecting, memory_order_relaxed);
		uint32_t open = atomic_load_explicit(&p->nopen, memory_order_relaxed);
		uint32_t waiting = atomic_load_explicit(&p->nwaiters, memory_order_relaxed);
		if (connecting >= limit)
			return;
		bool for_waiters = waiting > connecting && open < p->cap;
		bool for_min = idle + connecting < p->cfg.min_idle && open < p->cfg.max_size;
		bool for_try = atomic_load_explicit(&p->demand, memory_order_relaxed) > 0 &&
		               open < p->cfg.max_size;
		if (!for_waiters && !for_min && !for_try)
			return;
		if (for_try && !for_waiters && !for_min)
			atomic_store_explicit(&p->demand, 0, memory_order_relaxed);
		struct pgr_conn *c = free_slot(p);
		if (!c)
			return;
		start_connect(p, c);
		if (p->consecutive_failures)
			return;
	}
}

static bool all_closed(pgr_pool *p)
{
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
		if ((st != PGR__FREE && st != PGR__IN_USE) || c->inflight)
			return false;
	}
	return true;
}

/* Stop: close everything the manager can reach; in-use connections stay with their holders. */
static void shutdown_all(pgr_pool *p)
{
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
		if (st == PGR__IDLE) {
			if (pgr__claim_idle(p, c))
				close_conn(p, c, PGR_CLOSE_POOL_CLOSING);
		} else if (st == PGR__CONNECTING) {
			if (c->armed) {
				cancel_poll(p, c);
				atomic_fetch_sub_explicit(&p->nconnecting, 1, memory_order_relaxed);
				pgr__conn_move(c, PGR__CLOSING);
				c->close_reason = PGR_CLOSE_POOL_CLOSING;
			}
		} else if (st == PGR__MANAGED) {
			close_conn(p, c, PGR_CLOSE_POOL_CLOSING);
		}
	}
}

/*
 * One round of the manager's work: publish the clock, take requests, maintain, grow, submit,
 * and handle what completed. wait: block in the ring up to one tick (the manager thread);
 * otherwise return at once (pgr_pool_run, on a caller's event loop). Returns true once a stop
 * has closed everything the manager can reach.
 */
static bool manager_round(pgr_pool *p, bool wait)
{
	int64_t now = pgr__mono_ns() / 1000000;
	atomic_store_explicit(&p->now_ms, now, memory_order_relaxed);
	take_requests(p);
	bool stop = atomic_load_explicit(&p->mgr_stop, memory_order_acquire);
	if (stop) {
		shutdown_all(p);
		io_uring_submit(&p->ring);
		if (all_closed(p))
			return true;
	} else {
		if (now - p->last_tick_ms >= PGR__TICK_MS) {
			p->last_tick_ms = now;
			maintain(p, now);
		}
		grow(p, now);
	}
	struct io_uring_cqe *cqe;
	if (wait) {
		struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = PGR__TICK_MS * 1000000};
		int r = io_uring_submit_and_wait_timeout(&p->ring, &cqe, 1, &ts, NULL);
		if (r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
			pgr__emitf(p, PGR_EV_CONFIG_ERROR, PGR__NONE,
			           "manager: io_uring wait failed: %s", strerror(-r));
			usleep(1000);
		}
	} else {
		io_uring_submit(&p->ring);
	}
	unsigned head, n = 0;
	io_uring_for_each_cqe (&p->ring, head, cqe) {
		on_cqe(p, cqe);
		n++;
	}
	io_uring_cq_advance(&p->ring, n);
	if (!wait && n)
		io_uring_submit(&p->ring); /* what the completions armed goes out now */
	return false;
}

static void *manager_main(void *arg)
{
	pgr_pool *p = arg;
	arm_eventfd(p);
	while (!manager_round(p, true))
		;
	return NULL;
}

/*
 * Without a manager thread the ring's own clock is a timeout SQE, re-armed on every CQE, and
 * an eventfd registered with the ring tells the caller's loop that pgr_pool_run has work.
 */
static void arm_tick(pgr_pool *p)
{
	static const struct __kernel_timespec tick = {.tv_sec = 0,
	                                              .tv_nsec = PGR__TICK_MS * 1000000};
	struct io_uring_sqe *s = get_sqe(p, 1);
	io_uring_prep_timeout(s, (struct __kernel_timespec *)&tick, 0, 0);
	io_uring_sqe_set_data64(s, tag(0, 0, TAG_TICK));
}

int pgr_pool_fd(pgr_pool *p)
{
	if (!p)
		return -EINVAL;
	return p->cfg.manager_thread ? -EINVAL : p->notify_fd;
}

int pgr_pool_run(pgr_pool *p)
{
	if (!p || p->cfg.manager_thread)
		return -EINVAL;
	if (!p->mgr_started)
		return -ESHUTDOWN;
	uint64_t v;
	/* Reset the notification first: CQEs posted from here on signal it again. */
	ssize_t r = read(p->notify_fd, &v, sizeof(v));
	(void)r;
	manager_round(p, false);
	return 0;
}

int pgr__manager_start(pgr_pool *p)
{
	p->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (p->efd < 0)
		return -errno;
	unsigned entries = 64;
	while (entries < 2 * p->cap + 16 && entries < 4096)
		entries <<= 1;
	int r = io_uring_queue_init(entries, &p->ring, 0);
	if (r < 0) {
		close(p->efd);
		p->efd = -1;
		return r;
	}
	p->rng = (uint64_t)pgr__mono_ns() ^ (uint64_t)(uintptr_t)p ^ 0x9e3779b97f4a7c15ull;
	atomic_store_explicit(&p->now_ms, pgr__mono_ns() / 1000000, memory_order_relaxed);
	if (!p->cfg.manager_thread) {
		p->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (p->notify_fd < 0 || io_uring_register_eventfd(&p->ring, p->notify_fd) < 0) {
			r = -errno;
			if (p->notify_fd >= 0)
				close(p->notify_fd);
			p->notify_fd = -1;
			io_uring_queue_exit(&p->ring);
			close(p->efd);
			p->efd = -1;
			return r ? r : -EIO;
		}
		arm_eventfd(p);
		arm_tick(p);
		io_uring_submit(&p->ring);
		/* The first round, so min_idle connects start without waiting for the loop. */
		manager_round(p, false);
		p->mgr_started = 1;
		return 0;
	}
	r = pthread_create(&p->mgr_thread, NULL, manager_main, p);
	if (r != 0) {
		io_uring_queue_exit(&p->ring);
		close(p->efd);
		p->efd = -1;
		return -r;
	}
	p->mgr_started = 1;
	return 0;
}

/* External mode: the caller's thread (drain/destroy run there) turns the crank meanwhile. */
void pgr__manager_poke(pgr_pool *p)
{
	if (!p->cfg.manager_thread && p->mgr_started)
		manager_round(p, false);
}

void pgr__manager_stop(pgr_pool *p)
{
	if (!p->mgr_started)
		return;
	atomic_store_explicit(&p->mgr_stop, 1, memory_order_release);
	if (p->cfg.manager_thread) {
		pgr__manager_wake(p);
		pthread_join(p->mgr_thread, NULL);
	} else {
		/* Bounded: every close waits at most for its poll's cancel CQE. */
		int64_t deadline = pgr__mono_ns() + 5000000000LL;
		while (!manager_round(p, false) && pgr__mono_ns() < deadline)
			usleep(200);
		close(p->notify_fd);
		p->notify_fd = -1;
	}
	p->mgr_started = 0;
	io_uring_queue_exit(&p->ring);
	close(p->efd);
	p->efd = -1;
}
