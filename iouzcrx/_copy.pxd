# Copies out of the receive area (see _copy.h for why not plain memcpy).

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize


cdef extern from "_copy.h" nogil:
    void iouz_copy(void *dst, const void *src, size_t n)


cdef inline bytes copy_to_bytes(const char *data, Py_ssize_t length):
    result = PyBytes_FromStringAndSize(NULL, length)
    iouz_copy(PyBytes_AS_STRING(result), data, <size_t>length)
    return result


cdef inline bytearray copy_to_bytearray(const char *data, Py_ssize_t length):
    result = PyByteArray_FromStringAndSize(NULL, length)
    iouz_copy(PyByteArray_AS_STRING(result), data, <size_t>length)
    return result


cdef inline int export_protocol_buffer(object memory, Py_buffer *target,
                                       Py_ssize_t hint) except -1:
    """Export ``memory``, what a protocol's ``get_buffer(hint)`` returned, as
    writable contiguous bytes into ``target`` (released by the caller), or
    raise naming what is wrong with it."""
    try:
        PyObject_GetBuffer(memory, target, PyBUF_WRITABLE)
    except (BufferError, TypeError) as exc:
        raise TypeError(
            f"get_buffer({hint}) returned {type(memory).__name__!r}, which is not "
            "writable contiguous memory: return a bytearray, a writable memoryview "
            "or another object exporting a writable buffer") from exc
    if target.len <= 0:
        PyBuffer_Release(target)
        raise RuntimeError("get_buffer() returned an empty buffer")
    return 0
