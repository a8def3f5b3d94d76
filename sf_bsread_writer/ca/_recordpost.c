/* Scalar records updated in batches from C: value, alarm and timestamp, posted to monitors.
 *
 * Why: pythonSoftIOC updates a record by asking EPICS to process it (I/O Intr
 * scan): EPICS' callback thread cbLow wakes, takes the GIL from the apply loop
 * and calls the device support's _process in Python: ~100 us of CPU and two
 * thread switches per record update, which at 1000 PVs x 10 Hz is more than a
 * core (docs/performance.md, issue 22). Here the gateway's apply loop hands one
 * batch per message (numpy arrays: which records, their values, severities,
 * statuses, timestamps); `post` copies it into this Poster's pending set (the
 * newest value of a record wins, as a monitor queue does) and returns, and the
 * Poster's own EPICS thread does, per record, what a record's processing would
 * have done to the fields clients read:
 *
 *     dbScanLock; VAL = value; UDF = 0; NSEV/NSTA = alarm; TIME = stamp;
 *     recGblResetAlarms (SEVR/STAT, posts them when they change);
 *     db_post_events(VAL, DBE_VALUE | DBE_LOG | alarm mask); dbScanUnlock
 *
 * No Python, no GIL in that thread. It is an EPICS thread at the priority of
 * cbLow, the thread that processes the records in pythonSoftIOC's path: where
 * EPICS runs its threads real-time (a process allowed to, e.g. root), a
 * Python thread posting would be an ordinary thread below rsrv's, and with
 * ten busy clients rsrv's threads left it nothing (measured: one post of 500
 * records took 340 ms and the clients got a third of the updates).
 *
 * Only `ai` (DBF_DOUBLE VAL) and `longin` (DBF_LONG VAL) records; the others
 * keep pythonSoftIOC's path. The records are resolved once (dbNameToAddr) when
 * the Poster is made, after iocInit.
 *
 * Built only where epicscorelibs' headers are found (setup.py; pyproject.toml
 * puts epicscorelibs into pip's build environment); the symbols come from
 * libdbCore and libCom, which epicscorelibs loads RTLD_GLOBAL before this
 * module is imported (ca/ioc.py imports it after softioc). EPICS_ABI is the
 * epicscorelibs ABI it was compiled against (ca/ioc.py refuses a mismatch).
 */
#define PY_SSIZE_T_CLEAN
#define USE_TYPED_RSET
#include <Python.h>

#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "dbAccess.h"
#include "dbAddr.h"
#include "dbCommon.h"
#include "dbEvent.h"
#include "dbLock.h"
#include "epicsEvent.h"
#include "epicsMutex.h"
#include "epicsThread.h"
#include "cantProceed.h"
#include "epicsTime.h"
#include "recGbl.h"

#ifndef SF_EPICS_ABI
#define SF_EPICS_ABI ""
#endif

/* One record's next update. */
typedef struct {
    double value;
    double stamp;
    short severity;
    short status;
} Update;

typedef struct {
    PyObject_HEAD
    DBADDR *addresses;
    Py_ssize_t count;
    /* Guarded by lock: the pending set (flags + the order records entered it) and the thread's state. */
    epicsMutexId lock;
    epicsEventId wake;       /* something is pending, or stop */
    epicsEventId idle;       /* the thread posted everything it was given */
    Update *pending;
    char *is_pending;
    int *order;
    Py_ssize_t n_pending;
    int busy;
    int stop;
    unsigned long long rounds, posted;
    /* The thread's own copy of one round. */
    Update *round;
    int *round_order;
    epicsThreadId thread;
} Poster;

static void lock(Poster *self)
{
    if (epicsMutexLock(self->lock) != epicsMutexLockOK)
        cantProceed("sf_bsread_writer.ca._recordpost: the Poster's mutex failed");
}

static void post_round(Poster *self, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        DBADDR *address = &self->addresses[self->round_order[i]];
        const Update *update = &self->round[i];
        dbCommon *record = address->precord;
        unsigned short mask;
        double seconds = update->stamp;
        dbScanLock(record);
        if (address->field_type == DBF_DOUBLE)
            *(epicsFloat64 *)address->pfield = update->value;
        else
            *(epicsInt32 *)address->pfield = (epicsInt32)update->value;
        record->udf = 0;
        recGblSetSevr(record, update->status, update->severity);
        if (isfinite(seconds) && seconds >= POSIX_TIME_AT_EPICS_EPOCH) {
            double whole = floor(seconds);
            record->time.secPastEpoch = (epicsUInt32)(whole - POSIX_TIME_AT_EPICS_EPOCH);
            record->time.nsec = (epicsUInt32)((seconds - whole) * 1e9);
            if (record->time.nsec >= 1000000000u)
                record->time.nsec = 999999999u;
        } else {
            epicsTimeGetCurrent(&record->time);
        }
        mask = recGblResetAlarms(record);
        db_post_events(record, address->pfield, mask | DBE_VALUE | DBE_LOG);
        dbScanUnlock(record);
    }
}

static void poster_thread(void *argument)
{
    Poster *self = argument;
    for (;;) {
        Py_ssize_t n, i;
        epicsEventMustWait(self->wake);
        lock(self);
        if (self->stop) {
            epicsMutexUnlock(self->lock);
            return;
        }
        n = self->n_pending;
        for (i = 0; i < n; i++) {
            int number = self->order[i];
            self->round_order[i] = number;
            self->round[i] = self->pending[number];
            self->is_pending[number] = 0;
        }
        self->n_pending = 0;
        self->busy = 1;
        epicsMutexUnlock(self->lock);
        post_round(self, n);
        lock(self);
        self->busy = 0;
        self->rounds += n > 0;
        self->posted += n;
        if (self->n_pending == 0)
            epicsEventSignal(self->idle);
        epicsMutexUnlock(self->lock);
    }
}

static void Poster_dealloc(Poster *self)
{
    if (self->thread != NULL) {
        lock(self);
        self->stop = 1;
        epicsMutexUnlock(self->lock);
        epicsEventSignal(self->wake);
        Py_BEGIN_ALLOW_THREADS
        epicsThreadMustJoin(self->thread);
        Py_END_ALLOW_THREADS
    }
    if (self->wake != NULL)
        epicsEventDestroy(self->wake);
    if (self->idle != NULL)
        epicsEventDestroy(self->idle);
    if (self->lock != NULL)
        epicsMutexDestroy(self->lock);
    free(self->addresses);
    free(self->pending);
    free(self->is_pending);
    free(self->order);
    free(self->round);
    free(self->round_order);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Poster_init(Poster *self, PyObject *args, PyObject *kwargs)
{
    PyObject *names, *sequence;
    Py_ssize_t i, size;
    epicsThreadOpts options = EPICS_THREAD_OPTS_INIT;
    if (self->thread != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Poster: already initialised");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O", &names))
        return -1;
    sequence = PySequence_Fast(names, "Poster(names): a sequence of record names");
    if (sequence == NULL)
        return -1;
    self->count = PySequence_Fast_GET_SIZE(sequence);
    if (self->count > 0x7fffffff) {
        Py_DECREF(sequence);
        PyErr_SetString(PyExc_ValueError, "Poster: too many records");
        return -1;
    }
    size = self->count ? self->count : 1;
    self->addresses = calloc(size, sizeof(DBADDR));
    self->pending = calloc(size, sizeof(Update));
    self->is_pending = calloc(size, 1);
    self->order = calloc(size, sizeof(int));
    self->round = calloc(size, sizeof(Update));
    self->round_order = calloc(size, sizeof(int));
    if (!self->addresses || !self->pending || !self->is_pending || !self->order || !self->round
            || !self->round_order) {
        Py_DECREF(sequence);
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < self->count; i++) {
        const char *name = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(sequence, i));
        DBADDR *address = &self->addresses[i];
        if (name == NULL) {
            Py_DECREF(sequence);
            return -1;
        }
        if (dbNameToAddr(name, address) != 0) {
            PyErr_Format(PyExc_KeyError, "no record %s", name);
            Py_DECREF(sequence);
            return -1;
        }
        if (address->field_type != DBF_DOUBLE && address->field_type != DBF_LONG) {
            PyErr_Format(PyExc_TypeError, "%s: VAL is neither DBF_DOUBLE nor DBF_LONG", name);
            Py_DECREF(sequence);
            return -1;
        }
    }
    Py_DECREF(sequence);
    self->lock = epicsMutexCreate();
    self->wake = epicsEventCreate(epicsEventEmpty);
    self->idle = epicsEventCreate(epicsEventFull);
    if (self->lock == NULL || self->wake == NULL || self->idle == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Poster: EPICS mutex or event not created");
        return -1;
    }
    options.priority = epicsThreadPriorityScanLow - 1;  /* cbLow's: what processes the records otherwise */
    options.stackSize = epicsThreadGetStackSize(epicsThreadStackMedium);
    options.joinable = 1;
    self->thread = epicsThreadCreateOpt("recordPost", poster_thread, self, &options);
    if (self->thread == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Poster: thread not created");
        return -1;
    }
    return 0;
}

static int get_buffer(PyObject *object, Py_buffer *view, const char *format, Py_ssize_t itemsize,
                      const char *what)
{
    if (PyObject_GetBuffer(object, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0)
        return -1;
    if (view->itemsize != itemsize || view->format == NULL || strcmp(view->format, format) != 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous array of '%s'", what, format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* post(indices int32[n], values float64[n], severities int16[n], statuses int16[n], stamps float64[n]) -> n
 * Into the pending set; the Poster's thread posts it. Every index is checked before anything is taken. */
static PyObject *Poster_post(Poster *self, PyObject *args)
{
    PyObject *objects[5];
    Py_buffer views[5];
    static const char *formats[5] = {"i", "d", "h", "h", "d"};
    static const Py_ssize_t sizes[5] = {4, 8, 2, 2, 8};
    static const char *names[5] = {"indices", "values", "severities", "statuses", "stamps"};
    Py_ssize_t n = -1, i, got = 0;
    if (self->thread == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Poster: not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOO", &objects[0], &objects[1], &objects[2], &objects[3], &objects[4]))
        return NULL;
    for (i = 0; i < 5; i++) {
        if (get_buffer(objects[i], &views[i], formats[i], sizes[i], names[i]) != 0)
            goto fail;
        got++;
        if (n < 0)
            n = views[i].len / sizes[i];
        else if (views[i].len / sizes[i] != n) {
            PyErr_SetString(PyExc_ValueError, "post: arrays of different lengths");
            goto fail;
        }
    }
    {
        const int *indices = views[0].buf;
        const double *values = views[1].buf;
        const short *severities = views[2].buf, *statuses = views[3].buf;
        const double *stamps = views[4].buf;
        Py_ssize_t bad = 0;
        for (i = 0; i < n; i++)
            bad += indices[i] < 0 || indices[i] >= self->count;
        if (bad) {
            PyErr_Format(PyExc_IndexError, "post: %zd record indices out of range (nothing posted)", bad);
            goto fail;
        }
        lock(self);
        for (i = 0; i < n; i++) {
            int number = indices[i];
            Update *update = &self->pending[number];
            update->value = values[i];
            update->severity = severities[i];
            update->status = statuses[i];
            update->stamp = stamps[i];
            if (!self->is_pending[number]) {
                self->is_pending[number] = 1;
                self->order[self->n_pending++] = number;
            }
        }
        if (self->n_pending > 0) {
            epicsEventMustTrigger(self->wake);
        }
        epicsMutexUnlock(self->lock);
    }
    for (i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    return PyLong_FromSsize_t(n);
fail:
    for (i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    return NULL;
}

/* wait_posted(timeout) -> bool: until everything handed to post() has been posted (tests, benchmarks). */
static PyObject *Poster_wait_posted(Poster *self, PyObject *args)
{
    double timeout, deadline;
    int done = 0;
    if (!PyArg_ParseTuple(args, "d", &timeout))
        return NULL;
    if (self->thread == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Poster: not initialised");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    {
        epicsTimeStamp now;
        epicsTimeGetCurrent(&now);
        deadline = now.secPastEpoch + now.nsec * 1e-9 + timeout;
        for (;;) {
            double left;
            lock(self);
            done = self->n_pending == 0 && !self->busy;
            epicsMutexUnlock(self->lock);
            epicsTimeGetCurrent(&now);
            left = deadline - (now.secPastEpoch + now.nsec * 1e-9);
            if (done || left <= 0)
                break;
            epicsEventWaitWithTimeout(self->idle, left < 0.1 ? left : 0.1);
        }
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(done);
}

/* counts() -> (rounds, records posted) since the Poster was made. */
static PyObject *Poster_counts(Poster *self, PyObject *unused)
{
    unsigned long long rounds = 0, posted = 0;
    if (self->lock != NULL) {
        lock(self);
        rounds = self->rounds;
        posted = self->posted;
        epicsMutexUnlock(self->lock);
    }
    return Py_BuildValue("(KK)", rounds, posted);
}

static PyMethodDef Poster_methods[] = {
    {"post", (PyCFunction)Poster_post, METH_VARARGS,
     "post(indices, values, severities, statuses, stamps) -> n: these updates to the Poster's thread (returns at once)."},
    {"wait_posted", (PyCFunction)Poster_wait_posted, METH_VARARGS,
     "wait_posted(timeout) -> bool: until every update handed over has been posted."},
    {"counts", (PyCFunction)Poster_counts, METH_NOARGS, "counts() -> (rounds, records) posted."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PosterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sf_bsread_writer.ca._recordpost.Poster",
    .tp_basicsize = sizeof(Poster),
    .tp_dealloc = (destructor)Poster_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Poster(record_names): ai/longin records updated in batches from C (see the module source).",
    .tp_methods = Poster_methods,
    .tp_init = (initproc)Poster_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_recordpost", "Scalar EPICS records updated in batches from C.", -1, NULL,
};

PyMODINIT_FUNC PyInit__recordpost(void)
{
    PyObject *m;
    if (PyType_Ready(&PosterType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PosterType);
    if (PyModule_AddObject(m, "Poster", (PyObject *)&PosterType) < 0) {
        Py_DECREF(&PosterType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddStringConstant(m, "EPICS_ABI", SF_EPICS_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
