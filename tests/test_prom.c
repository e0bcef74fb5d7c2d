/* SPDX-License-Identifier: PostgreSQL */
/*
 * Prometheus exposition: values, labels, exact histogram buckets, the snprintf contract, and
 * promtool's own verdict on the output.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hist.h"
#include "prom.h"

struct fixture {
	pgr_stats st;
	pgr__hist_snap snaps[PGR_HIST_KINDS];
};

static void snap_of(pgr__hist_snap *s, const uint64_t *vals, size_t n)
{
	pgr__hist *h = calloc(1, sizeof(*h));
	cr_assert_not_null(h);
	for (size_t i = 0; i < n; i++)
		pgr__hist_add(h, vals[i]);
	pgr__hist_snap_clear(s);
	pgr__hist_snap_merge(s, h);
	free(h);
}

/* Every value distinct, so a line carrying the wrong field shows up. */
static void fixture_init(struct fixture *f)
{
	memset(f, 0, sizeof(*f));
	pgr_stats *st = &f->st;
	st->size = 7;
	st->idle = 3;
	st->in_use = 4;
	st->overflow_in_use = 1;
	st->waiting = 2;
	st->connecting = 5;
	st->max_size = 10;
	st->max_overflow = 6;
	st->acquires = 1001;
	st->acquired_immediately = 1002;
	st->steals = 1003;
	st->handoffs = 1004;
	st->waits = 1005;
	st->timeouts = 1006;
	st->rejected = 1007;
	st->connects_ok = 1008;
	st->connects_failed = 1009;
	st->pings = 1010;
	st->pings_failed = 1011;
	st->checks_failed = 1012;
	st->rollbacks = 1013;
	st->resets = 1014;
	st->resets_failed = 1015;
	st->leaks = 1016;
	for (int r = 0; r < PGR_CLOSE_REASONS; r++) {
		st->closes_by_reason[r] = 2000 + (uint64_t)r;
		st->closes += st->closes_by_reason[r];
	}
	/* 1023 and 1024 ns straddle the first exported bound (2^10 - 1 ns). */
	static const uint64_t wait[] = {0, 0, 1023, 1024, 5000000};
	static const uint64_t conn[] = {3000000, 12000000, 2500000000ull};
	static const uint64_t hold[] = {50000, 70000000000ull}; /* 70 s: past the last bound */
	snap_of(&f->snaps[PGR_HIST_ACQUIRE_WAIT], wait, sizeof(wait) / sizeof(wait[0]));
	snap_of(&f->snaps[PGR_HIST_CONNECT], conn, sizeof(conn) / sizeof(conn[0]));
	snap_of(&f->snaps[PGR_HIST_HOLD], hold, sizeof(hold) / sizeof(hold[0]));
}

/* The whole exposition in a fresh heap buffer, sized by a first measuring call. */
static char *format_all(const struct fixture *f, const char *pool)
{
	size_t n = pgr__prom_format(NULL, 0, pool, &f->st, f->snaps);
	char *buf = malloc(n + 1);
	cr_assert_not_null(buf);
	size_t n2 = pgr__prom_format(buf, n + 1, pool, &f->st, f->snaps);
	cr_assert_eq(n2, n);
	cr_assert_eq(strlen(buf), n);
	return buf;
}

static void assert_line(const char *text, const char *line)
{
	/* Match a whole line: preceded by start or newline, followed by newline. */
	size_t n = strlen(line);
	for (const char *p = text; (p = strstr(p, line)) != NULL; p++) {
		if ((p == text || p[-1] == '\n') && p[n] == '\n')
			return;
	}
	cr_assert_fail("line missing: %s\n--- exposition ---\n%s", line, text);
}

Test(prom, gauges_report_pool_state, .timeout = 30)
{
	struct fixture f;
	fixture_init(&f);
	char *t = format_all(&f, "main");
	assert_line(t, "# TYPE pgring_connections gauge");
	assert_line(t, "pgring_connections{pool=\"main\",state=\"idle\"} 3");
	assert_line(t, "pgring_connections{pool=\"main\",state=\"in_use\"} 4");
	assert_line(t, "pgring_connections{pool=\"main\",state=\"connecting\"} 5");
	assert_line(t, "pgring_connections_open{pool=\"main\"} 7");
	assert_line(t, "pgring_connections_overflow_in_use{pool=\"main\"} 1");
	assert_line(t, "pgring_waiting{pool=\"main\"} 2");
	assert_line(t, "pgring_max_size{pool=\"main\"} 10");
	assert_line(t, "# TYPE pgring_max_overflow gauge");
	assert_line(t, "pgring_max_overflow{pool=\"main\"} 6");
	free(t);
}

Test(prom, counters_report_every_stat, .timeout = 30)
{
	struct fixture f;
	fixture_init(&f);
	char *t = format_all(&f, "main");
	assert_line(t, "# TYPE pgring_acquires_total counter");
	assert_line(t, "pgring_acquires_total{pool=\"main\"} 1001");
	assert_line(t, "pgring_acquired_immediately_total{pool=\"main\"} 1002");
	assert_line(t, "pgring_steals_total{pool=\"main\"} 1003");
	assert_line(t, "pgring_handoffs_total{pool=\"main\"} 1004");
	assert_line(t, "pgring_waits_total{pool=\"main\"} 1005");
	assert_line(t, "pgring_acquire_timeouts_total{pool=\"main\"} 1006");
	assert_line(t, "pgring_waiters_rejected_total{pool=\"main\"} 1007");
	assert_line(t, "pgring_connects_total{pool=\"main\",result=\"ok\"} 1008");
	assert_line(t, "pgring_connects_total{pool=\"main\",result=\"failed\"} 1009");
	assert_line(t, "pgring_pings_total{pool=\"main\"} 1010");
	assert_line(t, "pgring_pings_failed_total{pool=\"main\"} 1011");
	assert_line(t, "pgring_checks_failed_total{pool=\"main\"} 1012");
	assert_line(t, "pgring_rollbacks_total{pool=\"main\"} 1013");
	assert_line(t, "pgring_resets_total{pool=\"main\"} 1014");
	assert_line(t, "pgring_resets_failed_total{pool=\"main\"} 1015");
	assert_line(t, "pgring_leaks_total{pool=\"main\"} 1016");
	free(t);
}

Test(prom, closes_are_counted_for_every_reason, .timeout = 30)
{
	struct fixture f;
	fixture_init(&f);
	char *t = format_all(&f, "main");
	assert_line(t, "# TYPE pgring_closes_total counter");
	for (int r = 0; r < PGR_CLOSE_REASONS; r++) {
		char line[160];
		snprintf(line, sizeof(line), "pgring_closes_total{pool=\"main\",reason=\"%s\"} %d",
		         pgr_close_reason_name(r), 2000 + r);
		assert_line(t, line);
	}
	assert_line(t, "pgring_closes_total{pool=\"main\",reason=\"max_lifetime\"} 2000");
	assert_line(t, "pgring_closes_total{pool=\"main\",reason=\"connect_failed\"} 2010");
	free(t);
}

Test(prom, histogram_buckets_are_exact_at_reported_bounds, .timeout = 30)
{
	struct fixture f;
	fixture_init(&f);
	char *t = format_all(&f, "main");
	const char *w = "pgring_acquire_wait_seconds";
	char line[200];
	assert_line(t, "# TYPE pgring_acquire_wait_seconds histogram");
	/* 0, 0 and 1023 ns are <= 1023 ns; 1024 ns is not. */
	snprintf(line, sizeof(line), "%s_bucket{pool=\"main\",le=\"0.000001023\"} 3", w);
	assert_line(t, line);
	snprintf(line, sizeof(line), "%s_bucket{pool=\"main\",le=\"0.000002047\"} 4", w);
	assert_line(t, line);
	/* 5 ms lands under 2^23 - 1 ns = 8.388607 ms but not under 2^22 - 1 ns. */
	snprintf(line, sizeof(line), "%s_bucket{pool=\"main\",le=\"0.004194303\"} 4", w);
	assert_line(t, line);
	snprintf(line, sizeof(line), "%s_bucket{pool=\"main\",le=\"0.008388607\"} 5", w);
	assert_line(t, line);
	snprintf(line, sizeof(line), "%s_bucket{pool=\"main\",le=\"+Inf\"} 5", w);
	assert_line(t, line);
	snprintf(line, sizeof(line), "%s_sum{pool=\"main\"} 0.005002047", w);
	assert_line(t, line);
	snprintf(line, sizeof(line), "%s_count{pool=\"main\"} 5", w);
	assert_line(t, line);

	assert_line(t, "pgring_connect_seconds_sum{pool=\"main\"} 2.515");
	assert_line(t, "pgring_connect_seconds_count{pool=\"main\"} 3");
	/* 70 s is past the last finite bound: only +Inf holds it. */
	assert_line(t, "pgring_hold_seconds_bucket{pool=\"main\",le=\"34.359738367\"} 1");
	assert_line(t, "pgring_hold_seconds_bucket{pool=\"main\",le=\"+Inf\"} 2");
	assert_line(t, "pgring_hold_seconds_sum{pool=\"main\"} 70.00005");
	free(t);
}

/* Bucket samples must be non-decreasing and end at +Inf == _count, for every histogram. */
Test(prom, histogram_buckets_are_cumulative_and_end_at_count, .timeout = 30)
{
	struct fixture f;
	fixture_init(&f);
	char *t = format_all(&f, "main");
	static const char *const names[] = {"pgring_acquire_wait_seconds", "pgring_connect_seconds",
	                                    "pgring_hold_seconds"};
	for (int k = 0; k < PGR_HIST_KINDS; k++) {
		char prefix[96];
		snprintf(prefix, sizeof(prefix), "\n%s_bucket{", names[k]);
		unsigned long long prev = 0, last = 0;
		int n = 0, saw_inf = 0;
		for (const char *p = t; (p = strstr(p, prefix)) != NULL; p++) {
			const char *sp = strchr(p + 1, ' ');
			const char *nl = strchr(p + 1, '\n');
			cr_assert(sp && nl && sp < nl);
			last = strtoull(sp + 1, NULL, 10);
			cr_assert_geq(last, prev, "%s bucket %d decreases", names[k], n);
			prev = last;
			if (memmem(p, (size_t)(nl - p), "le=\"+Inf\"", 9))
				saw_inf = 1;
			n++;
		}
		cr_assert_eq(n, 27, "%s: %d bucket samples", names[k], n); /* 26 bounds + +Inf */
		cr_assert(saw_inf);
		cr_assert_eq(last, f.snaps[k].count, "%s: +Inf != count", names[k]);
	}
	free(t);
}

Test(prom, pool_label_is_escaped, .timeout = 30)
{
	struct fixture f;
	fixture_init(&f);
	char *t = format_all(&f, "a\\b\"c\nd");
	assert_line(t, "pgring_waiting{pool=\"a\\\\b\\\"c\\nd\"} 2");
	/* The raw newline must not split a sample. */
	cr_assert_null(strstr(t, "c\nd"));
	free(t);
}

Test(prom, every_sample_carries_the_pool_label, .timeout = 30)
{
	struct fixture f;
	fixture_init(&f);
	char *t = format_all(&f, "main");
	int samples = 0;
	for (char *line = t; *line;) {
		char *nl = strchr(line, '\n');
		cr_assert_not_null(nl, "exposition must end in a newline");
		if (line[0] != '#') {
			*nl = '\0';
			cr_assert_not_null(strstr(line, "{pool=\"main\""), "no pool label: %s",
			                   line);
			*nl = '\n';
			samples++;
		}
		line = nl + 1;
	}
	cr_assert_gt(samples, 100);
	free(t);
}

Test(prom, truncates_like_snprintf, .timeout = 30)
{
	struct fixture f;
	fixture_init(&f);
	char *full = format_all(&f, "main");
	size_t n = strlen(full);
	cr_assert_eq(pgr__prom_format(NULL, 0, "main", &f.st, f.snaps), n);

	enum {
		GUARD = 16
	};
	char *buf = malloc(n + 1 + GUARD);
	cr_assert_not_null(buf);
	/* Every length matters: a cut can fall inside a number, a label escape or a name. */
	for (size_t len = 1; len <= n + 1; len++) {
		memset(buf, 'X', n + 1 + GUARD);
		size_t got = pgr__prom_format(buf, len, "main", &f.st, f.snaps);
		cr_assert_eq(got, n, "len %zu: returned %zu, want %zu", len, got, n);
		size_t keep = len - 1 < n ? len - 1 : n;
		cr_assert_eq(buf[keep], '\0', "len %zu: not NUL-terminated at %zu", len, keep);
		cr_assert_eq(memcmp(buf, full, keep), 0, "len %zu: not a prefix", len);
		for (size_t i = len; i < n + 1 + GUARD; i++)
			cr_assert_eq(buf[i], 'X', "len %zu: wrote past the buffer at %zu", len, i);
	}
	/* len 0 must not touch buf at all. */
	memset(buf, 'X', GUARD);
	cr_assert_eq(pgr__prom_format(buf, 0, "main", &f.st, f.snaps), n);
	cr_assert_eq(buf[0], 'X');
	free(buf);
	free(full);
}

/* Run promtool on text; returns its exit status, with everything it printed in *out. */
static int promtool_check(const char *text, char *out, size_t outlen)
{
	char path[] = "/tmp/pgring-prom-XXXXXX";
	int fd = mkstemp(path);
	cr_assert_geq(fd, 0, "mkstemp failed");
	size_t n = strlen(text);
	cr_assert_eq(write(fd, text, n), (ssize_t)n);
	close(fd);

	char cmd[256];
	snprintf(cmd, sizeof(cmd), "promtool check metrics < %s 2>&1", path);
	FILE *p = popen(cmd, "r");
	cr_assert_not_null(p, "popen failed");
	size_t got = fread(out, 1, outlen - 1, p);
	out[got] = '\0';
	int st = pclose(p);
	unlink(path);
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* A missing promtool must fail the suite, not skip it: these tests are the format's proof. */
static void require_promtool(void)
{
	if (system("command -v promtool >/dev/null 2>&1") != 0)
		cr_assert_fail("promtool is missing: install it (Debian/Ubuntu: apt-get install "
		               "prometheus) to validate the exposition format");
}

static void assert_promtool_accepts(const char *pool)
{
	require_promtool();
	struct fixture f;
	fixture_init(&f);
	char *t = format_all(&f, pool);
	char out[8192];
	int rc = promtool_check(t, out, sizeof(out));
	/* promtool exits 0 on lint warnings too, so its output must also be empty. */
	cr_assert(rc == 0 && out[0] == '\0',
	          "promtool check metrics: exit %d, output:\n%s\n--- exposition ---\n%s", rc, out,
	          t);
	free(t);
}

Test(prom, exposition_passes_promtool, .timeout = 30)
{
	assert_promtool_accepts("main");
}

Test(prom, exposition_with_escaped_pool_name_passes_promtool, .timeout = 30)
{
	assert_promtool_accepts("we\\ird \"pool\"\nname");
}

Test(prom, empty_stats_pass_promtool, .timeout = 30)
{
	require_promtool();
	pgr_stats st;
	memset(&st, 0, sizeof(st));
	pgr__hist_snap snaps[PGR_HIST_KINDS];
	for (int k = 0; k < PGR_HIST_KINDS; k++)
		pgr__hist_snap_clear(&snaps[k]);
	size_t n = pgr__prom_format(NULL, 0, "", &st, snaps);
	char *t = malloc(n + 1);
	cr_assert_not_null(t);
	pgr__prom_format(t, n + 1, "", &st, snaps);
	char out[8192];
	int rc = promtool_check(t, out, sizeof(out));
	cr_assert(rc == 0 && out[0] == '\0', "promtool: exit %d, output:\n%s", rc, out);
	free(t);
}
