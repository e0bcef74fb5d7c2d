/* SPDX-License-Identifier: PostgreSQL */
/*
 * Prometheus text exposition format 0.0.4.
 *
 * Every family gets # HELP and # TYPE, every sample the label pool="<name>". Numbers are
 * printed exactly: counters and gauges as integers, seconds as a decimal with nine fraction
 * digits at most (a nanosecond count divided by 10^9 is always exactly such a decimal), so no
 * float formatting rounds a value or a bucket bound.
 */
#include "prom.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

/* snprintf-style sink: need grows by everything written, buf holds what fits. */
struct out {
	char *buf;
	size_t len;
	size_t need;
};

static void put(struct out *o, const char *s, size_t n)
{
	if (o->need < o->len) {
		size_t room = o->len - 1 - o->need; /* keep the last byte for the NUL */
		size_t k = n < room ? n : room;
		memcpy(o->buf + o->need, s, k);
		o->buf[o->need + k] = '\0';
	}
	o->need += n;
}

static void puts_(struct out *o, const char *s)
{
	put(o, s, strlen(s));
}

static void put_u64(struct out *o, uint64_t v)
{
	char tmp[24];
	int n = snprintf(tmp, sizeof(tmp), "%" PRIu64, v);
	put(o, tmp, (size_t)n);
}

/* ns as seconds, exactly: "0.000001023", "17.179869183", "3"; no exponent, no rounding. */
static void put_seconds(struct out *o, uint64_t ns)
{
	char tmp[32];
	uint64_t s = ns / 1000000000u;
	uint64_t frac = ns % 1000000000u;
	int n;
	if (frac == 0) {
		n = snprintf(tmp, sizeof(tmp), "%" PRIu64, s);
	} else {
		n = snprintf(tmp, sizeof(tmp), "%" PRIu64 ".%09" PRIu64, s, frac);
		while (tmp[n - 1] == '0')
			n--;
	}
	put(o, tmp, (size_t)n);
}

/* Length of the valid UTF-8 sequence at s, or 0 when s does not start one. */
static size_t utf8_len(const unsigned char *s)
{
	if (s[0] < 0x80)
		return 1;
	size_t n = s[0] >= 0xf0 && s[0] <= 0xf4 ? 4 : s[0] >= 0xe0 ? 3 : s[0] >= 0xc2 ? 2 : 0;
	if (n == 0 || s[0] >= 0xf5)
		return 0;
	for (size_t i = 1; i < n; i++)
		if ((s[i] & 0xc0) != 0x80)
			return 0;
	/* Overlong 3/4-byte forms, surrogates and code points past U+10FFFF. */
	if ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] >= 0xa0) ||
	    (s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] >= 0x90))
		return 0;
	return n;
}

/*
 * A label value: the exposition format escapes exactly backslash, double quote and newline,
 * and must be UTF-8. Any pool name a user passes stays valid text: a byte that does not start
 * a valid UTF-8 sequence becomes U+FFFD.
 */
static void put_label_value(struct out *o, const char *s)
{
	while (*s) {
		switch (*s) {
		case '\\':
			put(o, "\\\\", 2);
			s++;
			continue;
		case '"':
			put(o, "\\\"", 2);
			s++;
			continue;
		case '\n':
			put(o, "\\n", 2);
			s++;
			continue;
		}
		size_t n = utf8_len((const unsigned char *)s);
		if (n == 0) {
			put(o, "\xef\xbf\xbd", 3);
			s++;
		} else {
			put(o, s, n);
			s += n;
		}
	}
}

static void family(struct out *o, const char *name, const char *type, const char *help)
{
	puts_(o, "# HELP ");
	puts_(o, name);
	puts_(o, " ");
	puts_(o, help);
	puts_(o, "\n# TYPE ");
	puts_(o, name);
	puts_(o, " ");
	puts_(o, type);
	puts_(o, "\n");
}

/*
 * "<name><suffix>{pool="<pool>"[,<label>="<value>"]" — the caller may add labels, then closes
 * with sample_value. label and value come from this file or from fixed name tables, so they
 * need no escaping; only the pool name is the user's.
 */
static void sample_start(struct out *o, const char *name, const char *suffix, const char *pool,
                         const char *label, const char *value)
{
	puts_(o, name);
	puts_(o, suffix);
	puts_(o, "{pool=\"");
	put_label_value(o, pool);
	puts_(o, "\"");
	if (label) {
		puts_(o, ",");
		puts_(o, label);
		puts_(o, "=\"");
		puts_(o, value);
		puts_(o, "\"");
	}
}

static void sample_value(struct out *o, uint64_t v)
{
	puts_(o, "} ");
	put_u64(o, v);
	puts_(o, "\n");
}

static void sample(struct out *o, const char *name, const char *pool, const char *label,
                   const char *value, uint64_t v)
{
	sample_start(o, name, "", pool, label, value);
	sample_value(o, v);
}

static void gauge(struct out *o, const char *name, const char *help, const char *pool, uint64_t v)
{
	family(o, name, "gauge", help);
	sample(o, name, pool, NULL, NULL, v);
}

static void counter(struct out *o, const char *name, const char *help, const char *pool, uint64_t v)
{
	family(o, name, "counter", help);
	sample(o, name, pool, NULL, NULL, v);
}

/*
 * Bucket bounds exported for every histogram: 2^k - 1 ns for k = LE_K_MIN..LE_K_MAX, about
 * 1 us to 34 s, doubling each step.
 *
 * Why 2^k - 1 and not a round number: the recorder keeps log-linear buckets whose upper bounds
 * are (m << j) - 1 ns with m in 5..8, so a round bound like 1 ms would cut a bucket in two and
 * its count could only be guessed. 2^k - 1 is the upper bound of the last sub-bucket below
 * 2^k (for every k up to PGR__HIST_MAX_EXP; past that the top bucket runs to infinity), so
 * pgr__hist_snap_count_le returns the exact number of values <= it. The bound is reported as
 * itself, (2^k - 1) ns, rather than rounded up to 2^k ns: values are whole nanoseconds, and a
 * value of exactly 2^k ns would belong under le="2^k ns" in Prometheus' reading but is not
 * counted there. Exact bounds keep every bucket sample true, at the price of less round labels.
 */
#define LE_K_MIN 10u
#define LE_K_MAX 35u
_Static_assert(LE_K_MAX <= PGR__HIST_MAX_EXP, "histogram export bound past the last exact edge");

static void histogram(struct out *o, const char *name, const char *help, const char *pool,
                      const pgr__hist_snap *s)
{
	family(o, name, "histogram", help);
	for (unsigned k = LE_K_MIN; k <= LE_K_MAX; k++) {
		uint64_t edge_ns = ((uint64_t)1 << k) - 1;
		sample_start(o, name, "_bucket", pool, NULL, NULL);
		puts_(o, ",le=\"");
		put_seconds(o, edge_ns);
		puts_(o, "\"");
		sample_value(o, pgr__hist_snap_count_le(s, edge_ns));
	}
	/* +Inf must equal _count; both come from the buckets' sum (see pgr__hist_snap_merge). */
	sample_start(o, name, "_bucket", pool, "le", "+Inf");
	sample_value(o, s->count);
	sample_start(o, name, "_sum", pool, NULL, NULL);
	puts_(o, "} ");
	put_seconds(o, s->sum_ns);
	puts_(o, "\n");
	sample_start(o, name, "_count", pool, NULL, NULL);
	sample_value(o, s->count);
}

size_t pgr__prom_format(char *buf, size_t len, const char *pool_name, const pgr_stats *st,
                        const pgr__hist_snap snaps[PGR_HIST_KINDS])
{
	struct out o = {.buf = buf, .len = len, .need = 0};
	const char *pool = pool_name ? pool_name : "";
	if (len > 0)
		buf[0] = '\0'; /* NUL-terminated even if nothing at all fits */

	family(&o, "pgring_connections", "gauge",
	       "Connections by state; connecting ones are not open yet.");
	sample(&o, "pgring_connections", pool, "state", "idle", st->idle);
	sample(&o, "pgring_connections", pool, "state", "in_use", st->in_use);
	sample(&o, "pgring_connections", pool, "state", "connecting", st->connecting);
	gauge(&o, "pgring_connections_open",
	      "Open connections: idle, in use, or being checked or reset.", pool, st->size);
	gauge(&o, "pgring_connections_overflow_in_use", "Open connections above max_size.", pool,
	      st->overflow_in_use);
	gauge(&o, "pgring_waiting", "Callers waiting for a connection.", pool, st->waiting);
	gauge(&o, "pgring_max_size", "Configured steady upper bound of open connections.", pool,
	      st->max_size);
	gauge(&o, "pgring_max_overflow", "Configured burst allowed above max_size.", pool,
	      st->max_overflow);

	counter(&o, "pgring_acquires_total", "Successful checkouts.", pool, st->acquires);
	counter(&o, "pgring_acquired_immediately_total", "Checkouts that did not wait.", pool,
	        st->acquired_immediately);
	counter(&o, "pgring_steals_total",
	        "Checkouts that took an idle connection from another CPU's shard.", pool,
	        st->steals);
	counter(&o, "pgring_handoffs_total",
	        "Connections handed straight from a return to a waiting caller.", pool,
	        st->handoffs);
	counter(&o, "pgring_waits_total", "Checkouts that had to wait.", pool, st->waits);
	counter(&o, "pgring_acquire_timeouts_total", "Checkouts that timed out.", pool,
	        st->timeouts);
	counter(&o, "pgring_waiters_rejected_total",
	        "Checkouts refused because max_waiters callers already waited.", pool,
	        st->rejected);
	family(&o, "pgring_connects_total", "counter", "Connect attempts by result.");
	sample(&o, "pgring_connects_total", pool, "result", "ok", st->connects_ok);
	sample(&o, "pgring_connects_total", pool, "result", "failed", st->connects_failed);
	counter(&o, "pgring_pings_total", "Pings sent to check a connection.", pool, st->pings);
	counter(&o, "pgring_pings_failed_total", "Pings that failed.", pool, st->pings_failed);
	counter(&o, "pgring_checks_failed_total",
	        "Zero-round-trip socket checks that found a dead connection.", pool,
	        st->checks_failed);
	counter(&o, "pgring_rollbacks_total",
	        "Connections returned inside a transaction and rolled back.", pool, st->rollbacks);
	counter(&o, "pgring_resets_total", "Runs of reset_sql on return.", pool, st->resets);
	counter(&o, "pgring_resets_failed_total", "Runs of reset_sql that failed.", pool,
	        st->resets_failed);
	counter(&o, "pgring_leaks_total", "Connections reported held past leak_threshold_ms.", pool,
	        st->leaks);

	_Static_assert(PGR_CLOSE_REASONS <=
	                   sizeof(st->closes_by_reason) / sizeof(st->closes_by_reason[0]),
	               "pgr_stats.closes_by_reason too small for enum pgr_close_reason");
	family(&o, "pgring_closes_total", "counter", "Connections closed, by reason.");
	for (int r = 0; r < PGR_CLOSE_REASONS; r++)
		sample(&o, "pgring_closes_total", pool, "reason", pgr_close_reason_name(r),
		       st->closes_by_reason[r]);

	histogram(&o, "pgring_acquire_wait_seconds",
	          "Time a checkout waited for a connection; 0 for an immediate checkout.", pool,
	          &snaps[PGR_HIST_ACQUIRE_WAIT]);
	histogram(&o, "pgring_connect_seconds", "Connect attempts, from start to ready.", pool,
	          &snaps[PGR_HIST_CONNECT]);
	histogram(&o, "pgring_hold_seconds", "Time a connection was checked out.", pool,
	          &snaps[PGR_HIST_HOLD]);
	return o.need;
}
