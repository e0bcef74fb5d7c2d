/* SPDX-License-Identifier: PostgreSQL */
/*
 * The peers: the pools people use in other languages, measured in the same run as pgring.
 *
 *   hikaricp       HikariCP + pgjdbc           bench/peers/HikariPeer.java   java -cp <jars>
 *   psycopg_pool   psycopg 3's ConnectionPool  bench/peers/py_peer.py        python3
 *   sqlalchemy     SQLAlchemy's QueuePool      bench/peers/py_peer.py        python3
 *                  over psycopg2
 *   node_pg        node-postgres's pg.Pool     bench/peers/node_peer.js      node
 *
 * Each peer is a child process in its own runtime, started at its first round and kept for
 * the whole run (a JVM that is warmed once stays warm). pgr_bench drives it over a line
 * protocol on its stdin and stdout:
 *
 *   child:  ready <versions>                     or: skip <why>      (once, at start)
 *   parent: run <none|select1|lookup> <threads> <conns> <hold_ns> <warmup_s> <secs> <sample>
 *   child:  ok <ops> <errors> <secs> <sum_ns> <max_ns> <bucket:count,...|->
 *           or: fail <why>
 *   parent: quit                                 (or end of input)
 *
 * A round in the child follows the harness's method (fresh pool, every connection open before
 * the warm-up, an operation counts when it finishes inside the window) and records latencies in
 * pgring's histogram buckets (src/hist.h), so the percentiles are computed by the same code.
 * The server's address comes to the child in PGR_PEER_* environment variables, never on the
 * command line (the password would show in ps).
 *
 * A peer that cannot start (runtime or package missing), says skip, fails a round or stops
 * answering is reported as skipped with the reason; a child that hangs is killed at a deadline
 * well past what the round needs. The child's stderr goes to an unlinked temporary file, whose
 * last line becomes the reason when the child dies.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench.h"

extern char **environ;

#ifndef PGR_BENCH_PEERS_DIR
#define PGR_BENCH_PEERS_DIR "bench/peers"
#endif
#ifndef PGR_BENCH_NODE_MODULES
#define PGR_BENCH_NODE_MODULES "build-bench/node/node_modules"
#endif

/* Starting a JVM that compiles HikariPeer.java takes seconds, more on a loaded 2-core machine. */
#define START_TIMEOUT_S 120.0
/* A round needs its warm-up and window plus the pool's fill (up to 20 s in every peer) and
 * close; past this margin the child is taken to hang. */
#define ROUND_MARGIN_S 60.0

enum {
	K_JAVA,
	K_PYTHON,
	K_NODE
};

typedef struct peer {
	const char *pool; /* argument of py_peer.py */
	int kind;
	double first_warmup_s; /* extra warm-up before the first round of each query kind */
	/* State, main thread only. */
	int state; /* 0: not started, 1: running, -1: unavailable (why) */
	pid_t pid;
	int in_fd, out_fd, err_fd;
	char desc[256];
	char why[512];
	char buf[65536]; /* bytes read from the child's stdout, not yet consumed */
	size_t len;
	size_t consumed; /* length of the line read_line returned last, dropped at the next call */
} peer;

static peer p_hikaricp = {.kind = K_JAVA, .first_warmup_s = 1.0};
static peer p_psycopg = {.pool = "psycopg_pool", .kind = K_PYTHON};
static peer p_sqlalchemy = {.pool = "sqlalchemy", .kind = K_PYTHON};
static peer p_node = {.kind = K_NODE, .first_warmup_s = 0.3};

static const char *env_or(const char *name, const char *def)
{
	const char *v = getenv(name);
	return v && *v ? v : def;
}

static const char *peers_dir(void)
{
	return env_or("PGR_BENCH_PEERS_DIR", PGR_BENCH_PEERS_DIR);
}

/* The last non-empty line the child wrote to stderr, for a failure's reason. */
static void stderr_tail(const peer *p, char *out, size_t n)
{
	out[0] = '\0';
	if (p->err_fd < 0)
		return;
	char buf[4096];
	off_t end = lseek(p->err_fd, 0, SEEK_END);
	if (end <= 0)
		return;
	off_t from = end > (off_t)sizeof buf - 1 ? end - (off_t)sizeof buf + 1 : 0;
	ssize_t got = pread(p->err_fd, buf, sizeof buf - 1, from);
	if (got <= 0)
		return;
	buf[got] = '\0';
	while (got > 0 && (buf[got - 1] == '\n' || buf[got - 1] == '\r' || buf[got - 1] == ' '))
		buf[--got] = '\0';
	const char *line = strrchr(buf, '\n');
	line = line ? line + 1 : buf;
	size_t l = strlen(line);
	if (l >= n)
		l = n - 1;
	memcpy(out, line, l);
	out[l] = '\0';
}

__attribute__((format(printf, 2, 3))) static void set_why(peer *p, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(p->why, sizeof p->why, fmt, ap);
	va_end(ap);
}

/*
 * After end of file on the child's stdout: how it ended ("exit status 1", "signal 9"), waiting
 * up to a second for it to finish exiting; empty when it has not.
 */
static void exit_status(peer *p, char *out, size_t n)
{
	out[0] = '\0';
	for (int i = 0; i < 100 && p->pid > 0; i++) {
		int st;
		pid_t w = waitpid(p->pid, &st, WNOHANG);
		if (w == p->pid) {
			p->pid = 0;
			if (WIFEXITED(st))
				snprintf(out, n, "exit status %d", WEXITSTATUS(st));
			else if (WIFSIGNALED(st))
				snprintf(out, n, "killed by signal %d", WTERMSIG(st));
			return;
		}
		if (w < 0 && errno != EINTR)
			return;
		usleep(10000);
	}
}

/* Kill and reap the child, close its pipes; the peer becomes unavailable. */
static void peer_kill(peer *p)
{
	if (p->pid > 0) {
		kill(p->pid, SIGKILL);
		while (waitpid(p->pid, NULL, 0) < 0 && errno == EINTR)
			;
	}
	p->pid = 0;
	if (p->in_fd >= 0)
		close(p->in_fd);
	if (p->out_fd >= 0)
		close(p->out_fd);
	if (p->err_fd >= 0)
		close(p->err_fd);
	p->in_fd = p->out_fd = p->err_fd = -1;
	p->state = -1;
}

/*
 * Read one line from the child into *line (NUL-terminated, inside p->buf, valid until the next
 * call). Returns 0, -ETIMEDOUT at the deadline, -EPIPE at end of file.
 */
static int read_line(peer *p, uint64_t deadline_ns, char **line)
{
	if (p->consumed) {
		memmove(p->buf, p->buf + p->consumed, p->len - p->consumed);
		p->len -= p->consumed;
		p->consumed = 0;
	}
	for (;;) {
		char *nl = memchr(p->buf, '\n', p->len);
		if (nl) {
			*nl = '\0';
			*line = p->buf;
			p->consumed = (size_t)(nl - p->buf) + 1;
			return 0;
		}
		if (p->len == sizeof p->buf)
			return -EPIPE; /* a line this long is not the protocol */
		uint64_t now = bench_now_ns();
		if (now >= deadline_ns)
			return -ETIMEDOUT;
		uint64_t left_ms = (deadline_ns - now) / 1000000u + 1;
		struct pollfd pfd = {.fd = p->out_fd, .events = POLLIN};
		int rc = poll(&pfd, 1, left_ms > INT_MAX ? INT_MAX : (int)left_ms);
		if (rc < 0 && errno != EINTR)
			return -EPIPE;
		if (rc <= 0)
			continue;
		ssize_t got = read(p->out_fd, p->buf + p->len, sizeof p->buf - p->len);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			return -EPIPE;
		p->len += (size_t)got;
	}
}

/* environ without the variables we set, plus ours; strings in vars[] are owned by the caller. */
static char **child_env(char **vars, size_t nvars)
{
	size_t n = 0;
	while (environ[n])
		n++;
	char **env = calloc(n + nvars + 1, sizeof *env);
	if (!env)
		return NULL;
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		const char *e = environ[i];
		if (!strncmp(e, "PGR_PEER_", 9) || !strncmp(e, "NODE_PATH=", 10))
			continue;
		env[k++] = environ[i];
	}
	for (size_t i = 0; i < nvars; i++)
		env[k++] = vars[i];
	env[k] = NULL;
	return env;
}

static bool file_exists(const char *path)
{
	return access(path, R_OK) == 0;
}

/* Start the child and read its first line. On failure the peer is unavailable with why set. */
static void peer_start(peer *p, const bench_target *t)
{
	p->state = -1;
	p->in_fd = p->out_fd = p->err_fd = -1;
	char script[PATH_MAX], cp[4096] = "", node_path[PATH_MAX + 16] = "";
	const char *argv[8] = {NULL};
	const char *dir = peers_dir();

	switch (p->kind) {
	case K_JAVA: {
		snprintf(script, sizeof script, "%s/HikariPeer.java", dir);
		const char *user_cp = getenv("PGR_BENCH_JAVA_CP");
		if (user_cp && *user_cp) {
			snprintf(cp, sizeof cp, "%s", user_cp);
		} else {
			/* Debian's jars (libhikaricp-java, libpostgresql-jdbc-java, libslf4j-java);
			 * slf4j-nop keeps HikariCP's logging quiet. */
			static const struct {
				const char *jar, *pkg;
			} jars[] = {
			    {"/usr/share/java/HikariCP.jar", "libhikaricp-java"},
			    {"/usr/share/java/postgresql.jar", "libpostgresql-jdbc-java"},
			    {"/usr/share/java/slf4j-api.jar", "libslf4j-java"},
			    {"/usr/share/java/slf4j-nop.jar", "libslf4j-java"},
			};
			for (size_t i = 0; i < sizeof jars / sizeof jars[0]; i++) {
				if (!file_exists(jars[i].jar)) {
					set_why(p, "%s not installed (no %s)", jars[i].pkg,
					        jars[i].jar);
					return;
				}
				size_t l = strlen(cp);
				snprintf(cp + l, sizeof cp - l, "%s%s", l ? ":" : "", jars[i].jar);
			}
		}
		argv[0] = env_or("PGR_BENCH_JAVA", "java");
		argv[1] = "-cp";
		argv[2] = cp;
		argv[3] = script;
		break;
	}
	case K_PYTHON:
		snprintf(script, sizeof script, "%s/py_peer.py", dir);
		/* Debian's python3-* packages are installed for the system interpreter; a python3
		 * found first in PATH (pyenv, a venv) would not see them. */
		argv[0] = env_or("PGR_BENCH_PYTHON",
		                 file_exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3");
		argv[1] = script;
		argv[2] = p->pool;
		break;
	case K_NODE:
		snprintf(script, sizeof script, "%s/node_peer.js", dir);
		snprintf(node_path, sizeof node_path, "NODE_PATH=%s",
		         env_or("PGR_BENCH_NODE_PATH", PGR_BENCH_NODE_MODULES));
		argv[0] = env_or("PGR_BENCH_NODE", "node");
		argv[1] = script;
		break;
	}
	if (!file_exists(script)) {
		set_why(p, "%s not found (set PGR_BENCH_PEERS_DIR)", script);
		return;
	}

	char v_host[300], v_port[40], v_user[160], v_pw[160], v_db[160], v_ssl[24], v_ci[4200],
	    v_warm[48];
	snprintf(v_host, sizeof v_host, "PGR_PEER_HOST=%s", t->host);
	snprintf(v_port, sizeof v_port, "PGR_PEER_PORT=%s", t->port);
	snprintf(v_user, sizeof v_user, "PGR_PEER_USER=%s", t->user);
	snprintf(v_pw, sizeof v_pw, "PGR_PEER_PASSWORD=%s", t->password);
	snprintf(v_db, sizeof v_db, "PGR_PEER_DBNAME=%s", t->dbname);
	snprintf(v_ssl, sizeof v_ssl, "PGR_PEER_SSL=%d", t->ssl ? 1 : 0);
	snprintf(v_ci, sizeof v_ci, "PGR_PEER_CONNINFO=%s", t->conninfo);
	snprintf(v_warm, sizeof v_warm, "PGR_PEER_FIRST_WARMUP=%.3f", p->first_warmup_s);
	char *vars[] = {v_host, v_port, v_user, v_pw, v_db, v_ssl, v_ci, v_warm, node_path};
	size_t nvars = sizeof vars / sizeof vars[0] - (node_path[0] ? 0 : 1);
	char **envp = child_env(vars, nvars);

	char errpath[] = "/tmp/pgr_bench_peer.XXXXXX";
	int in[2] = {-1, -1}, out[2] = {-1, -1};
	int err_fd = mkostemp(errpath, O_CLOEXEC); /* no other peer's child inherits it */
	if (err_fd >= 0)
		unlink(errpath);
	if (!envp || err_fd < 0 || pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0) {
		set_why(p, "cannot start: %s", strerror(errno));
		goto fail;
	}
	pid_t pid = fork();
	if (pid < 0) {
		set_why(p, "cannot start: fork: %s", strerror(errno));
		goto fail;
	}
	if (pid == 0) {
		/* Child: only async-signal-safe calls until exec. */
		dup2(in[0], 0);
		dup2(out[1], 1);
		dup2(err_fd, 2);
		execvpe(argv[0], (char *const *)argv, envp);
		/* The parent reads this as the peer's first line. */
		static const char msg[] = "skip cannot run the runtime: ";
		(void)!write(1, msg, sizeof msg - 1);
		(void)!write(1, argv[0], strlen(argv[0]));
		(void)!write(1, " not found\n", 11);
		_exit(127);
	}
	close(in[0]);
	close(out[1]);
	free(envp);
	envp = NULL;
	p->pid = pid;
	p->in_fd = in[1];
	p->out_fd = out[0];
	p->err_fd = err_fd;
	p->len = 0;
	p->state = 1;

	char *line;
	int rc = read_line(p, bench_now_ns() + (uint64_t)(START_TIMEOUT_S * 1e9), &line);
	if (rc == 0 && !strncmp(line, "ready ", 6)) {
		snprintf(p->desc, sizeof p->desc, "%s", line + 6);
		return;
	}
	if (rc == 0 && !strncmp(line, "skip ", 5)) {
		set_why(p, "%s", line + 5);
	} else {
		char tail[300];
		stderr_tail(p, tail, sizeof tail);
		if (rc == -ETIMEDOUT)
			set_why(p, "did not start within %.0f s", START_TIMEOUT_S);
		else if (rc == 0)
			set_why(p, "unexpected first line: %.200s", line);
		else {
			char how[64];
			exit_status(p, how, sizeof how);
			set_why(p, "exited at start (%s): %.300s", how[0] ? how : "still running",
			        tail[0] ? tail : "no message");
		}
	}
	peer_kill(p);
	return;
fail:
	free(envp);
	for (int i = 0; i < 2; i++) {
		if (in[i] >= 0)
			close(in[i]);
		if (out[i] >= 0)
			close(out[i]);
	}
	if (err_fd >= 0)
		close(err_fd);
}

static bool write_all(int fd, const char *s, size_t n)
{
	while (n) {
		ssize_t w = write(fd, s, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return false;
		s += w;
		n -= (size_t)w;
	}
	return true;
}

/* Parse "ok <ops> <errors> <secs> <sum_ns> <max_ns> <hist>" into r. */
static int parse_ok(char *line, bench_round *r)
{
	unsigned long long ops, errors, sum, max;
	double secs;
	int off = 0;
	if (sscanf(line, "ok %llu %llu %lf %llu %llu %n", &ops, &errors, &secs, &sum, &max, &off) !=
	        5 ||
	    !off)
		return -EPROTO;
	char *h = line + off;
	if (strcmp(h, "-") != 0) {
		for (char *save, *tok = strtok_r(h, ",", &save); tok;
		     tok = strtok_r(NULL, ",", &save)) {
			unsigned b;
			unsigned long long c;
			if (sscanf(tok, "%u:%llu", &b, &c) != 2 || b >= PGR__HIST_BUCKETS)
				return -EPROTO;
			r->snap->bucket[b] += c;
			r->snap->count += c;
		}
	}
	r->snap->sum_ns += sum;
	if (max > r->snap->max_ns)
		r->snap->max_ns = max;
	r->ops += ops;
	r->errors += errors;
	r->secs_counted += secs;
	return 0;
}

static int peer_round(const bench_runner *self, const bench_target *t, bench_round *r, char *err,
                      size_t errlen)
{
	peer *p = self->ctx;
	if (p->state == 0)
		peer_start(p, t);
	if (p->state < 0) {
		snprintf(err, errlen, "skipped (%s)", p->why);
		return -ENOENT;
	}
	static const char *const qname[] = {"none", "select1", "lookup"};
	char cmd[160];
	int n = snprintf(cmd, sizeof cmd, "run %s %u %u %llu %.3f %.3f %u\n", qname[r->query],
	                 r->threads, r->conns, (unsigned long long)r->hold_ns, r->warmup_s, r->secs,
	                 r->sample_every);
	char *line = NULL;
	int rc = write_all(p->in_fd, cmd, (size_t)n) ? 0 : -EPIPE;
	if (rc == 0) {
		double wait_s = r->warmup_s + p->first_warmup_s + r->secs + ROUND_MARGIN_S;
		rc = read_line(p, bench_now_ns() + (uint64_t)(wait_s * 1e9), &line);
	}
	if (rc == 0 && !strncmp(line, "ok ", 3)) {
		if (parse_ok(line, r) == 0)
			return 0;
		snprintf(err, errlen, "skipped (failed: bad reply '%.200s')", line);
		return -ENOENT;
	}
	if (rc == 0 && !strncmp(line, "fail ", 5)) {
		/* The child is fine; this configuration failed (a timeout, too many connections).
		 */
		snprintf(err, errlen, "skipped (failed: %.400s)", line + 5);
		return -ENOENT;
	}
	char tail[300];
	stderr_tail(p, tail, sizeof tail);
	if (rc == -ETIMEDOUT)
		set_why(p, "failed: no answer within the round's deadline; killed");
	else if (rc == 0)
		set_why(p, "failed: unexpected reply '%.200s'", line);
	else {
		char how[64];
		exit_status(p, how, sizeof how);
		set_why(p, "failed: the process closed its output (%s): %.300s",
		        how[0] ? how : "still running", tail[0] ? tail : "no message");
	}
	peer_kill(p);
	snprintf(err, errlen, "skipped (%s)", p->why);
	return -ENOENT;
}

static const char *peer_describe(const bench_runner *self)
{
	peer *p = self->ctx;
	return p->desc[0] ? p->desc : NULL;
}

static void peer_shutdown(const bench_runner *self)
{
	peer *p = self->ctx;
	if (p->state != 1)
		return;
	/* Ask it to leave; kill it if it has not within 5 s (a JVM closing its pool). */
	if (write_all(p->in_fd, "quit\n", 5)) {
		close(p->in_fd);
		p->in_fd = -1;
		uint64_t deadline = bench_now_ns() + 5000000000u;
		while (bench_now_ns() < deadline) {
			pid_t w = waitpid(p->pid, NULL, WNOHANG);
			if (w == p->pid || (w < 0 && errno != EINTR)) {
				p->pid = 0;
				break;
			}
			usleep(10000);
		}
	}
	peer_kill(p);
}

const bench_runner bench_runner_hikaricp = {
    .name = "hikaricp",
    .round = peer_round,
    .describe = peer_describe,
    .shutdown = peer_shutdown,
    .ctx = &p_hikaricp,
};

const bench_runner bench_runner_psycopg_pool = {
    .name = "psycopg_pool",
    .round = peer_round,
    .describe = peer_describe,
    .shutdown = peer_shutdown,
    .ctx = &p_psycopg,
};

const bench_runner bench_runner_sqlalchemy = {
    .name = "sqlalchemy",
    .round = peer_round,
    .describe = peer_describe,
    .shutdown = peer_shutdown,
    .ctx = &p_sqlalchemy,
};

const bench_runner bench_runner_node_pg = {
    .name = "node_pg",
    .round = peer_round,
    .describe = peer_describe,
    .shutdown = peer_shutdown,
    .ctx = &p_node,
};
