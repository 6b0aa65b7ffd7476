/* Loop groups: N loops, each run by its own thread, made, started, stopped
 * and freed together. Listening for a whole group lives in listener.c. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#endif
#include "internal.h"

#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sched.h>
#endif

/* References: the creator's (dropped by duplex_group_free) and
 * duplex_group_ref's. The loops hold none: the group outlives them. */
struct duplex_loop_group {
  atomic_uint refs;
  atomic_bool closed; /* duplex_group_free has begun */
  atomic_uint next;   /* round-robin start of duplex_group_pick */
  uv_mutex_t mu;      /* serialises start, stop and free */
  atomic_bool freed;  /* duplex_group_free finished: only the memory is left */
  bool running;       /* under mu */
  unsigned count;
  duplex_loop *loops[];
};

int
duplex_group_opts_init(duplex_group_opts *opts)
{
  if (opts == NULL)
    return DUPLEX_EINVAL;
  const duplex_group_opts def = DUPLEX_GROUP_OPTS_INIT;
  *opts = def;
  return 0;
}

/* The CPUs the process may run on: fills @p cpus (up to @p max) and
 * returns how many there are (at least 1). */
static unsigned
allowed_cpus(int *cpus, unsigned max)
{
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    unsigned n = 0;
    for (int i = 0; i < CPU_SETSIZE && n < max; i++)
      if (CPU_ISSET(i, &set))
        cpus[n++] = i;
    if (n > 0)
      return n;
  }
#endif
  unsigned n = uv_available_parallelism();
  n = n > 0 ? n : 1u;
  n = n < max ? n : max;
  for (unsigned i = 0; i < n; i++)
    cpus[i] = (int)i;
  return n;
}

static void
group_release(duplex_loop_group *g)
{
  uv_mutex_destroy(&g->mu);
  free(g);
}

int
duplex_group_new(duplex_loop_group **out, const duplex_group_opts *opts)
{
  if (out == NULL)
    return DUPLEX_EINVAL;
  *out = NULL;
  duplex_group_opts o = DUPLEX_GROUP_OPTS_INIT;
  if (opts != NULL) {
    int r = dpx_check_size(opts, opts->size, sizeof(duplex_group_opts),
                           sizeof(duplex_group_opts));
    if (r != 0)
      return r;
    o = *opts;
  }
  if ((o.flags & ~DUPLEX_GROUP_FLAGS_ALL) != 0 ||
      o.loops > DUPLEX_GROUP_MAX_LOOPS)
    return DUPLEX_EINVAL;
#if !defined(__linux__)
  if (o.flags & DUPLEX_GROUP_PIN)
    return DUPLEX_ENOTSUP;
#endif
  int *cpus = malloc(DUPLEX_GROUP_MAX_LOOPS * sizeof *cpus);
  if (cpus == NULL)
    return DUPLEX_ENOMEM;
  unsigned ncpus = allowed_cpus(cpus, DUPLEX_GROUP_MAX_LOOPS);
  unsigned n = o.loops != 0 ? o.loops : ncpus;
  duplex_loop_group *g = calloc(1, sizeof *g + n * sizeof g->loops[0]);
  if (g == NULL || uv_mutex_init(&g->mu) != 0) {
    free(g);
    free(cpus);
    return DUPLEX_ENOMEM;
  }
  atomic_init(&g->refs, 1u);
  atomic_init(&g->closed, false);
  atomic_init(&g->freed, false);
  atomic_init(&g->next, 0u);
  int r = 0;
  for (; g->count < n; g->count++) {
    duplex_loop *loop;
    r = duplex_loop_new(&loop, o.loop_opts);
    if (r != 0)
      break;
    /* Before anyone else can see the loop: immutable from here. */
    loop->group = g;
    loop->group_index = g->count;
    loop->cpu = (o.flags & DUPLEX_GROUP_PIN) ? cpus[g->count % ncpus] : -1;
    g->loops[g->count] = loop;
  }
  free(cpus);
  if (r != 0) {
    for (unsigned i = 0; i < g->count; i++)
      dpx_loop_free(g->loops[i]);
    group_release(g);
    return r;
  }
  *out = g;
  return 0;
}

int
duplex_group_start(duplex_loop_group *g)
{
  if (g == NULL)
    return DUPLEX_EINVAL;
  if (atomic_load(&g->closed))
    return DUPLEX_ECLOSED;
  uv_mutex_lock(&g->mu);
  int r = 0;
  if (atomic_load(&g->closed))
    r = DUPLEX_ECLOSED;
  else if (g->running)
    r = DUPLEX_EBUSY;
  for (unsigned i = 0; r == 0 && i < g->count; i++) {
    r = dpx_loop_start(g->loops[i]);
    if (r != 0) {
      while (i-- > 0)
        dpx_loop_halt(g->loops[i]);
    }
  }
  if (r == 0)
    g->running = true;
  uv_mutex_unlock(&g->mu);
  return r;
}

/* Whether the calling thread runs one of the group's loops. */
static bool
on_group_thread(const duplex_loop_group *g)
{
  duplex_loop *cur = dpx_current_loop();
  return cur != NULL && cur->group == g;
}

int
duplex_group_stop(duplex_loop_group *g)
{
  if (g == NULL)
    return DUPLEX_EINVAL;
  if (on_group_thread(g))
    return DUPLEX_EDEADLK;
  if (atomic_load(&g->closed))
    return DUPLEX_ECLOSED;
  uv_mutex_lock(&g->mu);
  int r = 0;
  if (atomic_load(&g->closed)) {
    r = DUPLEX_ECLOSED;
  } else if (g->running) {
    for (unsigned i = 0; i < g->count; i++)
      dpx_loop_halt(g->loops[i]);
    g->running = false;
  }
  uv_mutex_unlock(&g->mu);
  return r;
}

int
duplex_group_free(duplex_loop_group *g)
{
  if (g == NULL)
    return DUPLEX_EINVAL;
  if (dpx_current_loop() != NULL)
    return DUPLEX_EDEADLK;
  uv_mutex_lock(&g->mu);
  if (atomic_exchange(&g->closed, true)) {
    uv_mutex_unlock(&g->mu);
    return DUPLEX_ECLOSED;
  }
  /* Every thread first, so no loop hands work to one already freed. */
  for (unsigned i = 0; i < g->count; i++)
    dpx_loop_halt(g->loops[i]);
  g->running = false;
  for (unsigned i = 0; i < g->count; i++)
    dpx_loop_free(g->loops[i]);
  atomic_store(&g->freed, true);
  uv_mutex_unlock(&g->mu);
  if (atomic_fetch_sub_explicit(&g->refs, 1u, memory_order_acq_rel) == 1u)
    group_release(g);
  return 0;
}

int
duplex_group_ref(duplex_loop_group *g)
{
  if (g == NULL)
    return DUPLEX_EINVAL;
  atomic_fetch_add_explicit(&g->refs, 1u, memory_order_relaxed);
  return 0;
}

int
duplex_group_unref(duplex_loop_group *g)
{
  if (g == NULL)
    return DUPLEX_EINVAL;
  unsigned n = atomic_load_explicit(&g->refs, memory_order_relaxed);
  do {
    if (n == 1u && !atomic_load(&g->freed))
      return DUPLEX_EBUSY; /* only duplex_group_free drops the last */
  } while (!atomic_compare_exchange_weak_explicit(
      &g->refs, &n, n - 1u, memory_order_acq_rel, memory_order_relaxed));
  if (n == 1u)
    group_release(g);
  return 0;
}

int
duplex_group_get_count(const duplex_loop_group *g, unsigned *count)
{
  if (g == NULL || count == NULL)
    return DUPLEX_EINVAL;
  if (atomic_load(&((duplex_loop_group *)g)->closed))
    return DUPLEX_ECLOSED;
  *count = g->count;
  return 0;
}

int
duplex_group_get_loop(const duplex_loop_group *g, unsigned index,
                      duplex_loop **out)
{
  if (out != NULL)
    *out = NULL;
  if (g == NULL || out == NULL)
    return DUPLEX_EINVAL;
  if (atomic_load(&((duplex_loop_group *)g)->closed))
    return DUPLEX_ECLOSED;
  if (index >= g->count)
    return DUPLEX_EINVAL;
  *out = g->loops[index];
  return 0;
}

duplex_loop *
dpx_group_pick(duplex_loop_group *g)
{
  unsigned start = atomic_fetch_add_explicit(&g->next, 1u,
                                             memory_order_relaxed) % g->count;
  duplex_loop *best = NULL;
  size_t best_conns = 0;
  for (unsigned k = 0; k < g->count; k++) {
    duplex_loop *loop = g->loops[(start + k) % g->count];
    size_t n = atomic_load_explicit(&loop->st_conns, memory_order_relaxed);
    if (best == NULL || n < best_conns) {
      best = loop;
      best_conns = n;
    }
  }
  return best;
}

int
duplex_group_pick(duplex_loop_group *g, duplex_loop **out)
{
  if (out != NULL)
    *out = NULL;
  if (g == NULL || out == NULL)
    return DUPLEX_EINVAL;
  if (atomic_load(&g->closed))
    return DUPLEX_ECLOSED;
  *out = dpx_group_pick(g);
  return 0;
}

unsigned
dpx_group_count(const duplex_loop_group *g)
{
  return g->count;
}

duplex_loop *
dpx_group_loop(const duplex_loop_group *g, unsigned index)
{
  return g->loops[index];
}

bool
dpx_group_closed(const duplex_loop_group *g)
{
  return atomic_load(&((duplex_loop_group *)g)->closed);
}
