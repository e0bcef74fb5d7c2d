/* SPDX-License-Identifier: PostgreSQL */
/*
 * Error names, close-reason names, event-type names and the stderr event logger.
 *
 * Thread safety is the point of this file: strerror() may return a buffer shared between
 * threads, so every name comes from a switch or a const table, and the only glibc helper used
 * (strerrordesc_np) returns static text as well.
 */
#include "errors.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* strerrordesc_np appeared in glibc 2.32; it returns static text (or NULL), unlike strerror. */
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
#define HAVE_STRERRORDESC_NP 1
#endif

static const char *errno_name(int e)
{
	/* The texts say what the error means for a pool caller, not the generic libc text. */
	switch (e) {
	case 0:
		return "success";
	case ETIMEDOUT:
		return "timed out waiting for a connection";
	case EAGAIN:
		return "no idle connection available right now";
	case EINVAL:
		return "invalid argument";
	case ENOMEM:
		return "out of memory";
	case ESHUTDOWN:
		return "pool is shutting down";
	case ECONNREFUSED:
		return "connection refused by the server";
	case EBUSY:
		return "resource busy";
	case ECANCELED:
		return "operation canceled";
	case EPERM:
		return "operation not permitted";
	}
	return NULL;
}

const char *pgr_strerror(int err)
{
	switch (err) {
	case PGR_E_TOO_MANY_WAITERS:
		return "too many callers already waiting for a connection";
	case PGR_E_CONNECT_FAILED:
		return "could not connect to the server";
	case PGR_E_NOT_OWNED:
		return "connection is not checked out by this handle";
	case PGR_E_FORKED:
		return "pool belongs to the parent process (used after fork)";
	case PGR_E_UNSUPPORTED:
		return "the kernel lacks an io_uring operation pgring needs";
	}
	/*
	 * pgring returns negative errno values; a positive one (a caller passing errno itself)
	 * gets the same name rather than "unknown". INT_MIN has no positive counterpart.
	 */
	if (err == INT_MIN)
		return "unknown error";
	int e = err < 0 ? -err : err;
	/* The library's own codes negated, as a caller used to negative errors might pass them. */
	if (e >= PGR_E_BASE && e <= PGR_E_LAST)
		return pgr_strerror(e);
	const char *s = errno_name(e);
	if (s)
		return s;
#ifdef HAVE_STRERRORDESC_NP
	s = strerrordesc_np(e);
	if (s)
		return s;
#endif
	return "unknown error";
}

static const char *const close_reason_names[PGR_CLOSE_REASONS] = {
    [PGR_CLOSE_MAX_LIFETIME] = "max_lifetime",
    [PGR_CLOSE_IDLE_TIMEOUT] = "idle_timeout",
    [PGR_CLOSE_BROKEN] = "broken",
    [PGR_CLOSE_PING_FAILED] = "ping_failed",
    [PGR_CLOSE_RESET_FAILED] = "reset_failed",
    [PGR_CLOSE_OVERFLOW] = "overflow",
    [PGR_CLOSE_DISCARDED] = "discarded",
    [PGR_CLOSE_SERVER_ERROR] = "server_error",
    [PGR_CLOSE_ACTIVE_QUERY] = "active_query",
    [PGR_CLOSE_POOL_CLOSING] = "pool_closing",
    [PGR_CLOSE_CONNECT_FAILED] = "connect_failed",
    [PGR_CLOSE_RESIZED] = "resized",
    [PGR_CLOSE_ROLE_CHANGED] = "role_changed",
    [PGR_CLOSE_REPLICA_LAG] = "replica_lag",
    [PGR_CLOSE_REBALANCE] = "rebalance",
};

const char *pgr_close_reason_name(enum pgr_close_reason reason)
{
	/* A NULL entry would mean a reason added to the enum but not named here. */
	if ((int)reason < 0 || reason >= PGR_CLOSE_REASONS || !close_reason_names[reason])
		return "unknown";
	return close_reason_names[reason];
}

const char *pgr__event_type_name(enum pgr_event_type type)
{
	switch (type) {
	case PGR_EV_CONN_OPENED:
		return "conn_opened";
	case PGR_EV_CONN_CLOSED:
		return "conn_closed";
	case PGR_EV_CONNECT_FAILED:
		return "connect_failed";
	case PGR_EV_POOL_EXHAUSTED:
		return "pool_exhausted";
	case PGR_EV_WAITER_REJECTED:
		return "waiter_rejected";
	case PGR_EV_LEAK_SUSPECTED:
		return "leak_suspected";
	case PGR_EV_CONFIG_ERROR:
		return "config_error";
	case PGR_EV_ACQUIRE_TIMEOUT:
		return "acquire_timeout";
	case PGR_EV_MISUSE:
		return "misuse";
	case PGR_EV_POOLER_DETECTED:
		return "pooler_detected";
	}
	return "unknown";
}

/*
 * A fixed-size line being built. Output that does not fit is cut and marked with "...", so a
 * long libpq message never costs an allocation on the logging path.
 */
struct line {
	char buf[2048];
	size_t len;
	int cut;
};

/* Room kept back at the end of buf for "...\n". */
#define LINE_RESERVE 4u
/* A long message is cut here so the fields after it (reason, conn, where) still fit. */
#define MESSAGE_MAX 1536u

static void line_putc(struct line *l, char c)
{
	if (l->len + LINE_RESERVE >= sizeof(l->buf)) {
		l->cut = 1;
		return;
	}
	l->buf[l->len++] = c;
}

/*
 * Append at most max bytes of s, then "..." if it was longer. Control characters become spaces:
 * libpq messages end in "\n" and may hold several lines, and one event must stay one line for
 * whoever reads the log.
 */
static void line_putn(struct line *l, const char *s, size_t max)
{
	size_t i;
	for (i = 0; s[i] && i < max; i++) {
		unsigned char c = (unsigned char)s[i];
		line_putc(l, c < 0x20 || c == 0x7f ? ' ' : (char)c);
	}
	if (s[i])
		line_putn(l, "...", 3);
}

static void line_puts(struct line *l, const char *s)
{
	line_putn(l, s, SIZE_MAX);
}

__attribute__((format(printf, 2, 3))) static void line_printf(struct line *l, const char *fmt, ...)
{
	char tmp[64];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	line_puts(l, tmp);
}

/* Drop trailing spaces (from a message's final "\n") so the closing text sits right after it. */
static void line_rtrim(struct line *l)
{
	while (l->len > 0 && l->buf[l->len - 1] == ' ')
		l->len--;
}

/* Open the "(...)" detail list on the first field, separate later ones. */
static void line_field(struct line *l, int *nfields)
{
	line_puts(l, *nfields ? ", " : " (");
	(*nfields)++;
}

void pgr_event_log_stderr(const pgr_event *ev, void *user_data)
{
	(void)user_data;
	if (!ev)
		return;
	struct line l = {.len = 0, .cut = 0};
	int nfields = 0;

	/* The pid tags the line the way syslog does; user_data is the caller's and opaque. */
	line_printf(&l, "pgring[%ld] %s: ", (long)getpid(), pgr__event_type_name(ev->type));
	line_putn(&l, ev->message ? ev->message : "", MESSAGE_MAX);
	line_rtrim(&l);
	if (ev->reason) {
		line_field(&l, &nfields);
		line_puts(&l, "reason=");
		line_puts(&l, ev->reason);
	}
	if (ev->field) {
		line_field(&l, &nfields);
		line_puts(&l, "field=");
		line_puts(&l, ev->field);
	}
	if (ev->conn_id != UINT32_MAX) {
		line_field(&l, &nfields);
		line_printf(&l, "conn=%" PRIu32, ev->conn_id);
	}
	/* held_ms is meaningful only for leak reports; other events leave it 0. */
	if (ev->type == PGR_EV_LEAK_SUSPECTED || ev->held_ms != 0) {
		line_field(&l, &nfields);
		line_printf(&l, "held_ms=%" PRId64, ev->held_ms);
	}
	if (ev->file) {
		line_field(&l, &nfields);
		line_puts(&l, "at ");
		line_puts(&l, ev->file);
		line_printf(&l, ":%d", ev->line);
		if (ev->func) {
			line_putc(&l, ' ');
			line_puts(&l, ev->func);
		}
	}
	if (nfields)
		line_putc(&l, ')');
	/* LINE_RESERVE guarantees room for these. */
	if (l.cut) {
		memcpy(l.buf + l.len, "...", 3);
		l.len += 3;
	}
	l.buf[l.len++] = '\n';

	/*
	 * One write(2) for the whole line, so lines from different threads (or processes sharing
	 * the descriptor) do not interleave, and no stdio lock is taken. Only a short write, which
	 * a pipe or terminal may do under signals, continues where it stopped.
	 */
	int saved_errno = errno; /* the caller's errno should survive its logging callback */
	size_t off = 0;
	while (off < l.len) {
		ssize_t n = write(STDERR_FILENO, l.buf + off, l.len - off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break; /* nowhere left to report a logging failure */
		}
		off += (size_t)n;
	}
	errno = saved_errno;
}
