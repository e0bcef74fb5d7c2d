/* SPDX-License-Identifier: PostgreSQL */
/* HTTP/1.1 helpers of the example server: see http.h. */
#include "http.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int hbuf_reserve(struct hbuf *b, size_t extra)
{
	if (b->cap - b->len >= extra)
		return 0;
	size_t cap = b->cap ? b->cap : 256;
	while (cap - b->len < extra)
		cap *= 2;
	char *p = realloc(b->p, cap);
	if (!p)
		return -ENOMEM;
	b->p = p;
	b->cap = cap;
	return 0;
}

int hbuf_put(struct hbuf *b, const void *s, size_t n)
{
	if (hbuf_reserve(b, n))
		return -ENOMEM;
	memcpy(b->p + b->len, s, n);
	b->len += n;
	return 0;
}

int hbuf_puts(struct hbuf *b, const char *s)
{
	return hbuf_put(b, s, strlen(s));
}

int hbuf_printf(struct hbuf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
	va_end(ap);
	if (n < 0)
		return -EINVAL;
	if ((size_t)n >= b->cap - b->len) {
		/* Did not fit (the NUL needs a byte too): grow and format again. */
		if (hbuf_reserve(b, (size_t)n + 1))
			return -ENOMEM;
		va_start(ap, fmt);
		vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
		va_end(ap);
	}
	b->len += (size_t)n;
	return 0;
}

void hbuf_free(struct hbuf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

int hbuf_json_string(struct hbuf *b, const char *s)
{
	static const char hex[] = "0123456789abcdef";
	size_t n = strlen(s);
	/* Worst case: every byte a \u00XX escape, plus the quotes. */
	if (hbuf_reserve(b, n * 6 + 2))
		return -ENOMEM;
	char *o = b->p + b->len;
	*o++ = '"';
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		switch (*p) {
		case '"':
			*o++ = '\\';
			*o++ = '"';
			break;
		case '\\':
			*o++ = '\\';
			*o++ = '\\';
			break;
		case '\n':
			*o++ = '\\';
			*o++ = 'n';
			break;
		case '\r':
			*o++ = '\\';
			*o++ = 'r';
			break;
		case '\t':
			*o++ = '\\';
			*o++ = 't';
			break;
		default:
			if (*p < 0x20 || *p == 0x7f) {
				*o++ = '\\';
				*o++ = 'u';
				*o++ = '0';
				*o++ = '0';
				*o++ = hex[*p >> 4];
				*o++ = hex[*p & 15];
			} else {
				*o++ = (char)*p;
			}
		}
	}
	*o++ = '"';
	b->len = (size_t)(o - b->p);
	return 0;
}

/* Case-insensitive: does the comma-separated list v[0..n) hold token tok? */
static bool has_token(const char *v, size_t n, const char *tok)
{
	size_t tl = strlen(tok), i = 0;
	while (i < n) {
		while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
			i++;
		size_t j = i;
		while (j < n && v[j] != ',')
			j++;
		size_t e = j;
		while (e > i && (v[e - 1] == ' ' || v[e - 1] == '\t'))
			e--;
		if (e - i == tl && strncasecmp(v + i, tok, tl) == 0)
			return true;
		i = j;
	}
	return false;
}

static bool name_is(const char *name, size_t n, const char *want)
{
	return strlen(want) == n && strncasecmp(name, want, n) == 0;
}

int http_parse_request(const char *buf, size_t len, size_t max_head, struct http_req *req)
{
	size_t scan = len < max_head ? len : max_head;
	const char *end = memmem(buf, scan, "\r\n\r\n", 4);
	if (!end)
		return len >= max_head ? 431 : HTTP_INCOMPLETE;
	memset(req, 0, sizeof(*req));
	req->head_len = (size_t)(end - buf) + 4;
	const char *head_end = end + 2; /* just past the last header line's CRLF */

	/* Request line: method SP target SP HTTP/1.x CRLF */
	const char *eol = memmem(buf, (size_t)(head_end - buf), "\r\n", 2);
	const char *sp1 = memchr(buf, ' ', (size_t)(eol - buf));
	if (!sp1 || sp1 == buf)
		return 400;
	const char *sp2 = memchr(sp1 + 1, ' ', (size_t)(eol - sp1 - 1));
	if (!sp2 || sp2 == sp1 + 1)
		return 400;
	if (eol - sp2 - 1 != 8 || memcmp(sp2 + 1, "HTTP/1.", 7) != 0 ||
	    (sp2[8] != '0' && sp2[8] != '1'))
		return 400;
	req->method = buf;
	req->method_len = (size_t)(sp1 - buf);
	req->path = sp1 + 1;
	req->path_len = (size_t)(sp2 - sp1 - 1);
	for (size_t i = 0; i < req->path_len; i++) {
		if (req->path[i] == '?' || req->path[i] == '#') {
			req->path_len = i;
			break;
		}
	}
	req->minor = sp2[8] - '0';
	req->keep_alive = req->minor == 1;

	bool have_len = false;
	for (const char *line = eol + 2; line < head_end;) {
		const char *le = memmem(line, (size_t)(head_end - line), "\r\n", 2);
		const char *colon = memchr(line, ':', (size_t)(le - line));
		if (!colon || colon == line)
			return 400;
		for (const char *p = line; p < colon; p++)
			if (*p == ' ' || *p == '\t')
				return 400; /* no whitespace before the colon (RFC 9112 5.1) */
		const char *v = colon + 1, *ve = le;
		while (v < ve && (*v == ' ' || *v == '\t'))
			v++;
		while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
			ve--;
		size_t nl = (size_t)(colon - line), vl = (size_t)(ve - v);
		if (name_is(line, nl, "content-length")) {
			if (vl == 0 || vl > 9)
				return 400;
			size_t n = 0;
			for (size_t i = 0; i < vl; i++) {
				if (v[i] < '0' || v[i] > '9')
					return 400;
				n = n * 10 + (size_t)(v[i] - '0');
			}
			if (have_len && n != req->body_len)
				return 400;
			have_len = true;
			req->body_len = n;
		} else if (name_is(line, nl, "transfer-encoding")) {
			return 501;
		} else if (name_is(line, nl, "connection")) {
			if (has_token(v, vl, "close"))
				req->keep_alive = false;
			else if (has_token(v, vl, "keep-alive"))
				req->keep_alive = true;
		}
		line = le + 2;
	}
	return HTTP_PARSED;
}

int http_parse_id(const char *s, size_t n, int32_t *out)
{
	if (n == 0 || n > 10)
		return -EINVAL;
	int64_t v = 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -EINVAL;
		v = v * 10 + (s[i] - '0');
	}
	if (v > INT32_MAX)
		return -EINVAL;
	*out = (int32_t)v;
	return 0;
}

const char *http_reason(int status)
{
	switch (status) {
	case 200:
		return "OK";
	case 400:
		return "Bad Request";
	case 404:
		return "Not Found";
	case 413:
		return "Content Too Large";
	case 431:
		return "Request Header Fields Too Large";
	case 500:
		return "Internal Server Error";
	case 501:
		return "Not Implemented";
	case 503:
		return "Service Unavailable";
	default:
		return "Unknown";
	}
}

int http_response(struct hbuf *out, int status, const char *content_type, const char *body,
                  size_t body_len, bool close, const char *date)
{
	size_t mark = out->len;
	if (hbuf_printf(out,
	                "HTTP/1.1 %d %s\r\nServer: pgr_http_server\r\nDate: %s\r\n"
	                "Content-Type: %s\r\nContent-Length: %zu\r\n%s\r\n",
	                status, http_reason(status), date, content_type, body_len,
	                close ? "Connection: close\r\n" : "") ||
	    hbuf_put(out, body, body_len)) {
		out->len = mark;
		return -ENOMEM;
	}
	return 0;
}
