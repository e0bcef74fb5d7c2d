/* SPDX-License-Identifier: PostgreSQL */
/*
 * The example HTTP server (examples/http_server.c) against the real database: correct rows
 * under concurrent keep-alive load (plain, pipelined, fragmented and reconnecting clients),
 * the error statuses, /metrics, connect-per-request mode and a clean exit on SIGTERM.
 * The server runs as a child process; clients are plain sockets, so what is checked is what
 * goes over the wire.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

#ifndef PGR_HTTP_SERVER_BIN
#define PGR_HTTP_SERVER_BIN "" /* built without examples: every test fails and says so */
#endif

#define NROWS 2000

/* ---- the table ---- */

static void load_users(void)
{
	PGconn *a = tu_admin();
	tu_exec(a, "set client_min_messages = warning");
	tu_exec(a, "drop table if exists pgr_demo_users");
	tu_exec(a, "create table pgr_demo_users(id int primary key, name text, email text)");
	/* Names that need JSON escaping (every 7th) or carry UTF-8 (every 13th); no email for
	   every 11th. */
	char sql[512];
	snprintf(sql, sizeof(sql),
	         "insert into pgr_demo_users select g, 'user ' || g"
	         " || case when g %% 7 = 0 then ' \"q\" \\ ' || chr(9) || chr(1) else '' end"
	         " || case when g %% 13 = 0 then ' \xc3\xa9' else '' end,"
	         " case when g %% 11 = 0 then null else 'user' || g || '@example.com' end"
	         " from generate_series(1, %d) g",
	         NROWS);
	tu_exec(a, sql);
	PQfinish(a);
}

/* The exact body the server must send for row id, computed independently of it. */
static void expected_body(int id, char *out, size_t n)
{
	char email[64];
	if (id % 11 == 0)
		snprintf(email, sizeof(email), "null");
	else
		snprintf(email, sizeof(email), "\"user%d@example.com\"", id);
	snprintf(out, n, "{\"id\":%d,\"name\":\"user %d%s%s\",\"email\":%s}\n", id, id,
	         id % 7 == 0 ? " \\\"q\\\" \\\\ \\t\\u0001" : "", id % 13 == 0 ? " \xc3\xa9" : "",
	         email);
}

/* ---- the server process ---- */

struct server {
	pid_t pid;
	int port;
	char log[64];
};

static struct server srv;

static void log_tail(char *out, size_t n)
{
	out[0] = '\0';
	FILE *f = fopen(srv.log, "r");
	if (!f)
		return;
	fseek(f, 0, SEEK_END);
	long size = ftell(f);
	fseek(f, size > (long)n - 1 ? size - (long)n + 1 : 0, SEEK_SET);
	size_t k = fread(out, 1, n - 1, f);
	out[k] = '\0';
	fclose(f);
}

/* The port from the "listening on 127.0.0.1:PORT" line, or 0 when not there yet. */
static int logged_port(void)
{
	char buf[4096];
	log_tail(buf, sizeof(buf));
	const char *p = strstr(buf, "listening on 127.0.0.1:");
	return p ? atoi(p + strlen("listening on 127.0.0.1:")) : 0;
}

static bool server_exited(int *status)
{
	return waitpid(srv.pid, status, WNOHANG) == srv.pid;
}

/* Start the server with the given extra arguments (NULL-terminated) and wait until it listens. */
static void server_start(const char *const *extra)
{
	cr_assert(PGR_HTTP_SERVER_BIN[0],
	          "test built without the examples (PGR_BUILD_EXAMPLES=OFF)");
	cr_assert(access(PGR_HTTP_SERVER_BIN, X_OK) == 0, "%s: not built", PGR_HTTP_SERVER_BIN);
	const char *argv[32] = {PGR_HTTP_SERVER_BIN, "--listen", "127.0.0.1:0", "--conninfo",
	                        tu_conninfo()};
	int argc = 5;
	for (; extra && *extra && argc < 31; extra++)
		argv[argc++] = *extra;
	argv[argc] = NULL;

	snprintf(srv.log, sizeof(srv.log), "/tmp/pgr-http-test-XXXXXX");
	int lfd = mkstemp(srv.log);
	cr_assert(lfd >= 0);
	pid_t parent = getpid();
	srv.pid = fork();
	cr_assert(srv.pid >= 0);
	if (srv.pid == 0) {
		/* Never outlive the test process, whatever happens to it (a timeout kills it). */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (getppid() != parent)
			_exit(127);
		dup2(lfd, 1);
		dup2(lfd, 2);
		execv(argv[0], (char *const *)argv);
		_exit(127);
	}
	close(lfd);
	int status;
	bool exited = false;
	bool up = TU_WAIT_UNTIL((srv.port = logged_port()) > 0 || (exited = server_exited(&status)),
	                        15000);
	if (exited)
		srv.pid = 0; /* reaped: the fixture must not signal a pid that may be reused */
	char tail[2048];
	log_tail(tail, sizeof(tail));
	cr_assert(up && srv.port > 0, "server did not start; its log:\n%s", tail);
}

/* SIGTERM; the server must exit with status 0 within timeout_ms. */
static void server_stop_expect_clean_exit(int64_t timeout_ms)
{
	cr_assert_eq(kill(srv.pid, SIGTERM), 0);
	int status = 0;
	bool gone = TU_WAIT_UNTIL(server_exited(&status), timeout_ms);
	char tail[2048];
	log_tail(tail, sizeof(tail));
	cr_assert(gone, "server still running %lld ms after SIGTERM; log:\n%s",
	          (long long)timeout_ms, tail);
	srv.pid = 0;
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
	          "server ended with status 0x%x; log:\n%s", status, tail);
}

static void fixture_fini(void)
{
	if (srv.pid > 0) {
		kill(srv.pid, SIGKILL);
		waitpid(srv.pid, NULL, 0);
		srv.pid = 0;
	}
	if (srv.log[0])
		unlink(srv.log);
	srv.log[0] = '\0';
}

/* ---- a minimal HTTP client ---- */

struct client {
	int fd;
	char buf[32768];
	size_t have;
};

struct resp {
	int status;
	bool conn_close;
	size_t body_len;
	char body[16384];
};

static int client_connect(struct client *c, int port)
{
	c->have = 0;
	c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd < 0)
		return -errno;
	struct timeval tv = {.tv_sec = 15};
	setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	/* Fragments must leave as sent, not be held back by Nagle until the server's ACK. */
	int one = 1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (connect(c->fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
		int e = -errno;
		close(c->fd);
		c->fd = -1;
		return e;
	}
	return 0;
}

static void client_close(struct client *c)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
}

static int send_all(struct client *c, const char *s, size_t n)
{
	while (n) {
		ssize_t k = send(c->fd, s, n, MSG_NOSIGNAL);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		s += k;
		n -= (size_t)k;
	}
	return 0;
}

/* Read more into the buffer: 1 got bytes, 0 end of stream, -1 error or timeout. */
static int fill(struct client *c)
{
	if (c->have == sizeof(c->buf))
		return -1;
	ssize_t k;
	do
		k = recv(c->fd, c->buf + c->have, sizeof(c->buf) - c->have, 0);
	while (k < 0 && errno == EINTR);
	if (k < 0)
		return -1;
	c->have += (size_t)k;
	return k > 0;
}

/* One response off the stream. Returns 0, or -1 (with why set) on a malformed or cut one. */
static int read_response(struct client *c, struct resp *r, const char **why)
{
	char *end;
	while (!(end = memmem(c->buf, c->have, "\r\n\r\n", 4))) {
		if (fill(c) != 1) {
			*why = "connection ended before a response head";
			return -1;
		}
	}
	size_t head = (size_t)(end - c->buf) + 4;
	if (c->have < 12 || memcmp(c->buf, "HTTP/1.1 ", 9) != 0) {
		*why = "bad status line";
		return -1;
	}
	r->status = atoi(c->buf + 9);
	r->conn_close = false;
	long clen = -1;
	for (char *line = memmem(c->buf, head, "\r\n", 2) + 2; line < end;) {
		char *le = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
		if (!strncasecmp(line, "Content-Length:", 15))
			clen = atol(line + 15);
		else if (!strncasecmp(line, "Connection: close", 17))
			r->conn_close = true;
		line = le + 2;
	}
	if (clen < 0 || (size_t)clen >= sizeof(r->body)) {
		*why = "missing or huge Content-Length";
		return -1;
	}
	while (c->have < head + (size_t)clen) {
		if (fill(c) != 1) {
			*why = "connection ended inside a body";
			return -1;
		}
	}
	memcpy(r->body, c->buf + head, (size_t)clen);
	r->body[clen] = '\0';
	r->body_len = (size_t)clen;
	memmove(c->buf, c->buf + head + clen, c->have - head - (size_t)clen);
	c->have -= head + (size_t)clen;
	return 0;
}

/* ---- concurrent load ---- */

enum {
	STYLE_PLAIN,
	STYLE_PIPELINED,
	STYLE_FRAGMENTED,
	STYLE_RECONNECTING,
	STYLES
};

struct load {
	int port;
	int idx;
	int nreq;
	unsigned seed;
	/* results */
	int n200, n400, n404, ndb; /* ndb: requests that had to ask the database */
	int done;
	char err[512];
};

struct expect {
	char path[64];
	int status;
	int id; /* for a 200: the row */
	bool db;
};

static void pick(struct load *l, struct expect *e)
{
	int r = (int)(rand_r(&l->seed) % 100);
	static const char *const bad[] = {"abc", "12x", "-1", "99999999999", "", "1.5", "%31"};
	if (r < 80) {
		e->id = 1 + (int)(rand_r(&l->seed) % NROWS);
		snprintf(e->path, sizeof(e->path), "/user/%d", e->id);
		e->status = 200;
		e->db = true;
	} else if (r < 88) {
		snprintf(e->path, sizeof(e->path), "/user/%d",
		         NROWS + 1 + (int)(rand_r(&l->seed) % 500));
		e->status = 404;
		e->db = true;
	} else if (r < 90) {
		snprintf(e->path, sizeof(e->path), "/user/0%d",
		         NROWS + 7); /* leading zero: still an id */
		e->status = 404;
		e->db = true;
	} else if (r < 97) {
		snprintf(e->path, sizeof(e->path), "/user/%s", bad[rand_r(&l->seed) % 7]);
		e->status = 400;
		e->db = false;
	} else {
		snprintf(e->path, sizeof(e->path), "/users/%d",
		         1 + (int)(rand_r(&l->seed) % NROWS));
		e->status = 404;
		e->db = false;
	}
}

static bool check(struct load *l, const struct expect *e, const struct resp *r)
{
	if (r->status != e->status) {
		snprintf(l->err, sizeof(l->err),
		         "client %d: GET %s: status %d, want %d (body %.200s)", l->idx, e->path,
		         r->status, e->status, r->body);
		return false;
	}
	if (e->status == 200) {
		char want[256];
		expected_body(e->id, want, sizeof(want));
		if (strcmp(want, r->body) != 0) {
			snprintf(l->err, sizeof(l->err),
			         "client %d: GET %s: body\n  %.200s\nwant\n  %s", l->idx, e->path,
			         r->body, want);
			return false;
		}
	}
	l->n200 += e->status == 200;
	l->n404 += e->status == 404;
	l->n400 += e->status == 400;
	l->ndb += e->db;
	l->done++;
	return true;
}

static void *load_main(void *arg)
{
	struct load *l = arg;
	static __thread struct client c;
	static __thread struct resp r;
	const char *why = NULL;
	int style = l->idx % STYLES;
	if (client_connect(&c, l->port) != 0) {
		snprintf(l->err, sizeof(l->err), "client %d: connect: %s", l->idx, strerror(errno));
		return NULL;
	}
	enum {
		BATCH = 4
	};
	while (l->done < l->nreq) {
		int batch = style == STYLE_PIPELINED ? BATCH : 1;
		if (batch > l->nreq - l->done)
			batch = l->nreq - l->done;
		struct expect e[BATCH];
		char req[BATCH * 128];
		size_t len = 0;
		/* The reconnecting client ends every 25th request with Connection: close. */
		bool last = style == STYLE_RECONNECTING && (l->done + 1) % 25 == 0;
		for (int i = 0; i < batch; i++) {
			pick(l, &e[i]);
			len += (size_t)snprintf(
			    req + len, sizeof(req) - len,
			    "GET %s HTTP/1.1\r\nHost: test\r\nUser-Agent: t%d\r\n%s\r\n", e[i].path,
			    l->idx, last ? "Connection: close\r\n" : "");
		}
		int rc = 0;
		if (style == STYLE_FRAGMENTED) {
			/* Three pieces, the first ending inside the request line: partial reads. */
			size_t a = 7, b = len / 2;
			rc = send_all(&c, req, a);
			tu_sleep_ms(1);
			rc = rc ? rc : send_all(&c, req + a, b - a);
			tu_sleep_ms(1);
			rc = rc ? rc : send_all(&c, req + b, len - b);
		} else {
			rc = send_all(&c, req, len);
		}
		if (rc) {
			snprintf(l->err, sizeof(l->err), "client %d: send failed: %s", l->idx,
			         strerror(errno));
			break;
		}
		for (int i = 0; i < batch; i++) {
			if (read_response(&c, &r, &why) != 0) {
				snprintf(l->err, sizeof(l->err), "client %d: GET %s: %s", l->idx,
				         e[i].path, why);
				goto out;
			}
			if (!check(l, &e[i], &r))
				goto out;
		}
		if (last) {
			if (!r.conn_close) {
				snprintf(l->err, sizeof(l->err), "client %d: no Connection: close",
				         l->idx);
				break;
			}
			/* The server must close its side after answering. */
			if (fill(&c) != 0) {
				snprintf(l->err, sizeof(l->err), "client %d: server did not close",
				         l->idx);
				break;
			}
			client_close(&c);
			if (client_connect(&c, l->port) != 0) {
				snprintf(l->err, sizeof(l->err), "client %d: reconnect: %s", l->idx,
				         strerror(errno));
				break;
			}
		}
	}
out:
	client_close(&c);
	return NULL;
}

/* One request on a new connection. */
static void get(const char *path, struct resp *r)
{
	static struct client c;
	const char *why = "";
	cr_assert_eq(client_connect(&c, srv.port), 0);
	char req[256];
	int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path);
	cr_assert_eq(send_all(&c, req, (size_t)n), 0);
	cr_assert_eq(read_response(&c, r, &why), 0, "GET %s: %s", path, why);
	client_close(&c);
}

/* The value of the sample `name` (labels included, exactly) in a Prometheus text, or -1. */
static long long metric(const char *text, const char *name)
{
	size_t n = strlen(name);
	for (const char *p = text; (p = strstr(p, name)); p += n) {
		if ((p == text || p[-1] == '\n') && p[n] == ' ')
			return atoll(p + n + 1);
	}
	return -1;
}

TestSuite(example_server, .fini = fixture_fini);

Test(example_server, answers_correct_rows_under_concurrent_load, .timeout = 120)
{
	load_users();
	/* A pool smaller than the client count, so requests also wait for connections. */
	const char *args[] = {"--threads", "2", "--pool-size", "4", NULL};
	server_start(args);

	enum {
		CLIENTS = 8,
		PER_CLIENT = 200
	};
	static struct load l[CLIENTS];
	pthread_t t[CLIENTS];
	for (int i = 0; i < CLIENTS; i++) {
		l[i] = (struct load){.port = srv.port,
		                     .idx = i,
		                     .nreq = PER_CLIENT,
		                     .seed = 12345u + (unsigned)i * 7919u};
		cr_assert_eq(pthread_create(&t[i], NULL, load_main, &l[i]), 0);
	}
	int n200 = 0, n400 = 0, n404 = 0, ndb = 0, done = 0;
	for (int i = 0; i < CLIENTS; i++) {
		pthread_join(t[i], NULL);
		n200 += l[i].n200;
		n400 += l[i].n400;
		n404 += l[i].n404;
		ndb += l[i].ndb;
		done += l[i].done;
	}
	for (int i = 0; i < CLIENTS; i++)
		cr_expect_eq(l[i].err[0], '\0', "%s", l[i].err);
	cr_assert_eq(done, CLIENTS * PER_CLIENT, "only %d of %d requests answered correctly", done,
	             CLIENTS * PER_CLIENT);
	cr_assert_gt(n200, 0);
	cr_assert_gt(n400, 0);
	cr_assert_gt(n404, 0);
	cr_log_info("%d requests: %d ok, %d not found, %d bad; %d asked the database", done, n200,
	            n404, n400, ndb);

	static struct resp r;
	get("/metrics", &r);
	cr_assert_eq(r.status, 200);
	long long acquires = metric(r.body, "pgring_acquires_total{pool=\"http\"}");
	cr_assert_geq(acquires, ndb, "pgring_acquires_total %lld < %d lookups\n%s", acquires, ndb,
	              r.body);
	/* The server counted every response it sent, the /metrics one excepted (not sent yet). */
	cr_assert_eq(metric(r.body, "pgr_http_responses_total{code=\"200\"}"), n200);
	cr_assert_eq(metric(r.body, "pgr_http_responses_total{code=\"404\"}"), n404);
	cr_assert_eq(metric(r.body, "pgr_http_responses_total{code=\"400\"}"), n400);
	cr_assert_eq(metric(r.body, "pgring_connections{pool=\"http\",state=\"in_use\"}"), 0);

	server_stop_expect_clean_exit(5000);
}

Test(example_server, answers_503_when_pool_times_out_and_500_when_query_does, .timeout = 60)
{
	load_users();
	const char *args[] = {
	    "--threads",          "1",   "--pool-size", "1", "--acquire-timeout-ms", "300",
	    "--query-timeout-ms", "800", NULL};
	server_start(args);
	static struct resp r;
	get("/user/1", &r);
	cr_assert_eq(r.status, 200);

	/* Hold a lock that the lookup waits for: the pool's only connection stays busy. */
	PGconn *admin = tu_admin();
	tu_exec(admin, "begin");
	tu_exec(admin, "lock table pgr_demo_users in access exclusive mode");
	static struct client a, b;
	const char *why = "";
	static const char req[] = "GET /user/1 HTTP/1.1\r\nHost: test\r\n\r\n";
	cr_assert_eq(client_connect(&a, srv.port), 0);
	cr_assert_eq(send_all(&a, req, sizeof(req) - 1), 0);
	PGconn *watch = tu_admin();
	cr_assert(TU_WAIT_UNTIL(tu_query_long(watch, "select count(*) from pg_stat_activity"
	                                             " where wait_event_type = 'Lock'") == 1,
	                        5000),
	          "the lookup never blocked on the lock");
	int64_t t0 = tu_now_ms();
	cr_assert_eq(client_connect(&b, srv.port), 0);
	cr_assert_eq(send_all(&b, req, sizeof(req) - 1), 0);
	cr_assert_eq(read_response(&b, &r, &why), 0, "%s", why);
	cr_assert_eq(r.status, 503, "status %d: %s", r.status, r.body);
	int64_t took = tu_now_ms() - t0;
	/*
	 * The acquire starts after t0 (the request was not sent yet), so never early; its
	 * deadline is a linked timeout on the server's ring, late by the server loop's and this
	 * thread's trips back onto a CPU, a few 4 ms scheduler quanta each on a busy 2-CPU
	 * machine: 40 ms leaves room for ten.
	 */
	cr_log_info("503 after %lld ms for a 300 ms acquire timeout", (long long)took);
	cr_assert(took >= 300 - 1 && took < 300 + 40, "503 after %lld ms", (long long)took);
	cr_assert_eq(read_response(&a, &r, &why), 0, "%s", why);
	cr_assert_eq(r.status, 500, "status %d: %s", r.status, r.body);
	client_close(&a);
	client_close(&b);
	tu_exec(admin, "rollback");

	/* The timed-out connection was closed, not reused; a new one serves the next lookup. */
	cr_assert(TU_WAIT_UNTIL((get("/user/2", &r), r.status == 200), 5000), "status %d: %s",
	          r.status, r.body);

	/* SIGTERM with a lookup in flight: it is answered (Connection: close), then a clean exit.
	 */
	tu_exec(admin, "begin");
	tu_exec(admin, "lock table pgr_demo_users in access exclusive mode");
	cr_assert_eq(client_connect(&a, srv.port), 0);
	cr_assert_eq(send_all(&a, req, sizeof(req) - 1), 0);
	cr_assert(TU_WAIT_UNTIL(tu_query_long(watch, "select count(*) from pg_stat_activity"
	                                             " where wait_event_type = 'Lock'") == 1,
	                        5000));
	cr_assert_eq(kill(srv.pid, SIGTERM), 0);
	cr_assert_eq(read_response(&a, &r, &why), 0, "%s", why);
	cr_assert_eq(r.status, 500, "status %d: %s", r.status, r.body);
	cr_assert(r.conn_close, "a response during shutdown must close the connection");
	cr_assert_eq(fill(&a), 0, "the server did not close the connection");
	client_close(&a);
	tu_exec(admin, "rollback");
	PQfinish(admin);
	PQfinish(watch);
	int status = 0;
	cr_assert(TU_WAIT_UNTIL(server_exited(&status), 5000), "server did not exit");
	srv.pid = 0;
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status 0x%x", status);
}

Test(example_server, refuses_malformed_requests_and_closes, .timeout = 60)
{
	load_users();
	const char *args[] = {"--threads", "1", "--pool-size", "1", NULL};
	server_start(args);
	static struct client c;
	static struct resp r;
	const char *why = "";
	static const char *const bad[] = {
	    "GARBAGE\r\n\r\n",
	    "GET /user/1 HTTP/2.0\r\n\r\n",
	    "GET /user/1 HTTP/1.1\r\nNo colon here\r\n\r\n",
	    "POST /user/1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
	};
	static const int want[] = {400, 400, 400, 501};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		cr_assert_eq(client_connect(&c, srv.port), 0);
		cr_assert_eq(send_all(&c, bad[i], strlen(bad[i])), 0);
		cr_assert_eq(read_response(&c, &r, &why), 0, "%s", why);
		cr_assert_eq(r.status, want[i], "request %zu: status %d", i, r.status);
		cr_assert(r.conn_close);
		cr_assert_eq(fill(&c), 0, "request %zu: connection not closed", i);
		client_close(&c);
	}
	/*
	 * A head that never ends: 431 once the server's 8 KiB buffer is full, then close. Exactly
	 * 8 KiB, so that the server has read everything when it closes: unread bytes would make
	 * its close a reset, which may destroy the response before this side reads it.
	 */
	cr_assert_eq(client_connect(&c, srv.port), 0);
	char big[8192];
	memset(big, 'a', sizeof(big));
	memcpy(big, "GET /user/1 HTTP/1.1\r\nX-Long: ", 30);
	cr_assert_eq(send_all(&c, big, sizeof(big)), 0);
	cr_assert_eq(read_response(&c, &r, &why), 0, "%s", why);
	cr_assert_eq(r.status, 431);
	client_close(&c);
	/* A body is skipped by its Content-Length, and the next request on the connection works. */
	cr_assert_eq(client_connect(&c, srv.port), 0);
	static const char with_body[] =
	    "POST /user/1 HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789"
	    "GET /user/3 HTTP/1.1\r\n\r\n";
	cr_assert_eq(send_all(&c, with_body, sizeof(with_body) - 1), 0);
	cr_assert_eq(read_response(&c, &r, &why), 0, "%s", why);
	cr_assert_eq(r.status, 404);
	cr_assert_eq(read_response(&c, &r, &why), 0, "%s", why);
	cr_assert_eq(r.status, 200);
	char body[256];
	expected_body(3, body, sizeof(body));
	cr_assert_str_eq(r.body, body);
	client_close(&c);
	server_stop_expect_clean_exit(5000);
}

Test(example_server, connect_per_request_mode_answers_the_same_rows, .timeout = 60)
{
	load_users();
	const char *args[] = {"--threads", "1", "--mode", "connect", NULL};
	server_start(args);
	static struct load l = {.idx = 0, .nreq = 30, .seed = 99};
	l.port = srv.port;
	load_main(&l);
	cr_assert_eq(l.err[0], '\0', "%s", l.err);
	cr_assert_eq(l.done, 30);
	static struct resp r;
	get("/metrics", &r);
	cr_assert_eq(r.status, 200);
	cr_assert_null(strstr(r.body, "pgring_"), "no pool in connect mode");
	cr_assert_eq(metric(r.body, "pgr_http_responses_total{code=\"200\"}"), l.n200);
	server_stop_expect_clean_exit(5000);
}
