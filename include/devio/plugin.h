/* plugin.h - the C ABI of devio plugins: a backend in a shared object,
 * loaded at run time (ImDisk's custom I/O DLL, `devio --dll=`, for Linux).
 *
 * A plugin needs this header only (no libdevio to link against):
 *
 *     #include <devio/plugin.h>
 *     static const struct devio_plugin my_plugin = {
 *             .abi_version = DEVIO_PLUGIN_ABI_VERSION,
 *             .struct_size = sizeof(struct devio_plugin),
 *             .name = "mine", .open = ..., .size = ..., .read = ..., .close = ...,
 *     };
 *     DEVIO_PLUGIN_EXPORT const struct devio_plugin *devio_plugin_entry(void)
 *     {
 *             return &my_plugin;
 *     }
 *
 * and is served with `devio serve plugin:./libmine.so:ARGS --nbd ...`
 * (docs/plugins.md).  devio calls devio_plugin_entry() once per open,
 * checks abi_version and struct_size, then open(ARGS, readonly, &handle),
 * size(handle), and the I/O callbacks until close(handle).
 *
 * Rules the plugin must follow (devio checks what it can, and fails the
 * request or the open with a message naming the plugin, never trusting a
 * returned length or size blindly):
 *  - Errors are negative errno values (-1 .. -4095).  Anything else
 *    negative, or a positive value where 0 is expected, is refused (EIO).
 *  - read and write move the whole length and return it; a shorter or
 *    longer count is an I/O error (devio does not retry the rest).
 *  - Offsets and lengths devio passes are already checked: off + len never
 *    passes size, len never exceeds max_transfer (when set).
 *  - size is at most 2^63 - 1 bytes and not 0.
 *  - Threads: without DEVIO_PLUGIN_THREAD_SAFE devio calls one callback of
 *    a handle at a time (a mutex per handle); with it, any callback but
 *    open and close may run on many threads at once, on the same handle and
 *    overlapping ranges (the plugin then does its own locking).  close is
 *    called once, after every other call has returned.
 *  - A plugin runs inside the server process: a crash in it is a crash of
 *    the server.  Keep state per handle; several may be open at once.
 *
 * Versioning: DEVIO_PLUGIN_ABI_VERSION changes only when this layout or a
 * callback's meaning changes incompatibly; devio refuses a plugin built for
 * another version.  New optional callbacks are appended at the end and
 * struct_size tells devio which ones a plugin knows (a field beyond
 * struct_size counts as NULL/0).
 */
#ifndef DEVIO_PLUGIN_H
#define DEVIO_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DEVIO_PLUGIN_ABI_VERSION 1
/* The symbol devio looks up in the shared object. */
#define DEVIO_PLUGIN_ENTRY "devio_plugin_entry"
#define DEVIO_PLUGIN_EXPORT __attribute__((visibility("default")))

/* struct devio_plugin.flags */
#define DEVIO_PLUGIN_THREAD_SAFE (1u << 0) /* callbacks may run concurrently (see above) */

/* extents: flags of one extent, as NBD's base:allocation (and devio's
 * backend.h) define them. */
#define DEVIO_PLUGIN_EXTENT_HOLE (1u << 0) /* not allocated */
#define DEVIO_PLUGIN_EXTENT_ZERO (1u << 1) /* reads as zeroes */

/* Called by the plugin's extents callback for each extent, in order from
 * the offset asked, without gaps; returns 0 to go on, non-zero to stop
 * (the plugin then returns at once, with 0). */
typedef int (*devio_plugin_extent_fn)(void *ctx, uint64_t offset, uint64_t length, uint32_t flags);

struct devio_plugin {
	uint32_t abi_version;   /* DEVIO_PLUGIN_ABI_VERSION */
	uint32_t struct_size;   /* sizeof(struct devio_plugin) as the plugin was built */
	const char *name;       /* for messages and `devio status` */
	uint32_t flags;         /* DEVIO_PLUGIN_* */
	uint32_t max_transfer;  /* largest read/write length accepted; 0 = any (devio splits larger ones) */

	/* Required. */
	/* args: what followed the library's name in the source string ("" if
	 * nothing); readonly: non-zero when the export is read-only (write,
	 * trim and zero will not be called).  0 and *handle set, or -errno. */
	int (*open)(const char *args, int readonly, void **handle);
	/* The export's size in bytes. */
	int (*size)(void *handle, uint64_t *bytes);
	/* Returns len, or -errno. */
	int64_t (*read)(void *handle, void *buf, uint64_t len, uint64_t off);
	void (*close)(void *handle);

	/* Optional (NULL: not offered).  Without write the export is read-only. */
	int64_t (*write)(void *handle, const void *buf, uint64_t len, uint64_t off);
	/* Make every completed write durable: 0 or -errno. */
	int (*flush)(void *handle);
	/* The range's contents become undefined (a hint to free space). */
	int (*trim)(void *handle, uint64_t off, uint64_t len);
	/* The range reads back as zeroes afterwards.  may_trim: freeing the
	 * space is allowed. */
	int (*zero)(void *handle, uint64_t off, uint64_t len, int may_trim);
	/* Describe [off, off+len) through fn (at least one extent before
	 * returning 0; it may stop early).  0 or -errno. */
	int (*extents)(void *handle, uint64_t off, uint64_t len, devio_plugin_extent_fn fn, void *ctx);
};

/* What the plugin exports under DEVIO_PLUGIN_ENTRY. */
typedef const struct devio_plugin *(*devio_plugin_entry_fn)(void);
DEVIO_PLUGIN_EXPORT const struct devio_plugin *devio_plugin_entry(void);

#ifdef __cplusplus
}
#endif
#endif
