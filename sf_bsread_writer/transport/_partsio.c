/*
 * Whole ZeroMQ multipart messages in one call: the compiled half of transport/partsio.py.
 *
 * Why: a bsread message has 2 + 2N parts, and pyzmq's Python layer costs a few
 * microseconds per part, so at 500-2000 channels the parts, not the bytes,
 * limit every Python forwarder (docs/performance.md, issue 10). Here one call
 * receives a whole message into the packed form of bsread/parts.py (small parts
 * concatenated into one bytes object, part 1 apart, large parts kept
 * zero-copy in Part objects that own their zmq_msg_t), and one call sends one
 * (large Part objects by reference with zmq_msg_copy, everything else copied
 * as pyzmq does below its copy threshold).
 *
 * The same libzmq as pyzmq, never another one: a socket pointer used with a
 * second libzmq instance crashes. There are no libzmq headers or link here;
 * bind() resolves the dozen functions with dlsym from the handle of pyzmq's
 * own, already loaded, compiled module (dlopen with RTLD_NOLOAD) and checks
 * the version against zmq.zmq_version_info(). Anything unexpected raises
 * ImportError in bind(), and partsio.py falls back to pure pyzmq.
 *
 * The GIL is released while a call may block (receive, send); EINTR runs
 * Python's signal handlers and retries; errors raise pyzmq's own
 * zmq.ZMQError / zmq.Again. A send that fails after its first part went
 * raises MessageCutError (the class given to bind(): the socket is
 * mid-message and must be replaced); a receive that fails between parts
 * leaves RCVMORE set, which partsio.py reads to tell the same.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* zmq.h's zmq_msg_t: 64 opaque bytes, pointer aligned (ABI stable since libzmq 4.1). */
typedef struct { unsigned char _[64]; } __attribute__((aligned(sizeof(void *)))) zmsg_t;

#define Z_DONTWAIT 1
#define Z_SNDMORE 2

static int (*z_msg_init)(zmsg_t *);
static int (*z_msg_init_size)(zmsg_t *, size_t);
static int (*z_msg_send)(zmsg_t *, void *, int);
static int (*z_msg_recv)(zmsg_t *, void *, int);
static int (*z_msg_close)(zmsg_t *);
static void *(*z_msg_data)(zmsg_t *);
static size_t (*z_msg_size)(const zmsg_t *);
static int (*z_msg_more)(const zmsg_t *);
static int (*z_msg_copy)(zmsg_t *, zmsg_t *);
static int (*z_msg_move)(zmsg_t *, zmsg_t *);
static int (*z_errno)(void);
static void (*z_version)(int *, int *, int *);

static int bound = 0;
static PyObject *ZMQError = NULL;
static PyObject *Again = NULL;
static PyObject *MessageCutError = NULL;

/* ------------------------------------------------------------------ Part */

/* One received large part: owns its zmq_msg_t, exposes its bytes read-only (buffer protocol). */
typedef struct {
    PyObject_HEAD
    zmsg_t msg;
} Part;

static void part_dealloc(Part *self) {
    z_msg_close(&self->msg);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int part_getbuffer(Part *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, z_msg_data(&self->msg),
                             (Py_ssize_t)z_msg_size(&self->msg), 1, flags);
}

static Py_ssize_t part_length(Part *self) { return (Py_ssize_t)z_msg_size(&self->msg); }

static PyObject *part_bytes(Part *self, PyObject *unused) {
    return PyBytes_FromStringAndSize(z_msg_data(&self->msg), (Py_ssize_t)z_msg_size(&self->msg));
}

static PyObject *part_repr(Part *self) {
    return PyUnicode_FromFormat("<Part of %zd bytes>", (Py_ssize_t)z_msg_size(&self->msg));
}

static PyBufferProcs part_as_buffer = {(getbufferproc)part_getbuffer, NULL};
static PySequenceMethods part_as_sequence = {.sq_length = (lenfunc)part_length};
static PyMethodDef part_methods[] = {
    {"__bytes__", (PyCFunction)part_bytes, METH_NOARGS, "A copy of the part's bytes."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PartType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sf_bsread_writer.transport._partsio.Part",
    .tp_basicsize = sizeof(Part),
    .tp_dealloc = (destructor)part_dealloc,
    .tp_repr = (reprfunc)part_repr,
    .tp_as_sequence = &part_as_sequence,
    .tp_as_buffer = &part_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One received message part of at least the large-part size, zero-copy (read-only buffer).",
    .tp_methods = part_methods,
};

/* ------------------------------------------------------------------ errors */

static PyObject *raise_zmq(int err) {
    PyObject *cls = (err == EAGAIN) ? Again : ZMQError;
    PyObject *exc = PyObject_CallFunction(cls, "i", err);
    if (exc != NULL) {
        PyErr_SetObject(cls, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* The zmq socket pointer behind pyzmq's ``socket.underlying``; NULL with an exception set. */
static void *socket_of(PyObject *address) {
    if (!bound) {
        PyErr_SetString(PyExc_RuntimeError, "_partsio.bind() has not succeeded");
        return NULL;
    }
    void *socket = PyLong_AsVoidPtr(address);
    if (socket == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "socket address is NULL");
    return socket;
}

/* ------------------------------------------------------------------ bind */

static PyObject *py_bind(PyObject *module, PyObject *args) {
    const char *path;
    int want_major, want_minor, want_patch;
    PyObject *zmq_error, *again, *message_cut;
    if (!PyArg_ParseTuple(args, "s(iii)OOO", &path, &want_major, &want_minor, &want_patch, &zmq_error, &again,
                          &message_cut))
        return NULL;
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (handle == NULL) {
        PyErr_Format(PyExc_ImportError, "pyzmq's compiled module %s is not loaded: %s", path, dlerror());
        return NULL;
    }
#define RESOLVE(var, name)                                                                       \
    do {                                                                                         \
        *(void **)(&var) = dlsym(handle, name);                                                  \
        if (var == NULL) {                                                                       \
            PyErr_Format(PyExc_ImportError, "%s not found through %s", name, path);              \
            return NULL;                                                                         \
        }                                                                                        \
    } while (0)
    RESOLVE(z_msg_init, "zmq_msg_init");
    RESOLVE(z_msg_init_size, "zmq_msg_init_size");
    RESOLVE(z_msg_send, "zmq_msg_send");
    RESOLVE(z_msg_recv, "zmq_msg_recv");
    RESOLVE(z_msg_close, "zmq_msg_close");
    RESOLVE(z_msg_data, "zmq_msg_data");
    RESOLVE(z_msg_size, "zmq_msg_size");
    RESOLVE(z_msg_more, "zmq_msg_more");
    RESOLVE(z_msg_copy, "zmq_msg_copy");
    RESOLVE(z_msg_move, "zmq_msg_move");
    RESOLVE(z_errno, "zmq_errno");
    RESOLVE(z_version, "zmq_version");
#undef RESOLVE
    int major, minor, patch;
    z_version(&major, &minor, &patch);
    if (major != want_major || minor != want_minor || patch != want_patch || major < 4 ||
        (major == 4 && minor < 1)) {
        PyErr_Format(PyExc_ImportError, "libzmq found through %s is %d.%d.%d, pyzmq reports %d.%d.%d", path,
                     major, minor, patch, want_major, want_minor, want_patch);
        return NULL;
    }
    Py_XSETREF(ZMQError, Py_NewRef(zmq_error));
    Py_XSETREF(Again, Py_NewRef(again));
    Py_XSETREF(MessageCutError, Py_NewRef(message_cut));
    bound = 1;
    return Py_BuildValue("(iii)", major, minor, patch);
}

/* ------------------------------------------------------------------ receive */

/* Receive every part of one message into *msgs (grown as needed); 0 or -1 with an exception set. */
static int receive_all(void *socket, int flags, zmsg_t **msgs_out, Py_ssize_t *count_out) {
    Py_ssize_t capacity = 64, count = 0;
    zmsg_t *msgs = malloc(capacity * sizeof(zmsg_t));
    if (msgs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int err = 0, more = 1;
    while (more) {
        Py_BEGIN_ALLOW_THREADS
        while (more) {
            if (count == capacity) {
                zmsg_t *grown = realloc(msgs, 2 * capacity * sizeof(zmsg_t));
                if (grown == NULL) {
                    err = ENOMEM;
                    break;
                }
                msgs = grown;
                capacity *= 2;
            }
            z_msg_init(&msgs[count]);
            if (z_msg_recv(&msgs[count], socket, count == 0 ? flags : 0) < 0) {
                err = z_errno();
                z_msg_close(&msgs[count]);
                break;
            }
            more = z_msg_more(&msgs[count]);
            count++;
        }
        Py_END_ALLOW_THREADS
        if (err == EINTR) {
            err = 0;
            if (PyErr_CheckSignals() < 0)
                goto fail;
            continue; /* handlers ran: go on receiving where we were */
        }
        if (err != 0) {
            if (err == ENOMEM)
                PyErr_NoMemory();
            else
                raise_zmq(err);
            goto fail;
        }
    }
    *msgs_out = msgs;
    *count_out = count;
    return 0;
fail:
    for (Py_ssize_t i = 0; i < count; i++)
        z_msg_close(&msgs[i]);
    free(msgs);
    return -1;
}

/* bytes of msg, or `hint` itself (a new reference) when it holds exactly these bytes. */
static PyObject *bytes_or_hint(const char *data, Py_ssize_t size, PyObject *hint) {
    if (hint != Py_None && PyBytes_CheckExact(hint) && PyBytes_GET_SIZE(hint) == size &&
        memcmp(PyBytes_AS_STRING(hint), data, (size_t)size) == 0)
        return Py_NewRef(hint);
    return PyBytes_FromStringAndSize(data, size);
}

PyDoc_STRVAR(recv_doc,
"recv(socket_address, flags, n_prefix, header_hint, lengths_hint, large_bytes)\n"
"    -> (prefix, lengths, small, header, large)\n\n"
"Receive one whole multipart message. The first n_prefix parts come back as a tuple of bytes;\n"
"of the rest (the message proper): lengths = native int64 part lengths as bytes (lengths_hint\n"
"itself when equal), small = the parts below large_bytes except part 1, concatenated,\n"
"header = part 1 as bytes (header_hint itself when equal; None for a one-part message),\n"
"large = a tuple of Part objects (zero-copy) for the other parts of large_bytes or more.");

static PyObject *py_recv(PyObject *module, PyObject *args) {
    PyObject *address, *header_hint, *lengths_hint;
    int flags;
    Py_ssize_t n_prefix, large_bytes;
    if (!PyArg_ParseTuple(args, "OinOOn", &address, &flags, &n_prefix, &header_hint, &lengths_hint, &large_bytes))
        return NULL;
    void *socket = socket_of(address);
    if (socket == NULL)
        return NULL;
    zmsg_t *msgs;
    Py_ssize_t count;
    if (receive_all(socket, flags, &msgs, &count) < 0)
        return NULL;

    PyObject *prefix = NULL, *lengths = NULL, *small = NULL, *header = NULL, *large = NULL, *result = NULL;
    int64_t *sizes = NULL;
    Py_ssize_t n_pre = count < n_prefix ? count : n_prefix;
    Py_ssize_t n_rest = count - n_pre;

    prefix = PyTuple_New(n_pre);
    if (prefix == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n_pre; i++) {
        PyObject *part = PyBytes_FromStringAndSize(z_msg_data(&msgs[i]), (Py_ssize_t)z_msg_size(&msgs[i]));
        if (part == NULL)
            goto done;
        PyTuple_SET_ITEM(prefix, i, part);
    }

    sizes = malloc((n_rest > 0 ? n_rest : 1) * sizeof(int64_t));
    if (sizes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t small_total = 0, n_large = 0;
    for (Py_ssize_t j = 0; j < n_rest; j++) {
        int64_t size = (int64_t)z_msg_size(&msgs[n_pre + j]);
        sizes[j] = size;
        if (j == 1)
            continue;
        if (size >= large_bytes)
            n_large++;
        else
            small_total += size;
    }
    lengths = bytes_or_hint((const char *)sizes, n_rest * (Py_ssize_t)sizeof(int64_t), lengths_hint);
    if (lengths == NULL)
        goto done;

    small = PyBytes_FromStringAndSize(NULL, small_total);
    large = PyTuple_New(n_large);
    if (small == NULL || large == NULL)
        goto done;
    char *out = PyBytes_AS_STRING(small);
    Py_ssize_t k = 0;
    for (Py_ssize_t j = 0; j < n_rest; j++) {
        zmsg_t *msg = &msgs[n_pre + j];
        if (j == 1)
            continue;
        if (sizes[j] >= large_bytes) {
            Part *part = PyObject_New(Part, &PartType);
            if (part == NULL)
                goto done;
            z_msg_init(&part->msg);
            z_msg_move(&part->msg, msg);
            PyTuple_SET_ITEM(large, k++, (PyObject *)part);
        } else {
            memcpy(out, z_msg_data(msg), (size_t)sizes[j]);
            out += sizes[j];
        }
    }
    if (n_rest > 1) {
        header = bytes_or_hint(z_msg_data(&msgs[n_pre + 1]), (Py_ssize_t)sizes[1], header_hint);
        if (header == NULL)
            goto done;
    } else {
        header = Py_NewRef(Py_None);
    }
    result = PyTuple_Pack(5, prefix, lengths, small, header, large);
done:
    for (Py_ssize_t i = 0; i < count; i++)
        z_msg_close(&msgs[i]); /* parts moved into a Part are empty here: closing them is a no-op */
    free(msgs);
    free(sizes);
    Py_XDECREF(prefix);
    Py_XDECREF(lengths);
    Py_XDECREF(small);
    Py_XDECREF(header);
    Py_XDECREF(large);
    return result;
}

/* ------------------------------------------------------------------ send */

/* What one outgoing part is: a copied buffer, or a received Part sent by reference. */
typedef struct {
    const char *data;
    Py_ssize_t size;
    Part *part; /* by reference when not NULL */
} OutPart;

/* Send out[0..n) as one message; 0, or -1 with an exception set. */
static int send_all(void *socket, OutPart *out, Py_ssize_t n, int first_flags) {
    Py_ssize_t i = 0;
    int err = 0;
    zmsg_t msg;
    while (i < n) {
        /* Copies of by-reference parts are made with the GIL held: zmq_msg_copy marks its source shared. */
        int copy_now = out[i].part != NULL;
        if (copy_now) {
            z_msg_init(&msg);
            if (z_msg_copy(&msg, &out[i].part->msg) < 0) {
                err = z_errno();
                z_msg_close(&msg);
                break;
            }
        }
        Py_BEGIN_ALLOW_THREADS
        for (; i < n; i++) {
            if (out[i].part != NULL && !copy_now)
                break; /* back under the GIL for the copy */
            if (out[i].part == NULL) {
                if (z_msg_init_size(&msg, (size_t)out[i].size) < 0) {
                    err = z_errno();
                    break;
                }
                if (out[i].size)
                    memcpy(z_msg_data(&msg), out[i].data, (size_t)out[i].size);
            }
            copy_now = 0;
            int flags = (i == 0 ? first_flags : 0) | (i + 1 < n ? Z_SNDMORE : 0);
            int rc;
            while ((rc = z_msg_send(&msg, socket, flags)) < 0 && z_errno() == EINTR && i > 0)
                ; /* the rest of a message whose first part went: keep at it */
            if (rc < 0) {
                err = z_errno();
                z_msg_close(&msg);
                break;
            }
        }
        Py_END_ALLOW_THREADS
        if (err == EINTR) { /* the first part, interrupted: run the signal handlers, then try again */
            err = 0;
            if (PyErr_CheckSignals() < 0)
                return -1;
            continue;
        }
        if (err != 0)
            break;
    }
    if (err != 0) {
        if (i > 0) /* the socket is mid-message: the next send would be glued onto this one */
            PyErr_Format(MessageCutError, "send cut in the middle of a message: ZeroMQ error %d after %zd of %zd "
                         "parts were sent (%s); this socket must be closed and replaced", err, i, n, strerror(err));
        else
            raise_zmq(err);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(send_doc,
"send(socket_address, first_flags, prefix, lengths, small, header, large, large_bytes)\n\n"
"Send prefix (a tuple of bytes-like parts) and then the message packed as recv() returns it,\n"
"as one multipart message. first_flags apply to the first part only (1 = DONTWAIT: zmq.Again\n"
"when it cannot go, and then nothing was sent). Part objects go by reference, the rest is copied.");

static PyObject *py_send(PyObject *module, PyObject *args) {
    PyObject *address, *prefix_in, *lengths_obj, *small_obj, *header_obj, *large_in;
    int first_flags;
    Py_ssize_t large_bytes;
    if (!PyArg_ParseTuple(args, "OiOOOOOn", &address, &first_flags, &prefix_in, &lengths_obj, &small_obj,
                          &header_obj, &large_in, &large_bytes))
        return NULL;
    void *socket = socket_of(address);
    if (socket == NULL)
        return NULL;
    PyObject *prefix = PySequence_Tuple(prefix_in);
    PyObject *large = PySequence_Tuple(large_in);
    Py_buffer lengths_view = {0}, small_view = {0}, header_view = {0};
    Py_buffer *views = NULL; /* prefix parts, then large parts that are not Part objects */
    Py_ssize_t n_views = 0;
    OutPart *out = NULL;
    PyObject *result = NULL;
    if (prefix == NULL || large == NULL)
        goto done;
    if (PyObject_GetBuffer(lengths_obj, &lengths_view, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(small_obj, &small_view, PyBUF_SIMPLE) < 0)
        goto done;
    if (header_obj != Py_None && PyObject_GetBuffer(header_obj, &header_view, PyBUF_SIMPLE) < 0)
        goto done;
    if (lengths_view.len % (Py_ssize_t)sizeof(int64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "lengths must be native int64s");
        goto done;
    }
    Py_ssize_t n_prefix = PyTuple_GET_SIZE(prefix), n_large = PyTuple_GET_SIZE(large);
    Py_ssize_t n_rest = lengths_view.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t n = n_prefix + n_rest;
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "a message has at least one part");
        goto done;
    }
    views = calloc((size_t)(n_prefix + n_large + 1), sizeof(Py_buffer));
    out = calloc((size_t)n, sizeof(OutPart));
    if (views == NULL || out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_prefix; i++) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(prefix, i), &views[n_views], PyBUF_SIMPLE) < 0)
            goto done;
        out[i].data = views[n_views].buf;
        out[i].size = views[n_views].len;
        n_views++;
    }
    const int64_t *sizes = lengths_view.buf;
    const char *small_at = small_view.buf;
    Py_ssize_t small_left = small_view.len, k = 0;
    for (Py_ssize_t j = 0; j < n_rest; j++) {
        OutPart *o = &out[n_prefix + j];
        Py_ssize_t size = (Py_ssize_t)sizes[j];
        if (size < 0) {
            PyErr_SetString(PyExc_ValueError, "negative part length");
            goto done;
        }
        if (j == 1) {
            if (header_obj == Py_None || header_view.len != size) {
                PyErr_SetString(PyExc_ValueError, "the header does not match part 1's length");
                goto done;
            }
            o->data = header_view.buf;
            o->size = size;
        } else if (size >= large_bytes) {
            if (k >= n_large) {
                PyErr_SetString(PyExc_ValueError, "fewer large parts than the lengths say");
                goto done;
            }
            PyObject *item = PyTuple_GET_ITEM(large, k++);
            if (Py_IS_TYPE(item, &PartType)) {
                o->part = (Part *)item;
                o->size = (Py_ssize_t)z_msg_size(&o->part->msg);
            } else {
                if (PyObject_GetBuffer(item, &views[n_views], PyBUF_SIMPLE) < 0)
                    goto done;
                o->data = views[n_views].buf;
                o->size = views[n_views].len;
                n_views++;
            }
            if (o->size != size) {
                PyErr_SetString(PyExc_ValueError, "a large part does not match its length");
                goto done;
            }
        } else {
            if (size > small_left) {
                PyErr_SetString(PyExc_ValueError, "the small parts are shorter than the lengths say");
                goto done;
            }
            o->data = small_at;
            o->size = size;
            small_at += size;
            small_left -= size;
        }
    }
    if (k != n_large || small_left != 0) {
        PyErr_SetString(PyExc_ValueError, "the packed parts do not match the lengths");
        goto done;
    }
    if (send_all(socket, out, n, first_flags) == 0)
        result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t i = 0; i < n_views; i++)
        PyBuffer_Release(&views[i]);
    if (lengths_view.obj)
        PyBuffer_Release(&lengths_view);
    if (small_view.obj)
        PyBuffer_Release(&small_view);
    if (header_view.obj)
        PyBuffer_Release(&header_view);
    free(views);
    free(out);
    Py_XDECREF(prefix);
    Py_XDECREF(large);
    return result;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"bind", py_bind, METH_VARARGS,
     "bind(pyzmq_module_path, (major, minor, patch), ZMQError, Again, MessageCutError): resolve libzmq through "
     "pyzmq's module."},
    {"recv", py_recv, METH_VARARGS, recv_doc},
    {"send", py_send, METH_VARARGS, send_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_partsio", "Whole ZeroMQ multipart messages in one call (see transport/partsio.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__partsio(void) {
    if (PyType_Ready(&PartType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "Part", (PyObject *)&PartType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
