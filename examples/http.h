/* SPDX-License-Identifier: PostgreSQL */
/*
 * Just enough HTTP/1.1 for the example server: a request-head parser that works on a buffer
 * holding zero or more (possibly partial, possibly pipelined) requests, a growable output
 * buffer, response framing and JSON string escaping. Pure functions, no I/O, no global state.
 */
#ifndef PGR_EXAMPLE_HTTP_H
#define PGR_EXAMPLE_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Growable byte buffer. Grows with realloc and never shrinks, so a reused one stops allocating. */
struct hbuf {
	char *p;
	size_t len;
	size_t cap;
};

/* Make room for extra more bytes. Returns 0 or -ENOMEM. */
int hbuf_reserve(struct hbuf *b, size_t extra);
/* Append; returns 0 or -ENOMEM (the buffer is left as it was). */
int hbuf_put(struct hbuf *b, const void *s, size_t n);
int hbuf_puts(struct hbuf *b, const char *s);
/* printf-style append; returns 0 or -ENOMEM. */
int hbuf_printf(struct hbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void hbuf_free(struct hbuf *b);

/*
 * A JSON string literal for s (quotes included): ", \ and control characters escaped; other
 * bytes, UTF-8 included, copied as they are. Returns 0 or -ENOMEM.
 */
int hbuf_json_string(struct hbuf *b, const char *s);

enum {
	HTTP_INCOMPLETE = 0,
	HTTP_PARSED = 1
};

struct http_req {
	const char *method; /* points into the parsed buffer */
	size_t method_len;
	const char *path; /* request target without its query string */
	size_t path_len;
	int minor;       /* HTTP/1.<minor> */
	size_t head_len; /* request line and headers, final CRLFCRLF included */
	size_t body_len; /* Content-Length (bodies are skipped, never read) */
	bool keep_alive; /* HTTP/1.1 unless "Connection: close"; HTTP/1.0 only with keep-alive */
};

/*
 * Parse the request at the start of buf[0..len). Returns HTTP_PARSED with *req filled (the
 * request is head_len + body_len bytes long; the body may not all be in buf yet),
 * HTTP_INCOMPLETE when the head is not all there and len < max_head, or an HTTP status to
 * answer before closing: 400 (malformed), 431 (head longer than max_head), 501 (a
 * Transfer-Encoding: bodies are only skipped by Content-Length).
 */
int http_parse_request(const char *buf, size_t len, size_t max_head, struct http_req *req);

/*
 * Parse the <id> of /user/<id>: 1 to 10 ASCII digits whose value fits a PostgreSQL int4.
 * Returns 0 and sets *out, or -EINVAL.
 */
int http_parse_id(const char *s, size_t n, int32_t *out);

/* Reason phrase of a status code ("OK", "Not Found", ...). */
const char *http_reason(int status);

/*
 * Append a whole response: status line, Date (date: an IMF-fixdate string), Content-Type,
 * Content-Length, "Connection: close" when close is set, then the body.
 * Returns 0 or -ENOMEM (nothing appended).
 */
int http_response(struct hbuf *out, int status, const char *content_type, const char *body,
                  size_t body_len, bool close, const char *date);

#endif
