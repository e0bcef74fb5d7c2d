/* SPDX-License-Identifier: PostgreSQL */
/* Server roles against target_session_attrs, from the values libpq already holds (role.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "role.h"

enum pgr__role pgr__role_parse(const char *tsa)
{
	if (!tsa)
		return PGR__ROLE_ANY;
	if (strcmp(tsa, "read-write") == 0)
		return PGR__ROLE_READ_WRITE;
	if (strcmp(tsa, "primary") == 0)
		return PGR__ROLE_PRIMARY;
	if (strcmp(tsa, "read-only") == 0)
		return PGR__ROLE_READ_ONLY;
	if (strcmp(tsa, "standby") == 0)
		return PGR__ROLE_STANDBY;
	return PGR__ROLE_ANY;
}

/* "on" / "off" as the server reports it; -1 when it does not (a server before 14). */
static int reported(PGconn *pg, const char *name)
{
	const char *v = PQparameterStatus(pg, name);
	if (!v)
		return -1;
	return strcmp(v, "on") == 0;
}

bool pgr__role_check(enum pgr__role want, PGconn *pg)
{
	int standby = reported(pg, "in_hot_standby");
	int ro = reported(pg, "default_transaction_read_only");
	switch (want) {
	case PGR__ROLE_READ_WRITE:
		return standby != 1 && ro != 1;
	case PGR__ROLE_PRIMARY:
		return standby != 1;
	case PGR__ROLE_READ_ONLY:
		/* Unknown (before 14): libpq's connect-time check is all there is. */
		return standby != 0 || ro != 0;
	case PGR__ROLE_STANDBY:
		return standby != 0;
	default:
		return true;
	}
}

/* ---- host rotation ---- */

#define NLISTS 3
static const char *const list_kw[NLISTS] = {"host", "hostaddr", "port"};

struct pgr__hosts {
	uint32_t n;     /* hosts in the list */
	bool rotate;    /* a replica pool: each connect starts at the next host */
	uint32_t next;  /* rotation of the next connect */
	uint32_t aim;   /* the next connect starts here (a rebalance, a stall), or UINT32_MAX */
	uint32_t avoid; /* a host where a connect stalled: not a starting point until ... */
	int64_t avoid_until_ms;
	int idx[NLISTS]; /* index in p->kw of each list that names every host, or -1 */
	const char *orig[NLISTS];
	char **item[NLISTS]; /* the list split at commas */
	char *buf[NLISTS];   /* the rotated list */
};

static uint32_t count_items(const char *v)
{
	uint32_t n = 1;
	for (; *v; v++)
		n += *v == ',';
	return n;
}

static char **split(const char *v, uint32_t n)
{
	char **out = calloc(n + 1, sizeof(char *));
	if (!out)
		return NULL;
	const char *s = v;
	for (uint32_t i = 0; i < n; i++) {
		const char *e = strchr(s, ',');
		size_t len = e ? (size_t)(e - s) : strlen(s);
		out[i] = strndup(s, len);
		if (!out[i]) {
			for (uint32_t j = 0; j < i; j++)
				free(out[j]);
			free(out);
			return NULL;
		}
		s = e ? e + 1 : s + len;
	}
	return out;
}

int pgr__hosts_init(pgr_pool *p, const char *tsa)
{
	p->hosts = NULL;
	bool rotate = tsa && (p->role == PGR__ROLE_READ_ONLY || p->role == PGR__ROLE_STANDBY ||
	                      strcmp(tsa, "prefer-standby") == 0);
	uint32_t n = 0;
	for (size_t i = 0; p->kw[i]; i++)
		if (strcmp(p->kw[i], "host") == 0 || strcmp(p->kw[i], "hostaddr") == 0) {
			uint32_t k = count_items(p->val[i]);
			n = k > n ? k : n;
		}
	if (n < 2)
		return 0;
	struct pgr__hosts *h = calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	h->n = n;
	h->rotate = rotate;
	h->aim = UINT32_MAX;
	h->avoid = UINT32_MAX;
	p->hosts = h;
	for (int l = 0; l < NLISTS; l++) {
		h->idx[l] = -1;
		for (size_t i = 0; p->kw[i]; i++) {
			/* A list of one (port=5432 for every host) applies to all as it is. */
			if (strcmp(p->kw[i], list_kw[l]) != 0 || count_items(p->val[i]) != n)
				continue;
			h->idx[l] = (int)i;
			h->orig[l] = p->val[i];
			h->item[l] = split(p->val[i], n);
			h->buf[l] = malloc(strlen(p->val[i]) + 1);
			if (!h->item[l] || !h->buf[l])
				return -ENOMEM;
		}
	}
	return 0;
}

void pgr__hosts_free(pgr_pool *p)
{
	struct pgr__hosts *h = p->hosts;
	if (!h)
		return;
	for (int l = 0; l < NLISTS; l++) {
		for (uint32_t i = 0; h->item[l] && i < h->n; i++)
			free(h->item[l][i]);
		free(h->item[l]);
		free(h->buf[l]);
	}
	free(h);
	p->hosts = NULL;
}

void pgr__hosts_rotate(pgr_pool *p)
{
	struct pgr__hosts *h = p->hosts;
	if (!h)
		return;
	uint32_t k = h->rotate ? h->next++ % h->n : 0;
	if (h->aim != UINT32_MAX) {
		k = h->aim;
		h->aim = UINT32_MAX;
	} else if (!h->rotate) {
		/* In order, as libpq goes; past a host that stalled a connect lately. */
		if (k == h->avoid && pgr__now_ms(p) < h->avoid_until_ms)
			k = (k + 1) % h->n;
	} else {
		/* Start at a host whose standby is not held back for lag, if there is one: libpq
		 * still falls back to the lagging ones, which keep their connections unused. A
		 * host that stalled a connect lately is passed over the same way. */
		uint64_t skip = atomic_load_explicit(&p->lag_mask, memory_order_relaxed);
		if (h->avoid < 64 && pgr__now_ms(p) < h->avoid_until_ms)
			skip |= 1ull << h->avoid;
		for (uint32_t i = 0; skip && i < h->n && k < 64 && (skip >> k & 1); i++)
			k = h->next++ % h->n;
	}
	for (int l = 0; l < NLISTS; l++) {
		if (h->idx[l] < 0)
			continue;
		char *o = h->buf[l];
		for (uint32_t i = 0; i < h->n; i++) {
			const char *it = h->item[l][(k + i) % h->n];
			size_t len = strlen(it);
			if (i)
				*o++ = ',';
			memcpy(o, it, len);
			o += len;
		}
		*o = 0;
		p->val[h->idx[l]] = h->buf[l];
	}
}

void pgr__hosts_restore(pgr_pool *p)
{
	struct pgr__hosts *h = p->hosts;
	if (!h)
		return;
	for (int l = 0; l < NLISTS; l++)
		if (h->idx[l] >= 0)
			p->val[h->idx[l]] = h->orig[l];
}

uint32_t pgr__hosts_count(const pgr_pool *p)
{
	return p->hosts && p->hosts->rotate ? p->hosts->n : 1;
}

bool pgr__hosts_rotating(const pgr_pool *p)
{
	return p->hosts && p->hosts->rotate;
}

void pgr__hosts_aim(pgr_pool *p, uint32_t host)
{
	if (p->hosts && host < p->hosts->n)
		p->hosts->aim = host;
}

static bool same(const char *a, const char *b)
{
	return a && b && strcmp(a, b) == 0;
}

/* The host pg reached or is trying, UINT32_MAX when it cannot tell. */
static uint32_t find_host(const struct pgr__hosts *h, PGconn *pg)
{
	/* libpq reports the host (or the hostaddr when no host was given) and port it reached,
	 * or, while it connects, the one it is trying. */
	const char *host = PQhost(pg), *addr = PQhostaddr(pg), *port = PQport(pg);
	for (uint32_t i = 0; i < h->n; i++) {
		if (h->idx[0] >= 0 && !same(h->item[0][i], host))
			continue;
		if (h->idx[0] < 0 && h->idx[1] >= 0 && !same(h->item[1][i], addr))
			continue;
		if (h->idx[2] >= 0 && !same(h->item[2][i], port))
			continue;
		return i;
	}
	return UINT32_MAX;
}

uint32_t pgr__hosts_index(const pgr_pool *p, PGconn *pg)
{
	const struct pgr__hosts *h = p->hosts;
	if (!h || !h->rotate)
		return 0;
	return find_host(h, pg);
}

uint32_t pgr__hosts_stalled(pgr_pool *p, PGconn *pg, uint64_t *tried)
{
	struct pgr__hosts *h = p->hosts;
	if (!h)
		return UINT32_MAX;
	uint32_t k = find_host(h, pg);
	if (k == UINT32_MAX || k >= 64)
		return UINT32_MAX;
	*tried |= 1ull << k;
	h->avoid = k;
	h->avoid_until_ms = pgr__sat_add(pgr__now_ms(p), PGR__HOST_AVOID_MS);
	for (uint32_t i = 1; i < h->n && i < 64; i++) {
		uint32_t j = (k + i) % h->n;
		if (j < 64 && !(*tried >> j & 1)) {
			h->aim = j;
			return j;
		}
	}
	return UINT32_MAX;
}
