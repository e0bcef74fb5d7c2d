/* SPDX-License-Identifier: PostgreSQL */
/*
 * The library's version at run time. The header's PGRING_VERSION_* macros say which version a
 * program was compiled against; these say which one it is running against, which may be a
 * later minor release (same SONAME) than the header's.
 */
#include "pgring.h"

unsigned pgr_version(void)
{
	return PGRING_VERSION_NUMBER;
}

const char *pgr_version_string(void)
{
	return PGRING_VERSION_STRING;
}
