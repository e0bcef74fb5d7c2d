/* SPDX-License-Identifier: PostgreSQL */
/*
 * Configuration: defaults, validation and the private copy a pool keeps.
 *
 * A pool never reads the caller's pgr_config after pgr_pool_create returns; strings are
 * duplicated. The conninfo is parsed here once, both to reject a bad one early with libpq's
 * own message and to add the TCP keepalive / user-timeout defaults a pool needs (a black-holed
 * server is otherwise noticed only after two hours) unless the conninfo sets them.
 */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pool.h"
#include "replica.h"
#include "role.h"

/*
 * The size of the first pgr_config with a struct_size (0.2): every program that can call
 * pgr_pool_create has at least these bytes, so they are always safe to read. Fields added
 * later lie past it.
 */
#define CONFIG_SIZE_0_2 (offsetof(pgr_config, runtime) + sizeof(void *))

static void config_defaults(pgr_config *cfg)
{
	if (!cfg)
		return;
	memset(cfg, 0, sizeof(*cfg));
	cfg->struct_size = sizeof(*cfg);
	cfg->name = "default";
	cfg->min_idle = 0;
	cfg->max_size = 10;
	cfg->max_overflow = 0;
	cfg->max_waiters = 1024;
	cfg->max_connecting = 4;
	cfg->shards = 0;
	cfg->acquire_timeout_ms = 30000;
	cfg->connect_timeout_ms = 10000;
	cfg->max_lifetime_ms = 1800000;
	cfg->lifetime_jitter_ms = 0;
	cfg->idle_timeout_ms = 600000;
	cfg->ping_after_idle_ms = 30000;
	cfg->check_after_idle_ms = 1;
	cfg->ping_timeout_ms = 5000;
	cfg->reset_timeout_ms = 5000;
	cfg->keepalive_interval_ms = 0;
	cfg->leak_threshold_ms = 0;
	cfg->backoff_min_ms = 100;
	cfg->backoff_max_ms = 10000;
	cfg->tcp_user_timeout_ms = 30000;
	cfg->metrics = true;
	cfg->manager_thread = true;
	cfg->exec_pipeline_depth = 16;
	cfg->exec_max_pending = 256;
	cfg->exec_max_conns = 4;
	cfg->exec_idle_release_ms = 1000;
	cfg->exec_sync_group = 1;
	cfg->prepare_threshold = 5;
	cfg->prepare_cache_size = 64;
	cfg->max_replica_lag_ms = 0;
	cfg->replica_lag_interval_ms = 1000;
	cfg->replica_lag_grace_ms = 10000;
	cfg->rebalance_interval_ms = 5000;
}

void pgr_config_init_size(pgr_config *cfg, size_t size)
{
	if (!cfg || size < CONFIG_SIZE_0_2)
		return;
	pgr_config full;
	config_defaults(&full);
	/*
	 * Write exactly the caller's bytes: a program built against an older header has a smaller
	 * struct, and one built against a newer header gets 0 in the fields this library does not
	 * know, which is what such a field means when unset. struct_size keeps the caller's size
	 * so that pgr_pool_create knows which bytes it may read.
	 */
	size_t known = size;
	if (size > sizeof(full)) {
		memset((char *)cfg + sizeof(full), 0, size - sizeof(full));
		known = sizeof(full);
	}
	full.struct_size = size;
	memcpy(cfg, &full, known);
}

static int reject(pgr_pool *p, const char *field, const char *why);

int pgr__config_import(pgr_pool *p, const pgr_config *cfg, pgr_config *out)
{
	size_t size = cfg->struct_size;
	config_defaults(out);
	if (size < CONFIG_SIZE_0_2)
		return reject(p, "struct_size", "is not set: fill the config with pgr_config_init");
	if (size > sizeof(*out)) {
		/* Fields of a newer pgring.h: refused when set, rather than silently ignored. */
		for (const char *b = (const char *)cfg + sizeof(*out); b < (const char *)cfg + size;
		     b++)
			if (*b)
				return reject(p, "struct_size",
				              "holds fields this pgring version does not know "
				              "(built against a newer pgring.h)");
		size = sizeof(*out);
	}
	memcpy(out, cfg, size);
	out->struct_size = sizeof(*out);
	return 0;
}

static int reject(pgr_pool *p, const char *field, const char *why)
{
	char msg[256];
	snprintf(msg, sizeof(msg), "invalid config: %s %s", field, why);
	pgr__emit(p, PGR_EV_CONFIG_ERROR, msg, NULL, field, PGR__NONE);
	pgr__set_last_error(p, msg);
	return -EINVAL;
}

int pgr__config_validate(pgr_pool *p, const pgr_config *c)
{
	if (!c->conninfo)
		return reject(p, "conninfo", "must be set");
	if (c->max_size == 0)
		return reject(p, "max_size", "must be at least 1");
	/* pgr_loop_exec's bounds: 0 takes the default (a config filled without pgr_config_init
	 * keeps working). */
	if (c->exec_pipeline_depth > 1024)
		return reject(p, "exec_pipeline_depth", "must be at most 1024 (0 = default 16)");
	if (c->exec_max_pending > 65536)
		return reject(p, "exec_max_pending", "must be at most 65536 (0 = default 256)");
	if (c->exec_max_conns > PGR__MAX_CONNS)
		return reject(p, "exec_max_conns", "must be at most 4096 (0 = default 4)");
	if (c->exec_idle_release_ms < 0)
		return reject(p, "exec_idle_release_ms", "must not be negative");
	if (c->exec_sync_group > 1024)
		return reject(p, "exec_sync_group",
		              "must be at most 1024 (0 or 1 = a sync point per statement)");
	if (c->prepare_threshold < -1)
		return reject(p, "prepare_threshold", "must be -1 (never), 0 (always) or a count");
	if (c->prepare_cache_size > 4096)
		return reject(p, "prepare_cache_size", "must be at most 4096 (0 = default 64)");
	if ((uint64_t)c->max_size + c->max_overflow > PGR__MAX_CONNS)
		return reject(p, "max_overflow", "with max_size exceeds 4096 connections");
	if (c->min_idle > c->max_size)
		return reject(p, "min_idle", "must not exceed max_size");
	if (c->prepare_loop_query > 1)
		return reject(p, "prepare_loop_query", "must be 0 or 1");
	if (c->max_capacity > PGR__MAX_CONNS)
		return reject(p, "max_capacity",
		              "must be at most 4096 (0 = max_size + max_overflow)");
	if (c->max_capacity && c->max_capacity < c->max_size + c->max_overflow)
		return reject(p, "max_capacity",
		              "must not be below max_size + max_overflow (0 = their sum)");
	if (c->max_connecting == 0)
		return reject(p, "max_connecting", "must be at least 1");
	if (c->shards > PGR__MAX_SHARDS)
		return reject(p, "shards", "must be at most 64 (0 = one per CPU)");
	if (c->acquire_timeout_ms < 0)
		return reject(p, "acquire_timeout_ms", "must not be negative");
	if (c->connect_timeout_ms <= 0)
		return reject(p, "connect_timeout_ms", "must be positive");
	if (c->max_lifetime_ms < 0)
		return reject(p, "max_lifetime_ms", "must not be negative (0 = unlimited)");
	if (c->lifetime_jitter_ms < 0)
		return reject(p, "lifetime_jitter_ms", "must not be negative");
	if (c->max_lifetime_ms > 0 && c->lifetime_jitter_ms >= c->max_lifetime_ms)
		return reject(p, "lifetime_jitter_ms", "must be smaller than max_lifetime_ms");
	if (c->idle_timeout_ms < 0)
		return reject(p, "idle_timeout_ms", "must not be negative (0 = never)");
	if (c->ping_after_idle_ms < -1)
		return reject(p, "ping_after_idle_ms",
		              "must be -1 (never), 0 (always) or positive");
	if (c->check_after_idle_ms < 0)
		return reject(p, "check_after_idle_ms", "must not be negative");
	if (c->ping_timeout_ms <= 0)
		return reject(p, "ping_timeout_ms", "must be positive");
	if (c->reset_timeout_ms <= 0)
		return reject(p, "reset_timeout_ms", "must be positive");
	if (c->keepalive_interval_ms < 0)
		return reject(p, "keepalive_interval_ms", "must not be negative (0 = off)");
	if (c->leak_threshold_ms < 0)
		return reject(p, "leak_threshold_ms", "must not be negative (0 = off)");
	if (c->backoff_min_ms <= 0)
		return reject(p, "backoff_min_ms", "must be positive");
	if (c->backoff_max_ms < c->backoff_min_ms)
		return reject(p, "backoff_max_ms", "must not be below backoff_min_ms");
	if (c->tcp_user_timeout_ms < 0)
		return reject(p, "tcp_user_timeout_ms", "must not be negative (0 = off)");
	/* libpq parses tcp_user_timeout as an int of milliseconds. */
	if (c->tcp_user_timeout_ms > INT_MAX)
		return reject(p, "tcp_user_timeout_ms",
		              "must be at most 2147483647 (libpq's limit)");
	if (c->max_replica_lag_ms < 0)
		return reject(p, "max_replica_lag_ms", "must not be negative (0 = off)");
	/* A config from a program built before these fields has them 0: lag off, no interval. */
	if (c->max_replica_lag_ms > 0 && c->replica_lag_interval_ms <= 0)
		return reject(p, "replica_lag_interval_ms",
		              "must be positive when max_replica_lag_ms is set");
	if (c->replica_lag_interval_ms < 0)
		return reject(p, "replica_lag_interval_ms", "must not be negative");
	if (c->replica_lag_grace_ms < 0)
		return reject(p, "replica_lag_grace_ms", "must not be negative (0 = at once)");
	if (c->rebalance_interval_ms < 0)
		return reject(p, "rebalance_interval_ms", "must not be negative (0 = never)");
	if (c->reset_sql && !c->reset_sql[0])
		return reject(p, "reset_sql", "must be NULL or a statement");
	return 0;
}

static const char *find(PQconninfoOption *opts, const char *kw)
{
	for (PQconninfoOption *o = opts; o->keyword; o++)
		if (strcmp(o->keyword, kw) == 0)
			return o->val;
	return NULL;
}

/*
 * Turn the conninfo into keyword/value arrays for PQconnectStartParams, adding what a pool
 * needs and the user did not say. expand_dbname stays 0 at connect: the parse below already
 * expanded a URI, so a dbname holding a connection string cannot smuggle in new options.
 */
/* Mask every occurrence of the n bytes at s in msg. */
static void mask_raw(char *msg, const char *s, size_t n)
{
	if (n == 0)
		return;
	for (char *q = msg; (q = memmem(q, strlen(q), s, n)) != NULL; q += n)
		memset(q, '*', n);
}

/* Whether a URI query keyword names a secret once its %XX escapes are decoded, as libpq does. */
static bool secret_keyword(const char *k, size_t n)
{
	char key[16];
	size_t m = 0;
	for (size_t i = 0; i < n; i++) {
		if (m == sizeof(key) - 1)
			return false;
		char c = k[i];
		if (c == '%' && i + 2 < n && isxdigit((unsigned char)k[i + 1]) &&
		    isxdigit((unsigned char)k[i + 2])) {
			char hex[3] = {k[i + 1], k[i + 2], 0};
			c = (char)strtol(hex, NULL, 16);
			i += 2;
		}
		key[m++] = c;
	}
	key[m] = 0;
	return strcmp(key, "password") == 0 || strcmp(key, "sslpassword") == 0;
}

/*
 * A conninfo libpq could not parse: its error may echo raw tokens of it ('invalid
 * percent-encoded token: "Secret%zz"') that pgr__scrub cannot recognise, since the pool knows no
 * password before a parse and the token stands alone, without the URI around it. Mask the raw
 * text of every secret the URI carries (the userinfo password, password= and sslpassword= query
 * values) wherever it appears in msg. libpq's rules: the userinfo ends at the first '@' before
 * any '/', the password at its first ':'; query parameters follow the '?' after it.
 */
static void scrub_uri_secrets(const char *conninfo, char *msg)
{
	const char *s = NULL;
	if (strncmp(conninfo, "postgresql://", 13) == 0)
		s = conninfo + 13;
	else if (strncmp(conninfo, "postgres://", 11) == 0)
		s = conninfo + 11;
	if (!s)
		return;
	size_t auth = strcspn(s, "@/");
	if (s[auth] == '@') {
		const char *colon = memchr(s, ':', auth);
		if (colon)
			mask_raw(msg, colon + 1, (size_t)(s + auth - colon - 1));
		s += auth + 1;
	}
	for (const char *q = strchr(s, '?'); q;) {
		q++;
		size_t len = strcspn(q, "&");
		const char *eq = memchr(q, '=', len);
		if (eq && secret_keyword(q, (size_t)(eq - q)))
			mask_raw(msg, eq + 1, (size_t)(q + len - eq - 1));
		q = q[len] ? q + len : NULL;
	}
}

/* Whether the n bytes at k are a keyword libpq knows (known: PQconndefaults(), may be NULL). */
static bool known_keyword(const PQconninfoOption *known, const char *k, size_t n)
{
	for (const PQconninfoOption *o = known; o && o->keyword; o++)
		if (strlen(o->keyword) == n && memcmp(o->keyword, k, n) == 0)
			return true;
	return false;
}

/*
 * The same for a keyword=value conninfo: libpq's message may echo a word that followed a
 * secret's value ('missing "=" after "word"', 'invalid connection option "word"'), which is the
 * rest of a password with a space the operator did not quote or escape ("password=two words").
 * Mask the raw text of every word after a password= or sslpassword= value up to the next word
 * that names a libpq keyword. Values are read as libpq reads them: quoted, or up to a blank,
 * with backslash escapes.
 */
static void scrub_kv_secrets(const char *conninfo, char *msg)
{
	if (strncmp(conninfo, "postgresql://", 13) == 0 ||
	    strncmp(conninfo, "postgres://", 11) == 0)
		return;
	PQconninfoOption *known = PQconndefaults(); /* NULL: every word after a secret is masked */
	bool after_secret = false;
	const char *s = conninfo;
	while (*s) {
		if (isspace((unsigned char)*s)) {
			s++;
			continue;
		}
		const char *name = s;
		while (*s && *s != '=' && !isspace((unsigned char)*s))
			s++;
		size_t n = (size_t)(s - name);
		while (isspace((unsigned char)*s))
			s++;
		bool kw = *s == '=' && known_keyword(known, name, n);
		if (after_secret && !kw)
			mask_raw(msg, name, n);
		else
			after_secret = kw && ((n == 8 && memcmp(name, "password", 8) == 0) ||
			                      (n == 11 && memcmp(name, "sslpassword", 11) == 0));
		if (*s != '=')
			continue; /* a lone word: libpq stops here, and so could this */
		s++;
		while (isspace((unsigned char)*s))
			s++;
		if (*s == '\'') {
			for (s++; *s && *s != '\''; s++)
				if (*s == '\\' && s[1])
					s++;
			if (*s)
				s++;
		} else {
			for (; *s && !isspace((unsigned char)*s); s++)
				if (*s == '\\' && s[1])
					s++;
		}
	}
	PQconninfoFree(known);
}

/*
 * libpq reads connect_timeout (and PGCONNECT_TIMEOUT) only in its blocking connect; the pool
 * connects asynchronously, so it applies the value itself, by libpq's rules: whole seconds, 0
 * or less meaning no bound, 1 meaning 2. A bound the user set is a bound: the shorter of it and
 * connect_timeout_ms limits each host. A value libpq would refuse is refused here, at create.
 * A service file's connect_timeout is not seen here (PQconninfoParse does not read service
 * files): connect_timeout_ms, the conninfo or PGCONNECT_TIMEOUT set it.
 */
static int conninfo_connect_timeout(pgr_pool *p, const char *v, const char *where)
{
	if (!v)
		return 0;
	char *end;
	errno = 0;
	long long s = strtoll(v, &end, 10);
	bool digits = end != v;
	while (isspace((unsigned char)*end))
		end++;
	/* libpq's own test: digits, then nothing but blanks, and an int. */
	if (!digits || *end || errno == ERANGE || s > INT_MAX || s < INT_MIN) {
		char why[160];
		snprintf(why, sizeof(why), "\"%.40s\" is not a whole number of seconds", v);
		return reject(p, where, why);
	}
	if (s <= 0)
		return 0;
	if (s < 2)
		s = 2;
	if (s < INT64_MAX / 1000 && s * 1000 < p->cfg.connect_timeout_ms) {
		p->cfg.connect_timeout_ms = s * 1000;
		p->connect_timeout_src = where;
	}
	return 0;
}

static int build_params(pgr_pool *p)
{
	char *err = NULL;
	PQconninfoOption *opts = PQconninfoParse(p->conninfo_copy, &err);
	if (!opts) {
		/* Scrubbed whole, before the copy below can cut a secret in two: a URI's
		 * userinfo is recognised by its '@', which a cut may drop. */
		if (err) {
			scrub_uri_secrets(p->conninfo_copy, err);
			scrub_kv_secrets(p->conninfo_copy, err);
			pgr__scrub(p, err);
		}
		char msg[384];
		snprintf(msg, sizeof(msg), "invalid config: conninfo: %s",
		         err ? err : "out of memory");
		if (err)
			PQfreemem(err);
		size_t n = strlen(msg);
		while (n && msg[n - 1] == '\n')
			msg[--n] = 0;
		pgr__scrub(p, msg);
		pgr__emit(p, PGR_EV_CONFIG_ERROR, msg, NULL, "conninfo", PGR__NONE);
		pgr__set_last_error(p, msg);
		return -EINVAL;
	}
	size_t n = 0;
	for (PQconninfoOption *o = opts; o->keyword; o++)
		n++;
	char ka_user_timeout[32], ka_idle[16];
	snprintf(ka_user_timeout, sizeof(ka_user_timeout), "%lld",
	         (long long)p->cfg.tcp_user_timeout_ms);
	/* Idle probes every 30 s, 3 misses: a dead peer is found in about a minute and a half. */
	snprintf(ka_idle, sizeof(ka_idle), "%d", 30);
	struct {
		const char *kw, *val;
	} extra[] = {
	    {"keepalives", "1"},
	    {"keepalives_idle", ka_idle},
	    {"keepalives_interval", "10"},
	    {"keepalives_count", "3"},
	    {"tcp_user_timeout", p->cfg.tcp_user_timeout_ms ? ka_user_timeout : NULL},
	    /* A GSSAPI attempt with a Kerberos cache present can block; pools opt in explicitly. */
	    {"gssencmode", "disable"},
	    {"application_name", "pgring"},
	};
	size_t nextra = sizeof(extra) / sizeof(extra[0]);
	p->kw = calloc(n + nextra + 1, sizeof(char *));
	p->val = calloc(n + nextra + 1, sizeof(char *));
	if (!p->kw || !p->val) {
		PQconninfoFree(opts);
		return -ENOMEM;
	}
	size_t k = 0;
	for (PQconninfoOption *o = opts; o->keyword; o++) {
		if (!o->val)
			continue;
		p->kw[k] = strdup(o->keyword);
		p->val[k] = strdup(o->val);
		if (!p->kw[k] || !p->val[k])
			goto nomem;
		if (strcmp(o->keyword, "password") == 0 && o->val[0]) {
			p->password = strdup(o->val);
			if (!p->password)
				goto nomem;
		}
		k++;
	}
	for (size_t i = 0; i < nextra; i++) {
		if (!extra[i].val || find(opts, extra[i].kw))
			continue;
		p->kw[k] = strdup(extra[i].kw);
		p->val[k] = strdup(extra[i].val);
		if (!p->kw[k] || !p->val[k])
			goto nomem;
		k++;
	}
	p->connect_timeout_src = "connect_timeout_ms";
	const char *ct = find(opts, "connect_timeout");
	int rc = ct ? conninfo_connect_timeout(p, ct, "conninfo connect_timeout")
	            : conninfo_connect_timeout(p, getenv("PGCONNECT_TIMEOUT"), "PGCONNECT_TIMEOUT");
	if (rc != 0) {
		PQconninfoFree(opts);
		return rc;
	}
	p->role = (uint8_t)pgr__role_parse(find(opts, "target_session_attrs"));
	rc = pgr__hosts_init(p, find(opts, "target_session_attrs"));
	if (rc == 0)
		rc = pgr__replica_init(p);
	PQconninfoFree(opts);
	return rc;
nomem:
	PQconninfoFree(opts);
	return -ENOMEM;
}

int pgr__config_copy(pgr_pool *p, const pgr_config *cfg)
{
	p->cfg = *cfg;
	p->conninfo_copy = strdup(cfg->conninfo);
	p->name_copy = strdup(cfg->name ? cfg->name : "default");
	p->reset_sql_copy = cfg->reset_sql ? strdup(cfg->reset_sql) : NULL;
	if (!p->conninfo_copy || !p->name_copy || (cfg->reset_sql && !p->reset_sql_copy))
		return -ENOMEM;
	p->cfg.conninfo = p->conninfo_copy;
	p->cfg.name = p->name_copy;
	p->cfg.reset_sql = p->reset_sql_copy;
	if (p->cfg.shards == 0) {
		long n = sysconf(_SC_NPROCESSORS_CONF);
		p->cfg.shards =
		    n < 1 ? 1 : (n > (long)PGR__MAX_SHARDS ? PGR__MAX_SHARDS : (uint32_t)n);
	}
	return build_params(p);
}

void pgr__config_free(pgr_pool *p)
{
	pgr__replica_free(p);
	pgr__hosts_free(p);
	if (p->kw) {
		for (size_t i = 0; p->kw[i]; i++) {
			free((void *)p->kw[i]);
			free((void *)p->val[i]);
		}
	}
	free(p->kw);
	free(p->val);
	if (p->password) {
		explicit_bzero(p->password, strlen(p->password));
		free(p->password);
	}
	free(p->conninfo_copy);
	free(p->name_copy);
	free(p->reset_sql_copy);
}
