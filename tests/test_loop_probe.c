/* SPDX-License-Identifier: PostgreSQL */
/*
 * pgr_loop_create on a kernel whose io_uring has no IORING_OP_FUTEX_WAIT (before Linux 6.7): a
 * clear refusal, never a loop whose every wait fails at once and spins until its deadline.
 *
 * The kernel here has the opcode, so this binary stands in for an older one: it defines
 * io_uring_get_probe_ring itself (the library, linked statically into the test, binds to this
 * definition) and, when asked, hides every opcode from FUTEX_WAIT on from the real probe's
 * answer, as a 6.6 kernel's probe reads. A control test proves the stand-in is what the
 * library asked.
 */
#include <dlfcn.h>
#include <errno.h>
#include <liburing.h>
#include <stdatomic.h>
#include <string.h>

#include "testutil.h"

#define OP_FUTEX_WAIT 51

static _Atomic bool older_kernel;
static _Atomic int probes;

struct io_uring_probe *io_uring_get_probe_ring(struct io_uring *ring)
{
	struct io_uring_probe *(*real)(struct io_uring *) =
	    (struct io_uring_probe * (*)(struct io_uring *))
	        dlsym(RTLD_NEXT, "io_uring_get_probe_ring");
	if (!real)
		return NULL;
	struct io_uring_probe *pr = real(ring);
	atomic_fetch_add(&probes, 1);
	if (pr && atomic_load(&older_kernel)) {
		for (unsigned i = OP_FUTEX_WAIT; i < pr->ops_len; i++)
			pr->ops[i].flags = 0;
		if (pr->last_op >= OP_FUTEX_WAIT)
			pr->last_op = OP_FUTEX_WAIT - 1;
	}
	return pr;
}

static pgr_pool *pool_with_events(struct tu_events *ev)
{
	pgr_config cfg;
	pgr_config_init(&cfg);
	cfg.conninfo = tu_conninfo();
	cfg.min_idle = cfg.max_size = 1;
	tu_events_init(ev);
	cfg.on_event = tu_events_cb;
	cfg.user_data = ev;
	return tu_pool(&cfg);
}

static void acquired(pgr_loop *l, int err, pgr_conn *c, void *arg)
{
	(void)l;
	int *rc = arg;
	*rc = err;
	if (err == 0)
		pgr_loop_release(l, c);
}

Test(loop_probe, a_kernel_without_futex_wait_gets_a_clear_refusal_at_loop_create, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = pool_with_events(&ev);
	struct io_uring ring;
	cr_assert_eq(io_uring_queue_init(8, &ring, 0), 0);
	atomic_store(&older_kernel, true);
	atomic_store(&probes, 0);
	pgr_loop *l = (pgr_loop *)&ring; /* must be cleared on failure */
	int64_t t0 = tu_now_ms();
	int rc = pgr_loop_create(p, &ring, 0, &l);
	atomic_store(&older_kernel, false);
	cr_assert_eq(atomic_load(&probes), 1, "the library did not probe the ring");
	cr_assert_eq(rc, -PGR_E_UNSUPPORTED, "rc=%d (%s)", rc, pgr_strerror(rc));
	cr_assert_null(l);
	cr_assert_lt(tu_now_ms() - t0, 100, "the refusal was not immediate");
	cr_assert_geq(tu_events_find(&ev, PGR_EV_CONFIG_ERROR, "FUTEX_WAIT"), 0,
	              "no event names what the kernel lacks");
	/* Nothing was bound: the blocking API still works and the pool goes away cleanly. */
	pgr_conn *c;
	cr_assert_eq(pgr_acquire(p, 2000, &c), 0);
	cr_assert_eq(pgr_release(c), 0);
	cr_assert_eq(pgr_pool_destroy(p), 0);
	io_uring_queue_exit(&ring);
}

Test(loop_probe, control_the_same_ring_with_futex_wait_makes_a_working_loop, .timeout = 30)
{
	struct tu_events ev;
	pgr_pool *p = pool_with_events(&ev);
	struct io_uring ring;
	cr_assert_eq(io_uring_queue_init(8, &ring, 0), 0);
	atomic_store(&probes, 0);
	pgr_loop *l = NULL;
	cr_assert_eq(pgr_loop_create(p, &ring, 0, &l), 0);
	cr_assert_eq(atomic_load(&probes), 1);
	/* Hold the one connection so that the async acquire has to wait on FUTEX_WAIT. */
	pgr_conn *held;
	cr_assert_eq(pgr_acquire(p, 2000, &held), 0);
	int got = 1;
	cr_assert_eq(pgr_loop_acquire(l, 5000, acquired, &got), 0);
	io_uring_submit(&ring);
	cr_assert_eq(pgr_release(held), 0);
	int64_t dl = tu_now_ms() + 5000;
	while (got == 1 && tu_now_ms() < dl) {
		struct io_uring_cqe *cqe;
		struct __kernel_timespec ts = {.tv_nsec = 10 * 1000000};
		if (io_uring_wait_cqe_timeout(&ring, &cqe, &ts) == 0) {
			pgr_loop_handle_cqe(l, cqe);
			io_uring_cqe_seen(&ring, cqe);
		}
		io_uring_submit(&ring);
	}
	cr_assert_eq(got, 0, "the waiting async acquire failed: %s", pgr_strerror(got));
	cr_assert_eq(pgr_loop_destroy(l), 0);
	cr_assert_eq(pgr_pool_destroy(p), 0);
	io_uring_queue_exit(&ring);
}
