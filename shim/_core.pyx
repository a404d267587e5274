# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled data plane (issue 17): pass-through requests without the interpreter.

One ``Core`` per proxy. It reads the frontend ROUTER and the backends' DEALER sockets
itself (libzmq's C API, resolved at import time from the libzmq that pyzmq has already
loaded, so the socket handles pyzmq created are valid here), and for each request that
it is sure about it splits the envelope, scans the JSON for the routing fields, looks
up the tables Python pushed (``set_tables``, ``set_owners``), sends ``[corr, b"", payload]`` to the
chosen backend and later sends the reply back to the client, all in C.

Anything it is not sure about goes up to Python unchanged ("punted"): the frames as
``recv_frames_fd`` would have returned them (for ``Proxy._on_frames``), backend replies
with ids it does not own (for ``BackendPool._on_reply``), and its own requests that
need Python to finish them (a reply it cannot vouch for, a passed deadline, a reply
that must wait in the backlog) as ``Resume`` tuples (see ``shim.fastpath``).

Nothing here decides semantics: Python computes every table (which actions may go
fast, their deadlines, the weight buckets) from the Runtime, and the differential
test (tests/integration/test_fastpath_differential.py, and test_fastpath_ownership.py
with model ownership on) checks that both paths answer the same.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free, realloc
from libc.string cimport memcpy, memcmp, memset, strstr
from libc.stdio cimport FILE, fopen, fgets, fclose
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC


cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    int RTLD_NOW
    int RTLD_NOLOAD


ctypedef struct zmq_msg_t:
    uint64_t _pad[8]

ctypedef int (*f_msg_init_t)(zmq_msg_t *) noexcept nogil
ctypedef int (*f_msg_recv_t)(zmq_msg_t *, void *, int) noexcept nogil
ctypedef int (*f_msg_send_t)(zmq_msg_t *, void *, int) noexcept nogil
ctypedef int (*f_msg_close_t)(zmq_msg_t *) noexcept nogil
ctypedef void *(*f_msg_data_t)(zmq_msg_t *) noexcept nogil
ctypedef size_t (*f_msg_size_t)(const zmq_msg_t *) noexcept nogil
ctypedef int (*f_msg_more_t)(const zmq_msg_t *) noexcept nogil
ctypedef int (*f_msg_get_t)(const zmq_msg_t *, int) noexcept nogil
ctypedef int (*f_msg_copy_t)(zmq_msg_t *, zmq_msg_t *) noexcept nogil
ctypedef int (*f_send_t)(void *, const void *, size_t, int) noexcept nogil
ctypedef int (*f_errno_t)() noexcept nogil

cdef f_msg_init_t z_msg_init = NULL
cdef f_msg_recv_t z_msg_recv = NULL
cdef f_msg_send_t z_msg_send = NULL
cdef f_msg_close_t z_msg_close = NULL
cdef f_msg_data_t z_msg_data = NULL
cdef f_msg_size_t z_msg_size = NULL
cdef f_msg_more_t z_msg_more = NULL
cdef f_msg_get_t z_msg_get = NULL
cdef f_msg_copy_t z_msg_copy = NULL
cdef f_send_t z_send = NULL
cdef f_errno_t z_errno = NULL

# zmq.h constants (stable ABI since libzmq 3).
DEF ZMQ_DONTWAIT = 1
DEF ZMQ_SNDMORE = 2
DEF ZMQ_SRCFD = 2
DEF Z_EAGAIN = 11
DEF MAX_FRAMES = 16      # an envelope longer than this goes up to Python
DEF MAX_DEPTH = 32       # deeper JSON goes up to Python
DEF NBUCKETS = 10000     # shim.routing.BUCKETS
DEF NLAT = 14            # shim.metrics.LATENCY_BUCKETS + the +Inf bucket
DEF MAX_BACKENDS = 16
DEF MAX_ACTIONS = 16
DEF MAX_MODELS = 64      # models the owner table names (shim.fastpath assigns them ids)
DEF MAX_PREFS = 64       # model_pref values the owner table knows
DEF MAX_OK_STATUS = 8    # reply statuses that say a model was served (ownership.OK_STATUSES)
DEF CORR_MARK = 0x8000000000000000  # the core's ids; the pool counts up from 1
DEF FAST_REPLY_MAX = 65536  # larger replies are handed to Python (see _read_back)
DEF HOLD_MAX = 1048576   # bytes handed up to Python per call, at most (one message over it)

cdef double LAT_BOUNDS[13]
LAT_BOUNDS[:] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0]


def _find_libzmq():
    """The path of the libzmq pyzmq loaded (from /proc/self/maps)."""
    import zmq.backend.cython._zmq  # noqa: F401  (loads libzmq)
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            parts = line.split()
            path = parts[len(parts) - 1] if len(parts) >= 6 else b""
            if path.startswith(b"/") and b"libzmq" in path.rpartition(b"/")[2]:
                return path
    return None


cdef void *_sym(void *lib, const char *name) except NULL:
    cdef void *p = dlsym(lib, name)
    if p == NULL:
        raise ImportError(f"libzmq has no symbol {name.decode()}")
    return p


cdef _load():
    global z_msg_init, z_msg_recv, z_msg_send, z_msg_close, z_msg_data, z_msg_size
    global z_msg_more, z_msg_get, z_msg_copy, z_send, z_errno
    path = _find_libzmq()
    cdef void *lib = NULL
    if path is not None:
        lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD)  # the instance already loaded, never another
    if lib == NULL:
        lib = dlopen(NULL, RTLD_NOW)  # a pyzmq linked against a global system libzmq
    if lib == NULL or dlsym(lib, b"zmq_msg_recv") == NULL:
        raise ImportError("cannot find the libzmq that pyzmq loaded")
    z_msg_init = <f_msg_init_t>_sym(lib, b"zmq_msg_init")
    z_msg_recv = <f_msg_recv_t>_sym(lib, b"zmq_msg_recv")
    z_msg_send = <f_msg_send_t>_sym(lib, b"zmq_msg_send")
    z_msg_close = <f_msg_close_t>_sym(lib, b"zmq_msg_close")
    z_msg_data = <f_msg_data_t>_sym(lib, b"zmq_msg_data")
    z_msg_size = <f_msg_size_t>_sym(lib, b"zmq_msg_size")
    z_msg_more = <f_msg_more_t>_sym(lib, b"zmq_msg_more")
    z_msg_get = <f_msg_get_t>_sym(lib, b"zmq_msg_get")
    z_msg_copy = <f_msg_copy_t>_sym(lib, b"zmq_msg_copy")
    z_send = <f_send_t>_sym(lib, b"zmq_send")
    z_errno = <f_errno_t>_sym(lib, b"zmq_errno")


_load()


cdef inline double now_s() noexcept nogil:
    """CLOCK_MONOTONIC in seconds: the clock of time.perf_counter() and the loop's."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# -- the strict JSON scanner --------------------------------------------------------------
# It accepts a subset of what msgspec accepts (so "valid" here is valid there too); what
# it rejects goes up to Python, which decides with msgspec itself.

cdef inline size_t skip_ws(const uint8_t *p, size_t i, size_t n) noexcept nogil:
    while i < n and (p[i] == 32 or p[i] == 9 or p[i] == 10 or p[i] == 13):
        i += 1
    return i


cdef inline int hexval(uint8_t c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


cdef size_t scan_string(const uint8_t *p, size_t i, size_t n, int *escaped) noexcept nogil:
    """``p[i]`` is the opening quote: the index after the closing one, or 0 (reject)."""
    cdef uint8_t c
    cdef int k, u, h
    i += 1
    while i < n:
        c = p[i]
        if c == 34:
            return i + 1
        if c == 92:
            escaped[0] = 1
            if i + 1 >= n:
                return 0
            c = p[i + 1]
            if c == 117:  # \uXXXX, no surrogates (msgspec's handling of lone ones varies)
                if i + 6 > n:
                    return 0
                u = 0
                for k in range(4):
                    h = hexval(p[i + 2 + k])
                    if h < 0:
                        return 0
                    u = u * 16 + h
                if 0xD800 <= u <= 0xDFFF or u == 0:
                    return 0
                i += 6
            elif c == 34 or c == 92 or c == 47 or c == 98 or c == 102 or c == 110 \
                    or c == 114 or c == 116:
                i += 2
            else:
                return 0
        elif c < 32:
            return 0
        elif c < 128:
            i += 1
        elif 0xC2 <= c <= 0xDF:  # well-formed UTF-8 only (RFC 3629)
            if i + 1 >= n or (p[i + 1] & 0xC0) != 0x80:
                return 0
            i += 2
        elif 0xE0 <= c <= 0xEF:
            if i + 2 >= n or (p[i + 1] & 0xC0) != 0x80 or (p[i + 2] & 0xC0) != 0x80:
                return 0
            if (c == 0xE0 and p[i + 1] < 0xA0) or (c == 0xED and p[i + 1] >= 0xA0):
                return 0
            i += 3
        elif 0xF0 <= c <= 0xF4:
            if i + 3 >= n or (p[i + 1] & 0xC0) != 0x80 or (p[i + 2] & 0xC0) != 0x80 \
                    or (p[i + 3] & 0xC0) != 0x80:
                return 0
            if (c == 0xF0 and p[i + 1] < 0x90) or (c == 0xF4 and p[i + 1] >= 0x90):
                return 0
            i += 4
        else:
            return 0
    return 0


cdef size_t scan_number(const uint8_t *p, size_t i, size_t n) noexcept nogil:
    cdef size_t start, digits
    if i < n and p[i] == 45:
        i += 1
    start = i
    while i < n and 48 <= p[i] <= 57:
        i += 1
    digits = i - start
    if digits == 0 or digits > 15 or (digits > 1 and p[start] == 48):
        return 0
    if i < n and p[i] == 46:
        i += 1
        start = i
        while i < n and 48 <= p[i] <= 57:
            i += 1
        if i == start or i - start > 15:
            return 0
    if i < n and (p[i] == 101 or p[i] == 69):
        i += 1
        if i < n and (p[i] == 43 or p[i] == 45):
            i += 1
        start = i
        while i < n and 48 <= p[i] <= 57:
            i += 1
        if i == start or i - start > 2:
            return 0
    return i


cdef size_t scan_value(const uint8_t *p, size_t i, size_t n, int depth) noexcept nogil:
    """A JSON value at ``p[i]`` (no leading space): the index after it, or 0 (reject)."""
    cdef int esc = 0
    cdef uint8_t c
    if i >= n or depth > MAX_DEPTH:
        return 0
    c = p[i]
    if c == 34:
        return scan_string(p, i, n, &esc)
    if c == 123 or c == 91:
        i = skip_ws(p, i + 1, n)
        if i < n and p[i] == (125 if c == 123 else 93):
            return i + 1
        while True:
            if c == 123:
                if i >= n or p[i] != 34:
                    return 0
                i = scan_string(p, i, n, &esc)
                if i == 0:
                    return 0
                i = skip_ws(p, i, n)
                if i >= n or p[i] != 58:
                    return 0
                i = skip_ws(p, i + 1, n)
            i = scan_value(p, i, n, depth + 1)
            if i == 0:
                return 0
            i = skip_ws(p, i, n)
            if i >= n:
                return 0
            if p[i] == 44:
                i = skip_ws(p, i + 1, n)
                continue
            if p[i] == (125 if c == 123 else 93):
                return i + 1
            return 0
    if c == 116:
        return i + 4 if i + 4 <= n and memcmp(p + i, b"true", 4) == 0 else 0
    if c == 102:
        return i + 5 if i + 5 <= n and memcmp(p + i, b"false", 5) == 0 else 0
    if c == 110:
        return i + 4 if i + 4 <= n and memcmp(p + i, b"null", 4) == 0 else 0
    if c == 45 or 48 <= c <= 57:
        return scan_number(p, i, n)
    return 0


cdef int is_json_object(const uint8_t *p, size_t n) noexcept nogil:
    """1 when ``p`` is certainly one JSON object (msgspec agrees), else 0 (unsure)."""
    cdef size_t i = skip_ws(p, 0, n)
    if i >= n or p[i] != 123:
        return 0
    i = scan_value(p, i, n, 0)
    return 1 if i != 0 and skip_ws(p, i, n) == n else 0


ctypedef struct Fields:
    const uint8_t *action
    size_t action_len
    int action_kind      # 0 absent, 1 plain string, 2 anything else
    const uint8_t *sticky
    size_t sticky_len
    int sticky_kind      # 0 absent, 1 plain string, 2 integer, 3 anything else
    int punt_key         # a key that needs Python (command, request_id, conversation_id...)
    const uint8_t *pref
    size_t pref_len
    int pref_kind        # model_pref: 0 absent, 1 plain string, 2 null, 3 anything else
    int model_key        # model_id, model_name or model_ids at the top level


cdef int key_is(const uint8_t *k, size_t klen, const char *name, size_t nlen) noexcept nogil:
    return klen == nlen and memcmp(k, name, nlen) == 0


cdef int scan_request(const uint8_t *p, size_t n, const uint8_t *sticky_key, size_t sticky_n,
                      Fields *f) noexcept nogil:
    """The top-level object's routing fields; 0 when the request must go up to Python
    (not certainly one JSON object, escapes in keys, duplicate routing keys...)."""
    cdef size_t i, ks, ke, vs, ve
    cdef int esc
    memset(f, 0, sizeof(Fields))
    i = skip_ws(p, 0, n)
    if i >= n or p[i] != 123:
        return 0
    i = skip_ws(p, i + 1, n)
    if i < n and p[i] == 125:
        return 0 if skip_ws(p, i + 1, n) != n else 1
    while True:
        if i >= n or p[i] != 34:
            return 0
        esc = 0
        ks = i + 1
        i = scan_string(p, i, n, &esc)
        if i == 0 or esc:
            return 0
        ke = i - 1
        i = skip_ws(p, i, n)
        if i >= n or p[i] != 58:
            return 0
        vs = skip_ws(p, i + 1, n)
        ve = scan_value(p, vs, n, 1)
        if ve == 0:
            return 0
        if key_is(p + ks, ke - ks, b"action", 6):
            if f.action_kind:
                return 0
            esc = 0
            if p[vs] == 34 and scan_string(p, vs, n, &esc) == ve and not esc:
                f.action, f.action_len, f.action_kind = p + vs + 1, ve - vs - 2, 1
            else:
                f.action_kind = 2
        elif sticky_n and key_is(p + ks, ke - ks, <const char *>sticky_key, sticky_n):
            if f.sticky_kind:
                return 0
            esc = 0
            if p[vs] == 34 and scan_string(p, vs, n, &esc) == ve and not esc:
                f.sticky, f.sticky_len, f.sticky_kind = p + vs + 1, ve - vs - 2, 1
            elif p[vs] == 45 or 48 <= p[vs] <= 57:
                f.sticky, f.sticky_len, f.sticky_kind = p + vs, ve - vs, 2
                for ks in range(vs, ve):
                    if not (p[ks] == 45 or 48 <= p[ks] <= 57):
                        f.sticky_kind = 3  # a float: str(float) is Python's business
            else:
                f.sticky_kind = 3
        if key_is(p + ks, ke - ks, b"model_pref", 10):
            if f.pref_kind:
                return 0
            esc = 0
            if p[vs] == 34 and scan_string(p, vs, n, &esc) == ve and not esc:
                f.pref, f.pref_len, f.pref_kind = p + vs + 1, ve - vs - 2, 1
            elif ve - vs == 4 and memcmp(p + vs, b"null", 4) == 0:
                f.pref_kind = 2
            else:
                f.pref_kind = 3
        elif (key_is(p + ks, ke - ks, b"model_id", 8) or key_is(p + ks, ke - ks, b"model_name", 10)
                or key_is(p + ks, ke - ks, b"model_ids", 9)):
            f.model_key = 1
        if (key_is(p + ks, ke - ks, b"command", 7) or key_is(p + ks, ke - ks, b"request_id", 10)
                or key_is(p + ks, ke - ks, b"conversation_id", 15)):
            f.punt_key = 1
        i = skip_ws(p, ve, n)
        if i >= n:
            return 0
        if p[i] == 44:
            i = skip_ws(p, i + 1, n)
            continue
        if p[i] == 125:
            return 1 if skip_ws(p, i + 1, n) == n else 0
        return 0


def json_object(bytes data):
    """Whether the scanner is sure ``data`` is one JSON object (for tests)."""
    return bool(is_json_object(<const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)))


def routing_fields(bytes data, bytes sticky_key=b""):
    """``(action, sticky)`` as the scanner reads them, or None when it would punt (tests)."""
    cdef Fields f
    if not scan_request(<const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                        <const uint8_t *>PyBytes_AS_STRING(sticky_key),
                        PyBytes_GET_SIZE(sticky_key), &f):
        return None
    action = PyBytes_FromStringAndSize(<const char *>f.action, f.action_len) \
        if f.action_kind == 1 else f.action_kind
    sticky = PyBytes_FromStringAndSize(<const char *>f.sticky, f.sticky_len) \
        if f.sticky_kind in (1, 2) else f.sticky_kind
    pref = PyBytes_FromStringAndSize(<const char *>f.pref, f.pref_len) \
        if f.pref_kind == 1 else f.pref_kind
    return action, sticky, bool(f.punt_key), pref, bool(f.model_key)


cdef int reply_status(const uint8_t *p, size_t n, list ok) noexcept:
    """A reply object's top-level ``status`` (the last one, as a decoder keeps): 1 when
    it is a plain string in ``ok``, 0 when it is anything else or absent, -1 when unsure
    (an escaped string: Python reads it). ``p`` is certainly one JSON object."""
    cdef size_t i, ks, ke, vs, ve
    cdef int esc, found = 0
    cdef bytes want
    i = skip_ws(p, 0, n)
    i = skip_ws(p, i + 1, n)
    if i < n and p[i] == 125:
        return 0
    while i < n and p[i] == 34:
        esc = 0
        ks = i + 1
        i = scan_string(p, i, n, &esc)
        if i == 0:
            return -1
        ke = i - 1
        i = skip_ws(p, i, n)
        vs = skip_ws(p, i + 1, n)
        ve = scan_value(p, vs, n, 1)
        if ve == 0:
            return -1
        if key_is(p + ks, ke - ks, b"status", 6) or (esc and ke - ks > 6):
            if esc:
                return -1  # an escaped key might read "status"
            found = 0
            esc = 0
            if p[vs] == 34 and scan_string(p, vs, n, &esc) == ve:
                if esc:
                    return -1
                for want in ok:
                    if <size_t>PyBytes_GET_SIZE(want) == ve - vs - 2 and memcmp(
                            PyBytes_AS_STRING(want), p + vs + 1, ve - vs - 2) == 0:
                        found = 1
                        break
        i = skip_ws(p, ve, n)
        if i < n and p[i] == 44:
            i = skip_ws(p, i + 1, n)
    return found


def status_ok(bytes data, list ok):
    """``reply_status`` (tests): 1 served, 0 not, -1 unsure."""
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(data)
    if not is_json_object(p, PyBytes_GET_SIZE(data)):
        return -1
    return reply_status(p, PyBytes_GET_SIZE(data), ok)


cdef list take_frames(zmq_msg_t *msgs, int nf, int more, void *sock, size_t *held):
    """A message handed up to Python: its ``nf`` frames received so far (closed here),
    then, while ``more``, the rest of it from ``sock``, as bytes; their size is added to
    ``held`` (what one pump hands up is bounded by HOLD_MAX)."""
    cdef zmq_msg_t extra
    cdef int k
    frames = [PyBytes_FromStringAndSize(<const char *>z_msg_data(&msgs[k]),
                                        z_msg_size(&msgs[k])) for k in range(nf)]
    for k in range(nf):
        z_msg_close(&msgs[k])
    while more:
        z_msg_init(&extra)
        z_msg_recv(&extra, sock, ZMQ_DONTWAIT)
        more = z_msg_more(&extra)
        frames.append(PyBytes_FromStringAndSize(<const char *>z_msg_data(&extra),
                                                z_msg_size(&extra)))
        z_msg_close(&extra)
    for k in range(len(frames)):
        held[0] += PyBytes_GET_SIZE(frames[k])
    return frames


# -- requests in flight --------------------------------------------------------------------

ctypedef struct Env:
    # One client's envelope (identity frames up to and including the delimiter).
    Env *next
    int fd
    size_t nframes
    size_t lens[MAX_FRAMES]
    char *data


ctypedef struct Slot:
    uint32_t gen
    int used
    int backend
    int action
    int model            # the owner table's model id, or -1 (routed by the weights)
    double started
    double deadline
    uint64_t hash
    char *payload        # a copy, for duplicate joins and for Python to resume with
    size_t payload_len
    Env *envs            # the first copy's envelope, then those that joined it


cdef uint64_t fnv1a(const uint8_t *p, size_t n) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL
    cdef size_t i
    for i in range(n):
        h = (h ^ p[i]) * 1099511628211ULL
    return h


cdef void free_envs(Env *e) noexcept nogil:
    cdef Env *nx
    while e != NULL:
        nx = e.next
        free(e.data)
        free(e)
        e = nx


cdef class Core:
    """The frontend and backend sockets' fast path. Single-threaded: called from the
    event loop only. Every method is O(batch) with no per-request Python object, except
    for what it hands up to Python."""

    cdef void *front
    cdef void *backs[MAX_BACKENDS]
    cdef int nbackends
    cdef size_t max_request
    cdef size_t max_reply
    cdef double window_s
    cdef int dedup
    # tables (set_tables)
    cdef int bounds[MAX_BACKENDS]
    cdef int nbounds
    cdef int table_backend[MAX_BACKENDS]   # bucket range -> backend index
    cdef bytes action_names_blob
    cdef size_t action_off[MAX_ACTIONS]
    cdef size_t action_len[MAX_ACTIONS]
    cdef int nactions
    cdef int other_action                  # table row for actions not named, or -1
    cdef double deadline_s[MAX_ACTIONS]
    cdef uint8_t ok[MAX_ACTIONS][MAX_BACKENDS]
    cdef bytes sticky_key
    cdef object bucket_of
    # per action row: 0 names no model, 1 names one by model_pref (generate), 2 may name
    # some in model_id/model_name/model_ids (those requests go up to Python)
    cdef uint8_t row_models[MAX_ACTIONS]
    # the owner table (set_owners): per model_pref, the model id and where it may go
    cdef int owners_active
    cdef bytes pref_blob
    cdef size_t pref_off[MAX_PREFS]
    cdef size_t pref_len[MAX_PREFS]
    cdef int pref_model[MAX_PREFS]
    cdef int pref_backend[MAX_PREFS]   # >= 0 the owner, -1 ask Python, -2 no model
    cdef int npref
    cdef int fallback_model, fallback_backend   # a model_pref not listed (MMA: "fast")
    cdef list ok_status
    # per batch (set_gate)
    cdef int enabled
    cdef uint8_t healthy[MAX_BACKENDS]
    cdef int punt_replies
    cdef object gate         # the pump's gate callback, until called (see pump)
    # in flight
    cdef Slot *slots
    cdef uint32_t nslots
    cdef uint32_t *free_list
    cdef uint32_t nfree
    cdef uint32_t inflight_n
    cdef uint64_t *heap     # (deadline order) slot index << 32 | gen, keyed by slot deadline
    cdef uint32_t heap_n
    cdef uint32_t heap_cap
    cdef uint64_t *htab     # open addressing: slot index + 1, 0 empty; by payload hash
    cdef uint32_t hcap
    cdef uint32_t htomb     # tombstones in htab (a rehash clears them)
    cdef uint64_t rng
    # counters (read by Python per batch and at scrape time; see ``take_counts``)
    cdef uint64_t n_requests, n_replies, n_unroutable, n_joins
    cdef uint64_t n_ok[MAX_ACTIONS][MAX_BACKENDS]
    cdef double lat_sum[MAX_ACTIONS][MAX_BACKENDS]
    cdef uint64_t lat_buckets[MAX_ACTIONS][MAX_BACKENDS][NLAT]
    cdef uint64_t n_late[MAX_BACKENDS]
    cdef uint64_t n_success[MAX_BACKENDS]
    cdef uint32_t touched   # backends whose late/success/in-flight counts moved (bit b)
    # sockets sent on since they were last read to EAGAIN (bit 0 the frontend, bit b + 1
    # backend b): libzmq may have taken their read edge (ZMQ_FD) while sending, so they
    # must be read again before the loop waits for the next edge
    cdef uint32_t dirty
    cdef uint64_t n_inflight_b[MAX_BACKENDS]
    cdef uint64_t m_sent[MAX_MODELS][MAX_BACKENDS]
    cdef uint64_t m_done[MAX_MODELS][MAX_BACKENDS]
    cdef uint64_t m_loaded[MAX_MODELS][MAX_BACKENDS]
    cdef int m_touched
    cdef list _parked       # replies for Python's backlog (the client's queue is full)

    def __cinit__(self):
        self.slots = NULL
        self.free_list = NULL
        self.heap = NULL
        self.htab = NULL

    def __init__(self, size_t frontend, list backends, size_t max_request_bytes,
                 size_t max_reply_bytes, bint dedup, double bytes_window_s):
        """``frontend``/``backends``: pyzmq sockets' ``underlying`` handles (0: a backend
        the core never sends to); sizes as shim.max_request_bytes/max_reply_bytes."""
        if len(backends) > MAX_BACKENDS:
            raise ValueError("too many backends for the compiled core")
        self.front = <void *>frontend
        self.nbackends = len(backends)
        for i, h in enumerate(backends):
            self.backs[i] = <void *><size_t>h
        self.max_request = max_request_bytes
        self.max_reply = max_reply_bytes
        self.dedup = dedup
        self.window_s = bytes_window_s
        self.enabled = 0
        self.other_action = -1
        self.nactions = 0
        self.nbounds = 0
        self.sticky_key = b""
        self.owners_active = 0
        self.npref = 0
        self.pref_blob = b""
        self.fallback_model = -1
        self.fallback_backend = -2
        self.ok_status = []
        self.rng = 0x9E3779B97F4A7C15ULL ^ <uint64_t>(now_s() * 1e9)
        self._grow(1024)
        self.hcap = 4096
        self.htab = <uint64_t *>malloc(self.hcap * sizeof(uint64_t))
        memset(self.htab, 0, self.hcap * sizeof(uint64_t))
        self.heap_cap = 1024
        self.heap = <uint64_t *>malloc(self.heap_cap * sizeof(uint64_t))
        if self.htab == NULL or self.heap == NULL:
            raise MemoryError()

    def __dealloc__(self):
        cdef uint32_t i
        if self.slots != NULL:
            for i in range(self.nslots):
                if self.slots[i].used:
                    free_envs(self.slots[i].envs)
                    free(self.slots[i].payload)
            free(self.slots)
        free(self.free_list)
        free(self.heap)
        free(self.htab)

    cdef int _grow(self, uint32_t to) except -1:
        cdef uint32_t old = self.nslots, i
        cdef Slot *s = <Slot *>realloc(self.slots, to * sizeof(Slot))
        if s == NULL:
            raise MemoryError()
        self.slots = s
        memset(self.slots + old, 0, (to - old) * sizeof(Slot))
        cdef uint32_t *fl = <uint32_t *>realloc(self.free_list, to * sizeof(uint32_t))
        if fl == NULL:
            raise MemoryError()
        self.free_list = fl
        i = to
        while i > old:
            i -= 1
            self.free_list[self.nfree] = i
            self.nfree += 1
        self.nslots = to
        return 0

    # -- tables --------------------------------------------------------------------------

    def set_tables(self, list bounds, list names, list actions, object other,
                   bytes sticky_key, object bucket_of):
        """Install new routing tables at once (a Runtime swap).

        ``bounds``/``names``: shim.routing.RoutingTable's cumulative bucket bounds and the
        backend index owning each range; ``actions``: ``(name, deadline_ms, ok, models)``
        rows, ``ok`` one byte per backend (1: a request of that action routed there may go
        fast), ``models`` what the owner table makes of it (0: it names no model, 1: it
        names one by ``model_pref``, 2: ``model_id``/``model_name``/``model_ids`` name
        models, and such a request goes up to Python while ``set_owners`` is active);
        ``other``: the row for an action name not listed, or None (punt);
        ``sticky_key``: routing.sticky_key (b"": none) and ``bucket_of`` its hash
        (shim.routing.bucket_of), called for sticky requests only.
        """
        cdef int i, j
        if len(bounds) > MAX_BACKENDS or len(actions) + 1 > MAX_ACTIONS:
            raise ValueError("tables too large for the compiled core")
        rows = list(actions) + ([other] if other is not None else [])
        blob = b"".join(r[0] for r in rows)
        off = 0
        for i, (name, deadline_ms, ok, models) in enumerate(rows):
            self.row_models[i] = models
            self.action_off[i] = off
            self.action_len[i] = len(name)
            off += len(name)
            self.deadline_s[i] = deadline_ms / 1000.0
            for j in range(MAX_BACKENDS):
                self.ok[i][j] = ok[j] if j < len(ok) else 0
        self.nactions = len(actions)
        self.other_action = len(actions) if other is not None else -1
        self.action_names_blob = blob
        for i, (bound, backend) in enumerate(zip(bounds, names)):
            self.bounds[i] = bound
            self.table_backend[i] = backend
        self.nbounds = len(bounds)
        self.sticky_key = sticky_key
        self.bucket_of = bucket_of

    def set_owners(self, bint active, list prefs, tuple fallback, list ok_status):
        """The owner table (shim.addons.ownership, through shim.fastpath), installed at
        once. ``active``: requests naming a model obey it (else they route by weights).
        ``prefs``: ``(model_pref, model id, backend)`` rows, backend >= 0 the one the model
        may go to fast, -1 "ask Python", -2 "the pref names no model" (weights);
        ``fallback``: ``(model id, backend)`` for a pref not listed (MMA resolves it as
        "fast"); ``ok_status``: reply statuses that mean the model was served."""
        cdef int i
        if len(prefs) > MAX_PREFS:
            raise ValueError("too many model_pref values for the compiled core")
        off = 0
        for i, (pref, model, backend) in enumerate(prefs):
            if not -1 <= model < MAX_MODELS or not -2 <= backend < self.nbackends:
                raise ValueError("owner table entry out of range")
            self.pref_off[i] = off
            self.pref_len[i] = len(pref)
            off += len(pref)
            self.pref_model[i] = model
            self.pref_backend[i] = backend
        self.pref_blob = b"".join(p[0] for p in prefs)
        self.npref = len(prefs)
        self.fallback_model, self.fallback_backend = fallback
        self.ok_status = list(ok_status)
        self.owners_active = active

    cdef int _owner(self, Fields *f, int row, int *model) noexcept:
        """Where the owner table sends this request: >= 0 the backend, -1 punt, -2 by the
        weights; ``model`` gets the model id (-1 none)."""
        cdef int i
        cdef const uint8_t *pref
        cdef size_t n
        cdef const char *blob
        model[0] = -1
        if not self.owners_active or self.row_models[row] == 0:
            return -2
        if self.row_models[row] == 2:
            return -1 if f.model_key else -2
        if f.pref_kind == 3:
            return -1  # a number or another type: Python reads it loosely
        if f.pref_kind == 1 and f.pref_len:
            pref, n = f.pref, f.pref_len
        else:  # absent, null or "": MMA's "fast"
            pref, n = <const uint8_t *>b"fast", 4
        blob = PyBytes_AS_STRING(self.pref_blob)
        for i in range(self.npref):
            if self.pref_len[i] == n and memcmp(blob + self.pref_off[i], pref, n) == 0:
                model[0] = self.pref_model[i]
                return self.pref_backend[i]
        model[0] = self.fallback_model
        return self.fallback_backend

    def set_gate(self, bint enabled, bytes healthy):
        """Whether requests may go fast now (no addon needs to see them, not draining)
        and which backends are healthy (2), connected (1) or neither (0)."""
        cdef int j
        self.enabled = enabled
        for j in range(self.nbackends):
            self.healthy[j] = healthy[j] if j < len(healthy) else 0

    # -- the frontend --------------------------------------------------------------------

    cdef int _action_row(self, const uint8_t *a, size_t n) noexcept:
        cdef int i
        cdef const char *blob = PyBytes_AS_STRING(self.action_names_blob)
        for i in range(self.nactions):
            if self.action_len[i] == n and memcmp(blob + self.action_off[i], a, n) == 0:
                return i
        return self.other_action

    cdef int _bucket(self, Fields *f) except -2:
        """The request's routing bucket (shim.routing: its sticky key's, else a random
        draw), or -1 (punt: a key Python reads)."""
        cdef uint64_t x
        cdef int bucket
        if f.sticky_kind == 1 or f.sticky_kind == 2:
            key = PyBytes_FromStringAndSize(<const char *>f.sticky, f.sticky_len)
            try:
                text = key.decode()
                if f.sticky_kind == 2:
                    text = str(int(text))
                bucket = self.bucket_of(text)
            except Exception:
                return -1
        elif f.sticky_kind == 3:
            return -1
        else:
            x = self.rng  # xorshift64*
            x ^= x >> 12
            x ^= x << 25
            x ^= x >> 27
            self.rng = x
            bucket = <int>(((x * 2685821657736338717ULL) >> 32) % NBUCKETS)
        return bucket

    cdef int _backend_of(self, int bucket) noexcept:
        """The backend whose range holds ``bucket`` (shim.routing.RoutingTable), or -1."""
        cdef int i
        for i in range(self.nbounds):
            if bucket < self.bounds[i]:
                return self.table_backend[i]
        return -1

    cdef int _find_dup(self, uint64_t h, const char *p, size_t n, double now) noexcept:
        cdef uint32_t mask = self.hcap - 1, k = <uint32_t>h & mask
        cdef uint64_t v
        cdef Slot *s
        while True:
            v = self.htab[k]
            if v == 0:
                return -1
            if v != <uint64_t>-1:
                s = &self.slots[v - 1]
                if s.used and s.hash == h and s.payload_len == n \
                        and memcmp(s.payload, p, n) == 0 and now - s.started <= self.window_s:
                    return <int>(v - 1)
            k = (k + 1) & mask

    cdef void _hput(self, uint32_t idx) noexcept:
        cdef uint32_t mask = self.hcap - 1, k = <uint32_t>self.slots[idx].hash & mask
        while self.htab[k] != 0 and self.htab[k] != <uint64_t>-1:
            k = (k + 1) & mask
        self.htab[k] = idx + 1

    cdef void _hdel(self, uint32_t idx) noexcept:
        cdef uint32_t mask = self.hcap - 1, k = <uint32_t>self.slots[idx].hash & mask
        while self.htab[k] != 0:
            if self.htab[k] == idx + 1:
                self.htab[k] = <uint64_t>-1  # a tombstone
                self.htomb += 1
                return
            k = (k + 1) & mask

    cdef int _rehash(self) except -1:
        cdef uint32_t i, cap = self.hcap
        while cap < 4 * self.nslots:
            cap *= 2
        free(self.htab)
        self.htab = <uint64_t *>malloc(cap * sizeof(uint64_t))
        if self.htab == NULL:
            raise MemoryError()
        memset(self.htab, 0, cap * sizeof(uint64_t))
        self.hcap = cap
        self.htomb = 0
        for i in range(self.nslots):
            if self.slots[i].used:
                self._hput(i)
        return 0

    cdef int _heap_push(self, uint64_t item) except -1:
        cdef uint32_t i, parent, kept
        cdef uint64_t tmp
        cdef uint64_t *hp
        if self.heap_n == self.heap_cap:
            # Entries of requests already answered linger until they reach the top:
            # drop them all when they are most of the heap, else make room.
            kept = 0
            for i in range(self.heap_n):
                if self._hkey(self.heap[i]) >= 0:
                    self.heap[kept] = self.heap[i]
                    kept += 1
            self.heap_n = kept
            i = kept // 2
            while i > 0:
                i -= 1
                self._sift_down(i)
            if self.heap_n * 2 > self.heap_cap:
                hp = <uint64_t *>realloc(self.heap, 2 * self.heap_cap * sizeof(uint64_t))
                if hp == NULL:
                    raise MemoryError()
                self.heap = hp
                self.heap_cap *= 2
        i = self.heap_n
        self.heap[i] = item
        self.heap_n += 1
        while i > 0:
            parent = (i - 1) // 2
            if self._hkey(self.heap[parent]) <= self._hkey(self.heap[i]):
                break
            tmp = self.heap[parent]
            self.heap[parent] = self.heap[i]
            self.heap[i] = tmp
            i = parent
        return 0

    cdef void _sift_down(self, uint32_t i) noexcept:
        cdef uint32_t l, r, m
        cdef uint64_t tmp
        while True:
            l, r, m = 2 * i + 1, 2 * i + 2, i
            if l < self.heap_n and self._hkey(self.heap[l]) < self._hkey(self.heap[m]):
                m = l
            if r < self.heap_n and self._hkey(self.heap[r]) < self._hkey(self.heap[m]):
                m = r
            if m == i:
                return
            tmp = self.heap[m]
            self.heap[m] = self.heap[i]
            self.heap[i] = tmp
            i = m

    cdef double _hkey(self, uint64_t item) noexcept:
        cdef Slot *s = &self.slots[item >> 32]
        if not s.used or s.gen != <uint32_t>item:
            return -1.0  # stale: surfaces first and is dropped
        return s.deadline

    cdef uint64_t _heap_pop(self) noexcept:
        cdef uint64_t top = self.heap[0]
        self.heap_n -= 1
        self.heap[0] = self.heap[self.heap_n]
        self._sift_down(0)
        return top

    def pump(self, uint32_t readable, uint32_t todo, int budget, bint punt_replies,
             object gate):
        """Read the sockets in ``todo`` (bit 0 the frontend, bit b + 1 backend b: those
        whose read edge fired, or that Python sent on) among ``readable`` (those whose
        reader is started), up to ``budget`` messages per socket and pass; then again the
        readable sockets sent on after they were read (libzmq may have taken their read
        edge while sending), at most 4 passes. Each read ends on EAGAIN, which costs
        libzmq a system call (its mailbox check), so a socket is read only when needed.
        Returns None when nothing needs Python, else ``(punted, foreign,
        resume, parked, more)``:

        - ``punted``: client messages for ``Proxy._on_frames``, as ``(frames, fd)`` or,
          when the core drew the request's random routing bucket, ``(frames, fd,
          bucket)`` (Python routes it by that bucket and never draws again, so the split
          stays exact);
        - ``foreign``: ``(backend, frames)``, replies that are not the core's (for
          ``BackendPool._on_reply``);
        - ``resume``: the core's requests Python must finish (``_resume`` tuples);
        - ``parked``: ``(frames, fd)`` replies for Python's backlog (the client's queue is
          full);
        - ``more``: a socket may have more (a budget was spent, or more than HOLD_MAX
          bytes were handed up): pump again after Python's turn.

        ``punt_replies``: replies must go through Python (a client backlog exists:
        replies keep their order). ``gate``: called (no arguments) before the first
        client message of this call is looked at; it calls ``set_gate`` with what holds
        now (a pump that reads no request, e.g. one for a reply, never pays for it)."""
        cdef list punted = [], foreign = [], resume = [], parked = []
        cdef int passes, read, b
        cdef int more = 0
        todo &= readable
        self.punt_replies = punt_replies
        self.gate = gate
        for passes in range(4):
            self.dirty = 0
            if todo & 1:
                read = self._read_front(budget, punted)
                more = more or read >= budget
                self.dirty &= ~1u
            for b in range(self.nbackends):
                if todo & (2u << b) and self.backs[b] != NULL:
                    read = self._read_back(b, budget, foreign, resume, parked)
                    more = more or read >= budget
                    self.dirty &= ~(2u << b)
            # again only the sockets sent on after their read (a request forwarded to a
            # backend already read, a reply sent to the frontend)
            todo = self.dirty & readable
            if not todo or more:
                break
        else:
            # Passes spent with sockets still to read (their read edge may be gone):
            # again after Python's turn, never left for an edge that will not come.
            more = 1
        if not (punted or foreign or resume or parked or more):
            return None
        return punted, foreign, resume, parked, bool(more)

    cdef int _read_front(self, int budget, list punted) except -1:
        """Read up to ``budget`` client messages (``pump``); the number read."""
        cdef zmq_msg_t msgs[MAX_FRAMES + 1]
        cdef zmq_msg_t extra
        cdef int nf, rc, more, overflow, fd, row, b, k, dup, model, bucket, drawn
        cdef int read = 0
        cdef size_t plen, total, off, held = 0
        cdef const uint8_t *pay
        cdef Fields f
        cdef uint32_t idx
        cdef Slot *s
        cdef Env *env
        cdef uint64_t corr, h
        cdef uint8_t cbuf[8]
        cdef double t
        while read < budget:
            z_msg_init(&msgs[0])
            rc = z_msg_recv(&msgs[0], self.front, ZMQ_DONTWAIT)
            if rc < 0:
                z_msg_close(&msgs[0])
                break
            read += 1
            if self.gate is not None:  # once per pump, before the first request
                gate, self.gate = self.gate, None
                gate()
            fd = z_msg_get(&msgs[0], ZMQ_SRCFD)
            nf = 1
            overflow = 0
            more = z_msg_more(&msgs[0])
            while more:
                if nf <= MAX_FRAMES:
                    z_msg_init(&msgs[nf])
                    z_msg_recv(&msgs[nf], self.front, ZMQ_DONTWAIT)
                    more = z_msg_more(&msgs[nf])
                    nf += 1
                else:  # too long to handle here: the rest are read for Python
                    overflow = 1
                    break
            t = now_s()
            # [identity..., b"", payload]: the delimiter is the last-but-one frame only
            b = -1
            row = -1
            model = -1
            drawn = -1  # a random bucket drawn here: handed up with a punted request
            if not overflow and self.enabled and nf >= 3 and z_msg_size(&msgs[nf - 2]) == 0:
                b = 0
                for k in range(nf - 2):
                    if z_msg_size(&msgs[k]) == 0:
                        b = -1  # an earlier delimiter: Python splits it
                        break
                if b == 0:
                    b = -1
                    pay = <const uint8_t *>z_msg_data(&msgs[nf - 1])
                    plen = z_msg_size(&msgs[nf - 1])
                    if plen <= self.max_request and scan_request(
                            pay, plen, <const uint8_t *>PyBytes_AS_STRING(self.sticky_key),
                            PyBytes_GET_SIZE(self.sticky_key), &f) \
                            and f.action_kind == 1 and not f.punt_key:
                        row = self._action_row(f.action, f.action_len)
                        if row >= 0:
                            b = self._owner(&f, row, &model)
                        if b >= 0:
                            # The model's owner, whatever the weights' draw (and with no
                            # other backend to fail over to): connected is enough.
                            if not self.ok[row][b] or self.healthy[b] < 1 \
                                    or self.backs[b] == NULL:
                                b = -1
                        elif b == -2:
                            model = -1
                            bucket = self._bucket(&f)
                            if f.sticky_kind == 0:
                                drawn = bucket  # Python routes by it, never draws again
                            b = self._backend_of(bucket) if bucket >= 0 else -1
                            if b < 0 or b >= self.nbackends or not self.ok[row][b] \
                                    or self.healthy[b] < self.ok[row][b] \
                                    or self.backs[b] == NULL:
                                b = -1
                        else:
                            b = -1
            if b < 0:
                # (without an overflow the frames loop above read the whole message)
                frames = take_frames(msgs, nf, more if overflow else 0, self.front, &held)
                punted.append((frames, fd) if drawn < 0 else (frames, fd, drawn))
                if held > HOLD_MAX:  # Python handles these before more is read
                    read = budget
                    break
                continue
            self.n_requests += 1
            # the envelope, kept for the reply
            env = <Env *>malloc(sizeof(Env))
            total = 0
            for k in range(nf - 1):
                total += z_msg_size(&msgs[k])
            env.data = <char *>malloc(total + 1)
            env.next = NULL
            env.fd = fd
            env.nframes = nf - 1
            off = 0
            for k in range(nf - 1):
                env.lens[k] = z_msg_size(&msgs[k])
                memcpy(env.data + off, z_msg_data(&msgs[k]), env.lens[k])
                off += env.lens[k]
                z_msg_close(&msgs[k])
            h = fnv1a(pay, plen)
            if self.dedup:
                dup = self._find_dup(h, <const char *>pay, plen, t)
                if dup >= 0:  # a re-send of a request in flight: its reply is ours too
                    env.next = self.slots[dup].envs
                    self.slots[dup].envs = env
                    self.n_joins += 1
                    z_msg_close(&msgs[nf - 1])
                    continue
            if self.nfree == 0:
                self._grow(self.nslots * 2)
                self._rehash()
            idx = self.free_list[self.nfree - 1]
            self.nfree -= 1
            s = &self.slots[idx]
            s.used = 1
            s.gen += 1
            s.backend = b
            s.action = row
            s.model = model
            s.started = t
            s.deadline = t + self.deadline_s[row]
            s.hash = h
            s.payload = <char *>malloc(plen + 1)
            memcpy(s.payload, pay, plen)
            s.payload_len = plen
            s.envs = env
            corr = CORR_MARK | (<uint64_t>(s.gen & 0x7FFFFFFF) << 32) | idx
            for k in range(8):
                cbuf[k] = (corr >> (56 - 8 * k)) & 0xFF
            self.dirty |= 2u << b  # a send may take that socket's read edge
            rc = z_send(self.backs[b], cbuf, 8, ZMQ_DONTWAIT | ZMQ_SNDMORE)
            if rc >= 0:
                rc = z_send(self.backs[b], b"", 0, ZMQ_DONTWAIT | ZMQ_SNDMORE)
            if rc >= 0:
                rc = z_msg_send(&msgs[nf - 1], self.backs[b], ZMQ_DONTWAIT)
            if rc < 0:
                # Not sent (the backend's queue is full or it just went): Python takes it
                # from the start, as if it had never been here.
                z_msg_close(&msgs[nf - 1])
                self.n_requests -= 1
                frames = self._release_frames(idx)
                punted.append((frames, fd) if drawn < 0 else (frames, fd, drawn))
                continue
            self.inflight_n += 1
            self.n_inflight_b[b] += 1
            self.touched |= 1u << b
            if model >= 0:
                self.m_sent[model][b] += 1
                self.m_touched = 1
            if self.dedup:
                # at most half full, tombstones included: a probe always ends
                if 2 * (self.inflight_n + 1 + self.htomb) > self.hcap:
                    self._rehash()
                self._hput(idx)
            self._heap_push((<uint64_t>idx << 32) | s.gen)
        return read

    cdef list _release_frames(self, uint32_t idx):
        """Free slot ``idx`` (never sent) and give back its one client's frames."""
        cdef Slot *s = &self.slots[idx]
        cdef Env *env = s.envs
        cdef size_t k, off = 0
        frames = []
        for k in range(env.nframes):
            frames.append(PyBytes_FromStringAndSize(env.data + off, env.lens[k]))
            off += env.lens[k]
        frames.append(PyBytes_FromStringAndSize(s.payload, s.payload_len))
        self._free_slot(idx, 0)
        return frames

    cdef void _free_slot(self, uint32_t idx, int sent) noexcept:
        cdef Slot *s = &self.slots[idx]
        if sent:
            if self.dedup:
                self._hdel(idx)
            self.inflight_n -= 1
            self.n_inflight_b[s.backend] -= 1
            self.touched |= 1u << s.backend
        free_envs(s.envs)
        s.envs = NULL
        free(s.payload)
        s.payload = NULL
        s.used = 0
        self.free_list[self.nfree] = idx
        self.nfree += 1

    cdef object _resume(self, uint32_t idx, object reply):
        """Slot ``idx`` handed to Python: ``(envelopes, payload, backend, action row,
        started, deadline, reply frames or None, fds, model id or -1)``; a request naming
        a model is counted answered by Python then (``fast_answered``), not here."""
        cdef Slot *s = &self.slots[idx]
        cdef Env *e = s.envs
        cdef size_t k, off
        envs = []
        fds = []
        while e != NULL:
            frames = []
            off = 0
            for k in range(e.nframes):
                frames.append(PyBytes_FromStringAndSize(e.data + off, e.lens[k]))
                off += e.lens[k]
            envs.append(frames)
            fds.append(e.fd)
            e = e.next
        envs.reverse()  # the first copy first, as joins are answered in Python
        fds.reverse()
        item = (envs, PyBytes_FromStringAndSize(s.payload, s.payload_len), s.backend,
                s.action, s.started, s.deadline, reply, fds, s.model)
        self._free_slot(idx, 1)
        return item

    # -- the backends --------------------------------------------------------------------

    cdef int _read_back(self, int b, int budget, list foreign, list resume,
                        list parked) except -1:
        """Read up to ``budget`` replies from backend ``b``'s socket (``pump``); the
        number read."""
        cdef zmq_msg_t msgs[4]
        cdef zmq_msg_t extra
        cdef int nf, rc, more, k, read = 0, consumed, served = 0
        cdef uint64_t corr
        cdef uint32_t idx, gen
        cdef const uint8_t *c
        cdef Slot *s
        cdef Env *e
        cdef size_t off, rlen, held = 0
        cdef double t
        cdef void *sock = self.backs[b]
        if sock == NULL:
            return 0
        while read < budget:
            z_msg_init(&msgs[0])
            rc = z_msg_recv(&msgs[0], sock, ZMQ_DONTWAIT)
            if rc < 0:
                z_msg_close(&msgs[0])
                break
            read += 1
            nf = 1
            more = z_msg_more(&msgs[0])
            while more and nf < 4:
                z_msg_init(&msgs[nf])
                z_msg_recv(&msgs[nf], sock, ZMQ_DONTWAIT)
                more = z_msg_more(&msgs[nf])
                nf += 1
            corr = 0
            if z_msg_size(&msgs[0]) == 8:
                c = <const uint8_t *>z_msg_data(&msgs[0])
                for k in range(8):
                    corr = (corr << 8) | c[k]
            if not (corr & CORR_MARK):
                foreign.append((b, take_frames(msgs, nf, more, sock, &held)))
                if held > HOLD_MAX:
                    read = budget
                    break
                continue
            idx = <uint32_t>(corr & 0xFFFFFFFF)
            gen = <uint32_t>((corr >> 32) & 0x7FFFFFFF)
            s = &self.slots[idx] if idx < self.nslots else NULL
            if s == NULL or not s.used or (s.gen & 0x7FFFFFFF) != gen or s.backend != b:
                self.n_late[b] += 1  # after its deadline (answered already), or confused
                self.touched |= 1u << b
                for k in range(nf):
                    z_msg_close(&msgs[k])
                while more:
                    z_msg_init(&extra)
                    z_msg_recv(&extra, sock, ZMQ_DONTWAIT)
                    more = z_msg_more(&extra)
                    z_msg_close(&extra)
                continue
            self.n_success[b] += 1  # a reply came: the pool's success accounting
            self.touched |= 1u << b
            rlen = z_msg_size(&msgs[2]) if nf >= 3 else 0
            # big replies go through Python, whose backlog bounds what a client that does
            # not read may cost (forwarded here, they piled up: tests/reliability/test_memory)
            if (nf != 3 or more or z_msg_size(&msgs[1]) != 0 or rlen > self.max_reply
                    or rlen > FAST_REPLY_MAX
                    or self.punt_replies
                    or not is_json_object(<const uint8_t *>z_msg_data(&msgs[2]), rlen)
                    or (s.model >= 0 and (served := reply_status(
                        <const uint8_t *>z_msg_data(&msgs[2]), rlen, self.ok_status)) < 0)):
                # Python decides (a bad reply may fail over): the frames after the id
                resume.append(self._resume(idx, take_frames(msgs, nf, more, sock, &held)))
                if held > HOLD_MAX:
                    read = budget
                    break
                continue
            z_msg_close(&msgs[0])
            z_msg_close(&msgs[1])
            # the reply to every copy of the request (the first copy first)
            self.dirty |= 1  # a send may take the frontend's read edge
            e = self._reverse(s)
            consumed = 0
            while e != NULL:
                off = 0
                rc = 0
                for k in range(e.nframes):
                    rc = z_send(self.front, e.data + off, e.lens[k], ZMQ_DONTWAIT | ZMQ_SNDMORE)
                    off += e.lens[k]
                    if rc < 0:
                        break
                if rc >= 0:
                    if e.next == NULL:
                        rc = z_msg_send(&msgs[2], self.front, ZMQ_DONTWAIT)
                        consumed = rc >= 0
                    else:
                        z_msg_init(&extra)
                        z_msg_copy(&extra, &msgs[2])
                        rc = z_msg_send(&extra, self.front, ZMQ_DONTWAIT)
                        if rc < 0:
                            z_msg_close(&extra)
                if rc >= 0:
                    self.n_replies += 1
                elif z_errno() == Z_EAGAIN:
                    # The client's queue is full (shim.peer_send_hwm): Python's backlog.
                    parked.append((self._env_frames(e) + [PyBytes_FromStringAndSize(
                        <const char *>z_msg_data(&msgs[2]), rlen)], e.fd))
                    held += rlen
                else:
                    self.n_unroutable += 1  # ROUTER_MANDATORY: the client has gone
                e = e.next
            if not consumed:
                z_msg_close(&msgs[2])
            if s.model >= 0:
                self.m_done[s.model][b] += 1
                self.m_loaded[s.model][b] += served
                self.m_touched = 1
            t = now_s() - s.started
            self.n_ok[s.action][b] += 1
            self.lat_sum[s.action][b] += t
            k = 0
            while k < 13 and t > LAT_BOUNDS[k]:
                k += 1
            self.lat_buckets[s.action][b][k] += 1  # per bucket, as prometheus-client keeps
            self._free_slot(idx, 1)
            if held > HOLD_MAX:  # replies waiting for the backlog: Python first
                read = budget
                break
        return read

    cdef Env *_reverse(self, Slot *s) noexcept:
        """Put the slot's envelopes in arrival order (joins were pushed on the front)."""
        cdef Env *prev = NULL
        cdef Env *cur = s.envs
        cdef Env *nx
        while cur != NULL:
            nx = cur.next
            cur.next = prev
            prev = cur
            cur = nx
        s.envs = prev
        return prev

    cdef list _env_frames(self, Env *e):
        cdef size_t k, off = 0
        frames = []
        for k in range(e.nframes):
            frames.append(PyBytes_FromStringAndSize(e.data + off, e.lens[k]))
            off += e.lens[k]
        return frames

    # -- deadlines -----------------------------------------------------------------------

    def expire(self, double now):
        """The core's requests whose deadline is ``now`` or earlier (``_resume`` tuples,
        reply None), for Python to answer as the pool's deadline would."""
        out = []
        cdef uint64_t top
        cdef double key
        while self.heap_n:
            top = self.heap[0]
            key = self._hkey(top)
            if key > now:
                break
            self._heap_pop()
            if key >= 0:
                out.append(self._resume(<uint32_t>(top >> 32), None))
        return out

    def next_deadline(self):
        """The earliest deadline in flight (CLOCK_MONOTONIC seconds), or None."""
        cdef double key
        while self.heap_n:
            key = self._hkey(self.heap[0])
            if key >= 0:
                return key
            self._heap_pop()
        return None

    def cut_all(self):
        """Every request in flight, handed to Python (shutdown, or a drain's cut)."""
        cdef uint32_t i
        out = []
        for i in range(self.nslots):
            if self.slots[i].used:
                out.append(self._resume(i, None))
        self.heap_n = 0
        return out

    def cut_backend(self, int b):
        """The requests in flight to backend ``b`` (its connection went), for Python."""
        cdef uint32_t i
        out = []
        for i in range(self.nslots):
            if self.slots[i].used and self.slots[i].backend == b:
                out.append(self._resume(i, None))
        return out

    def inflight_fds(self):
        """The client connections (ZMQ_SRCFD) with a request in flight, one per request."""
        cdef uint32_t i
        cdef Env *e
        out = []
        for i in range(self.nslots):
            if self.slots[i].used:
                e = self.slots[i].envs
                while e != NULL:
                    out.append(e.fd)
                    e = e.next
        return out

    @property
    def inflight(self):
        return self.inflight_n

    def inflight_of(self, int b):
        return self.n_inflight_b[b]

    def take_models(self):
        """The owner table's counts since the last call: ``[(model id, backend, sent,
        answered, answered with a success status)]``, zeroed (each added once)."""
        cdef int m, b
        out = []
        if not self.m_touched:
            return out
        for m in range(MAX_MODELS):
            for b in range(self.nbackends):
                if self.m_sent[m][b] or self.m_done[m][b]:
                    out.append((m, b, self.m_sent[m][b], self.m_done[m][b], self.m_loaded[m][b]))
                    self.m_sent[m][b] = self.m_done[m][b] = self.m_loaded[m][b] = 0
        self.m_touched = 0
        return out

    def take_moved(self):
        """Per backend whose counts moved since the last call: ``[(backend, late replies,
        successes, in flight now)]`` (what the pool's health and load views need after
        every batch), or None when none moved; zeroed, so that each is added once."""
        cdef int b
        if not self.touched:
            return None
        moved = []
        for b in range(self.nbackends):
            if self.touched & (1u << b):
                moved.append((b, self.n_late[b], self.n_success[b], self.n_inflight_b[b]))
                self.n_late[b] = 0
                self.n_success[b] = 0
        self.touched = 0
        return moved

    def take_counts(self):
        """Counters since the last call (only metrics: Python adds them when they are
        read): ``(requests, replies, unroutable, joins, [(action row, backend, n,
        seconds, per-bucket counts)])``, or None when all are zero; zeroed, so that each
        count is added once."""
        cdef int a, b, k
        rows = []
        for a in range(MAX_ACTIONS):
            for b in range(self.nbackends):
                if self.n_ok[a][b]:
                    rows.append((a, b, self.n_ok[a][b], self.lat_sum[a][b],
                                 [self.lat_buckets[a][b][k] for k in range(NLAT)]))
                    self.n_ok[a][b] = 0
                    self.lat_sum[a][b] = 0
                    for k in range(NLAT):
                        self.lat_buckets[a][b][k] = 0
        if not (rows or self.n_requests or self.n_replies or self.n_unroutable or self.n_joins):
            return None
        out = (self.n_requests, self.n_replies, self.n_unroutable, self.n_joins, rows)
        self.n_requests = self.n_replies = self.n_unroutable = self.n_joins = 0
        return out
