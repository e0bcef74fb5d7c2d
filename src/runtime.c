/* SPDX-License-Identifier: PostgreSQL */
/*
 * The runtime (runtime.h): the loop that runs the managers of its pools. A round takes the
 * clock, gives each attached pool its turn (pgr__mgr_round: requests, what is due, growth),
 * arms one absolute timeout for the earliest thing due, submits, and hands completions to the
 * pool whose index their user_data carries. With a thread, the thread blocks in the ring between
 * rounds; without one, the caller's loop polls pgr_runtime_fd and calls pgr_runtime_run.
 *
 * user_data of the runtime's SQEs: (due or 0) << 32 | PGR__RT_POOL_NONE << ... | tag; of a
 * pool's: generation << 48 | pool index << 32 | slot << 8 | tag (manager.h).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "manager.h"
#include "runtime.h"

enum {
	RT_EVENTFD = 0xf1,
	RT_TIMEOUT = 0xf2,
};

static uint64_t rt_tag(unsigned t, int64_t due_ms)
{
	return ((uint64_t)due_ms << 24) | ((uint64_t)PGR__RT_POOL_NONE << 8) | t;
}

/* The coarse clock's step: a timeout for "coarse time >= due" must wait this much longer. */
static int64_t coarse_res_ms(void)
{
	struct timespec r;
	if (clock_getres(CLOCK_MONOTONIC_COARSE, &r) != 0)
		return 10;
	return (int64_t)r.tv_sec * 1000 + (r.tv_nsec + 999999) / 1000000;
}

int64_t pgr__clock_slow(struct pgr__clock *k)
{
	int64_t now = pgr__coarse_ms();
	/*
	 * Ask for the clock back, without a system call: the checkout path never makes one. The
	 * runtime resumes ticking at its next round, which the next slow-path event (a waiter, a
	 * rollback, a connect) or due time brings; until then checkouts read the coarse clock
	 * (3-4 ns through the vDSO). A load first keeps the line shared among readers.
	 */
	if (!atomic_load_explicit(&k->wake_req, memory_order_relaxed))
		atomic_store_explicit(&k->wake_req, 1, memory_order_relaxed);
	return now;
}

/* From a slow path (a caller about to wait): a clock stopped while checkouts read it
 * resumes now rather than at the runtime's next due time. */
void pgr__clock_kick(pgr_runtime *rt)
{
	if (rt && atomic_load_explicit(&rt->clock.wake_req, memory_order_relaxed))
		pgr__runtime_wake(rt);
}

void pgr__runtime_wake(pgr_runtime *rt)
{
	uint64_t one = 1;
	ssize_t r = write(rt->efd, &one, sizeof(one));
	(void)r;
}

static struct io_uring_sqe *rt_sqe(pgr_runtime *rt)
{
	if (io_uring_sq_space_left(&rt->ring) < 1)
		io_uring_submit(&rt->ring);
	return io_uring_get_sqe(&rt->ring);
}

static void arm_eventfd(pgr_runtime *rt)
{
	struct io_uring_sqe *s = rt_sqe(rt);
	io_uring_prep_read(s, rt->efd, &rt->efd_buf, sizeof(rt->efd_buf), 0);
	io_uring_sqe_set_data64(s, rt_tag(RT_EVENTFD, 0));
	rt->efd_armed = true;
}

/*
 * One timeout for the earliest due time. A later-armed earlier one does not cancel the first:
 * that one fires once, spuriously, which costs a round and keeps the bookkeeping trivial.
 */
static void arm_timeout(pgr_runtime *rt, int64_t due_ms)
{
	if (due_ms == INT64_MAX || due_ms >= rt->armed_due_ms)
		return;
	static _Atomic int64_t res_cache;
	int64_t res = atomic_load_explicit(&res_cache, memory_order_relaxed);
	if (!res) {
		res = coarse_res_ms();
		atomic_store_explicit(&res_cache, res, memory_order_relaxed);
	}
	int64_t ns = pgr__sat_add(pgr__ms_to_ns(due_ms), pgr__ms_to_ns(res + 1));
	pgr__ns_to_kts(ns, &rt->tts);
	struct io_uring_sqe *s = rt_sqe(rt);
	io_uring_prep_timeout(s, &rt->tts, 0, IORING_TIMEOUT_ABS);
	/* The due time rides in user_data (ms fit in 40 bits for 34 years of uptime). */
	io_uring_sqe_set_data64(s, rt_tag(RT_TIMEOUT, due_ms & ((INT64_C(1) << 40) - 1)));
	/* The kernel copies the timespec when the SQE is submitted: submit before it changes. */
	io_uring_submit(&rt->ring);
	rt->armed_due_ms = due_ms;
	rt->timeouts_out++;
}

static void detach_locked(pgr_runtime *rt, pgr_pool *p)
{
	/* Out of the rounds; still counted in nattached until the pool is freed. */
	if (p->rt_index < rt->npools && rt->pools[p->rt_index] == p)
		rt->pools[p->rt_index] = NULL;
	atomic_store_explicit(&p->mgr_detached, 1, memory_order_release);
}

void pgr__runtime_detach(pgr_runtime *rt, pgr_pool *p)
{
	pthread_mutex_lock(&rt->lock);
	detach_locked(rt, p);
	pthread_mutex_unlock(&rt->lock);
}

static void tick_clock(pgr_runtime *rt, int64_t now)
{
	struct pgr__clock *k = &rt->clock;
	if (atomic_exchange_explicit(&k->wake_req, 0, memory_order_acq_rel)) {
		atomic_store_explicit(&k->live, 1, memory_order_relaxed);
		rt->quiet_ticks = 0;
		rt->last_tick_ms = now;
	}
	if (!atomic_load_explicit(&k->live, memory_order_relaxed))
		return;
	atomic_store_explicit(&k->now_ms, now, memory_order_relaxed);
	if (now - rt->last_tick_ms < PGR__TICK_MS)
		return;
	rt->last_tick_ms = now;
	if (atomic_exchange_explicit(&k->used, 0, memory_order_relaxed)) {
		rt->quiet_ticks = 0;
	} else if (++rt->quiet_ticks >= PGR__CLOCK_QUIET) {
		/* Nobody reads it: stop. A reader that comes now reads the clock itself and asks
		 * for it back (pgr__clock_slow); until this store reaches it, it reads a value at
		 * most one tick old. */
		atomic_store_explicit(&k->live, 0, memory_order_seq_cst);
	}
}

static void handle_cqe(pgr_runtime *rt, struct io_uring_cqe *cqe)
{
	uint64_t ud = io_uring_cqe_get_data64(cqe);
	unsigned idx = (unsigned)(ud >> 32) & 0xffff;
	unsigned t = ud & 0xff;
	if (((ud >> 8) & 0xffff) == PGR__RT_POOL_NONE && (t == RT_EVENTFD || t == RT_TIMEOUT)) {
		if (t == RT_EVENTFD) {
			rt->efd_armed = false;
			if (!atomic_load_explicit(&rt->stop, memory_order_relaxed))
				arm_eventfd(rt);
		} else {
			int64_t due = (int64_t)(ud >> 24);
			if (--rt->timeouts_out == 0 ||
			    due == (rt->armed_due_ms & ((INT64_C(1) << 40) - 1)))
				rt->armed_due_ms = INT64_MAX;
		}
		return;
	}
	if (idx < rt->npools && rt->pools[idx])
		pgr__mgr_cqe(rt->pools[idx], ud, cqe->res);
}

/* Hand every completion that is in to its pool. Caller holds the lock. */
static unsigned reap(pgr_runtime *rt)
{
	struct io_uring_cqe *cqe;
	unsigned head, n = 0;
	io_uring_for_each_cqe (&rt->ring, head, cqe) {
		handle_cqe(rt, cqe);
		n++;
	}
	io_uring_cq_advance(&rt->ring, n);
	return n;
}

/* Each pool's turn, then one timeout for the earliest due time. Caller holds the lock. */
static void turn(pgr_runtime *rt)
{
	int64_t now = pgr__coarse_ms();
	tick_clock(rt, now);
	int64_t due = INT64_MAX;
	for (uint32_t i = 0; i < rt->npools; i++) {
		pgr_pool *p = rt->pools[i];
		if (!p)
			continue;
		int64_t d = pgr__mgr_round(p, now);
		if (d < 0)
			detach_locked(rt, p);
		else if (d < due)
			due = d;
	}
	if (atomic_load_explicit(&rt->clock.live, memory_order_relaxed) &&
	    rt->last_tick_ms + PGR__TICK_MS < due)
		due = rt->last_tick_ms + PGR__TICK_MS;
	if (due <= now)
		due = now + 1;
	arm_timeout(rt, due);
	io_uring_submit(&rt->ring);
}

void pgr__runtime_round(pgr_runtime *rt, bool wait)
{
	atomic_fetch_add_explicit(&rt->wakeups, 1, memory_order_relaxed);
	pthread_mutex_lock(&rt->lock);
	if (!wait) {
		/*
		 * Without a thread: completions first, then the pools' turn, so the timeout armed
		 * last reflects what the completions changed. Nothing else would bring the caller's
		 * loop back (its fd is readable only on a new completion). The round never blocks,
		 * so it keeps the lock throughout: liburing is not thread-safe, and a drain on
		 * another thread that turns the crank must not touch the ring at the same time as
		 * the loop's thread.
		 */
		reap(rt);
		turn(rt);
		pthread_mutex_unlock(&rt->lock);
		return;
	}
	turn(rt);
	pthread_mutex_unlock(&rt->lock);
	int r = io_uring_submit_and_wait(&rt->ring, 1);
	if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY && r != -ETIME)
		usleep(1000); /* never spin on a broken ring */
	pthread_mutex_lock(&rt->lock);
	if (reap(rt))
		io_uring_submit(&rt->ring); /* what the completions armed goes out now */
	pthread_mutex_unlock(&rt->lock);
}

static void *runtime_main(void *arg)
{
	pgr_runtime *rt = arg;
	while (!atomic_load_explicit(&rt->stop, memory_order_acquire))
		pgr__runtime_round(rt, true);
	return NULL;
}

int pgr__runtime_new(bool threaded, bool owned, unsigned entries, pgr_runtime **out)
{
	pgr_runtime *rt = aligned_alloc(64, (sizeof(*rt) + 63) & ~(size_t)63);
	if (!rt)
		return -ENOMEM;
	memset(rt, 0, sizeof(*rt));
	pthread_mutex_init(&rt->lock, NULL);
	rt->threaded = threaded;
	rt->owned = owned;
	rt->armed_due_ms = INT64_MAX;
	rt->notify_fd = -1;
	rt->fork_epoch = pgr__fork_guard();
	rt->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	int r = rt->efd < 0 ? -errno : io_uring_queue_init(entries, &rt->ring, 0);
	if (r < 0) {
		if (rt->efd >= 0)
			close(rt->efd);
		pthread_mutex_destroy(&rt->lock);
		free(rt);
		return r;
	}
	rt->clock.efd = rt->efd;
	atomic_store_explicit(&rt->clock.now_ms, pgr__coarse_ms(), memory_order_relaxed);
	if (!threaded) {
		rt->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (rt->notify_fd < 0 || io_uring_register_eventfd(&rt->ring, rt->notify_fd) < 0) {
			r = rt->notify_fd < 0 ? -errno : -EIO;
			pgr__runtime_free(rt);
			return r;
		}
	}
	arm_eventfd(rt);
	io_uring_submit(&rt->ring);
	if (threaded) {
		r = pthread_create(&rt->thread, NULL, runtime_main, rt);
		if (r != 0) {
			pgr__runtime_free(rt);
			return -r;
		}
	}
	rt->started = true;
	*out = rt;
	return 0;
}

void pgr__runtime_free(pgr_runtime *rt)
{
	if (!rt)
		return;
	bool forked = pgr__forked(rt->fork_epoch);
	if (rt->started && rt->threaded && !forked) {
		atomic_store_explicit(&rt->stop, 1, memory_order_release);
		pgr__runtime_wake(rt);
		pthread_join(rt->thread, NULL);
	}
	io_uring_queue_exit(&rt->ring);
	if (rt->efd >= 0)
		close(rt->efd);
	if (rt->notify_fd >= 0)
		close(rt->notify_fd);
	free(rt->pools);
	pthread_mutex_destroy(&rt->lock);
	free(rt);
}

int pgr__runtime_attach(pgr_runtime *rt, pgr_pool *p)
{
	pthread_mutex_lock(&rt->lock);
	uint32_t i = 0;
	while (i < rt->npools && rt->pools[i])
		i++;
	if (i == rt->npools) {
		if (rt->npools >= PGR__MAX_POOLS) {
			pthread_mutex_unlock(&rt->lock);
			return -ENOSPC;
		}
		/* Grown here, never on a hot path: a private runtime holds one pointer. */
		uint32_t cap = rt->npools ? rt->npools * 2 : 1;
		pgr_pool **np = realloc(rt->pools, sizeof(*np) * cap);
		if (!np) {
			pthread_mutex_unlock(&rt->lock);
			return -ENOMEM;
		}
		for (uint32_t k = rt->npools; k < cap; k++)
			np[k] = NULL;
		rt->pools = np;
		rt->npools = cap;
	}
	rt->pools[i] = p;
	p->rt = rt;
	/* A new pool's checkouts start soon: publish the clock until they stop reading it. */
	atomic_store_explicit(&rt->clock.now_ms, pgr__coarse_ms(), memory_order_relaxed);
	atomic_store_explicit(&rt->clock.live, 1, memory_order_relaxed);
	rt->quiet_ticks = 0;
	rt->last_tick_ms = pgr__coarse_ms();
	p->rt_index = (uint16_t)i;
	p->mgr_dirty = true;
	atomic_store_explicit(&p->mgr_detached, 0, memory_order_relaxed);
	atomic_fetch_add_explicit(&rt->nattached, 1, memory_order_relaxed);
	pthread_mutex_unlock(&rt->lock);
	pgr__manager_wake(p);
	/* Without a thread, the first round runs now so min_idle connects start at once. */
	if (!rt->threaded)
		pgr__runtime_round(rt, false);
	return 0;
}

/* ---- public ---- */

int pgr_runtime_create(bool manager_thread, pgr_runtime **out)
{
	if (!out)
		return -EINVAL;
	*out = NULL;
	return pgr__runtime_new(manager_thread, false, 1024, out);
}

int pgr_runtime_destroy(pgr_runtime *rt)
{
	if (!rt)
		return -EINVAL;
	if (!pgr__forked(rt->fork_epoch) &&
	    atomic_load_explicit(&rt->nattached, memory_order_acquire))
		return -EBUSY;
	pgr__runtime_free(rt);
	return 0;
}

int pgr_runtime_fd(pgr_runtime *rt)
{
	if (!rt)
		return -EINVAL;
	if (pgr__forked(rt->fork_epoch))
		return -PGR_E_FORKED;
	return rt->threaded ? -EINVAL : rt->notify_fd;
}

int pgr_runtime_run(pgr_runtime *rt)
{
	if (!rt)
		return -EINVAL;
	if (pgr__forked(rt->fork_epoch))
		return -PGR_E_FORKED;
	if (rt->threaded)
		return -EINVAL;
	uint64_t v;
	/* Reset the notification first: CQEs posted from here on signal it again. */
	ssize_t r = read(rt->notify_fd, &v, sizeof(v));
	(void)r;
	pgr__runtime_round(rt, false);
	return 0;
}
