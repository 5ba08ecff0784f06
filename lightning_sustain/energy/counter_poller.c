/*
 * counter_poller.c: polls NVML's total-energy counter in a native thread.
 *
 * Built on first use by lightning_sustain.energy.native (system C compiler, cached) and
 * loaded with ctypes. Python's sampler thread holds the GIL between its polls, so when the
 * training thread runs pure Python a Python poller wakes late and stamps a counter update
 * tens of milliseconds off. This thread never touches Python: it calls
 * nvmlDeviceGetTotalEnergyConsumption from the libnvidia-ml.so.1 that pynvml loaded (the
 * caller passes that function's address; lsp_start also checks it against dlsym of the
 * library pynvml opened), and records every change of the counter with the monotonic
 * times of the poll that saw it and of the poll before. Python drains the ring buffer
 * (ctypes releases the GIL for the call).
 *
 * Polling: every interval_s until the counter's update period is known; then it sleeps
 * until a guard before the next expected update and polls every interval_s until the
 * update comes, so each update is stamped within interval_s / 2. The guard adapts: it
 * starts at a tenth of the period, shrinks towards guard_s while updates come after the
 * first poll of a window (a hit), and doubles, up to a tenth of the period (the former
 * fixed guard), when the first poll already sees the update (a miss: the wake-up came
 * late or the period drifted). A regular counter then costs guard_s / interval_s + 1
 * polls per update. Wake-ups that only check for stop (every 50 ms) do not call NVML.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LSP_EXPORT __attribute__((visibility("default")))

typedef int (*energy_fn_t)(void *device, unsigned long long *energy_mj);

typedef struct {
    double t_prev_s; /* time of the previous poll (< 0: this is the first reading) */
    double t_s;      /* time of the poll that saw this value */
    unsigned long long energy_mj;
} lsp_record_t;

typedef struct {
    pthread_t thread;
    energy_fn_t fn;
    void *device;
    double interval_s;
    double guard_s;
    lsp_record_t *ring;
    uint64_t capacity;
    volatile uint64_t head; /* written by the poller only */
    volatile uint64_t tail; /* written by the reader only */
    volatile int stop;
    volatile int error;     /* NVML return code that stopped polling, 0 while healthy */
    volatile uint64_t polls;
    volatile uint64_t dropped;
    volatile double cpu_s;
    int started;
} lsp_poller_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double thread_cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_until(double t) {
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec += 1; ts.tv_nsec -= 1000000000L; }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
}

static void push(lsp_poller_t *p, double t_prev, double t, unsigned long long mj) {
    uint64_t head = p->head;
    if (head - p->tail >= p->capacity) { /* reader far behind: drop the oldest */
        p->dropped++;
        return;
    }
    lsp_record_t *r = &p->ring[head % p->capacity];
    r->t_prev_s = t_prev;
    r->t_s = t;
    r->energy_mj = mj;
    __sync_synchronize();
    p->head = head + 1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void *run(void *arg) {
    lsp_poller_t *p = (lsp_poller_t *)arg;
    unsigned long long last = 0, value = 0;
    double last_poll = -1.0, last_change = -1.0;
    double periods[9];
    int n_periods = 0, next_period = 0;
    int have_value = 0;
    double guard = -1.0;    /* adaptive guard (s); < 0 until the period is known */
    double period_est = -1; /* median update period (s); < 0 until known */
    int window_polls = 0;   /* polls since the last change (0: next poll opens a window) */
    double next = now_s();
    while (!p->stop) {
        int rc = p->fn(p->device, &value);
        double t = now_s();
        p->polls++;
        if (rc != 0) {
            p->error = rc;
            break;
        }
        window_polls++;
        if (!have_value) {
            push(p, -1.0, t, value);
            have_value = 1;
        } else if (value != last) {
            push(p, last_poll, t, value);
            double stamp = 0.5 * (last_poll + t);
            int tight = t - last_poll <= 2.5 * p->interval_s;
            if (!tight && period_est > 0 && last_change >= 0) {
                /* a wide bracket (a late wake-up): keep the schedule on the counter's grid,
                 * the first grid time after the poll before, if it lies in the bracket */
                double k = ceil((last_poll - last_change) / period_est);
                double grid = last_change + k * period_est;
                if (grid <= t) stamp = grid;
            }
            if (last_change >= 0 && tight) {
                periods[next_period] = stamp - last_change;
                next_period = (next_period + 1) % 9;
                if (n_periods < 9) n_periods++;
            }
            if (guard > 0) {
                if (window_polls <= 1 || !tight) {  /* the first poll already saw it: miss */
                    guard = 2.0 * guard + p->interval_s;
                } else {
                    guard *= 0.8;
                }
            }
            last_change = stamp;
            window_polls = 0;
        }
        last = value;
        last_poll = t;
        p->cpu_s = thread_cpu_s();
        next = t + p->interval_s;
        if (n_periods >= 3 && last_change >= 0) {
            double sorted[9];
            memcpy(sorted, periods, sizeof(double) * (size_t)n_periods);
            qsort(sorted, (size_t)n_periods, sizeof(double), cmp_double);
            double period = sorted[n_periods / 2];
            period_est = period;
            /* a late wake-up (the thread was not scheduled in time) is not helped by a
             * longer guard, a drifting period is: never more than a tenth of the period
             * (the former fixed guard), never less than guard_s */
            if (guard < 0 || guard > 0.1 * period) guard = 0.1 * period;
            if (guard < p->guard_s) guard = p->guard_s;
            double expected = last_change + period;
            if (period > 4 * p->interval_s && expected - guard > next && window_polls == 0) {
                next = expected - guard;
            }
        }
        /* sleep until the next poll, waking at least every 50 ms to see stop (no NVML
         * call on those wake-ups) */
        while (!p->stop) {
            double t_now = now_s();
            if (next <= t_now + 0.05) {
                sleep_until(next);
                break;
            }
            sleep_until(t_now + 0.05);
        }
    }
    p->cpu_s = thread_cpu_s();
    return NULL;
}

/* Start polling. fn: nvmlDeviceGetTotalEnergyConsumption as loaded by pynvml; library:
 * the name pynvml opened it by (checked with dlopen(RTLD_NOLOAD) + dlsym; NULL skips the
 * check). Returns NULL when the check fails or the thread cannot start. */
LSP_EXPORT void *lsp_start(void *fn, const char *library, void *device, double interval_s,
                           double guard_s, int capacity) {
    if (!fn || !(interval_s > 0) || capacity < 16) return NULL;
    if (library) {
        void *lib = dlopen(library, RTLD_NOW | RTLD_NOLOAD);
        if (!lib) return NULL;
        void *sym = dlsym(lib, "nvmlDeviceGetTotalEnergyConsumption");
        dlclose(lib); /* NOLOAD took a reference; pynvml keeps its own */
        if (sym != fn) return NULL;
    }
    lsp_poller_t *p = (lsp_poller_t *)calloc(1, sizeof(lsp_poller_t));
    if (!p) return NULL;
    p->ring = (lsp_record_t *)calloc((size_t)capacity, sizeof(lsp_record_t));
    if (!p->ring) { free(p); return NULL; }
    p->fn = (energy_fn_t)fn;
    p->device = device;
    p->interval_s = interval_s;
    p->guard_s = guard_s;
    p->capacity = (uint64_t)capacity;
    if (pthread_create(&p->thread, NULL, run, p) != 0) {
        free(p->ring);
        free(p);
        return NULL;
    }
    p->started = 1;
    return p;
}

/* Copy up to max records out of the ring; returns how many. */
LSP_EXPORT int lsp_drain(void *handle, double *t_prev_s, double *t_s, unsigned long long *mj,
                         int max) {
    lsp_poller_t *p = (lsp_poller_t *)handle;
    if (!p) return 0;
    uint64_t head = p->head;
    __sync_synchronize();
    int n = 0;
    while (p->tail < head && n < max) {
        lsp_record_t *r = &p->ring[p->tail % p->capacity];
        t_prev_s[n] = r->t_prev_s;
        t_s[n] = r->t_s;
        mj[n] = r->energy_mj;
        n++;
        __sync_synchronize();
        p->tail = p->tail + 1;
    }
    return n;
}

LSP_EXPORT int lsp_error(void *handle) { return handle ? ((lsp_poller_t *)handle)->error : -1; }
LSP_EXPORT double lsp_cpu_s(void *handle) { return handle ? ((lsp_poller_t *)handle)->cpu_s : 0; }
LSP_EXPORT unsigned long long lsp_polls(void *handle) {
    return handle ? ((lsp_poller_t *)handle)->polls : 0;
}
LSP_EXPORT unsigned long long lsp_dropped(void *handle) {
    return handle ? ((lsp_poller_t *)handle)->dropped : 0;
}

/* Stop the thread, wait for it, free everything. */
LSP_EXPORT void lsp_stop(void *handle) {
    lsp_poller_t *p = (lsp_poller_t *)handle;
    if (!p) return;
    p->stop = 1;
    if (p->started) pthread_join(p->thread, NULL);
    free(p->ring);
    free(p);
}
