/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgr_http_server: an HTTP/1.1 server on io_uring that answers GET /user/<id> from a
 * PostgreSQL table through pgring's async API, and GET /metrics with the pool's Prometheus text.
 *
 *   pgr_http_server --listen 127.0.0.1:8080 --conninfo 'host=... dbname=...'
 *                   [--threads N] [--pool-size N] [--mode pool|exec|connect] ...
 *
 * Threads: one worker per core, each with its own io_uring ring, its own pgr_loop and its own
 * SO_REUSEPORT listening socket on the same port. The kernel spreads new connections over
 * the sockets and a connection stays on the worker that accepted it, so workers share nothing
 * but the pool, which is built to be shared (a checkout is a CAS on the caller's CPU shard).
 * The main thread only parses options, creates the pool and listeners, then waits for
 * SIGINT/SIGTERM and tells each worker to stop through an eventfd read armed on its ring.
 *
 * A worker's ring carries three kinds of operations: its own socket I/O (accept, recv, send,
 * cancel, the eventfd read), whose user_data is a pointer with the operation kind in its low
 * bits; and pgring's, recognised by pgr_loop_owns() and handed to pgr_loop_handle_cqe().
 * Pointers never carry pgring's tag in their top 16 bits (see pgring.h), so the two never
 * collide.
 *
 * A connection has at most one socket operation in flight, and none while its request waits
 * for the database: requests on one connection are answered in order (pipelining included)
 * by a small state machine, conn_advance(). Connection records live in a fixed per-worker
 * table with a free list; their buffers are allocated when a slot is first used and kept, so
 * the request path does not allocate.
 *
 * Shutdown: close the listeners (cancel the accept), cancel reads of idle keep-alive
 * connections, finish requests already at the database (their responses say
 * "Connection: close"), then destroy the loops and the pool. After --drain-ms the rest is
 * cancelled.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "http.h"
#include "pgring.h"

#define USER_SQL "select id, name, email from pgr_demo_users where id = $1"

enum {
	RBUF_CAP = 8192
}; /* request head (and any body we skip) must fit */
enum {
	WBUF_FLUSH = 16384
}; /* stop answering pipelined requests and send first */

/* Low bits of our user_data: which operation a CQE belongs to. */
enum {
	K_RECV = 1, /* pointer: struct hconn */
	K_SEND,     /* pointer: struct hconn */
	K_ACCEPT,   /* pointer: struct worker */
	K_WAKE,     /* pointer: struct worker */
	K_CANCEL,   /* the CQE of a cancel request; nothing to do */
	K_MASK = 7,
};

enum {
	IO_NONE = 0,
	IO_RECV,
	IO_SEND
};

/* Response counters by status, shown in /metrics next to the pool's. */
enum {
	C_200,
	C_400,
	C_404,
	C_500,
	C_503,
	C_OTHER,
	C_N
};
static const int code_of[C_N] = {200, 400, 404, 500, 503, 0};

struct server;
struct worker;

struct hconn {
	struct worker *w;
	int fd;           /* -1 when the slot is free */
	uint8_t io;       /* the one socket operation in flight: IO_NONE, IO_RECV, IO_SEND */
	bool cancel_sent; /* a cancel of that operation was requested */
	bool db_busy;     /* an acquire or query is in flight; no socket operation meanwhile */
	bool advancing;   /* inside conn_advance: callbacks run inline must not re-enter it */
	bool close_after; /* answer what was parsed, then close */
	uint32_t next_free;
	uint32_t rlen;
	size_t skip;     /* bytes of a request body still to discard */
	char *rbuf;      /* RBUF_CAP bytes */
	struct hbuf out; /* responses not yet sent; out.p[woff..len) goes next */
	size_t woff;
	pgr_conn *pg;   /* checked out for the request in progress */
	char param[16]; /* the id, as the query's text parameter */
} __attribute__((aligned(16)));

struct worker {
	struct server *srv;
	int idx;
	int listen_fd;
	int wake_fd;
	pthread_t thread;
	struct io_uring ring;
	pgr_loop *loop;
	struct hconn *conns;
	uint32_t free_head;
	uint32_t live;
	bool stopping, forced, accept_armed, wake_armed, multishot;
	int64_t drain_deadline_ns;
	uint64_t wake_buf;
	struct hbuf scratch; /* response bodies are built here, then framed into hconn.out */
	time_t date_sec;
	char date[40];
	/* Written by this worker only, read by any worker serving /metrics. */
	_Atomic uint64_t responses[C_N];
} __attribute__((aligned(64)));

struct server {
	const char *conninfo;
	bool connect_mode;
	bool exec_mode; /* pgr_loop_exec: no checkout per request, pipelined and prepared */
	bool verbose;
	uint32_t nthreads;
	uint32_t pool_size;
	uint32_t max_conns; /* per worker */
	int64_t acquire_timeout_ms;
	int64_t query_timeout_ms;
	int64_t drain_ms;
	pgr_pool *pool;
	struct worker *workers;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	uint32_t ready;
	int failed;
	_Atomic int64_t last_log_ms[16];
};

static int64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline uint64_t ud_of(const void *p, unsigned kind)
{
	return (uint64_t)(uintptr_t)p | kind;
}

/* An SQE from the worker's ring; when the SQ is full, submit what is there first. */
static struct io_uring_sqe *sqe_get(struct worker *w)
{
	struct io_uring_sqe *s = io_uring_get_sqe(&w->ring);
	if (!s) {
		io_uring_submit(&w->ring);
		s = io_uring_get_sqe(&w->ring);
	}
	return s;
}

static const char *http_date(struct worker *w)
{
	time_t now = time(NULL);
	if (now != w->date_sec) {
		struct tm tm;
		gmtime_r(&now, &tm);
		strftime(w->date, sizeof(w->date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
		w->date_sec = now;
	}
	return w->date;
}

/* ---- pool events ---- */

/*
 * Connection opens and closes only with --verbose; failures always, but at most one line a
 * second per kind: under overload every acquire timeout is an event, and a worker stuck
 * writing log lines would make the overload worse.
 */
static void on_pool_event(const pgr_event *ev, void *user_data)
{
	struct server *srv = user_data;
	if (srv->verbose) {
		pgr_event_log_stderr(ev, NULL);
		return;
	}
	if (ev->type == PGR_EV_CONN_OPENED || ev->type == PGR_EV_CONN_CLOSED ||
	    ev->type == PGR_EV_POOL_EXHAUSTED)
		return;
	int64_t now_ms = mono_ns() / 1000000;
	_Atomic int64_t *last = &srv->last_log_ms[(unsigned)ev->type & 15];
	int64_t prev = atomic_load_explicit(last, memory_order_relaxed);
	if (now_ms - prev < 1000 ||
	    !atomic_compare_exchange_strong_explicit(last, &prev, now_ms, memory_order_relaxed,
	                                             memory_order_relaxed))
		return;
	pgr_event_log_stderr(ev, NULL);
}

/* ---- responses ---- */

static void count_response(struct worker *w, int status)
{
	int i = C_OTHER;
	for (int k = 0; k < C_OTHER; k++)
		if (code_of[k] == status)
			i = k;
	/* Single writer: a relaxed load and store, no read-modify-write needed. */
	uint64_t v = atomic_load_explicit(&w->responses[i], memory_order_relaxed);
	atomic_store_explicit(&w->responses[i], v + 1, memory_order_relaxed);
}

static void respond(struct hconn *c, int status, const char *ctype, const char *body, size_t n)
{
	struct worker *w = c->w;
	if (w->stopping)
		c->close_after = true;
	if (http_response(&c->out, status, ctype, body, n, c->close_after, http_date(w)) != 0) {
		/* Out of memory: nothing sensible to say, drop the connection after what is queued.
		 */
		c->close_after = true;
		return;
	}
	count_response(w, status);
}

static void respond_error(struct hconn *c, int status, const char *msg)
{
	struct hbuf *b = &c->w->scratch;
	b->len = 0;
	if (hbuf_puts(b, "{\"error\":") || hbuf_json_string(b, msg) || hbuf_puts(b, "}\n")) {
		respond(c, status, "application/json", "", 0);
		return;
	}
	respond(c, status, "application/json", b->p, b->len);
}

/* 200 with the row as JSON, or 404 when the query found none. */
static void respond_row(struct hconn *c, PGresult *res)
{
	if (PQntuples(res) == 0) {
		respond_error(c, 404, "no such user");
		return;
	}
	struct hbuf *b = &c->w->scratch;
	b->len = 0;
	int rc = hbuf_puts(b, "{\"id\":") || hbuf_puts(b, PQgetvalue(res, 0, 0));
	static const char *const keys[] = {NULL, ",\"name\":", ",\"email\":"};
	for (int col = 1; col <= 2 && !rc; col++) {
		rc = hbuf_puts(b, keys[col]);
		if (!rc)
			rc = PQgetisnull(res, 0, col)
			         ? hbuf_puts(b, "null")
			         : hbuf_json_string(b, PQgetvalue(res, 0, col));
	}
	if (rc || hbuf_puts(b, "}\n")) {
		respond_error(c, 500, "out of memory");
		return;
	}
	respond(c, 200, "application/json", b->p, b->len);
}

static void respond_metrics(struct hconn *c)
{
	struct worker *w = c->w;
	struct server *srv = w->srv;
	struct hbuf *b = &w->scratch;
	b->len = 0;
	if (srv->pool) {
		/* Like snprintf: the return value is the length needed; grow once and ask again. */
		size_t need = pgr_pool_prometheus(srv->pool, b->p, b->cap);
		if (need >= b->cap) {
			if (hbuf_reserve(b, need + 1)) {
				respond_error(c, 500, "out of memory");
				return;
			}
			need = pgr_pool_prometheus(srv->pool, b->p, b->cap);
		}
		b->len = need < b->cap ? need : b->cap - 1;
	}
	int rc = hbuf_puts(b, "# HELP pgr_http_responses_total HTTP responses sent, by status.\n"
	                      "# TYPE pgr_http_responses_total counter\n");
	for (int k = 0; k < C_N && !rc; k++) {
		uint64_t sum = 0;
		for (uint32_t i = 0; i < srv->nthreads; i++)
			sum += atomic_load_explicit(&srv->workers[i].responses[k],
			                            memory_order_relaxed);
		if (code_of[k])
			rc = hbuf_printf(b, "pgr_http_responses_total{code=\"%d\"} %" PRIu64 "\n",
			                 code_of[k], sum);
		else
			rc = hbuf_printf(
			    b, "pgr_http_responses_total{code=\"other\"} %" PRIu64 "\n", sum);
	}
	if (rc) {
		respond_error(c, 500, "out of memory");
		return;
	}
	respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", b->p, b->len);
}

/* ---- the database ---- */

static void conn_advance(struct hconn *c);

static void db_done(struct hconn *c)
{
	c->db_busy = false;
	if (!c->advancing)
		conn_advance(c);
}

static void on_query(pgr_loop *loop, int err, PGresult *res, void *arg)
{
	struct hconn *c = arg;
	/*
	 * Release first: the result is ours, the connection is no longer needed, and every
	 * microsecond it stays checked out is one another request waits. A connection whose query
	 * timed out or failed is closed by the release, never handed out again.
	 */
	pgr_loop_release(loop, c->pg);
	c->pg = NULL;
	if (err == 0 && PQresultStatus(res) == PGRES_TUPLES_OK)
		respond_row(c, res);
	else if (err == -ECANCELED)
		respond_error(c, 503, "server shutting down");
	else if (err)
		respond_error(c, 500, pgr_strerror(err));
	else
		respond_error(c, 500, PQresultErrorMessage(res));
	PQclear(res);
	db_done(c);
}

static void on_acquire(pgr_loop *loop, int err, pgr_conn *pg, void *arg)
{
	struct hconn *c = arg;
	if (err) {
		/* Pool timeout, server down, or shutting down: all "try again later". */
		respond_error(c, 503, pgr_strerror(err));
		db_done(c);
		return;
	}
	c->pg = pg;
	const char *params[1] = {c->param};
	int rc =
	    pgr_loop_query(loop, pg, USER_SQL, 1, params, c->w->srv->query_timeout_ms, on_query, c);
	if (rc) {
		pgr_loop_release(loop, pg);
		c->pg = NULL;
		respond_error(c, rc == -EBUSY ? 503 : 500, pgr_strerror(rc));
		db_done(c);
	}
}

/*
 * --mode exec: the statement goes to pgr_loop_exec, which pipelines it behind others on a
 * connection the loop holds and, after a few uses, runs it as a prepared statement: no
 * checkout per request, and no parse and plan per request on the server.
 */
static void on_exec(pgr_loop *loop, int err, PGresult *res, void *arg)
{
	(void)loop;
	struct hconn *c = arg;
	if (err == 0 && PQresultStatus(res) == PGRES_TUPLES_OK)
		respond_row(c, res);
	else if (err == -ECANCELED || err == -ESHUTDOWN)
		respond_error(c, 503, "server shutting down");
	else if (err)
		respond_error(c, err == -EBUSY || err == -ETIMEDOUT ? 503 : 500, pgr_strerror(err));
	else
		respond_error(c, 500, PQresultErrorMessage(res));
	PQclear(res);
	db_done(c);
}

/* Start the lookup; its callbacks may run before this returns (an idle connection was there). */
static void start_lookup(struct hconn *c)
{
	struct worker *w = c->w;
	c->db_busy = true;
	if (!w->loop) {
		respond_error(c, 503, "server shutting down");
		c->db_busy = false;
		return;
	}
	if (w->srv->exec_mode) {
		const char *params[1] = {c->param};
		int rc = pgr_loop_exec(w->loop, USER_SQL, 1, params, w->srv->query_timeout_ms,
		                       on_exec, c);
		if (rc) {
			respond_error(c, 503, pgr_strerror(rc));
			c->db_busy = false;
		}
		return;
	}
	int rc = pgr_loop_acquire(w->loop, w->srv->acquire_timeout_ms, on_acquire, c);
	if (rc) {
		respond_error(c, 503, pgr_strerror(rc));
		c->db_busy = false;
	}
}

/*
 * --mode connect: a new PostgreSQL connection per request, opened, queried and closed
 * synchronously on the loop thread. This is exactly the problem a pool solves: every request
 * pays a TCP handshake, authentication and a backend process start (a fork on the server),
 * and while that happens this worker serves nobody else. It is here only for contrast.
 */
static void lookup_connect_per_request(struct hconn *c)
{
	PGconn *pg = PQconnectdb(c->w->srv->conninfo);
	if (PQstatus(pg) != CONNECTION_OK) {
		respond_error(c, 503, PQerrorMessage(pg));
		PQfinish(pg);
		return;
	}
	const char *params[1] = {c->param};
	PGresult *res = PQexecParams(pg, USER_SQL, 1, NULL, params, NULL, NULL, 0);
	if (PQresultStatus(res) == PGRES_TUPLES_OK)
		respond_row(c, res);
	else
		respond_error(c, 500, PQresultErrorMessage(res));
	PQclear(res);
	PQfinish(pg);
}

/* ---- HTTP connections ---- */

/* Answer the request at the head of rbuf. Returns false when more bytes are needed first. */
static bool next_request(struct hconn *c)
{
	struct http_req req;
	int st = http_parse_request(c->rbuf, c->rlen, RBUF_CAP, &req);
	if (st == HTTP_INCOMPLETE)
		return false;
	if (st != HTTP_PARSED) {
		c->close_after = true;
		c->rlen = 0;
		respond_error(c, st, st == 431 ? "request head too large" : "bad request");
		return true;
	}
	if (!req.keep_alive)
		c->close_after = true;

	enum {
		R_404,
		R_400,
		R_USER,
		R_METRICS
	} route = R_404;
	static const char user_prefix[] = "/user/";
	const size_t plen = sizeof(user_prefix) - 1;
	if (req.method_len == 3 && memcmp(req.method, "GET", 3) == 0) {
		if (req.path_len >= plen && memcmp(req.path, user_prefix, plen) == 0) {
			int32_t id;
			route = R_400;
			if (http_parse_id(req.path + plen, req.path_len - plen, &id) == 0) {
				snprintf(c->param, sizeof(c->param), "%" PRId32, id);
				route = R_USER;
			}
		} else if (req.path_len == 8 && memcmp(req.path, "/metrics", 8) == 0) {
			route = R_METRICS;
		}
	}

	/* Consume the request (req's pointers are dead from here on); a body is skipped. */
	size_t have = c->rlen < req.head_len + req.body_len ? c->rlen : req.head_len + req.body_len;
	c->skip = req.head_len + req.body_len - have;
	memmove(c->rbuf, c->rbuf + have, c->rlen - have);
	c->rlen -= (uint32_t)have;

	switch (route) {
	case R_USER:
		if (c->w->srv->connect_mode)
			lookup_connect_per_request(c);
		else
			start_lookup(c);
		break;
	case R_METRICS:
		respond_metrics(c);
		break;
	case R_400:
		respond_error(c, 400, "id must be an integer between 0 and 2147483647");
		break;
	default:
		respond_error(c, 404, "not found");
	}
	return true;
}

static void start_recv(struct hconn *c)
{
	struct io_uring_sqe *s = sqe_get(c->w);
	if (!s) {
		c->close_after = true;
		return;
	}
	io_uring_prep_recv(s, c->fd, c->rbuf + c->rlen, RBUF_CAP - c->rlen, 0);
	io_uring_sqe_set_data64(s, ud_of(c, K_RECV));
	c->io = IO_RECV;
}

static void start_send(struct hconn *c)
{
	struct io_uring_sqe *s = sqe_get(c->w);
	if (!s) {
		c->close_after = true;
		c->out.len = c->woff = 0;
		return;
	}
	io_uring_prep_send(s, c->fd, c->out.p + c->woff, c->out.len - c->woff, MSG_NOSIGNAL);
	io_uring_sqe_set_data64(s, ud_of(c, K_SEND));
	c->io = IO_SEND;
}

static void conn_close(struct hconn *c)
{
	struct worker *w = c->w;
	close(c->fd);
	c->fd = -1;
	c->io = IO_NONE;
	c->rlen = 0;
	c->skip = 0;
	c->out.len = c->woff = 0;
	c->next_free = w->free_head;
	w->free_head = (uint32_t)(c - w->conns);
	w->live--;
}

/*
 * The connection's state machine; runs whenever nothing is in flight for it. Answers every
 * complete request in rbuf in order (a lookup suspends it until the database answers), then
 * sends what was answered, then reads more, or closes.
 */
static void conn_advance(struct hconn *c)
{
	c->advancing = true;
	for (;;) {
		if (c->db_busy || c->io != IO_NONE)
			break;
		if (c->w->stopping)
			c->close_after = true;
		if (c->skip && c->rlen) {
			size_t k = c->skip < c->rlen ? c->skip : c->rlen;
			memmove(c->rbuf, c->rbuf + k, c->rlen - k);
			c->rlen -= (uint32_t)k;
			c->skip -= k;
		}
		if (!c->close_after && !c->skip && c->out.len < WBUF_FLUSH && next_request(c))
			continue;
		if (c->out.len > c->woff) {
			start_send(c);
		} else if (c->close_after) {
			c->advancing = false;
			conn_close(c);
			return;
		} else {
			/* A body being skipped is read into rbuf and dropped at the top of the
			 * loop. */
			start_recv(c);
		}
		if (c->io == IO_NONE)
			continue; /* no SQE to be had: close_after was set */
	}
	c->advancing = false;
}

static void on_recv(struct hconn *c, int res)
{
	c->io = IO_NONE;
	if ((res == -EINTR || res == -EAGAIN) && !c->w->stopping) {
		start_recv(c);
		if (c->io != IO_NONE)
			return;
		res = 0; /* no SQE to be had: give the connection up */
	}
	if (res <= 0) {
		/* Peer closed, reset, or our cancel at shutdown: nothing owed, nothing in flight.
		 */
		conn_close(c);
		return;
	}
	c->rlen += (uint32_t)res;
	conn_advance(c);
}

static void on_send(struct hconn *c, int res)
{
	c->io = IO_NONE;
	if (res <= 0) {
		conn_close(c);
		return;
	}
	c->woff += (size_t)res;
	if (c->woff < c->out.len) {
		start_send(c); /* short send: the rest */
		if (c->io != IO_NONE)
			return;
	}
	c->out.len = c->woff = 0;
	conn_advance(c);
}

static void cancel_op(struct worker *w, uint64_t user_data)
{
	struct io_uring_sqe *s = sqe_get(w);
	if (!s)
		return;
	io_uring_prep_cancel64(s, user_data, 0);
	io_uring_sqe_set_data64(s, ud_of(w, K_CANCEL));
}

/* ---- accepting ---- */

static void arm_accept(struct worker *w)
{
	struct io_uring_sqe *s = sqe_get(w);
	if (!s)
		return; /* re-armed on the next accept CQE that never comes: see worker_main */
	if (w->multishot)
		io_uring_prep_multishot_accept(s, w->listen_fd, NULL, NULL, SOCK_CLOEXEC);
	else
		io_uring_prep_accept(s, w->listen_fd, NULL, NULL, SOCK_CLOEXEC);
	io_uring_sqe_set_data64(s, ud_of(w, K_ACCEPT));
	w->accept_armed = true;
}

static int conn_slot_init(struct hconn *c)
{
	if (!c->rbuf && !(c->rbuf = malloc(RBUF_CAP)))
		return -ENOMEM;
	return hbuf_reserve(&c->out, 4096);
}

static void on_accept(struct worker *w, const struct io_uring_cqe *cqe)
{
	int fd = cqe->res;
	if (!(cqe->flags & IORING_CQE_F_MORE))
		w->accept_armed = false;
	if (fd >= 0) {
		if (w->stopping || w->free_head == UINT32_MAX) {
			close(fd); /* shutting down, or the table is full: refuse by closing */
		} else {
			struct hconn *c = &w->conns[w->free_head];
			if (conn_slot_init(c) != 0) {
				close(fd);
			} else {
				w->free_head = c->next_free;
				w->live++;
				c->fd = fd;
				c->io = IO_NONE;
				c->cancel_sent = c->db_busy = c->close_after = false;
				c->rlen = 0;
				c->skip = 0;
				c->out.len = c->woff = 0;
				int one = 1;
				/* Responses leave in one send; do not let Nagle hold a pipelined
				 * batch. */
				setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
				start_recv(c);
				if (c->io == IO_NONE)
					conn_close(c);
			}
		}
	} else if (fd == -EINVAL && w->multishot && !w->stopping) {
		/* Kernel without multishot accept (before 5.19): one-shot accepts, re-armed. */
		w->multishot = false;
		fprintf(stderr, "pgr_http_server: worker %d: no multishot accept, using one-shot\n",
		        w->idx);
	} else if (fd != -ECANCELED) {
		fprintf(stderr, "pgr_http_server: worker %d: accept: %s\n", w->idx, strerror(-fd));
	}
	if (!w->accept_armed) {
		if (w->stopping) {
			close(w->listen_fd);
			w->listen_fd = -1;
		} else {
			arm_accept(w);
		}
	}
}

/* ---- shutdown ---- */

static void begin_stop(struct worker *w)
{
	w->stopping = true;
	w->drain_deadline_ns = mono_ns() + w->srv->drain_ms * 1000000;
	if (w->accept_armed)
		cancel_op(w, ud_of(w, K_ACCEPT));
	for (uint32_t i = 0; i < w->srv->max_conns; i++) {
		struct hconn *c = &w->conns[i];
		if (c->fd < 0)
			continue;
		c->close_after = true;
		/* An idle keep-alive connection would wait for a request forever: stop reading. */
		if (c->io == IO_RECV && !c->cancel_sent) {
			cancel_op(w, ud_of(c, K_RECV));
			c->cancel_sent = true;
		}
	}
}

/* Past the drain deadline: cancel what is still at the database, and any socket I/O. */
static void force_stop(struct worker *w)
{
	w->forced = true;
	if (w->loop && pgr_loop_destroy(w->loop) == 0)
		w->loop = NULL;
	for (uint32_t i = 0; i < w->srv->max_conns; i++) {
		struct hconn *c = &w->conns[i];
		if (c->fd >= 0 && c->io != IO_NONE && !c->cancel_sent) {
			cancel_op(w, ud_of(c, c->io == IO_RECV ? K_RECV : K_SEND));
			c->cancel_sent = true;
		}
	}
}

/* ---- the worker's event loop ---- */

static void handle_cqe(struct worker *w, const struct io_uring_cqe *cqe)
{
	uint64_t u = io_uring_cqe_get_data64(cqe);
	if (pgr_loop_owns(u)) {
		if (w->loop)
			pgr_loop_handle_cqe(w->loop, cqe);
		return;
	}
	void *p = (void *)(uintptr_t)(u & ~(uint64_t)K_MASK);
	switch (u & K_MASK) {
	case K_RECV:
		on_recv(p, cqe->res);
		break;
	case K_SEND:
		on_send(p, cqe->res);
		break;
	case K_ACCEPT:
		on_accept(p, cqe);
		break;
	case K_WAKE:
		w->wake_armed = false;
		if (!w->stopping)
			begin_stop(w);
		break;
	default:
		break; /* K_CANCEL: the cancelled operation's own CQE does the work */
	}
}

/* Submit, wait up to timeout_ns (< 0: forever) for a CQE, handle every CQE there is. */
static int turn(struct worker *w, int64_t timeout_ns)
{
	struct io_uring_cqe *cqe;
	struct __kernel_timespec ts = {.tv_sec = timeout_ns / 1000000000,
	                               .tv_nsec = timeout_ns % 1000000000};
	int rc =
	    io_uring_submit_and_wait_timeout(&w->ring, &cqe, 1, timeout_ns < 0 ? NULL : &ts, NULL);
	if (rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EBUSY)
		return rc;
	unsigned head, n = 0;
	io_uring_for_each_cqe (&w->ring, head, cqe) {
		handle_cqe(w, cqe);
		n++;
	}
	io_uring_cq_advance(&w->ring, n);
	return 0;
}

static void worker_ready(struct worker *w, int err)
{
	struct server *srv = w->srv;
	pthread_mutex_lock(&srv->lock);
	srv->ready++;
	if (err && !srv->failed)
		srv->failed = err;
	pthread_cond_broadcast(&srv->cond);
	pthread_mutex_unlock(&srv->lock);
}

static int worker_setup(struct worker *w)
{
	struct server *srv = w->srv;
	int rc = io_uring_queue_init(1024, &w->ring, 0);
	if (rc < 0) {
		fprintf(stderr, "pgr_http_server: io_uring_queue_init: %s\n", strerror(-rc));
		return rc;
	}
	if (srv->pool) {
		/* Every connection can have one lookup in flight. */
		rc = pgr_loop_create(srv->pool, &w->ring, srv->max_conns, &w->loop);
		if (rc) {
			fprintf(stderr, "pgr_http_server: pgr_loop_create: %s\n", pgr_strerror(rc));
			io_uring_queue_exit(&w->ring);
			return rc;
		}
	}
	w->conns = calloc(srv->max_conns, sizeof(*w->conns));
	if (!w->conns) {
		if (w->loop)
			pgr_loop_destroy(w->loop);
		io_uring_queue_exit(&w->ring);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < srv->max_conns; i++) {
		w->conns[i].w = w;
		w->conns[i].fd = -1;
		w->conns[i].next_free = i + 1 < srv->max_conns ? i + 1 : UINT32_MAX;
	}
	w->free_head = 0;
	w->multishot = true;

	struct io_uring_sqe *s = sqe_get(w);
	io_uring_prep_read(s, w->wake_fd, &w->wake_buf, sizeof(w->wake_buf), 0);
	io_uring_sqe_set_data64(s, ud_of(w, K_WAKE));
	w->wake_armed = true;
	arm_accept(w);
	io_uring_submit(&w->ring);
	return 0;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct server *srv = w->srv;
	int rc = worker_setup(w);
	worker_ready(w, rc);
	if (rc)
		return NULL;

	int64_t hard_deadline_ns = 0;
	for (;;) {
		if (w->stopping && w->live == 0 && !w->accept_armed && !w->wake_armed)
			break;
		if (w->stopping && !w->forced && mono_ns() >= w->drain_deadline_ns) {
			force_stop(w);
			hard_deadline_ns = mono_ns() + 5 * 1000000000LL;
		}
		if (w->forced && mono_ns() >= hard_deadline_ns) {
			fprintf(stderr,
			        "pgr_http_server: worker %d: %u connections would not close\n",
			        w->idx, w->live);
			break;
		}
		rc = turn(w, w->stopping ? 50000000 : -1);
		if (rc) {
			fprintf(stderr, "pgr_http_server: worker %d: io_uring: %s\n", w->idx,
			        strerror(-rc));
			pthread_mutex_lock(&srv->lock);
			srv->failed = rc;
			pthread_mutex_unlock(&srv->lock);
			kill(getpid(), SIGTERM); /* wake the main thread: the process must end */
			break;
		}
	}

	/* Every connection is closed; hand pgring the CQEs of whatever it still has in flight. */
	int64_t dl = mono_ns() + 5 * 1000000000LL;
	int drc = 0;
	while (w->loop && (drc = pgr_loop_destroy(w->loop)) == -EBUSY && mono_ns() < dl)
		turn(w, 50000000);
	if (w->loop && drc == -EBUSY)
		fprintf(
		    stderr, "pgr_http_server: worker %d: pgring operations never completed\n",
		    w->idx); /* the loop is leaked: freeing it would free what the ring points at */
	w->loop = NULL;
	if (w->listen_fd >= 0) {
		close(w->listen_fd);
		w->listen_fd = -1;
	}
	io_uring_queue_exit(&w->ring);
	return NULL;
}

/* ---- main ---- */

static void usage(FILE *f)
{
	fprintf(f,
	        "usage: pgr_http_server --conninfo CONNINFO [options]\n"
	        "  --listen IPV4:PORT        address to listen on (default 127.0.0.1:8080;\n"
	        "                            port 0 picks a free one, printed at start)\n"
	        "  --threads N               worker threads, one ring each (default: online CPUs)\n"
	        "  --pool-size N             pgring pool max_size, all opened at start (16)\n"
	        "  --mode pool|exec|connect  pool: a checkout per request (default); exec:\n"
	        "                            pgr_loop_exec, pipelined and prepared; connect: a\n"
	        "                            new connection per request\n"
	        "  --acquire-timeout-ms N    503 when no connection within N ms (2000)\n"
	        "  --query-timeout-ms N      500 when the query takes longer (5000)\n"
	        "  --max-conns N             client connections per thread (1024)\n"
	        "  --drain-ms N              at SIGINT/SIGTERM, time to finish requests (3000)\n"
	        "  --verbose                 log every pool event to stderr\n"
	        "Serves GET /user/<id> from pgr_demo_users(id int, name text, email text) and\n"
	        "GET /metrics.\n");
}

static int parse_u32(const char *s, uint32_t min, uint32_t max, uint32_t *out)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v < min || v > max)
		return -EINVAL;
	*out = (uint32_t)v;
	return 0;
}

static int open_listener(const struct sockaddr_in *addr)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	int one = 1;
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) ||
	    bind(fd, (const struct sockaddr *)addr, sizeof(*addr)) || listen(fd, 1024)) {
		int e = -errno;
		close(fd);
		return e;
	}
	return fd;
}

int main(int argc, char **argv)
{
	struct server srv = {
	    .pool_size = 16,
	    .max_conns = 1024,
	    .acquire_timeout_ms = 2000,
	    .query_timeout_ms = 5000,
	    .drain_ms = 3000,
	    .lock = PTHREAD_MUTEX_INITIALIZER,
	    .cond = PTHREAD_COND_INITIALIZER,
	};
	const char *listen_arg = "127.0.0.1:8080";
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	srv.nthreads = ncpu > 0 ? (uint32_t)ncpu : 1;

	enum {
		O_LISTEN = 1,
		O_CONNINFO,
		O_THREADS,
		O_POOL,
		O_MODE,
		O_ACQ,
		O_QRY,
		O_MAXC,
		O_DRAIN,
		O_VERBOSE,
		O_HELP
	};
	static const struct option opts[] = {
	    {"listen", required_argument, NULL, O_LISTEN},
	    {"conninfo", required_argument, NULL, O_CONNINFO},
	    {"threads", required_argument, NULL, O_THREADS},
	    {"pool-size", required_argument, NULL, O_POOL},
	    {"mode", required_argument, NULL, O_MODE},
	    {"acquire-timeout-ms", required_argument, NULL, O_ACQ},
	    {"query-timeout-ms", required_argument, NULL, O_QRY},
	    {"max-conns", required_argument, NULL, O_MAXC},
	    {"drain-ms", required_argument, NULL, O_DRAIN},
	    {"verbose", no_argument, NULL, O_VERBOSE},
	    {"help", no_argument, NULL, O_HELP},
	    {NULL, 0, NULL, 0},
	};
	int o;
	uint32_t v;
	while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		int bad = 0;
		switch (o) {
		case O_LISTEN:
			listen_arg = optarg;
			break;
		case O_CONNINFO:
			srv.conninfo = optarg;
			break;
		case O_THREADS:
			bad = parse_u32(optarg, 1, 256, &srv.nthreads);
			break;
		case O_POOL:
			bad = parse_u32(optarg, 1, 10000, &srv.pool_size);
			break;
		case O_MODE:
			bad = strcmp(optarg, "pool") && strcmp(optarg, "connect") &&
			      strcmp(optarg, "exec");
			srv.connect_mode = strcmp(optarg, "connect") == 0;
			srv.exec_mode = strcmp(optarg, "exec") == 0;
			break;
		case O_ACQ:
			bad = parse_u32(optarg, 1, 3600000, &v);
			srv.acquire_timeout_ms = v;
			break;
		case O_QRY:
			bad = parse_u32(optarg, 1, 3600000, &v);
			srv.query_timeout_ms = v;
			break;
		case O_MAXC:
			bad = parse_u32(optarg, 1, 1 << 20, &srv.max_conns);
			break;
		case O_DRAIN:
			bad = parse_u32(optarg, 0, 3600000, &v);
			srv.drain_ms = v;
			break;
		case O_VERBOSE:
			srv.verbose = true;
			break;
		case O_HELP:
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
		if (bad) {
			fprintf(stderr, "pgr_http_server: bad value for --%s: '%s'\n",
			        opts[o - 1].name, optarg);
			return 2;
		}
	}
	if (optind != argc || !srv.conninfo) {
		usage(stderr);
		return 2;
	}

	struct sockaddr_in addr = {.sin_family = AF_INET};
	char host[64];
	const char *colon = strrchr(listen_arg, ':');
	uint32_t port;
	if (!colon || (size_t)(colon - listen_arg) >= sizeof(host) ||
	    parse_u32(colon + 1, 0, 65535, &port)) {
		fprintf(stderr, "pgr_http_server: --listen wants IPV4:PORT, got '%s'\n",
		        listen_arg);
		return 2;
	}
	memcpy(host, listen_arg, (size_t)(colon - listen_arg));
	host[colon - listen_arg] = '\0';
	if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
		fprintf(stderr, "pgr_http_server: --listen: '%s' is not an IPv4 address\n", host);
		return 2;
	}
	addr.sin_port = htons((uint16_t)port);

	/*
	 * SIGINT/SIGTERM are taken by sigwait() on the main thread only; blocked before any
	 * thread starts (the pool's manager thread included), so every thread inherits the mask.
	 */
	sigset_t sigs;
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);

	if (srv.connect_mode) {
		PGconn *pg = PQconnectdb(srv.conninfo);
		if (PQstatus(pg) != CONNECTION_OK) {
			fprintf(stderr, "pgr_http_server: cannot connect: %s", PQerrorMessage(pg));
			PQfinish(pg);
			return 1;
		}
		PQfinish(pg);
	} else {
		pgr_config cfg;
		pgr_config_init(&cfg);
		cfg.conninfo = srv.conninfo;
		cfg.name = "http";
		cfg.max_size = srv.pool_size;
		cfg.min_idle = srv.pool_size;
		cfg.acquire_timeout_ms = srv.acquire_timeout_ms;
		cfg.on_event = on_pool_event;
		cfg.user_data = &srv;
		int rc = pgr_pool_create(&cfg, &srv.pool);
		if (rc) {
			fprintf(stderr, "pgr_http_server: pgr_pool_create: %s\n", pgr_strerror(rc));
			return 1;
		}
		/* Fail at start, with libpq's reason, rather than with a 503 on every request. */
		pgr_conn *c;
		rc = pgr_acquire(srv.pool, 10000, &c);
		if (rc) {
			char why[512];
			pgr_pool_last_error(srv.pool, why, sizeof(why));
			fprintf(stderr, "pgr_http_server: no database connection: %s: %s\n",
			        pgr_strerror(rc), why);
			pgr_pool_destroy(srv.pool);
			return 1;
		}
		pgr_release(c);
	}

	/* Cache-line aligned: each worker writes its own record (counters included). */
	srv.workers = aligned_alloc(64, srv.nthreads * sizeof(*srv.workers));
	if (!srv.workers) {
		perror("pgr_http_server: aligned_alloc");
		goto fail_pool;
	}
	memset(srv.workers, 0, srv.nthreads * sizeof(*srv.workers));
	for (uint32_t i = 0; i < srv.nthreads; i++)
		srv.workers[i].listen_fd = srv.workers[i].wake_fd = -1;
	/* The first socket picks the port when 0 was asked for; the others join its group. */
	for (uint32_t i = 0; i < srv.nthreads; i++) {
		struct worker *w = &srv.workers[i];
		w->srv = &srv;
		w->idx = (int)i;
		w->listen_fd = open_listener(&addr);
		if (w->listen_fd < 0) {
			fprintf(stderr, "pgr_http_server: listen on %s: %s\n", listen_arg,
			        strerror(-w->listen_fd));
			goto fail_listeners;
		}
		if (i == 0) {
			socklen_t al = sizeof(addr);
			getsockname(w->listen_fd, (struct sockaddr *)&addr, &al);
		}
		w->wake_fd = eventfd(0, EFD_CLOEXEC);
		if (w->wake_fd < 0) {
			perror("pgr_http_server: eventfd");
			goto fail_listeners;
		}
	}

	cpu_set_t online;
	int ncpus = sched_getaffinity(0, sizeof(online), &online) == 0 ? CPU_COUNT(&online) : 0;
	uint32_t started = 0;
	for (uint32_t i = 0; i < srv.nthreads; i++) {
		struct worker *w = &srv.workers[i];
		if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
			fprintf(stderr, "pgr_http_server: pthread_create failed\n");
			srv.failed = -EAGAIN;
			break;
		}
		started++;
		/* One worker per core: pgring's idle shards are per CPU, so stay on one. */
		if (ncpus > 0) {
			cpu_set_t one;
			CPU_ZERO(&one);
			for (int cpu = 0, k = 0; cpu < CPU_SETSIZE; cpu++) {
				if (CPU_ISSET(cpu, &online) && k++ == (int)(i % (uint32_t)ncpus)) {
					CPU_SET(cpu, &one);
					break;
				}
			}
			pthread_setaffinity_np(w->thread, sizeof(one), &one);
		}
	}
	pthread_mutex_lock(&srv.lock);
	while (srv.ready < started)
		pthread_cond_wait(&srv.cond, &srv.lock);
	int failed = srv.failed;
	pthread_mutex_unlock(&srv.lock);

	if (!failed) {
		char ip[INET_ADDRSTRLEN];
		inet_ntop(AF_INET, &addr.sin_addr, ip, sizeof(ip));
		fprintf(stderr,
		        "pgr_http_server: listening on %s:%u (%u threads, mode %s, pool size %u)\n",
		        ip, ntohs(addr.sin_port), srv.nthreads,
		        srv.connect_mode ? "connect"
		        : srv.exec_mode  ? "exec"
		                         : "pool",
		        srv.connect_mode ? 0 : srv.pool_size);
		int sig = 0;
		sigwait(&sigs, &sig);
		pthread_mutex_lock(&srv.lock);
		failed = srv.failed;
		pthread_mutex_unlock(&srv.lock);
		if (!failed)
			fprintf(stderr, "pgr_http_server: %s, shutting down\n", strsignal(sig));
	}

	/* Stop every worker: the eventfd read armed on its ring completes. */
	for (uint32_t i = 0; i < started; i++) {
		uint64_t one = 1;
		if (write(srv.workers[i].wake_fd, &one, sizeof(one)) != sizeof(one))
			perror("pgr_http_server: eventfd write");
	}
	for (uint32_t i = 0; i < started; i++)
		pthread_join(srv.workers[i].thread, NULL);
	for (uint32_t i = 0; i < srv.nthreads; i++) {
		struct worker *w = &srv.workers[i];
		if (w->listen_fd >= 0)
			close(w->listen_fd);
		if (w->wake_fd >= 0)
			close(w->wake_fd);
		for (uint32_t k = 0; w->conns && k < srv.max_conns; k++) {
			free(w->conns[k].rbuf);
			hbuf_free(&w->conns[k].out);
		}
		free(w->conns);
		hbuf_free(&w->scratch);
	}
	free(srv.workers);
	if (srv.pool)
		pgr_pool_destroy(srv.pool);
	if (!failed)
		fprintf(stderr, "pgr_http_server: stopped\n");
	return failed ? 1 : 0;

fail_listeners:
	for (uint32_t i = 0; i < srv.nthreads; i++) {
		if (srv.workers[i].listen_fd >= 0)
			close(srv.workers[i].listen_fd);
		if (srv.workers[i].wake_fd >= 0)
			close(srv.workers[i].wake_fd);
	}
	free(srv.workers);
fail_pool:
	if (srv.pool)
		pgr_pool_destroy(srv.pool);
	return 1;
}
