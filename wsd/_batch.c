/*
 * wsd._batch: per-page work on a batch of pages in one call, without the GIL:
 * finding fill pages, xxh3 checksums and digests, reading pages into new bytes,
 * AES-256-GCM sealing and opening.
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

#include <openssl/err.h>
#include <openssl/evp.h>
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

/* AES-256-GCM as cryptography's AESGCM does it: 12-byte nonces, 16-byte tags
 * appended to the ciphertext.  One cipher context and key schedule, and one
 * release of the GIL, for the whole batch: an AESGCM call costs about 1.2 µs
 * above the cipher's own work (2.0 µs for 1 byte, 2.4 for 4 KiB), as much as
 * sealing the page. */
#define GCM_KEY_BYTES 32
#define GCM_NONCE_BYTES 12
#define GCM_TAG_BYTES 16

typedef struct {
	Py_buffer key;
	Buffers nonces, inputs, aads;
} GcmArgs;

static void gcm_args_release(GcmArgs *a)
{
	buffers_release(&a->nonces);
	buffers_release(&a->inputs);
	buffers_release(&a->aads);
	if (a->key.obj)
		PyBuffer_Release(&a->key);
}

/* The key and the three same-length lists of buffers; -1 with an exception set. */
static int gcm_args_get(PyObject *args, const char *inputs, GcmArgs *a)
{
	PyObject *nonces, *ins, *aads;
	memset(a, 0, sizeof(*a));
	if (!PyArg_ParseTuple(args, "y*OOO", &a->key, &nonces, &ins, &aads))
		return -1;
	if (a->key.len != GCM_KEY_BYTES) {
		PyErr_Format(PyExc_ValueError, "an AES-256 key is %d bytes, not %zd", GCM_KEY_BYTES,
			     a->key.len);
		goto fail;
	}
	if (buffers_get(nonces, "nonces", &a->nonces) < 0 || buffers_get(ins, inputs, &a->inputs) < 0 ||
	    buffers_get(aads, "aads", &a->aads) < 0)
		goto fail;
	if (a->nonces.n != a->inputs.n || a->aads.n != a->inputs.n) {
		PyErr_Format(PyExc_ValueError, "%zd nonces, %zd %s and %zd aads", a->nonces.n, a->inputs.n,
			     inputs, a->aads.n);
		goto fail;
	}
	for (Py_ssize_t i = 0; i < a->nonces.n; i++)
		if (a->nonces.views[i].len != GCM_NONCE_BYTES) {
			PyErr_Format(PyExc_ValueError, "nonces[%zd] is %zd bytes, not %d", i,
				     a->nonces.views[i].len, GCM_NONCE_BYTES);
			goto fail;
		}
	for (Py_ssize_t i = 0; i < a->inputs.n; i++)
		if (a->inputs.views[i].len > INT_MAX - GCM_TAG_BYTES || a->aads.views[i].len > INT_MAX) {
			PyErr_Format(PyExc_OverflowError, "%s[%zd] is too long", inputs, i);
			goto fail;
		}
	return 0;
fail:
	gcm_args_release(a);
	return -1;
}

/* A list of n new bytes objects, input length + delta bytes each, and their buffers. */
static PyObject *gcm_outputs(const Buffers *in, Py_ssize_t delta, unsigned char ***bufs)
{
	PyObject *out = PyList_New(in->n);
	*bufs = PyMem_Malloc(in->n ? (size_t)in->n * sizeof(unsigned char *) : 1);
	if (!out || !*bufs)
		goto fail;
	for (Py_ssize_t i = 0; i < in->n; i++) {
		PyObject *b = PyBytes_FromStringAndSize(NULL, in->views[i].len + delta);
		if (!b)
			goto fail;
		(*bufs)[i] = (unsigned char *)PyBytes_AS_STRING(b);
		PyList_SET_ITEM(out, i, b);
	}
	return out;
fail:
	Py_XDECREF(out);
	PyMem_Free(*bufs);
	*bufs = NULL;
	if (!PyErr_Occurred())
		PyErr_NoMemory();
	return NULL;
}

/* One record, the context's key already set.  1 on success, 0 if (opening) the
 * record does not authenticate, -1 if OpenSSL fails. */
static int gcm_one(EVP_CIPHER_CTX *ctx, int seal, const Py_buffer *nonce, const Py_buffer *aad,
		   const unsigned char *in, int len, unsigned char *out)
{
	int n;
	if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce->buf, seal) != 1)
		return -1;
	if (aad->len && EVP_CipherUpdate(ctx, NULL, &n, aad->buf, (int)aad->len) != 1)
		return -1;
	if (len && EVP_CipherUpdate(ctx, out, &n, in, len) != 1)
		return -1;
	if (seal)
		return EVP_CipherFinal_ex(ctx, out + len, &n) == 1 &&
				       EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, GCM_TAG_BYTES,
							   out + len) == 1
			       ? 1
			       : -1;
	if (EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, GCM_TAG_BYTES, (void *)(in + len)) != 1)
		return -1;
	/* A failed final is the tag not matching; the plaintext already written to
	 * out is then dropped with the whole list. */
	return EVP_CipherFinal_ex(ctx, out + len, &n) == 1 ? 1 : 0;
}

/* gcm_seal and gcm_open; opening returns None when a record fails to authenticate. */
static PyObject *gcm_batch(PyObject *args, int seal)
{
	GcmArgs a;
	if (gcm_args_get(args, seal ? "plains" : "payloads", &a) < 0)
		return NULL;
	if (!seal)
		for (Py_ssize_t i = 0; i < a.inputs.n; i++)
			if (a.inputs.views[i].len < GCM_TAG_BYTES) {
				gcm_args_release(&a);
				Py_RETURN_NONE; /* no room for a tag: cannot authenticate */
			}
	unsigned char **bufs;
	PyObject *out = gcm_outputs(&a.inputs, seal ? GCM_TAG_BYTES : -GCM_TAG_BYTES, &bufs);
	if (!out) {
		gcm_args_release(&a);
		return NULL;
	}
	int ok = -1;
	Py_ssize_t i = 0;
	Py_BEGIN_ALLOW_THREADS
	EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
	if (ctx && EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, a.key.buf, NULL, seal) == 1 &&
	    EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, GCM_NONCE_BYTES, NULL) == 1) {
		for (ok = 1; i < a.inputs.n && ok == 1; i++) {
			int len = (int)a.inputs.views[i].len - (seal ? 0 : GCM_TAG_BYTES);
			ok = gcm_one(ctx, seal, &a.nonces.views[i], &a.aads.views[i], a.inputs.views[i].buf,
				     len, bufs[i]);
		}
	}
	EVP_CIPHER_CTX_free(ctx);
	Py_END_ALLOW_THREADS
	PyMem_Free(bufs);
	gcm_args_release(&a);
	if (ok == 1)
		return out;
	Py_DECREF(out);
	ERR_clear_error(); /* this thread's OpenSSL error queue: nothing to report from it */
	if (ok == 0)
		Py_RETURN_NONE;
	PyErr_Format(PyExc_RuntimeError, "OpenSSL failed to %s record %zd with AES-256-GCM",
		     seal ? "seal" : "open", i > 0 ? i - 1 : 0);
	return NULL;
}

/* gcm_seal(key, nonces, plains, aads) -> list[bytes] */
static PyObject *batch_gcm_seal(PyObject *self, PyObject *args)
{
	return gcm_batch(args, 1);
}

/* gcm_open(key, nonces, payloads, aads) -> list[bytes] | None */
static PyObject *batch_gcm_open(PyObject *self, PyObject *args)
{
	return gcm_batch(args, 0);
}

static PyMethodDef methods[] = {
	{"fills", batch_fills, METH_O, NULL},
	{"seeds", batch_seeds, METH_VARARGS, NULL},
	{"sums", batch_sums, METH_VARARGS, NULL},
	{"digests128", batch_digests128, METH_O, NULL},
	{"page_digests128", batch_page_digests128, METH_VARARGS, NULL},
	{"read_pages", batch_read_pages, METH_VARARGS, NULL},
	{"gcm_seal", batch_gcm_seal, METH_VARARGS, NULL},
	{"gcm_open", batch_gcm_open, METH_VARARGS, NULL},
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
