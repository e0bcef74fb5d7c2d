/* SPDX-License-Identifier: PostgreSQL */
/*
 * The manager: one thread per pool with its own io_uring ring. It owns every network step of
 * a connection except the caller's own queries: connect, ping, rollback, reset, liveness check
 * and close; it keeps min_idle, opens connections for waiters, retires connections past their
 * lifetime or idle timeout, pings idle ones in the background and reports leaks.
 *
 * Concurrency: callers hand slots to the manager through a lock-free stack (push by CAS, the
 * manager takes the whole stack with one exchange, so there is no ABA) and wake it with an
 * eventfd that a READ on the ring completes. Everything below that is manager-only state.
 *
 * This file is the manager's loop, its requests, completions and periodic work; the network
 * operations of one connection (connect, exec, check, close) are in conn_io.c. user_data
 * carries (slot, generation, tag), never a pointer.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "manager.h"

static void arm_tick(pgr_pool *p);

static void arm_eventfd(pgr_pool *p)
{
	struct io_uring_sqe *s = pgr__mgr_get_sqe(p, 1);
	io_uring_prep_read(s, p->efd, &p->efd_buf, sizeof(p->efd_buf), 0);
	io_uring_sqe_set_data64(s, pgr__mgr_tag(0, 0, TAG_EVENTFD));
}

/* ---- requests from callers ---- */

void pgr__manager_wake(pgr_pool *p)
{
	uint64_t one = 1;
	ssize_t r = write(p->efd, &one, sizeof(one));
	(void)r; /* EAGAIN means the counter is already non-zero: the manager will wake anyway. */
}

void pgr__manager_push(pgr_pool *p, struct pgr_conn *c, enum pgr__req req, int reason)
{
	c->req = (uint8_t)req;
	c->close_reason = (uint8_t)reason;
	uint32_t head = atomic_load_explicit(&p->req_head, memory_order_relaxed);
	do {
		atomic_store_explicit(&c->req_next, head, memory_order_relaxed);
		/* release: the manager's acquire exchange sees the slot as its owner left it. */
	} while (!atomic_compare_exchange_weak_explicit(
	    &p->req_head, &head, c->id, memory_order_release, memory_order_relaxed));
	pgr__manager_wake(p);
}

static void take_requests(pgr_pool *p)
{
	uint32_t id = atomic_exchange_explicit(&p->req_head, PGR__NONE, memory_order_acquire);
	while (id != PGR__NONE) {
		struct pgr_conn *c = &p->conns[id];
		id = atomic_load_explicit(&c->req_next, memory_order_relaxed);
		switch (c->req) {
		case PGR__REQ_ROLLBACK:
			pgr__mgr_start_exec(p, c, "ROLLBACK", p->cfg.reset_timeout_ms,
			                    PGR__REQ_ROLLBACK);
			break;
		case PGR__REQ_RESET:
			pgr__mgr_start_exec(p, c, p->cfg.reset_sql, p->cfg.reset_timeout_ms,
			                    PGR__REQ_RESET);
			break;
		case PGR__REQ_PING:
			pgr__mgr_start_exec(p, c, "", p->cfg.ping_timeout_ms, PGR__REQ_PING);
			break;
		case PGR__REQ_CHECK:
			pgr__conn_move(c, PGR__MANAGED);
			pgr__mgr_check(p, c);
			break;
		default:
			pgr__mgr_close(p, c, c->close_reason);
			break;
		}
	}
}

/* ---- completions ---- */

static void on_cqe(pgr_pool *p, struct io_uring_cqe *cqe)
{
	uint64_t ud = io_uring_cqe_get_data64(cqe);
	unsigned t = ud & 0xff;
	if (t == TAG_TICK) {
		if (!atomic_load_explicit(&p->mgr_stop, memory_order_relaxed))
			arm_tick(p);
		return;
	}
	if (t == TAG_EVENTFD) {
		if (!atomic_load_explicit(&p->mgr_stop, memory_order_relaxed))
			arm_eventfd(p);
		else
			p->efd_buf = UINT64_MAX; /* marks the read as reaped */
		return;
	}
	uint32_t id = (uint32_t)(ud >> 8) & 0xffffff;
	uint32_t gen = (uint32_t)(ud >> 32);
	if (id >= p->cap)
		return;
	struct pgr_conn *c = &p->conns[id];
	c->inflight--;
	if (t != TAG_POLL || gen != c->io_gen)
		return; /* link timeouts and cancels only balance inflight */
	c->armed = 0;
	pgr__mgr_poll_done(p, c, cqe->res);
}

/* ---- periodic work ---- */

static void maintain(pgr_pool *p, int64_t now)
{
	bool closing = atomic_load_explicit(&p->closing, memory_order_relaxed);
	uint32_t open = atomic_load_explicit(&p->nopen, memory_order_relaxed);
	const pgr_config *cfg = &p->cfg;
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
		if (st == PGR__IDLE) {
			int64_t idle_since =
			    atomic_load_explicit(&c->idle_since_ms, memory_order_relaxed);
			int reason = -1;
			bool ping = false;
			if (closing)
				reason = PGR_CLOSE_POOL_CLOSING;
			else if (now >= atomic_load_explicit(&c->expire_ms, memory_order_relaxed))
				reason = PGR_CLOSE_MAX_LIFETIME;
			else if (cfg->idle_timeout_ms > 0 && open > cfg->min_idle &&
			         now - idle_since >= cfg->idle_timeout_ms)
				reason = PGR_CLOSE_IDLE_TIMEOUT;
			else if (cfg->keepalive_interval_ms > 0 &&
			         now - (idle_since > c->last_keepalive_ms ? idle_since
			                                                  : c->last_keepalive_ms) >=
			             cfg->keepalive_interval_ms)
				ping = true;
			if ((reason < 0 && !ping) || !pgr__claim_idle(p, c))
				continue;
			if (ping) {
				pgr__mgr_start_exec(p, c, "", cfg->ping_timeout_ms,
				                    AFTER_KEEPALIVE);
			} else {
				if (reason == PGR_CLOSE_IDLE_TIMEOUT)
					open--;
				pgr__mgr_close(p, c, reason);
			}
		} else if (st == PGR__IN_USE && cfg->leak_threshold_ms > 0) {
			/* Checkouts so far, + 1 so that 0 means "never reported". */
			uint64_t seq = atomic_load_explicit(&c->n_immediate, memory_order_relaxed) +
			               atomic_load_explicit(&c->n_waits, memory_order_relaxed) + 1;
			int64_t held =
			    now - atomic_load_explicit(&c->acquired_ms, memory_order_relaxed);
			if (held < cfg->leak_threshold_ms || seq == c->leak_seq_reported)
				continue;
			c->leak_seq_reported = seq;
			atomic_fetch_add_explicit(&p->c_leaks, 1, memory_order_relaxed);
			if (!cfg->on_event)
				continue;
			char msg[512];
			const char *file = atomic_load_explicit(&c->acq_file, memory_order_relaxed);
			const char *func = atomic_load_explicit(&c->acq_func, memory_order_relaxed);
			int line = atomic_load_explicit(&c->acq_line, memory_order_relaxed);
			snprintf(
			    msg, sizeof(msg),
			    "connection %u held for %lld ms (leak_threshold_ms %lld), acquired at "
			    "%s:%d (%s)",
			    c->id, (long long)held, (long long)cfg->leak_threshold_ms,
			    file ? file : "?", line, func ? func : "?");
			pgr_event ev = {.type = PGR_EV_LEAK_SUSPECTED,
			                .message = msg,
			                .conn_id = c->id,
			                .held_ms = held,
			                .file = file,
			                .line = line,
			                .func = func};
			cfg->on_event(&ev, cfg->user_data);
		}
	}
}

/* Open connections for waiters, for min_idle and for try_acquire callers, within limits. */
static void grow(pgr_pool *p, int64_t now)
{
	if (atomic_load_explicit(&p->closing, memory_order_relaxed) || now < p->next_connect_ms)
		return;
	/* While the server fails, probe with one connect at a time: no storm. */
	uint32_t limit = p->consecutive_failures ? 1 : p->cfg.max_connecting;
	uint32_t idle = pgr__idle_count(p);
	if (idle < p->cfg.min_idle) {
		/*
		 * Connections the manager holds for a keepalive ping, a check or a rollback are on
		 * their way back to idle: counting them keeps min_idle from opening one connection
		 * too many (which idle_timeout then closes again) every time a ping is in flight.
		 */
		for (uint32_t i = 0; i < p->cap; i++)
			idle += atomic_load_explicit(&p->conns[i].state, memory_order_relaxed) ==
			        PGR__MANAGED;
	}
	for (;;) {
		uint32_t connecting = atomic_load_explicit(&p->nconnecting, memory_order_relaxed);
		uint32_t open = atomic_load_explicit(&p->nopen, memory_order_relaxed);
		uint32_t waiting = atomic_load_explicit(&p->nwaiters, memory_order_relaxed);
		if (connecting >= limit)
			return;
		bool for_waiters = waiting > connecting && open < p->cap;
		bool for_min = idle + connecting < p->cfg.min_idle && open < p->cfg.max_size;
		bool for_try = atomic_load_explicit(&p->demand, memory_order_relaxed) > 0 &&
		               open < p->cfg.max_size;
		if (!for_waiters && !for_min && !for_try)
			return;
		if (for_try && !for_waiters && !for_min)
			atomic_store_explicit(&p->demand, 0, memory_order_relaxed);
		struct pgr_conn *c = pgr__mgr_free_slot(p);
		if (!c)
			return;
		pgr__mgr_start_connect(p, c);
		if (p->consecutive_failures)
			return;
	}
}

static bool all_closed(pgr_pool *p)
{
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
		if ((st != PGR__FREE && st != PGR__IN_USE) || c->inflight)
			return false;
	}
	return true;
}

/* Stop: close everything the manager can reach; in-use connections stay with their holders. */
static void shutdown_all(pgr_pool *p)
{
	for (uint32_t i = 0; i < p->cap; i++) {
		struct pgr_conn *c = &p->conns[i];
		unsigned st = atomic_load_explicit(&c->state, memory_order_relaxed);
		if (st == PGR__IDLE) {
			if (pgr__claim_idle(p, c))
				pgr__mgr_close(p, c, PGR_CLOSE_POOL_CLOSING);
		} else if (st == PGR__CONNECTING) {
			if (c->armed) {
				pgr__mgr_cancel_poll(p, c);
				atomic_fetch_sub_explicit(&p->nconnecting, 1, memory_order_relaxed);
				pgr__conn_move(c, PGR__CLOSING);
				c->close_reason = PGR_CLOSE_POOL_CLOSING;
			}
		} else if (st == PGR__MANAGED) {
			pgr__mgr_close(p, c, PGR_CLOSE_POOL_CLOSING);
		}
	}
}

/*
 * One round of the manager's work: publish the clock, take requests, maintain, grow, submit,
 * and handle what completed. wait: block in the ring up to one tick (the manager thread);
 * otherwise return at once (pgr_pool_run, on a caller's event loop). Returns true once a stop
 * has closed everything the manager can reach.
 */
static bool manager_round(pgr_pool *p, bool wait)
{
	int64_t now = pgr__mono_ns() / 1000000;
	atomic_store_explicit(&p->now_ms, now, memory_order_relaxed);
	take_requests(p);
	bool stop = atomic_load_explicit(&p->mgr_stop, memory_order_acquire);
	if (stop) {
		shutdown_all(p);
		io_uring_submit(&p->ring);
		if (all_closed(p))
			return true;
	} else {
		if (now - p->last_tick_ms >= PGR__TICK_MS) {
			p->last_tick_ms = now;
			maintain(p, now);
		}
		grow(p, now);
	}
	struct io_uring_cqe *cqe;
	if (wait) {
		struct __kernel_timespec ts = {.tv_sec = 0, .tv_nsec = PGR__TICK_MS * 1000000};
		int r = io_uring_submit_and_wait_timeout(&p->ring, &cqe, 1, &ts, NULL);
		if (r < 0 && r != -ETIME && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
			pgr__emitf(p, PGR_EV_CONFIG_ERROR, PGR__NONE,
			           "manager: io_uring wait failed: %s", strerror(-r));
			usleep(1000);
		}
	} else {
		io_uring_submit(&p->ring);
	}
	unsigned head, n = 0;
	io_uring_for_each_cqe (&p->ring, head, cqe) {
		on_cqe(p, cqe);
		n++;
	}
	io_uring_cq_advance(&p->ring, n);
	if (!wait && n)
		io_uring_submit(&p->ring); /* what the completions armed goes out now */
	return false;
}

static void *manager_main(void *arg)
{
	pgr_pool *p = arg;
	arm_eventfd(p);
	while (!manager_round(p, true))
		;
	return NULL;
}

/*
 * Without a manager thread the ring's own clock is a timeout SQE, re-armed on every CQE, and
 * an eventfd registered with the ring tells the caller's loop that pgr_pool_run has work.
 */
static void arm_tick(pgr_pool *p)
{
	static const struct __kernel_timespec tick = {.tv_sec = 0,
	                                              .tv_nsec = PGR__TICK_MS * 1000000};
	struct io_uring_sqe *s = pgr__mgr_get_sqe(p, 1);
	io_uring_prep_timeout(s, (struct __kernel_timespec *)&tick, 0, 0);
	io_uring_sqe_set_data64(s, pgr__mgr_tag(0, 0, TAG_TICK));
}

int pgr_pool_fd(pgr_pool *p)
{
	if (!p)
		return -EINVAL;
	return p->cfg.manager_thread ? -EINVAL : p->notify_fd;
}

int pgr_pool_run(pgr_pool *p)
{
	if (!p || p->cfg.manager_thread)
		return -EINVAL;
	if (!p->mgr_started)
		return -ESHUTDOWN;
	uint64_t v;
	/* Reset the notification first: CQEs posted from here on signal it again. */
	ssize_t r = read(p->notify_fd, &v, sizeof(v));
	(void)r;
	manager_round(p, false);
	return 0;
}

int pgr__manager_start(pgr_pool *p)
{
	p->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (p->efd < 0)
		return -errno;
	unsigned entries = 64;
	while (entries < 2 * p->cap + 16 && entries < 4096)
		entries <<= 1;
	int r = io_uring_queue_init(entries, &p->ring, 0);
	if (r < 0) {
		close(p->efd);
		p->efd = -1;
		return r;
	}
	p->rng = (uint64_t)pgr__mono_ns() ^ (uint64_t)(uintptr_t)p ^ 0x9e3779b97f4a7c15ull;
	atomic_store_explicit(&p->now_ms, pgr__mono_ns() / 1000000, memory_order_relaxed);
	if (!p->cfg.manager_thread) {
		p->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (p->notify_fd < 0 || io_uring_register_eventfd(&p->ring, p->notify_fd) < 0) {
			r = -errno;
			if (p->notify_fd >= 0)
				close(p->notify_fd);
			p->notify_fd = -1;
			io_uring_queue_exit(&p->ring);
			close(p->efd);
			p->efd = -1;
			return r ? r : -EIO;
		}
		arm_eventfd(p);
		arm_tick(p);
		io_uring_submit(&p->ring);
		/* The first round, so min_idle connects start without waiting for the loop. */
		manager_round(p, false);
		p->mgr_started = 1;
		return 0;
	}
	r = pthread_create(&p->mgr_thread, NULL, manager_main, p);
	if (r != 0) {
		io_uring_queue_exit(&p->ring);
		close(p->efd);
		p->efd = -1;
		return -r;
	}
	p->mgr_started = 1;
	return 0;
}

/* External mode: the caller's thread (drain/destroy run there) turns the crank meanwhile. */
void pgr__manager_poke(pgr_pool *p)
{
	if (!p->cfg.manager_thread && p->mgr_started)
		manager_round(p, false);
}

void pgr__manager_stop(pgr_pool *p)
{
	if (!p->mgr_started)
		return;
	atomic_store_explicit(&p->mgr_stop, 1, memory_order_release);
	if (p->cfg.manager_thread) {
		pgr__manager_wake(p);
		pthread_join(p->mgr_thread, NULL);
	} else {
		/* Bounded: every close waits at most for its poll's cancel CQE. */
		int64_t deadline = pgr__mono_ns() + 5000000000LL;
		while (!manager_round(p, false) && pgr__mono_ns() < deadline)
			usleep(200);
		close(p->notify_fd);
		p->notify_fd = -1;
	}
	p->mgr_started = 0;
	io_uring_queue_exit(&p->ring);
	close(p->efd);
	p->efd = -1;
}
