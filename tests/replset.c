/* SPDX-License-Identifier: PostgreSQL */
/* Replica sets for tests (replset.h). */
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "replset.h"
#include "testutil.h"

/* The set a test started (a copy: the test's frame is gone when an assertion ends it early),
 * stopped by rs_fini. */
static struct rs started_rs;
static bool started;

/* Runs pg_replica.sh; a failure carries the end of what the script printed (the server log's
 * last lines among it), since the replica set is gone by the time anyone reads the report. */
static void rs_ctl(struct rs *r, const char *args)
{
	char out[300], cmd[1024];
	snprintf(out, sizeof(out), "%s.ctl", r->dir);
	snprintf(cmd, sizeof(cmd), "'%s' %s >'%s' 2>&1", r->ctl, args, out);
	int rc = system(cmd);
	char tail[2048] = "";
	if (rc != 0) {
		FILE *f = fopen(out, "r");
		if (f) {
			fseek(f, 0, SEEK_END);
			long n = ftell(f);
			fseek(f, n > (long)sizeof(tail) - 1 ? n - (long)sizeof(tail) + 1 : 0,
			      SEEK_SET);
			size_t got = fread(tail, 1, sizeof(tail) - 1, f);
			tail[got] = 0;
			fclose(f);
		}
	}
	unlink(out);
	cr_assert(rc == 0, "%s failed (%d):\n%s", cmd, rc, tail);
}

void rs_start(struct rs *r, int nstandby, bool sync)
{
	memset(r, 0, sizeof(*r));
	/* pg_replica.sh lies beside the single cluster's script. */
	char path[512];
	snprintf(path, sizeof(path), "%s", tu_env("PGR_TEST_CTL"));
	snprintf(r->ctl, sizeof(r->ctl), "%s/pg_replica.sh", dirname(path));
	snprintf(r->dir, sizeof(r->dir), "/tmp/pgr-rs.XXXXXX");
	cr_assert(mkdtemp(r->dir), "mkdtemp");
	r->nstandby = nstandby;
	char cmd[1024];
	snprintf(cmd, sizeof(cmd), "'%s' start '%s' %d %s 2>'%s.log'", r->ctl, r->dir, nstandby,
	         sync ? "sync" : "", r->dir);
	FILE *f = popen(cmd, "r");
	cr_assert(f);
	char line[1024];
	while (fgets(line, sizeof(line), f)) {
		static const char *const keys[] = {
		    "PGR_REPL_PORT_PRIMARY=", "PGR_REPL_PORT_STANDBY1=", "PGR_REPL_PORT_STANDBY2="};
		for (int i = 0; i < 3; i++) {
			char *k = strstr(line, keys[i]);
			if (k)
				r->port[i] = atoi(k + strlen(keys[i]));
		}
	}
	int rc = pclose(f);
	started_rs = *r;
	started = true;
	cr_assert(rc == 0 && r->port[0] > 0, "%s failed (%d): its log is %s.log", cmd, rc, r->dir);
	char log[160];
	snprintf(log, sizeof(log), "%s.log", r->dir);
	unlink(log);
}

void rs_fini(void)
{
	if (!started)
		return;
	char cmd[1024];
	snprintf(cmd, sizeof(cmd), "'%s' stop '%s' >/dev/null 2>&1", started_rs.ctl,
	         started_rs.dir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove the replica set in %s\n", started_rs.dir);
	started = false;
}

void rs_stop(struct rs *r)
{
	char args[256];
	snprintf(args, sizeof(args), "stop '%s'", r->dir);
	started = false;
	rs_ctl(r, args);
}

void rs_node(struct rs *r, const char *what, const char *node)
{
	char args[256];
	snprintf(args, sizeof(args), "%s '%s' %s", what, r->dir, node);
	rs_ctl(r, args);
}

PGconn *rs_connect(struct rs *r, int node)
{
	char ci[256];
	snprintf(ci, sizeof(ci), "host=127.0.0.1 port=%d user=pgr_trust dbname=postgres",
	         r->port[node]);
	PGconn *c = PQconnectdb(ci);
	cr_assert(PQstatus(c) == CONNECTION_OK, "node %d: %s", node, PQerrorMessage(c));
	return c;
}

/* conninfo over the given nodes, in that order. */
char *rs_conninfo(struct rs *r, const int *nodes, int n, const char *tsa)
{
	char hosts[256] = "", ports[256] = "";
	for (int i = 0; i < n; i++) {
		size_t hl = strlen(hosts), pl = strlen(ports);
		snprintf(hosts + hl, sizeof(hosts) - hl, "%s127.0.0.1", i ? "," : "");
		snprintf(ports + pl, sizeof(ports) - pl, "%s%d", i ? "," : "", r->port[nodes[i]]);
	}
	char *ci = malloc(1024);
	snprintf(ci, 1024,
	         "host=%s port=%s user=pgr_trust dbname=postgres sslmode=disable "
	         "target_session_attrs=%s",
	         hosts, ports, tsa);
	return ci;
}

/* The ports of the pool's connections: every one checked out at once. */
void rs_pool_ports(pgr_pool *p, int n, int *ports)
{
	pgr_conn *c[8];
	for (int i = 0; i < n; i++) {
		int rc = pgr_acquire(p, 5000, &c[i]);
		cr_assert_eq(rc, 0, "%s", pgr_strerror(rc));
		ports[i] = atoi(PQport(pgr_conn_pg(c[i])));
	}
	for (int i = 0; i < n; i++)
		pgr_release(c[i]);
}

int rs_count_port(const int *ports, int n, int port)
{
	int k = 0;
	for (int i = 0; i < n; i++)
		k += ports[i] == port;
	return k;
}

void rs_standby_pool_config(pgr_config *cfg, const char *ci)
{
	pgr_config_init(cfg);
	cfg->conninfo = ci;
	cfg->min_idle = 6;
	cfg->max_size = 6;
	cfg->backoff_min_ms = 50;
	cfg->backoff_max_ms = 200;
}
