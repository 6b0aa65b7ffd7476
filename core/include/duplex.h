/**
 * @file duplex.h
 * @brief libduplex: duplex connections owned by an event loop, written from
 *        any thread.
 *
 * The whole public C API. Contract vocabulary used on every declaration:
 *
 * - `@thread any`  may be called from any thread at any time. Off the loop
 *                  thread the request is queued in the loop's inbox and the
 *                  loop is woken (one wake-up covers many requests); on the
 *                  loop thread it acts directly, without a round trip.
 * - `@thread loop` only from the loop thread (inside a callback); elsewhere
 *                  it returns ::DUPLEX_EWRONGTHREAD.
 * - `@owner`       who owns each pointer: *borrowed for the call*, *borrowed
 *                  for the callback* or *ownership taken*.
 * - `@callback`    when and how often a callback runs. Callbacks always run
 *                  on the loop thread, one at a time, never inside the call
 *                  that requested them, and must not block.
 * - `@blocks`      the call may wait for the loop thread (or for a callback
 *                  running on it). Never make such a call from a thread the
 *                  loop thread is itself waiting for. Calls without this tag
 *                  never wait for the loop.
 *
 * Ownership, the same for every object: what a constructor hands out is a
 * reference. Loops, conns, listeners, channels and timers each have `ref`
 * and `unref`; the memory goes with the last reference. `close` (and
 * duplex_loop_free()) ends the object's activity but leaves the caller's
 * reference valid: every later call through it returns ::DUPLEX_ECLOSED,
 * never undefined behaviour. The loop holds its own reference on every
 * object that is open on it, until that object's close has finished.
 *
 * Every function returns 0 or a negative `DUPLEX_E*` code; see
 * duplex_strerror(). No function aborts or raises SIGPIPE on bad input.
 */
#ifndef DUPLEX_H
#define DUPLEX_H

#include <stddef.h>
#include <stdint.h>

#include <duplex/version.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------- */
/* Export and attribute macros                                             */
/* ---------------------------------------------------------------------- */

#if defined(_WIN32) && defined(DUPLEX_BUILDING_DLL)
#define DUPLEX_API __declspec(dllexport)
#elif defined(_WIN32) && !defined(DUPLEX_STATIC)
#define DUPLEX_API __declspec(dllimport)
#elif defined(__GNUC__) || defined(__clang__)
#define DUPLEX_API __attribute__((visibility("default")))
#else
#define DUPLEX_API
#endif

/* ---------------------------------------------------------------------- */
/* Errors                                                                  */
/* ---------------------------------------------------------------------- */

/*
 * System codes carry libuv's values: -errno on Unix, libuv's fixed values on
 * Windows. Name-resolution codes are libuv's EAI values on every platform.
 * Library codes live in their own range, -30000 and below.
 */
#if defined(_WIN32)
#define DUPLEX_SYSERR_(posix, win) (win)
#else
#include <errno.h>
#define DUPLEX_SYSERR_(posix, win) (-(posix))
#endif

/**
 * The error table: XX(name, value, message). It generates ::duplex_error,
 * duplex_strerror() and duplex_err_name(). Every value is distinct.
 */
#define DUPLEX_ERRNO_MAP(XX)                                                 \
  XX(EINVAL, DUPLEX_SYSERR_(EINVAL, -4071), "invalid argument")              \
  XX(ENOMEM, DUPLEX_SYSERR_(ENOMEM, -4057), "out of memory")                 \
  XX(EWOULDBLOCK, DUPLEX_SYSERR_(EAGAIN, -4088),                             \
     "would block: the queue is full, the caller keeps the data")            \
  XX(ECANCELED, DUPLEX_SYSERR_(ECANCELED, -4081), "operation canceled")      \
  XX(EBUSY, DUPLEX_SYSERR_(EBUSY, -4082), "resource busy or already running")\
  XX(EBADF, DUPLEX_SYSERR_(EBADF, -4083), "bad file descriptor")             \
  XX(EMSGSIZE, DUPLEX_SYSERR_(EMSGSIZE, -4065), "message too long")          \
  XX(ENOTSUP, DUPLEX_SYSERR_(ENOTSUP, -4049), "operation not supported")     \
  XX(ENOTSOCK, DUPLEX_SYSERR_(ENOTSOCK, -4050),                              \
     "not a socket or a supported stream")                                   \
  XX(ETIMEDOUT, DUPLEX_SYSERR_(ETIMEDOUT, -4039), "timed out")               \
  XX(ESHUTDOWN, DUPLEX_SYSERR_(ESHUTDOWN, -4042),                            \
     "write side already shut down")                                         \
  XX(EPIPE, DUPLEX_SYSERR_(EPIPE, -4047), "broken pipe")                     \
  XX(ECONNRESET, DUPLEX_SYSERR_(ECONNRESET, -4077), "connection reset by peer")\
  XX(ECONNREFUSED, DUPLEX_SYSERR_(ECONNREFUSED, -4078), "connection refused") \
  XX(ECONNABORTED, DUPLEX_SYSERR_(ECONNABORTED, -4079),                      \
     "connection aborted")                                                   \
  XX(ENOTCONN, DUPLEX_SYSERR_(ENOTCONN, -4053), "socket is not connected")   \
  XX(EADDRINUSE, DUPLEX_SYSERR_(EADDRINUSE, -4091), "address already in use")\
  XX(EADDRNOTAVAIL, DUPLEX_SYSERR_(EADDRNOTAVAIL, -4090),                    \
     "address not available")                                                \
  XX(EAFNOSUPPORT, DUPLEX_SYSERR_(EAFNOSUPPORT, -4089),                      \
     "address family not supported")                                         \
  XX(ENETUNREACH, DUPLEX_SYSERR_(ENETUNREACH, -4062), "network is unreachable")\
  XX(EHOSTUNREACH, DUPLEX_SYSERR_(EHOSTUNREACH, -4073), "host is unreachable")\
  XX(EACCES, DUPLEX_SYSERR_(EACCES, -4092), "permission denied")             \
  XX(EPERM, DUPLEX_SYSERR_(EPERM, -4048), "operation not permitted")         \
  XX(ENOENT, DUPLEX_SYSERR_(ENOENT, -4058), "no such file or directory")     \
  XX(ENAMETOOLONG, DUPLEX_SYSERR_(ENAMETOOLONG, -4064), "name too long")     \
  XX(EMFILE, DUPLEX_SYSERR_(EMFILE, -4066), "too many open files")           \
  XX(ENFILE, DUPLEX_SYSERR_(ENFILE, -4061), "file table overflow")           \
  XX(ENOBUFS, DUPLEX_SYSERR_(ENOBUFS, -4060), "no buffer space available")   \
  XX(EINTR, DUPLEX_SYSERR_(EINTR, -4072), "interrupted system call")         \
  XX(EIO, DUPLEX_SYSERR_(EIO, -4070), "i/o error")                           \
  XX(EPROTO, DUPLEX_SYSERR_(EPROTO, -4046), "protocol error")                \
  XX(ENOSPC, DUPLEX_SYSERR_(ENOSPC, -4055), "no space left on device")       \
  XX(EDEADLK, DUPLEX_SYSERR_(EDEADLK, -4200),                                \
     "would deadlock: called on the loop thread")                            \
  XX(EAI_NONAME, -3008, "unknown host or service name")                      \
  XX(EAI_AGAIN, -3001, "temporary failure in name resolution")               \
  XX(EAI_FAIL, -3004, "permanent failure in name resolution")                \
  XX(EAI_NODATA, -3007, "no address for host name")                          \
  XX(EAI_FAMILY, -3005, "address family not supported for host name")        \
  XX(EAI_OTHER, -3099, "name resolution failed")                             \
  XX(ECLOSED, -30001, "object is closed")                                    \
  XX(EVERSION, -30002, "struct size or version not supported")               \
  XX(EWRONGTHREAD, -30003, "must be called on the loop thread")              \
  XX(EUNKNOWN, -30005, "unrecognised system error")                         \
  XX(ETLS, -30010, "TLS failed: protocol error or fatal alert")             \
  XX(ETLSVERIFY, -30011, "TLS peer certificate verification failed")         \
  XX(ETLSTRUNC, -30012,                                                      \
     "TLS stream truncated: transport closed without close_notify")          \
  XX(ETLSCONFIG, -30013, "TLS certificate, key or CA could not be loaded")

/** Every error code the library returns. */
typedef enum duplex_error {
#define DUPLEX_ENUM_(name, value, msg) DUPLEX_##name = (value),
  DUPLEX_ERRNO_MAP(DUPLEX_ENUM_)
#undef DUPLEX_ENUM_
  DUPLEX_OK = 0
} duplex_error;

/** Alias: the same code as ::DUPLEX_EWOULDBLOCK. */
#define DUPLEX_EAGAIN DUPLEX_EWOULDBLOCK

/**
 * A static, human-readable description of @p err.
 * @thread   any.
 * @owner    the result is static; never free it.
 * @returns  a string for every value, "success" for 0 and
 *           "unknown error" for codes the library never returns.
 * @since    0.1
 */
DUPLEX_API const char *duplex_strerror(int err);

/**
 * The symbolic name of @p err, e.g. "DUPLEX_ECLOSED".
 * @thread   any.
 * @owner    the result is static; never free it.
 * @returns  a string for every value, "DUPLEX_OK" for 0 and
 *           "DUPLEX_UNKNOWN" for codes the library never returns.
 * @since    0.1
 */
DUPLEX_API const char *duplex_err_name(int err);

/**
 * The library version as (major << 16) | (minor << 8) | patch.
 * @thread   any.
 * @returns  the version of the library actually loaded (compare with
 *           ::DUPLEX_VERSION_HEX for the headers compiled against).
 * @since    0.1
 */
DUPLEX_API unsigned duplex_version(void);

/**
 * The library version as a static string, e.g. "0.1.0".
 * @thread   any.
 * @returns  a static string; never free it.
 * @since    0.1
 */
DUPLEX_API const char *duplex_version_string(void);

/* ---------------------------------------------------------------------- */
/* Opaque objects                                                          */
/* ---------------------------------------------------------------------- */

/** One event loop: a libuv loop plus an inbox for other threads' work. */
typedef struct duplex_loop duplex_loop;
/** One duplex byte stream (TCP, UNIX socket, pipe pair, adopted fd). */
typedef struct duplex_conn duplex_conn;
/** Accepts connections on a TCP address or a UNIX socket path. */
typedef struct duplex_listener duplex_listener;
/** An immutable, shared TLS configuration (see "TLS"). */
typedef struct duplex_tls duplex_tls;

/** A borrowed buffer, for vectored writes. */
typedef struct duplex_buf {
  const void *base; /**< first byte; may be NULL only when len is 0 */
  size_t len;       /**< number of bytes */
} duplex_buf;

/* ---------------------------------------------------------------------- */
/* Loop                                                                    */
/* ---------------------------------------------------------------------- */

/** Options for duplex_loop_new(). Initialise with ::DUPLEX_LOOP_OPTS_INIT
 *  or duplex_loop_opts_init(); unknown flags are rejected. */
typedef struct duplex_loop_opts {
  size_t size;     /**< sizeof(duplex_loop_opts) as compiled by the caller */
  unsigned flags;  /**< reserved, must be 0 */
  uint32_t read_buffer_size; /**< bytes of the loop-owned read buffer shared
                                  by all conns; 0 = 64 KiB; max 16 MiB */
} duplex_loop_opts;

#define DUPLEX_LOOP_OPTS_INIT { sizeof(duplex_loop_opts), 0u, 0u }

/**
 * Fill @p opts with defaults (same as ::DUPLEX_LOOP_OPTS_INIT).
 * @thread   any.  @owner @p opts borrowed for the call.
 * @returns  0, DUPLEX_EINVAL (NULL).
 * @since    0.1
 */
DUPLEX_API int duplex_loop_opts_init(duplex_loop_opts *opts);

/**
 * Create a loop. It runs nothing until duplex_loop_run() or
 * duplex_loop_start(); work posted before then waits in the inbox.
 * @thread   any.
 * @owner    @p opts borrowed for the call (NULL = defaults); on success the
 *           caller owns @p *out and must duplex_loop_free() it. On failure
 *           @p *out is set to NULL.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_EVERSION (bad opts->size), DUPLEX_ENOMEM,
 *           or a system code from libuv.
 * @since    0.1
 */
DUPLEX_API int duplex_loop_new(duplex_loop **out, const duplex_loop_opts *opts);

/** Run until duplex_loop_stop(). */
#define DUPLEX_RUN_DEFAULT 0u
/** Run one iteration, waiting for events if there are none. */
#define DUPLEX_RUN_ONCE 1u
/** Run one iteration without waiting. */
#define DUPLEX_RUN_NOWAIT 2u

/**
 * Run the loop on the calling thread, which becomes the loop thread until
 * this returns. While it runs, SIGPIPE is blocked for this thread only (the
 * process's signal disposition is never changed); a SIGPIPE raised by the
 * library's own writes is consumed before the old mask is restored.
 * @thread   any thread that is not already running a loop.
 * @returns  0 when stopped (or after one iteration in ONCE/NOWAIT mode),
 *           DUPLEX_EINVAL (NULL, unknown mode), DUPLEX_EBUSY (already running
 *           on another thread or started), DUPLEX_EDEADLK (this thread runs
 *           a loop already), DUPLEX_ECLOSED (being freed).
 * @since    0.1
 */
DUPLEX_API int duplex_loop_run(duplex_loop *loop, unsigned mode);

/**
 * Start a thread owned by the loop that runs it until duplex_loop_free().
 * @thread   any.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_EBUSY (running or started already),
 *           DUPLEX_ECLOSED, or a system code (thread creation).
 * @since    0.1
 */
DUPLEX_API int duplex_loop_start(duplex_loop *loop);

/**
 * Ask duplex_loop_run() to return after the current iteration. Has no
 * effect on a loop started with duplex_loop_start() (free it instead). A
 * stop requested while the loop is not running makes the next
 * duplex_loop_run(DUPLEX_RUN_DEFAULT) return after one iteration.
 * @thread   any.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_ECLOSED.
 * @since    0.1
 */
DUPLEX_API int duplex_loop_stop(duplex_loop *loop);

/**
 * A function posted to the loop. @p status is 0 when run normally, or
 * DUPLEX_ECANCELED when the loop is freed before it ran: it runs exactly
 * once either way, so @p arg can own memory.
 * @callback runs on the loop thread (or on the thread freeing the loop, for
 *           DUPLEX_ECANCELED), must not block.
 */
typedef void (*duplex_post_cb)(duplex_loop *loop, int status, void *arg);

/**
 * Run @p fn(loop, 0, arg) on the loop thread, in the order posts were made
 * by the calling thread. On the loop thread it runs at the next iteration,
 * never inside this call.
 * @thread   any.
 * @owner    @p arg passes to @p fn, which runs exactly once if this returns
 *           0 and never if it fails.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_ENOMEM, DUPLEX_ECLOSED (being freed).
 * @since    0.1
 */
DUPLEX_API int duplex_loop_post(duplex_loop *loop, duplex_post_cb fn,
                                void *arg);

/**
 * Whether the calling thread is the loop's thread right now.
 * @thread   any.
 * @returns  1 (yes), 0 (no, or the loop is not running), DUPLEX_EINVAL (NULL).
 * @since    0.1
 */
DUPLEX_API int duplex_loop_on_thread(const duplex_loop *loop);

/**
 * Stop the loop (joining its thread if it was started, or waiting for
 * duplex_loop_run() on another thread to return), then close everything on
 * it: every conn closes with reason DUPLEX_ECANCELED, every pending write
 * completes with DUPLEX_ECANCELED, every zero-copy buffer is released, every
 * listener closes, every post runs with DUPLEX_ECANCELED. Those callbacks run
 * on the calling thread before this returns. Afterwards references to conns
 * that other threads still hold stay valid: calls through them return
 * DUPLEX_ECLOSED until the last duplex_conn_unref() frees them.
 * @thread   any thread that is not running a loop (this or another one).
 * @blocks   until the loop's thread has returned and every close finished.
 * @owner    drops the creator's reference: @p loop is invalid once this
 *           returns 0 unless another reference is held (duplex_loop_ref()),
 *           through which every call then returns DUPLEX_ECLOSED.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_EDEADLK (called on a loop thread),
 *           DUPLEX_ECLOSED (already freed, or being freed by another
 *           thread; no reference is dropped then).
 * @since    0.1
 */
DUPLEX_API int duplex_loop_free(duplex_loop *loop);

/**
 * Take a reference on the loop's memory: the pointer stays valid after
 * duplex_loop_free() (calls then return DUPLEX_ECLOSED) until the matching
 * duplex_loop_unref(). It does not keep the loop running.
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2
 */
DUPLEX_API int duplex_loop_ref(duplex_loop *loop);

/**
 * Drop a reference taken with duplex_loop_ref(). Dropping the last one
 * frees the memory. The last reference of a loop that was not freed is
 * dropped only by duplex_loop_free(): here it returns DUPLEX_EBUSY.
 * @thread any. @returns 0, DUPLEX_EINVAL, DUPLEX_EBUSY. @since 0.2
 */
DUPLEX_API int duplex_loop_unref(duplex_loop *loop);

/** Figures of one loop, read by duplex_loop_get_stats(). */
typedef struct duplex_loop_stats {
  size_t size;       /**< sizeof(duplex_loop_stats) as compiled by the caller */
  uint64_t conns;    /**< live conns: created on this loop, on_close not yet
                          returned (accepted, connecting, adopted) */
  uint64_t queued;   /**< bytes queued for writing over all its conns, counted
                          as duplex_conn_get_queued() counts them */
  uint64_t accepted; /**< conns listeners accepted onto this loop, in total */
} duplex_loop_stats;

#define DUPLEX_LOOP_STATS_INIT { sizeof(duplex_loop_stats), 0u, 0u, 0u }

/**
 * Read the loop's figures. Each figure is exact at some instant while the
 * call runs; the three are not one snapshot. Nothing waits for the loop.
 * @thread   any; also on a freed loop through a held reference (the last
 *           figures stay).
 * @owner    @p out borrowed; set out->size first (::DUPLEX_LOOP_STATS_INIT).
 * @returns  0, DUPLEX_EINVAL (NULL), DUPLEX_EVERSION (bad out->size).
 * @since    0.2
 */
DUPLEX_API int duplex_loop_get_stats(const duplex_loop *loop,
                                     duplex_loop_stats *out);

/* ---------------------------------------------------------------------- */
/* Connections                                                             */
/* ---------------------------------------------------------------------- */

/** Connected (outgoing), accepted or adopted: the conn is open. */
typedef void (*duplex_open_cb)(duplex_conn *conn, void *user);
/** Bytes arrived. @p data is borrowed for the callback only. */
typedef void (*duplex_read_cb)(duplex_conn *conn, const void *data,
                               size_t len, void *user);
/** The peer finished sending (EOF). Not an error; writing may go on. */
typedef void (*duplex_eof_cb)(duplex_conn *conn, void *user);
/** Queued bytes crossed the high watermark. */
typedef void (*duplex_backpressure_cb)(duplex_conn *conn, size_t queued,
                                       void *user);
/** Queued bytes fell to the low watermark or below after backpressure or
 * after a write was refused with DUPLEX_EWOULDBLOCK. */
typedef void (*duplex_writable_cb)(duplex_conn *conn, void *user);
/**
 * The conn closed. @p reason is 0 for a graceful close (duplex_conn_close
 * with ::DUPLEX_CLOSE_GRACEFUL) or when both directions finished (EOF
 * received and shutdown done), DUPLEX_ECONNABORTED for
 * ::DUPLEX_CLOSE_ABORT, DUPLEX_ECANCELED when its loop was freed, or the
 * error that closed it (connect/resolve failure, deadline, read or write
 * error).
 */
typedef void (*duplex_close_cb)(duplex_conn *conn, int reason, void *user);
/** Every on_read of one batch has run (see duplex_conn_cbs.on_read_batch):
 *  right after the batch's last on_read. */
typedef void (*duplex_read_batch_cb)(duplex_conn *conn, void *user);

/**
 * Callback table for a conn. Every member may be NULL. The table is copied.
 * @callback each runs on the loop thread and must not block. For every conn
 *           whose creation returned 0, `on_close` runs exactly once and is
 *           the last callback; `on_open` runs at most once, before any read.
 */

typedef struct duplex_conn_cbs {
  size_t size; /**< sizeof(duplex_conn_cbs) as compiled by the caller */
  duplex_open_cb on_open;
  duplex_read_cb on_read;
  duplex_eof_cb on_eof;
  duplex_backpressure_cb on_backpressure;
  duplex_writable_cb on_writable;
  duplex_close_cb on_close;
  /** Every on_read of one batch has run: the chunk, or every frame
   *  decoded from one read of the socket (or the held frames delivered at
   *  a resume). Replies gathered in on_read go out here as one write, so
   *  a pipelined batch of requests gets one batch of replies. Not called
   *  after a read that completed no frame. (0.2; callers compiled with the
   *  0.1 struct simply do not have it.) */
  duplex_read_batch_cb on_read_batch;
} duplex_conn_cbs;

#define DUPLEX_CONN_CBS_INIT { sizeof(duplex_conn_cbs), 0, 0, 0, 0, 0, 0, 0 }

/** Enable Nagle's algorithm on TCP conns (TCP_NODELAY is set otherwise). */
#define DUPLEX_CONN_NAGLE 0x1u
/** Do not start reading when the conn opens; call duplex_conn_resume(). */
#define DUPLEX_CONN_START_PAUSED 0x2u
/** Enable TCP keep-alive (60 s idle). */
#define DUPLEX_CONN_KEEPALIVE 0x4u
/** Every flag duplex_conn_opts accepts. */
#define DUPLEX_CONN_FLAGS_ALL 0x7u

/* ---- message framing ---------------------------------------------------- */

/** No framing: `on_read` gets bytes as they arrive (the default). */
#define DUPLEX_FRAME_NONE 0
/** Frames end with a delimiter (e.g. '\n'); the delimiter is stripped. */
#define DUPLEX_FRAME_DELIMITED 1
/** Frames start with a 1, 2, 4 or 8 byte length of the payload. */
#define DUPLEX_FRAME_LENGTH_PREFIX 2
/** A user function says how long the next frame is. */
#define DUPLEX_FRAME_CUSTOM 3

/** Length prefix is little-endian (big-endian, network order, otherwise). */
#define DUPLEX_FRAME_LITTLE_ENDIAN 0x1u
/** Every flag duplex_framing accepts. */
#define DUPLEX_FRAME_FLAGS_ALL 0x1u

/**
 * A custom framer: look at the @p len buffered bytes at @p data and return
 * the length of the first whole frame (> 0, at most @p len), 0 if more bytes
 * are needed, or a negative DUPLEX_E* code to close the conn with it.
 * @p *skip receives how many leading bytes of the frame are a header to
 * strip before delivery (leave it 0 to deliver the whole frame). A frame
 * may be at most max_frame + 64 bytes in all; still answering 0 once that
 * many bytes are buffered closes the conn with DUPLEX_EMSGSIZE, and a
 * length over @p len or a skip over the length with DUPLEX_EPROTO.
 * @callback runs on the loop thread; must be pure (it may see the same
 *           bytes again after more arrive).
 */
typedef long long (*duplex_frame_fn)(const void *data, size_t len,
                                     size_t *skip, void *user);

/**
 * Message framing for a conn. With framing on, `on_read` receives exactly
 * one whole message per call (never a partial one), and
 * duplex_conn_write_frame() adds the prefix or delimiter. A frame longer
 * than @ref max_frame closes the conn with DUPLEX_EMSGSIZE and nothing of
 * it is delivered. Bytes still buffered at EOF that do not form a frame are
 * dropped and the conn closes with DUPLEX_EPROTO.
 */
typedef struct duplex_framing {
  size_t size;          /**< sizeof(duplex_framing) */
  int kind;             /**< DUPLEX_FRAME_* kind */
  unsigned flags;       /**< DUPLEX_FRAME_LITTLE_ENDIAN */
  unsigned char delimiter[4]; /**< DELIMITED: the delimiter bytes */
  unsigned delimiter_len;     /**< DELIMITED: 1 to 4 */
  unsigned prefix_bytes;      /**< LENGTH_PREFIX: 1, 2, 4 or 8 */
  size_t max_frame;     /**< largest payload accepted; 0 = 1 MiB */
  duplex_frame_fn custom;     /**< CUSTOM: the framer */
  void *custom_user;          /**< CUSTOM: passed to @ref custom */
} duplex_framing;

#define DUPLEX_FRAMING_INIT                                                  \
  { sizeof(duplex_framing), DUPLEX_FRAME_NONE, 0u, { 0, 0, 0, 0 }, 0u, 0u,   \
    0, 0, 0 }

/**
 * Fill @p framing with ::DUPLEX_FRAMING_INIT.
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1
 */
DUPLEX_API int duplex_framing_init(duplex_framing *framing);

/**
 * Options for a conn. Zero sizes mean "default".
 * Watermarks: crossing @ref high_watermark queued bytes calls
 * `on_backpressure`; falling to @ref low_watermark or below afterwards calls
 * `on_writable` and wakes duplex_conn_wait_writable(). The queue is measured
 * by what it costs: each queued write counts its payload plus
 * ::DUPLEX_WRITE_OVERHEAD bytes (its entry and completion), so a flood of
 * tiny or zero-length writes is bounded like a flood of big ones. A write
 * is refused with DUPLEX_EWOULDBLOCK when something is already queued and
 * it would take the total past @ref hard_limit (a write into an empty
 * queue is always taken whole); a refusal also counts as congestion, so
 * `on_writable` and waiters are told once the queue is back at the low
 * watermark. duplex_conn_get_queued() reports this same measure.
 */
typedef struct duplex_conn_opts {
  size_t size;                /**< sizeof(duplex_conn_opts) */
  const duplex_conn_cbs *cbs; /**< copied; NULL = no callbacks */
  void *user;                 /**< passed to every callback */
  size_t high_watermark;      /**< default 1 MiB */
  size_t low_watermark;       /**< default high/4; must be < high */
  size_t hard_limit;          /**< default 16 MiB; must be >= high */
  unsigned flags;             /**< DUPLEX_CONN_* flags */
  const duplex_framing *framing; /**< copied; NULL = no framing */
  uint32_t connect_timeout_ms; /**< connect + name lookup; 0 = none */
  uint32_t idle_timeout_ms;    /**< no bytes either way; 0 = none */
  uint32_t read_timeout_ms;    /**< no bytes read while reading; 0 = none */
  uint32_t flush_timeout_ms;   /**< writes pending, none progressing */
  /** duplex_conn_connect_tcp() only: bind the socket to this numeric IPv4
   *  or IPv6 address before connecting (the source address); only
   *  resolved addresses of its family are tried. NULL = any. Copied. Any
   *  other constructor, and a listener's conn_opts, refuse it (EINVAL).
   *  (0.2) */
  const char *local_host;
  /** With duplex_conn_connect_tcp(): the source port; 0 = any. (0.2) */
  uint16_t local_port;
  /** Speak TLS on this conn (a client-role config; the conn takes its own
   *  reference). `on_open` runs once the handshake is done. NULL = plain.
   *  A listener takes its TLS from duplex_listener_opts.tls instead (set
   *  here in a listener's conn_opts: EINVAL). (0.2) */
  duplex_tls *tls;
  /** With @ref tls: the server name sent as SNI and checked against the
   *  server's certificate. NULL = the host given to
   *  duplex_conn_connect_tcp(); required for a verifying client on any
   *  other constructor (EINVAL without it). Copied. (0.2) */
  const char *tls_host;
} duplex_conn_opts;

#define DUPLEX_CONN_OPTS_INIT                                                \
  { sizeof(duplex_conn_opts), 0, 0, 0, 0, 0, 0u, 0, 0u, 0u, 0u, 0u, 0, 0u,   \
    0, 0 }

/**
 * Fill @p opts with defaults (same as ::DUPLEX_CONN_OPTS_INIT).
 * Deadlines: every timeout closes the conn with DUPLEX_ETIMEDOUT when it
 * expires. Connect counts from the start of the lookup to on_open; idle from
 * the last byte read or written; read from the last byte read while reading
 * is not paused; flush from the last write progress while writes are
 * pending (a peer that stopped reading).
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1
 */
DUPLEX_API int duplex_conn_opts_init(duplex_conn_opts *opts);

/**
 * Fill @p cbs with an empty table (same as ::DUPLEX_CONN_CBS_INIT).
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1
 */
DUPLEX_API int duplex_conn_cbs_init(duplex_conn_cbs *cbs);

/**
 * Connect over TCP to @p host (a name, an IPv4 or an IPv6 address) and
 * @p port. Names resolve on libuv's thread pool, never blocking the loop;
 * every resolved address is tried in order. Writes made before the conn
 * opens are queued and flushed once it does.
 * @thread   any.
 * @owner    @p host and @p opts borrowed for the call. If @p out is not NULL
 *           it receives a new reference the caller must duplex_conn_unref();
 *           on failure it is set to NULL.
 * With opts->local_host / local_port the socket is bound to that source
 * address first; only addresses of the same family are tried.
 * @returns  0, DUPLEX_EINVAL (NULL loop/host, empty host, port 0, bad opts,
 *           a local_host that is not a numeric address),
 *           DUPLEX_ENAMETOOLONG (host over 1024 bytes), DUPLEX_EVERSION,
 *           DUPLEX_ENOMEM, DUPLEX_ECLOSED (loop being freed).
 * @callback on success `on_open`; on any failure `on_close` with the error
 *           (e.g. DUPLEX_ECONNREFUSED, DUPLEX_EAI_NONAME; a source address
 *           that cannot be bound: DUPLEX_EADDRINUSE, DUPLEX_EADDRNOTAVAIL;
 *           no resolved address of the source's family:
 *           DUPLEX_EAFNOSUPPORT).
 * @since    0.1
 */
DUPLEX_API int duplex_conn_connect_tcp(duplex_conn **out, duplex_loop *loop,
                                       const char *host, uint16_t port,
                                       const duplex_conn_opts *opts);

/**
 * Connect to the UNIX-domain socket at @p path (on Windows, a named pipe).
 * @thread any. @owner as duplex_conn_connect_tcp().
 * @returns 0, DUPLEX_EINVAL, DUPLEX_ENAMETOOLONG, DUPLEX_EVERSION,
 *          DUPLEX_ENOMEM, DUPLEX_ECLOSED.
 * @callback as duplex_conn_connect_tcp().
 * @since 0.1
 */
DUPLEX_API int duplex_conn_connect_unix(duplex_conn **out, duplex_loop *loop,
                                        const char *path,
                                        const duplex_conn_opts *opts);

/**
 * Adopt an already-connected stream @p fd: a TCP or UNIX socket (e.g. one
 * end of a socketpair), a pipe or a terminal. The conn owns @p fd from now
 * on and closes it; the fd is switched to non-blocking mode (which affects
 * every process sharing the open file description, e.g. an inherited
 * terminal). Regular files are not streams and are refused.
 * @thread   any.
 * @owner    @p fd: ownership taken on success, left with the caller on
 *           failure. @p out as duplex_conn_connect_tcp().
 * @returns  0, DUPLEX_EINVAL, DUPLEX_EBADF (not an open fd), DUPLEX_ENOTSOCK
 *           (regular file or other unsupported kind), DUPLEX_EVERSION,
 *           DUPLEX_ENOMEM, DUPLEX_ECLOSED.
 * @callback `on_open` at the next loop iteration (never inside this call).
 * @since    0.1
 */
DUPLEX_API int duplex_conn_adopt(duplex_conn **out, duplex_loop *loop, int fd,
                                 const duplex_conn_opts *opts);

/**
 * Adopt two one-way fds as one conn: bytes are read from @p read_fd and
 * written to @p write_fd (stdin/stdout, or two pipes). Shutdown closes
 * @p write_fd, which is how the peer sees EOF.
 * @thread any. @owner both fds taken on success, left with the caller on
 *         failure. @returns as duplex_conn_adopt(); DUPLEX_EINVAL if the
 *         two fds are equal. @since 0.1
 */
DUPLEX_API int duplex_conn_adopt_pair(duplex_conn **out, duplex_loop *loop,
                                      int read_fd, int write_fd,
                                      const duplex_conn_opts *opts);

/**
 * Take a reference: the pointer stays valid (calls return DUPLEX_ECLOSED once
 * the conn has closed) until the matching duplex_conn_unref().
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1
 */
DUPLEX_API int duplex_conn_ref(duplex_conn *conn);

/**
 * Drop a reference. The memory goes when the last reference is gone, which
 * is never before `on_close` has returned (the loop holds one meanwhile).
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1
 */
DUPLEX_API int duplex_conn_unref(duplex_conn *conn);

/** Completion of one write: @p status is 0 once the bytes were handed to the
 *  kernel, a system error, or DUPLEX_ECANCELED when the conn closed first. */
typedef void (*duplex_write_cb)(duplex_conn *conn, int status, void *user);

/**
 * Release of a zero-copy buffer given to duplex_conn_write_zc(). @p status
 * is as for ::duplex_write_cb. Called exactly once per accepted write.
 * @callback runs on the loop thread (or the thread freeing the loop).
 */
typedef void (*duplex_release_cb)(void *data, size_t len, int status,
                                  void *user);

/** Largest single write accepted (1 GiB). */
#define DUPLEX_WRITE_MAX ((size_t)1 << 30)

/** What each queued write costs against the watermarks and the hard limit
 *  beyond its payload (see duplex_conn_opts). */
#define DUPLEX_WRITE_OVERHEAD ((size_t)64)

/**
 * Queue @p len bytes from @p data for writing (copied).
 * A zero-length write queues nothing and its @p done runs once every byte
 * queued before it has been written: a flush marker.
 * @thread   any. On the loop thread with nothing queued the bytes are
 *           written at once; elsewhere they join the inbox and the loop
 *           writes whole batches with vectored writes.
 * @owner    @p data borrowed for the call; on error nothing is queued.
 * @order    writes by one thread reach the wire in call order; a write is
 *           never split or interleaved by another write.
 * @returns  0, DUPLEX_EINVAL (NULL conn, NULL data with len > 0),
 *           DUPLEX_EMSGSIZE (len > DUPLEX_WRITE_MAX), DUPLEX_EWOULDBLOCK (past
 *           the hard limit), DUPLEX_ESHUTDOWN (after duplex_conn_shutdown),
 *           DUPLEX_ECLOSED (closed or closing), DUPLEX_ENOMEM.
 * @callback @p done (optional) runs exactly once, on the loop thread, after
 *           this call returned 0; never when it failed.
 * @since    0.1
 */
DUPLEX_API int duplex_conn_write(duplex_conn *conn, const void *data,
                                 size_t len, duplex_write_cb done, void *user);

/**
 * Queue @p nbufs buffers, copied, as one unsplittable write (e.g. a header
 * and its payload). Limits and codes as duplex_conn_write(), applied to the
 * total; DUPLEX_EINVAL also for NULL @p bufs with @p nbufs > 0 or more than
 * 1024 buffers.
 * @thread any. @owner @p bufs and their bytes borrowed for the call.
 * @returns as duplex_conn_write(); DUPLEX_EINVAL also for bad @p bufs.
 * @callback @p done as for duplex_conn_write(). @since 0.1
 */
DUPLEX_API int duplex_conn_writev(duplex_conn *conn, const duplex_buf *bufs,
                                  size_t nbufs, duplex_write_cb done,
                                  void *user);

/**
 * Queue @p data for writing without copying it.
 * @thread   any.
 * @owner    ownership of @p data passes to the library if this returns 0;
 *           @p release(data, len, status, user) returns it exactly once,
 *           after the bytes were written (status 0) or failed / were
 *           canceled. @p release may be NULL only for data that outlives the
 *           conn (static storage). If this fails, the caller still owns
 *           @p data and @p release is never called.
 * @order    as duplex_conn_write().
 * @returns  as duplex_conn_write().
 * @since    0.1
 */
DUPLEX_API int duplex_conn_write_zc(duplex_conn *conn, void *data, size_t len,
                                    duplex_release_cb release, void *user);

/**
 * Half-close: once every write queued before this call (by this thread) is
 * flushed, close the write side. An adopted lone pipe or terminal cannot
 * half-close: its shutdown closes the conn (reason 0) once flushed. Reading continues until the peer's EOF.
 * Later writes return DUPLEX_ESHUTDOWN. When the peer's EOF has also arrived
 * the conn closes by itself with reason 0.
 * @thread   any.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_ESHUTDOWN (already requested),
 *           DUPLEX_ECLOSED, DUPLEX_ENOMEM.
 * @callback @p done (optional) runs exactly once: 0 when the write side is
 *           closed, an error, or DUPLEX_ECANCELED if the conn closed first.
 * @since    0.1
 */
DUPLEX_API int duplex_conn_shutdown(duplex_conn *conn, duplex_write_cb done,
                                    void *user);

/** Close after flushing every write queued before the close. */
#define DUPLEX_CLOSE_GRACEFUL 0u
/** Close now: pending writes complete with DUPLEX_ECANCELED. */
#define DUPLEX_CLOSE_ABORT 1u

/**
 * Close the conn. Graceful: writes queued before this call are flushed
 * first, then a TCP conn ends with FIN. Abort: every pending write
 * completes with DUPLEX_ECANCELED, a TCP conn is reset (RST: the peer sees
 * ECONNRESET, not EOF), and on the loop thread no read callback (`on_read`,
 * `on_eof`) runs after this returns, also for the rest of a chunk being
 * delivered. An abort may follow a graceful close and overrides it. Writes
 * made after this call return DUPLEX_ECLOSED.
 * @thread   any.
 * @returns  0, DUPLEX_EINVAL (NULL, unknown @p how), DUPLEX_ECLOSED (a close
 *           of the same kind was already requested, or closed),
 *           DUPLEX_ENOMEM (graceful close could not be queued; nothing
 *           changed).
 * @callback `on_close` runs exactly once, with reason 0 for a graceful
 *           close (or the error that interrupted its flush) and
 *           DUPLEX_ECONNABORTED for an abort.
 * @since    0.1
 */
DUPLEX_API int duplex_conn_close(duplex_conn *conn, unsigned how);

/** Deadline kinds for duplex_conn_set_timeout(). */
#define DUPLEX_TIMEOUT_CONNECT 0
#define DUPLEX_TIMEOUT_IDLE 1
#define DUPLEX_TIMEOUT_READ 2
#define DUPLEX_TIMEOUT_FLUSH 3

/**
 * Change one deadline (see duplex_conn_opts); 0 turns it off. The new value
 * counts from the last event the deadline watches, so shortening it can
 * expire it at once (on the loop, never inside this call).
 * @thread any.
 * @returns 0, DUPLEX_EINVAL (NULL, unknown @p kind), DUPLEX_ECLOSED.
 * @since 0.1
 */
DUPLEX_API int duplex_conn_set_timeout(duplex_conn *conn, int kind,
                                       uint32_t ms);

/**
 * Write one framed message: the conn's length prefix or delimiter is added
 * and the whole frame is one unsplittable write. Without framing, and with
 * a custom framer (whose header the caller includes), the bytes are
 * written as given, as by duplex_conn_write().
 * @thread any. @owner @p data borrowed for the call.
 * @returns as duplex_conn_write(); DUPLEX_EMSGSIZE also when @p len exceeds
 *          the framing's max_frame or what the prefix can express;
 *          DUPLEX_EINVAL when a delimited payload contains the delimiter.
 * @callback @p done as for duplex_conn_write(). @since 0.1
 */
DUPLEX_API int duplex_conn_write_frame(duplex_conn *conn, const void *data,
                                       size_t len, duplex_write_cb done,
                                       void *user);

/**
 * Stop reading (flow control). On the loop thread no read callback runs
 * after this returns (with framing, frames already decoded from the last
 * chunk wait for duplex_conn_resume()); from another thread, reads the loop
 * is already delivering may still arrive before it takes effect.
 * @thread any. @returns 0, DUPLEX_EINVAL, DUPLEX_ECLOSED. @since 0.1
 */
DUPLEX_API int duplex_conn_pause(duplex_conn *conn);

/**
 * Resume reading after duplex_conn_pause() or ::DUPLEX_CONN_START_PAUSED.
 * @thread any. @returns 0, DUPLEX_EINVAL, DUPLEX_ECLOSED. @since 0.1
 */
DUPLEX_API int duplex_conn_resume(duplex_conn *conn);

/**
 * Block until the conn is writable: not past its high watermark, or back at
 * the low watermark after crossing it or after refusing a write. For
 * producers on other threads: `while (write(...) == DUPLEX_EWOULDBLOCK)
 * wait_writable(...)` waits for the queue to drain, never spins.
 * @thread   any thread except the loop thread.
 * @blocks   up to @p timeout_ms, for the loop to drain the queue.
 * @param    timeout_ms  -1 waits for ever, 0 does not wait (as for
 *           duplex_channel_send()), > 0 waits at most that long.
 * @returns  0 (writable), DUPLEX_EWOULDBLOCK (not writable, @p timeout_ms
 *           0), DUPLEX_ETIMEDOUT (still not writable when the wait ended),
 *           DUPLEX_ECLOSED (closed, or closed while waiting), DUPLEX_EDEADLK
 *           (on the loop thread), DUPLEX_EINVAL.
 * @since    0.1
 */
DUPLEX_API int duplex_conn_wait_writable(duplex_conn *conn, int timeout_ms);

/**
 * Block until a write of @p len bytes would be taken: the queue is empty
 * (an empty queue takes a write of any size) or queued + @p len +
 * ::DUPLEX_WRITE_OVERHEAD is within the hard limit. A writer that got
 * DUPLEX_EWOULDBLOCK for a large write waits here for exactly the room it
 * needs, rather than for the low watermark. Another thread may take the
 * room first: retry the write and wait again on DUPLEX_EWOULDBLOCK.
 * @thread   any thread except the loop thread.
 * @blocks   up to @p timeout_ms, for the loop to drain the queue.
 * @param    timeout_ms  as for duplex_conn_wait_writable().
 * @returns  0 (the write fits now), DUPLEX_EWOULDBLOCK (it does not,
 *           @p timeout_ms 0), DUPLEX_ETIMEDOUT, DUPLEX_ECLOSED (closed, or
 *           closed while waiting), DUPLEX_EDEADLK (on the loop thread),
 *           DUPLEX_EINVAL.
 * @since    0.2
 */
DUPLEX_API int duplex_conn_wait_room(duplex_conn *conn, size_t len,
                                     int timeout_ms);

/**
 * What is queued for writing and not yet completed: payload bytes plus
 * ::DUPLEX_WRITE_OVERHEAD per write (the measure the watermarks use).
 * @thread any. @owner @p out borrowed for the call.
 * @returns 0, DUPLEX_EINVAL. On a closed conn (after an abort returned, or
 *          from `on_close` on) it reports 0. @since 0.1
 */
DUPLEX_API int duplex_conn_get_queued(const duplex_conn *conn, size_t *out);

/**
 * The user pointer passed to callbacks.
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1
 */
DUPLEX_API int duplex_conn_get_user(const duplex_conn *conn, void **out);

/**
 * The loop the conn lives on (in a group: the loop it was handed to). A
 * conn never changes loops.
 * @thread   any.
 * @owner    @p *out is borrowed: valid while the loop is (take
 *           duplex_loop_ref() to keep it).
 * @returns  0, DUPLEX_EINVAL, DUPLEX_ECLOSED (the conn finished closing:
 *           on_close has returned).
 * @since    0.2
 */
DUPLEX_API int duplex_conn_get_loop(const duplex_conn *conn,
                                    duplex_loop **out);

/**
 * Replace the user pointer passed to callbacks that start after this call.
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1
 */
DUPLEX_API int duplex_conn_set_user(duplex_conn *conn, void *user);

/**
 * The peer's address as text: "1.2.3.4:80", "[::1]:80", a socket path, or
 * "" for unnamed peers (socketpair, pipes). Conns the library connects
 * learn it when they open; an accepted conn reads it off the socket the
 * first time it is asked for (so idle servers store no names) and keeps
 * it: ask while the conn is open (e.g. in on_open) if you need it later.
 * @thread   any.
 * @blocks   off the loop thread, the first call for an accepted or adopted
 *           conn waits for the loop to read the name (never make it from
 *           inside a callback of another loop that this loop waits on).
 * @owner    @p buf borrowed for the call; always NUL-terminated on success.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_ENOTCONN (not open yet),
 *           DUPLEX_ECLOSED (closed before anyone asked),
 *           DUPLEX_ENOBUFS (@p len too small; @p buf holds ""),
 *           DUPLEX_ENOMEM.
 * @since    0.1
 */
DUPLEX_API int duplex_conn_get_peer(const duplex_conn *conn, char *buf,
                                    size_t len);

/**
 * The conn's own address as text, in the same forms as
 * duplex_conn_get_peer(): "127.0.0.1:40312", "[::1]:40312", the socket
 * path a UNIX listener accepted on, or "" for unnamed ends (a UNIX client,
 * socketpairs, pipes). Read off the socket on each call; nothing is kept.
 * @thread   any.
 * @blocks   off the loop thread, until the loop has read the name.
 * @owner    @p buf borrowed for the call; always NUL-terminated on success.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_ENOTCONN (not open yet),
 *           DUPLEX_ECLOSED (closed, or its loop was freed),
 *           DUPLEX_ENOBUFS (@p len too small; @p buf holds "").
 * @since    0.2
 */
DUPLEX_API int duplex_conn_get_local(const duplex_conn *conn, char *buf,
                                     size_t len);

/* ---------------------------------------------------------------------- */
/* Listeners                                                               */
/* ---------------------------------------------------------------------- */

/**
 * Accepting failed; the listener keeps listening. When accept() itself
 * fails (out of descriptors: DUPLEX_EMFILE / DUPLEX_ENFILE; or out of
 * memory) the listener stops accepting and retries after 20 ms, doubling
 * up to 1 s, until it succeeds: the loop never spins, waiting clients stay
 * in the kernel's backlog and are served once descriptors are free, and
 * this callback runs once per such episode (Unix; on Windows libuv's
 * accept reports each failure). Failures with one accepted conn (e.g.
 * DUPLEX_ENOMEM for its state) are reported as they happen.
 */
typedef void (*duplex_listen_error_cb)(duplex_listener *listener, int status,
                                       void *user);

/** Set IPV6_V6ONLY on an IPv6 TCP listener. */
#define DUPLEX_LISTEN_IPV6ONLY 0x1u
/** Every flag duplex_listener_opts accepts (DUPLEX_LISTEN_REUSEPORT,
 *  defined with the loop groups, only for group listeners). */
#define DUPLEX_LISTEN_FLAGS_ALL 0x3u

/**
 * Options for a listener. Each accepted conn is created with @ref conn_opts
 * (callbacks, user pointer, limits) and gets `on_open` when accepted.
 * An accepted conn comes with no reference for the user: the loop holds
 * its own until `on_close` has returned, so the pointer is valid in every
 * callback. To keep it beyond that (another thread writing to it, a table
 * of clients), take one with duplex_conn_ref() in `on_open` and drop it
 * after `on_close`.
 */
typedef struct duplex_listener_opts {
  size_t size;                       /**< sizeof(duplex_listener_opts) */
  const duplex_conn_opts *conn_opts; /**< copied; NULL = defaults */
  duplex_listen_error_cb on_error;   /**< optional */
  void *user;                        /**< passed to on_error */
  int backlog;                       /**< 0 = 511 */
  unsigned flags;                    /**< DUPLEX_LISTEN_* */
  unsigned mode; /**< UNIX socket permission bits (e.g. 0660); 0 = umask */
  /** Serve TLS with this server-role config (each conn holds a reference
   *  while it lives); `on_open` runs once a conn's handshake is done.
   *  NULL = plain. (0.2) */
  duplex_tls *tls;
} duplex_listener_opts;

#define DUPLEX_LISTENER_OPTS_INIT                                            \
  { sizeof(duplex_listener_opts), 0, 0, 0, 0, 0u, 0u, 0 }

/**
 * Fill @p opts with defaults (same as ::DUPLEX_LISTENER_OPTS_INIT).
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1
 */
DUPLEX_API int duplex_listener_opts_init(duplex_listener_opts *opts);

/**
 * Listen on TCP. @p host must be a numeric IPv4/IPv6 address, "localhost"
 * (127.0.0.1), or NULL / "" for every IPv4 address ("::" for every IPv6
 * one). Port 0 picks a free port: read it with duplex_listener_get_port().
 * The socket is bound and listening when this returns (clients can connect
 * at once); the loop starts accepting at its next iteration.
 * @thread   any. The socket is bound on the calling thread: this never
 *           waits for the loop. (Windows: not ported yet, DUPLEX_ENOTSUP.)
 * @owner    @p host, @p opts borrowed for the call. @p *out is a reference
 *           the caller must drop with duplex_listener_unref() (after
 *           duplex_listener_close(), or at any time: the loop keeps its own
 *           while the listener is open). On failure @p *out is NULL.
 * @returns  0, DUPLEX_EINVAL (bad host, NULL out/loop, bad opts),
 *           DUPLEX_EVERSION, DUPLEX_EADDRINUSE, DUPLEX_EACCES, DUPLEX_ENOMEM,
 *           DUPLEX_ECLOSED, or a system code.
 * @since    0.1
 */
DUPLEX_API int duplex_listener_tcp(duplex_listener **out, duplex_loop *loop,
                                   const char *host, uint16_t port,
                                   const duplex_listener_opts *opts);

/**
 * Listen on the UNIX-domain socket @p path. A stale socket file (one nobody
 * listens on) is replaced; a live one gives DUPLEX_EADDRINUSE (also when its
 * backlog is full: the probe never blocks); a path that is not a socket is
 * never removed. The file is removed on close.
 * @thread any (as duplex_listener_tcp(): bound on the calling thread).
 * @owner as duplex_listener_tcp().
 * @returns 0, DUPLEX_EINVAL, DUPLEX_ENAMETOOLONG, DUPLEX_EADDRINUSE,
 *          DUPLEX_EACCES, DUPLEX_ENOMEM, DUPLEX_ECLOSED, or a system code.
 * @since 0.1
 */
DUPLEX_API int duplex_listener_unix(duplex_listener **out, duplex_loop *loop,
                                    const char *path,
                                    const duplex_listener_opts *opts);

/**
 * The bound TCP port (useful after listening on port 0).
 * @thread any (also after close: the port it had). @returns 0,
 *         DUPLEX_EINVAL, DUPLEX_ENOTSUP (UNIX listener). @since 0.1
 */
DUPLEX_API int duplex_listener_get_port(const duplex_listener *listener,
                                        uint16_t *port);

/**
 * The bound address as text ("127.0.0.1:4000", "[::1]:4000" or the path).
 * @thread any (also after close). @owner @p buf borrowed.
 * @returns 0, DUPLEX_EINVAL, DUPLEX_ENOBUFS. @since 0.1
 */
DUPLEX_API int duplex_listener_get_address(const duplex_listener *listener,
                                           char *buf, size_t len);

/**
 * Stop accepting and close the listening socket. No conn is accepted
 * after this returns; conns already accepted are not affected: a TLS conn
 * still in its handshake may call `on_open` (or `on_close`, with the
 * listener's conn_opts user pointer) after this returned. The
 * caller's reference stays valid (drop it with duplex_listener_unref()).
 * @thread any.
 * @returns 0, DUPLEX_EINVAL, DUPLEX_ECLOSED (already closed, or its loop
 *          was freed). @since 0.1
 */
DUPLEX_API int duplex_listener_close(duplex_listener *listener);

/** Take a reference. @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2 */
DUPLEX_API int duplex_listener_ref(duplex_listener *listener);

/** Drop a reference; memory goes with the last one, never while the
 *  listener is open on its loop (the loop holds its own reference then).
 *  @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2 */
DUPLEX_API int duplex_listener_unref(duplex_listener *listener);

/* ---------------------------------------------------------------------- */
/* Signals                                                                 */
/* ---------------------------------------------------------------------- */

/**
 * A POSIX signal delivered to a loop (libuv's signal watcher): the handler
 * itself only records the signal, the callback runs on the loop thread
 * like any other event, so a server stops cleanly on SIGTERM without a
 * thread or pipe of its own. Several watchers (on one or more loops) may
 * watch the same signal: each gets it. The process's previous disposition
 * of the signal returns when the last watcher of it closes. On Windows
 * libuv emulates SIGINT, SIGBREAK, SIGHUP and SIGWINCH only.
 */
typedef struct duplex_signal duplex_signal;

/**
 * A watched signal arrived. Several arrivals before the loop runs may be
 * reported once (signals coalesce).
 * @callback on the loop thread; may close the watcher or free nothing else.
 */
typedef void (*duplex_signal_cb)(duplex_signal *sig, int signum, void *user);

/**
 * Watch @p signum on @p loop. The signal is caught from the moment this
 * returns 0 (its callback runs on the loop, even if it arrived before the
 * loop ran).
 * @thread   any.
 * @blocks   when the loop runs on another thread: until it installed the
 *           watcher (one iteration). On the loop thread or an idle loop it
 *           acts at once.
 * @owner    @p *out is the caller's reference: duplex_signal_close() stops
 *           watching, duplex_signal_unref() drops it. The loop holds its own
 *           while watching. On failure @p *out is NULL.
 * @returns  0, DUPLEX_EINVAL (NULL, no callback, signum out of range,
 *           SIGKILL or SIGSTOP), DUPLEX_ENOMEM, DUPLEX_ECLOSED (loop freed),
 *           or a system code from libuv.
 * @since    0.2
 */
DUPLEX_API int duplex_signal_new(duplex_signal **out, duplex_loop *loop,
                                 int signum, duplex_signal_cb cb, void *user);

/**
 * Stop watching. No callback starts after this returns; off the loop
 * thread, a callback already running finishes first. Freeing the loop
 * closes every watcher on it.
 * @thread   any.
 * @blocks   only while a callback of this watcher is running elsewhere.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_ECLOSED (closed already, or its loop
 *           was freed).
 * @since    0.2
 */
DUPLEX_API int duplex_signal_close(duplex_signal *sig);

/** The signal number watched. @thread any (also after close).
 *  @returns 0, DUPLEX_EINVAL. @since 0.2 */
DUPLEX_API int duplex_signal_get_signum(const duplex_signal *sig,
                                        int *signum);

/** Take a reference. @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2 */
DUPLEX_API int duplex_signal_ref(duplex_signal *sig);

/** Drop a reference; memory goes with the last one (never while the loop
 *  watches with it). @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2 */
DUPLEX_API int duplex_signal_unref(duplex_signal *sig);

/* ---------------------------------------------------------------------- */
/* Loop groups                                                             */
/* ---------------------------------------------------------------------- */

/**
 * N loops, each run by its own library-owned thread: a server that uses
 * every core. The group's loops are ordinary loops (conns, channels,
 * timers, posts work unchanged) that the group starts, stops and frees:
 * duplex_loop_run(), duplex_loop_start() and duplex_loop_free() on one of
 * them return DUPLEX_EBUSY. A conn stays on the loop it was created on for
 * its whole life; every callback of it runs on that loop's thread.
 */
typedef struct duplex_loop_group duplex_loop_group;

/** Pin loop i's thread to the i-th CPU of the process's affinity mask
 *  (wrapping around). Linux only: elsewhere DUPLEX_ENOTSUP. */
#define DUPLEX_GROUP_PIN 0x1u
/** Every flag duplex_group_opts accepts. */
#define DUPLEX_GROUP_FLAGS_ALL 0x1u
/** The most loops one group may have. */
#define DUPLEX_GROUP_MAX_LOOPS 1024u

/** Options for duplex_group_new(). */
typedef struct duplex_group_opts {
  size_t size;     /**< sizeof(duplex_group_opts) as compiled by the caller */
  unsigned loops;  /**< number of loops; 0 = one per CPU the process may
                        run on (its affinity mask) */
  unsigned flags;  /**< DUPLEX_GROUP_* */
  const duplex_loop_opts *loop_opts; /**< for every loop; NULL = defaults */
} duplex_group_opts;

#define DUPLEX_GROUP_OPTS_INIT { sizeof(duplex_group_opts), 0u, 0u, 0 }

/**
 * Fill @p opts with defaults (same as ::DUPLEX_GROUP_OPTS_INIT).
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2
 */
DUPLEX_API int duplex_group_opts_init(duplex_group_opts *opts);

/**
 * Create a group of loops. Its threads start with duplex_group_start();
 * work posted before then waits in the loops' inboxes.
 * @thread   any.
 * @owner    @p opts borrowed for the call. On success @p *out is the
 *           caller's reference: duplex_group_free() ends the group and
 *           drops it. On failure @p *out is NULL and nothing was created.
 * @returns  0, DUPLEX_EINVAL (NULL out, unknown flag, more than
 *           ::DUPLEX_GROUP_MAX_LOOPS), DUPLEX_EVERSION, DUPLEX_ENOTSUP
 *           (DUPLEX_GROUP_PIN off Linux), DUPLEX_ENOMEM, or a code of
 *           duplex_loop_new().
 * @since    0.2
 */
DUPLEX_API int duplex_group_new(duplex_loop_group **out,
                                const duplex_group_opts *opts);

/**
 * Start one thread per loop. Also resumes a group stopped with
 * duplex_group_stop(): work queued meanwhile runs then.
 * @thread   any.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_EBUSY (running already),
 *           DUPLEX_ECLOSED (freed), or a system code (thread creation:
 *           the loops started before the failure are stopped again).
 * @since    0.2
 */
DUPLEX_API int duplex_group_start(duplex_loop_group *group);

/**
 * Stop the group's threads after their current iteration. Nothing closes:
 * conns, timers and queued work stay as they are until duplex_group_start()
 * resumes the loops or duplex_group_free() ends them. Calls on the group's
 * conns keep working (their requests wait in the queues).
 * @thread   any thread that is not one of the group's loops.
 * @blocks   until every thread of the group has returned.
 * @returns  0 (also when not running), DUPLEX_EINVAL, DUPLEX_EDEADLK (on a
 *           loop thread of this group), DUPLEX_ECLOSED (freed).
 * @since    0.2
 */
DUPLEX_API int duplex_group_stop(duplex_loop_group *group);

/**
 * Stop the threads, then free every loop as duplex_loop_free() does (every
 * conn closes with DUPLEX_ECANCELED, every pending write completes, every
 * listener closes; the callbacks run on the calling thread), then drop the
 * caller's reference.
 * @thread   any thread that is not running a loop.
 * @blocks   until the threads returned and every close finished.
 * @owner    @p group is invalid once this returns 0 unless another
 *           reference is held (duplex_group_ref()): calls through it then
 *           return DUPLEX_ECLOSED. Loop pointers taken from the group are
 *           invalid too unless the caller took duplex_loop_ref() on them.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_EDEADLK (called on a loop thread),
 *           DUPLEX_ECLOSED (freed already; no reference is dropped).
 * @since    0.2
 */
DUPLEX_API int duplex_group_free(duplex_loop_group *group);

/** Take a reference on the group's memory (not on its loops).
 *  @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2 */
DUPLEX_API int duplex_group_ref(duplex_loop_group *group);

/** Drop a reference taken with duplex_group_ref(); the last reference of a
 *  group that was not freed is dropped only by duplex_group_free().
 *  @thread any. @returns 0, DUPLEX_EINVAL, DUPLEX_EBUSY. @since 0.2 */
DUPLEX_API int duplex_group_unref(duplex_loop_group *group);

/**
 * The number of loops.
 * @thread any. @returns 0, DUPLEX_EINVAL, DUPLEX_ECLOSED. @since 0.2
 */
DUPLEX_API int duplex_group_get_count(const duplex_loop_group *group,
                                      unsigned *count);

/**
 * Loop number @p index (0 .. count-1).
 * @thread   any.
 * @owner    @p *out is borrowed: valid until duplex_group_free() begins;
 *           take duplex_loop_ref() to keep the pointer longer.
 * @returns  0, DUPLEX_EINVAL (NULL, index out of range), DUPLEX_ECLOSED.
 * @since    0.2
 */
DUPLEX_API int duplex_group_get_loop(const duplex_loop_group *group,
                                     unsigned index, duplex_loop **out);

/**
 * The least-loaded loop: the one with the fewest live conns (see
 * duplex_loop_stats), ties broken round-robin. Use it to place an outgoing
 * conn (duplex_conn_connect_tcp() on the loop it returns). A conn counts
 * from its creation, so picks in a burst spread too.
 * @thread any. @owner as duplex_group_get_loop().
 * @returns 0, DUPLEX_EINVAL, DUPLEX_ECLOSED. @since 0.2
 */
DUPLEX_API int duplex_group_pick(duplex_loop_group *group, duplex_loop **out);

/**
 * The group @p loop belongs to and its index there.
 * @thread   any.
 * @owner    @p group and @p index may each be NULL (not wanted).
 *           @p *group is borrowed, NULL for a loop made by
 *           duplex_loop_new().
 * @returns  0, DUPLEX_EINVAL, DUPLEX_ECLOSED (the loop was freed).
 * @since    0.2
 */
DUPLEX_API int duplex_loop_get_group(const duplex_loop *loop,
                                     duplex_loop_group **group,
                                     unsigned *index);

/**
 * Group listeners: one accepting socket (the default). Loop 0 accepts;
 * each accepted socket is handed to the loop with the fewest live conns,
 * where the conn opens. Works for TCP and UNIX sockets everywhere the
 * single-loop listener works.
 */
#define DUPLEX_LISTEN_BALANCED 0x0u
/**
 * Group listeners: one SO_REUSEPORT socket per loop, each accepting onto
 * its own loop (no hand-off; the kernel spreads clients by a hash of their
 * addresses, so the shares are uneven with few clients). Linux, TCP only:
 * elsewhere DUPLEX_ENOTSUP.
 */
#define DUPLEX_LISTEN_REUSEPORT 0x2u

/**
 * Listen on TCP for the whole group: as duplex_listener_tcp() (same host
 * rules, same options; opts->flags may add DUPLEX_LISTEN_REUSEPORT).
 * Accepted conns open on their target loop with opts->conn_opts; their
 * callbacks and `on_open` run there. `on_error` runs on the loop whose
 * socket or conn failed, with the returned listener. The accept back-off
 * on descriptor exhaustion works per accepting socket.
 * duplex_listener_close() on the returned listener stops every socket;
 * get_port / get_address report the shared address.
 * @thread   any (bound on the calling thread, as duplex_listener_tcp()).
 * @owner    as duplex_listener_tcp().
 * @returns  as duplex_listener_tcp(), and DUPLEX_ENOTSUP (REUSEPORT off
 *           Linux).
 * @since    0.2
 */
DUPLEX_API int duplex_group_listen_tcp(duplex_listener **out,
                                       duplex_loop_group *group,
                                       const char *host, uint16_t port,
                                       const duplex_listener_opts *opts);

/**
 * Listen on a UNIX-domain socket for the whole group (balanced strategy
 * only; DUPLEX_LISTEN_REUSEPORT gives DUPLEX_ENOTSUP). Path rules as
 * duplex_listener_unix().
 * @thread any. @owner as duplex_listener_tcp().
 * @returns as duplex_listener_unix(), and DUPLEX_ENOTSUP. @since 0.2
 */
DUPLEX_API int duplex_group_listen_unix(duplex_listener **out,
                                        duplex_loop_group *group,
                                        const char *path,
                                        const duplex_listener_opts *opts);

/* ---------------------------------------------------------------------- */
/* Channels                                                                */
/* ---------------------------------------------------------------------- */

/** A multi-producer queue whose messages are delivered on the loop thread. */
typedef struct duplex_channel duplex_channel;

/**
 * A message arrived. For a bytes message (duplex_channel_send) @p data is
 * borrowed for the callback. For a pointer message (duplex_channel_send_ptr)
 * ownership of @p data passes to the callback: its release function is not
 * called for a delivered message.
 * @callback loop thread, one message per call, in per-producer send order.
 */
typedef void (*duplex_channel_cb)(duplex_channel *ch, void *data, size_t len,
                                  void *user);

/** The channel finished: @p reason is 0 after duplex_channel_close() (every
 *  queued message was delivered first) or DUPLEX_ECANCELED when its loop was
 *  freed (undelivered pointer messages were released). Last callback. */
typedef void (*duplex_channel_close_cb)(duplex_channel *ch, int reason,
                                        void *user);

/**
 * Options for duplex_channel_new(). Initialise with
 * ::DUPLEX_CHANNEL_OPTS_INIT or duplex_channel_opts_init().
 * Memory: a bytes message of 64 KiB or more is copied into an allocation
 * of its own, freed when `on_message` returns; smaller ones share the
 * channel's buffers, which shrink back to a small working size (about
 * 1 MiB) once delivered. With @ref capacity 0 nothing bounds how much
 * producers may queue.
 */
typedef struct duplex_channel_opts {
  size_t size;                      /**< sizeof(duplex_channel_opts) */
  duplex_channel_cb on_message;     /**< required */
  duplex_channel_close_cb on_close; /**< optional */
  void *user;                       /**< passed to both callbacks */
  size_t capacity; /**< messages queued at most; 0 = unbounded */
  unsigned flags;  /**< reserved, must be 0 */
} duplex_channel_opts;

#define DUPLEX_CHANNEL_OPTS_INIT                                             \
  { sizeof(duplex_channel_opts), 0, 0, 0, 0, 0u }

/**
 * Fill @p opts with ::DUPLEX_CHANNEL_OPTS_INIT.
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1
 */
DUPLEX_API int duplex_channel_opts_init(duplex_channel_opts *opts);

/**
 * Create a channel bound to @p loop.
 * @thread   any.
 * @owner    @p opts borrowed for the call; @p *out is a reference the
 *           caller must duplex_channel_unref() (the loop holds its own until
 *           `on_close` has run). NULL on failure.
 * @returns  0, DUPLEX_EINVAL (NULL, no on_message, flags), DUPLEX_EVERSION,
 *           DUPLEX_ENOMEM, DUPLEX_ECLOSED (loop being freed).
 * @since    0.1
 */
DUPLEX_API int duplex_channel_new(duplex_channel **out, duplex_loop *loop,
                                  const duplex_channel_opts *opts);

/**
 * Send a copy of @p len bytes. When the channel is full: @p timeout_ms 0
 * does not wait (DUPLEX_EWOULDBLOCK, as duplex_conn_wait_writable()), > 0
 * waits at most that long (then DUPLEX_ETIMEDOUT), -1 waits for room.
 * @thread   any; waiting is refused on the loop thread (it would deadlock).
 * @blocks   with @p timeout_ms != 0 on a full channel, until the loop
 *           delivers.
 * @owner    @p data borrowed for the call.
 * @order    messages from one thread are delivered in send order; one wake
 *           of the loop delivers every message queued by then.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_EMSGSIZE (> DUPLEX_WRITE_MAX),
 *           DUPLEX_EWOULDBLOCK (full, timeout 0), DUPLEX_ETIMEDOUT,
 *           DUPLEX_EDEADLK (would wait on the loop thread), DUPLEX_ECLOSED,
 *           DUPLEX_ENOMEM. On any error nothing was queued.
 * @since    0.1
 */
DUPLEX_API int duplex_channel_send(duplex_channel *ch, const void *data,
                                   size_t len, int timeout_ms);

/**
 * Send a pointer: ownership of @p ptr passes to the channel if this returns
 * 0, then to `on_message`; if the message is never delivered (loop freed)
 * @p release(ptr, len, DUPLEX_ECANCELED, user) runs exactly once instead.
 * On error the caller keeps @p ptr and @p release is not called.
 * @thread any (as duplex_channel_send). @returns as duplex_channel_send();
 *          DUPLEX_EINVAL also for a NULL @p ptr (NULL is not a message).
 * @since 0.1
 */
DUPLEX_API int duplex_channel_send_ptr(duplex_channel *ch, void *ptr,
                                       size_t len, duplex_release_cb release,
                                       void *user, int timeout_ms);

/**
 * Stop accepting messages. Messages queued before are still delivered, then
 * `on_close` runs with 0. Senders waiting for room return DUPLEX_ECLOSED.
 * @thread any. @returns 0, DUPLEX_EINVAL, DUPLEX_ECLOSED (already closed).
 * @since 0.1
 */
DUPLEX_API int duplex_channel_close(duplex_channel *ch);

/**
 * Messages queued and not yet delivered.
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1
 */
DUPLEX_API int duplex_channel_get_pending(const duplex_channel *ch,
                                          size_t *out);

/** Take a reference. @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1 */
DUPLEX_API int duplex_channel_ref(duplex_channel *ch);

/** Drop a reference; memory goes with the last one, never before
 *  `on_close` returned. @thread any. @returns 0, DUPLEX_EINVAL. @since 0.1 */
DUPLEX_API int duplex_channel_unref(duplex_channel *ch);

/* ---------------------------------------------------------------------- */
/* Timers                                                                  */
/* ---------------------------------------------------------------------- */

/** A one-shot or repeating timer on a loop. */
typedef struct duplex_timer duplex_timer;

/** The timer expired. @callback loop thread, must not block. */
typedef void (*duplex_timer_cb)(duplex_timer *timer, void *user);

/**
 * Create a stopped timer.
 * @thread   any.
 * @owner    @p *out is a reference the caller must drop with
 *           duplex_timer_unref(); after duplex_timer_close() or the loop's
 *           free, calls through it return DUPLEX_ECLOSED. NULL on failure.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_ENOMEM, DUPLEX_ECLOSED.
 * @since    0.1
 */
DUPLEX_API int duplex_timer_new(duplex_timer **out, duplex_loop *loop,
                                duplex_timer_cb cb, void *user);

/**
 * (Re)start: fire after @p timeout_ms, then every @p repeat_ms (0 = once).
 * Starting a running timer resets it.
 * @thread any; off the loop thread it takes effect at the loop's next
 *         iteration and counts from then.
 * @returns 0, DUPLEX_EINVAL, DUPLEX_ECLOSED. @since 0.1
 */
DUPLEX_API int duplex_timer_start(duplex_timer *timer, uint64_t timeout_ms,
                                  uint64_t repeat_ms);

/**
 * Stop the timer. On the loop thread the callback never runs after this
 * returns; from another thread an expiry the loop is already delivering may
 * still run once.
 * @thread any. @returns 0, DUPLEX_EINVAL, DUPLEX_ECLOSED. @since 0.1
 */
DUPLEX_API int duplex_timer_stop(duplex_timer *timer);

/**
 * Stop the timer for good: its callback never starts after this returns.
 * The caller's reference stays valid (drop it with duplex_timer_unref()).
 * @thread any.
 * @blocks from another thread, while the timer's callback is running on
 *         the loop, until it returns (so do not call this while the loop
 *         thread waits for you).
 * @returns 0, DUPLEX_EINVAL, DUPLEX_ECLOSED (already closed, or its loop
 *          was freed). @since 0.1
 */
DUPLEX_API int duplex_timer_close(duplex_timer *timer);

/** Take a reference. @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2 */
DUPLEX_API int duplex_timer_ref(duplex_timer *timer);

/** Drop a reference; memory goes with the last one, never while the timer
 *  is open (the loop holds its own reference until it is closed or the
 *  loop is freed). @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2 */
DUPLEX_API int duplex_timer_unref(duplex_timer *timer);

/* ---------------------------------------------------------------------- */
/* TLS                                                                     */
/* ---------------------------------------------------------------------- */

/*
 * TLS is a conn option: give a ::duplex_tls to duplex_conn_opts.tls (a
 * client), to duplex_listener_opts.tls (a server), or upgrade a plaintext
 * conn with duplex_conn_start_tls(). Everything else stays as it is:
 * writes from any thread in per-thread order, each write sent as
 * consecutive records with no other write's bytes between them,
 * exactly-once completions, watermarks and the hard limit counted in
 * plaintext bytes, pause (a paused conn stops reading the socket and
 * decrypts nothing more), framing on the decrypted stream, deadlines.
 *
 * The handshake runs on the loop thread, whatever the conn's read wish (a
 * conn opened with DUPLEX_CONN_START_PAUSED completes its handshake, then
 * reads nothing of the decrypted stream until resumed); `on_open` runs
 * after it (a failed
 * handshake closes the conn with DUPLEX_ETLS, DUPLEX_ETLSVERIFY or
 * DUPLEX_ETIMEDOUT and `on_open` never runs). Writes queued before are
 * encrypted after it, in order. duplex_conn_shutdown() sends close_notify
 * after the queued writes, then half-closes the socket; reading goes on.
 * The peer's close_notify is `on_eof`; a transport EOF without it closes
 * the conn with DUPLEX_ETLSTRUNC, never as a clean EOF. A graceful
 * duplex_conn_close() sends close_notify after the queued writes; an abort
 * sends nothing. No renegotiation, no compression. Built without TLS
 * (meson -Dtls=disabled, or no OpenSSL 3), every TLS call returns
 * DUPLEX_ENOTSUP and duplex_tls_backend() returns NULL.
 */

/** duplex_tls_config.role */
#define DUPLEX_TLS_CLIENT 1
#define DUPLEX_TLS_SERVER 2

/** duplex_tls_config.verify: clients verify the server's chain and host
 *  name; servers ask for no client certificate. */
#define DUPLEX_TLS_VERIFY_DEFAULT 0
/** Client: accept any server certificate (testing only). */
#define DUPLEX_TLS_VERIFY_NONE 1
/** Server: mutual TLS, a valid client certificate is required. */
#define DUPLEX_TLS_VERIFY_REQUIRE 2
/** Server: ask for a client certificate; verify it if one is sent. */
#define DUPLEX_TLS_VERIFY_OPTIONAL 3

/** Protocol versions (duplex_tls_config.min_version, duplex_tls_info). */
#define DUPLEX_TLS_V1_2 0x0303
#define DUPLEX_TLS_V1_3 0x0304

/**
 * What a ::duplex_tls is made from. Everything is borrowed for the
 * duplex_tls_new() call (files are read, PEM is parsed then). Zero / NULL
 * means "default" for every field.
 */
typedef struct duplex_tls_config {
  size_t size; /**< sizeof(duplex_tls_config) */
  int role;    /**< DUPLEX_TLS_CLIENT or DUPLEX_TLS_SERVER (required) */
  /** Own certificate chain (leaf first), PEM: a file or memory (len 0:
   *  NUL-terminated). Servers need one; clients for mutual TLS. */
  const char *cert_file;
  const char *cert_pem;
  size_t cert_pem_len;
  /** Its private key, PEM (unencrypted). */
  const char *key_file;
  const char *key_pem;
  size_t key_pem_len;
  /** Trust for verifying the peer: a CA file, a hashed CA directory, CA
   *  certificates in memory, the system store; with none of the first
   *  three, a config that verifies its peer uses the system store. */
  const char *ca_file;
  const char *ca_dir;
  const char *ca_pem;
  size_t ca_pem_len;
  int system_ca; /**< non-zero: also trust the system store */
  int verify;    /**< DUPLEX_TLS_VERIFY_* */
  /** ALPN protocol names in preference order (each 1..255 bytes). A server
   *  picks its first one the client offers, and refuses a client that
   *  offers ALPN without a match. */
  const char *const *alpn;
  size_t alpn_count;
  int min_version; /**< DUPLEX_TLS_V1_2 (default) or DUPLEX_TLS_V1_3 */
  int max_version; /**< 0 = the highest supported */
  /** Client session resumption: sessions kept per server (host:port),
   *  each TLS 1.3 ticket used once. 0 = 64 in all; negative = off. */
  int session_cache;
  /** Opt-in, for debugging: append NSS key-log lines (SSLKEYLOGFILE
   *  format) to this file, created 0600. NULL = off. */
  const char *keylog_file;
  /** Longest a handshake may take (from the socket's open, or from a
   *  duplex_conn_start_tls() reaching its turn) before the conn closes with
   *  DUPLEX_ETIMEDOUT. 0 = 10 s. Always on: a stalled peer cannot hold a
   *  conn for ever. */
  uint32_t handshake_timeout_ms;
} duplex_tls_config;

#define DUPLEX_TLS_CONFIG_INIT                                               \
  { sizeof(duplex_tls_config), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,  \
    0, 0, 0, 0, 0u }

/**
 * Fill @p cfg with defaults (same as ::DUPLEX_TLS_CONFIG_INIT).
 * @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2
 */
DUPLEX_API int duplex_tls_config_init(duplex_tls_config *cfg);

/**
 * Make an immutable TLS configuration from @p cfg, to share between any
 * number of conns and listeners on any loops.
 * @thread   any (it reads files: call it at start-up, not on a loop thread
 *           that serves traffic).
 * @owner    @p cfg borrowed for the call. @p *out receives a reference the
 *           caller drops with duplex_tls_unref() (conns and listeners hold
 *           their own); NULL on failure.
 * @param    err, errlen  optional: why it failed (a file that would not
 *           load, a key that does not match), always NUL-terminated.
 * @returns  0, DUPLEX_EINVAL (bad fields: no role, a server without a
 *           certificate, VERIFY_REQUIRE on a client, ...), DUPLEX_EVERSION,
 *           DUPLEX_ETLSCONFIG (a certificate, key or CA would not load),
 *           DUPLEX_ENOMEM, DUPLEX_ENOTSUP (built without TLS).
 * @since    0.2
 */
DUPLEX_API int duplex_tls_new(duplex_tls **out, const duplex_tls_config *cfg,
                              char *err, size_t errlen);

/** Take a reference. @thread any. @returns 0, DUPLEX_EINVAL. @since 0.2 */
DUPLEX_API int duplex_tls_ref(duplex_tls *tls);

/** Drop a reference; the memory goes with the last one (conns, listeners
 *  and stored sessions hold theirs). @thread any. @returns 0,
 *  DUPLEX_EINVAL. @since 0.2 */
DUPLEX_API int duplex_tls_unref(duplex_tls *tls);

/**
 * The TLS library this build uses, e.g. "OpenSSL 3.0.15 3 Sep 2024", or
 * NULL when built without TLS.
 * @thread any. @owner static; never free it.
 * @returns the name, or NULL. @since 0.2
 */
DUPLEX_API const char *duplex_tls_backend(void);

/**
 * Upgrade a plaintext conn (STARTTLS): once every write queued before this
 * call (by this thread) is flushed, the conn speaks TLS with @p tls in its
 * role, beginning with the handshake. Writes queued after this call are
 * encrypted after the handshake, in order. Bytes the socket delivers from
 * then on are TLS; plaintext read before is not re-read.
 * @thread   any.
 * @owner    @p tls: the conn takes its own reference. @p host (client:
 *           SNI and the name checked; NULL = the host given to
 *           duplex_conn_connect_tcp()) is copied.
 * @returns  0, DUPLEX_EINVAL (NULL conn or tls, a verifying client with no
 *           host), DUPLEX_EBUSY (the conn is TLS already, or an upgrade is
 *           queued), DUPLEX_ESHUTDOWN, DUPLEX_ECLOSED, DUPLEX_ENOMEM,
 *           DUPLEX_ENOTSUP (built without TLS).
 * @callback @p done (optional) runs exactly once: 0 once the handshake is
 *           done, or the error that closed the conn (DUPLEX_ECANCELED if
 *           it closed before the upgrade began).
 * @since    0.2
 */
DUPLEX_API int duplex_conn_start_tls(duplex_conn *conn, duplex_tls *tls,
                                     const char *host, duplex_write_cb done,
                                     void *user);

/** What a TLS conn negotiated (duplex_conn_get_tls_info()). */
typedef struct duplex_tls_info {
  size_t size;         /**< sizeof(duplex_tls_info), set by the caller */
  int version;         /**< DUPLEX_TLS_V1_2 or DUPLEX_TLS_V1_3 */
  char version_name[16]; /**< "TLSv1.3" */
  char cipher[64];     /**< "TLS_AES_256_GCM_SHA384" */
  char alpn[256];      /**< the ALPN protocol, "" if none */
  char sni[256];       /**< server: the name the client asked for */
  char peer_subject[256]; /**< RFC 2253 subject, "" without a certificate */
  int resumed;         /**< 1 when the session was resumed */
  int peer_cert;       /**< 1 when the peer presented a certificate */
} duplex_tls_info;

/**
 * Read what the handshake negotiated (from `on_open` on, or after the
 * start_tls callback).
 * @thread   any.
 * @blocks   off the loop thread, until the loop answers.
 * @owner    @p info borrowed; its size must be set.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_EVERSION, DUPLEX_ENOTSUP (not a TLS
 *           conn), DUPLEX_ENOTCONN (handshake not done), DUPLEX_ECLOSED.
 * @since    0.2
 */
DUPLEX_API int duplex_conn_get_tls_info(const duplex_conn *conn,
                                        duplex_tls_info *info);

/**
 * Why TLS failed on this conn, in the TLS library's words: e.g.
 * "certificate verify failed: certificate has expired (depth 0,
 * CN=localhost)", "alert received: handshake failure", "transport closed
 * without close_notify". "" while nothing failed. Readable in `on_close`
 * and afterwards while the caller holds a reference.
 * @thread   any.
 * @returns  0, DUPLEX_EINVAL, DUPLEX_ENOBUFS (@p len too small; @p buf
 *           holds the truncated text).
 * @since    0.2
 */
DUPLEX_API int duplex_conn_get_tls_error(const duplex_conn *conn, char *buf,
                                         size_t len);

#ifdef __cplusplus
}
#endif

#endif /* DUPLEX_H */
