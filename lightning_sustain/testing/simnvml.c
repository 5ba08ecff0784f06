/*
 * simnvml.c: a SIMULATED NVIDIA Management Library (NVML) for tests and demos.
 *
 * Built by lightning_sustain.testing.build_library() into a shared library whose
 * soname is libnvidia-ml.so.1, so the real pynvml bindings load it in place of the
 * NVIDIA driver's library. Nothing it reports comes from hardware: every number is
 * produced by the power/time model described in docs/simulated-nvml.md.
 *
 * Device state lives in a memory-mapped file (path in the environment variable
 * LIGHTNING_SUSTAIN_SIMNVML_STATE) shared by every process that loads this library, so
 * DDP ranks and their parent see the same simulated devices. Updates are serialised by
 * a robust, process-shared pthread mutex stored inside the mapping. Times come from
 * CLOCK_MONOTONIC, which is system wide.
 *
 * Two families of exported symbols:
 *   nvml*   the NVML C API subset, with NVML's signatures and return codes;
 *   lsim_*  the controller API used by lightning_sustain.testing.SimulatedNVML (ctypes).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define LSIM_EXPORT __attribute__((visibility("default")))

/* ---- NVML constants (values from nvml.h / pynvml) ---- */
typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NO_PERMISSION 4
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_UNKNOWN 999

#define NVML_VALUE_TYPE_DOUBLE 0
#define NVML_VALUE_TYPE_UNSIGNED_INT 1
#define NVML_VALUE_TYPE_UNSIGNED_LONG_LONG 3

#define NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION 83
#define NVML_FI_DEV_POWER_AVERAGE 185
#define NVML_FI_DEV_POWER_INSTANT 186
#define NVML_FI_DEV_POWER_MIN_LIMIT 187
#define NVML_FI_DEV_POWER_MAX_LIMIT 188
#define NVML_FI_DEV_POWER_DEFAULT_LIMIT 189
#define NVML_FI_DEV_POWER_CURRENT_LIMIT 190

#define NVML_DEVICE_ARCH_VOLTA 5

typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    long long sllVal;
    int siVal;
    unsigned short usVal;
} nvmlValue_t;

typedef struct {
    unsigned int fieldId;
    unsigned int scopeId;
    long long timestamp;
    long long latencyUsec;
    unsigned int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

/* ---- shared state layout ---- */
#define LSIM_MAGIC 0x4c53494d4e564d4cULL /* "LSIMNVML" */
#define LSIM_LAYOUT_VERSION 2u
#define LSIM_MAX_SEGMENTS 4096
#define LSIM_MAX_DEVICES 64
#define LSIM_STR_LEN 96
#define LSIM_ENV_STATE "LIGHTNING_SUSTAIN_SIMNVML_STATE"

enum lsim_fault { LSIM_FAULT_NONE = 0, LSIM_FAULT_GPU_LOST = 1, LSIM_FAULT_COUNTER_BACKWARDS = 2,
                  LSIM_FAULT_UNKNOWN_ERROR = 3 };

/* Mirrored by a ctypes Structure in simulated_nvml.py: keep both in step. */
typedef struct {
    char name[LSIM_STR_LEN];
    char uuid[LSIM_STR_LEN];
    double idle_power_w;
    double busy_power_w;
    double min_limit_w;
    double max_limit_w;
    double default_limit_w;
    double speed;
    double perf_exponent;
    double initial_energy_j;
    int32_t architecture; /* NVML_DEVICE_ARCH_* */
    int32_t set_limit_permitted;
    int32_t field_values_supported;
    int32_t mig_enabled;
} lsim_spec_t;

/* Mirrored by a ctypes Structure in simulated_nvml.py: keep both in step. */
typedef struct {
    double ground_truth_energy_j; /* exact integral of drawn power up to now */
    double power_w;               /* drawn power now (exact, not sample-and-hold) */
    double load;
    double limit_w;
    double default_limit_w;
    double time_scale;
    double limit_set_time_s;      /* CLOCK_MONOTONIC time of the last NVML set call, or -1 */
    double now_s;
    uint64_t limit_set_count;     /* successful nvmlDeviceSetPowerManagementLimit calls */
    uint64_t counter_mj;          /* what nvmlDeviceGetTotalEnergyConsumption returns now */
    int32_t fault;
    int32_t architecture;
    int32_t set_limit_permitted;
    int32_t field_values_supported;
    int32_t mig_enabled;
    int32_t pad;
} lsim_readout_t;

typedef struct {
    lsim_spec_t spec;
    double load;
    double limit_w;
    double last_change_t;   /* time of the last state change (s, CLOCK_MONOTONIC) */
    double energy_j;        /* ground-truth energy at last_change_t */
    double power_w;         /* power drawn since last_change_t */
    int64_t snap_k;         /* index of the latest tick boundary <= last_change_t */
    double snap_energy_j;   /* ground-truth energy at tick snap_k */
    double snap_power_w;    /* power drawn at tick snap_k (sample and hold) */
    double prev_energy_j;   /* ground-truth energy at tick snap_k - 1 */
    double counter_offset_j;
    double limit_set_time_s;
    uint64_t limit_set_count;
    int32_t fault;
    int32_t profile_n;       /* > 0: power follows the time profile below, not the load */
    /* Power profile over wall time (periodic, piecewise linear): segment j runs from
     * seg_t[j] to seg_t[j+1] (the last one to profile_period_s) with power going linearly
     * from seg_p0[j] to seg_p1[j]; seg_cum[j] is the energy of one period up to seg_t[j]. */
    double profile_period_s;
    double profile_origin_s; /* CLOCK_MONOTONIC time of profile time 0 */
    double profile_period_j; /* energy of one whole period */
    double seg_t[LSIM_MAX_SEGMENTS];
    double seg_p0[LSIM_MAX_SEGMENTS];
    double seg_p1[LSIM_MAX_SEGMENTS];
    double seg_cum[LSIM_MAX_SEGMENTS];
} lsim_device_t;

typedef struct {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t num_devices;
    uint64_t total_size;
    uint32_t header_size;
    uint32_t device_size;
    double t0;
    double period_s;
    pthread_mutex_t mutex;
    lsim_device_t dev[];
} lsim_state_t;

/* ---- process-local globals ---- */
typedef struct { unsigned int index; unsigned int pad; } lsim_handle_t;
static lsim_handle_t g_handles[LSIM_MAX_DEVICES];
static pthread_mutex_t g_init_lock = PTHREAD_MUTEX_INITIALIZER;
static lsim_state_t *g_state = NULL;     /* mapping used by the nvml* API */
static size_t g_state_size = 0;
static char g_state_path[4096];
static dev_t g_state_dev;
static ino_t g_state_ino;
static int g_refcount = 0;

LSIM_EXPORT int lsim_simulated_marker(void) { return 1; }
LSIM_EXPORT int lsim_layout_version(void) { return (int)LSIM_LAYOUT_VERSION; }
LSIM_EXPORT int lsim_spec_size(void) { return (int)sizeof(lsim_spec_t); }
LSIM_EXPORT int lsim_readout_size(void) { return (int)sizeof(lsim_readout_t); }

LSIM_EXPORT double lsim_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static long long wall_us(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (long long)tv.tv_sec * 1000000LL + tv.tv_usec;
}

static void lock_state(lsim_state_t *st) {
    int rc = pthread_mutex_lock(&st->mutex);
    if (rc == EOWNERDEAD) {
        /* A process died holding the lock (e.g. SIGKILL mid-update): recover. */
        pthread_mutex_consistent(&st->mutex);
    }
}

static void unlock_state(lsim_state_t *st) { pthread_mutex_unlock(&st->mutex); }

/* ---- the model ---- */
static double effective_busy_w(const lsim_device_t *d) {
    return d->spec.busy_power_w < d->limit_w ? d->spec.busy_power_w : d->limit_w;
}

static double drawn_power_w(const lsim_device_t *d) {
    double busy = effective_busy_w(d);
    double idle = d->spec.idle_power_w < d->limit_w ? d->spec.idle_power_w : d->limit_w;
    if (busy < idle) busy = idle;
    return idle + d->load * (busy - idle);
}

static double time_scale(const lsim_device_t *d) {
    double scale = 1.0 / d->spec.speed;
    double busy = effective_busy_w(d);
    if (busy < d->spec.busy_power_w && busy > 0.0) {
        scale *= pow(d->spec.busy_power_w / busy, d->spec.perf_exponent);
    }
    return scale;
}

static int64_t tick_index(const lsim_state_t *st, double t) {
    double k = floor((t - st->t0) / st->period_s);
    return k < 0 ? 0 : (int64_t)k;
}

/* Profile: which segment holds phase r (0 <= r < period); binary search. */
static int profile_segment(const lsim_device_t *d, double r) {
    int lo = 0, hi = d->profile_n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (d->seg_t[mid] <= r) lo = mid; else hi = mid - 1;
    }
    return lo;
}

static double segment_end(const lsim_device_t *d, int j) {
    return j + 1 < d->profile_n ? d->seg_t[j + 1] : d->profile_period_s;
}

/* Exact integral of the profile from profile time 0 to origin-relative time tau. */
static double profile_cumulative_j(const lsim_device_t *d, double tau) {
    double n = floor(tau / d->profile_period_s);
    double r = tau - n * d->profile_period_s;
    if (r < 0) r = 0;
    if (r >= d->profile_period_s) r = d->profile_period_s;
    int j = profile_segment(d, r);
    double len = segment_end(d, j) - d->seg_t[j];
    double x = r - d->seg_t[j];
    double part = d->seg_p0[j] * x;
    if (len > 0) part += (d->seg_p1[j] - d->seg_p0[j]) * x * x / (2.0 * len);
    return n * d->profile_period_j + d->seg_cum[j] + part;
}

static double profile_power_w(const lsim_device_t *d, double t) {
    double tau = t - d->profile_origin_s;
    double n = floor(tau / d->profile_period_s);
    double r = tau - n * d->profile_period_s;
    if (r < 0) r = 0;
    int j = profile_segment(d, r);
    double len = segment_end(d, j) - d->seg_t[j];
    double x = r - d->seg_t[j];
    return len > 0 ? d->seg_p0[j] + (d->seg_p1[j] - d->seg_p0[j]) * x / len : d->seg_p0[j];
}

/* Ground-truth energy at time t >= last_change_t under the power in force since then. */
static double energy_at(const lsim_device_t *d, double t) {
    if (t <= d->last_change_t) return d->energy_j;
    if (d->profile_n > 0) {
        return d->energy_j + profile_cumulative_j(d, t - d->profile_origin_s) -
               profile_cumulative_j(d, d->last_change_t - d->profile_origin_s);
    }
    return d->energy_j + d->power_w * (t - d->last_change_t);
}

/* Bring the integral up to time t, recording the tick snapshots that lie in
 * (last_change_t, t]. Idempotent with respect to the model, so reads call it too. */
static void advance(const lsim_state_t *st, lsim_device_t *d, double t) {
    if (t <= d->last_change_t) return;
    int64_t kt = tick_index(st, t);
    if (kt > d->snap_k) {
        double tk = st->t0 + (double)kt * st->period_s;
        double e_kt = energy_at(d, tk);
        if (kt - 1 > d->snap_k) {
            d->prev_energy_j = energy_at(d, tk - st->period_s);
        } else {
            d->prev_energy_j = d->snap_energy_j;
        }
        d->snap_k = kt;
        d->snap_energy_j = e_kt;
        d->snap_power_w = d->profile_n > 0 ? profile_power_w(d, tk) : d->power_w;
    }
    d->energy_j = energy_at(d, t);
    d->last_change_t = t;
    if (d->profile_n > 0) d->power_w = profile_power_w(d, t);
}

static void init_device(const lsim_state_t *st, lsim_device_t *d, const lsim_spec_t *spec) {
    memset(d, 0, sizeof(*d));
    d->spec = *spec;
    d->spec.name[LSIM_STR_LEN - 1] = '\0';
    d->spec.uuid[LSIM_STR_LEN - 1] = '\0';
    d->load = 0.0;
    d->limit_w = spec->default_limit_w;
    d->last_change_t = st->t0;
    d->energy_j = spec->initial_energy_j;
    d->power_w = drawn_power_w(d);
    d->snap_k = 0;
    d->snap_energy_j = d->energy_j;
    d->snap_power_w = d->power_w;
    d->prev_energy_j = d->energy_j;
    d->limit_set_time_s = -1.0;
}

static uint64_t counter_mj(const lsim_device_t *d) {
    double e = (d->snap_energy_j + d->counter_offset_j) * 1000.0;
    if (!(e > 0.0)) return 0;
    return (uint64_t)e; /* truncated to whole millijoules, like the hardware counter */
}

/* ---- mapping the state file ---- */
static lsim_state_t *map_state(const char *path, size_t *size_out, struct stat *sb_out) {
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return NULL;
    struct stat sb;
    if (fstat(fd, &sb) != 0 || (size_t)sb.st_size < sizeof(lsim_state_t)) {
        close(fd);
        return NULL;
    }
    size_t size = (size_t)sb.st_size;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return NULL;
    lsim_state_t *st = (lsim_state_t *)p;
    if (st->magic != LSIM_MAGIC || st->layout_version != LSIM_LAYOUT_VERSION ||
        st->header_size != sizeof(lsim_state_t) || st->device_size != sizeof(lsim_device_t) ||
        st->num_devices < 1 || st->num_devices > LSIM_MAX_DEVICES ||
        st->total_size != size ||
        size != sizeof(lsim_state_t) + (size_t)st->num_devices * sizeof(lsim_device_t) ||
        !(st->period_s > 0.0)) {
        munmap(p, size);
        return NULL;
    }
    if (size_out) *size_out = size;
    if (sb_out) *sb_out = sb;
    return st;
}

/* ---- controller API (lsim_*) ---- */
LSIM_EXPORT int lsim_create(const char *path, unsigned int n, const lsim_spec_t *specs,
                            double period_s) {
    if (!path || !specs || n < 1 || n > LSIM_MAX_DEVICES || !(period_s > 0.0)) return EINVAL;
    size_t size = sizeof(lsim_state_t) + (size_t)n * sizeof(lsim_device_t);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return errno;
    if (ftruncate(fd, (off_t)size) != 0) {
        int e = errno;
        close(fd);
        return e;
    }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return errno;
    lsim_state_t *st = (lsim_state_t *)p;
    memset(st, 0, size);
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&st->mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    st->layout_version = LSIM_LAYOUT_VERSION;
    st->num_devices = n;
    st->total_size = size;
    st->header_size = sizeof(lsim_state_t);
    st->device_size = sizeof(lsim_device_t);
    st->period_s = period_s;
    st->t0 = lsim_now();
    for (unsigned int i = 0; i < n; i++) init_device(st, &st->dev[i], &specs[i]);
    __sync_synchronize();
    st->magic = LSIM_MAGIC; /* written last: a half-built file never validates */
    int rc = msync(p, size, MS_SYNC) == 0 ? 0 : errno;
    munmap(p, size);
    return rc;
}

LSIM_EXPORT void *lsim_open(const char *path) {
    size_t size = 0;
    return map_state(path, &size, NULL);
}

LSIM_EXPORT void lsim_close(void *state) {
    lsim_state_t *st = (lsim_state_t *)state;
    if (st) munmap(st, (size_t)st->total_size);
}

LSIM_EXPORT int lsim_num_devices(void *state) {
    return state ? (int)((lsim_state_t *)state)->num_devices : -1;
}

LSIM_EXPORT double lsim_period_s(void *state) {
    return state ? ((lsim_state_t *)state)->period_s : -1.0;
}

static lsim_device_t *ctl_device(lsim_state_t *st, unsigned int i) {
    if (!st || i >= st->num_devices) return NULL;
    return &st->dev[i];
}

LSIM_EXPORT int lsim_read(void *state, unsigned int i, lsim_readout_t *out) {
    lsim_state_t *st = (lsim_state_t *)state;
    lsim_device_t *d = ctl_device(st, i);
    if (!d || !out) return EINVAL;
    lock_state(st);
    double now = lsim_now();
    advance(st, d, now);
    out->ground_truth_energy_j = d->energy_j;
    out->power_w = d->power_w;
    out->load = d->load;
    out->limit_w = d->limit_w;
    out->default_limit_w = d->spec.default_limit_w;
    out->time_scale = time_scale(d);
    out->limit_set_time_s = d->limit_set_time_s;
    out->now_s = now;
    out->limit_set_count = d->limit_set_count;
    out->counter_mj = counter_mj(d);
    out->fault = d->fault;
    out->architecture = d->spec.architecture;
    out->set_limit_permitted = d->spec.set_limit_permitted;
    out->field_values_supported = d->spec.field_values_supported;
    out->mig_enabled = d->spec.mig_enabled;
    unlock_state(st);
    return 0;
}

LSIM_EXPORT int lsim_get_spec(void *state, unsigned int i, lsim_spec_t *out) {
    lsim_state_t *st = (lsim_state_t *)state;
    lsim_device_t *d = ctl_device(st, i);
    if (!d || !out) return EINVAL;
    lock_state(st);
    *out = d->spec;
    unlock_state(st);
    return 0;
}

LSIM_EXPORT int lsim_set_load(void *state, unsigned int i, double load) {
    lsim_state_t *st = (lsim_state_t *)state;
    lsim_device_t *d = ctl_device(st, i);
    if (!d || !(load >= 0.0 && load <= 1.0)) return EINVAL;
    lock_state(st);
    advance(st, d, lsim_now());
    d->load = load;
    if (d->profile_n <= 0) d->power_w = drawn_power_w(d);
    unlock_state(st);
    return 0;
}

/* Test backdoor: set the limit without the permission check (range still enforced). */
LSIM_EXPORT int lsim_set_limit_w(void *state, unsigned int i, double limit_w) {
    lsim_state_t *st = (lsim_state_t *)state;
    lsim_device_t *d = ctl_device(st, i);
    if (!d) return EINVAL;
    if (!(limit_w >= d->spec.min_limit_w && limit_w <= d->spec.max_limit_w)) return ERANGE;
    lock_state(st);
    advance(st, d, lsim_now());
    d->limit_w = limit_w;
    if (d->profile_n <= 0) d->power_w = drawn_power_w(d);
    unlock_state(st);
    return 0;
}

/* Make device i's power follow a periodic, piecewise-linear profile over wall time from
 * now on (independent of the load); n == 0 returns to the load model. Segment starts must
 * begin at 0, increase strictly and lie below period_s; powers must be finite and >= 0. */
LSIM_EXPORT int lsim_set_profile(void *state, unsigned int i, int n, const double *seg_t,
                                 const double *p0, const double *p1, double period_s,
                                 double origin_s) {
    lsim_state_t *st = (lsim_state_t *)state;
    lsim_device_t *d = ctl_device(st, i);
    if (!d || n < 0 || n > LSIM_MAX_SEGMENTS) return EINVAL;
    if (n > 0) {
        if (!seg_t || !p0 || !p1 || !(period_s > 0.0) || !isfinite(period_s) ||
            !isfinite(origin_s) || seg_t[0] != 0.0) return EINVAL;
        for (int j = 0; j < n; j++) {
            if (!(p0[j] >= 0.0) || !(p1[j] >= 0.0) || !isfinite(p0[j]) || !isfinite(p1[j]))
                return EINVAL;
            if (!(seg_t[j] < period_s) || (j > 0 && !(seg_t[j] > seg_t[j - 1]))) return EINVAL;
        }
    }
    lock_state(st);
    advance(st, d, lsim_now());
    d->profile_n = 0;
    if (n > 0) {
        double cum = 0.0;
        for (int j = 0; j < n; j++) {
            d->seg_t[j] = seg_t[j];
            d->seg_p0[j] = p0[j];
            d->seg_p1[j] = p1[j];
            d->seg_cum[j] = cum;
            double end = j + 1 < n ? seg_t[j + 1] : period_s;
            cum += 0.5 * (p0[j] + p1[j]) * (end - seg_t[j]);
        }
        d->profile_period_s = period_s;
        d->profile_origin_s = origin_s;
        d->profile_period_j = cum;
        d->profile_n = n;
        d->power_w = profile_power_w(d, d->last_change_t);
    } else {
        d->power_w = drawn_power_w(d);
    }
    unlock_state(st);
    return 0;
}

/* Exact ground-truth energy of device i's profile between two CLOCK_MONOTONIC times
 * (any window, past or future); EINVAL when no profile is set. */
LSIM_EXPORT int lsim_profile_energy_j(void *state, unsigned int i, double t0, double t1,
                                      double *out) {
    lsim_state_t *st = (lsim_state_t *)state;
    lsim_device_t *d = ctl_device(st, i);
    if (!d || !out) return EINVAL;
    lock_state(st);
    int rc = 0;
    if (d->profile_n <= 0) {
        rc = EINVAL;
    } else {
        *out = profile_cumulative_j(d, t1 - d->profile_origin_s) -
               profile_cumulative_j(d, t0 - d->profile_origin_s);
    }
    unlock_state(st);
    return rc;
}

LSIM_EXPORT double lsim_t0(void *state) {
    return state ? ((lsim_state_t *)state)->t0 : -1.0;
}

enum { LSIM_SET_PERMITTED = 0, LSIM_SET_FIELD_VALUES = 1, LSIM_SET_MIG = 2, LSIM_SET_ARCH = 3,
       LSIM_SET_FAULT = 4 };

LSIM_EXPORT int lsim_set_int(void *state, unsigned int i, int which, int value) {
    lsim_state_t *st = (lsim_state_t *)state;
    lsim_device_t *d = ctl_device(st, i);
    if (!d) return EINVAL;
    lock_state(st);
    int rc = 0;
    switch (which) {
    case LSIM_SET_PERMITTED: d->spec.set_limit_permitted = value != 0; break;
    case LSIM_SET_FIELD_VALUES: d->spec.field_values_supported = value != 0; break;
    case LSIM_SET_MIG: d->spec.mig_enabled = value != 0; break;
    case LSIM_SET_ARCH: d->spec.architecture = value; break;
    case LSIM_SET_FAULT:
        if (value < LSIM_FAULT_NONE || value > LSIM_FAULT_UNKNOWN_ERROR) {
            rc = EINVAL;
            break;
        }
        if (value == LSIM_FAULT_COUNTER_BACKWARDS) {
            /* Like a driver reload: the counter restarts from zero and counts up again. */
            advance(st, d, lsim_now());
            d->counter_offset_j -= d->energy_j + d->counter_offset_j;
        }
        d->fault = value;
        break;
    default: rc = EINVAL;
    }
    unlock_state(st);
    return rc;
}

/* ---- NVML API ---- */
static nvmlReturn_t ensure_mapped_locked(void) {
    const char *path = getenv(LSIM_ENV_STATE);
    if (!path || !*path || strlen(path) >= sizeof(g_state_path)) return NVML_ERROR_DRIVER_NOT_LOADED;
    struct stat sb;
    if (stat(path, &sb) != 0) return NVML_ERROR_DRIVER_NOT_LOADED;
    if (g_state && strcmp(path, g_state_path) == 0 && sb.st_dev == g_state_dev &&
        sb.st_ino == g_state_ino) {
        return NVML_SUCCESS;
    }
    size_t size = 0;
    struct stat msb;
    lsim_state_t *st = map_state(path, &size, &msb);
    if (!st) return NVML_ERROR_DRIVER_NOT_LOADED;
    lsim_state_t *old = g_state;
    size_t old_size = g_state_size;
    g_state = st;
    g_state_size = size;
    g_state_dev = msb.st_dev;
    g_state_ino = msb.st_ino;
    strcpy(g_state_path, path);
    /* An old mapping is released only when nobody in this process holds NVML open;
     * otherwise it is left mapped (a few KiB) so no concurrent reader can fault. */
    if (old && g_refcount == 0) munmap(old, old_size);
    return NVML_SUCCESS;
}

LSIM_EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&g_init_lock);
    nvmlReturn_t rc = ensure_mapped_locked();
    if (rc == NVML_SUCCESS) {
        for (unsigned int i = 0; i < LSIM_MAX_DEVICES; i++) g_handles[i].index = i;
        g_refcount++;
    }
    pthread_mutex_unlock(&g_init_lock);
    return rc;
}

LSIM_EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
LSIM_EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

LSIM_EXPORT nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&g_init_lock);
    nvmlReturn_t rc = NVML_SUCCESS;
    if (g_refcount <= 0) rc = NVML_ERROR_UNINITIALIZED;
    else g_refcount--;
    pthread_mutex_unlock(&g_init_lock);
    return rc;
}

LSIM_EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED:
        return "Driver Not Loaded (simulated NVML: LIGHTNING_SUSTAIN_SIMNVML_STATE unset or invalid)";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t copy_str(char *dst, unsigned int length, const char *src) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    size_t n = strlen(src);
    if ((size_t)length < n + 1) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, n + 1);
    return NVML_SUCCESS;
}

LSIM_EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (g_refcount <= 0) return NVML_ERROR_UNINITIALIZED;
    char buf[32];
    snprintf(buf, sizeof(buf), "simulated-%u", LSIM_LAYOUT_VERSION);
    return copy_str(version, length, buf);
}

LSIM_EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    char buf[32];
    snprintf(buf, sizeof(buf), "simulated-%u", LSIM_LAYOUT_VERSION);
    return copy_str(version, length, buf);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (g_refcount <= 0 || !g_state) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = g_state->num_devices;
    return NVML_SUCCESS;
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) {
    return nvmlDeviceGetCount_v2(count);
}

static nvmlReturn_t fault_code(const lsim_device_t *d) {
    if (d->fault == LSIM_FAULT_GPU_LOST) return NVML_ERROR_GPU_IS_LOST;
    if (d->fault == LSIM_FAULT_UNKNOWN_ERROR) return NVML_ERROR_UNKNOWN;
    return NVML_SUCCESS;
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device) {
    if (g_refcount <= 0 || !g_state) return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= g_state->num_devices) return NVML_ERROR_INVALID_ARGUMENT;
    lock_state(g_state);
    nvmlReturn_t rc = fault_code(&g_state->dev[index]);
    unlock_state(g_state);
    if (rc != NVML_SUCCESS) return rc;
    *device = &g_handles[index];
    return NVML_SUCCESS;
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, void **device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, void **device) {
    if (g_refcount <= 0 || !g_state) return NVML_ERROR_UNINITIALIZED;
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < g_state->num_devices; i++) {
        if (strcmp(g_state->dev[i].spec.uuid, uuid) == 0) {
            return nvmlDeviceGetHandleByIndex_v2(i, device);
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

/* Resolve a handle and lock the state; on success the caller must unlock_state(g_state). */
static nvmlReturn_t begin(void *device, lsim_device_t **out) {
    if (g_refcount <= 0 || !g_state) return NVML_ERROR_UNINITIALIZED;
    lsim_handle_t *h = (lsim_handle_t *)device;
    if (h < g_handles || h >= g_handles + LSIM_MAX_DEVICES ||
        ((const char *)h - (const char *)g_handles) % sizeof(lsim_handle_t) != 0 ||
        h->index >= g_state->num_devices) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    lsim_device_t *d = &g_state->dev[h->index];
    lock_state(g_state);
    nvmlReturn_t rc = fault_code(d);
    if (rc != NVML_SUCCESS) {
        unlock_state(g_state);
        return rc;
    }
    advance(g_state, d, lsim_now());
    *out = d;
    return NVML_SUCCESS;
}

#define BEGIN(dev, d)                            \
    lsim_device_t *d = NULL;                     \
    do {                                         \
        nvmlReturn_t begin_rc = begin(dev, &d);  \
        if (begin_rc != NVML_SUCCESS) return begin_rc; \
    } while (0)
#define END(rc)             \
    do {                    \
        unlock_state(g_state); \
        return (rc);        \
    } while (0)

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetName(void *device, char *name, unsigned int length) {
    BEGIN(device, d);
    END(copy_str(name, length, d->spec.name));
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetUUID(void *device, char *uuid, unsigned int length) {
    BEGIN(device, d);
    END(copy_str(uuid, length, d->spec.uuid));
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetIndex(void *device, unsigned int *index) {
    BEGIN(device, d);
    if (!index) END(NVML_ERROR_INVALID_ARGUMENT);
    *index = (unsigned int)(d - g_state->dev);
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetArchitecture(void *device, unsigned int *arch) {
    BEGIN(device, d);
    if (!arch) END(NVML_ERROR_INVALID_ARGUMENT);
    *arch = (unsigned int)d->spec.architecture;
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(void *device, nvmlUtilization_t *util) {
    BEGIN(device, d);
    if (!util) END(NVML_ERROR_INVALID_ARGUMENT);
    util->gpu = (unsigned int)lround(d->load * 100.0);
    util->memory = (unsigned int)lround(d->load * 40.0);
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(void *device, nvmlMemory_t *memory) {
    BEGIN(device, d);
    if (!memory) END(NVML_ERROR_INVALID_ARGUMENT);
    memory->total = 80ULL * 1024ULL * 1024ULL * 1024ULL;
    memory->used = 512ULL * 1024ULL * 1024ULL;
    memory->free = memory->total - memory->used;
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetTemperature(void *device, unsigned int sensor,
                                                  unsigned int *temp) {
    BEGIN(device, d);
    if (!temp || sensor != 0) END(NVML_ERROR_INVALID_ARGUMENT);
    *temp = (unsigned int)lround(30.0 + 0.12 * d->power_w);
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementMode(void *device, unsigned int *mode) {
    BEGIN(device, d);
    (void)d;
    if (!mode) END(NVML_ERROR_INVALID_ARGUMENT);
    *mode = 1; /* NVML_FEATURE_ENABLED */
    END(NVML_SUCCESS);
}

static unsigned int to_mw(double w) { return (unsigned int)llround(w * 1000.0); }

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(void *device, unsigned int *limit) {
    BEGIN(device, d);
    if (!limit) END(NVML_ERROR_INVALID_ARGUMENT);
    *limit = to_mw(d->limit_w);
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(void *device, unsigned int *limit) {
    return nvmlDeviceGetPowerManagementLimit(device, limit);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(void *device,
                                                                  unsigned int *limit) {
    BEGIN(device, d);
    if (!limit) END(NVML_ERROR_INVALID_ARGUMENT);
    *limit = to_mw(d->spec.default_limit_w);
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(void *device,
                                                                      unsigned int *min_limit,
                                                                      unsigned int *max_limit) {
    BEGIN(device, d);
    if (!min_limit || !max_limit) END(NVML_ERROR_INVALID_ARGUMENT);
    *min_limit = to_mw(d->spec.min_limit_w);
    *max_limit = to_mw(d->spec.max_limit_w);
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceSetPowerManagementLimit(void *device, unsigned int limit) {
    BEGIN(device, d);
    if (!d->spec.set_limit_permitted) END(NVML_ERROR_NO_PERMISSION);
    if (limit < to_mw(d->spec.min_limit_w) || limit > to_mw(d->spec.max_limit_w)) {
        END(NVML_ERROR_INVALID_ARGUMENT);
    }
    /* advance() already ran in begin(): the new power applies from now on. */
    d->limit_w = (double)limit / 1000.0;
    if (d->profile_n <= 0) d->power_w = drawn_power_w(d);
    d->limit_set_count++;
    d->limit_set_time_s = d->last_change_t;
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(void *device, unsigned int *power) {
    BEGIN(device, d);
    if (!power) END(NVML_ERROR_INVALID_ARGUMENT);
    if (d->spec.mig_enabled) END(NVML_ERROR_NOT_SUPPORTED);
    *power = to_mw(d->snap_power_w);
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(void *device,
                                                             unsigned long long *energy) {
    BEGIN(device, d);
    if (!energy) END(NVML_ERROR_INVALID_ARGUMENT);
    if (d->spec.architecture < NVML_DEVICE_ARCH_VOLTA || d->spec.mig_enabled) {
        END(NVML_ERROR_NOT_SUPPORTED);
    }
    *energy = counter_mj(d);
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetFieldValues(void *device, int valuesCount,
                                                  nvmlFieldValue_t *values) {
    BEGIN(device, d);
    if (!values || valuesCount < 0) END(NVML_ERROR_INVALID_ARGUMENT);
    long long ts = wall_us();
    int energy_ok = d->spec.architecture >= NVML_DEVICE_ARCH_VOLTA && !d->spec.mig_enabled;
    double avg_w = d->snap_k > 0 ? (d->snap_energy_j - d->prev_energy_j) / g_state->period_s
                                 : d->snap_power_w;
    for (int i = 0; i < valuesCount; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->timestamp = ts;
        v->latencyUsec = 0;
        v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
        v->value.ullVal = 0;
        v->nvmlReturn = NVML_SUCCESS;
        if (!d->spec.field_values_supported) {
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            continue;
        }
        switch (v->fieldId) {
        case NVML_FI_DEV_POWER_INSTANT:
        case NVML_FI_DEV_POWER_AVERAGE:
            if (d->spec.mig_enabled) {
                v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            } else {
                v->value.uiVal = to_mw(v->fieldId == NVML_FI_DEV_POWER_INSTANT ? d->snap_power_w
                                                                               : avg_w);
            }
            break;
        case NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION:
            if (!energy_ok) {
                v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            } else {
                v->valueType = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
                v->value.ullVal = counter_mj(d);
            }
            break;
        case NVML_FI_DEV_POWER_MIN_LIMIT: v->value.uiVal = to_mw(d->spec.min_limit_w); break;
        case NVML_FI_DEV_POWER_MAX_LIMIT: v->value.uiVal = to_mw(d->spec.max_limit_w); break;
        case NVML_FI_DEV_POWER_DEFAULT_LIMIT:
            v->value.uiVal = to_mw(d->spec.default_limit_w);
            break;
        case NVML_FI_DEV_POWER_CURRENT_LIMIT: v->value.uiVal = to_mw(d->limit_w); break;
        default: v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED; break;
        }
    }
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceGetMigMode(void *device, unsigned int *currentMode,
                                              unsigned int *pendingMode) {
    BEGIN(device, d);
    if (!currentMode || !pendingMode) END(NVML_ERROR_INVALID_ARGUMENT);
    *currentMode = d->spec.mig_enabled ? 1u : 0u;
    *pendingMode = *currentMode;
    END(NVML_SUCCESS);
}

LSIM_EXPORT nvmlReturn_t nvmlDeviceIsMigDeviceHandle(void *device, unsigned int *isMigDevice) {
    BEGIN(device, d);
    (void)d;
    if (!isMigDevice) END(NVML_ERROR_INVALID_ARGUMENT);
    *isMigDevice = 0; /* handles from this library are always full devices */
    END(NVML_SUCCESS);
}
