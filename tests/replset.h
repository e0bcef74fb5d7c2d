/* SPDX-License-Identifier: PostgreSQL */
/*
 * A primary with streaming standbys for a test (scripts/pg_replica.sh): started by the test,
 * removed by rs_stop or, when an assertion ends the test early, by rs_fini (.fini = rs_fini).
 */
#ifndef PGR_REPLSET_H
#define PGR_REPLSET_H

#include <stdbool.h>

#include "pgring.h"

struct rs {
	char dir[128];
	char ctl[512];
	int port[3]; /* primary, standby1, standby2 */
	int nstandby;
};

/* Start a primary and nstandby (at most 2) standbys; sync: standby1 is synchronous. */
void rs_start(struct rs *r, int nstandby, bool sync);
void rs_fini(void);
void rs_stop(struct rs *r);
/* pg_replica.sh WHAT DIR NODE: "kill", "promote", "pause", "server-stop", ... */
void rs_node(struct rs *r, const char *what, const char *node);
/* A libpq connection to node (0 primary, 1 standby1, 2 standby2). */
PGconn *rs_connect(struct rs *r, int node);
/* conninfo over the given nodes, in that order (malloc'd). */
char *rs_conninfo(struct rs *r, const int *nodes, int n, const char *tsa);
/* The ports of the pool's connections: n checked out at once (n <= 8), then released. */
void rs_pool_ports(pgr_pool *p, int n, int *ports);
int rs_count_port(const int *ports, int n, int port);
/* A pool of six connections over standby1 and standby2 (conninfo ci), with short reconnect
 * backoffs: the replica tests' starting point, to which each adds what it tests. */
void rs_standby_pool_config(pgr_config *cfg, const char *ci);

#endif
