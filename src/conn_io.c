/* SPDX-License-Identifier: PostgreSQL */
/*
 * The network operations of one connection, run by the manager on its io_uring ring: connect
 * (PQconnectStartParams / PQconnectPoll), exec (ping, ROLLBACK, reset_sql), the liveness check
 * of a readable idle socket, and close. Each wait is one one-shot POLL_ADD on the fd PQsocket()
 * returns right now (libpq may switch sockets during connect) linked to an absolute
 * CLOCK_MONOTONIC timeout, the operation's deadline. A connection is
 * PQfinish'ed only once its poll has completed: a pending poll keeps the socket open, and its
 * CQE would name a dead slot.
 *
 * Manager-only: everything here runs on the manager (its thread, or pgr_pool_run's caller).
 */
#include <errno.h>
#include <stddef.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-events.h>

#include "exec.h"
#include "manager.h"
#include "pooler.h"
#include "replica.h"
#include "role.h"

struct io_uring_sqe *pgr__mgr_get_sqe(pgr_pool *p, unsigned need)
{
	/* Never split a linked pair across a submit. */
	struct io_uring *ring = &p->rt->ring;
	if (io_uring_sq_space_left(ring) < need)
		io_uring_submit(ring);
	return io_uring_get_sqe(ring);
}

/* Arm the one poll of c, bounded by its operation's deadline. */
static int arm(pgr_pool *p, struct pgr_conn *c, unsigned events)
{
	int fd = PQsocket(c->pg);
	if (fd < 0)
		return -EBADF;
	struct io_uring_sqe *s = pgr__mgr_get_sqe(p, 2);
	io_uring_prep_poll_add(s, fd, events);
	s->flags |= IOSQE_IO_LINK;
	c->io_gen++;
	io_uring_sqe_set_data64(s, pgr__mgr_tag(p, c->id, c->io_gen, TAG_POLL));
	pgr__ns_to_kts(c->op_deadline_ns, &c->ts);
	s = io_uring_get_sqe(&p->rt->ring);
	io_uring_prep_link_timeout(s, &c->ts, IORING_TIMEOUT_ABS);
	io_uring_sqe_set_data64(s, pgr__mgr_tag(p, c->id, c->io_gen, TAG_LTO));
	c->inflight += 2;
	c->armed = 1;
	return 0;
}

void pgr__mgr_cancel_poll(pgr_pool *p, struct pgr_conn *c)
{
	struct io_uring_sqe *s = pgr__mgr_get_sqe(p, 1);
	io_uring_prep_cancel64(s, pgr__mgr_tag(p, c->id, c->io_gen, TAG_POLL), 0);
	io_uring_sqe_set_data64(s, pgr__mgr_tag(p, c->id, c->io_gen, TAG_CANCEL));
	c->inflight++;
}

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
	/* A connect a stop cancelled (shutdown_all) never opened: no PGR_EV_CONN_OPENED, no
	 * connects_ok, so neither a close nor PGR_EV_CONN_CLOSED. */
	bool opened = c->op != PGR__OP_CONNECT;
	pgr__replica_closed(p, c, reason);
	if (c->pg) {
		PQfinish(c->pg);
		c->pg = NULL;
	}
	pgr__pcache_free(c); /* its prepared statements died with the session */
	c->op = PGR__OP_NONE;
	if (opened) {
		atomic_fetch_add_explicit(&p->c_closes[reason], 1, memory_order_relaxed);
		pgr__emitf(p, PGR_EV_CONN_CLOSED, c->id, "connection %u closed: %s", c->id,
		           pgr_close_reason_name(reason));
	}
	pgr__conn_move(c, PGR__FREE);
	if (c->uncounted)
		c->uncounted = 0;
	else
		atomic_fetch_sub_explicit(&p->nopen, 1, memory_order_relaxed);
}

/* Close c (manager-owned). Waits for its poll to complete first if one is in flight. */
void pgr__mgr_close(pgr_pool *p, struct pgr_conn *c, int reason)
{
	c->close_reason = (uint8_t)reason;
	unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
	if (st != PGR__CLOSING)
		pgr__conn_move(c, PGR__CLOSING);
	if (c->armed) {
		pgr__mgr_cancel_poll(p, c);
		return; /* finish_close runs when the poll's CQE arrives */
	}
	finish_close(p, c);
}

/* Hand a manager-owned, healthy connection back to callers (or close it if the pool closes). */
static void republish(pgr_pool *p, struct pgr_conn *c)
{
	c->op = PGR__OP_NONE;
	if (atomic_load_explicit(&p->closing, memory_order_relaxed)) {
		pgr__mgr_close(p, c, PGR_CLOSE_POOL_CLOSING);
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
	p->next_connect_ms = pgr__sat_add(now_ms, half + (int64_t)(rnd(p) % (uint64_t)(half + 1)));
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
	p->mgr_dirty = true; /* may end inside the round that started it (pgr__mgr_round) */
	atomic_fetch_add_explicit(&p->c_connects_failed, 1, memory_order_relaxed);
	atomic_store_explicit(&p->connect_failing, 1, memory_order_relaxed);
	pgr__set_last_error(p, msg);
	pgr__emitf(p, PGR_EV_CONNECT_FAILED, c->id, "connect failed: %s", msg);
	backoff_after_failure(p, pgr__now_ms(p));
	pgr__replica_connect_failed(p, c);
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
		expire =
		    pgr__sat_add(now, life) - (j > 0 ? (int64_t)(rnd(p) % (uint64_t)(j + 1)) : 0);
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
		pgr__mgr_close(p, c, PGR_CLOSE_POOL_CLOSING);
		return;
	}
	if (pgr__pooler_connected(p, c))
		return; /* asked first whether a pooler answers for the server */
	if (pgr__replica_connected(p, c))
		return; /* its standby's lag is measured first */
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

struct pgr_conn *pgr__mgr_free_slot(pgr_pool *p)
{
	for (uint32_t i = 0; i < p->cap; i++)
		if (atomic_load_explicit(&p->conns[i].state, memory_order_relaxed) == PGR__FREE)
			return &p->conns[i];
	return NULL;
}

static void start_attempt(pgr_pool *p, struct pgr_conn *c);

void pgr__mgr_start_connect(pgr_pool *p, struct pgr_conn *c)
{
	atomic_fetch_add_explicit(&p->nopen, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&p->nconnecting, 1, memory_order_relaxed);
	pgr__conn_move(c, PGR__CONNECTING);
	/* The slot's histograms are lazily backed (pool.h): their pages become resident here, on
	 * the manager, so that the checkout path's first records into them never fault. */
	pgr__lazy_populate(c->hist, sizeof(struct pgr__conn_hists));
	c->op = PGR__OP_CONNECT;
	c->op_start_ns = pgr__mono_ns();
	c->hosts_tried = 0;
	start_attempt(p, c);
}

/* One PQconnectStartParams: the first, or the next host's after one stalled. connect_timeout_ms
 * bounds each, as libpq's connect_timeout bounds each host. */
static void start_attempt(pgr_pool *p, struct pgr_conn *c)
{
	c->op_deadline_ns = pgr__sat_add(pgr__mono_ns(), pgr__ms_to_ns(p->cfg.connect_timeout_ms));
	/* Name resolution happens inside this call; hostaddr= avoids it (README). */
	pgr__hosts_rotate(p);
	c->pg = PQconnectStartParams(p->kw, p->val, 0);
	pgr__hosts_restore(p);
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

static void exec_sink(struct pgr__pq *x, int stmt, PGresult *r)
{
	struct pgr_conn *c = (struct pgr_conn *)((char *)x - offsetof(struct pgr_conn, pq));
	ExecStatusType st = PQresultStatus(r);
	if (c->op_after == AFTER_LAG)
		pgr__replica_sample(c, r);
	else if (c->op_after == AFTER_POOLER)
		pgr__pooler_sample(c, r);
	if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_EMPTY_QUERY)
		c->exec_failed = 1;
	PQclear(r);
}

static void exec_step(pgr_pool *p, struct pgr_conn *c, int revents)
{
	enum pgr__pq_want w = pgr__pq_step(&c->pq, revents);
	if (w == PGR__PQ_DONE)
		exec_done(p, c, !c->exec_failed);
	else if (w == PGR__PQ_ERROR || arm(p, c, (unsigned)pgr__pq_events(w)) < 0)
		exec_done(p, c, false);
}

/* sql NULL: the statement was sent by someone else (a loop that gave up): read it to the end. */
void pgr__mgr_start_exec(pgr_pool *p, struct pgr_conn *c, const char *sql, int64_t timeout_ms,
                         int after)
{
	unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
	if (st != PGR__MANAGED)
		pgr__conn_move(c, PGR__MANAGED);
	c->op = PGR__OP_EXEC;
	c->op_after = (uint8_t)after;
	c->exec_failed = 0;
	c->op_start_ns = pgr__mono_ns();
	c->op_deadline_ns = pgr__sat_add(c->op_start_ns, pgr__ms_to_ns(timeout_ms));
	c->pq = (struct pgr__pq){.pg = c->pg, .sink = exec_sink};
	if (sql && !pgr__pq_send_simple(c->pg, sql)) {
		exec_done(p, c, false);
		return;
	}
	exec_step(p, c, 0);
}

/* A return's rollback or reset has ended: the callers that waited when it began may have
 * left, and an overflow connection nobody waits for goes (pgr__surplus). */
static bool retire_surplus(pgr_pool *p, struct pgr_conn *c)
{
	int reason;
	if (!pgr__surplus(p, c, &reason))
		return false;
	pgr__mgr_close(p, c, reason);
	return true;
}

static void exec_done(pgr_pool *p, struct pgr_conn *c, bool ok)
{
	int after = c->op_after;
	c->op = PGR__OP_NONE;
	p->mgr_dirty = true; /* may end inside the round that started it (pgr__mgr_round) */
	if (ok && PQtransactionStatus(c->pg) != PQTRANS_IDLE)
		ok = false;
	if (ok && atomic_load_explicit(&c->server_error, memory_order_relaxed))
		ok = false;
	if (after == AFTER_LAG) {
		pgr__replica_measured(p, c, ok);
		return;
	}
	if (after == AFTER_POOLER) {
		pgr__pooler_checked(p, c, ok);
		return;
	}
	/* Whatever the statement was, its answer carried the server's role if it changed. */
	if (ok && !pgr__role_ok(p, c->pg)) {
		pgr__mgr_close(p, c, PGR_CLOSE_ROLE_CHANGED);
		return;
	}
	int64_t now = pgr__mono_ns() / 1000000;
	switch (after) {
	case PGR__REQ_PING:
	case AFTER_KEEPALIVE:
		atomic_fetch_add_explicit(&p->c_pings, 1, memory_order_relaxed);
		if (!ok) {
			atomic_fetch_add_explicit(&p->c_pings_failed, 1, memory_order_relaxed);
			pgr__mgr_close(p, c, PGR_CLOSE_PING_FAILED);
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
			pgr__mgr_close(p, c, PGR_CLOSE_RESET_FAILED);
			return;
		}
		atomic_fetch_add_explicit(&p->c_rollbacks, 1, memory_order_relaxed);
		if (retire_surplus(p, c))
			return;
		if (p->cfg.reset_sql) {
			pgr__mgr_start_exec(p, c, p->cfg.reset_sql, p->cfg.reset_timeout_ms,
			                    PGR__REQ_RESET);
			return;
		}
		republish(p, c);
		return;
	case PGR__REQ_CHECK:
		if (!ok) {
			atomic_fetch_add_explicit(&p->c_checks_failed, 1, memory_order_relaxed);
			pgr__mgr_close(p, c, PGR_CLOSE_BROKEN);
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
			pgr__mgr_close(p, c, PGR_CLOSE_RESET_FAILED);
			return;
		}
		atomic_fetch_add_explicit(&p->c_resets, 1, memory_order_relaxed);
		if (retire_surplus(p, c))
			return;
		pgr__pcache_forget(c); /* reset_sql may have dropped its prepared statements */
		republish(p, c);
		return;
	default:
		pgr__mgr_close(p, c, PGR_CLOSE_BROKEN);
	}
}

/* The socket of an idle connection was readable: read what came and decide. */
void pgr__mgr_check(pgr_pool *p, struct pgr_conn *c)
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
		pgr__mgr_close(p, c, PGR_CLOSE_BROKEN);
		return;
	}
	/*
	 * Looking alive proves little here: libpq gives an ErrorResponse that arrives while idle
	 * (the FATAL of a terminated backend) to the notice processor and stays CONNECTION_OK, and
	 * the backend closes its socket only after it has left pg_stat_activity, so the EOF may not
	 * have come yet. Whatever woke the socket (NOTIFY, ParameterStatus or that FATAL), one
	 * round trip settles it: a dying backend never answers.
	 */
	pgr__mgr_start_exec(p, c, "", p->cfg.ping_timeout_ms, PGR__REQ_CHECK);
}

/* The poll of c completed (res: revents, or -ECANCELED when its linked deadline fired). */
void pgr__mgr_poll_done(pgr_pool *p, struct pgr_conn *c, int res)
{
	c->armed = 0;
	unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
	if (st == PGR__CLOSING) {
		finish_close(p, c);
		return;
	}
	if (res == -ECANCELED) {
		/* The linked deadline fired. */
		if (c->op == PGR__OP_CONNECT) {
			char msg[384];
			const char *host = PQhost(c->pg), *port = PQport(c->pg);
			snprintf(msg, sizeof(msg),
			         "timeout expired after %lld ms (%s) at %s port %s",
			         (long long)p->cfg.connect_timeout_ms, p->connect_timeout_src,
			         host ? host : "?", port ? port : "?");
			/* A host that stalls (no answer at all) is not one libpq leaves for the
			 * next: this pool does, while hosts it has not stalled on remain. */
			if (!atomic_load_explicit(&p->closing, memory_order_relaxed) &&
			    pgr__hosts_stalled(p, c->pg, &c->hosts_tried) != UINT32_MAX) {
				/* Counted and reported as a failed connect to that host, without
				 * the backoff of a failed connect: another host may answer now. */
				pgr__scrub(p, msg);
				atomic_fetch_add_explicit(&p->c_connects_failed, 1,
				                          memory_order_relaxed);
				pgr__emitf(p, PGR_EV_CONNECT_FAILED, c->id,
				           "connect failed: %s; trying the next host", msg);
				PQfinish(c->pg);
				c->pg = NULL;
				start_attempt(p, c);
				return;
			}
			connect_failed(p, c, msg);
		} else {
			exec_done(p, c, false);
		}
		return;
	}
	int revents = res < 0 ? POLLERR : res;
	if (c->op == PGR__OP_CONNECT)
		connect_step(p, c);
	else if (c->op == PGR__OP_EXEC)
		exec_step(p, c, revents);
}
