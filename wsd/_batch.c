/*
 * wsd._batch: per-page work on a batch of pages in one call, without the GIL:
 * finding fill pages, xxh3 checksums and digests, reading pages into new bytes.
 * The signatures, typed, are in _batch.pyi; the callers say why.
 *
 * This is a CPython extension rather than a cffi module (like wsd._pages_native)
 * because its arguments are lists of Python bytes: cffi would need one
 * ffi.from_buffer per page, which costs more than hashing the page.
 *
 * Every function takes what it reads as buffers (holding a reference to each)
 * or builds what it writes itself before it lets the GIL go, so no other thread
 * can free or resize them meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>

#include <xxhash.h>
#if defined(__x86_64__) || defined(__i386__)
/* Debian's libxxhash picks SSE2, AVX2 or AVX-512 at run time in its *_dispatch
 * functions; this header makes XXH3_* name them.  Inlined, xxh3 would be built for
 * the compiler's baseline (SSE2 on x86-64), which hashes a 4 KiB page slower than
 * python-xxhash does (0.26 against 0.22 µs on the development VM). */
#include <xxh_x86dispatch.h>
#endif

/* Pages read by one preadv: 128 KiB of 4 KiB pages, so that each page is still in
 * the CPU cache when it is hashed right after the call. */
#define READ_RUN_PAGES 32

typedef struct {
	Py_ssize_t n;
	Py_buffer *views;
} Buffers;

static void buffers_release(Buffers *b)
{
	for (Py_ssize_t i = 0; i < b->n; i++)
		PyBuffer_Release(&b->views[i]);
	PyMem_Free(b->views);
	b->views = NULL;
	b->n = 0;
}

/* A buffer of each item of a sequence; -1 with an exception set on failure. */
static int buffers_get(PyObject *seq, const char *what, Buffers *b)
{
	PyObject *fast = PySequence_Fast(seq, what);
	if (!fast)
		return -1;
	Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
	b->n = 0;
	b->views = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_buffer));
	if (!b->views) {
		Py_DECREF(fast);
		PyErr_NoMemory();
		return -1;
	}
	PyObject **items = PySequence_Fast_ITEMS(fast);
	for (Py_ssize_t i = 0; i < n; i++) {
		if (PyObject_GetBuffer(items[i], &b->views[i], PyBUF_SIMPLE) < 0) {
			PyErr_Format(PyExc_TypeError, "%s[%zd] is not a bytes-like object", what, i);
			buffers_release(b);
			Py_DECREF(fast);
			return -1;
		}
		b->n = i + 1;
	}
	Py_DECREF(fast);
	return 0;
}

/* fills(pages) -> bytes: per page an int16, the byte it is made of, or -1. */
static PyObject *batch_fills(PyObject *self, PyObject *pages)
{
	Buffers b;
	if (buffers_get(pages, "pages", &b) < 0)
		return NULL;
	PyObject *out = PyBytes_FromStringAndSize(NULL, b.n * (Py_ssize_t)sizeof(int16_t));
	if (!out) {
		buffers_release(&b);
		return NULL;
	}
	int16_t *fill = (int16_t *)PyBytes_AS_STRING(out);
	Py_BEGIN_ALLOW_THREADS
	for (Py_ssize_t i = 0; i < b.n; i++) {
		const unsigned char *p = b.views[i].buf;
		Py_ssize_t len = b.views[i].len;
		/* One byte repeated: the page equals itself shifted by one.  The last
		 * byte first rejects most data pages without reading them. */
		fill[i] = len && p[len - 1] == p[0] && !memcmp(p, p + 1, (size_t)len - 1)
				  ? (int16_t)p[0]
				  : -1;
	}
	Py_END_ALLOW_THREADS
	buffers_release(&b);
	return out;
}

/* seeds(identities, length) -> bytes: xxh3_64 of each length-byte identity, u64. */
static PyObject *batch_seeds(PyObject *self, PyObject *args)
{
	Py_buffer ids;
	Py_ssize_t length;
	if (!PyArg_ParseTuple(args, "y*n", &ids, &length))
		return NULL;
	if (length <= 0 || ids.len % length) {
		PyErr_Format(PyExc_ValueError, "identities of %zd bytes are not a whole number of %zd-byte identities",
			     ids.len, length);
		PyBuffer_Release(&ids);
		return NULL;
	}
	Py_ssize_t n = ids.len / length;
	PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
	if (out) {
		uint64_t *seed = (uint64_t *)PyBytes_AS_STRING(out);
		const char *p = ids.buf;
		Py_BEGIN_ALLOW_THREADS
		for (Py_ssize_t i = 0; i < n; i++)
			seed[i] = XXH3_64bits(p + i * length, (size_t)length);
		Py_END_ALLOW_THREADS
	}
	PyBuffer_Release(&ids);
	return out;
}

/* sums(payloads, seeds) -> bytes: xxh3_64 of each payload with its seed, u64. */
static PyObject *batch_sums(PyObject *self, PyObject *args)
{
	PyObject *payloads;
	Py_buffer seeds;
	if (!PyArg_ParseTuple(args, "Oy*", &payloads, &seeds))
		return NULL;
	Buffers b;
	if (buffers_get(payloads, "payloads", &b) < 0) {
		PyBuffer_Release(&seeds);
		return NULL;
	}
	PyObject *out = NULL;
	if (seeds.len != b.n * 8) {
		PyErr_Format(PyExc_ValueError, "%zd payloads but %zd bytes of seeds", b.n, seeds.len);
		goto done;
	}
	out = PyBytes_FromStringAndSize(NULL, b.n * 8);
	if (!out)
		goto done;
	uint64_t *sum = (uint64_t *)PyBytes_AS_STRING(out);
	const uint64_t *seed = seeds.buf;
	Py_BEGIN_ALLOW_THREADS
	for (Py_ssize_t i = 0; i < b.n; i++)
		sum[i] = XXH3_64bits_withSeed(b.views[i].buf, (size_t)b.views[i].len, seed[i]);
	Py_END_ALLOW_THREADS
done:
	buffers_release(&b);
	PyBuffer_Release(&seeds);
	return out;
}

/* The 16-byte canonical (big-endian) form, as xxhash.xxh3_128_digest returns. */
static void digest128(const void *p, size_t len, unsigned char *out)
{
	XXH128_canonical_t c;
	XXH128_canonicalFromHash(&c, XXH3_128bits(p, len));
	memcpy(out, c.digest, sizeof(c.digest));
}

/* digests128(pages) -> bytes: xxh3_128 of each page, 16 bytes each. */
static PyObject *batch_digests128(PyObject *self, PyObject *pages)
{
	Buffers b;
	if (buffers_get(pages, "pages", &b) < 0)
		return NULL;
	PyObject *out = PyBytes_FromStringAndSize(NULL, b.n * 16);
	if (out) {
		unsigned char *d = (unsigned char *)PyBytes_AS_STRING(out);
		Py_BEGIN_ALLOW_THREADS
		for (Py_ssize_t i = 0; i < b.n; i++)
			digest128(b.views[i].buf, (size_t)b.views[i].len, d + 16 * i);
		Py_END_ALLOW_THREADS
	}
	buffers_release(&b);
	return out;
}

/* page_digests128(buffer, size) -> bytes: digests128 of each size-byte piece. */
static PyObject *batch_page_digests128(PyObject *self, PyObject *args)
{
	Py_buffer buf;
	Py_ssize_t size;
	if (!PyArg_ParseTuple(args, "y*n", &buf, &size))
		return NULL;
	if (size <= 0 || buf.len % size) {
		PyErr_Format(PyExc_ValueError, "a buffer of %zd bytes is not a whole number of %zd-byte pages",
			     buf.len, size);
		PyBuffer_Release(&buf);
		return NULL;
	}
	Py_ssize_t n = buf.len / size;
	PyObject *out = PyBytes_FromStringAndSize(NULL, n * 16);
	if (out) {
		unsigned char *d = (unsigned char *)PyBytes_AS_STRING(out);
		const char *p = buf.buf;
		Py_BEGIN_ALLOW_THREADS
		for (Py_ssize_t i = 0; i < n; i++)
			digest128(p + i * size, (size_t)size, d + 16 * i);
		Py_END_ALLOW_THREADS
	}
	PyBuffer_Release(&buf);
	return out;
}

/*
 * read_pages(fd, offsets, size, seeds, zeros_past_end) -> (pages, sums)
 *
 * pread of the size-byte page at each u64 offset, straight into a new bytes object
 * per page (one copy, as a plain pread), one preadv per run of consecutive pages.
 * Past the end of the file a page reads as zeros if zeros_past_end, else the read
 * fails with EIO.  With seeds (u64 per offset, or None) each page is hashed as soon
 * as its run is read; sums is then the u64 checksums, else empty.  A failed read
 * raises OSError naming the pages.
 */
static PyObject *batch_read_pages(PyObject *self, PyObject *args)
{
	int fd;
	Py_buffer offs, seeds = {0};
	Py_ssize_t size;
	PyObject *seeds_obj;
	int zeros_past_end;
	if (!PyArg_ParseTuple(args, "iy*nOp", &fd, &offs, &size, &seeds_obj, &zeros_past_end))
		return NULL;
	PyObject *pages = NULL, *sums = NULL, *result = NULL;
	Py_ssize_t n = offs.len / 8;
	if (offs.len % 8 || size <= 0) {
		PyErr_SetString(PyExc_ValueError, "offsets must be u64s and size positive");
		goto done;
	}
	if (seeds_obj != Py_None) {
		if (PyObject_GetBuffer(seeds_obj, &seeds, PyBUF_SIMPLE) < 0)
			goto done;
		if (seeds.len != offs.len) {
			PyErr_Format(PyExc_ValueError, "%zd offsets but %zd bytes of seeds", n, seeds.len);
			goto done;
		}
	}
	pages = PyList_New(n);
	sums = PyBytes_FromStringAndSize(NULL, seeds.buf ? n * 8 : 0);
	char **bufs = PyMem_Malloc(n ? (size_t)n * sizeof(char *) : 1);
	if (!pages || !sums || !bufs) {
		PyMem_Free(bufs);
		if (!PyErr_Occurred())
			PyErr_NoMemory();
		goto done;
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		PyObject *page = PyBytes_FromStringAndSize(NULL, size);
		if (!page) {
			PyMem_Free(bufs);
			goto done;
		}
		bufs[i] = PyBytes_AS_STRING(page);
		PyList_SET_ITEM(pages, i, page);
	}
	const uint64_t *off = offs.buf;
	const uint64_t *seed = seeds.buf;
	uint64_t *sum = (uint64_t *)PyBytes_AS_STRING(sums);
	int err = 0;
	Py_ssize_t failed = 0, failed_count = 0;
	size_t eof_after = SIZE_MAX;
	Py_BEGIN_ALLOW_THREADS
	struct iovec iov[READ_RUN_PAGES];
	for (Py_ssize_t i = 0; i < n && !err;) {
		Py_ssize_t count = 1;
		while (i + count < n && count < READ_RUN_PAGES &&
		       off[i + count] == off[i] + (uint64_t)(count * size))
			count++;
		for (Py_ssize_t k = 0; k < count; k++) {
			iov[k].iov_base = bufs[i + k];
			iov[k].iov_len = (size_t)size;
		}
		size_t want = (size_t)(count * size), got = 0;
		while (got < want) {
			/* Resume a short read where it stopped: skip the iovecs filled. */
			size_t skip = got / (size_t)size, part = got % (size_t)size;
			struct iovec *v = iov + skip;
			v->iov_base = bufs[i + (Py_ssize_t)skip] + part;
			v->iov_len = (size_t)size - part;
			ssize_t r = preadv(fd, v, (int)(count - (Py_ssize_t)skip), (off_t)(off[i] + got));
			if (r < 0) {
				if (errno == EINTR)
					continue;
				err = errno;
				failed = i;
				failed_count = count;
				break;
			}
			if (r == 0 && !zeros_past_end) {
				err = EIO;
				eof_after = got;
				failed = i;
				failed_count = count;
				break;
			}
			if (r == 0) {
				/* End of file: the rest of the run reads as zeros. */
				for (size_t k = skip; k < (size_t)count; k++, part = 0)
					memset(bufs[i + (Py_ssize_t)k] + part, 0, (size_t)size - part);
				break;
			}
			got += (size_t)r;
		}
		if (seed && !err)
			for (Py_ssize_t k = i; k < i + count; k++)
				sum[k] = XXH3_64bits_withSeed(bufs[k], (size_t)size, seed[k]);
		i += count;
	}
	Py_END_ALLOW_THREADS
	PyMem_Free(bufs);
	if (err) {
		char what[128];
		int at = snprintf(what, sizeof(what), "preadv of %zd pages at %#llx", failed_count,
				  (unsigned long long)off[failed]);
		if (eof_after != SIZE_MAX && at > 0 && (size_t)at < sizeof(what))
			snprintf(what + at, sizeof(what) - (size_t)at, ": end of file after %zu bytes",
				 eof_after);
		PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, what);
		if (exc) {
			PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
			Py_DECREF(exc);
		}
		goto done;
	}
	result = PyTuple_Pack(2, pages, sums);
done:
	Py_XDECREF(pages);
	Py_XDECREF(sums);
	PyBuffer_Release(&offs);
	if (seeds.obj)
		PyBuffer_Release(&seeds);
	return result;
}

static PyMethodDef methods[] = {
	{"fills", batch_fills, METH_O, NULL},
	{"seeds", batch_seeds, METH_VARARGS, NULL},
	{"sums", batch_sums, METH_VARARGS, NULL},
	{"digests128", batch_digests128, METH_O, NULL},
	{"page_digests128", batch_page_digests128, METH_VARARGS, NULL},
	{"read_pages", batch_read_pages, METH_VARARGS, NULL},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "wsd._batch",
	.m_size = -1,
	.m_methods = methods,
};

PyMODINIT_FUNC PyInit__batch(void)
{
	return PyModule_Create(&module);
}
