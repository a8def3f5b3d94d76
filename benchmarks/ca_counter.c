/* A CA client that counts monitor updates instead of printing them (bench_ca_fanout.py --client counter).
 *
 * Why: ten `camonitor` clients on 1000 PVs at 10 Hz print 100 000 lines a
 * second, and formatting them costs a third of a core on the 2 cores the
 * gateway runs on: the measurement took from what it measured. This client
 * subscribes to every PV named on its command line with DBR_TIME_DOUBLE
 * (value mask DBE_VALUE | DBE_ALARM, as camonitor) and, per update, only:
 *
 *   - counts it for its PV when its own EPICS timestamp lies in the window
 *     (an update is counted by when it was taken, not when it arrived: a
 *     client that lagged must not count a backlog as a rate);
 *   - adds its latency (receive time - its timestamp) to a histogram of
 *     0.1 ms bins.
 *
 * Protocol (stdin, one line each, from the benchmark):
 *   WINDOW <start> <end>   POSIX seconds; set before the window starts
 *   REPORT                 print the summary as one JSON line and exit 0
 * End of stdin counts as REPORT. Before that, stdout has one line "<pv> first"
 * when a PV's first update arrives (the benchmark waits for all of them).
 *
 * Built by the benchmark at its start (gcc, libca from epicscorelibs, rpath to
 * its lib directory); single-threaded: callbacks run inside ca_pend_event.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>
#include <unistd.h>

#include "cadef.h"

#define POSIX_AT_EPICS_EPOCH 631152000.0
#define BIN_SECONDS 1e-4      /* latency histogram: 0.1 ms bins ... */
#define BINS 200000           /* ... up to 20 s; later ones go to the last bin */

typedef struct {
    const char *name;
    chid channel;
    evid subscription;
    int subscribed;
    int seen;                 /* any update yet (the "first" line printed) */
    long in_window;           /* updates whose timestamp lies in [start, end) */
    long disconnects;
} Pv;

static Pv *pvs;
static int n_pvs;
static double window_start = INFINITY, window_end = INFINITY;
static long latency_bins[BINS];
static long total_updates, negative_latency, bad_updates, first_seen;

static double now_posix(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void on_update(struct event_handler_args args)
{
    Pv *pv = args.usr;
    const struct dbr_time_double *value = args.dbr;
    double stamp, latency;
    long bin;
    if (args.status != ECA_NORMAL || value == NULL) {
        bad_updates++;
        return;
    }
    total_updates++;
    if (!pv->seen) {
        pv->seen = 1;
        first_seen++;
        printf("%s first\n", pv->name);
        fflush(stdout);
    }
    stamp = value->stamp.secPastEpoch + POSIX_AT_EPICS_EPOCH + value->stamp.nsec * 1e-9;
    if (stamp < window_start || stamp >= window_end)
        return;
    pv->in_window++;
    latency = now_posix() - stamp;
    if (latency < 0) {
        negative_latency++;
        latency = 0;
    }
    bin = (long)(latency / BIN_SECONDS);
    latency_bins[bin < BINS ? bin : BINS - 1]++;
}

static void on_connection(struct connection_handler_args args)
{
    Pv *pv = ca_puser(args.chid);
    if (args.op != CA_OP_CONN_UP) {
        pv->disconnects++;
        return;
    }
    if (!pv->subscribed) {
        int status = ca_create_subscription(DBR_TIME_DOUBLE, 1, args.chid, DBE_VALUE | DBE_ALARM, on_update, pv,
                                            &pv->subscription);
        if (status != ECA_NORMAL)
            fprintf(stderr, "%s: subscription failed: %s\n", pv->name, ca_message(status));
        else
            pv->subscribed = 1;
    }
}

static int compare_long(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

static void report(void)
{
    long *counts = malloc(sizeof(long) * (n_pvs ? n_pvs : 1));
    long in_window = 0, disconnects = 0;
    int connected = 0, i, first = 1;
    for (i = 0; i < n_pvs; i++) {
        counts[i] = pvs[i].in_window;
        in_window += pvs[i].in_window;
        disconnects += pvs[i].disconnects;
        connected += ca_state(pvs[i].channel) == cs_conn;
    }
    qsort(counts, n_pvs, sizeof(long), compare_long);
    printf("{\"pvs\": %d, \"connected\": %d, \"first_seen\": %ld, \"window\": [%.6f, %.6f], "
           "\"in_window\": %ld, \"per_pv_min\": %ld, \"per_pv_median\": %ld, \"per_pv_max\": %ld, "
           "\"updates\": %ld, \"bad_updates\": %ld, \"negative_latency\": %ld, \"disconnects\": %ld, "
           "\"latency_bin_s\": %g, \"latency_bins\": [",
           n_pvs, connected, first_seen, window_start, window_end, in_window,
           n_pvs ? counts[0] : 0, n_pvs ? counts[n_pvs / 2] : 0, n_pvs ? counts[n_pvs - 1] : 0,
           total_updates, bad_updates, negative_latency, disconnects, BIN_SECONDS);
    for (i = 0; i < BINS; i++) {
        if (latency_bins[i]) {
            printf("%s[%d, %ld]", first ? "" : ", ", i, latency_bins[i]);
            first = 0;
        }
    }
    printf("]}\n");
    fflush(stdout);
    free(counts);
}

/* One command from stdin, if a line is there; 1 when it is time to report. */
static int read_command(char *buffer, size_t size, size_t *used)
{
    ssize_t got = read(STDIN_FILENO, buffer + *used, size - 1 - *used);
    char *newline;
    if (got <= 0)
        return got == 0 || (errno != EINTR && errno != EAGAIN);  /* end of stdin: report */
    *used += got;
    buffer[*used] = '\0';
    while ((newline = strchr(buffer, '\n')) != NULL) {
        double start, end;
        *newline = '\0';
        if (sscanf(buffer, "WINDOW %lf %lf", &start, &end) == 2) {
            window_start = start;
            window_end = end;
        } else if (strncmp(buffer, "REPORT", 6) == 0) {
            return 1;
        }
        *used -= newline + 1 - buffer;
        memmove(buffer, newline + 1, *used + 1);
    }
    if (*used >= size - 1)
        *used = 0;  /* a line longer than any command: dropped */
    return 0;
}

int main(int argc, char **argv)
{
    char commands[256];
    size_t used = 0;
    int i, status;
    if (argc < 2) {
        fprintf(stderr, "usage: %s PV...\n", argv[0]);
        return 2;
    }
    n_pvs = argc - 1;
    pvs = calloc(n_pvs, sizeof(Pv));
    status = ca_context_create(ca_disable_preemptive_callback);
    if (status != ECA_NORMAL) {
        fprintf(stderr, "ca_context_create: %s\n", ca_message(status));
        return 1;
    }
    for (i = 0; i < n_pvs; i++) {
        pvs[i].name = argv[i + 1];
        status = ca_create_channel(argv[i + 1], on_connection, &pvs[i], CA_PRIORITY_DEFAULT, &pvs[i].channel);
        if (status != ECA_NORMAL) {
            fprintf(stderr, "%s: %s\n", argv[i + 1], ca_message(status));
            return 1;
        }
    }
    ca_flush_io();
    for (;;) {
        fd_set readable;
        struct timeval no_wait = {0, 0};
        ca_pend_event(0.02);  /* the callbacks run in here */
        FD_ZERO(&readable);
        FD_SET(STDIN_FILENO, &readable);
        if (select(STDIN_FILENO + 1, &readable, NULL, NULL, &no_wait) > 0
                && read_command(commands, sizeof(commands), &used))
            break;
    }
    report();
    ca_context_destroy();
    return 0;
}
