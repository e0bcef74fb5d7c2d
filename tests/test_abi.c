/* SPDX-License-Identifier: PostgreSQL */
/*
 * The ABI growth rules: pgr_config and pgr_stats carry the caller's struct size, so a program
 * built against another pgring.h (smaller or larger structs) is neither overrun nor silently
 * misread, and pgr_version reports the library the program runs against. No server needed:
 * the pools here never connect (min_idle 0, nothing acquired).
 */
#include <errno.h>
#include <string.h>

#include "testutil.h"

/* A config as a program built against a later pgring.h would allocate: 64 bytes more. */
struct newer_config {
	pgr_config cfg;
	unsigned char later_fields[64];
};

struct newer_stats {
	pgr_stats st;
	unsigned char later_fields[64];
};

static struct tu_events ev;

static void base(pgr_config *c)
{
	pgr_config_init(c);
	c->conninfo = "host=127.0.0.1 port=1 dbname=x";
	tu_events_init(&ev);
	c->on_event = tu_events_cb;
	c->user_data = &ev;
}

static void expect_struct_size_rejected(const pgr_config *c)
{
	pgr_pool *p = (pgr_pool *)0x1;
	cr_assert_eq(pgr_pool_create(c, &p), -EINVAL);
	cr_assert_null(p);
	int i = tu_events_find(&ev, PGR_EV_CONFIG_ERROR, "struct_size");
	cr_assert_geq(i, 0, "the config error event does not name struct_size");
	cr_assert_str_eq(ev.field[i], "struct_size");
}

Test(abi, config_init_records_the_callers_struct_size, .timeout = 10)
{
	pgr_config c;
	memset(&c, 0x5a, sizeof(c));
	pgr_config_init(&c);
	cr_assert_eq(c.struct_size, sizeof(pgr_config));
}

Test(abi, config_init_writes_nothing_past_a_smaller_size, .timeout = 10)
{
	/* A size below the first sized layout cannot be a real pgr_config: nothing is written. */
	unsigned char buf[sizeof(pgr_config)];
	memset(buf, 0x5a, sizeof(buf));
	pgr_config_init_size((pgr_config *)buf, 8);
	for (size_t i = 0; i < sizeof(buf); i++)
		cr_assert_eq(buf[i], 0x5a, "byte %zu written", i);
}

Test(abi, config_init_zeroes_fields_of_a_newer_header, .timeout = 10)
{
	struct newer_config n;
	memset(&n, 0x5a, sizeof(n));
	pgr_config_init_size(&n.cfg, sizeof(n));
	cr_assert_eq(n.cfg.struct_size, sizeof(n));
	cr_assert_eq(n.cfg.max_size, 10);
	for (size_t i = 0; i < sizeof(n.later_fields); i++)
		cr_assert_eq(n.later_fields[i], 0, "unknown byte %zu not zeroed", i);
}

Test(abi, pool_create_rejects_a_config_not_filled_by_config_init, .timeout = 10)
{
	pgr_config c;
	base(&c);
	c.struct_size = 0;
	expect_struct_size_rejected(&c);
}

Test(abi, pool_create_accepts_a_newer_config_whose_unknown_fields_are_zero, .timeout = 10)
{
	struct newer_config n;
	pgr_config_init_size(&n.cfg, sizeof(n));
	n.cfg.conninfo = "host=127.0.0.1 port=1 dbname=x";
	n.cfg.max_size = 3;
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(&n.cfg, &p), 0);
	pgr_stats st;
	cr_assert_eq(pgr_pool_stats(p, &st), 0);
	cr_assert_eq(st.max_size, 3, "the known fields were read");
	pgr_pool_destroy(p);
}

Test(abi, pool_create_rejects_a_newer_config_that_sets_unknown_fields, .timeout = 10)
{
	struct newer_config n;
	pgr_config_init_size(&n.cfg, sizeof(n));
	n.cfg.conninfo = "host=127.0.0.1 port=1 dbname=x";
	tu_events_init(&ev);
	n.cfg.on_event = tu_events_cb;
	n.cfg.user_data = &ev;
	n.later_fields[17] = 1;
	expect_struct_size_rejected(&n.cfg);
}

Test(abi, stats_fill_the_callers_size_and_zero_unknown_fields, .timeout = 10)
{
	pgr_config c;
	base(&c);
	c.max_size = 7;
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(&c, &p), 0);

	struct newer_stats n;
	memset(&n, 0x5a, sizeof(n));
	cr_assert_eq(pgr_pool_stats_size(p, &n.st, sizeof(n)), 0);
	cr_assert_eq(n.st.struct_size, sizeof(pgr_stats), "struct_size says how much was filled");
	cr_assert_eq(n.st.max_size, 7);
	for (size_t i = 0; i < sizeof(n.later_fields); i++)
		cr_assert_eq(n.later_fields[i], 0, "unknown byte %zu not zeroed", i);

	pgr_stats st;
	memset(&st, 0x5a, sizeof(st));
	cr_assert_eq(pgr_pool_stats(p, &st), 0);
	cr_assert_eq(st.struct_size, sizeof(pgr_stats));
	cr_assert_eq(st.in_use, 0);
	pgr_pool_destroy(p);
}

Test(abi, stats_refuse_a_size_below_the_first_sized_layout, .timeout = 10)
{
	pgr_config c;
	base(&c);
	pgr_pool *p = NULL;
	cr_assert_eq(pgr_pool_create(&c, &p), 0);
	unsigned char buf[sizeof(pgr_stats)];
	memset(buf, 0x5a, sizeof(buf));
	cr_assert_eq(pgr_pool_stats_size(p, (pgr_stats *)buf, 16), -EINVAL);
	for (size_t i = 0; i < sizeof(buf); i++)
		cr_assert_eq(buf[i], 0x5a, "byte %zu written", i);
	cr_assert_eq(pgr_pool_stats(NULL, (pgr_stats *)buf), -EINVAL);
	cr_assert_eq(pgr_pool_stats(p, NULL), -EINVAL);
	pgr_pool_destroy(p);
}

Test(abi, null_pool_gives_empty_text, .timeout = 10)
{
	char buf[8] = "x";
	cr_assert_eq(pgr_pool_prometheus(NULL, buf, sizeof(buf)), 0);
	cr_assert_str_eq(buf, "");
	buf[0] = 'x';
	cr_assert_eq(pgr_pool_last_error(NULL, buf, sizeof(buf)), 0);
	cr_assert_str_eq(buf, "");
}

Test(abi, version_matches_the_header, .timeout = 10)
{
	cr_assert_eq(pgr_version(), PGRING_VERSION_NUMBER);
	cr_assert_str_eq(pgr_version_string(), PGRING_VERSION_STRING);
	char want[32];
	snprintf(want, sizeof(want), "%d.%d.%d", PGRING_VERSION_MAJOR, PGRING_VERSION_MINOR,
	         PGRING_VERSION_PATCH);
	cr_assert_str_eq(pgr_version_string(), want);
}
