/* The output file's I/O as h5py's fileobj driver calls it, in C: seek, tell, readinto, write.
 *
 * h5/journaled.py has the same methods in Python (the fallback, and the
 * reference: read it first); JournaledFile takes this type as its base when
 * it is built. The fileobj driver calls Python methods for every HDF5 read
 * and write (11 calls of ours per scalar channel in a later block, each of
 * them a few microseconds of interpreter): here each is one C call. The
 * journaling is the same: before a write replaces bytes held at the last
 * commit, the record (offset, length, crc32 seeded with the header's
 * checksum, the bytes before) is written to the journal with one pwrite,
 * the bytes taken from a read image (HDF5 read them since the commit) or
 * read with pread. What is rare stays in Python: the journal's room
 * (JournaledFile._room), commit, the end.
 *
 * The state lives in this object's slots, which JournaledFile reads and
 * sets under the names the Python fallback uses.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#define RECORD_HEADER_SIZE 20

typedef struct {
    PyObject_HEAD
    int fd;
    int journal_fd;
    long long position;
    long long size;          /* the file's real length (never shrunk while written) */
    long long wanted_size;   /* what HDF5 last made it */
    long long committed;     /* bytes below this are journaled before they are overwritten */
    long long journal_size;  /* bytes of the journal's header and records */
    long long journal_capacity;
    unsigned int seed;       /* the header's checksum: where the records' checksums start */
    long long writes;
    long long before_images_read;
    long long read_images_bytes;
    long long read_images_limit;
    PyObject *journaled;     /* dict offset -> length saved since the commit */
    PyObject *read_images;   /* dict offset -> bytes HDF5 read there since the commit */
    unsigned char *record;   /* a record's buffer, reused */
    size_t record_capacity;
} FileCore;

static int
pwrite_all(int fd, const unsigned char *data, size_t length, long long offset)
{
    size_t done = 0;
    while (done < length) {
        ssize_t n = pwrite(fd, data + done, length - done, (off_t)(offset + (long long)done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            errno = ENOSPC;
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

/* Read up to length bytes; what lies past the end of the file is zeros. */
static int
pread_full(int fd, unsigned char *into, size_t length, long long offset)
{
    size_t done = 0;
    while (done < length) {
        ssize_t n = pread(fd, into + done, length - done, (off_t)(offset + (long long)done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    if (done < length)
        memset(into + done, 0, length - done);
    return 0;
}

static void
put_u64(unsigned char *to, unsigned long long value)
{
    for (int i = 0; i < 8; i++)
        to[i] = (unsigned char)(value >> (8 * i));
}

static int
need_dicts(FileCore *self)
{
    if (self->journaled == NULL || self->read_images == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FileCore used before JournaledFile.__init__");
        return -1;
    }
    return 0;
}

/* Journal the committed bytes [offset, offset + length) before they are overwritten. */
static int
save(FileCore *self, long long offset, long long length)
{
    PyObject *key = PyLong_FromLongLong(offset);
    if (key == NULL)
        return -1;
    PyObject *saved = PyDict_GetItemWithError(self->journaled, key);  /* borrowed */
    if (saved != NULL && PyLong_AsLongLong(saved) >= length) {
        Py_DECREF(key);
        return 0;  /* this region's committed bytes are saved already */
    }
    if (PyErr_Occurred())
        goto fail;
    long long end = self->journal_size + RECORD_HEADER_SIZE + length;
    if (end > self->journal_capacity) {
        PyObject *done = PyObject_CallMethod((PyObject *)self, "_room", "L", end);
        if (done == NULL)
            goto fail;
        Py_DECREF(done);
    }
    size_t total = (size_t)(RECORD_HEADER_SIZE + length);
    if (total > self->record_capacity) {
        unsigned char *bigger = PyMem_Realloc(self->record, total);
        if (bigger == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        self->record = bigger;
        self->record_capacity = total;
    }
    unsigned char *record = self->record, *before = record + RECORD_HEADER_SIZE;
    PyObject *image = PyDict_GetItemWithError(self->read_images, key);  /* borrowed */
    if (image != NULL && PyBytes_Check(image) && PyBytes_GET_SIZE(image) >= length) {
        memcpy(before, PyBytes_AS_STRING(image), (size_t)length);
    } else {
        if (PyErr_Occurred())
            goto fail;
        if (pread_full(self->fd, before, (size_t)length, offset) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        self->before_images_read++;
    }
    put_u64(record, (unsigned long long)offset);
    put_u64(record + 8, (unsigned long long)length);
    uLong checksum = crc32_z((uLong)self->seed, record, 16);
    checksum = crc32_z(checksum, before, (size_t)length);
    for (int i = 0; i < 4; i++)
        record[16 + i] = (unsigned char)(checksum >> (8 * i));
    ssize_t written = pwrite(self->journal_fd, record, total, (off_t)self->journal_size);
    if (written < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    if ((size_t)written != total) {  /* a short write of a full disk: the record is torn, the write not done */
        PyObject *error = Py_BuildValue("(is)", ENOSPC, "journal write cut short");  /* errno as the Python core */
        if (error != NULL) {
            PyErr_SetObject(PyExc_OSError, error);
            Py_DECREF(error);
        }
        goto fail;
    }
    self->journal_size = end;
    PyObject *saved_length = PyLong_FromLongLong(length);
    if (saved_length == NULL || PyDict_SetItem(self->journaled, key, saved_length) < 0) {
        Py_XDECREF(saved_length);
        goto fail;
    }
    Py_DECREF(saved_length);
    Py_DECREF(key);
    return 0;
fail:
    Py_DECREF(key);
    return -1;
}

/* 1 if self.on_full() made room, 0 if not (or there is none), -1 with an exception set. errno is kept. */
static int
made_room(FileCore *self)
{
    int saved_errno = errno;
    PyObject *on_full = PyObject_GetAttrString((PyObject *)self, "on_full");
    if (on_full == NULL) {
        PyErr_Clear();
        errno = saved_errno;
        return 0;
    }
    int made = 0;
    if (on_full != Py_None) {
        PyObject *result = PyObject_CallNoArgs(on_full);
        made = result == NULL ? -1 : PyObject_IsTrue(result);
        Py_XDECREF(result);
    }
    Py_DECREF(on_full);
    errno = saved_errno;
    return made;
}

static PyObject *
FileCore_write(FileCore *self, PyObject *data)
{
    Py_buffer view;
    if (need_dicts(self) < 0 || PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    long long position = self->position, length = (long long)view.len;
    self->writes++;
    if (position < self->committed) {
        long long saved = self->committed - position < length ? self->committed - position : length;
        if (save(self, position, saved) < 0)
            goto fail;
    }
    if (pwrite_all(self->fd, view.buf, (size_t)length, position) < 0) {
        /* No room: the owner may make some (JournaledFile.on_full: its spare reserve), then once more. */
        if ((errno == ENOSPC || errno == EDQUOT) && made_room(self) > 0
                && pwrite_all(self->fd, view.buf, (size_t)length, position) == 0)
            goto written;
        if (!PyErr_Occurred())
            PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
written:
    PyBuffer_Release(&view);
    long long end = position + length;
    self->position = end;
    if (end > self->size)
        self->size = end;
    if (end > self->wanted_size)
        self->wanted_size = end;
    return PyLong_FromLongLong(length);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

static PyObject *
FileCore_readinto(FileCore *self, PyObject *buffer)
{
    Py_buffer view;
    if (need_dicts(self) < 0 || PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    long long position = self->position, wanted = (long long)view.len;
    if (pread_full(self->fd, view.buf, (size_t)wanted, position) < 0) {  /* past the end: zeros, as sec2 */
        PyBuffer_Release(&view);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->position = position + wanted;
    if (position < self->committed && self->read_images_bytes < self->read_images_limit) {
        /* Bytes as they are since the commit: the before-image of a write there (journaled.py says why). */
        long long kept = self->committed - position < wanted ? self->committed - position : wanted;
        PyObject *key = PyLong_FromLongLong(position);
        if (key == NULL)
            goto fail;
        PyObject *known = PyDict_GetItemWithError(self->read_images, key);  /* borrowed */
        if (known == NULL && PyErr_Occurred()) {
            Py_DECREF(key);
            goto fail;
        }
        if (known == NULL || !PyBytes_Check(known) || PyBytes_GET_SIZE(known) < kept) {
            PyObject *image = PyBytes_FromStringAndSize(view.buf, (Py_ssize_t)kept);
            if (image == NULL || PyDict_SetItem(self->read_images, key, image) < 0) {
                Py_XDECREF(image);
                Py_DECREF(key);
                goto fail;
            }
            Py_DECREF(image);
            self->read_images_bytes += kept;
        }
        Py_DECREF(key);
    }
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(wanted);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

static PyObject *
FileCore_seek(FileCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "seek(offset, whence=0)");
        return NULL;
    }
    long long offset = PyLong_AsLongLong(args[0]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    long whence = 0;
    if (nargs == 2) {
        whence = PyLong_AsLong(args[1]);
        if (whence == -1 && PyErr_Occurred())
            return NULL;
    }
    if (whence == 0)
        self->position = offset;
    else if (whence == 2)
        self->position = self->wanted_size + offset;
    else
        self->position += offset;
    return PyLong_FromLongLong(self->position);
}

static PyObject *
FileCore_tell(FileCore *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(self->position);
}

static void
FileCore_dealloc(FileCore *self)
{
    Py_CLEAR(self->journaled);
    Py_CLEAR(self->read_images);
    PyMem_Free(self->record);
    self->record = NULL;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
FileCore_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    FileCore *self = (FileCore *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->fd = self->journal_fd = -1;
    return (PyObject *)self;
}

static PyMethodDef FileCore_methods[] = {
    {"write", (PyCFunction)FileCore_write, METH_O, "Write at the position (committed bytes journaled first)."},
    {"readinto", (PyCFunction)FileCore_readinto, METH_O, "Read at the position (zeros past the end)."},
    {"seek", (PyCFunction)(void (*)(void))FileCore_seek, METH_FASTCALL, "seek(offset, whence=0)"},
    {"tell", (PyCFunction)FileCore_tell, METH_NOARGS, "The position."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef FileCore_members[] = {
    {"fd", T_INT, offsetof(FileCore, fd), 0, NULL},
    {"_journal_fd", T_INT, offsetof(FileCore, journal_fd), 0, NULL},
    {"_position", T_LONGLONG, offsetof(FileCore, position), 0, NULL},
    {"_size", T_LONGLONG, offsetof(FileCore, size), 0, NULL},
    {"_wanted_size", T_LONGLONG, offsetof(FileCore, wanted_size), 0, NULL},
    {"_committed", T_LONGLONG, offsetof(FileCore, committed), 0, NULL},
    {"_journal_size", T_LONGLONG, offsetof(FileCore, journal_size), 0, NULL},
    {"_journal_capacity", T_LONGLONG, offsetof(FileCore, journal_capacity), 0, NULL},
    {"_seed", T_UINT, offsetof(FileCore, seed), 0, NULL},
    {"writes", T_LONGLONG, offsetof(FileCore, writes), 0, NULL},
    {"before_images_read", T_LONGLONG, offsetof(FileCore, before_images_read), 0, NULL},
    {"_read_images_bytes", T_LONGLONG, offsetof(FileCore, read_images_bytes), 0, NULL},
    {"_read_images_limit", T_LONGLONG, offsetof(FileCore, read_images_limit), 0, NULL},
    {"_journaled", T_OBJECT_EX, offsetof(FileCore, journaled), 0, NULL},
    {"_read_images", T_OBJECT_EX, offsetof(FileCore, read_images), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FileCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sf_bsread_writer.h5._journaledio.FileCore",
    .tp_doc = "The compiled seek/tell/readinto/write of h5.journaled.JournaledFile.",
    .tp_basicsize = sizeof(FileCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = FileCore_new,
    .tp_dealloc = (destructor)FileCore_dealloc,
    .tp_methods = FileCore_methods,
    .tp_members = FileCore_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_journaledio", "The compiled I/O core of h5.journaled.JournaledFile.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__journaledio(void)
{
    if (PyType_Ready(&FileCoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FileCoreType);
    if (PyModule_AddObject(m, "FileCore", (PyObject *)&FileCoreType) < 0) {
        Py_DECREF(&FileCoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
