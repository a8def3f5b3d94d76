/* Scalar records updated in one call from C: value, alarm and timestamp, posted to monitors.
 *
 * Why: pythonSoftIOC updates a record by asking EPICS to process it (I/O Intr
 * scan), and the processing calls back into Python (the device support's
 * _process) under the GIL: ~60 us of Python per record update, which at
 * 1000 PVs x 10 Hz is most of a core. Here the gateway's apply loop hands
 * one batch per message (numpy arrays: which records, their values,
 * severities, statuses, timestamps) and C does, per record, what a record's
 * processing would have done to the fields clients read:
 *
 *     dbScanLock; VAL = value; UDF = 0; NSEV/NSTA = alarm; TIME = stamp;
 *     recGblResetAlarms (SEVR/STAT, posts them when they change);
 *     db_post_events(VAL, DBE_VALUE | DBE_LOG | alarm mask); dbScanUnlock
 *
 * with the GIL released. Only `ai` (DBF_DOUBLE VAL) and `longin` (DBF_LONG
 * VAL) records; the others keep pythonSoftIOC's path. The records are
 * resolved once (dbNameToAddr) when the Poster is made, after iocInit.
 *
 * Built only where epicscorelibs' headers are found (setup.py, optional);
 * the symbols come from libdbCore, which epicscorelibs loads RTLD_GLOBAL
 * before this module is imported (ca/ioc.py imports it after softioc).
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
#include "epicsTime.h"
#include "recGbl.h"

typedef struct {
    PyObject_HEAD
    DBADDR *addresses;
    Py_ssize_t count;
} Poster;

static void Poster_dealloc(Poster *self)
{
    free(self->addresses);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Poster_init(Poster *self, PyObject *args, PyObject *kwargs)
{
    PyObject *names, *sequence;
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "O", &names))
        return -1;
    sequence = PySequence_Fast(names, "Poster(names): a sequence of record names");
    if (sequence == NULL)
        return -1;
    self->count = PySequence_Fast_GET_SIZE(sequence);
    free(self->addresses);
    self->addresses = calloc(self->count ? self->count : 1, sizeof(DBADDR));
    if (self->addresses == NULL) {
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

/* post(indices int32[n], values float64[n], severities int16[n], statuses int16[n], stamps float64[n]) */
static PyObject *Poster_post(Poster *self, PyObject *args)
{
    PyObject *objects[5];
    Py_buffer views[5];
    static const char *formats[5] = {"i", "d", "h", "h", "d"};
    static const Py_ssize_t sizes[5] = {4, 8, 2, 2, 8};
    static const char *names[5] = {"indices", "values", "severities", "statuses", "stamps"};
    Py_ssize_t n = -1, i, got = 0, bad = 0;
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
        Py_BEGIN_ALLOW_THREADS
        for (i = 0; i < n; i++) {
            DBADDR *address;
            dbCommon *record;
            unsigned short mask;
            double seconds;
            if (indices[i] < 0 || indices[i] >= self->count) {
                bad++;
                continue;
            }
            address = &self->addresses[indices[i]];
            record = address->precord;
            dbScanLock(record);
            if (address->field_type == DBF_DOUBLE)
                *(epicsFloat64 *)address->pfield = values[i];
            else
                *(epicsInt32 *)address->pfield = (epicsInt32)values[i];
            record->udf = 0;
            recGblSetSevr(record, statuses[i], severities[i]);
            seconds = stamps[i];
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
        Py_END_ALLOW_THREADS
    }
    for (i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    if (bad) {
        PyErr_Format(PyExc_IndexError, "post: %zd record indices out of range", bad);
        return NULL;
    }
    return PyLong_FromSsize_t(n);
fail:
    for (i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    return NULL;
}

static PyMethodDef Poster_methods[] = {
    {"post", (PyCFunction)Poster_post, METH_VARARGS,
     "post(indices, values, severities, statuses, stamps) -> n: set and post these records (GIL released)."},
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
    return m;
}
