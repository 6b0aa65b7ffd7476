/* Internal declarations shared by the core sources. Prefix: dpx_. */
#ifndef DPX_INTERNAL_H
#define DPX_INTERNAL_H

#include "duplex.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#define DPX_CONTAINER_OF(ptr, type, member)                                  \
  ((type *)((char *)(ptr)-offsetof(type, member)))

/* ---- errors ---------------------------------------------------------- */

/* Translate a libuv status into a duplex code (identity for known codes). */
int dpx_err(int uv_status);
/* Check a versioned struct: size must cover @p min_size; bytes beyond
 * @p our_size (a newer caller) must be zero. */
int dpx_check_size(const void *p, size_t given, size_t min_size,
                   size_t our_size);
/* A malloc'ed copy of @p s, or NULL. */
char *dpx_strdup(const char *s);

/* ---- ops: the unit of work queued to a loop ---------------------------- */

typedef struct dpx_op dpx_op;
/* status is 0 when run by a live loop, DUPLEX_ECANCELED when the loop is
 * being freed. */
typedef void (*dpx_op_fn)(duplex_loop *loop, dpx_op *op, int status);
struct dpx_op {
  dpx_op *next;
  dpx_op_fn fn;
};

typedef struct dpx_oplist {
  dpx_op *head;
  dpx_op *tail;
} dpx_oplist;

/* Intrusive doubly linked list (loop-thread-only membership lists). */
typedef struct dpx_link {
  struct dpx_link *prev;
  struct dpx_link *next;
} dpx_link;

void dpx_link_init(dpx_link *head);
void dpx_link_insert(dpx_link *head, dpx_link *node);
void dpx_link_remove(dpx_link *node);

/* ---- loop -------------------------------------------------------------- */

enum dpx_loop_state {
  DPX_LOOP_IDLE,    /* nobody runs it */
  DPX_LOOP_RUNNING, /* a thread is inside duplex_loop_run / the own thread */
  DPX_LOOP_EXEC,    /* a caller borrows the idle loop (dpx_loop_exec) */
  DPX_LOOP_FREEING
};

typedef struct dpx_chunk dpx_chunk;

struct duplex_loop {
  atomic_uint refs; /* the creator's (dropped by free) and duplex_loop_ref's */
  uv_loop_t uv;
  uv_async_t wake;
  uv_idle_t idle; /* drives the deferred list */

  uv_mutex_t mu; /* guards everything down to `cv` */
  uv_cond_t cv;  /* state changes and dpx_loop_exec completions */
  dpx_oplist inbox;
  int state;
  bool stop_requested;
  bool quit; /* own thread or running thread must return: being freed */
  bool started;
  bool in_run; /* a thread is inside duplex_loop_run */
  bool freed;  /* duplex_loop_free finished: only the memory is left */
  bool halt;   /* the own thread must return, the loop stays (group stop) */
  unsigned exec_waiters; /* threads waiting in dpx_loop_exec */
  uv_thread_t thread;

  /* loop thread only */
  dpx_oplist deferred;
  bool idle_active;
  bool tearing_down; /* free has begun: queued work is canceled */
  char *rbuf;
  size_t rbuf_size;
  dpx_link conns;
  dpx_link listeners;
  dpx_link channels;
  dpx_link timers;
  dpx_link signals;

  /* Group membership: set when the group makes the loop, then immutable
   * (a freed loop answers ECLOSED before anyone looks at it). */
  duplex_loop_group *group;
  unsigned group_index;
  int cpu; /* pin the own thread to this CPU; -1: no pinning */

  /* Figures (duplex_loop_get_stats): written by whichever thread changes
   * them, read by any; relaxed atomics. Producers bump st_queued on every
   * write, so the padding keeps these lines apart from `mu` and `pool_mu`
   * (no false sharing with the inbox or the chunk pool). */
  char st_pad0[64];
  atomic_size_t st_conns;
  atomic_size_t st_queued;
  atomic_size_t st_accepted;
  char st_pad1[64];

  /* write chunk pool */
  uv_mutex_t pool_mu;
  dpx_chunk *pool;
  unsigned pool_len;
  struct dpx_wstate *wpool; /* idle write states kept for reuse */
  unsigned wpool_len;
};

/* The loop the calling thread runs right now, or NULL. */
#if defined(_MSC_VER)
#define DPX_THREAD_LOCAL __declspec(thread)
#elif defined(__GNUC__) && defined(__ELF__)
/* initial-exec: a plain %fs-relative load on every write instead of a call
 * to __tls_get_addr (one pointer fits the static TLS surplus glibc keeps
 * for libraries loaded with dlopen). */
#define DPX_THREAD_LOCAL _Thread_local __attribute__((tls_model("initial-exec")))
#else
#define DPX_THREAD_LOCAL _Thread_local
#endif
extern DPX_THREAD_LOCAL duplex_loop *dpx_tls_loop;
static inline duplex_loop *
dpx_current_loop(void)
{
  return dpx_tls_loop;
}
static inline bool
dpx_on_loop(const duplex_loop *loop)
{
  return loop != NULL && dpx_current_loop() == loop;
}

/* Start the loop's own thread, bypassing the group check (the group does
 * this for its loops); stop it again and wait until it returned, leaving
 * the loop idle with its work queued; free it. */
int dpx_loop_start(duplex_loop *loop);
void dpx_loop_halt(duplex_loop *loop);
int dpx_loop_free(duplex_loop *loop);

/* Queue @p op to run on the loop thread. On the loop thread it goes to the
 * deferred list (next iteration); elsewhere to the inbox plus one wake-up.
 * With @p new_work, refuses with DUPLEX_ECLOSED once the loop is being
 * freed; otherwise always succeeds (teardown drains the inbox). */
int dpx_loop_submit(duplex_loop *loop, dpx_op *op, bool new_work);
/* Run @p fn(loop, arg) with the loop's uv state to itself: directly on the
 * loop thread or on an idle loop, else on the loop thread while the caller
 * waits. Returns fn's result or DUPLEX_ECLOSED. */
int dpx_loop_exec(duplex_loop *loop, int (*fn)(duplex_loop *, void *),
                  void *arg);

/* Write chunk pool. */
#define DPX_CHUNK_SIZE ((size_t)64 * 1024)
#define DPX_LARGE_WRITE ((size_t)16 * 1024)
struct dpx_chunk {
  dpx_chunk *next;
  size_t used; /* bytes appended */
  size_t done; /* bytes written */
  char data[];
};
dpx_chunk *dpx_chunk_get(duplex_loop *loop);
void dpx_chunk_put(duplex_loop *loop, dpx_chunk *c);

/* ---- conn ------------------------------------------------------------ */

enum dpx_ent_kind {
  DPX_ENT_CHUNK,    /* bytes in a pooled chunk */
  DPX_ENT_OWNED,    /* library-allocated copy, freed when done */
  DPX_ENT_ZC,       /* caller's buffer, released when done */
  DPX_ENT_DONE,     /* completion callback for the write before it */
  DPX_ENT_SHUTDOWN, /* half-close once everything before is written */
  DPX_ENT_CLOSE,    /* graceful close once everything before is written */
  DPX_ENT_STARTTLS  /* begin TLS: orig = duplex_tls (a reference), base =
                       the host (malloc'ed or NULL) */
};

/* One queue entry. A data entry may carry the done callback of the write
 * whose last byte it holds (consecutive copied writes share one entry
 * until one of them wants a callback); DONE is the entry of a zero-length
 * write. @ref cost is what the entry counts in conn->queued. */
typedef struct dpx_ent {
  int kind;
  char *base;   /* bytes still to write (data kinds) */
  size_t len;
  size_t cost;  /* payload + DUPLEX_WRITE_OVERHEAD per write it ends */
  void *orig;   /* ZC / OWNED: what to release or free */
  size_t orig_len;
  duplex_write_cb done;
  duplex_release_cb release;
  void *user;
} dpx_ent;

typedef struct dpx_entvec {
  dpx_ent *v;
  size_t n;
  size_t cap;
} dpx_entvec;

enum dpx_conn_kind {
  DPX_CONN_TCP_CONNECT,
  DPX_CONN_UNIX_CONNECT,
  DPX_CONN_ADOPT,
  DPX_CONN_ADOPT_PAIR,
  DPX_CONN_ACCEPTED
};

/* Producer-visible state (under the conn lock). */
enum dpx_conn_state {
  DPX_CS_OPEN,    /* accepting writes (also while connecting) */
  DPX_CS_CLOSE_QUEUED, /* a graceful close waits behind queued writes */
  DPX_CS_CLOSED   /* closed or aborting: everything refused */
};

#define DPX_EV_BACKPRESSURE 0x1u

typedef struct dpx_waiter {
  struct dpx_waiter *next;
  size_t need; /* wait_room: the cost that must fit; SIZE_MAX: writable */
  uv_cond_t cv;
} dpx_waiter;

typedef struct dpx_connect_state dpx_connect_state;

typedef union dpx_stream {
  uv_handle_t handle;
  uv_stream_t stream;
  uv_tcp_t tcp;
  uv_pipe_t pipe;
  uv_tty_t tty;
} dpx_stream;

/* What a conn is created with: immutable and shared (every conn a listener
 * accepts points at the listener's). */
typedef struct dpx_conn_cfg {
  atomic_uint refs;
  unsigned flags;
  duplex_conn_cbs cbs;
  void *user;
  size_t high, low, hard;
  uint32_t timeout[4];
  duplex_framing framing; /* kind DUPLEX_FRAME_NONE: no framing */
  bool has_local; /* a source address was asked for (TCP connect only) */
  duplex_tls *tls; /* a reference, or NULL: plaintext */
  /* The TLS server name: opts.tls_host, else a TCP connect's host (kept
   * for a later duplex_conn_start_tls too); and the client's session
   * cache key ("host:port"). NULL when not known. */
  char *tls_host;
  char *tls_key;
} dpx_conn_cfg;

/* Validates @p opts (see dpx_conn_opts_get) and copies it. */
int dpx_conn_cfg_new(dpx_conn_cfg **out, const duplex_conn_opts *opts);
void dpx_conn_cfg_unref(dpx_conn_cfg *cfg);

/* The write machinery. Exists while the conn has something queued, in
 * flight or waiting to complete; an idle conn has none. Created under the
 * conn lock by whoever queues first; freed only by the loop thread, under
 * the lock, once everything below is empty. */
typedef struct dpx_wstate {
  struct dpx_wstate *next_free; /* in the loop's pool */
  /* ---- guarded by the conn lock ---- */
  dpx_entvec intake;      /* entries waiting for the next batch */
  dpx_chunk *chunk_head;  /* FIFO of chunks holding copied bytes */
  dpx_chunk *chunk_tail;
  dpx_waiter *waiters;    /* threads in duplex_conn_wait_writable/_room */
  /* ---- loop thread only ---- */
  dpx_entvec batch;     /* entries being written */
  dpx_entvec completed; /* direct writes already on the wire */
  dpx_entvec cancelled; /* intake taken at close, completed after */
  size_t bpos;   /* first data entry of the batch not wholly written */
  size_t boff;   /* bytes of it already written */
  size_t wpiece; /* bytes the uv_write in flight carries */
  size_t tls_sent; /* TLS: entries before this one are on the wire */
  uv_buf_t *bufs;
  size_t bufs_cap;
  uv_write_t wreq;
  uv_shutdown_t sreq;
  dpx_ent shut_ent; /* the SHUTDOWN entry being carried out */
  bool shut_pending;
  bool close_after_shut;
} dpx_wstate;

/* Rarely needed state: opening (connect, adopted fds), deadlines, the peer
 * name once asked for, frames held while paused. Created on demand under
 * the conn lock (any thread) and published with release order; lives until
 * the conn is freed. */
typedef struct dpx_conn_extra {
  /* ---- guarded by the conn lock ---- */
  char *peer; /* cached answer of duplex_conn_get_peer; NULL: not read yet */
  uint32_t timeout_req[4]; /* deadlines asked for, applied by the pump */
  bool timeouts_dirty;
  char *tls_reason; /* why TLS failed (duplex_conn_get_tls_error) */
  /* ---- loop thread only ---- */
  struct dpx_conn_tls *tls; /* the TLS state once TLS began (conn_tls.c) */
  dpx_op open_op; /* creation request (not for accepted conns) */
  duplex_conn *conn;
  dpx_connect_state *connecting;
  int fd_in, fd_out; /* adopted fds until opened */
  bool lookup_pending;
  bool stamped; /* t_read / t_write hold real times */
  uint32_t timeout[4];
  uv_timer_t *deadline; /* one lazily created timer for the nearest */
  uint64_t deadline_due;
  uint64_t t_start, t_read, t_write;
  uint64_t t_linger; /* a lingering close began */
  struct dpx_framer *framer; /* framing state; set at creation */
  char *held; /* frames decoded while paused: [size_t len][bytes]... */
  size_t held_len, held_off, held_cap;
} dpx_conn_extra;

/* An idle accepted conn is this struct plus its libuv handle in one
 * allocation: the write machinery, deadlines and framing state are
 * allocated only while used, and the lock is one of a fixed set shared by
 * address (dpx_conn_mu): ~370 bytes of RSS per idle accepted TCP conn
 * (bench/run, idle memory). */
struct duplex_conn {
  atomic_uint refs;
  uint8_t kind;    /* enum dpx_conn_kind, immutable */
  uint8_t nhandles;
  /* ---- guarded by the conn lock ---- */
  uint16_t state : 2; /* enum dpx_conn_state */
  uint16_t shut_requested : 1; /* a SHUTDOWN entry was queued */
  uint16_t abort_requested : 1;
  uint16_t scheduled : 1; /* a pump is guaranteed without another wake-up */
  uint16_t op_queued : 1; /* conn->op sits in the inbox or deferred list */
  uint16_t want_read : 1;
  uint16_t congested : 1;
  uint16_t refused : 1; /* a write was refused since the last drain */
  uint16_t events : 2; /* DPX_EV_* waiting for the loop */
  uint16_t tls_asked : 1; /* TLS configured or a STARTTLS queued */
  uint16_t starttls_queued : 1; /* a STARTTLS entry waits in the intake */
  uint16_t : 0;
  /* ---- loop thread only ---- */
  uint16_t opened : 1;
  uint16_t writing : 1; /* a batch is in flight */
  uint16_t shut_done : 1;
  uint16_t close_begun : 1; /* handles closing or gone; on_close follows */
  uint16_t pumping : 1; /* inside dpx_conn_pump */
  uint16_t pump_again : 1; /* asked for a pass while pumping */
  uint16_t in_list : 1;
  uint16_t has_rd : 1; /* the first handle is initialised */
  uint16_t wr_gone : 1; /* an adopted pair's write handle is closed */
  uint16_t handles_open : 3;
  uint16_t tls_on : 1;   /* the conn speaks TLS (engine attached) */
  uint16_t tls_wait : 1; /* its handshake runs: writes and on_open wait */
  uint16_t lingering : 1; /* closing: reading (and discarding) until the
                             peer ends, so unread data causes no reset */
  uint16_t : 0;
  /* ---- loop thread only: the read side (conn_read.c) ---- */
  uint16_t rd_want : 1;     /* the read wish the loop acts on */
  uint16_t reading : 1;     /* uv_read_start is in effect */
  uint16_t rd_ended : 1;    /* no more bytes will come (EOF, no read side) */
  uint16_t eof_pending : 1; /* the EOF event waits behind held frames */
  uint16_t eof_proto : 1;   /* ... and is a partial frame (EPROTO) */
  uint16_t rd_cut : 1;      /* no read callback may run any more */
  /* Conn lock: an abort's reason until the close begins, then the close's
   * (first reason wins); only the loop thread reads it after that. */
  int reason;
  _Atomic(void *) user;
  duplex_loop *loop;  /* conn lock; NULL once closed for good */
  dpx_conn_cfg *cfg;  /* immutable */
  size_t queued;      /* conn lock: accepted, not yet completed */
  _Atomic(dpx_wstate *) w;
  _Atomic(dpx_conn_extra *) x;
  dpx_op op;      /* pump request (inbox or deferred) */
  dpx_link link;  /* loop thread: in loop->conns once opening */
  uint64_t hs[];  /* the handle(s): exact size, or two dpx_streams */
};

/* The lock guarding the conn's shared fields: one of a fixed set, picked
 * by address. Never hold two conn locks at once. */
#define DPX_CONN_LOCKS 256
extern uv_mutex_t dpx_conn_locks[DPX_CONN_LOCKS];
/* Initialise the lock set once (duplex_loop_new; every conn has a loop). */
void dpx_conn_locks_ensure(void);
/* The lock of the set that guards the object at @p p (conns, listeners). */
static inline uv_mutex_t *
dpx_addr_mu(const void *p)
{
  uint64_t h = (uint64_t)((uintptr_t)p >> 4);
  h ^= h >> 9;
  h *= UINT64_C(0x9E3779B97F4A7C15);
  return &dpx_conn_locks[(h >> 24) % DPX_CONN_LOCKS];
}
static inline uv_mutex_t *
dpx_conn_mu(const duplex_conn *c)
{
  return dpx_addr_mu(c);
}
static inline void dpx_conn_lock(const duplex_conn *c) { uv_mutex_lock(dpx_conn_mu(c)); }
static inline void dpx_conn_unlock(const duplex_conn *c) { uv_mutex_unlock(dpx_conn_mu(c)); }

static inline dpx_wstate *
dpx_conn_w(const duplex_conn *c)
{
  return atomic_load_explicit(&((duplex_conn *)c)->w, memory_order_acquire);
}
/* Under the lock: the write state, created if needed (NULL: no memory). */
dpx_wstate *dpx_conn_w_get_locked(duplex_conn *c);
/* Loop thread, under the lock: free the write state if nothing uses it. */
void dpx_conn_w_trim_locked(duplex_conn *c);

static inline dpx_conn_extra *
dpx_conn_x(const duplex_conn *c)
{
  return atomic_load_explicit(&((duplex_conn *)c)->x, memory_order_acquire);
}
/* Under the lock: the extra state, created if needed (NULL: no memory). */
dpx_conn_extra *dpx_conn_x_get_locked(duplex_conn *c);
/* Any thread, not under the lock. */
dpx_conn_extra *dpx_conn_x_get(duplex_conn *c);

/* The read handle (NULL before it exists) and the write handle (NULL once
 * an adopted pair's write side is closed). */
static inline dpx_stream *
dpx_conn_rd(const duplex_conn *c)
{
  return c->has_rd ? (dpx_stream *)(void *)((duplex_conn *)c)->hs : NULL;
}
static inline dpx_stream *
dpx_conn_handle(const duplex_conn *c, unsigned i)
{
  return (dpx_stream *)(void *)((char *)((duplex_conn *)c)->hs +
                                i * sizeof(dpx_stream));
}
static inline dpx_stream *
dpx_conn_wr(const duplex_conn *c)
{
  if (c->nhandles == 2)
    return c->wr_gone ? NULL : dpx_conn_handle(c, 1);
  return dpx_conn_rd(c);
}

/* Under the conn lock: change conn->queued, keeping the loop's figure. */
static inline void
dpx_conn_queued_add_locked(duplex_conn *c, size_t n)
{
  c->queued += n;
  atomic_fetch_add_explicit(&c->loop->st_queued, n, memory_order_relaxed);
}
static inline void
dpx_conn_queued_sub_locked(duplex_conn *c, size_t n)
{
  c->queued -= n;
  if (c->loop != NULL)
    atomic_fetch_sub_explicit(&c->loop->st_queued, n, memory_order_relaxed);
}

/* A conn holding a reference on @p cfg, with room for one handle of
 * @p handle_size bytes, or two dpx_streams when @p nhandles is 2. */
duplex_conn *dpx_conn_new(duplex_loop *loop, int kind, dpx_conn_cfg *cfg,
                          unsigned nhandles, size_t handle_size);
/* Check @p opts (NULL: defaults) and widen it into @p out: fields an older,
 * shorter caller struct lacks read as their defaults. */
int dpx_conn_opts_get(duplex_conn_opts *out, const duplex_conn_opts *opts);
void dpx_conn_free(duplex_conn *conn);
/* Deadlines (conn_deadline.c, loop thread): re-arm for the nearest one
 * after an event made a deadline relevant (open start, resume, first
 * pending write); stamps of the last byte read / written; reading began;
 * new timeouts from duplex_conn_set_timeout. */
void dpx_conn_deadline_touch(duplex_conn *conn);
/* Let the timer go when no deadline applies (it is made again when one
 * does). */
void dpx_conn_deadline_release(duplex_conn *conn);
void dpx_conn_stamp_read(duplex_conn *conn);
void dpx_conn_stamp_write(duplex_conn *conn);
void dpx_conn_deadline_read_started(duplex_conn *conn);
void dpx_conn_deadline_retime(duplex_conn *conn);
/* The read side (conn_read.c, loop thread). */
void dpx_conn_read_stop(duplex_conn *conn);
/* Start reading the socket (no callback runs in here). */
void dpx_conn_read_start(duplex_conn *conn);
/* Bytes read (or decrypted): through framing to on_read, as one batch. */
void dpx_conn_deliver(duplex_conn *conn, const char *data, size_t len);
/* The peer's clean end of data, in delivery order after held frames. */
void dpx_conn_deliver_eof(duplex_conn *conn);
/* No read callback runs after this (abort, close). */
void dpx_conn_read_cut(duplex_conn *conn);
bool dpx_conn_has_held(const duplex_conn *conn);
/* Whether the pump has read-side work for the wish @p want. */
bool dpx_conn_read_pending(const duplex_conn *conn, bool want);
/* Act on @p want. With @p deliver, held frames and a held EOF are
 * delivered (the pump); without, returns true if they wait for a pass. */
bool dpx_conn_read_apply(duplex_conn *conn, bool want, bool deliver);
/* Close a stream handle (RST for TCP with @p reset); an adopted fd 0-2 is
 * released too, which libuv would leave open. */
void dpx_stream_close(dpx_stream *s, bool reset, uv_close_cb cb);
/* A handle of the conn finished closing (loop thread). */
void dpx_conn_handle_closed(duplex_conn *conn);
/* Called on the loop thread once the handle(s) are connected. */
void dpx_conn_opened(duplex_conn *conn);
/* Start closing on the loop thread with @p reason (first reason wins). */
void dpx_conn_begin_close(duplex_conn *conn, int reason);
/* Close a conn whose handles never existed. */
void dpx_conn_fail_unopened(duplex_conn *conn, int reason);
/* Run the conn's state machine on the loop thread. */
void dpx_conn_pump(duplex_conn *conn);
void dpx_conn_pump_op(duplex_loop *loop, dpx_op *op, int status);
/* Under the conn lock: make sure a pump will run. */
void dpx_conn_schedule_locked(duplex_conn *conn, bool force);
/* Under the conn lock: mark closed, wake waiters, move intake to `cancelled`. */
void dpx_conn_mark_closed_locked(duplex_conn *conn);
/* Loop thread: complete entries of @p v with @p status, in order. */
/* Entries before @p ok_before complete with 0, the rest with @p status. */
void dpx_conn_complete(duplex_conn *conn, dpx_entvec *v, size_t ok_before,
                       int status);
void dpx_conn_release_chunks_locked(duplex_conn *conn);
/* Loop free: drop the pooled write states. */
void dpx_wstate_pool_free(duplex_loop *loop);
void dpx_conn_wake_waiters_locked(duplex_conn *conn);
void dpx_conn_batch_start(duplex_conn *conn);
/* Continue a batch that waited for TLS output to drain. */
void dpx_conn_batch_resume(duplex_conn *conn);
/* Run @p fn on the conn's loop (dpx_loop_exec); DUPLEX_ECLOSED once the
 * conn finished. */
int dpx_conn_exec(duplex_conn *conn, int (*fn)(duplex_loop *, void *),
                  void *arg);
/* Start a uv_shutdown / close of the write side for the SHUTDOWN entry. */
void dpx_conn_start_shutdown(duplex_conn *conn);
int dpx_entvec_grow(dpx_entvec *v, size_t extra);
static inline int
dpx_entvec_reserve(dpx_entvec *v, size_t extra)
{
  return v->cap - v->n >= extra ? 0 : dpx_entvec_grow(v, extra);
}
void dpx_entvec_free(dpx_entvec *v);

/* ---- TLS on conns (conn_tls.c; loop thread unless said) ---------------- */

typedef struct dpx_conn_tls dpx_conn_tls;
/* Any thread: whether @p tls (NULL: fine) may serve @p role, with a host
 * name known or not. DUPLEX_ENOTSUP when built without TLS. */
int dpx_tls_check_use(const duplex_tls *tls, int role, bool have_host);
/* Begin TLS on an open socket: the handshake starts, writes and on_open
 * (or @p done, for STARTTLS) wait for it. @p host, @p key borrowed. */
void dpx_conn_tls_begin(duplex_conn *conn, duplex_tls *tls, const char *host,
                        const char *key, duplex_write_cb done, void *user);
/* Bytes the socket delivered to a TLS conn / its EOF (from on_read). */
void dpx_conn_tls_input(duplex_conn *conn, const char *data, size_t len);
void dpx_conn_tls_input_eof(duplex_conn *conn);
/* Paused with input left to decrypt / reading stopped until the output
 * drains. */
bool dpx_conn_tls_rd_more(const duplex_conn *conn);
bool dpx_conn_tls_read_blocked(const duplex_conn *conn);
/* Decrypt and deliver what waits (after a resume). */
void dpx_conn_tls_drain(duplex_conn *conn);
/* Encrypt a prefix of @p data (*taken bytes): 0 or an error. */
int dpx_conn_tls_encrypt(duplex_conn *conn, const void *data, size_t len,
                         size_t *taken);
/* Send pending ciphertext: 1 when all is on the wire, 0 while a write is
 * in flight (its completion continues), or an error. */
int dpx_conn_tls_flush(duplex_conn *conn);
/* Inside the delivery of decrypted bytes: a write made there may leave
 * its records for the send that follows the delivery. */
bool dpx_conn_tls_defer_flush(const duplex_conn *conn);
/* The batch waits for the flush in flight. */
void dpx_conn_tls_wait_flush(duplex_conn *conn);
/* Queue and send close_notify: as dpx_conn_tls_flush; on 0 the flush's
 * completion starts the transport half-close. */
int dpx_conn_tls_close_notify(duplex_conn *conn);
/* A graceful close should send close_notify first. */
bool dpx_conn_tls_close_notify_due(const duplex_conn *conn);
/* A graceful close has sent close_notify and FIN: read and discard until
 * the peer ends (or DPX_TLS_LINGER_MS), then close with 0. False when
 * there is nothing to wait for. */
bool dpx_conn_tls_linger(duplex_conn *conn);
#define DPX_TLS_LINGER_MS 5000u
/* The handshake deadline (loop time), or 0; it expired. */
uint64_t dpx_conn_tls_hs_due(const duplex_conn *conn);
void dpx_conn_tls_timed_out(duplex_conn *conn);
/* The conn finished: a STARTTLS waiting for its handshake is told. */
void dpx_conn_tls_finish(duplex_conn *conn);
/* Free the TLS state (any thread, once nothing uses it). */
void dpx_conn_tls_free(dpx_conn_extra *x);
/* Fill @p info (loop thread). */
int dpx_conn_tls_info_fill(duplex_conn *conn, duplex_tls_info *info);

/* connect.c: the creation op for every conn kind. */
void dpx_conn_open_op(duplex_loop *loop, dpx_op *op, int status);
void dpx_connect_state_free(dpx_connect_state *cs);
/* A close began before the conn's handle existed (loop thread): let go
 * of a lookup in flight. True when the caller should finish the close. */
bool dpx_connect_cancel(duplex_conn *conn);
/* Fill conn->peer from the connected handle. */
void dpx_conn_set_peer(duplex_conn *conn);

/* group.c: the loop with the fewest live conns (round-robin on ties); the
 * group's size, its loop @p index, whether duplex_group_free has begun. */
duplex_loop *dpx_group_pick(duplex_loop_group *group);
unsigned dpx_group_count(const duplex_loop_group *group);
duplex_loop *dpx_group_loop(const duplex_loop_group *group, unsigned index);
bool dpx_group_closed(const duplex_loop_group *group);

/* listener.c, channel.c, timer.c: teardown */
void dpx_listener_close_all(duplex_loop *loop);
void dpx_channel_cancel_all(duplex_loop *loop);
void dpx_timer_close_all(duplex_loop *loop);
void dpx_signal_close_all(duplex_loop *loop);

/* Format a socket address as "1.2.3.4:80" / "[::1]:80". */
int dpx_format_addr(const struct sockaddr *sa, char *buf, size_t len);

/* ---- standard descriptors (stdfd.c) ----------------------------------- */

/* Open /dev/null on any of fds 0-2 that is closed, so no socket the library
 * or libuv creates gets one of those numbers (libuv never closes them). */
void dpx_stdio_ensure_open(void);
/* Whether @p fd is 0, 1 or 2 (which libuv leaves open on close). */
static inline bool
dpx_is_stdio_fd(int fd)
{
  return fd >= 0 && fd <= 2;
}
/* After libuv "closed" a handle on stdio fd @p fd: release what it refers
 * to by putting /dev/null in its place (the number stays taken). */
void dpx_stdio_release(int fd);

/* ---- signals (sigpipe.c) --------------------------------------------- */

typedef struct dpx_sigstate {
  unsigned char opaque[272];
  bool active;
} dpx_sigstate;
/* Block SIGPIPE for the calling thread only, remembering the old mask. */
void dpx_sigpipe_block(dpx_sigstate *st);
/* Consume a SIGPIPE our writes left pending, then restore the mask. */
void dpx_sigpipe_restore(dpx_sigstate *st);
/* For threads the library owns: block every asynchronous signal. */
void dpx_thread_block_signals(void);

#endif /* DPX_INTERNAL_H */
